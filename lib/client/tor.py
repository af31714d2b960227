"""The client's access to Tor: launch or attach to a tor, open isolated SOCKS5 connections, and
see which circuit carries each one.

Public API::

    tor = launch_tor(data_dir, extra_torrc_lines=(), timeout=90.0, progress=None, tor_cmd="tor")
    tor = attach_tor("127.0.0.1:9051", password=None, timeout=90.0, progress=None)
        # progress(percent: int, summary: str) is called whenever bootstrap advances
    tor.socks_address                  # ("127.0.0.1", port)
    tor.controller                     # an authenticated stem.control.Controller
    tor.process                        # the subprocess.Popen of a tor we launched, else None
    sock = tor.open_connection(host, port, isolation_key="default", timeout=30.0,
                               circuit_id=None)   # connected socket through Tor, TCP_NODELAY
    info = tor.circuit_for_connection(sock)       # CircuitInfo(id, status, purpose, path, ...)
    remove = tor.add_circuit_listener(callback)   # callback(CircuitClosed) on FAILED/CLOSED
    circ_id = tor.build_circuit([fp_guard, fp_middle, fp_exit])  # explicit path, for circuit_id=
    tor.close()                        # stops a tor we launched; closes the controller

    TorError            every failure, with what tor said
      TorConnectError   also a ConnectionError: the SOCKS connection could not be made

Names are always resolved by Tor, never locally (SOCKS5 with remote DNS). Each isolation key is
sent as distinct SOCKS credentials; tor's SocksPort isolates by them (IsolateSOCKSAuth, on by
default), so each key gets its own circuit, and so its own exit most of the time; when a distinct
exit per key is required, build circuits with explicit paths and pass ``circuit_id``.

**gevent.** Nothing here patches anything. In a gevent monkey-patched process (``shroud.py``
patches first, then imports this module) every wait is cooperative: ``subprocess``, ``socket`` and
``time.sleep`` are gevent's, and stem's Controller threads (one reads the control socket, one runs
event listeners) become greenlets. No stem call here relies on SIGALRM (stem's own launch timeout
does; we launch tor ourselves and poll with a bounded loop). Event callbacks run in stem's event
greenlet/thread: keep them short (set a flag, put on a queue, spawn a greenlet) and do not block
there on the network. PySocks subclasses ``socket.socket`` when it is first imported, so this module
must be imported after ``gevent.monkey.patch_all()``; ``open_connection`` refuses a mixed setup
with a clear error rather than blocking the whole process. In an unpatched process everything
works with real threads and blocking sockets (the tests do that).

**Ownership.** A launched tor is owned by this process (``__OwningControllerProcess`` and
TAKEOWNERSHIP): it exits when ``close()`` closes the control connection or the process dies.
stem sends TAKEOWNERSHIP on its own whenever a Controller from the pid named in
``__OwningControllerProcess`` authenticates, so do not open a second stem Controller to a tor
launched by the same process (closing it would stop that tor); use ``TorAccess.controller``.
On a CONFLUX_LINKED circuit, closing one leg may move its streams to the other leg: a
CircuitClosed event does not always mean the connection died.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, Iterable, Optional, Union

import socks
import stem
import stem.control
from stem.control import EventType

from lib.errors import ShroudError
from lib.hostport import AddressError, parse_hostport
from lib.net.sockets import set_nodelay

__all__ = ["TorError", "TorConnectError", "TorAccess", "CircuitInfo", "CircuitClosed",
           "launch_tor", "attach_tor", "socks_credentials"]

# Bootstrap is polled this often: fine enough for a smooth progress bar, cheap for tor.
BOOTSTRAP_POLL_SECONDS = 0.1
# A launched tor gets this long between SIGTERM and SIGKILL (it waits ShutdownWaitLength 0).
STOP_GRACE_SECONDS = 10.0
# Streams remembered for circuit_for_connection: one per open tunnel connection plus those in
# flight; a client has a handful of tunnels, so 4096 only bounds a misbehaving caller.
MAX_TRACKED_STREAMS = 4096
# SOCKS5 username/password are 1-255 bytes each (RFC 1929).
SOCKS_FIELD_MAX = 255
# How many warning lines of tor's log go into an error message.
WARNINGS_IN_ERRORS = 3

ProgressCallback = Callable[[int, str], None]


class TorError(ShroudError):
    """Tor is missing, failed, did not bootstrap in time, or refused a request."""


class TorConnectError(TorError, ConnectionError):
    """A connection through Tor's SOCKS port failed (the message carries tor's SOCKS reply)."""


@dataclasses.dataclass(frozen=True)
class CircuitInfo:
    """A circuit as tor reports it. ``path`` is ((fingerprint, nickname), ...), exit last."""

    id: str
    status: str
    purpose: str
    path: tuple
    socks_username: Optional[str] = None

    @property
    def exit_fingerprint(self) -> Optional[str]:
        return self.path[-1][0] if self.path else None

    @property
    def exit_nickname(self) -> Optional[str]:
        return self.path[-1][1] if self.path else None


@dataclasses.dataclass(frozen=True)
class CircuitClosed:
    """A circuit ended: ``status`` FAILED (never built) or CLOSED; reasons as tor gave them."""

    id: str
    status: str
    reason: Optional[str]
    remote_reason: Optional[str]
    path: tuple


def socks_credentials(isolation_key: str) -> tuple[str, str]:
    """SOCKS5 (username, password) for an isolation key; distinct keys give distinct circuits."""
    user = "shroud:" + isolation_key
    if len(user.encode()) > SOCKS_FIELD_MAX:
        user = "shroud:sha256:" + hashlib.sha256(isolation_key.encode()).hexdigest()
    return user, "shroud"


# -- launching and attaching ------------------------------------------------------------------


def launch_tor(
    data_dir: str,
    extra_torrc_lines: Iterable[str] = (),
    timeout: float = 90.0,
    progress: Optional[ProgressCallback] = None,
    tor_cmd: str = "tor",
) -> "TorAccess":
    """Start a tor of our own and wait until it has bootstrapped to 100 %.

    tor keeps its state in ``data_dir/tor`` and logs to ``data_dir/tor/notice.log``; it listens
    for SOCKS and control connections on free loopback ports, authenticates controllers by cookie,
    and exits by itself when this process (its owner) exits or closes the control connection.

    :param extra_torrc_lines: e.g. a private network's ``client.torrc`` lines, or bridges.
    :param timeout: seconds for the whole launch; bootstrap on the public network can take a
        minute, on the private network ~2.3 s (occasionally 12 s).
    :param progress: ``progress(percent, summary)``, called whenever bootstrap advances.
    :raises TorError: tor is missing, exits, rejects the configuration, or is stuck past timeout.
    """
    deadline = time.monotonic() + timeout
    if shutil.which(tor_cmd) is None:
        raise TorError(f"tor not found (looked for {tor_cmd!r} on PATH): install it, e.g. "
                       "'apt-get install tor' on Debian, or attach to a running tor instead")
    files = _write_torrc(os.path.abspath(data_dir), extra_torrc_lines)
    process = _start_process(tor_cmd, files)

    def failure(what: str) -> TorError:
        _stop_process(process)
        said = _tor_complaints(files.log, files.stdout)
        return TorError(f"{what}{'; tor said: ' + said if said else ''} (log: {files.log})")

    controller = None
    try:
        controller = _await_control_port(process, files.port_file, deadline, timeout)
        # Closing our control connection now also stops tor, even if our pid is reused later.
        controller.msg("TAKEOWNERSHIP")
        access = TorAccess(controller, process=process, log_path=files.log)
        _wait_bootstrapped(access, deadline, timeout, progress,
                           died=lambda: process.poll() is not None)
        return access
    except BaseException as e:
        if controller is not None:
            controller.close()
        if isinstance(e, TorError):
            if process.poll() is not None and "exited" not in str(e):
                raise failure(f"{e} (tor exited with code {process.returncode})") from None
            raise failure(str(e)) from None
        _stop_process(process)
        raise


@dataclasses.dataclass(frozen=True)
class _TorFiles:
    """Where a launched tor keeps its state, configuration and logs (all under the data dir)."""

    tor_dir: str
    torrc: str
    defaults: str
    port_file: str
    log: str
    stdout: str


def _write_torrc(data_dir: str, extra_torrc_lines: Iterable[str]) -> _TorFiles:
    tor_dir = os.path.join(data_dir, "tor")
    # torrc-defaults stays empty, so that /etc/tor/torrc-defaults is not read.
    files = _TorFiles(tor_dir=tor_dir, torrc=os.path.join(data_dir, "torrc"),
                      defaults=os.path.join(data_dir, "torrc-defaults"),
                      port_file=os.path.join(tor_dir, "control-port"),
                      log=os.path.join(tor_dir, "notice.log"),
                      stdout=os.path.join(tor_dir, "stdout.log"))
    os.makedirs(tor_dir, mode=0o700, exist_ok=True)
    os.chmod(tor_dir, 0o700)  # tor refuses a DataDirectory others can read
    for stale in (files.port_file, files.log):
        if os.path.exists(stale):
            os.remove(stale)
    lines = [
        f"DataDirectory {tor_dir}",
        "SocksPort 127.0.0.1:auto",  # IsolateSOCKSAuth is on by default
        "ControlPort 127.0.0.1:auto",
        f"ControlPortWriteToFile {files.port_file}",
        "CookieAuthentication 1",
        f"__OwningControllerProcess {os.getpid()}",  # tor exits if we die
        f"Log notice file {files.log}",
        "RunAsDaemon 0",
        "ClientOnly 1",
        # We never resolve names locally (SOCKS5 with remote DNS); an IP literal target leaks no
        # lookup either, so tor's "giving Tor only an IP address" warning is noise here.
        "WarnUnsafeSocks 0",
    ] + [line.strip() for line in extra_torrc_lines
         if line.strip() and not line.strip().startswith("#")]
    with open(files.torrc, "w") as f:
        f.write("\n".join(lines) + "\n")
    open(files.defaults, "w").close()
    return files


def _start_process(tor_cmd: str, files: _TorFiles) -> subprocess.Popen:
    with open(files.stdout, "wb") as out:
        try:
            return subprocess.Popen([tor_cmd, "-f", files.torrc, "--defaults-torrc",
                                     files.defaults], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise TorError(f"could not start {tor_cmd!r}: {e}") from e


def _await_control_port(process, port_file: str, deadline: float, timeout: float):
    """A controller on the launched tor, once it has written its control port (~0.1 s)."""
    while True:
        if process.poll() is not None:
            raise TorError(f"tor exited with code {process.returncode} while starting")
        address = _read_port_file(port_file)
        if address:
            return _connect(address, None, f"launched tor (pid {process.pid})")
        if time.monotonic() >= deadline:
            raise TorError(f"tor did not open its control port within {timeout:g} s")
        time.sleep(BOOTSTRAP_POLL_SECONDS)


def attach_tor(
    control: Union[str, tuple],
    password: Optional[str] = None,
    timeout: float = 90.0,
    progress: Optional[ProgressCallback] = None,
) -> "TorAccess":
    """Use a running tor through its control port and its (first TCP) SocksPort.

    :param control: ``"host:port"``, ``(host, port)`` or the path of a control socket file.
    :param password: for HashedControlPassword; cookie authentication needs none.
    :raises TorError: cannot connect or authenticate, no SocksPort, or not bootstrapped in time.
    """
    deadline = time.monotonic() + timeout
    if isinstance(control, str) and not control.startswith("/"):
        try:
            control = parse_hostport(control, what="the control address (or a socket path)")
        except AddressError as e:
            raise TorError(str(e)) from None
    controller = _connect(control, password, f"tor at {control}")
    try:
        access = TorAccess(controller)
        _wait_bootstrapped(access, deadline, timeout, progress, died=lambda: False)
        return access
    except BaseException:
        controller.close()
        raise


def _connect(address, password, what: str) -> stem.control.Controller:
    try:
        if isinstance(address, str):
            controller = stem.control.Controller.from_socket_file(address)
        else:
            controller = stem.control.Controller.from_port(address[0], int(address[1]))
    except stem.SocketError as e:
        raise TorError(f"cannot reach the control port of {what}: {e}") from e
    try:
        controller.authenticate(password=password)
    except (stem.connection.AuthenticationFailure, stem.SocketError) as e:
        controller.close()
        raise TorError(f"cannot authenticate to {what}: {e}") from e
    return controller


def _wait_bootstrapped(access: "TorAccess", deadline: float, timeout: float,
                       progress: Optional[ProgressCallback], died: Callable[[], bool]) -> None:
    last = None
    while True:
        try:
            phase = access.controller.get_info("status/bootstrap-phase")
        except (stem.ControllerError, stem.SocketError) as e:
            if died():
                raise TorError("tor exited while bootstrapping") from e
            raise TorError(f"lost the control connection while bootstrapping: {e}") from e
        percent, summary = _parse_bootstrap_phase(phase)
        if (percent, summary) != last:
            last = (percent, summary)
            if progress is not None:
                progress(percent, summary)
        if percent >= 100:
            return
        if died():
            raise TorError("tor exited while bootstrapping")
        if time.monotonic() >= deadline:
            warning = _last_warning(phase)
            raise TorError(f"tor did not finish bootstrapping within {timeout:g} s: stuck at "
                           f"{percent}% ({summary})" + (f"; last problem: {warning}" if warning
                                                       else ""))
        time.sleep(BOOTSTRAP_POLL_SECONDS)


def _parse_bootstrap_phase(phase: str) -> tuple[int, str]:
    """'NOTICE BOOTSTRAP PROGRESS=14 TAG=handshake SUMMARY="Handshaking with a relay"' -> (14, ...)"""
    m = re.search(r"PROGRESS=(\d+)", phase)
    s = re.search(r'SUMMARY="((?:[^"\\]|\\.)*)"', phase)
    return (int(m.group(1)) if m else 0), (s.group(1) if s else phase.strip())


def _last_warning(phase: str) -> str:
    """A WARN bootstrap phase carries tor's reason, e.g. WARNING="Connection refused"."""
    m = re.search(r'WARNING="((?:[^"\\]|\\.)*)"', phase)
    return m.group(1) if m and phase.startswith("WARN") else ""


