"""A muxado v1 session over any socket-like transport, in blocking greenlet style.

Public API::

    session = Session(transport, client=True, config=MuxConfig())
    stream = session.open()                 # a new stream (SYN sent; no round trip)
    stream = session.accept(timeout=None)   # the next stream the peer opened
    session.goaway(code)                    # no new streams from the peer; existing ones go on
    session.close()                         # GOAWAY, transport closed, every stream failed
    end = session.wait(timeout=None)        # blocks until the session ends -> SessionEnd
    session.closed, session.stats, session.heartbeat_rtt, session.refused_streams

    stream.recv(n) -> bytes ('' at EOF)     stream.sendall(data)     stream.send(data) -> int
    stream.shutdown(socket.SHUT_WR)         # half-close: DATA+FIN, reading goes on
    stream.close()                          # full close, as Go's Stream.Close()
    stream.reset(code)                      # RST
    stream.settimeout(seconds | None)

Greenlets per session: one reader (transport -> MuxConnection -> streams), one writer (drains
MuxConnection's output to the transport, so a reader never blocks on a write and two peers
writing at once cannot deadlock), one heartbeat. Streams cost no greenlet.

This module uses gevent primitives and never monkey-patches; the transport must be a gevent
(or gevent-patched) socket.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import deque
from dataclasses import dataclass

import gevent
from gevent.event import Event

from lib.errors import (ErrorCode, MuxError, ProtocolError, SessionClosed, StreamClosed,
                        StreamReset, StreamTimeout, code_name)
from lib.protocol import muxstate as mp
from lib.protocol.muxstate import MuxConfig
from lib.net.sockets import set_nodelay

__all__ = ["Session", "Stream", "MuxConfig", "SessionEnd"]

log = logging.getLogger("shroud.mux")

# One TLS record is 16 KiB; reading up to 256 KiB lets a plain TCP transport hand over many
# frames per call, which is what makes the Python side fast.
READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class SessionEnd:
    code: int
    reason: str
    remote: bool

    def __str__(self) -> str:
        who = "peer" if self.remote else "local"
        return f"{self.reason} ({code_name(self.code)}, {who})"


class SessionStats:
    __slots__ = ("bytes_in", "bytes_out", "streams_opened", "streams_accepted",
                 "started")

    def __init__(self) -> None:
        self.bytes_in = self.bytes_out = 0
        self.streams_opened = self.streams_accepted = 0
        self.started = time.time()


class Stream:
    """One multiplexed stream, used like a connected socket."""

    __slots__ = ("session", "id", "_chunks", "_buffered", "_eof", "_error", "_waiter",
                 "_write_closed", "_read_closed", "_closed", "_timeout", "bytes_in",
                 "bytes_out", "__weakref__")

    def __init__(self, session: "Session", sid: int):
        self.session = session
        self.id = sid
        self._chunks: deque | None = None  # created on first data: idle streams stay small
        self._buffered = 0
        self._eof = False
        self._error: MuxError | None = None
        self._waiter: Event | None = None
        self._write_closed = False
        self._read_closed = False
        self._closed = False
        self._timeout: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<Stream {self.id} of {self.session.name}>"

    # --- socket-like surface --------------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def recv(self, bufsize: int = 65536) -> bytes:
        deadline = self._deadline()
        while True:
            if self._chunks:
                return self._take(bufsize)
            if self._eof or self._read_closed:
                return b""
            if self._error is not None:
                raise self._error
            self._wait(deadline, "recv")

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        data = self.recv(nbytes or len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _take(self, bufsize: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        if len(first) <= bufsize:
            chunks.popleft()
            if chunks and len(first) + len(chunks[0]) <= bufsize:
                # Join whole chunks up to bufsize (the peer sends 16 KiB frames or smaller).
                parts = [first]
                size = len(first)
                while chunks and size + len(chunks[0]) <= bufsize:
                    part = chunks.popleft()
                    parts.append(part)
                    size += len(part)
                data = b"".join(parts)
            else:
                data = first
        else:
            data = first[:bufsize]
            chunks[0] = first[bufsize:]
        n = len(data)
        self._buffered -= n
        self.session._consumed(self, n)
        return data

    def sendall(self, data) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        deadline = self._deadline()
        while view:
            n = self._send_some(view, deadline)
            view = view[n:]

    def send(self, data) -> int:
        view = memoryview(data)
        if not view:
            return 0
        return self._send_some(view, self._deadline())

    def _send_some(self, view: memoryview, deadline: float | None) -> int:
        session = self.session
        while True:
            if self._write_closed or self._closed:
                raise StreamClosed(f"stream {self.id} is closed for writing")
            if self._error is not None:
                raise self._error
            if session._end is not None:
                raise session._closed_error()
            conn = session._conn
            if conn.outgoing_size >= conn.config.write_high_water:
                session._wait_drained(deadline, self)
                continue
            window = conn.send_window(self.id)
            if window < len(view) and window < mp.SEND_THRESHOLD:
                # Less than a frame's worth of window: wait for more instead of sending a
                # sliver (WindowOpened fires once a full frame fits).
                self._wait(deadline, "send (peer window is closed)")
                continue
            n = conn.send_data(self.id, view)
            if n:
                self.bytes_out += n
                session.stats.bytes_out += n
                session._wake_writer()
                return n
            self._wait(deadline, "send (peer window is closed)")

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._read_closed = True
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._write_closed:
            self._write_closed = True
            if self._error is None and self.session._end is None:
                self.session._conn.end_stream(self.id)
                self.session._wake_writer()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = self._write_closed = self._read_closed = True
        session = self.session
        if self._error is None and session._end is None:
            session._conn.forget_stream(self.id)
            session._wake_writer()
        session._streams.pop(self.id, None)
        self._chunks = None
        self._wake()

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        if self._error is None and self.session._end is None:
            self.session._conn.reset_stream(self.id, code)
            self.session._wake_writer()
        self._fail(StreamReset(f"stream {self.id} reset locally", code))
        self.session._streams.pop(self.id, None)

    def fileno(self) -> int:
        return -1

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- internals ------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _wait(self, deadline: float | None, what: str) -> None:
        if self._waiter is None:
            self._waiter = Event()
        waiter = self._waiter
        waiter.clear()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not waiter.wait(timeout):
            raise StreamTimeout(f"stream {self.id}: {what} timed out")

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()

    def _deliver(self, data: bytes) -> None:
        if self._closed or self._read_closed:
            # Nobody will read: give the window back so the peer is not stalled.
            self.session._consumed(self, len(data))
            return
        if self._chunks is None:
            self._chunks = deque()
        self._chunks.append(data)
        self._buffered += len(data)
        self.bytes_in += len(data)
        self._wake()

    def _fail(self, error: MuxError) -> None:
        if self._error is None:
            self._error = error
        self._wake()


class Session:
    """A muxado v1 session. ``client=True`` for the dialling side (odd stream ids)."""

    def __init__(self, transport, client: bool, config: MuxConfig | None = None,
                 name: str | None = None):
        self.config = config or MuxConfig()
        self.client = client
        self.name = name or ("client" if client else "server")
        self._transport = transport
        set_nodelay(transport)  # not TCP (socketpair, WebSocket): left alone
        self._conn = mp.MuxConnection(client, self.config)
        self._streams: dict[int, Stream] = {}
        self._backlog: deque[Stream] = deque()
        self._accept_waiter = Event()
        self._writer_wake = Event()
        self._drained = Event()
        self._drained.set()
        self._done = Event()
        self._end: SessionEnd | None = None
        self.stats = SessionStats()
        self.heartbeat_rtt: float | None = None
        self._last_echo = time.monotonic()
        self._last_heard = self._last_echo  # any bytes from the peer
        self._ping_sent: float | None = None
        self._peer_goaway: int | None = None
        self._reader = gevent.spawn(self._read_loop)
        self._writer = gevent.spawn(self._write_loop)
        self._heartbeat = (gevent.spawn(self._heartbeat_loop) if self.config.heartbeat else None)
        self._wake_writer()

    def __repr__(self) -> str:
        return f"<Session {self.name} streams={len(self._streams)} end={self._end}>"

    # --- public -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._end is not None

    @property
    def end(self) -> SessionEnd | None:
        return self._end

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def refused_streams(self) -> int:
        """Streams the peer opened that we refused (limits, backlog, after GOAWAY)."""
        return self._conn.refused_streams

    def open(self) -> Stream:
        if self._end is not None:
            raise self._closed_error()
        try:
            sid = self._conn.open_stream()
        except ProtocolError as e:
            raise SessionClosed(f"cannot open a stream: {e.args[0]}", e.code) from None
        stream = self._streams[sid] = Stream(self, sid)
        self.stats.streams_opened += 1
        self._wake_writer()
        return stream

    def accept(self, timeout: float | None = None) -> Stream:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._backlog:
                stream = self._backlog.popleft()
                self._conn.stream_accepted(stream.id)
                self.stats.streams_accepted += 1
                return stream
            if self._end is not None:
                raise self._closed_error()
            self._accept_waiter.clear()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._accept_waiter.wait(left):
                raise StreamTimeout("accept timed out")

    def goaway(self, code: int = ErrorCode.NO_ERROR) -> None:
        if self._end is None:
            self._conn.goaway(code)
            self._wake_writer()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closed locally") -> None:
        """GOAWAY(code), flush briefly, close the transport, fail every stream."""
        if self._end is not None:
            return
        self._conn.terminate(code, reason)
        self._finish(SessionEnd(code, reason, remote=False), flush=True)

    def wait(self, timeout: float | None = None) -> SessionEnd | None:
        self._done.wait(timeout)
        return self._end

    # --- internals ----------------------------------------------------------------------

    def _closed_error(self) -> SessionClosed:
        end = self._end
        if end is None:
            return SessionClosed("session closed")
        return SessionClosed(f"session ended: {end.reason}", end.code)

    def _wake_writer(self) -> None:
        if self._conn.outgoing_size:
            self._drained.clear()
            self._writer_wake.set()

    def _wait_drained(self, deadline: float | None, stream: Stream) -> None:
        if self._conn.outgoing_size:
            self._drained.clear()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._drained.wait(timeout):
            raise StreamTimeout(f"stream {stream.id}: send timed out (transport is slow)")

    def _consumed(self, stream: Stream, n: int) -> None:
        if self._end is None:
            self._conn.acknowledge(stream.id, n)
            self._wake_writer()

    def _write_loop(self) -> None:
        conn = self._conn
        wake = self._writer_wake
        try:
            while True:
                wake.wait()
                wake.clear()
                data = conn.data_to_send()
                while data:
                    self._transport.sendall(data)
                    data = conn.data_to_send()
                self._drained.set()
                if self._end is not None:
                    return
        except (OSError, ValueError) as e:
            self._finish(SessionEnd(ErrorCode.INTERNAL_ERROR, f"transport write failed: {e}",
                                    remote=True))
        except gevent.GreenletExit:
            pass

    def _read_loop(self) -> None:
        conn = self._conn
        recv = self._transport.recv
        try:
            while self._end is None:
                data = recv(READ_SIZE)
                self._last_heard = time.monotonic()
                if not data:
                    ga = self._peer_goaway
                    if ga is not None:
                        end = SessionEnd(ga, "peer sent GOAWAY and closed", remote=True)
                    else:
                        end = SessionEnd(ErrorCode.NO_ERROR, "transport closed by peer",
                                         remote=True)
                    self._finish(end)
                    return
                events = conn.receive_data(data)
                if events:
                    self._dispatch(events)
                if conn.outgoing_size:
                    self._wake_writer()
                    # A peer flooding us with frames that need answers waits for our writer.
                    if conn.outgoing_size > 4 * self.config.write_high_water:
                        self._drained.wait(self.config.heartbeat_interval + self.config.heartbeat_tolerance)
        except (OSError, ValueError) as e:
            self._finish(SessionEnd(ErrorCode.INTERNAL_ERROR, f"transport read failed: {e}",
                                    remote=True))
        except gevent.GreenletExit:
            pass

    def _dispatch(self, events: list) -> None:
        streams = self._streams
        for ev in events:
            t = type(ev)
            if t is mp.DataReceived:
                st = streams.get(ev.stream_id)
                self.stats.bytes_in += len(ev.data)
                if st is None:
                    self._conn.acknowledge(ev.stream_id, len(ev.data))
                    continue
                st._deliver(ev.data)
                if ev.fin:
                    st._eof = True
                    st._wake()
            elif t is mp.WindowOpened:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._wake()
            elif t is mp.StreamOpened:
                st = streams[ev.stream_id] = Stream(self, ev.stream_id)
                self._backlog.append(st)
                self._accept_waiter.set()
            elif t is mp.StreamEnded:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._eof = True
                    st._wake()
            elif t is mp.StreamReset:
                st = streams.pop(ev.stream_id, None)
                if st is not None:
                    who = "by peer" if ev.remote else "after a protocol error"
                    st._fail(StreamReset(f"stream {ev.stream_id} reset {who}", ev.code))
            elif t is mp.HeartbeatEchoed:
                now = time.monotonic()
                self._last_echo = now
                if self._ping_sent is not None:
                    self.heartbeat_rtt = now - self._ping_sent
                    self._ping_sent = None
            elif t is mp.GoAwayReceived:
                self._peer_goaway = ev.code
                log.info("session %s: peer GOAWAY last=%d code=%s", self.name,
                         ev.last_stream_id, code_name(ev.code))
                for sid in ev.refused:
                    st = streams.pop(sid, None)
                    if st is not None:
                        st._fail(StreamReset(f"stream {sid} refused by peer GOAWAY",
                                             ErrorCode.REFUSED_STREAM))
                self._accept_waiter.set()
            elif t is mp.ConnectionTerminated:
                log.warning("session %s: protocol error, GOAWAY %s: %s", self.name,
                            code_name(ev.code), ev.reason)
                self._finish(SessionEnd(ev.code, f"protocol error: {ev.reason}", remote=False),
                             flush=True)
                return

    def _heartbeat_loop(self) -> None:
        cfg = self.config
        try:
            while self._end is None:
                if self._conn.send_heartbeat():
                    if self._ping_sent is None:
                        self._ping_sent = time.monotonic()
                    self._wake_writer()
                gevent.sleep(cfg.heartbeat_interval)
                # Alive = an echo, or any bytes at all: on a slow path the echo can wait
                # behind megabytes of data, and a busy tunnel must not be killed for that.
                silent = time.monotonic() - max(self._last_echo, self._last_heard)
                if silent > cfg.heartbeat_interval + cfg.heartbeat_tolerance:
                    log.warning("session %s: no heartbeat echo for %.1f s", self.name, silent)
                    self._conn.terminate(ErrorCode.NO_ERROR, "heartbeat timeout")
                    self._finish(SessionEnd(ErrorCode.NO_ERROR,
                                            f"heartbeat timeout ({silent:.1f} s without echo)",
                                            remote=False), flush=True)
                    return
        except gevent.GreenletExit:
            pass

    def _finish(self, end: SessionEnd, flush: bool = False) -> None:
        if self._end is not None:
            return
        self._end = end
        if flush:
            # Give the GOAWAY a moment to leave; a dead transport must not hold us up.
            data = self._conn.data_to_send()
            if data:
                try:
                    with gevent.Timeout(1.0):
                        self._transport.sendall(data)
                except (OSError, ValueError, gevent.Timeout, AssertionError):
                    # AssertionError: gevent's ConcurrentObjectUseError, when the writer
                    # greenlet is itself blocked sending on a plain socket. We are closing
                    # anyway; the GOAWAY is best effort.
                    pass
        try:
            self._transport.close()
        except OSError:
            pass
        err = self._closed_error()
        for st in list(self._streams.values()):
            if not st._eof:
                st._fail(err)
            else:
                st._wake()
        self._streams.clear()
        self._accept_waiter.set()
        self._drained.set()
        self._writer_wake.set()
        current = gevent.getcurrent()
        for g in (self._reader, self._writer, self._heartbeat):
            if g is not None and g is not current:
                g.kill(block=False)
        self._done.set()

