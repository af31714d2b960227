"""The proxy's side of a fresh public connection, counted in Python calls (issue 16): the accept
(lib.proxy.server.PublicServer with lib.net.greenpool.WorkerPool, lib.net.sockets.
AcceptedSocket) and the routing up to the splice (lib.proxy.routing, the registry's look-up,
StartProxy's encoding). Speed lives in bench/ (bench/README.md, "Fresh connections: the
proxy's accept"); these hold the steps, each red with its change undone:

- the listener's callback accepts and switches the handler into a parked worker at once: five
  Python calls from the listener's readiness to the handler (gevent's StreamServer took eleven,
  the handler running a loop turn later), and the socket's set-up and close one frame each
  (tests/test_sockets.py);
- routing a connection by Host to a live binding: no wildcard generator for an exact name, no
  sibling hand-over call for a forwarded connection, no StartProxy object or general encoder;
- a tcp: listener's port is parsed once per listener, not per connection.
"""
from __future__ import annotations

import socket
import types

import gevent
import gevent.event
import pytest

from lib.net.greenpool import WorkerPool
from lib.protocol import messages as msg
from lib.proxy import routing
from lib.proxy.registry import ROUTE_BY_HOST, Registry
from lib.proxy.server import ProxyConfig, PublicServer
from tests.support.calls import PythonCalls
from tests.support.wait import wait_until


def _served(pool: WorkerPool):
    """A PublicServer with ``pool`` whose handler records each connection; (server, seen)."""
    seen = []
    ran = gevent.event.Event()

    def handler(sock, address):
        seen.append(sock)
        ran.set()
    server = PublicServer(("127.0.0.1", 0), handler, spawn=pool)
    server.start()
    return server, seen, ran


def _connect(port: int) -> socket.socket:
    # A blocking stdlib connect: the kernel completes it (the listener's backlog) while the hub
    # does not run, so the whole accept happens in the counted window below.
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_the_handler_is_switched_in_from_the_listeners_callback_in_five_calls():
    pool = WorkerPool(16)
    server, seen, ran = _served(pool)
    try:
        warm = _connect(server.address[1])  # leaves a parked worker behind
        assert ran.wait(5)
        ran.clear()
        gevent.sleep(0.01)
        assert pool.idle == 1
        c = _connect(server.address[1])
        with PythonCalls() as calls:
            assert ran.wait(5)
        names = calls.names
        first = names.index("PublicServer._accept_ready")
        # The handler runs inside the listener's callback (no loop turn, no hand-off callback):
        # gevent's loop took _do_read, full, do_read, AcceptedSocket's three __init__s,
        # do_handle, spawn, _run, then at the next turn _hand, _handle_and_close_when_done.
        assert names[first:names.index("_served.<locals>.handler")] == [
            "PublicServer._accept_ready", "AcceptedSocket.__init__", "WorkerPool.spawn_now",
            "WorkerPool._run", "PublicServer._serve"]
        gevent.sleep(0.01)
        assert seen[-1].closed and pool.reused >= 1 and pool.started == 1
        warm.close()
        c.close()
    finally:
        server.stop(timeout=1)


def test_spawn_now_from_a_greenlet_waits_for_the_next_turn():
    """Only the hub may switch a worker in at once (a greenlet doing so would never be
    resumed): from a greenlet, spawn_now hands the job over as spawn does."""
    pool = WorkerPool(4)
    pool.spawn(lambda: None)
    gevent.sleep(0.01)
    order = []
    pool.spawn_now(order.append, "job")
    order.append("caller")
    assert pool.join(5)
    assert order == ["caller", "job"]
    assert pool.reused == 1


class _Session:
    closed = False

    def __init__(self):
        self.writes = []

    def open(self):
        session = self

        class Stream:
            id = 1

            def sendall(self, data):
                session.writes.append(bytes(data))

            def send_nowait(self, data):
                session.writes.append(bytes(data))
                return len(data)
        return Stream()


def _router_with(name: str, key: str | None = "k"):
    registry = Registry()
    session = _Session()
    tunnel = registry.add_tunnel(session, "127.0.0.1:9", key, "c")
    registry.bind(tunnel, "http", name, None, "test", f"http://{name}")
    router = routing.PublicRouter(ProxyConfig(idle_timeout=None), registry)
    return router, session


MINE = ("lib/proxy/", "lib/protocol/messages.py")


def test_routing_a_connection_by_host_calls_no_generator_hand_over_or_message_object(
        monkeypatch):
    from lib.net.sockets import AcceptedSocket
    router, session = _router_with("a.test")
    monkeypatch.setattr(routing, "splice", lambda *a, **kw: None)
    a, peer = socket.socketpair()
    visitor = AcceptedSocket(a.family, a.type, a.proto, a.detach(), "127.0.0.1:80")
    peer.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    with PythonCalls() as calls:
        router.handle_http(visitor, ("127.0.0.1", 5))
    names = calls.names
    assert names[0] == "PublicRouter.route"  # the listener's handler is a partial of route
    for absent in ("wildcard_candidates", "PublicRouter._hand_over", "pack", "encode",
                   "_pack_plain_start_proxy", "set_nodelay", "peek_name", "_public_addr",
                   "PublicRouter.route.<locals>.<lambda>"):
        assert absent not in names, absent
    assert "encode_start_proxy" in names
    (write,) = session.writes
    assert write.startswith(msg.encode(msg.StartProxy(
        url="http://a.test", client_addr="127.0.0.1:5", public_addr="127.0.0.1:80")))
    visitor.close()
    peer.close()


