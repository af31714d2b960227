"""Faults with real processes: nothing lost, nothing corrupt, service back by itself.

- a proxy SIGKILLed mid-transfer and restarted on the same ports and data dir;
- one of three proxies down;
- a tunnel gone silent (proxy SIGSTOPped) caught by heartbeats;
- the local service restarting;
- the ownership store corrupt (the proxy refuses to start, says why, touches nothing) or its
  disk full (binds refused with the reason, nothing recorded is lost).

The Tor exit relay's death is in tests/test_e2e_tor.py.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from lib.identity import Identity
from tests.support import procs
from tests.support.origin import pattern
from tests.support.visitor import tls_site
from tests.support.wait import wait_for
from tests.support.procs import (PY, ROOT, ClientProc, OriginProc, Proc, ProxyProc, free_port,
                                 wait_port)

pytestmark = pytest.mark.timeout(120)


def get(proxy, name, path="/hello", timeout=10.0):
    c = http.client.HTTPConnection("127.0.0.1", proxy.ports["http"], timeout=timeout)
    try:
        c.request("GET", path, headers={"Host": name})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_served(proxy, name, timeout=20.0) -> float:
    """Seconds until a request for ``name`` is answered 200 again."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if get(proxy, name, timeout=5)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{name} not served through {proxy.name} within {timeout} s")


def fetch_checked(proxy, name, n) -> None:
    status, body = get(proxy, name, f"/bytes/{n}", timeout=60)
    assert status == 200 and len(body) == n
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(n)).digest()


def origin_on(logdir, port, name, tls=None) -> Proc:
    """The test origin on a fixed port (to be restarted on it)."""
    argv = [PY, "tests/support/origin.py", "--port", str(port)]
    if tls:
        argv += ["--tls", *tls]
    p = Proc(name, argv, str(logdir))
    wait_port(port)
    return p


def wait_log(proc, pattern_re, since=0, timeout=20.0):
    """(seconds waited, match) for the first match of ``pattern_re`` in proc's log after
    byte offset ``since``."""
    t0 = time.monotonic()
    rx = re.compile(pattern_re)
    while time.monotonic() - t0 < timeout:
        m = rx.search(proc.log()[since:])
        if m:
            return time.monotonic() - t0, m
        time.sleep(0.02)
    raise TimeoutError(f"{pattern_re!r} not in {proc.name}'s log after {timeout} s:\n"
                       f"{proc.log()[since:][-3000:]}")


# --- the proxy dies mid-transfer ---------------------------------------------------------------

