#!/usr/bin/env python3
"""Multiplexer benchmark: lib.net.muxsession against Go's muxado v1, over TLS on loopback.

    .venv/bin/python bench/mux_bench.py [--size BYTES] [--streams N] [--idle-streams N]
                                        [--timeout S] [--no-readme]

For each pair of peers (dialler -> listener) it moves ``--size`` bytes (default 1 GiB) from the
dialler to a "sink" on the listener, (a) over one stream and (b) spread over ``--streams``
(default 100) concurrent streams. The sink counts what it read and answers the count when the
sender half-closes, so the clock (first open -> last count reply) covers delivery, not buffering.
Pairs: Go->Go (the reference), Python->Go, Go->Python, Python->Python; each Python peer runs in
its own process, as each Go peer does. Then it opens ``--idle-streams`` (default 10,000) idle
streams between two fresh Python processes and reports the RSS growth per stream on each side.

Besides MiB/s (which on a shared machine says more about the load than about the code), each
pair reports both peers' CPU seconds per GiB moved (user+sys from /proc; a Python sender's from
its own clock over the transfer, every other peer's from its start or from listening to the
result): the figure to compare between runs and against Go. ``--pairs`` and ``--stream-counts``
pick cells (default: all four pairs, 1 and --streams streams); ``--runs N`` repeats them and
reports each cell's median.

Results go to stdout (progress lines, then a table) and, unless --no-readme, into the
"Multiplexer" section of bench/README.md. Every run is bounded by --timeout.

Internal modes (one process per Python peer): ``--serve-sink`` and ``--serve-hold`` listen and
print one JSON line per event; ``--send`` and ``--open-idle`` dial.

This is an entry point: it monkey-patches gevent before anything else is imported.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --base: a Python peer imports lib/ from the tree this names (set by the parent per cell).
ENV_ROOT = "MUX_BENCH_LIB_ROOT"
sys.path.insert(0, os.environ.get(ENV_ROOT) or ROOT)

from lib.hostport import parse_hostport  # noqa: E402
from lib.net.tlstransport import TLSTransport  # noqa: E402
from lib.net.muxsession import MuxConfig, Session  # noqa: E402

README = os.path.join(ROOT, "bench", "README.md")
SECTION = "Multiplexer"
# The sender writes this buffer over and over: generating 1 GiB would dominate the timing.
CHUNK = 256 * 1024
# Sink reads this much at a time (the Python session hands over up to its receive window).
READ_SIZE = 256 * 1024
COUNT = struct.Struct(">Q")
# (sender, listener, streams) -> (sender's, listener's) CPU seconds per GiB (run_pair fills it).
PEER_CPU: dict = {}


def log(msg: str) -> None:
    print(f"[mux-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(event: str, **kv) -> None:
    kv["event"] = event
    print(json.dumps(kv), flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- Python peer processes ---------------------------------------------------------------


def tls_server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def tls_client_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    return ctx


def serve(args, handle_session) -> None:
    """Listen on 127.0.0.1, TLS, and run handle_session(session) for each connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = tls_server_context(args.cert, args.key)
    emit("listening", addr="127.0.0.1:%d" % listener.getsockname()[1])
    while True:
        sock, _ = listener.accept()

        def run(sock=sock):
            tls = TLSTransport.server(sock, ctx)  # as the proxy does
            handle_session(Session(tls, client=False, config=bench_config(args)))

        gevent.spawn(run)


def bench_config(args) -> MuxConfig:
    # 10,000 idle streams exceed the default caps, which exist to bound a hostile peer.
    n = max(args.idle_streams + 16, 1024)
    return MuxConfig(max_streams=n, accept_backlog=n)


def sink_stream(stream) -> None:
    n = 0
    while True:
        data = stream.recv(READ_SIZE)
        if not data:
            break
        n += len(data)
    stream.sendall(COUNT.pack(n))
    stream.shutdown(socket.SHUT_WR)
    stream.close()


def serve_sink(args) -> None:
    def handle(session):
        while True:
            try:
                stream = session.accept()
            except OSError:
                return
            gevent.spawn(sink_stream, stream)

    serve(args, handle)


def serve_hold(args) -> None:
    """Accept streams and keep them; report RSS before and after args.idle_streams of them."""
    def handle(session):
        gc.collect()
        before = rss_bytes()
        held = []
        while len(held) < args.idle_streams:
            held.append(session.accept(timeout=args.timeout))
        gc.collect()
        after = rss_bytes()
        emit("held", streams=len(held), rss_before=before, rss_after=after)
        session.wait(args.timeout)

    serve(args, handle)


