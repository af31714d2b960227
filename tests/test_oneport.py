"""lib.proxy.oneport units: a routed connection carries exactly one request (sockets are socketpairs)."""
from __future__ import annotations

import gevent.socket
import pytest

from lib.proxy.oneport import OneRequestSocket, ReplaySocket, connection_close, forwarded_for


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
