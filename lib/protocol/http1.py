"""One HTTP/1.x exchange on a connection the proxy must not let be reused (sans-I/O).

A front that pools its connections to the proxy (a platform's router, nginx's upstream
keepalive) puts any visitor's request, for any host, on any idle connection. A connection the
proxy routed to one origin must therefore carry one request and one response, and then end
(docs/SECURITY.md, "A front that pools connections"):

* the request goes out with ``Connection: close`` (:func:`connection_close`: the origin is told
  to close) and :class:`RequestFramer` finds its end, after which the I/O layer forwards
  nothing more (lib.net.httpexchange);
* :class:`ResponseFramer` frames the origin's answer: the final response's head is rewritten to
  ``Connection: close`` (so the front does not pool the connection), and whatever the origin
  sends after that response ends is dropped (an origin that answers twice would otherwise
  answer the next visitor);
* only an origin's ``101 Switching Protocols`` to a request that asked to upgrade turns the
  connection into raw bytes (a WebSocket): the request merely asking proves nothing.

Public API::

    request = httphead.parse_request_head(head)      # the head the sniffer read (400 rules)
    framer = RequestFramer(request)    # raises FramingError for a request we do not frame
    framer.feed(data) -> int           # how many of `data` (the bytes after the head) are the
                                       # request's; fewer than len(data) only at its end
    framer.done                        # the request ended
    framer.upgrade                     # the request has an Upgrade header
    framer = ResponseFramer(method, upgrade=False)  # the request's method
    framer.feed(data) -> bytes         # the part of `data` to forward to the visitor now
    framer.head_part(data) -> (bytes, int)  # in state HEAD: the heads' bytes to forward,
                                       # and how many of `data` they took
    framer.body_part(data) -> int      # in state BODY: how many of `data` are the body's,
                                       # forwarded as they are (the rest: feed drops it)
    framer.state                       # HEAD, BODY, DONE or SWITCHED
    framer.dropped                     # bytes the origin sent after its response (dropped)
    connection_close(head) -> bytes    # a request or response head with Connection: close
    request_fields(head) -> (method, path, {lower-case name: [values]})
    fields_by_name(request) -> {lower-case name: [values]}  # of a head already parsed
    FramingError(ValueError)           # bytes that are not this exchange's request or response
    MAX_RESPONSE_HEAD, MAX_REQUEST_LINE

The rules are those the proxy kept with h11 (0.16) before this module framed the exchange
itself (bench/README.md, "Fresh connections: our own HTTP/1 framing"), plus one: a request with
both Content-Length and Transfer-Encoding is refused (RFC 9112 6.1 allows it; two parsers that
frame one body two ways are how request smuggling starts). The request's head was already read
by lib.protocol.httphead's stricter rules (no obs-fold, no control bytes) when it was sniffed.

Request (visitor sends / we answer; FramingError: the I/O layer aborts both ends):

    target with a byte outside 0x21-0x7e            FramingError (h11's rule)
    HTTP/1.1 without Host, two Host headers         FramingError (RFC 9112 3.2)
    both Content-Length and Transfer-Encoding       FramingError (smuggling, RFC 9112 6.1)
    neither                                         no body: the request ends with its head
    Content-Length: 1-20 digits, the same value     a body of that many bytes
      repeated in a list or in several headers
    Content-Length empty, not digits, over 20       FramingError
      digits, or two different values
    Transfer-Encoding other than one "chunked"      FramingError
    (any case), or two Transfer-Encoding headers
    chunk-size line: 1-20 hex digits, an optional   the chunk; "0" starts the trailer section
      ";extension", optional SP/HTAB, CRLF
    chunk-size line otherwise (bare LF, "0x5",      FramingError
      space first, 21 digits)
    chunk data not followed by CRLF                 FramingError
    trailer section: header lines up to a blank     the request's end; a malformed trailer
      line (as a response head's header lines)      line is a FramingError
    a chunk-size line or trailer section longer     FramingError (a peer cannot make us
      than MAX_REQUEST_LINE, still incomplete       buffer more)
    bytes after the end                             not the request's: feed returns fewer

Response (origin sends / we forward):

    status line not "HTTP/d.d NNN[ reason]"         FramingError
      (status under 100, control bytes); a head
      starting with a byte under 0x21               FramingError at once, before its end
    header line not "token:value" (value without    FramingError
      NUL, CR, LF, VT, FF); a line starting with
      SP/HTAB (obs-fold) continues the one before,
      as h11 read it; first line continued
    head over MAX_RESPONSE_HEAD                     FramingError
    Content-Length / Transfer-Encoding values       as for a request (FramingError), except
                                                    that both together frame by the chunks,
                                                    the Content-Length removed (RFC 9112 6.3)
    1xx other than 101                              its head as is; wait for the final response
    101 to an upgrade request                       everything, from here on raw (SWITCHED)
    101 to any other request                        FramingError
    final response head                             the head with Connection: close (BODY)
    204, 304, or any answer to HEAD                 no body: DONE after the head
    chunked / Content-Length / neither              body up to the last chunk and trailer /
                                                    that many bytes / until the origin closes;
                                                    then DONE (chunk rules as for requests,
                                                    lines bounded by MAX_RESPONSE_HEAD)
    anything after DONE                             nothing (counted in ``dropped``)
"""
from __future__ import annotations

