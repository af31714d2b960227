"""TLS for tunnels through a MemoryBIO: many TLS records per system call.

    tls = TLSTransport.client(sock, context, server_hostname=None, timeout=30.0)
    tls = TLSTransport.server(sock, context, timeout=15.0)
    tls.recv(n) / tls.sendall(data) / tls.close() / tls.getpeercert(binary_form=True) ...
    tls.recv_view(n) -> memoryview      # recv without a copy: valid until the next recv/recv_view
    if tls.reads_nowait: tls.read_nowait(n) -> memoryview | None   # never waits (below);
                                        # n at most RAW_READ
    tls.read_buffered                   # bytes received, not yet returned: read before waiting
    if tls.write_idle: tls.write_nowait(data) -> bool   # never waits, never yields (below)
                                        # write_idle: a gevent socket, no write under way, no tail
    tls.flush_tail()                                    # what write_nowait left, sent (waits)

Why not ``SSLSocket``: its ``recv`` returns at most one TLS record per call. Go muxado writes
each frame header and payload as two writes, so a Go peer's window updates arrive as two tiny
records each; through SSLSocket that is two trips through gevent and the kernel per 12 bytes,
which capped Python -> Go throughput. Here the raw socket is read 256 KiB at a time and every
record already received is decrypted in one go, so the mux reader gets all of them in one
``recv``. Writes encrypt into the outgoing BIO and go out in one ``sendall``.

Cooperative use: one greenlet reads while another writes (the mux session does exactly that);
SSLObject calls never yield, and the raw socket's writes are serialised by a lock. Post-handshake
records produced while reading (TLS 1.3 key updates) go out with the next write.

``waits_before_read``: True when the next ``recv`` that needs bytes from the kernel will first
wait for the socket to be readable, i.e. yield to the hub. A raw read that came back small (less
than a record: a request or an answer) left the kernel's buffer empty, so the next one would
fail with EAGAIN (a system call and an exception for nothing) and then wait: waiting first skips
that, and the mux reader skips its own yield after such a read (lib/net/muxsession.py,
``_read_loop``).

``read_nowait`` is ``recv_view`` for a caller that must not wait: the mux session's hub reader,
an io watcher's callback (lib/net/muxsession.py, "Reading"). It decrypts what was received, or
first reads the socket once without waiting; None when no whole record has come (wait for
readability then), an empty view at EOF. ``read_buffered`` says that bytes are left to decrypt
(a read stopped at ``n``): read again before waiting, the socket may hold nothing more. Records
a read produces (post-handshake) are offered to the kernel without waiting, or go with the
write under way; what the kernel leaves is the tail (below).

``write_nowait`` is for a caller that must not wait: the mux session's flush, a hub callback
(lib/net/muxsession.py, "Writing"). It encrypts everything and offers it to the kernel without
waiting or yielding; what the kernel did not take is the *tail*, which every later write (and
``flush_tail``) sends first, so records leave in the order they were sealed.
"""
from __future__ import annotations

import socket
import ssl

import gevent
import gevent.socket
from gevent.lock import Semaphore

from lib.net.sockets import nowait_scratch_reader, nowait_sender, recv_scratch, sender

RAW_READ = 256 * 1024
# A TLS record carries at most 16 KiB of plaintext, and SSLObject.read(n) allocates n bytes
# before it shrinks them to what one record held: asking for more than a record allocated 256 KiB
# per record (lib.net.sockets.SCRATCH_SIZE says what that costs).
RECORD = 16 * 1024
# A raw read shorter than this (one full record) looks like a request or an answer, after which
# the next read would find nothing: wait for readability first (waits_before_read). A longer
# one that still did not fill RAW_READ is most likely a bulk transfer we drained faster than it
# comes, and more has arrived while we decoded it: read at once. Waiting first after every
# short read cost a Python sink a hub turn per read, +30-50 % CPU per GiB from a Go sender.
WAIT_FIRST_BELOW = RECORD
# Records decrypted per read at most: a peer's 1-byte records (11,000 in one 253 KB write) were
# all decrypted in one hub callback, 33-72 ms of the hub (docs/SECURITY.md). A read that stops
# here says so (read_buffered) and the mux session reads on from a callback, as after a full
# read. Two records a frame (Go writes a frame's header and payload apart) for the session's
# YIELD_FRAMES (256) frames a piece: a bulk read of a Go peer's grants is not cut shorter.
RECORDS_PER_READ = 512
SEND_PIECE = 32 * 1024
# ...but a piece takes the rest with it when the rest is shorter than this: a batch of two mux
# frames (2 x 16,391 bytes) went out as a 32 KiB send() and a second one of 14 bytes (two
# system calls and a 14-byte record where one of each does).
SEND_SLACK = SEND_PIECE // 2
WHOLE_PIECE = SEND_PIECE + SEND_SLACK  # shorter than this: sealed in one piece


