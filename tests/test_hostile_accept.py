"""A connection flood against a real proxy whose descriptors run out (a deploy without
LimitNOFILE: docs/OPERATIONS.md asks for twice --max-public-connections): the public
listener's own accept loop (lib.proxy.server.PublicServer), or the tunnel listener's
(gevent's, lib.proxy.server.TunnelServer), meets EMFILE at every accept.

It must not spin (the listener stays readable), must count what it refused, must not write
the log at the flood's pace, and must serve again once descriptors are free.
"""
from __future__ import annotations

import http.client
import json
import os
import resource
import socket
import ssl

import pytest

from tests.support.procs import ADMIN_TOKEN, ProxyProc
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(120)

# Failed accepts waited for, through gevent's back-off (10 ms doubling to 1 s: ~8 s for 14):
# one run of failures, which lib.proxy.server logs in one line (a traceback each before).
FAILURES = 14


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _served(proxy, listener: str) -> bool:
    """A new connection to ``listener`` is served: an HTTP answer, or a TLS handshake."""
    with socket.create_connection(("127.0.0.1", proxy.ports[listener]), timeout=10) as s:
        s.settimeout(10)
        if listener == "tunnel":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(s):
                return True
        s.sendall(b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n")
        return s.recv(100).startswith(b"HTTP/1.")


@pytest.mark.parametrize("listener", ["http", "tunnel"])
def test_out_of_descriptors_is_counted_logged_little_and_recovered(tmp_path, listener):
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "data"))
    visitors = []
    try:
        # The status API over one connection opened before the descriptors run out (kept
        # alive: a new one would find none either).
        admin = http.client.HTTPConnection("127.0.0.1", proxy.ports["admin"], timeout=10)

        def failures() -> int:
            admin.request("GET", "/api/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            return json.loads(admin.getresponse().read())["refusals"].get("accept_failed", 0)

        assert failures() == 0
        limits = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
        # Room for the status API's connection and a few more, not for the flood.
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (_fds(proxy.pid) + 8, limits[1]))
        for _ in range(40):
            visitors.append(socket.create_connection(("127.0.0.1", proxy.ports[listener]),
                                                     timeout=10))

        wait_for(lambda: failures() >= FAILURES, "the listener to count failed accepts",
                 timeout=60, interval=0.5)
        # Paused between them: a listener watched again at once would fail ~100k times a
        # second (the loop spinning), not a few times a second.
        assert failures() < 50
        log = proxy.log()
        assert "Traceback" not in log, log[-3000:]
        lines = log.count("accept failed")
        assert lines == 1, f"{lines} lines for {failures()} failed accepts"
        # Free the descriptors: the listener serves again (gevent's timer resumes it).
        for s in visitors:
            s.close()
        visitors.clear()
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, limits)
        admin.close()
        wait_for(lambda: _served(proxy, listener), "the listener to serve again", timeout=30,
                 interval=0.5)
    finally:
        for s in visitors:
            s.close()
        proxy.stop()
