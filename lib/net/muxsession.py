"""A muxado v1 session over any socket-like transport, in blocking greenlet style.

Public API::

    session = Session(transport, client=True, config=MuxConfig(), trusted=True, log_limiter=None,
                      log_key=None)
    session.trust()                         # the peer is vouched for (the proxy: after Auth)
    stream = session.open()                 # a new stream (SYN sent; no round trip)
    stream = session.accept(timeout=None)   # the next stream the peer opened
    end = session.serve(handler)            # or: handler(stream) for each, from the reader,
                                            # until the session ends -> SessionEnd
    session.goaway(code)                    # no new streams from the peer; existing ones go on
    session.close()                         # GOAWAY, transport closed, every stream failed
    end = session.wait(timeout=None)        # blocks until the session ends -> SessionEnd
    session.closed, session.stats, session.heartbeat_rtt, session.refused_streams, session.answers
    # read-only, for tests and operators (never read on the hot path):
    session.unsent_size                     # output bytes queued or handed out, not yet written
    session.frames_received                 # frames decoded so far (a counter)
    session.sends_waiting                   # streams whose send waits for the peer's window
    session.buffered_in                     # bytes received on its streams, not read yet
    session.greenlets                       # SessionGreenlets(reader, writer, watchdog)
    session.persisted_sends                 # sends the persist timer made (Sending)
    session.sends_held                      # sends keeping a window's rest for a grant (Sending)
    session.reads_in_hub                    # the transport is read by hub callbacks (Reading)
    # log_limiter: a lib.peerlog.PeerLog (shared by the caller's sessions; else one per session)

    stream.recv(n) -> bytes ('' at EOF)     stream.sendall(data)     stream.send(data) -> int
    # with a timeout: send returns what was queued before it (raises if nothing was); sendall
    # raises StreamTimeout whose .sent is the bytes it queued (they reach the peer)
    stream.send_nowait(data) -> int         # what fits now, never waiting (0: send would wait)
    stream.shutdown(socket.SHUT_WR)         # half-close: DATA+FIN, reading goes on
    stream.close()                          # full close, as Go's Stream.Close()
    stream.reset(code)                      # RST
    stream.settimeout(seconds | None)        stream.receive_window    stream.send_window
    stream.buffered                         # bytes received, not yet read (recv will not wait)
    stream.buffered_chunks                  # the objects they are held in (tests: SMALL_CHUNK)
    stream.waiting_for_window               # a send's bytes are left with the reader (Sending)
    stream.waiting_for_room                 # ...with the writer, for output room (Sending)
    stream.set_sink(sink | None)            # direct delivery (below); lib.net.splice sets it
    stream.set_waker(waker | None)          # waker.set() where a waiting reader would be woken
    stream.recv_nowait(n) -> bytes          # recv that never waits (BlockingIOError: nothing yet)
    stream.readable                         # recv would not wait (bytes, EOF or an error)

Greenlets per session: one writer (drains MuxConnection's output to the transport, so the
reader never blocks on a write and two peers writing at once cannot deadlock), one watchdog
(heartbeat, stalled output), and a reader greenlet (transport -> MuxConnection -> streams) only
for a transport that cannot be read without waiting (below). Streams cost no greenlet.

Reading: a transport that can be read without waiting (a plain gevent socket, or a
TLSTransport over one: ``reads_nowait``), with no timeout of its own, is read by hub callbacks,
not by a greenlet: an io watcher's callback reads what is there (``read_nowait``: one system
call, the records decrypted), decodes it and dispatches the events inline, so a read wakes no
greenlet (before: a switch into the reader greenlet, gevent's wait on the socket and a switch
back, per read in each process: bench/README.md, "Keep-alive per request: the tunnel read
from the hub"). It never loops: a dense read (past YIELD_FRAMES frames) is decoded a piece per callback
scheduled with ``loop.run_callback``, the watcher stopped meanwhile (the decoder holds the
read), and after a read that filled READ_SIZE (more may be in the transport already:
TLSTransport.read_buffered) the next read is such a callback too; so a flooding peer gets one
bounded piece of work per turn, as everyone else. Everything it calls must not wait: streams
are woken by Events, serve()'s handler starts its work elsewhere, and an end that has a GOAWAY
to flush (a protocol error) hands the flush and the rest of the end to a greenlet
(``greenlets.reader`` from then on). Any other transport (WebSocket, a TLSTransport over a mux
stream) keeps the reader greenlet, which yields after every read.

Writing: what streams queue is written by one hub callback per loop turn (``_flush``, scheduled
with ``loop.run_callback`` by the first write of the turn), when the transport can write
without waiting (``TLSTransport.write_nowait``): it runs after every greenlet made ready in that
turn, so the frames of many streams still leave as one TLS record and one ``send()``, and no
greenlet is woken for it (bench/README.md, "Third pass: fewer wake-ups per request"). What the
kernel does not take at once, and everything on other transports, is the writer greenlet's,
which waits for the socket; output keeps its order (a write under way or a tail left in the
transport sends the callback's work to the writer).

Sending: a ``sendall`` (or ``send``) that finds less than a frame's worth of the peer's window,
or the session's output at its bound (``write_high_water``), leaves the rest of its buffer with
the stream and sleeps (it is *parked*); the session's reader, on the grant that opens the window
(WindowOpened), and the writer, once the output has drained below half the bound, queue from it
what the window and the output room take, and wake the sender only once all of it is queued, or
when the stream closed or failed. Go's muxado acknowledges every read, so its grants come a frame
at a time: the sender is woken once per buffer instead of once per 16 KiB frame (bench/README.md,
"Bulk: the sender"); and of many streams at the output bound none is woken each time the output
drains only to find it full again: they are fed in turn (bench/README.md, "Python -> Go: the
sender"). A send cut by the window or the room takes whole frames (``_sendable``): Go's 8 KiB
grants opened 16,384-byte windows, which went out as a full frame and a 1-byte one. The
window's rest, under a frame, waits for the next grant; a peer may grant nothing until it has
that rest (it grants only a whole window read, or waits for a message's tail), so a send held
so for a whole ``MuxConfig.send_persist`` with no grant is sent what the window allows (the
persist timer: ``Session._hold``; bench/README.md, "Whole frames and the Python peers against Go").

Direct delivery: a stream spliced to a socket (lib.net.splice) has a *sink*, an object with a
``busy`` flag (its own writer is sending what it took from the stream), ``offer(data) -> int``
(a non-blocking send: the bytes the socket took, 0 when it took none or failed; it never waits
and never raises) and ``offer_many(chunks) -> int`` (the same for a sequence of buffers: a
read's frames go out in one ``sendmsg``, not joined first). Data the reader decodes for such a
stream while its buffer is empty and the sink is not busy is collected and offered to the sink
at the end of the read, from the reader: no Event, no wake-up of the greenlet reading
the stream (bench/README.md, "Third pass: fewer wake-ups per request"). What the socket took
counts as read (the window is given back as ``recv`` would); what it did not take stays in the
buffer and the stream's reader is woken to send it, waiting for the socket as before, so a slow
socket still stops the window and bytes keep their order. EOF, resets and close take their usual
path; but a stream that fails (reset, the session's end) before its EOF while its sink is busy
calls the sink's ``stream_failed()``: its writer waits on the socket, not on the stream, and would
wait there for as long as the socket does not read (its bytes end in a reset anyway).

What a peer can make a session hold or do is bounded (docs/SECURITY.md, "Tunnel sessions"):

=============================================  ===============================================
peer does                                      we answer
=============================================  ===============================================
sends faster than we decode                    the reader yields after every read: other
                                               sessions and greenlets get their turn
provokes answers past the bucket, or frames    GOAWAY PROTOCOL_ERROR, closed, end.hostile
  past the cap before trust() (muxstate)
does not read: answers queued past their bound GOAWAY PROTOCOL_ERROR, closed, end.hostile
does not read: output makes no progress for    closed ("peer stopped reading"), end.hostile
  ``write_stall_timeout``
is silent past interval + tolerance            closed ("heartbeat timeout")
triggers log lines (GOAWAY, errors)            at most lib.peerlog.PeerLog's lines per key
                                               and minute
=============================================  ===============================================

This module uses gevent primitives and never monkey-patches; the transport must be a gevent
(or gevent-patched) socket.
"""
from __future__ import annotations

