"""Bulk: lib.net.muxsession, "Sending" and "Direct delivery"; TLSTransport's send pieces.

A ``sendall`` waiting for the peer's window is fed by the session's reader as grants arrive
(a peer that grants a frame at a time, as Go's muxado does, wakes the sending greenlet once per
``sendall``, not per frame), bytes keep their order, and what the reader cannot queue (no output
room, a closed stream) goes back to the sender. A write of two frames leaves in one ``send()``.
A read's frames reach a spliced socket in one ``sendmsg``, not joined first.
"""
import contextlib
import os
import socket
import time

import gevent
import gevent.socket as gsocket
import pytest

from lib.errors import StreamTimeout
from lib.net.muxsession import MuxConfig, Session
from lib.net.tlstransport import TLSTransport
from lib.protocol import muxframe as fr
from lib.protocol.muxstate import INITIAL_WINDOW
from tests.support.muxpair import pki, tls_pair  # noqa: F401
from tests.support.switches import SwitchesInto
from tests.support.wait import wait_for


def _frame_at_a_time_peer(sock, got: bytearray, grant: bool = True):
    """A raw muxado peer that acknowledges every DATA frame on its own as it reads it, one
    write per WNDINC (Go's muxado: a WNDINC per Read); returns once a FIN came."""
    dec = fr.FrameDecoder()
    while (data := sock.recv(65536)):
        dec.feed(data)
        while (f := dec.next_frame()) is not None:
            if isinstance(f, fr.Data):
                got += f.data
                if f.data and grant:
                    sock.sendall(fr.encode_wndinc(f.stream_id, len(f.data)))
                if f.fin:
                    return


def _wait_window_spent(st) -> None:
    """A sendall of more than the initial window in another greenlet has queued the window's
    worth in whole frames (65,532 bytes: the rest waits for a grant or the persist timer) and
    waits for a grant."""
    wait_for(lambda: st.bytes_out >= INITIAL_WINDOW - fr.MAX_PAYLOAD and st.waiting_for_window,
             "the initial window queued", timeout=5, interval=0.01, sleep=gevent.sleep)


def _bulk_session(**config):
    a, b = gsocket.socketpair()
    return a, Session(b, client=True, config=MuxConfig(heartbeat=False, **config))


def test_a_sender_granted_a_frame_at_a_time_wakes_per_sendall_not_per_frame():
    peer, s = _bulk_session()
    st = s.open()
    got = bytearray()
    reader = gevent.spawn(_frame_at_a_time_peer, peer, got)
    blob = os.urandom(2 << 20)  # 128 frames, all but the first 4 sent on a peer's grant
    sender = gevent.spawn(lambda: (st.sendall(blob), st.shutdown(socket.SHUT_WR)))
    with SwitchesInto(sender) as woken:
        reader.get(timeout=20)
        sender.get(timeout=5)
    assert bytes(got) == blob
    # The stream's Event set per WindowOpened woke it 32 times here (once per grant the reader
    # found, 124 at most); now the reader queues the frames and wakes it once all are queued.
    assert woken.count <= 8, woken.count
    s.close()


def test_a_waiting_sender_fed_by_the_reader_still_stops_at_the_output_bound():
    # The reader queues only what the session's output room takes: a peer granting a huge
    # window while its bytes are not being written does not make the session hold more.
    a, b = gsocket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    s = Session(b, client=True, config=MuxConfig(heartbeat=False, write_high_water=256 * 1024))
    st = s.open()
    sender = gevent.spawn(st.sendall, bytes(8 << 20))
    _wait_window_spent(st)  # the first 64 KiB queued, the sender waits for window
    a.sendall(fr.encode_wndinc(st.id, 64 << 20))  # granted, nothing read from `a`
    # The grant taken, the sender stops at the output room (not at a deadline read from the
    # hub's loop.now(), which is stale after tests that never entered the hub).
    wait_for(lambda: st.waiting_for_room, "the sender to wait for output room", timeout=5,
             interval=0.01, sleep=gevent.sleep)
    for _ in range(10):
        gevent.sleep(0)
    assert s.unsent_size <= 256 * 1024 + fr.MAX_PAYLOAD + fr.HEADER_SIZE
    sender.kill()
    s.close()


