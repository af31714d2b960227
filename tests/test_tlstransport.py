"""TLSTransport: real TLS through a MemoryBIO, against the standard SSLSocket on the other end."""
import contextlib
import os
import socket
import ssl

import gevent
import gevent.socket as gsocket
import gevent.ssl
import pytest

from lib.net.muxsession import Session
from lib.net.tlstransport import RECORDS_PER_READ, TLSTransport
from tests.support.calls import PythonCalls
from tests.support.muxpair import (SERVER_NAME, Pki, pki,  # noqa: F401 (pki: a fixture)
                                   tcp_pair, tls_pair as pair)


def test_many_small_records_arrive_in_one_recv(pki):
    c, s = pair(pki, client_bio=False)  # the sender is a plain SSLSocket
    for i in range(200):
        c.sendall(b"%03d," % i)  # 200 separate TLS records of 4 bytes
    gevent.sleep(0.1)
    data = s.recv(1 << 20)
    assert data == b"".join(b"%03d," % i for i in range(200))  # all in one call


def test_bulk_both_ways_and_eof(pki):
    c, s = pair(pki)
    blob = os.urandom(3_000_000)
    g = gevent.spawn(lambda: (c.sendall(blob), c.shutdown(socket.SHUT_WR)))
    got = bytearray()
    while (d := s.recv(1 << 18)):
        got += d
    g.get(timeout=10)
    assert bytes(got) == blob
    s.sendall(b"reply")
    assert c.recv(100) == b"reply"


def test_certificate_checks_still_apply(pki):
    _, _, ca = pki
    server_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("other.test").configure_cert(server_ctx)
    client_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    a, b = gsocket.socketpair()
    g = gevent.spawn(lambda: TLSTransport.server(b, server_ctx))
    with pytest.raises(ssl.SSLCertVerificationError):
        TLSTransport.client(a, client_ctx, "tunnel.test")
    a.close()
    with pytest.raises(OSError):
        g.get(timeout=10)


def test_handshake_timeout(pki):
    server_ctx, _, _ = pki
    a, b = gsocket.socketpair()
    with pytest.raises(TimeoutError):
        TLSTransport.server(b, server_ctx, timeout=0.2)  # the client never speaks


def test_mux_session_over_it(pki):
    c, s = pair(pki)
    cs, ss = Session(c, client=True), Session(s, client=False)
    st = cs.open()
    # In a greenlet: past 64 KiB the window grows only as the peer reads (lib.protocol.muxstate).
    g = gevent.spawn(lambda: (st.sendall(b"x" * 500_000), st.shutdown(socket.SHUT_WR)))
    peer = ss.accept(timeout=5)
    got = b""
    while (d := peer.recv(1 << 20)):
        got += d
    assert got == b"x" * 500_000
    g.get(timeout=5)
    cs.close()


class _CountingRaw(gevent._socket3._wrefsocket):
    """The descriptor under a gevent socket, counting reads that found nothing (EAGAIN) and
    recording the sizes asked of recv()."""
    __slots__ = ()
    empty_reads = 0
    recv_sizes: list = []

    def recv(self, *args):
        _CountingRaw.recv_sizes.append(args[0])
        try:
            return super().recv(*args)
        except BlockingIOError:
            _CountingRaw.empty_reads += 1
            raise

    def recv_into(self, buffer, *args):
        try:
            return super().recv_into(buffer, *args)
        except BlockingIOError:
            _CountingRaw.empty_reads += 1
            raise


class _CountingSocket(gsocket.socket):
    _gevent_sock_class = _CountingRaw


def counting_pair(pki):
    """A TLS pair whose server end reads through a _CountingSocket."""
    a, b = socket.socketpair()
    return pair(pki, sockets=(gsocket.socket(fileno=a.detach()),
                              _CountingSocket(fileno=b.detach())))


def _echo(t):
    while (d := t.recv(100)):
        t.sendall(d)


@contextlib.contextmanager
def _echoing(c, s):
    """``s`` echoes what ``c`` sends, after one warm-up exchange; ``c`` is closed at the end."""
    echo = gevent.spawn(_echo, s)
    c.sendall(b"first")
    assert c.recv(100) == b"first"
    yield
    c.close()
    echo.get(timeout=5)


def _ping_pong(c, n: int) -> None:
    for i in range(n):
        c.sendall(b"ping %d" % i)
        assert c.recv(100) == b"ping %d" % i


def test_a_drained_socket_is_waited_on_not_read_in_vain(pki):
    # A short read left the kernel's buffer empty: the next read waits for readability first
    # instead of failing with EAGAIN (a system call and an exception per message:
    # bench/README.md, "Per-request cost").
    c, s = counting_pair(pki)
    with _echoing(c, s):
        _CountingRaw.empty_reads = 0
        _ping_pong(c, 30)
        assert _CountingRaw.empty_reads == 0
        assert s.waits_before_read