import errno
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import gevent
from gevent.event import Event

from lib.errors import (ErrorCode, MuxError, ProtocolError, SessionClosed, StreamClosed,
                        StreamReset, StreamTimeout, code_name)
from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp
from lib.protocol.muxstate import MuxConfig
from lib.net.sockets import nowait_reader, nowait_view_reader, reader, set_nodelay
from lib.net.tlstransport import RECORDS_PER_READ
from lib.peerlog import PeerLog
from lib.tokenbucket import TokenBucket

__all__ = ["Session", "Stream", "MuxConfig", "SessionEnd", "SessionGreenlets"]

log = logging.getLogger("shroud.mux")
# A reader's crash is a bug a peer may be able to reach again by reconnecting: its traceback is
# logged ten times at once, then once a minute, all sessions of the process together.
crash_log = TokenBucket(10, 1 / 60)
reader_crashes = 0  # every crash of a session's reader in this process, logged or not

# One TLS record is 16 KiB; reading up to 256 KiB lets a plain TCP transport hand over many
# frames per call, which is what makes the Python side fast.
READ_SIZE = 256 * 1024
# The writer hands the transport at most this much at a time, so that a peer that stops
# reading is seen as no progress (MuxConfig.write_stall_timeout) within 64 KiB.
WRITE_BATCH = 64 * 1024
# The reader yields after every YIELD_FRAMES frames of one read, about half a millisecond of
# decoding: a peer flooding tiny frames takes its turn like everyone else (8 such tunnels: a
# visitor's GET 0.36 s, against 1.1 s when a 16 KiB read of them was decoded at once), while
# bulk data (a frame per 16 KiB: 16 in a 256 KiB read) is decoded a whole read at once, in place
# (cutting reads into 4 KiB pieces cost a Python sink 0.3-0.5 s of CPU per GiB: bench/README.md,
# "Bulk and the multiplexer against Go").
YIELD_FRAMES = 256
# DATA under this many bytes is joined to a buffer's last chunk when that one is under it too
# (Stream._deliver): the receive window counts payload bytes, and a peer sending 2-byte frames
# made a stream that is not read hold 32,768 objects (1.4 MB for a 64 KiB window, 22x; ~6 GB
# for a tunnel's 4,096 visitors' streams); joined, a chunk costs ~50 bytes per 512 held
# (docs/SECURITY.md, "Tunnel sessions"). Bulk frames (16 KiB) are never copied for it.
SMALL_CHUNK = 512
# A full DATA frame's payload (muxado's 14-bit length): a send cut by the window or the output
# room takes whole ones (_sendable).
FRAME = mp.SEND_THRESHOLD
# Stream.shutdown's ``how``, looked up once (a shutdown per stream in each process).
_SHUT_READ = (socket.SHUT_RD, socket.SHUT_RDWR)
_SHUT_WRITE = (socket.SHUT_WR, socket.SHUT_RDWR)


@dataclass(frozen=True)
class SessionEnd:
    code: int
    reason: str
    remote: bool
    hostile: bool = False  # we closed it for provoking more than a bound allows

    def __str__(self) -> str:
        who = "peer" if self.remote else "local"
        return f"{self.reason} ({code_name(self.code)}, {who})"


