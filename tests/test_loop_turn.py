"""bench/loop_turn.py's servers answer as the single-write origin does (the bench compares their
CPU per request, so they must do the same work): its gevent server and its gevent forwarder in
front of the origin, each a real process, one keep-alive connection, two requests. The bench
itself (wrk, rounds) is run by hand: bench/README.md."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.support.procs import ROOT, free_port, wait_port

pytestmark = pytest.mark.timeout(60)

BENCH = os.path.join(ROOT, "bench")
REQUEST = b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"


def two_answers(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(REQUEST + REQUEST)
        got = b""
        while got.count(b"hello, world\n") < 2:
            data = s.recv(65536)
            assert data, got
            got += data
        return got


def test_gevent_server_and_forwarder_answer_as_the_origin():
    origin, server, forward = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(BENCH, "single_write_origin.py"),
                               str(origin)]),
             subprocess.Popen([sys.executable, os.path.join(BENCH, "loop_turn.py"),
                               "--serve-gevent", str(server)]),
             subprocess.Popen([sys.executable, os.path.join(BENCH, "gevent_relay.py"),
                               str(forward), str(origin)])]
    try:
        for port in (origin, server, forward):
            wait_port(port)
        want = two_answers(origin)
        assert want.startswith(b"HTTP/1.1 200 OK\r\n")
        assert two_answers(server) == want
        assert two_answers(forward) == want
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)
