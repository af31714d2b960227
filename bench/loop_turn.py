#!/usr/bin/env python3
"""What one wake-up of an event loop costs in this Python, apart from Shroud.

    nice -n -5 .venv/bin/python bench/loop_turn.py [--rounds 4] [--seconds 3]

Shroud at one keep-alive connection costs each process ~4x its CPU per request at 64 (bench/README.md
"The cost of a loop turn, and the collector"): at one connection every request wakes each process
twice, at 64 one wake-up serves ~18 requests. This prices a wake-up without Shroud's code, with the
same wrk load at ``-c 1`` and ``-c 64`` against three servers on loopback, taking turns each round:

    selectors   bench/single_write_origin.py: one epoll loop, plain non-blocking sockets
    gevent      the same answers from a gevent StreamServer, one greenlet per connection
    forward     a gevent forwarder (bench/gevent_relay.py: two greenlets per connection
                copying, as a splice does) in front of the selectors origin: its own CPU only

Each server's CPU per request comes from /proc/PID/task/*/schedstat (run time in ns), the median
over rounds. One wake-up per request per server at ``-c 1`` (two for the forwarder: the request
and the answer). Read the ratios: the machine is shared.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def serve_gevent(port: int) -> None:
    """The single-write origin's answers from gevent: one greenlet per connection."""
    from gevent import monkey

    monkey.patch_all()
    from gevent.server import StreamServer

    from single_write_origin import HEAD_LIMIT, answer

    def handle(sock, _addr):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            out, close = [], False
            while b"\r\n\r\n" in buf and not close:
                head, _, buf = buf.partition(b"\r\n\r\n")
                resp, close = answer(head)
                out.append(resp)
            if len(buf) > HEAD_LIMIT:
                return
            sock.send(b"".join(out))  # ~100 bytes: the kernel takes them whole
            if close:
                return

    StreamServer(("127.0.0.1", port), handle, backlog=4096).serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def wrk(port: int, conns: int, seconds: int) -> int:
    argv = ["wrk", "-t", "1" if conns == 1 else "2", "-c", str(conns), "-d", f"{seconds}s",
            f"http://127.0.0.1:{port}/small"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"(\d+) requests in", out.stdout)
    if out.returncode or not m:
        raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
    return int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--serve-gevent", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_gevent:
        serve_gevent(args.serve_gevent)
        return 0
    if not (1 <= args.rounds <= 50 and 1 <= args.seconds <= 60):
        p.error("--rounds 1-50, --seconds 1-60")
    ports = {k: free_port() for k in ("selectors", "gevent", "forward")}
    me = [sys.executable, os.path.abspath(__file__)]
    procs = {
        "selectors": subprocess.Popen([sys.executable, os.path.join(ROOT, "bench",
                                       "single_write_origin.py"), str(ports["selectors"])]),
        "gevent": subprocess.Popen(me + ["--serve-gevent", str(ports["gevent"])]),
        "forward": subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "gevent_relay.py"),
                                     str(ports["forward"]), str(ports["selectors"])]),
    }
    results: dict = {}
    try:
        for port in ports.values():
            wait_port(port)
        order = list(ports)
        for r in range(args.rounds):
            for conns in (1, 64):
                for name in order:
                    pid = procs[name].pid
                    wrk(ports[name], conns, 1) if r == 0 else None  # warm once
                    ns0 = run_ns(pid)
                    n = wrk(ports[name], conns, args.seconds)
                    us = (run_ns(pid) - ns0) / n / 1e3
                    results.setdefault((name, conns), []).append(us)
                    print(f"[loop-turn] round {r + 1} {name} c={conns}: {us:.1f} us per request",
                          file=sys.stderr, flush=True)
            order.reverse()
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(5)
    print(f"`bench/loop_turn.py --rounds {args.rounds} --seconds {args.seconds}`, load average "
          f"{os.getloadavg()[0]:.1f}; µs of CPU per request (median over rounds):\n")
    print("| server | 1 conn | 64 conns | 1 / 64 |")
    print("| --- | ---: | ---: | ---: |")
    for name in ports:
        one = statistics.median(results[(name, 1)])
        many = statistics.median(results[(name, 64)])
        print(f"| {name} | {one:.1f} | {many:.1f} | {one / many:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
