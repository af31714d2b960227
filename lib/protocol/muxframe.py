"""muxado v1 frames: encoding and incremental decoding, with no I/O.

Public API::

    encode(frame) -> bytes                 # any of Syn, Data, Rst, WndInc, GoAway
    encode_data(stream_id, payload, fin)   # fast path for DATA, returns bytes
    encode_wndinc(stream_id, increment)    # fast path for WNDINC
    FrameDecoder()                         # .feed(bytes); .next_frame() -> frame | None
                                           # raises ProtocolError; .buffered bytes left unread;
                                           # .detach(): let go of the fed buffer (class doc)
                                           # .whole_data(piece) -> Data | None: a piece that is
                                           # one DATA frame, nothing carried (no feed needed)

The wire format is documented in docs/PROTOCOL.md ("Framing: muxado v1"); every integer is
big-endian and a frame is an 8-byte header plus ``length`` payload bytes::

    0-1  reserved:2  length:14     2  flags     3  reserved:3  type:5     4-7  reserved:1  id:31

The decoder checks what can be checked frame by frame (types, lengths, stream id 0); rules that
need session state (id order, windows) live in ``lib.protocol.muxstate``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from lib.errors import ErrorCode, ProtocolError

# What the public functions take as bytes (any buffer: a socket's bytes, a bytearray, a view).
Buffer = bytes | bytearray | memoryview

HEADER = struct.Struct(">HBBI")
HEADER_SIZE = 8
U32 = struct.Struct(">I")
U32X2 = struct.Struct(">II")
WNDINC = struct.Struct(">HBBII")  # header and increment

# The header's length field has 14 bits.
MAX_PAYLOAD = 0x3FFF
STREAM_ID_MASK = 0x7FFFFFFF
LENGTH_MASK = 0x3FFF
TYPE_MASK = 0x1F

TYPE_SYN = 1
TYPE_RST = 2
TYPE_DATA = 3
TYPE_WNDINC = 4
TYPE_PRI = 5  # defined by muxado, never sent; Go kills the session on receipt
TYPE_GOAWAY = 6

FLAG_FIN = 0x01
FLAG_PRIORITY = 0x02
FLAG_STREAMTYPE = 0x04
_SYN_FIELDS = FLAG_PRIORITY | FLAG_STREAMTYPE  # each adds 4 bytes to a SYN

# Go muxado GOAWAY writer bug: it declares 16 + len(debug) but writes only the 8 fixed bytes.
GOAWAY_FIXED = 8

# Frames are values: compared, hashed, never changed once made. Not frozen=True: a frozen
# dataclass sets each field through object.__setattr__, 1.4 us to make a Data against 0.3 us,
# paid on every frame received (bench/README.md, "Bulk and the multiplexer against Go").
_FRAME = {"slots": True, "unsafe_hash": True}


@dataclass(**_FRAME)
class Syn:
    stream_id: int
    priority: int | None = None
    stream_type: int | None = None
    fin: bool = False


@dataclass(**_FRAME)
class Data:
    stream_id: int
    data: bytes = b""
    fin: bool = False


@dataclass(**_FRAME)
class Rst:
    stream_id: int
    code: int


@dataclass(**_FRAME)
class WndInc:
    stream_id: int
    increment: int


@dataclass(**_FRAME)
class GoAway:
    last_stream_id: int
    code: int
    debug: bytes = b""
    stream_id: int = 0


Frame = Syn | Data | Rst | WndInc | GoAway


def _header(length: int, flags: int, ftype: int, stream_id: int) -> bytes:
    return HEADER.pack(length, flags, ftype, stream_id)


def encode_data(stream_id: int, payload: Buffer = b"", fin: bool = False) -> bytes:
    """One DATA frame (payload of at most MAX_PAYLOAD bytes)."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"DATA payload of {n} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(n, FLAG_FIN if fin else 0, TYPE_DATA, stream_id) + payload


def encode_wndinc(stream_id: int, increment: int) -> bytes:
    """One WNDINC frame (the window updates a reader sends as it consumes), in one pack."""
    if not 0 < increment <= STREAM_ID_MASK:
        raise ValueError(f"window increment {increment} out of range")
    return WNDINC.pack(4, 0, TYPE_WNDINC, stream_id, increment)


