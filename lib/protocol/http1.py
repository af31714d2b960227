"""One HTTP/1.x exchange on a connection the proxy must not let be reused (sans-I/O).

A front that pools its connections to the proxy (a platform's router, nginx's upstream
keepalive) puts any visitor's request, for any host, on any idle connection. A connection the
proxy routed to one origin must therefore carry one request and one response, and then end:

* the request side is framed by :func:`connection_close` (the origin is told to close) and by
  the I/O layer, which stops forwarding after the request's end (lib.net.httpexchange);
* the response side is framed here, by :class:`ResponseFramer`: the final response's head is
  rewritten to ``Connection: close`` (so the front does not pool the connection), and whatever
  the origin sends after that response ends is dropped (an origin that answers twice would
  otherwise answer the next visitor);
* only an origin's ``101 Switching Protocols`` to a request that asked to upgrade turns the
  connection into raw bytes (a WebSocket): the request merely asking proves nothing.

Public API::

    framer = ResponseFramer(method=b"GET", upgrade=False)
    framer.feed(data) -> bytes        # the part of `data` to forward to the visitor now
    framer.state                      # HEAD, BODY, DONE or SWITCHED
    framer.dropped                    # bytes the origin sent after its response (dropped)
    connection_close(head) -> bytes   # a request or response head with Connection: close
    request_fields(head) -> (method, path, {lower-case name: [values]})
    FramingError(ValueError)          # the origin's response is not valid HTTP/1.x
    MAX_RESPONSE_HEAD

Rule table (origin sends / we forward):

    1xx other than 101           its head as is; wait for the final response
    101 to an upgrade request    everything, from here on raw (state SWITCHED)
    101 to any other request     FramingError (the I/O layer aborts the connection)
    final response head          the head with Connection: close (state BODY)
    body bytes                   up to the body's end by its framing (length, chunked, or
                                 until the origin closes), then state DONE
    anything after DONE          nothing (counted in ``dropped``)
"""
from __future__ import annotations

import re

import h11

from lib.errors import ShroudError
from lib.protocol import httphead

# Largest response head (status line + headers) we frame: nginx's default proxy_buffer_size is
# 4-8 KiB and h11's default limit is 16 KiB; 64 KiB leaves room for large cookies. Larger =>
# FramingError, the connection is aborted.
MAX_RESPONSE_HEAD = 65536

HEAD, BODY, DONE, SWITCHED = "head", "body", "done", "switched"

# h11's own end-of-head rule (a line feed, an optional CR, a line feed), so that the head we
# cut is exactly the one h11 parses.
_BLANK_LINE_RE = re.compile(rb"\n\r?\n")
# The header and any obs-fold continuation lines of it (an origin's "Connection: close\r\n
# keep-alive" must not leave " keep-alive" behind, folded onto the line before).
_CONNECTION_HEADER_RE = re.compile(rb"(?im)^(?:connection|keep-alive|proxy-connection)[ \t]*:"
                                   rb"[^\n]*\n(?:[ \t][^\n]*\n)*")


class FramingError(ShroudError, ValueError):
    """The origin's bytes are not a valid HTTP/1.x response to the request."""


def connection_close(head: bytes) -> bytes:
    """The head (request or response) with its Connection/Keep-Alive headers replaced by
    ``Connection: close``."""
    line_end = b"\r\n" if head.endswith(b"\r\n\r\n") else b"\n"
    body = head[:len(head) - 2 * len(line_end)]
    first, _, rest = body.partition(line_end)
    rest = _CONNECTION_HEADER_RE.sub(b"", rest + line_end) if rest else b""
    return first + line_end + rest + b"Connection: close" + line_end + line_end


def request_fields(head: bytes) -> tuple[str, str, dict[str, list[str]]]:
    """(method, path, {lower-case header name: [values]}) of a request head already checked by
    lib.protocol.sniff (so the request line and header lines are well formed).

    :raises ValueError: (httphead.HeadError) not a request head by lib.protocol.httphead's rules.
    """
    request = httphead.parse_request_head(head)
    headers: dict[str, list[str]] = {}
    for name, value in request.fields:
        headers.setdefault(name, []).append(value)
    return request.method, request.path, headers


