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


# --- edges a peer reaches (issue 17, httphead mutants) ---------------------------------------
def test_request_line_edges():
    head = parse_request_head(b"OPTIONS * HTTP/1.0")  # no blank line: still a whole head
    assert (head.method, head.target, head.version, head.path, head.fields) == \
        ("OPTIONS", "*", "1.0", "*", [])
    longest = b"A" * httphead.MAX_METHOD
    assert parse_request_head(longest + b" / HTTP/1.1\r\n\r\n").method == "A" * 64
    # obs-text in the target is kept, read as latin-1; "?" splits off the query once
    head = parse_request_head(b"GET /caf\xe9?a=1?b HTTP/1.1\r\n\r\n")
    assert (head.target, head.path) == ("/caf\u00e9?a=1?b", "/caf\u00e9")
    for bad in [b"GET / HTTP/1.1 \r\n\r\n", b"GET /\x7f HTTP/1.1\r\n\r\n", b"GET\r\n\r\n",
                b"G(T / HTTP/1.1\r\n\r\n", b"GET / http/1.1\r\n\r\n", b" GET / HTTP/1.1\r\n\r\n"]:
        with pytest.raises(HeadError) as e:
            parse_request_head(bad)
        assert (e.value.reason, str(e.value), e.value.http_status) == \
            ("malformed HTTP/1.x request line", "malformed HTTP/1.x request line", 400)
    with pytest.raises(HeadError) as e:
        parse_request_head(b"A" * 65 + b" / HTTP/1.1\r\n\r\n")
    assert (e.value.reason, e.value.http_status) == ("not an HTTP/1.x request", 400)


def test_header_values_stripped_and_checked():
    head = parse_request_head(b"GET / HTTP/1.1\r\nX-A: \t a \t b \t\r\nX-B:caf\xe9\r\n"
                              b"X-C:\r\n!#$%&'*+-.^_`|~09AZaz: t\r\nX-D: XoX\r\n\r\n")
    assert head.fields == [("x-a", "a \t b"), ("x-b", "caf\u00e9"), ("x-c", ""),
                           ("!#$%&'*+-.^_`|~09azaz", "t"), ("x-d", "XoX")]
    assert head.get("absent") == "" and head.get_all("absent") == []
    for line in [b"X: a\x00b", b"X: a\x7f", b"X: a\x1fb", b"X: a\nb", b": v", b"X\x01: v",
                 b"X :v", b"\tX: v"]:
        with pytest.raises(HeadError) as e:
            parse_request_head(b"GET / HTTP/1.1\r\n" + line + b"\r\n\r\n")
        assert (e.value.reason, e.value.http_status) == ("malformed header line", 400)


def test_split_head_bound_exactly():
    # A head of exactly ``limit`` bytes, its blank line included, fits; one more byte does not,
    # whether the head arrives whole or in pieces.
    fits = b"GET / HTTP/1.1\r\nX: " + b"a" * 40
    fits += b"a" * (64 - len(fits) - 4) + b"\r\n\r\n"
    assert len(fits) == 64
    assert httphead.split_head(fits + b"body", limit=64) == (fits, b"body")
    assert httphead.split_head(fits[:-1], limit=64) is None
    over = fits[:-4] + b"a\r\n\r\n"
    for data in [over, over[:64], over[:65]]:
        with pytest.raises(HeadError) as e:
            httphead.split_head(data, limit=64)
        assert (e.value.reason, e.value.http_status) == ("HTTP head exceeds 64 bytes", 431)
    assert httphead.split_head(b"GET / HTTP/1.1\n\nrest") == (b"GET / HTTP/1.1\n\n", b"rest")
    # A blank line first is an (empty) head at once, for the parser to refuse; never a wait.
    assert httphead.split_head(b"\n\nGET / HTTP/1.1\n\n") == (b"\n\n", b"GET / HTTP/1.1\n\n")
    assert httphead.split_head(bytearray(b"GET / HTTP/1.1\r\n\r\n")) == \
        (b"GET / HTTP/1.1\r\n\r\n", b"")
    assert httphead.MAX_HEAD == 16384
    assert httphead.split_head(b"x" * 16383) is None
    with pytest.raises(HeadError, match=r"\AHTTP head exceeds 16384 bytes\Z"):
        httphead.split_head(b"x" * 16384)


