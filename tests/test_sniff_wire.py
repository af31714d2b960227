"""lib/protocol/sniff.py as a peer meets it: the exact answer to each refusal (the HTTP status
and the reason that is the 400 body a client reads, the TLS alert), the bounds to the byte, and
the answers that do not depend on how a connection's reads are split (issue 17: mutation
testing; tests/test_sniff.py has the vectors and fuzzing)."""
import pytest

from lib.protocol import sniff
from lib.protocol.sniff import (
    MAX_CLIENT_HELLO, MAX_HTTP_HEAD, MAX_TLS_PEEK, MAX_TLS_RECORD, SniffError, classify,
    normalize_hostname, sniff_http_host, sniff_tls_sni, tls_alert,
)
from tests.test_sniff import (
    REAL, client_hello, extension, handshake_message, records, sni_extension, vec,
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
    (b"GET /X HTTP/1.1X\r\n", 400, "malformed HTTP/1.x request line"),
])
def test_http_refusal_answers(head, status, reason):
    assert refusal(sniff_http_host, head) == (status, None, reason)


NOT_ASCII = "host name must be ASCII (give an internationalised name in its xn-- form)"


@pytest.mark.parametrize("head,reason", [
    (b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n", "invalid host: " + NOT_ASCII),
    (b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n", "invalid host: " + NOT_ASCII),
    (b"GET http://caf\xc3\xa9.example/ HTTP/1.1\r\n\r\n", "invalid host: " + NOT_ASCII),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: caf\xc3\xa9\r\n\r\n", "invalid Host: " + NOT_ASCII),
])
def test_http_host_that_is_not_ascii_is_our_one_line_400(head, reason):
    """The body a visitor reads is our reason, never Python's codec message ("'ascii' codec
    can't decode byte 0xc3 ..."), which it was."""
    assert refusal(sniff_http_host, head) == (400, None, reason)


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
    ("[::1]]", "bad text after IPv6 literal"),
    ("[::1]x80", "bad text after IPv6 literal"),
    ("[::1]:x", "bad text after IPv6 literal"),
    ("a.com:80:80", "invalid label 'com:80' in host name"),
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


def test_method_length_bound():
    # httphead.MAX_METHOD (64) bytes of method is still a request; one more is not.
    assert classify(b"A" * 64 + b" ") == "http"
    assert sniff_http_host(b"A" * 64 + b" / HTTP/1.1\r\n") is None
    assert refusal(sniff_http_host, b"A" * 65) == (400, None, "not an HTTP/1.x request")
    assert refusal(sniff_http_host, b"A" * 65 + b" ") == (400, None, "not an HTTP/1.x request")


# --- TLS: the alert each refusal sends, and its reason ----------------------------------------
HM = handshake_message(REAL)


def hello_body(body: bytes) -> bytes:
    """A flight of one record carrying a ClientHello with this body."""
    return records(b"\x01" + vec(3, body), [4096])


def sni_list(*entries: bytes, trailing=b"") -> bytes:
    return records(client_hello(extension(0, vec(2, b"".join(entries)) + trailing)), [4096])


BODY = client_hello(with_extensions=False)[4:]  # version, random, session id, suites, compression
V_R = b"\x03\x03" + b"\x22" * 32


@pytest.mark.parametrize("flight,alert,reason", [
    (bytes.fromhex("802e0100020015000000100100800700c0"), None, "SSLv2-style hello refused"),
    (b"\x17\x03\x03\x00\x05hello", 10, "not a TLS handshake record (first byte 0x17)"),
    (b"\x16\x04\x01", 70, "bad TLS record version 0x04.."),
    # a whole record header in one read is checked as one arriving in pieces
    (b"\x16\x04\x01\x00\x04\x01\x00\x00\x00", 70, "bad TLS record version 0x04.."),
    (b"\x16\x02\x03\x00\x04\x01\x00\x00\x00", 70, "bad TLS record version 0x02.."),
    (b"\x16\x02\x01\x00\x01\x03", 70, "bad TLS record version 0x02.."),
    (b"\x17\x03\x03\x00\x04\x01\x00\x00\x00", 10,
     "not a TLS handshake record (first byte 0x17)"),
    (b"\x16\x03\x01\x00\x00", 10, "empty handshake record"),
    (b"\x16\x03\x01\x40\x01", 22, "TLS record of 16385 bytes exceeds 16384"),
    (records(HM, [100])[:105] + b"\x17\x03\x03\x00\x01x", 10,
     "non-handshake record inside ClientHello"),
    (records(HM, [100])[:105] + b"\x80", 10, "non-handshake record inside ClientHello"),
    (records(HM, [100])[:105] + b"\x16\x02", 70, "bad TLS record version 0x02.."),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", 10,
     "first handshake message is type 2, not ClientHello"),
    (b"\x16\x03\x01\x00\x04\x01" + (MAX_CLIENT_HELLO - 3).to_bytes(3, "big"), 80,
     "ClientHello of 16385 bytes exceeds 16384"),
    (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", 80, "ClientHello of 65540 bytes exceeds 16384"),
    (records(HM + b"\x0b\x00\x00\x00", [4096]), 10, "data after ClientHello"),
    (hello_body(b"\x02\x00" + V_R[2:]), 70, "ClientHello version 0x0200 is not TLS"),
    (hello_body(b"\x02\x03" + V_R[2:]), 70, "ClientHello version 0x0203 is not TLS"),
    (hello_body(b""), 50, "ClientHello truncated in version"),
    (hello_body(b"\x03"), 50, "ClientHello truncated in version"),
    (hello_body(V_R[:33]), 50, "ClientHello truncated in random"),
    (hello_body(V_R), 50, "ClientHello truncated in session id"),
    (hello_body(V_R + b"\x01"), 50, "ClientHello truncated in session id"),
    (hello_body(V_R + b"\x00\x00"), 50, "ClientHello truncated in cipher suites"),
    (hello_body(V_R + b"\x00\x00\x02\x13"), 50, "ClientHello truncated in cipher suites"),
    (hello_body(V_R + b"\x00\x00\x02\x13\x01"), 50, "ClientHello truncated in compression methods"),
    (hello_body(V_R + b"\x00\x00\x02\x13\x01\x01"), 50,
     "ClientHello truncated in compression methods"),
    (hello_body(V_R + vec(1, b"\x00" * 33)), 50, "session id longer than 32 bytes"),
    (records(client_hello(suites=b""), [4096]), 50, "bad cipher suite list"),
    (records(client_hello(suites=b"\x13\x01\x13"), [4096]), 50, "bad cipher suite list"),
    (records(client_hello(compression=b""), [4096]), 50, "empty compression method list"),
    (hello_body(BODY + b"\x00"), 50, "ClientHello truncated in extensions"),
    (hello_body(BODY + b"\x00\x05abc"), 50, "ClientHello truncated in extensions"),
    (hello_body(BODY + vec(2, b"") + b"zz"), 50, "bytes after ClientHello extensions"),
    (records(client_hello(b"\x00"), [4096]), 50, "ClientHello truncated in extension type"),
    (records(client_hello(b"\x00\x15\x00"), [4096]), 50, "ClientHello truncated in extension"),
    (records(client_hello(b"\x00\x15\x00\x05abc"), [4096]), 50,
     "ClientHello truncated in extension"),
    (records(client_hello(extension(5, b"") + extension(5, b"")), [4096]), 47,
     "duplicate extension 5"),
    (records(client_hello(sni_extension(b"a.example") + sni_extension(b"b.example")), [4096]),
     47, "duplicate extension 0"),
    (records(client_hello(sni_extension(b"a.example", b"b.example")), [4096]), 47,
     "two host_name entries in server_name"),
    (records(client_hello(extension(0, b"")), [4096]), 50,
     "ClientHello truncated in server name list"),
    (records(client_hello(extension(0, b"\x00\x05ab")), [4096]), 50,
     "ClientHello truncated in server name list"),
    (sni_list(), 50, "bad server_name extension"),
    (sni_list(b"\x00" + vec(2, b"a.example"), trailing=b"x"), 50, "bad server_name extension"),
    (sni_list(b"\x00\x00"), 50, "ClientHello truncated in server name"),
    (sni_list(b"\x00\x00\x09a.ex"), 50, "ClientHello truncated in server name"),
    (sni_list(b"\x00" + vec(2, b"a.example"), b"\x01"), 50,
     "ClientHello truncated in server name"),
    (records(client_hello(sni_extension(b"bad/name.example")), [4096]), 112,
     "invalid server_name: invalid label 'bad/name' in host name"),
])
def test_tls_refusal_answers(flight, alert, reason):
    assert refusal(sniff_tls_sni, flight) == (None, alert, reason)


def test_tls_refusal_of_a_name_that_is_not_ascii():
    status, alert, reason = refusal(
        sniff_tls_sni, records(client_hello(sni_extension(b"caf\xc3\xa9.example")), [4096]))
    assert (status, alert, reason) == (None, 112, "invalid server_name: " + NOT_ASCII)


@pytest.mark.parametrize("flight,name", [
    (hello_body(V_R + vec(1, b"\x00" * 32) + b"\x00\x02\x13\x01\x01\x00"), ""),  # 32-byte id
    (hello_body(BODY + vec(2, b"")), ""),  # an empty extension list
    (records(client_hello(extension(5, b"") + extension(0x0a, b"\x00")), [4096]), ""),
    # the legacy_version of a TLS 1.0 client, or one from the future: any 0x03xx is TLS
    (records(client_hello(sni_extension(b"v.example"), version=b"\x03\x01"), [4096]),
     "v.example"),
    (records(client_hello(sni_extension(b"v.example"), version=b"\x03\x07"), [4096]),
     "v.example"),
    (sni_list(b"\x01" + vec(2, b"x"), b"\x00" + vec(2, b"A.Example"), b"\x02" + vec(2, b"")),
     "a.example"),
    (records(client_hello(extension(0xff01, b"\x00") + sni_extension(b"last.example")),
             [4096]), "last.example"),
])
def test_tls_hellos_accepted(flight, name):
    assert sniff_tls_sni(flight) == name


# --- TLS bounds to the byte -------------------------------------------------------------------
def test_hello_filling_the_peek_bound_exactly_is_read():
    # 820 records (10, 10, then 20-byte fragments) of a 16,380-byte hello: 20,480 bytes in all.
    pad = 16380 - len(client_hello(sni_extension(b"fits.example") + extension(21, b"")))
    message = client_hello(sni_extension(b"fits.example") + extension(21, b"\x00" * pad))
    flight = records(message, [10, 10, 20])
    assert len(flight) == MAX_TLS_PEEK
    assert sniff_tls_sni(flight) == "fits.example"
    # one byte more of hello needs one more record, past the bound: refused at its header
    message = client_hello(sni_extension(b"fits.example") + extension(21, b"\x00" * (pad + 1)))
    flight = records(message, [10, 10, 20])
    assert refusal(sniff_tls_sni, flight[:MAX_TLS_PEEK + 5]) == (
        None, 80, "ClientHello not complete within 20480 bytes")


def test_need_more_until_a_next_record_cannot_fit():
    message = client_hello(sni_extension(b"x.example") + extension(21, b"\x00" * 4000))
    # a 4-byte record then 1-byte records: after 3,412 records the next header ends at the bound
    fits = records(message, [4, 1])[:9 + 6 * 3411]
    assert sniff_tls_sni(fits) is None
    # a 5-byte record first: the next header would end one byte past it
    over = records(message, [5, 1])[:10 + 6 * 3411]
    assert refusal(sniff_tls_sni, over) == (None, 80, "ClientHello not complete within 20480 bytes")


# --- the answer does not depend on where a read ends ------------------------------------------
SPLIT_FLIGHTS = [
    b"\x16" + REAL,  # a second header start inside the first header: bad version 0x16
    records(HM, [200, 50, 3]),
    records(client_hello(sni_extension(b"two.example")), [40, 1]),
    records(HM, [100])[:105] + b"\x17\x03\x03\x00\x01x",
    records(HM, [100])[:105] + b"\x16\x02",
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
    b"\x80\x2e\x01\x00",
    records(HM + b"\x0b\x00\x00\x00", [200]),
]


@pytest.mark.parametrize("flight", SPLIT_FLIGHTS)
def test_tls_sniffer_answers_the_same_wherever_a_read_ends(flight):
    whole = answer(sniff_tls_sni, flight)
    for cut in range(1, len(flight)):
        fed = sniff.TLSNameSniffer()
        got = answer(fed.feed, flight[:cut])
        if got == ("more", None):
            got = answer(fed.feed, flight[cut:])
        assert got == whole, cut


HTTP_HEADS = [
    b"GET /x HTTP/1.1\r\nHost: split.example\r\n\r\n",
    b"GET /x HTTP/1.1\nHost: lf.example\n\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GE\x00 /x HTTP/1.1\r\n",
    b"A" * 65 + b" / HTTP/1.1\r\n",
]


@pytest.mark.parametrize("head", HTTP_HEADS)
def test_http_sniffer_answers_the_same_wherever_a_read_ends(head):
    whole = answer(sniff_http_host, head)
    for cut in range(1, len(head)):
        fed = sniff.HTTPHostSniffer()
        got = answer(fed.feed, head[:cut])
        if got == ("more", None):
            got = answer(fed.feed, head[cut:])
        assert got == whole, cut
        assert answer(fed.feed, b"more bytes") == whole  # and the same again after deciding


def answer(feed, data):
    try:
        value = feed(data)
    except SniffError as e:
        return "error", e.reason, e.alert, e.http_status
    return ("more", None) if value is None else ("name", value)


def test_http_blank_line_past_the_bound_is_431_whole_or_in_pieces():
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: "
    head += b"x" * (MAX_HTTP_HEAD + 1 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HTTP_HEAD + 1
    assert refusal(sniff_http_host, head)[0] == 431
    fed = sniff.HTTPHostSniffer()
    assert fed.feed(head[:MAX_HTTP_HEAD - 1]) is None
    assert answer(fed.feed, head[MAX_HTTP_HEAD - 1:])[3] == 431


@pytest.mark.parametrize("data", [
    b"GE\x00 / HTTP/1.1\r\n", b"GET\x00/ HTTP/1.1\r\n", b"GET / HTTP/3\r\nHost: a\r\n\r\n",
    b"A" * 70 + b" / HTTP/1.1\r\n", b"GET /x HTTP/1.1 \r\n", b"\r\n\r\nGET / HTTP/1.1\r\n",
    b"GET /" + b"\x00" * 5 + b" HTTP/1.1\r\n",
])
def test_http_refused_at_the_same_byte_read_one_by_one(data):
    # A client sending a byte at a time is refused as soon as the bytes so far can no longer
    # become a request: at the same byte as the whole-buffer sniffer.
    whole_at = next(n for n in range(1, len(data) + 1)
                    if answer(sniff_http_host, data[:n])[0] == "error")
    fed = sniff.HTTPHostSniffer()
    fed_at = next(n for n in range(1, len(data) + 1)
                  if answer(fed.feed, data[n - 1:n])[0] == "error")
    assert fed_at == whole_at


@pytest.mark.parametrize("flight", SPLIT_FLIGHTS[:1] + SPLIT_FLIGHTS[3:] + [b"\x16\x04\x01\x00\x04\x01\x00\x00\x00"])
def test_tls_refused_at_the_same_byte_read_one_by_one(flight):
    whole_at = next(n for n in range(1, len(flight) + 1)
                    if answer(sniff_tls_sni, flight[:n])[0] == "error")
    fed = sniff.TLSNameSniffer()
    fed_at = next(n for n in range(1, len(flight) + 1)
                  if answer(fed.feed, flight[n - 1:n])[0] == "error")
    assert fed_at == whole_at


def test_wildcard_patterns_are_checked_past_the_star():
    # A "*" first label is a pattern (allow-lists, wildcard binds); the labels after it are
    # checked like any name's. A two-label pattern is well-formed; it never matches a name
    # under a top-level domain, as wildcard_candidates never yields "*.<tld>".
    assert normalize_hostname("*.example", allow_wildcard=True) == "*.example"
    with pytest.raises(ValueError) as info:
        normalize_hostname("*.a/b.example", allow_wildcard=True)
    assert str(info.value) == "invalid label 'a/b' in host name"
    with pytest.raises(ValueError) as info:
        normalize_hostname("*.example..com", allow_wildcard=True)
    assert str(info.value) == "empty label in host name"


def test_record_reaching_past_the_peek_bound_refused_at_its_header():
    message = client_hello(sni_extension(b"x.example") + extension(21, b"\x00" * 15000))
    tiny = 3330  # 1-byte records up to 19,980 bytes, then one record with the rest
    flight = records(message[:tiny], [1]) + records(message[tiny:], [MAX_TLS_RECORD])
    assert refusal(sniff_tls_sni, flight[:6 * tiny + 5]) == (
        None, 80, "ClientHello not complete within 20480 bytes")


def test_http_request_line_checked_once_however_the_headers_arrive(monkeypatch):
    examined = []
    check = sniff._check_request_line_prefix
    monkeypatch.setattr(sniff, "_check_request_line_prefix",
                        lambda data: examined.append(len(data)) or check(data))
    line = b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\n"
    head = line + b"Host: a.example\r\n" + b"X: " + b"x" * 4000 + b"\r\n\r\n"
    fed = sniff.HTTPHostSniffer()
    for i in range(len(head) - 1):
        assert fed.feed(head[i:i + 1]) is None
    assert fed.feed(head[-1:]) == "a.example"
    assert sum(examined) <= 2 * len(head)  # re-checking the line per read: ~4000 x 4000
