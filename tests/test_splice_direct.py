"""Direct delivery: a mux stream spliced to a socket, written by the session's reader.

lib.net.muxsession, "Direct delivery"; lib.net.splice: what the socket takes at once never wakes
the splice's copy loop; what it does not take is sent by the copy loop, in order, and a socket
that stops reading still stops the stream's window.
"""
import hashlib
import _socket
import socket
import struct

import gevent
import gevent.socket as gsocket
import pytest

from lib.errors import MuxError, StreamReset
from lib.net.muxsession import Stream
from lib.net.sockets import IOV_MAX, read_watcher
from lib.net.splice import socket_sink, splice, splice_detached
from tests.support.calls import PythonCalls
from tests.support.muxpair import session_pair, tcp_pair
from tests.support.switches import SwitchesInto
from tests.support.wait import wait_until


class Rig:
    """What every test here splices: a muxado stream open both ways (``far`` on the client
    session ``c``, ``near`` its accepted end on ``s``, one byte through already) and a TCP pair
    (``visitor`` outside, ``inner`` for the splice)."""

    def __init__(self):
        self.c, self.s = session_pair()
        self.far = self.c.open()
        self.far.sendall(b"x")
        self.near = self.s.accept(timeout=5)
        assert self.near.recv(10) == b"x"
        self.visitor, self.inner = tcp_pair()

    def splice(self, **kw):
        """``inner`` spliced to ``near`` in a greenlet of its own (joined by the test)."""
        return gevent.spawn(splice, self.inner, self.near, **kw)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.visitor.close()
    r.c.close()
    r.s.close()


def _stalled_at(writer) -> int:
    """``writer.sent`` once it stopped moving for half a second (10 s at most): a writer
    greenlet held by a closed window or a socket not read (_Flood, _Upload)."""
    last = [-1]

    def stalled():
        now, last[0] = last[0], writer.sent
        return now == last[0]
    wait_until(stalled, timeout=10, every=0.5)
    return writer.sent


