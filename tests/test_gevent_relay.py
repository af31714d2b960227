"""bench/gevent_relay.py, the floor bench/cost_ab.py ``--relay`` sets beside Shroud (and
proxy_bench's RelayPath, percall's visitors at once): both of its
ways carry every byte in order through a peer that is slow to read (the lean way's write
watchers), and pass each side's EOF on as a half-close. Real processes on loopback."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.support.procs import free_port

RELAY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "gevent_relay.py")
SIZE = 4 << 20  # several times what loopback's socket buffers hold: the relay must wait


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


class SlowTarget(threading.Thread):
    """Accepts one connection, waits before reading, reads to EOF, answers SIZE bytes, closes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.got = b""

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(20)
            time.sleep(0.3)  # the visitor's bytes pile up in the relay meanwhile
            self.got = read_all(conn)
            conn.sendall(answer())


def start_relay(lean: bool, target_port: int) -> tuple[subprocess.Popen, int]:
    """A relay process (the lean way or the greenlets) in front of ``target_port``, listening."""
    port = free_port()
    relay = subprocess.Popen([sys.executable, RELAY, *(["--lean"] if lean else []), str(port),
                              str(target_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port)
    except BaseException:
        relay.kill()
        relay.wait(10)
        raise
    return relay, port


def answer() -> bytes:
    return bytes(range(256)) * (SIZE // 256)


@pytest.mark.parametrize("lean", [False, True], ids=["greenlets", "lean"])
def test_a_relay_carries_every_byte_both_ways_and_passes_the_half_close_on(lean):
    target = SlowTarget()
    target.start()
    relay, port = start_relay(lean, target.port)
    try:
        upload = os.urandom(SIZE)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(upload)
            s.shutdown(socket.SHUT_WR)  # the target sees EOF only if the relay passes it on
            time.sleep(0.3)  # the answer piles up in the relay: its other way must wait too
            got = read_all(s)
        target.join(20)
        assert hashlib.sha256(target.got).digest() == hashlib.sha256(upload).digest()
        assert len(got) == SIZE and got == answer()
    finally:
        relay.kill()
        relay.wait(10)
        target.listener.close()


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    """wait_port's probe would be relayed to the one-shot target: look at the listen table."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in f.readlines()[1:]):
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def test_usage_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, RELAY, "1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "usage: gevent_relay.py [--lean] LISTEN_PORT TARGET_PORT" in out.stderr


def test_usage_names_the_ports_when_one_is_not_a_number():
    out = subprocess.run([sys.executable, RELAY, "--lean", "80", "http"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "ports 1-65535" in out.stderr


def test_the_lean_way_keeps_what_a_full_peer_could_not_take():
    """A read whose send finds the peer's buffer full keeps every byte for the write watcher."""
    from gevent import get_hub

    from bench import gevent_relay

    visitor, a = socket.socketpair()
    b, target = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    try:
        while True:  # fill b -> target: the target reads nothing yet
            b.send(b"x" * 65536)
    except BlockingIOError:
        pass
    pair = gevent_relay._Pair(get_hub().loop, a, b)
    pair.writes[0].stop()  # the connect's watcher: a socket pair is connected already
    visitor.sendall(b"REQUEST-BYTES")
    pair.readable(0)
    assert pair.pending[0] == b"REQUEST-BYTES"
    assert pair.writes[0].active and not pair.reads[0].active  # waits for room, reads no more
    target.setblocking(False)
    try:
        while target.recv(1 << 20):  # the target reads what filled its buffer
            pass
    except BlockingIOError:
        pass
    pair.writable(0)
    assert pair.pending[0] == b"" and pair.reads[0].active and not pair.writes[0].active
    assert target.recv(100) == b"REQUEST-BYTES"
    pair.close()
    for s in (visitor, target):
        s.close()


class HoldingTarget(threading.Thread):
    """Accepts connections and holds them open, reading nothing (a slow origin)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []

    def run(self) -> None:
        try:
            while True:
                self.held.append(self.listener.accept()[0])
        except OSError:  # the listener closed: the test is over
            pass

    def stop(self) -> None:
        self.listener.close()
        for s in self.held:
            s.close()


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("lean", [False, True], ids=["greenlets", "lean"])
def test_a_visitor_reset_leaves_nothing_open_in_the_relay(lean):
    target = HoldingTarget()
    target.start()
    relay, port = start_relay(lean, target.port)
    try:
        base = fds(relay.pid)
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"hello")
            time.sleep(0.02)  # relayed, so the relay holds both ends
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset, not a FIN
        deadline = time.monotonic() + 10
        while fds(relay.pid) > base and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fds(relay.pid) <= base, f"{fds(relay.pid) - base} descriptors left open"
    finally:
        relay.kill()
        relay.wait(10)
        target.stop()


@pytest.mark.parametrize("lean", [False, True], ids=["greenlets", "lean"])
def test_relay_path_runs_its_way_and_carries_the_origin_s_answers(lean, tmp_path):
    from bench import proxy_bench as pb

    origin, port = pb.start_single_write(str(tmp_path))
    path = None
    try:
        path = pb.RelayPath(str(tmp_path), port, lean=lean)
        assert path.name == ("lean" if lean else "relay")
        for proc in (path.near, path.far):
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                assert (b"--lean" in f.read().split(b"\0")) == lean
        with socket.create_connection(("127.0.0.1", path.one_port), timeout=10) as s:
            s.sendall(b"GET /small HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n")
            assert read_all(s).endswith(b"\r\n\r\nhello, world\n")
        assert len(path.cpu_pids()) == 2
    finally:
        if path is not None:
            path.stop()
        origin.stop()


def test_percall_runs_n_requests_n_at_once():
    from bench import percall

    lock = threading.Lock()
    state = {"now": 0, "most": 0, "calls": 0}

    def one() -> None:
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1

    percall.run_requests(one, 4, 12)
    assert state["calls"] == 12 and state["most"] == 4
    state.update(most=0, calls=0)
    percall.run_requests(one, 1, 3)
    assert state["calls"] == 3 and state["most"] == 1

    def failing() -> None:
        raise ConnectionError("the path closed the connection")
    with pytest.raises(ConnectionError):
        percall.run_requests(failing, 3, 10)
