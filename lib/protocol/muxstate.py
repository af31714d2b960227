"""The muxado v1 session state machine, with no I/O (in the manner of h2's H2Connection).

Public API::

    conn = MuxConnection(client=True, config=MuxConfig())
    events = conn.receive_data(bytes)     # -> list of events below; never raises
    sid = conn.open_stream()              # SYN (plus an early WNDINC granting a larger window)
    n = conn.send_data(sid, data)         # queues DATA within the peer's window; returns bytes taken
    conn.end_stream(sid)                  # DATA+FIN (half-close)
    conn.reset_stream(sid, code)          # RST
    conn.forget_stream(sid)               # full close: later DATA is dropped and answered RST(4)
    conn.acknowledge(sid, n)              # the application consumed n bytes: WNDINC when due
    conn.stream_accepted(sid)             # the application took a stream off the accept backlog
    conn.send_heartbeat()                 # 4 bytes on our heartbeat stream
    conn.goaway(code)                     # GOAWAY(last peer id, code); refuse new peer streams
    out = conn.data_to_send()             # bytes for the transport
    conn.outgoing_size                    # bytes waiting in data_to_send()

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
DATA for a stream already closed               dropped; RST STREAM_CLOSED if it had bytes
DATA after its own FIN                         RST STREAM_CLOSED on that stream
=============================================  ===============================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lib.protocol import muxframe as fr
from lib.errors import ErrorCode, ProtocolError

# muxado v1 fixes the initial window at 64 KiB each way; it cannot be negotiated.
INITIAL_WINDOW = 65536
HEARTBEAT_TYPE = 0xFFFFFEFF
EXTENSION_TYPES_FROM = 0xFFFFFEFF  # 0xFFFFFFFF - 0x100: reserved for extensions
HEARTBEAT_PRIORITY = 0x7FFFFFFF
HEARTBEAT_PING = b"\x00\x00\x00\x00"  # Go's counter is never incremented
# A writer with more to send waits until the window holds a full frame (see _on_wndinc).
SEND_THRESHOLD = fr.MAX_PAYLOAD


@dataclass
class MuxConfig:
    """Limits and tunables of one session. Every default says why it is that number."""

    # Receive window per stream. 64 KiB per round trip would cap a stream at ~8 MiB/s over an
    # 8 ms Tor circuit; 1 MiB lets one stream fill a 100 ms path at 10 MiB/s. Go honours grants
    # above 64 KiB (notes 1.3), so the extra is granted by an early WNDINC at stream open.
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
    # Outgoing bytes queued before writers wait for the transport (backpressure).
    write_high_water: int = 1024 * 1024


# --- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamOpened:
    stream_id: int
    stream_type: int | None = None


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    fin: bool = False


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


Event = (StreamOpened | DataReceived | StreamEnded | StreamReset | WindowOpened | GoAwayReceived
         | HeartbeatEchoed | ConnectionTerminated)


class _Stream:
    """Per-stream protocol state. Lean: 10,000 idle streams must fit in well under 16 KiB each."""

    __slots__ = ("send_window", "credit", "window", "unacked", "local_fin", "remote_fin",
                 "local", "kind")

    def __init__(self, local: bool, kind: int = 0):
        self.send_window = INITIAL_WINDOW  # what the peer lets us send
        self.credit = INITIAL_WINDOW  # what we let the peer send, not yet used
        self.window = INITIAL_WINDOW  # the window level we keep granting back to
        self.unacked = 0  # consumed by the application, not yet granted back
        self.local_fin = False
        self.remote_fin = False
        self.local = local
        self.kind = kind  # 0 user, 1 our heartbeat, 2 peer's heartbeat


_USER, _OUR_HB, _PEER_HB = 0, 1, 2


class MuxConnection:
    """One muxado v1 session's state, fed bytes and asked for bytes."""

    def __init__(self, client: bool, config: MuxConfig | None = None):
        self.config = config or MuxConfig()
        self.client = client
        self._decoder = fr.FrameDecoder()
        self._out: list[bytes] = []
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
        self._peer_hb: int | None = None
        self._hb_id: int | None = None
        self._hb_pending = bytearray()
        self.goaway_sent = False
        self.goaway_received: int | None = None  # the peer's last stream id
        self.terminated: ConnectionTerminated | None = None
        self.refused_streams = 0  # counters for the dashboard
        if self.config.heartbeat:
            self._hb_id = self._open(HEARTBEAT_PRIORITY, HEARTBEAT_TYPE, kind=_OUR_HB)

    # --- output ---------------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self.outgoing_size += len(data)

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self.outgoing_size = 0
        return data

    # --- local actions --------------------------------------------------------------------

    def open_stream(self) -> int:
        if self.terminated is not None:
            raise ProtocolError("session is closed", self.terminated.code)
        if self.goaway_received is not None:
            raise ProtocolError("peer sent GOAWAY: no new streams", ErrorCode.REFUSED_STREAM)
        if self._next_local > fr.STREAM_ID_MASK:
            raise ProtocolError("stream ids exhausted", ErrorCode.REFUSED_STREAM)
        return self._open(None, None, kind=_USER)

    def _open(self, priority: int | None, stream_type: int | None, kind: int) -> int:
        sid = self._next_local
        self._next_local += 2
        st = self._streams[sid] = _Stream(local=True, kind=kind)
        self._emit(fr.encode(fr.Syn(sid, priority, stream_type)))
        if kind == _USER:
            self._grant_extra(sid, st)
        return sid

    def _grant_extra(self, sid: int, st: _Stream) -> None:
        extra = self.config.receive_window - INITIAL_WINDOW
        if extra > 0 and self._window_granted + extra <= self.config.session_window_budget:
            self._window_granted += extra
            st.window += extra
            st.credit += extra
            self._emit(fr.encode(fr.WndInc(sid, extra)))

    def send_data(self, sid: int, data: bytes | memoryview, fin: bool = False) -> int:
        """Queue as much of ``data`` as the peer's window allows; FIN rides on the last frame
        only when all of it fit. Returns the number of bytes taken."""
        st = self._streams.get(sid)
        if st is None or st.local_fin:
            raise ProtocolError(f"stream {sid} is closed for writing", ErrorCode.STREAM_CLOSED)
        total = len(data)
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

    def send_window(self, sid: int) -> int:
        st = self._streams.get(sid)
        return st.send_window if st is not None else 0

    def end_stream(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_fin:
            return
        self._emit(fr.encode_data(sid, b"", True))
        self._local_fin(sid, st)

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
            self._emit(fr.encode_data(sid, b"", True))
        self._drop(sid, st)

    def _drop(self, sid: int, st: _Stream) -> None:
        del self._streams[sid]
        self._window_granted -= st.window - INITIAL_WINDOW
        if not st.local and st.kind == _USER:
            self._peer_streams -= 1
            self._refused_streak = 0

    def acknowledge(self, sid: int, n: int) -> None:
        st = self._streams.get(sid)
        if st is None or st.remote_fin or n <= 0:
            return  # nothing more will come: no window to give back
        st.unacked += n
        # Batch WNDINCs: one per eighth of the window keeps the pipe full at 1/8 the frames.
        if st.unacked >= st.window >> 3:
            self._emit(fr.encode(fr.WndInc(sid, st.unacked)))
            st.credit += st.unacked
            st.unacked = 0

    def stream_accepted(self, sid: int) -> None:
        self._backlog = max(0, self._backlog - 1)

    def send_heartbeat(self) -> bool:
        st = self._streams.get(self._hb_id) if self._hb_id is not None else None
        if st is None or st.send_window < 4 or self.terminated is not None:
            return False
        self.send_data(self._hb_id, HEARTBEAT_PING)
        return True

    def goaway(self, code: int = ErrorCode.NO_ERROR) -> None:
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._emit(fr.encode(fr.GoAway(self._last_remote, code)))

    def terminate(self, code: int, reason: str, remote: bool = False) -> ConnectionTerminated:
        if self.terminated is None:
            if not remote:
                self.goaway(code)
            self.terminated = ConnectionTerminated(code, reason, remote)
        return self.terminated

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self._streams.values() if s.kind == _USER)

    # --- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self.terminated is not None:
            return events
        self._decoder.feed(data)
        try:
            while True:
                f = self._decoder.next_frame()
                if f is None:
                    break
                self._handle(f, events)
                if self.terminated is not None:
                    events.append(self.terminated)
                    break
        except ProtocolError as e:
            events.append(self.terminate(e.code, str(e.args[0])))
        return events

    def _handle(self, f: fr.Frame, events: list[Event]) -> None:
        t = type(f)
        if t is fr.Data:
            self._on_data(f, events)
        elif t is fr.WndInc:
            self._on_wndinc(f, events)
        elif t is fr.Syn:
            self._on_syn(f, events)
        elif t is fr.Rst:
            self._on_rst(f, events)
        else:
            self._on_goaway(f, events)

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
                self._emit(fr.encode(fr.Rst(sid, ErrorCode.STREAM_CLOSED)))
            return
        if st.remote_fin:
            if n:  # data after FIN: that stream is broken, the session is not
                self.reset_stream(sid, ErrorCode.STREAM_CLOSED)
                events.append(StreamReset(sid, ErrorCode.STREAM_CLOSED, remote=False))
            return
        if n > st.credit:
            raise ProtocolError(f"stream {sid}: {n} bytes exceed the window of {st.credit}",
                                ErrorCode.FLOW_CONTROL_ERROR)
        st.credit -= n
        if st.kind == _PEER_HB:
            # Echo the peer's heartbeat at once, byte for byte, and give its window back.
            if n:
                self.send_data(sid, f.data)
                self._emit(fr.encode(fr.WndInc(sid, n)))
                st.credit += n
        elif st.kind == _OUR_HB:
            if n:
                self._hb_pending += f.data
                echoes = len(self._hb_pending) // 4
                del self._hb_pending[: echoes * 4]
                self._emit(fr.encode(fr.WndInc(sid, n)))
                st.credit += n
                if echoes:
                    events.append(HeartbeatEchoed(echoes))
        else:
            events.append(DataReceived(sid, f.data, f.fin))
        if f.fin:
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
        if (sid & 1) != self._remote_parity:
            raise ProtocolError(f"peer opened stream {sid} with our parity")
        if sid <= self._last_remote:
            raise ProtocolError(f"peer reused stream id {sid} (last was {self._last_remote})")
        self._last_remote = sid
        stype = f.stream_type
        if stype is not None and stype >= EXTENSION_TYPES_FROM:
            if stype == HEARTBEAT_TYPE and self._peer_hb is None:
                self._peer_hb = sid
                self._streams[sid] = _Stream(local=False, kind=_PEER_HB)
            else:
                self._emit(fr.encode(fr.Rst(sid, ErrorCode.STREAM_CLOSED)))
            return
        c = self.config
        if self.goaway_sent or self._peer_streams >= c.max_streams or self._backlog >= c.accept_backlog:
            self.refused_streams += 1
            self._refused_streak += 1
            if self._refused_streak > c.max_refused:
                raise ProtocolError(f"SYN flood: {self._refused_streak} streams refused in a row")
            self._emit(fr.encode(fr.Rst(sid, ErrorCode.REFUSED_STREAM)))
            return
        st = self._streams[sid] = _Stream(local=False)
        self._peer_streams += 1
        self._backlog += 1
        if c.grant_peer_streams:
            self._grant_extra(sid, st)
        events.append(StreamOpened(sid, stype))
        if f.fin:  # Go inverts SYN+FIN; we read it as documented: the opener sends nothing
            st.remote_fin = True
            events.append(StreamEnded(sid))

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
            self.goaway_received = min(self.goaway_received, f.last_stream_id)
        else:
            self.goaway_received = f.last_stream_id
        refused = [sid for sid, st in self._streams.items()
                   if st.local and st.kind == _USER and sid > f.last_stream_id]
        for sid in refused:
            self._drop(sid, self._streams[sid])
        events.append(GoAwayReceived(f.last_stream_id, f.code, f.debug, refused))
