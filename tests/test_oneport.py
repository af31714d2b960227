"""One-port units: a routed connection carries exactly one exchange (lib.net.httpexchange,
lib.protocol.http1, lib.proxy.oneport; sockets are socketpairs)."""
from __future__ import annotations

import gevent.socket
import pytest

from lib.net.httpexchange import OneExchangeSocket, OneRequestSocket, ReplaySocket
from lib.protocol import http1
from lib.protocol.http1 import ResponseFramer, connection_close
from lib.proxy.oneport import forwarded_for


def read_all(sock) -> tuple[bytes, Exception | None]:
    out = b""
    try:
        while data := sock.recv(7):  # small reads cross every boundary
            out += data
    except ConnectionAbortedError as e:
        return out, e
    return out, None


def routed(head: bytes, more: bytes = b"", close: bool = True):
    a, b = gevent.socket.socketpair()
    a.sendall(more)
    if close:
        a.shutdown(1)
    return OneRequestSocket(b, head), a


def test_replay_socket_returns_head_first():
    a, b = gevent.socket.socketpair()
    a.sendall(b"world")
    a.close()
    r = ReplaySocket(b, b"hello ")
    assert read_all(r) == (b"hello world", None)


def test_connection_close_drops_folded_connection_headers_whole():
    assert connection_close(b"HTTP/1.1 200 OK\r\nConnection: close\r\n keep-alive\r\n"
                            b"Content-Length: 2\r\n\r\n") == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n")


