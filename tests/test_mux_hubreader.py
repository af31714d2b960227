"""The mux session's hub reader: lib.net.muxsession, "Reading".

A transport that can be read without waiting (a plain gevent socket, a TLSTransport over one)
is read by an io watcher's callback in the hub: a read wakes no greenlet. Dense reads still
give others their turn (test_mux: test_a_read_of_many_frames_gives_others_turns_while_it_is_
decoded), a transport that must wait keeps a reader greenlet, and an end with a GOAWAY to
flush hands the flush to a greenlet instead of waiting in the hub.
"""
import socket

import gevent
import gevent.socket as gsocket
import pytest

from lib.errors import ErrorCode
from lib.net.muxsession import MuxConfig, Session
from lib.net.splice import socket_sink, splice
from lib.protocol import muxframe as fr
from tests.support.calls import PythonCalls
from tests.support import leftsessions
from tests.support.muxpair import pki, session_pair, tcp_pair, tls_pair  # noqa: F401
from tests.support.switches import SwitchesInto
from tests.support.wait import wait_until


def _transports(kind: str, pki):
    if kind == "tls":
        return tls_pair(pki)
    return gsocket.socketpair()


def _echo(stream) -> None:
    while (data := stream.recv(65536)):
        stream.sendall(data)


@pytest.mark.parametrize("kind", ["tls", "tcp"])
def test_an_exchange_wakes_no_greenlet_but_the_streams_users(kind, pki):
    # Per exchange the test greenlet and the echoing one are woken (each waits in recv); the
    # tunnels' reads are hub callbacks in both sessions. Over a reader greenlet: two more
    # wake-ups per exchange, one per session (bench/README.md, "Keep-alive per request: the
    # tunnel read from the hub").
    c, s = session_pair(_transports(kind, pki), heartbeat=False)
    assert c.reads_in_hub and s.reads_in_hub
    assert c.greenlets.reader is None and s.greenlets.reader is None
    st = c.open()
    st.sendall(b"warm")
    echo = gevent.spawn(_echo, s.accept(timeout=5))
    assert st.recv(100) == b"warm"
    # Over a plain socket every write is the writer greenlet's (module doc, "Writing": only a
    # transport with write_nowait is flushed from the hub; test_mux_flush counts that).
    writers = (c.greenlets.writer, s.greenlets.writer) if kind == "tcp" else ()
    with SwitchesInto(gevent.get_hub(), gevent.getcurrent(), echo, *writers,
                      but=True) as others:
        for i in range(50):
            st.sendall(b"request %d" % i)
            assert st.recv(100) == b"request %d" % i
    assert others.count == 0, others.woken
    c.close()
    s.close()
    echo.join(timeout=5)


@pytest.mark.parametrize("kind", ["tls", "tcp"])
def test_pairs_a_test_left_open_are_closed_and_wake_nothing(kind, pki):
    # A pair left open beats its heartbeat in every later test and woke greenlets inside the
    # count above (CI: twelve wake-ups of such sessions' writers). After each test,
    # tests/conftest.py closes what the test left open; here its closing step runs in-test.
    since = leftsessions.mark()
    left = [*session_pair(heartbeat_interval=0.002), *session_pair(heartbeat_interval=0.002)]
    gevent.sleep(0.01)
    assert len(leftsessions.close_left(since)) == 4
    assert all(s.closed for s in left)
    gevent.sleep(0.02)
    test_an_exchange_wakes_no_greenlet_but_the_streams_users(kind, pki)


def test_a_transport_that_must_wait_keeps_the_reader_greenlet(pki):
    # gevent's SSLSocket (its bytes are records, not the socket's) and a socket with a timeout
    # of its own: read by a greenlet, as before.
    a, b = gsocket.socketpair()
    b.settimeout(30)
    ssl_c, ssl_s = tls_pair(pki, server_bio=False, client_bio=False)
    for pair in ((a, b), (ssl_c, ssl_s)):
        c, s = session_pair(pair, heartbeat=False)
        assert not s.reads_in_hub and isinstance(s.greenlets.reader, gevent.Greenlet)
        st = c.open()
        st.sendall(b"ping")
        assert s.accept(timeout=5).recv(10) == b"ping"
        c.close()
        s.close()


