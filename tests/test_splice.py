"""splice(): half-close both ways, fallback before the first byte, idle timeout."""
import gc
import socket
import time

import gevent
import gevent.socket as gsocket

from lib.net.muxsession import Session
from lib.net.splice import UNSENT_LOWAT, splice


def test_half_close_carried_and_counts():
    a_out, a_in = gsocket.socketpair()
    b_in, b_out = gsocket.socketpair()
    counted = []
    g = gevent.spawn(splice, a_in, b_in, on_a_to_b=counted.append)
    a_out.sendall(b"request")
    a_out.shutdown(socket.SHUT_WR)
    assert b_out.recv(100) == b"request"
    assert b_out.recv(100) == b""  # FIN went through
    b_out.sendall(b"reply after FIN")  # the other direction still flows
    b_out.shutdown(socket.SHUT_WR)
    assert a_out.recv(100) == b"reply after FIN"
    assert g.get(timeout=5) == (7, 15)
    assert counted == [7]


def test_fallback_sent_when_b_ends_before_first_byte():
    a_out, a_in = gsocket.socketpair()
    b_in, b_out = gsocket.socketpair()
    g = gevent.spawn(splice, a_in, b_in, fallback_to_a=b"HTTP/1.0 502 Bad Gateway\r\n\r\n")
    b_out.close()
    assert a_out.recv(100).startswith(b"HTTP/1.0 502")
    g.get(timeout=5)


def test_idle_timeout_ends_silent_connection_but_not_a_busy_one():
    a_out, a_in = gsocket.socketpair()
    b_in, b_out = gsocket.socketpair()
    g = gevent.spawn(splice, a_in, b_in, idle_timeout=0.3)
    # one direction busy for 1 s: the silent other direction must not end it
    for _ in range(10):
        a_out.sendall(b"x")
        assert b_out.recv(10) == b"x"
        gevent.sleep(0.1)
    assert not g.ready()
    t0 = time.monotonic()
    g.get(timeout=5)  # now both silent: ends after ~0.3-0.6 s
    assert time.monotonic() - t0 < 1.5


def test_idle_timeout_arms_no_timeout_per_read():
    # One timer per splice bounds idleness: an end with a timeout of its own would make gevent
    # arm a Timeout object for every read that waits (bench/README.md, "Per-request cost").
    a_out, a_in = gsocket.socketpair()
    b_in, b_out = gsocket.socketpair()
    g = gevent.spawn(splice, a_in, b_in, idle_timeout=30)
    a_out.sendall(b"ping")
    assert b_out.recv(10) == b"ping"
    assert a_in.gettimeout() is None and b_in.gettimeout() is None
    a_out.close()
    b_out.close()
    g.get(timeout=5)


def test_splices_share_one_idle_timer():
    """Splices with one idle_timeout make no timer of their own (a loop timer made, started,
    stopped and closed per connection): one timer looks at all of them. Counted as the loop
    timers alive while 20 splices are (the garbage collector's list of objects)."""
    timer_type = type(gevent.get_hub().loop.timer(1.0))
    before = sum(type(o) is timer_type for o in gc.get_objects())
    pairs = [(gsocket.socketpair(), gsocket.socketpair()) for _ in range(20)]
    gs = [gevent.spawn(splice, a[1], b[0], idle_timeout=29.5) for a, b in pairs]
    gevent.idle()  # every splice started (no timer of the test's own alive: a sleep's)
    alive = sum(type(o) is timer_type for o in gc.get_objects()) - before
    for a, b in pairs:
        a[0].close()
        b[1].close()
    for g in gs:
        g.get(timeout=5)
    assert alive <= 1


def test_a_shared_idle_timer_ends_the_silent_splice_only():
    """Two splices on one idle timer: the silent one ends, the busy one goes on."""
    silent = [gsocket.socketpair(), gsocket.socketpair()]
    busy = [gsocket.socketpair(), gsocket.socketpair()]
    g_silent = gevent.spawn(splice, silent[0][1], silent[1][0], idle_timeout=0.3)
    g_busy = gevent.spawn(splice, busy[0][1], busy[1][0], idle_timeout=0.3)
    for _ in range(10):
        busy[0][0].sendall(b"x")
        assert busy[1][1].recv(10) == b"x"
        gevent.sleep(0.1)
    assert g_silent.ready() and not g_busy.ready()
    g_silent.get()
    g_busy.get(timeout=5)  # silent now too: it ends


def test_idle_timeout_before_any_answer_sends_the_fallback():
    a_out, a_in = gsocket.socketpair()
    b_in, b_out = gsocket.socketpair()
    g = gevent.spawn(splice, a_in, b_in, idle_timeout=0.2,
                     fallback_to_a=b"HTTP/1.1 502 x\r\n\r\n")
    a_out.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert b_out.recv(100).startswith(b"GET")
    assert a_out.recv(100).startswith(b"HTTP/1.1 502")  # b said nothing: idle, then the 502
    g.get(timeout=5)


