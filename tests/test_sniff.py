"""Byte-vector and fuzz tests for lib/protocol/sniff.py (SNI and Host sniffers, name helpers)."""
import ssl

import h11
import pytest
from hypothesis import given, settings, strategies as st

from lib.protocol import sniff
from tests.support.sniffwork import count_records_opened
from lib.protocol.sniff import (
    MAX_CLIENT_HELLO, MAX_HTTP_HEAD, MAX_TLS_PEEK, MAX_TLS_RECORD, SniffError, classify,
    http_error_response, normalize_hostname, sniff_http_host, sniff_tls_sni, tls_alert,
    wildcard_candidates,
)


# --- ClientHello material -------------------------------------------------------------------
def real_client_hello(server_hostname, **ctx_options):
    """The first flight of a real Python/OpenSSL TLS client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for key, value in ctx_options.items():
        setattr(ctx, key, value)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def handshake_message(flight):
    """Reassemble the handshake message carried by a flight of records."""
    out, pos = b"", 0
    while pos < len(flight):
        length = int.from_bytes(flight[pos + 3:pos + 5], "big")
        out += flight[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out


def records(message, sizes, version=b"\x03\x01"):
    """Split a handshake message into handshake records of the given fragment sizes (the last
    size repeats), as a client with a large hello (Chrome's post-quantum key share) may."""
    out, pos, i = b"", 0, 0
    while pos < len(message):
        size = sizes[min(i, len(sizes) - 1)]
        fragment = message[pos:pos + size]
        out += b"\x16" + version + len(fragment).to_bytes(2, "big") + fragment
        pos += size
        i += 1
    return out


def vec(len_bytes, payload):
    return len(payload).to_bytes(len_bytes, "big") + payload


def extension(ext_type, payload):
    return ext_type.to_bytes(2, "big") + vec(2, payload)


def sni_extension(*names, name_type=0):
    return extension(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def client_hello(extensions=b"", *, with_extensions=True, version=b"\x03\x03",
                 session_id=b"\x11" * 32, suites=b"\x13\x01\x13\x02", compression=b"\x00"):
    """A hand-built ClientHello handshake message (header included)."""
    body = (version + b"\x22" * 32 + vec(1, session_id) + vec(2, suites) + vec(1, compression))
    if with_extensions:
        body += vec(2, extensions)
    return b"\x01" + vec(3, body)


PADDING = extension(21, b"\x00" * 1500)  # RFC 7685 padding: makes a >1.5 KB hello


REAL = real_client_hello("www.example.com")


# --- TLS: real hellos -----------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("www.example.com", "www.example.com"),
    ("Mixed.Case.Example.ORG", "mixed.case.example.org"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a" * 63 + ".example.com", "a" * 63 + ".example.com"),
    (None, ""),
])
def test_real_openssl_client_hello(name, expected):
    assert sniff_tls_sni(real_client_hello(name)) == expected


def test_real_tls12_only_client_hello():
    hello = real_client_hello("tls12.example.net", maximum_version=ssl.TLSVersion.TLSv1_2)
    assert sniff_tls_sni(hello) == "tls12.example.net"


def test_every_prefix_of_real_hello_needs_more():
    for n in range(len(REAL)):
        assert sniff_tls_sni(REAL[:n]) is None, n
    assert sniff_tls_sni(REAL) == "www.example.com"


def test_bytes_after_the_hello_records_are_left_alone():
    # A TLS 1.3 client may send change_cipher_spec and 0-RTT data right after its hello.
    ccs = b"\x14\x03\x03\x00\x01\x01"
    assert sniff_tls_sni(REAL + ccs + b"\x17\x03\x03\x00\x05hello") == "www.example.com"
    assert sniff_tls_sni(bytearray(REAL) + b"\xff") == "www.example.com"


# --- TLS: multi-record hellos ---------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[1], [7], [100], [512, 10000], [1200, 1], [16384]])
def test_hello_split_across_records(sizes):
    message = client_hello(sni_extension(b"split.example.com") + PADDING)
    assert len(message) > 1500
    flight = records(message, sizes)
    assert sniff_tls_sni(flight) == "split.example.com"


def test_split_real_hello_every_prefix():
    flight = records(handshake_message(REAL), [200, 50, 3])
    assert flight.count(b"\x16\x03\x01") >= 4
    for n in range(len(flight)):
        assert sniff_tls_sni(flight[:n]) is None, n
    assert sniff_tls_sni(flight) == "www.example.com"


def test_largest_accepted_hello_in_full_size_records():
    pad = MAX_CLIENT_HELLO - len(client_hello(sni_extension(b"big.example")
                                              + extension(21, b"")))
    message = client_hello(sni_extension(b"big.example") + extension(21, b"\x00" * pad))
    assert len(message) == MAX_CLIENT_HELLO
    flight = records(message, [MAX_TLS_RECORD])
    assert sniff_tls_sni(flight) == "big.example"


# --- TLS: refusals --------------------------------------------------------------------------
def alert_of(data):
    with pytest.raises(SniffError) as info:
        sniff_tls_sni(data)
    assert isinstance(info.value, ValueError)
    return info.value.alert


def test_sslv2_hello_refused():
    sslv2 = bytes.fromhex("802e0100020015000000100100800700c0") + b"\x00" * 16
    with pytest.raises(SniffError, match="SSLv2"):
        sniff_tls_sni(sslv2)
    with pytest.raises(SniffError):
        sniff_tls_sni(b"\x80")  # refused from the first byte


def test_not_handshake_records_refused_early():
    assert alert_of(b"\x17") == sniff.ALERT_UNEXPECTED_MESSAGE  # application data
    assert alert_of(b"GET / HTTP/1.1\r\n") == sniff.ALERT_UNEXPECTED_MESSAGE
    assert alert_of(b"\x16\x02") == sniff.ALERT_PROTOCOL_VERSION
    assert alert_of(b"\x16\x03\x01\x00\x00") == sniff.ALERT_UNEXPECTED_MESSAGE  # empty record


def test_record_overflow():
    assert alert_of(b"\x16\x03\x01" + (MAX_TLS_RECORD + 1).to_bytes(2, "big")) \
        == sniff.ALERT_RECORD_OVERFLOW


def test_first_handshake_message_must_be_client_hello():
    server_hello = b"\x02" + REAL[6:]
    assert alert_of(REAL[:5] + server_hello) == sniff.ALERT_UNEXPECTED_MESSAGE
    assert alert_of(b"\x16\x03\x01\x00\x01\x02") == sniff.ALERT_UNEXPECTED_MESSAGE


def test_hello_too_large_refused_from_its_header():
    header = b"\x01" + (MAX_CLIENT_HELLO - 3).to_bytes(3, "big")
    assert alert_of(b"\x16\x03\x01\x00\x04" + header) == sniff.ALERT_INTERNAL_ERROR


def test_alert_or_ccs_inside_a_split_hello_refused():
    flight = records(handshake_message(REAL), [100])
    alert = b"\x15\x03\x03\x00\x02\x02\x28"
    assert alert_of(flight[:105] + alert) == sniff.ALERT_UNEXPECTED_MESSAGE


def test_data_after_client_hello_in_the_same_record_refused():
    message = handshake_message(REAL) + b"\x0b\x00\x00\x00"
    assert alert_of(records(message, [len(message)])) == sniff.ALERT_UNEXPECTED_MESSAGE
    assert alert_of(records(message, [len(message) - 2])) == sniff.ALERT_UNEXPECTED_MESSAGE


def test_peek_bound_holds_for_tiny_fragments():
    # A 16 KiB hello in 1-byte records would need 6 bytes per hello byte: refused once the
    # bound is crossed, never "need more" beyond MAX_TLS_PEEK.
    message = client_hello(sni_extension(b"x.example") + extension(21, b"\x00" * 10000))
    flight = records(message, [1])
    assert alert_of(flight) == sniff.ALERT_INTERNAL_ERROR
    assert alert_of(flight[:MAX_TLS_PEEK]) == sniff.ALERT_INTERNAL_ERROR
    assert sniff_tls_sni(flight[:MAX_TLS_PEEK - 6]) is None


@pytest.mark.parametrize("message,alert", [
    (client_hello(version=b"\x02\x00"), sniff.ALERT_PROTOCOL_VERSION),
    (client_hello(session_id=b"\x00" * 33), sniff.ALERT_DECODE_ERROR),
    (client_hello(suites=b""), sniff.ALERT_DECODE_ERROR),
    (client_hello(suites=b"\x13"), sniff.ALERT_DECODE_ERROR),
    (client_hello(compression=b""), sniff.ALERT_DECODE_ERROR),
    (client_hello(sni_extension(b"a.example") + sni_extension(b"b.example")),
     sniff.ALERT_ILLEGAL_PARAMETER),
    (client_hello(sni_extension(b"a.example", b"b.example")), sniff.ALERT_ILLEGAL_PARAMETER),
    (client_hello(extension(0, b"")), sniff.ALERT_DECODE_ERROR),
    (client_hello(extension(0, b"\x00\x00")), sniff.ALERT_DECODE_ERROR),
    (client_hello(sni_extension(b"bad/name.example")), sniff.ALERT_UNRECOGNIZED_NAME),
    (client_hello(sni_extension(b"caf\xc3\xa9.example")), sniff.ALERT_UNRECOGNIZED_NAME),
    (client_hello(sni_extension(b"a..example")), sniff.ALERT_UNRECOGNIZED_NAME),
    (client_hello(sni_extension(b"")), sniff.ALERT_UNRECOGNIZED_NAME),
    (client_hello(b"\x00\x00\x00\x05abc"), sniff.ALERT_DECODE_ERROR),  # extension overruns
    (b"\x01\x00\x00\x00", sniff.ALERT_DECODE_ERROR),  # empty ClientHello (go-vhost's panic)
])
def test_malformed_hellos(message, alert):
    assert alert_of(records(message, [4096])) == alert


def test_hello_without_extensions_and_other_name_types():
    assert sniff_tls_sni(records(client_hello(with_extensions=False), [4096])) == ""
    assert sniff_tls_sni(records(client_hello(b""), [4096])) == ""
    other_type = client_hello(sni_extension(b"x", name_type=7))
    assert sniff_tls_sni(records(other_type, [4096])) == ""
    both = client_hello(extension(0, vec(2, b"\x07" + vec(2, b"x") + b"\x00"
                                         + vec(2, b"Host.Example."))))
    assert sniff_tls_sni(records(both, [4096])) == "host.example"


def test_sni_port_and_trailing_dot_stripped():
    hello = client_hello(sni_extension(b"WWW.Example.com.:443"))
    assert sniff_tls_sni(records(hello, [4096])) == "www.example.com"


# --- TLS alert ------------------------------------------------------------------------------
def test_tls_alert_bytes():
    assert tls_alert(112) == bytes.fromhex("15030100020270")
    with pytest.raises(ValueError):
        tls_alert(256)


def test_real_client_understands_our_alert():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="nobody.example")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    incoming.write(tls_alert(sniff.ALERT_UNRECOGNIZED_NAME))
    with pytest.raises(ssl.SSLError, match="(?i)unrecognized.name"):
        client.do_handshake()


