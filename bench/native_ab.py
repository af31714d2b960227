#!/usr/bin/env python3
"""Compiled vs pure-Python codec modules in the real processes: CPU per request, A/B.

    .venv/bin/python bench/native_ab.py [--rounds 8] [--conns 64] [--seconds 4] [--by-host]

Starts two Shroud paths side by side (bench/proxy_bench.py's: proxy + client --tor none in front
of the single-write origin), one on the compiled build and one with SHROUD_PURE=1 (lib/native.py),
then runs wrk against each in turn, alternating which goes first, and reports the CPU (user+sys
of proxy+client, /proc) per request of every round and the medians. Keep-alive through the tcp:
bind, or with --by-host a fresh connection per request (http: routed by Host). Taking turns
within one run keeps a shared machine's load out of the ratio as far as it can be.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="wrk runs per build")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=4, help="per wrk run")
    ap.add_argument("--by-host", action="store_true", help="a fresh connection per request")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="native-ab-")
    one, origin = pb.start_single_write(d)
    paths: list[pb.ShroudPath] = []
    cpu: dict[str, list[float]] = {"shroud": [], "shroud-pure": []}
    try:
        paths = [pb.ShroudPath(d, 1, 1, origin), pb.ShroudPurePath(d, 1, 1, origin)]
        port = (lambda p: p.one_http_port) if args.by_host else (lambda p: p.one_port)
        for p in paths:  # warm both
            pb.wrk(p, args.conns, 1, port=port(p), target="/small", host=pb.ONE_NAME)
        for r in range(args.rounds):
            for p in (paths if r % 2 == 0 else paths[::-1]):
                pids = p.cpu_pids()
                c0 = pb.cpu_seconds(pids)
                w = pb.wrk(p, args.conns, args.seconds, port=port(p), target="/small",
                           host=pb.ONE_NAME)
                us = (pb.cpu_seconds(pids) - c0) / max(1, w["requests"]) * 1e6
                cpu[p.name].append(us)
                pb.log(f"{p.name}: {w['rps']:.0f} req/s, {us:.1f} µs CPU per request")
    finally:
        for p in paths:
            p.stop()
        one.stop()
        shutil.rmtree(d, ignore_errors=True)
    for name, xs in cpu.items():
        print(f"{name}: median {statistics.median(xs):.1f} µs per request "
              f"({' '.join(f'{x:.1f}' for x in xs)})")
    print(f"compiled / pure: "
          f"{statistics.median(cpu['shroud']) / statistics.median(cpu['shroud-pure']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
