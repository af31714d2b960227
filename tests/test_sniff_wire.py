"""lib/protocol/sniff.py as a peer meets it: the exact answer to each refusal (the HTTP status
and the reason that is the 400 body a client reads, the TLS alert), the bounds to the byte, and
the answers that do not depend on how a connection's reads are split (issue 17: mutation
testing; tests/test_sniff.py has the vectors and fuzzing)."""
import pytest

from lib.protocol import sniff
from lib.protocol.sniff import (
    MAX_HTTP_HEAD, SniffError, classify, normalize_hostname, sniff_http_host, tls_alert,
)


def refusal(sniffer, data):
    """(http_status, alert, reason) of the SniffError ``sniffer(data)`` raises."""
    with pytest.raises(SniffError) as info:
        sniffer(data)
    e = info.value
    assert str(e) == e.reason  # the text logged is the text answered
    return e.http_status, e.alert, e.reason


# --- HTTP: what the client reads in the 400/405/431 answer (lib/proxy/routing.py) ------------
@pytest.mark.parametrize("head,status,reason", [
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, "no Host header"),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400, "no Host header"),
    (b"OPTIONS * HTTP/1.1\r\n\r\n", 400, "no Host header"),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", 400,
     "more than one Host header"),
    # the absolute URI names the host, but two Host headers are refused all the same
    (b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400,
     "more than one Host header"),
    (b"GET http://user@a.example/ HTTP/1.1\r\n\r\n", 400, "user info in request URI"),
    (b"GET http://a.example@b.example/ HTTP/1.1\r\n\r\n", 400, "user info in request URI"),
    (b"GET ftp://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", 400,
     "unsupported request target"),
    (b"GET a.example HTTP/1.1\r\nHost: a.example\r\n\r\n", 400, "unsupported request target"),
    (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", 405,
     "CONNECT is not supported by a reverse proxy"),
    (b"GET http:///x HTTP/1.1\r\n\r\n", 400, "invalid host: empty host name"),
    (b"GET http:///x HTTP/1.1\r\nHost: a.example\r\n\r\n", 400,
     "invalid request target host: empty host name"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: a..b\r\n\r\n", 400,
     "invalid Host: empty label in host name"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n", 400,
     "the Host header names another host than the request target"),
    (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400, "invalid host: unterminated IPv6 literal"),
    (b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", 400, "invalid host: empty label in host name"),
    (b"GET / HTTP/1.1\r\nHost: a.example:0x50\r\n\r\n", 400,
     "invalid host: invalid port in host name"),
    (b" GET / HTTP/1.1\r\n", 400, "not an HTTP/1.x request"),
    (b"G\x00T", 400, "not an HTTP/1.x request"),
    (b"GET / HTTP/3\r\n", 400, "malformed HTTP/1.x request line"),
])
def test_http_refusal_answers(head, status, reason):
    assert refusal(sniff_http_host, head) == (status, None, reason)


def test_http_host_that_is_not_ascii_is_a_400_naming_the_host():
    for head in (b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n",
                 b"GET http://caf\xc3\xa9.example/ HTTP/1.1\r\n\r\n"):
        status, alert, reason = refusal(sniff_http_host, head)
        assert (status, alert) == (400, None) and reason.startswith("invalid host: ")


def test_http_head_bound_answer():
    assert refusal(sniff_http_host, b"GET /" + b"a" * MAX_HTTP_HEAD) == (
        431, None, "HTTP request head exceeds %d bytes" % MAX_HTTP_HEAD)


@pytest.mark.parametrize("head,host", [
    (b"GET / HTTP/1.1\r\nHOST: upper.example\r\n\r\n", "upper.example"),
    (b"GET HTTP://A.example:8080?q HTTP/1.1\r\n\r\n", "a.example"),
    (b"GET http://a.example#f HTTP/1.1\r\nHost: A.Example.:80\r\n\r\n", "a.example"),
    (b"GET * HTTP/1.1\r\nHost: star.example\r\n\r\n", "star.example"),
])
def test_http_hosts_more(head, host):
    assert sniff_http_host(head) == host