# --- HTTP -----------------------------------------------------------------------------------
GET = (b"GET /index.html?q=1 HTTP/1.1\r\nUser-Agent: curl/8.0\r\nHost: WWW.Example.com:8080"
       b"\r\nAccept: */*\r\n\r\nbody-bytes-that-stay")


def test_http_host_whole_and_byte_at_a_time():
    assert sniff_http_host(GET) == "www.example.com"
    head_end = GET.index(b"\r\n\r\n") + 4
    for n in range(head_end):
        assert sniff_http_host(GET[:n]) is None, n
    assert sniff_http_host(GET[:head_end]) == "www.example.com"


@pytest.mark.parametrize("head,host", [
    (b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n", "a.example"),
    (b"GET / HTTP/1.1\nHost: lf.example\n\n", "lf.example"),  # bare LF
    (b"GET / HTTP/1.1\r\nhOsT:b.example  \r\n\r\n", "b.example"),
    (b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:80\r\n\r\n", "[2001:db8::1]"),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n", "127.0.0.1"),
    (b"GET / HTTP/1.1\r\nHost: trailing.dot.example.\r\n\r\n", "trailing.dot.example"),
    (b"OPTIONS * HTTP/1.1\r\nHost: opt.example\r\n\r\n", "opt.example"),
    (b"GET http://Abs.Example:81/x HTTP/1.1\r\nHost: abs.example.:81\r\n\r\n", "abs.example"),
    (b"GET HTTPS://abs.example HTTP/1.1\r\n\r\n", "abs.example"),
    (b"POST http://[::1]:9/p?x HTTP/1.0\r\nContent-Length: 0\r\n\r\n", "[::1]"),
    (b"PROPFIND /dav HTTP/1.1\r\nX-Thing: a:b\r\nHost: dav.example\r\n\r\n", "dav.example"),
])
def test_http_hosts(head, host):
    assert sniff_http_host(head) == host
    for n in range(len(head) - 1):
        assert sniff_http_host(head[:n]) is None, (n, head[:n])


@pytest.mark.parametrize("head,status", [
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.0\r\n\r\n", 400),  # HTTP/1.0 without Host: no name to route by
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", 400),  # space before colon
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\nHost: a.example\r\n\r\n", 400),  # obs-fold
    (b"GET / HTTP/1.1\r\nHost: a.example/x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: a.example\r\n\r\n", 400),  # bare CR
    (b"GET / HTTP/1.1\r\nHost: a.example\x00\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", 400),
    (b"GET http://user@a.example/ HTTP/1.1\r\n\r\n", 400),
    # absolute-form routes by the target, the origin may go by Host: they must agree
    (b"GET http://victim.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", 400),
    (b"GET https://a.example:80/ HTTP/1.1\r\nHost: b.example:80\r\n\r\n", 400),
    (b"GET http://a.example/ HTTP/1.1\r\nHost:\r\n\r\n", 400),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n", 400),
    (b"GET ftp://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", 400),
    (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", 405),
    (b"GET / HTTP/2.0\r\nHost: a.example\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),  # HTTP/2 prior-knowledge preface
    (b"GET /\r\n\r\n", 400),  # HTTP/0.9
    (b"GET  / HTTP/1.1\r\nHost: a.example\r\n\r\n", 400),
])
def test_http_refusals(head, status):
    with pytest.raises(SniffError) as info:
        sniff_http_host(head)
    assert info.value.http_status == status


def test_http_refused_as_soon_as_the_request_line_is_wrong():
    for prefix in [b"\x16", b" GET", b"GET\t/", b"G\x00", b"GET / HTTP/3\r\n", b"GET /\n"]:
        with pytest.raises(SniffError):
            sniff_http_host(prefix)


def test_http_head_bound():
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: " + b"c" * MAX_HTTP_HEAD
    for n in (MAX_HTTP_HEAD, len(head)):
        with pytest.raises(SniffError) as info:
            sniff_http_host(head[:n])
        assert info.value.http_status == 431
    assert sniff_http_host(head[:MAX_HTTP_HEAD - 1]) is None
    # a head ending exactly at the bound is still accepted
    fits = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: "
    fits += b"x" * (MAX_HTTP_HEAD - len(fits) - 4) + b"\r\n\r\n"
    assert len(fits) == MAX_HTTP_HEAD
    assert sniff_http_host(fits + b"tail") == "a.example"


def test_http_error_response_is_valid_http():
    raw = http_error_response(404, "Not Found", "no tunnel for a.example\n")
    assert raw.startswith(b"HTTP/1.0 404 Not Found\r\n")
    assert b"Connection: close\r\n" in raw
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a.example")]))
    client.receive_data(raw)
    response = client.next_event()
    assert response.status_code == 404
    assert client.next_event().data == b"no tunnel for a.example\n"
    assert type(client.next_event()) is h11.EndOfMessage
    assert http_error_response(502, "Bad Gateway").endswith(b"\r\n\r\nBad Gateway\n")
    with pytest.raises(ValueError):
        http_error_response(400, "Bad\r\nX-Injected: 1")


# --- classify -------------------------------------------------------------------------------
def test_classify():
    assert classify(b"") is None
    assert classify(REAL[:1]) == "tls"
    assert classify(REAL) == "tls"
    assert classify(b"G") == "http"
    assert classify(GET) == "http"
    for junk in [b"\x00", b"\x80\x2e", b"get / HTTP/1.1", b"SSH-2.0-OpenSSH_9.6\r\n",
                 b"\r\nGET"]:
        with pytest.raises(SniffError):
            classify(junk)


# --- names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,norm", [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("example.com:443", "example.com"),
    ("example.com.:443", "example.com"),
    ("_acme.example.com", "_acme.example.com"),
    ("localhost", "localhost"),
    ("10.0.0.1:80", "10.0.0.1"),
    ("[::FFFF:1.2.3.4]:80", "[::ffff:102:304]"),
    ("a-b.c", "a-b.c"),
    ("x" * 63 + "." + "y" * 63 + "." + "z" * 63 + "." + "w" * 61, None),
])
def test_normalize_hostname(raw, norm):
    assert normalize_hostname(raw) == (norm or raw)


@pytest.mark.parametrize("raw", [
    "", ".", "a..b", ".a.b", "a b", "a/b", "a_b\x00", "-a.example", "a-.example",
    "x" * 64 + ".example", "a." * 126 + "ab", "café.example", "*.example.com", "a.*.com",
    "example.com:", "example.com:65536", "example.com:x", "::1", "[::1", "[::1]x", "[zz]",
    "a.com:80:80",
])
def test_normalize_hostname_rejects(raw):
    with pytest.raises(ValueError):
        normalize_hostname(raw)


def test_normalize_wildcards():
    assert normalize_hostname("*.Example.com", allow_wildcard=True) == "*.example.com"
    for bad in ["*", "*.", "a.*.com", "**.example.com", "*a.example.com"]:
        with pytest.raises(ValueError):
            normalize_hostname(bad, allow_wildcard=True)


def test_wildcard_candidates():
    assert list(wildcard_candidates("a.b.example.com")) == [
        "a.b.example.com", "*.b.example.com", "*.example.com"]
    assert list(wildcard_candidates("example.com")) == ["example.com"]
    assert list(wildcard_candidates("localhost")) == ["localhost"]
    assert list(wildcard_candidates("10.1.2.3")) == ["10.1.2.3"]
    assert list(wildcard_candidates("[::1]")) == ["[::1]"]
    assert "*.com" not in wildcard_candidates("x.y.z.com")


# --- fuzz -----------------------------------------------------------------------------------
def only_str_none_or_sniff_error(func, data):
    try:
        result = func(data)
    except SniffError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return "error"
    assert result is None or isinstance(result, str)
    return result


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    for func in (sniff_tls_sni, sniff_http_host, classify):
        only_str_none_or_sniff_error(func, data)
    only_str_none_or_sniff_error(sniff_tls_sni, b"\x16\x03\x01" + data)
    only_str_none_or_sniff_error(sniff_http_host, b"GET / HTTP/1.1\r\n" + data)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_hello(data):
    flight = bytearray(records(handshake_message(REAL), [data.draw(st.integers(1, 600))]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(flight) - 1))
        flight[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(flight)))
    result = only_str_none_or_sniff_error(sniff_tls_sni, bytes(flight[:cut]))
    if isinstance(result, str) and result:
        assert normalize_hostname(result) == result


