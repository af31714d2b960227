"""lib.protocol.http1's framing of one exchange, table by table (no I/O).

Each table row is fed three ways (whole, a byte at a time, in two pieces at every split for
the short ones) and must give one answer. The same rows go through h11 0.16, which framed the
exchange before this module did (bench/README.md, "Fresh connections: our own HTTP/1
framing"): both must agree, except where a row says the proxy refuses on purpose what h11
accepted (a request with both Content-Length and Transfer-Encoding).
"""
from __future__ import annotations

import re

import h11

import pytest
from hypothesis import given, settings, strategies as st

from lib.protocol import http1, httphead
from lib.protocol.http1 import (MAX_REQUEST_LINE, MAX_RESPONSE_HEAD, FramingError,
                                 RequestFramer, ResponseFramer, connection_close)

ERROR = "error"
NEXT = b"GET /next HTTP/1.1\r\nHost: other.test\r\n\r\n"


def pieces(data: bytes, how):
    """``data`` split as ``how`` says: "whole", "bytes" (one at a time) or an index."""
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    return [data[:how], data[how:]]


def ways(data: bytes):
    yield "whole"
    yield "bytes"
    if len(data) <= 64:
        yield from range(1, len(data))


# --- requests ------------------------------------------------------------------------------

def request_end(head: bytes, body: bytes, how="whole"):
    """Where the request ends in ``body`` (the bytes after its head), None if it goes on,
    ERROR if refused."""
    try:
        framer = RequestFramer(httphead.parse_request_head(head))
        taken = 0
        if framer.done:
            return 0
        for piece in pieces(body, how):
            n = framer.feed(piece)
            assert n == len(piece) or framer.done  # fewer only at the end
            taken += n
            if framer.done:
                return taken
        return None
    except FramingError:
        return ERROR


def h11_request_end(head: bytes, body: bytes):
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_LINE)
    conn.receive_data(head + body)  # never b"": head is not empty
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.EndOfMessage):
                return len(body) - len(conn.trailing_data[0])
    except h11.RemoteProtocolError:
        return ERROR


def req(fields: bytes, line: bytes = b"POST /up HTTP/1.1") -> bytes:
    return line + b"\r\nHost: web.test\r\n" + fields + b"\r\n"


CL = b"Content-Length: "
TE = b"Transfer-Encoding: chunked\r\n"
BIG = b"1;" + b"e" * MAX_REQUEST_LINE  # a chunk-size line over the bound, no CRLF yet

ENDS = "ends"  # the request ends where NEXT starts in the body (or at the body's end)