def encode(frame: object) -> bytes:  # object: a non-frame gets the TypeError below
    """The wire bytes of one frame, exactly as Go muxado's encoder writes them (GOAWAY: length 8)."""
    if isinstance(frame, Data):
        return encode_data(frame.stream_id, frame.data, frame.fin)
    if isinstance(frame, Syn):
        flags = FLAG_FIN if frame.fin else 0
        body = b""
        if frame.priority is not None:
            flags |= FLAG_PRIORITY
            body += U32.pack(frame.priority & STREAM_ID_MASK)
        if frame.stream_type is not None:
            flags |= FLAG_STREAMTYPE
            body += U32.pack(frame.stream_type)
        return _header(len(body), flags, TYPE_SYN, frame.stream_id) + body
    if isinstance(frame, WndInc):
        return encode_wndinc(frame.stream_id, frame.increment)
    if isinstance(frame, Rst):
        return _header(4, 0, TYPE_RST, frame.stream_id) + U32.pack(frame.code)
    if isinstance(frame, GoAway):
        # Debug bytes are never sent: Go's reader mis-sizes them (docs/PROTOCOL.md, "Frame"), so length is 8.
        return _header(GOAWAY_FIXED, 0, TYPE_GOAWAY, 0) + U32X2.pack(
            frame.last_stream_id & STREAM_ID_MASK, frame.code
        )
    raise TypeError(f"not a muxado frame: {frame!r}")


