"""A private Tor network on loopback, for tests, benchmarks and the demo.

Built from Debian's ``tor`` and ``tor-gencert``. ``docs/DESIGN.md`` ("Private Tor network") has
the recipe and the pitfalls cited below as "pitfall N". It never contacts the public Tor
network: every tor it starts knows only this network's three directory authorities.

Command line::

    python -m lib.testnet --dir DIR [--exit-ports 1-65535] [--exits 2] [--relays 0]
                          [--first-address 2] [--timeout 120]

prints progress lines while starting, writes ``DIR/client.torrc`` (the torrc lines a client needs to
join) once every relay holds a usable consensus, and runs until Ctrl-C or SIGTERM, then stops the
tors it started (SIGTERM, wait, SIGKILL).

Python API::

    net = TorNetwork(directory, exit_ports="1-65535", exits=2, relays=0, log=print,
                     first_address=2)
    net.start(timeout=120)           # blocks until usable (≈ 15-23 s); raises TestnetError
    net.client_torrc_lines()         # ["TestingTorNetwork 1", "DirAuthority ...", ...]
    net.client_torrc_path            # DIR/client.torrc
    net.relays                       # [Relay(nickname, role, fingerprint, address, or_port,
                                     #        dir_port, control_port, pid, data_dir), ...]
    net.relay("exit0")               # one Relay by nickname
    net.kill_relay("exit0")          # SIGKILL it (fault tests); net.restart_relay("exit0")
    net.relay_controller("exit0")    # stem Controller to a relay (never a bare one: see there)
    net.stop()                       # also: with TorNetwork(...) as net: ...

Roles: ``authority`` (3, v3 directory authorities, no exit), ``exit`` (``exits``, default 2) and
``relay`` (``relays`` middle relays, default 0). Each relay has its own loopback address
(127.0.0.2 and up, pitfall 2); services under test stay on 127.0.0.1.

Works in plain and gevent monkey-patched processes alike: it uses only ``subprocess``, files,
``http.client`` and ``time.sleep`` (no SIGALRM, no stem timeouts). Run it inside a network
namespace holding only loopback (``scripts/test.sh`` does): the exits accept ``*:exit_ports``
(pitfall 1), so outside a namespace narrow ``exit_ports`` to the ports you need.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from lib.errors import ShroudError

__all__ = ["TorNetwork", "Relay", "TestnetError", "parse_consensus_flags", "main"]

AUTHORITY, EXIT, RELAY = "authority", "exit", "relay"
AUTHORITY_COUNT = 3

# Every tor's own timing (pitfall 5). 10 s initial interval so the first vote
# comes ~5 s after an aligned launch; 60 s afterwards keeps the idle network at < 1 % of a core.
INITIAL_VOTING_INTERVAL = 10
VOTING_INTERVAL = 60
# Launch within this many seconds after a multiple of INITIAL_VOTING_INTERVAL (pitfall 5).
LAUNCH_ALIGNMENT_SLACK = 0.5
# A stopped tor gets this long between SIGTERM and SIGKILL (ShutdownWaitLength is 0, so a tor
# normally exits in well under a second; 10 s covers a loaded machine).
STOP_GRACE_SECONDS = 10.0
# Readiness is polled this often; SIGHUPs to laggards go out at the same pace (pitfall 6).
POLL_SECONDS = 1.0
# Key generation: 3072-bit RSA takes ≈ 1 s of CPU per authority; 60 s covers a slow machine.
KEYGEN_TIMEOUT = 60.0
# How much of a tor's log goes into an error message.
LOG_TAIL_LINES = 8


class TestnetError(ShroudError):
    """The private network could not be started (the message says which tor and why)."""

    __test__ = False  # not a pytest test class, despite the name


@dataclasses.dataclass
class Relay:
    """One tor of the network. ``pid`` is None while it is not running."""

    __test__ = False

    nickname: str
    role: str  # AUTHORITY, EXIT or RELAY
    address: str  # its own loopback address, 127.0.0.2 and up
    or_port: int
    control_port: int  # on 127.0.0.1, cookie authentication (cookie in data_dir/control_auth_cookie)
    data_dir: str
    dir_port: Optional[int] = None  # authorities only
    fingerprint: str = ""  # 40 hex digits, relay identity
    v3ident: str = ""  # authorities only: v3 authority identity
    pid: Optional[int] = None
    process: Optional[subprocess.Popen] = dataclasses.field(default=None, repr=False)

    @property
    def torrc_path(self) -> str:
        return os.path.join(self.data_dir, "torrc")

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, "notice.log")

    @property
    def control_cookie_path(self) -> str:
        return os.path.join(self.data_dir, "control_auth_cookie")


def parse_consensus_flags(text: str) -> dict[str, set[str]]:
    """Map each router's nickname in a (microdesc or full) consensus to its flags.

    A consensus lists each router as an ``r NICKNAME ...`` line followed by an ``s FLAG ...`` line.
    """
    flags: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("r "):
            parts = line.split()
            current = parts[1] if len(parts) > 1 else None
            if current:
                flags[current] = set()
        elif line.startswith("s ") and current is not None:
            flags[current] = set(line.split()[1:])
            current = None
    return flags


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _parse_port_ranges(spec: str) -> list[str]:
    """'80,443,1000-2000' -> ['80', '443', '1000-2000'], each checked to be within 1-65535."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad exit port spec {part!r}: want PORT or LOW-HIGH, comma-separated")
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad exit port range {part!r}: ports are 1-65535")
        out.append(part)
    return out


