"""What hostile peers cost a real proxy: RSS and CPU of the proxy process, and what a legitimate
visitor sees meanwhile (issue 11, items 2, 3 and 6).

    python bench/hostile_bench.py [flood|noread|preauth|slowvisitors|all] [--seconds 10]

On loopback, with the real processes: ``shroud_proxy.py``, one ``shroud.py --tor none`` serving
``http:good.test`` from tests/support/origin.py, and this process as the attackers.

- ``flood`` (item 2): ``--peers`` keyless TLS connections (``--auth``: with a key and a bound
  name) send DATA frames of one byte on stream ids the proxy never opened (each one used to
  cost a decode and a 12-byte RST), reading what comes back, for ``--seconds`` or
  ``--frames`` frames each. Meanwhile a legitimate GET every
  0.2 s. Reported: GET latency median/max, RSTs received, how the connections ended.
- ``noread`` (item 3): ``--peers`` tunnels, each with a key and a bound name, provoke RSTs with
  a 4 KiB receive buffer and never read, for ``--seconds``.
- ``preauth`` (item 3): the same without Auth.
- ``slowvisitors`` (item 6): ``--visitors`` public connections each ask for 16 MiB through the
  tunnel and never read.

Every scenario reports the proxy's RSS before, at its peak (sampled every 0.25 s) and after,
and the proxy's CPU seconds (utime + stime from /proc) spent during it. Loops are bounded by
count and time; every process started is stopped in ``finally``.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import gevent
import gevent.socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.procstat import cpu_seconds, rss_kib  # noqa: E402
from lib.identity import Identity  # noqa: E402
from lib.protocol import muxframe as fr  # noqa: E402
from tests.support.procs import ClientProc, OriginProc, ProxyProc  # noqa: E402
from tests.support.rawmux import RawPeer  # noqa: E402

GOOD = "good.test"


class Sampler:
    """The proxy's peak RSS, sampled in a greenlet."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, rss_kib(pid)
        self.g = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_kib(self.pid))
            gevent.sleep(0.25)

    def stop(self) -> int:
        self.g.kill()
        return self.peak