def test_proxy_sigkilled_mid_transfer_and_restarted(tmp_path):
    d = tmp_path
    origin = OriginProc(str(d))
    proxy = ProxyProc(str(d), str(d / "proxy-data"))
    ports = dict(proxy.ports)
    client = ClientProc(str(d), str(d / "client"), ["http:big.test", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{ports['tunnel']}"], pins=[proxy.fingerprint])
    proxy2 = None
    try:
        proxy.wait_bound("big.test")
        fetch_checked(proxy, "big.test", 5 << 20)  # finished before the fault: intact

        n = 200 << 20
        c = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=10)
        c.request("GET", f"/bytes/{n}", headers={"Host": "big.test"})
        r = c.getresponse()
        assert r.status == 200
        got = bytearray(r.read(2 << 20))
        proxy.signal(signal.SIGKILL)
        proxy.p.wait(5)
        log_mark = len(client.log())
        error = None
        try:
            while len(got) < n:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                got += chunk
        except (http.client.IncompleteRead, OSError) as e:
            error = e
        c.close()
        # Interrupted: a reset, or a short read the visitor sees against Content-Length (never
        # a complete-looking body), and every byte that did arrive is the right byte.
        assert r.length is None or r.length > 0 or error is not None
        assert len(got) < n
        error = error or f"short read: {len(got)} of {n} bytes"
        assert bytes(got) == pattern(len(got)), "corrupt bytes in the interrupted transfer"

        # Restart on the same ports and data dir; the client (same process) rebinds.
        wait_log(client, r"retrying in", log_mark)  # down for a while: the client is in backoff
        t_up = time.monotonic()
        proxy2 = ProxyProc(str(d), str(d / "proxy-data"), name="proxy-restarted", ports=ports)
        started = time.monotonic() - t_up
        proxy2.wait_bound("big.test", timeout=30)
        rebound = time.monotonic() - t_up
        assert client.alive()
        delays = [float(x) for x in re.findall(r"retrying in ([0-9.]+) s",
                                              client.log()[log_mark:])]
        assert delays, client.log()[log_mark:]
        # Within its backoff: the proxy was back before the last announced delay ran out.
        assert rebound <= started + max(delays) + 1.0, (rebound, started, delays)
        fetch_checked(proxy2, "big.test", 5 << 20)
        owner = Identity.load_or_create(str(d / "client")).fingerprint
        b = [b for b in proxy2.status()["bindings"] if b["name"] == "big.test"][0]
        assert b["owner"] == owner  # the ownership store survived the SIGKILL
        print(f"proxy SIGKILL: interrupted after {len(got) >> 20} MiB with "
              f"{error!r}; restarted proxy listening in {started:.2f} s, "
              f"rebound {rebound:.2f} s after restart (client backoff delays {delays})")
    finally:
        for p in (client, proxy2, proxy, origin):
            if p is not None:
                p.stop()


# --- one of three proxies down -----------------------------------------------------------------

def test_one_of_three_proxies_down_the_others_serve_every_request(tmp_path):
    d = tmp_path
    origin = OriginProc(str(d))
    proxies = [ProxyProc(str(d), str(d / f"proxy{i}"), name=f"proxy{i}") for i in range(3)]
    client = ClientProc(str(d), str(d / "client"), ["http:three.test", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{p.ports['tunnel']}" for p in proxies],
                        pins=[p.fingerprint for p in proxies])
    try:
        for p in proxies:
            p.wait_bound("three.test")
        survivors = [proxies[0], proxies[2]]
        results: list = []
        stop = threading.Event()

        def visitor():
            i = 0
            while not stop.is_set() and i < 5000:
                p = survivors[i % 2]
                try:
                    status, body = get(p, "three.test", timeout=5)
                    results.append((p.name, status == 200 and body == b"hello from origin\n"))
                except OSError as e:
                    results.append((p.name, f"{type(e).__name__}: {e}"))
                i += 1

        threads = [threading.Thread(target=visitor) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) >= 50, "visitors served before the kill")
        mark = len(client.log())
        proxies[1].signal(signal.SIGKILL)
        served_at_kill = len(results)
        # Visitors keep going until the client has noticed the dead proxy and well after.
        wait_log(client, r"retrying in", mark, timeout=30)
        wait_for(lambda: len(results) >= served_at_kill + 200 or len(results) >= 5000 * 4,
                 "visitors served after the kill", timeout=60)
        stop.set()
        for t in threads:
            t.join(10)
        failed = [r for r in results if r[1] is not True]
        assert len(results) > 100 and not failed, (len(results), failed[:5])
        assert "retrying in" in client.log()  # and the client keeps trying the dead one
        print(f"one proxy down: {len(results)} requests through the other two, 0 failed")
    finally:
        for p in [client, *proxies, origin]:
            p.stop()


# --- a silent tunnel ---------------------------------------------------------------------------

def test_silent_tunnel_detected_by_heartbeat_and_redialled(tmp_path):
    d = tmp_path
    interval, timeout = 1.0, 3.0
    origin = OriginProc(str(d))
    proxy = ProxyProc(str(d), str(d / "proxy-data"))
    client = ClientProc(str(d), str(d / "client"), ["http:quiet.test", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                        extra=["--heartbeat-interval", str(interval),
                               "--heartbeat-timeout", str(timeout)])
    try:
        proxy.wait_bound("quiet.test")
        time.sleep(interval * 2)  # a few echoes: the tunnel is healthy
        mark = len(client.log())
        # The path stops forwarding without closing: the proxy process is frozen; its kernel
        # keeps the TCP connection open and even ACKs, but no byte comes back.
        proxy.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            detected, m = wait_log(client, r"no heartbeat echo for ([0-9.]+) s", mark,
                                   timeout=timeout + 10)
            redial, _ = wait_log(client, r"retrying in", mark, timeout=5)
        finally:
            proxy.signal(signal.SIGCONT)
        resumed = time.monotonic()
        # Silence counts from the last echo (up to `interval` before the stop) and is checked
        # every `interval`.
        assert timeout - interval - 0.2 <= detected <= timeout + interval + 1.0, detected
        back = wait_served(proxy, "quiet.test", timeout=30)
        tunnels = proxy.status()["tunnels"]
        assert len(tunnels) == 1  # the dead one is gone, the redialled one serves
        print(f"silent tunnel: heartbeat timeout detected {detected:.2f} s after SIGSTOP "
              f"(interval {interval} s, timeout {timeout} s; the client said "
              f"{m.group(1)} s without echo), redial began {redial:.2f} s after that, "
              f"service back {back:.2f} s after SIGCONT")
        assert resumed - t0 < timeout + interval + 10
    finally:
        proxy.signal(signal.SIGCONT)
        for p in (client, proxy, origin):
            p.stop()


# --- the local service restarts ----------------------------------------------------------------

def test_local_service_restart_gives_clean_refusals_then_service(tmp_path):
    d = tmp_path
    site = tls_site(d, "svc-tls.test")
    cert_pem, key_pem, ca_pem = site.cert_pem, site.key_pem, site.ca_pem
    http_port, tls_port = free_port(), free_port()
    origins = [origin_on(d, http_port, "origin-http"),
               origin_on(d, tls_port, "origin-tls", tls=(cert_pem, key_pem))]
    proxy = ProxyProc(str(d), str(d / "proxy-data"))
    client = ClientProc(str(d), str(d / "client"),
                        ["http:svc.test", f"127.0.0.1:{http_port}",
                         "svc-tls.test", f"127.0.0.1:{tls_port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    ctx = ssl.create_default_context(cafile=ca_pem)

    def tls_get():
        raw = socket.create_connection(("127.0.0.1", proxy.ports["https"]), timeout=10)
        conn = http.client.HTTPConnection("svc-tls.test", timeout=10)
        conn.sock = ctx.wrap_socket(raw, server_hostname="svc-tls.test")
        conn.request("GET", "/hello")
        r = conn.getresponse()
        out = (r.status, r.read())
        conn.close()
        return out

    try:
        proxy.wait_bound("svc.test")
        proxy.wait_bound("svc-tls.test")
        assert get(proxy, "svc.test")[0] == 200 and tls_get()[0] == 200
        for o in origins:
            o.stop()
        # Down: HTTP visitors get a 502 at once; TLS visitors a closed connection, at once.
        for _ in range(5):
            t0 = time.monotonic()
            status, body = get(proxy, "svc.test")
            assert status == 502 and b"not reachable" in body
            assert time.monotonic() - t0 < 2
            t0 = time.monotonic()
            with pytest.raises((ssl.SSLError, OSError)):
                tls_get()
            assert time.monotonic() - t0 < 2
        origins = [origin_on(d, http_port, "origin-http"),
                   origin_on(d, tls_port, "origin-tls", tls=(cert_pem, key_pem))]
        # Back: the very next requests are served (the tunnel never went down).
        assert get(proxy, "svc.test") == (200, b"hello from origin\n")
        assert tls_get() == (200, b"hello from origin\n")
        assert len(proxy.status()["tunnels"]) == 1
    finally:
        for p in [client, proxy, *origins]:
            p.stop()


# --- the ownership store -----------------------------------------------------------------------

def start_proxy_expecting_failure(data_dir, timeout=30):
    return subprocess.run([PY, "shroud_proxy.py", "--data-dir", str(data_dir),
                           "--tunnel-addr", f"127.0.0.1:{free_port()}", "--admin-addr", ""],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_corrupt_ownership_store_stops_the_proxy_with_a_clear_error(tmp_path):
    # Not a database at all.
    data = tmp_path / "garbage"
    data.mkdir()
    store = data / "ownership.sqlite3"
    store.write_bytes(b"this is not an SQLite database\n" * 200)
    before = store.read_bytes()
    out = start_proxy_expecting_failure(data)
    assert out.returncode == 1, out
    assert "cannot start" in out.stderr and str(store) in out.stderr
    assert "Traceback" not in out.stderr
    assert store.read_bytes() == before  # nothing overwritten, nothing "repaired" away

    # A real store with records, then damaged in the middle.
    data = tmp_path / "damaged"
    data.mkdir()
    from lib.proxy.ownership import OwnershipStore
    s = OwnershipStore(str(data / "ownership.sqlite3"))
    for i in range(300):
        s.claim(f"name{i}.test", f"{i:064x}")
    s.close()
    store = data / "ownership.sqlite3"
    raw = bytearray(store.read_bytes())
    assert len(raw) > 3 * 4096
    raw[4096 + 100: 4096 * 3] = b"\xff" * (4096 * 2 - 100)
    store.write_bytes(bytes(raw))
    before = store.read_bytes()
    out = start_proxy_expecting_failure(data)
    assert out.returncode == 1, out
    assert "cannot start" in out.stderr and "ownership database" in out.stderr, out.stderr
    assert ("corrupt" in out.stderr or "malformed" in out.stderr), out.stderr
    assert store.read_bytes() == before
    print("corrupt store:", out.stderr.strip().splitlines()[-1])


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk, mounted in a mount namespace of its own that a holder
    process keeps alive; processes run in it through the returned python wrapper."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.fail("needs root (or a user namespace), unshare and nsenter for a private "
                    "tmpfs: run the suite with ./scripts/test.sh")
    disk = tmp_path / "disk"
    disk.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=1m shroud-test {disk} && echo mounted && exec sleep 600"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mounted"
        wrapper = tmp_path / "python-in-ns"
        wrapper.write_text(f"#!/bin/sh\nexec nsenter -t {holder.pid} -m --wd={ROOT} -- {PY} \"$@\"\n")
        wrapper.chmod(0o755)
        view = f"/proc/{holder.pid}/root{disk}"  # the tmpfs as the holder sees it
        yield str(disk), view, str(wrapper)
    finally:
        holder.kill()
        holder.wait(5)


def test_full_disk_refuses_new_binds_with_the_reason_and_loses_nothing(tmp_path, small_disk,
                                                                        monkeypatch):
    d = tmp_path
    disk, view, wrapper = small_disk
    data = os.path.join(disk, "proxy-data")
    origin = OriginProc(str(d))
    monkeypatch.setattr(procs, "PY", wrapper)  # the proxy runs in the tmpfs's namespace
    proxy = ProxyProc(str(d), data)
    monkeypatch.undo()
    clients = []
    proxy2 = None
    filler = os.path.join(view, "proxy-data", "filler")
    try:
        clients.append(ClientProc(str(d), str(d / "client-a"),
                                  ["http:one.test", f"127.0.0.1:{origin.port}"],
                                  [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                                  name="client-a"))
        proxy.wait_bound("one.test")
        # The disk fills up (another tenant of the disk, a log gone wild).
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(1024):  # 4 MiB at most: the disk is 1 MiB
                os.write(fd, b"\0" * 4096)
            raise AssertionError("the 1 MiB disk never filled")
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
        finally:
            os.close(fd)
        clients.append(ClientProc(str(d), str(d / "client-b"),
                                  ["http:two.test", f"127.0.0.1:{origin.port}"],
                                  [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                                  name="client-b"))
        _, m = wait_log(clients[1], r"refused two\.test: (.*)", timeout=30)
        reason = m.group(1)
        assert "ownership" in reason and "full" in reason, reason
        assert proxy.status()["refusals"].get("ownership_error", 0) >= 1
        # What was granted before keeps working.
        assert get(proxy, "one.test")[0] == 200
        assert get(proxy, "two.test")[0] == 404

        os.unlink(filler)  # space again: the client's periodic re-bind gets the name
        proxy.wait_bound("two.test", timeout=30)
        assert get(proxy, "two.test")[0] == 200

        # Nothing lost: after a SIGKILL and restart, both owners are on disk.
        ports = dict(proxy.ports)
        proxy.signal(signal.SIGKILL)
        proxy.p.wait(5)
        monkeypatch.setattr(procs, "PY", wrapper)
        proxy2 = ProxyProc(str(d), data, name="proxy-restarted", ports=ports)
        monkeypatch.undo()
        # Read in the tmpfs's namespace (SQLite resolves /proc/PID/root back to ours).
        out = subprocess.run([wrapper, "-c", "import json, sqlite3, sys; db = sqlite3.connect("
                              "sys.argv[1]); print(json.dumps(dict(db.execute("
                              "'SELECT name, key FROM ownership').fetchall())))",
                              os.path.join(data, "ownership.sqlite3")],
                             capture_output=True, text=True, timeout=30, check=True)
        owners = json.loads(out.stdout)
        key_a = Identity.load_or_create(str(d / "client-a")).fingerprint
        key_b = Identity.load_or_create(str(d / "client-b")).fingerprint
        assert owners == {"one.test": key_a, "two.test": key_b}, owners
        print(f"full disk: bind refused with: {reason}")
    finally:
        for p in [*clients, proxy2, proxy, origin]:
            if p is not None:
                p.stop()
