#!/usr/bin/env python3
"""CPU per routed HTTP exchange spent framing it (lib.net.httpexchange), in-process, no I/O.

    .venv/bin/python bench/exchange_bench.py [--tree DIR] [--rounds 20000] [--repeat 5]

What a connection routed by Host costs in ``OneExchangeSocket`` alone: built on the head the
sniffer read, the request read through it as the splice reads it (until EOF), the origin's
response written through it as the splice writes it. The socket under it is an in-memory fake
(a queue of reads, writes counted), so only the framing's interpreter time is measured.
``--tree`` runs the same workloads against another checkout (e.g. a worktree of main) for a
before/after pair; the best of ``--repeat`` runs is printed (the machine is shared: the best run
is the one least disturbed), in µs per exchange.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeSocket:
    """A connected socket in memory: ``recv`` hands out the queued reads, then EOF; writes are
    counted and dropped."""

    def __init__(self, reads):
        self._reads = deque(reads)
        self.sent = 0

    def recv(self, bufsize=65536, flags=0):
        return self._reads.popleft() if self._reads else b""

    def recv_into(self, buffer, nbytes=0, flags=0):
        data = self.recv(nbytes or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def send(self, data, flags=0):
        self.sent += len(data)
        return len(data)

    def sendall(self, data, flags=0):
        self.sent += len(data)

    def shutdown(self, how):
        pass

    def close(self):
        pass

    def gettimeout(self):
        return None


GET = b"GET /small HTTP/1.1\r\nHost: one.test\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
POST = (b"POST /up HTTP/1.1\r\nHost: one.test\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 1024\r\n\r\n")
SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nHello, world\n"
KIB = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 1024
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/html\r\n\r\n",
           b"400\r\n" + b"x" * 1024 + b"\r\n", b"400\r\n" + b"y" * 1024 + b"\r\n", b"0\r\n\r\n")

# name: (head as the sniffer peeked it, the visitor's later reads, the origin's writes)
WORKLOADS = {
    "GET, 13 B answer in one write": (GET, [], [SMALL]),
    "GET, 1 KiB answer (head, body)": (GET, [], [KIB[:-1024], KIB[-1024:]]),
    "POST 1 KiB (CL), 13 B answer": (POST, [b"z" * 1024], [SMALL]),
    "GET, chunked answer in 4 writes": (GET, [], list(CHUNKED)),
}


def one_exchange(exchange_cls, head, reads, writes) -> None:
    ex = exchange_cls(FakeSocket(reads), head)
    while ex.recv(262144):
        pass
    for data in writes:
        ex.sendall(data)


def run(rounds: int) -> dict[str, float]:
    from lib.net.httpexchange import OneExchangeSocket
    results = {}
    for name, (head, reads, writes) in WORKLOADS.items():
        one_exchange(OneExchangeSocket, head, reads, writes)  # warm
        start = time.process_time()
        for _ in range(rounds):
            one_exchange(OneExchangeSocket, head, reads, writes)
        results[name] = (time.process_time() - start) / rounds * 1e6
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=ROOT, help="checkout whose lib/ to measure")
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.tree))
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, us in run(args.rounds).items():
            best[name] = min(us, best.get(name, us))
    print(f"tree {os.path.abspath(args.tree)}: µs of CPU per exchange (best of {args.repeat})")
    for name, us in best.items():
        print(f"  {name:34} {us:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