def good_get(port: int, timeout: float = 30.0) -> float | None:
    t0 = time.monotonic()
    try:
        s = gevent.socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(f"GET /hello HTTP/1.1\r\nHost: {GOOD}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        return time.monotonic() - t0 if b"hello from origin" in data else None
    except OSError:
        return None


def pinger(port: int, out: list, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        out.append(good_get(port))
        gevent.sleep(0.2)


# DATA of one byte on 4,096 different stream ids below 99,999, none of them open: each one a
# RST (the proxy answers once per id among the ones it answered lately).
FLOOD = b"".join(fr.encode_data(3 + 2 * i, b"x") for i in range(4096))
# Frames that provoke nothing: WNDINC on stream ids never opened below 99,999 (a decode each).
NOOP = b"".join(fr.encode(fr.WndInc(3 + 2 * i, 1)) for i in range(4096))


def flood(world, args) -> dict:
    proxy = world["proxy"]
    peers = []
    for i in range(args.peers):
        p = RawPeer(proxy.ports["tunnel"])
        if args.auth:
            p.handshake(Identity.load_or_create(os.path.join(world["dir"], f"flood-{i}")),
                        f"flood{i}.test")
        peers.append(p)
    frame = NOOP if args.noop else FLOOD
    for p in peers:
        p.start_reading()
        p.send(fr.encode(fr.Syn(99999)))  # ids below it are "closed": DATA there gets a RST
    stop_at = time.monotonic() + args.seconds
    latencies: list = []
    g = gevent.spawn(pinger, proxy.ports["http"], latencies, stop_at)
    senders = [gevent.spawn(_send_until, p, frame, args.frames, stop_at) for p in peers]
    gevent.joinall(senders + [g], timeout=args.seconds + 60)
    sent = sum(s.value or 0 for s in senders)
    closed = sum(p.wait_closed(5) for p in peers)
    rsts = sum(p.counts.get(fr.TYPE_RST, 0) for p in peers)
    goaways = [p.goaway for p in peers if p.goaway]
    for p in peers:
        p.close()
    ok = [x for x in latencies if x is not None]
    return {"frames sent": sent, "RSTs received": rsts, "closed by proxy": closed,
            "GOAWAYs": goaways[:3], "GETs": len(latencies), "GETs failed": len(latencies) - len(ok),
            "GET median ms": round(statistics.median(ok) * 1000, 1) if ok else None,
            "GET max ms": round(max(ok) * 1000, 1) if ok else None}


def _send_until(peer: RawPeer, block: bytes, limit: int, stop_at: float) -> int:
    """``block`` (4,096 frames) again and again: frames sent, at most ``limit``."""
    sent = 0
    while sent < limit and time.monotonic() < stop_at and peer.send(block):
        sent += 4096
        gevent.sleep(0)
    return sent


def noread(world, args, auth: bool) -> dict:
    proxy = world["proxy"]
    peers = []
    for i in range(args.peers):
        p = RawPeer(proxy.ports["tunnel"], rcvbuf=4096)
        if auth:
            p.handshake(Identity.load_or_create(os.path.join(world["dir"], f"noread-{i}")),
                        f"noread{i}.test")
        p.send(fr.encode(fr.Syn(99999)))
        peers.append(p)
    stop_at = time.monotonic() + args.seconds
    frame = FLOOD
    senders = [gevent.spawn(_send_until, p, frame, args.frames, stop_at) for p in peers]
    gevent.joinall(senders, timeout=args.seconds + 60)
    alive = sum(not p.closed.is_set() for p in peers)
    sent = sum(s.value or 0 for s in senders)
    before_close = rss_kib(proxy.pid)
    for p in peers:
        p.close()
    return {"frames sent": sent, "connections still open at the end": alive,
            "proxy RSS while held KiB": before_close}


def slowvisitors(world, args) -> dict:
    proxy = world["proxy"]
    socks = []
    for _ in range(args.visitors):
        s = socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=10)
        s.sendall(f"GET /bytes/16777216 HTTP/1.1\r\nHost: {GOOD}\r\n\r\n".encode())
        socks.append(s)
    # Let the proxy fill what it will: until RSS stops growing for 2 s (at most --seconds).
    deadline = time.monotonic() + args.seconds
    last, still = rss_kib(proxy.pid), 0
    while time.monotonic() < deadline and still < 8:
        gevent.sleep(0.25)
        now = rss_kib(proxy.pid)
        still = still + 1 if now - last < 256 else 0
        last = max(last, now)
    held = rss_kib(proxy.pid)
    latency = good_get(proxy.ports["http"])
    for s in socks:
        s.close()
    return {"visitors": args.visitors, "proxy RSS while held KiB": held,
            "GET during ms": None if latency is None else round(latency * 1000, 1)}


def start_world(d: str, extra: list[str]) -> dict:
    procs = []
    origin = OriginProc(d, name="origin")
    procs.append(origin)
    proxy = ProxyProc(d, os.path.join(d, "proxy-data"), extra=extra)
    procs.append(proxy)
    client = ClientProc(d, os.path.join(d, "client"), [f"http:{GOOD}", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    procs.append(client)
    proxy.wait_bound(GOOD)
    return dict(dir=d, proxy=proxy, client=client, origin=origin, procs=procs)


def run(name: str, args) -> None:
    with tempfile.TemporaryDirectory() as d:
        world = start_world(d, args.proxy_arg)
        try:
            pid = world["proxy"].pid
            good_get(world["proxy"].ports["http"])
            gevent.sleep(1)
            rss0, cpu0 = rss_kib(pid), cpu_seconds(pid)
            sampler = Sampler(pid)
            if name == "flood":
                result = flood(world, args)
            elif name in ("noread", "preauth"):
                result = noread(world, args, auth=name == "noread")
            else:
                result = slowvisitors(world, args)
            peak = sampler.stop()
            cpu = cpu_seconds(pid) - cpu0
            gevent.sleep(2)
            result.update({"proxy RSS before KiB": rss0, "peak KiB": peak,
                           "after KiB": rss_kib(pid), "peak growth MiB": round((peak - rss0) / 1024, 1),
                           "proxy CPU s": round(cpu, 2),
                           "refusals": world["proxy"].status()["refusals"]})
            print(f"## {name}")
            for k, v in result.items():
                print(f"- {k}: {v}")
            sys.stdout.flush()
        finally:
            for p in reversed(world["procs"]):
                p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default="all",
                    choices=["flood", "noread", "preauth", "slowvisitors", "all"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--frames", type=int, default=2_000_000, help="per peer, at most")
    ap.add_argument("--visitors", type=int, default=64)
    ap.add_argument("--noop", action="store_true",
                    help="flood: frames that provoke no answer (WNDINC on closed ids)")
    ap.add_argument("--auth", action="store_true",
                    help="flood: each peer authenticates with a key and binds a name first")
    ap.add_argument("--proxy-arg", action="append", default=[],
                    help="extra argument for shroud_proxy.py (repeatable)")
    args = ap.parse_args()
    names = ["flood", "noread", "preauth", "slowvisitors"] if args.scenario == "all" \
        else [args.scenario]
    for name in names:
        run(name, args)


if __name__ == "__main__":
    main()
