#!/usr/bin/env python3
"""What one keep-alive request costs in each process, counted: proxy + client ``--tor none`` (this
tree, bench/proxy_bench.py's ShroudPath) in front of the single-write origin, one connection,
requests one after another (cost_ab's ka1 row).

    .venv/bin/python bench/percall.py [--requests 5000] [--opcodes | --lines] [--strace | --perf
        | --cpu] [--top 30] [--fresh host|tcp [--concurrency 1]] [--root TREE]

Default: Python calls by function, C calls by name (``sys.setprofile``) and greenlet switches
per request in each process, by bench/percall_probe/sitecustomize.py (loaded through PYTHONPATH,
turned on and off by signals around the counted requests). ``--opcodes``: Python calls and
bytecodes per request (``sys.settrace``, slower). ``--strace``: system calls per request
(``strace -c -f -p``; run as root). ``--perf``: where each process's CPU goes, per request
(``perf record -F 999 -p``, then ``perf report --sort dso`` and the top symbols of every
shared object, the kernel's included): µs of user and system time per request from /proc (so
perf's own cost is in them), split by the samples' shares, for the processes as they run,
untraced. ``--lines``: Python calls and lines executed by function, and lines by file (``sys.settrace``). ``--fresh host``: a fresh connection per request instead,
one after another (cost_ab's fresh row: by Host; ``tcp``: its freshtcp row, the tcp: bind), the
figures per connection; ``--concurrency N``: N visitors at once, each one connection after
another (N threads here), to set the same code's cost run back to back against its cost when
each connection runs alone. ``--cpu``: only µs of user and system time per request from /proc,
untraced (the figure ``--lines`` counts are divided into). ``--root``: the tree whose proxy and client run (another worktree, for
a before/after). Counts, not time: the machine may be shared (bench/README.md, "Per-request
cost (issue 16)", branch ka3; branch fclient2 for ``--fresh`` and ``--lines``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "percall_probe")
REQUEST = b"GET /small HTTP/1.1\r\nHost: one.test\r\n\r\n"
FRESH_REQUEST = b"GET /small HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n"
BODY = b"hello, world\n"  # the origin's /small


def request(sock: socket.socket) -> None:
    sock.sendall(REQUEST)
    got = b""
    while not got.endswith(BODY):
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("the path closed the connection")
        got += data


def fresh_request(port: int) -> None:
    """One fresh connection by Host or through the tcp: bind (the request asks to close)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        pb.set_nodelay(sock)
        sock.sendall(FRESH_REQUEST)
        got = b""
        while data := sock.recv(4096):  # the path closes after the answer; bounded by timeout
            got += data
        if not got.endswith(BODY):
            raise ConnectionError(f"unexpected answer: {got[:200]!r}")
    finally:
        sock.close()


def run_requests(one, concurrency: int, n: int) -> None:
    """``one()`` n times in all, from ``concurrency`` threads at once; the first error ends it."""
    if concurrency == 1:
        for _ in range(n):
            one()
        return
    left = iter(range(n))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def visitor() -> None:
        while not errors:
            with lock:
                if next(left, None) is None:
                    return
            try:
                one()
            except BaseException as e:  # noqa: BLE001 - reported below, once
                errors.append(e)
    threads = [threading.Thread(target=visitor) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def report(name: str, counts: dict, n: int, top: int) -> None:
    calls = sum(c for _, c in counts["calls"])
    line = f"{name}: Python calls {calls / n:.2f}"
    if counts.get("lines"):
        line += f", lines {sum(c for _, c in counts['lines']) / n:.1f}"
    if counts["ccalls"]:
        line += f", C calls {sum(c for _, c in counts['ccalls']) / n:.2f}"
    if counts["opcodes"]:
        line += f", bytecodes {counts['opcodes'] / n:.1f}"
    print(f"{line}, greenlet switches {counts['switches'] / n:.2f} per request")
    for label, rows in (("Python", counts["calls"]), ("C", counts["ccalls"]),
                        ("lines", counts.get("lines", ())), ("file", counts.get("files", ()))):
        for what, c in rows[:top]:
            if c / n >= 0.01:
                print(f"  {label:6} {c / n:7.3f}  {what}")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def perf_shares(data: str, *sort: str) -> list[tuple[float, str]]:
    """(percent of samples, name) rows of ``perf report --sort ...`` on ``data``."""
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "-q", "--sort", ",".join(sort)],
                         capture_output=True, text=True, timeout=300).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("%"):
            rows.append((float(parts[0][:-1]), " ".join(parts[1:])))
    return rows