def _read_port_file(path: str):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"PORT=([\d.]+):(\d+)", text)
    return (m.group(1), int(m.group(2))) if m else None


def _tor_complaints(*paths: str) -> str:
    """The last few [warn]/[err] lines tor wrote, for error messages."""
    found: list[str] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 32768))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        for line in text.splitlines():
            if "[warn]" in line or "[err]" in line:
                line = line.split("] ", 1)[-1] if "] " in line else line
                if line not in found:
                    found.append(line)
    return " | ".join(found[-WARNINGS_IN_ERRORS:])


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_GRACE_SECONDS)
        except ProcessLookupError:
            pass


# -- the access object ------------------------------------------------------------------------


class TorAccess:
    """A bootstrapped tor: SOCKS connections, circuit introspection and circuit events."""

    def __init__(self, controller: stem.control.Controller,
                 process: Optional[subprocess.Popen] = None, log_path: Optional[str] = None):
        self.controller = controller
        self.process = process
        self.log_path = log_path
        self.socks_address = self._find_socks_address()
        self._lock = threading.Lock()  # guards the maps below (event thread vs callers)
        # stream id -> [source port, circuit id or None]; insertion order bounds it (oldest out)
        self._streams: collections.OrderedDict = collections.OrderedDict()
        self._stream_by_port: dict[int, str] = {}  # source port -> stream id
        self._pinned: dict[int, str] = {}  # source port -> circuit id, for explicit paths
        self._manual_attach = False
        self._listeners: list = []
        self._closed = False
        self._add_listener(self._on_stream, EventType.STREAM)

    def _find_socks_address(self) -> tuple[str, int]:
        try:
            listeners = self.controller.get_listeners(stem.control.Listener.SOCKS)
        except stem.ControllerError as e:
            raise TorError(f"cannot ask tor for its SocksPort: {e}") from e
        for host, port in listeners:
            if port:  # unix sockets come back without a port
                return host, int(port)
        raise TorError("tor has no TCP SocksPort: add 'SocksPort 127.0.0.1:auto' to its torrc")

    # -- connections ------------------------------------------------------------------------

    def open_connection(self, host: str, port: int, isolation_key: str = "default",
                        timeout: float = 30.0, circuit_id: Optional[str] = None) -> socket.socket:
        """A TCP connection to ``host:port`` through Tor; ``host`` is resolved by Tor.

        Connections with the same ``isolation_key`` may share a circuit; different keys never do.
        With ``circuit_id`` (from :meth:`build_circuit`) the stream is attached to that circuit.
        The socket comes back blocking (cooperative under gevent), with TCP_NODELAY set.

        :raises TorConnectError: tor refused or failed (e.g. "General SOCKS server failure" when
            the exit could not connect), or ``timeout`` seconds passed.
        """
        _check_socks_matches_socket_module()
        user, password = socks_credentials(isolation_key)
        s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
        pinned_port = None
        try:
            s.set_proxy(socks.SOCKS5, self.socks_address[0], self.socks_address[1], rdns=True,
                        username=user, password=password)
            s.settimeout(timeout)
            set_nodelay(s)
            if circuit_id is not None:
                # Bind first so the source port is known before tor sees the stream (STREAM NEW
                # carries it), so the stream can be attached to the chosen circuit.
                self._enable_manual_attach()
                s.bind(("127.0.0.1", 0))
                pinned_port = s.getsockname()[1]
                with self._lock:
                    self._pinned[pinned_port] = str(circuit_id)
            s.connect((host, int(port)))
        except (socks.ProxyError, OSError) as e:
            s.close()
            raise TorConnectError(f"cannot connect to {host}:{port} through Tor "
                                  f"(isolation {isolation_key!r}): {_socks_reason(e)}") from e
        finally:
            if pinned_port is not None:
                with self._lock:
                    self._pinned.pop(pinned_port, None)
        s.settimeout(None)
        # A plain socket of the current socket module (gevent's when patched): the SOCKS layer
        # is done, and the caller may wrap it in TLS.
        return socket.socket(s.family, s.type, s.proto, fileno=s.detach())

    # -- circuits ---------------------------------------------------------------------------

    def circuit_for_connection(self, connection: Union[socket.socket, int],
                               timeout: float = 5.0) -> CircuitInfo:
        """The circuit carrying a connection made by :meth:`open_connection`.

        Found through tor's STREAM events: the stream whose source port is the socket's local
        port (``GETINFO stream-status`` has no source address). Waits up to ``timeout`` for the
        event, which can arrive just after the SOCKS reply.

        :raises TorError: no such stream (closed, or not made through this tor) or no circuit.
        """
        local_port = connection if isinstance(connection, int) else connection.getsockname()[1]
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                entry = self._streams.get(self._stream_by_port.get(local_port))
                circ_id = entry[1] if entry else None
            if circ_id is not None:
                break
            if time.monotonic() >= deadline:
                raise TorError(f"no tor stream from local port {local_port} "
                               f"{'attached to a circuit ' if entry else ''}within {timeout:g} s")
            time.sleep(0.02)  # the event normally lands within a millisecond or two
        try:
            circ = self.controller.get_circuit(circ_id)
        except (ValueError, stem.ControllerError) as e:
            raise TorError(f"circuit {circ_id} of local port {local_port} is gone: {e}") from e
        return _circuit_info(circ)

    def circuits(self) -> list[CircuitInfo]:
        """Every circuit tor has now (any purpose, any status)."""
        return [_circuit_info(c) for c in self.controller.get_circuits()]

    def add_circuit_listener(self, callback: Callable[[CircuitClosed], None]) -> Callable[[], None]:
        """Call ``callback(CircuitClosed)`` whenever a circuit FAILED or is CLOSED.

        The callback runs in stem's event thread (a greenlet under gevent): keep it short.
        :returns: a function that removes the listener.
        """
        def on_circ(event):
            if event.status in ("FAILED", "CLOSED"):
                callback(CircuitClosed(event.id, event.status, event.reason,
                                       event.remote_reason, tuple(event.path or ())))
        return self._add_listener(on_circ, EventType.CIRC)

    def build_circuit(self, path: list[str], timeout: float = 30.0) -> str:
        """Build a circuit along ``path`` (fingerprints or nicknames, exit last); its id.

        :raises TorError: tor refused the path or the circuit failed / timed out.
        """
        try:
            return self.controller.new_circuit(list(path), await_build=True, timeout=timeout)
        except (stem.ControllerError, stem.Timeout) as e:
            raise TorError(f"could not build a circuit through {path}: {e}") from e

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the control connection; stop tor if we launched it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._manual_attach and self.process is None:
                self.controller.reset_conf("__LeaveStreamsUnattached")
        except (stem.ControllerError, stem.SocketError):
            pass
        self.controller.close()
        if self.process is not None:
            _stop_process(self.process)

    def __enter__(self) -> "TorAccess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _add_listener(self, handler, event_type) -> Callable[[], None]:
        try:
            self.controller.add_event_listener(handler, event_type)
        except (stem.ControllerError, stem.SocketError) as e:
            raise TorError(f"cannot subscribe to {event_type} events: {e}") from e
        self._listeners.append(handler)

        def remove() -> None:
            try:
                self.controller.remove_event_listener(handler)
            except (stem.ControllerError, stem.SocketError):
                pass  # already closed
        return remove

    def _enable_manual_attach(self) -> None:
        with self._lock:
            if self._manual_attach:
                return
            self._manual_attach = True
        # From now on tor leaves every new stream for us to attach (_on_stream).
        self.controller.set_conf("__LeaveStreamsUnattached", "1")

    def _on_stream(self, event) -> None:
        # tor names the client's address (SOURCE_ADDR) only in the NEW event; later events of the
        # same stream (SENTCONNECT, SUCCEEDED, DETACHED, ...) carry the circuit: join by stream id.
        attach_to = None
        with self._lock:
            if event.status in ("NEW", "NEWRESOLVE"):
                port = event.source_port
                if not port or event.source_address != "127.0.0.1":
                    return
                self._streams[event.id] = [port, event.circ_id]
                self._stream_by_port[port] = event.id
                while len(self._streams) > MAX_TRACKED_STREAMS:
                    old_id, (old_port, _) = self._streams.popitem(last=False)
                    if self._stream_by_port.get(old_port) == old_id:
                        del self._stream_by_port[old_port]
            entry = self._streams.get(event.id)
            if entry is None:
                return
            if event.status in ("CLOSED", "FAILED"):
                del self._streams[event.id]
                if self._stream_by_port.get(entry[0]) == event.id:
                    del self._stream_by_port[entry[0]]
                return
            if event.circ_id:
                entry[1] = event.circ_id
            if self._manual_attach and event.status in ("NEW", "DETACHED") \
                    and event.purpose in (None, "USER"):
                # "0" hands the choice back to tor, as without __LeaveStreamsUnattached
                attach_to = self._pinned.get(entry[0]) or "0"
        if attach_to is not None:
            try:
                self.controller.attach_stream(event.id, attach_to)
            except (stem.ControllerError, stem.SocketError):
                try:  # the pinned circuit is gone: fail the stream rather than stray elsewhere
                    self.controller.close_stream(event.id)
                except (stem.ControllerError, stem.SocketError):
                    pass


def _circuit_info(circ) -> CircuitInfo:
    return CircuitInfo(circ.id, circ.status, circ.purpose, tuple(circ.path or ()),
                       getattr(circ, "socks_username", None))


def _socks_reason(e: BaseException) -> str:
    if isinstance(e, socks.ProxyError) and getattr(e, "socket_err", None) is not None:
        return f"{e.msg}: {e.socket_err}"
    return str(e) or type(e).__name__


def _check_socks_matches_socket_module() -> None:
    """PySocks fixed its base class at import; under gevent it must be gevent's socket."""
    if socket.socket is not socks._orig_socket and not issubclass(socks.socksocket, socket.socket):
        raise TorError("PySocks was imported before gevent.monkey.patch_all(): its sockets would "
                       "block the whole process. Patch first, then import lib.client.tor.")