def dial(args) -> Session:
    sock = socket.create_connection(parse_hostport(args.dial, what="--dial"), timeout=10)
    tls = TLSTransport.client(sock, tls_client_context(args.ca), "127.0.0.1")  # as the client
    # As lib.client.tunnels: no timeout on the tunnel once connected, so the session reads it
    # from the hub (lib.net.muxsession, "Reading"); with the connect's timeout left on it, the
    # Python sender ran on the reader greenlet, a path the client never takes.
    tls.settimeout(None)
    return Session(tls, client=True, config=bench_config(args))


def send(args) -> None:
    """Move args.size bytes over args.streams streams to a sink; one JSON result line."""
    session = dial(args)
    chunk = memoryview(os.urandom(CHUNK))
    per = args.size // args.streams
    errors = []
    sent = [0]

    def one(i):
        try:
            stream = session.open()
            stream.settimeout(args.timeout)
            left = per
            while left:
                n = min(left, CHUNK)
                stream.sendall(chunk[:n])
                left -= n
                sent[0] += n
            stream.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 9:
                data = stream.recv(16)
                if not data:
                    break
                reply += data
            if reply != COUNT.pack(per):
                errors.append(f"stream {stream.id}: count reply {reply.hex()}")
            stream.close()
        except OSError as e:
            errors.append(f"stream {i}: {e}")

    start, cpu0 = time.monotonic(), time.process_time()
    jobs = [gevent.spawn(one, i) for i in range(args.streams)]
    gevent.joinall(jobs, timeout=args.timeout)
    secs = time.monotonic() - start
    timed_out = not all(j.ready() for j in jobs)
    if timed_out:
        errors.append(f"timed out after {args.timeout} s with {sent[0]} bytes written")
    # On a timeout the rate is an upper bound: bytes handed to the session, not delivered.
    total = sent[0] if timed_out else per * args.streams
    emit("send_done", ok=not errors, errors=errors[:3], streams=args.streams, bytes=total,
         seconds=secs, mib_per_s=total / 2**20 / secs, timed_out=timed_out,
         cpu=time.process_time() - cpu0)
    session.close()


def open_idle(args) -> None:
    session = dial(args)
    gevent.sleep(0.2)
    gc.collect()
    before = rss_bytes()
    streams = [session.open() for _ in range(args.idle_streams)]
    gevent.sleep(1.0)  # let the SYNs leave
    gc.collect()
    after = rss_bytes()
    emit("opened", streams=len(streams), rss_before=before, rss_after=after,
         alive=not session.closed)
    session.close()


# --- orchestration -------------------------------------------------------------------------


class Proc:
    """A peer process printing JSON lines; bounded waits."""

    def __init__(self, argv):
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def expect(self, event, timeout):
        with gevent.Timeout(timeout, TimeoutError(f"no {event!r} within {timeout} s from {self.argv}")):
            for raw in self.p.stdout:
                line = json.loads(raw)
                if line["event"] == event:
                    return line
                if line["event"] == "fatal":
                    raise RuntimeError(f"{self.argv}: {line}")
        raise RuntimeError(f"{self.argv} exited ({self.p.wait()}) before {event!r}: "
                           f"{self.p.stderr.read().decode()[-2000:]}")

    def cpu(self) -> float:
        """user+sys seconds so far (/proc/PID/stat): what a Python peer spent, load or not."""
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def run_pair(opts, gobin, certs, sender, listener, streams):
    """One throughput run: returns MiB/s and a note; PEER_CPU[(sender, listener, streams)] gets
    both peers' CPU seconds per GiB moved (a Python sender's during the transfer, a Go sender's
    from its start, the sink's from listening to the sender's result)."""
    if listener == "go":
        server = Proc([gobin, "-listen", "127.0.0.1:0", "-tls", "-cert", certs["cert"], "-key",
                       certs["key"], "-accept", "sink", "-raw", "-sessions", "1",
                       "-timeout", f"{opts.timeout + 30}s"])  # outlives the sender's bound
    else:
        server = Proc(py_argv(opts, certs, "--serve-sink"))
    try:
        addr = server.expect("listening", 30)["addr"]
        sink_cpu0 = server.cpu()
        if sender == "go":
            client = Proc([gobin, "-dial", addr, "-tls", "-raw", "-accept", "none", "-run", "send",
                           "-streams", str(streams), "-size", str(opts.size),
                           "-timeout", f"{opts.timeout}s"])
        else:
            client = Proc(py_argv(opts, certs, "--send", "--dial", addr, "--streams", str(streams)))
        try:
            result = client.expect("send_done", opts.timeout + 10)
            sink_cpu = server.cpu() - sink_cpu0
            send_cpu = result["cpu"] if sender == "python" else client.cpu()
            gib = result["bytes"] / 2**30
            PEER_CPU[(sender, listener, streams)] = (send_cpu / gib, sink_cpu / gib)
        finally:
            client.stop()
    finally:
        server.stop()
    if result.get("timed_out"):
        return result["mib_per_s"], "timed out"
    if not result["ok"]:
        raise RuntimeError(f"{sender}->{listener} x{streams}: {result}")
    return result["mib_per_s"], ""