def test_a_wildcard_binding_is_still_found():
    router, _ = _router_with("*.b.test")
    assert router.registry.lookup(ROUTE_BY_HOST, "x.y.b.test").name == "*.b.test"
    assert router.registry.lookup(ROUTE_BY_HOST, "b.test") is None


def test_a_tcp_listeners_port_is_parsed_once(monkeypatch):
    from lib import hostport
    registry = Registry()
    router = routing.PublicRouter(ProxyConfig(idle_timeout=None), registry)
    parsed = []
    parse = hostport.parse_hostport
    monkeypatch.setattr(routing, "parse_hostport", lambda *a, **kw: parsed.append(a) or
                        parse(*a, **kw))
    refused = []
    monkeypatch.setattr(routing, "refuse", lambda sock, kind, refusal: refused.append(
        refusal.counter))
    for _ in range(3):
        # A listener address no other test uses: parsed at its first connection only.
        router.handle_tcp(types.SimpleNamespace(local_name="127.0.0.3:20022"),
                          ("127.0.0.1", 5))
    assert refused == ["unknown_name"] * 3
    assert parsed == [("127.0.0.3:20022",)]


@pytest.mark.parametrize("public", [None, "127.0.0.1:443", "[::1]:8443"])
@pytest.mark.parametrize("url", ["http://a.test", "https://b.test", 'tcp://we"ird:1'])
def test_start_proxy_encoded_without_the_object_is_the_same_bytes(url, public):
    assert msg.encode_start_proxy(url, "1.2.3.4:5", public) == msg.encode(
        msg.StartProxy(url=url, client_addr="1.2.3.4:5", public_addr=public))


def test_the_accept_queue_is_read_from_the_kernel():
    from lib.net.sockets import accept_queue
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    queued = accept_queue(listener)
    assert queued is not None and queued() == 0
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(3)]
    assert queued() == 3
    listener.accept()[0].close()
    assert queued() == 2
    a, b = socket.socketpair()
    assert accept_queue(a) is None  # not TCP: the accept loop accepts until EAGAIN
    plain = socket.socket()
    assert accept_queue(plain) is None  # not listening
    for s in clients + [listener, a, b, plain]:
        s.close()


def test_a_queued_burst_is_accepted_in_one_wake_up_by_kept_workers():
    """Connections queued while the loop was busy are all accepted at the listener's next
    wake-up (their handlers' first frames share a record), the accept queue asked after each."""
    pool = WorkerPool(64)
    served = []

    def handler(sock, address):
        served.append(sock)
        sock.sendall(b"x")
    server = PublicServer(("127.0.0.1", 0), handler, spawn=pool)
    server.start()
    clients = []
    try:
        for _ in range(40):  # blocking connects: the hub does not run meanwhile
            clients.append(_connect(server.address[1]))
        with PythonCalls() as calls:
            gevent.sleep(0.05)
        assert len(served) == 40
        assert calls.names.count("PublicServer._accept_ready") == 1
        assert calls.names.count("accept_queue.<locals>.<lambda>") == 40
        for c in clients:
            assert c.recv(1) == b"x"
    finally:
        for c in clients:
            c.close()
        server.stop(timeout=1)


def test_the_streams_first_frame_is_queued_without_waiting(monkeypatch):
    """StartProxy and the head go to a new mux stream by send_nowait (one call and the
    state machine's two) where sendall made six; the peer reads them as before."""
    from tests.support.muxpair import session_pair
    proxy_side, client_side = session_pair()
    registry = Registry()
    tunnel = registry.add_tunnel(proxy_side, "127.0.0.1:9", None, "c")
    binding = registry.bind(tunnel, "http", "a.test", None, "test", "http://a.test")
    router = routing.PublicRouter(ProxyConfig(idle_timeout=None), registry)
    monkeypatch.setattr(routing, "splice", lambda *a, **kw: None)
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    with PythonCalls() as calls:
        router.forward(None, ("127.0.0.1", 5), router.choose_tunnel(binding), head, None, "http")
    assert "Stream.send_nowait" in calls.names
    for absent in ("Stream.sendall", "Stream._send_some", "Stream._deadline"):
        assert absent not in calls.names, absent
    stream = client_side.accept(timeout=5)
    start = msg.encode(msg.StartProxy(url="http://a.test", client_addr="127.0.0.1:5"))
    got = b""
    while len(got) < len(start) + len(head):
        got += stream.recv(65536)
    assert got == start + head
    proxy_side.close()
    client_side.close()


def test_a_failure_in_the_listeners_callback_closes_the_connection(monkeypatch):
    """Making the accepted socket or handing it to a worker raising in the listener's callback
    (the hub reports it, and stops that watcher) closes the connection: no descriptor left to
    the garbage collector."""
    import lib.proxy.server as server_mod
    failed = []

    class FailingPool(WorkerPool):
        def spawn_now(self, func, *args):
            failed.append(args[0])
            raise RuntimeError("spawn failed (test)")

    def failing_socket(family, kind, proto, fd, local_name):
        failed.append(fd)
        raise RuntimeError("socket failed (test)")

    for case in ("spawn", "socket"):
        pool = FailingPool(4) if case == "spawn" else WorkerPool(4)
        if case == "socket":
            monkeypatch.setattr(server_mod, "AcceptedSocket", failing_socket)
        server = PublicServer(("127.0.0.1", 0), lambda sock, address: None, spawn=pool)
        server.start()
        try:
            del failed[:]
            c = _connect(server.address[1])
            wait_until(lambda: failed)
            if case == "spawn":
                assert failed[0].closed
            assert c.recv(1) == b""  # closed at once (the connect's 5 s timeout otherwise)
            c.close()
        finally:
            server.stop(timeout=1)