import re

from lib.errors import ShroudError
from lib.protocol import httphead

# Largest response head (status line + headers) we frame: nginx's default proxy_buffer_size is
# 4-8 KiB and h11's default limit is 16 KiB; 64 KiB leaves room for large cookies. Larger =>
# FramingError, the connection is aborted. Also bounds a response's chunk-size lines and trailer.
MAX_RESPONSE_HEAD = 65536
# Longest incomplete chunk-size line or trailer section of a request we hold: a request head's
# bound (lib.protocol.httphead.MAX_HEAD, 16 KiB, as the sniffer's) plus room for a chunk-size
# line, as h11 was given.
MAX_REQUEST_LINE = httphead.MAX_HEAD + 1024
# Content-Length and chunk sizes: h11's bound (len(str(2**64)) == 20), so a number cannot be
# made to cost more than a few machine words.
MAX_DIGITS = 20

# Bytes of a malformed line an error quotes: enough to recognise it in a log.
SHOWN = 80

HEAD, BODY, DONE, SWITCHED = "head", "body", "done", "switched"

# The end of a head or trailer section (h11's rule: a line feed, an optional CR, a line feed).
_BLANK_LINE_RE = re.compile(rb"\n\r?\n")
# The header and any obs-fold continuation lines of it (an origin's "Connection: close\r\n
# keep-alive" must not leave " keep-alive" behind, folded onto the line before).
_CONNECTION_HEADER_RE = re.compile(rb"(?im)^(?:connection|keep-alive|proxy-connection)[ \t]*:"
                                   rb"[^\n]*\n(?:[ \t][^\n]*\n)*")
# A response framed by its chunks drops its Content-Length fields on the way (ResponseFramer).
_CONTENT_LENGTH_RE = re.compile(rb"(?im)^content-length[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*")
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# A field value may hold any byte but NUL, CR, LF, VT and FF (h11's [^\x00\s] and SP/HTAB).
_VALUE = rb"[^\x00\n\r\x0b\x0c]*"
_STATUS_LINE = rb"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: " + _VALUE + rb")?"
_STATUS_LINE_RE = re.compile(_STATUS_LINE)
_FIELD_RE = re.compile(b"(" + _TOKEN + b"):(" + _VALUE + b")")
# A whole response head with no obs-fold in one match (nearly every head): the line-by-line
# reading below decides the rest, and says what is wrong.
_PLAIN_HEAD_RE = re.compile(_STATUS_LINE + rb"\r?\n(?:" + _TOKEN + b":" + _VALUE +
                            rb"\r?\n)*\r?\n")
_FRAMING_FIELD_RE = re.compile(rb"\n(content-length|transfer-encoding):([^\r\n]*)", re.I)
_DIGITS_RE = re.compile(rb"[0-9]+")
_CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,%d})(?:;[^\n]*)?[ \t]*" % MAX_DIGITS)
_TARGET_RE = re.compile(r"[\x21-\x7e]+")
_FOLD = (b" ", b"\t")

