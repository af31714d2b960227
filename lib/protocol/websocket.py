"""WebSocket (RFC 6455) without I/O: the opening handshake and the framing, for tunnels.

Shroud carries a tunnel's muxado bytes inside binary WebSocket messages when the proxy sits
behind a platform router that only speaks HTTP (docs/DEPLOY.md). Only what that needs is here:
no extensions, no subprotocols, binary messages treated as one byte stream (message boundaries
carry no meaning), text messages refused.

Public API::

    # handshake
    key = new_key()                                   # Sec-WebSocket-Key (16 random bytes, b64)
    client_request(host, path, key) -> bytes          # the GET ... Upgrade: websocket head
    check_server_response(head, key)                  # raises HandshakeError unless a good 101
    req = parse_upgrade_request(head) -> UpgradeRequest(path, host, key, headers)
    server_response(key) -> bytes                     # the 101 Switching Protocols head
    accept_key(key) -> str
    split_head(buf) -> (head, rest) | None            # end of an HTTP head, bounded

    # frames
    encode_frame(opcode, payload, *, fin=True, mask_key=None) -> bytes
    parse_frame(buf, *, max_payload, expect_masked) -> (Frame, consumed) | None
    apply_mask(data, key) -> bytes

    # a connection's framing state
    conn = WebSocketConnection(client=True)
    events = conn.receive_data(data)   # [DataReceived | PingReceived | PongReceived | CloseReceived]
    conn.data_to_send() -> bytes       # pongs and the close reply owed to the peer
    conn.send_data(data) -> bytes      # binary frames, masked when we are the client
    conn.send_ping(payload) / conn.send_close(code, reason) -> bytes

    WebSocketError(ValueError)  .close_code      HandshakeError(httphead.HeadError) .http_status
    MAX_PAYLOAD, MAX_SEND_FRAME, MAX_HEAD, CLOSE_* codes, OP_* opcodes
"""
from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass, field

from lib.errors import ShroudError
from lib.protocol import httphead
from lib.protocol.httphead import HeadError, http_error_response

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_KNOWN_OPS = {OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG}

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005  # never sent: "no code in the close frame"
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

# Bounds.
# Largest frame payload accepted. Our sender never exceeds MAX_SEND_FRAME; a platform router
# passes frames through untouched (it does not re-frame an upgraded connection), so 1 MiB is 16x
# what a Shroud peer sends and caps what one frame can make us buffer.
MAX_PAYLOAD = 1 << 20
# Largest frame we send: 64 KiB is four muxado data frames, big enough that the 2-14 bytes of
# WebSocket header are noise, small enough that masking one frame costs microseconds.
MAX_SEND_FRAME = 64 * 1024
# Largest opening-handshake head (request or response). Ours are ~250 bytes; a router adds a few
# X-Forwarded-* headers. Same bound as the Host sniffer (lib.protocol.sniff.MAX_HTTP_HEAD).
MAX_HEAD = 16384
MAX_CONTROL_PAYLOAD = 125  # RFC 6455 5.5


class WebSocketError(ShroudError, ValueError):
    """The peer broke the framing rules; close the connection with ``close_code``."""

    def __init__(self, reason: str, close_code: int = CLOSE_PROTOCOL_ERROR):
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


class HandshakeError(HeadError):
    """The opening handshake is not acceptable; answer ``http_status`` (server side)."""


# --- handshake -----------------------------------------------------------------------------

def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def split_head(buf: bytes) -> tuple[bytes, bytes] | None:
    """Split an HTTP head (up to and including the blank line) from what follows.

    :returns: ``(head, rest)``, or ``None`` when the head is not complete yet.
    :raises HandshakeError: no end of head within ``MAX_HEAD`` bytes (431).
    """
    try:
        return httphead.split_head(buf, MAX_HEAD)
    except HeadError as e:
        raise HandshakeError(e.reason, e.http_status) from None


def _headers(head) -> dict[str, str]:
    # Repeated headers join with commas (RFC 9110 5.3), as a proxy would.
    return {name: head.get(name) for name, _ in head.fields}


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


@dataclass(frozen=True)
class UpgradeRequest:
    path: str
    host: str
    key: str
    headers: dict[str, str] = field(default_factory=dict)


def client_request(host: str, path: str, key: str) -> bytes:
    """The client's opening handshake (RFC 6455 4.1). ``host`` may carry ``:port``."""
    if not path.startswith("/"):
        raise ValueError("WebSocket path must start with '/'")
    for part in (host, path, key):
        if any(c in part for c in "\r\n ") or not part.isascii():
            raise ValueError(f"bad character in WebSocket handshake field {part!r}")
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode("ascii")