def test_a_timeout_while_the_reader_feeds_a_send_leaves_the_stream_usable():
    # The peer grants nothing more: the sendall times out with its view taken back from the
    # reader (a grant after that is not spent on the abandoned bytes).
    peer, s = _bulk_session()
    st = s.open()
    st.settimeout(0.2)
    with pytest.raises(StreamTimeout):
        st.sendall(bytes(200_000))
    assert not st.waiting_for_window
    sent = st.bytes_out
    st.settimeout(5)
    # The grant, then a byte: once the byte is read, the reader has dispatched the grant.
    peer.sendall(fr.encode_wndinc(st.id, 64 << 10) + fr.encode_data(st.id, b"."))
    assert st.recv(1) == b"."
    assert st.bytes_out == sent  # nobody was waiting: nothing queued on its behalf
    st.sendall(b"after")
    assert st.bytes_out == sent + 5
    s.close()


def test_a_stream_closed_under_a_waiting_sender_ends_its_send():
    peer, s = _bulk_session()
    st = s.open()
    sender = gevent.spawn(st.sendall, bytes(200_000))
    _wait_window_spent(st)
    st.reset()
    peer.sendall(fr.encode_wndinc(st.id, 64 << 10))  # a grant after the reset: not spent
    with pytest.raises(OSError):
        sender.get(timeout=5)
    s.close()


def _granting_peer(sock, streams: int, got: dict) -> None:
    """A raw muxado peer that grants each stream a window of 64 MiB on its SYN and reads
    everything (what each stream sent, into ``got``); returns once ``streams`` FINs came."""
    dec = fr.FrameDecoder()
    fins = 0
    while fins < streams and (data := sock.recv(1 << 20)):
        dec.feed(data)
        while (f := dec.next_frame()) is not None:
            if isinstance(f, fr.Syn):
                sock.sendall(fr.encode_wndinc(f.stream_id, 64 << 20))
            elif isinstance(f, fr.Data):
                got[f.stream_id] = got.get(f.stream_id, 0) + len(f.data)
                fins += f.fin


def test_streams_at_the_output_bound_are_fed_in_turn_not_all_woken_as_it_drains():
    # 16 streams send 512 KiB each through a 64 KiB output bound. Each sender waiting for room
    # was woken each time the output drained below half the bound (an Event: all 16, for the
    # room a few could fill), 1,000-odd wake-ups for these 8 MiB; now a send parked at the
    # bound is fed by the writer as the output drains, and woken once all of it is queued.
    peer, s = _bulk_session(write_high_water=64 * 1024)
    got: dict = {}
    reader = gevent.spawn(_granting_peer, peer, 16, got)
    blob = os.urandom(512 * 1024)

    def send():
        st = s.open()
        st.sendall(blob)
        st.shutdown(socket.SHUT_WR)
        return st.id

    senders = [gevent.spawn(send) for _ in range(16)]
    with contextlib.ExitStack() as stack:
        woken = [stack.enter_context(SwitchesInto(g)) for g in senders]
        reader.get(timeout=30)
        ids = [g.get(timeout=5) for g in senders]
    assert got == {sid: len(blob) for sid in ids}
    wakes = sum(w.count for w in woken)
    assert wakes <= 4 * len(senders), wakes
    s.close()


class _CountingSends(gsocket.socket):
    sends: list = []

    def send(self, data, flags=0, timeout=None):
        n = super().send(data, flags, timeout)
        self.sends.append(n)
        return n


