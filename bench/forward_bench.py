#!/usr/bin/env python3
"""Forwarding (issue 13): what a visitor pays when the instance that accepted it does not hold
the name's tunnel, served directly vs handed between workers vs carried between hosts, in ONE
run; and requests/s and proxy CPU per request with 1 and 2 gunicorn workers.

    nice -n -5 .venv/bin/python bench/forward_bench.py [--wrk-seconds 5] [--conns 32]
                                                       [--fresh 300] [--no-readme]

Real processes on loopback: bench/single_write_origin.py as the origin, clients
(`shroud.py --tor none`) binding ``http:one.test``, Debian's PostgreSQL started as
tests/fixtures/postgres.py does.

1. Throughput, one after the other: the Procfile's command (gunicorn) with WEB_CONCURRENCY=1,
   then 2; wrk at --conns connections for --wrk-seconds (every request a fresh connection: a
   routed HTTP connection carries one exchange); proxy CPU (gunicorn's master and workers, /proc)
   per request wrk counted. Then the same against two fleet hosts: wrk at A (holder, direct)
   and at B (every request carried over a fleet link to A), CPU of A and B per request. The
   cores are shared with wrk, the client and the origin: requests/s says little, CPU per
   request does not depend on that.
2. Fresh-connection TTFB (connect, GET, first response byte), interleaved: one sample of each
   path per round, --fresh rounds, so the load of the moment hits every path alike:

   path         where the visitor connects                      who serves it
   worker-direct gunicorn (2 workers), a source port the kernel  the holding worker
                 hashes (SO_REUSEPORT) to the holding worker
   via-worker   the same, a source port hashed to the other one  handed over (SCM_RIGHTS)
   host-direct  proxy A's public port (every listener of A on     A, the holder
                 127.0.0.2)
   via-host     proxy B's public port (B's on 127.0.0.3)          carried to A over the link
                                                                 (one PostgreSQL database)

   A visitor is put on a chosen worker deterministically: the kernel picks a SO_REUSEPORT
   socket by a hash of the connection's addresses, stable for a given source port. Before the
   timed rounds each candidate source port is tried once and classified by the workers'
   hand-over counters (/api/status); the rounds use ports of each class, and the counters
   are checked after them (every via-worker sample handed over, no worker-direct one).
3. Resident memory per worker (idle, one tunnel).

The added latency is reported as the difference of p50s and as their ratio. Results: a table
on stdout, progress on stderr, the machine's load average before and after; unless
--no-readme, the table goes between the forward-bench markers of bench/README.md. Every process
is stopped in a ``finally``; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.proxy_bench import (cpu_seconds, percentile,  # noqa: E402
                               rss_kib, start_single_write, wrk)
from bench.workers_bench import NAME, Host, fresh_ttfb  # noqa: E402
from tests.support.procs import ClientProc, ProxyProc, free_port  # noqa: E402

README = os.path.join(ROOT, "bench", "README.md")
BEGIN, END = "<!-- forward-bench:begin -->", "<!-- forward-bench:end -->"
# Source ports tried for the worker paths: above tests.support.procs.free_port's range (other
# engineers' listeners) and below the kernel's ephemeral range (32768-60999 here: anyone's
# outgoing connections). A port in use is skipped, then and during the rounds. Each class
# needs POOL ports; at most PORT_TRIES are tried.
PORT_BASE = 32200
POOL = 8
PORT_TRIES = 200
FLEET_BEAT = "1"     # seconds between fleet heartbeats (the rows B reads A's binding from)
READY_TIMEOUT = 60   # seconds for a host to serve the name


def log(msg: str) -> None:
    print(f"[forward-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def from_pool(port: int, sports: list, i: int) -> float:
    """fresh_ttfb from the i-th source port of ``sports``, or the next free one."""
    for k in range(len(sports)):
        try:
            return fresh_ttfb(port, sports[(i + k) % len(sports)])
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError(f"every source port of {sports} is in use")


def classify_ports(host: Host) -> tuple[list, list]:
    """Source ports the kernel hashes to the holding worker (direct) and to the other one
    (handed over), POOL of each, told apart by the hand-over counters."""
    direct, handed = [], []
    before = host.handed()
    for sport in range(PORT_BASE, PORT_BASE + PORT_TRIES):
        if len(direct) >= POOL and len(handed) >= POOL:
            break
        try:
            fresh_ttfb(host.http, sport)
        except OSError:
            continue  # the port is someone else's now
        now = host.handed()
        (handed if now > before else direct).append(sport)
        before = now
    if len(direct) < POOL or len(handed) < POOL:
        raise RuntimeError(f"{PORT_TRIES} source ports gave {len(direct)} direct and "
                           f"{len(handed)} handed-over ones")
    return direct[:POOL], handed[:POOL]


class Fleet:
    """PostgreSQL, proxies A (fleet listener on 127.0.0.2) and B (127.0.0.3), one client
    binding http:one.test on A only."""

    def __init__(self, d: str, origin: int):
        from tests.fixtures.postgres import PostgresServer
        self.procs = []
        self.pg = PostgresServer()
        try:
            url = self.pg.create_database()
            self.a, self.b = (self._proxy(d, n, ip, url) for n, ip in (("a", "127.0.0.2"),
                                                                       ("b", "127.0.0.3")))
            self.procs.append(ClientProc(d, os.path.join(d, "fleet-client"),
                                         [f"http:{NAME}", f"127.0.0.1:{origin}"],
                                         [f"{self.a.host}:{self.a.ports['tunnel']}"],
                                         pins=[self.a.fingerprint], name="fleet-client",
                                         extra=["--log-level", "warning"]))
            self.a.wait_bound(NAME, timeout=READY_TIMEOUT)
            deadline = time.monotonic() + READY_TIMEOUT
            while True:  # B serves the name once it has read A's rows
                try:
                    fresh_ttfb(self.b.ports["http"], host=self.b.host)
                    break
                except (OSError, ConnectionError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"B does not serve {NAME} after {READY_TIMEOUT} s")
                    time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def _proxy(self, d: str, n: str, ip: str, url: str) -> ProxyProc:
        p = ProxyProc(d, os.path.join(d, f"fleet-{n}"), name=f"fleet-{n}", host=ip,
                      extra=["--fleet-addr", f"{ip}:{free_port(ip)}", "--fleet-heartbeat",
                             FLEET_BEAT, "--log-level", "warning"],
                      env={"SHROUD_DATABASE_URL": url})
        self.procs.append(p)
        return p

    def pids(self) -> list:
        return [self.a.pid, self.b.pid]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.pg.stop()


def throughput(label: str, port: int, pids, args, addr: str = "127.0.0.1") -> dict:
    cpu0 = cpu_seconds(pids())
    w = wrk(None, args.conns, args.wrk_seconds, port=port, target="/small", host=NAME,
            addr=addr)
    cpu = cpu_seconds(pids()) - cpu0
    row = {"label": label, "rps": w["rps"], "errors": w["errors"], "requests": w["requests"],
           "cpu_us": cpu / max(1, w["requests"]) * 1e6}
    log(f"{label}: {row}")
    return row


def rounds(paths: dict, n: int) -> dict:
    """``n`` rounds, one sample of every path per round: {path: [seconds]}."""
    out = {k: [] for k in paths}
    for i in range(n):
        for k, sample in paths.items():
            out[k].append(sample(i))
        if (i + 1) % 50 == 0:
            log(f"{i + 1}/{n} rounds (load {loadavg()})")
    return out


def summary(samples: dict) -> dict:
    return {k: (percentile(xs, 50) * 1e3, percentile(xs, 90) * 1e3, len(xs))
            for k, xs in samples.items()}


def table(tput: list, ttfb: dict, rss: dict, loads: tuple) -> str:
    out = [f"Load average (1/5/15 min) before: {loads[0]}; after: {loads[1]}.", "",
           "| setup | requests/s | proxy CPU µs/request | errors |", "| --- | --- | --- | --- |"]
    out += [f"| {r['label']} | {r['rps']:.0f} | {r['cpu_us']:.0f} | {r['errors']} |"
            for r in tput]
    out += ["", "| path | TTFB p50 ms | p90 ms | n | added at p50 ms | ratio of p50s |",
            "| --- | --- | --- | --- | --- | --- |"]
    for path, base in (("worker-direct", None), ("via-worker", "worker-direct"),
                       ("host-direct", None), ("via-host", "host-direct")):
        p50, p90, n = ttfb[path]
        added = "-" if base is None else f"{p50 - ttfb[base][0]:+.3f}"
        ratio = "-" if base is None else f"{p50 / ttfb[base][0]:.2f}"
        out.append(f"| {path} | {p50:.3f} | {p90:.3f} | {n} | {added} | {ratio} |")
    out += ["", "Resident memory, idle, one tunnel: " + "; ".join(
        f"{k} {', '.join(f'{v:.1f}' for v in vs)} MiB" for k, vs in rss.items()) + "."]
    return "\n".join(out)


def update_readme(block: str) -> None:
    with open(README) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        log(f"no {BEGIN} markers in bench/README.md: table not written there")
        return
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(README, "w") as f:
        f.write(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def measure_workers(d: str, origin: int, args, tput: list, rss: dict) -> Host:
    """1 worker, then 2 (left running for the TTFB rounds)."""
    host = Host(d, 1, origin)
    try:
        rss["1 worker"] = [(w["rss"] or 0) / 2**20 for w in host.status().get("workers", [])]
        tput.append(throughput("gunicorn, 1 worker", host.http, host.pids, args))
    finally:
        host.stop()
    host = Host(d, 2, origin)
    try:
        rss["2 workers"] = [(w["rss"] or 0) / 2**20 for w in host.status().get("workers", [])]
        tput.append(throughput("gunicorn, 2 workers", host.http, host.pids, args))
    except BaseException:
        host.stop()
        raise
    return host


def run(d: str, args) -> str:
    loads = [loadavg()]
    log(f"load average {loads[0]}")
    origin, origin_port = start_single_write(d)
    tput, rss, host, fleet = [], {}, None, None
    try:
        host = measure_workers(d, origin_port, args, tput, rss)
        log("fleet: PostgreSQL, proxies A and B")
        fleet = Fleet(d, origin_port)
        rss["fleet A, B"] = [rss_kib([p]) / 1024 for p in fleet.pids()]
        tput.append(throughput("fleet, at A (holder)", fleet.a.ports["http"],
                               lambda: [fleet.a.pid], args, fleet.a.host))
        tput.append(throughput("fleet, at B (all via A)", fleet.b.ports["http"],
                               fleet.pids, args, fleet.b.host))
        direct, handed = classify_ports(host)
        log(f"source ports: direct {direct}, handed over {handed}")
        before = host.handed()
        samples = rounds({
            "worker-direct": lambda i: from_pool(host.http, direct, i),
            "via-worker": lambda i: from_pool(host.http, handed, i),
            "host-direct": lambda i: fresh_ttfb(fleet.a.ports["http"], host=fleet.a.host),
            "via-host": lambda i: fresh_ttfb(fleet.b.ports["http"], host=fleet.b.host),
        }, args.fresh)
        if host.handed() - before != args.fresh:
            raise RuntimeError(f"{host.handed() - before} hand-overs for {args.fresh} "
                               "via-worker samples: the source ports did not hold")
    finally:
        for x in (fleet, host, origin):
            if x is not None:
                x.stop()
    loads.append(loadavg())
    return table(tput, summary(samples), rss, tuple(loads))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wrk-seconds", type=int, default=5)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--fresh", type=int, default=300)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    d = tempfile.mkdtemp(prefix="shroud-forward-bench-")
    try:
        block = run(d, args)
    except BaseException:
        log(f"failed: the processes' logs are in {d}")
        raise
    shutil.rmtree(d, ignore_errors=True)
    print(block)
    if not args.no_readme:
        update_readme(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
