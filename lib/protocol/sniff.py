"""Peek at the first bytes of a public connection for the name to route it by.

Sans-I/O: every function here takes bytes and returns a value; nothing touches a socket. The
I/O layer feeds each read to a sniffer object (:class:`TLSNameSniffer`, :class:`HTTPHostSniffer`), and afterwards replays every
peeked byte to the tunnel it picked (nothing is consumed).

Sniffers follow a three-way contract (as mitmproxy's ClientHello parser does):

* a ``str``: the routing name, already normalised (see :func:`normalize_hostname`);
* ``None``: the bytes so far are a valid prefix, read more and call again;
* :class:`SniffError`: this is not what was expected; refuse the connection.

A sniffer never returns ``None`` for a buffer of ``MAX_TLS_PEEK`` / ``MAX_HTTP_HEAD`` bytes or
more, so the I/O layer's buffer is bounded by those constants.

Public API::

    sniff_tls_sni(data: bytes) -> str | None      # "" when the ClientHello has no SNI
    sniff_http_host(data: bytes) -> str | None
    TLSNameSniffer().feed(data) -> str | None     # the same, fed a connection's reads one by
    HTTPHostSniffer().feed(data) -> str | None    # one: linear in the bytes, however split
    HTTPHostSniffer().request                     # the head as httphead read it, once named
    classify(data: bytes) -> 'tls' | 'http' | None
    normalize_hostname(name: str, *, allow_wildcard=False) -> str      # raises ValueError
    wildcard_candidates(name: str) -> Iterator[str]
    tls_alert(description: int) -> bytes
    http_error_response(status, reason, body=None) -> bytes   # lib.protocol.httphead's

    SniffError(ValueError)  .reason: str  .alert: int | None  .http_status: int | None
    MAX_TLS_PEEK, MAX_CLIENT_HELLO, MAX_TLS_RECORD, MAX_HTTP_HEAD
    ALERT_* TLS alert descriptions (RFC 8446 section 6)
"""
from __future__ import annotations

import functools
import ipaddress
import re
from typing import Iterator

from lib.errors import ShroudError
from lib.protocol import httphead
# The proxy's refusals are built by the one HTTP error builder (re-exported for its callers).
from lib.protocol.httphead import http_error_response  # noqa: F401

# What the sniffers take as bytes (any buffer: a socket's bytes, a bytearray, a view).
Buffer = bytes | bytearray | memoryview

# --- TLS alert descriptions (RFC 8446 6.2, RFC 6066 3): the one set, for sniffers and refusals --
ALERT_UNEXPECTED_MESSAGE = 10
ALERT_RECORD_OVERFLOW = 22
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ILLEGAL_PARAMETER = 47
ALERT_ACCESS_DENIED = 49  # a blocked name
ALERT_DECODE_ERROR = 50
ALERT_PROTOCOL_VERSION = 70
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112

# --- Bounds ---------------------------------------------------------------------------------
# RFC 8446 5.1: a plaintext record (and a ClientHello is always plaintext) "MUST NOT exceed
# 2^14 bytes"; oversize => record_overflow. go-vhost allowed 2^14 + 2048 (Go's limit for
# *encrypted* records); nothing legitimate needs that for a ClientHello, so we are stricter.
MAX_TLS_RECORD = 16384
# Largest ClientHello handshake message (4-byte header included) we accept. Today's hellos are
# 0.5-2 KB (Chrome with an ML-KEM key share is ~1.8 KB, with many PSK identities maybe 3-4 KB);
# 16 KiB leaves 4x headroom while go-vhost's 64 KiB would let one connection make us buffer 64 KiB
# before routing. Larger => refused with internal_error, as Go's crypto/tls does.
MAX_CLIENT_HELLO = 16384
# Total bytes we will peek for a ClientHello: the biggest hello in full-size records (16 KiB +
# 2 record headers) still fits, and so does a normal-size hello split into many tiny records
# (a 2 KB hello in 1-byte fragments is 12 KB). A hello that is not complete within this many
# bytes is refused, so the peek buffer never grows beyond it.
MAX_TLS_PEEK = 20480
# Largest HTTP/1.x request head (request line + headers + blank line). Browsers send 0.5-2 KB
# plus cookies; Node.js refuses heads over 16 KiB by default, and nginx's default is 8 KiB per
# header line. Larger => 431 Request Header Fields Too Large.
MAX_HTTP_HEAD = 16384

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST = 0