def py_argv(opts, certs, *extra):
    return [sys.executable, os.path.abspath(__file__), "--cert", certs["cert"], "--key",
            certs["key"], "--ca", certs["ca"], "--size", str(opts.size), "--timeout",
            str(opts.timeout), "--idle-streams", str(opts.idle_streams),
            *extra]


def measure_idle(opts, certs):
    server = Proc(py_argv(opts, certs, "--serve-hold"))
    try:
        addr = server.expect("listening", 30)["addr"]
        client = Proc(py_argv(opts, certs, "--open-idle", "--dial", addr))
        try:
            opened = client.expect("opened", opts.timeout)
            held = server.expect("held", opts.timeout)
        finally:
            client.stop()
    finally:
        server.stop()
    n = opts.idle_streams
    return ((opened["rss_after"] - opened["rss_before"]) / n,
            (held["rss_after"] - held["rss_before"]) / n)


def make_certs(directory):
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {k: os.path.join(directory, f"{k}.pem") for k in ("cert", "key", "ca")}
    cert.private_key_pem.write_to_path(paths["key"])
    with open(paths["cert"], "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(paths["ca"])
    return paths


def human(n):
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


def write_readme(text):
    """Put ``text`` (starting with a ### heading) into the "## Multiplexer" section of the README,
    replacing the subsection of the same heading and keeping everything else."""
    body = open(README).read() if os.path.exists(README) else "# Benchmarks\n"
    section_re = re.compile(rf"^## {SECTION}\n.*?(?=^## |\Z)", re.M | re.S)
    found = section_re.search(body)
    section = found.group(0) if found else f"## {SECTION}\n\n"
    heading = text.split("\n", 1)[0]
    sub_re = re.compile(rf"^{re.escape(heading)}\n.*?(?=^##|\Z)", re.M | re.S)
    if sub_re.search(section):
        section = sub_re.sub(lambda _: text + "\n\n", section)
    else:
        section = section.rstrip() + "\n\n" + text + "\n\n"
    if found:
        body = body[:found.start()] + section + body[found.end():]
    else:
        body = body.rstrip() + "\n\n" + section
    with open(README, "w") as f:
        f.write(body.rstrip() + "\n")


PAIRS = ("go-go", "python-go", "go-python", "python-python")


def run_cell(opts, gobin, certs, sender, listener, streams, tree):
    """run_pair with the Python peers taken from ``tree`` (None: this one); a result dict."""
    if tree is None:
        os.environ.pop(ENV_ROOT, None)
    else:
        os.environ[ENV_ROOT] = tree
    started = time.monotonic()
    mib, note = run_pair(opts, gobin, certs, sender, listener, streams)
    send_cpu, sink_cpu = PEER_CPU[(sender, listener, streams)]
    label = f"{sender} -> {listener} x{streams}" + (f" [{tree_label(opts, tree)}]"
                                                    if opts.base else "")
    log(f"{label}: {mib:.1f} MiB/s {note} ({time.monotonic() - started:.1f} s); CPU s/GiB "
        f"sender {send_cpu:.2f}, sink {sink_cpu:.2f}")
    return {"mib": mib, "note": note, "send_cpu": send_cpu, "sink_cpu": sink_cpu}


def tree_label(opts, tree):
    if not opts.base:
        return "-"
    return "base" if tree == opts.base else "changed"


def main_bench(opts):
    from tests.fixtures.gopeer import build_muxpeer
    pairs = [tuple(p.split("-")) for p in opts.pairs]
    counts = opts.stream_counts or [1, opts.streams]
    # cell -> tree label -> runs; the Go -> Go reference has one tree
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="mux-bench-") as tmp:
        log("building the Go peer (tests/go/muxpeer, muxado v1 from /usr/share/gocode)")
        gobin = build_muxpeer(tmp)
        certs = make_certs(tmp)
        for run in range(opts.runs):
            for streams in counts:
                for sender, listener in pairs:
                    trees = [None] if "python" not in (sender, listener) or not opts.base else (
                        [opts.base, None] if run % 2 == 0 else [None, opts.base])
                    for tree in trees:
                        r = run_cell(opts, gobin, certs, sender, listener, streams, tree)
                        cell = results.setdefault((sender, listener, streams), {})
                        cell.setdefault(tree_label(opts, tree), []).append(r)
        idle = None
        if opts.idle_streams:
            log(f"opening {opts.idle_streams} idle streams Python -> Python ...")
            idle = measure_idle(opts, certs)
            log(f"RSS per idle stream: opener {idle[0] / 1024:.2f} KiB, "
                f"acceptor {idle[1] / 1024:.2f} KiB")
    text = report(opts, pairs, counts, results, idle)
    print(text)
    if not opts.no_readme:
        write_readme(text)
        log(f"wrote the '{SECTION}' section of {os.path.relpath(README, ROOT)}")


