#!/usr/bin/env python3
"""CPU a real proxy spends peeking at a hostile public connection's first bytes.

    .venv/bin/python bench/sniff_cpu.py [--connections 2]

Starts ``shroud_proxy.py`` on loopback and, on its https listener, sends a ClientHello split
into 1-byte TLS records, up to the 20 KiB peek bound (MAX_TLS_PEEK), one record per send
(TCP_NODELAY, a short pause between sends so that the proxy reads them apart); then, on its
http listener, a 16 KiB request head one byte per send. Prints the proxy process's CPU time
(user + system, from /proc) for each, per connection. Issue 11 item 12: the sniffer used to
re-walk every record on each read (6-7 s per connection); an incremental one is linear.
Every connection is bounded in bytes; the proxy is stopped in a ``finally``.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.procstat import cpu_seconds  # noqa: E402
from lib.net.sockets import set_nodelay  # noqa: E402
from tests.support.procs import ProxyProc  # noqa: E402

MAX_TLS_PEEK = 20480
MAX_HTTP_HEAD = 16384


def hostile_hello_records() -> list[bytes]:
    """A ClientHello header announcing a body that, in 1-byte records, fills the peek bound."""
    n_records = MAX_TLS_PEEK // 6
    hello = bytes([1]) + (n_records - 4).to_bytes(3, "big") + b"\x03\x03" + b"\x00" * (n_records - 6)
    return [b"\x16\x03\x01\x00\x01" + hello[i:i + 1] for i in range(len(hello))]


def hostile_http_bytes() -> list[bytes]:
    head = b"GET /" + b"a" * (MAX_HTTP_HEAD - 6)
    return [head[i:i + 1] for i in range(len(head))]


def send_slowly(port: int, pieces: list[bytes], pause: float) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    set_nodelay(s)
    try:
        for p in pieces:
            s.sendall(p)
            time.sleep(pause)
    except OSError:
        pass  # the proxy refused at its bound: that is the end of this connection's cost
    finally:
        s.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--pause", type=float, default=0.0002)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proxy = ProxyProc(d, os.path.join(d, "data"), extra=["--peek-timeout", "120"])
        try:
            for kind, port, pieces in (("tls", proxy.ports["https"], hostile_hello_records()),
                                       ("http", proxy.ports["http"], hostile_http_bytes())):
                for i in range(a.connections):
                    before = cpu_seconds(proxy.pid)
                    t0 = time.monotonic()
                    send_slowly(port, pieces, a.pause)
                    time.sleep(0.5)  # let the proxy finish with the last reads
                    spent = cpu_seconds(proxy.pid) - before
                    print(f"{kind}: {len(pieces)} sends of {sum(map(len, pieces))} bytes: "
                          f"proxy CPU {spent:.2f} s (wall {time.monotonic() - t0:.1f} s)",
                          flush=True)
        finally:
            proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