class FrameDecoder:
    """Incremental decoder: feed bytes in any pieces, take whole frames out.

    Bytes after the last complete frame stay buffered (``buffered``) for the next call. A frame
    that breaks a stateless rule raises ``ProtocolError`` with the GOAWAY code to send; after that
    the decoder is unusable (the session is over).

    Copies: a fed piece is decoded where it lies (a DATA payload is the one copy of its bytes);
    only a frame's start that the piece ends in the middle of is copied into the decoder's own
    buffer, and completed from the next piece with just the bytes it lacks. So the decoder keeps
    a view of the caller's data until ``next_frame`` returns None (every byte decoded or
    carried) or ``detach()`` is called: a caller that stops taking frames before that and then
    reuses its buffer calls ``detach()`` first (lib.protocol.muxstate does, at its frame budget).
    Bulk data was copied three times before (the piece into the buffer, the payload out as a
    bytearray, that into bytes): bench/README.md, "Bulk and the multiplexer against Go".
    """

    __slots__ = ("_buf", "_pos", "_src", "_spos", "_skip", "_failed")

    def __init__(self) -> None:
        self._buf = bytearray()  # bytes carried over from earlier pieces (usually < 1 frame)
        self._pos = 0  # decoded up to here in _buf
        self._src: memoryview | None = None  # the piece being decoded in place
        self._spos = 0  # decoded up to here in _src
        self._skip = 0  # GOAWAY remainder still to discard (see _goaway)
        self._failed = False

    @property
    def buffered(self) -> int:
        src = self._src
        return len(self._buf) - self._pos + (len(src) - self._spos if src is not None else 0)

    def feed(self, data: Buffer) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        if not view:
            return
        if self._src is not None:  # fed again before the last piece was decoded: keep its rest
            self._carry()
        self._src, self._spos = view, 0

    def detach(self) -> None:
        """Let go of the caller's buffer (class doc): what is not decoded yet is copied. With
        nothing carried, the copy becomes the piece decoded in place, so the frames after a
        budget (lib.protocol.muxstate) still take the inline path of ``next_frame``, not the
        carried one (a Go peer's grants come ~40 to a read, and hundreds in a dense one:
        bench/README.md, "Whole frames and the Python peers against Go")."""
        src = self._src
        if src is None:
            return
        if self._pos >= len(self._buf) and len(src) - self._spos > HEADER_SIZE:
            self._buf.clear()
            self._pos = 0
            self._src, self._spos = memoryview(bytes(src[self._spos:])), 0
            return
        self._carry()

    def whole_data(self, piece: Buffer) -> "Data | None":
        """The DATA frame ``piece`` is, when it is exactly one (header and payload, a nonzero
        stream id) and nothing is carried or pending from earlier pieces: what ``feed`` and two
        ``next_frame`` calls would give, in one call (a keep-alive request or answer is such a
        read: bench/README.md, "Per-request cost (issue 16)", branch kaone). None otherwise, the
        decoder untouched: feed the piece as usual."""
        if self._buf or self._src is not None or self._skip or self._failed:
            return None
        if len(piece) < HEADER_SIZE:
            return None
        word, flags, ftype, sid = HEADER.unpack_from(piece, 0)
        sid &= STREAM_ID_MASK
        if ((word & LENGTH_MASK) + HEADER_SIZE != len(piece) or ftype & TYPE_MASK != TYPE_DATA
                or not sid):
            return None
        return Data(sid, bytes(piece[HEADER_SIZE:]), bool(flags & FLAG_FIN))

    def _carry(self) -> None:
        """Copy what is not decoded yet into the decoder's own buffer (a frame's start, or the
        rest of a piece fed again before it was decoded)."""
        src = self._src
        if src is None:
            return
        self._src = None
        rest = src[self._spos:]
        if rest:
            self._compact()
            self._buf += rest

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def next_frame(self) -> Frame | None:
        if self._failed:
            raise ProtocolError("decoder used after a protocol error")
        src = self._src
        if src is not None and not self._buf:
            # The common frames inline: a whole DATA frame, or a WNDINC (a Go peer sends one
            # per Read), in the fed piece, nothing carried (what _next_in_place and _decode
            # do for them, two or three calls fewer per frame: bench/README.md, "Per-request
            # cost (issue 16)", kapath pass, and "Whole frames and the Python peers against
            # Go").
            pos = self._spos
            start = pos + HEADER_SIZE
            if start <= len(src):
                word, flags, ftype, sid = HEADER.unpack_from(src, pos)
                length = word & LENGTH_MASK
                end = start + length
                sid &= STREAM_ID_MASK
                if sid and end <= len(src):
                    ftype &= TYPE_MASK
                    if ftype == TYPE_DATA:
                        self._spos = end
                        return Data(sid, bytes(src[start:end]), bool(flags & FLAG_FIN))
                    if ftype == TYPE_WNDINC and length == 4:
                        self._spos = end
                        return WndInc(sid, U32.unpack_from(src, start)[0] & STREAM_ID_MASK)
                    if ftype == TYPE_SYN and not length and not flags & _SYN_FIELDS:
                        # A SYN with no priority and no type (every stream the proxy opens,
                        # one per fresh connection: bench/README.md, "Per-request cost
                        # (issue 16)", branch fmux); with fields or a length, _syn checks them.
                        self._spos = end
                        return Syn(sid, None, None, bool(flags & FLAG_FIN))
            elif pos == len(src):  # all of the piece decoded: nothing to carry
                self._src = None
                return None
        try:
            if self._pos < len(self._buf):
                return self._next_carried()
            return self._next_in_place()
        except ProtocolError:
            self._failed = True
            self._src = None
            raise

    def _next_in_place(self) -> Frame | None:
        """The next frame from the fed piece itself (nothing carried over)."""
        src = self._src
        if src is None:
            return None
        pos = self._spos
        avail = len(src) - pos
        if avail >= HEADER_SIZE:
            word, flags, ftype, sid = HEADER.unpack_from(src, pos)
            length = word & LENGTH_MASK
            ftype &= TYPE_MASK
            if ftype == TYPE_GOAWAY:
                frame, used = self._goaway(src, pos, length, avail)
                if frame is not None:
                    self._spos = pos + used
                    return frame
            elif avail >= HEADER_SIZE + length:
                self._spos = pos + HEADER_SIZE + length
                return self._decode(src, pos + HEADER_SIZE, length, flags, ftype,
                                    sid & STREAM_ID_MASK)
        # A frame's start only: carried until the rest comes (the piece is done with).
        self._carry()
        return None

    def _next_carried(self) -> Frame | None:
        """The next frame from the carried bytes, topped up from the fed piece with just the
        bytes the frame lacks."""
        if not self._top_up(HEADER_SIZE):
            return None
        buf = self._buf
        word, flags, ftype, sid = HEADER.unpack_from(buf, self._pos)
        length = word & LENGTH_MASK
        ftype &= TYPE_MASK
        if ftype == TYPE_GOAWAY:
            if length >= GOAWAY_FIXED:
                self._carry()  # the debug bytes available count: all of them carried (rare)
            pos = self._pos  # (topping up and detaching compact the buffer: _pos moves)
            with memoryview(buf) as view:
                frame, used = self._goaway(view, pos, length, len(buf) - pos)
            if frame is not None:
                self._done_carried(pos + used)
            return frame
        if not self._top_up(HEADER_SIZE + length):
            return None
        pos = self._pos
        with memoryview(buf) as view:
            frame = self._decode(view, pos + HEADER_SIZE, length, flags, ftype,
                                 sid & STREAM_ID_MASK)
        self._done_carried(pos + HEADER_SIZE + length)
        return frame

    def _top_up(self, want: int) -> bool:
        """Carry bytes from the fed piece until ``want`` are buffered past _pos; False (the piece
        used up) if it holds fewer."""
        lack = want - (len(self._buf) - self._pos)
        if lack <= 0:
            return True
        src = self._src
        if src is None:
            return False
        self._compact()
        take = src[self._spos:self._spos + lack]
        self._buf += take
        self._spos += len(take)
        if self._spos >= len(src):
            self._src = None
        return len(take) == lack

    def _done_carried(self, end: int) -> None:
        if end >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = end

    def _decode(self, buf, start: int, length: int, flags: int, ftype: int, sid: int) -> Frame:
        """The frame whose payload is buf[start:start + length] (all of it there)."""
        if ftype == TYPE_DATA:
            frame: Frame = Data(sid, bytes(buf[start:start + length]), bool(flags & FLAG_FIN))
        elif ftype == TYPE_WNDINC:
            self._expect(length == 4, "WNDINC length must be 4", ErrorCode.FRAME_SIZE_ERROR)
            frame = WndInc(sid, U32.unpack_from(buf, start)[0] & STREAM_ID_MASK)
        elif ftype == TYPE_SYN:
            frame = self._syn(buf, sid, flags, length, start)
        elif ftype == TYPE_RST:
            self._expect(length == 4, "RST length must be 4", ErrorCode.FRAME_SIZE_ERROR)
            frame = Rst(sid, U32.unpack_from(buf, start)[0])
        else:
            self._fail(f"unknown frame type {ftype}", ErrorCode.PROTOCOL_ERROR)
        if sid == 0:
            self._fail(f"frame type {ftype} on stream 0", ErrorCode.PROTOCOL_ERROR)
        return frame

    def _syn(self, buf, sid: int, flags: int, length: int, start: int) -> Syn:
        want = 4 * bool(flags & FLAG_PRIORITY) + 4 * bool(flags & FLAG_STREAMTYPE)
        self._expect(length == want, f"SYN length {length} does not match flags {flags:#x}",
                     ErrorCode.FRAME_SIZE_ERROR)
        priority = stream_type = None
        if flags & FLAG_PRIORITY:
            priority = U32.unpack_from(buf, start)[0] & STREAM_ID_MASK
            start += 4
        if flags & FLAG_STREAMTYPE:
            stream_type = U32.unpack_from(buf, start)[0]
        return Syn(sid, priority, stream_type, bool(flags & FLAG_FIN))

    def _goaway(self, buf, pos: int, length: int, avail: int) -> tuple[GoAway | None, int]:
        """(the GOAWAY at buf[pos:], bytes it used) or (None, 0) while its 16 fixed bytes are
        not all there. Read the 8 fixed bytes and distrust the declared remainder: Go declares
        debug bytes it never writes, then closes the transport. Whatever of the remainder does
        arrive is discarded as it comes (a correct peer that sends debug text stays in sync)."""
        if length < GOAWAY_FIXED:
            self._fail(f"GOAWAY length {length} < 8", ErrorCode.FRAME_SIZE_ERROR)
        fixed = HEADER_SIZE + GOAWAY_FIXED
        if avail < fixed:
            return None, 0
        last, code = U32X2.unpack_from(buf, pos + HEADER_SIZE)
        remainder = length - GOAWAY_FIXED
        available = min(remainder, avail - fixed)
        debug = bytes(buf[pos + fixed:pos + fixed + available])
        self._skip = remainder - available
        return GoAway(last & STREAM_ID_MASK, code, debug), fixed + available

    def _expect(self, ok: bool, message: str, code: ErrorCode) -> None:
        if not ok:
            self._fail(message, code)

    @staticmethod
    def _fail(message: str, code: ErrorCode) -> None:
        raise ProtocolError(message, code)