def test_close_ends_a_read_waiting_for_readability(pki):
    c, s = pair(pki)
    c.sendall(b"one")
    assert s.recv(100) == b"one"  # drained: the next read waits on the descriptor
    reader = gevent.spawn(s.recv, 100)
    gevent.sleep(0.05)
    assert not reader.ready()
    s.close()
    with pytest.raises(OSError):
        reader.get(timeout=5)



def _contexts(pki: Pki, server_obj=None, client_obj=None) -> Pki:
    """New contexts under ``pki``'s CA whose TLSTransports use the given SSLObject subclasses:
    ``SSLContext.sslobject_class``, the standard library's hook for what ``wrap_bio`` makes
    (the fixture's contexts are shared by the module and left alone)."""
    server = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki.ca.issue_cert(SERVER_NAME).configure_cert(server)
    client = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(client)
    if server_obj is not None:
        server.sslobject_class = server_obj
    if client_obj is not None:
        client.sslobject_class = client_obj
    return Pki(server, client, pki.ca)


class _RecordsReads(ssl.SSLObject):
    """An SSLObject recording the sizes asked of read() and whether it was given a buffer to
    decrypt into (class-wide: the test resets them)."""
    sizes: list = []
    into: list = []

    def read(self, len=1024, buffer=None):
        _RecordsReads.sizes.append(len)
        _RecordsReads.into.append(buffer is not None)
        return super().read(len, buffer)


def test_a_message_costs_no_read_sized_allocation(pki):
    # SSLObject.read(n) and socket.recv(n) allocate n bytes before shrinking them to what came:
    # asked for 256 KiB, that was a large allocation per record and per raw read (under glibc an
    # mmap and munmap each: bench/README.md, "Per-request cost").
    c, s = counting_pair(_contexts(pki, server_obj=_RecordsReads))
    _RecordsReads.sizes = []
    _CountingRaw.recv_sizes = []
    c.sendall(b"ping")
    assert s.recv(1 << 20) == b"ping"
    assert max(_RecordsReads.sizes) <= 16 * 1024
    assert not [n for n in _CountingRaw.recv_sizes if n > 16 * 1024]
    c.close()


def test_records_are_decrypted_into_one_buffer_and_handed_out_uncopied(pki):
    # recv_view: every record decrypted straight into the transport's own buffer (no bytes
    # object per record, no join), and the views handed out are of that one buffer.
    c, s = pair(_contexts(pki, server_obj=_RecordsReads))
    _RecordsReads.into = []
    blob = os.urandom(300_000)
    g = gevent.spawn(lambda: (c.sendall(blob), c.shutdown(socket.SHUT_WR)))
    got, owners = bytearray(), set()
    while (v := s.recv_view(1 << 18)):
        owners.add(id(v.obj))
        got += v
    g.get(timeout=10)
    assert bytes(got) == blob
    into = _RecordsReads.into
    assert len(owners) == 1 and all(into) and len(into) >= 300_000 // 16384


def test_the_mux_reader_takes_views_not_copies(pki):
    c, s = pair(pki)
    copies = []
    real = s.recv
    s.recv = lambda *a: copies.append(a) or real(*a)  # a copy per read: must not be called
    cs, ss = Session(c, client=True), Session(s, client=False)
    st = cs.open()
    g = gevent.spawn(lambda: (st.sendall(b"y" * 200_000), st.shutdown(socket.SHUT_WR)))
    peer = ss.accept(timeout=5)
    got = b""
    while (d := peer.recv(1 << 20)):
        got += d
    assert got == b"y" * 200_000 and not copies
    g.get(timeout=5)
    cs.close()


class _CountingSSLObject(ssl.SSLObject):
    """An SSLObject counting the reads that raised SSLWantReadError (class-wide)."""
    want_read = 0

    def read(self, len=1024, buffer=None):
        try:
            return super().read(len, buffer)
        except ssl.SSLWantReadError:
            _CountingSSLObject.want_read += 1
            raise


def test_a_message_is_read_without_a_want_read_exception(pki):
    # SSLObject.read raises SSLWantReadError when the BIO holds no whole record: an exception
    # built twice per message read (before the raw read, after the last record), ~1.7 us each
    # (bench/README.md, "Per-request cost (issue 16)", kapath pass). Read only with bytes there.
    c, s = pair(_contexts(pki, client_obj=_CountingSSLObject))
    with _echoing(c, s):
        _CountingSSLObject.want_read = 0
        _ping_pong(c, 30)
        assert _CountingSSLObject.want_read == 0


