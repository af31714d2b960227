"""lib.net.sockets: connect_numeric (the client's connect to its local target), the public
listeners' tuned sockets (AcceptedSocket, lib.proxy.server.PublicServer), send_all."""
import errno
import socket

import gevent
import gevent.socket as gsocket
import pytest

from lib.client.tunnels import connect_local
from lib.net.sockets import connect_numeric
from tests.support.calls import PythonCalls


def _listener():
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    return lsock


def test_a_listener_on_this_host_is_reached_without_a_hub_turn():
    # gevent's connect waits a hub turn (and arms a Timeout) for a connection that completed
    # inside connect() already: a per-connection cost (bench/README.md, "Per-request cost").
    lsock = _listener()
    ran = []
    gevent.spawn(ran.append, "another greenlet ran")
    sock = connect_local(lsock.getsockname(), 5)  # numeric: lib.net.sockets.connect_numeric
    assert ran == []  # no yield happened
    conn, _ = lsock.accept()
    sock.sendall(b"x")
    assert conn.recv(1) == b"x"
    assert sock.gettimeout() is None and isinstance(sock, gsocket.socket)
    gevent.sleep(0)
    assert ran  # the spawned greenlet was only waiting for a turn


def test_refused_is_an_oserror_and_connect_local_keeps_nodelay():
    lsock = _listener()
    port = lsock.getsockname()[1]
    sock = connect_local(("127.0.0.1", port), 5)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    sock.close()
    lsock.close()
    with pytest.raises(OSError) as e:
        connect_numeric(socket.AF_INET, ("127.0.0.1", port), 5)
    assert e.value.errno == errno.ECONNREFUSED


def test_start_connect_offers_its_first_bytes_and_sets_the_socket_up_after():
    """start_connect(..., first=...) sends as the connection completes (the client's request,
    bench/README.md, "Fresh connections: the client's critical path"), and the socket is then
    what connect_numeric makes: its options set, a gevent socket that waits and closes."""
    from lib.net.sockets import start_connect

    lsock = _listener()
    sock, connected, sent = start_connect(socket.AF_INET, lsock.getsockname(), 65536, b"GET")
    assert (connected, sent) == (True, 3)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 65536
    conn, _ = lsock.accept()
    assert conn.recv(10) == b"GET"
    conn.sendall(b"answer")
    assert sock.recv(10) == b"answer"  # waits through its own watcher
    sock.close()
    port = lsock.getsockname()[1]
    lsock.close()
    with pytest.raises(OSError) as e:
        start_connect(socket.AF_INET, ("127.0.0.1", port), 65536, b"GET")
    assert e.value.errno == errno.ECONNREFUSED


def _slots(sock) -> dict:
    """Every slot of gevent's socket classes that ``sock`` has set: name -> type of its value."""
    out = {}
    for cls in type(sock).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name != "__weakref__" and hasattr(sock, name):
                out[name] = type(getattr(sock, name))
    return out


def test_a_connected_socket_is_what_gevents_constructor_makes():
    # ConnectedSocket replaces gevent's constructor (which makes the socket non-blocking again:
    # an ioctl); every attribute gevent's sets must be set alike, on the pinned gevent.
    lsock = _listener()
    sock = connect_numeric(socket.AF_INET, lsock.getsockname(), 5, 65536)
    plain = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert {k: v for k, v in _slots(sock).items() if k not in ("tcp_tuned", "family")} == \
        _slots(plain)
    assert (sock.family, sock.type, sock.proto) == (socket.AF_INET, socket.SOCK_STREAM,
                                                      socket.IPPROTO_TCP)
    assert type(sock.family) is type(plain.family) is socket.AddressFamily
    assert sock.gettimeout() is None and plain.gettimeout() is None
    assert sock.tcp_tuned and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 65536
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    conn, _ = lsock.accept()
    # It waits as a gevent socket does: a recv with nothing there lets other greenlets run.
    gevent.spawn_later(0.05, conn.sendall, b"late")
    assert sock.recv(10) == b"late"
    sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        sock.recv(10)
    sock.close()
    assert sock.closed and conn.recv(10) == b""
    plain.close()
    conn.close()
    lsock.close()


