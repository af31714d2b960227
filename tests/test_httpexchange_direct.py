"""Direct delivery through an HTTP exchange: a routed HTTP connection's response body goes from
the session's reader to the visitor (lib.net.httpexchange.OneExchangeSocket.direct_senders,
lib.net.splice's sink) without waking the splice's copy loop, and the framer still sees every
byte: the head gets Connection: close, the response's end is found (Content-Length, chunked,
or the origin's close), what follows it is dropped, a second request goes nowhere, a visitor
that stops reading stops the stream's window, and the 502 answers an origin that sent nothing.
"""
from __future__ import annotations

import hashlib
import socket

import gevent
import gevent.socket as gsocket
import pytest

from lib.net.httpexchange import OneExchangeSocket
from lib.net.muxsession import Stream
from lib.net.sockets import nowait_sender
from lib.net.splice import splice
from tests.support.calls import NativeCalls
from tests.support.muxpair import session_pair, tcp_pair
from tests.support.switches import SwitchesInto
from tests.support.wait import wait_until

REQUEST = b"GET /big HTTP/1.1\r\nHost: web.test\r\n\r\n"
SECOND = b"GET /other HTTP/1.1\r\nHost: victim.test\r\nCookie: secret\r\n\r\n"
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
MIB = 1 << 20


class Rig:
    """A routed HTTP connection as the proxy splices it: the visitor's TCP connection
    (``visitor`` outside, ``exchange`` the proxy's OneExchangeSocket on ``inner``) and a mux
    stream (``near``, the proxy's; ``origin``, the client's end, which plays the origin)."""

    def __init__(self, head: bytes = REQUEST):
        self.c, self.s = session_pair()
        self.origin = self.c.open()
        self.origin.sendall(b"x")
        self.near = self.s.accept(timeout=5)
        assert self.near.recv(10) == b"x"
        self.visitor, inner = tcp_pair()
        self.exchange = OneExchangeSocket(inner, head)
        self.copy_loop = None  # the greenlet reading near (stream -> visitor), once it read

    def splice(self, **kw):
        real = Stream.recv
        near, rig = self.near, self

        def recv(st, *args, **kwargs):  # notes the copy loop's greenlet; counts its reads
            if st is near:
                rig.copy_loop = gevent.getcurrent()
                rig.reads += 1
            return real(st, *args, **kwargs)
        self.reads = 0
        self._mp.setattr(Stream, "recv", recv)
        g = gevent.spawn(splice, self.exchange, self.near, **kw)
        wait_until(lambda: self.copy_loop is not None, 5)
        return g

    def request(self) -> bytes:
        """What the origin receives of the visitor's request, up to its EOF."""
        got = b""
        while (data := self.origin.recv(65536)):
            got += data
        return got

    def response(self) -> bytes:
        """All the visitor receives, up to the proxy's FIN."""
        got = bytearray()
        while (data := self.visitor.recv(MIB)):
            got += data
        return bytes(got)


@pytest.fixture
def rig(monkeypatch):
    r = Rig()
    r._mp = monkeypatch
    yield r
    r.visitor.close()
    r.c.close()
    r.s.close()


def pattern(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def chunked(body: bytes, piece: int = 50_000) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                   for i in range(0, len(body), piece))
    return out + b"0\r\n\r\n"


def send_pieces(end, data: bytes, piece: int = 64 * 1024) -> None:
    for i in range(0, len(data), piece):
        end.sendall(data[i:i + piece])


def head_with_close(head: bytes) -> bytes:
    return head[:-2] + b"Connection: close\r\n\r\n"


def read_in_greenlet(sock):
    return gevent.spawn(lambda: b"".join(iter(lambda: sock.recv(MIB), b"")))


# --- the framer's properties, through the sink -------------------------------------------------

def test_a_length_body_is_delivered_direct_and_what_follows_it_is_dropped(rig):
    g = rig.splice()
    body = pattern(4 * MIB)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    reader = read_in_greenlet(rig.visitor)
    rig.origin.sendall(head)
    send_pieces(rig.origin, body + EVIL)  # the end inside a frame, a second answer after it
    rig.origin.sendall(EVIL)  # and in frames of its own, after the response's end
    got = reader.get(timeout=30)  # the proxy's FIN after the body: no wait for the origin's
    assert got == head_with_close(head) + body
    assert rig.exchange.dropped_response_bytes == 2 * len(EVIL)
    rig.origin.close()
    rig.visitor.close()
    g.get(timeout=5)


