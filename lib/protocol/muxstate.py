"""The muxado v1 session state machine, with no I/O (in the manner of h2's H2Connection).

Public API::

    conn = MuxConnection(client=True, config=MuxConfig(), trusted=True, clock=time.monotonic)
    events = conn.receive_data(bytes, max_frames=None)  # -> list of events below; never raises
    conn.more_to_decode                   # it stopped at max_frames: call again with b""
    conn.trust()                          # the layer above vouches for the peer (the proxy: Auth)
    sid = conn.open_stream()              # SYN (plus an early WNDINC granting a larger window;
                                          # a peer's stream gets it with its first WNDINC)
    n = conn.send_data(sid, data)         # queues DATA within the peer's window; returns bytes taken
    n = conn.offer_data(sid, data)        # the same within the output room too, or 0 (never waits)
    conn.send_window(sid), conn.receive_window(sid)   # the peer's window, and ours
    conn.end_stream(sid)                  # DATA+FIN (half-close)
    conn.reset_stream(sid, code)          # RST
    conn.forget_stream(sid)               # full close: later DATA is dropped and answered RST(4)
    conn.acknowledge(sid, n)              # the application consumed n bytes: WNDINC when due
    conn.stream_accepted(sid)             # the application took a stream off the accept backlog
    conn.send_heartbeat()                 # 4 bytes on our heartbeat stream
    conn.goaway(code)                     # GOAWAY(last peer id, code); refuse new peer streams
    out = conn.data_to_send(limit=None)   # bytes for the transport (about ``limit`` at most)
    conn.batch_written()                  # the last batch left: its answers are no longer queued
    conn.outgoing_size                    # bytes waiting in data_to_send()
    conn.unsent_size                      # those plus the batch handed out and not yet written
    conn.unsent_answers                   # of which answers the peer provoked (see below)
    conn.inline_frames = False            # (tests) every frame through the rules' handlers,
                                          # the reference the inline steps are held to

Events: StreamOpened, DataReceived (fin may ride on it), StreamEnded, StreamReset,
WindowOpened, GoAwayReceived, HeartbeatEchoed, ConnectionTerminated.

House rules: every rule of muxado v1 that needs session state lives in this file; the frame
layout lives in ``lib.protocol.muxframe``. A peer that breaks a session rule gets ConnectionTerminated and a
GOAWAY with the code below; a peer that breaks a stream rule gets that stream reset.

=============================================  ===============================================
peer does                                      we answer
=============================================  ===============================================
SYN with our parity, id not increasing         GOAWAY PROTOCOL_ERROR
frame for an id it never opened ("idle")       GOAWAY PROTOCOL_ERROR
unknown frame type, PRI                        GOAWAY PROTOCOL_ERROR (decoder)
bad length for the type                        GOAWAY FRAME_SIZE_ERROR (decoder)
DATA beyond the window we granted              GOAWAY FLOW_CONTROL_ERROR
SYN above max_streams or a full backlog        RST REFUSED_STREAM
more than ``max_refused`` refusals in a row    GOAWAY PROTOCOL_ERROR (a SYN flood)
SYN after we sent GOAWAY                       RST REFUSED_STREAM
second heartbeat / other extension type        RST STREAM_CLOSED
DATA for a stream already closed               dropped; RST STREAM_CLOSED if it had bytes, once
                                               per id among the last ``RECENT_RSTS`` answered
DATA after its own FIN                         RST STREAM_CLOSED on that stream
a second GOAWAY                                GOAWAY PROTOCOL_ERROR (Go sends one, ever)
more answers than the answer bucket holds      GOAWAY PROTOCOL_ERROR, hostile (see below)
more than ``untrusted_frames`` before trust()  GOAWAY PROTOCOL_ERROR, hostile
answers queued unwritten > max_queued_answers  GOAWAY PROTOCOL_ERROR, hostile
=============================================  ===============================================

Answers are the frames we send only because the peer sent one: the RSTs above and the echo of
its heartbeat (DATA and WNDINC). Each costs a decode and a write, so what a peer may provoke is
a token bucket (``answer_rate`` / ``answer_burst``, far less before ``trust()``). Every frame
received takes 1/``FRAMES_PER_ANSWER`` of a token too: a frame that provokes nothing (a WNDINC
on a closed stream, say) still costs a decode, and a flood of them is cut off the same way. And
answers
waiting for a peer that does not read are bounded in bytes (``max_queued_answers``, as Go's
HTTP/2 bounds queued control frames). A session ended for either is ``hostile`` on its
ConnectionTerminated event (docs/SECURITY.md, "Tunnel sessions").
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lib.protocol import muxframe as fr
# PeerAbuse (a peer's flood or misuse, as opposed to a malformed frame) lives in lib.errors.
from lib.errors import ErrorCode, PeerAbuse, ProtocolError

# muxado v1 fixes the initial window at 64 KiB each way; it cannot be negotiated.
INITIAL_WINDOW = 65536
HEARTBEAT_TYPE = 0xFFFFFEFF
EXTENSION_TYPES_FROM = 0xFFFFFEFF  # 0xFFFFFFFF - 0x100: reserved for extensions
HEARTBEAT_PRIORITY = 0x7FFFFFFF
HEARTBEAT_PING = b"\x00\x00\x00\x00"  # Go's counter is never incremented
# A writer with more to send waits until the window holds a full frame (see _on_wndinc).
SEND_THRESHOLD = fr.MAX_PAYLOAD
# Closed stream ids we answered with a RST lately: more DATA on them (the rest of a window in
# flight when we closed) is dropped without another answer. 1,024 covers the streams a busy
# tunnel closes within one Tor round trip.
RECENT_RSTS = 1024
# A stream's window doubles after the application read this many windows' worth. Two, not
# one: a visitor that never reads still "reads" what its socket buffers take (the kernel's
# ~200 KiB on loopback), which grew windows to 256 KiB with one; with two they stay at 128 KiB,
# and a reader that keeps up reaches 1 MiB after ~2 MiB.
GROW_AFTER = 2
# Every frame received costs this fraction of an answer token (module doc). 64: with the
# default bucket, 256k frames a second sustained; a real peer at 500 MiB/s sends ~32k DATA
# frames and ~20k WNDINCs a second, and through Tor far fewer.
FRAMES_PER_ANSWER = 64
_ONE_FRAME = 1 / FRAMES_PER_ANSWER  # what a read of one frame spends
_RST_SIZE = fr.HEADER_SIZE + 4
_WNDINC_SIZE = fr.HEADER_SIZE + 4


@dataclass
class MuxConfig:
    """Limits and tunables of one session. Every default says why it is that number."""

    # Receive window per stream. 64 KiB per round trip would cap a stream at ~8 MiB/s over an
    # 8 ms Tor circuit; 1 MiB lets one stream fill a 100 ms path at 10 MiB/s. Go honours grants
    # above 64 KiB (docs/PROTOCOL.md, "Flow control"), so the extra is granted by an early WNDINC at stream open.
    receive_window: int = 1024 * 1024
    # Whether streams the peer opens get the larger window too. The proxy says no: a client
    # only opens small control streams toward it, and granting 1 MiB to each would let anyone
    # who completes Auth make the proxy buffer the whole budget per connection.
    grant_peer_streams: bool = True
    # Total of the larger windows granted across a session: bounds what a peer can make us
    # buffer (streams beyond it keep the protocol's 64 KiB).
    session_window_budget: int = 64 * 1024 * 1024
    # Concurrent streams the peer may have open. h2's advice: never unbounded. 1024 concurrent
    # public connections per tunnel is above what one origin behind Tor serves well.
    max_streams: int = 1024
    # Streams opened by the peer and not yet accept()ed. Go uses 100 and then stalls its reader;
    # we refuse instead, which keeps the session (and its heartbeat) alive.
    accept_backlog: int = 256
    # Refusals in a row (no stream freed meanwhile) before we call it a SYN flood.
    max_refused: int = 1024
    # Heartbeat as Go: a ping every 3 s; the session is dead after interval + tolerance without
    # an echo (Go: 13 s).
    heartbeat: bool = True
    heartbeat_interval: float = 3.0
    heartbeat_tolerance: float = 10.0
    # Outgoing bytes queued before writers wait for the transport (backpressure). Writers keep
    # the application's output under it (plus one frame); answers have their own bound below.
    write_high_water: int = 1024 * 1024
    # A send cut by the peer's window takes whole frames and keeps the window's rest (under a
    # frame) for the next grant; when no grant came for this long (a peer may grant only once
    # it has read its whole window), what the window allows is sent anyway (lib.net.muxsession,
    # "Sending"). 20 ms: Go grants every 8 KiB it reads, a stream at 100 streams of 500 MiB/s
    # every ~2 ms; a real wait costs at most two periods.
    send_persist: float = 0.02
    # Answers the peer may provoke (module doc): a bucket of answer_burst, refilled at
    # answer_rate a second. A real peer provokes one echo per heartbeat (every 3 s) and about one
    # RST per stream it was still sending on when we closed it: 1,000 visitors hanging up a
    # second is 1,000 a second, and a tunnel's 4,096 streams all closed at once the burst.
    # Past the bucket the peer is hostile.
    answer_rate: float = 4000.0
    answer_burst: int = 4096
    # Until trust() (the proxy: until Auth is answered) the peer has sent a handful of frames
    # (Auth, its heartbeat stream, a ping or two): far less, and a cap on frames of any kind.
    untrusted_answer_rate: float = 2.0
    untrusted_answer_burst: int = 16
    untrusted_frames: int = 256
    # Bytes of answers queued and not yet written: a peer that provokes answers and does not
    # read them is hostile past this (Go's HTTP/2: maxQueuedControlFrames, 10,000). 128 KiB is
    # 10,000 RSTs, or two windows of heartbeat echo.
    max_queued_answers: int = 128 * 1024
    # A session whose queued output has not moved for this long has a peer that stopped
    # reading (its incoming bytes may still look alive): closed. 60 s: the writer hands out
    # 64 KiB at a time, and 64 KiB in 60 s is 1 KiB/s, below any working Tor circuit;
    # meanwhile the session holds at most its bounded output.
    write_stall_timeout: float = 60.0
    # Streams we open start at muxado's 64 KiB and double (up to receive_window) each time the
    # application has read a whole window and left nothing waiting: a reader that stops pins
    # 64 KiB, not receive_window. Off by default (the client's streams toward its origin); the
    # proxy turns it on for visitors' streams (docs/OPERATIONS.md, "Memory per visitor").
    grow_windows: bool = False
    # The larger windows of every session sharing this config draw on one budget when set (the
    # proxy: one for all tunnels), besides session_window_budget.
    window_pool: "WindowPool | None" = None


class WindowPool:
    """A budget of window bytes above 64 KiB shared by many sessions (no I/O, no locking: one
    event loop). ``take(n)`` -> bool, ``give(n)``; ``used``, ``limit``, ``refused``."""

    __slots__ = ("limit", "used", "refused")

    def __init__(self, limit: int):
        self.limit, self.used, self.refused = limit, 0, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


# --- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamOpened:
    stream_id: int
    stream_type: int | None = None


# DataReceived(stream_id, data, fin=False) is the DATA frame itself: the same three fields, and
# one object per frame received instead of two (bench/README.md, "Per-request cost (issue 16)",
# kapath pass).
DataReceived = fr.Data


@dataclass(slots=True)
class StreamEnded:
    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    code: int
    remote: bool = True


@dataclass(slots=True)
class WindowOpened:
    stream_id: int


@dataclass(slots=True)
class GoAwayReceived:
    last_stream_id: int
    code: int
    debug: bytes = b""
    refused: list[int] = field(default_factory=list)


@dataclass(slots=True)
class HeartbeatEchoed:
    count: int = 1


@dataclass(slots=True)
class ConnectionTerminated:
    code: int
    reason: str
    remote: bool = False
    hostile: bool = False  # ended for provoking more than a bound allows (PeerAbuse)


Event = (StreamOpened | DataReceived | StreamEnded | StreamReset | WindowOpened | GoAwayReceived
         | HeartbeatEchoed | ConnectionTerminated)


class _Stream:
    """Per-stream protocol state. Lean: 10,000 idle streams must fit in well under 16 KiB each."""

    __slots__ = ("send_window", "credit", "window", "unacked", "local_fin", "remote_fin",
                 "local", "kind", "drained", "extra_due")

    def __init__(self, local: bool, kind: int = 0):
        # One assignment per value: a stream is made per fresh connection in each process
        # (bench/README.md, "Per-request cost (issue 16)", branch fmux).
        # send_window: what the peer lets us send; credit: what we let the peer send, not yet
        # used; window: the level we keep granting back to.
        self.send_window = self.credit = self.window = INITIAL_WINDOW
        # unacked: consumed by the application, not yet granted back; drained: bytes the
        # application read since the window last grew.
        self.unacked = self.drained = 0
        # extra_due: a peer stream's larger window, granted with its first WNDINC.
        self.local_fin = self.remote_fin = self.extra_due = False
        self.local = local
        self.kind = kind  # 0 user, 1 our heartbeat, 2 peer's heartbeat


_USER, _OUR_HB, _PEER_HB = 0, 1, 2


class MuxConnection:
    """One muxado v1 session's state, fed bytes and asked for bytes."""

    def __init__(self, client: bool, config: MuxConfig | None = None, trusted: bool = True,
                 clock=time.monotonic):
        self.config = config or MuxConfig()
        self.client = client
        self._decoder = fr.FrameDecoder()
        self._out: list[bytes | memoryview] = []  # send_data queues views of immutable bytes
        self.outgoing_size = 0
        self._streams: dict[int, _Stream] = {}
        # Dialer opens odd ids from 3, listener even ids from 2 (stream 1 is rejected by Go).
        self._next_local = 3 if client else 2
        self._last_remote = 1 if client is False else 0
        self._remote_parity = 0 if client else 1
        self._peer_streams = 0  # live peer-opened user streams
        self._backlog = 0  # peer-opened streams not yet accepted
        self._refused_streak = 0
        self._window_granted = 0  # sum of windows above INITIAL_WINDOW
        self._pooled = 0  # of which taken from config.window_pool
        self._peer_hb: int | None = None
        self._hb_id: int | None = None
        self._hb_pending = bytearray()
        self.goaway_sent = False
        self.goaway_received: int | None = None  # the peer's last stream id
        self.terminated: ConnectionTerminated | None = None
        self.refused_streams = 0  # counters for the dashboard
        # What the peer may provoke (module doc): the answer bucket, the frame cap before
        # trust(), the RSTs recently sent, and the answers queued for the transport.
        self.trusted = trusted
        self._clock = clock
        self._stamp = clock()
        self._set_limits()
        self._tokens = self._burst
        self._frames_untrusted = 0
        self._recent_rst_ids: deque[int] = deque()
        self._recent_rst_set: set[int] = set()
        self.answers = 0  # answers sent, ever (a counter)
        self.frames_received = 0  # a counter
        self.more_to_decode = False  # receive_data stopped at max_frames (its doc)
        self._answers_queued = 0  # bytes of answers in _out
        self._answer_marks: deque[tuple[int, int]] = deque()  # (end offset in output, size)
        self._taken = 0  # bytes ever handed out by data_to_send
        self._handed_size = 0  # the last batch handed out, until batch_written()
        self._handed_answers = 0  # the answers in it
        self._inline = True  # inline_frames
        if self.config.heartbeat:
            self._hb_id = self._open(HEARTBEAT_PRIORITY, HEARTBEAT_TYPE, kind=_OUR_HB)

    @property
    def inline_frames(self) -> bool:
        """receive_data's inline steps for the common frames (a read of one DATA frame, DATA
        and its FIN on an open user stream, a grant). Set False before any bytes are received,
        every frame goes through the rules' handlers (_HANDLERS): the reference the inline
        steps must agree with (tests/test_mux_lifecycle.py runs both)."""
        return self._inline

    @inline_frames.setter
    def inline_frames(self, on: bool) -> None:
        if self._decoder.buffered or self.frames_received:
            raise ValueError("inline_frames is chosen before any bytes are received")
        self._inline = on
        self._decoder = fr.FrameDecoder() if on else _NoWholeData()

    # --- output ---------------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self.outgoing_size += len(data)

    def data_to_send(self, limit: int | None = None) -> bytes | memoryview:
        """The queued output (up to about ``limit`` bytes: whole pieces, so at most one frame
        more). Handing out a batch means the one before was written (see batch_written)."""
        out = self._out
        if not out:
            self.batch_written()
            return b""
        size = self.outgoing_size
        if limit is None or size <= limit:
            # All of it (a flush's usual batch): the list itself is handed to the join and a
            # new one queues what comes next, no copy and no clear (branch kaone).
            batch, self._out, self.outgoing_size = out, [], 0
        else:
            i = size = 0
            while size < limit:
                size += len(out[i])
                i += 1
            batch = out[:i]
            del out[:i]
            self.outgoing_size -= size
        taken = self._taken = self._taken + size
        handed = 0
        marks = self._answer_marks
        if marks:  # answers queued (echoes, RSTs, WNDINCs a peer provoked): none per request
            while marks and marks[0][0] <= taken:
                handed += marks.popleft()[1]
            self._answers_queued -= handed
        self._handed_answers, self._handed_size = handed, size
        return b"".join(batch) if len(batch) > 1 else batch[0]

    def batch_written(self) -> None:
        """The transport took the last batch: its answers no longer count as queued."""
        self._handed_answers = self._handed_size = 0

    @property
    def unsent_size(self) -> int:
        """Output not yet written: queued, plus the batch handed out and not yet written."""
        return self.outgoing_size + self._handed_size

    @property
    def unsent_answers(self) -> int:
        """Bytes of answers the peer provoked that have not been written yet."""
        return self._answers_queued + self._handed_answers

    # --- what the peer may provoke --------------------------------------------------------

    def trust(self) -> None:
        """The layer above vouches for the peer (the proxy: its Auth was accepted)."""
        if not self.trusted:
            self.trusted = True
            self._set_limits()
            self._tokens = self._burst

    def _set_limits(self) -> None:
        """The answer bucket's rate and size (a float) for the peer's trust, looked up once
        (``_spend`` runs once per read received)."""
        c = self.config
        if self.trusted:
            self._rate, self._burst = c.answer_rate, float(c.answer_burst)
        else:
            self._rate, self._burst = c.untrusted_answer_rate, float(c.untrusted_answer_burst)

    def _provoked(self) -> None:
        """Take a token for one answer; a peer with none left is hostile."""
        self._spend(1.0)
        self.answers += 1

    def _spend(self, tokens: float) -> None:
        # Once per read received, in each process (bench/README.md, "Per-request cost (issue
        # 16)", branch fmux): the limits looked up at trust (_set_limits), no min() or float().
        now = self._clock()
        have = self._tokens + (now - self._stamp) * self._rate
        if have > self._burst:
            have = self._burst
        self._stamp = now
        if have < tokens:
            self._tokens = have
            raise PeerAbuse(f"peer provoked more than {int(self._burst)} answers at once or "
                            f"{self._rate:g} a second{'' if self.trusted else ' before Auth'} "
                            f"(a frame counts 1/{FRAMES_PER_ANSWER})")
        self._tokens = have - tokens

    def _answered(self, size: int) -> None:
        """The last ``size`` bytes queued are an answer: bound what waits unwritten."""
        self._answers_queued += size
        self._answer_marks.append((self._taken + self.outgoing_size, size))
        if self.unsent_answers > self.config.max_queued_answers:
            raise PeerAbuse(f"peer does not read: {self.unsent_answers} bytes of answers "
                            f"unwritten (limit {self.config.max_queued_answers})")

    def _answer_rst(self, sid: int, code: int = ErrorCode.STREAM_CLOSED) -> None:
        """RST a stream the peer should not be using: once per id among the recent ones."""
        if sid in self._recent_rst_set:
            return
        if len(self._recent_rst_ids) >= RECENT_RSTS:
            self._recent_rst_set.discard(self._recent_rst_ids.popleft())
        self._recent_rst_ids.append(sid)
        self._recent_rst_set.add(sid)
        self._provoked()
        self._emit(fr.encode(fr.Rst(sid, code)))
        self._answered(_RST_SIZE)

    # --- local actions --------------------------------------------------------------------

    def open_stream(self) -> int:
        sid = self._next_local
        if (self.terminated is not None or self.goaway_received is not None
                or sid > fr.STREAM_ID_MASK):
            self._refuse_open()
        # _open for a user stream, inline (one per fresh connection in the proxy:
        # bench/README.md, "Per-request cost (issue 16)", branch fmux): the SYN has no priority
        # and no type, so it is a bare header (encode(Syn(sid)), test_mux_lifecycle).
        self._next_local = sid + 2
        st = self._streams[sid] = _Stream(True)
        self._out.append(fr.HEADER.pack(0, 0, fr.TYPE_SYN, sid))
        self.outgoing_size += fr.HEADER_SIZE
        if not self.config.grow_windows:  # else it starts at 64 KiB and grows (_grant_extra)
            self._grant_extra(sid, st)
        return sid

    def _refuse_open(self) -> None:
        if self.terminated is not None:
            raise ProtocolError("session is closed", self.terminated.code)
        if self.goaway_received is not None:
            raise ProtocolError("peer sent GOAWAY: no new streams", ErrorCode.REFUSED_STREAM)
        raise ProtocolError("stream ids exhausted", ErrorCode.REFUSED_STREAM)

    def _open(self, priority: int | None, stream_type: int | None, kind: int) -> int:
        """A stream of ours with a SYN of its own (the heartbeat's; user streams: open_stream)."""
        sid = self._next_local
        self._next_local += 2
        self._streams[sid] = _Stream(local=True, kind=kind)
        self._emit(fr.encode(fr.Syn(sid, priority, stream_type)))
        return sid

    def _grant_extra(self, sid: int, st: _Stream) -> None:
        if st.local and self.config.grow_windows:
            return  # starts at 64 KiB and grows as it is read (acknowledge)
        extra = self.config.receive_window - INITIAL_WINDOW
        if extra > 0 and self._reserve(extra):
            st.window += extra
            st.credit += extra
            self._emit(fr.encode_wndinc(sid, extra))

    def _grant_due(self, st: _Stream) -> None:
        """A peer stream's larger window (_on_syn), added to the WNDINC being sent."""
        st.extra_due = False
        extra = self.config.receive_window - INITIAL_WINDOW
        if extra > 0 and self._reserve(extra):
            st.window += extra
            st.unacked += extra

    def _reserve(self, extra: int) -> bool:
        """Window above 64 KiB: within this session's budget and the shared pool's."""
        if self._window_granted + extra > self.config.session_window_budget:
            return False
        pool = self.config.window_pool
        if pool is not None:
            if self.terminated is not None or not pool.take(extra):
                return False
            self._pooled += extra
        self._window_granted += extra
        return True

    def _unreserve(self, extra: int) -> None:
        self._window_granted -= extra
        give = min(extra, self._pooled)
        pool = self.config.window_pool
        if give > 0 and pool is not None:  # _pooled > 0 only ever with a pool
            pool.give(give)
            self._pooled -= give

    def release(self) -> None:
        """The session is over: give its share of the shared window pool back."""
        pool = self.config.window_pool
        if self._pooled and pool is not None:  # _pooled > 0 only ever with a pool
            pool.give(self._pooled)
            self._pooled = 0

    def send_data(self, sid: int, data: fr.Buffer, fin: bool = False) -> int:
        """Queue as much of ``data`` as the peer's window allows; FIN rides on the last frame
        only when all of it fit. Returns the number of bytes taken."""
        st = self._streams.get(sid)
        if st is None or st.local_fin:
            raise ProtocolError(f"stream {sid} is closed for writing", ErrorCode.STREAM_CLOSED)
        total = len(data)
        if (0 < total <= fr.MAX_PAYLOAD and total <= st.send_window and not fin
                and type(data) is bytes):
            # One frame of immutable bytes within the window (a request, an answer): queued
            # as it is, in one step (bench/README.md, "Per-request cost (issue 16)", kapath).
            self._out += (fr.HEADER.pack(total, 0, fr.TYPE_DATA, sid), data)
            self.outgoing_size += total + fr.HEADER_SIZE
            st.send_window -= total
            return total
        n = min(total, st.send_window)
        if n == 0 and not (fin and total == 0):
            return 0
        view = memoryview(data)
        # Immutable bytes are referenced, not copied, until data_to_send() joins them: one copy
        # per byte instead of two. A mutable buffer may change after we return: copy it now.
        zero_copy = isinstance(view.obj, bytes)
        pos = 0
        out = self._out
        header = fr.HEADER.pack
        while pos < n:
            chunk = min(n - pos, fr.MAX_PAYLOAD)
            last = pos + chunk == n
            flags = fr.FLAG_FIN if (fin and last and n == total) else 0
            out.append(header(chunk, flags, fr.TYPE_DATA, sid))
            piece = view[pos:pos + chunk]
            out.append(piece if zero_copy else bytes(piece))
            pos += chunk
        self.outgoing_size += n + fr.HEADER_SIZE * ((n + fr.MAX_PAYLOAD - 1) // fr.MAX_PAYLOAD)
        st.send_window -= n
        if fin and n == total:
            if total == 0:
                self._emit(fr.encode_data(sid, b"", True))
            self._local_fin(sid, st)
        return n

    def offer_data(self, sid: int, data: bytes) -> int:
        """``send_data`` for a writer that must not wait: what the peer's window and the output
        room (``write_high_water`` less ``unsent_size``, at least a frame) take now. 0 when
        there is no room, or when the window holds less than ``data`` and less than a frame:
        the writer waits for a WindowOpened instead of sending a sliver, as a waiting one would.
        Raises as send_data on a stream closed for writing; 0 for one already forgotten."""
        st = self._streams.get(sid)
        if st is None:
            return 0
        room = self.config.write_high_water - self.outgoing_size - self._handed_size
        window = st.send_window
        total = len(data)
        if (0 < total <= fr.MAX_PAYLOAD and total <= window and total <= room
                and type(data) is bytes and not st.local_fin):
            # send_data's one-frame step, inline: a visitor's request or an origin's answer,
            # once per keep-alive request in each process (bench/README.md, "Per-request cost
            # (issue 16)", branch ka3); the same wire (test_muxproto).
            self._out += (fr.HEADER.pack(total, 0, fr.TYPE_DATA, sid), data)
            self.outgoing_size += total + fr.HEADER_SIZE
            st.send_window = window - total
            return total
        if room <= 0 or (window < total and window < SEND_THRESHOLD):
            return 0
        return self.send_data(sid, data[:max(room, SEND_THRESHOLD)])

    def send_window(self, sid: int) -> int:
        st = self._streams.get(sid)
        return st.send_window if st is not None else 0

    def receive_window(self, sid: int) -> int:
        """The window we grant the peer on ``sid`` (what it may have unread with us)."""
        st = self._streams.get(sid)
        return st.window if st is not None else 0

    def end_stream(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_fin:
            return
        # encode_data(sid, b"", True) and _local_fin, inline: once per stream in each process
        # (bench/README.md, "Per-request cost (issue 16)", branch fmux).
        self._out.append(fr.HEADER.pack(0, fr.FLAG_FIN, fr.TYPE_DATA, sid))
        self.outgoing_size += fr.HEADER_SIZE
        st.local_fin = True
        if st.remote_fin:
            self._drop(sid, st)

    def _local_fin(self, sid: int, st: _Stream) -> None:
        st.local_fin = True
        if st.remote_fin:
            self._drop(sid, st)

    def reset_stream(self, sid: int, code: int = ErrorCode.CANCEL) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        self._emit(fr.encode(fr.Rst(sid, code)))
        self._drop(sid, st)

    def forget_stream(self, sid: int) -> None:
        """Full close as Go's Stream.Close(): FIN if not yet sent, then forget the stream."""
        st = self._streams.get(sid)
        if st is None:
            return
        if not st.local_fin:
            self._out.append(fr.HEADER.pack(0, fr.FLAG_FIN, fr.TYPE_DATA, sid))  # end_stream's
            self.outgoing_size += fr.HEADER_SIZE
        self._drop(sid, st)

    def _drop(self, sid: int, st: _Stream) -> None:
        del self._streams[sid]
        if st.window != INITIAL_WINDOW:  # a larger window's share goes back (none: nothing)
            self._unreserve(st.window - INITIAL_WINDOW)
        if not st.local and st.kind == _USER:
            self._peer_streams -= 1
            self._refused_streak = 0

    def acknowledge(self, sid: int, n: int) -> None:
        st = self._streams.get(sid)
        if st is None or st.remote_fin or n <= 0:
            return  # nothing more will come: no window to give back
        st.unacked += n
        if st.local and self.config.grow_windows:
            st.drained += n
            if st.drained >= GROW_AFTER * st.window:  # else _maybe_grow has nothing to do
                self._maybe_grow(st)
        # Batch WNDINCs: one per eighth of the window keeps the pipe full at 1/8 the frames.
        if st.unacked >= st.window >> 3:
            if st.extra_due:
                self._grant_due(st)
            self._emit(fr.encode_wndinc(sid, st.unacked))
            st.credit += st.unacked
            st.unacked = 0

    def _maybe_grow(self, st: _Stream) -> None:
        """Double the window once the application has read GROW_AFTER whole ones since it
        last grew (``drained``, counted by acknowledge) and nothing waits (window = credit +
        unacked + what is buffered unread): the window, not the reader, is what holds the
        stream back. A reader that stops never grows it past what the socket buffers behind it
        took before they filled."""
        limit = self.config.receive_window
        if st.window >= limit or st.window != st.credit + st.unacked:
            return
        extra = min(st.window, limit - st.window)
        if self._reserve(extra):
            st.window += extra
            st.unacked += extra  # granted with the WNDINC acknowledge sends now
            st.drained = 0

    def stream_accepted(self, sid: int) -> None:
        self._backlog = max(0, self._backlog - 1)

    def send_heartbeat(self) -> bool:
        hb = self._hb_id
        st = self._streams.get(hb) if hb is not None else None
        if hb is None or st is None or st.send_window < 4 or self.terminated is not None:
            return False
        self.send_data(hb, HEARTBEAT_PING)
        return True

    def goaway(self, code: int = ErrorCode.NO_ERROR) -> None:
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._emit(fr.encode(fr.GoAway(self._last_remote, code)))

    def terminate(self, code: int, reason: str, remote: bool = False,
                  hostile: bool = False) -> ConnectionTerminated:
        if self.terminated is None:
            if not remote and (hostile or code != ErrorCode.NO_ERROR):
                # Whatever is queued dies with the session: the GOAWAY goes out alone, not
                # behind a backlog of answers the peer is not reading.
                self._out.clear()
                self._answer_marks.clear()
                self.outgoing_size = self._answers_queued = 0
            if not remote:
                self.goaway(code)
            self.terminated = ConnectionTerminated(code, reason, remote, hostile)
            self.release()
        return self.terminated

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self._streams.values() if s.kind == _USER)

    # --- input ----------------------------------------------------------------------------

    def receive_data(self, data: fr.Buffer, max_frames: int | None = None) -> list[Event]:
        """Decode ``data`` (any piece of the byte stream) and act on its frames. With
        ``max_frames``, stop after that many: ``more_to_decode`` is then True and
        ``receive_data(b"", max_frames)`` goes on where this stopped (the caller yields between:
        lib/net/muxsession.py). ``data`` may be reused once this returns."""
        events: list[Event] = []
        self.more_to_decode = False
        if self.terminated is not None:
            return events
        decoder = self._decoder
        # A piece whose first header's length is all of it (a read of many frames, or of a
        # frame's start, is not asked: a call per read for nothing).
        # (0x3F, 8: LENGTH_MASK's bits of the first byte, HEADER_SIZE)
        size = len(data) - 8
        f = (decoder.whole_data(data) if size >= 0 and (data[0] & 0x3F) << 8 | data[1] == size
             and self.trusted else None)
        if f is not None:
            # A read of one DATA frame (a keep-alive request or answer, a stream's FIN) within
            # the window on an open user stream: what the loop below does for it, without
            # feeding the decoder (bench/README.md, "Per-request cost (issue 16)", branch kaone).
            st = self._streams.get(f.stream_id)
            n = len(f.data)
            if st is not None and st.kind == _USER and not st.remote_fin and n <= st.credit:
                st.credit -= n
                events = [f]
                if f.fin:
                    self._peer_fin(f.stream_id, st, n, events)
                self.frames_received += 1
                try:
                    self._spend(_ONE_FRAME)
                except ProtocolError as e:
                    events.append(self.terminate(e.code, str(e.args[0]),
                                                 hostile=isinstance(e, PeerAbuse)))
                return events
        decoder.feed(data)
        inline = self._inline
        streams = self._streams
        handlers = _HANDLERS
        frames = 0
        try:
            while frames != max_frames:
                f = decoder.next_frame()
                if f is None:
                    break
                frames += 1
                if not self.trusted:
                    self._frames_untrusted += 1
                    if self._frames_untrusted > self.config.untrusted_frames:
                        raise PeerAbuse(f"more than {self.config.untrusted_frames} frames "
                                        f"before Auth")
                t = type(f)
                if not inline:
                    pass
                elif t is DataReceived:
                    # The common frame inline (what _on_data does for it): DATA within the
                    # window on an open user stream is delivered as it came, and its FIN ends
                    # the stream's way in (a fresh connection's end, in each process:
                    # bench/README.md, "Per-request cost (issue 16)", branch fmux).
                    st = streams.get(f.stream_id)
                    n = len(f.data)
                    if (st is not None and st.kind == _USER and not st.remote_fin
                            and n <= st.credit):
                        st.credit -= n
                        events.append(f)
                        if f.fin:
                            self._peer_fin(f.stream_id, st, n, events)
                        continue
                elif t is fr.WndInc:
                    # What _on_wndinc does for a grant on a known stream, inline (a Go peer
                    # grants per Read: bench/README.md, "Whole frames and the Python peers
                    # against Go"); the rest (unknown ids, an overflow) takes _on_wndinc.
                    st = streams.get(f.stream_id)
                    if st is not None:
                        before = st.send_window
                        after = before + f.increment
                        if after <= fr.STREAM_ID_MASK:
                            st.send_window = after
                            if before < SEND_THRESHOLD <= after and st.kind == _USER:
                                events.append(WindowOpened(f.stream_id))
                            continue
                handlers[t](self, f, events)  # a broken rule raises (below)
            else:
                # The budget is spent: what is left of data is copied, so the caller may reuse
                # its buffer (the decoder decodes in place: lib.protocol.muxframe).
                decoder.detach()
                self.more_to_decode = decoder.buffered > 0
            self.frames_received += frames
            if frames and self.terminated is None:
                self._spend(frames / FRAMES_PER_ANSWER)
        except ProtocolError as e:
            events.append(self.terminate(e.code, str(e.args[0]),
                                         hostile=isinstance(e, PeerAbuse)))
        if self.terminated is not None:
            decoder.detach()  # no view of data may outlive this call
        return events

    def _known_or_idle(self, sid: int) -> _Stream | None:
        """The stream, or None if it was closed; raises for an id never opened (idle)."""
        st = self._streams.get(sid)
        if st is not None:
            return st
        if (sid & 1) == self._remote_parity:
            if sid > self._last_remote:
                raise ProtocolError(f"frame for stream {sid} the peer never opened")
        elif sid >= self._next_local:
            raise ProtocolError(f"frame for stream {sid} we never opened")
        return None

    def _on_data(self, f: fr.Data, events: list[Event]) -> None:
        sid = f.stream_id
        st = self._known_or_idle(sid)
        n = len(f.data)
        if st is None:
            if n:
                self._answer_rst(sid)
            return
        if st.remote_fin:
            if n:  # data after FIN: that stream is broken, the session is not
                self._drop(sid, st)
                self._answer_rst(sid)
                events.append(StreamReset(sid, ErrorCode.STREAM_CLOSED, remote=False))
            return
        if n > st.credit:
            raise ProtocolError(f"stream {sid}: {n} bytes exceed the window of {st.credit}",
                                ErrorCode.FLOW_CONTROL_ERROR)
        st.credit -= n
        if st.kind == _PEER_HB:
            # Echo the peer's heartbeat at once, byte for byte, and give its window back.
            if n:
                self._provoked()
                before = self.outgoing_size
                self.send_data(sid, f.data)
                self._emit(fr.encode_wndinc(sid, n))
                st.credit += n
                self._answered(self.outgoing_size - before)
        elif st.kind == _OUR_HB:
            if n:
                self._hb_pending += f.data
                echoes = len(self._hb_pending) // 4
                del self._hb_pending[: echoes * 4]
                self._provoked()
                self._emit(fr.encode_wndinc(sid, n))
                self._answered(_WNDINC_SIZE)
                st.credit += n
                if echoes:
                    events.append(HeartbeatEchoed(echoes))
        else:
            events.append(f)  # DataReceived is the frame (above)
        if f.fin:
            self._peer_fin(sid, st, n, events)

    def _peer_fin(self, sid: int, st: _Stream, n: int, events: list[Event]) -> None:
        """The peer's FIN, on a DATA frame of ``n`` bytes: nothing more comes; a stream whose
        FIN we sent too is forgotten."""
        st.remote_fin = True
        if st.kind == _USER and not n:
            events.append(StreamEnded(sid))
        if st.local_fin:
            self._drop(sid, st)

    def _on_wndinc(self, f: fr.WndInc, events: list[Event]) -> None:
        st = self._known_or_idle(f.stream_id)
        if st is None or f.increment == 0:
            return
        before = st.send_window
        st.send_window += f.increment
        if st.send_window > fr.STREAM_ID_MASK:
            raise ProtocolError(f"stream {f.stream_id}: window above 2^31-1",
                                ErrorCode.FLOW_CONTROL_ERROR)
        # Wake a waiting writer only once a full frame fits (sender-side silly window
        # avoidance): Go grants back 8 KiB at a time, and waking on each grant would send
        # small frames, each its own TLS record.
        if before < SEND_THRESHOLD <= st.send_window and st.kind == _USER:
            events.append(WindowOpened(f.stream_id))

    def _on_syn(self, f: fr.Syn, events: list[Event]) -> None:
        sid = f.stream_id
        if (sid & 1) != self._remote_parity or sid <= self._last_remote:
            self._bad_syn(sid)
        self._last_remote = sid
        stype = f.stream_type
        if stype is not None and stype >= EXTENSION_TYPES_FROM:
            if stype == HEARTBEAT_TYPE and self._peer_hb is None:
                self._peer_hb = sid
                self._streams[sid] = _Stream(local=False, kind=_PEER_HB)
            else:
                self._answer_rst(sid)
            return
        c = self.config
        if self.goaway_sent or self._peer_streams >= c.max_streams or self._backlog >= c.accept_backlog:
            self.refused_streams += 1
            self._refused_streak += 1
            if self._refused_streak > c.max_refused:
                raise ProtocolError(f"SYN flood: {self._refused_streak} streams refused in a row")
            self._answer_rst(sid, ErrorCode.REFUSED_STREAM)
            return
        st = self._streams[sid] = _Stream(False)
        # The larger window (grant_peer_streams) is granted with the stream's first WNDINC
        # (acknowledge), not now: a WNDINC of its own is a record and a wake-up of the peer per
        # stream, and a stream whose peer sends under an eighth of 64 KiB never needs it
        # (bench/README.md, "Fresh connections: fewer steps per connection"). One that sends
        # more is granted it as soon as the application has read that eighth, about when a
        # grant sent now would arrive.
        st.extra_due = c.grant_peer_streams
        self._peer_streams += 1
        self._backlog += 1
        events.append(StreamOpened(sid, stype))
        if f.fin:  # Go inverts SYN+FIN; we read it as documented: the opener sends nothing
            st.remote_fin = True
            events.append(StreamEnded(sid))

    def _bad_syn(self, sid: int) -> None:
        if (sid & 1) != self._remote_parity:
            raise ProtocolError(f"peer opened stream {sid} with our parity")
        raise ProtocolError(f"peer reused stream id {sid} (last was {self._last_remote})")

    def _on_rst(self, f: fr.Rst, events: list[Event]) -> None:
        st = self._known_or_idle(f.stream_id)
        if st is None:
            return
        self._drop(f.stream_id, st)
        if st.kind == _USER:
            events.append(StreamReset(f.stream_id, f.code))
        elif st.kind == _OUR_HB:
            self._hb_id = None

    def _on_goaway(self, f: fr.GoAway, events: list[Event]) -> None:
        if self.goaway_received is not None:
            # Go sends one GOAWAY per session, ever; a stream of them is a log and CPU flood.
            raise ProtocolError("a second GOAWAY")
        self.goaway_received = f.last_stream_id
        refused = [sid for sid, st in self._streams.items()
                   if st.local and st.kind == _USER and sid > f.last_stream_id]
        for sid in refused:
            self._drop(sid, self._streams[sid])
        events.append(GoAwayReceived(f.last_stream_id, f.code, f.debug, refused))


# The rules' handler of each frame type (receive_data calls the one a frame needs: no
# isinstance chain, no call between).
_HANDLERS = {fr.Data: MuxConnection._on_data, fr.WndInc: MuxConnection._on_wndinc,
             fr.Syn: MuxConnection._on_syn, fr.Rst: MuxConnection._on_rst,
             fr.GoAway: MuxConnection._on_goaway}


class _NoWholeData(fr.FrameDecoder):
    """The decoder of a connection with inline_frames off: every read goes through feed and
    next_frame, none through the one-frame step."""

    __slots__ = ()

    def whole_data(self, piece: fr.Buffer) -> None:
        return None
