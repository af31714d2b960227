#!/usr/bin/env python3
"""Fleet store benchmark: the same proxy on SQLite (the data dir) and on PostgreSQL.

    .venv/bin/python bench/fleet_bench.py [--rounds 3] [--binds 200] [--blocks 10]
                                          [--ttfb 300] [--conn-seconds 5] [--workers 8]
                                          [--no-readme]

Per store, on 127.0.0.1, real processes (shroud_proxy.py, shroud.py --tor none, the tests'
origin, Debian's PostgreSQL started like tests/fixtures/postgres.py):

- bind latency: one raw tunnel (tests/support/rawtunnel.py) binds --binds fresh names (each a
  first-use claim, written to the store before the answer) then, on a second tunnel of the
  same key, binds them again (the owner's re-bind: read, no write); Bind -> BindResp round
  trip, p50 and p90;
- block propagation: two proxies on one store (SQLite: one data dir shared by both processes,
  as gunicorn's workers share it; PostgreSQL: one database). A block posted to A's admin API,
  then B's public HTTP listener polled every 5 ms until it answers 403: time from A's answer
  to B's first 403, p50 and max over --blocks names;
- public connections through a bound name: --ttfb fresh connections one after another
  (connect, GET, first response byte), p50/p99; and connections/s with --workers threads each
  opening fresh connections for --conn-seconds. Routing reads memory only, so these must not
  depend on the store.

The stores take turns, --rounds times (fresh processes, data dirs and database each round), and
each cell is the median over the rounds: on a shared machine the load of the moment would
otherwise be measured instead of the store.

Claim limits are off for the bench (--max-names-per-key 0 --claim-burst 0): it measures the
store, not the squatting guard. Results: a table on stdout and (unless --no-readme) between the
fleet-bench markers of bench/README.md. Every process is stopped in a ``finally``; every loop is
bounded in count and time.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lib.identity import Identity  # noqa: E402
from tests.fixtures.postgres import PostgresServer  # noqa: E402
from tests.support.procs import ADMIN_TOKEN, ClientProc, OriginProc, ProxyProc  # noqa: E402
from tests.support.rawtunnel import RawTunnel  # noqa: E402
from tests.support.visitor import http_get  # noqa: E402

README = os.path.join(ROOT, "bench", "README.md")
BEGIN, END = "<!-- fleet-bench:begin -->", "<!-- fleet-bench:end -->"
NO_LIMITS = ["--max-names-per-key", "0", "--claim-burst", "0"]
POLL = 0.005          # how often B is asked during a block's propagation
PROPAGATION_CAP = 30  # seconds: a block slower than this is reported as lost


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def bind_latency(proxy, n: int) -> dict:
    ident = Identity.generate()
    names = [f"b{i}-{os.getpid()}.test" for i in range(n)]
    out = {}
    for phase in ("first use", "re-bind"):
        t = RawTunnel(proxy, ident)
        try:
            t.auth()
            times = []
            for name in names:
                t0 = time.perf_counter()
                resp = t.bind(name)
                times.append(time.perf_counter() - t0)
                if resp.error:
                    raise RuntimeError(f"bind of {name} refused: {resp.error}")
        finally:
            t.close()
        out[phase] = (statistics.median(times) * 1000, pct(times, 0.9) * 1000)
    return out


def post_block(proxy, name: str) -> None:
    c = http.client.HTTPConnection("127.0.0.1", proxy.ports["admin"], timeout=10)
    try:
        c.request("POST", "/api/block", body=json.dumps({"kind": "hostname", "target": name}),
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                           "Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"block answered {r.status}")
    finally:
        c.close()


def block_propagation(a, b, n: int) -> tuple:
    times = []
    for i in range(n):
        name = f"blk{i}-{os.getpid()}.test"
        post_block(a, name)
        t0 = time.perf_counter()
        while http_get(b.ports["http"], name, timeout=5)[0] != 403:
            if time.perf_counter() - t0 > PROPAGATION_CAP:
                break
            time.sleep(POLL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, max(times) * 1000


def ttfb(port: int, n: int) -> tuple:
    req = b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(req)
            if not s.recv(1):
                raise RuntimeError("no answer")
            times.append(time.perf_counter() - t0)
        finally:
            s.close()
    return statistics.median(times) * 1000, pct(times, 0.99) * 1000


def conns_per_second(port: int, seconds: float, workers: int) -> float:
    done = [0] * workers
    failed = []
    stop = time.monotonic() + seconds

    def work(i):
        for _ in range(1_000_000):  # bounded; the deadline stops it long before
            if time.monotonic() >= stop:
                return
            try:
                if http_get(port, "app.test", timeout=10)[0] == 200:
                    done[i] += 1
            except OSError as exc:
                failed.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    if failed:
        log(f"  {len(failed)} connections failed, e.g. {failed[0]!r}")
    return sum(done) / seconds


def run_store(label: str, d: str, extra: list, shared_dir: bool, args) -> dict:
    procs = []
    try:
        origin = OriginProc(d, name=f"origin-{label}")
        procs.append(origin)
        data_a = os.path.join(d, f"{label}-a")
        data_b = data_a if shared_dir else os.path.join(d, f"{label}-b")
        a = ProxyProc(d, data_a, name=f"{label}-a", extra=extra + NO_LIMITS)
        procs.append(a)
        b = ProxyProc(d, data_b, name=f"{label}-b", extra=extra + NO_LIMITS)
        procs.append(b)
        log(f"{label}: bind latency ({args.binds} names)")
        res = {"bind": bind_latency(a, args.binds)}
        log(f"{label}: block propagation A -> B ({args.blocks} blocks)")
        res["block"] = block_propagation(a, b, args.blocks)
        c = ClientProc(d, os.path.join(d, f"{label}-client"),
                       ["http:app.test", f"127.0.0.1:{origin.port}"],
                       [f"127.0.0.1:{a.ports['tunnel']}"], pins=[a.fingerprint],
                       name=f"{label}-client")
        procs.append(c)
        a.wait_bound("app.test")
        ttfb(a.ports["http"], 20)  # warm up
        log(f"{label}: TTFB ({args.ttfb} fresh connections) and connections/s")
        res["ttfb"] = ttfb(a.ports["http"], args.ttfb)
        res["cps"] = conns_per_second(a.ports["http"], args.conn_seconds, args.workers)
        return res
    finally:
        for p in reversed(procs):
            p.stop()


def median_of(runs: list) -> dict:
    """Each measurement's median over the rounds (tuples element by element)."""
    def med(values):
        if isinstance(values[0], tuple):
            return tuple(statistics.median(v) for v in zip(*values))
        return statistics.median(values)
    return {"bind": {phase: med([r["bind"][phase] for r in runs]) for phase in runs[0]["bind"]},
            "block": med([r["block"] for r in runs]), "ttfb": med([r["ttfb"] for r in runs]),
            "cps": med([r["cps"] for r in runs])}


