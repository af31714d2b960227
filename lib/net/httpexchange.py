"""Sockets that carry one HTTP/1.x exchange of a public connection (gevent I/O).

A front that keeps its connections to the proxy alive (a platform's router, nginx's upstream
keepalive) may send the next request, from another visitor and for another host, on the same
connection. Spliced raw to the first request's origin, that request (with its cookies) would
reach the wrong origin, and an origin that answers twice would answer the next visitor. These
wrappers sit between the public socket and lib.net.splice so that a routed connection carries
exactly one exchange (docs/SECURITY.md, "A front that pools connections").

Public API::

    ReplaySocket(sock, head)          # a socket whose first reads return `head`
    OneRequestSocket(sock, head, request=None)   # ... which reads one request only (EOF
                                      # after it; lib.protocol.http1.RequestFramer)
    OneRequestSocket.take_head() -> bytes   # the first read's head, taken by the caller
    OneRequestSocket.request_whole -> bool  # the request ended and was all read
    OneExchangeSocket(sock, head, request=None)  # ... and writes one response only
                                      # (lib.protocol.http1.ResponseFramer), raw both ways
                                      # only after the origin's 101
                                      # request: the head as lib.protocol.httphead parsed it,
                                      # if it was (else it is parsed here)
    OneExchangeSocket.dropped_requests / .dropped_response_bytes    # counters, for tests
    OneExchangeSocket.direct_senders() -> (sendall, send_now, sendmsg_now) | None
                                      # for lib.net.splice's sink (direct delivery, below)

Reads are what the splice forwards to the tunnel; writes (``sendall``) are what it forwards
from the origin to the visitor. Rule table (peer does / we answer):

    visitor sends a second request     the tunnel sees EOF; the request goes nowhere
    origin answers 101 to an upgrade   raw bytes both ways from there on (a WebSocket)
    origin answers anything else       its head with Connection: close, its body, then FIN
                                       to the visitor; bytes the visitor sent after an
                                       upgrade request are dropped
    origin sends a second response     dropped
    malformed request or response      ConnectionAbortedError: the splice aborts both ends

Direct delivery (lib.net.muxsession, "Direct delivery"): the splice's sink sends the stream's
bytes to the visitor from the session's reader, through ``direct_senders``. The framer reads
them first (``ResponseFramer.body_part``): the response's body goes out as it is, uncopied, up
to its end; the head (rewritten with Connection: close), interim responses and the bytes after
the end (dropped) are left to the copy loop's ``sendall``. Bytes the framer read that the
socket did not take (a slow visitor) stay with the stream as usual and are sent unread when they
come again (``_credit``), so every byte is read by the framer exactly once, in order.

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import logging
import socket
from itertools import islice

import gevent.event
import gevent.socket

from lib.net.sockets import IOV_MAX, nowait_sender, nowait_sendmsg, read_watcher, reader, sender
from lib.protocol import http1, httphead
from lib.tokenbucket import TokenBucket

log = logging.getLogger("shroud.exchange")

# Bytes a visitor may send after an upgrade request before the origin has answered it (RFC
# 6455 4.1: a client waits for the answer, so legitimately none); held, then forwarded on a 101
# or dropped. Past this the connection is aborted.
MAX_EARLY_BYTES = 65536


# Lines a peer can trigger here: ten at once, then one a second (lib/tokenbucket.py).
_dropped_log = TokenBucket(10, 1.0)


class ReplaySocket:
    """A connected socket whose next reads return ``head`` first; everything else delegates."""

    def __init__(self, sock, head: bytes):
        self._sock = sock
        self._head = bytes(head)
        # A socket's reads go through lib.net.sockets' scratch buffer: a recv(256 KiB) from the
        # splice would allocate (and map) 256 KiB per call, even for the EOF that ends it.
        self._read = reader(sock)
        # What lib.net.splice asks of each end it joins, read here once rather than through
        # __getattr__ (a Python call each, and gevent's family property builds an enum).
        self.family = getattr(sock, "family", None)
        self.tcp_tuned = getattr(sock, "tcp_tuned", False)
        self.settimeout = sock.settimeout

    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        if self._head:
            out, self._head = self._head[:bufsize], self._head[bufsize:]
            return out
        if flags:
            return self._sock.recv(bufsize, flags)
        return self._read(bufsize)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        if self._head:
            out = self.recv(nbytes or len(buffer))
            buffer[:len(out)] = out
            return len(out)
        return self._sock.recv_into(buffer, nbytes, flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class OneRequestSocket(ReplaySocket):
    """The front's connection, limited to its first request.

    The first request's head says ``Connection: close`` (a conforming origin closes after
    answering), its body is framed by :class:`lib.protocol.http1.RequestFramer` on the way in,
    and whatever follows it is dropped: the tunnel sees EOF there. ``keep_connection_header``
    leaves the head as it is (an upgrade request: ``Connection: upgrade`` must reach the
    origin); None: as the request's own Upgrade header says. ``request``: the head as already
    parsed (lib.protocol.httphead), if it was.

    :raises lib.protocol.httphead.HeadError: ``head`` does not start with a request head.
    :raises lib.protocol.http1.FramingError: a request the proxy does not frame (both
        Content-Length and Transfer-Encoding, ...): the caller aborts as on a malformed body.
    """

    dropped_requests = 0

    def __init__(self, sock, head: bytes, keep_connection_header: bool | None = False,
                 request: httphead.RequestHead | None = None):
        end = httphead.END_OF_HEAD_RE.search(head)
        first, rest = (head[:end.end()], head[end.end():]) if end else (head, b"")
        if request is None:
            request = httphead.parse_request_head(first)
        self._refused: http1.FramingError | None = None
        try:
            self._framer = framer = http1.RequestFramer(request)
        except http1.FramingError as e:
            self._refused = e  # raised by the first read: the splice aborts both ends
            framer = None
        if keep_connection_header is None:  # the request's own Upgrade header decides
            keep_connection_header = framer is not None and framer.upgrade
        self._upgrade = keep_connection_header
        if not keep_connection_header:
            first = http1.connection_close(first)
        super().__init__(sock, first + rest)
        self._head_left = len(first)  # replayed head bytes still to pass before the body
        self._ended = False
        # The request was whole when its head was taken (take_head): the visitor has sent all
        # it has for now, so the next read waits before it reads (no EAGAIN recv first).
        self._quiet = False
        self._reused = False

    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        if self._reused:
            return b""
        if self._refused is not None:
            raise ConnectionAbortedError(
                f"malformed request on a routed connection: {self._refused}")
        if self._quiet:  # inline: one frame fewer per connection
            # Wait until the socket is readable, on its own watcher (gevent's public wait: a
            # close from another greenlet still ends it with an error, as it ends a read), when
            # it has no timeout of its own (the splice's idle timer's ends: lib.net.splice);
            # else the read waits as usual, bounded by that timeout.
            self._quiet = False
            sock = self._sock
            watcher = read_watcher(sock)
            if watcher is not None and sock.gettimeout() is None:
                gevent.socket.wait(watcher)
        data = super().recv(bufsize, flags)
        if not data:
            return data
        if self._ended:
            return self._after_request(data)
        framer = self._framer
        start = 0
        if self._head_left:
            start = min(self._head_left, len(data))
            self._head_left -= start
            if self._head_left:
                return data
        try:
            end = start + framer.feed(data[start:] if start else data)
        except http1.FramingError as e:
            raise ConnectionAbortedError(f"malformed request on a routed connection: {e}") \
                from None
        if framer.done:
            self._ended = True
            if end < len(data):
                self._after_request(data[end:])
                data = data[:end]
        return data

    def take_head(self) -> bytes:
        """The request head as the first read would return it (with ``Connection: close``),
        taken now: the caller sends it itself (lib.proxy.routing sends it with StartProxy, one
        frame); reads go on after it. b"" when the first read would fail (a request this
        module does not frame): that read still raises."""
        left = self._head_left
        if self._refused is not None or not left:
            return b""
        # What recv(left) returns, without its steps: the head is all replayed bytes (no
        # flags, nothing read yet), and the framer is fed the nothing after it.
        head, self._head, self._head_left = self._head[:left], self._head[left:], 0
        self._ended = self._framer.done  # a request without a body ends with its head
        self._quiet = self._ended and not self._head  # request_whole, inline
        return head

    @property
    def request_whole(self) -> bool:
        """The request has ended and no byte of it is left to read: the next read can only
        find what the visitor sends after it (EOF, a second request, an upgrade's bytes)."""
        return self._ended and not self._head

    def _after_request(self, data: bytes) -> bytes:
        """Bytes that arrived after the request's end: look like EOF to the tunnel. The first
        request's answer still flows back, nothing more goes in; the origin's FIN then ends
        the connection (an origin that never closes is bounded by the idle timeout)."""
        if not self._reused:
            self._reused = True
            self.dropped_requests += 1
            if _dropped_log.take():
                log.info("a second request on a routed connection was dropped")
        return b""

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        out = self.recv(nbytes or len(buffer), flags)
        buffer[:len(out)] = out
        return len(out)

class OneExchangeSocket(OneRequestSocket):
    """One request in, one response out (:class:`lib.protocol.http1.ResponseFramer`); raw both
    ways only once the origin has answered an upgrade request with ``101``.

    While an upgrade request waits for its answer, reads wait too (up to the socket's timeout,
    as a read would): whether what the visitor sends next is WebSocket frames for the origin or
    another visitor's request depends on that answer.
    """

    dropped_response_bytes = 0

    def __init__(self, sock, head: bytes, request: httphead.RequestHead | None = None):
        if request is None:
            request = httphead.parse_request_head(httphead.END_OF_HEAD_RE.split(head, 1)[0])
        # An upgrade request keeps its Connection header (the RequestFramer saw Upgrade).
        super().__init__(sock, head, keep_connection_header=None, request=request)
        self._response = http1.ResponseFramer(request.method, upgrade=self._upgrade)
        # One send() per small write (lib.net.sockets.send_all), made at its first use: the
        # copy loop's sendall only, which an answer the sink sends whole never calls.
        self._send = None
        # The final answer (or the 101) went out. Only an upgrade request's reads wait for
        # it: the Event is made for those alone, a flag does for the rest (one object fewer
        # per fresh connection: bench/README.md, "Fresh connections: the exchange's objects").
        self._answered = False
        self._answer_waiter = gevent.event.Event() if self._upgrade else None
        # The origin's next bytes the framer already read as the body (or raw, switched) and
        # direct delivery did not send yet: they go out as they are when they come again.
        self._credit = 0
        self._owed = b""  # the rest of a head direct delivery sent only part of
        self._skip = 0  # bytes of that head left with the stream (to wake the copy loop)
        self._failed: OSError | None = None  # met by direct delivery; raised by sendall
        self._early = bytearray()

    @property
    def switched(self) -> bool:
        return self._response.state == http1.SWITCHED

    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        if self._ended and self._upgrade:
            if not self._answer_waiter.wait(self._sock.gettimeout()):
                raise TimeoutError("timed out waiting for the origin's answer to an upgrade")
            if self.switched:
                if self._early:
                    out, self._early = bytes(self._early[:bufsize]), self._early[bufsize:]
                    return out
                return ReplaySocket.recv(self, bufsize, flags)
        return super().recv(bufsize, flags)

    def _after_request(self, data: bytes) -> bytes:
        if self._upgrade and not self._answered:
            # Sent before the origin answered the upgrade (only this read's tail can be:
            # recv waits for the answer before reading more).
            self._early += data
            if len(self._early) > MAX_EARLY_BYTES:
                raise ConnectionAbortedError("too many bytes before the upgrade's answer")
            return b""
        if self.switched:
            return data
        return super()._after_request(data)

    def sendall(self, data, flags: int = 0) -> None:
        if self._failed is not None:  # met by direct delivery in these bytes
            error, self._failed = self._failed, None
            raise error
        if self._skip or self._owed:  # direct delivery's head, not all sent
            data = memoryview(data)[self._skip:]
            self._skip, owed, self._owed = 0, self._owed, b""
            self._send_out(owed, flags)
        credit = self._credit
        if credit:  # the body's bytes the framer read already (direct delivery's, not sent)
            if credit >= len(data):
                self._credit = credit - len(data)
                self._send_out(data, flags)
                self._answer_sent()
                return
            self._credit = 0
            self._send_out(memoryview(data)[:credit], flags)
            data = data[credit:]
        framer = self._response
        try:
            out = framer.feed(bytes(data))
        except http1.FramingError as e:
            self._set_answered()
            raise ConnectionAbortedError(f"origin's response: {e}") from None
        if out:
            self._send_out(out, flags)
        self._answer_sent()
        if framer.dropped and not self.dropped_response_bytes:
            if _dropped_log.take():
                log.info("an origin sent bytes after its response on a routed connection; "
                         "dropped")
        self.dropped_response_bytes = framer.dropped

    def _send_out(self, out, flags: int) -> None:
        if flags:
            self._sock.sendall(out, flags)
        else:
            send = self._send
            if send is None:
                send = self._send = sender(self._sock)
            send(out)

    def _answer_sent(self) -> None:
        """Once the final answer (or the 101) is all out: reads waiting for it go on, and after
        a final answer the visitor gets our FIN."""
        state = self._response.state
        if (state == http1.DONE or state == http1.SWITCHED) and not self._credit \
                and not self._owed and not self._answered:
            self._answered = True  # _set_answered, inline: counted on the answer's path
            if self._answer_waiter is not None:
                self._answer_waiter.set()
            if state == http1.DONE:
                # The front reads Connection: close and the end: it will not reuse this.
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _set_answered(self) -> None:
        """The final answer (or the 101) went out, or none will: an upgrade's waiting read
        goes on."""
        self._answered = True
        waiter = self._answer_waiter
        if waiter is not None:
            waiter.set()

    # --- direct delivery (lib.net.splice's sink; lib.net.muxsession, "Direct delivery") ----

    def direct_senders(self):
        """(sendall, send_now, sendmsg_now) for lib.net.splice's sink, which sends the stream's
        bytes from the session's reader without waking the splice's copy loop (module doc,
        "Direct delivery"). None when the visitor's end is not a gevent socket."""
        sock = self._sock
        if not isinstance(sock, gevent.socket.socket):
            return None
        # One send() never waiting, made at its first use (_now_sender): an answer whose head
        # and body come in one read goes in one sendmsg and never needs it.
        self._now = None
        self._many_now = nowait_sendmsg(sock)
        return self.sendall, self._send_now, self._many_now and self._sendmsg_now

    def _now_sender(self):
        """The visitor socket's one-send offer (lib.net.sockets.nowait_sender), kept."""
        now = self._now = nowait_sender(self._sock)
        return now

    def _send_now(self, data) -> int:
        """How many of ``data`` (the origin's next bytes) went to the visitor now, never
        waiting (the sink's offer). BlockingIOError when none did, or when ``data`` is for
        ``sendall`` (bytes after the response, a malformed head, what is owed first)."""
        if self._owed or self._skip or self._failed is not None:
            raise BlockingIOError  # sendall's, in the copy loop
        credit = self._credit
        if not credit:
            if self._response.state == http1.HEAD:
                return self._head_now((data,))
            credit = self._credit = self._body_part((data,))
        now = self._now or self._now_sender()
        return self._sent(now(data if credit >= len(data) else memoryview(data)[:credit]))

    def _sendmsg_now(self, chunks) -> int:
        """``_send_now`` for a read's frames, in one sendmsg."""
        if self._owed or self._skip or self._failed is not None:
            raise BlockingIOError
        if not self._credit:
            if self._response.state == http1.HEAD:
                return self._head_now(chunks)
            self._credit = self._body_part(chunks)
        return self._sent(self._many_now(_first(chunks, self._credit)))

    def _head_now(self, chunks) -> int:
        """The response's heads (rewritten) and the body behind them, from the sink: how many
        of ``chunks``' bytes were taken. A head the socket took only part of is owed: the
        copy loop sends the rest before anything else (``sendall``), woken by what is left
        with the stream (one byte of the head, ``_skip``, when nothing else is)."""
        framer = self._response
        taken, heads, rest = 0, b"", []
        try:
            for i, chunk in enumerate(chunks):
                out, n = framer.head_part(chunk)
                heads += out
                taken += n
                if framer.state != http1.HEAD:
                    # bytes, not a view: the framer's chunked-body search (bytes.find) takes
                    # no memoryview, and a chunk-size line behind the head in one frame raised
                    # AttributeError in the session's reader (a copy of one frame's rest, once
                    # per response).
                    rest = [chunk[n:]] if n < len(chunk) else []
                    rest += islice(chunks, i + 1, None)
                    break
            body = self._body_part(rest) if rest and framer.state != http1.DONE else 0
        except (http1.FramingError, ConnectionAbortedError) as e:
            # Raised by the copy loop's sendall, which sends the 502 when nothing went out.
            self._failed = e if isinstance(e, OSError) else \
                ConnectionAbortedError(f"origin's response: {e}")
            self._set_answered()
            raise BlockingIOError from None
        except BlockingIOError:
            body = 0  # nothing of the body in these bytes
        if not heads:
            return taken  # an incomplete head, held by the framer
        self._credit = body
        if body:  # (a body that is all of one chunk's rest, the usual answer, needs no cut)
            out = [heads] + (rest if len(rest) == 1 and len(rest[0]) == body
                             else _first(rest, body))
        else:
            out = [heads]
        try:
            k = self._many_now(out[:IOV_MAX]) if self._many_now else \
                (self._now or self._now_sender())(b"".join(out))
        except BlockingIOError:
            k = 0
        if k < len(heads):
            self._owed = heads[k:]
            if taken < sum(map(len, chunks)):
                return taken  # the copy loop is woken for the rest
            self._skip = 1
            return taken - 1
        return taken + self._sent(k - len(heads))

    def _body_part(self, chunks) -> int:
        """How many of ``chunks``' bytes (the origin's next) are the response's body (or raw,
        switched), read by the framer now; BlockingIOError when none is (the response over)."""
        framer = self._response
        if framer.state != http1.BODY:
            if framer.state == http1.SWITCHED:
                return sum(map(len, chunks))
            raise BlockingIOError  # sendall's, in the copy loop
        n = 0
        try:
            for chunk in chunks:
                k = framer.body_part(chunk)
                n += k
                if k < len(chunk):
                    break
        except http1.FramingError as e:
            self._set_answered()
            raise ConnectionAbortedError(f"origin's response: {e}") from None
        if not n:
            raise BlockingIOError  # the response ended with the bytes before
        return n

    def _sent(self, k: int) -> int:
        """``k`` judged bytes went out: what is left of them is credit for the next send."""
        self._credit -= k
        if not self._credit and self._response.state != http1.BODY:
            self._answer_sent()
        return k

    def send(self, data, flags: int = 0) -> int:
        self.sendall(data, flags)
        return len(data)

    def shutdown(self, how: int) -> None:
        # The origin ended (the splice carries its FIN here): no answer is coming, so a read
        # waiting for one goes on as for any request (EOF to the tunnel after it).
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._set_answered()
            if how == socket.SHUT_WR and self._response.state == http1.DONE \
                    and not self._credit and not self._owed:
                return  # sendall shut it down after the answer: a second one only fails
        self._sock.shutdown(how)

    def close(self) -> None:
        self._set_answered()
        self._sock.close()


def _first(chunks, n: int) -> list:
    """The first ``n`` bytes of ``chunks`` (buffers), as buffers: the last one cut (a view)."""
    out = []
    for chunk in chunks:
        if len(chunk) >= n:
            out.append(chunk if len(chunk) == n else memoryview(chunk)[:n])
            return out
        out.append(chunk)
        n -= len(chunk)
    return out
