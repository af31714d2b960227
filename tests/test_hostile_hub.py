"""Attacks on the session's hub reader (lib.net.muxsession, "Reading"): what a tunnel peer's
frames make a session hold when the stream they are for is not read; in one session pair,
and against a real proxy from a raw tunnel client (tests/support/rawmux.py) whose visitors
never read.

The receive window bounds a stream's buffer in payload bytes; what those bytes cost in objects
depends on how the peer cuts them. A peer sending 2-byte DATA frames made a stream that is not
read hold one bytes object and one deque slot per frame: 1.4 MB for a 64 KiB window, 22x (a
free key's client and its own visitors that never read: 4,096 streams of a tunnel, ~6 GB at the
proxy against the 256 MB the windows allow). Stream._deliver joins tiny frames (SMALL_CHUNK).
"""
from __future__ import annotations

import gc
import socket
import time
import tracemalloc

import gevent
import gevent.socket as gsocket
import pytest

from lib.errors import ErrorCode, SessionClosed
from lib.identity import Identity
from lib.net.muxsession import SMALL_CHUNK, MuxConfig, Session
from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp
from tests.support.procs import ProxyProc
from tests.support.rawmux import RawPeer

pytestmark = pytest.mark.timeout(120)


def _stream_fed(payload: bytes, measure: bool = False):
    """A session whose peer (a raw socket) opens a stream and fills its 64 KiB window with
    DATA frames of ``payload``, which nobody reads: (bytes buffered, the objects holding them,
    the stream's bytes read back afterwards, and with ``measure`` the bytes the Python heap
    grew by meanwhile, else None)."""
    raw, ours = gsocket.socketpair()
    session = Session(ours, client=False, config=MuxConfig(grant_peer_streams=False))
    try:
        raw.sendall(fr.encode(fr.Syn(3)))
        st = session.accept(timeout=5)
        frame = fr.encode_data(3, payload)
        frames = mp.INITIAL_WINDOW // len(payload)
        if measure:
            gc.collect()
            tracemalloc.start()
            start = tracemalloc.get_traced_memory()[0]
        try:
            sent = 0
            while sent < frames:  # in writes of 4,096 frames, each decoded as it comes
                k = min(4096, frames - sent)
                raw.sendall(frame * k)
                sent += k
                gevent.sleep(0)
            while session.frames_received < frames + 1:  # the SYN and every DATA
                gevent.sleep(0.01)
            held = None
            if measure:
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - start
        finally:
            if measure:
                tracemalloc.stop()
        buffered, chunks = st.buffered, st.buffered_chunks
        assert session.buffered_in == buffered  # the session's count (the status API's)
        got = b""
        while len(got) < buffered:
            got += st.recv(65536)
        assert not session.closed, session.end
        return buffered, chunks, got, held
    finally:
        session.close()
        raw.close()


@pytest.mark.parametrize("size", [1, 2, 100, SMALL_CHUNK - 1])
def test_tiny_data_frames_to_a_stream_nobody_reads_are_held_in_few_objects(size):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    buffered, chunks, got, _ = _stream_fed(payload)
    frames = mp.INITIAL_WINDOW // size
    assert buffered == frames * size and got == payload * frames  # all of it, in order
    # One object per frame before (65,536 for 1-byte frames); joined, one per SMALL_CHUNK
    # bytes or so.
    assert chunks <= 2 * buffered // SMALL_CHUNK + 1, f"{chunks} objects for {buffered} bytes"


def test_full_frames_are_not_joined():
    buffered, chunks, _, _ = _stream_fed(b"x" * fr.MAX_PAYLOAD)
    assert buffered == mp.INITIAL_WINDOW // fr.MAX_PAYLOAD * fr.MAX_PAYLOAD
    assert chunks == mp.INITIAL_WINDOW // fr.MAX_PAYLOAD


def test_what_a_window_of_2_byte_frames_costs_in_memory():
    """The bytes behind the count above (alone in its process it is exact: 1,421,281 bytes
    for 65,536 before; in a suite other tests' leftovers may allocate meanwhile, hence the
    margin)."""
    buffered, _, _, held = _stream_fed(b"xy", measure=True)
    assert held < 4 * buffered, f"{held} bytes held for {buffered} buffered"


# --- against a real proxy ---------------------------------------------------------------------

VISITORS = 16
# A real client's frames are paced under the proxy's frame budget (muxstate.FRAMES_PER_ANSWER:
# 256k a second) so that the attack is the memory, not the frame rate.
BATCH = 4096
PACE = 0.03  # seconds between batches: ~140k frames a second
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _settled_rss_kib(pid: int, seconds: float = 30.0) -> int:
    """The process's RSS once it stops growing (no 256 KiB of growth in 2 s)."""
    deadline = time.monotonic() + seconds
    last, still = _rss_kib(pid), 0
    while time.monotonic() < deadline and still < 8:
        time.sleep(0.25)
        now = _rss_kib(pid)
        still = still + 1 if now - last < 256 else 0
        last = max(last, now)
    return last


