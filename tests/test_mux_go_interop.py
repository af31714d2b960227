"""lib.net.muxsession against Go's muxado v1 (the reference peer, tests/go/muxpeer), over real sockets.

Every case runs over plain TCP and over TLS, and with Python dialling Go and Go dialling Python
(the dialler is the muxado client: odd stream ids). Payloads are pseudo-random and every byte is
checked by SHA-256 on the side that receives it. On failure the message carries the last frames
seen by both sides: Go's ``-trace`` and a header trace of the Python transport.

The test process is not monkey-patched: sockets are gevent's own (gevent.socket, gevent.ssl) and
Go runs as a subprocess read through gevent.subprocess.
"""
from __future__ import annotations

import collections
import hashlib
import random
import signal
import socket
import ssl
import struct
import time

import gevent
import gevent.pool
import gevent.socket
import gevent.ssl
import pytest
import trustme

from lib.errors import ErrorCode, MuxError, StreamReset
from lib.net.muxsession import MuxConfig, Session

# Every wait on the Python side is bounded by this (a wedged session fails, never hangs).
IO_TIMEOUT = 30
CONCURRENT_STREAMS = 100
TRANSPORTS = ["tcp", "tls"]
DIALERS = ["py_dials", "go_dials"]


def payload(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- Python-side wire trace ------------------------------------------------------------------

FRAME_NAMES = {1: "SYN", 2: "RST", 3: "DATA", 4: "WNDINC", 5: "PRI", 6: "GOAWAY"}
# Frame headers remembered per session for failure reports; older ones are dropped.
TRACE_FRAMES = 400


class _HeaderScanner:
    """Follows one direction of a muxado byte stream and records frame headers (independent of
    lib.protocol.muxframe on purpose: the trace must show the wire even if the codec under test is wrong)."""

    def __init__(self, direction: str, log: collections.deque):
        self.direction, self.log = direction, log
        self.header = b""
        self.skip = 0
        self.small = b""
        self.pending: tuple | None = None

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.pending is None:
                take = 8 - len(self.header)
                self.header += bytes(view[:take])
                view = view[take:]
                if len(self.header) < 8:
                    return
                length, flags, typ, sid = struct.unpack(">HBBI", self.header)
                self.header = b""
                self.pending = (length & 0x3FFF, flags, typ & 0x1F, sid & 0x7FFFFFFF)
                self.skip, self.small = length & 0x3FFF, b""
            n = min(self.skip, len(view))
            if self.pending[2] != 3 and len(self.small) < 8:
                self.small += bytes(view[:min(n, 8 - len(self.small))])
            self.skip -= n
            view = view[n:]
            if self.skip == 0 or (self.pending[2] == 6 and len(self.small) == 8):
                self._record()

    def _record(self) -> None:
        length, flags, typ, sid = self.pending
        self.pending = None
        name = FRAME_NAMES.get(typ, f"TYPE{typ}")
        extra = f" payload={self.small.hex()}" if self.small else ""
        fin = " fin" if typ == 3 and flags & 1 else ""
        self.log.append(f"{time.monotonic():.3f} {self.direction} {name} sid={sid} len={length} "
                        f"flags=0x{flags:02x}{extra}{fin}")


class TracedTransport:
    """A socket-like wrapper that records the frame headers crossing it, both ways."""

    def __init__(self, sock):
        self.sock = sock
        self.frames: collections.deque = collections.deque(maxlen=TRACE_FRAMES)
        self._in = _HeaderScanner("<-", self.frames)
        self._out = _HeaderScanner("->", self.frames)

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self._in.feed(data)
        return data

    def sendall(self, data) -> None:
        self.sock.sendall(data)
        self._out.feed(bytes(data))

    def close(self) -> None:
        self.sock.close()

    def __getattr__(self, name):  # setsockopt, getsockopt, ...: the session may tune the socket
        return getattr(self.sock, name)

    def tail(self, n: int = 60) -> str:
        return "\n".join(list(self.frames)[-n:])


# --- connecting a Python session to a Go peer ---------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA and a certificate for 127.0.0.1, as files (for Go) and contexts (Python)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("certs")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    with open(d / "cert.pem", "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    server_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_ctx)
    client_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    return {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"),
            "server_ctx": server_ctx, "client_ctx": client_ctx}


class Link:
    """A Python Session joined to a running muxpeer; ``fail`` reports with both wire traces."""

    def __init__(self, session: Session, transport: TracedTransport, peer):
        self.session, self.transport, self.peer = session, transport, peer

    def fail(self, what: str):
        pytest.fail(f"{what}\nPython session: {self.session!r} end={self.session.end}\n"
                    f"Python wire trace tail:\n{self.transport.tail()}\n"
                    f"Go side: {self.peer.describe()}")

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            self.fail(what)


def connect(gopeer, certs, transport: str, dialer: str, go_args: list[str],
            config: MuxConfig | None = None) -> Link:
    tls = transport == "tls"
    if dialer == "py_dials":
        tls_args = ["-tls", "-cert", certs["cert"], "-key", certs["key"]] if tls else []
        peer = gopeer("-listen", "127.0.0.1:0", *tls_args, *go_args)
        sock = gevent.socket.create_connection(peer.listening(), timeout=10)
        if tls:
            sock = certs["client_ctx"].wrap_socket(sock, server_hostname="127.0.0.1")
        sock.settimeout(None)
        traced = TracedTransport(sock)
        session = Session(traced, client=True, config=config, name="py-client")
    else:
        listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        peer = gopeer("-dial", f"127.0.0.1:{port}", *(["-tls"] if tls else []), *go_args)
        listener.settimeout(10)
        try:
            sock, _ = listener.accept()
        finally:
            listener.close()
        if tls:
            sock.settimeout(10)
            sock = certs["server_ctx"].wrap_socket(sock, server_side=True)
        sock.settimeout(None)
        traced = TracedTransport(sock)
        session = Session(traced, client=False, config=config, name="py-server")
    return Link(session, traced, peer)


@pytest.fixture(params=[(t, d) for t in TRANSPORTS for d in DIALERS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def link_factory(request, gopeer, certs):
    transport, dialer = request.param
    links: list[Link] = []

    def make(*go_args: str, config: MuxConfig | None = None) -> Link:
        link = connect(gopeer, certs, transport, dialer, list(go_args), config)
        links.append(link)
        return link

    make.dialer = dialer
    yield make
    for link in links:
        link.session.close()


def read_all(stream, limit: int) -> bytes:
    """Read until EOF; more than ``limit`` bytes is an error (bounds the loop)."""
    chunks, total = [], 0
    while True:
        data = stream.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        total += len(data)
        if total > limit:
            raise AssertionError(f"stream {stream.id}: more than {limit} bytes")


def exchange(stream, data: bytes) -> bytes:
    """Send data and half-close while a second greenlet reads the reply until EOF."""
    stream.settimeout(IO_TIMEOUT)
    reader = gevent.spawn(read_all, stream, len(data) + 1)
    stream.sendall(data)
    stream.shutdown(socket.SHUT_WR)
    return reader.get(timeout=IO_TIMEOUT)


def serve_echo(stream, after_fin: bool = False) -> None:
    """Echo a stream's bytes back; with after_fin, only once the peer has half-closed."""
    stream.settimeout(IO_TIMEOUT)
    if after_fin:
        data = read_all(stream, 64 << 20)
        stream.sendall(data)
    else:
        while True:
            data = stream.recv(65536)
            if not data:
                break
            stream.sendall(data)
    stream.shutdown(socket.SHUT_WR)


def accept_and_serve(session: Session, count: int, after_fin: bool = False,
                     timeout: float = IO_TIMEOUT) -> list:
    """Accept ``count`` streams, echoing each in its own greenlet; return those greenlets."""
    workers = []
    for _ in range(count):
        stream = session.accept(timeout=timeout)
        workers.append(gevent.spawn(serve_echo, stream, after_fin))
    return workers


def sizes(n: int) -> list[int]:
    """Sizes that cross every boundary that matters: empty, one byte, a frame (16383), the
    initial window (65536) and several windows."""
    edges = [0, 1, 16383, 16384, 65535, 65536, 65537, 300_000]
    return [edges[i] if i < len(edges) else random.Random(1000 + i).randrange(0, 200_000)
            for i in range(n)]


# --- streams opened by Python --------------------------------------------------------------


def test_python_opens_100_streams_go_echoes(link_factory):
    link = link_factory("-accept", "echo")
    plan = sizes(CONCURRENT_STREAMS)
    streams = [link.session.open() for _ in plan]
    own_parity = 1 if link.session.client else 0
    link.check(all(s.id % 2 == own_parity for s in streams), "stream ids of the wrong parity")
    jobs = [gevent.spawn(exchange, s, payload(i, n)) for i, (s, n) in enumerate(zip(streams, plan))]
    gevent.joinall(jobs, timeout=60)
    for i, (job, n) in enumerate(zip(jobs, plan)):
        if not job.successful():
            link.fail(f"stream {streams[i].id} ({n} bytes) failed: {job.exception!r}")
        link.check(sha(job.value) == sha(payload(i, n)),
                   f"stream {streams[i].id}: echo of {n} bytes came back as {len(job.value)} other bytes")
    # Go saw exactly our bytes on each stream, too.
    done = [link.peer.expect("accepted_done") for _ in plan]
    by_id = {d["stream"]: d for d in done}
    for i, (s, n) in enumerate(zip(streams, plan)):
        link.check(by_id[s.id]["bytes"] == n and by_id[s.id]["sha256"] == sha(payload(i, n)),
                   f"Go received other bytes on stream {s.id}: {by_id[s.id]}")
    link.session.close()
    end = link.peer.expect("session_end")
    link.check(end["code"] in (0, 2), f"Go session ended oddly: {end}")
    # Only the frame types Go accepts (docs/PROTOCOL.md, "Frame"), our GOAWAY among them, and Go's
    # 64 KiB receive buffer never overrun (that would be RST FLOW_CONTROL_ERROR, code 3).
    link.check(set(end["frames_in"]) <= {"SYN", "RST", "DATA", "WNDINC", "GOAWAY"}
               and end["frames_in"].get("GOAWAY") == 1, f"frames Go received: {end['frames_in']}")
    link.check("3" not in end["rst_out_codes"], f"Go reset streams for overflow: {end}")
    link.check(link.peer.wait() == 0, "muxpeer exit status")


def test_python_half_closes_then_reads_go_data(link_factory):
    """Go ('store') replies only after our FIN: every reply byte arrives after we half-closed."""
    link = link_factory("-accept", "store")
    data = payload(7, 200_000)  # three windows' worth each way
    stream = link.session.open()
    stream.settimeout(IO_TIMEOUT)
    stream.sendall(data)
    stream.shutdown(socket.SHUT_WR)
    with pytest.raises(MuxError):
        stream.sendall(b"x")  # our direction is closed; reading is not
    reply = read_all(stream, len(data) + 1)
    link.check(sha(reply) == sha(data), f"reply after half-close: {len(reply)} bytes, wrong")
    done = link.peer.expect("accepted_done")
    link.check(done["bytes"] == len(data), f"Go stored {done}")


# --- streams opened by Go ------------------------------------------------------------------


def test_go_opens_100_streams_python_echoes(link_factory):
    link = link_factory("-accept", "none", "-run", "open", "-streams", str(CONCURRENT_STREAMS),
                        "-size", "100000")
    workers = accept_and_serve(link.session, CONCURRENT_STREAMS)
    result = link.peer.expect("open_done", timeout=60)
    gevent.joinall(workers, timeout=IO_TIMEOUT)
    bad = [w.exception for w in workers if not w.successful()]
    link.check(result["ok"] and result["good"] == CONCURRENT_STREAMS and not bad,
               f"Go verified {result}, Python echo errors: {bad[:3]}")
    go_parity = 0 if link.session.client else 1
    ids = [line["stream"] for line in link.peer.find("stream")]
    link.check(len(set(ids)) == CONCURRENT_STREAMS and all(i % 2 == go_parity for i in ids),
               f"Go's stream ids: {sorted(ids)[:10]}...")
    # Go closes the session when its scenario is done; we see the end, from the peer.
    end = link.session.wait(timeout=10)
    link.check(end is not None and end.remote, f"session after Go's Close(): {end}")
    link.check(link.peer.wait() == 0, "muxpeer exit status")


def test_go_half_closes_python_still_writes(link_factory):
    """Python reads Go's data to EOF first, then writes its whole reply after Go's FIN."""
    link = link_factory("-accept", "none", "-run", "open", "-streams", "3", "-size", "300000")
    workers = accept_and_serve(link.session, 3, after_fin=True)
    result = link.peer.expect("open_done", timeout=IO_TIMEOUT)
    gevent.joinall(workers, timeout=IO_TIMEOUT)
    bad = [w.exception for w in workers if not w.successful()]
    link.check(result["ok"] and not bad, f"Go verified {result}, Python errors: {bad}")


# --- resets --------------------------------------------------------------------------------


def test_rst_from_python_is_seen_by_go(link_factory):
    link = link_factory("-accept", "echo")
    stream = link.session.open()
    stream.settimeout(IO_TIMEOUT)
    stream.sendall(b"a" * 1000)
    got = b""
    while len(got) < 1000:  # Go has accepted the stream and is echoing
        chunk = stream.recv(65536)
        link.check(bool(chunk), "EOF before the echo")
        got += chunk
    stream.reset(ErrorCode.CANCEL)
    with pytest.raises(StreamReset):
        stream.recv(1)
    err = link.peer.expect("accepted_error")
    link.check(err["stream"] == stream.id and "reset by peer with error 7" in err["error"],
               f"Go's view of the reset: {err}")
    # The session survives a stream reset.
    data = payload(1, 50_000)
    link.check(exchange(link.session.open(), data) == data, "echo after a reset")
    link.session.close()
    end = link.peer.expect("session_end")
    link.check({"stream": stream.id, "code": 7} in end["rst_in"], f"RSTs Go received: {end}")


def test_rst_from_go_is_seen_by_python(link_factory):
    """Go has no reset call; it answers data for a stream it Close()d with RST(STREAM_CLOSED)."""
    link = link_factory("-accept", "close")
    stream = link.session.open()
    stream.settimeout(IO_TIMEOUT)
    stream.sendall(b"!")
    link.peer.expect("closing")
    link.check(stream.recv(10) == b"", "Go's Close() sends FIN first: EOF expected")
    deadline = time.monotonic() + 10
    with pytest.raises(StreamReset) as caught:
        while time.monotonic() < deadline:  # each write draws an RST; the first one fails us
            stream.sendall(b"more")
            gevent.sleep(0.01)
    link.check(caught.value.code == ErrorCode.STREAM_CLOSED, f"reset code {caught.value.code}")
    data = payload(2, 1000)
    echo_stream = link.session.open()
    echo_stream.settimeout(IO_TIMEOUT)
    echo_stream.sendall(data)  # the 'close' handler reads one byte only
    link.peer.expect("closing")
    link.check(not link.session.closed, f"session died: {link.session.end}")


# --- heartbeats ----------------------------------------------------------------------------

IDLE_SECONDS = 35  # past Go's 13 s no-echo deadline, twice, and past 30 s as asked


@pytest.mark.slow
def test_heartbeats_keep_idle_sessions_alive(gopeer, certs):
    """Both transports and both dialling directions at once: two 35 s idle sessions in parallel.

    Go closes a session whose peer does not echo its heartbeat within 13 s; after 35 s idle both
    sides still open working streams, and Go counts our heartbeats and our echoes of its own.
    """
    cases = [("tcp", "py_dials"), ("tls", "go_dials")]

    def one(transport, dialer):
        link = connect(gopeer, certs, transport, dialer,
                       ["-accept", "echo", "-run", "idle", "-idle", str(IDLE_SECONDS),
                        "-streams", "2", "-size", "100000", "-timeout", "90s"])
        try:
            server = gevent.spawn(accept_and_serve, link.session, 2,
                                  timeout=IDLE_SECONDS + IO_TIMEOUT)
            gevent.sleep(IDLE_SECONDS - 1)  # Go opens its streams at 35 s; ours go first
            link.check(not link.session.closed, f"{transport}/{dialer}: died idle: {link.session.end}")
            data = payload(3, 100_000)
            link.check(exchange(link.session.open(), data) == data, "Python stream after idling")
            link.check(link.session.heartbeat_rtt is not None, "no heartbeat round trip measured")
            result = link.peer.expect("open_done", timeout=IO_TIMEOUT)
            link.check(result["ok"], f"Go's streams after idling: {result}")
            gevent.joinall(server.get(timeout=IO_TIMEOUT), raise_error=True)
            end = link.peer.expect("session_end")
            # ~11 pings of 4 bytes each way in 35 s; 8 is a margin for timer phase.
            link.check(end["peer_heartbeat_bytes"] >= 8 * 4, f"our pings as Go saw them: {end}")
            link.check(end["heartbeat_echo_bytes"] >= 8 * 4, f"our echoes as Go saw them: {end}")
            return end
        finally:
            link.session.close()

    jobs = [gevent.spawn(one, t, d) for t, d in cases]
    gevent.joinall(jobs, timeout=IDLE_SECONDS + 60)
    for (t, d), job in zip(cases, jobs):
        assert job.successful(), f"{t}/{d}: {job.exception!r}"


def test_python_heartbeat_detects_a_frozen_go_peer(gopeer, certs):
    """SIGSTOP the Go peer: with a short heartbeat the Python session ends on its own."""
    config = MuxConfig(heartbeat_interval=0.5, heartbeat_tolerance=1.5)
    link = connect(gopeer, certs, "tcp", "py_dials", ["-accept", "echo"], config=config)
    try:
        data = payload(4, 1000)
        link.check(exchange(link.session.open(), data) == data, "echo before freezing")
        gevent.sleep(1.5)
        link.check(link.session.heartbeat_rtt is not None, "no heartbeat echo from Go")
        link.peer.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        end = link.session.wait(timeout=10)
        elapsed = time.monotonic() - started
        link.check(end is not None and "heartbeat" in end.reason,
                   f"session after freezing Go: {end}")
        link.check(elapsed < 2 + 0.5 + 1.5, f"took {elapsed:.1f} s to notice")
    finally:
        link.peer.proc.send_signal(signal.SIGCONT)
        link.session.close()


# --- transport tuning ----------------------------------------------------------------------


def test_session_turns_nagle_off_like_go(gopeer, certs):
    """Go sets TCP_NODELAY on every connection. A sender bounded by Go's 64 KiB window needs it:
    with Nagle on, the window's last small segment waits for the peer's delayed ACK (40 ms).
    The test namespace's loopback route has quickack on, which hides the stall from throughput
    tests, so this checks the socket option itself."""
    link = connect(gopeer, certs, "tls", "py_dials", ["-accept", "echo"])
    raw = link.transport.sock
    link.check(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
               "TCP_NODELAY is off on the session's transport")
    link.session.close()
