#!/usr/bin/env python3
"""A/B of CPU per request: a BASE tree against a CHANGED tree, with ssh -R as the yardstick.

    nice -n -5 .venv/bin/python bench/cost_ab.py [--base PATH | --base-rev REV] [--changed PATH]
        [--rounds 4] [--seconds 3] [--fresh-conns 300]
        [--rows ka1,ka64,ka64k,host64,fresh,freshtcp] [--no-ssh] [--relay]

One single-write origin (bench/single_write_origin.py), and in front of it, side by side: ssh -R
(our own sshd, bench/proxy_bench.py's SshPath), the base tree's Shroud and the changed tree's
Shroud (proxy + client ``--tor none``, proxy_bench's ShroudPath run from each tree's directory
with this venv's python). ``--base-rev`` (default ``main``) checks the revision out as a
temporary detached ``git worktree`` (removed at the end, also on an error or Ctrl-C);
``--changed`` defaults to the tree this file is in. Then, ``--rounds`` times, every row on every
path, the paths taking turns in an order rotated and reversed each round, so load drift on a
shared machine falls on all of them alike. ``--relay`` adds two paths, each two plain gevent
forwarders in a chain (bench/gevent_relay.py, proxy_bench's RelayPath): ``relay``, written as
gevent forwarders are (greenlets), and ``lean``, watcher callbacks only: the floor of what two
gevent processes cost with none of Shroud's work (no TLS, no multiplexer, no routing).

Rows (Shroud's port / ssh's port; ssh has no Host routing, it forwards one port):

    ka1       keep-alive 13 B, wrk -c 1            tcp: bind    / its forward
    ka64      keep-alive 13 B, wrk -c 64           tcp: bind    / its forward
    ka64k     keep-alive 1 KiB, wrk -c 64          tcp: bind    / its forward
    host64    a fresh connection per request,      by Host      / its forward
              wrk -c 64 -H "Connection: close"
    fresh     serial fresh connections (TTFB)      by Host      / its forward
    freshtcp  serial fresh connections (TTFB)      tcp: bind    / its forward

The figure is the CPU the path burns per request (per connection for fresh rows): proxy +
client, or the sshd tree + ssh. The total comes from /proc/PID/task/*/schedstat (run time in
ns), the user/sys split from /proc/PID/stat (utime, stime: CLK_TCK ticks, 10 ms, so the split
is summed over all rounds before dividing). Totals are medians over rounds; ``changed/base``
also gets its range over rounds, the tool's noise floor. Read CPU and ratios, never req/s: the
machine is shared. Progress on stderr; a markdown table on stdout for bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402

ROWS = ("ka1", "ka64", "ka64k", "host64", "fresh", "freshtcp")
LABELS = {
    "ka1": "keep-alive 13 B, 1 conn",
    "ka64": "keep-alive 13 B, 64 conns",
    "ka64k": "keep-alive 1 KiB, 64 conns",
    "host64": "a fresh connection per request, 64 conns",
    "fresh": "serial fresh connections, by Host",
    "freshtcp": "serial fresh connections, tcp: bind",
}
# row -> (wrk connections, target, port kind); None connections: serial fresh connections
WRK_ROWS = {"ka1": (1, "/small", "ka"), "ka64": (64, "/small", "ka"),
            "ka64k": (64, "/1k", "ka"), "host64": (64, "/small", "host")}
FRESH_ROWS = {"fresh": "host", "freshtcp": "ka"}
CLOSE = ("Connection: close",)


def log(msg: str) -> None:
    print(f"[cost-ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- CPU of a set of processes ---------------------------------------------------------------


def cpu_sample(pids) -> tuple[int, int, int]:
    """(run ns from schedstat summed over every thread, utime ticks, stime ticks)."""
    ns = ut = st = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone: its CPU is lost to this sample, as it is to /proc
        fields = stat[stat.rfind(b")") + 2:].split()
        ut, st = ut + int(fields[11]), st + int(fields[12])
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    ns += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return ns, ut, st


def tcp_opens() -> int:
    """This network namespace's TCP ActiveOpens (connect() calls), from /proc/net/snmp."""
    with open("/proc/net/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("ActiveOpens")])


# --- one measurement --------------------------------------------------------------------------


def port_of(path: pb.Path, kind: str) -> int:
    """ssh forwards one port; Shroud's by-Host port routes ``one.test``, its tcp: bind the rest."""
    if kind == "host" and isinstance(path, pb.ShroudPath):
        return path.one_http_port
    return path.one_port


def measure(path: pb.Path, row: str, args) -> dict:
    """One row on one path: {'n': requests or connections, 'ns', 'ut', 'st', ...}."""
    pids = path.cpu_pids()
    opens0 = tcp_opens()
    c0 = cpu_sample(pids)
    out: dict = {}
    if row in WRK_ROWS:
        conns, target, kind = WRK_ROWS[row]
        w = pb.wrk(path, conns, args.seconds, port=port_of(path, kind), target=target,
                   host=pb.ONE_NAME, headers=CLOSE if kind == "host" else ())
        out.update(n=w["requests"], errors=w["errors"], rps=w["rps"])
    else:
        req = pb.request_bytes(keep_alive=False, target="/small", host=pb.ONE_NAME)
        xs = pb.ttfb_samples(port_of(path, FRESH_ROWS[row]), args.fresh_conns, req=req)
        out.update(n=len(xs), errors=0, ttfb=statistics.median(xs) * 1e3)
    c1 = cpu_sample(pids)
    out.update(ns=c1[0] - c0[0], ut=c1[1] - c0[1], st=c1[2] - c0[2],
               opens=tcp_opens() - opens0)
    return out


def warm(path: pb.Path, rows: list[str]) -> None:
    for row in rows:
        if row in WRK_ROWS:
            conns, target, kind = WRK_ROWS[row]
            pb.wrk(path, conns, 1, port=port_of(path, kind), target=target, host=pb.ONE_NAME,
                   headers=CLOSE if kind == "host" else ())
        else:
            req = pb.request_bytes(keep_alive=False, target="/small", host=pb.ONE_NAME)
            pb.ttfb_samples(port_of(path, FRESH_ROWS[row]), 20, req=req)


def order_of(paths: list, rnd: int) -> list:
    """Reversed every other round, rotated one place every two: over 2 x len(paths) rounds
    (two paths: every 2) each path takes each place equally often, after each of the others."""
    k = (rnd // 2) % len(paths)
    order = paths[k:] + paths[:k]
    return order[::-1] if rnd % 2 else order


def run_rounds(paths: list[pb.Path], args) -> dict[str, dict[str, list[dict]]]:
    """results[row][path name] = one measurement per round."""
    res: dict[str, dict[str, list[dict]]] = {r: {p.name: [] for p in paths} for r in args.rows}
    for rnd in range(args.rounds):
        order = order_of(paths, rnd)
        log(f"round {rnd + 1}/{args.rounds}: {', '.join(p.name for p in order)}")
        for row in args.rows:
            parts = []
            for p in order:
                m = measure(p, row, args)
                res[row][p.name].append(m)
                parts.append(f"{p.name} {m['ns'] / 1e3 / max(1, m['n']):.1f}"
                             + (f" ({m['errors']} errors)" if m["errors"] else ""))
                if row == "host64":  # wrk must reconnect for every request
                    parts[-1] += f" [{m['opens'] / max(1, m['n']):.2f} connects/req]"
            log(f"  {row}: µs CPU per {'conn' if row in FRESH_ROWS else 'req'}: "
                + ", ".join(parts) + ("; connects/req: 2 expected (the load's and the path's "
                                      "to the origin)" if row == "host64" else ""))
    return res


# --- the table --------------------------------------------------------------------------------


def summarize(ms: list[dict]) -> dict | None:
    """Median µs per request over rounds (schedstat), user and sys µs pooled over the rounds
    (ticks), and the median TTFB for fresh rows."""
    if not ms:
        return None
    n = sum(m["n"] for m in ms)
    tick_us = 1e6 / pb.CLK_TCK
    out = {"us": statistics.median(m["ns"] / 1e3 / max(1, m["n"]) for m in ms),
           "user": sum(m["ut"] for m in ms) * tick_us / max(1, n),
           "sys": sum(m["st"] for m in ms) * tick_us / max(1, n),
           "per_round": [m["ns"] / 1e3 / max(1, m["n"]) for m in ms]}
    if "ttfb" in ms[0]:
        out["ttfb"] = statistics.median(m["ttfb"] for m in ms)
    return out


def ratio(a: dict | None, b: dict | None, key: str = "us") -> str:
    return "-" if a is None or b is None or not b[key] else f"{a[key] / b[key]:.2f}"


def spread(a: dict | None, b: dict | None) -> str:
    """min-max over rounds of a/b, round by round (the same round's two measurements)."""
    if a is None or b is None:
        return "-"
    rs = [x / y for x, y in zip(a["per_round"], b["per_round"]) if y]
    return f"{min(rs):.2f}-{max(rs):.2f}" if rs else "-"


def cell(s: dict | None) -> str:
    return "-" if s is None else f"{s['us']:.1f}"


def split(s: dict | None) -> str:
    return "-" if s is None else f"{s['user']:.0f}/{s['sys']:.0f}"


def table(res: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["| row (µs CPU per request; fresh rows per connection) | ssh -R | base | changed | "
             "changed/base | changed/base by round | base/ssh | changed/ssh | user/sys ssh | "
             "user/sys base | user/sys changed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row, by_path in res.items():
        s, b, c = (summarize(by_path.get(k, [])) for k in ("ssh", "base", "changed"))
        lines.append(f"| {LABELS[row]} | {cell(s)} | {cell(b)} | {cell(c)} | {ratio(c, b)} | "
                     f"{spread(c, b)} | {ratio(b, s)} | {ratio(c, s)} | {split(s)} | {split(b)} | "
                     f"{split(c)} |")
        if row in FRESH_ROWS and b is not None:
            t = [f"{x['ttfb']:.2f}" if x else "-" for x in (s, b, c)]
            lines.append(f"| {LABELS[row]}: TTFB p50 ms | {t[0]} | {t[1]} | {t[2]} | "
                         f"{ratio(c, b, 'ttfb')} | - | {ratio(b, s, 'ttfb')} | "
                         f"{ratio(c, s, 'ttfb')} | | | |")
    if any(by_path.get("relay") for by_path in res.values()):
        lines += ["", "The floor (`--relay`): two plain gevent forwarders in a chain "
                  "(bench/gevent_relay.py), with greenlets (relay) and with watcher callbacks "
                  "only (lean).", "",
                  "| row | ssh -R | relay | lean | changed | relay/ssh | lean/ssh | changed/lean | "
                  "user/sys ssh | user/sys relay | user/sys lean | user/sys changed |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                  "---: |"]
        for row, by_path in res.items():
            s, r, n, c = (summarize(by_path.get(k, []))
                          for k in ("ssh", "relay", "lean", "changed"))
            lines.append(f"| {LABELS[row]} | {cell(s)} | {cell(r)} | {cell(n)} | {cell(c)} | "
                         f"{ratio(r, s)} | {ratio(n, s)} | {ratio(c, n)} | {split(s)} | "
                         f"{split(r)} | {split(n)} | {split(c)} |")
            if row in FRESH_ROWS and r is not None:
                t = [f"{x['ttfb']:.2f}" if x else "-" for x in (s, r, n, c)]
                lines.append(f"| {LABELS[row]}: TTFB p50 ms | {t[0]} | {t[1]} | {t[2]} | {t[3]} | "
                             f"{ratio(r, s, 'ttfb')} | {ratio(n, s, 'ttfb')} | "
                             f"{ratio(c, n, 'ttfb')} | | | | |")
    return "\n".join(lines)


# --- trees and main ---------------------------------------------------------------------------


def git(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", pb.ROOT, *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def add_worktree(rev: str, d: str) -> str:
    """A detached worktree of ``rev`` with this tree's .venv linked in."""
    path = os.path.join(d, "base-tree")
    out = git("worktree", "add", "--detach", path, rev)
    if out.returncode:
        raise SystemExit(f"cost_ab: --base-rev {rev}: git worktree add failed: "
                         f"{out.stderr.strip()}")
    venv = os.path.join(pb.ROOT, ".venv")
    if os.path.exists(venv):
        os.symlink(os.path.realpath(venv), os.path.join(path, ".venv"))
    return path


def remove_worktree(path: str) -> None:
    out = git("worktree", "remove", "--force", path)
    if out.returncode:
        log(f"git worktree remove {path} failed: {out.stderr.strip()}; pruning")
        shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune")


def describe(tree: str) -> str:
    out = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %s"], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    head = out.stdout.strip()[:60] or "?"
    return head + (" + uncommitted changes" if dirty.stdout.strip() else "")


def start_paths(d: str, http: int, tls: int, one: int, base: str, changed: str,
                ssh: bool, relay: bool = False) -> list[pb.Path]:
    """ssh -R (unless not ``ssh``), then Shroud from the base and the changed tree, each in front
    of the origin's ``http``, ``tls`` and ``one`` ports (pb.Path's three), and with ``relay`` the
    two gevent forwarders in front of ``one``; all stopped on error."""
    paths: list[pb.Path] = []
    try:
        if ssh:
            paths.append(pb.SshPath(d, http, tls, one))
        for name, root in (("base", base), ("changed", changed)):
            paths.append(pb.ShroudPath(d, http, tls, one, root=root, name=name))
        if relay:
            paths += [pb.RelayPath(d, one), pb.RelayPath(d, one, lean=True)]
    except BaseException:
        for p in paths:
            p.stop()
        raise
    return paths


def add_tree_args(ap: argparse.ArgumentParser) -> None:
    """The A/B tools' common flags: the two trees, the rounds and ssh -R (bulk_ab.py too)."""
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--base", help="the base source tree (a directory)")
    g.add_argument("--base-rev", default="main",
                   help="a revision checked out as a temporary worktree (default main)")
    ap.add_argument("--changed", default=pb.ROOT, help="the changed tree (default: this one)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="an even number: the paths' order is reversed every other round")
    ap.add_argument("--no-ssh", action="store_true", help="leave ssh -R out")


def check_trees(ap: argparse.ArgumentParser, args, tools: tuple[str, ...], packages: str) -> None:
    """One clear line (ap.error) for a tree that is not Shroud's, ssh -R without root, or a tool
    missing; ``tools`` beside git and ssh's own, ``packages`` the Debian ones to name."""
    for flag, tree in (("--base", args.base), ("--changed", args.changed)):
        if tree is not None and not os.path.isfile(os.path.join(tree, "shroud_proxy.py")):
            ap.error(f"{flag} {tree}: no shroud_proxy.py there (give a Shroud source tree)")
    if not args.no_ssh and os.geteuid() != 0:
        ap.error("the ssh -R yardstick starts its own sshd: run as root, or pass --no-ssh")
    for tool in tools + ("git",) + (() if args.no_ssh else ("ssh", "sshd", "ssh-keygen")):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            ap.error(f"{tool} not found (Debian packages {packages}, git, openssh-server)")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tree_args(ap)
    ap.add_argument("--seconds", type=int, default=3, help="per wrk row, path and round")
    ap.add_argument("--fresh-conns", type=int, default=300, help="per fresh row, path and round")
    ap.add_argument("--rows", default=",".join(ROWS), help="subset of " + ",".join(ROWS))
    ap.add_argument("--relay", action="store_true",
                    help="add two chains of two plain gevent forwarders (the floor)")
    args = ap.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    if not args.rows or any(r not in ROWS for r in args.rows):
        ap.error(f"bad --rows: pick from {','.join(ROWS)}")
    if not (1 <= args.rounds <= 100 and 1 <= args.seconds <= 600
            and 1 <= args.fresh_conns <= 100000):
        ap.error("--rounds 1-100, --seconds 1-600, --fresh-conns 1-100000")
    check_trees(ap, args, ("wrk",), "wrk")
    return args


def on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def run_ab(args, tool: str, log: Callable[[str], None], start_origin: Callable, run: Callable,
           table: Callable, what: str, relay: bool = False) -> int:
    """The frame of an A/B run (this tool's and bulk_ab.py's): a temporary directory, the base
    tree (a temporary worktree of ``--base-rev`` unless ``--base``), the origin, the paths in
    front of it, then ``run(paths, origin_extra) -> results``; every process is stopped and the
    worktree removed at the end, on an error and on Ctrl-C or SIGTERM too. On stdout: a header
    line (the command, the machine, its load, ``what`` was run, the trees) and ``table(results)``.

    ``start_origin(d) -> (process with stop(), (http, tls, one) ports, extra for run)``;
    ``relay``: the two gevent forwarder chains beside them (cost_ab's ``--relay``).
    """
    # SIGTERM ends the run like Ctrl-C does: through the finally blocks that stop every
    # process and remove the temporary worktree.
    signal.signal(signal.SIGTERM, on_sigterm)
    d = tempfile.mkdtemp(prefix=f"shroud-{tool.replace('_', '-')}-")
    wt = origin = None
    paths: list[pb.Path] = []
    started = time.time()
    try:
        base = args.base or (wt := add_worktree(args.base_rev, d))
        changed = os.path.abspath(args.changed)
        how = f"--base {base}" if args.base else f"--base-rev {args.base_rev}"
        head = f"base {describe(base)} ({how}); changed {describe(changed)} ({changed})"
        log(head)
        origin, ports, extra = start_origin(d)
        paths = start_paths(d, *ports, os.path.abspath(base), changed, not args.no_ssh, relay)
        res = run(paths, extra)
    finally:
        for p in paths:
            p.stop()
        if origin is not None:
            origin.stop()
        if wt is not None:
            remove_worktree(wt)
        shutil.rmtree(d, ignore_errors=True)
    cmd = f"bench/{tool}.py " + " ".join(sys.argv[1:])
    print(f"`{cmd.strip()}` on {time.strftime('%Y-%m-%d %H:%M')}, {pb.machine()}, load average "
          f"{os.getloadavg()[0]:.1f}; {what}, {(time.time() - started) / 60:.1f} min. {head}.\n")
    print(table(res))
    return 0


def run_main(tool: str, main: Callable[[], int]) -> None:
    """``sys.exit(main())``; Ctrl-C (or SIGTERM, see run_ab) ends it with one line and 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"{tool}: interrupted; processes stopped, worktree removed", file=sys.stderr)
        sys.exit(130)


def main() -> int:
    args = parse_args()

    def start_origin(d: str):
        proc, port = pb.start_single_write(d)
        return proc, (port, port, port), None

    def run(paths: list[pb.Path], _) -> dict:
        for p in paths:
            warm(p, args.rows)
        log("warmed: " + ", ".join(p.name for p in paths))
        return run_rounds(paths, args)

    return run_ab(args, "cost_ab", log, start_origin, run, table,
                  f"{args.rounds} rounds, {args.seconds} s per wrk row, {args.fresh_conns} fresh "
                  f"connections per fresh row", relay=args.relay)


if __name__ == "__main__":
    run_main("cost_ab", main)