def test_records_left_by_a_short_read_are_read_without_the_socket(pki):
    # read_nowait stopped at n with records still to decrypt: read_buffered says so, and the
    # next read returns them at once (the hub reader schedules it; the socket holds nothing).
    c, s = tls_pair(pki)
    c.sendall(b"a" * 5000)
    with gevent.Timeout(5):
        while not (first := s.read_nowait(1000)):
            gevent.sleep(0.01)
    assert bytes(first) == b"a" * 1000 and s.read_buffered
    rest = b""
    while len(rest) < 4000:
        rest += bytes(s.read_nowait(1000))
    assert rest == b"a" * 4000 and not s.read_buffered
    assert s.read_nowait(1000) is None  # nothing more: wait for the socket
    c.close()
    s.close()


def test_records_left_in_the_transport_are_read_by_the_session_s_first_read(pki):
    # Records that arrived before the session was made (with the handshake, in real life) sit
    # in the transport, not the socket: the session's first read is a callback, not the
    # watcher, or they would wait for bytes that never come.
    c, s = tls_pair(pki)
    c.sendall(b"X" + fr.encode(fr.Syn(3)) + fr.encode_data(3, b"early"))  # one record
    with gevent.Timeout(5):
        while not (first := s.read_nowait(1)):
            gevent.sleep(0.01)
    assert bytes(first) == b"X" and s.read_buffered  # the rest is decrypted, in the transport
    server = Session(s, client=False, config=MuxConfig(heartbeat=False))
    assert server.reads_in_hub
    assert server.accept(timeout=5).recv(10) == b"early"
    server.close()
    c.close()


def test_a_protocol_error_s_goaway_waits_for_the_output_in_a_greenlet_not_the_hub(pki):
    # The peer stops reading (8 KiB socket buffers), the session's writer waits with output
    # queued, then the peer breaks the protocol: the hub reader ends the session, and the
    # GOAWAY must follow the queued output once the peer reads again. Flushed from the hub it
    # could not wait for the writer (gevent refuses to block the hub) and was lost.
    t, peer = tls_pair(pki, small_buffers=True)
    c = Session(t, client=True, config=MuxConfig(heartbeat=False))
    streams = [c.open() for _ in range(4)]
    senders = [gevent.spawn(st.sendall, b"x" * 65536) for st in streams]
    with gevent.Timeout(5):  # the writer waits for the socket (a write under way or a tail)
        while c.unsent_size == 0 or t.write_idle:
            gevent.sleep(0.01)
    peer.sendall(bytes.fromhex("0000001100000003"))  # an unknown frame type
    with gevent.Timeout(5):
        while not c.closed:
            gevent.sleep(0.01)
    assert c.end.code == ErrorCode.PROTOCOL_ERROR and not c.end.remote
    assert isinstance(c.greenlets.reader, gevent.Greenlet)  # the end's flush, handed over
    decoder, frames = fr.FrameDecoder(), []
    with gevent.Timeout(10):
        while (data := peer.recv(65536)):
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    assert isinstance(frames[-1], fr.GoAway) and frames[-1].code == ErrorCode.PROTOCOL_ERROR
    assert c.wait(timeout=5) is not None
    gevent.joinall(senders, timeout=5)
    peer.close()


