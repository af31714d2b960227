"""System calls per fresh public connection, proxy and client, as a budget (issue 16).

A real proxy and a real client (``--tor none``) in front of bench/single_write_origin.py; the
hub thread of each process is traced with strace while serial fresh connections are routed by
Host (http:one.test, one exchange each). Only the calls a connection's set-up and tear-down
make are budgeted (the table below): how many reads, writes and epoll_waits a connection
takes depends on how the two processes are scheduled, these do not. Each budget is the count
after bench/README.md's "Fresh connections: fewer steps per connection", and each names what
it holds the line on, so a change that brings one back fails here with the call named.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter

import pytest

from tests.support.procs import PY, ROOT, ClientProc, Proc, ProxyProc, free_port, wait_port

CONNECTIONS = 200
REQUEST = b"GET /small HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n"

# Per fresh connection, in the hub thread. fcntl counts F_GETFD only (gevent's two io watchers
# per socket look at the descriptor); SQLite's locks (its own thread) are not ours.
PROXY_BUDGET = {
    "accept4": 1,      # the connection; PublicServer asks the kernel whether another waits
                       # (getsockopt TCP_INFO) instead of an accept4 that finds none (EAGAIN:
                       # ~5 us, a socket made and freed in the kernel)
    "getsockname": 1,  # CPython checks a descriptor it wraps; PublicAddr comes from the listener
    "ioctl": 1,        # gevent makes the socket non-blocking
    "fcntl": 2,
    "setsockopt": 0,   # TCP_NODELAY and TCP_NOTSENT_LOWAT are inherited from the listener
    "getsockopt": 1,   # that look at the listener's accept queue
    "shutdown": 1,     # at the answer's end (one exchange); the splice's half-close after
                       # it is not sent again (it failed with ENOTCONN)
    "close": 1,
    # A new greenlet's first Python frame maps a 16 KiB data stack chunk (Python 3.11), unmapped
    # when it ends: the handler and the splice's second direction run in kept greenlets
    # (lib/net/greenpool.py), so no greenlet is started per connection.
    "mmap": 0,
    "munmap": 0,
    "sendto of nothing": 0,
}
CLIENT_BUDGET = {
    "socket": 1,
    "connect": 2,      # EINPROGRESS, then done: a local origin answers inside connect()
    # Created SOCK_NONBLOCK and wrapped by lib.net.sockets.ConnectedSocket: no ioctl (gevent's
    # constructor makes it non-blocking again), no getsockname (CPython checks a descriptor it
    # is given to wrap).
    "ioctl": 0,
    "getsockname": 0,
    "getsockopt": 0,   # the wrapper is told the protocol (no SO_PROTOCOL look-up)
    "fcntl": 2,
    "setsockopt": 2,   # TCP_NODELAY, TCP_NOTSENT_LOWAT: a connect()ed socket inherits nothing
    "shutdown": 0,     # the origin closed first: the visitor's end is a close, not a half-close
    "close": 1,
    "mmap": 0,         # the stream's handler and the splice's second direction: kept greenlets
    "munmap": 0,
    "sendto of nothing": 0,  # the proxy's FIN (an empty DATA frame) is no send to the origin
}
# Calls made now and then by timers while the connections run (heartbeats, the trimmer's look
# at the clock) and one-off allocations: per connection, at most this much above a budget.
SLACK = 0.25


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    origin_port = free_port()
    origin = Proc("origin", [PY, "bench/single_write_origin.py", str(origin_port)], str(d))
    procs = [origin]
    try:
        wait_port(origin_port)
        tcp_port = free_port()
        proxy = ProxyProc(str(d), str(d / "proxy-data"),
                          extra=["--log-level", "warning", "--tcp-ports", str(tcp_port)])
        procs.append(proxy)
        client = ClientProc(str(d), str(d / "client-data"),
                            ["http:one.test", f"127.0.0.1:{origin_port}",
                             f"tcp:{tcp_port}", f"127.0.0.1:{origin_port}"],
                            [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                            extra=["--log-level", "warning"])
        procs.append(client)
        proxy.wait_bound("one.test")
        proxy.wait_bound(f"tcp:{tcp_port}")
        proxy.ports["tcp"] = tcp_port
        for _ in range(20):  # warm: first-use allocations, caches, the pools' greenlets
            fresh_connection(proxy.ports["http"])
            fresh_connection(tcp_port)
        yield proxy, client
    finally:
        for p in reversed(procs):
            p.stop()


def fresh_connection(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(REQUEST)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"hello, world\n"), answer


def _traced(pid: int, timeout: float = 10.0) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return re.search(r"^TracerPid:\s+[1-9]", f.read(), re.M) is not None
    except OSError:
        return False


def _hub_calls(trace: str, pid: int) -> Counter:
    """Calls of the process's main thread (the gevent hub) in an ``strace -f`` log."""
    calls: Counter = Counter()
    line_re = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)[( ]")
    with open(trace, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = line_re.match(line)
            if m is None or int(m.group(1)) != pid or "resumed>" in line:
                continue
            name = m.group(2)
            if name == "fcntl" and "F_GETFD" not in line:
                continue
            if name == "sendto" and re.match(r'\d+\s+sendto\(\d+, "", 0,', line):
                name = "sendto of nothing"
            calls[name] += 1
    return calls


def test_system_calls_per_fresh_connection(routed, tmp_path):
    _within_budgets(routed, tmp_path, "http", {"proxy": PROXY_BUDGET, "client": CLIENT_BUDGET})


# Through a tcp: bind (the wildcard listener --tcp-bind-host 0.0.0.0 opens): the bind's port
# and StartProxy's PublicAddr come from one getsockname, CPython's own check is the other.
PROXY_TCP_BUDGET = {"getsockname": 2, "accept4": 1, "ioctl": 1, "fcntl": 2, "setsockopt": 0,
                    "getsockopt": 1, "close": 1, "mmap": 0, "munmap": 0}


def test_system_calls_per_fresh_connection_through_a_tcp_bind(routed, tmp_path):
    _within_budgets(routed, tmp_path, "tcp", {"proxy": PROXY_TCP_BUDGET})


def _within_budgets(routed, tmp_path, listener: str, budgets: dict) -> None:
    proxy, client = routed
    traces = {}
    for name, proc in (("proxy", proxy), ("client", client)):
        out = str(tmp_path / f"{name}.strace")
        traces[name] = (proc.pid, out, subprocess.Popen(
            ["strace", "-f", "-qq", "-o", out, "-p", str(proc.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT))
    try:
        deadline = time.monotonic() + 10
        while not all(_traced(pid) for pid, _, _ in traces.values()):
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.05)
        for _ in range(CONNECTIONS):
            fresh_connection(proxy.ports[listener])
    finally:
        for _, _, st in traces.values():
            st.send_signal(signal.SIGINT)
        for _, _, st in traces.values():
            st.wait(20)
    report = []
    over = []
    for name, budget in budgets.items():
        pid, out, _ = traces[name]
        calls = _hub_calls(out, pid)
        per = {k: v / CONNECTIONS for k, v in calls.items()}
        report.append(f"{name}: {sum(calls.values()) / CONNECTIONS:.1f} calls per connection: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items())))
        over += [f"{name} {call}: {per.get(call, 0):.2f} per connection, budget {limit}"
                 for call, limit in budget.items() if per.get(call, 0) > limit + SLACK]
    print("\n".join(report))
    assert not over, "\n".join(over + report)
    for proc in (proxy, client):  # a call saved by breaking something shows up here
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