@settings(max_examples=500, deadline=None)
@given(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,4}",
                     fullmatch=True),
       st.sampled_from(["", ":1", ":443", ":65535", "."]))
def test_fuzz_valid_names_round_trip(name, suffix):
    head = b"GET / HTTP/1.1\r\nHost: %s%s\r\n\r\n" % (name.encode(), suffix.encode())
    assert sniff_http_host(head) == name
    hello = records(client_hello(sni_extension((name + suffix).encode())), [97])
    assert sniff_tls_sni(hello) == name
    assert normalize_hostname(name.upper() + suffix) == name


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.integers(0, MAX_CLIENT_HELLO), st.binary(max_size=64))
def test_fuzz_never_need_more_past_the_bounds(fragment, pad, tail):
    # The I/O layer's buffer is bounded only if a full-size peek always gets an answer.
    message = client_hello(sni_extension(b"a.example") + extension(21, b"\x00" * pad))
    flight = records(message, [fragment]) + tail
    if len(flight) >= MAX_TLS_PEEK:
        assert only_str_none_or_sniff_error(sniff_tls_sni, flight[:MAX_TLS_PEEK]) is not None
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: " + b"x" * (pad + MAX_HTTP_HEAD // 2) + tail
    if len(head) >= MAX_HTTP_HEAD:
        assert only_str_none_or_sniff_error(sniff_http_host, head[:MAX_HTTP_HEAD]) is not None


