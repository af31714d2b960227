#!/usr/bin/env python3
"""Through Tor: a public visitor of Shroud against a visitor of a v3 onion service, same origin.

    ./bench/run_tor_bench.sh [--conns 10] [--rtts 50] [--bulk-mib 16] [--starts 3] [--no-readme]

(root; the script enters a private network namespace holding only loopback, brings lo up and
turns delayed ACKs off on it, as scripts/test.sh does, then runs this file). Everything happens
in one run on 127.0.0.0/8:

- a private Tor network (:class:`lib.testnet.TorNetwork`, 3 authorities + 2 exits), started here;
- one origin: ``tests/support/origin.py`` (plain HTTP/1.1 keep-alive: ``/hello``, ``/bytes/N``);
- **Shroud**: ``shroud_proxy.py`` on loopback, ``shroud.py --tor launch --tor-config
  client.torrc`` exposing ``http:bench.test`` through it; the visitor connects straight to the
  proxy's public HTTP port (no Tor on the visitor's side: that is Shroud's point);
- **onion**: a service tor with ephemeral v3 onion services (ADD_ONION via stem's
  ``create_ephemeral_hidden_service``) of the same origin, and a visitor tor whose SOCKS port
  the visitor uses (PySocks, remote names), as a visitor of an onion service must.

Measured (medians; min and p90 in the table):

- fresh connection, time to first byte: connect, one small GET (``Connection: close``), first
  response byte. Shroud: to the proxy. Onion, cold: a new onion each time (descriptor fetch,
  introduction, rendezvous). Onion, cached: the same onion with new SOCKS credentials each time
  (descriptor cached, new rendezvous circuit).
- request round trip on an open connection (``--rtts`` small keep-alive GETs on one connection);
- bulk MiB/s: one GET of ``--bulk-mib`` MiB on one connection;
- client start to first served request: from starting ``shroud.py`` (fresh data dir: its tor
  bootstraps from nothing) to the first 200 a visitor gets through the proxy (``--starts`` runs).

Ratios reported: Shroud fresh-connection TTFB / onion TTFB (goal <= 0.1) and Shroud request RTT /
onion RTT (goal <= 0.6). Results: progress lines on stderr, a table on stdout and (unless
``--no-readme``) the table between the tor-bench markers of bench/README.md's section
"Through Tor: Shroud vs onion service".

No monkey-patching: the bench uses blocking sockets, threads (stem's) and subprocesses. Every
process started here is stopped in a ``finally``; every wait is bounded.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import socks  # noqa: E402  (PySocks; after sys.path so the venv's copy is used)

from lib.testnet import TorNetwork  # noqa: E402
from lib.client.tor import launch_tor  # noqa: E402
from lib.net.sockets import set_nodelay  # noqa: E402
from tests.support.procs import Proc, admin_status, free_port, wait_port  # noqa: E402

PY = sys.executable
README = os.path.join(ROOT, "bench", "README.md")
BEGIN, END = "<!-- tor-bench:begin -->", "<!-- tor-bench:end -->"
NAME = "bench.test"
SMALL = "/hello"  # 18-byte body
# One response head fits in this; reads use it as their size.
READ_SIZE = 65536
# Per-operation timeouts: a cold onion connection took up to 1.9 s in the notes (p90 0.85 s);
# 30 s only bounds a stuck path. Bulk: 16 MiB at >= 0.5 MiB/s.
OP_TIMEOUT = 30.0
BULK_TIMEOUT = 120.0
# Network start is 14-23 s; client bootstrap ~2.3 s (occasionally 12 s): notes a, b.
NETWORK_TIMEOUT = 120.0
TOR_TIMEOUT = 60.0
# ADD_ONION -> published ≈ 1.2 s (notes d); 60 s covers a slow machine.
PUBLISH_TIMEOUT = 60.0
# Pitfall 12: connecting the instant the first descriptor upload lands can 404; the rest of the
# uploads follow within ~0.06 s.
AFTER_PUBLISH_PAUSE = 0.3
# A failed onion connection is retried this many times with new credentials (testnet pitfalls 11
# and 12, docs/DESIGN.md); failures are counted and reported.
ONION_RETRIES = 2


def log(msg: str) -> None:
    print(f"tor_bench: {msg}", file=sys.stderr, flush=True)


# --- HTTP on plain sockets ------------------------------------------------------------------


def request(path: str, host: str, keep_alive: bool) -> bytes:
    conn = "keep-alive" if keep_alive else "close"
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n".encode()


def read_response(sock: socket.socket, first: bytes = b"", limit: int = 1 << 30) -> int:
    """Read one 200 response with a Content-Length body; returns the body length."""
    buf = first
    while b"\r\n\r\n" not in buf:
        data = sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError(f"connection closed mid-response: {buf[:200]!r}")
        buf += data
        if len(buf) > READ_SIZE and b"\r\n\r\n" not in buf:
            raise ConnectionError("response head too long")
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer: {head[:200]!r}")
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    want = int(m.group(1)) if m else 0
    if want > limit:
        raise ConnectionError(f"body of {want} bytes is over the limit")
    got = len(body)
    while got < want:
        data = sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError(f"connection closed mid-body ({got} of {want})")
        got += len(data)
    return got


class Visitor:
    """Opens connections to one site: directly to a proxy port, or through a tor's SOCKS port."""

    def __init__(self, host: str, port: int, socks_port: int | None = None):
        self.host, self.port, self.socks_port = host, port, socks_port

    def connect(self, isolation: str = "v", timeout: float = OP_TIMEOUT) -> socket.socket:
        if self.socks_port is None:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        else:
            s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
            s.set_proxy(socks.SOCKS5, "127.0.0.1", self.socks_port, rdns=True,
                        username=isolation, password="bench")
            s.settimeout(timeout)
            s.connect((self.host, self.port))
        set_nodelay(s)
        s.settimeout(timeout)
        return s

    def ttfb(self, isolation: str) -> float:
        """Seconds from connect() to the first response byte of a small GET."""
        t0 = time.perf_counter()
        s = self.connect(isolation)
        try:
            s.sendall(request(SMALL, self.host if self.socks_port else NAME, keep_alive=False))
            first = s.recv(READ_SIZE)
            took = time.perf_counter() - t0
            read_response(s, first)
            return took
        finally:
            s.close()

    def rtts(self, n: int, isolation: str) -> list[float]:
        s = self.connect(isolation)
        req = request(SMALL, self.host if self.socks_port else NAME, keep_alive=True)
        out = []
        try:
            s.sendall(req)  # warm: the first request may pay for stream set-up
            read_response(s)
            for _ in range(n):
                t0 = time.perf_counter()
                s.sendall(req)
                read_response(s)
                out.append(time.perf_counter() - t0)
        finally:
            s.close()
        return out

    def bulk(self, nbytes: int, isolation: str) -> float:
        """MiB/s of one GET of nbytes, from the request to the last byte."""
        s = self.connect(isolation, timeout=BULK_TIMEOUT)
        try:
            s.sendall(request(SMALL, self.host if self.socks_port else NAME, keep_alive=True))
            read_response(s)  # the connection is established end to end
            t0 = time.perf_counter()
            s.sendall(request(f"/bytes/{nbytes}", self.host if self.socks_port else NAME, True))
            got = read_response(s, limit=nbytes)
            took = time.perf_counter() - t0
        finally:
            s.close()
        if got != nbytes:
            raise ConnectionError(f"bulk: got {got} of {nbytes} bytes")
        return nbytes / took / (1 << 20)