class ResponseFramer:
    """The origin's side of one exchange; see the module's rule table.

    :param method: the request's method (only ``HEAD`` changes how a response is framed).
    :param upgrade: the request asked to switch protocols (it had an ``Upgrade`` header).
    """

    def __init__(self, method: bytes | str = b"GET", upgrade: bool = False):
        if isinstance(method, str):
            method = method.encode("latin-1")
        self.upgrade = upgrade
        self.state = HEAD
        self.dropped = 0
        self._pending = bytearray()
        self._searched = 0  # where the next search for the head's end starts in _pending
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        # h11 frames a response by the request it answers: tell it what matters (HEAD, an
        # upgrade proposal), never CONNECT (a proxy-style tunnel is no origin's to open).
        headers = [("Host", "origin")]
        if upgrade:
            headers += [("Connection", "upgrade"), ("Upgrade", "websocket")]
        self._h11.send(h11.Request(method="HEAD" if method == b"HEAD" else "GET", target="/",
                                   headers=headers))
        self._h11.send(h11.EndOfMessage())

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` (the origin's next bytes) to forward to the visitor now.

        :raises FramingError: not a valid response, or a head over ``MAX_RESPONSE_HEAD``.
        """
        if self.state == SWITCHED:
            return data
        if self.state == DONE:
            self.dropped += len(data)
            return b""
        if self.state == BODY:
            return self._body(data)
        self._pending += data
        out = bytearray()
        while self.state == HEAD:
            m = _BLANK_LINE_RE.search(self._pending, self._searched)
            if m is None:
                if len(self._pending) > MAX_RESPONSE_HEAD:
                    raise FramingError(f"response head over {MAX_RESPONSE_HEAD} bytes")
                # The next search starts where a blank line could still begin (it is at most
                # 3 bytes long): each byte is looked at about once. Searching the whole head
                # again on every read took 1.4 s of CPU for a 64 KiB head sent a byte a time.
                self._searched = max(0, len(self._pending) - 2)
                return bytes(out)
            head, rest = bytes(self._pending[:m.end()]), bytes(self._pending[m.end():])
            self._pending = bytearray()
            self._searched = 0
            if len(head) > MAX_RESPONSE_HEAD:
                raise FramingError(f"response head over {MAX_RESPONSE_HEAD} bytes")
            event = self._next_event(head)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    if not self.upgrade:  # h11 refuses this too; stated here for the reader
                        raise FramingError("101 Switching Protocols to a request without Upgrade")
                    self.state = SWITCHED
                    return bytes(out) + head + rest
                out += head
                self._pending += rest
                continue
            if not isinstance(event, h11.Response):
                raise FramingError(f"unexpected {type(event).__name__} for a response head")
            out += connection_close(head)
            self.state = BODY
            out += self._body(rest, after_head=True)
        return bytes(out)

    def _next_event(self, data: bytes):
        try:
            if data:
                self._h11.receive_data(data)  # never b"": that would tell h11 EOF
            return self._h11.next_event()
        except h11.ProtocolError as e:
            raise FramingError(f"malformed response: {e}") from None

    def _body(self, data: bytes, after_head: bool = False) -> bytes:
        """Forward body bytes up to the response's end; the end may come with no new bytes
        (a 204, a 304, a HEAD's answer, Content-Length: 0)."""
        if not data and not after_head:
            return b""
        event = self._next_event(data)
        while event is not h11.NEED_DATA:
            if isinstance(event, h11.EndOfMessage):
                extra = len(self._h11.trailing_data[0])
                self.state = DONE
                self.dropped += extra
                return data[:len(data) - extra]
            if not isinstance(event, h11.Data):
                raise FramingError(f"unexpected {type(event).__name__} in a response body")
            event = self._next_event(b"")
        return data