# --- Incremental sniffers (what the proxy feeds each read to) --------------------------------
def fed_in(sniffer_class, data: bytes, piece: int = 1):
    """The answer after feeding ``data`` in pieces of ``piece`` bytes: (kind, value)."""
    fed = sniffer_class()
    answer = ("more", None)
    for i in range(0, len(data), piece):
        try:
            value = fed.feed(data[i:i + piece])
        except SniffError as e:
            return "error", str(e)
        if value is not None:
            return "name", value
    return answer


def first_answer(sniffer, data: bytes, piece: int = 1):
    """What the whole-buffer sniffer says at the first prefix (in steps of ``piece``) where it
    decides: what the proxy answered when it re-sniffed its buffer after every read."""
    for n in range(piece, len(data) + piece, piece):
        try:
            value = sniffer(data[:n])
        except SniffError as e:
            return "error", str(e)
        if value is not None:
            return "name", value
    return "more", None


@pytest.mark.parametrize("flight", [REAL, records(handshake_message(REAL), [200, 50, 3]),
                                    records(handshake_message(REAL), [1]),
                                    REAL[:5] + b"\x02" + REAL[6:],  # not a ClientHello
                                    b"\x16\x03\x01\x00\x00", b"\x16\x04", b"GET / HTTP/1.1"])