# --- the two paths ---------------------------------------------------------------------------


class Shroud:
    """shroud_proxy.py on loopback; shroud.py over the private Tor network exposing bench.test."""

    def __init__(self, d: str, origin_port: int, client_torrc: str):
        self.d, self.origin_port, self.client_torrc = d, origin_port, client_torrc
        pdata = os.path.join(d, "proxy-data")
        out = subprocess.run([PY, "shroud_proxy.py", "--data-dir", pdata, "--print-fingerprint"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"shroud_proxy.py --print-fingerprint failed: {out.stderr}")
        self.pin = out.stdout.strip()
        self.tunnel, self.http, self.https, self.admin = (free_port() for _ in range(4))
        self.token = secrets.token_hex(16)
        self.proxy = Proc("proxy", [
            PY, "shroud_proxy.py", "--data-dir", pdata, "--tunnel-addr", f"127.0.0.1:{self.tunnel}",
            "--https-addr", f"127.0.0.1:{self.https}", "--http-addr", f"127.0.0.1:{self.http}",
            "--admin-addr", f"127.0.0.1:{self.admin}", "--admin-token", self.token,
            "--log-level", "warning"], d)
        self.client: Proc | None = None
        self.starts = 0
        try:
            wait_port(self.tunnel)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"proxy did not start:\n{self.proxy.log()[-3000:]}") from None

    def start_client(self) -> float:
        """(Re)start the client with a fresh data dir; seconds until a visitor gets a 200."""
        if self.client is not None:
            self.client.stop(10)
            self.wait_unbound(30)
        self.starts += 1
        # One identity (the proxy keeps bench.test for the key that bound it first), but a fresh
        # tor state each time: every start bootstraps from nothing.
        cdata = os.path.join(self.d, "client-data")
        shutil.rmtree(os.path.join(cdata, "tor"), ignore_errors=True)
        t0 = time.monotonic()
        self.client = Proc(f"client-{self.starts}", [
            PY, "shroud.py", "--tor", "launch", "--tor-config", self.client_torrc,
            "--tor-timeout", str(TOR_TIMEOUT), "--data-dir", cdata, "--status", "plain",
            "--proxy", f"127.0.0.1:{self.tunnel}", "--pin", self.pin,
            f"http:{NAME}", f"127.0.0.1:{self.origin_port}"], self.d)
        deadline = t0 + TOR_TIMEOUT + OP_TIMEOUT
        visitor = Visitor(NAME, self.http)
        while time.monotonic() < deadline:
            if not self.client.alive():
                raise RuntimeError(f"client exited:\n{self.client.log()[-3000:]}")
            try:
                visitor.ttfb("start")
                return time.monotonic() - t0
            except (OSError, ConnectionError):
                time.sleep(0.02)  # 20 ms polling: fine against a ~3 s start
        raise RuntimeError(f"no request served {TOR_TIMEOUT + OP_TIMEOUT:g} s after the client "
                           f"started:\n{self.client.log()[-3000:]}")

    def wait_unbound(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = admin_status(self.admin, self.token, timeout=5)
            if not st.get("tunnels"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"the old tunnel is still registered after {timeout} s")

    def visitor(self) -> Visitor:
        return Visitor(NAME, self.http)

    def stop(self) -> None:
        for p in (self.client, self.proxy):
            if p is not None:
                p.stop(10)


class Onion:
    """A service tor publishing ephemeral v3 onions of the origin; a visitor tor to reach them."""

    def __init__(self, d: str, origin_port: int, net: TorNetwork):
        self.origin_port = origin_port
        lines = net.client_torrc_lines()
        self.service = launch_tor(os.path.join(d, "service-tor"), lines, timeout=TOR_TIMEOUT)
        self.visitor_tor = None
        try:
            self.visitor_tor = launch_tor(os.path.join(d, "visitor-tor"), lines,
                                          timeout=TOR_TIMEOUT)
        except BaseException:
            self.service.close()
            raise
        self.onions: list[str] = []
        self.failures = 0

    def publish(self) -> tuple[str, float]:
        """A new onion of the origin; (address, seconds from ADD_ONION to published)."""
        t0 = time.monotonic()
        resp = self.service.controller.create_ephemeral_hidden_service(
            {80: self.origin_port}, key_type="NEW", key_content="ED25519-V3",
            await_publication=True, timeout=PUBLISH_TIMEOUT)
        took = time.monotonic() - t0
        self.onions.append(resp.service_id)
        time.sleep(AFTER_PUBLISH_PAUSE)
        return resp.service_id + ".onion", took

    def visitor(self, address: str) -> Visitor:
        return Visitor(address, 80, self.visitor_tor.socks_address[1])

    def ttfb(self, address: str, isolation: str) -> float:
        for attempt in range(ONION_RETRIES + 1):
            try:
                return self.visitor(address).ttfb(f"{isolation}-{attempt}")
            except (OSError, ConnectionError, socks.ProxyError) as e:
                self.failures += 1
                log(f"onion connection to {address} failed ({e}); retrying")
                time.sleep(1.0)
        raise RuntimeError(f"{address} unreachable after {ONION_RETRIES + 1} attempts")

    def stop(self) -> None:
        for sid in self.onions:
            try:
                self.service.controller.remove_ephemeral_hidden_service(sid)
            except Exception:  # noqa: BLE001  best effort: the tor stops next anyway
                pass
        if self.visitor_tor is not None:
            self.visitor_tor.close()
        self.service.close()


# --- statistics and report ----------------------------------------------------------------


def summary(xs: list[float]) -> dict:
    s = sorted(xs)
    return {"median": statistics.median(s), "min": s[0],
            "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))], "n": len(s)}


def fmt_ms(st: dict) -> str:
    return f"{st['median'] * 1000:.1f} ({st['min'] * 1000:.1f} / {st['p90'] * 1000:.1f})"


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1).strip() if m else ""
    except OSError:
        pass
    tor = subprocess.run(["tor", "--version"], capture_output=True, text=True).stdout
    tor = (re.search(r"Tor version ([^\s]+?)\.?\s", tor) or [None, "?"])[1]
    return (f"{os.cpu_count()} CPUs ({cpu or platform.machine()}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, tor {tor}")


def quickack_on() -> bool:
    out = subprocess.run(["ip", "route", "show", "table", "local"], capture_output=True,
                         text=True).stdout
    return "quickack 1" in out


def report(r: dict, args) -> str:
    s, o = r["shroud"], r["onion"]
    rows = [
        ("fresh connection, time to first byte", "ms",
         fmt_ms(s["ttfb"]), f"cold {fmt_ms(o['ttfb_cold'])}; cached {fmt_ms(o['ttfb_cached'])}",
         f"{s['ttfb']['median'] / o['ttfb_cold']['median']:.3f} (cold), "
         f"**{s['ttfb']['median'] / o['ttfb_cached']['median']:.3f}** (cached)", "<= 0.1"),
        ("small request round trip, open connection", "ms", fmt_ms(s["rtt"]), fmt_ms(o["rtt"]),
         f"**{s['rtt']['median'] / o['rtt']['median']:.3f}**", "<= 0.6"),
        ("reference: the same round trip over a bare 3-hop exit circuit (visitor's tor to the "
         "origin, no Shroud)", "ms", fmt_ms(r["exit_rtt"]), "-", "-", "-"),
        (f"bulk, one GET of {args.bulk_mib} MiB", "MiB/s", f"{s['bulk']:.1f}", f"{o['bulk']:.1f}",
         f"{s['bulk'] / o['bulk']:.2f}", "-"),
        ("client start to first served request (fresh tor data dir)", "s",
         f"{s['start']['median']:.2f} ({s['start']['min']:.2f} / {s['start']['p90']:.2f})",
         f"ADD_ONION to published: {o['publish']['median']:.2f}", "-", "-"),
    ]
    ttfb_goal = s["ttfb"]["median"] / o["ttfb_cached"]["median"] <= 0.1
    rtt_goal = s["rtt"]["median"] / o["rtt"]["median"] <= 0.6
    lines = [
        f"`./bench/run_tor_bench.sh --conns {args.conns} --rtts {args.rtts} --bulk-mib "
        f"{args.bulk_mib} --starts {args.starts}` on {datetime.date.today().isoformat()}, "
        f"{machine()}; private network of 3 authorities + 2 exits on loopback, delayed ACKs "
        f"{'off (quickack routes)' if quickack_on() else 'ON (stock loopback)'}, tor's default "
        f"KIST scheduler. Medians, (min / p90) in brackets; {args.conns} connections per TTFB "
        f"cell, {args.rtts} round trips per RTT cell; {r['onion_failures']} failed onion "
        f"connection(s) retried; whole run {r['seconds']:.0f} s.",
        "",
        "| measure | unit | Shroud (visitor direct to proxy, client over Tor) | onion service "
        "(visitor through its tor) | Shroud / onion | goal |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} | {f} |" for a, b, c, d, e, f in rows]
    lines += ["", f"Goals: TTFB ratio (vs the cached onion, the stricter) "
                  f"{'met' if ttfb_goal else '**missed**'}; RTT ratio "
                  f"{'met' if rtt_goal else '**missed**'}."]
    return "\n".join(lines)


def write_readme(table: str) -> None:
    with open(README) as f:
        text = f.read()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Through Tor: Shroud vs onion service\n\n" + block + "\n"
    with open(README, "w") as f:
        f.write(text)
    log(f"wrote {README}")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=10, help="fresh connections per TTFB cell")
    ap.add_argument("--rtts", type=int, default=50, help="round trips per RTT cell")
    ap.add_argument("--bulk-mib", type=int, default=16, help="MiB per bulk GET")
    ap.add_argument("--starts", type=int, default=3, help="client starts to time")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    for n in ("conns", "rtts", "bulk_mib", "starts"):
        if not 1 <= getattr(args, n) <= 1000:
            ap.error(f"--{n.replace('_', '-')} must be 1..1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("SHROUD_IN_NETNS") != "1":
        log("WARNING: not inside run_tor_bench.sh's network namespace: the exits accept any "
            "address; run ./bench/run_tor_bench.sh (as root) instead")

    # SIGTERM (e.g. from timeout(1)) unwinds like Ctrl-C, so the finally below stops everything.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"tor_bench: signal {signum}"))
    t_all = time.monotonic()
    d = tempfile.mkdtemp(prefix="tor-bench-")
    net = TorNetwork(os.path.join(d, "net"), log=lambda line: log(line))
    parts = []  # origin, Shroud, onion: stopped in reverse order
    try:
        r = run(args, d, net, parts)
        r["seconds"] = time.monotonic() - t_all
    finally:
        for part in reversed(parts):
            try:
                part.stop()
            except Exception as e:  # noqa: BLE001  keep stopping the rest
                log(f"stopping {part}: {e}")
        net.stop()
        if args.keep:
            log(f"work directory kept: {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)

    table = report(r, args)
    print(table)
    if not args.no_readme:
        write_readme(table)
    return 0


def run(args, d: str, net: TorNetwork, parts: list) -> dict:
    """Start everything (appending to ``parts``), then measure each cell; the results dict."""
    log("starting the private Tor network (about 20 s)")
    net.start(timeout=NETWORK_TIMEOUT)
    origin_port = free_port()
    parts.append(Proc("origin", [PY, "tests/support/origin.py", "--port", str(origin_port)], d))
    wait_port(origin_port)

    shroud = Shroud(d, origin_port, net.client_torrc_path)
    parts.append(shroud)
    starts = []
    for i in range(args.starts):
        starts.append(shroud.start_client())
        log(f"client start {i + 1}/{args.starts}: first request served after "
            f"{starts[-1]:.2f} s")
    sv = shroud.visitor()

    log("starting the onion service's tor and the visitor's tor")
    onion = Onion(d, origin_port, net)
    parts.append(onion)
    main_onion, took = onion.publish()
    onion.ttfb(main_onion, "warm")  # fetch its descriptor once: the "cached" cells
    log(f"onion {main_onion} published in {took:.2f} s")

    r = {"shroud": {}, "onion": {}}
    measure_ttfb(args, sv, onion, main_onion, [took], r)
    measure_rtt_and_bulk(args, sv, onion, main_onion, origin_port, r)
    r["shroud"]["start"] = summary(starts)
    r["onion_failures"] = onion.failures
    return r


def measure_ttfb(args, sv, onion, main_onion: str, publish: list, r: dict) -> None:
    log(f"fresh-connection TTFB, {args.conns} each")
    st, oc, ocold = [], [], []
    for i in range(args.conns):
        st.append(sv.ttfb(f"s{i}"))
        oc.append(onion.ttfb(main_onion, f"cached-{i}-{secrets.token_hex(4)}"))
        address, took = onion.publish()
        publish.append(took)
        ocold.append(onion.ttfb(address, f"cold-{i}"))
        log(f"  {i + 1}/{args.conns}: Shroud {st[-1] * 1000:.1f} ms, onion cached "
            f"{oc[-1] * 1000:.1f} ms, cold {ocold[-1] * 1000:.1f} ms")
    r["shroud"]["ttfb"], r["onion"]["ttfb_cached"] = summary(st), summary(oc)
    r["onion"]["ttfb_cold"], r["onion"]["publish"] = summary(ocold), summary(publish)


def measure_rtt_and_bulk(args, sv, onion, main_onion: str, origin_port: int, r: dict) -> None:
    log(f"round trips on an open connection, {args.rtts} each")
    r["shroud"]["rtt"] = summary(sv.rtts(args.rtts, "rtt"))
    r["onion"]["rtt"] = summary(onion.visitor(main_onion).rtts(args.rtts, "rtt"))
    bare = Visitor("127.0.0.1", origin_port, onion.visitor_tor.socks_address[1])
    r["exit_rtt"] = summary(bare.rtts(args.rtts, "bare"))
    log(f"  Shroud {r['shroud']['rtt']['median'] * 1000:.1f} ms, onion "
        f"{r['onion']['rtt']['median'] * 1000:.1f} ms, bare 3-hop exit circuit "
        f"{r['exit_rtt']['median'] * 1000:.1f} ms")

    nbytes = args.bulk_mib << 20
    log(f"bulk, {args.bulk_mib} MiB each")
    r["shroud"]["bulk"] = sv.bulk(nbytes, "bulk")
    r["onion"]["bulk"] = onion.visitor(main_onion).bulk(nbytes, "bulk")
    log(f"  Shroud {r['shroud']['bulk']:.1f} MiB/s, onion {r['onion']['bulk']:.1f} MiB/s")


if __name__ == "__main__":
    sys.exit(main())