def test_response_head_edges():
    r = httphead.parse_response_head(b"HTTP/1.0 204\r\nX-A:  b \r\n\r\n")
    assert (r.version, r.status, r.phrase, r.fields) == ("1.0", 204, "", [("x-a", "b")])
    assert r.get_all("X-A") == ["b"] and r.get("x-b", "none") == "none"
    r = httphead.parse_response_head(b"HTTP/1.1 404 Not\tFound \xe9\n\n")
    assert (r.version, r.status, r.phrase) == ("1.1", 404, "Not\tFound \u00e9")
    for bad in [b"HTTP/1.1 20 OK", b"HTTP/2.0 200 OK", b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 200OK"]:
        with pytest.raises(HeadError) as e:
            httphead.parse_response_head(bad + b"\r\n\r\n")
        assert e.value.reason == f"not an HTTP response: {bad!r}"
    with pytest.raises(HeadError) as e:  # what is quoted of a hostile line is bounded
        httphead.parse_response_head(b"x" * 500 + b"\r\n\r\n")
    assert e.value.reason == "not an HTTP response: " + repr(b"x" * 80)
    for last in [b"X : y", b"X: y\x0c", b"X: y\x0b"]:  # control bytes, even at the very end
        with pytest.raises(HeadError, match=r"\Amalformed header line\Z"):
            httphead.parse_response_head(b"HTTP/1.1 200 OK\r\n" + last + b"\r\n\r\n")
    r = httphead.parse_response_head(b"HTTP/1.1 200 OK\r\nX: XoX\r\n\r\n")
    assert r.fields == [("x", "XoX")]


@pytest.mark.parametrize("status,phrase", [
    (301, "Moved Permanently"), (400, "Bad Request"), (404, "Not Found"),
    (405, "Method Not Allowed"), (408, "Request Timeout"), (421, "Misdirected Request"),
    (426, "Upgrade Required"), (431, "Request Header Fields Too Large"), (502, "Bad Gateway"),
    (503, "Service Unavailable"), (418, "Error"), (100, "Error"), (599, "Error")])
def test_error_response_whole(status, phrase):
    """What a visitor reads, byte for byte: the standard phrase, which is also the body."""
    body = phrase.encode() + b"\n"
    assert http_error_response(status) == (
        f"HTTP/1.0 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def test_error_response_bodies_headers_and_refusals():
    raw = http_error_response(404, "Gone Fishing", "caf\u00e9\n")  # Content-Length in bytes
    assert raw == (b"HTTP/1.0 404 Gone Fishing\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Length: 6\r\nConnection: close\r\n\r\ncaf\xc3\xa9\n")
    assert http_error_response(301, body=b"", headers=[("Location", "/a"), ("X", "\u00e9")],
                               version="1.1") == (
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: /a\r\nX: ?\r\nContent-Type: text/plain;"
        b" charset=utf-8\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    for args, error in [((99,), "HTTP status must be 100-599"),
                        ((600,), "HTTP status must be 100-599"),
                        ((400, "Bad\r\n"), "HTTP reason must be printable ASCII"),
                        ((400, "Caf\u00e9"), "HTTP reason must be printable ASCII")]:
        with pytest.raises(ValueError) as e:
            http_error_response(*args)
        assert str(e.value) == error
    for name, value in [("X\n", "a"), ("X", "a\rb")]:
        with pytest.raises(ValueError) as e:
            http_error_response(400, headers=[(name, value)])
        assert str(e.value) == f"HTTP header {name!r} must be printable"


@pytest.mark.parametrize("value,want", [
    ("203.0.113.9", "203.0.113.9"), (" 1.2.3.4 , 203.0.113.9 ", "203.0.113.9"),
    ("203.0.113.9:4711", "203.0.113.9"), ("x, [2001:db8::1]:443", "2001:db8::1"),
    ("[2001:DB8::1]", "2001:db8::1"), ("2001:db8:0::1", "2001:db8::1"), ("::1", "::1"),
    ("198.51.100.1, 1.2.3.4, 203.0.113.9", "203.0.113.9"),
    ("203.0.113.9, junk", None), ("junk, ", None), ("", None), ("unknown", None),
    ("a203.0.113.9]", None), ("203.0.113.9]:80", None),
    ("[junk]:1", None), ("203.0.113.9:1:2", None), ("a:1", None)])
def test_forwarded_client_is_the_last_entry_if_an_address(value, want):
    assert httphead.forwarded_client(value) == want
