"""Tor for the client: start or attach (with a visible bootstrap), and watch tunnel circuits.

Public API::

    tor = start_tor(mode, data_dir, config_file=None, password=None, timeout=120, progress=None)
        # mode "launch" or "HOST:PORT" (a running tor's control port)
    watcher = CircuitWatcher(tor, client)    # reconnects a tunnel at once when its circuit dies
    BootstrapProgress(live)                  # progress(percent, summary): a bar or log lines
    dial = ExitPlanner(tor).dial             # --distinct-exits: each tunnel its own exit, or
                                             # DistinctExitError (never tor's own choice)

Each tunnel dials through its own circuit: TunnelRunner's isolation key (tunnel index and
connection generation) becomes distinct SOCKS credentials, and every reconnect gets a fresh one.
Must be imported after gevent's monkey-patching (lib.client.tor's rule).
"""
from __future__ import annotations

import logging
import sys

import gevent
import stem

from lib.client import tor as torlib

log = logging.getLogger("shroud.tor")


def read_torrc_lines(path: str | None) -> list[str]:
    """Extra torrc lines from a file: comments and blank lines dropped."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise torlib.TorError(f"cannot read --tor-config {path}: {e}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


class BootstrapProgress:
    """A progress bar on a terminal; one log line per step elsewhere."""

    def __init__(self, live: bool, out=sys.stderr):
        self.live = live
        self.out = out
        self._last = -1

    def __call__(self, percent: int, summary: str) -> None:
        if percent == self._last:
            return
        self._last = percent
        if self.live:
            filled = percent * 30 // 100
            self.out.write(f"\rTor bootstrap [{'#' * filled}{'.' * (30 - filled)}] "
                           f"{percent:3d}% {summary[:40]:<40}")
            if percent >= 100:
                self.out.write("\n")
            self.out.flush()
        else:
            log.info("tor bootstrap %d%%: %s", percent, summary)


def start_tor(mode: str, data_dir: str, config_file: str | None = None,
              password: str | None = None, timeout: float = 120.0, progress=None):
    lines = read_torrc_lines(config_file)
    if mode == "launch":
        log.info("launching tor (data in %s/tor)%s", data_dir,
                 f" with {len(lines)} lines from {config_file}" if lines else "")
        return torlib.launch_tor(data_dir, extra_torrc_lines=lines, timeout=timeout,
                                 progress=progress)
    if lines:
        raise torlib.TorError("--tor-config only applies to a tor we launch (--tor launch)")
    log.info("attaching to tor at %s", mode)
    return torlib.attach_tor(mode, password=password, timeout=timeout, progress=progress)


class CircuitWatcher:
    """Maps each online tunnel to its circuit; when tor closes that circuit, the tunnel is
    checked and redialled over a fresh circuit at once instead of waiting for heartbeats."""

    # Conflux may move a stream to its other leg when one leg closes: give tor a moment to
    # report the stream's new circuit before declaring the tunnel dead.
    RECHECK_DELAY = 0.5

    def __init__(self, tor, client):
        self.tor = tor
        self.client = client
        self.circuits: dict[str, object] = {}  # circuit id -> TunnelRunner
        client.on_connected = self.record
        self._remove = tor.add_circuit_listener(self._on_closed)

    def record(self, runner) -> None:
        sock = runner.sock
        if sock is None:
            return
        try:
            info = self.tor.circuit_for_connection(sock, timeout=2.0)
        except (torlib.TorError, OSError) as e:
            log.info("tunnel %s: circuit unknown: %s", runner.proxy, e)
            return
        for cid, r in list(self.circuits.items()):
            if r is runner:
                del self.circuits[cid]
        self.circuits[info.id] = runner
        runner.circuit = info
        path = " > ".join(nick for _, nick in info.path)
        log.info("tunnel %s rides circuit %s: %s (exit %s)", runner.proxy, info.id, path,
                 info.exit_nickname)

    def _on_closed(self, event) -> None:
        runner = self.circuits.pop(event.id, None)
        if runner is not None:
            gevent.spawn(self._recheck, runner, event)

    def _recheck(self, runner, event) -> None:
        gevent.sleep(self.RECHECK_DELAY)
        sock = runner.sock
        try:
            if sock is not None:
                info = self.tor.circuit_for_connection(sock, timeout=0.5)
                if info.status == "BUILT":
                    self.circuits[info.id] = runner
                    runner.circuit = info
                    return
        except (torlib.TorError, OSError):
            pass
        runner.reconnect(f"Tor circuit {event.id} {event.status.lower()} "
                         f"({event.reason or 'no reason'})")

    def close(self) -> None:
        self._remove()


class DistinctExitError(torlib.TorConnectError):
    """``--distinct-exits`` could not give a tunnel a circuit with its own exit; the tunnel is
    not dialled (tor's own choice might share an exit with another tunnel)."""


class ExitPlanner:
    """Explicit circuits with a distinct exit per tunnel (``--distinct-exits``).

    Tor picks each tunnel's circuit on its own, so two tunnels may leave through the same exit:
    that exit then sees (the timing of) both. With this planner tunnel index ``i`` leaves
    through the ``i``-th exit of the consensus (by fingerprint), on a circuit built with stem
    along [guard, middle, exit] and the tunnel's stream attached to it. The guard is one of
    tor's own entry guards when tor names them (keeping guard protection), the middle a random
    other relay.

    The user asked for this privacy property, so it fails closed: when no such circuit can be
    built (after ``ATTEMPTS`` paths), the connection over it fails, or the consensus has fewer
    exits than the tunnel's index needs, ``dial`` raises :class:`DistinctExitError` (the tunnel
    retries later with backoff, its status naming the reason) and never falls back to tor's
    own choice. Only dials that are not tunnels (discovery) are left to tor.
    """

    # Explicit circuits tried per dial before giving up on this dial.
    ATTEMPTS = 3

    def __init__(self, tor, rng=None):
        import random

        self.tor = tor
        self.rng = rng or random.SystemRandom()

    def _relays(self):
        try:
            statuses = list(self.tor.controller.get_network_statuses())
        except (stem.ControllerError, OSError) as e:
            raise torlib.TorError(f"tor did not give its consensus: {e}") from e
        usable = [r for r in statuses if "Running" in r.flags and "Valid" in r.flags]
        exits = sorted((r for r in usable if "Exit" in r.flags and "BadExit" not in r.flags),
                       key=lambda r: r.fingerprint)
        return usable, exits

    def _guards(self) -> list[str]:
        try:
            text = self.tor.controller.get_info("entry-guards")
        except (stem.ControllerError, torlib.TorError, OSError):
            return []  # tor does not say: guards are picked from the consensus instead
        out = []
        for line in text.splitlines():
            fp = line.strip().lstrip("$").split("~")[0].split("=")[0].split(" ")[0]
            if len(fp) == 40 and "up" in line:
                out.append(fp.upper())
        return out

    def path_for(self, index: int, avoid: frozenset[str] = frozenset()) -> list[str]:
        """[guard, middle, exit] for tunnel ``index``; guards and middles in ``avoid`` (relays
        that just failed to extend) are skipped while others remain.

        :raises DistinctExitError: fewer exits than ``index + 1`` (tunnels would share one).
        :raises lib.client.tor.TorError: no consensus, or no guard or middle to use.
        """
        usable, exits = self._relays()
        if index >= len(exits):
            raise DistinctExitError(f"tunnel {index} needs exit number {index + 1} and the "
                                    f"consensus has {len(exits)} exit(s)")
        exit_fp = exits[index].fingerprint
        guards = [g for g in self._guards() if g != exit_fp]
        if not guards:
            guards = [r.fingerprint for r in usable if "Guard" in r.flags and r.fingerprint != exit_fp]
        if not guards:
            raise torlib.TorError("no guard distinct from the exit")
        guard = self.rng.choice([g for g in guards if g not in avoid] or guards)
        middles = [r.fingerprint for r in usable if r.fingerprint not in (guard, exit_fp)]
        if not middles:
            raise torlib.TorError("no middle relay distinct from guard and exit")
        return [guard, self.rng.choice([m for m in middles if m not in avoid] or middles), exit_fp]

    def dial(self, host: str, port: int, isolation_key: str, timeout: float):
        """A connection for ``isolation_key``'s tunnel through its own exit.

        :raises DistinctExitError: no circuit with that exit could be used (see the class).
        """
        index = _tunnel_index(isolation_key)
        if index is None:
            return self.tor.open_connection(host, port, isolation_key, timeout)
        circ = self._build(index, timeout)
        try:
            return self.tor.open_connection(host, port, isolation_key, timeout,
                                            circuit_id=circ)
        except (torlib.TorError, OSError) as e:  # the circuit works, the proxy or its exit not
            self._close_quietly(circ)
            raise DistinctExitError(f"--distinct-exits: tunnel {index}: connecting over its "
                                    f"own circuit failed ({e}); not letting tor choose another "
                                    f"exit") from e

    def _build(self, index: int, timeout: float) -> str:
        # A few tries, each avoiding the guards and middles that failed before: a relay that
        # cannot reach the exit (tor caches a failed OR connection for up to 60 s) should not
        # cost the tunnel its distinct exit.
        failed: set[str] = set()
        last: Exception | None = None
        for attempt in range(self.ATTEMPTS):
            path: list[str] = []
            try:
                path = self.path_for(index, frozenset(failed))
                circ = self.tor.build_circuit(path, timeout=min(timeout, 30.0))
            except DistinctExitError as e:
                raise DistinctExitError(f"--distinct-exits: {e}; not letting tor choose "
                                        f"(tunnels would share an exit)") from e
            except torlib.TorError as e:
                failed.update(path[:-1])
                last = e
                log.warning("tunnel %d: explicit circuit failed (%s)%s", index, e,
                            "; retrying" if attempt + 1 < self.ATTEMPTS else "")
                continue
            log.info("tunnel %d: built circuit %s with exit %s", index, circ, path[-1][:8])
            return circ
        raise DistinctExitError(f"--distinct-exits: no circuit with its own exit for tunnel "
                                f"{index} after {self.ATTEMPTS} tries (last: {last}); not "
                                f"letting tor choose. The tunnel retries; without "
                                f"--distinct-exits tor would pick its exits itself") from last

    def _close_quietly(self, circ: str) -> None:
        try:
            self.tor.controller.close_circuit(circ)
        except (stem.ControllerError, OSError):
            pass  # already gone, or tor is going away: nothing to clean up


def _tunnel_index(isolation_key: str) -> int | None:
    # lib.client.tunnels.TunnelRunner.isolation_key is "shroud-tunnel-<index>-<generation>"
    parts = isolation_key.split("-")
    if len(parts) == 4 and parts[:2] == ["shroud", "tunnel"] and parts[2].isdigit():
        return int(parts[2])
    return None