def test_a_chunked_body_ends_at_its_last_chunk_through_the_sink(rig):
    g = rig.splice()
    body = chunked(pattern(3 * MIB))
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader = read_in_greenlet(rig.visitor)
    rig.origin.sendall(head)
    send_pieces(rig.origin, body + EVIL, piece=7 * 1024 + 3)  # chunk lines cut across frames
    got = reader.get(timeout=30)
    assert got == head_with_close(head) + body
    assert rig.exchange.dropped_response_bytes == len(EVIL)
    rig.origin.close()
    rig.visitor.close()
    g.get(timeout=5)


def test_a_close_delimited_body_flows_until_the_origin_closes(rig):
    g = rig.splice()
    body = pattern(2 * MIB)
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    reader = read_in_greenlet(rig.visitor)
    rig.origin.sendall(head)
    send_pieces(rig.origin, body)
    gevent.sleep(0.05)
    assert not reader.ready()  # no end but the origin's
    rig.origin.close()
    assert reader.get(timeout=30) == head_with_close(head) + body
    rig.visitor.close()
    g.get(timeout=5)


def test_a_malformed_chunk_in_the_body_aborts_the_connection(rig):
    g = rig.splice()
    reader = gevent.spawn(lambda: _read_until_error(rig.visitor))
    rig.origin.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    send_pieces(rig.origin, chunked(pattern(MIB))[:-5])
    rig.origin.sendall(b"zz\r\n" + EVIL)  # not a chunk-size line: nothing after it passes
    got, error = reader.get(timeout=30)
    assert EVIL not in got and error is not None  # a reset, not a clean end
    g.get(timeout=5)


def _read_until_error(sock) -> tuple[bytes, Exception | None]:
    got = bytearray()
    try:
        while (data := sock.recv(MIB)):
            got += data
    except OSError as e:
        return bytes(got), e
    return bytes(got), None


def test_the_second_request_is_refused_while_the_body_goes_direct(rig):
    g = rig.splice()
    body = pattern(2 * MIB)
    rig.visitor.sendall(SECOND)  # a pooling front's next visitor, on the same connection
    assert rig.request() == head_with_close(REQUEST)  # then EOF: the second went nowhere
    reader = read_in_greenlet(rig.visitor)
    rig.origin.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    send_pieces(rig.origin, body)
    assert reader.get(timeout=30).endswith(body)
    assert rig.exchange.dropped_requests == 1
    rig.origin.close()
    rig.visitor.close()
    g.get(timeout=5)


def test_an_origin_that_sends_nothing_gets_the_visitor_a_502(rig):
    g = rig.splice(fallback_to_a=BAD_GATEWAY)
    rig.origin.close()
    assert rig.response() == head_with_close(BAD_GATEWAY)  # (sent through the framer too)
    rig.visitor.close()
    g.get(timeout=5)


def test_a_malformed_head_met_by_the_sink_still_gets_the_502(rig):
    g = rig.splice(fallback_to_a=BAD_GATEWAY)
    rig.origin.sendall(b"HTTP/1.1 2000 Nope\r\n\r\n" + EVIL)
    assert rig.response() == head_with_close(BAD_GATEWAY)
    rig.visitor.close()
    g.get(timeout=5)


def test_a_visitor_that_stops_reading_stops_the_window_and_the_end_is_still_found(rig):
    rig.visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    g = rig.splice()
    body = chunked(pattern(8 * MIB))
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    sent = [0]

    def write():
        rig.origin.sendall(head)
        for i in range(0, len(body) + len(EVIL), 48 * 1024 + 7):
            piece = (body + EVIL)[i:i + 48 * 1024 + 7]
            rig.origin.sendall(piece)
            sent[0] += len(piece)
    writer = gevent.spawn(write)
    last = [-1]

    def stalled():
        now, last[0] = last[0], sent[0]
        return now == last[0]
    wait_until(stalled, timeout=10, every=0.5)
    assert sent[0] < 2 * MIB  # nobody reads the visitor: the window closed early
    got = rig.response()  # partial sends left judged bytes with the stream: in order, once
    assert hashlib.sha256(got).digest() == hashlib.sha256(head_with_close(head) + body).digest()
    assert rig.exchange.dropped_response_bytes == len(EVIL)
    writer.get(timeout=10)
    rig.origin.close()
    rig.visitor.close()
    g.get(timeout=5)


