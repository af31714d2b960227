"""Several gunicorn workers on one host (issue 13), for real: the Procfile's command
(`gunicorn -c gunicorn.conf.py shroud_proxy:app`) with WEB_CONCURRENCY=2, raw listeners opened
by the master before the fork, one client tunnel (which lands on one worker), visitors landing on
either worker. What a worker without the tunnel accepts is handed, socket and peeked bytes, to the
worker that has it (lib/proxy/workers.py); the dashboard answers the same from either worker.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
import urllib.request

import pytest

from tests.support.procs import ADMIN_TOKEN, ClientProc, OriginProc, ProxyProc, free_port
from tests.support.visitor import http_get, https_get, tls_site
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(240)

# Enough fresh connections that, were one worker never to hand over, some would land on it
# (each lands on either worker, the kernel's and the scheduler's choice: 2**-40 otherwise).
VISITS = 40


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    site = tls_site(d, "app.test")
    procs = []
    try:
        origin = OriginProc(str(d), tls=(site.cert_pem, site.key_pem), name="tls-origin")
        procs.append(origin)
        web = OriginProc(str(d), name="http-origin")
        procs.append(web)
        tcp_port = free_port()
        proxy = ProxyProc(str(d), str(d / "proxy-data"), gunicorn=True, name="gunicorn",
                          env={"WEB_CONCURRENCY": "2"},
                          extra=["--peek-timeout", "20", "--tcp-ports", str(tcp_port)])
        procs.append(proxy)
        client = ClientProc(str(d), str(d / "client"), [
            "app.test", f"127.0.0.1:{origin.port}", "http:web.test", f"127.0.0.1:{web.port}",
            f"tcp:{tcp_port}", f"127.0.0.1:{web.port}"],
            [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
        procs.append(client)
        wait_for(lambda: len(workers_of(proxy)) == 2, "two workers", 30)
        wait_for(lambda: every_name_shown(proxy.status()), "both names bound", 30)
        wait_for(lambda: every_worker_knows(proxy.status()), "every worker knows them", 30)
        yield dict(dir=d, proxy=proxy, client=client, ca=site.ca_pem, origin=origin,
                   tcp_port=tcp_port)
    finally:
        for p in reversed(procs):
            p.stop()


def workers_of(proxy) -> list:
    """The gunicorn workers' pids (children of the master)."""
    with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as f:
        return [int(x) for x in f.read().split()]


def every_worker_knows(status: dict, names: int = 3) -> bool:
    """Each worker holds the names or knows a sibling that does (lib/proxy/workers.py: within
    PUBLISH_INTERVAL + POLL_INTERVAL of a bind)."""
    return len(status["workers"]) == 2 and all(
        w["bindings"] + w["names_elsewhere"] >= names for w in status["workers"])


def every_name_shown(status: dict) -> bool:
    names = {b["name"] for b in status["bindings"]}
    tunnel_names = {n for t in status["tunnels"] for n in t["names"]}
    return {"app.test", "web.test"} <= names and {"app.test", "web.test"} <= tunnel_names


