"""HTTP/1.x heads without I/O: find one, read it, and build the short answers we refuse with.

::

    split_head(buf, limit=MAX_HEAD) -> (head, rest) | None     # raises HeadError(431)
    parse_request_head(head) -> RequestHead                    # raises HeadError(400)
    parse_response_head(head) -> ResponseHead                  # raises HeadError
    http_error_response(status, reason, body=None, *, headers=(), version="1.0") -> bytes
    forwarded_client(x_forwarded_for) -> str | None             # its last entry, if an address
    HeadError (ValueError)  .http_status: the status to answer

One parser for every request head the proxy reads (Host routing in lib.protocol.sniff, the
one-port router, the WebSocket upgrade, the http->https redirect), by one rule set, RFC 9112's
strict reading; a head that breaks a rule is refused, never repaired:

===========================================  ==================================================
peer sends                                   we answer
===========================================  ==================================================
request line not ``TOKEN TARGET HTTP/1.x``   HeadError 400 "malformed HTTP/1.x request line"
method longer than MAX_METHOD                HeadError 400 "not an HTTP/1.x request"
header line not ``TOKEN:value``, space       HeadError 400 "malformed header line" (obs-fold
before the colon, control bytes in a value   and bare CR are how request smuggling starts)
no blank line within ``limit`` bytes         HeadError 431
lines ending in bare LF                      accepted (RFC 9112 2.2; Go's parser does too)
===========================================  ==================================================

The body and the response of a routed exchange are framed by lib.protocol.http1, on a head
read here. h11 (the discovery client's) does not fit here: it unfolds obs-fold lines, which we
must refuse, and it needs a whole connection's state where we only peek at a head.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from lib.errors import ShroudError

MAX_HEAD = 16384  # as nginx's large_client_header_buffers (16 KiB lines); enough for cookies
MAX_METHOD = 64  # no registered method is longer than 17 bytes; 64 leaves room for extensions

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE_RE = re.compile(rb"(" + _TOKEN + rb") ([^ \x00-\x1f\x7f]+) HTTP/1\.([01])\Z")
_STATUS_LINE_RE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?\Z")
# Field values may hold HTAB, visible ASCII and obs-text, never other control bytes (a bare CR
# is how some parsers are made to disagree about where a line ends).
_HEADER_RE = re.compile(rb"(" + _TOKEN + rb"):(.*)\Z", re.DOTALL)
# Checked apart from _HEADER_RE and stripped with bytes.strip: a lazy value group between two
# optional whitespace runs backtracks quadratically (a 16 KiB line of spaces took 2 s of CPU).
_BAD_VALUE_BYTE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
END_OF_HEAD_RE = re.compile(rb"\r?\n\r?\n")
LINE_SPLIT_RE = re.compile(rb"\r?\n")

_PHRASES = {301: "Moved Permanently", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 421: "Misdirected Request",
            426: "Upgrade Required", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 503: "Service Unavailable"}


class HeadError(ShroudError, ValueError):
    """A head we refuse; ``http_status`` is what to answer (400, 405, 431...)."""

    def __init__(self, reason: str, http_status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    fields: list = field(default_factory=list)  # [(lower-case name, value)] in order

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        name = name.lower()
        return [v for n, v in self.fields if n == name]

    def get(self, name: str, default: str = "") -> str:
        """The values of ``name`` joined with ", " (RFC 9110 5.3), or ``default``."""
        values = self.get_all(name)
        return ", ".join(values) if values else default

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class ResponseHead:
    version: str
    status: int
    phrase: str
    fields: list = field(default_factory=list)

    get_all = RequestHead.get_all
    get = RequestHead.get


def split_head(buf: bytes, limit: int = MAX_HEAD) -> tuple[bytes, bytes] | None:
    """Split an HTTP head (up to and including the blank line) from what follows.

    :returns: ``(head, rest)``, or ``None`` when the head is not complete yet.
    :raises HeadError: no end of head within ``limit`` bytes (431).
    """
    # The blank line must end within ``limit`` bytes, the bound the 431 below enforces: a head
    # is accepted or refused alike whether it arrives whole or in pieces (searching ``limit + 4``
    # bytes accepted a whole head of up to limit + 4 bytes but refused it read in pieces).
    m = END_OF_HEAD_RE.search(buf, 0, limit)
    if m is None:
        if len(buf) >= limit:
            raise HeadError(f"HTTP head exceeds {limit} bytes", 431)
        return None
    return bytes(buf[:m.end()]), bytes(buf[m.end():])


def parse_request_head(head: bytes) -> RequestHead:
    """Read a complete request head (the blank line may be there or not).

    :raises HeadError: by the module's table.
    """
    lines = LINE_SPLIT_RE.split(bytes(head).rstrip(b"\r\n"))
    request = REQUEST_LINE_RE.match(lines[0])
    if request is None:
        raise HeadError("malformed HTTP/1.x request line")
    method, target, minor = request.groups()
    if len(method) > MAX_METHOD:
        raise HeadError("not an HTTP/1.x request")
    return RequestHead(method.decode("ascii"), target.decode("latin-1"), "1." + minor.decode(),
                       _fields(lines[1:]))


def parse_response_head(head: bytes) -> ResponseHead:
    """Read a complete response head. :raises HeadError: not an HTTP/1.x response."""
    lines = LINE_SPLIT_RE.split(bytes(head).rstrip(b"\r\n"))
    status = _STATUS_LINE_RE.match(lines[0])
    if status is None:
        raise HeadError(f"not an HTTP response: {lines[0][:80]!r}")
    minor, code, phrase = status.groups()
    return ResponseHead("1." + minor.decode(), int(code), (phrase or b"").decode("latin-1"),
                        _fields(lines[1:]))


def _fields(lines: list) -> list:
    fields = []
    for line in lines:
        header = _HEADER_RE.match(line)
        if header is None or _BAD_VALUE_BYTE_RE.search(header.group(2)):
            # Includes obsolete line folding and whitespace before the colon, which RFC 9112
            # 5.1/5.2 tell a server to reject: they are how request smuggling starts.
            raise HeadError("malformed header line")
        fields.append((header.group(1).decode("ascii").lower(),
                       header.group(2).strip(b" \t").decode("latin-1")))
    return fields


def http_error_response(status: int, reason: str | None = None, body: str | bytes | None = None,
                        *, headers=(), version: str = "1.0") -> bytes:
    """A short complete plain-text HTTP response that closes the connection.

    :param reason: the status line's phrase; defaults to the standard one.
    :param body: text/plain body; defaults to the reason and a newline.
    :param headers: extra ``(name, value)`` pairs (e.g. ``Location``, ``Upgrade``).
    :param version: "1.0" for the proxy's own refusals (no keep-alive to promise), "1.1" where the
        peer asked for 1.1 semantics (a WebSocket upgrade).
    :raises ValueError: a status outside 100-599, or a reason or header with control characters.
    """
    if not 100 <= status <= 599:
        raise ValueError("HTTP status must be 100-599")
    if reason is None:
        reason = _PHRASES.get(status, "Error")
    if not reason.isprintable() or not reason.isascii():
        raise ValueError("HTTP reason must be printable ASCII")
    if body is None:
        body = reason + "\n"
    if isinstance(body, str):
        body = body.encode("utf-8")
    extra = ""
    for name, value in headers:
        if not (name + value).isprintable():
            raise ValueError(f"HTTP header {name!r} must be printable")
        extra += f"{name}: {value}\r\n"
    head = (f"HTTP/{version} {status} {reason}\r\n{extra}Content-Type: text/plain; charset=utf-8"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii", "replace") + body


def forwarded_client(header: str) -> str | None:
    """The last entry of an X-Forwarded-For value, if it is an IP address (its port dropped).

    Only the last entry is the front's own observation (the one-port router, the dashboard's
    login throttle behind it); earlier ones come from the visitor and may be forged.
    """
    last = header.rsplit(",", 1)[-1].strip()
    if last.startswith("[") and "]" in last:  # "[2001:db8::1]:1234" (RFC 7239 style)
        last = last[1:last.index("]")]
    elif last.count(":") == 1:  # "203.0.113.9:1234"
        last = last.split(":")[0]
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return None