# --- what direct delivery saves ----------------------------------------------------------------

def test_a_bulk_body_wakes_the_copy_loop_a_few_times_not_per_read(rig):
    """Red without direct delivery for an exchange (lib.net.splice's copy loop reads the
    stream, up to 256 KiB at a time, and sends through the framer): 39 switches into the copy
    loop for the head and an 8 MiB body; with it none but for what the visitor's socket did
    not take at once."""
    g = rig.splice()
    body = pattern(8 * MIB)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    reader = read_in_greenlet(rig.visitor)
    reads = rig.reads
    with SwitchesInto(rig.copy_loop) as into:
        rig.origin.sendall(head)
        send_pieces(rig.origin, body)
        got = reader.get(timeout=30)
    assert got == head_with_close(head) + body
    assert into.count / 8 <= 1, f"{into.count} switches into the copy loop for 8 MiB"
    assert (rig.reads - reads) / 8 <= 1
    rig.origin.close()
    rig.visitor.close()
    g.get(timeout=5)


def test_a_small_answer_goes_out_whole_from_the_sink(rig):
    """A fresh connection's answer (head, body and the origin's FIN in one read): the head
    rewritten and the body leave from the session's reader in one send, and the visitor gets
    our FIN after it; the copy loop wakes only for the stream's end. Red when heads are left
    to the copy loop's sendall (its read, waiting already, returns the answer and one more
    finds the end; with the head sent from the sink the waiting read returns the end)."""
    g = rig.splice(fallback_to_a=BAD_GATEWAY)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world\n"
    reads = rig.reads
    rig.origin.sendall(answer)
    assert rig.response() == head_with_close(answer[:-13]) + b"hello, world\n"
    rig.origin.close()
    rig.visitor.close()
    g.get(timeout=5)
    assert rig.reads == reads  # the read waiting already found the end


def test_bytes_judged_but_not_taken_are_sent_unread_and_the_rest_framed():
    """The sink's send_now read a piece of the body that the socket took only part of; the
    copy loop's sendall then gets that rest with more behind it (the body's end and a second
    answer): the rest goes out as it is, the framer reads only what follows it."""
    a, b = gsocket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    try:
        exchange = OneExchangeSocket(a, REQUEST)
        sendall, send_now, _ = exchange.direct_senders()
        body = pattern(2 * MIB)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        sendall(head + body[:100])  # the head by the copy loop (rewritten)
        taken = send_now(body[100:MIB])
        assert 0 < taken < MIB - 100  # the socket is full: the rest was read, not sent
        reader = read_in_greenlet(b)
        sendall(body[100 + taken:] + EVIL)  # the rest, then what the framer has not read
        assert reader.get(timeout=30) == head_with_close(head) + body
        assert exchange.dropped_response_bytes == len(EVIL)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("with_body", [False, True])
def test_a_head_the_socket_did_not_take_is_sent_first_by_the_copy_loop(with_body):
    """The sink read a head (and maybe some body) that a full socket did not take: the head's
    rewritten bytes are owed and the stream keeps bytes to wake the copy loop (the body's, or
    one byte of the head, read already); its sendall sends the owed head before them, and the
    framer reads nothing twice."""
    a, b = gsocket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        exchange = OneExchangeSocket(a, REQUEST)
        sendall, send_now, _ = exchange.direct_senders()
        fill, filled = nowait_sender(a), 0
        while True:  # the visitor's socket full: nothing more goes now
            try:
                filled += fill(b"\0" * 65536)
            except BlockingIOError:
                break
        body = pattern(MIB)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        first = head + body[:1000] if with_body else head
        taken = send_now(first)
        assert taken == (len(head) if with_body else len(head) - 1)
        reader = read_in_greenlet(b)
        sendall(first[taken:])  # the copy loop, with what the stream kept
        sendall(body[len(first) - len(head):] + EVIL)
        got = reader.get(timeout=30)
        assert got[filled:] == head_with_close(head) + body
        assert exchange.dropped_response_bytes == len(EVIL)
    finally:
        a.close()
        b.close()