# (id, head, body, end): where the request ends in body (ENDS), None (goes on), or ERROR.
REQUESTS = [
    ("get-no-body", req(b"", b"GET / HTTP/1.1"), NEXT, ENDS),
    ("http10-no-host", b"GET / HTTP/1.0\r\n\r\n", NEXT, ENDS),
    ("cl", req(CL + b"5\r\n"), b"hello" + NEXT, ENDS),
    ("cl-exact", req(CL + b"5\r\n"), b"hello", ENDS),
    ("cl-1", req(CL + b"1\r\n"), b"x" + NEXT, ENDS),
    ("cl-0", req(CL + b"0\r\n"), NEXT, ENDS),
    ("cl-incomplete", req(CL + b"10\r\n"), b"hello", None),
    ("cl-list-same", req(CL + b"5, 5\r\n"), b"hello" + NEXT, ENDS),
    ("cl-two-headers-same", req(CL + b"5\r\n" + CL + b"5\r\n"), b"hello" + NEXT, ENDS),
    ("cl-20-digits", req(CL + b"9" * 20 + b"\r\n"), b"hello", None),
    ("cl-21-digits", req(CL + b"9" * 21 + b"\r\n"), b"hello", ERROR),
    ("cl-list-differs", req(CL + b"5, 6\r\n"), b"hello", ERROR),
    ("cl-two-headers-differ", req(CL + b"5\r\n" + CL + b"6\r\n"), b"hello", ERROR),
    ("cl-written-differently", req(CL + b"5\r\n" + CL + b"05\r\n"), b"hello", ERROR),
    ("cl-empty", req(CL + b"\r\n"), b"", ERROR),
    ("cl-empty-in-list", req(CL + b"5,\r\n"), b"hello", ERROR),
    ("cl-not-digits", req(CL + b"abc\r\n"), b"", ERROR),
    ("cl-negative", req(CL + b"-1\r\n"), b"", ERROR),
    ("cl-plus", req(CL + b"+5\r\n"), b"hello", ERROR),
    ("cl-hex", req(CL + b"0x5\r\n"), b"hello", ERROR),
    ("te-chunked", req(TE), b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" + NEXT, ENDS),
    ("te-any-case", req(b"Transfer-Encoding: ChUnKeD\r\n"), b"0\r\n\r\n" + NEXT, ENDS),
    ("te-gzip", req(b"Transfer-Encoding: gzip\r\n"), b"", ERROR),
    ("te-gzip-chunked", req(b"Transfer-Encoding: gzip, chunked\r\n"), b"0\r\n\r\n", ERROR),
    ("te-chunked-twice", req(b"Transfer-Encoding: chunked, chunked\r\n"), b"0\r\n\r\n", ERROR),
    ("te-two-headers", req(TE + TE), b"0\r\n\r\n", ERROR),
    ("te-empty", req(b"Transfer-Encoding: \r\n"), b"", ERROR),
    ("chunk-ext", req(TE), b"5;a=b;c\r\nhello\r\n0;x\r\n\r\n" + NEXT, ENDS),
    ("chunk-size-trailing-ows", req(TE), b"5 \t\r\nhello\r\n0\r\n\r\n" + NEXT, ENDS),
    ("chunk-upper-hex", req(TE), b"A\r\n0123456789\r\n0\r\n\r\n", ENDS),
    ("chunk-cr-in-ext", req(TE), b"1;a\rb\r\nx\r\n0\r\n\r\n", ENDS),
    ("chunk-20-hex-digits", req(TE), b"0" * 19 + b"1\r\nx\r\n0\r\n\r\n", ENDS),
    ("chunk-21-hex-digits", req(TE), b"0" * 20 + b"1\r\nx\r\n0\r\n\r\n", ERROR),
    ("chunk-0x", req(TE), b"0x5\r\nhello\r\n0\r\n\r\n", ERROR),
    ("chunk-space-first", req(TE), b" 5\r\nhello\r\n0\r\n\r\n", ERROR),
    ("chunk-not-hex", req(TE), b"g\r\n", ERROR),
    ("chunk-empty-size", req(TE), b"\r\nhello\r\n0\r\n\r\n", ERROR),
    ("chunk-empty-line-only", req(TE), b"\r\n", ERROR),
    ("chunk-negative", req(TE), b"-1\r\nx\r\n0\r\n\r\n", ERROR),
    ("chunk-bare-lf", req(TE), b"5\nhello\r\n0\r\n\r\n", ERROR),
    ("chunk-bare-lf-waits", req(TE), b"5\nhello", None),
    ("chunk-data-too-long", req(TE), b"5\r\nhelloX\r\n0\r\n\r\n", ERROR),
    ("chunk-data-lf-only", req(TE), b"5\r\nhello\n0\r\n\r\n", ERROR),
    ("chunk-data-cr-only", req(TE), b"5\r\nhello\r0\r\n\r\n", ERROR),
    ("chunk-incomplete", req(TE), b"5\r\nhel", None),
    ("chunk-no-last", req(TE), b"5\r\nhello\r\n", None),
    ("trailer", req(TE), b"0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n" + NEXT, ENDS),
    ("trailer-lf-lines", req(TE), b"0\r\nX-Sum: 1\n\n" + NEXT, ENDS),
    ("trailer-lf-cl", req(TE), b"0\r\nContent-Length: 5\n\n" + NEXT, ENDS),
    ("trailer-cl-and-te", req(TE), b"0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
     b"\r\n" + NEXT, ENDS),
    ("trailer-cr-then-lf", req(TE), b"0\r\n\r" + b"\n" + NEXT, ENDS),
    ("last-chunk-bare-lf-end", req(TE), b"0\r\n\n" + NEXT, ENDS),
    ("trailer-folded", req(TE), b"0\r\nX-Sum: 1\r\n 2\r\n\r\n" + NEXT, ENDS),
    ("trailer-fold-first", req(TE), b"0\r\n X: 1\r\n\r\n", ERROR),
    ("trailer-fold-ff", req(TE), b"0\r\nX: 1\r\n \x0c2\r\n\r\n", ERROR),
    ("trailer-bad-line", req(TE), b"0\r\nnot a field\r\n\r\n", ERROR),
    ("trailer-bad-cl", req(TE), b"0\r\nContent-Length: x\r\n\r\n", ERROR),
    ("trailer-incomplete", req(TE), b"0\r\nX-Sum: 1\r\n", None),
    # blank lines inside chunk data are data: the trailer's end is searched for after them
    ("trailer-after-lf-data", req(TE), b"4\r\n\n\n\n\n\r\n0\r\nX: 1\r\n\r\n" + NEXT, ENDS),
    ("chunk-line-over-bound", req(TE), BIG, ERROR),
    ("chunk-line-at-bound", req(TE), BIG[:MAX_REQUEST_LINE], None),
    ("trailer-over-bound", req(TE), b"0\r\nX: " + b"v" * MAX_REQUEST_LINE, ERROR),
]
# Refused by the proxy, accepted by h11 (which framed by the chunks): two framings of one
# body in one request are how smuggling starts.
OURS_ONLY = {
    "cl-and-te": (req(CL + b"5\r\n" + TE), b"0\r\n\r\n", ERROR),
    "te-and-cl": (req(TE + CL + b"5\r\n"), b"0\r\n\r\n", ERROR),
    "non-ascii-target": (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", b"", ERROR),
}


@pytest.mark.parametrize("name, head, body, end", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_end(name, head, body, end):
    end = _end(body, end)
    for how in ways(body):
        assert request_end(head, body, how) == end, how


@pytest.mark.parametrize("name, head, body, end", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_end_as_h11_found_it(name, head, body, end):
    assert h11_request_end(head, body) == _end(body, end)


def _end(body: bytes, end):
    if end != ENDS:
        return end
    return body.index(NEXT) if NEXT in body else len(body)


@pytest.mark.parametrize("name", sorted(OURS_ONLY))
def test_requests_refused_on_purpose(name):
    head, body, end = OURS_ONLY[name]
    assert request_end(head, body) == end


def test_both_lengths_h11_took_by_the_chunks():
    head, body, _ = OURS_ONLY["cl-and-te"]
    assert h11_request_end(head, body) == 5  # what our table refuses, and why it is listed


def test_non_ascii_target_was_refused_by_h11_too():
    head, body, _ = OURS_ONLY["non-ascii-target"]
    assert h11_request_end(head, body) == ERROR


@pytest.mark.parametrize("head", [
    b"GET http://web.test/ HTTP/1.1\r\n\r\n",  # absolute form: the sniffer routes by it
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
])
def test_an_http11_request_needs_one_host(head):
    assert request_end(head, b"") == ERROR
    assert h11_request_end(head, b"") == ERROR


def test_request_framer_answers_nothing_more_once_done():
    framer = RequestFramer(httphead.parse_request_head(req(CL + b"2\r\n")))
    assert (framer.feed(b"ok" + NEXT), framer.done) == (2, True)
    assert framer.feed(NEXT) == 0


def test_long_chunked_body_in_small_chunks_ends_once():
    """10,000 one-byte chunks in one read (each step reads its own bytes in place: copying the
    rest of the read into a line buffer per chunk would be quadratic)."""
    body = b"1\r\nx\r\n" * 10000 + b"0\r\n\r\n"
    framer = RequestFramer(httphead.parse_request_head(req(TE)))
    assert framer.feed(body + NEXT) == len(body) and framer.done


# --- responses -----------------------------------------------------------------------------

def frame(data: bytes, method=b"GET", upgrade=False, how="whole"):
    """(forwarded bytes, state, dropped) or ERROR."""
    framer = ResponseFramer(method, upgrade=upgrade)
    try:
        out = b"".join(framer.feed(p) for p in pieces(data, how))
    except FramingError:
        return ERROR
    return out, framer.state, framer.dropped


def h11_response(data: bytes, method=b"GET", upgrade=False):
    """(state, where the response ends in data or None) by h11, or ERROR."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    headers = [("Host", "origin")] + ([("Connection", "upgrade"), ("Upgrade", "websocket")]
                                      if upgrade else [])
    conn.send(h11.Request(method=method, target="/", headers=headers))
    conn.send(h11.EndOfMessage())
    if data:
        conn.receive_data(data)  # never b"": that tells h11 the peer closed
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return http1.BODY if conn.their_state is h11.SEND_BODY else http1.HEAD, None
            if event is h11.PAUSED:  # switched
                return http1.SWITCHED, len(data) - len(conn.trailing_data[0])
            if isinstance(event, h11.EndOfMessage):
                return http1.DONE, len(data) - len(conn.trailing_data[0])
    except h11.RemoteProtocolError:
        return ERROR


OK = b"HTTP/1.1 200 OK\r\n"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nhijacked"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"

# (id, method, upgrade, interim heads, final head, body, state): the answer is the interim
# heads as they are, the final head with Connection: close, the body; SECOND is dropped
# after it when the state is DONE.
RESPONSES = [
    ("cl", b"GET", False, b"", OK + b"Content-Length: 5\r\nConnection: keep-alive\r\n\r\n",
     b"hello", http1.DONE),
    ("chunked", b"GET", False, b"", OK + b"Transfer-Encoding: chunked\r\n\r\n",
     b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", http1.DONE),
    ("chunked-beats-cl", b"GET", False, b"",
     OK + b"Content-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n",
     http1.DONE),
    ("chunked-beats-cl-any-case", b"GET", False, b"",
     OK + b"CONTENT-LENGTH: 100\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n",
     http1.DONE),
    ("head", b"HEAD", False, b"", OK + b"Content-Length: 5\r\n\r\n", b"", http1.DONE),
    ("head-chunked", b"HEAD", False, b"", OK + b"Transfer-Encoding: chunked\r\n\r\n", b"",
     http1.DONE),
    ("204", b"GET", False, b"", b"HTTP/1.1 204 No Content\r\nKeep-Alive: timeout=5\r\n\r\n",
     b"", http1.DONE),
    ("304", b"GET", False, b"", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
     b"", http1.DONE),
    ("cl-0", b"GET", False, b"", OK + b"Content-Length: 0\r\n\r\n", b"", http1.DONE),
    ("interim", b"POST", False,
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
     OK + b"Content-Length: 2\r\n\r\n", b"ok", http1.DONE),
    ("lf-lines", b"GET", False, b"", b"HTTP/1.1 200 OK\nContent-Length: 2\n\n", b"ok",
     http1.DONE),
    ("lf-cr-lf-end", b"GET", False, b"", b"HTTP/1.1 200 OK\nContent-Length: 2\n\r\n", b"ok",
     http1.DONE),
    ("no-reason", b"GET", False, b"", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n", b"ok",
     http1.DONE),
    ("empty-reason", b"GET", False, b"", b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n", b"ok",
     http1.DONE),
    ("reason-obs-text", b"GET", False, b"", b"HTTP/1.1 200 \xe9t\xe9 \tok\r\nContent-Length: 2"
     b"\r\n\r\n", b"ok", http1.DONE),
    ("status-999", b"GET", False, b"", b"HTTP/1.1 999 X\r\nContent-Length: 2\r\n\r\n", b"ok",
     http1.DONE),
    ("http2-version", b"GET", False, b"", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\n",
     b"ok", http1.DONE),
    ("folded-cl", b"GET", False, b"", OK + b"X: a\r\nContent-Length:\r\n 2\r\n\r\n", b"ok",
     http1.DONE),
    ("folded-te", b"GET", False, b"", OK + b"Transfer-Encoding:\r\n\tchunked\r\n\r\n",
     b"0\r\n\r\n", http1.DONE),
    ("folded-lf-lines", b"GET", False, b"", b"HTTP/1.1 200 OK\nX: a\n b\nContent-Length: 2\n\n",
     b"ok", http1.DONE),
    ("folded-te-spaces", b"GET", False, b"", OK + b"X: a\r\n b\r\nTransfer-Encoding:  chunked \t"
     b"\r\n\r\n", b"0\r\n\r\n", http1.DONE),
    ("te-spaces", b"GET", False, b"", OK + b"Transfer-Encoding: \tchunked  \r\n\r\n",
     b"0\r\n\r\n", http1.DONE),
    ("value-obs-text-tab", b"GET", False, b"", OK + b"X: a\tb \xff\r\nContent-Length: 2\r\n\r\n",
     b"ok", http1.DONE),
    ("close-delimited", b"GET", False, b"", b"HTTP/1.0 200 OK\r\n\r\n", b"abc" + SECOND,
     http1.BODY),
    ("upgrade-refused-keepalive", b"GET", True, b"",
     OK + b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\n", b"ok", http1.DONE),
    ("upgrade-interim-first", b"GET", True, b"HTTP/1.1 100 Continue\r\n\r\n",
     OK + b"Content-Length: 2\r\n\r\n", b"ok", http1.DONE),
]


def forwarded(head: bytes) -> bytes:
    """A final response head as the framer forwards it: Connection: close, and with chunked
    framing no Content-Length (RFC 9112 6.3: an intermediary removes it)."""
    out = connection_close(head)
    if b"Transfer-Encoding: chunked" in head:
        out = re.sub(rb"(?i)Content-Length: [0-9]+\r\n", b"", out)
    return out


@pytest.mark.parametrize("name, method, upgrade, interim, head, body, state", RESPONSES,
                         ids=[r[0] for r in RESPONSES])
def test_one_response_then_nothing(name, method, upgrade, interim, head, body, state):
    data = interim + head + body + SECOND
    want_out = interim + forwarded(head) + body
    if state == http1.BODY:  # close-delimited: everything until the origin closes
        want = (want_out + SECOND, http1.BODY, 0)
    else:
        want = (want_out, http1.DONE, len(SECOND))
    for how in ways(data):
        assert frame(data, method, upgrade, how) == want, how
    assert h11_response(data, method, upgrade) == (
        (http1.BODY, None) if state == http1.BODY else (http1.DONE, len(data) - len(SECOND)))


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_101_to_an_upgrade_is_raw_from_there(how):
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    data = interim + SWITCH + b"\x81\x02hi" + SECOND
    assert frame(data, upgrade=True, how=how) == (data, http1.SWITCHED, 0)
    assert h11_response(data, upgrade=True) == (http1.SWITCHED, len(interim + SWITCH))


TOO_BIG_HEAD = OK + b"X: " + b"a" * MAX_RESPONSE_HEAD

# (id, method, upgrade, data): each is refused (FramingError), and was by h11.
BAD_RESPONSES = [
    ("101-unasked", b"GET", False, SWITCH),
    ("not-http", b"GET", False, b"NOT HTTP\r\n\r\n"),
    ("empty-first-line", b"GET", False, b"\r\n\r\n"),
    ("lowercase-http", b"GET", False, b"http/1.1 200 OK\r\n\r\n"),
    ("two-digit-status", b"GET", False, b"HTTP/1.1 20 OK\r\n\r\n"),
    ("status-099", b"GET", False, b"HTTP/1.1 099 X\r\n\r\n"),
    ("status-no-space", b"GET", False, b"HTTP/1.1 200OK\r\n\r\n"),
    ("version-no-minor", b"GET", False, b"HTTP/1 200 OK\r\n\r\n"),
    ("reason-nul", b"GET", False, b"HTTP/1.1 200 O\x00K\r\n\r\n"),
    ("reason-bare-cr", b"GET", False, b"HTTP/1.1 200 O\rK\r\n\r\n"),
    ("reason-vt", b"GET", False, b"HTTP/1.1 200 O\x0bK\r\n\r\n"),
    ("space-before-colon", b"GET", False, OK + b"Content-Length : 2\r\n\r\nok"),
    ("no-colon", b"GET", False, OK + b"Content-Length 2\r\n\r\nok"),
    ("empty-name", b"GET", False, OK + b": 2\r\n\r\nok"),
    ("name-not-token", b"GET", False, OK + b"X(y): 2\r\n\r\nok"),
    ("value-nul", b"GET", False, OK + b"X: a\x00b\r\n\r\n"),
    ("value-bare-cr", b"GET", False, OK + b"X: a\rb\r\n\r\n"),
    ("value-ff", b"GET", False, OK + b"X: a\x0cb\r\n\r\n"),
    ("line-two-crs", b"GET", False, OK + b"X: a\r\r\n\r\n"),
    ("fold-first", b"GET", False, OK + b" X: a\r\n\r\n"),
    ("fold-ff", b"GET", False, OK + b"X: a\r\n \x0cb\r\n\r\n"),
    ("te-chunked-x", b"GET", False, OK + b"Transfer-Encoding: chunkedX\r\n\r\n"),
    ("folded-te-chunked-x", b"GET", False, OK + b"X: a\r\n b\r\nTransfer-Encoding: Xchunked"
     b"\r\n\r\n"),
    ("cl-twice-differs", b"GET", False, OK + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"),
    ("cl-list-differs", b"GET", False, OK + b"Content-Length: 1, 2\r\n\r\n"),
    ("cl-not-digits", b"GET", False, OK + b"Content-Length: x\r\n\r\n"),
    ("cl-21-digits", b"GET", False, OK + b"Content-Length: " + b"1" * 21 + b"\r\n\r\n"),
    ("te-gzip", b"GET", False, OK + b"Transfer-Encoding: gzip\r\n\r\n"),
    ("te-twice", b"GET", False, OK + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n"),
    ("interim-bad-cl", b"GET", False, b"HTTP/1.1 100 Continue\r\nContent-Length: x\r\n\r\n"),
    ("head-bad-te", b"HEAD", False, OK + b"Transfer-Encoding: gzip\r\n\r\n"),
    ("chunk-bad-size", b"GET", False, OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("chunk-bad-footer", b"GET", False, OK + b"Transfer-Encoding: chunked\r\n\r\n"
     b"1\r\nxy\r\n0\r\n\r\n"),
    ("chunk-line-over-bound", b"GET", False, OK + b"Transfer-Encoding: chunked\r\n\r\n1;"
     + b"e" * MAX_RESPONSE_HEAD),
    ("trailer-bad-line", b"GET", False, OK + b"Transfer-Encoding: chunked\r\n\r\n"
     b"0\r\nbad\r\n\r\n"),
    ("head-too-big", b"GET", False, TOO_BIG_HEAD),
]


@pytest.mark.parametrize("name, method, upgrade, data", BAD_RESPONSES,
                         ids=[r[0] for r in BAD_RESPONSES])
def test_malformed_responses_are_refused(name, method, upgrade, data):
    assert frame(data, method, upgrade) == ERROR
    if len(data) < 200:
        assert frame(data, method, upgrade, "bytes") == ERROR
    assert h11_response(data, method, upgrade) == ERROR


def test_a_whole_head_over_the_bound_is_refused_even_when_complete():
    head = OK + b"X: " + b"a" * MAX_RESPONSE_HEAD + b"\r\n\r\n"
    assert frame(head) == ERROR
    at_bound = OK + b"X: " + b"a" * (MAX_RESPONSE_HEAD - len(OK) - 7) + b"\r\n\r\n"
    assert len(at_bound) == MAX_RESPONSE_HEAD
    assert frame(at_bound)[1] == http1.BODY


def test_response_head_after_interim_responses_is_bounded_alone():
    """Each head has the bound (not the interim heads before it added together)."""
    interim = b"HTTP/1.1 100 Continue\r\nX: " + b"a" * 40000 + b"\r\n\r\n"
    final = OK + b"Y: " + b"b" * 40000 + b"\r\nContent-Length: 2\r\n\r\n"
    out, state, _ = frame(interim + final + b"ok")
    assert state == http1.DONE and out.endswith(b"ok")


def test_long_folded_header_is_joined():
    """An origin folding one header over 15,000 continuation lines (joined in place, in
    linear time: joining copies of the growing line took ~n^2/2 bytes)."""
    head = OK + b"X: a" + b"\r\n b" * 15000 + b"\r\nContent-Length: 2\r\n\r\n"
    assert len(head) <= MAX_RESPONSE_HEAD
    assert frame(head + b"ok")[1] == http1.DONE


def test_response_body_split_anywhere_ends_at_the_same_byte():
    head = OK + b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"3;x=y\r\nabc\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\nT: 1\r\n\r\n"
    for cut in range(1, len(body)):
        framer = ResponseFramer(b"GET")
        out = framer.feed(head + body[:cut]) + framer.feed(body[cut:] + SECOND)
        assert out == connection_close(head) + body and framer.dropped == len(SECOND), cut


# --- against h11, drawn ---------------------------------------------------------------------

_CHUNK_BYTES = st.sampled_from([b"0", b"1", b"5", b"a", b"F", b";", b"x", b"\r", b"\n", b" ",
                                b"\t", b"\r\n", b"\r\n\r\n", b":", b"g"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_CHUNK_BYTES, max_size=40))
def test_fuzz_chunked_request_bodies_end_where_h11_ends_them(parts):
    body = b"".join(parts)
    head = req(TE)
    assert request_end(head, body) == h11_request_end(head, body)
    assert request_end(head, body, "bytes") == h11_request_end(head, body)


_HEAD_BYTES = st.sampled_from([b"HTTP/1.1 ", b"200", b"100", b"101", b" OK", b"\r\n", b"\n",
                               b"\r", b" ", b"\t", b"Content-Length:", b"Transfer-Encoding:",
                               b" chunked", b"5", b"0", b"X:", b"\x00", b"\xff", b",", b"hello",
                               b"0\r\n\r\n"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_HEAD_BYTES, max_size=30), st.sampled_from([b"GET", b"HEAD"]), st.booleans())
def test_fuzz_responses_frame_as_h11_framed_them(parts, method, upgrade):
    data = b"".join(parts)
    got = frame(data, method, upgrade)
    want = h11_response(data, method, upgrade)
    if want == ERROR or got == ERROR:
        assert got == want
        return
    state, end = want
    out, our_state, dropped = got
    assert our_state == state
    if state == http1.DONE:
        assert dropped == len(data) - end


# --- exact texts: connection_close, the errors, the bounds ------------------------------------

@pytest.mark.parametrize("head, want", [
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
     b"Proxy-Connection: keep-alive\r\nContent-Length: 2\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"),
    (b"HTTP/1.1 200 OK\nconnection: Keep-Alive\nContent-Length: 2\n\n",
     b"HTTP/1.1 200 OK\nContent-Length: 2\nConnection: close\n\n"),
    (b"HTTP/1.0 200 OK\r\n\r\n", b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n"),
    (b"HTTP/1.0 200 OK\n\n", b"HTTP/1.0 200 OK\nConnection: close\n\n"),
    # a blank line of CR LF after LF lines (h11 and RFC 9112 2.2 take both): the close goes
    # before the blank line, not after it (it used to end the head early)
    (b"HTTP/1.1 200 OK\nX: y\n\r\n", b"HTTP/1.1 200 OK\nX: y\nConnection: close\n\n"),
    (b"HTTP/1.1 200 OK\r\nX: y\r\n\n", b"HTTP/1.1 200 OK\r\nX: y\r\nConnection: close\r\n\r\n"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
])
def test_connection_close_texts(head, want):
    assert connection_close(head) == want


LONG = b"x" * 200


@pytest.mark.parametrize("method, upgrade, data, message", [
    (b"GET", False, SWITCH, "101 Switching Protocols to a request without Upgrade"),
    (b"GET", False, b" HTTP", "not an HTTP response: b' HTTP'"),
    (b"GET", False, b"\n" + LONG, "not an HTTP response: " + repr(b"\n" + LONG[:79])),
    (b"GET", False, b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line: b'HTTP/1.1 20 OK'"),
    (b"GET", False, LONG + b"\r\n\r\n", "malformed status line: " + repr(LONG[:80])),
    (b"GET", False, b"HTTP/1.1 099 X\r\n\r\n", "status 99 is not an HTTP status"),
    (b"GET", False, OK + b"X : y\r\n\r\n", "malformed header line: b'X : y'"),
    (b"GET", False, OK + b"X " + LONG + b"\r\n\r\n",
     "malformed header line: " + repr((b"X " + LONG)[:80])),
    (b"GET", False, OK + b" X: y\r\n\r\n", "continuation line at start of headers"),
    (b"GET", False, OK + b"Content-Length: 1, 2\r\n\r\n", "conflicting Content-Length headers"),
    (b"GET", False, OK + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
     "conflicting Content-Length headers"),
    (b"GET", False, OK + b"Content-Length: x\r\n\r\n", "bad Content-Length"),
    (b"GET", False, OK + b"Transfer-Encoding: gzip\r\n\r\n",
     "only Transfer-Encoding: chunked is supported"),
    (b"GET", False, OK + TE + TE + b"\r\n", "multiple Transfer-Encoding headers"),
    (b"GET", False, OK + TE + b"\r\n1\r\nxyz", "malformed chunk footer: b'yz'"),
    (b"GET", False, OK + TE + b"\r\n" + LONG + b"\r\n",
     "malformed chunk-size line: " + repr(LONG[:80])),
    (b"GET", False, OK + TE + b"\r\n1;" + b"e" * MAX_RESPONSE_HEAD,
     f"chunk-size line or trailer over {MAX_RESPONSE_HEAD} bytes"),
    (b"GET", False, TOO_BIG_HEAD, f"response head over {MAX_RESPONSE_HEAD} bytes"),
    (b"GET", False, OK + b"X: " + b"a" * MAX_RESPONSE_HEAD + b"\r\n\r\n",
     f"response head over {MAX_RESPONSE_HEAD} bytes"),
])
def test_error_texts(method, upgrade, data, message):
    with pytest.raises(FramingError) as e:
        ResponseFramer(method, upgrade).feed(data)
    assert str(e.value) == message


@pytest.mark.parametrize("head, message", [
    (req(CL + b"1\r\n" + TE), "both Content-Length and Transfer-Encoding"),
    (b"GET / HTTP/1.1\r\n\r\n", "an HTTP/1.1 request needs one Host header"),
    (b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", "request target with a byte outside 0x21-0x7e"),
])
def test_request_error_texts(head, message):
    with pytest.raises(FramingError) as e:
        RequestFramer(httphead.parse_request_head(head))
    assert str(e.value) == message


def test_request_chunk_line_bound_text():
    framer = RequestFramer(httphead.parse_request_head(req(TE)))
    with pytest.raises(FramingError) as e:
        framer.feed(BIG + b"e")
    assert str(e.value) == f"chunk-size line or trailer over {MAX_REQUEST_LINE} bytes"


def test_an_incomplete_head_at_the_bound_waits_and_one_byte_more_is_refused():
    head = OK + b"X: " + b"a" * (MAX_RESPONSE_HEAD - len(OK) - 3)
    assert len(head) == MAX_RESPONSE_HEAD
    framer = ResponseFramer(b"GET")
    assert framer.feed(head) == b"" and framer.state == http1.HEAD
    with pytest.raises(FramingError):
        framer.feed(b"a")


@pytest.mark.parametrize("first", [b"!", b'"', b"H"])
def test_a_head_may_start_with_any_visible_byte_until_its_end(first):
    framer = ResponseFramer(b"GET")
    assert framer.feed(first) == b"" and framer.state == http1.HEAD
    assert h11_response(first) == (http1.HEAD, None)


def test_interim_and_final_heads_split_anywhere():
    """An interim response and the final one, cut at every byte: each head is found where it
    ends, however much of it came with the one before."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = OK + b"Content-Length: 2\r\n\r\n"
    data = interim + final + b"ok" + SECOND
    want = interim + connection_close(final) + b"ok"
    for cut in range(1, len(data)):
        framer = ResponseFramer(b"POST")
        assert framer.feed(data[:cut]) + framer.feed(data[cut:]) == want, cut
        assert framer.dropped == len(SECOND)


def test_a_long_final_head_after_an_interim_one_is_bounded_alone_in_pieces():
    interim = b"HTTP/1.1 100 Continue\r\nX: " + b"a" * 40000 + b"\r\n\r\n"
    final = OK + b"Y: " + b"b" * 40000 + b"\r\nContent-Length: 2\r\n\r\n"
    framer = ResponseFramer(b"GET")
    assert framer.feed(interim + final[:30000]) == interim  # 70,000 bytes held: not one head
    out = framer.feed(final[30000:] + b"ok")
    assert out.endswith(b"ok") and framer.state == http1.DONE


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_upgrade_answer_after_a_long_interim_keeps_every_byte(how):
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    data = interim + SWITCH + b"\x81\x02hi"
    assert frame(data, upgrade=True, how=how) == (data, http1.SWITCHED, 0)


def test_a_new_framer_waits_for_a_head():
    assert ResponseFramer(b"GET").state == http1.HEAD


@pytest.mark.parametrize("method", [b"HEAD", "HEAD"])
def test_head_is_told_as_bytes_or_text(method):
    out, state, dropped = frame(OK + b"Content-Length: 5\r\n\r\n" + SECOND, method)
    assert (state, dropped) == (http1.DONE, len(SECOND))


@pytest.mark.parametrize("fields, done", [
    (b"", True), (CL + b"0\r\n", True), (CL + b"1\r\n", False), (TE, False)])
def test_a_request_without_a_body_is_done_with_its_head(fields, done):
    assert RequestFramer(httphead.parse_request_head(req(fields))).done is done
