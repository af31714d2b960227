#!/usr/bin/env python3
"""CPU per keep-alive exchange in one process, both halves of Shroud's path: an A/B of two trees.

    nice -n -5 .venv/bin/python bench/ka_exchange.py --base DIR [--changed DIR] [--rounds 6]
                                                     [--exchanges 20000] [--streams 1]

The path of tests/test_keepalive_path.py: a visitor's TCP connection spliced to a mux stream of
a server session (the proxy's side, with the idle timer), over TLS on TCP to a client session
whose stream is spliced to the origin's TCP connection (the client's side). The bench's greenlet
plays visitor and origin: it writes a request, reads it at the origin, writes the answer, reads
it at the visitor, ``--exchanges`` times (``--streams`` such connections at once: each round
trip writes one request on every connection, then answers each). CPU is the process's user and
system time (getrusage) over the exchanges, so the load's own socket calls are in both trees
alike. The trees take turns, the order reversed every round; one child process per tree and
round (the tree's lib/ and tests/support/ imported). Prints the median µs per exchange of each
tree, changed/base, and round by round.

Against bench/cost_ab.py: no wrk, no second process, no scheduler between two processes: the
noise of the shared cores falls on both trees alike in the same seconds, and a change of a
few percent in the Python of the path shows (bench/README.md, "Per-request cost (issue 16)",
branch kaone). What it leaves out: the cross-process wake-ups, the proxy's byte meters
(lib.proxy.registry.Meter), the client's counters.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST = b"GET /small HTTP/1.1\r\nHost: one.test\r\n\r\n"
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
          b"hello, world\n")


def child(exchanges: int, streams: int) -> None:
    """In a tree's directory: the path, warmed, then ``exchanges`` timed; prints µs each."""
    sys.path.insert(0, os.getcwd())
    import gevent
    import ssl
    import trustme
    import gevent.ssl

    from lib.net.splice import splice
    from tests.support.muxpair import Pki, session_pair, tcp_pair, tls_pair

    ca = trustme.CA()
    server = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("tunnel.test").configure_cert(server)
    client = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    client_tls, proxy_tls = tls_pair(Pki(server, client, ca), sockets=tcp_pair())
    csess, psess = session_pair((client_tls, proxy_tls), heartbeat=False)
    ends = []
    for _ in range(streams):
        visitor, public = tcp_pair()
        origin, local = tcp_pair()
        gevent.spawn(splice, public, psess.open(), idle_timeout=60)
        visitor.sendall(b"hello")
        gevent.spawn(splice, csess.accept(timeout=5), local)
        assert origin.recv(100) == b"hello"
        ends.append((visitor, origin))

    def run(n: int) -> None:
        for _ in range(n):
            for visitor, _ in ends:
                visitor.sendall(REQUEST)
            for _, origin in ends:
                got = origin.recv(1000)
                while len(got) < len(REQUEST):
                    got += origin.recv(1000)
                origin.sendall(ANSWER)
            for visitor, _ in ends:
                got = visitor.recv(1000)
                while len(got) < len(ANSWER):
                    got += visitor.recv(1000)
    run(200)  # past the feeders' first reads (lib.net.splice.FEED_AFTER), warm
    rounds = max(1, exchanges // streams)
    before = resource.getrusage(resource.RUSAGE_SELF)
    run(rounds)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{cpu * 1e6 / (rounds * streams):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the base source tree")
    ap.add_argument("--changed", default=ROOT, help="the changed tree (default: this one)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--exchanges", type=int, default=20000, help="per tree and round")
    ap.add_argument("--streams", type=int, default=1, help="connections at once")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.exchanges, args.streams)
        return 0
    trees = {"base": os.path.abspath(args.base), "changed": os.path.abspath(args.changed)}
    res: dict[str, list[float]] = {"base": [], "changed": []}
    for rnd in range(args.rounds):
        order = ["base", "changed"] if rnd % 2 == 0 else ["changed", "base"]
        for name in order:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", "--base", "-",
                 "--exchanges", str(args.exchanges), "--streams", str(args.streams)],
                cwd=trees[name], capture_output=True, text=True, timeout=600,
                stdin=subprocess.DEVNULL)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr}")
            res[name].append(float(out.stdout.split()[-1]))
        print(f"round {rnd + 1}: base {res['base'][-1]:.2f}, changed {res['changed'][-1]:.2f} "
              f"µs per exchange ({res['changed'][-1] / res['base'][-1]:.3f})", flush=True)
    b, c = statistics.median(res["base"]), statistics.median(res["changed"])
    ratios = [x / y for x, y in zip(res["changed"], res["base"])]
    print(f"streams {args.streams}: base {b:.2f}, changed {c:.2f} µs per exchange: "
          f"changed/base {c / b:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