def test_an_accepted_socket_is_made_and_closed_as_gevent_does_in_one_frame_each():
    from lib.net.sockets import AcceptedSocket
    a, b = socket.socketpair()
    args = (a.family, a.type, a.proto, a.detach(), "127.0.0.1:80")
    with PythonCalls() as calls:
        ours = AcceptedSocket(*args)
    assert calls.names[0] == "AcceptedSocket.__init__"
    assert "socket.__init__" not in calls.names and "SocketMixin.__init__" not in calls.names
    c, d = socket.socketpair()
    plain = gsocket.socket(c.family, c.type, c.proto, fileno=c.detach())
    assert {k: v for k, v in _slots(ours).items() if k not in ("local_name", "family")} == \
        _slots(plain)
    assert ours.gettimeout() == plain.gettimeout() and ours.family == socket.AF_UNIX
    # It waits as a gevent socket does, and a close from another greenlet wakes the waiter with
    # gevent's EBADF (its rule: the descriptor is not reused under a waiter).
    waiter = gevent.spawn(ours.recv, 10)
    gevent.sleep(0.01)
    fd = ours.fileno()
    with PythonCalls() as calls:
        ours.close()
    assert calls.names[0] == "AcceptedSocket.close"
    assert "socket._detach_socket" not in calls.names
    with pytest.raises(OSError) as e:
        waiter.get(timeout=5)
    assert e.value.errno == errno.EBADF
    gevent.sleep(0.01)
    assert b.recv(10) == b""  # the descriptor was closed (after the waiter was woken)
    with pytest.raises(OSError):
        import os
        os.fstat(fd)
    assert ours.closed and ours.fileno() == -1
    assert f"fd={fd} closed" in repr(ours)  # the stand-in names the descriptor, as gevent's
    with pytest.raises(OSError):
        ours.recv(1)
    with PythonCalls() as calls:
        ours.close()  # again: nothing (a server closes what its handler closed)
    assert calls.names[0] == "AcceptedSocket.close" and "_closedsocket.__bool__" not in calls.names
    plain.close()
    for s in (b, d):
        s.close()


def test_a_connection_in_progress_waits_at_most_the_timeout():
    # 192.0.2.1 (TEST-NET-1) is not routed in the test's network namespace or answers nothing:
    # the connect either fails at once (no route) or stays in progress until the timeout.
    with pytest.raises(OSError):
        connect_numeric(socket.AF_INET, ("192.0.2.1", 9), 0.2)


class _AsksBufferSize(gsocket.socket):
    """Counts the SO_SNDBUF look-ups gevent's sendall makes before every write."""
    asked = 0

    def getsockopt(self, *args):
        if args[:2] == (socket.SOL_SOCKET, socket.SO_SNDBUF):
            _AsksBufferSize.asked += 1
        return super().getsockopt(*args)