def test_connection_close_replaces_keepalive_headers():
    assert connection_close(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n"
                            b"Keep-Alive: timeout=5\r\nX: y\r\n\r\n") == (
        b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\nConnection: close\r\n\r\n")


def test_one_get_passes_with_connection_close():
    sock, _ = routed(b"GET /a HTTP/1.1\r\nHost: web.test\r\nConnection: keep-alive\r\n\r\n")
    out, err = read_all(sock)
    assert out == b"GET /a HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n"
    assert err is None


@pytest.mark.parametrize("first_body_headers, body", [
    (b"Content-Length: 11\r\n", b"hello world"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
])
def test_second_request_on_the_connection_is_not_forwarded(first_body_headers, body):
    head = b"POST /up HTTP/1.1\r\nHost: web.test\r\n" + first_body_headers + b"\r\n"
    second = b"GET /api/status HTTP/1.1\r\nHost: admin.test\r\nAuthorization: Bearer s3cret\r\n\r\n"
    sock, _ = routed(head + body[:3], body[3:] + second)
    out, err = read_all(sock)
    assert out.endswith(body) and b"s3cret" not in out and b"admin.test" not in out
    assert err is None  # the tunnel sees EOF after the first request
    assert sock.recv(100) == b""


def test_second_request_in_the_replayed_head_is_not_forwarded():
    second = b"GET /x HTTP/1.1\r\nHost: other.test\r\n\r\n"
    sock, _ = routed(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n" + second)
    out, err = read_all(sock)
    assert out.endswith(b"Connection: close\r\n\r\n") and b"other.test" not in out
    assert err is None


def test_malformed_body_framing_aborts():
    sock, _ = routed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                     b"zz\r\n")
    out, err = read_all(sock)
    assert isinstance(err, ConnectionAbortedError) and "malformed" in str(err)


@pytest.mark.parametrize("value, want", [
    (b"203.0.113.7", "203.0.113.7"),
    (b"198.51.100.1, 203.0.113.7", "203.0.113.7"),  # the router's entry is the last
    (b"2001:db8::1", "2001:db8::1"),
    (b"[2001:db8::1]:4711", "2001:db8::1"),
    (b"203.0.113.7:4711", "203.0.113.7"),
    (b"not-an-address", None),
])
def test_forwarded_for_takes_the_last_entry(value, want):
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: " + value + b"\r\n\r\n"
    assert forwarded_for(head) == want


def test_forwarded_for_across_repeated_headers_and_absent():
    head = (b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.1\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\n\r\n")
    assert forwarded_for(head) == "203.0.113.9"
    assert forwarded_for(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") is None


# --- the response side (lib.protocol.http1.ResponseFramer), fed whole and byte by byte --------

def feed(framer: ResponseFramer, data: bytes, one_by_one: bool) -> bytes:
    if not one_by_one:
        return framer.feed(data)
    return b"".join(framer.feed(data[i:i + 1]) for i in range(len(data)))


SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nhijacked"


class _CountingSearch:
    """Wraps a compiled pattern; ``scanned`` adds up the bytes each search may look at."""

    def __init__(self, pattern):
        self.pattern, self.scanned = pattern, 0

    def search(self, buf, pos=0, *rest):
        self.scanned += len(buf) - pos
        return self.pattern.search(buf, pos, *rest)


@pytest.mark.parametrize("crlf", [b"\r\n", b"\n"])
def test_response_head_work_is_linear_byte_by_byte(monkeypatch, crlf):
    """An origin (the attacker's own) sends a 64 KiB head a byte a time: searching the whole
    head again on each read was ~n^2/2 = 2 G bytes (1.4 s of proxy CPU per response)."""
    counting = _CountingSearch(http1._BLANK_LINE_RE)
    monkeypatch.setattr(http1, "_BLANK_LINE_RE", counting)
    lines = [b"X-A%05d: %s" % (i, b"v" * 40) for i in range((http1.MAX_RESPONSE_HEAD - 100) // 53)]
    head = crlf.join([b"HTTP/1.1 200 OK", b"Content-Length: 2", *lines]) + crlf + crlf
    assert len(head) <= http1.MAX_RESPONSE_HEAD
    framer = ResponseFramer(b"GET")
    out = feed(framer, head + b"ok" + SECOND, one_by_one=True)
    assert out.endswith(b"ok") and framer.state == http1.DONE
    assert counting.scanned <= 4 * len(head), counting.scanned


@pytest.mark.parametrize("one_by_one", [False, True])
@pytest.mark.parametrize("method, response, body", [
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n",
     b"hello"),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"5\r\nhello\r\n0\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b""),
    (b"GET", b"HTTP/1.1 204 No Content\r\nKeep-Alive: timeout=5\r\n\r\n", b""),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", b""),
])
def test_one_response_then_nothing(one_by_one, method, response, body):
    framer = ResponseFramer(method)
    out = feed(framer, response + body + SECOND, one_by_one)
    assert out == connection_close(response) + body
    assert framer.state == http1.DONE and framer.dropped == len(SECOND)


@pytest.mark.parametrize("one_by_one", [False, True])
def test_interim_responses_pass_and_the_final_one_closes(one_by_one):
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    framer = ResponseFramer(b"POST")
    assert feed(framer, interim + final + b"ok" + SECOND, one_by_one) == (
        interim + connection_close(final) + b"ok")


def test_close_delimited_body_flows_until_the_origin_closes():
    framer = ResponseFramer(b"GET")
    head = b"HTTP/1.0 200 OK\r\n\r\n"
    assert framer.feed(head + b"abc") == connection_close(head) + b"abc"
    assert framer.feed(b"def") == b"def" and framer.state == http1.BODY


@pytest.mark.parametrize("one_by_one", [False, True])
def test_only_101_to_an_upgrade_switches_to_raw(one_by_one):
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    framer = ResponseFramer(b"GET", upgrade=True)
    assert feed(framer, switch + b"\x81\x02hi" + SECOND, one_by_one) == switch + b"\x81\x02hi" + SECOND
    assert framer.state == http1.SWITCHED
    # a keep-alive 200 to the same upgrade request is one response like any other
    framer = ResponseFramer(b"GET", upgrade=True)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
    assert feed(framer, ok + b"ok" + SECOND, one_by_one) == connection_close(ok) + b"ok"
    assert framer.state == http1.DONE


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",  # nobody asked
    b"NOT HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * http1.MAX_RESPONSE_HEAD,
])
def test_malformed_responses_are_refused(data):
    with pytest.raises(http1.FramingError):
        ResponseFramer(b"GET").feed(data)


# --- both sides on a socket (lib.net.httpexchange.OneExchangeSocket) ----------------------------

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: evil.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
VICTIM = b"GET /account HTTP/1.1\r\nHost: bank.test\r\nCookie: session=victim\r\n\r\n"


def exchange(head: bytes):
    front, proxy_end = gevent.socket.socketpair()
    front.settimeout(5)
    return OneExchangeSocket(proxy_end, head), front


def test_upgrade_refused_by_the_origin_does_not_splice_raw():
    sock, front = exchange(UPGRADE)
    assert sock.recv(65536) == UPGRADE  # Connection: Upgrade reaches the origin as sent
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\nevil")
    front.sendall(VICTIM)  # the front reuses the connection for another visitor
    assert sock.recv(65536) == b""  # the tunnel sees EOF, not the victim's request
    sock.sendall(SECOND)  # the origin answers the EOF with a second response
    got = b""
    while data := front.recv(65536):
        got += data
    assert got == (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nevil")
    assert sock.dropped_response_bytes == len(SECOND)


def test_upgrade_accepted_by_the_origin_is_raw_both_ways():
    sock, front = exchange(UPGRADE)
    assert sock.recv(65536) == UPGRADE
    front.sendall(b"\x81\x82early")  # before the answer: held, not forwarded yet
    waiting = gevent.spawn(sock.recv, 65536)
    gevent.sleep(0.05)
    assert not waiting.ready()
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    sock.sendall(switch + b"\x81\x02hi")
    assert waiting.get(timeout=5) == b"\x81\x82early"
    front.sendall(b"more")
    assert sock.recv(65536) == b"more"
    assert front.recv(65536) == switch + b"\x81\x02hi"


def test_upgrade_with_no_answer_ends_when_the_origin_does():
    sock, front = exchange(UPGRADE)
    assert sock.recv(65536) == UPGRADE
    waiting = gevent.spawn(sock.recv, 65536)
    gevent.sleep(0.05)
    sock.shutdown(1)  # the splice carries the origin's FIN
    front.sendall(VICTIM)
    assert waiting.get(timeout=5) == b""


def test_bytes_before_the_upgrade_answer_are_bounded():
    from lib.net.httpexchange import MAX_EARLY_BYTES
    sock, front = exchange(UPGRADE + b"\x81" * (MAX_EARLY_BYTES + 1))
    with pytest.raises(ConnectionAbortedError, match="before the upgrade's answer"):
        sock.recv(4 * MAX_EARLY_BYTES)


def test_misdirected_tunnel_upgrades_log_little(caplog):
    """Anyone can ask $PORT for a tunnel under a name that is not the proxy's: each is refused
    (421) and counted, and the line saying so stays within PeerLog's 10 a minute per address."""
    import logging
    import socket
    from types import SimpleNamespace

    from lib.proxy.oneport import OnePortRouter
    from lib.proxy.registry import Registry

    registry = Registry()
    proxy = SimpleNamespace(registry=registry, servers={}, config=SimpleNamespace(peek_timeout=5),
                            router=SimpleNamespace(bound_anywhere=lambda protocols, name: False))
    router = OnePortRouter(proxy, admin_hosts=["proxy.test"], trust_forwarded_for=False)
    request = (b"GET /_shroud/tunnel HTTP/1.1\r\nHost: other.test\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    with caplog.at_level(logging.WARNING, logger="shroud.oneport"):
        for _ in range(30):
            ours, theirs = socket.socketpair()
            theirs.sendall(request)
            assert router.dispatch(ours, ("203.0.113.9", 1234)) is None
            assert theirs.recv(4096).startswith(b"HTTP/1.0 421")
            theirs.close()
    lines = [r for r in caplog.records if "tunnel upgrade for other.test refused" in r.message]
    assert 1 <= len(lines) <= 10, len(lines)
    assert registry.refusals["tunnel_handshake"] == 30


def test_a_request_we_do_not_frame_aborts_before_a_byte_is_forwarded():
    """Content-Length and Transfer-Encoding together (lib.protocol.http1): the first read
    raises, so the tunnel gets nothing of the request (the splice aborts both ends)."""
    head = (b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    for sock in (OneExchangeSocket(gevent.socket.socketpair()[1], head), routed(head)[0]):
        with pytest.raises(ConnectionAbortedError, match="both Content-Length and Transfer"):
            sock.recv(65536)


def test_the_head_the_sniffer_parsed_is_used_as_given():
    from lib.protocol import httphead
    head = b"HEAD / HTTP/1.1\r\nHost: web.test\r\n\r\n"
    front, proxy_end = gevent.socket.socketpair()
    # Parsed as a GET with an Upgrade header: the exchange goes by what it is given.
    request = httphead.parse_request_head(b"GET / HTTP/1.1\r\nHost: web.test\r\nUpgrade: x\r\n")
    sock = OneExchangeSocket(proxy_end, head, request=request)
    assert sock.recv(65536) == head  # an upgrade request's head is left as it is
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nraw")
    assert sock.switched


def test_a_routed_connection_on_the_port_is_read_and_parsed_once(monkeypatch):
    """One-port mode: the head the dispatcher's sniffer parsed is the one the router chooses
    by and the exchange frames from (PublicRouter.route_named): one read, one parse per
    connection, where the head was parsed three times (the sniffer, request_fields, the http
    listener's route sniffing it again from a replay)."""
    from types import SimpleNamespace

    from lib.protocol import httphead
    from lib.proxy import routing
    from lib.proxy.oneport import OnePortRouter
    from lib.proxy.registry import Registry
    from lib.proxy.server import ProxyConfig

    parsed = []
    parse = httphead.parse_request_head
    monkeypatch.setattr(httphead, "parse_request_head",
                        lambda head: parsed.append(bytes(head)) or parse(head))
    router = routing.PublicRouter(ProxyConfig(), Registry())
    tunnel = SimpleNamespace(key=None, streams_open=0)
    monkeypatch.setattr(router, "choose", lambda *a: routing.Route(routing.FORWARD, None, tunnel))
    forwarded = []
    monkeypatch.setattr(router, "forward",
                        lambda sock, address, route, peeked, *a, **kw:
                        forwarded.append((sock, address, peeked)))
    proxy = SimpleNamespace(registry=router.registry, servers={}, router=router,
                            config=SimpleNamespace(peek_timeout=5))
    ours, theirs = gevent.socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"GET /a HTTP/1.1\r\nHost: Web.Test\r\nX-Forwarded-For: 198.51.100.7\r\n"
                       b"\r\n")
        assert OnePortRouter(proxy, ["proxy.test"]).dispatch(ours, ("10.0.0.1", 5)) is None
    assert len(parsed) == 1
    ((exchange, address, peeked),) = forwarded
    assert address == ("198.51.100.7", 0)
    assert peeked.endswith(b"Connection: close\r\n\r\n") and peeked.startswith(b"GET /a ")
    assert type(exchange) is OneExchangeSocket and exchange.fileno() == ours.fileno()