# Body framings (what ends a message's body), beside a length (an int: Content-Length).
_LENGTH, _CHUNKED, _UNTIL_CLOSE = "length", "chunked", "until close"
# Where a chunked body is: a chunk-size line, chunk data, the CRLF after it, the trailer.
_SIZE, _DATA, _CRLF, _TRAILER = "size", "data", "crlf", "trailer"


class FramingError(ShroudError, ValueError):
    """Bytes that are not a valid HTTP/1.x request or response for this exchange."""


def _show(data) -> str:
    """The start of a peer's bytes, for an error's text (never all of a 64 KiB line)."""
    return repr(bytes(data[:SHOWN]))


def connection_close(head: bytes) -> bytes:
    """The head (request or response, up to its blank line) with its Connection, Keep-Alive and
    Proxy-Connection fields replaced by ``Connection: close``, in the line ends of its last
    field line."""
    body = head[:-2] if head.endswith(b"\r\n") else head[:-1]  # without the blank line
    line_end = b"\r\n" if body.endswith(b"\r\n") else b"\n"
    first, _, rest = body.partition(b"\n")
    rest = _CONNECTION_HEADER_RE.sub(b"", rest)
    return first + b"\n" + rest + b"Connection: close" + line_end + line_end


def request_fields(head: bytes) -> tuple[str, str, dict[str, list[str]]]:
    """(method, path, {lower-case header name: [values]}) of a request head already checked by
    lib.protocol.sniff (so the request line and header lines are well formed).

    :raises ValueError: (httphead.HeadError) not a request head by lib.protocol.httphead's rules.
    """
    request = httphead.parse_request_head(head)
    return request.method, request.path, fields_by_name(request)


def fields_by_name(request: httphead.RequestHead) -> dict[str, list[str]]:
    """{lower-case header name: [its values, in order]} of a parsed request head."""
    headers: dict[str, list[str]] = {}
    for name, value in request.fields:
        headers.setdefault(name, []).append(value)
    return headers


def _framing(fields, response: bool = False) -> int | str:
    """How a message's body is framed, by its Content-Length and Transfer-Encoding ``fields``
    ((name, value) bytes pairs as written, other fields may be there too) and the module's
    rules: its length (a request with neither: 0), ``_CHUNKED``, or ``_UNTIL_CLOSE`` (a
    response with neither).

    :raises FramingError: by the module's tables.
    """
    length = None
    chunked = False
    for name, value in fields:
        name = name.lower()
        if name == b"content-length":
            one = value.strip()
            if one.isdigit():  # one value (ASCII digits): the list's reading gives the same
                value = one
            else:
                values = {v.strip() for v in value.split(b",")}
                if len(values) != 1:
                    raise FramingError("conflicting Content-Length headers")
                value = values.pop()
            if not _DIGITS_RE.fullmatch(value) or len(value) > MAX_DIGITS:
                raise FramingError("bad Content-Length")
            if length is not None and value != length:  # compared as written: "05" != "5"
                raise FramingError("conflicting Content-Length headers")
            length = value
        elif name == b"transfer-encoding":
            if chunked:
                raise FramingError("multiple Transfer-Encoding headers")
            if value.strip().lower() != b"chunked":  # (a value holds no CR, LF, VT, FF)
                raise FramingError("only Transfer-Encoding: chunked is supported")
            chunked = True
    if chunked:
        if length is not None and not response:
            raise FramingError("both Content-Length and Transfer-Encoding")
        return _CHUNKED
    if length is not None:
        return int(length)
    return _UNTIL_CLOSE if response else 0