@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
def test_tls_sniffer_fed_in_pieces_answers_as_the_whole_buffer(flight, piece):
    assert fed_in(sniff.TLSNameSniffer, flight, piece) == first_answer(sniff_tls_sni, flight,
                                                                       piece)


@pytest.mark.parametrize("head", [GET, b"GET / HTTP/1.1\nHost: lf.example\n\n",
                                  b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                                  b"G\x00T / HTTP/1.1\r\n", b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n",
                                  b"GET /" + b"a" * MAX_HTTP_HEAD])
@pytest.mark.parametrize("piece", [1, 2, 5, 8192])
def test_http_sniffer_fed_in_pieces_answers_as_the_whole_buffer(head, piece):
    assert fed_in(sniff.HTTPHostSniffer, head, piece) == first_answer(sniff_http_host, head,
                                                                      piece)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_sniffers_fed_in_pieces_agree_on_any_bytes(data, piece):
    for cls, fn in ((sniff.TLSNameSniffer, sniff_tls_sni), (sniff.HTTPHostSniffer,
                                                            sniff_http_host)):
        for prefix in (b"", b"\x16\x03\x01\x00\x40\x01", b"GET / HTTP/1.1\r\n"):
            assert fed_in(cls, prefix + data, piece) == first_answer(fn, prefix + data, piece)