def test_a_read_that_fills_the_read_size_is_followed_by_a_read_not_the_watcher(pki,
                                                                               monkeypatch):
    # A read that filled READ_SIZE may leave decrypted records in the TLS transport and none in
    # the socket: the next read is a callback (module doc, "Reading"). Waiting for the socket
    # instead, the rest of those bytes waited for the peer's next ones (none come here). A
    # small READ_SIZE makes every read such a read.
    from lib.net import muxsession
    monkeypatch.setattr(muxsession, "READ_SIZE", 1000)
    c, s = session_pair(tls_pair(pki), heartbeat=False)
    assert s.reads_in_hub
    st = c.open()
    st.sendall(b"a" * 5000)  # one record: four reads of it are left in the transport
    got = b""
    near = s.accept(timeout=5)
    with gevent.Timeout(5):
        while len(got) < 5000:
            got += near.recv(65536)
    assert got == b"a" * 5000
    c.close()
    s.close()


def _stream_pair():
    """Two sessions and a stream between them, its first byte read: (c, s, far, near)."""
    c, s = session_pair()
    far = c.open()
    far.sendall(b"x")
    near = s.accept(timeout=5)
    assert near.recv(10) == b"x"
    return c, s, far, near


def test_a_read_for_a_spliced_visitor_offers_it_from_the_read_with_no_flush_frame():
    # The hub read that brings an answer for a spliced visitor offers it to the sink from
    # _decoded itself (Session._flush_sinks inline: a frame fewer per keep-alive request in
    # each process, bench/README.md, "Per-request cost (issue 16)", branch ka3).
    c, s, far, near = _stream_pair()
    visitor, inner = tcp_pair()
    g = gevent.spawn(splice, inner, near)
    try:
        far.sendall(b"warm")
        assert visitor.recv(10) == b"warm"
        for i in range(10):
            # Two frames in one read (a read of one frame is offered by Session._offer_alone,
            # with no _sink_flush either: test_keepalive_path).
            answer = b"answer %d " % i + b"x" * 17000
            with PythonCalls() as calls:
                far.sendall(answer)
                got = b""
                while len(got) < len(answer):
                    got += visitor.recv(65536)
            assert got == answer
            assert calls.names.count("Stream._sink_flush") == 1, calls.names
            assert "Session._flush_sinks" not in calls.names
    finally:
        visitor.close()
        c.close()
        s.close()
        g.join(timeout=5)


def test_a_read_for_a_stream_whose_reading_is_shut_reaches_no_sink():
    # A read of one DATA frame for a stream with a sink is offered to it at once
    # (Session._offer_alone), but not when the stream's reading was shut: its bytes go nowhere
    # and the window goes back, as Stream._deliver does for it (no test held this guard).
    c, s, far, near = _stream_pair()
    visitor, inner = tcp_pair()
    sink = socket_sink(inner)
    try:
        near.set_sink(sink)
        near.shutdown(socket.SHUT_RD)
        before = s.stats.bytes_in
        far.sendall(b"not for anyone")  # one frame in one read: the one-frame offer's path
        wait_until(lambda: s.stats.bytes_in > before)
        assert sink.sent == 0 and near.buffered == 0
        visitor.setblocking(False)
        with pytest.raises(BlockingIOError):
            visitor.recv(100)
    finally:
        visitor.close()
        inner.close()
        c.close()
        s.close()


def test_records_a_read_leaves_at_its_budget_are_read_without_more_from_the_peer(pki):
    # The TLS transport stops a read at RECORDS_PER_READ records (docs/SECURITY.md: a peer's
    # 1-byte records): the hub reader reads on from a callback, as after a full read, not
    # from the watcher, or the records left would wait for bytes the peer never sends.
    t, peer = tls_pair(pki, sockets=tcp_pair())  # (a socketpair counts every tiny send whole)
    s = Session(t, client=False, config=MuxConfig(heartbeat=False))
    payload = bytes(range(256)) * 8  # 2,048 bytes: 2,059 one-byte records with the frame's head
    wire = fr.encode(fr.Syn(3)) + fr.encode_data(3, payload)
    for b in wire:
        assert peer.write_nowait(bytes([b]))
    st = s.accept(timeout=5)
    got = b""
    with gevent.Timeout(10):
        while len(got) < len(payload):
            got += st.recv(65536)
    assert got == payload
    s.close()
    peer.close()
