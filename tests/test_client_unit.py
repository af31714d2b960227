"""Unit tests of lib.client.tunnels's pure parts: service names, proxy addresses, PROXY headers, backoff."""
import struct

import pytest

from lib.client.tunnels import Backoff, ProxyAddr, Service, proxy_protocol_header
from tests.support.wait import wait_until


@pytest.mark.parametrize("name,proto,bound", [
    ("example.com", "tls", "example.com"),
    ("Example.COM.", "tls", "example.com"),
    ("tls:a.example", "tls", "a.example"),
    ("https://a.example", "tls", "a.example"),
    ("http:b.example", "http", "b.example"),
    ("http://b.example", "http", "b.example"),
    ("*.wild.example", "tls", "*.wild.example"),
    ("tcp:20001", "tcp", "tcp:20001"),
])
def test_service_names(name, proto, bound):
    s = Service.parse(name, "127.0.0.1:443")
    assert (s.protocol, s.name, s.target) == (proto, bound, ("127.0.0.1", 443))


@pytest.mark.parametrize("name,target", [
    ("tcp:notaport", "127.0.0.1:22"), ("tcp:70000", "127.0.0.1:22"),
    ("example.com", "127.0.0.1"), ("example.com", "host:port"), ("bad..name", "127.0.0.1:1"),
])
def test_bad_services_are_refused(name, target):
    with pytest.raises(ValueError):
        Service.parse(name, target)


def test_tcp_bind_message_and_signature():
    from lib.identity import Identity, verify_bind
    from lib.protocol import messages as msg
    ident = Identity.generate()
    b = Service.parse("tcp:20001", "127.0.0.1:22").bind_message(b"n" * 32, ident, "host:p.test")
    assert b.protocol == "tcp" and b.remote_port == 20001 and b.signature is not None
    assert b.proxy_id == "host:p.test"
    assert verify_bind(ident.public_key_b64, b.extra["sig"],
                       msg.bind_signature_payload(b"n" * 32, "host:p.test", "tcp", "20001"))
    with pytest.raises(ValueError):
        Service.parse("a.example", "127.0.0.1:1").bind_message(b"n" * 32, ident)  # no proxy id
    unsigned = Service.parse("a.example", "127.0.0.1:1").bind_message(None, ident)
    assert unsigned.extra is None  # an original proxy sends no nonce: bind unsigned
    assert msg.unpack(msg.pack(b)).remote_port == 20001


def test_proxy_addr_parse():
    assert ProxyAddr.parse("proxy.example:4443") == ProxyAddr("proxy.example", 4443)
    assert ProxyAddr.parse("proxy.example").port == 4443
    assert ProxyAddr.parse("[::1]:9").host == "::1"


def test_proxy_protocol_v1():
    h = proxy_protocol_header("v1", "203.0.113.7:51514", ("127.0.0.1", 443))
    assert h == b"PROXY TCP4 203.0.113.7 127.0.0.1 51514 443\r\n"
    assert proxy_protocol_header("v1", "garbage", ("127.0.0.1", 1)) == b"PROXY UNKNOWN\r\n"
    # Port 0: a one-port proxy knows the visitor's address (X-Forwarded-For), not its port.
    assert proxy_protocol_header("v1", "127.0.0.2:0", ("127.0.0.1", 443)) == \
        b"PROXY TCP4 127.0.0.2 127.0.0.1 0 443\r\n"
    assert proxy_protocol_header("v1", "[2001:db8::1]:5", ("::1", 443)) == \
        b"PROXY TCP6 2001:db8::1 ::1 5 443\r\n"


