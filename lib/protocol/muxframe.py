"""muxado v1 frames: encoding and incremental decoding, with no I/O.

Public API::

    encode(frame) -> bytes                 # any of Syn, Data, Rst, WndInc, GoAway
    encode_data(stream_id, payload, fin)   # fast path for DATA, returns bytes
    FrameDecoder()                         # .feed(bytes); .next_frame() -> frame | None
                                           # raises ProtocolError; .buffered bytes left unread

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

# Go muxado GOAWAY writer bug: it declares 16 + len(debug) but writes only the 8 fixed bytes.
GOAWAY_FIXED = 8


@dataclass(frozen=True, slots=True)
class Syn:
    stream_id: int
    priority: int | None = None
    stream_type: int | None = None
    fin: bool = False


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    data: bytes = b""
    fin: bool = False


@dataclass(frozen=True, slots=True)
class Rst:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class WndInc:
    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
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
        if not 0 < frame.increment <= STREAM_ID_MASK:
            raise ValueError(f"window increment {frame.increment} out of range")
        return _header(4, 0, TYPE_WNDINC, frame.stream_id) + U32.pack(frame.increment)
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
    """

    __slots__ = ("_buf", "_pos", "_skip", "_failed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0  # GOAWAY remainder still to discard (see _goaway)
        self._failed = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: Buffer) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if self._pos:
            # Compact once per feed rather than per frame: O(leftover), not O(buffer).
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        if self._failed:
            raise ProtocolError("decoder used after a protocol error")
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        word, flags, ftype, sid = HEADER.unpack_from(buf, pos)
        length = word & LENGTH_MASK
        ftype &= TYPE_MASK
        sid &= STREAM_ID_MASK
        if ftype == TYPE_GOAWAY:
            return self._goaway(length, pos)
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        start = pos + HEADER_SIZE
        try:
            if ftype == TYPE_DATA:
                frame: Frame = Data(sid, bytes(buf[start:end]), bool(flags & FLAG_FIN))
            elif ftype == TYPE_WNDINC:
                self._expect(length == 4, "WNDINC length must be 4", ErrorCode.FRAME_SIZE_ERROR)
                frame = WndInc(sid, U32.unpack_from(buf, start)[0] & STREAM_ID_MASK)
            elif ftype == TYPE_SYN:
                frame = self._syn(sid, flags, length, start)
            elif ftype == TYPE_RST:
                self._expect(length == 4, "RST length must be 4", ErrorCode.FRAME_SIZE_ERROR)
                frame = Rst(sid, U32.unpack_from(buf, start)[0])
            else:
                self._fail(f"unknown frame type {ftype}", ErrorCode.PROTOCOL_ERROR)
            if sid == 0:
                self._fail(f"frame type {ftype} on stream 0", ErrorCode.PROTOCOL_ERROR)
        except ProtocolError:
            self._failed = True
            raise
        self._pos = end
        return frame

    def _syn(self, sid: int, flags: int, length: int, start: int) -> Syn:
        want = 4 * bool(flags & FLAG_PRIORITY) + 4 * bool(flags & FLAG_STREAMTYPE)
        self._expect(length == want, f"SYN length {length} does not match flags {flags:#x}",
                     ErrorCode.FRAME_SIZE_ERROR)
        priority = stream_type = None
        if flags & FLAG_PRIORITY:
            priority = U32.unpack_from(self._buf, start)[0] & STREAM_ID_MASK
            start += 4
        if flags & FLAG_STREAMTYPE:
            stream_type = U32.unpack_from(self._buf, start)[0]
        return Syn(sid, priority, stream_type, bool(flags & FLAG_FIN))

    def _goaway(self, length: int, pos: int) -> GoAway | None:
        # Read the 8 fixed bytes and distrust the declared remainder: Go declares debug bytes it
        # never writes, then closes the transport. Whatever of the remainder does arrive is
        # discarded as it comes (a correct peer that sends debug text stays in sync).
        if length < GOAWAY_FIXED:
            self._failed = True
            raise ProtocolError(f"GOAWAY length {length} < 8", ErrorCode.FRAME_SIZE_ERROR)
        end = pos + HEADER_SIZE + GOAWAY_FIXED
        if len(self._buf) < end:
            return None
        last, code = U32X2.unpack_from(self._buf, pos + HEADER_SIZE)
        remainder = length - GOAWAY_FIXED
        available = min(remainder, len(self._buf) - end)
        debug = bytes(self._buf[end:end + available])
        self._pos = end + available
        self._skip = remainder - available
        return GoAway(last & STREAM_ID_MASK, code, debug)

    def _expect(self, ok: bool, message: str, code: ErrorCode) -> None:
        if not ok:
            self._fail(message, code)

    @staticmethod
    def _fail(message: str, code: ErrorCode) -> None:
        raise ProtocolError(message, code)