class _Flood:
    """8 MiB written to ``end`` by a greenlet, then its FIN, in 7 KiB pieces (they line up with
    no frame and no socket buffer) of a repeating pattern."""

    def __init__(self, end):
        self.sent = 0
        self.digest = hashlib.sha256()
        self.writer = gevent.spawn(self._write, end)

    def _write(self, end) -> None:
        for i in range(8 * 1024 // 7):
            piece = bytes([i % 251]) * 7 * 1024
            end.sendall(piece)
            self.digest.update(piece)
            self.sent += len(piece)
        end.shutdown(socket.SHUT_WR)

    def stalled_at(self) -> int:
        """Bytes written once the writer stopped moving for half a second (10 s at most)."""
        return _stalled_at(self)

    def check(self, recv) -> None:
        """Read all of it with ``recv`` to EOF: every byte, in order."""
        got, total = hashlib.sha256(), 0
        while (data := recv(65536)):
            got.update(data)
            total += len(data)
        self.writer.get(timeout=30)
        assert total == self.sent and got.digest() == self.digest.digest()


class _RecvCount:
    """Counts Stream.recv calls on one stream (the splice's copy loop reads with recv)."""

    def __init__(self, monkeypatch, stream):
        self.calls = 0
        real = Stream.recv

        def recv(st, *args, **kw):
            if st is stream:
                self.calls += 1
            return real(st, *args, **kw)
        monkeypatch.setattr(Stream, "recv", recv)


def test_data_reaches_the_socket_without_waking_the_copy_loop(rig, monkeypatch):
    count = _RecvCount(monkeypatch, rig.near)
    counted = []
    g = rig.splice(on_b_to_a=counted.append)
    for i in range(20):
        rig.far.sendall(b"answer %d" % i)
        assert rig.visitor.recv(100) == b"answer %d" % i
    # The copy loop read once (and waits there); every answer went by the reader's send.
    assert count.calls <= 2
    assert sum(counted) == sum(len(b"answer %d" % i) for i in range(20))
    rig.far.shutdown(socket.SHUT_WR)  # EOF takes the usual path: the copy loop wakes for it
    assert rig.visitor.recv(10) == b""
    rig.visitor.close()
    assert g.get(timeout=5) == (0, sum(counted))


def test_a_visitor_that_stops_reading_stops_the_window_and_order_holds(rig):
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    g = rig.splice()
    flood = _Flood(rig.far)
    # Nobody reads the visitor: the far writer must stall once the window, the stream's
    # buffer and the socket's queues are full, far below the 8 MiB it wants to send.
    assert flood.stalled_at() < 2 * 1024 * 1024
    flood.check(rig.visitor.recv)
    rig.visitor.close()
    g.get(timeout=5)


def test_a_send_error_ends_the_splice_not_the_session(rig):
    g = rig.splice()
    rig.far.sendall(b"first")
    assert rig.visitor.recv(10) == b"first"
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rig.visitor.close()  # a reset: the next send to it fails
    with pytest.raises(MuxError):  # the far side sees the stream reset (or the write refused)
        for _ in range(200):
            rig.far.sendall(b"more")
            gevent.sleep(0.01)
    g.get(timeout=5)
    with pytest.raises(StreamReset):  # a reset, never a clean end first
        rig.far.recv(100)
    assert not rig.c.closed and not rig.s.closed  # the session lives on
    other = rig.c.open()
    other.sendall(b"still here")
    assert rig.s.accept(timeout=5).recv(100) == b"still here"


def test_direct_bytes_count_against_the_fallback(rig):
    # The 502 fallback is for a stream that answered nothing: one whose answer went out by
    # direct delivery did answer.
    g = rig.splice(fallback_to_a=b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
    gevent.sleep(0)  # the copy loops are in place
    rig.far.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    rig.far.close()
    out = b""
    while (data := rig.visitor.recv(100)):
        out += data
    assert out == b"HTTP/1.1 200 OK\r\n\r\n"
    rig.visitor.close()
    g.get(timeout=5)


def test_direct_delivery_keeps_the_splice_from_looking_idle(rig):
    g = rig.splice(idle_timeout=0.3)
    for _ in range(10):  # only the direct direction moves, for 1 s: not idle
        rig.far.sendall(b"tick")
        assert rig.visitor.recv(10) == b"tick"
        gevent.sleep(0.1)
    assert not g.ready()
    g.get(timeout=5)  # then both silent: the idle timer ends it


# --- feeding: socket -> stream from an io watcher's callback (lib.net.splice, "Feeding") ---

def test_socket_data_reaches_the_stream_without_waking_the_copy_loop(rig):
    counted = []
    g = rig.splice(on_a_to_b=counted.append)
    for first in (b"first", b"second"):  # read by the copy loop itself (FEED_AFTER)
        rig.visitor.sendall(first)
        assert rig.far.recv(100) == first
    with SwitchesInto(g) as into:
        for i in range(20):
            rig.visitor.sendall(b"request %d" % i)
            assert rig.far.recv(100) == b"request %d" % i
    assert into.count == 0  # every request went by the watcher's callback
    assert sum(counted) == 11 + sum(len(b"request %d" % i) for i in range(20))
    rig.visitor.shutdown(socket.SHUT_WR)  # EOF: the copy loop sends the FIN
    assert rig.far.recv(100) == b""
    rig.far.sendall(b"answer after FIN")  # the other direction still flows
    assert rig.visitor.recv(100) == b"answer after FIN"
    rig.far.close()
    assert g.get(timeout=5)[0] == sum(counted)


def test_a_stream_that_stops_reading_stops_the_socket_and_order_holds(rig):
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    rig.inner.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    g = rig.splice()
    flood = _Flood(rig.visitor)  # the far side does not read at first
    assert flood.stalled_at() < 2 * 1024 * 1024  # the window closed: the socket is not read on
    flood.check(rig.far.recv)
    rig.far.close()
    g.get(timeout=5)


def test_a_stream_reset_ends_a_splice_whose_socket_side_is_quiet(rig):
    # The copy loop socket -> stream waits on the watcher; the other direction's failure
    # closes the socket under it: it must be told, not left waiting on a closed descriptor.
    g = rig.splice()
    for data in (b"hello", b"again", b"watched"):  # the last by the watcher (FEED_AFTER)
        rig.visitor.sendall(data)
        assert rig.far.recv(100) == data
    rig.far.reset()
    g.get(timeout=5)
    with pytest.raises(OSError):
        while rig.visitor.recv(100):
            pass


def test_feeding_keeps_the_splice_from_looking_idle(rig):
    g = rig.splice(idle_timeout=0.3)
    for _ in range(10):  # only visitor -> stream moves, for 1 s: not idle
        rig.visitor.sendall(b"tick")
        assert rig.far.recv(10) == b"tick"
        gevent.sleep(0.1)
    assert not g.ready()
    g.get(timeout=5)  # then both silent: the idle timer ends it


def test_a_keep_alive_answer_is_offered_in_one_python_call():
    """The sink's offer runs once per answer delivered straight to a visitor: its send (the OS
    socket's) and counting happen in it, no helper frame under it (bench/README.md,
    "Per-request cost (issue 16)", kapath pass)."""
    a, b = gsocket.socketpair()
    try:
        sink = socket_sink(a)
        with PythonCalls() as calls:
            n = sink.offer(b"HTTP/1.1 200 OK\r\n\r\n")
        assert n == 19 and b.recv(64) == b"HTTP/1.1 200 OK\r\n\r\n"
        assert calls.names == ["_Sink.offer"]
    finally:
        a.close()
        b.close()


def test_the_splice_sink_sends_many_buffers_in_one_call():
    # The sink over a real socket: sendmsg of the pieces, capped at IOV_MAX of them (a unit
    # test of splice's own helper, moved here from tests/test_mux_bulk.py).
    a, b = gsocket.socketpair()
    sink = socket_sink(a)
    pieces = [b"%05d" % i for i in range(IOV_MAX + 10)]
    n = sink.offer_many(pieces)
    assert n == 5 * IOV_MAX  # the first IOV_MAX, in one call
    got = b""
    while len(got) < n:
        got += b.recv(65536)
    assert got == b"".join(pieces[:IOV_MAX]) and sink.sent == n
    a.close()
    b.close()


class _CountingRaw(_socket.socket):
    """An OS socket counting its reads (each one system call, EAGAIN included)."""

    def recv_into(self, *args):
        self.reads += 1
        return super().recv_into(*args)


def _count_reads(sock) -> _CountingRaw:
    """Put a counting OS socket under gevent socket ``sock`` (the same descriptor, non-blocking
    as gevent keeps it): its own reads and lib.net.sockets' reads of the OS socket both count."""
    raw = _CountingRaw(fileno=sock._sock.detach())
    raw.setblocking(False)
    raw.reads = 0
    sock._sock = raw
    return raw


def test_an_awaited_answer_is_read_without_a_read_finding_nothing(rig):
    """splice's b_answers (the client's target after the visitor's first bytes): the answer's
    first read waits first, and the read after it, right away, finds the origin's EOF, so the
    FIN leaves with the answer. Without b_answers the first read finds nothing (an EAGAIN recv)
    before the wait: 3 reads."""
    origin = rig.visitor  # inner is our end of the origin's connection
    raw = _count_reads(rig.inner)
    g = gevent.spawn(splice, rig.near, rig.inner, b_answers=True)
    wait_until(lambda: read_watcher(rig.inner).active, 5)  # the answer's direction waits
    origin.sendall(b"HTTP/1.1 200 OK\r\n\r\nanswer")
    origin.close()
    data = b""
    while len(data) < 25:
        data += rig.far.recv(100)
    assert data == b"HTTP/1.1 200 OK\r\n\r\nanswer"
    assert rig.far.recv(100) == b""
    rig.far.close()
    assert g.get(timeout=5) == (0, 25)
    assert raw.reads == 2  # the answer, then its EOF


def _greenlets_woken(known):
    """greenlet.settrace's view: the greenlets other than ``known`` switched into meanwhile."""
    import greenlet
    woken = set()

    def trace(event, args):
        if event in ("switch", "throw") and args[1] not in known:
            woken.add(args[1])
    return woken, trace


def test_an_awaited_answer_needs_no_greenlet_of_its_own(rig):
    """splice's b_answers with no idle timeout: the answer's direction (origin -> stream) runs
    in the watcher's callbacks, EOF and FIN included, so splice's own greenlet is the only one
    a fresh connection wakes beside the sessions' (module doc, "b_answers")."""
    import greenlet
    origin = rig.visitor
    g = gevent.spawn(splice, rig.near, rig.inner, b_answers=True)
    known = {gevent.get_hub(), gevent.getcurrent(), g,
             *(x for x in (*rig.c.greenlets, *rig.s.greenlets) if x is not None)}
    woken, trace = _greenlets_woken(known)
    old = greenlet.settrace(trace)
    try:
        wait_until(lambda: read_watcher(rig.inner).active, 5)  # the answer's direction waits
        origin.sendall(b"HTTP/1.1 200 OK\r\n\r\nanswer")
        origin.close()
        data = b""
        while len(data) < 25:
            data += rig.far.recv(100)
        assert rig.far.recv(100) == b""  # the FIN
        rig.far.close()
        assert g.get(timeout=5) == (0, 25)
    finally:
        greenlet.settrace(old)
    assert data == b"HTTP/1.1 200 OK\r\n\r\nanswer"
    assert not woken, woken


def test_an_awaited_answer_the_stream_cannot_take_at_once_keeps_its_order(rig):
    """The answer's callback queues what the stream's window takes; the rest goes to a copy
    loop started then, which waits for the window: every byte, in order, and the socket is not
    read on meanwhile."""
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    rig.inner.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    g = gevent.spawn(splice, rig.near, rig.inner, b_answers=True)
    flood = _Flood(rig.visitor)  # the far side does not read at first
    assert flood.stalled_at() < 2 * 1024 * 1024
    flood.check(rig.far.recv)
    rig.far.close()
    assert g.get(timeout=5) == (0, flood.sent)


def test_an_answer_still_coming_when_the_stream_ends_is_waited_for(rig):
    """The stream's FIN first (the visitor half-closed): splice's greenlet passes it on and
    waits for the answer's direction, carried by callbacks, to end."""
    origin = rig.visitor
    g = gevent.spawn(splice, rig.near, rig.inner, b_answers=True)
    wait_until(lambda: read_watcher(rig.inner).active, 5)
    rig.far.shutdown(socket.SHUT_WR)
    assert origin.recv(100) == b""  # the FIN reached the origin as its EOF
    origin.sendall(b"late answer")
    origin.close()
    assert rig.far.recv(100) == b"late answer"
    assert rig.far.recv(100) == b""
    rig.far.close()
    assert g.get(timeout=5) == (0, 11)


def test_an_origin_reset_under_an_awaited_answer_resets_the_stream(rig):
    origin = rig.visitor
    g = gevent.spawn(splice, rig.near, rig.inner, b_answers=True)
    wait_until(lambda: read_watcher(rig.inner).active, 5)
    origin.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    origin.close()  # a reset, not a FIN
    with pytest.raises(MuxError):
        rig.far.recv(100)
    g.get(timeout=5)


# --- splice_detached: no greenlet at all (lib.net.splice, "Detached") --------------------------


class _Detached:
    """``rig.near`` spliced to ``rig.inner`` (the origin's end; the origin is ``rig.visitor``)
    by splice_detached: ``done`` gets on_done's (n_ab, n_ba), ``counted`` the on_* calls."""

    def __init__(self, rig):
        self.done: list = []
        self.counted = {"in": 0, "out": 0}
        assert splice_detached(rig.near, rig.inner, lambda *n: self.done.append(n),
                               on_a_to_b=lambda n: self._count("in", n),
                               on_b_to_a=lambda n: self._count("out", n))

    def _count(self, way: str, n: int) -> None:
        self.counted[way] += n

    def result(self):
        wait_until(lambda: self.done, 5)
        assert len(self.done) == 1
        return self.done[0]


def test_a_detached_splice_wakes_no_greenlet(rig):
    """The origin answers and closes, the visitor closes: answer, FIN, the stream's EOF and both
    ends' close, all from the hub (callbacks), no greenlet switched into but the sessions' own
    and this test's; on_done once, with the counts."""
    import greenlet
    origin = rig.visitor
    known = {gevent.get_hub(), gevent.getcurrent(),
             *(x for x in (*rig.c.greenlets, *rig.s.greenlets) if x is not None)}
    woken, trace = _greenlets_woken(known)
    old = greenlet.settrace(trace)
    try:
        d = _Detached(rig)
        origin.sendall(b"HTTP/1.1 200 OK\r\n\r\nanswer")
        origin.close()
        data = b""
        while len(data) < 25:
            data += rig.far.recv(100)
        assert rig.far.recv(100) == b""  # the FIN
        rig.far.close()
        assert d.result() == (0, 25)
    finally:
        greenlet.settrace(old)
    assert data == b"HTTP/1.1 200 OK\r\n\r\nanswer"
    # A session's own greenlets (its writer, its watchdog) are not the splice's: a session an
    # earlier test left open may wake them meanwhile.
    woken = {g for g in woken if "of <Session " not in repr(g)}
    assert not woken, woken
    assert d.counted == {"in": 0, "out": 25}
    assert rig.near.closed and rig.inner.fileno() == -1  # both ends closed


def test_a_detached_splice_passes_the_visitors_half_close_and_waits_for_the_answer(rig):
    origin = rig.visitor
    d = _Detached(rig)
    rig.far.sendall(b"more")
    assert origin.recv(100) == b"more"  # by a copy loop started for it
    rig.far.shutdown(socket.SHUT_WR)
    assert origin.recv(100) == b""  # the stream's EOF reached the origin as its own
    assert not d.done
    origin.sendall(b"late answer")
    origin.close()
    assert rig.far.recv(100) == b"late answer"
    assert rig.far.recv(100) == b""
    assert d.result() == (4, 11)
    assert d.counted == {"in": 4, "out": 11}


def test_a_detached_splice_answer_over_first_then_the_visitor_closes(rig):
    """The usual order of a fresh connection: the answer's FIN, then the stream's EOF (the
    visitor gone): both closed then, not before (the visitor may still send)."""
    origin = rig.visitor
    d = _Detached(rig)
    origin.sendall(b"answer")
    origin.shutdown(socket.SHUT_WR)
    assert rig.far.recv(100) == b"answer"
    assert rig.far.recv(100) == b""
    rig.far.sendall(b"after")  # the origin's read side is still open
    assert origin.recv(100) == b"after"
    assert not d.done
    rig.far.close()
    assert d.result() == (5, 6)
    assert origin.recv(100) == b""


def test_a_detached_upload_the_origin_cannot_take_at_once_keeps_its_order(rig):
    """What the socket does not take at once goes to a copy loop (a kept greenlet) that waits
    for it: every byte in order, the stream's window stops meanwhile."""
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rig.inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    d = _Detached(rig)
    flood = _Flood(rig.far)  # the origin does not read at first
    assert flood.stalled_at() < 2 * 1024 * 1024
    flood.check(rig.visitor.recv)
    rig.visitor.close()
    assert d.result() == (flood.sent, 0)


def test_a_detached_answer_the_stream_cannot_take_at_once_keeps_its_order(rig):
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    rig.inner.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    d = _Detached(rig)
    flood = _Flood(rig.visitor)  # the far side does not read at first
    assert flood.stalled_at() < 2 * 1024 * 1024
    flood.check(rig.far.recv)
    rig.far.close()
    assert d.result() == (0, flood.sent)


def test_a_detached_splice_resets_the_stream_when_the_origin_resets(rig):
    origin = rig.visitor
    d = _Detached(rig)
    origin.sendall(b"half an ans")
    assert rig.far.recv(100) == b"half an ans"
    origin.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    origin.close()  # a reset, not a FIN: the visitor must not take it for a whole answer
    with pytest.raises(MuxError):
        rig.far.recv(100)
    assert d.result() == (0, 11)


def test_a_detached_splice_resets_the_origin_when_the_visitor_is_gone(rig):
    origin = rig.visitor
    d = _Detached(rig)
    rig.far.reset()  # the visitor's connection failed at the proxy
    with pytest.raises(ConnectionResetError):
        origin.recv(100)  # a reset, not an EOF: the origin must not take a cut upload for whole
    assert d.result() == (0, 0)
    assert rig.near.closed and rig.inner.fileno() == -1


def test_a_detached_splice_ends_with_its_session(rig):
    origin = rig.visitor
    d = _Detached(rig)
    rig.c.close()  # the tunnel is gone
    with pytest.raises(ConnectionResetError):
        origin.recv(100)
    assert d.result() == (0, 0)


def test_a_detached_splice_takes_bytes_and_eof_that_came_before_it(rig):
    """Bytes and the stream's EOF buffered before splice_detached (they came in the read that
    opened the stream): sent on, then the EOF."""
    origin = rig.visitor
    rig.far.sendall(b"early")
    rig.far.shutdown(socket.SHUT_WR)
    wait_until(lambda: rig.near.buffered == 5, 5)
    d = _Detached(rig)
    got = b""
    while (data := origin.recv(100)):
        got += data
    assert got == b"early"
    origin.sendall(b"ok")
    origin.close()
    assert rig.far.recv(100) == b"ok"
    assert d.result() == (5, 2)


def test_a_detached_splice_makes_no_sink_and_ends_clean_without_an_abort(rig):
    """A fresh connection's clean life (answer, FIN, the visitor's close) makes no sink or
    sender for the origin's socket (more of the visitor's bytes would get them with a copy
    loop) and closes both ends without _abort's cancels: 11 Python calls and 60 lines fewer per
    connection (bench/README.md, "Fresh connections: no greenlet in the client")."""
    origin = rig.visitor
    with PythonCalls() as calls:
        d = _Detached(rig)
        origin.sendall(b"answer")
        origin.close()
        assert rig.far.recv(100) == b"answer"
        assert rig.far.recv(100) == b""
        rig.far.close()
        assert d.result() == (0, 6)
    made = {"_Sink.__init__", "nowait_sendmsg", "sender", "_abort", "_Feeder.cancel"}
    assert not made & set(calls.names), made & set(calls.names)


def test_a_detached_splice_sets_up_in_few_python_calls(rig):
    """splice_detached's set-up for a fresh connection (nothing more from the visitor yet):
    its objects made, the answer's watcher started, in few Python calls of lib/: no look at the
    stream's waker with nothing buffered, no TCP_NOTSENT_LOWAT for a socket that has it
    (bench/README.md, "Fresh connections: the client's critical path": 15 before that pass);
    then the answer's end wakes no joiner it does not have."""
    from lib.net.sockets import connect_numeric
    from lib.net.splice import UNSENT_LOWAT

    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    for end in (rig.visitor, rig.inner):
        end.close()
    # The client's target socket: TCP_NOTSENT_LOWAT set as it was made (tcp_tuned).
    rig.inner = connect_numeric(socket.AF_INET, listener.getsockname(), 5, UNSENT_LOWAT)
    rig.visitor, _ = listener.accept()
    listener.close()
    with PythonCalls(under="lib") as calls:
        d = _Detached(rig)
    assert len(calls.names) <= 13, calls.names
    origin = rig.visitor
    with PythonCalls(under="lib") as calls:
        origin.sendall(b"answer")
        origin.close()
        assert rig.far.recv(100) == b"answer"
        assert rig.far.recv(100) == b""
    assert "_Answer._wake" not in calls.names
    rig.far.close()
    assert d.result() == (0, 6)


def test_the_answers_socket_closed_by_another_greenlet_ends_the_splice(rig, monkeypatch):
    """The answer's feeder borrows the socket's own watcher; a close of that socket by anyone
    but splice (which cancels the feeder first) has gevent throw the close's error at the
    watcher's callback owner: the feed ends as on a read error (the stream reset, splice over),
    no error in the hub."""
    hub_errors = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error",
                        lambda context, kind, value, tb: hub_errors.append(kind))
    g = gevent.spawn(splice, rig.near, rig.inner, b_answers=True)
    wait_until(lambda: read_watcher(rig.inner).active, 5)  # the answer's direction waits
    rig.far.settimeout(5)
    rig.inner.close()
    with pytest.raises(MuxError):
        rig.far.recv(100)
    g.get(timeout=5)
    assert not hub_errors



class _Upload:
    """``end`` sent 7 KiB pieces by a greenlet until ``stop`` or an error (the stream failed)."""

    def __init__(self, end):
        self.sent = 0
        self.writer = gevent.spawn(self._write, end)

    def _write(self, end) -> None:
        try:
            for _ in range(8 * 1024 // 7):
                end.sendall(b"u" * 7 * 1024)
                self.sent += 7 * 1024
        except MuxError:
            pass

    def stalled(self) -> None:
        """Once the writer stopped moving for half a second (10 s at most)."""
        _stalled_at(self)


def _spliced(rig, kind):
    """``rig.near`` spliced to ``rig.inner`` (the answer awaited): a result() to wait on."""
    if kind == "detached":
        return _Detached(rig)
    g = gevent.spawn(splice, rig.near, rig.inner, b_answers=True)
    g.result = lambda: g.get(timeout=5)
    return g


@pytest.mark.parametrize("end", ["session", "reset"])
@pytest.mark.parametrize("kind", ["splice", "detached"])
def test_a_stream_that_fails_while_the_origin_does_not_read_ends_the_splice(rig, kind, end):
    """The stream fails (the tunnel's session ends, or the visitor's stream is reset) while
    its copy loop waits for a socket that does not read (an upload the origin is slow to
    take): the splice ends then, both ends closed, the socket reset. It waited in the socket's
    send until the origin read again, for good if it never did (a descriptor and the splice
    held per such connection, and the client's streams_open)."""
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rig.inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    spliced = _spliced(rig, kind)
    upload = _Upload(rig.far)  # the origin does not read
    upload.stalled()
    if end == "session":
        rig.s.close()  # the tunnel is gone
    else:
        rig.far.reset()  # the visitor is gone
    spliced.result()
    assert rig.near.closed and rig.inner.fileno() == -1
    rig.visitor.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while rig.visitor.recv(65536):
            pass  # what the socket took before the end, then the reset
    upload.writer.get(timeout=5)


@pytest.mark.parametrize("kind", ["splice", "detached"])
def test_a_reset_after_the_streams_eof_still_lets_its_bytes_out_whole(rig, kind):
    """A reset behind the stream's EOF (the client aborted its side after the answer was
    whole) while the copy loop waits for the socket: the bytes buffered are all there is, and
    they go out, then a clean EOF, not a reset (recv returns them before the error)."""
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rig.inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    spliced = _spliced(rig, kind)
    upload = _Upload(rig.far)
    upload.stalled()
    upload.writer.kill()
    frames = rig.s.frames_received
    rig.far.shutdown(socket.SHUT_WR)
    rig.far.reset()
    wait_until(lambda: rig.s.frames_received >= frames + 2, 5)  # the FIN and the reset in
    rig.visitor.settimeout(5)
    total = 0
    while (data := rig.visitor.recv(65536)):
        total += len(data)
    assert total >= upload.sent
    rig.visitor.close()
    spliced.result()