def _med(runs, key):
    return statistics.median(r[key] for r in runs)


def report(opts, pairs, counts, results, idle) -> str:
    """A markdown table: per cell and tree, median MiB/s, its ratio to Go -> Go's median in the
    same runs, and both peers' CPU per GiB (medians)."""
    lines = [
        "### TLS on loopback",
        "",
        f"`.venv/bin/python bench/mux_bench.py --size {opts.size} --streams {opts.streams} "
        f"--idle-streams {opts.idle_streams} --runs {opts.runs}` on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, Go muxado v1 (Debian), load average "
        f"{os.getloadavg()[0]:.1f}. TLS over loopback; the dialler sends {human(opts.size)} to a "
        "sink on the listener; each peer is its own process; time runs from the first open to "
        f"the last count reply. Medians of {opts.runs} run(s); MiB/s on a shared machine varies "
        "by +-30 % and more, CPU per GiB far less.",
        "",
        "| sender -> listener | streams | tree | MiB/s | vs Go -> Go | sender CPU s/GiB | "
        "sink CPU s/GiB |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for streams in counts:
        ref = next(iter(results.get(("go", "go", streams), {}).values()), None)
        ref_mib = _med(ref, "mib") if ref else None
        for sender, listener in pairs:
            for label, runs in sorted(results[(sender, listener, streams)].items()):
                mib = _med(runs, "mib")
                note = " (timed out)" if any(r["note"] for r in runs) else ""
                vs = f"{mib / ref_mib:.2f}" if ref_mib else "-"
                lines.append(f"| {sender} -> {listener} | {streams} | {label} | {mib:.0f}{note} | "
                             f"{vs} | {_med(runs, 'send_cpu'):.2f} | {_med(runs, 'sink_cpu'):.2f} |")
    if idle:
        lines += ["", f"Idle streams (Python -> Python, {opts.idle_streams} streams, SYN only, "
                  f"RSS delta / streams): opener **{idle[0] / 1024:.2f} KiB**, acceptor "
                  f"**{idle[1] / 1024:.2f} KiB** per stream (goal < 16 KiB)."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2**30, help="bytes per run (default 1 GiB)")
    ap.add_argument("--streams", type=int, default=100, help="concurrent streams, run (b)")
    ap.add_argument("--idle-streams", type=int, default=10_000, help="0 skips the memory test")
    ap.add_argument("--timeout", type=float, default=120, help="bound on each run, seconds")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument("--runs", type=int, default=1, help="runs of every cell (medians reported)")
    ap.add_argument("--pairs", default=",".join(PAIRS), help="subset of " + ",".join(PAIRS))
    ap.add_argument("--stream-counts", default="",
                    help="comma-separated stream counts (default: 1 and --streams)")
    ap.add_argument("--base", help="A/B: a second source tree whose lib/ the Python peers also "
                    "run from, cell by cell, alternating with this tree's")
    # internal modes
    ap.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-hold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--send", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--open-idle", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dial", help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    opts.pairs = [p for p in opts.pairs.split(",") if p]
    if not opts.pairs or any(p not in PAIRS for p in opts.pairs):
        ap.error(f"bad --pairs: pick from {','.join(PAIRS)}")
    opts.stream_counts = [int(n) for n in opts.stream_counts.split(",") if n]
    if not 1 <= opts.runs <= 50 or any(n < 1 for n in opts.stream_counts):
        ap.error("--runs 1-50, --stream-counts of at least 1")
    if opts.base is not None:
        opts.base = os.path.abspath(opts.base)
        if not os.path.isfile(os.path.join(opts.base, "lib", "net", "muxsession.py")):
            ap.error(f"--base {opts.base}: no lib/net/muxsession.py there (a Shroud tree)")
    if opts.serve_sink:
        serve_sink(opts)
    elif opts.serve_hold:
        serve_hold(opts)
    elif opts.send:
        send(opts)
    elif opts.open_idle:
        open_idle(opts)
    else:
        main_bench(opts)


if __name__ == "__main__":
    main()