def admin_get(proxy, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{proxy.ports['admin']}{path}",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                          "Connection": "close"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_every_worker_accepts_and_held_connections_spread(host):
    proxy = host["proxy"]
    before = {w["pid"]: w["connections"] for w in proxy.status()["workers"]}
    assert set(before) == set(workers_of(proxy))
    held = []
    try:
        for _ in range(VISITS):  # held open: each waits in its worker's peek
            held.append(socket.create_connection(("127.0.0.1", proxy.ports["https"]), 10))
        wait_for(lambda: sum(w["connections"] for w in proxy.status()["workers"])
                 - sum(before.values()) >= VISITS, "every held connection accepted",
                 20)
        after = {w["pid"]: w["connections"] - before.get(w["pid"], 0)
                 for w in proxy.status()["workers"]}
        assert all(n > 0 for n in after.values()) and len(after) == 2, after
    finally:
        for s in held:
            s.close()


def test_every_visitor_reaches_the_one_tunnel(host):
    proxy = host["proxy"]
    status = proxy.status()
    holders = [w["pid"] for w in status["workers"] if w["tunnels"]]
    assert len(holders) == 1, status["workers"]  # one tunnel, on one worker
    for _ in range(VISITS):
        try:
            code, body, _ = https_get(host["ca"], proxy.ports["https"], "app.test")
        except ssl.SSLError as e:
            raise AssertionError(f"{e}: {proxy.status()['workers']}") from None
        assert (code, body) == (200, b"hello from origin\n")  # by SNI, the origin's own cert
        code, body = http_get(proxy.ports["http"], "web.test")[:2]
        assert (code, body) == (200, b"hello from origin\n"), proxy.status()["workers"]
    workers = proxy.status()["workers"]
    handed = sum(w["handoffs"].get("taken", 0) for w in workers)
    assert handed > 0, workers  # some visitors landed on the other worker and were handed over
    assert all(not w["handoffs"].get("sibling_unreachable") for w in workers), workers
    # counted once: bytes where served, connections where accepted
    b = {x["name"]: x for x in proxy.status()["bindings"]}["app.test"]
    assert b["connections"] >= VISITS


def test_dashboard_and_api_answer_the_same_from_any_worker(host):
    proxy = host["proxy"]
    tunnel_ids = set()
    for _ in range(20):  # fresh connections: each lands on either worker
        status = admin_get(proxy, "/api/status")
        assert every_name_shown(status), status
        names = {b["name"] for b in admin_get(proxy, "/api/hostnames")["items"]}
        assert {"app.test", "web.test"} <= names
        tunnels = admin_get(proxy, "/api/tunnels")["items"]
        assert len(tunnels) == 1
        tunnel_ids.add(tunnels[0]["id"])
        assert admin_get(proxy, "/api/overview")["bindings"] == 3
    assert len(tunnel_ids) == 1


def test_raw_tcp_bind_with_two_workers(host):
    """A tcp:PORT bind opens PORT in the worker holding the tunnel (SO_REUSEPORT, so a second
    worker holding one may open it too); connections to it reach the origin."""
    proxy = host["proxy"]
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", host["tcp_port"]), timeout=30)
        try:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello from origin\n")
    names = {b["name"] for b in proxy.status()["bindings"]}
    assert f"tcp:{host['tcp_port']}" in names


def test_disconnect_applies_where_the_tunnel_lives(host):
    proxy = host["proxy"]
    old = admin_get(proxy, "/api/tunnels")["items"][0]["id"]
    for _ in range(5):  # from whichever worker answers: a sibling's tunnel is reached too
        req = urllib.request.Request(
            f"http://127.0.0.1:{proxy.ports['admin']}/api/tunnels/{old}/disconnect",
            data=b"{}", method="POST", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
                break
        except urllib.error.HTTPError as e:
            assert e.code == 404  # already gone (an earlier try did it)
            break
    wait_for(lambda: [t["id"] for t in proxy.status()["tunnels"]] not in ([], [old]),
             "the client reconnected with a new tunnel", 30)
    wait_for(lambda: every_name_shown(proxy.status()), "names bound again", 30)
    wait_for(lambda: every_worker_knows(proxy.status()), "every worker knows them again", 30)
    code, body, _ = https_get(host["ca"], proxy.ports["https"], "app.test")
    assert code == 200


def test_holder_killed_visitors_get_a_clear_answer_then_the_new_tunnel(host):
    proxy = host["proxy"]
    holder = [w["pid"] for w in proxy.status()["workers"] if w["tunnels"]][0]
    os.kill(holder, signal.SIGKILL)
    # Until the client's tunnel is back (on any worker), a visitor gets a clear answer: a 404
    # from the surviving worker (the dead one's Unix socket refuses at once; see
    # test_hand_off_to_a_dead_sibling), or, queued on the dead worker's listener, its
    # replacement's answer.
    deadline = time.monotonic() + 60
    codes = set()
    while time.monotonic() < deadline:
        code = http_get(proxy.ports["http"], "web.test", timeout=30)[0]
        assert code in (200, 404), code
        codes.add(code)
        if code == 200:
            break
        time.sleep(0.2)
    assert 200 in codes, codes
    wait_for(lambda: holder not in workers_of(proxy) and len(workers_of(proxy)) == 2,
             "gunicorn replaced the killed worker", 30)
    wait_for(lambda: every_worker_knows(proxy.status()), "every worker knows the names", 30)
    for _ in range(10):
        assert http_get(proxy.ports["http"], "web.test")[:2] == (200, b"hello from origin\n")