def test_direct_senders_are_offered_for_a_socket_only():
    a, b = socket.socketpair()  # not a gevent socket: the copy loop's sendall serves it
    try:
        assert OneExchangeSocket(a, REQUEST).direct_senders() is None
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("head, reads", [
    (b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n", 1),
    # a body to come: the read tries first, as any read (EAGAIN, then the wait)
    (b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 2\r\n\r\n", 2),
])
def test_a_whole_requests_next_read_waits_before_it_reads(head, reads):
    """A request whole in its head has nothing behind it for now: the exchange's next read (the
    splice's first, lib.net.splice) waits for the visitor's socket to be readable before it
    reads, where a read finding nothing (an EAGAIN recv) came first. What comes then is read
    as before: here the visitor's body, or its EOF."""
    outside, inner = tcp_pair()
    exchange = OneExchangeSocket(inner, head)
    assert exchange.take_head().startswith(head.split(b"\r\n")[0])
    # Only the visitor socket's own reads: another test's greenlet left running may read too.
    with NativeCalls(fd=inner.fileno()) as calls:
        reader = gevent.spawn(exchange.recv, 65536)
        gevent.sleep(0.01)  # the reader waits: the visitor sent nothing after the head
        outside.sendall(b"ok")
        assert reader.get(timeout=5) == (b"" if reads == 1 else b"ok")
    assert calls.count("recv_into") == reads
    outside.close()
    inner.close()


def test_a_whole_requests_wait_ends_with_an_error_when_the_socket_is_closed_under_it():
    """The wait is on the socket's own watcher: a close from another greenlet (the splice's
    abort) ends it with an error, as it ends a read."""
    outside, inner = tcp_pair()
    exchange = OneExchangeSocket(inner, b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
    exchange.take_head()
    reader = gevent.spawn(exchange.recv, 65536)
    gevent.sleep(0.01)
    inner.close()
    with pytest.raises(OSError):
        reader.get(timeout=5)
    outside.close()


def test_a_small_answer_offered_whole_takes_few_python_calls():
    """The origin's answer, head and body in one piece, goes to the visitor from the session's
    reader (the sink's send_now): on the time to a fresh connection's first byte. Counted in
    Python calls: one Content-Length value is read without the list's reading, and a body that
    is all the rest of the piece is sent without cutting it (15 calls before, 13 after; the
    sink's senders 5 -> 3: the one-send offer, which such an answer never uses, is made at its
    first use), and the visitor still gets the head with Connection: close, the body, then our
    FIN."""
    from lib.net.sockets import AcceptedSocket
    from lib.protocol.httphead import parse_request_head
    from tests.support.calls import PythonCalls

    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
              b"hello, world\n")
    ours, peer = socket.socketpair()
    visitor = AcceptedSocket(ours.family, ours.type, ours.proto, ours.detach(), "127.0.0.1:80")
    with visitor, peer:
        exchange = OneExchangeSocket(visitor, REQUEST,
                                     request=parse_request_head(REQUEST.rstrip(b"\r\n")))
        assert exchange.take_head().endswith(b"Connection: close\r\n\r\n")
        with PythonCalls() as setup:  # the one-send offer is made only if it is needed
            _, send_now, _ = exchange.direct_senders()
        assert len(setup.names) <= 3, setup.names
        with PythonCalls() as calls:
            assert send_now(answer) == len(answer)
        assert len(calls.names) <= 13, calls.names
        peer.settimeout(5)
        got = b""
        while chunk := peer.recv(4096):
            got += chunk
        assert got == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
                       b"Connection: close\r\n\r\nhello, world\n")


@pytest.mark.parametrize("head, events", [
    (REQUEST, 0),
    (b"GET /ws HTTP/1.1\r\nHost: web.test\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
     1),
])
def test_only_an_upgrade_request_makes_an_event_for_its_answer(monkeypatch, head, events):
    """A fresh connection's exchange makes no gevent Event unless its request asks to upgrade
    (only then do reads wait for the answer): one object fewer per connection, and the answer's
    end still shuts the visitor's side after the body (bench/README.md, "Fresh connections:
    the exchange's objects")."""
    import gevent.event

    made = []

    class Counted(gevent.event.Event):
        def __init__(self):
            made.append(self)
            super().__init__()
    monkeypatch.setattr(gevent.event, "Event", Counted)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ours, peer = socket.socketpair()
    visitor = gsocket.socket(ours.family, ours.type, ours.proto, ours.detach())
    with visitor, peer:
        exchange = OneExchangeSocket(visitor, head)
        exchange.take_head()
        exchange.sendall(answer)
        exchange.close()
        peer.settimeout(5)
        got = b""
        while chunk := peer.recv(4096):
            got += chunk
    assert len(made) == events
    assert got.endswith(b"ok")