def perf_report(name: str, data: str, before: tuple, after: tuple, n: int, top: int) -> None:
    """µs of CPU per request by where the samples fell: shared objects, then the top symbols
    of all of them (the interpreter's, the kernel's, the libraries')."""
    tick = 1e6 / os.sysconf("SC_CLK_TCK")
    user, system = ((a - b) * tick / n for a, b in zip(after, before))
    total = user + system
    print(f"{name}: {total:.1f} µs CPU per request (user {user:.1f}, system {system:.1f}; "
          f"perf's own cost included), by shared object:")
    for share, dso in perf_shares(data, "dso")[:top]:
        if share >= 0.5:
            print(f"  {share:5.1f} %  {total * share / 100:6.1f} µs  {dso}")
    print(f"  {name}'s top symbols:")
    for share, sym in perf_shares(data, "dso", "sym")[:top]:
        print(f"  {share:5.1f} %  {total * share / 100:6.1f} µs  {sym}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--opcodes", action="store_true")
    ap.add_argument("--lines", action="store_true")
    ap.add_argument("--fresh", choices=("host", "tcp"))
    ap.add_argument("--root", default=pb.ROOT)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    if args.concurrency < 1 or (args.concurrency > 1 and not args.fresh):
        ap.error("--concurrency N: N >= 1, with --fresh (one keep-alive connection is serial)")
    d = tempfile.mkdtemp(prefix="percall-")
    out = os.path.join(d, "counts")
    if sum((args.strace, args.perf, args.cpu)) > 1:
        ap.error("--strace, --perf, --cpu: one at a time (each would count the other's cost)")
    if not (args.strace or args.perf or args.cpu):
        pb.ShroudPath.env = {"PYTHONPATH": PROBE, "PERCALL_OUT": out,
                             **({"PERCALL_OPCODES": "1"} if args.opcodes else {}),
                             **({"PERCALL_LINES": "1"} if args.lines else {})}
    origin, port = pb.start_single_write(d)
    path = None
    tracers = []
    try:
        path = pb.ShroudPath(d, port, port, port, root=os.path.abspath(args.root))
        pids = {"proxy": path.proxy.pid, "client": path.client.pid}
        if args.fresh:
            fresh_port = path.one_http_port if args.fresh == "host" else path.one_port
            sock = None
            one = partial(fresh_request, fresh_port)
        else:
            sock = socket.create_connection(("127.0.0.1", path.one_port), timeout=10)
            pb.set_nodelay(sock)
            one = partial(request, sock)
        run = partial(run_requests, one, args.concurrency)
        run(args.warmup)
        if args.strace:
            for name, pid in pids.items():
                tracers.append((name, subprocess.Popen(
                    ["strace", "-c", "-f", "-p", str(pid), "-o", os.path.join(d, name)])))
            time.sleep(1.0)  # attached
        elif args.perf:
            for name, pid in pids.items():
                tracers.append((name, subprocess.Popen(
                    ["perf", "record", "-q", "-F", "999", "-p", str(pid),
                     "-o", os.path.join(d, name + ".perf")],
                    stdout=subprocess.DEVNULL,  # its messages in a file: a pipe unread may fill
                    stderr=open(os.path.join(d, name + ".perf.err"), "w"))))
            time.sleep(1.0)  # attached
            for name, tracer in tracers:  # refused (perf_event_paranoid, not root): say so
                if tracer.poll() is not None:
                    with open(os.path.join(d, name + ".perf.err")) as f:
                        why = f.read().strip()[-300:]
                    sys.exit(f"percall: perf record on the {name} failed: {why} (run as root, "
                             "or lower /proc/sys/kernel/perf_event_paranoid)")
        if args.perf or args.cpu:
            cpu_before = {name: cpu_ticks(pid) for name, pid in pids.items()}
        if not (args.strace or args.perf or args.cpu):
            for pid in pids.values():
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.3)
        started = time.monotonic()
        run(args.requests)
        took = time.monotonic() - started
        if args.cpu:
            tick = 1e6 / os.sysconf("SC_CLK_TCK")
            for name, pid in pids.items():
                user, system = ((a - b) * tick / args.requests
                                for a, b in zip(cpu_ticks(pid), cpu_before[name]))
                print(f"{name}: {user + system:.1f} µs CPU per request (user {user:.1f}, "
                      f"system {system:.1f}), {args.requests} requests, concurrency "
                      f"{args.concurrency}, {args.requests / took:.0f}/s")
        elif args.perf:
            cpu_after = {name: cpu_ticks(pid) for name, pid in pids.items()}
            for name, tracer in tracers:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(60)
            for name, _ in tracers:
                if not os.path.exists(os.path.join(d, name + ".perf")):
                    sys.exit(f"percall: perf record on the {name} wrote no samples")
                perf_report(name, os.path.join(d, name + ".perf"), cpu_before[name],
                            cpu_after[name], args.requests, args.top)
        elif args.strace:
            for name, tracer in tracers:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(10)
            for name, _ in tracers:
                print(f"== {name}, {args.requests} requests")
                with open(os.path.join(d, name)) as f:
                    print(f.read())
        else:
            for pid in pids.values():
                os.kill(pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            for name, pid in pids.items():
                path_json = f"{out}.{pid}.json"
                while not os.path.exists(path_json) and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.2)  # written whole
                with open(path_json) as f:
                    report(name, json.load(f), args.requests, args.top)
        if sock is not None:
            sock.close()
    finally:
        for _, tracer in tracers:
            if tracer.poll() is None:
                tracer.kill()
        if path is not None:
            path.stop()
        origin.stop()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