# --- names: each rejection reaches the client as "invalid host: <why>" -----------------------
@pytest.mark.parametrize("raw,why", [
    ("", "empty host name"),
    (".", "empty host name"),
    ("a..b", "empty label in host name"),
    ("a b", "invalid label 'a b' in host name"),
    ("-a.example", "invalid label '-a' in host name"),
    ("x" * 64 + ".example", "invalid label '%s' in host name" % ("x" * 64)),
    ("a." * 126 + "ab", "host name longer than 253 characters"),
    ("café.example", "host name must be ASCII (give an internationalised name in its xn-- form)"),
    ("example.com:", "invalid port in host name"),
    ("example.com:65536", "invalid port in host name"),
    ("[::1", "unterminated IPv6 literal"),
    ("[::1]x", "bad text after IPv6 literal"),
    ("[::1]:", "bad text after IPv6 literal"),
    ("[::1]:65536", "bad text after IPv6 literal"),
    ("[zz]", "invalid IPv6 literal"),
    ("*.example.com", "invalid label '*' in host name"),
])
def test_normalize_hostname_says_why(raw, why):
    with pytest.raises(ValueError) as info:
        normalize_hostname(raw)
    assert str(info.value) == why
    if raw.isascii():
        head = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % raw.encode()
        if raw.strip():  # (an empty Host is "no Host header")
            assert refusal(sniff_http_host, head) == (400, None, "invalid host: " + why)


def test_normalize_hostname_refuses_a_non_str():
    with pytest.raises(ValueError, match="^host name must be a str$"):
        normalize_hostname(b"a.example")


def test_normalize_hostname_ports_and_literals():
    assert normalize_hostname("[::1]:65535") == "[::1]"
    assert normalize_hostname("[::1]:0") == "[::1]"
    assert normalize_hostname("[::1]") == "[::1]"
    assert normalize_hostname("a.example:65535") == "a.example"
    assert normalize_hostname("a.example:00443") == "a.example"
    assert normalize_hostname("x" * 63) == "x" * 63
    assert normalize_hostname("a1_-b.example") == "a1_-b.example"
    assert normalize_hostname("1.example") == "1.example"


def test_wildcard_candidates_of_literals():
    # An IP literal is only ever itself: "*.0.0.1" is not a name anyone binds.
    assert list(sniff.wildcard_candidates("[2001:db8::1]")) == ["[2001:db8::1]"]
    assert list(sniff.wildcard_candidates("127.0.0.1")) == ["127.0.0.1"]
    assert list(sniff.wildcard_candidates("1.2.3.example")) == [
        "1.2.3.example", "*.2.3.example", "*.3.example"]


# --- classify and the TLS alert record ---------------------------------------------------------
def test_classify_first_byte_bounds():
    assert classify(b"A") == "http" and classify(b"Z") == "http"
    assert classify(b"\x16") == "tls"
    for first in (b"@", b"[", b"a", b"\x15"):
        assert refusal(classify, first + b"ET / HTTP/1.1\r\n") == (
            400, sniff.ALERT_UNEXPECTED_MESSAGE,
            "neither TLS nor HTTP/1.x (first byte 0x%02x)" % first[0])


def test_classify_checks_the_request_line_so_far():
    assert refusal(classify, b"GET\x00") == (400, None, "not an HTTP/1.x request")
    assert classify(b"GET / HTTP/1.1\r\nHost: a\r\n") == "http"


def test_tls_alert_description_bounds():
    assert tls_alert(0) == bytes.fromhex("15030100020200")
    assert tls_alert(255) == bytes.fromhex("150301000202ff")
    for bad in (-1, 256):
        with pytest.raises(ValueError, match="^alert description must fit in one byte$"):
            tls_alert(bad)