def table(results: dict, args) -> str:
    rows = [
        ("bind, first use: p50 / p90 ms", lambda r: "%.2f / %.2f" % r["bind"]["first use"]),
        ("bind, owner's re-bind: p50 / p90 ms", lambda r: "%.2f / %.2f" % r["bind"]["re-bind"]),
        ("block A -> refused on B: p50 / max ms", lambda r: "%.0f / %.0f" % r["block"]),
        ("fresh connection TTFB: p50 / p99 ms", lambda r: "%.2f / %.2f" % r["ttfb"]),
        ("connections/s (%d threads)" % args.workers, lambda r: "%.0f" % r["cps"]),
    ]
    labels = list(results)
    lines = ["| | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for title, cell in rows:
        lines.append("| %s | %s |" % (title, " | ".join(cell(results[k]) for k in labels)))
    return "\n".join(lines)


def update_readme(block: str) -> None:
    with open(README) as f:
        text = f.read()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + block + "\n" + END + rest.split(END, 1)[1]
    else:
        text += ("\n## Fleet store: SQLite vs PostgreSQL\n\n" + BEGIN + "\n" + block + "\n"
                 + END + "\n")
    with open(README, "w") as f:
        f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--binds", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--ttfb", type=int, default=300)
    ap.add_argument("--conn-seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="shroud-fleet-bench-")
    pg = PostgresServer(fsync=True)  # SQLite commits with fsync too
    rounds = {"SQLite": [], "PostgreSQL": []}
    try:
        for r in range(args.rounds):
            rounds["SQLite"].append(run_store(f"sqlite{r}", d, [], True, args))
            url = pg.create_database()
            rounds["PostgreSQL"].append(run_store(f"postgres{r}", d, ["--database-url", url],
                                                  False, args))
    finally:
        pg.stop()
    results = {label: median_of(runs) for label, runs in rounds.items()}
    when = time.strftime("%Y-%m-%d")
    block = ("`.venv/bin/python bench/fleet_bench.py --rounds %d --binds %d --blocks %d "
             "--ttfb %d --conn-seconds %g --workers %d` on %s, %d CPUs (%s), Python %s, "
             "PostgreSQL from Debian on loopback (fsync on, as SQLite's synchronous=FULL); "
             "medians over the rounds.\n\n%s"
             % (args.rounds, args.binds, args.blocks, args.ttfb, args.conn_seconds,
                args.workers, when,
                os.cpu_count(), platform.machine(), platform.python_version(),
                table(results, args)))
    print(block)
    if not args.no_readme:
        update_readme(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