def test_two_frames_leave_in_one_send(pki):
    # A batch of two 16 KiB frames (32,782 bytes) was sealed as a 32 KiB piece and a 14-byte
    # one, two send() calls where one does.
    a, b = socket.socketpair()
    a, b = _CountingSends(fileno=a.detach()), gsocket.socket(fileno=b.detach())
    g = gevent.spawn(TLSTransport.server, b, pki.server)
    c = TLSTransport.client(a, pki.client, "tunnel.test")
    s = g.get(timeout=10)
    batch = fr.encode_data(1, bytes(fr.MAX_PAYLOAD)) * 2
    _CountingSends.sends = []
    assert c.write_idle and c.write_nowait(batch)
    assert len(_CountingSends.sends) == 1
    got = b""
    while len(got) < len(batch):
        got += s.recv(1 << 20)
    assert got == batch
    _CountingSends.sends = []
    c.sendall(batch)
    assert len(_CountingSends.sends) == 1
    c.close()
    s.close()


class _RecordingSink:
    """A sink (lib.net.muxsession, "Direct delivery") that records its offers and takes at most
    ``take`` bytes in all."""

    busy = False

    def __init__(self, take):
        self.take = take
        self.got = bytearray()
        self.offers = []

    def _accept(self, data) -> int:
        n = min(len(data), self.take - len(self.got))
        self.got += data[:n]
        return n

    def offer(self, data) -> int:
        self.offers.append(("one", len(data)))
        return self._accept(data)

    def offer_many(self, chunks) -> int:
        self.offers.append(("many", [len(c) for c in chunks]))
        return self._accept(b"".join(chunks))


def _sink_pair(sink):
    a, b = gsocket.socketpair()
    cfg = MuxConfig(heartbeat=False)
    c, s = Session(a, client=True, config=cfg), Session(b, client=False, config=cfg)
    st = c.open()
    st.sendall(b"x")
    peer = s.accept(timeout=5)
    assert peer.recv(10) == b"x"
    peer.set_sink(sink)
    return c, s, st, peer


def test_a_read_of_many_frames_reaches_the_sink_unjoined():
    # Direct delivery joined a read's frames (a copy of every byte) before one send; now they
    # are offered as they are, for one sendmsg (splice's _Sink.offer_many).
    sink = _RecordingSink(1 << 20)
    c, s, st, peer = _sink_pair(sink)
    blob = os.urandom(60_000)  # four frames, written at once: one read on the other side
    st.sendall(blob)
    deadline = time.monotonic() + 5
    while len(sink.got) < len(blob) and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert bytes(sink.got) == blob
    assert any(kind == "many" and len(sizes) > 1 for kind, sizes in sink.offers), sink.offers
    assert all(kind == "many" or size <= fr.MAX_PAYLOAD for kind, size in sink.offers)
    c.close()
    s.close()


def test_what_the_sink_does_not_take_is_read_after_it_in_order():
    sink = _RecordingSink(20_000)  # part of the second frame, then nothing
    c, s, st, peer = _sink_pair(sink)
    blob = os.urandom(60_000)
    st.sendall(blob)
    st.shutdown(socket.SHUT_WR)
    peer.settimeout(5)
    rest = b""
    while (d := peer.recv(65536)):
        rest += d
    assert bytes(sink.got) + rest == blob and len(sink.got) == 20_000
    c.close()
    s.close()


def test_a_grant_and_a_reset_in_one_read_fail_the_stream_not_the_session():
    # A peer (an honest one too) grants window, then resets the stream, both in one write: the
    # grant's WindowOpened is dispatched before the reset, when lib.protocol.muxstate has
    # already forgotten the stream. The reader must not queue the waiting sender's bytes then
    # (send_data raised "closed for writing" in the reader and ended the whole session).
    peer, s = _bulk_session()
    st = s.open()
    sender = gevent.spawn(st.sendall, bytes(200_000))
    deadline = time.monotonic() + 5
    while not st.waiting_for_window and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert st.waiting_for_window  # waiting for window, its bytes left with the reader
    peer.sendall(fr.encode_wndinc(st.id, 64 << 10) + fr.encode(fr.Rst(st.id, 8)))
    with pytest.raises(OSError):
        sender.get(timeout=5)
    other = s.open()
    other.sendall(b"still up")  # within the initial window: queued at once
    assert s.end is None, s.end
    s.close()