class TorNetwork:
    """A private Tor network: 3 authorities, ``exits`` exits and ``relays`` middle relays.

    :param directory: a fresh or empty directory; one sub-directory per tor is created in it.
    :param exit_ports: ports the exits accept for any address (besides 127.0.0.0/8:*), pitfall 1.
    :param log: called with one progress line (``testnet event=... key=value``) at a time.
    """

    def __init__(
        self,
        directory: str,
        exit_ports: str = "1-65535",
        exits: int = 2,
        relays: int = 0,
        log: Optional[Callable[[str], None]] = _log_to_stderr,
        tor_cmd: str = "tor",
        tor_gencert_cmd: str = "tor-gencert",
        first_address: int = 2,
    ):
        if exits < 1:
            raise ValueError("a usable network needs at least 1 exit (2 recommended)")
        if relays < 0:
            raise ValueError("relays must be >= 0")
        self.directory = os.path.abspath(directory)
        self.exit_ports = _parse_port_ranges(exit_ports)
        self.exit_count = exits
        self.relay_count = relays
        self._log = log or (lambda line: None)
        self.tor_cmd = tor_cmd
        self.tor_gencert_cmd = tor_gencert_cmd
        # Relays take 127.0.0.<first_address> and up; two networks at once need disjoint ranges.
        self.first_address = first_address
        self.relays: list[Relay] = []
        self.started = False
        self._stopping = False  # set by stop(): a start() still running in another thread gives up
        self._lock = threading.Lock()  # kill/restart/stop may come from signal handlers or threads

    # -- public -------------------------------------------------------------------------------

    @property
    def client_torrc_path(self) -> str:
        return os.path.join(self.directory, "client.torrc")

    def relay(self, nickname: str) -> Relay:
        for r in self.relays:
            if r.nickname == nickname:
                return r
        raise KeyError(f"no relay named {nickname!r} (have {[r.nickname for r in self.relays]})")

    def by_role(self, role: str) -> list[Relay]:
        return [r for r in self.relays if r.role == role]

    def client_torrc_lines(self) -> list[str]:
        """The torrc lines a client needs to join this network (recipe 8)."""
        if not self.relays:
            raise TestnetError("network not configured yet: call start() first")
        lines = ["TestingTorNetwork 1"]
        lines += [self._dir_authority_line(a) for a in self.by_role(AUTHORITY)]
        lines += ["PathsNeededToBuildCircuits 0.67", "LearnCircuitBuildTimeout 0"]
        return lines

    def start(self, timeout: float = 120.0) -> None:
        """Generate keys, launch every tor and wait until each one holds a usable consensus.

        :raises TestnetError: a tool is missing, a tor died, or the network is not usable within
            ``timeout`` seconds; everything started so far is stopped first.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        for cmd in (self.tor_cmd, self.tor_gencert_cmd):
            if shutil.which(cmd) is None:
                raise TestnetError(f"{cmd!r} not found on PATH: install Debian's tor package "
                                   "(apt-get install tor, or ./scripts/setup.sh as root)")
        try:
            self._configure()
            self._event("keys", seconds=f"{time.monotonic() - t0:.1f}", tors=len(self.relays))
            self._align_launch(deadline)
            launched = time.monotonic()
            with self._lock:  # stop() from another thread sees all of them or none
                for r in self.relays:  # authorities first: they are first in the list
                    self._launch(r)
            self._event("launched", tors=len(self.relays),
                        pids=",".join(str(r.pid) for r in self.relays))
            self._wait_usable(deadline)
            self._write_client_torrc()
            self.started = True
            self._event("ready", seconds=f"{time.monotonic() - t0:.1f}",
                        since_launch=f"{time.monotonic() - launched:.1f}",
                        client_torrc=self.client_torrc_path)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every tor this network started: SIGTERM, wait, SIGKILL. Idempotent."""
        with self._lock:
            self._stopping = True
            running = [r for r in self.relays if r.process is not None]
            for r in running:
                _signal(r.process, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for r in running:
                _wait_or_kill(r.process, max(0.0, deadline - time.monotonic()))
                r.process, r.pid = None, None
            if running:
                self._event("stopped", tors=len(running))
            self.started = False

    def kill_relay(self, nickname: str, sig: int = signal.SIGKILL) -> None:
        """Kill one tor abruptly (a relay crash, for fault tests). Waits until it is gone."""
        r = self.relay(nickname)
        with self._lock:
            if r.process is None:
                raise TestnetError(f"{nickname} is not running")
            _signal(r.process, sig)
            _wait_or_kill(r.process, STOP_GRACE_SECONDS)
            r.process, r.pid = None, None
        self._event("killed", relay=nickname, signal=signal.Signals(sig).name)

    def restart_relay(self, nickname: str) -> None:
        """Start a killed tor again with the same keys, addresses and ports."""
        r = self.relay(nickname)
        with self._lock:
            if r.process is not None:
                raise TestnetError(f"{nickname} is still running (pid {r.pid})")
            self._launch(r)  # raises once stop() was called
        self._event("restarted", relay=nickname, pid=r.pid)

    def wait_extendable(self, nickname: str, controller, timeout: float = 90.0) -> float:
        """Block until every other relay can extend a circuit to ``nickname``; seconds taken.

        After a relay was down, each relay that tried to reach it then refuses to try again
        for up to 60 s (tor's OR-connect failure cache), so a restarted relay is reachable
        through some relays and not others for a while. Fault tests call this after
        ``restart_relay`` so later tests share a network where any path works again.
        ``controller`` is a stem Controller of a client tor of this network; one circuit
        [guard, M, nickname] is built per other relay M (and closed), failures retried
        every second.

        :raises TestnetError: some relay still cannot extend to it after ``timeout`` seconds.
        """
        import stem  # only this helper needs stem

        target = self.relay(nickname)
        others = [r for r in self.relays if r is not target]
        pending = {r.nickname for r in others}
        t0 = time.monotonic()
        deadline = t0 + timeout
        last_error = ""
        while pending:
            for m in [r for r in others if r.nickname in pending]:
                guard = next(r for r in others if r is not m)
                try:
                    circ = controller.new_circuit(
                        [guard.fingerprint, m.fingerprint, target.fingerprint],
                        await_build=True, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                except (stem.ControllerError, stem.Timeout) as e:
                    last_error = f"{m.nickname} -> {nickname}: {e}"
                    continue
                pending.discard(m.nickname)
                try:
                    controller.close_circuit(circ)
                except stem.ControllerError:
                    pass  # already gone: it was only a probe
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise TestnetError(f"{nickname} still unreachable from {sorted(pending)} after "
                                   f"{timeout:.0f} s ({last_error})")
            time.sleep(1.0)
        took = time.monotonic() - t0
        self._event("extendable", relay=nickname, seconds=f"{took:.1f}")
        return took

    def relay_controller(self, nickname: str):
        """An authenticated stem Controller for one relay that does NOT own it.

        Use this, not a bare ``Controller.from_port``: the relays name this process in
        ``__OwningControllerProcess``, so stem, seeing its own pid there, sends TAKEOWNERSHIP on
        authenticate, and closing that controller would then stop the relay. We hand ownership
        back (DROPOWNERSHIP) and restore the pid watch. Close it when done.
        """
        import stem.control  # only this helper needs stem

        r = self.relay(nickname)
        c = stem.control.Controller.from_port("127.0.0.1", r.control_port)
        try:
            c.authenticate()  # cookie
            c.msg("DROPOWNERSHIP")
            c.set_conf("__OwningControllerProcess", str(os.getpid()))
        except BaseException:
            c.close()
            raise
        return c

    def check_running(self) -> list[str]:
        """Nicknames of tors that died on their own (not through kill_relay or stop)."""
        return [r.nickname for r in self.relays if r.process is not None
                and r.process.poll() is not None]

    def __enter__(self) -> "TorNetwork":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- configuration ------------------------------------------------------------------------

    def _event(self, event: str, **fields) -> None:
        parts = [f"testnet event={event}"] + [f"{k}={v}" for k, v in fields.items()]
        self._log(" ".join(parts))

    def _configure(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        # pitfall 18: tor-gencert refuses to overwrite keys, so a network needs a fresh directory
        leftovers = [n for n in os.listdir(self.directory) if n.startswith(("auth", "exit", "relay"))]
        if leftovers:
            raise TestnetError(f"{self.directory} already holds a network ({leftovers[0]}): "
                               "use a fresh directory")
        self._resolv_conf = os.path.join(self.directory, "resolv.conf")
        with open(self._resolv_conf, "w") as f:
            f.write("nameserver 127.0.0.1\n")  # pitfall 3: DNS never leaves loopback
        self._empty_defaults = os.path.join(self.directory, "torrc-defaults")
        open(self._empty_defaults, "w").close()

        roles = ([(AUTHORITY, f"auth{i}") for i in range(AUTHORITY_COUNT)]
                 + [(EXIT, f"exit{i}") for i in range(self.exit_count)]
                 + [(RELAY, f"relay{i}") for i in range(self.relay_count)])
        if not 2 <= self.first_address <= 254 - len(roles):
            raise ValueError(f"{len(roles)} tors from 127.0.0.{self.first_address} do not fit "
                             "below 127.0.0.255 (127.0.0.1 stays for the services under test)")
        held = []  # keep the probe sockets open until all ports are chosen: no duplicates
        try:
            for i, (role, nick) in enumerate(roles):
                address = f"127.0.0.{i + self.first_address}"
                or_port = _free_port(address, held)
                dir_port = _free_port(address, held) if role == AUTHORITY else None
                control_port = _free_port("127.0.0.1", held)
                data_dir = os.path.join(self.directory, nick)
                os.makedirs(data_dir, mode=0o700)
                self.relays.append(Relay(nick, role, address, or_port, control_port, data_dir,
                                         dir_port=dir_port))
        finally:
            for s in held:
                s.close()

        # Keys: authority certificates and relay identities, all tors in parallel (recipe 1).
        gencerts = [(a, self._start_gencert(a)) for a in self.by_role(AUTHORITY)]
        for a, p in gencerts:
            self._finish_tool(p, f"tor-gencert for {a.nickname}")
            a.v3ident = self._read_v3ident(a)
        listings = [(r, self._start_list_fingerprint(r)) for r in self.relays]
        for r, p in listings:
            out = self._finish_tool(p, f"tor --list-fingerprint for {r.nickname}")
            r.fingerprint = _parse_fingerprint(out, r.nickname)
        for r in self.relays:
            with open(r.torrc_path, "w") as f:
                f.write("\n".join(self._torrc_lines(r)) + "\n")

    def _start_gencert(self, a: Relay) -> subprocess.Popen:
        keys = os.path.join(a.data_dir, "keys")
        os.makedirs(keys, mode=0o700, exist_ok=True)
        cmd = [self.tor_gencert_cmd, "--create-identity-key", "--passphrase-fd", "0", "-m", "24",
               "-a", f"{a.address}:{a.dir_port}",
               "-i", os.path.join(keys, "authority_identity_key"),
               "-s", os.path.join(keys, "authority_signing_key"),
               "-c", os.path.join(keys, "authority_certificate")]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, cwd=a.data_dir)
        p._shroud_input = b"\n"  # empty passphrase on fd 0
        return p

    def _start_list_fingerprint(self, r: Relay) -> subprocess.Popen:
        cmd = [self.tor_cmd, "--list-fingerprint", "--quiet", "--ignore-missing-torrc", "-f", "none",
               "--defaults-torrc", self._empty_defaults,
               "--DataDirectory", r.data_dir, "--ORPort", f"{r.address}:{r.or_port}",
               "--Nickname", r.nickname, "--TestingTorNetwork", "1",
               "--DirAuthority", "dummy 127.0.0.1:1 " + "0" * 40]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    def _finish_tool(self, p: subprocess.Popen, what: str) -> str:
        try:
            out, _ = p.communicate(getattr(p, "_shroud_input", None), timeout=KEYGEN_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise TestnetError(f"{what} took longer than {KEYGEN_TIMEOUT:.0f} s")
        text = out.decode("utf-8", "replace")
        if p.returncode != 0:
            raise TestnetError(f"{what} failed (exit {p.returncode}): {text.strip()[-800:]}")
        return text

    @staticmethod
    def _read_v3ident(a: Relay) -> str:
        path = os.path.join(a.data_dir, "keys", "authority_certificate")
        with open(path) as f:
            for line in f:
                if line.startswith("fingerprint "):
                    return line.split()[1].strip().upper()
        raise TestnetError(f"no fingerprint line in {path}")

    def _dir_authority_line(self, a: Relay) -> str:
        return (f"DirAuthority {a.nickname} orport={a.or_port} v3ident={a.v3ident} "
                f"{a.address}:{a.dir_port} {a.fingerprint}")

    def _torrc_lines(self, r: Relay) -> list[str]:
        lines = [
            "TestingTorNetwork 1",
            f"DataDirectory {r.data_dir}",
            f"Nickname {r.nickname}",
            f"ContactInfo {r.nickname}@testnet.invalid",
            f"Address {r.address}",
            "AddressDisableIPv6 1",
            f"ORPort {r.address}:{r.or_port}",
            "SocksPort 0",
            f"ControlPort 127.0.0.1:{r.control_port}",
            "CookieAuthentication 1",
            "RunAsDaemon 0",
            f"Log notice file {r.log_path}",
            "SafeLogging 0",
            "LogTimeGranularity 1",
            "ShutdownWaitLength 0",
            # tor exits by itself if the process that started it dies (no orphans after a crash)
            f"__OwningControllerProcess {os.getpid()}",
            "PathsNeededToBuildCircuits 0.67",
            "LearnCircuitBuildTimeout 0",  # pitfall 9
            f"ServerDNSResolvConfFile {self._resolv_conf}",  # pitfall 3
            "ServerDNSDetectHijacking 0",
            "ServerDNSTestAddresses",
            "ServerDNSAllowBrokenConfig 1",
            "AssumeReachable 1",  # pitfall 4
        ]
        lines += [self._dir_authority_line(a) for a in self.by_role(AUTHORITY)]
        if r.role == AUTHORITY:
            return lines + self._authority_lines(r)
        if r.role == EXIT:
            return lines + self._exit_lines()
        return lines + ["ExitRelay 0", "ExitPolicy reject *:*"]

    def _authority_lines(self, r: Relay) -> list[str]:
        exit_fprs = ",".join(x.fingerprint for x in self.by_role(EXIT))
        return [
            "AuthoritativeDirectory 1",
            "V3AuthoritativeDirectory 1",
            f"DirPort {r.address}:{r.dir_port}",
            f"TestingV3AuthInitialVotingInterval {INITIAL_VOTING_INTERVAL}",
            "TestingV3AuthInitialVoteDelay 2",
            "TestingV3AuthInitialDistDelay 2",
            f"V3AuthVotingInterval {VOTING_INTERVAL}",
            "V3AuthVoteDelay 2",
            "V3AuthDistDelay 2",
            "V3AuthNIntervalsValid 2",
            "TestingDirAuthVoteGuard *",
            "TestingDirAuthVoteHSDir *",
            f"TestingDirAuthVoteExit {exit_fprs}",
            "TestingDirAuthVoteExitIsStrict 1",
            "TestingMinExitFlagThreshold 0",
            "ExitRelay 0",
            "ExitPolicy reject *:*",
        ]

    def _exit_lines(self) -> list[str]:
        return [
            "ExitRelay 1",
            "ExitPolicyRejectPrivate 0",
            "ExitPolicyRejectLocalInterfaces 0",
            "IPv6Exit 0",
            "ExitPolicy accept 127.0.0.0/8:*",
            # pitfall 1: clients only see exits whose policy summary accepts *:PORT
            *[f"ExitPolicy accept *:{ports}" for ports in self.exit_ports],
            "ExitPolicy reject *:*",
        ]

    # -- launch and readiness -----------------------------------------------------------------

    def _align_launch(self, deadline: float) -> None:
        """Sleep until just after a multiple of the initial voting interval (pitfall 5)."""
        phase = time.time() % INITIAL_VOTING_INTERVAL
        wait = 0.0 if phase < LAUNCH_ALIGNMENT_SLACK else INITIAL_VOTING_INTERVAL - phase + 0.05
        if time.monotonic() + wait >= deadline:
            raise TestnetError("start timeout too short to align the launch with the voting clock")
        if wait:
            self._event("align", wait=f"{wait:.1f}")
            time.sleep(wait)

    def _launch(self, r: Relay) -> None:
        if self._stopping:
            raise TestnetError("network is stopping")
        out = open(os.path.join(r.data_dir, "stdout.log"), "ab")
        try:
            r.process = subprocess.Popen(
                [self.tor_cmd, "-f", r.torrc_path, "--defaults-torrc", self._empty_defaults],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, not the tors
            )
        finally:
            out.close()
        r.pid = r.process.pid

    def _wait_usable(self, deadline: float) -> None:
        want = {r.nickname for r in self.relays}
        exits = {r.nickname for r in self.by_role(EXIT)}
        stage = "authorities"
        last_report = 0.0
        while True:
            if self._stopping:
                raise TestnetError("network stopped while starting")
            dead = self.check_running()
            if dead:
                r = self.relay(dead[0])
                raise TestnetError(f"{r.nickname} (pid {r.pid}) exited with code "
                                   f"{r.process.returncode}; its log ends:\n{_tail(r.log_path)}\n"
                                   f"{_tail(os.path.join(r.data_dir, 'stdout.log'), 4)}")
            if stage == "authorities":
                missing = [a.nickname for a in self.by_role(AUTHORITY)
                           if not self._usable(self._fetch_consensus(a), want, exits)]
                if not missing:
                    stage = "relays"
                    self._event("consensus", authorities=AUTHORITY_COUNT, relays=len(want))
            if stage == "relays":
                missing = [r.nickname for r in self.relays if not self._usable(
                    _read_text(os.path.join(r.data_dir, "cached-microdesc-consensus")), want, exits)]
                if not missing:
                    return
                for nick in missing:  # pitfall 6: SIGHUP resets the download back-off
                    _signal(self.relay(nick).process, signal.SIGHUP)
            now = time.monotonic()
            if now >= deadline:
                raise TestnetError(f"network not usable in time: waiting for {stage} "
                                   f"{','.join(missing)}; log of {missing[0]} ends:\n"
                                   f"{_tail(self.relay(missing[0]).log_path)}")
            if now - last_report >= 3 * POLL_SECONDS:
                last_report = now
                self._event("waiting", stage=stage, missing=",".join(missing))
            time.sleep(POLL_SECONDS)

    @staticmethod
    def _usable(consensus: str, want: set[str], exits: set[str]) -> bool:
        flags = parse_consensus_flags(consensus)
        return all({"Running", "Valid"} <= flags.get(n, set()) for n in want) and all(
            "Exit" in flags[n] for n in exits)

    @staticmethod
    def _fetch_consensus(a: Relay) -> str:
        conn = http.client.HTTPConnection(a.address, a.dir_port, timeout=5)
        try:
            conn.request("GET", "/tor/status-vote/current/consensus")
            resp = conn.getresponse()
            body = resp.read(8 * 1024 * 1024)  # a 6-relay consensus is a few KiB; bound it anyway
            return body.decode("utf-8", "replace") if resp.status == 200 else ""
        except (OSError, http.client.HTTPException):
            return ""
        finally:
            conn.close()

    def _write_client_torrc(self) -> None:
        tmp = self.client_torrc_path + ".tmp"
        with open(tmp, "w") as f:
            f.write("# Join the private Tor network started by lib.testnet\n")
            f.write("\n".join(self.client_torrc_lines()) + "\n")
        os.replace(tmp, self.client_torrc_path)  # readers never see half a file


def _free_port(address: str, held: list) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((address, 0))
    held.append(s)
    return s.getsockname()[1]


def _parse_fingerprint(output: str, nickname: str) -> str:
    for line in reversed(output.strip().splitlines()):
        parts = line.split()
        if parts and parts[0] == nickname:
            fpr = "".join(parts[1:]).upper()
            if re.fullmatch(r"[0-9A-F]{40}", fpr):
                return fpr
    raise TestnetError(f"no fingerprint for {nickname} in tor's output: {output.strip()[-400:]}")


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _signal(p: Optional[subprocess.Popen], sig: int) -> None:
    if p is not None and p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def _wait_or_kill(p: subprocess.Popen, grace: float) -> None:
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=STOP_GRACE_SECONDS)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.testnet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="fresh directory for the network's tors")
    ap.add_argument("--exit-ports", default="1-65535",
                    help="ports exits accept for any address, e.g. 80,443,8000-9000 (default all)")
    ap.add_argument("--exits", type=int, default=2, help="exit relays (default 2)")
    ap.add_argument("--relays", type=int, default=0, help="extra middle relays (default 0)")
    ap.add_argument("--first-address", type=int, default=2,
                    help="relays use 127.0.0.N and up (default 2); disjoint for a second network")
    ap.add_argument("--timeout", type=float, default=120.0, help="start timeout in seconds")
    args = ap.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        net = TorNetwork(args.dir, exit_ports=args.exit_ports, exits=args.exits,
                         relays=args.relays, first_address=args.first_address)
    except ValueError as e:
        ap.error(str(e))
    try:
        # start() runs in a helper thread so a signal during the ~20 s start stops it promptly.
        errors: list[BaseException] = []
        starter = threading.Thread(target=lambda: _capture(errors, net.start, args.timeout),
                                   daemon=True)
        starter.start()
        while starter.is_alive() and not stop.wait(0.2):
            pass
        if stop.is_set():
            starter.join(STOP_GRACE_SECONDS)  # a signal just as start() finishes is a normal stop
            if starter.is_alive() or errors:
                return 130
        if errors:
            print(f"testnet: {errors[0]}", file=sys.stderr)
            return 1
        for r in net.relays:
            print(f"testnet relay nickname={r.nickname} role={r.role} fingerprint={r.fingerprint} "
                  f"or={r.address}:{r.or_port} control=127.0.0.1:{r.control_port} pid={r.pid}",
                  file=sys.stderr)
        print(f"testnet: client config in {net.client_torrc_path}:", file=sys.stderr)
        print("\n".join(net.client_torrc_lines()), flush=True)
        print("testnet: running; Ctrl-C stops it", file=sys.stderr, flush=True)
        while not stop.wait(POLL_SECONDS):
            dead = net.check_running()
            if dead:
                print(f"testnet: {','.join(dead)} exited; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        net.stop()


def _capture(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # reported by main()
        errors.append(e)


if __name__ == "__main__":
    sys.exit(main())