class SessionGreenlets(NamedTuple):
    """A session's greenlets (module doc, "Greenlets per session"), for a caller that waits
    for them to end after close() (tests/support/rawtunnel.py) or watches one of them
    (tests/test_mux_flush.py counts switches into the writer). ``reader`` is None while a hub
    callback reads the transport (module doc, "Reading"), and the greenlet it handed the
    session's end to once there is one."""
    reader: gevent.Greenlet | None
    writer: gevent.Greenlet
    watchdog: gevent.Greenlet


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
                 "bytes_out", "_sink", "_to_sink", "_pending", "_room_queued", "_hold_state",
                 "_held_window", "__weakref__")

    def __init__(self, session: "Session", sid: int):
        # One assignment per value: a stream is made per fresh connection in each process
        # (bench/README.md, "Per-request cost (issue 16)", branch fmux).
        self.session = session
        self.id = sid
        # _chunks: created on first data (idle streams stay small); _error: MuxError;
        # _waiter: an Event or a waker (set_waker); _sink: direct delivery (module doc);
        # _pending: a send's memoryview waiting for window or room (_park).
        self._chunks = self._error = self._waiter = self._timeout = self._sink = \
            self._pending = None
        # _hold_state: in the session's held sends (Session._hold): 1 new, 2 aged;
        # _held_window: the window it was held with (Session._persist).
        self._buffered = self.bytes_in = self.bytes_out = self._hold_state = \
            self._held_window = 0
        # _to_sink: the buffer holds only this read's data, for the sink; _room_queued: in the
        # session's queue of sends waiting for output room.
        self._eof = self._write_closed = self._read_closed = self._closed = self._to_sink = \
            self._room_queued = False

    def __repr__(self) -> str:
        return f"<Stream {self.id} of {self.session.name}>"

    # --- socket-like surface --------------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        # ``flags``: a socket's signature (wrappers pass it on); a stream has no flags to take.
        if flags:
            raise ValueError(f"stream recv takes no flags, got {flags}")
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
        sent = 0
        try:
            while view:
                n = self._send_some(view, deadline)
                view = view[n:]
                sent += n
        except StreamTimeout as e:
            e.sent = sent  # queued before the timeout: they will reach the peer
            raise

    def send(self, data) -> int:
        view = memoryview(data)
        if not view:
            return 0
        return self._send_some(view, self._deadline())

    def send_nowait(self, data: bytes) -> int:
        """Queue what the peer's window and the session's output room take now, never
        waiting (a hub callback may call it: lib.net.splice); 0 where ``send`` would wait.
        Raises as ``send`` does on a closed or failed stream. Once per chunk a visitor sends:
        _check_writable and _wake_writer are inline (bench/README.md, "Per-request cost (issue
        16)", kapath pass)."""
        session = self.session
        if (self._write_closed or self._closed or self._error is not None
                or session._end is not None):
            self._check_writable()  # raises
        n = session._conn.offer_data(self.id, data)  # the window and the output room (its doc)
        if n:
            self.bytes_out += n
            session.stats.bytes_out += n
            if session._nowait is None:
                session._writer_wake.set()
            elif not session._flush_queued:  # _wake_writer: the output is not empty now
                session._flush_queued = True
                session._loop.run_callback(session._flush)
        return n

    def _check_writable(self) -> None:
        if self._write_closed or self._closed:
            raise StreamClosed(f"stream {self.id} is closed for writing")
        if self._error is not None:
            raise self._error
        if self.session._end is not None:
            raise self.session._closed_error()

    def _send_some(self, view: memoryview, deadline: float | None) -> int:
        session = self.session
        while True:
            self._check_writable()
            conn = session._conn
            window = conn.send_window(self.id)
            if window < len(view) and window < FRAME:
                # Less than a frame's worth of window: wait for more instead of sending a
                # sliver (WindowOpened fires once a full frame fits; the persist timer sends
                # what there is if no grant comes: Session._hold).
                if window:
                    session._hold(self, window)
                n = self._park(view, deadline, False)
            else:
                room = conn.config.write_high_water - conn.unsent_size
                if room > 0:
                    # Output stays under the high-water mark plus one frame
                    # (docs/OPERATIONS.md); whole frames when cut (_sendable).
                    n = conn.send_data(self.id, view[:_sendable(len(view), window, room)])
                    if n:
                        self.bytes_out += n
                        session.stats.bytes_out += n
                        session._wake_writer()
                        return n
                n = self._park(view, deadline, room <= 0)
            if n:
                return n

    def _park(self, view: memoryview, deadline: float | None, for_room: bool) -> int:
        """Wait for the peer's window (``for_room`` False) or the session's output room with
        ``view`` left with the session: the reader queues it as grants arrive, the writer as
        the output drains (``_send_pending``), and wakes us once all of it is queued: a peer
        granting a frame at a time (Go's muxado acknowledges every read) costs a wake-up per
        ``sendall`` piece, not per frame, and many streams at the output bound are not all
        woken each time it drains (module doc, "Sending"). The bytes queued meanwhile (0:
        woken for another reason, e.g. an error). A timeout after some were queued returns
        their count, as a socket's send does; with none, it raises."""
        self._pending = view
        if for_room:
            self.session._park_for_room(self)
        try:
            self._wait(deadline, "send (transport is slow)" if for_room
                       else "send (peer window is closed)")
        except StreamTimeout:
            if self._pending is view:  # nothing queued (_send_pending cuts a new view)
                raise
        finally:
            left = self._pending
            self._pending = None
            if self._room_queued:  # woken still queued for room (a timeout, an error): a
                self._room_queued = False  # later wait for window is not one for room
                try:
                    self.session._parked.remove(self)
                except ValueError:
                    pass  # emptied by the session's end
        return len(view) - len(left)

    def _send_pending(self, persist: bool = False) -> None:
        """The session's half of ``_park``, on WindowOpened (the reader) and as the output
        drains (the writer: ``Session._feed_parked``): queue what the window and the output
        room take, in whole frames when they cut it (``_sendable``), or (``persist``: the
        session's persist timer) all the window allows; wake the sender once all is queued, or
        when it must see to something itself (closed, failed); with no room left, stay parked
        for it."""
        session = self.session
        conn = session._conn
        if not self._write_closed and self._error is None and session._end is None:
            view = self._pending
            high = conn.config.write_high_water
            room = high - conn.unsent_size
            if room <= 0:
                session._park_for_room(self)  # fed again once the output drains
                return
            # 0 for a stream lib.protocol.muxstate forgot earlier in this read (a grant then a
            # reset in one read: its StreamReset is dispatched after this WindowOpened;
            # send_data raised and ended the session).
            window = conn.send_window(self.id)
            n = _sendable(len(view), window, room)
            if persist and not n:
                n = min(len(view), window)  # under a frame, no grant for a while: send it
            if n:
                conn.send_data(self.id, view[:n])
                self.bytes_out += n
                session.stats.bytes_out += n
                session._wake_writer()
                self._pending = view = view[n:]
                if view:
                    if conn.unsent_size >= high:
                        session._park_for_room(self)
                    elif window > n:  # the window's rest, under a frame: kept for a grant
                        session._hold(self, window - n)
                    return  # more as the next grants arrive
        self._wake()

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        if how in _SHUT_READ:
            self._read_closed = True
        if how in _SHUT_WRITE and not self._write_closed:
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
            conn = session._conn
            conn.forget_stream(self.id)
            if conn.outgoing_size:  # (_wake_writer's test: a FIN that left already, none)
                session._wake_writer()
        session._streams.pop(self.id, None)
        self._chunks = None
        if self._waiter is not None:  # _wake
            self._waiter.set()

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        if self._error is None and self.session._end is None:
            self.session._conn.reset_stream(self.id, code)
            self.session._wake_writer()
        self._fail(StreamReset(f"stream {self.id} reset locally", code))
        self.session._streams.pop(self.id, None)

    def set_sink(self, sink) -> None:
        """Deliver incoming data straight to ``sink`` while nobody waits to send (module doc,
        "Direct delivery"); None ends it. Set by the one greenlet that reads this stream."""
        self._sink = sink

    def set_waker(self, waker) -> None:
        """``waker.set()`` is called (from the session's reader, inline: it must not wait)
        wherever a greenlet waiting in ``recv`` or ``send`` would be woken: data the sink did not
        take, EOF, a reset, a grant, the session's end. A stream served by callbacks with no
        greenlet of its own (lib.net.splice, "Detached"); None puts waiting greenlets back. No
        ``recv`` or ``send`` may wait on the stream while a waker is set."""
        self._waiter = waker

    def recv_nowait(self, bufsize: int = 65536) -> bytes:
        """``recv`` that never waits: BlockingIOError when nothing is buffered and the stream
        is open (b"" at EOF; its error raised)."""
        if self._chunks:
            return self._take(bufsize)
        if self._eof or self._read_closed:
            return b""
        if self._error is not None:
            raise self._error
        raise BlockingIOError(errno.EAGAIN, "nothing received")

    def fileno(self) -> int:
        return -1

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read: a ``recv`` returns at once while this is not 0 (the
        client opens a stream's local connection from the reader when StartProxy is in:
        lib.client.tunnels)."""
        return self._buffered

    @property
    def readable(self) -> bool:
        """A ``recv`` would not wait: bytes buffered, EOF, or an error it raises (a waker's
        look, Stream.set_waker: one attribute test, no exception)."""
        return bool(self._chunks) or self._eof or self._read_closed or self._error is not None

    @property
    def buffered_chunks(self) -> int:
        """The objects ``buffered`` is held in (read-only, for tests): tiny frames are joined,
        so a peer's 2-byte frames do not make a window of them cost 22x its bytes
        (SMALL_CHUNK)."""
        return len(self._chunks) if self._chunks else 0

    @property
    def receive_window(self) -> int:
        """The window granted to the peer (64 KiB, more once grown: MuxConfig.grow_windows)."""
        return self.session._conn.receive_window(self.id)

    @property
    def send_window(self) -> int:
        """The window the peer granted us: bytes we may send before its next grant."""
        return self.session._conn.send_window(self.id)

    @property
    def waiting_for_window(self) -> bool:
        """A ``sendall``/``send`` is asleep with its bytes left with the session's reader,
        which queues them as the peer's grants arrive (module doc, "Sending"); False for one
        parked for output room (``waiting_for_room``)."""
        return self._pending is not None and not self._room_queued

    @property
    def waiting_for_room(self) -> bool:
        """A ``sendall``/``send`` is parked for the session's output room, its bytes queued by
        the writer as the output drains (module doc, "Sending")."""
        return self._pending is not None and self._room_queued

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
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = deque()
        n = len(data)
        self._buffered += n
        self.bytes_in += n
        if chunks:
            last = chunks[-1]
            if n < SMALL_CHUNK and len(last) < SMALL_CHUNK:
                # Tiny frames are joined (SMALL_CHUNK: a window of 2-byte frames held 22x its
                # size as objects).
                chunks[-1] = last + data
            else:
                chunks.append(data)
            # Behind bytes not yet read: no wake-up. A reader waiting was woken when the first
            # came (or _sink_flush wakes it for what the sink left), and none waits while any
            # are there (recv): one set() per read, not one per frame (bench/README.md, "Whole
            # frames and the Python peers against Go"). gevent's Event wakes every waiter
            # linked at set(), even if a parked sender cleared it meanwhile.
            return
        chunks.append(data)
        if self._to_sink:  # more of this read for the sink
            return
        sink = self._sink
        if sink is not None and not sink.busy:
            self._to_sink = True
            self.session._to_sink.append(self)  # offered at the end of the read (_sink_flush)
            return
        self._wake()

    def _sink_flush(self) -> None:
        """Offer what this read brought to the sink; what it does not take waits in the buffer
        for the stream's reader, woken now."""
        self._to_sink = False
        chunks, sink = self._chunks, self._sink
        if not chunks or sink is None or sink.busy or self._closed or self._read_closed:
            self._wake()  # taken meanwhile, or back to the usual path
            return
        if len(chunks) == 1:
            data = chunks[0]
            n = sink.offer(data)
            if n == len(data):
                chunks.clear()
            elif n:
                chunks[0] = data[n:]
        else:  # the read's frames in one sendmsg, not joined first (a copy of every byte)
            n = sink.offer_many(chunks)
            _drop_front(chunks, n)
        if chunks:
            self._wake()
        if n:
            self._buffered -= n
            session = self.session
            if session._end is None:  # _consumed, but the writer is woken by _flush_sinks
                session._conn.acknowledge(self.id, n)

    def _fail(self, error: MuxError) -> None:
        if self._error is None:
            self._error = error
            sink = self._sink
            # Its writer waits on a socket, not on us. After our EOF, what is buffered is all
            # there is: it goes out, then the EOF, as recv returns them before the error.
            if sink is not None and sink.busy and not self._eof:
                sink.stream_failed()
        self._wake()


