#!/usr/bin/env python3
"""gunicorn workers (issue 13): 1 and 2 workers in the same run, and the cost of handing a
visitor from one worker to another.

    .venv/bin/python bench/workers_bench.py [--wrk-seconds 10] [--conns 32] [--fresh 300]

For each worker count (WEB_CONCURRENCY=1, then 2) it starts the Procfile's command
(`gunicorn -c gunicorn.conf.py shroud_proxy:app`) with raw listeners, one client
(`shroud.py --tor none`) binding ``http:one.test`` to bench/single_write_origin.py, and measures:

- wrk requests/s at --conns connections for --wrk-seconds (each request a fresh connection: a
  routed HTTP connection carries one exchange), and the CPU the proxy burns per request: user+sys
  seconds of gunicorn's master and workers (/proc) over the requests wrk counted. The machine's
  cores are shared with wrk, the client and the origin, so requests/s says little; CPU per
  request does not depend on that.
- fresh-connection time to first byte (connect, GET, first response byte), --fresh samples one
  after another. With 2 workers each sample is classified by the workers' hand-over counters
  (read from /api/status after each sample, outside the timed part): "direct" when the worker
  holding the tunnel accepted it, "forwarded" when the other one handed it over (SCM_RIGHTS).
- each worker's resident memory (its baseline with one tunnel, idle).

Results: a table on stdout (and progress on stderr). Every process is stopped in a ``finally``;
each load is bounded in time and count. bench/forward_bench.py measures the same side by side
with forwarding between hosts (--fleet-addr), a visitor put on a chosen worker by its source
port.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.proxy_bench import (PY, Proc, cpu_seconds, descendants, percentile,  # noqa: E402
                               request_bytes, start_single_write, wrk)
from tests.support.procs import admin_status, free_port, wait_port  # noqa: E402

NAME = "one.test"
GUNICORN = os.path.join(os.path.dirname(PY), "gunicorn")


def log(msg: str) -> None:
    print(f"[workers-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Host:
    """gunicorn with ``workers`` workers and one client binding http:one.test."""

    def __init__(self, d: str, workers: int, origin: int):
        self.http, self.tunnel, self.admin = free_port(), free_port(), free_port()
        self.token = secrets.token_hex(16)
        data = os.path.join(d, f"proxy-{workers}")
        env_args = (f"--data-dir {data} --tunnel-addr 127.0.0.1:{self.tunnel} --https-addr '' "
                    f"--http-addr 127.0.0.1:{self.http} --admin-token {self.token} "
                    f"--log-level warning")
        os.environ.update(SHROUD_ARGS=env_args, SHROUD_ADMIN_ADDR=f"127.0.0.1:{self.admin}",
                          WEB_CONCURRENCY=str(workers))
        self.procs = []
        try:
            self.gunicorn = Proc(f"gunicorn-{workers}", [GUNICORN, "-c", "gunicorn.conf.py",
                                                         "shroud_proxy:app"], d)
            self.procs.append(self.gunicorn)
            wait_port(self.tunnel, 30)
            wait_port(self.admin, 30)
            pin = self.status()["fingerprint"]
            self.client = Proc(f"client-{workers}", [
                PY, "shroud.py", "--tor", "none", "--data-dir", os.path.join(d, "client"),
                "--status", "plain", "--log-level", "warning", "--proxy",
                f"127.0.0.1:{self.tunnel}", "--pin", pin, f"http:{NAME}", f"127.0.0.1:{origin}"],
                d)
            self.procs.append(self.client)
            self.wait(lambda s: any(b["name"] == NAME for b in s["bindings"]) and
                      len(s.get("workers", [1])) == workers, 60)
        except BaseException:
            self.stop()
            raise

    def status(self) -> dict:
        return admin_status(self.admin, self.token, timeout=10)

    def wait(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s = self.status()
                if predicate(s):
                    return s
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"not ready in {timeout} s:\n{self.gunicorn.log_tail()}")

    def pids(self) -> list:
        return [self.gunicorn.pid, *descendants(self.gunicorn.pid)]

    def handed(self) -> int:
        return sum(w["handoffs"].get("taken", 0) for w in self.status().get("workers", []))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def fresh_ttfb(port: int, sport: int | None = None, host: str = "127.0.0.1") -> float:
    """One fresh connection (from source port ``sport`` when given): seconds from connect() to
    the first response byte. Reset after reading to the end: no TIME_WAIT on either side, so a
    source port can be used again at once."""
    req = request_bytes(keep_alive=False, target="/small", host=NAME)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sport is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", sport))
        t0 = time.perf_counter()
        s.connect((host, port))
        s.sendall(req)
        first = s.recv(65536)
        took = time.perf_counter() - t0
        if not first.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"unexpected answer: {first[:200]!r}")
        while s.recv(65536):
            pass
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    return took


def measure(host: Host, workers: int, args) -> dict:
    res = {"workers": workers}
    status = host.status()
    res["rss_mib"] = [round((w["rss"] or 0) / 2**20, 1) for w in status.get("workers", [])]
    cpu0 = cpu_seconds(host.pids())
    w = wrk(None, args.conns, args.wrk_seconds, port=host.http, target="/small", host=NAME)
    cpu = cpu_seconds(host.pids()) - cpu0
    res.update(rps=w["rps"], errors=w["errors"], requests=w["requests"],
               cpu_us_per_req=cpu / max(1, w["requests"]) * 1e6)
    direct, forwarded = [], []
    before = host.handed() if workers > 1 else 0
    for _ in range(args.fresh):
        took = fresh_ttfb(host.http)
        if workers > 1:
            now = host.handed()
            (forwarded if now > before else direct).append(took)
            before = now
        else:
            direct.append(took)
    for label, xs in (("direct", direct), ("forwarded", forwarded)):
        res[f"{label}_n"] = len(xs)
        res[f"{label}_p50_ms"] = percentile(xs, 50) * 1e3 if xs else None
        res[f"{label}_p99_ms"] = percentile(xs, 99) * 1e3 if xs else None
    return res


def table(rows: list) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.3f}"
    out = ["| workers | requests/s | proxy CPU µs/request | TTFB direct p50/p99 ms (n) | "
           "TTFB forwarded p50/p99 ms (n) | RSS per worker MiB |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['workers']} | {r['rps']:.0f} | {r['cpu_us_per_req']:.0f} | "
                   f"{ms(r['direct_p50_ms'])} / {ms(r['direct_p99_ms'])} ({r['direct_n']}) | "
                   f"{ms(r['forwarded_p50_ms'])} / {ms(r['forwarded_p99_ms'])} "
                   f"({r['forwarded_n']}) | {', '.join(map(str, r['rss_mib']))} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wrk-seconds", type=int, default=10)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--fresh", type=int, default=300)
    args = p.parse_args()
    d = tempfile.mkdtemp(prefix="shroud-workers-bench-")
    origin, origin_port = start_single_write(d)
    rows = []
    try:
        for workers in (1, 2):
            log(f"{workers} worker(s): starting")
            host = Host(d, workers, origin_port)
            try:
                rows.append(measure(host, workers, args))
                log(f"{workers} worker(s): {rows[-1]}")
            finally:
                host.stop()
    except BaseException:
        log(f"failed: the processes' logs are in {d}")
        raise
    finally:
        origin.stop()
    shutil.rmtree(d, ignore_errors=True)
    print(table(rows))
    if len(rows) == 2 and rows[1]["forwarded_p50_ms"] and rows[1]["direct_p50_ms"]:
        extra = rows[1]["forwarded_p50_ms"] - rows[1]["direct_p50_ms"]
        print(f"\nforwarding between workers adds {extra:.3f} ms at p50 (goal: under 0.3 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