def test_sniffer_answers_the_same_after_deciding():
    fed = sniff.TLSNameSniffer()
    assert fed.feed(REAL) == "www.example.com"
    assert fed.feed(b"\x17\x03\x03") == "www.example.com"
    fed = sniff.HTTPHostSniffer()
    with pytest.raises(SniffError):
        fed.feed(b"\x00")
    with pytest.raises(SniffError):
        fed.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


def test_tls_sniffer_work_is_linear_in_tiny_records(monkeypatch):
    # Issue 11 item 12: a hello in 1-byte records up to the peek bound, one record per read.
    # Re-walking every record on each read checked ~n^2/2 record headers (6-7 s of CPU).
    calls = count_records_opened(monkeypatch)
    n = MAX_TLS_PEEK // 6
    hello = b"\x01" + (n - 4).to_bytes(3, "big") + handshake_message(REAL)[4:][:n - 4]
    flight = records(hello, [1])
    fed = sniff.TLSNameSniffer()
    for i in range(0, len(flight), 6):
        try:
            fed.feed(flight[i:i + 6])
        except SniffError:
            break
    assert 0 < len(calls) <= n + 1  # n^2/2 when re-walked


def test_http_sniffer_work_is_linear_byte_by_byte(monkeypatch):
    examined = []
    check = sniff._check_request_line_prefix
    monkeypatch.setattr(sniff, "_check_request_line_prefix",
                        lambda data: examined.append(len(data)) or check(data))
    head = b"GET /" + b"a" * (MAX_HTTP_HEAD - 10) + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    fed = sniff.HTTPHostSniffer()
    for i in range(len(head)):
        try:
            fed.feed(head[i:i + 1])
        except SniffError:
            break
    assert 0 < sum(examined) <= 2 * MAX_HTTP_HEAD  # re-checking: ~n^2/2 = 134 M


