"""Attacks on the session's hub reader (lib.net.muxsession, "Reading"): what a tunnel peer's
frames make a session hold when the stream they are for is not read.

The receive window bounds a stream's buffer in payload bytes; what those bytes cost in objects
depends on how the peer cuts them. A peer sending 2-byte DATA frames made a stream that is not
read hold one bytes object and one deque slot per frame: 1.4 MB for a 64 KiB window, 22x (a
free key's client and its own visitors that never read: 4,096 streams of a tunnel, ~6 GB at the
proxy against the 256 MB the windows allow). Stream._deliver joins tiny frames (SMALL_CHUNK).
"""
from __future__ import annotations

import gc
import tracemalloc

import gevent
import gevent.socket as gsocket
import pytest

from lib.net.muxsession import SMALL_CHUNK, MuxConfig, Session
from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp

pytestmark = pytest.mark.timeout(60)


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
