"""CPython's collector in the real entry points: both raise the young-generation threshold after
start-up (lib/memtrim.py GC_THRESHOLDS), so concurrent fresh connections, whose objects
reference counting frees, no longer set off a young collection every ~16 requests.

A real proxy and client (--tor none) with a gc.callbacks probe loaded through PYTHONPATH
(tests/support/gcprobe/sitecustomize.py); 64 visitors at a time open fresh connections by Host.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lib.memtrim import GC_THRESHOLDS
from tests.support.procs import ROOT, ClientProc, OriginProc, ProxyProc

pytestmark = pytest.mark.timeout(180)

PROBE = os.path.join(ROOT, "tests", "support", "gcprobe")
CONNECTIONS = 1280  # fresh connections, CONCURRENCY at a time
CONCURRENCY = 64
# Young collections per 1,000 connections allowed in each process. With CPython's default
# threshold (700) this load made ~60 in the proxy and ~25 in the client; with GC_THRESHOLDS, 0.
YOUNG_PER_1000 = 5


def probe_read(proc, probe_dir: str, timeout: float = 20.0) -> dict:
    """Ask the probe in ``proc`` for its counts (SIGUSR2) and wait for a fresh file."""
    path = os.path.join(probe_dir, f"gc-{proc.pid}.json")
    if os.path.exists(path):
        os.unlink(path)
    os.kill(proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{proc.name}: no gc probe answer:\n{proc.log()[-2000:]}"
        time.sleep(0.05)
    with open(path) as f:
        return json.load(f)


def fetch(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_entry_points_keep_young_collections_rare_under_fresh_connections(tmp_path):
    env = {"PYTHONPATH": PROBE, "SHROUD_GC_PROBE_DIR": str(tmp_path)}
    origin = OriginProc(str(tmp_path))
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "proxy-data"), env=env)
    client = ClientProc(str(tmp_path), str(tmp_path / "client-data"),
                        ["http:web.test", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                        env=env)
    try:
        proxy.wait_bound("web.test")
        port = proxy.ports["http"]
        fetch(port)  # the first connection's one-time imports and caches
        before = {p.name: probe_read(p, str(tmp_path)) for p in (proxy, client)}
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(lambda _: fetch(port), range(CONNECTIONS)))
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), \
            {a[:40] for a in answers if not a.startswith(b"HTTP/1.1 200")}
        after = {p.name: probe_read(p, str(tmp_path)) for p in (proxy, client)}
    finally:
        for p in (client, proxy, origin):
            p.stop()
    for name in ("proxy", "client"):
        assert tuple(after[name]["threshold"]) == GC_THRESHOLDS, (name, after[name])
        young = after[name]["collections"][0] - before[name]["collections"][0]
        per_1000 = young / CONNECTIONS * 1000
        print(f"{name}: {young} young collections in {CONNECTIONS} fresh connections "
              f"({per_1000:.1f} per 1,000)")
        assert per_1000 <= YOUNG_PER_1000, (name, young)


def test_gunicorn_master_freezes_its_objects_before_forking_a_worker(tmp_path):
    """gunicorn.conf.py's pre_fork: the workers inherit the master's objects frozen, so their
    collections leave those pages shared (the probe records the freeze count each fork left)."""
    env = {"PYTHONPATH": PROBE, "SHROUD_GC_PROBE_DIR": str(tmp_path), "WEB_CONCURRENCY": "2"}
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "data"), gunicorn=True, env=env)
    try:
        deadline = time.monotonic() + 30
        workers, forks = set(), {}
        while (len(workers) < 2 or not workers <= set(forks)) and time.monotonic() < deadline:
            workers = {w["pid"] for w in proxy.status()["workers"]}
            for name in os.listdir(tmp_path):
                if name.startswith("fork-") and name.endswith(".json"):
                    with open(tmp_path / name) as f:
                        d = json.load(f)
                    forks[d["pid"]] = d["frozen_at_fork"]
            time.sleep(0.1)
    finally:
        proxy.stop()
    assert len(workers) == 2 and workers <= set(forks), (workers, forks)
    # The master holds tens of thousands of objects (gunicorn, the proxy's modules); without the
    # freeze a worker starts with none frozen.
    assert all(forks[pid] > 10_000 for pid in workers), forks