def test_http_sniffer_keeps_the_head_it_read_once_named():
    """The routed exchange frames from it (lib.net.httpexchange) instead of reading it again."""
    from lib.protocol import httphead
    head = b"POST /up?x=1 HTTP/1.1\r\nHost: Web.Test\r\nContent-Length: 2\r\n\r\nok"
    sniffer = sniff.HTTPHostSniffer()
    assert sniffer.feed(head[:20]) is None and sniffer.request is None
    assert sniffer.feed(head[20:]) == "web.test"
    assert sniffer.request == httphead.parse_request_head(head[:-6])
    refused = sniff.HTTPHostSniffer()
    with pytest.raises(sniff.SniffError):
        refused.feed(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert refused.request is None


def test_wire_names_kept_are_bounded_and_refusals_never_kept():
    """The canonical forms of the last WIRE_NAMES_KEPT Host/SNI names are kept (one look-up per
    public connection): bounded however many names a peer sends; a refused name is refused
    every time and never kept."""
    sniff._normalize_wire_name.cache_clear()
    for i in range(2 * sniff.WIRE_NAMES_KEPT):
        head = b"GET / HTTP/1.1\r\nHost: H%d.Example.COM.\r\n\r\n" % i
        assert sniff.HTTPHostSniffer().feed(head) == f"h{i}.example.com"
    assert sniff._normalize_wire_name.cache_info().currsize == sniff.WIRE_NAMES_KEPT
    for _ in range(2):
        with pytest.raises(sniff.SniffError):
            sniff.HTTPHostSniffer().feed(b"GET / HTTP/1.1\r\nHost: bad..name\r\n\r\n")
    assert sniff._normalize_wire_name.cache_info().currsize == sniff.WIRE_NAMES_KEPT
    assert sniff.HTTPHostSniffer().feed(b"GET / HTTP/1.1\r\nHost: h5.example.com\r\n\r\n") \
        == "h5.example.com"
