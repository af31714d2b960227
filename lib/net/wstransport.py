"""A WebSocket as a socket-like byte stream, so a muxado Session can run over it.

Public API::

    transport = client_handshake(sock, host, path, timeout)    # after TLS for wss://
    transport = WebSocketTransport(sock, client=False, leftover=b"")   # after the server's 101
    transport.recv(n) -> bytes (b"" at close)   transport.sendall(data)
    transport.shutdown(how)   transport.close()   transport.settimeout(t)

Bytes written go out as binary frames (masked by the client); binary frames received are
delivered as bytes in order; pings are answered (``PING_BURST`` at once, then ``PING_RATE`` a
second: a peer pinging faster gets close 1008 and the transport fails with a ``PeerFlood``,
whose ``hostile`` the mux session reports); a close frame ends the stream (b"") after the close
reply. Socket writes are serialised by a lock: the mux session's writer greenlet and its
reader (answering pings) both write. The codec is lib.protocol.websocket (sans-I/O).

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import logging
import socket
import time

import gevent
import gevent.lock

from lib.protocol import httphead
from lib.protocol import websocket as ws
from lib.errors import ShroudError
from lib.net.sockets import reader

log = logging.getLogger("shroud.websocket")

# Bytes read from the socket per call: as lib.net.muxsession reads (many frames per call is what keeps the
# Python side fast); a frame is at most lib.protocol.websocket.MAX_PAYLOAD, buffered until whole.
READ_SIZE = 256 * 1024
# How long a close frame may take to leave before we just close the socket.
CLOSE_SEND_TIMEOUT = 2.0
# Pings a peer may make us answer: a platform's router pings every few tens of seconds; each
# pong is a write the peer provoked (docs/SECURITY.md, "Tunnel sessions").
PING_BURST = 32
PING_RATE = 8.0
CLOSE_POLICY_VIOLATION = 1008  # RFC 6455 7.4.1


class PeerFlood(ShroudError, ConnectionResetError):
    """The peer provoked more answers than allowed; the session it carried was hostile."""

    hostile = True


class WebSocketTransport:
    """Binary WebSocket messages as one byte stream, with the socket interface lib.net.muxsession uses."""

    def __init__(self, sock, client: bool, leftover: bytes = b"", rand=None):
        self.sock = sock
        self.conn = (ws.WebSocketConnection(client) if rand is None
                     else ws.WebSocketConnection(client, rand=rand))
        self._pending = bytearray()  # application bytes received, not yet returned by recv
        self._leftover = bytes(leftover)  # bytes read past the handshake head
        self._read = reader(sock)  # a plain socket: no READ_SIZE allocation per read
        self._eof = False
        self._write_lock = gevent.lock.Semaphore()
        self.close_code: int | None = None
        self._pings = float(PING_BURST)  # a token bucket for pongs
        self._pings_stamp = time.monotonic()

    # --- reading -----------------------------------------------------------------------

    def recv(self, bufsize: int = 65536) -> bytes:
        while not self._pending:
            if self._eof:
                return b""
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                data = self._read(READ_SIZE)
            if not data:
                self._eof = True
                return b""
            self._feed(data)
        out = bytes(self._pending[:bufsize])
        del self._pending[:bufsize]
        return out

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        data = self.recv(nbytes or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _feed(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ws.WebSocketError as e:
            log.info("websocket: closing on a framing error: %s", e)
            self._send_raw(self.conn.send_close(e.close_code, e.reason[:100]), quiet=True)
            self._eof = True
            raise ConnectionResetError(f"WebSocket protocol error: {e}") from None
        pings = 0
        for ev in events:
            if isinstance(ev, ws.DataReceived):
                self._pending += ev.data
            elif isinstance(ev, ws.CloseReceived):
                self.close_code = ev.code
                self._eof = True
            elif isinstance(ev, ws.PingReceived):
                pings += 1
        if pings:
            self._take_pings(pings)
        owed = self.conn.data_to_send()
        if owed:
            self._send_raw(owed, quiet=True)

    def _take_pings(self, n: int) -> None:
        now = time.monotonic()
        self._pings = min(float(PING_BURST), self._pings + (now - self._pings_stamp) * PING_RATE)
        self._pings_stamp = now
        self._pings -= n
        if self._pings < 0:
            self.conn.data_to_send()  # the pongs owed are not sent
            self._send_raw(self.conn.send_close(CLOSE_POLICY_VIOLATION, "too many pings"),
                           quiet=True)
            self._eof = True
            raise PeerFlood(f"WebSocket peer sent more than {PING_BURST} pings at once or "
                            f"{PING_RATE:g} a second")

    # --- writing -----------------------------------------------------------------------

    def sendall(self, data) -> None:
        if not data:
            return
        try:
            frames = self.conn.send_data(data)
        except ws.WebSocketError:
            raise BrokenPipeError("WebSocket already closed") from None
        self._send_raw(frames)

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    def _send_raw(self, data: bytes, quiet: bool = False) -> None:
        if not data:
            return
        try:
            with self._write_lock:
                self.sock.sendall(data)
        except OSError:
            if not quiet:
                raise

    # --- closing and socket odds and ends ---------------------------------------------------

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._send_close(ws.CLOSE_NORMAL)
        self.sock.shutdown(how)

    def close(self) -> None:
        self._send_close(ws.CLOSE_NORMAL)
        try:
            self.sock.close()
        except OSError:
            pass

    def _send_close(self, code: int) -> None:
        frame = self.conn.send_close(code)
        if frame:
            try:
                with gevent.Timeout(CLOSE_SEND_TIMEOUT):
                    self._send_raw(frame, quiet=True)
            except gevent.Timeout:
                pass

    def settimeout(self, timeout) -> None:
        self.sock.settimeout(timeout)

    def gettimeout(self):
        return self.sock.gettimeout()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def fileno(self) -> int:
        return self.sock.fileno()

    def getpeername(self):
        return self.sock.getpeername()


def read_head(sock, timeout: float) -> tuple[bytes, bytes]:
    """Read an HTTP head from ``sock``: ``(head, bytes after it)``, within ``timeout`` seconds.

    :raises HandshakeError: oversized head; :raises OSError: EOF or timeout.
    """
    buf = bytearray()
    searched = 0  # the head's end is not before this (each byte is searched about once)
    with gevent.Timeout(timeout, TimeoutError(f"no complete HTTP head within {timeout:g} s")):
        while True:
            data = sock.recv(4096)
            if not data:
                raise ConnectionResetError("connection closed during the WebSocket handshake")
            buf += data
            # Split only once the end is here or the bound is passed: splitting the whole
            # buffer on every read took 1.6 s of CPU for a 16 KiB head sent a byte a time.
            if (httphead.END_OF_HEAD_RE.search(buf, searched) is None
                    and len(buf) < ws.MAX_HEAD):
                searched = max(0, len(buf) - 3)
                continue
            split = ws.split_head(bytes(buf))
            if split is not None:
                return split


def client_handshake(sock, host: str, path: str, timeout: float) -> WebSocketTransport:
    """Do the client's opening handshake on a connected (TLS) socket.

    :param host: the Host header (``name`` or ``name:port``).
    :raises HandshakeError: the server did not switch protocols (its status is in the text).
    """
    key = ws.new_key()
    sock.sendall(ws.client_request(host, path, key))
    head, rest = read_head(sock, timeout)
    ws.check_server_response(head, key)
    return WebSocketTransport(sock, client=True, leftover=rest)