def _fill_windows(peer: RawPeer, streams: list[int], payload: bytes, sent: int) -> int:
    """Send ``payload`` DATA frames on each of ``streams`` (``sent`` bytes sent on each
    already) while the proxy grants window (its visitors' kernels take some first), until no
    window is left: the frames sent."""
    frame = {sid: fr.encode_data(sid, payload) for sid in streams}
    sent = dict.fromkeys(streams, sent)
    total, idle = 0, 0
    while idle < 20:  # 20 rounds (0.6 s) with no window anywhere: all full
        moved = False
        for sid in streams:
            room = mp.INITIAL_WINDOW + peer.granted.get(sid, 0) - sent[sid]
            k = min(BATCH, room // len(payload))
            if k:
                assert peer.send(frame[sid] * k), "the proxy closed the tunnel"
                sent[sid] += k * len(payload)
                total += k
                moved = True
                gevent.sleep(PACE)
        idle = 0 if moved else idle + 1
        if not moved:
            gevent.sleep(PACE)
    return total


def test_a_tunnel_client_sending_tiny_frames_to_visitors_that_never_read(tmp_path):
    """A free key's client binds a name, its own visitors ask and never read, and it answers
    each with a response head and then 2-byte DATA frames, following the proxy's grants until
    every window is full. What the proxy holds per visitor stays within what
    docs/OPERATIONS.md, "Memory per visitor", says a visitor that never reads may pin (under
    1 MiB; 64 KiB of window): it held 1.4 MB for a window's worth of 2-byte frames."""
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "data"))
    peer = RawPeer(proxy.ports["tunnel"])
    visitors = []
    try:
        peer.handshake(Identity.load_or_create(str(tmp_path / "key")), "tiny.test")
        peer.start_reading()
        rss0 = _settled_rss_kib(proxy.pid, 5)
        for _ in range(VISITORS):
            v = socket.socket()
            v.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            v.connect(("127.0.0.1", proxy.ports["http"]))
            v.sendall(b"GET / HTTP/1.1\r\nHost: tiny.test\r\n\r\n")
            visitors.append(v)
        deadline = time.monotonic() + 20
        while len(peer.syns) < VISITORS:
            assert time.monotonic() < deadline, f"{len(peer.syns)} streams opened"
            gevent.sleep(0.05)
        streams = list(peer.syns)
        for sid in streams:
            peer.send(fr.encode_data(sid, HEAD))
        frames = _fill_windows(peer, streams, b"xy", len(HEAD))
        held = _settled_rss_kib(proxy.pid)
        per_visitor = (held - rss0) / VISITORS
        assert not peer.closed.is_set(), "the proxy closed the tunnel"
        # Counted: what the tunnel's streams hold, within their 64 KiB windows.
        (tunnel,) = proxy.status()["tunnels"]
        assert 0 < tunnel["buffered_in"] <= VISITORS * mp.INITIAL_WINDOW, tunnel
        assert per_visitor < 1024, f"{per_visitor:.0f} KiB per visitor ({frames} frames)"
        print(f"{VISITORS} visitors, {frames} 2-byte frames: proxy RSS "
              f"+{(held - rss0) / 1024:.1f} MiB, {per_visitor:.0f} KiB each, "
              f"{tunnel['buffered_in']} bytes buffered")
    finally:
        for v in visitors:
            v.close()
        peer.close()
        proxy.stop()


# --- an exception in the hub reader -------------------------------------------------------------

class _RaisingSink:
    """A direct-delivery sink (lib.net.muxsession, "Direct delivery") with a bug."""
    busy = False

    def offer(self, data) -> int:
        raise RuntimeError("a sink's bug")

    def offer_many(self, chunks) -> int:
        raise RuntimeError("a sink's bug")


def test_an_exception_in_the_hub_reader_ends_the_session_not_leaves_it_unread():
    """Unit test of lib.net.muxsession (the failing sink is a stand-in): an exception the
    reader's callback does not expect ended the callback only, its watcher stopped: the session
    stayed open and was never read again (another stream's data never came; with heartbeats
    off, for good)."""
    raw, ours = gsocket.socketpair()
    session = Session(ours, client=False,
                      config=MuxConfig(grant_peer_streams=False, heartbeat=False))
    try:
        assert session.reads_in_hub
        raw.sendall(fr.encode(fr.Syn(3)) + fr.encode(fr.Syn(5)))
        bad, other = session.accept(timeout=5), session.accept(timeout=5)
        bad.set_sink(_RaisingSink())
        other.settimeout(5)
        raw.sendall(fr.encode_data(3, b"boom") + fr.encode_data(5, b"hello"))
        end = session.wait(timeout=5)
        assert end is not None and end.code == ErrorCode.INTERNAL_ERROR, end
        assert other.recv(10) == b"hello"  # decoded in the same read, before the sink's turn
        with pytest.raises(SessionClosed):
            other.recv(10)
    finally:
        session.close()
        raw.close()