def _piece(view: memoryview) -> memoryview:
    """The next piece to seal: SEND_PIECE, or all of it when only a short rest would follow."""
    return view if len(view) < WHOLE_PIECE else view[:SEND_PIECE]


def _ssl_calls(obj) -> tuple:
    """(read, write, pending) of a TLS object. Under a plain ``ssl.SSLObject``, its C object's
    own bound methods: ssl.py's ``read``/``write``/``pending`` only pass each call on, a Python
    frame each, and a keep-alive request reads and writes once in each process (bench/README.md,
    "Per-request cost (issue 16)", branch ka3). A subclass keeps its own: it may change them."""
    inner = getattr(obj, "_sslobj", None) if type(obj) is ssl.SSLObject else None
    if inner is None:
        return obj.read, obj.write, obj.pending
    return inner.read, inner.write, inner.pending


class TLSTransport:
    def __init__(self, sock, context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None):
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        self._ssl_read, self._ssl_write, self._ssl_pending = _ssl_calls(self._obj)
        self._wlock = Semaphore()  # taken by _hold_writes, which keeps write_idle
        self._send = sender(sock)  # one send() per small write (lib.net.sockets.send_all)
        # write_nowait's one send(), never waiting (lib.net.sockets.nowait_sender)
        self._send_now = nowait_sender(sock) if isinstance(sock, gevent.socket.socket) else None
        # read_nowait's raw read, scratch[:recv_now(scratch, n)] (two C calls), or None
        self._recv_now, self._scratch = nowait_scratch_reader(sock) or (None, None)
        self._eof = False
        self._closed = False
        # Waiting for readability before a read, on gevent sockets only (a mux stream under a
        # TLS ended in the client has no descriptor): see waits_before_read.
        self._hub = gevent.get_hub() if isinstance(sock, gevent.socket.socket) else None
        self._readable = None  # an io watcher, made on first use
        self._drained = False  # the last raw read came back small (WAIT_FIRST_BELOW)
        self._empty = False  # recv_view returned with nothing left to decrypt
        self._plain: memoryview | None = None  # recv_view's buffer, made on first use
        self._tail = b""  # sealed records write_nowait could not send: they go out first
        # write_nowait may run (a gevent socket, no write under way, no tail): an attribute
        # kept where any of the three changes, not a property (the mux session's flush reads it
        # once per keep-alive request: bench/README.md, "Per-request cost (issue 16)", branch ka3)
        self.write_idle = self._hub is not None

    @classmethod
    def client(cls, sock, context, server_hostname=None, timeout: float | None = 30.0):
        t = cls(sock, context, False, server_hostname)
        t._handshake(timeout)
        return t

    @classmethod
    def server(cls, sock, context, timeout: float | None = 15.0):
        t = cls(sock, context, True)
        t._handshake(timeout)
        return t

    def _handshake(self, timeout: float | None) -> None:
        old = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            while True:
                try:
                    self._obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self._fill()
            self._flush()
        finally:
            self._sock.settimeout(old)

    def _fill(self) -> None:
        data = self._sock.recv(RAW_READ)
        if not data:
            self._in.write_eof()
            raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")
        self._in.write(data)

    def _flush(self) -> None:
        if self._out.pending:
            self._hold_writes()
            try:
                self._send_tail()
                data = self._out.read()
                if data:
                    self._send(data)
            finally:
                self._free_writes()

    def _hold_writes(self) -> None:
        """The write lock, for a write that may wait: write_nowait may not run meanwhile."""
        self._wlock.acquire()
        self.write_idle = False

    def _free_writes(self) -> None:
        self._wlock.release()
        self.write_idle = self._hub is not None and not self._tail and not self._wlock.locked()

    # --- socket-like surface --------------------------------------------------------------

    def recv(self, n: int = RAW_READ) -> bytes:
        """Everything decrypted so far, up to ``n`` bytes; waits for at least one byte."""
        return bytes(self.recv_view(n))

    def recv_view(self, n: int = RAW_READ) -> memoryview:
        """As ``recv``, without a copy: a view of this transport's own plaintext buffer, valid
        until its next ``recv``, ``recv_view`` or ``read_nowait`` (the mux reader decodes it in
        place before it reads again: lib/net/muxsession.py). Records are decrypted straight
        into the buffer, with no allocation per record and no join (bench/README.md, "Bulk and
        the multiplexer against Go")."""
        view = self._decrypt(min(n, RAW_READ), self._read_raw)
        if self._out.pending and not self._wlock.locked():
            self._flush()
        return view

    @property
    def reads_nowait(self) -> bool:
        """True when ``read_nowait`` may be used: a plain gevent socket under us, read by
        nobody else, with no timeout of its own (a read's timeout would not apply)."""
        return self._recv_now is not None and self._sock.timeout is None

    @property
    def read_buffered(self) -> bool:
        """Bytes received and not yet returned (a read stopped at its ``n``): the next read
        returns them without the socket, which may hold nothing more."""
        return not self._empty

    def _decrypt(self, n: int = RAW_READ, fill=None) -> memoryview | None:
        """Up to ``n`` (at most RAW_READ: recv_view clamps it, the mux session asks READ_SIZE,
        the same) bytes of plaintext into the buffer; ``fill(size)`` reads the socket when
        nothing is left to decrypt (bytes for the incoming BIO, empty at EOF: recv_view's).
        Without it, read_nowait: the OS socket's ``recv_into`` once, None when nothing came."""
        view = self._plain
        if view is None:
            view = self._plain = memoryview(bytearray(RAW_READ))
        size = 0
        read, incoming = self._ssl_read, self._in
        # Nothing was left to decrypt when the last call returned, and only a fill feeds the
        # BIO since: no need to ask before the first raw read.
        empty = self._empty
        short = False  # the last record read gave less than asked: none of it is left
        records = RECORDS_PER_READ
        while size < n:
            # Only with bytes to decrypt: else read raises SSLWantReadError, an exception built
            # (message and all) twice per read that ends a request, ~1.7 us each
            # (bench/README.md, "Per-request cost (issue 16)", kapath pass). And no pending()
            # after a short read ("Keep-alive per request: the tunnel read from the hub"): a
            # call into ssl.py per read for nothing.
            if not empty and (incoming.pending or not short and self._ssl_pending()):
                want = min(n - size, RECORD)
                try:
                    got = read(want, view[size:])
                except ssl.SSLWantReadError:
                    got = -1  # a record's start only: the rest is still to come
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    got = 0
                if got > 0:
                    size += got
                    short = got < want
                    records -= 1
                    if records:
                        continue
                    self._empty = not (incoming.pending or self._ssl_pending())  # RECORDS_PER_READ
                    break
                if got == 0:
                    self._eof = True
                    break
            if size:
                self._empty = True  # (waits_before_read)
                break
            if self._eof:
                break
            if fill is not None:
                raw = fill(RAW_READ)
            else:
                try:
                    raw = self._scratch[:self._recv_now(self._scratch, RAW_READ)]
                except BlockingIOError:  # nothing yet, or a record's start only: wait
                    return None
            if not raw:
                # The peer's TCP FIN: reading is over. The BIO is not told (write_eof would
                # also stop our writes), so a half-closed transport can still send.
                self._eof = True
                break
            incoming.write(raw)
            empty = self._empty = False
        else:  # stopped at n: is there more? (read_buffered)
            self._empty = not (incoming.pending or self._ssl_pending())
        if fill is None and self._out.pending and self.write_idle:
            # Records the read produced (post-handshake): offered once, never waiting; what
            # the kernel leaves is the tail, which the next write sends first. Not idle: the
            # write under way takes them with its next record.
            self.write_nowait(b"")
        return view[:size]

    # As ``recv_view``, never waiting or yielding (module doc): None when no whole record is
    # there yet, an empty view at EOF. Errors are the socket's and the TLS layer's. _decrypt
    # itself, one Python frame per read (the mux session's hub reader reads once per keep-alive
    # request in each process: bench/README.md, "Per-request cost (issue 16)", branch ka3).
    read_nowait = _decrypt

    @property
    def waits_before_read(self) -> bool:
        # _empty: recv_view left nothing to decrypt. .timeout: a gevent socket's own attribute
        # (_hub), read without gevent's gettimeout().
        return (self._drained and self._empty and self._hub is not None
                and self._sock.timeout is None)

    def _read_raw(self, n: int):
        """Up to ``n`` bytes from the socket, waiting for them (empty at EOF): for the BIO at
        once (a view of the shared scratch buffer, no ``n``-byte allocation per read:
        lib.net.sockets.SCRATCH_SIZE)."""
        if self._hub is None:  # not a socket (a mux stream under a TLS ended in the client)
            raw = self._sock.recv(n)
        else:
            if self._drained and self._sock.timeout is None:  # (waits_before_read)
                if self._readable is None:
                    self._readable = self._hub.loop.io(self._sock.fileno(), 1)
                self._hub.wait(self._readable)
            raw = recv_scratch(self._sock, n)
        self._drained = len(raw) < WAIT_FIRST_BELOW
        return raw

    def sendall(self, data) -> None:
        self._hold_writes()
        try:
            self._send_tail()
            view = memoryview(data)
            while view:
                # Encrypt and send 32 KiB at a time: the peer decrypts one piece while we
                # encrypt the next (encrypting a whole MiB first halved throughput).
                n = self._ssl_write(_piece(view))
                view = view[n:]
                self._send(self._out.read())
        finally:
            self._free_writes()

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    def write_nowait(self, data) -> bool:
        """Encrypt ``data`` and offer it to the kernel, never waiting or yielding; only when
        ``write_idle``. True: all of it left. False: the kernel took part; the rest is the
        tail (module doc). Errors are the socket's (OSError), as from sendall. The write lock
        is not taken: nothing here yields, so no other greenlet could see it held; a keep-alive
        request's write is one piece, sealed and sent with no Python frame under this one
        (bench/README.md, "Per-request cost (issue 16)", branch ka3)."""
        write, whole = self._ssl_write, WHOLE_PIECE  # (_piece, inline)
        view = data if len(data) < whole else memoryview(data)
        while True:  # SEND_PIECE at a time, as sendall: the peer decrypts while we seal
            if view:  # (empty: only the records a read produced, read_nowait)
                view = view[write(view if len(view) < whole else view[:SEND_PIECE]):]
            sealed = self._out.read()
            try:
                sent = self._send_now(sealed)
            except BlockingIOError:
                sent = 0
            if sent < len(sealed):
                while view:
                    view = view[write(view if len(view) < whole else view[:SEND_PIECE]):]
                self._tail = sealed[sent:] + self._out.read()
                self.write_idle = False  # until flush_tail sends it
                return False
            if not view:
                return True

    def flush_tail(self) -> None:
        """Send what write_nowait left (waiting for the socket, as sendall)."""
        if self._tail:
            self._hold_writes()
            try:
                self._send_tail()
            finally:
                self._free_writes()

    def _send_tail(self) -> None:
        if self._tail:
            tail, self._tail = self._tail, b""
            self._send(tail)

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._readable is not None:  # a reader waiting on it gets EBADF, as gevent's own
                self._hub.cancel_wait(self._readable, gevent.socket.cancel_wait_ex, True)
            self._sock.close()

    def getpeercert(self, binary_form: bool = False):
        return self._obj.getpeercert(binary_form)

    def selected_alpn_protocol(self):
        return self._obj.selected_alpn_protocol()

    def version(self):
        return self._obj.version()

    def setsockopt(self, *args) -> None:
        self._sock.setsockopt(*args)

    def getsockname(self):
        return self._sock.getsockname()

    def getpeername(self):
        return self._sock.getpeername()

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()