def _header_fields(lines) -> list[tuple[bytes, bytes]]:
    """[(lower-case name, value)] of header lines (no line ends) by the module's response
    rules: a line starting with SP or HTAB continues the one before (obs-fold, as h11 read it;
    h11 dropped the continuation's leading SP/HTAB, which changes no verdict here: a value is
    only checked for bytes it may not hold, and Content-Length and Transfer-Encoding values are
    compared stripped).

    :raises FramingError: a malformed line, or a continuation before any field line.
    """
    joined: list[list[bytes]] = []  # each field line and its continuations, joined once
    for line in lines:
        if line[:1] in _FOLD:
            if not joined:
                raise FramingError("continuation line at start of headers")
            joined[-1].append(line)
        else:
            joined.append([line])
    fields = []
    for parts in joined:
        line = b" ".join(parts)
        m = _FIELD_RE.fullmatch(line)
        if m is None:
            raise FramingError(f"malformed header line: {_show(line)}")
        fields.append((m.group(1), m.group(2)))
    return fields


def _head_lines(head: bytes) -> list[bytes]:
    """A head's lines without their ends (LF, one CR before it dropped) or the blank line."""
    lines = head.split(b"\n")[:-2]
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


class _Body:
    """Where one message's body ends: ``feed`` says how many of the next bytes are the
    body's. A chunked body is checked as it goes by the module's chunk rules."""

    # _left: bytes left of the body (_LENGTH) or of the chunk or its CRLF (_DATA, _CRLF);
    # _searched: where the next search for the end of _line starts, once it holds bytes
    __slots__ = ("framing", "done", "_left", "_limit", "_part", "_line", "_searched")

    def __init__(self, framing: int | str, limit: int):
        if isinstance(framing, int):
            self.framing, self._left = _LENGTH, framing
            self.done = framing == 0
        else:
            self.framing = framing
            self.done = False
        self._limit = limit  # longest incomplete chunk-size line or trailer section held
        self._part = _SIZE
        self._line = b""  # an incomplete chunk-size line or trailer section (a bytearray)

    def feed(self, data) -> int:
        """How many of ``data``'s bytes are the body's: ``len(data)`` while it goes on.

        :raises FramingError: a chunked body breaking the module's rules.
        """
        if self.done:
            return 0
        n = len(data)
        if self.framing == _LENGTH:
            if n < self._left:
                self._left -= n
                return n
            self.done = True
            return self._left
        if self.framing == _UNTIL_CLOSE:
            return n
        i = 0
        while i < n and not self.done:
            i = self._chunked(data, i, n)
        return i

    def _chunked(self, data, i: int, n: int) -> int:
        """One step through a chunked body from ``data[i]``; the index it got to."""
        part = self._part
        if part is _DATA:
            take = min(self._left, n - i)
            self._left -= take
            if not self._left:
                self._part, self._left = _CRLF, 2
            return i + take
        if part is _CRLF:
            want = b"\r\n"[2 - self._left:]
            got = bytes(data[i:i + len(want)])
            if got != want[:len(got)]:
                raise FramingError(f"malformed chunk footer: {_show(got)}")
            self._left -= len(got)
            if not self._left:
                self._part = _SIZE
            return i + len(got)
        line = self._line
        if line:  # the line began in an earlier read: search on from where the last search ended
            start = len(line)
            line += data[i:]
            end = self._line_end(line, 0, self._searched)
            if end is None:
                self._check_held(line)
                return n
            self._line = b""
            return i + end - start
        end = self._line_end(data, i, i)
        if end is None:
            self._line = bytearray(data[i:])
            self._check_held(self._line)
            return n
        return end

    def _line_end(self, buf, pos: int, search: int) -> int | None:
        """Where the chunk-size line or trailer section starting at ``buf[pos]`` ends (what
        follows it starts there); None when it is incomplete (``_searched`` then says where in
        ``buf[pos:]`` the next search starts)."""
        if self._part is _SIZE:
            crlf = buf.find(b"\r\n", search)
            if crlf < 0:
                self._searched = max(0, len(buf) - pos - 1)  # a CR may end buf
                return None
            m = _CHUNK_LINE_RE.fullmatch(buf, pos, crlf)
            if m is None:
                raise FramingError(f"malformed chunk-size line: {_show(buf[pos:crlf])}")
            self._left = int(m.group(1), 16)
            self._part = _DATA if self._left else _TRAILER
            return crlf + 2
        if buf[pos:pos + 1] == b"\n":  # no trailer fields (h11 took a bare LF here too)
            end = pos + 1
        elif buf[pos:pos + 2] == b"\r\n":
            end = pos + 2
        else:
            m = _BLANK_LINE_RE.search(buf, search)
            if m is None:
                self._searched = max(0, len(buf) - pos - 2)  # a blank line is <= 3 bytes
                return None
            end = m.end()
            _framing(_header_fields(_head_lines(bytes(buf[pos:end]))), response=True)
        self.done = True
        return end

    def _check_held(self, line: bytearray) -> None:
        if len(line) > self._limit:
            raise FramingError(f"chunk-size line or trailer over {self._limit} bytes")