class SniffError(ShroudError, ValueError):
    """The peeked bytes are not a valid request of the expected kind.

    :ivar reason: a short human-readable explanation, for logs and counters.
    :ivar alert: for TLS, the alert description to send before closing (or None: just close).
    :ivar http_status: for HTTP, the status of the error response to send (or None).
    """

    def __init__(self, reason: str, *, alert: int | None = None,
                 http_status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.alert = alert
        self.http_status = http_status


# --- Names ----------------------------------------------------------------------------------
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
MAX_HOSTNAME = 253  # RFC 1035 2.3.4: 255 octets on the wire = 253 characters in text form


def normalize_hostname(name: object, *, allow_wildcard: bool = False) -> str:
    # ``object``, not ``str``: a non-str is refused with the ValueError below.
    """Return the canonical routing form of a host name.

    Lower-cases, strips a ``:port`` suffix and one trailing dot. Accepts ASCII host names whose
    labels are 1-63 letters, digits, hyphens (not first or last) or underscores (which browsers
    accept in host names), 253 characters at most; internationalised names must be given in
    their A-label (``xn--``) form, as they travel in SNI and Host. A bracketed IPv6 literal
    (``[::1]:8080``) is returned in compressed bracketed form (``[::1]``).

    :param allow_wildcard: accept a ``*`` as the whole first label (``*.example.com``), for
        patterns in allow-lists and wildcard binds.
    :raises ValueError: with the reason, when the name is not acceptable.
    """
    if not isinstance(name, str):
        raise ValueError("host name must be a str")
    if not name.isascii():
        raise ValueError("host name must be ASCII (give an internationalised name in its "
                         "xn-- form)")
    name = name.lower()
    if name.startswith("["):
        end = name.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        rest = name[end + 1:]
        if rest and not (rest.startswith(":") and _valid_port(rest[1:])):
            raise ValueError("bad text after IPv6 literal")
        try:
            addr = ipaddress.IPv6Address(name[1:end])
        except ValueError:
            raise ValueError("invalid IPv6 literal") from None
        return "[%s]" % addr.compressed
    if ":" in name:
        name, _, port = name.rpartition(":")
        if not _valid_port(port):
            raise ValueError("invalid port in host name")
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty host name")
    if len(name) > MAX_HOSTNAME:
        raise ValueError("host name longer than %d characters" % MAX_HOSTNAME)
    labels = name.split(".")
    for i, label in enumerate(labels):
        if not label:
            raise ValueError("empty label in host name")
        if label == "*" and i == 0 and allow_wildcard and len(labels) > 1:
            continue
        if not _LABEL_RE.match(label):
            raise ValueError("invalid label %r in host name" % label)
    return name


# Visitors name the same few hosts again and again: the canonical forms of the last
# WIRE_NAMES_KEPT valid wire names are kept (functools' LRU: a peer sending new names only
# evicts older ones; a refused name is never kept). ~3 us per public connection.
WIRE_NAMES_KEPT = 1024


@functools.lru_cache(maxsize=WIRE_NAMES_KEPT)
def _normalize_wire_name(name: bytes) -> str:
    """:func:`normalize_hostname` of a name as it came on the wire (SNI, Host, a target), as
    ``bytes`` (the cache's key).

    Decoded as latin-1, which maps every byte to one character, so a byte beyond ASCII meets
    normalize_hostname's own "must be ASCII" refusal: an ASCII decode would have made the
    peer's answer Python's codec message ("'ascii' codec can't decode byte 0xc3 ...").
    """
    return normalize_hostname(name.decode("latin-1"))


def _valid_port(port: str) -> bool:
    return bool(_PORT_RE.match(port)) and int(port) <= 65535


def wildcard_candidates(name: str) -> Iterator[str]:
    """Yield the names to look up for a normalised host name, most specific first.

    ``a.b.example.com`` yields ``a.b.example.com``, ``*.b.example.com``, ``*.example.com``.
    A wildcard always keeps at least two labels: ``*.com`` is never yielded, because a
    wildcard over a top-level domain would let one bind capture every name under it (go-vhost
    tried it; we do not). A ``*`` matches one or more leading labels, as in go-vhost (unlike
    certificate wildcards, which match exactly one). IP literals yield only themselves.
    """
    yield name
    if name.startswith("[") or _is_ipv4(name):
        return
    labels = name.split(".")
    for i in range(1, len(labels) - 1):
        yield "*." + ".".join(labels[i:])


def _is_ipv4(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


# --- TLS ------------------------------------------------------------------------------------
def sniff_tls_sni(data: Buffer) -> str | None:
    """Find the server name in a TLS ClientHello, which may span several records.

    :returns: the normalised server_name; ``""`` when the ClientHello has no server_name
        extension; ``None`` when ``data`` is a valid prefix and more bytes are needed.
    :raises SniffError: not a TLS ClientHello (``.alert`` says which alert to send).
    """
    return TLSNameSniffer().feed(data)


class TLSNameSniffer:
    """:func:`sniff_tls_sni` for bytes that arrive in pieces: ``feed`` each read's bytes.

    Each byte is looked at once, so a connection costs time linear in what it sends, however it
    splits its ClientHello (a 20 KiB hello in 1-byte records, re-walked on every read, cost 6-7
    s of CPU before). ``feed`` answers as :func:`sniff_tls_sni` would for everything fed so far;
    after an answer (a name or an error) it answers the same again.
    """

    __slots__ = ("_header", "_left", "_length", "_first", "_offset", "_hello", "_hello_len",
                 "_answer")

    def __init__(self) -> None:
        self._header = bytearray()  # the current record's header, while incomplete
        self._left = 0  # bytes of the current record's fragment still to come
        self._length = 0  # the current record's fragment length
        self._first = True  # the current record is the first
        self._offset = 0  # where the current record starts in the stream
        self._hello = bytearray()  # the handshake message, reassembled from fragments
        self._hello_len: int | None = None  # its total length, header included, once known
        self._answer: str | SniffError | None = None  # a name, or the SniffError raised

    def feed(self, data: Buffer) -> str | None:
        if self._answer is None:
            try:
                self._answer = self._consume(memoryview(data))
            except SniffError as e:
                self._answer = e
        if isinstance(self._answer, SniffError):
            raise self._answer
        return self._answer

    def _consume(self, data: memoryview) -> str | None:
        i, end = 0, len(data)
        while i < end:
            if self._left == 0:
                if not self._header and end - i >= _RECORD_HEADER \
                        and data[i] == _CONTENT_HANDSHAKE and data[i + 1] == 3:
                    # A whole, well-started header in this read (the usual case): no copy.
                    self._open_record((data[i + 3] << 8) | data[i + 4])
                    i += _RECORD_HEADER
                    continue
                take = min(_RECORD_HEADER - len(self._header), end - i)
                self._header += data[i:i + take]
                i += take
                self._start_record()
                continue
            take = min(self._left, end - i)
            self._hello += data[i:i + take]
            i += take
            self._left -= take
            if self._hello_len is None:
                self._hello_len = _check_handshake_header(self._hello)
            if self._hello_len is not None and len(self._hello) > self._hello_len:
                # TLS allows coalescing handshake messages, but a client sends nothing after
                # its ClientHello in the same flight of handshake records: not a client.
                raise SniffError("data after ClientHello", alert=ALERT_UNEXPECTED_MESSAGE)
            if self._left == 0:
                if len(self._hello) == self._hello_len:
                    # Whatever follows the last record (a TLS 1.3 client may send a
                    # change_cipher_spec and 0-RTT data at once) is left for the origin.
                    return _parse_client_hello(bytes(self._hello[_HANDSHAKE_HEADER:]))
                self._offset += _RECORD_HEADER + self._length
                self._header.clear()
                self._first = False
        if self._left == 0:
            _need_more(self._offset + _RECORD_HEADER)
        return None  # inside a record whose end was checked against the bound

    def _start_record(self) -> None:
        """Check the record header as far as it has arrived; start its fragment once whole."""
        header = self._header
        _check_record_header_prefix(header, first=self._first)
        if len(header) < _RECORD_HEADER:
            return
        self._open_record(int.from_bytes(header[3:5], "big"))

    def _open_record(self, length: int) -> None:
        """A record of ``length`` fragment bytes starts (its header was checked)."""
        if length == 0:
            # RFC 8446 5.1: zero-length handshake fragments are forbidden.
            raise SniffError("empty handshake record", alert=ALERT_UNEXPECTED_MESSAGE)
        if length > MAX_TLS_RECORD:
            raise SniffError("TLS record of %d bytes exceeds %d" % (length, MAX_TLS_RECORD),
                             alert=ALERT_RECORD_OVERFLOW)
        if self._offset + _RECORD_HEADER + length > MAX_TLS_PEEK:
            raise SniffError("ClientHello not complete within %d bytes" % MAX_TLS_PEEK,
                             alert=ALERT_INTERNAL_ERROR)
        self._left = self._length = length


def _need_more(needed: int) -> None:
    """Say "read more", unless completing would take us past the peek bound."""
    if needed > MAX_TLS_PEEK:
        raise SniffError("ClientHello not complete within %d bytes" % MAX_TLS_PEEK,
                         alert=ALERT_INTERNAL_ERROR)
    return None


def _check_record_header_prefix(head: bytes | bytearray, first: bool) -> None:
    """Validate as much of a record header as has arrived (type and version bytes)."""
    if not head:
        return
    if head[0] != _CONTENT_HANDSHAKE:
        if first and head[0] & 0x80:
            raise SniffError("SSLv2-style hello refused", alert=None)
        if first:
            raise SniffError("not a TLS handshake record (first byte 0x%02x)" % head[0],
                             alert=ALERT_UNEXPECTED_MESSAGE)
        raise SniffError("non-handshake record inside ClientHello",
                         alert=ALERT_UNEXPECTED_MESSAGE)
    if len(head) >= 2 and head[1] != 3:
        # Record versions are 0x0300..0x03ff (clients send 0x0301 or 0x0303).
        raise SniffError("bad TLS record version 0x%02x.." % head[1],
                         alert=ALERT_PROTOCOL_VERSION)


def _check_handshake_header(hello: bytearray) -> int | None:
    """Validate the handshake header as far as it has arrived; its total length once known."""
    if hello[0] != _HANDSHAKE_CLIENT_HELLO:
        raise SniffError("first handshake message is type %d, not ClientHello" % hello[0],
                         alert=ALERT_UNEXPECTED_MESSAGE)
    if len(hello) < _HANDSHAKE_HEADER:
        return None
    body_len = int.from_bytes(hello[1:4], "big")
    total = _HANDSHAKE_HEADER + body_len
    if total > MAX_CLIENT_HELLO:
        raise SniffError("ClientHello of %d bytes exceeds %d" % (total, MAX_CLIENT_HELLO),
                         alert=ALERT_INTERNAL_ERROR)
    return total


class _Reader:
    """Bounds-checked reads over a ClientHello body; any overrun is a decode_error."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise SniffError("ClientHello truncated in %s" % what, alert=ALERT_DECODE_ERROR)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, len_bytes: int, what: str) -> bytes:
        return self.take(self.uint(len_bytes, what), what)

    def remaining(self) -> int:
        return len(self.data) - self.pos


def _parse_client_hello(body: bytes) -> str:
    r = _Reader(body)
    version = r.take(2, "version")
    if version[0] != 3:
        raise SniffError("ClientHello version 0x%s is not TLS" % version.hex(),
                         alert=ALERT_PROTOCOL_VERSION)
    r.take(32, "random")
    session_id = r.vector(1, "session id")
    if len(session_id) > 32:
        raise SniffError("session id longer than 32 bytes", alert=ALERT_DECODE_ERROR)
    suites = r.vector(2, "cipher suites")
    if not suites or len(suites) % 2:
        raise SniffError("bad cipher suite list", alert=ALERT_DECODE_ERROR)
    if not r.vector(1, "compression methods"):
        raise SniffError("empty compression method list", alert=ALERT_DECODE_ERROR)
    if r.remaining() == 0:
        return ""  # SSL 3.0-style hello without extensions: no SNI
    extensions = _Reader(r.vector(2, "extensions"))
    if r.remaining():
        raise SniffError("bytes after ClientHello extensions", alert=ALERT_DECODE_ERROR)
    seen = set()
    name = ""
    while extensions.remaining():
        ext_type = extensions.uint(2, "extension type")
        ext_data = extensions.vector(2, "extension")
        if ext_type in seen:
            # RFC 8446 4.2 forbids duplicates; for server_name a duplicate would let the proxy
            # and the origin disagree about the name, so refuse them all.
            raise SniffError("duplicate extension %d" % ext_type, alert=ALERT_ILLEGAL_PARAMETER)
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            name = _parse_server_name(ext_data)
    return name


def _parse_server_name(ext_data: bytes) -> str:
    r = _Reader(ext_data)
    names = _Reader(r.vector(2, "server name list"))
    if r.remaining() or not names.remaining():
        raise SniffError("bad server_name extension", alert=ALERT_DECODE_ERROR)
    host = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        value = names.vector(2, "server name")
        if name_type == _NAME_TYPE_HOST:
            if host is not None:
                # RFC 6066 3: at most one name of each type.
                raise SniffError("two host_name entries in server_name",
                                 alert=ALERT_ILLEGAL_PARAMETER)
            host = value
    if host is None:
        return ""
    try:
        return _normalize_wire_name(bytes(host))
    except ValueError as exc:
        raise SniffError("invalid server_name: %s" % exc,
                         alert=ALERT_UNRECOGNIZED_NAME) from None


def tls_alert(description: int) -> bytes:
    """A fatal TLS alert record, to send before closing a refused connection.

    Uses record version 0x0301, as Go's crypto/tls does before a version is negotiated, which
    every TLS client accepts.
    """
    if not 0 <= description <= 255:
        raise ValueError("alert description must fit in one byte")
    return bytes([21, 3, 1, 0, 2, 2, description])


# --- HTTP/1.x -------------------------------------------------------------------------------
# The head itself is read by lib.protocol.httphead (one parser, RFC 9112's strict rules).
_METHOD_PREFIX_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*\Z")
_ABSOLUTE_URI_RE = re.compile(rb"(?i:https?)://([^/?#]*)")


def sniff_http_host(data: Buffer) -> str | None:
    """Find the host an HTTP/1.x request is for.

    The name is the absolute-URI host of the request line when there is one (RFC 9112 3.2.2:
    it overrides Host; a Host header naming another host is refused, since the origin may go
    by it), else the single Host header. Lines may end in CRLF or bare LF (RFC 9112
    2.2 allows it; Go's parser, which go-vhost used, accepts it).

    :returns: the normalised host (port stripped), or ``None`` when more bytes are needed.
    :raises SniffError: not HTTP/1.x, malformed, no or several Host headers, or a head longer
        than ``MAX_HTTP_HEAD`` (``.http_status`` says which status to answer).
    """
    return HTTPHostSniffer().feed(data)


class HTTPHostSniffer:
    """:func:`sniff_http_host` for bytes that arrive in pieces: ``feed`` each read's bytes.

    The end of the head is searched for only in what is new (and the 3 bytes before it), the
    request line checked once it is whole, and the head parsed once: linear in the bytes sent,
    however they are split. ``feed`` answers as :func:`sniff_http_host` would for everything
    fed so far; after an answer (a name or an error) it answers the same again. Once it has
    named the host, ``request`` is the head as lib.protocol.httphead read it (the exchange's
    framing starts from it instead of reading the head again: lib.net.httpexchange).
    """

    __slots__ = ("_buf", "_newline_from", "_method_checked", "_line_checked", "_answer",
                 "request")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._newline_from = 0  # no line feed before this offset
        self._method_checked = False  # the method is whole (a space came) and was found valid
        self._line_checked = False  # the request line is whole and was found valid
        self._answer: str | SniffError | None = None  # a name, or the SniffError raised
        self.request: httphead.RequestHead | None = None

    def feed(self, data: Buffer) -> str | None:
        if self._answer is None:
            try:
                self._answer = self._consume(data)
            except SniffError as e:
                self._answer = e
        if isinstance(self._answer, SniffError):
            raise self._answer
        return self._answer

    def _consume(self, data: Buffer) -> str | None:
        buf = self._buf
        # The blank line is at most 4 bytes: one ending in the new bytes starts in them or in
        # the 3 bytes before (an earlier one would have been found by an earlier call).
        start = max(0, len(buf) - 3)
        buf += data
        match = httphead.END_OF_HEAD_RE.search(buf, start, MAX_HTTP_HEAD)
        if match is not None:
            try:  # (inline: a call fewer per connection)
                request = httphead.parse_request_head(bytes(buf[:match.start()]))
            except httphead.HeadError as e:
                raise SniffError(e.reason, http_status=e.http_status) from None
            name = _host_of(request)
            self.request = request
            return name
        if not self._line_checked:
            newline = buf.find(b"\n", self._newline_from)
            if newline < 0:
                self._newline_from = len(buf)
                if not self._method_checked:
                    # Before the line feed only the method is checked: its bytes are enough.
                    method = bytes(buf[:2 * httphead.MAX_METHOD])
                    _check_request_line_prefix(method)
                    self._method_checked = b" " in method
            else:
                _check_request_line_prefix(bytes(buf[:newline + 1]))
                self._line_checked = True
        if len(buf) >= MAX_HTTP_HEAD:
            raise SniffError("HTTP request head exceeds %d bytes" % MAX_HTTP_HEAD,
                             http_status=431)
        return None


def _host_of(request: httphead.RequestHead) -> str:
    """The routing name of a request head."""
    if request.method == "CONNECT":
        raise SniffError("CONNECT is not supported by a reverse proxy", http_status=405)
    target = request.target.encode("latin-1")
    hosts = []
    for name, value in request.fields:  # (a loop: get_all and two comprehensions, 3 calls)
        if name == "host":
            hosts.append(value.encode("latin-1"))
    if len(hosts) > 1:
        raise SniffError("more than one Host header", http_status=400)
    uri = _ABSOLUTE_URI_RE.match(target)
    if uri is not None:
        host = uri.group(1)
        if b"@" in host:
            raise SniffError("user info in request URI", http_status=400)
        if hosts and _name(hosts[0], "Host") != _name(host, "request target host"):
            # We route by the target (RFC 9112 3.2.2), the origin may go by Host: the two must
            # name one host (docs/SECURITY.md, "Absolute-form requests").
            raise SniffError("the Host header names another host than the request target",
                             http_status=400)
    elif target.startswith(b"/") or target == b"*":
        if not hosts or not hosts[0]:
            raise SniffError("no Host header", http_status=400)
        host = hosts[0]
    else:
        raise SniffError("unsupported request target", http_status=400)
    return _name(host, "host")


def _name(host: bytes, what: str) -> str:
    try:
        return _normalize_wire_name(bytes(host))
    except ValueError as exc:
        raise SniffError("invalid %s: %s" % (what, exc), http_status=400) from None


def _check_request_line_prefix(data: bytes) -> None:
    """Refuse early what can never become an HTTP/1.x request line (for classify and sniff)."""
    space = data.find(b" ")
    method = data if space < 0 else data[:space]
    if not _METHOD_PREFIX_RE.match(method[:httphead.MAX_METHOD]) or \
            len(method) > httphead.MAX_METHOD \
            or space == 0:
        raise SniffError("not an HTTP/1.x request", http_status=400)
    newline = data.find(b"\n")
    if newline >= 0:
        line = data[:newline].rstrip(b"\r")
        if httphead.REQUEST_LINE_RE.match(line) is None:
            raise SniffError("malformed HTTP/1.x request line", http_status=400)


# --- Both -----------------------------------------------------------------------------------
def classify(data: Buffer) -> str | None:
    """Tell a TLS ClientHello from an HTTP/1.x request by the first bytes.

    :returns: ``'tls'`` (a handshake record), ``'http'`` (starts like a request line), or
        ``None`` for no bytes yet.
    :raises SniffError: neither.
    """
    if not data:
        return None
    if data[0] == _CONTENT_HANDSHAKE:
        return "tls"
    if 0x41 <= data[0] <= 0x5a:  # methods are upper-case by convention: GET, POST, ...
        _check_request_line_prefix(bytes(data[:MAX_HTTP_HEAD]))
        return "http"
    raise SniffError("neither TLS nor HTTP/1.x (first byte 0x%02x)" % data[0],
                     alert=ALERT_UNEXPECTED_MESSAGE, http_status=400)
