"""Load and soak: many public connections through one tunnel, many names, many requests.

    python bench/load.py [--concurrency 1000] [--names 100] [--requests 100000]
                         [--per-connection 10] [--settle 15] [--timeout 900] [--origin nginx]
                         [--env KEY=VALUE ...] [--warmup N] [--smaps]

On loopback with the real processes: one ``shroud_proxy.py``, one ``shroud.py --tor none``
binding ``--names`` plain-HTTP names (``http:h<i>.load.test``) over its single tunnel, and a fast
origin (Debian's nginx with a generated config in a temp dir, answering each request with the
Host it saw; ``--origin python`` uses tests/support/origin.py instead). This process is the
public: ``--concurrency`` gevent workers, each holding one keep-alive connection to the proxy's
HTTP port at a time, sending ``--per-connection`` requests on it, then reconnecting under the
next name, until ``--requests`` requests in all have been answered. Every response is checked
(status 200, body = the Host asked for, so a mis-route is an error).

Reported: errors by kind (goal none), request latency p50/p90/p99/max, requests/s, the peak of
streams open on the tunnel, and RSS and open file descriptors of the proxy and the client
sampled every second from /proc (goal: flat, and back within 10 % of the starting level once
the load ends and ``--settle`` seconds have passed). Ends with a Markdown table and a text
series for bench/README.md.

Memory experiments: ``--env`` sets variables for the proxy and the client only (e.g.
``PYTHONMALLOC=malloc`` and ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2``),
``--warmup N`` takes a second baseline after N sequential requests (lazy imports, first-use
caches), ``--smaps`` shows where the resident memory is (glibc heap, anonymous mmaps such as
CPython's 1 MiB object arenas, files) at the start and after each settle.

Every loop is bounded by count and time: each worker sends a fixed number of requests, each
request has a socket timeout, and the whole load phase a ``--timeout``. Every process started
is stopped in ``finally``.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.procstat import rss_kib, fd_count  # noqa: E402
from tests.support.procs import ClientProc, OriginProc, Proc, ProxyProc, free_port, \
    wait_port  # noqa: E402

DOMAIN = "load.test"
# A response is a short head plus the host name; 64 KiB is far more than any answer we expect,
# so a runaway response is an error, not an unbounded buffer.
MAX_RESPONSE = 64 * 1024
REQUEST_TIMEOUT = 30.0  # per request; a stall longer than this is an error, not a wait
SAMPLE_EVERY = 1.0
PROGRESS_EVERY = 5.0

NGINX_CONF = """\
daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{ default_type text/plain; return 200 "$host\\n"; }}
    }}
}}
"""


class NginxOrigin(Proc):
    def __init__(self, logdir: str):
        self.port = free_port()
        conf_dir = os.path.join(logdir, "nginx")
        os.makedirs(conf_dir, exist_ok=True)
        conf = os.path.join(conf_dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=conf_dir, port=self.port))
        argv = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", conf, "-p", conf_dir]
        if os.geteuid() == 0:
            argv += ["-g", "user root;"]  # workers must read the temp dir we made
        super().__init__("nginx", argv, logdir)
        wait_port(self.port)


# --- /proc sampling (rss_kib, fd_count: bench/procstat.py) ------------------------------------
def smaps_breakdown(pid: int) -> dict:
    """Resident KiB of a process by kind of mapping, from /proc/PID/smaps: ``heap`` (glibc's
    main arena, brk), ``anon`` (anonymous mmaps: CPython's 1 MiB object arenas, glibc's large
    blocks and thread arenas, thread stacks), ``file`` (the interpreter, shared libraries and
    other files), ``stack``, plus ``anon_maps`` (how many anonymous mappings are resident)."""
    out = collections.Counter()
    kind = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                fields = line.split()
                path = fields[5] if len(fields) > 5 else ""
                if path == "[heap]":
                    kind = "heap"
                elif path.startswith("[stack"):
                    kind = "stack"
                elif path.startswith("["):
                    kind = "other"
                elif path:
                    kind = "file"
                else:
                    kind = "anon"
            elif first == "Rss:":
                kib = int(line.split()[1])
                out[kind] += kib
                if kind == "anon" and kib:
                    out["anon_maps"] += 1
    return dict(out)


def fmt_smaps(b: dict) -> str:
    return ("heap {heap:.1f} / anon {anon:.1f} ({maps} maps) / file {file:.1f} / stack {stack:.1f}"
            .format(heap=b.get("heap", 0) / 1024, anon=b.get("anon", 0) / 1024,
                    maps=b.get("anon_maps", 0), file=b.get("file", 0) / 1024,
                    stack=b.get("stack", 0) / 1024))


class Sampler:
    """Samples RSS and fds of the proxy and the client every second, and the tunnel's open
    streams from the proxy's status API."""

    def __init__(self, procs: dict, proxy: ProxyProc):
        self.procs = procs
        self.proxy = proxy
        self.samples = []  # (t, phase, {name: (rss_kib, fds)}, streams_open)
        self.phase = "start"
        self.started = time.monotonic()
        self._greenlet = None

    def sample(self) -> tuple:
        values = {}
        for name, proc in self.procs.items():
            try:
                values[name] = (rss_kib(proc.pid), fd_count(proc.pid))
            except OSError:
                values[name] = (0, 0)
        try:
            streams = self.proxy.status()["streams_open"]
        except Exception:  # noqa: BLE001 - a busy proxy may time out; the sample says so
            streams = -1
        row = (time.monotonic() - self.started, self.phase, values, streams)
        self.samples.append(row)
        return row

    def start(self, limit_s: float) -> None:
        def loop():
            # Bounded by count: one sample a second for at most limit_s seconds.
            for _ in range(int(limit_s / SAMPLE_EVERY) + 1):
                self.sample()
                gevent.sleep(SAMPLE_EVERY)
        self._greenlet = gevent.spawn(loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def of(self, phase: str) -> list:
        return [s for s in self.samples if s[1] == phase]


# --- the public -----------------------------------------------------------------------------
class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors = collections.Counter()
        self.error_examples: dict[str, str] = {}
        self.connections = 0
        self.done = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.error_examples.setdefault(kind, detail[:200])


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response with Content-Length (nginx's `return` always sends one): its
    status, its body, and whether it ends the connection (``Connection: close``, which the
    proxy adds: a routed HTTP connection carries one exchange, docs/SECURITY.md)."""
    while True:  # bounded: MAX_RESPONSE bytes at least 1 byte per pass, and the socket timeout
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_RESPONSE:
            raise ValueError("response head too long")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head = bytes(buf[:end]).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    length = None
    closes = False
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
        elif k.strip().lower() == "connection":
            closes = "close" in v.lower()
    if length is None or length > MAX_RESPONSE:
        raise ValueError(f"bad Content-Length in {head[:80]!r}")
    while len(buf) < end + 4 + length:  # bounded as above
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the response body")
        buf += chunk
    body = bytes(buf[end + 4:end + 4 + length])
    del buf[:end + 4 + length]
    return status, body, closes


def worker(index: int, quota: int, per_connection: int, names: list[str], port: int,
           stats: Stats, gate=None) -> None:
    """Send ``quota`` requests, up to ``per_connection`` per keep-alive connection (fewer when the
    answer says Connection: close, as a routed one does), rotating names.
    With a ``gate`` (an Event), wait after the first answer until every worker has had one,
    so all connections (and their streams) are open at once."""
    sent = 0
    turn = index
    while sent < quota:  # each pass sends >= 1 request or records an error: bounded by quota
        host = names[turn % len(names)]
        turn += 1
        request = (f"GET /r HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shroud-load\r\n\r\n"
                   .encode("ascii"))
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
        except OSError as e:
            stats.error(f"connect:{type(e).__name__}", str(e))
            sent += 1
            gevent.sleep(0.1)
            continue
        stats.connections += 1
        buf = bytearray()
        try:
            for _ in range(min(per_connection, quota - sent)):
                started = time.perf_counter()
                sent += 1
                sock.sendall(request)
                status, body, closes = read_response(sock, buf)
                if status != 200:
                    stats.error(f"status:{status}", body[:100].decode("latin-1"))
                    break
                if body != host.encode() + b"\n":
                    stats.error("wrong-body", f"asked {host}, got {body[:80]!r}")
                    break
                stats.latencies.append(time.perf_counter() - started)
                stats.done += 1
                if gate is not None:
                    gate.wait(timeout=REQUEST_TIMEOUT * 4)
                    gate = None
                if closes:  # the server ends this connection: the next request reconnects
                    break
        except (OSError, ValueError) as e:
            stats.error(f"request:{type(e).__name__}", str(e))
        finally:
            sock.close()


def warm_up(requests: int, names: list[str], port: int) -> int:
    """``requests`` requests, one keep-alive connection per name in turn (cycling), one at a
    time: each code path a request takes (and its lazy imports and first-use caches) has run once
    before the starting RSS is sampled. Returns how many were answered 200."""
    ok = 0
    stats = Stats()
    for i in range(requests):  # bounded by count; each request has the socket timeout
        before = stats.done
        worker(i, 1, 1, [names[i % len(names)]], port, stats)
        ok += stats.done - before
    return ok


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def fmt_mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def run_round(rnd: int, args, names: list[str], proxy: ProxyProc, sampler: Sampler,
              stats: Stats) -> float:
    """One load phase: ``args.requests`` requests from ``args.concurrency`` workers."""
    sampler.phase = f"load{rnd}"
    quota, extra = divmod(args.requests, args.concurrency)
    pool = gevent.pool.Pool(args.concurrency)
    print(f"[load] round {rnd}: {args.concurrency} concurrent connections, "
          f"{args.requests:,} requests, {args.per_connection} per connection, {len(names)} names",
          flush=True)
    done_before = stats.done
    started = time.monotonic()
    gate = gevent.event.Event() if args.ramp else None
    for i in range(args.concurrency):
        if args.ramp:
            gevent.sleep(args.ramp / args.concurrency)
        pool.spawn(worker, i, quota + (1 if i < extra else 0), args.per_connection, names,
                   proxy.ports["http"], stats, gate)
    if gate is not None:
        gevent.sleep(1.0)  # the last workers' first requests
        print(f"[load] ramped: {sampler.sample()[3]} streams open; go", flush=True)
        gate.set()
    load_deadline = started + args.timeout
    # Progress loop, bounded by the load timeout.
    while not pool.join(timeout=PROGRESS_EVERY) and time.monotonic() < load_deadline:
        row = sampler.samples[-1]
        elapsed = time.monotonic() - started
        done = stats.done - done_before
        print(f"[load] {elapsed:5.0f} s  {done:7,} ok  {sum(stats.errors.values())} "
              f"errors  {done / elapsed:6,.0f} req/s  streams {row[3]}  "
              f"proxy {fmt_mib(row[2]['proxy'][0])} MiB/{row[2]['proxy'][1]} fds  "
              f"client {fmt_mib(row[2]['client'][0])} MiB/{row[2]['client'][1]} fds",
              flush=True)
    unfinished = len(pool)
    if unfinished:
        pool.kill(timeout=5)
        stats.error("timeout", f"{unfinished} workers unfinished after {args.timeout} s")
    return time.monotonic() - started


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--names", type=int, default=100)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--per-connection", type=int, default=10)
    p.add_argument("--baseline", type=float, default=5.0, help="idle seconds before the load")
    p.add_argument("--settle", type=float, default=15.0, help="idle seconds after the load")
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the load phase")
    p.add_argument("--origin", choices=("nginx", "python"), default="nginx")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="seconds over which the workers start, each then holding its connection until "
                        "all have started (0: all at once, no hold)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the load (and settle); RSS after each round tells a leak from "
                        "the allocator's high-water mark")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the proxy and the client, e.g. PYTHONMALLOC=malloc "
                        "(an experiment knob; repeatable)")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="N sequential requests after a first (cold) baseline, then a second "
                        "(warm) baseline; RSS goals are reported against both")
    p.add_argument("--smaps", action="store_true",
                   help="print where resident memory is (heap / anonymous mmaps / files / stack, "
                        "from /proc/PID/smaps) at the start and after each settle")
    return p


def raise_fd_limit(concurrency: int) -> bool:
    """Raise RLIMIT_NOFILE for this process and its children; False if still too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it
    need = concurrency * 2 + 200
    if want < need:
        print(f"[load] RLIMIT_NOFILE is {want}; {need} needed for {concurrency} connections",
              file=sys.stderr)
        return False
    return True


class World(collections.namedtuple("World", "origin proxy client names origin_note")):
    """The processes under load: an origin, one proxy, one client binding ``names``."""


def start_world(args, tmp: str, procs: list, error) -> World:
    """Start origin, proxy and client (appended to ``procs`` as they start); wait for binds."""
    print(f"[load] starting origin ({args.origin}), proxy and client in {tmp}", flush=True)
    origin = NginxOrigin(tmp) if args.origin == "nginx" else OriginProc(tmp)
    procs.append(origin)
    for item in args.env:  # inherited by the proxy and the client (Proc copies os.environ)
        key, sep, value = item.partition("=")
        if not sep or not key:
            error(f"--env wants KEY=VALUE, not {item!r}")
        os.environ[key] = value
    proxy = ProxyProc(tmp, os.path.join(tmp, "proxy-data"),
                      # --names is up to 100 first-use names from one address: past the
                      # proxy's claim burst (64, docs/SECURITY.md "Squatting"), which is not
                      # what this bench measures.
                      extra=["--log-level", "warning", "--idle-timeout", "120",
                             "--claim-burst", "0"])
    procs.append(proxy)
    names = [f"h{i}.{DOMAIN}" for i in range(args.names)]
    pairs = []
    for name in names:
        pairs += [f"http:{name}", f"127.0.0.1:{origin.port}"]
    client = ClientProc(tmp, os.path.join(tmp, "client-data"), pairs,
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                        extra=["--log-level", "warning"])
    procs.append(client)
    deadline = time.monotonic() + 60
    for name in names:
        proxy.wait_bound(name, timeout=max(1.0, deadline - time.monotonic()))
    status = proxy.status()
    print(f"[load] {len(status['bindings'])} names bound over {len(status['tunnels'])} "
          f"tunnel(s); proxy pid {proxy.pid}, client pid {client.pid}", flush=True)
    if args.env:
        print(f"[load] proxy and client environment: {' '.join(args.env)}", flush=True)
    if args.origin == "python":
        origin_note = "tests/support/origin.py"
    else:
        origin_note = "nginx (2 workers, `return 200 \"$host\\n\"`)"
    return World(origin, proxy, client, names, origin_note)


class Measurement(collections.namedtuple(
        "Measurement", "stats duration sampler cold smaps after_round end_status")):
    """What one run measured: request stats, RSS/fd samples, per-round plateaus."""


def measure(args, world: World) -> Measurement:
    """Baseline (cold, then warm with --warmup), the rounds of load, each followed by a settle."""
    proxy, client, names = world.proxy, world.client, world.names
    sampler = Sampler({"proxy": proxy, "client": client}, proxy)
    sampler.start(args.baseline + args.rounds * (args.timeout + args.settle) + 30)
    try:
        gevent.sleep(args.baseline)
        cold = None
        smaps = {}  # (label, name) -> breakdown

        def take_smaps(label: str) -> None:
            if args.smaps:
                for n, proc in (("proxy", proxy), ("client", client)):
                    smaps[label, n] = smaps_breakdown(proc.pid)
                    print(f"[load] {label} {n}: {fmt_smaps(smaps[label, n])} MiB", flush=True)

        if args.warmup:
            take_smaps("cold")
            cold = sampler.of("start")[-1][2]
            sampler.phase = "warmup"
            ok = warm_up(args.warmup, names, proxy.ports["http"])
            print(f"[load] warm-up: {ok} / {args.warmup} requests answered", flush=True)
            sampler.phase = "warm"
            gevent.sleep(args.baseline)
        take_smaps("start")
        stats = Stats()
        duration = 0.0
        after_round = []  # (round, {name: (rss, fds)}) at the end of each settle
        for rnd in range(1, args.rounds + 1):
            duration += run_round(rnd, args, names, proxy, sampler, stats)
            sampler.phase = f"settle{rnd}"
            print(f"[load] round {rnd} done; settling {args.settle:.0f} s", flush=True)
            gevent.sleep(args.settle)
            after_round.append((rnd, sampler.samples[-1][2]))
            take_smaps(f"after round {rnd}")
    finally:
        sampler.stop()
    return Measurement(stats, duration, sampler, cold, smaps, after_round, proxy.status())


def report(args, world: World, m: Measurement) -> int:
    """Print the results as markdown; 0 when no errors and RSS and fds came back within 10 %."""
    stats, sampler = m.stats, m.sampler
    lat = sorted(stats.latencies)
    base = sampler.of("warm" if args.warmup else "start")[-1][2]
    load_rows = [r for r in sampler.samples if r[1].startswith("load")]
    peak = {n: (max(r[2][n][0] for r in load_rows), max(r[2][n][1] for r in load_rows))
            for n in ("proxy", "client")}
    print()
    print(f"Origin: {world.origin_note}. {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"load generator in the same host (gevent, one process).")
    print()
    print("| measure | value |")
    print("| --- | ---: |")
    print(f"| requests answered / asked | {stats.done:,} / {args.requests * args.rounds:,} |")
    print(f"| errors | {sum(stats.errors.values())} |")
    print(f"| public connections (concurrent / total) | {args.concurrency:,} / "
          f"{stats.connections:,} |")
    print(f"| names bound on the one tunnel | {len(world.names)} |")
    print(f"| peak streams open on the tunnel | {max(r[3] for r in load_rows)} |")
    print(f"| duration s | {m.duration:.1f} |")
    print(f"| requests/s | {stats.done / m.duration:,.0f} |")
    for q in (50, 90, 99):
        print(f"| latency p{q} ms | {percentile(lat, q) * 1000:.1f} |")
    print(f"| latency max ms | {(lat[-1] if lat else float('nan')) * 1000:.1f} |")
    verdicts = [report_memory(args, n, base[n], peak[n], m.after_round[-1][1][n],
                              m.cold[n] if m.cold is not None else None)
                for n in ("proxy", "client")]
    print(f"| proxy refusals | {m.end_status['refusals'] or 'none'} |")
    report_details(m)
    return 0 if not stats.errors and all(verdicts) else 1


def report_memory(args, n: str, base, peak, end, cold) -> bool:
    """One process's RSS and fd rows; True when both came back within 10 % of the baseline."""
    (b_rss, b_fd), (e_rss, e_fd) = base, end
    ok_rss = e_rss <= b_rss * 1.10
    ok_fd = e_fd <= b_fd * 1.10
    print(f"| {n} RSS MiB start / peak / end | {fmt_mib(b_rss)} / {fmt_mib(peak[0])} "
          f"/ {fmt_mib(e_rss)} ({(e_rss / b_rss - 1) * 100:+.0f} %, "
          f"{'within' if ok_rss else 'NOT within'} 10 %) |")
    print(f"| {n} fds start / peak / end | {b_fd} / {peak[1]} / {e_fd} "
          f"({'within' if ok_fd else 'NOT within'} 10 %) |")
    if cold is not None:
        c_rss = cold[0]
        print(f"| {n} RSS MiB cold start (before the {args.warmup}-request warm-up) / end "
              f"| {fmt_mib(c_rss)} / {fmt_mib(e_rss)} "
              f"({(e_rss / c_rss - 1) * 100:+.0f} %) |")
    return ok_rss and ok_fd


def report_details(m: Measurement) -> None:
    """Per-round plateaus, smaps, error examples and the sample table."""
    if len(m.after_round) > 1:
        print()
        print("After each round and its settle (plateau, or growth per round = a leak):")
        print()
        for rnd, values in m.after_round:
            print(f"- round {rnd}: proxy {fmt_mib(values['proxy'][0])} MiB, "
                  f"{values['proxy'][1]} fds; client {fmt_mib(values['client'][0])} MiB, "
                  f"{values['client'][1]} fds")
    if m.smaps:
        print()
        print("Resident MiB by mapping (/proc/PID/smaps):")
        print()
        for (label, n), b in m.smaps.items():
            print(f"- {label}, {n}: {fmt_smaps(b)}")
    if m.stats.errors:
        print()
        for kind, n in m.stats.errors.most_common():
            print(f"- {kind}: {n} (e.g. {m.stats.error_examples[kind]})")
    print()
    print("RSS MiB and fds, one sample every 5 s (phase: start, load, settle):")
    print()
    print("```")
    print("   t  phase    proxy MiB  fds   client MiB  fds  streams")
    for t, phase, values, streams in m.sampler.samples[::5] + m.sampler.samples[-1:]:
        print(f"{t:4.0f}  {phase:7} {fmt_mib(values['proxy'][0]):>9} {values['proxy'][1]:5}"
              f"  {fmt_mib(values['client'][0]):>10} {values['client'][1]:5}  {streams:6}")
    print("```")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not raise_fd_limit(args.concurrency):
        return 2
    tmp = tempfile.mkdtemp(prefix="shroud-load-")
    procs = []
    try:
        world = start_world(args, tmp, procs, parser.error)
        return report(args, world, measure(args, world))
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.keep:
            print(f"[load] logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