class _RecordingEnd:
    """A socket's stand-in for splice (not a gevent socket: the copy loop writes to it), which
    records the size of every write."""

    def __init__(self, sock):
        self.sock = sock
        self.family = sock.family
        self.writes = []

    def recv(self, n):
        return self.sock.recv(n)

    def sendall(self, data):
        self.writes.append(len(data))
        self.sock.sendall(data)

    def __getattr__(self, name):  # shutdown, close, settimeout, setsockopt
        return getattr(self.sock, name)


def _splice_bulk(pool: int) -> list:
    from lib.net.splice import splice
    from lib.protocol import muxstate as mp
    a, b = gsocket.socketpair()
    cfg = MuxConfig(heartbeat=False, grow_windows=True, window_pool=mp.WindowPool(pool))
    ours, theirs = Session(a, client=True, config=cfg), Session(b, client=False, config=cfg)
    st = ours.open()  # ours: its window grows as it is read (the proxy's visitors' streams)
    st.sendall(b"x")
    peer = theirs.accept(timeout=5)
    assert peer.recv(10) == b"x"
    near, far = gsocket.socketpair()
    end = _RecordingEnd(near)
    blob = os.urandom(8 << 20)
    drained = gevent.spawn(lambda: sum(len(d) for d in iter(lambda: far.recv(1 << 20), b"")))
    g = gevent.spawn(splice, st, end)
    peer.sendall(blob)
    peer.shutdown(socket.SHUT_WR)
    far.shutdown(socket.SHUT_WR)  # the other direction ends at once
    assert drained.get(timeout=30) == len(blob)
    g.get(timeout=10)
    ours.close()
    theirs.close()
    return end.writes


def test_a_stream_whose_window_grew_is_copied_in_bulk_pieces():
    # Its reader keeps up (the window grew to 1 MiB): 256 KiB reads, a quarter of the copy
    # loop's turns; a stream whose window stays at 64 KiB (here: no pool to grow it from, as
    # for a visitor that stops reading) keeps 64 KiB reads.
    grown = _splice_bulk(pool=64 << 20)
    assert sum(grown) == 8 << 20 and max(grown) > 64 * 1024, max(grown)
    kept = _splice_bulk(pool=0)
    assert sum(kept) == 8 << 20 and max(kept) <= 64 * 1024, max(kept)


def _go_like_peer(sock, sizes: list, grant_every: int = 8192, got: bytearray | None = None):
    """A raw muxado peer that reads as Go's sink does (io.Discard: 8 KiB reads) and grants each
    stream back what it read, ``grant_every`` bytes at a time, one write per WNDINC; records the
    size of every DATA frame in ``sizes``; returns once a FIN came."""
    dec = fr.FrameDecoder()
    unacked: dict = {}
    while (data := sock.recv(65536)):
        dec.feed(data)
        while (f := dec.next_frame()) is not None:
            if isinstance(f, fr.Data):
                sizes.append(len(f.data))
                if got is not None:
                    got += f.data
                if f.fin:
                    return
                n = unacked.get(f.stream_id, 0) + len(f.data)
                while n >= grant_every:
                    sock.sendall(fr.encode_wndinc(f.stream_id, grant_every))
                    n -= grant_every
                unacked[f.stream_id] = n