def _sendable(size: int, window: int, room: int) -> int:
    """What a send of ``size`` bytes queues now, given the peer's ``window`` and the output
    ``room`` (> 0): nothing while the window holds less than ``size`` and less than a frame;
    else as much as both allow in whole frames (FRAME bytes; all of ``size`` when it fits):
    a 16,384-byte window (Go grants 8 KiB at a time) went out as a full frame and a 1-byte
    one. The room is rounded up to whole frames, headers counted, so the output stays under
    the high-water mark plus one frame."""
    if window < size:
        if window < FRAME:
            return 0
        size = window - window % FRAME
    if room < size:
        frames = -(-room // (FRAME + fr.HEADER_SIZE))
        if frames * FRAME < size:
            size = frames * FRAME
    return size


def _drop_front(chunks: deque, n: int) -> None:
    """Remove the first ``n`` bytes of ``chunks`` (a stream's buffer); only a chunk cut in two
    is copied (its rest, under a frame)."""
    while n:
        first = chunks[0]
        if len(first) > n:
            chunks[0] = first[n:]
            return
        chunks.popleft()
        n -= len(first)


class Session:
    """A muxado v1 session. ``client=True`` for the dialling side (odd stream ids)."""

    def __init__(self, transport, client: bool, config: MuxConfig | None = None,
                 name: str | None = None, trusted: bool = True,
                 log_limiter: PeerLog | None = None, log_key: str | None = None):
        self.config = config or MuxConfig()
        self.client = client
        self.name = name or ("client" if client else "server")
        self._transport = transport
        set_nodelay(transport)  # not TCP (socketpair, WebSocket): left alone
        self._conn = mp.MuxConnection(client, self.config, trusted=trusted)
        self._peer_log = log_limiter or PeerLog(logger=log)
        self._log_key = log_key or self.name
        self._streams: dict[int, Stream] = {}
        self._to_sink: list[Stream] = []  # streams with data for their sink (direct delivery)
        self._backlog: deque[Stream] = deque()
        self._accept_waiter = Event()
        self._on_stream = None  # serve()'s handler: new streams go to it, not to accept()
        self._writer_wake = Event()
        # The hub-callback flush (module doc, "Writing"), for a transport that can write
        # without waiting (a new one is idle: write_idle says whether it can at all, e.g. a
        # TLSTransport over a gevent socket); None: every write is the writer greenlet's.
        self._nowait = transport if getattr(transport, "write_idle", False) else None
        self._loop = gevent.get_hub().loop
        self._flush_queued = False
        self._writing = False  # the writer greenlet is writing: _flush leaves it the output
        self._tail = False  # the transport holds a tail of _flush's batch: the writer's
        # Sends parked at the output bound, their bytes left with the session (Stream._park):
        # fed in turn by the writer once the output is below half the mark (hysteresis: they
        # resume in bulk, not a frame at a time), none of them woken until all its bytes are
        # queued.
        self._parked: deque[Stream] = deque()
        # Sends waiting for window with some left under a frame (Stream._hold_state), and the
        # persist timer that sends it when no grant came (_hold); at most one entry a stream.
        self._held: list[Stream] = []
        self._persist_timer = None
        self.persisted_sends = 0  # sends the persist timer made (read-only: tests, operators)
        self._done = Event()
        self._end: SessionEnd | None = None
        self.stats = SessionStats()
        self.heartbeat_rtt: float | None = None
        self._last_echo = time.monotonic()
        self._last_heard = self._last_echo  # any bytes from the peer
        self._ping_sent: float | None = None
        self._last_progress = self._last_echo  # output written, or none waiting
        self._peer_goaway: int | None = None
        self._hub = gevent.get_hub()
        self._read_now = _nowait_read(transport)  # the hub reader's read, or None (Reading)
        self._watcher = None  # the hub reader's io watcher (readable)
        self._full = False  # the hub reader's last read filled READ_SIZE: more may be there
        if self._read_now is None:
            self._reader = gevent.spawn(self._read_loop)
        else:
            self._reader = None
            self._watcher = self._loop.io(transport.fileno(), 1)  # 1: readable
            # The first read from a callback: the handshake may have left records buffered.
            self._loop.run_callback(self._readable)
        self._writer = gevent.spawn(self._write_loop)
        self._heartbeat = gevent.spawn(self._watch_loop)
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
    def sends_waiting(self) -> int:
        """Streams whose send waits for the peer's window, its bytes left with the reader
        (Sending): a peer that stops granting shows here (not sends parked for output room).
        Counted when asked (status)."""
        return sum(1 for st in self._streams.values() if st.waiting_for_window)

    @property
    def sends_held(self) -> int:
        """Sends waiting for window with its rest (under a frame) kept back, watched by the
        persist timer (Sending): at most one entry per stream, so bounded by max_streams."""
        return len(self._held)

    @property
    def buffered_in(self) -> int:
        """Bytes the peer sent on our streams that nobody has read yet (each stream's
        ``buffered``; bounded by the windows, held in few objects: SMALL_CHUNK). Counted when
        asked (status)."""
        return sum(st._buffered for st in self._streams.values())

    @property
    def refused_streams(self) -> int:
        """Streams the peer opened that we refused (limits, backlog, after GOAWAY)."""
        return self._conn.refused_streams

    @property
    def answers(self) -> int:
        """Frames the peer provoked from us (RSTs, heartbeat echoes): see lib.protocol.muxstate."""
        return self._conn.answers

    @property
    def frames_received(self) -> int:
        """Frames decoded from the peer so far (a counter: lib.protocol.muxstate)."""
        return self._conn.frames_received

    @property
    def unsent_size(self) -> int:
        """Output bytes not yet written to the transport: queued frames plus the batch handed
        out (what ``MuxConfig.write_high_water`` bounds, give or take a frame)."""
        return self._conn.unsent_size

    @property
    def greenlets(self) -> SessionGreenlets:
        """The reader (None: read from the hub), writer and watchdog greenlets; they end once
        the session has."""
        return SessionGreenlets(self._reader, self._writer, self._heartbeat)

    @property
    def reads_in_hub(self) -> bool:
        """The transport is read by hub callbacks, not a greenlet (module doc, "Reading")."""
        return self._read_now is not None

    def trust(self) -> None:
        """The peer is vouched for (the proxy: its Auth was accepted): the larger answer
        bucket applies and the cap on frames before trust is lifted."""
        self._conn.trust()

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
            stream = self._next_accepted()
            if stream is not None:
                return stream
            if self._end is not None:
                raise self._closed_error()
            self._accept_waiter.clear()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._accept_waiter.wait(left):
                raise StreamTimeout("accept timed out")

    def serve(self, handler) -> SessionEnd | None:
        """Hand each stream the peer opens to ``handler(stream)`` instead of :meth:`accept`:
        called by the reader (a hub callback, or the reader greenlet: module doc, "Reading")
        once the read that opened the stream is decoded, so no greenlet is woken to accept it
        (bench/README.md, "Fresh connections, the client's side"); the handler must not wait
        (it starts the stream's work elsewhere), and an exception from it ends the session
        (INTERNAL_ERROR) and the reader with it.
        Streams already waiting for accept go first. Returns when the session ends."""
        self._on_stream = handler
        self._hand_streams()
        self._done.wait()
        return self._end

    def _next_accepted(self) -> Stream | None:
        while self._backlog:
            stream = self._backlog.popleft()
            self._conn.stream_accepted(stream.id)
            if stream._error is not None and not stream._chunks:
                # Reset by the peer before anyone took it: nothing to hand out, and a peer
                # opening and resetting streams in a loop must not make the application
                # read (and log) each one.
                continue
            self.stats.streams_accepted += 1
            return stream
        return None

    def _hand_streams(self) -> None:
        # (the backlog looked at first: no call of _next_accepted to find it empty)
        while self._backlog and (stream := self._next_accepted()) is not None:
            try:
                self._on_stream(stream)
            except BaseException as e:
                # The handler runs in the reader: failing, it ends the session (serve()
                # returns), not the reader alone, which left the session open and unread.
                self._finish(SessionEnd(ErrorCode.INTERNAL_ERROR,
                                        f"stream handler failed: {e!r}", remote=False))
                raise

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
            if self._nowait is None:
                self._writer_wake.set()
            elif not self._flush_queued:
                self._flush_queued = True
                self._loop.run_callback(self._flush)

    def _flush(self) -> None:
        """The queued output, written from the hub at the end of this loop turn without
        waiting (module doc, "Writing"); a tail the kernel did not take, or a write already
        under way, is the writer greenlet's."""
        self._flush_queued = False
        conn, transport = self._conn, self._transport
        if self._end is not None or not conn.outgoing_size:
            return
        if self._writing or self._tail or not transport.write_idle:
            self._writer_wake.set()
            return
        try:
            while conn.outgoing_size:
                if not transport.write_nowait(conn.data_to_send(WRITE_BATCH)):
                    self._tail = True  # sent (and its batch counted written) by the writer
                    self._writer_wake.set()
                    return
                conn.batch_written()
                self._last_progress = time.monotonic()
        except (OSError, ValueError) as e:
            self._write_failed(e)
            return
        if self._parked:  # the output is empty: what they queue is the next callback's
            self._feed_parked()

    def _write_failed(self, e: Exception) -> None:
        ga = self._peer_goaway
        if ga is not None:  # it said goodbye and closed before reading what we still sent
            self._finish(SessionEnd(ga, "peer sent GOAWAY and closed", remote=True))
        else:
            self._finish(SessionEnd(ErrorCode.INTERNAL_ERROR, f"transport write failed: {e}",
                                    remote=True))

    def _park_for_room(self, stream: Stream) -> None:
        """``stream``'s send waits for output room (Stream._park): fed by _feed_parked."""
        if not stream._room_queued:
            stream._room_queued = True
            self._parked.append(stream)

    def _feed_parked(self) -> None:
        """The output drained below half the high-water mark: the parked sends are queued in
        turn, each what its window and the room take, until the room is gone again (a send
        that still has bytes then goes to the back: Stream._send_pending)."""
        parked, conn = self._parked, self._conn
        high = self.config.write_high_water
        while parked and conn.unsent_size < high:
            st = parked.popleft()
            st._room_queued = False
            if st._pending is not None:  # else it woke meanwhile (a timeout, an error)
                st._send_pending()

    def _hold(self, stream: Stream, window: int) -> None:
        """``stream`` waits for window with ``window`` (0 < window < a frame) left unused: the
        whole-frame rule's rest (_sendable) or a grant under a frame. A peer may grant only once
        it has read what it waits for (its whole window, or a message whose tail is that rest):
        if no grant comes for a whole ``send_persist`` period, _persist sends what the window
        allows (sender-side silly-window avoidance has TCP's persist timer for the same
        deadlock)."""
        if stream._hold_state:
            if window != stream._held_window:
                stream._hold_state = 1  # the window moved: a new period starts
                stream._held_window = window
            return
        stream._hold_state = 1
        stream._held_window = window
        self._held.append(stream)
        timer = self._persist_timer
        if timer is None:
            period = self.config.send_persist
            timer = self._persist_timer = self._loop.timer(period, period)
        if not timer.active:
            timer.start(self._persist)

    def _persist(self) -> None:
        """The persist timer (_hold), every ``send_persist`` while sends are held: a send held
        since the last tick whose window has not moved is sent what the window allows; one new
        or whose window moved is looked at again next tick; one no longer waiting for window
        is let go."""
        held, self._held = self._held, []
        conn = self._conn
        for st in held:
            window = conn.send_window(st.id)
            if (st._pending is None or st._room_queued or not window or window >= FRAME
                    or self._end is not None):
                st._hold_state = 0  # sent, woken, fed or opened meanwhile
            elif st._hold_state == 2 and window == st._held_window:
                st._hold_state = 0
                self.persisted_sends += 1
                st._send_pending(persist=True)
            else:
                st._hold_state = 2
                st._held_window = window
                self._held.append(st)
        if not self._held:
            self._persist_timer.stop()

    def _consumed(self, stream: Stream, n: int) -> None:
        if self._end is None:
            self._conn.acknowledge(stream.id, n)
            self._wake_writer()

    def _write_loop(self) -> None:
        conn = self._conn
        wake = self._writer_wake
        half = self.config.write_high_water // 2
        try:
            while True:
                wake.wait()
                wake.clear()
                self._last_progress = time.monotonic()  # idle until now: not a stall
                self._writing = True
                if self._tail:
                    self._nowait.flush_tail()  # what _flush left goes out first
                    self._tail = False
                    conn.batch_written()
                    self._last_progress = time.monotonic()
                data = conn.data_to_send(WRITE_BATCH)
                while data:
                    self._transport.sendall(data)
                    conn.batch_written()
                    self._last_progress = time.monotonic()
                    if self._parked and conn.unsent_size < half:
                        self._feed_parked()
                    data = conn.data_to_send(WRITE_BATCH)
                self._writing = False
                if self._end is not None:
                    return
                if self._parked:
                    self._feed_parked()
        except (OSError, ValueError) as e:
            self._write_failed(e)
        except gevent.GreenletExit:
            pass

    def _read_loop(self) -> None:
        conn = self._conn
        # A plain socket: no 256 KiB allocation per read. TLSTransport: its own buffer, no
        # copy (the decoder is done with a read before the next: MuxConnection.receive_data).
        recv = getattr(self._transport, "recv_view", None) or reader(self._transport)
        try:
            while self._end is None:
                data = recv(READ_SIZE)
                self._last_heard = time.monotonic()
                if not data:
                    self._read_eof()
                    return
                self._feed(data)
                # Yield after every read: bytes already waiting would otherwise be read and
                # decoded without a pause, and one flooding peer would starve every other
                # session and deadline in the process. What this read provoked is bounded by
                # the answer bucket and max_queued_answers (lib.protocol.muxstate). A
                # transport whose next read waits for the socket first (it found the kernel's
                # buffer empty: TLSTransport.waits_before_read) yields there instead: one hub
                # round trip per read, not two.
                if not getattr(self._transport, "waits_before_read", False):
                    gevent.sleep(0)
        except (OSError, ValueError) as e:
            self._read_failed(e)
        except gevent.GreenletExit:
            pass
        except Exception as e:
            self._reader_crashed(e)

    def _read_eof(self) -> None:
        ga = self._peer_goaway
        if ga is not None:
            end = SessionEnd(ga, "peer sent GOAWAY and closed", remote=True)
        else:
            end = SessionEnd(ErrorCode.NO_ERROR, "transport closed by peer", remote=True)
        self._finish(end)

    def _reader_crashed(self, e: Exception) -> None:
        """What the reader called raised something no transport or peer raises (a bug: a sink's
        offer, a serve() handler): the session ends, INTERNAL_ERROR. Left alone, the hub
        reader's callback ended with its watcher stopped or a piece never scheduled: a session
        open and never read again, its streams waiting, until a heartbeat timeout (never,
        with heartbeats off). Its traceback is logged, ten at once and then one a minute across
        every session (``crash_log``): a peer that can reach the bug and reconnects must not
        fill the log; ``reader_crashes`` counts every one."""
        global reader_crashes
        reader_crashes += 1
        self._finish(SessionEnd(ErrorCode.INTERNAL_ERROR, f"reader failed: {e!r}",
                                remote=False))
        if crash_log.take():
            log.error("session %s: reader failed (a bug; the session ended INTERNAL_ERROR; "
                      "%d such lines dropped before)", self.name, crash_log.dropped, exc_info=e)
            crash_log.dropped = 0

    def _read_failed(self, e: Exception) -> None:
        # A transport that cut off a flood of its own (wstransport.PeerFlood) says so.
        hostile = getattr(e, "hostile", False)
        self._finish(SessionEnd(ErrorCode.INTERNAL_ERROR, f"transport read failed: {e}",
                                remote=not hostile, hostile=hostile))

    # --- the hub reader (module doc, "Reading"): at any time the watcher is started, or one
    # of these callbacks is scheduled or running, never two of them.

    def _readable(self) -> None:
        """The watcher's callback (and the first read's, and a buffered read's): read what is
        there without waiting, decode its first piece and dispatch it."""
        if self._end is not None:
            return
        try:
            data = self._read_now(READ_SIZE)
        except BlockingIOError:  # readable was stale, or nothing came yet (the first read)
            data = None
        except (OSError, ValueError) as e:
            self._read_failed(e)
            return
        if data is None:  # (or a record's start only) wait for the rest
            self._watch()
            return
        self._last_heard = time.monotonic()
        if not data:
            self._read_eof()
            return
        # A full read, or one a TLS transport cut at its record budget with records left (a
        # byte a record at least: docs/SECURITY.md): read on from a callback, not the watcher.
        self._full = len(data) >= RECORDS_PER_READ and (
            len(data) == READ_SIZE or getattr(self._transport, "read_buffered", False))
        try:
            self._decoded(self._conn.receive_data(data, YIELD_FRAMES))
        except (OSError, ValueError) as e:
            self._read_failed(e)
        except Exception as e:
            self._reader_crashed(e)

    def _decode_more(self) -> None:
        """The next piece of a dense read, a loop turn after the last (YIELD_FRAMES)."""
        if self._end is not None:
            return
        try:
            self._decoded(self._conn.receive_data(b"", YIELD_FRAMES))
        except (OSError, ValueError) as e:
            self._read_failed(e)
        except Exception as e:
            self._reader_crashed(e)

    def _decoded(self, events: list) -> None:
        """A piece of a read decoded: its events dispatched, its sinks offered; then the next
        piece or the next read from a callback, or the watcher again."""
        conn = self._conn
        try:
            if events and (len(events) != 1 or not self._offer_alone(events[0])):
                first = events[0]
                if (len(events) == 3 and type(events[2]) is mp.StreamEnded
                        and type(first) is mp.DataReceived
                        and events[2].stream_id == first.stream_id and self._offer_alone(first)):
                    # An answer and its FIN (DATA, a bare FIN, its StreamEnded: the stream's
                    # end in a fresh connection's proxy): the answer offered as a read of it
                    # alone, then its end dispatched (bench/README.md, "Per-request cost
                    # (issue 16)", branch fmux).
                    events = events[1:]
                self._dispatch(events)
            if conn.outgoing_size:
                self._wake_writer()
        finally:
            pending = self._to_sink
            if pending:  # _flush_sinks inline: a frame fewer per keep-alive request
                self._to_sink = []
                for st in pending:
                    st._sink_flush()
                if conn.outgoing_size:  # their WNDINCs (_consumed), once for all
                    self._wake_writer()
        if self._end is not None:
            return
        watcher = self._watcher
        if conn.more_to_decode:  # a dense read: others' turn before its next frames
            watcher.stop()
            self._loop.run_callback(self._decode_more)
        elif self._full:  # more may be there already (a TLSTransport's read_buffered)
            watcher.stop()
            self._loop.run_callback(self._readable)
        elif not watcher.active:
            watcher.start(self._readable)

    def _offer_alone(self, ev) -> bool:
        """A read whose one event is DATA for a stream with an idle sink and nothing buffered
        (a keep-alive request or answer; or whose other events are that stream's bare FIN:
        _decoded): offered to the sink at once, what ``_dispatch``,
        ``Stream._deliver``, ``_flush_sinks`` and ``Stream._sink_flush`` do for it in one call
        (bench/README.md, "Per-request cost (issue 16)", branch kaone). What the socket does not
        take waits in the buffer for the stream's reader, woken now. False: not such a read
        (the caller dispatches it)."""
        if type(ev) is not mp.DataReceived or ev.fin:
            return False
        st = self._streams.get(ev.stream_id)
        data = ev.data
        if st is None or not data:
            return False
        sink = st._sink
        if sink is None or sink.busy or st._chunks or st._closed or st._read_closed:
            return False
        n = len(data)
        self.stats.bytes_in += n
        st.bytes_in += n
        taken = sink.offer(data)
        if taken < n:
            if st._chunks is None:
                st._chunks = deque()
            st._chunks.append(data[taken:] if taken else data)
            st._buffered += n - taken
            st._wake()
        if taken and self._end is None:  # _consumed; the caller wakes the writer
            self._conn.acknowledge(st.id, taken)
        return True

    def _watch(self) -> None:
        watcher = self._watcher
        if not watcher.active:
            watcher.start(self._readable)

    def _feed(self, data: bytes) -> None:
        conn = self._conn
        try:
            events = conn.receive_data(data, YIELD_FRAMES)
            while True:
                if events:
                    self._dispatch(events)
                if conn.outgoing_size:
                    self._wake_writer()
                if self._end is not None or not conn.more_to_decode:
                    return
                self._flush_sinks()  # before others run: nothing waits behind a yield
                gevent.sleep(0)  # a dense read: others' turn before its next frames
                events = conn.receive_data(b"", YIELD_FRAMES)
        finally:
            self._flush_sinks()  # its WNDINCs wake the writer (_consumed)

    def _flush_sinks(self) -> None:
        """Direct delivery (module doc): each stream's data of this read, offered to its sink
        in one non-blocking send."""
        pending = self._to_sink
        if pending:
            self._to_sink = []
            for st in pending:
                st._sink_flush()
            if self._conn.outgoing_size:  # their WNDINCs (once for all: _wake_writer)
                self._wake_writer()

    def _dispatch(self, events: list) -> None:
        """A decoded piece's events, for the hub reader (_decoded) and the reader greenlet
        (_feed): streams fed and woken, then new streams handed to serve()'s handler."""
        streams = self._streams
        for ev in events:
            t = type(ev)
            if t is mp.DataReceived:
                st = streams.get(ev.stream_id)
                self.stats.bytes_in += len(ev.data)
                if st is None:
                    self._conn.acknowledge(ev.stream_id, len(ev.data))
                    continue
                if ev.data:  # a FIN alone carries none: nothing to deliver (or send on)
                    st._deliver(ev.data)
                if ev.fin:
                    st._eof = True
                    if st._waiter is not None:  # _wake
                        st._waiter.set()
            elif t is mp.WindowOpened:
                st = streams.get(ev.stream_id)
                if st is not None:
                    if st._pending is not None:
                        st._send_pending()  # a sendall waiting for window (Sending)
                    else:
                        st._wake()
            elif t is mp.StreamOpened:
                st = streams[ev.stream_id] = Stream(self, ev.stream_id)
                self._backlog.append(st)
                self._accept_waiter.set()
            elif t is mp.StreamEnded:
                st = streams.get(ev.stream_id)
                if st is not None and not st._eof:  # else woken by its DATA+FIN just before
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
                self._peer_log.log(self._log_key, logging.INFO,
                                   "session %s: peer GOAWAY last=%d code=%s", self.name,
                                   ev.last_stream_id, code_name(ev.code))
                for sid in ev.refused:
                    st = streams.pop(sid, None)
                    if st is not None:
                        st._fail(StreamReset(f"stream {sid} refused by peer GOAWAY",
                                             ErrorCode.REFUSED_STREAM))
                self._accept_waiter.set()
            elif t is mp.ConnectionTerminated:
                what = "hostile peer" if ev.hostile else "protocol error"
                self._peer_log.log(self._log_key, logging.WARNING, "session %s: %s, GOAWAY %s: %s",
                                   self.name, what, code_name(ev.code), ev.reason)
                self._finish(SessionEnd(ev.code, f"{what}: {ev.reason}", remote=False,
                                        hostile=ev.hostile), flush=True)
                return  # (no stream of an ended session goes to serve()'s handler)
        if self._backlog and self._on_stream is not None:
            self._hand_streams()  # serve(): the streams this piece opened, its data in

    def _watch_loop(self) -> None:
        """Heartbeats (when on), and the two ways a live-looking peer is found dead: silence,
        and output that stopped moving."""
        cfg = self.config
        try:
            while self._end is None:
                if cfg.heartbeat and self._conn.send_heartbeat():
                    if self._ping_sent is None:
                        self._ping_sent = time.monotonic()
                    self._wake_writer()
                gevent.sleep(cfg.heartbeat_interval)
                now = time.monotonic()
                # Alive = an echo, or any bytes at all: on a slow path the echo can wait
                # behind megabytes of data, and a busy tunnel must not be killed for that.
                silent = now - max(self._last_echo, self._last_heard)
                if cfg.heartbeat and silent > cfg.heartbeat_interval + cfg.heartbeat_tolerance:
                    self._die(f"heartbeat timeout ({silent:.1f} s without echo)", False,
                              f"no heartbeat echo for {silent:.1f} s")
                    return
                # Bytes from a peer that does not read keep it looking alive: what we owe it
                # must move too (docs/SECURITY.md, "Tunnel sessions").
                stalled = now - self._last_progress
                if self._conn.unsent_size and stalled > cfg.write_stall_timeout:
                    self._die(f"peer stopped reading ({self._conn.unsent_size} bytes unsent "
                              f"for {stalled:.0f} s)", True)
                    return
        except gevent.GreenletExit:
            pass

    def _die(self, reason: str, hostile: bool, logged: str | None = None) -> None:
        self._peer_log.log(self._log_key, logging.WARNING, "session %s: %s", self.name,
                           logged or reason)
        self._conn.terminate(ErrorCode.NO_ERROR, reason)
        self._finish(SessionEnd(ErrorCode.NO_ERROR, reason, remote=False, hostile=hostile),
                     flush=True)

    def _finish(self, end: SessionEnd, flush: bool = False) -> None:
        if self._end is not None:
            return
        self._end = end
        self._conn.release()
        if self._watcher is not None:
            self._watcher.stop()  # no read after the end; closed with the transport
        # Give the GOAWAY a moment to leave (flush); a dead transport must not hold us up.
        data = self._conn.data_to_send() if flush else None
        if data and gevent.getcurrent() is self._hub:
            # The hub reader met a protocol error: the hub must not wait for the flush, so the
            # rest of the end is a greenlet's (module doc, "Reading").
            self._reader = gevent.spawn(self._close_out, data)
        else:
            self._close_out(data)

    def _close_out(self, data) -> None:
        """The end's second half: ``data`` (the GOAWAY) sent, best effort, within a second;
        the transport closed, every stream failed, the greenlets ended, waiters told."""
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
        if self._watcher is not None:
            self._watcher.close()
        if self._persist_timer is not None:
            self._persist_timer.close()
        err = self._closed_error()
        for st in list(self._streams.values()):
            if not st._eof:
                st._fail(err)
            else:
                st._wake()
        self._streams.clear()
        self._accept_waiter.set()
        self._parked.clear()  # their streams were failed or woken above
        self._writer_wake.set()
        current = gevent.getcurrent()
        for g in (self._reader, self._writer, self._heartbeat):
            if g is not None and g is not current:
                g.kill(block=False)
        self._done.set()


def _nowait_read(transport):
    """The hub reader's read for ``transport`` (module doc, "Reading"), or None when it cannot
    be read without waiting: ``read(n)`` returns what is there (an empty buffer at EOF; None or
    BlockingIOError when nothing whole is). A TLSTransport's own buffer, uncopied; a plain
    gevent socket's bytes copied out of the shared scratch buffer (a dense read is decoded
    across loop turns, and others read into that buffer meanwhile)."""
    if hasattr(transport, "read_nowait"):
        return transport.read_nowait if transport.reads_nowait else None
    if nowait_view_reader(transport) is not None and transport.gettimeout() is None:
        return nowait_reader(transport)
    return None
