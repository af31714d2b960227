"""Writing from a hub callback: lib.net.muxsession, "Writing"; TLSTransport.write_nowait.

Over TLSTransport a stream's write is flushed by one hub callback per loop turn, not by waking
the writer greenlet; frames of many streams still leave together; what the kernel does not take
(the tail) is the writer greenlet's and leaves before anything written after it; the session's
output bound and stall detection hold.
"""
import hashlib
import os
import socket

import gevent
import gevent.socket as gsocket
import pytest

from lib.errors import MuxError
from lib.net.muxsession import MuxConfig, Session
from lib.protocol import muxframe as fr
from tests.support.muxpair import echo_server, pki, session_pair, tls_pair  # noqa: F401
from tests.support.switches import SwitchesInto


def test_exchanges_wake_no_writer_greenlet(pki):
    c, s = session_pair(tls_pair(pki), heartbeat=False)
    echo_server(s)
    st = c.open()
    st.sendall(b"warm")
    assert st.recv(100) == b"warm"
    with (SwitchesInto(c.greenlets.writer) as client_writer,
          SwitchesInto(s.greenlets.writer) as server_writer):
        for i in range(50):
            st.sendall(b"request %d" % i)
            assert st.recv(100) == b"request %d" % i
    # Every frame left from the hub callback: the writer greenlets slept throughout.
    assert client_writer.count == 0 and server_writer.count == 0
    c.close()
    s.close()


def test_writes_of_many_streams_in_one_turn_leave_in_one_write(pki):
    transport, peer_transport = tls_pair(pki)
    c, s = session_pair((transport, peer_transport), heartbeat=False)
    echo_server(s)
    streams = [c.open() for _ in range(64)]
    for st in streams:
        st.sendall(b"open")
    for st in streams:
        assert st.recv(100) == b"open"
    writes = []
    real = transport.write_nowait

    def counting(data):
        writes.append(len(data))
        return real(data)
    transport.write_nowait = counting
    jobs = [gevent.spawn(st.sendall, b"GET / HTTP/1.1\r\n\r\n") for st in streams]
    gevent.joinall(jobs, raise_error=True, timeout=10)
    for st in streams:
        assert st.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    # The 64 writes of one loop turn: one flush, one record batch, one send().
    assert len(writes) == 1 and writes[0] >= 64 * (18 + fr.HEADER_SIZE)
    c.close()
    s.close()


def test_a_tail_the_kernel_left_goes_out_first_and_every_byte_arrives(pki):
    transport, peer_transport = tls_pair(pki, small_buffers=True)
    c, s = session_pair((transport, peer_transport), heartbeat=False)
    echo_server(s)
    tails = []
    real = transport.write_nowait

    def watching(data):
        done = real(data)
        if not done:  # the kernel left a tail: the writer greenlet sends it first
            tails.append(len(data))
        return done
    transport.write_nowait = watching
    blobs = [os.urandom(300_000 + i) for i in range(8)]

    def roundtrip(blob):
        st = c.open()
        w = gevent.spawn(lambda: (st.sendall(blob), st.shutdown(socket.SHUT_WR)))
        got = hashlib.sha256()
        while (d := st.recv(1 << 20)):
            got.update(d)
        w.get()
        return got.digest()
    jobs = [gevent.spawn(roundtrip, b) for b in blobs]
    gevent.joinall(jobs, raise_error=True, timeout=60)
    assert [j.value for j in jobs] == [hashlib.sha256(b).digest() for b in blobs]
    assert tails, "the kernel took every write whole: the tail path was not exercised"
    assert not c.closed and not s.closed
    c.close()
    s.close()


def test_output_stays_under_the_high_water_mark_and_a_stall_is_caught(pki):
    # The peer grants a huge window, keeps talking (looks alive) and never reads.
    c, peer = tls_pair(pki, small_buffers=True)
    session = Session(c, client=True, config=MuxConfig(
        write_high_water=256 * 1024, write_stall_timeout=0.5, heartbeat_interval=0.1,
        heartbeat_tolerance=60))
    st = session.open()
    peer.sendall(fr.encode(fr.WndInc(st.id, 64 << 20)))

    def chatter():
        while True:
            peer.sendall(fr.encode(fr.WndInc(st.id, 1)))
            gevent.sleep(0.05)
    talk = gevent.spawn(chatter)

    def push():
        while True:
            st.sendall(b"x" * 65536)
    writer = gevent.spawn(push)
    highest = 0
    try:
        with gevent.Timeout(10, AssertionError("a peer that never reads kept the session")):
            while session.end is None:
                highest = max(highest, session.unsent_size)
                gevent.sleep(0.01)
        assert highest <= 256 * 1024 + fr.MAX_PAYLOAD + fr.HEADER_SIZE
        assert session.end.hostile and "stopped reading" in session.end.reason, session.end
    finally:
        talk.kill()
        writer.kill()
        peer.close()


def test_a_write_that_fails_in_the_flush_ends_the_session(pki):
    a, b = gsocket.socketpair()
    c, s = session_pair(tls_pair(pki, sockets=(a, b)), heartbeat=False)
    st = c.open()
    st.sendall(b"x")
    s.accept(timeout=5)
    b.close()  # the peer's socket is gone: our next write fails
    with pytest.raises(MuxError):
        for _ in range(100):
            st.sendall(b"y" * 65536)
            gevent.sleep(0.01)
    end = c.wait(5)
    assert end is not None and end.remote, end
    s.close()