# The body of a request with neither Content-Length nor Transfer-Encoding: over at its head.
# A done _Body's feed returns 0 and changes nothing, so every such request shares this one.
_NO_BODY = _Body(0, 0)


class RequestFramer:
    """The end of one request whose head was read; see the module's request table.

    :param request: the head, as lib.protocol.httphead.parse_request_head read it.
    :raises FramingError: a head whose request this module does not frame.
    """

    __slots__ = ("_body", "upgrade")

    def __init__(self, request: httphead.RequestHead):
        if _TARGET_RE.fullmatch(request.target) is None:
            raise FramingError("request target with a byte outside 0x21-0x7e")
        fields = []
        hosts = 0
        self.upgrade = False  # it has an Upgrade header (read here: one pass over the fields)
        for name, value in request.fields:
            if name == "host":
                hosts += 1
            elif name == "content-length" or name == "transfer-encoding":
                fields.append((name.encode(), value.encode("latin-1")))
            elif name == "upgrade":
                self.upgrade = True
        if hosts > 1 or (hosts == 0 and request.version == "1.1"):
            raise FramingError("an HTTP/1.1 request needs one Host header")
        # Most requests have no body: they share one ended _Body (it holds no state once done).
        self._body = _Body(_framing(fields), MAX_REQUEST_LINE) if fields else _NO_BODY

    @property
    def done(self) -> bool:
        return self._body.done

    def feed(self, data) -> int:
        """How many of ``data``'s bytes (the next ones after the head) are the request's.

        :raises FramingError: by the module's request table.
        """
        return self._body.feed(data)


