#!/usr/bin/env python3
"""What one keep-alive request costs in each process, counted: proxy + client ``--tor none`` (this
tree, bench/proxy_bench.py's ShroudPath) in front of the single-write origin, one connection,
requests one after another (cost_ab's ka1 row).

    .venv/bin/python bench/percall.py [--requests 5000] [--opcodes | --lines] [--strace] [--top 30]
        [--fresh host|tcp] [--root TREE]

Default: Python calls by function, C calls by name (``sys.setprofile``) and greenlet switches
per request in each process, by bench/percall_probe/sitecustomize.py (loaded through PYTHONPATH,
turned on and off by signals around the counted requests). ``--opcodes``: Python calls and
bytecodes per request (``sys.settrace``, slower). ``--strace``: system calls per request
(``strace -c -f -p``; run as root). ``--lines``: Python calls and lines executed by function,
and lines by file (``sys.settrace``). ``--fresh host``: a fresh connection per request instead,
one after another (cost_ab's fresh row: by Host; ``tcp``: its freshtcp row, the tcp: bind), the
figures per connection. ``--root``: the tree whose proxy and client run (another worktree, for
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--opcodes", action="store_true")
    ap.add_argument("--lines", action="store_true")
    ap.add_argument("--fresh", choices=("host", "tcp"))
    ap.add_argument("--root", default=pb.ROOT)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="percall-")
    out = os.path.join(d, "counts")
    if not args.strace:
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
        for _ in range(args.warmup):
            one()
        if args.strace:
            for name, pid in pids.items():
                tracers.append((name, subprocess.Popen(
                    ["strace", "-c", "-f", "-p", str(pid), "-o", os.path.join(d, name)])))
            time.sleep(1.0)  # attached
        else:
            for pid in pids.values():
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.3)
        for _ in range(args.requests):
            one()
        if args.strace:
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
