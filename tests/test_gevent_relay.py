"""bench/gevent_relay.py, the floor bench/cost_ab.py ``--relay`` sets beside Shroud: both of its
ways carry every byte in order through a peer that is slow to read (the lean way's write
watchers), and pass each side's EOF on as a half-close. Real processes on loopback."""
from __future__ import annotations

import hashlib
import os
import socket
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


def answer() -> bytes:
    return bytes(range(256)) * (SIZE // 256)


@pytest.mark.parametrize("lean", [False, True], ids=["greenlets", "lean"])
def test_a_relay_carries_every_byte_both_ways_and_passes_the_half_close_on(lean):
    target = SlowTarget()
    target.start()
    port = free_port()
    relay = subprocess.Popen([sys.executable, RELAY, *(["--lean"] if lean else []), str(port),
                              str(target.port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port)
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
