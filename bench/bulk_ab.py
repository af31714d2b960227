#!/usr/bin/env python3
"""A/B of CPU per GiB in single-connection bulk: a BASE tree against a CHANGED tree, ssh -R beside.

    nice -n -5 .venv/bin/python bench/bulk_ab.py [--base PATH | --base-rev REV] [--changed PATH]
        [--rounds 4] [--bytes 536870912] [--protos tls,http] [--no-ssh]

One nginx (bench/proxy_bench.py's: sendfile of a sparse file, HTTP and TLS), and in front of it,
side by side: ssh -R (proxy_bench's SshPath), the base tree's Shroud and the changed tree's
Shroud (proxy + client ``--tor none``, each from its own directory). ``--base-rev`` (default
``main``) is checked out as a temporary detached worktree (bench/cost_ab.py's, removed at the
end). Then ``--rounds`` times, for each protocol (``tls``: curl over HTTPS routed by SNI, passed
through; ``http``: routed by Host), one curl download of ``--bytes`` through each path, the paths
taking turns in cost_ab's order (rotated and reversed round by round).

The figure is the CPU the path burns per GiB moved: proxy + client, or the sshd tree + ssh
(/proc/PID/task/*/schedstat run time), with its user/sys split (/proc/PID/stat ticks, pooled
over rounds). MiB/s is printed too, but on a shared machine only CPU per GiB and the ratios
within a round mean much. Progress on stderr; a markdown table on stdout for bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost_ab as ab  # noqa: E402
import proxy_bench as pb  # noqa: E402

PROTOS = ("tls", "http")
LABELS = {"tls": "bulk TLS by SNI, 1 conn", "http": "bulk HTTP by Host, 1 conn"}


def log(msg: str) -> None:
    print(f"[bulk-ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(path: pb.Path, proto: str, args, ca: str) -> dict:
    """One download through one path: {'gib', 'ns', 'ut', 'st', 'mib_s'}."""
    pids = path.cpu_pids()
    c0 = ab.cpu_sample(pids)
    mib_s = pb.bulk(path, proto, 1, args.bytes, ca, args.timeout)
    c1 = ab.cpu_sample(pids)
    return {"gib": args.bytes / 2**30, "ns": c1[0] - c0[0], "ut": c1[1] - c0[1],
            "st": c1[2] - c0[2], "mib_s": mib_s}


def run_rounds(paths: list[pb.Path], args, ca: str) -> dict[str, dict[str, list[dict]]]:
    res = {proto: {p.name: [] for p in paths} for proto in args.protos}
    for rnd in range(args.rounds):
        order = ab.order_of(paths, rnd)
        log(f"round {rnd + 1}/{args.rounds}: {', '.join(p.name for p in order)}")
        for proto in args.protos:
            parts = []
            for p in order:
                m = measure(p, proto, args, ca)
                res[proto][p.name].append(m)
                parts.append(f"{p.name} {m['ns'] / 1e9 / m['gib']:.2f} s/GiB "
                             f"({m['mib_s']:.0f} MiB/s)")
            log(f"  {proto}: " + ", ".join(parts))
    return res


def summarize(ms: list[dict]) -> dict | None:
    if not ms:
        return None
    gib = sum(m["gib"] for m in ms)
    tick = 1 / pb.CLK_TCK
    per = [m["ns"] / 1e9 / m["gib"] for m in ms]
    return {"s": statistics.median(per), "per_round": per,
            "user": sum(m["ut"] for m in ms) * tick / gib,
            "sys": sum(m["st"] for m in ms) * tick / gib,
            "mib_s": statistics.median(m["mib_s"] for m in ms)}


def cell(x: dict | None) -> str:
    return "-" if x is None else f"{x['s']:.2f}"


def split(x: dict | None) -> str:
    return "-" if x is None else f"{x['user']:.2f}/{x['sys']:.2f}"


def table(res: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["| row (CPU s per GiB, median over rounds) | ssh -R | base | changed | changed/base | "
             "changed/base by round | base/ssh | changed/ssh | user/sys ssh | user/sys base | "
             "user/sys changed | MiB/s ssh / base / changed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for proto, by_path in res.items():
        s, b, c = (summarize(by_path.get(k, [])) for k in ("ssh", "base", "changed"))
        rates = " / ".join("-" if x is None else f"{x['mib_s']:.0f}" for x in (s, b, c))
        lines.append(f"| {LABELS[proto]} | {cell(s)} | {cell(b)} | {cell(c)} | "
                     f"{ab.ratio(c, b, 's')} | {ab.spread(c, b)} | {ab.ratio(b, s, 's')} | "
                     f"{ab.ratio(c, s, 's')} | {split(s)} | {split(b)} | {split(c)} | {rates} |")
    return "\n".join(lines)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ab.add_tree_args(ap)
    ap.add_argument("--bytes", type=int, default=512 << 20, help="per download")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per download")
    ap.add_argument("--protos", default=",".join(PROTOS), help="subset of " + ",".join(PROTOS))
    args = ap.parse_args()
    args.protos = [p for p in args.protos.split(",") if p]
    if not args.protos or any(p not in PROTOS for p in args.protos):
        ap.error(f"bad --protos: pick from {','.join(PROTOS)}")
    if not (1 <= args.rounds <= 100 and 1 << 20 <= args.bytes <= 16 << 30):
        ap.error("--rounds 1-100, --bytes 1 MiB-16 GiB")
    ab.check_trees(ap, args, ("nginx", "curl"), "nginx, curl")
    return args


def main() -> int:
    args = parse_args()

    def start_origin(d: str):
        nginx, http, tls, ca = pb.start_nginx(d, args.bytes)
        return nginx, (http, tls, http), ca

    def run(paths: list[pb.Path], ca: str) -> dict:
        for p in paths:  # warm: the first stream, the first connection to the origin
            for proto in args.protos:
                pb.bulk(p, proto, 1, args.bytes, ca, args.timeout)
        return run_rounds(paths, args, ca)

    return ab.run_ab(args, "bulk_ab", log, start_origin, run, table,
                     f"{args.rounds} rounds of {args.bytes >> 20} MiB per path and protocol")


if __name__ == "__main__":
    ab.run_main("bulk_ab", main)