def test_proxy_protocol_v2_ipv4_bytes():
    h = proxy_protocol_header("v2", "203.0.113.7:51514", ("127.0.0.1", 443))
    assert h[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert h[12:14] == b"\x21\x11"  # version 2 PROXY, TCP over IPv4
    assert struct.unpack(">H", h[14:16])[0] == 12
    assert h[16:] == bytes([203, 0, 113, 7, 127, 0, 0, 1]) + struct.pack(">HH", 51514, 443)


def test_proxy_protocol_v2_names_the_proxy_in_a_tlv():
    h = proxy_protocol_header("v2", "203.0.113.7:51514", ("127.0.0.1", 443), "127.0.0.1:4443")
    assert struct.unpack(">H", h[14:16])[0] == 12 + 3 + 14
    assert h[28:31] == b"\xe0\x00\x0e" and h[31:] == b"127.0.0.1:4443"
    h = proxy_protocol_header("v2", "[2001:db8::2]:5", ("::1", 443), "p" * 300)
    assert h[13:14] == b"\x21" and struct.unpack(">H", h[14:16])[0] == 36 + 3 + 255


def test_proxy_protocol_v2_mismatched_family_is_local():
    h = proxy_protocol_header("v2", "[2001:db8::1]:5", ("127.0.0.1", 443))
    assert h[12:16] == b"\x20\x00\x00\x00"


def test_backoff_grows_with_jitter_and_caps():
    b = Backoff(base=1.0, cap=8.0, rand=lambda: 1.0)
    assert [b.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b = Backoff(base=1.0, cap=8.0, rand=lambda: 0.0)
    assert [b.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    b.reset()
    assert b.next_delay() == 0.5


@pytest.mark.parametrize("name, url, ok", [
    ("http:a.test", "http://a.test", True),
    ("http:a.test", "HTTP://A.Test:80", True),
    ("http:a.test", "http://b.test", False),  # issue 11 item 8: another service's URL
    ("http:a.test", "tls://a.test", False),
    ("http:a.test", "http://a.test/x", False),
    ("http:a.test", "a.test", False),
    ("a.test", "tls://a.test", True),
    ("a.test", "https://a.test", True),
    ("a.test", "http://a.test", False),
    ("http:*.a.test", "http://*.a.test", True),
    ("http:*.a.test", "http://x.a.test", False),
    ("tcp:2001", "tcp://proxy.example:2001", True),
    ("tcp:2001", "tcp://proxy.example:2002", False),
    ("tcp:2001", "tcp://:2001", False),
    ("tcp:2001", "http://proxy.example:2001", False),
])
def test_a_bind_answer_must_name_what_was_asked(name, url, ok):
    assert Service.parse(name, "127.0.0.1:1").answers_bind(url) is ok


# --- a stream the proxy opens, served by a runner (real muxado sessions over a socket pair) ---


def _answered(conn, stream, done):
    """The target (``conn``) answers and closes, the proxy's side reads the answer off
    ``stream`` and closes it: the stream's record, once the runner is done with it."""
    conn.sendall(b"answer")
    conn.close()
    assert stream.recv(100) == b"answer"
    stream.close()
    wait_until(lambda: done)
    return done[0]


def _served_runner(target, proxy_protocol=None):
    """A TunnelRunner serving http:one.test -> ``target`` on the client end of a session pair
    (``ours``), and the proxy's end (as lib.proxy would hold it)."""
    import gevent
    from lib.client.tunnels import Client, ClientConfig, ProxyAddr, Service
    from tests.support.muxpair import session_pair

    svc = Service.parse("http:one.test", f"{target[0]}:{target[1]}")
    client = Client(ClientConfig(services=[svc], proxies=[ProxyAddr("proxy.test", 4443)],
                                 proxy_protocol=proxy_protocol))
    runner = client.runners[0]
    runner.urls["http://one.test"] = svc
    ours, theirs = session_pair()
    done = []
    client.on_stream = done.append
    gevent.spawn(runner.serve, ours)
    return runner, ours, theirs, done


def test_the_visitors_bytes_sent_with_startproxy_reach_the_target_first_and_are_counted():
    import gevent
    import gevent.socket as gsocket
    from lib.protocol import messages as m

    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(5)  # a target never connected fails the test, not its timeout
    runner, _, proxy_side, done = _served_runner(listener.getsockname())
    head = b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n"
    stream = proxy_side.open()
    # As lib/proxy/routing.py sends it: StartProxy and the request head in one frame.
    stream.sendall(m.encode(m.StartProxy(url="http://one.test", client_addr="192.0.2.7:5"))
                   + head)
    conn, _ = listener.accept()
    conn.settimeout(5)
    got = b""
    while len(got) < len(head):
        got += conn.recv(100)
    assert got == head
    stream.sendall(b"body")
    assert conn.recv(100) == b"body"  # then the splice carries the rest, in order
    record = _answered(conn, stream, done)
    assert (record.bytes_in, record.bytes_out) == (len(head) + 4, 6)
    assert (runner.bytes_in, runner.bytes_out) == (len(head) + 4, 6)
    assert record.result == "ok" and record.visitor == "192.0.2.7:5"
    proxy_side.close()
    listener.close()


def test_the_request_reaches_the_target_before_the_sessions_reader_yields():
    """StartProxy and the visitor's bytes in, the stream is opened from the session's reader:
    the target is connected and has the request when the reader (the hub) first yields after the
    read that brought them, before the stream's handler greenlet (or a teardown woken by the same
    read) runs (TunnelRunner._open_now; bench/README.md, "Fresh connections, the client's
    side, second session")."""
    import select
    import socket as stdsocket

    import gevent
    import gevent.socket as gsocket
    import greenlet

    from lib.protocol import messages as m

    # A plain (blocking) listener: the trace below looks at it without yielding.
    listener = stdsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    _, ours, proxy_side, done = _served_runner(listener.getsockname())
    head = b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n"
    seen = []

    def trace(event, args):
        origin, _target = args
        if (event == "switch" and not seen and origin is reader
                and ours.frames_received > frames_before):
            ready = select.select([listener], [], [], 0)[0]
            if not ready:
                seen.append(b"not connected")
                return
            conn, _ = listener.accept()
            try:
                seen.append(conn.recv(100, stdsocket.MSG_DONTWAIT))
            except BlockingIOError:
                seen.append(b"nothing sent")
            seen.append(conn)

    # The session's reader: a hub callback (lib.net.muxsession, "Reading"), so the first switch
    # out of the hub after the read; a reader greenlet where the transport must wait.
    reader = ours.greenlets.reader or gevent.get_hub()
    frames_before = ours.frames_received
    old = greenlet.settrace(trace)
    try:
        stream = proxy_side.open()
        stream.sendall(m.encode(m.StartProxy(url="http://one.test", client_addr="192.0.2.7:5"))
                       + head)
        with gevent.Timeout(5):
            while not seen:
                gevent.sleep(0.01)
    finally:
        greenlet.settrace(old)
    assert seen[0] == head
    conn = gsocket.socket(fileno=seen[1].detach())
    assert _answered(conn, stream, done).result == "ok"
    proxy_side.close()
    listener.close()


def test_the_request_leaves_first_after_the_connect_in_few_python_calls():
    """From the stream's arrival to the request's send to the target: StartProxy parsed in one
    call (messages.split_message), the target connected and the request offered before the
    socket's options and watchers are made (lib.net.sockets.start_connect's ``first``), in few
    Python calls of lib/ (bench/README.md, "Fresh connections: the client's critical path":
    21 before that pass, 12 after)."""
    import select
    import socket as stdsocket

    import gevent
    import gevent.socket as gsocket

    from lib.protocol import messages as m
    from tests.support.calls import Events

    listener = stdsocket.socket()  # plain: looked at below without a gevent wait
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    _, _, proxy_side, done = _served_runner(listener.getsockname())
    head = b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n"
    gevent.sleep(0.01)  # runner.serve's greenlet is in serve()
    with Events() as ev:
        stream = proxy_side.open()
        stream.sendall(m.encode(m.StartProxy(url="http://one.test", client_addr="192.0.2.7:5"))
                       + head)
        with gevent.Timeout(5):
            while not select.select([listener], [], [], 0)[0]:
                gevent.sleep(0.01)
    path = ev.between(("py", "TunnelRunner._take_stream"), ("c", "send"))
    connect = max(i for i, e in enumerate(path) if e == ("c", "connect_ex"))
    assert not [e for e in path[connect:] if e in (("c", "setsockopt"), ("c", "io"))], path
    python = [name for kind, name in path if kind == "py"]
    assert len(python) <= 12, python
    conn, _ = listener.accept()
    conn = gsocket.socket(fileno=conn.detach())
    conn.settimeout(5)
    assert conn.recv(100) == head
    assert _answered(conn, stream, done).result == "ok"
    proxy_side.close()
    listener.close()


def test_a_fresh_connection_wakes_no_greenlet_in_the_client():
    """StartProxy and the request in, the answer out, the visitor gone: the stream is opened from
    the session's reader and spliced with no greenlet (lib.net.splice, "Detached"): none is
    switched into but the sessions' own (bench/README.md, "Fresh connections: no greenlet in
    the client"); the record is counted and closed as a handler's."""
    import gevent
    import gevent.socket as gsocket
    import greenlet
    from lib.protocol import messages as m

    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(5)  # a target never connected fails the test, not its timeout
    runner, ours, proxy_side, done = _served_runner(listener.getsockname())
    head = b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n"
    gevent.sleep(0.01)  # runner.serve's greenlet is in serve()
    known = {gevent.get_hub(), gevent.getcurrent(),
             *(g for s in (ours, proxy_side) for g in s.greenlets if g is not None)}
    woken = set()

    def trace(event, args):
        if event in ("switch", "throw") and args[1] not in known:
            woken.add(args[1])
    old = greenlet.settrace(trace)
    try:
        stream = proxy_side.open()
        stream.sendall(m.encode(m.StartProxy(url="http://one.test", client_addr="192.0.2.7:5"))
                       + head)
        conn, _ = listener.accept()
        conn.settimeout(5)
        assert conn.recv(100) == head
        record = _answered(conn, stream, done)
    finally:
        greenlet.settrace(old)
    # A session's own greenlets (its writer, its watchdog) are not the stream's: a session an
    # earlier test left open may wake them meanwhile.
    woken = {g for g in woken if "of <Session " not in repr(g)}
    assert not woken, woken
    assert (record.result, record.bytes_in, record.bytes_out) == ("ok", len(head), 6)
    assert runner.streams_open == 0
    proxy_side.close()
    listener.close()


def test_a_startproxy_cut_across_reads_is_read_on_by_the_handler():
    """The reader takes what came of StartProxy without waiting; the handler reads the rest
    (TunnelRunner._open_now hands it a Replay of those bytes) and the target gets the
    visitor's bytes whole."""
    import gevent
    import gevent.socket as gsocket
    from lib.protocol import messages as m

    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(5)  # a target never connected fails the test, not its timeout
    _, ours, proxy_side, done = _served_runner(listener.getsockname())
    head = b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n"
    data = m.encode(m.StartProxy(url="http://one.test", client_addr="192.0.2.7:5")) + head
    stream = proxy_side.open()
    stream.sendall(data[:3])
    frames = ours.frames_received
    with gevent.Timeout(5):
        while ours.frames_received == frames:  # the reader has had the first 3 bytes
            gevent.sleep(0.01)
    stream.sendall(data[3:])
    conn, _ = listener.accept()
    conn.settimeout(5)
    got = b""
    while len(got) < len(head):
        got += conn.recv(100)
    assert got == head
    record = _answered(conn, stream, done)
    assert (record.result, record.bytes_in) == ("ok", len(head))
    proxy_side.close()
    listener.close()
