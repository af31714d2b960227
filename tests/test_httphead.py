"""lib.protocol.httphead: one request-head parser and one error builder for every caller."""
import pytest

from lib.protocol import httphead, sniff
from lib.protocol import websocket as ws
from lib.protocol.httphead import HeadError, http_error_response, parse_request_head

GOOD = (b"GET /a/b?x=1 HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"x-forwarded-for: 5.6.7.8\r\nEmpty:\r\n\r\n")


def test_request_fields_in_order_names_lower_case():
    head = parse_request_head(GOOD)
    assert (head.method, head.target, head.version, head.path) == ("GET", "/a/b?x=1", "1.1", "/a/b")
    assert head.get_all("X-FORWARDED-FOR") == ["1.2.3.4", "5.6.7.8"]
    assert head.get("x-forwarded-for") == "1.2.3.4, 5.6.7.8"
    assert head.get("empty") == "" and head.get("absent", "-") == "-"


def test_bare_lf_lines_accepted():
    assert parse_request_head(GOOD.replace(b"\r\n", b"\n")).get("host") == "a.example"


@pytest.mark.parametrize("head,reason", [
    (b"GET / HTTP/2.0\r\n\r\n", "request line"),
    (b"GET  / HTTP/1.1\r\n\r\n", "request line"),
    (b"G\x00T / HTTP/1.1\r\n\r\n", "request line"),
    (b"A" * 65 + b" / HTTP/1.1\r\n\r\n", "not an HTTP/1.x request"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "header line"),  # obs-fold
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "header line"),  # space before the colon
    (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", "header line"),  # bare CR in a value
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "header line"),
])
def test_refused_with_400(head, reason):
    with pytest.raises(HeadError, match=reason) as e:
        parse_request_head(head)
    assert e.value.http_status == 400


def test_split_head_whole_byte_by_byte_and_bounded():
    data = GOOD + b"body"
    assert httphead.split_head(data) == (GOOD, b"body")
    for i in range(len(GOOD) - 1):  # never complete before the blank line
        assert httphead.split_head(GOOD[:i]) is None
    with pytest.raises(HeadError) as e:
        httphead.split_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 100, limit=64)
    assert e.value.http_status == 431


def test_one_rule_set_for_sniffer_and_websocket():
    """A head one caller refuses, the others refuse too (they used to differ)."""
    bad = (b"GET /_shroud/tunnel HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nX-Bad: a\x01b\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    with pytest.raises(sniff.SniffError, match="malformed header line"):
        sniff.sniff_http_host(bad)
    with pytest.raises(ws.HandshakeError, match="malformed header line") as e:
        ws.parse_upgrade_request(bad)
    assert e.value.http_status == 400
    assert isinstance(e.value, HeadError)


def test_response_head():
    r = httphead.parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert (r.status, r.phrase, r.get("upgrade")) == (101, "Switching Protocols", "websocket")
    with pytest.raises(HeadError, match="not an HTTP response"):
        httphead.parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_error_response_one_builder():
    raw = http_error_response(421, body="not ours\n", headers=[("X-A", "1")], version="1.1")
    assert raw.startswith(b"HTTP/1.1 421 Misdirected Request\r\nX-A: 1\r\n")
    assert raw.endswith(b"Content-Length: 9\r\nConnection: close\r\n\r\nnot ours\n")
    assert sniff.http_error_response is http_error_response  # the proxy's refusals
    assert ws.handshake_refusal(426, "upgrade").startswith(
        b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n")
    with pytest.raises(ValueError):
        http_error_response(400, headers=[("X", "a\r\nInjected: 1")])


def test_redirect_keeps_the_target_with_a_body_after_the_head():
    from lib.proxy.routing import _redirect_to_https
    raw = _redirect_to_https("a.example", b"POST /x?y=1 HTTP/1.1\r\nHost: a.example\r\n"
                                          b"Content-Length: 3\r\n\r\nabc")
    assert raw.startswith(b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://a.example/x?y=1\r\n")
    assert b"Content-Length: 0\r\n" in raw
    assert _redirect_to_https("a.example", b"GET http://evil/ HTTP/1.1\r\n\r\n").split(
        b"\r\n")[1] == b"Location: https://a.example/"