class _WritesWhileReading(ssl.SSLObject):
    """An SSLObject whose first read with data also seals a record of its own, as a TLS 1.3
    KeyUpdate the peer asked for would (the standard library cannot make one on demand)."""
    sealed = False

    def read(self, len=1024, buffer=None):
        got = super().read(len, buffer)
        if not _WritesWhileReading.sealed:
            _WritesWhileReading.sealed = True
            self.write(b"sealed while reading")
        return got


def test_records_a_nowait_read_produces_leave_without_a_write(pki):
    # read_nowait (the mux session's hub reader) must not wait to send them, nor keep them
    # until the next write: they are offered to the kernel at once.
    c, s = pair(_contexts(pki, server_obj=_WritesWhileReading))
    _WritesWhileReading.sealed = False
    c.sendall(b"ping")
    with gevent.Timeout(5):
        while (got := s.read_nowait()) is None:
            gevent.sleep(0.01)
    assert bytes(got) == b"ping"
    with gevent.Timeout(5):
        assert c.recv(100) == b"sealed while reading"
    c.close()
    s.close()


def test_a_nowait_message_runs_no_python_frame_under_the_transport(pki):
    # The mux session's hub reader and flush (read_nowait, write_nowait) run once per
    # keep-alive request in each process: the SSL object's C methods and the OS socket's are
    # called directly, with no ssl.py wrapper, piece helper or socket closure under them
    # (bench/README.md, "Per-request cost (issue 16)", branch ka3), and read_nowait is the
    # decrypting loop itself. 3 frames more each way before: SSLObject.read/write, _piece, the
    # scratch reader's closure, and read_nowait above _decrypt.
    c, s = pair(pki)
    for i in range(20):
        message = b"ping %d" % i
        with PythonCalls() as wrote:
            assert c.write_nowait(message)
        gsocket.wait_read(s.fileno(), timeout=5)
        with PythonCalls() as read:
            got = bytes(s.read_nowait())
        assert got == message
        assert wrote.names == ["TLSTransport.write_nowait"]
        assert read.names == ["TLSTransport._decrypt"]  # (read_nowait is it)
    c.close()
    s.close()


def test_a_subclassed_ssl_object_keeps_its_own_methods(pki):
    # Only a plain SSLObject is bypassed (_ssl_calls): a subclass may change read or write.
    c, s = pair(_contexts(pki, server_obj=_RecordsReads))
    _RecordsReads.sizes.clear()
    c.write_nowait(b"hello")
    gsocket.wait_read(s.fileno(), timeout=5)
    assert bytes(s.read_nowait()) == b"hello"
    assert _RecordsReads.sizes
    c.close()
    s.close()


def test_write_idle_follows_the_tail_and_the_writes_that_wait(pki):
    # write_idle is an attribute (the mux session's flush reads it once per keep-alive
    # request: no Python frame), kept where the tail or the write lock change.
    c, s = pair(pki, small_buffers=True)
    with PythonCalls() as calls:
        assert c.write_idle
    assert calls.names == []
    assert not c.write_nowait(b"x" * 200_000)  # the kernel takes part: a tail
    assert not c.write_idle

    def drain():
        while s.recv(1 << 20):
            pass
    reader = gevent.spawn(drain)
    with gevent.Timeout(10):
        c.flush_tail()  # waits for the peer to read
    assert c.write_idle
    reader.kill()
    writer = gevent.spawn(c.sendall, b"y" * 400_000)  # more than the buffers hold, no reader
    for _ in range(3):
        gevent.sleep(0)
    assert not writer.ready() and not c.write_idle  # a write under way, waiting
    reader = gevent.spawn(drain)
    writer.get(timeout=10)
    assert c.write_idle
    reader.kill()
    c.close()
    s.close()


def test_a_read_decrypts_at_most_a_budget_of_records(pki):
    # A peer's 1-byte records were all decrypted in one read, in one hub callback (11,000 in
    # one 253 KB write: 33-72 ms of the hub, docs/SECURITY.md). A read stops at
    # RECORDS_PER_READ and says more is left (read_buffered); the next read goes on from there.
    c, s = pair(pki, sockets=tcp_pair())  # (a socketpair's buffer counts every tiny send whole)
    total = 3 * RECORDS_PER_READ + 100
    for i in range(total):
        assert c.write_nowait(bytes([i % 251]))  # one record each
    got = []
    with gevent.Timeout(10):
        while sum(map(len, got)) < total:
            if not s.read_buffered:
                gsocket.wait_read(s.fileno(), timeout=5)
            view = s.read_nowait()
            if view:
                got.append(bytes(view))
    assert b"".join(got) == bytes(i % 251 for i in range(total))
    assert max(map(len, got)) == RECORDS_PER_READ
    assert not s.read_buffered
    c.close()
    s.close()