def test_a_routed_exchange_answers_in_one_send_per_write():
    from lib.net.httpexchange import OneExchangeSocket
    a, b = socket.socketpair()
    visitor, ours = gsocket.socket(fileno=a.detach()), _AsksBufferSize(fileno=b.detach())
    ex = OneExchangeSocket(ours, b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
    _AsksBufferSize.asked = 0
    ex.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert _AsksBufferSize.asked == 0
    assert visitor.recv(200).endswith(b"\r\n\r\nok")


def _accept_one(addr):
    """A PublicServer on ``addr`` and what its handler saw of one connection."""
    import gevent.event
    import gevent.pool
    from lib.net.sockets import AcceptedSocket, set_nodelay
    from lib.proxy.server import PublicServer

    seen = gevent.event.AsyncResult()

    def handler(sock, address):
        seen.set({"accepted": type(sock) is AcceptedSocket,
                  "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                  "lowat": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT),
                  "set_nodelay": set_nodelay(sock), "local_name": sock.local_name,
                  "getsockname": sock.getsockname()[:2]})

    server = PublicServer(addr, handler, spawn=gevent.pool.Pool(4))
    server.start()
    try:
        c = gsocket.create_connection(("127.0.0.1", server.address[1]), timeout=5)
        try:
            return server.address[1], seen.get(timeout=10)
        finally:
            c.close()
    finally:
        server.stop(timeout=1)


def test_a_public_listener_hands_over_connections_already_tuned():
    # Linux copies a listener's TCP options to what it accepts: no setsockopt per visitor for
    # Nagle (routing) or the unsent bound (splice). Red when the listener is not tuned: the
    # routing skips set_nodelay for an AcceptedSocket, so Nagle would stay on.
    from lib.net.splice import UNSENT_LOWAT

    port, seen = _accept_one(("127.0.0.1", 0))
    assert seen["accepted"] and seen["set_nodelay"] is True
    assert seen["nodelay"] == 1 and seen["lowat"] == UNSENT_LOWAT
    # One address: StartProxy.PublicAddr without a getsockname, and the same answer.
    assert seen["local_name"] == f"127.0.0.1:{port}" == "%s:%d" % seen["getsockname"]


def test_a_public_listener_accepts_a_queued_burst_with_the_listeners_family():
    """The connections queued in the kernel's backlog while the loop was busy are all
    accepted; each arrives as an AcceptedSocket with the listener's family (read once)."""
    import time

    import gevent.pool
    from lib.net.sockets import AcceptedSocket
    from lib.proxy.server import PublicServer

    seen = []

    def handler(sock, address):
        seen.append((type(sock) is AcceptedSocket, sock.family))
        sock.sendall(b"x")

    server = PublicServer(("127.0.0.1", 0), handler, spawn=gevent.pool.Pool(64))
    server.start()
    burst = 40
    clients = []
    try:
        # Plain (blocking) connects: the hub does not run meanwhile, so all 40 wait queued.
        for _ in range(burst):
            clients.append(socket.create_connection(("127.0.0.1", server.address[1]),
                                                    timeout=5))
        deadline = time.monotonic() + 10
        while len(seen) < burst and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert seen == [(True, socket.AF_INET)] * burst
        for c in clients:
            assert c.recv(1) == b"x"
    finally:
        for c in clients:
            c.close()
        server.stop(timeout=1)


def test_a_wildcard_listener_leaves_the_address_to_getsockname():
    port, seen = _accept_one(("0.0.0.0", 0))
    assert seen["local_name"] is None and seen["nodelay"] == 1
    assert seen["getsockname"] == ("127.0.0.1", port)


def test_nowait_reader_and_sender_use_the_os_socket_and_never_wait():
    """lib.net.sockets.nowait_reader / nowait_sender (a hub callback's reads and writes): on a
    plain gevent socket one system call on its OS socket, no gevent frame; nothing there ->
    BlockingIOError, never a wait; closed -> EBADF (a reused descriptor is never touched)."""
    import gevent.socket as gs
    from lib.net import sockets
    a, b = gs.socketpair()
    try:
        read, send = sockets.nowait_reader(b), sockets.nowait_sender(a)
        assert send == a._sock.send  # the OS socket's own: no Python layer before send()
        with pytest.raises(BlockingIOError):
            read(1024)
        assert send(b"hello") == 5
        assert read(1024) == b"hello"
        with pytest.raises(BlockingIOError):
            read(1024)
        b.close()
        c, d = gs.socketpair()  # may take b's descriptor number
        try:
            d.sendall(b"not yours")
            with pytest.raises(OSError) as e:
                read(1024)
            assert e.value.errno == errno.EBADF
            assert c.recv(64) == b"not yours"
        finally:
            c.close()
            d.close()
    finally:
        a.close()
        b.close()


def test_nowait_sender_keeps_a_subclass_on_its_own_send():
    """A subclass whose send means something else (gevent's SSLSocket: its bytes are records)
    is never bypassed: its OS socket would carry plaintext."""
    import gevent.ssl
    from lib.net import sockets

    class Wrapping(gsocket.socket):
        sent = 0

        def send(self, data, flags=0, timeout=None):
            self.sent += len(data)
            return super().send(data, flags, timeout)

    assert gevent.ssl.SSLSocket.send is not gsocket.socket.send  # what the guard relies on
    a, b = gsocket.socketpair()
    wrapped = Wrapping(a.family, a.type, 0, fileno=a.detach())
    try:
        assert sockets.nowait_sender(wrapped)(b"x") == 1
        assert wrapped.sent == 1  # through its own send
        assert b.recv(8) == b"x"
    finally:
        b.close()
        wrapped.close()


def test_a_connected_socket_nobody_waits_on_closes_in_one_call():
    """ConnectedSocket.close without gevent's steps for waiters (none wait): the descriptor is
    closed at once, later calls raise EBADF, and it costs one Python call (gevent's: ~7)."""
    import os

    from tests.support.calls import PythonCalls

    lsock = _listener()
    sock = connect_numeric(socket.AF_INET, lsock.getsockname(), 5, 65536)
    conn, _ = lsock.accept()
    fd = sock.fileno()
    with PythonCalls() as calls:
        sock.close()
    assert calls.names == ["ConnectedSocket.close"], calls.names
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(OSError):
        sock.send(b"x")
    assert conn.recv(10) == b""  # the peer sees its FIN
    sock.close()  # twice is harmless
    conn.close()
    lsock.close()


def test_a_connected_socket_closed_under_a_waiting_reader_wakes_it():
    """A greenlet waiting to read is woken with an error by the close (gevent's way, kept)."""
    lsock = _listener()
    sock = connect_numeric(socket.AF_INET, lsock.getsockname(), 5, 65536)
    conn, _ = lsock.accept()
    reader = gevent.spawn(sock.recv, 10)
    gevent.sleep(0)  # the reader waits on the socket's read watcher
    assert not reader.ready()
    sock.close()
    with pytest.raises(OSError):
        reader.get(timeout=5)
    conn.close()
    lsock.close()


def test_a_connected_socket_is_built_without_a_python_call_under_it():
    """ConnectedSocket's constructor runs no Python function of its own (the family's enum
    member is looked up, not made by the enum's call: two calls per connection)."""
    from lib.net.sockets import ConnectedSocket
    from tests.support.calls import PythonCalls

    with PythonCalls() as calls:
        sock = ConnectedSocket(socket.AF_INET)
    assert calls.names == ["ConnectedSocket.__init__"], calls.names
    assert sock.family is socket.AF_INET
    sock.close()
