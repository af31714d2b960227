"""TLSTransport: real TLS through a MemoryBIO, against the standard SSLSocket on the other end."""
import os
import socket
import ssl

import gevent
import gevent.socket as gsocket
import gevent.ssl
import pytest

from lib.net.muxsession import Session
from lib.net.tlstransport import TLSTransport
from tests.support.muxpair import pki, tls_pair as pair  # noqa: F401 (pki: a fixture)


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
    g = gevent.spawn(lambda: (c.sendall(blob), c._sock.shutdown(socket.SHUT_WR)))
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


def test_a_drained_socket_is_waited_on_not_read_in_vain(pki):
    # A short read left the kernel's buffer empty: the next read waits for readability first
    # instead of failing with EAGAIN (a system call and an exception per message:
    # bench/README.md, "Per-request cost").
    c, s = counting_pair(pki)
    echo = gevent.spawn(_echo, s)
    c.sendall(b"first")
    assert c.recv(100) == b"first"
    _CountingRaw.empty_reads = 0
    for i in range(30):
        c.sendall(b"ping %d" % i)
        assert c.recv(100) == b"ping %d" % i
    assert _CountingRaw.empty_reads == 0
    assert s.waits_before_read
    c.close()
    echo.get(timeout=5)


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



class _RecordsReads:
    """Stands in for a TLSTransport's SSLObject, recording the sizes asked of read()."""

    def __init__(self, obj):
        self.obj = obj
        self.sizes = []
        self.into = []

    def read(self, n, *args):
        self.sizes.append(n)
        self.into.append(bool(args))  # given a buffer to decrypt into
        return self.obj.read(n, *args)

    def __getattr__(self, name):
        return getattr(self.obj, name)


def test_a_message_costs_no_read_sized_allocation(pki):
    # SSLObject.read(n) and socket.recv(n) allocate n bytes before shrinking them to what came:
    # asked for 256 KiB, that was a large allocation per record and per raw read (under glibc an
    # mmap and munmap each: bench/README.md, "Per-request cost").
    c, s = counting_pair(pki)
    s._obj = _RecordsReads(s._obj)
    _CountingRaw.recv_sizes = []
    c.sendall(b"ping")
    assert s.recv(1 << 20) == b"ping"
    assert max(s._obj.sizes) <= 16 * 1024
    assert not [n for n in _CountingRaw.recv_sizes if n > 16 * 1024]
    c.close()


def test_records_are_decrypted_into_one_buffer_and_handed_out_uncopied(pki):
    # recv_view: every record decrypted straight into the transport's own buffer (no bytes
    # object per record, no join), and the views handed out are of that one buffer.
    c, s = pair(pki)
    s._obj = _RecordsReads(s._obj)
    blob = os.urandom(300_000)
    g = gevent.spawn(lambda: (c.sendall(blob), c._sock.shutdown(socket.SHUT_WR)))
    got, owners = bytearray(), set()
    while (v := s.recv_view(1 << 18)):
        owners.add(id(v.obj))
        got += v
    g.get(timeout=10)
    assert bytes(got) == blob
    assert len(owners) == 1 and all(s._obj.into) and len(s._obj.into) >= 300_000 // 16384


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


class _CountingSSLObject:
    """An SSLObject whose reads are counted by outcome (everything else passed through)."""

    def __init__(self, obj):
        self._obj = obj
        self.want_read = 0

    def read(self, *args):
        try:
            return self._obj.read(*args)
        except ssl.SSLWantReadError:
            self.want_read += 1
            raise

    def __getattr__(self, name):
        return getattr(self._obj, name)


def test_a_message_is_read_without_a_want_read_exception(pki):
    # SSLObject.read raises SSLWantReadError when the BIO holds no whole record: an exception
    # built twice per message read (before the raw read, after the last record), ~1.7 us each
    # (bench/README.md, "Per-request cost (issue 16)", kapath pass). Read only with bytes there.
    c, s = pair(pki)
    echo = gevent.spawn(_echo, s)
    c.sendall(b"first")
    assert c.recv(100) == b"first"
    c._obj = counting = _CountingSSLObject(c._obj)
    for i in range(30):
        c.sendall(b"ping %d" % i)
        assert c.recv(100) == b"ping %d" % i
    assert counting.want_read == 0
    c.close()
    echo.get(timeout=5)