def parse_upgrade_request(head: bytes) -> UpgradeRequest:
    """Check a client's opening handshake (RFC 6455 4.2.1).

    :raises HandshakeError: with the status to answer (400, 405, 426 for a plain request).
    """
    try:
        request = httphead.parse_request_head(head)
    except HeadError as e:
        raise HandshakeError(e.reason, e.http_status) from None
    headers, method, path = _headers(request), request.method, request.target
    if method != "GET":
        raise HandshakeError(f"WebSocket handshake must be GET, not {method}", 405)
    if request.version != "1.1":
        raise HandshakeError("WebSocket handshake needs HTTP/1.1")
    if headers.get("upgrade", "").lower() != "websocket" or \
            "upgrade" not in _tokens(headers.get("connection", "")):
        raise HandshakeError("this endpoint only accepts WebSocket upgrades", 426)
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError("unsupported Sec-WebSocket-Version (need 13)", 426)
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HandshakeError("bad Sec-WebSocket-Key") from None
    return UpgradeRequest(path=path, host=headers.get("host", ""), key=key, headers=headers)


def server_response(key: str) -> bytes:
    """The server's 101 answer to a valid upgrade request."""
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode("ascii")


def handshake_refusal(status: int, reason: str) -> bytes:
    """A short plain-text HTTP error that closes the connection."""
    extra = [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")] if status == 426 else []
    return http_error_response(status, None, reason + "\n", headers=extra, version="1.1")


def check_server_response(head: bytes, key: str) -> None:
    """Check the server's answer to our handshake (RFC 6455 4.1, client requirements).

    :raises HandshakeError: anything but a 101 with the right Upgrade, Connection and Accept.
    """
    try:
        response = httphead.parse_response_head(head)
    except HeadError as e:
        raise HandshakeError(e.reason, 0) from None
    headers = _headers(response)
    if response.status != 101:
        raise HandshakeError(f"server answered {response.status} {response.phrase[:120]} "
                             f"instead of 101 Switching Protocols", response.status)
    if headers.get("upgrade", "").lower() != "websocket" or \
            "upgrade" not in _tokens(headers.get("connection", "")):
        raise HandshakeError("101 without Upgrade: websocket / Connection: Upgrade")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError("wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions"):
        raise HandshakeError("server chose an extension we did not offer")


# --- frames ----------------------------------------------------------------------------------

def apply_mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated (masking and unmasking are the same)."""
    n = len(data)
    if n == 0:
        return b""
    # One big-integer XOR: a few microseconds per 64 KiB, versus milliseconds byte by byte.
    reps = (n + 3) // 4
    k = int.from_bytes(key * reps, "big") >> (8 * (reps * 4 - n))
    return (int.from_bytes(data, "big") ^ k).to_bytes(n, "big")


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True,
                 mask_key: bytes | None = None) -> bytes:
    """One frame; ``mask_key`` (4 bytes) for frames a client sends (RFC 6455 5.3)."""
    if opcode not in _KNOWN_OPS:
        raise ValueError(f"unknown opcode {opcode}")
    n = len(payload)
    if opcode >= OP_CLOSE and (n > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames carry at most 125 bytes and are never fragmented")
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask_key is not None else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 65536:
        head.append(mask_bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack(">Q", n)
    if mask_key is not None:
        if len(mask_key) != 4:
            raise ValueError("mask key must be 4 bytes")
        return bytes(head) + mask_key + apply_mask(bytes(payload), mask_key)
    return bytes(head) + bytes(payload)


def parse_frame(buf, *, max_payload: int = MAX_PAYLOAD,
                expect_masked: bool) -> tuple[Frame, int] | None:
    """Parse one frame from the start of ``buf``.

    :param expect_masked: True on the server (client frames MUST be masked), False on the
        client (server frames MUST NOT be), RFC 6455 5.1.
    :returns: ``(frame, bytes consumed)`` with the payload unmasked, or ``None`` if ``buf``
        holds only part of a frame (the header is checked as soon as it has arrived, so an
        oversized or malformed frame is refused before its payload is read).
    :raises WebSocketError: with the close code to send.
    """
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
    masked, n = bool(b1 & 0x80), b1 & 0x7F
    if rsv:
        raise WebSocketError("reserved bits set (no extension was negotiated)")
    if opcode not in _KNOWN_OPS:
        raise WebSocketError(f"unknown opcode 0x{opcode:x}")
    if masked != expect_masked:
        raise WebSocketError("client frames must be masked" if expect_masked
                             else "server frames must not be masked")
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack_from(">H", buf, 2)[0]
        if n < 126:
            raise WebSocketError("non-minimal payload length")
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack_from(">Q", buf, 2)[0]
        if n >> 63:
            raise WebSocketError("payload length with the high bit set")
        if n < 65536:
            raise WebSocketError("non-minimal payload length")
        pos = 10
    if opcode >= OP_CLOSE:
        if not fin:
            raise WebSocketError("fragmented control frame")
        if n > MAX_CONTROL_PAYLOAD:
            raise WebSocketError("control frame payload over 125 bytes")
    if n > max_payload:
        raise WebSocketError(f"frame of {n} bytes exceeds {max_payload}", CLOSE_MESSAGE_TOO_BIG)
    key = None
    if masked:
        if len(buf) < pos + 4:
            return None
        key = bytes(buf[pos:pos + 4])
        pos += 4
    end = pos + n
    if len(buf) < end:
        return None
    payload = bytes(buf[pos:end])
    if key is not None:
        payload = apply_mask(payload, key)
    return Frame(fin, opcode, payload), end


# --- connection --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True)
class PingReceived:
    payload: bytes


@dataclass(frozen=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True)
class CloseReceived:
    code: int
    reason: str


class WebSocketConnection:
    """Framing state of one side: binary messages as a byte stream, control frames answered.

    ``receive_data`` returns events and queues what the peer is owed (a pong per ping, the close
    reply); ``data_to_send`` hands those bytes out. After a close frame is received, further
    bytes are ignored. Frames we send are masked when ``client`` (with ``rand(4)`` keys).
    """

    def __init__(self, client: bool, max_payload: int = MAX_PAYLOAD, rand=os.urandom):
        self.client = client
        self.max_payload = max_payload
        self._rand = rand
        self._buf = bytearray()
        self._out = bytearray()
        self._in_message: int | None = None  # opcode of the fragmented message under way
        self.close_sent = False
        self.close_received: CloseReceived | None = None

    def _mask(self) -> bytes | None:
        return self._rand(4) if self.client else None

    def receive_data(self, data: bytes) -> list:
        """Feed bytes from the peer; returns the events they complete.

        :raises WebSocketError: a framing violation; send ``send_close(e.close_code)`` and
            close the connection.
        """
        if self.close_received is not None:
            return []
        self._buf += data
        events: list = []
        pos = 0
        view = memoryview(self._buf)
        try:
            while True:
                with view[pos:] as rest:
                    parsed = parse_frame(rest, max_payload=self.max_payload,
                                         expect_masked=not self.client)
                if parsed is None:
                    break
                frame, used = parsed
                pos += used
                ev = self._on_frame(frame)
                if ev is not None:
                    events.append(ev)
                    if isinstance(ev, CloseReceived):
                        break
        finally:
            view.release()  # the bytearray cannot shrink while a view of it exists
            del self._buf[:pos]
        return events

    def _on_frame(self, frame: Frame):
        op = frame.opcode
        if op == OP_PING:
            if not self.close_sent:
                self._out += encode_frame(OP_PONG, frame.payload, mask_key=self._mask())
            return PingReceived(frame.payload)
        if op == OP_PONG:
            return PongReceived(frame.payload)
        if op == OP_CLOSE:
            ev = _parse_close(frame.payload)
            self.close_received = ev
            if not self.close_sent:
                # Echo the code (RFC 6455 5.5.1); 1005 means "none given": answer 1000.
                code = CLOSE_NORMAL if ev.code == CLOSE_NO_STATUS else ev.code
                self._out += self.send_close(code)
            return ev
        # Data frames: a message starts with TEXT/BINARY and goes on with CONTINUATIONs.
        if op == OP_CONTINUATION:
            if self._in_message is None:
                raise WebSocketError("continuation frame outside a message")
        else:
            if self._in_message is not None:
                raise WebSocketError("new message before the previous one finished")
            if op == OP_TEXT:
                raise WebSocketError("text messages are not part of a tunnel",
                                     CLOSE_UNSUPPORTED_DATA)
            self._in_message = op
        if frame.fin:
            self._in_message = None
        return DataReceived(frame.payload) if frame.payload else None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_data(self, data) -> bytes:
        """Binary message(s) carrying ``data``, at most MAX_SEND_FRAME bytes per frame."""
        if self.close_sent:
            raise WebSocketError("WebSocket already closed by us", CLOSE_NORMAL)
        view = memoryview(data)
        parts = []
        for i in range(0, len(view), MAX_SEND_FRAME):
            parts.append(encode_frame(OP_BINARY, view[i:i + MAX_SEND_FRAME],
                                      mask_key=self._mask()))
        return b"".join(parts)

    def send_ping(self, payload: bytes = b"") -> bytes:
        return encode_frame(OP_PING, payload, mask_key=self._mask())

    def send_close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        if self.close_sent:
            return b""
        self.close_sent = True
        # Cut on a character boundary: half a UTF-8 character would make the peer fail the
        # close with 1007 instead of reading our code.
        text = reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")
        payload = struct.pack(">H", code) + text.encode("utf-8")
        return encode_frame(OP_CLOSE, payload, mask_key=self._mask())


def _parse_close(payload: bytes) -> CloseReceived:
    if not payload:
        return CloseReceived(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        raise WebSocketError("close frame with a 1-byte payload")
    code = struct.unpack(">H", payload[:2])[0]
    # RFC 6455 7.4: 1000-1003, 1007-1011 and 3000-4999 may appear on the wire.
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise WebSocketError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError("close reason is not UTF-8", 1007) from None
    return CloseReceived(code, reason)