class ResponseFramer:
    """The origin's side of one exchange; see the module's response table.

    :param method: the request's method (only ``HEAD`` changes how a response is framed).
    :param upgrade: the request asked to switch protocols (it had an ``Upgrade`` header).
    """

    __slots__ = ("upgrade", "state", "dropped", "_head_only", "_pending", "_searched", "_body")

    def __init__(self, method: bytes | str, upgrade: bool = False):
        self.upgrade = upgrade
        self.state = HEAD
        self.dropped = 0
        self._head_only = method == b"HEAD" or method == "HEAD"
        self._pending = bytearray()
        self._searched = 0  # where the next search for the head's end starts in _pending
        # _body: the final response's body, from its head on (state BODY)

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` (the origin's next bytes) to forward to the visitor now.

        :raises FramingError: not a valid response, or a head over ``MAX_RESPONSE_HEAD``.
        """
        state = self.state
        if state == SWITCHED:
            return data
        if state == DONE:
            self.dropped += len(data)
            return b""
        if state == BODY:
            return self._forward_body(data)
        out, taken = self.head_part(data)
        if taken == len(data):
            return out
        rest = bytes(data[taken:])
        if self.state == BODY:
            return out + self._forward_body(rest)
        if self.state == SWITCHED:
            return out + rest
        self.dropped += len(rest)  # DONE: a response without a body
        return out

    def head_part(self, data) -> tuple[bytes, int]:
        """In state HEAD: (what to forward for the heads that end in ``data``, interim
        responses as they are and the final one with Connection: close; how many of ``data``'s
        bytes they were). All of ``data`` while the head is incomplete (held, up to
        MAX_RESPONSE_HEAD); once it is complete, the state says what the rest of ``data`` is:
        BODY, DONE (a response without a body: the rest is for ``feed`` to drop) or SWITCHED.

        :raises FramingError: not a valid response, or a head over ``MAX_RESPONSE_HEAD``.
        """
        buf = data
        held = len(self._pending)
        if held:  # a head begun in an earlier read
            self._pending += data
            buf = self._pending
        out = b""
        pos = 0  # where the next head starts in buf
        while True:
            m = _BLANK_LINE_RE.search(buf, pos + self._searched)
            if m is None:
                if len(buf) - pos > MAX_RESPONSE_HEAD:
                    raise FramingError(f"response head over {MAX_RESPONSE_HEAD} bytes")
                if len(buf) > pos and buf[pos] < 0x21:  # as h11: no status line starts so
                    raise FramingError(f"not an HTTP response: {_show(buf[pos:])}")
                # The next search starts where a blank line could still begin (it is at most
                # 3 bytes long): each byte is looked at about once. Searching the whole head
                # again on every read took 1.4 s of CPU for a 64 KiB head sent a byte a time.
                self._searched = max(0, len(buf) - pos - 2)
                if buf is not self._pending or pos:
                    self._pending = bytearray(buf[pos:])
                return out, len(data)
            end = m.end()
            if end - pos > MAX_RESPONSE_HEAD:
                raise FramingError(f"response head over {MAX_RESPONSE_HEAD} bytes")
            head = bytes(buf[pos:end])
            self._searched = 0
            pos = end
            status, framing = self._read_head(head)
            if status >= 200:
                break
            if status == 101:
                if not self.upgrade:
                    raise FramingError("101 Switching Protocols to a request without Upgrade")
                self.state = SWITCHED
                self._pending.clear()  # (buf itself, when the head began in an earlier read)
                return out + head, end - held
            out += head  # an interim response: the final one follows
        self._pending.clear()
        if status in (204, 304) or self._head_only:
            framing = 0
        body = self._body = _Body(framing, MAX_RESPONSE_HEAD)
        self.state = DONE if body.done else BODY
        head = connection_close(head)
        if framing is _CHUNKED:
            # With Transfer-Encoding, a Content-Length is not what frames the body, and an
            # intermediary MUST remove it (RFC 9112 6.3): a front reading it would cut the
            # body elsewhere (response splitting). Looked for in any case (field names are
            # case-insensitive: a case-sensitive look let "CONTENT-LENGTH" through).
            first, _, rest = head.partition(b"\n")
            head = first + b"\n" + _CONTENT_LENGTH_RE.sub(b"", rest)
        return out + head, end - held

    def _read_head(self, head: bytes) -> tuple[int, int | str]:
        """(status, body framing as _framing says) of a complete response head, by the
        module's table."""
        plain = _PLAIN_HEAD_RE.fullmatch(head)
        if plain is not None:
            status = int(plain.group(1))
            fields = _FRAMING_FIELD_RE.findall(head)
        else:
            lines = _head_lines(head)
            m = _STATUS_LINE_RE.fullmatch(lines[0])
            if m is None:
                raise FramingError(f"malformed status line: {_show(lines[0])}")
            status = int(m.group(1))
            fields = _header_fields(lines[1:])
        if status < 100:
            raise FramingError(f"status {status} is not an HTTP status")
        return status, _framing(fields, response=True)

    def body_part(self, data) -> int:
        """In state BODY: how many of ``data`` (the origin's next bytes) are the body's, which
        ``feed`` would forward as they are; they count as fed. Fewer than ``len(data)`` only at
        the body's end (state DONE): the rest is not taken, a later ``feed`` drops it. For a
        sender that takes the body's bytes without a copy (lib.net.httpexchange's direct
        delivery).

        :raises FramingError: a chunked body breaking the module's rules.
        """
        body = self._body
        end = body.feed(data)
        if body.done:
            self.state = DONE
        return end

    def _forward_body(self, data) -> bytes:
        """The part of ``data`` up to the body's end; the rest is dropped (state DONE)."""
        body = self._body
        end = body.feed(data)
        if body.done:
            self.state = DONE
            self.dropped = len(data) - end  # nothing was dropped before the end
            return data[:end]  # (all of data, uncopied, when it ends with the body)
        return data