def test_a_send_cut_by_the_window_leaves_in_whole_frames():
    # Go grants 8 KiB at a time: the window opens at 16,384 bytes, which went out as a full
    # frame and a 1-byte one (31 short frames over 2 MiB); now a cut send takes whole frames
    # (16,383 bytes) and keeps the window's rest for the next grant.
    peer, s = _bulk_session(send_persist=60.0)  # no grant ever waits this long here
    st = s.open()
    sizes: list = []
    got = bytearray()
    reader = gevent.spawn(_go_like_peer, peer, sizes, 8192, got)
    blob = os.urandom(2 << 20)
    st.sendall(blob)
    st.shutdown(socket.SHUT_WR)
    reader.get(timeout=20)
    assert bytes(got) == blob
    data = [n for n in sizes if n]  # (the FIN rides on the last frame, or alone)
    short = [n for n in data[:-1] if n < fr.MAX_PAYLOAD]
    assert short == [], short
    assert len(data) == -(-len(blob) // fr.MAX_PAYLOAD)
    s.close()


def test_a_whole_frame_waits_for_no_peer_that_grants_only_a_whole_window_read():
    # The classic deadlock of sender-side silly-window avoidance: this peer grants only once it
    # has read its whole 64 KiB window (muxado lets it). Whole frames alone fill 65,532 bytes
    # of it and keep 4 back for a grant that never comes, while the peer waits for those 4.
    # The persist timer sends what the window allows once no grant came for send_persist.
    peer, s = _bulk_session(send_persist=0.01)
    st = s.open()
    sizes: list = []
    got = bytearray()
    reader = gevent.spawn(_go_like_peer, peer, sizes, INITIAL_WINDOW, got)
    blob = os.urandom(300_000)
    sender = gevent.spawn(lambda: (st.sendall(blob), st.shutdown(socket.SHUT_WR)))
    reader.get(timeout=20)
    sender.get(timeout=5)
    assert bytes(got) == blob
    assert s.persisted_sends >= 1
    s.close()


def test_a_peer_granting_a_byte_at_a_time_still_gets_everything():
    # Grants of one byte each (a WNDINC per byte read): the window creeps back a byte at a
    # time; the sender neither stalls nor sends one-byte frames while grants keep coming.
    peer, s = _bulk_session()
    st = s.open()
    sizes: list = []
    got = bytearray()
    reader = gevent.spawn(_go_like_peer, peer, sizes, 1, got)
    blob = os.urandom(100_000)
    sender = gevent.spawn(lambda: (st.sendall(blob), st.shutdown(socket.SHUT_WR)))
    reader.get(timeout=30)
    sender.get(timeout=5)
    assert bytes(got) == blob
    s.close()


def test_frames_behind_unread_bytes_wake_the_reader_once():
    # Sixteen frames in one read for a stream whose reader waits: it is woken once, not once
    # per frame (a frame behind bytes not yet read finds the reader already woken).
    from tests.support.calls import PythonCalls
    peer, s = _bulk_session()
    st = s.open()
    reader = gevent.spawn(st.recv, 1 << 20)
    for _ in range(3):
        gevent.sleep(0)  # it starts and waits: nothing to read yet
    assert not reader.ready()
    wire = b"".join(fr.encode_data(st.id, bytes([i]) * 1000) for i in range(16))
    with PythonCalls() as calls:
        peer.sendall(wire)
        data = reader.get(timeout=5)
    assert data == b"".join(bytes([i]) * 1000 for i in range(16))
    assert calls.names.count("Stream._wake") == 1, calls.names.count("Stream._wake")
    s.close()


def test_held_sends_are_one_entry_a_stream_however_often_they_are_held():
    # The persist timer's list (Session._hold) is bounded by the streams: a peer that keeps
    # reopening each stream's window by a frame and a byte holds each send again and again.
    peer, s = _bulk_session(send_persist=60.0)  # the timer never fires here
    streams = [s.open() for _ in range(8)]
    senders = [gevent.spawn(st.sendall, bytes(4 << 20)) for st in streams]
    for st in streams:
        _wait_window_spent(st)
    drained = gevent.spawn(lambda: [None for _ in iter(lambda: peer.recv(1 << 20), b"")])
    most = 0
    for k in range(1, 21):
        peer.sendall(b"".join(fr.encode_wndinc(st.id, fr.MAX_PAYLOAD + 1) for st in streams))
        # each grant sends one whole frame and holds the send again with one byte more kept
        sent = INITIAL_WINDOW - 4 + k * fr.MAX_PAYLOAD
        wait_for(lambda: all(st.bytes_out == sent for st in streams), "the grants taken",
                 timeout=5, interval=0.01, sleep=gevent.sleep)
        most = max(most, s.sends_held)
    assert most == len(streams), most
    assert all(st.waiting_for_window for st in streams)
    for g in senders:
        g.kill()
    drained.kill()
    s.close()