def test_works_with_mux_streams():
    a, b = gsocket.socketpair()
    c, s = Session(a, client=True), Session(b, client=False)
    st = c.open()
    peer = s.accept(timeout=5)
    x_out, x_in = gsocket.socketpair()
    g = gevent.spawn(splice, x_in, peer)
    x_out.sendall(b"through the stream")
    assert st.recv(100) == b"through the stream"
    st.sendall(b"back")
    st.shutdown(socket.SHUT_WR)
    assert x_out.recv(100) == b"back"
    x_out.shutdown(socket.SHUT_WR)
    assert st.recv(100) == b""
    g.get(timeout=5)
    c.close()
    s.close()


class _CountingTransport:
    """A socket recording each write a mux session's writer makes on it."""

    def __init__(self, sock):
        self.sock = sock
        self.writes = []

    def sendall(self, data):
        self.writes.append(bytes(data))
        self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_bytes_waiting_at_a_leave_with_what_was_just_written_to_b():
    # The proxy writes StartProxy on a new stream, then splices; the visitor's request head is
    # already waiting: it must leave in the same transport write (one TLS record, one send())
    # as the SYN and StartProxy, not in a second one after a hub turn.
    x, y = gsocket.socketpair()
    transport = _CountingTransport(x)
    c, s = Session(transport, client=True), Session(y, client=False)
    pub_out, pub_in = gsocket.socketpair()
    pub_out.sendall(b"GET / HTTP/1.1")
    warm = c.open()  # a first exchange: the session's own first writes are out
    warm.sendall(b"x")
    assert s.accept(timeout=5).recv(10) == b"x"
    before = len(transport.writes)

    def forward():
        st = c.open()
        st.sendall(b"StartProxy|")
        splice(pub_in, st)
    g = gevent.spawn(forward)
    peer = s.accept(timeout=5)
    assert peer.recv(100) == b"StartProxy|GET / HTTP/1.1"
    assert len(transport.writes) == before + 1
    pub_out.close()
    peer.close()
    g.get(timeout=5)
    c.close()
    s.close()


def test_failure_reaches_the_other_end_as_a_reset_not_a_clean_end():
    # The public side dies mid-upload: the origin (here a mux stream's peer) must see a reset,
    # not an EOF that would pass a truncated upload off as complete.
    a, b = gsocket.socketpair()
    c, s = Session(a, client=True), Session(b, client=False)
    origin_side = c.open()
    proxy_side = s.accept(timeout=5)
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    pub_out = gsocket.create_connection(lsock.getsockname())  # TCP: a reset is a reset
    pub_in, _ = lsock.accept()
    lsock.close()
    g = gevent.spawn(splice, pub_in, proxy_side)
    pub_out.sendall(b"partial upload")
    assert origin_side.recv(100) == b"partial upload"
    pub_out.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, __import__("struct").pack("ii", 1, 0))
    pub_out.close()  # not an orderly FIN: the visitor's connection broke
    g.get(timeout=5)
    import pytest
    from lib.errors import StreamReset
    with pytest.raises(StreamReset):
        while origin_side.recv(100):
            pass
    c.close()
    s.close()


class _TimesOut:
    """A socket whose own timeout fires on the first recv (as one with settimeout() would)."""

    def __init__(self, sock):
        self.sock = sock
        self.fired = False

    def recv(self, n):
        if not self.fired:
            self.fired = True
            raise TimeoutError("timed out")
        return self.sock.recv(n)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_an_ends_own_timeout_without_idle_timeout_ends_both_cleanly():
    # --idle-timeout 0 means idle_timeout=None; an end's own timeout then used to raise a
    # TypeError (comparing with None) past the OSError handler, out of the splice.
    a_out, a_in = gsocket.socketpair()
    b_in, b_out = gsocket.socketpair()
    g = gevent.spawn(splice, _TimesOut(a_in), b_in, idle_timeout=None)
    assert g.get(timeout=5) == (0, 0)  # ended as an error: both ends aborted, no exception
    assert b_out.recv(10) == b""


def test_tcp_ends_get_a_bounded_unsent_queue():
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(2)
    a_out = gsocket.create_connection(lsock.getsockname())
    a_in, _ = lsock.accept()
    b_in, b_out = gsocket.socketpair()
    g = gevent.spawn(splice, a_in, b_in)
    try:
        b_out.sendall(b"x")
        assert a_out.recv(10) == b"x"
        assert a_in.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == UNSENT_LOWAT
    finally:
        for s in (a_out, b_out):
            s.close()
        g.get(timeout=5)



class _RecordsReads(gsocket.socket):
    """A gevent socket recording the sizes asked of recv(): recv(n) allocates n bytes."""
    sizes: list = []

    def recv(self, n, *args):
        _RecordsReads.sizes.append(n)
        return super().recv(n, *args)


def test_socket_reads_allocate_no_read_sized_buffer():
    # A socket's recv(256 KiB) allocated 256 KiB per read before shrinking it (under glibc an
    # mmap and munmap each time); reads go through one scratch buffer (lib.net.sockets).
    x, y = socket.socketpair()
    a_out, a_in = gsocket.socket(fileno=x.detach()), _RecordsReads(fileno=y.detach())
    b_in, b_out = gsocket.socketpair()
    g = gevent.spawn(splice, a_in, b_in)
    for _ in range(3):
        a_out.sendall(b"ping")
        assert b_out.recv(10) == b"ping"
    assert not [n for n in _RecordsReads.sizes if n > 16 * 1024]
    a_out.close()
    b_out.close()
    g.get(timeout=5)
