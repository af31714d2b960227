"""Socket options, set one way for every connection Shroud makes or accepts.

::

    set_nodelay(sock) -> bool      # Nagle off; False (and nothing raised) if sock is not TCP
                                   # (no system call for an AcceptedSocket: it has it already)
    tune_listener(sock, unsent_lowat)  # TCP_NODELAY and TCP_NOTSENT_LOWAT on a listener, which
                                   # every connection it accepts inherits (Linux)
    accept_queue(listener) -> callable() -> int | None  # connections waiting to be accepted
    AcceptedSocket                 # a gevent socket accepted by a tuned listener: .tcp_tuned,
                                   # .local_name ("host:port" of a one-address listener, else None)
    send_quietly(sock, data)       # a last word before closing: refusals, alerts, redirects
    sender(end) -> callable(data)  # end.sendall, or for a socket one that skips gevent's
                                   # getsockopt(SO_SNDBUF) on every call (send_all)
    adopt_listener(sock) -> gevent socket  # a listener inherited from gunicorn's master
    connect_numeric(family, address, timeout, unsent_lowat=None) -> ConnectedSocket
                                   # TCP, no hub turn when the connection completes at once (a
                                   # listener on this host), options set as it is made
    start_connect(family, address, unsent_lowat=None, first=b"")
                  -> (ConnectedSocket, connected: bool, sent: int)  # ``first`` offered once
                                   # as the connection completes, before the socket's set-up
    finish_connect(sock, address, timeout, unsent_lowat=None)  # connect_numeric in two steps:
                                   # the first never waits, the second waits for the handshake
    recv_copy(sock, bufsize) -> bytes        # sock.recv without a bufsize allocation per call
    recv_scratch(sock, bufsize) -> memoryview  # the same, uncopied: valid until the next yield
    recv_nowait(sock, bufsize) -> bytes      # what is there now, never waiting (a hub callback)
    nowait_reader(sock) -> callable(n) -> bytes  # recv_nowait bound to one socket (below)
    nowait_view_reader(sock) -> callable(n) -> memoryview  # the same, uncopied (or None:
                                   # not a plain gevent socket, no read without waiting)
    nowait_scratch_reader(sock) -> (recv_into, scratch) | None  # the same in two C pieces:
                                   # scratch[:recv_into(scratch, n)], no Python frame per read
    nowait_sender(sock) -> callable(data) -> int # one send() that never waits (BlockingIOError)
    nowait_sendmsg(sock) -> callable(buffers) -> int | None  # the same for many buffers (sendmsg)
    reader(end) -> callable(n) -> bytes      # recv_copy bound to a socket, end.recv for others

Why Nagle is off everywhere: muxado has 64 KiB stream windows (Go's default), so the last small
segment of each window would otherwise wait for the peer's delayed ACK, 40 ms per window; and a
visitor's small request or TLS record would wait the same on every hop (visitor, proxy, Tor,
client, service). Go sets TCP_NODELAY on every connection for the same reason.
"""
from __future__ import annotations

import _socket
import errno
import os
import socket
import struct

import gevent._socket3
import gevent._socketcommon
import gevent.socket


def set_nodelay(sock) -> bool:
    """Turn Nagle's algorithm off on ``sock``; True if it is now off.

    Anything that is not a TCP socket (a socketpair, a WebSocket or TLS transport object, a closed
    socket) is left alone and answers False, so callers need no guard of their own. An
    :class:`AcceptedSocket` has it from its listener, a :class:`ConnectedSocket` from
    :func:`connect_numeric`: no system call.
    """
    if type(sock) in _NODELAY_SET:
        return True
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError, ValueError):
        return False
    return True


class AcceptedSocket(gevent.socket.socket):
    """A connection accepted on a listener prepared by :func:`tune_listener`: TCP_NODELAY and
    TCP_NOTSENT_LOWAT came with it (Linux copies a listener's TCP options to each connection
    it accepts), so they cost no system call per connection (``tcp_tuned``: lib.net.splice
    reads it). ``local_name`` is the listener's "host:port" when it listens on one address,
    which is then every accepted connection's own (getsockname would answer the same); None
    for a wildcard listener.

    Its constructor and ``close`` are gevent's in one Python frame each (gevent's take three
    and six: ``__init__`` and its mixin's; ``close``, ``_real_close``, ``_detach_socket``,
    ``_drop_events_and_close``, and a second close finds a stand-in's ``__bool__``): a public
    connection makes one of each (bench/README.md, "Fresh connections: the proxy's accept").
    tests/test_sockets.py holds both to gevent's on the pinned gevent."""

    __slots__ = ("local_name", "family")
    tcp_tuned = True

    def __init__(self, family, type, proto, fileno, local_name: str | None = None):
        # What gevent's constructor sets (super().__init__ is what this one replaces).
        self._closed = False
        self._io_refs = 0
        self._sock = sock = self._gevent_sock_class(family, type, proto, fileno)
        sock.setblocking(False)
        self.hub = hub = gevent.get_hub()
        io = hub.loop.io
        self._read_event = io(fileno, 1)
        self._write_event = io(fileno, 2)
        self.timeout = _socket.getdefaulttimeout()
        self.local_name = local_name
        # The listener's, kept: gevent's family property makes an enum of the kernel's int on
        # every read (lib.net.splice asks each end for it).
        self.family = family

    def close(self) -> None:
        """gevent's close: waiters on the socket are woken with its cancel error, libev is told
        the descriptor closes (then it is closed), and a stand-in raising EBADF takes its
        place; nothing when closed already."""
        self._closed = True
        sock = self._sock
        if self._io_refs > 0 or type(sock) is _CLOSED:
            return
        events = (self._read_event, self._write_event)
        self._read_event = self._write_event = None
        # The stand-in first, as gevent's: the descriptor may be closed by the call below.
        self._sock = _CLOSED(sock.family, sock.type, sock.proto, sock.fileno(), "closed")
        self.hub.cancel_waits_close_and_then(events, _CANCEL_WAIT, self._drop_ref_on_close, sock)


# gevent's stand-in for a closed socket and the error its waiters get (what its close uses).
_CLOSED = gevent._socket3._closedsocket
_CANCEL_WAIT = gevent._socketcommon.cancel_wait_ex


def accept_queue(listener):
    """A function answering how many connections wait in ``listener``'s accept queue (Linux:
    TCP_INFO's ``tcpi_unacked`` of a listening socket), or None when the kernel does not tell.

    An accept loop asks it after each accept instead of accepting until EAGAIN: an accept4
    that finds nothing costs the kernel a socket, a file and an inode made and freed (~5 us,
    against ~0.9 us for this look), and a connection that arrives alone always made one
    (bench/README.md, "Fresh connections: the proxy's accept")."""
    getsockopt = listener.getsockopt
    try:
        info = getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_LEN or info[0] != _TCP_LISTEN:
        return None
    unpack, level, opt, n = _U32.unpack_from, socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN
    return lambda: unpack(getsockopt(level, opt, n), _UNACKED_AT)[0]


# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields (tcpi_state first), then u32 rto, ato,
# snd_mss, rcv_mss, unacked: for a listener, unacked is its accept queue's length.
_UNACKED_AT = 24
_TCP_INFO_LEN = 28
_TCP_LISTEN = 10
_U32 = struct.Struct("=I")


def tune_listener(sock, unsent_lowat: int) -> None:
    """Set TCP_NODELAY (module doc) and TCP_NOTSENT_LOWAT = ``unsent_lowat`` on the listening
    ``sock``, for every connection it will accept (wrap those in :class:`AcceptedSocket`).

    :raises OSError: the kernel refused either (the caller must then tune each connection).
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, unsent_lowat)


# A refusal is a courtesy to a peer we are about to drop: it may not hold a slot for longer.
SEND_QUIETLY_TIMEOUT = 2.0


def send_quietly(sock, data: bytes, timeout: float = SEND_QUIETLY_TIMEOUT) -> None:
    """Send ``data`` within ``timeout`` seconds, ignoring a peer that is gone or stalls
    (the caller closes the socket next, whatever happened)."""
    try:
        sock.settimeout(timeout)
        sock.sendall(data)
    except OSError:  # socket.timeout and ssl.SSLError are OSErrors too
        pass


_SOCKET_TYPES = (gevent.socket.socket, socket.socket)

# One scratch buffer for the process's socket reads (recv_copy, recv_scratch). A socket's
# recv(n) allocates n bytes per call and then shrinks them to what arrived: for the 256 KiB reads
# of the splice and of the tunnel's TLS that is a large allocation per read, under glibc an mmap
# and munmap (18 us against 3 us for a 100-byte read; under jemalloc 3.7 against 3.3 us, 16 KiB
# 7.5 against 5.8 us: bench/README.md, "Per-request cost"). Sharing it is safe under gevent:
# bytes land in it in the recv_into that returns them, and the caller takes them out before
# anything can yield (a read that has to wait waits before it writes into the buffer). Threads
# other than the hub's must not use these.
SCRATCH_SIZE = 256 * 1024
_scratch = memoryview(bytearray(SCRATCH_SIZE))


def send_all(sock, data) -> None:
    """``sock.sendall(data)`` for a socket, in one ``send`` when the kernel takes it all.

    gevent's sendall asks the kernel for SO_SNDBUF on every call (one more system call per
    write: bench/README.md, "Per-request cost"); a small write that fits the socket buffer, which
    is nearly every write of a request/response exchange, needs only its send(). What send()
    left over (a full buffer) goes through sendall, with its waiting and timeout."""
    n = sock.send(data)
    if n < len(data):
        sock.sendall(memoryview(data)[n:])


def recv_scratch(sock, bufsize: int) -> memoryview:
    """Up to ``bufsize`` (at most SCRATCH_SIZE) bytes read from ``sock`` into the shared
    scratch buffer: a view that is overwritten by the next read, so use it before yielding."""
    n = sock.recv_into(_scratch[:bufsize])
    return _scratch[:n]


def recv_nowait(sock, bufsize: int) -> bytes:
    """What ``sock`` has now, up to ``bufsize`` bytes, through the scratch buffer, never waiting
    (safe in a hub callback; b"" at EOF). BlockingIOError when nothing is there; other errors
    are the socket's. A read(2) on the descriptor: gevent's recv would wait (or raise) by the
    socket's timeout, and the caller must not wait whatever that is."""
    n = os.readv(sock.fileno(), [_scratch[:bufsize]])
    return bytes(_scratch[:n])


def read_watcher(sock):
    """The io watcher (readable) a plain gevent socket waits on in its own reads, or None: a hub
    callback reading the socket may wait on it instead of a watcher of its own (each new one
    costs an ``fcntl(F_GETFD)`` on the descriptor: tests/test_syscall_budget.py). Who starts it
    stops it before the socket's own methods wait again, and never closes it (the socket's
    close does)."""
    if _os_socket(sock) is None:
        return None
    return getattr(sock, "_read_event", None)


def _os_socket(sock):
    """The OS socket under a plain gevent socket, or None. gevent keeps it non-blocking and
    waits on top of it in its own methods, so its ``send``/``recv_into`` are one system call
    that raises BlockingIOError instead of waiting: what a hub callback needs, without gevent's
    Python layer (a frame and a timeout test per call) or a ``fileno()`` per read. None for a
    subclass that changes what those methods mean (gevent's SSLSocket: its bytes are records)."""
    cls = type(sock)
    if (isinstance(sock, gevent.socket.socket) and cls.send is gevent.socket.socket.send
            and cls.recv_into is gevent.socket.socket.recv_into):
        raw = getattr(sock, "_sock", None)
        if isinstance(raw, _socket.socket) and raw.gettimeout() == 0.0:
            return raw
    return None


def nowait_reader(sock):
    """The function ``recv_nowait`` bound to ``sock``: what is there now, up to n bytes, through
    the scratch buffer (b"" at EOF, BlockingIOError when nothing is). On a plain gevent socket a
    ``recv_into`` on its OS socket (bench/README.md, "Per-request cost", kapath pass); the
    object's own close makes it raise EBADF, so a closed socket's reused descriptor is never
    read."""
    raw = _os_socket(sock)
    if raw is None:
        return lambda n: recv_nowait(sock, n)
    recv_into, scratch = raw.recv_into, _scratch

    def read(n: int) -> bytes:
        return bytes(scratch[:recv_into(scratch, n)])
    return read


def nowait_view_reader(sock):
    """As ``nowait_reader`` on a plain gevent socket, uncopied: a view of the scratch buffer,
    overwritten by the next read of it (use it before yielding). None for anything else (no
    OS socket to read without waiting, or bytes that are not the socket's: gevent's SSLSocket),
    which is how a caller tells whether a socket can be read from a hub callback at all (the
    tunnel's TLS and the mux session's hub reader: lib/net/muxsession.py, "Reading")."""
    raw = _os_socket(sock)
    if raw is None:
        return None
    recv_into, scratch = raw.recv_into, _scratch

    def read(n: int) -> memoryview:
        return scratch[:recv_into(scratch, n)]
    return read


def nowait_scratch_reader(sock):
    """What ``nowait_view_reader`` calls, for a caller that reads in a loop of its own: the OS
    socket's bound ``recv_into`` and the scratch buffer it reads into (``scratch[:recv_into(
    scratch, n)]`` is that reader's view), so a read is one C call and no Python frame (the
    tunnel's TLS reads once per keep-alive request in each process: bench/README.md, "Per-request
    cost (issue 16)", branch ka3). None where ``nowait_view_reader`` is None."""
    raw = _os_socket(sock)
    if raw is None:
        return None
    return raw.recv_into, _scratch


def nowait_sender(sock):
    """The function that offers bytes to ``sock`` once, never waiting: the count the kernel
    took, BlockingIOError when it took none; other errors are the socket's. On a plain gevent
    socket its OS socket's bound ``send`` (``_os_socket``); else gevent's with timeout 0."""
    raw = _os_socket(sock)
    if raw is None:
        return lambda data: sock.send(data, 0, 0.0)
    return raw.send


def nowait_sendmsg(sock):
    """As ``nowait_sender`` for a sequence of buffers (one ``sendmsg``, no join), or None when
    ``sock`` is not a plain gevent socket (gevent's own sendmsg waits on EAGAIN). At most
    ``IOV_MAX`` buffers a call."""
    raw = _os_socket(sock)
    if raw is None or type(sock).sendmsg is not gevent.socket.socket.sendmsg:
        return None
    return raw.sendmsg


# sendmsg's bound on buffers per call (Linux: 1024). sysconf answers -1 where the bound is
# indeterminate; POSIX's minimum is 16, Linux's kernel constant 1024.
IOV_MAX = (os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else -1)
IOV_MAX = IOV_MAX if IOV_MAX > 0 else 1024


def recv_copy(sock, bufsize: int) -> bytes:
    """``sock.recv(bufsize)`` through the scratch buffer: a copy of what arrived only."""
    n = sock.recv_into(_scratch[:bufsize])
    return bytes(_scratch[:n])


def reader(end):
    """The function that reads up to n bytes from ``end``: :func:`recv_copy` bound to a socket,
    ``end.recv`` for anything else (a mux stream hands out its frames without a copy)."""
    if isinstance(end, _SOCKET_TYPES):
        return lambda n: recv_copy(end, n)
    return end.recv


def sender(end):
    """The function that sends all of a bytes-like object on ``end``: :func:`send_all` bound to
    a socket, ``end.sendall`` for anything else (mux streams, TLS and HTTP wrappers)."""
    if isinstance(end, _SOCKET_TYPES):
        return lambda data: send_all(end, data)
    return end.sendall
def adopt_listener(sock):
    """A gevent socket owning ``sock``'s descriptor: ``sock`` is a listener opened before the
    fork (lib/proxy/prefork.py) by the unpatched master. The old object lets go of the
    descriptor (detach), so it is not closed twice; the master's own copy stays open."""
    if isinstance(sock, gevent.socket.socket):
        return sock
    family = sock.family
    return gevent.socket.socket(family, socket.SOCK_STREAM, fileno=sock.detach())


# The enum members for the kernel's ints, looked up without the enum's call (two Python calls
# per connection: ConnectedSocket).
_FAMILIES = {int(f): f for f in (socket.AF_INET, socket.AF_INET6)}


class ConnectedSocket(gevent.socket.socket):
    """A TCP connection made by :func:`connect_numeric`: a gevent socket built around a native
    socket created non-blocking (SOCK_NONBLOCK), with TCP_NODELAY and, when asked,
    TCP_NOTSENT_LOWAT set at creation (``tcp_tuned``: set_nodelay and lib.net.splice skip
    theirs). gevent's own constructor makes an already non-blocking socket non-blocking again
    (an ioctl), and wrapping a descriptor made elsewhere costs CPython a getsockname: two system
    calls per connection to a local target that this constructor does not make. It sets what
    gevent's does (tests/test_sockets.py compares the two on the pinned gevent)."""

    __slots__ = ("tcp_tuned", "family")

    def __init__(self, family: int, raw=None):  # noqa: super().__init__ is what this replaces
        self.tcp_tuned = False
        # Kept, as AcceptedSocket keeps it: gevent's family property makes an enum of the
        # kernel's int on every read (lib.net.splice asks each end for it).
        self.family = _FAMILIES.get(family) or socket.AddressFamily(family)
        self._closed = False
        self._io_refs = 0
        # ``raw``: the native socket made already, of that class (start_connect's connect and
        # first send come before this set-up).
        self._sock = raw if raw is not None else self._gevent_sock_class(
            family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, socket.IPPROTO_TCP)
        self.hub = hub = gevent.get_hub()
        fd = self._sock.fileno()
        self._read_event = hub.loop.io(fd, 1)
        self._write_event = hub.loop.io(fd, 2)
        self.timeout = None

    def close(self) -> None:
        """gevent's close, in one step when nothing waits on the socket (its two watchers
        neither active nor pending, no makefile): the watchers closed, then the descriptor; a
        later call on it raises EBADF, as on gevent's closed-socket stand-in. gevent's own way
        (a hub call that cancels waits, the stand-in, a look at the loop's watchers of the
        descriptor: ~7 Python calls per connection) is kept for a socket a greenlet still waits
        on, which must be woken with an error before the descriptor can be reused."""
        read, write = self._read_event, self._write_event
        if (read is None or self._io_refs > 0 or read.active or read.pending or write.active
                or write.pending):
            super().close()
            return
        self._closed = True
        self._read_event = self._write_event = None
        read.close()
        write.close()
        self._sock.close()


# Sockets born with TCP_NODELAY: set_nodelay makes no system call for them.
_NODELAY_SET = (AcceptedSocket, ConnectedSocket)


def connect_numeric(family: int, address: tuple, timeout: float | None,
                    unsent_lowat: int | None = None) -> ConnectedSocket:
    """A :class:`ConnectedSocket` connected to the numeric ``address`` (its timeout None), with
    TCP_NODELAY (module doc) and TCP_NOTSENT_LOWAT = ``unsent_lowat`` when given.

    A connection to a listener on this host is complete when connect() returns (Linux answers
    the handshake in the caller's own system call), yet a non-blocking connect() says
    EINPROGRESS and gevent's ``connect`` then waits a hub turn for writability, with a Timeout
    armed: a second connect_ex looks first, and only a connection still in progress waits, at
    most ``timeout`` seconds (socket.timeout). Errors are OSErrors, as from ``connect``.

    System calls: socket, connect (twice), the two options: no ioctl, getsockname or
    getsockopt(SO_PROTOCOL), which the plain way makes (ConnectedSocket)."""
    sock, done, _ = start_connect(family, address, unsent_lowat)
    if not done:
        finish_connect(sock, address, timeout, unsent_lowat)
    return sock


def start_connect(family: int, address: tuple, unsent_lowat: int | None = None,
                  first=b"") -> tuple[ConnectedSocket, bool, int]:
    """:func:`connect_numeric`'s steps that never wait (a hub callback or a session's reader
    may call it): (the socket, True, sent) once connected, its options set; (the socket, False,
    0) while the handshake is in progress (:func:`finish_connect` waits for it). Errors are
    OSErrors, the socket closed.

    ``first`` (a request) is offered to the native socket once, as soon as the connection is
    complete, before the options and the gevent socket's watchers are made (two setsockopt,
    two fcntl): ``sent`` is the count it took, 0 also when the send failed (the caller's next
    send meets the error again). The client's request to its local target leaves first
    (bench/README.md, "Fresh connections: the client's critical path"); TCP_NODELAY does not
    hold back a connection's first segment, and the next send finds both options set."""
    raw = ConnectedSocket._gevent_sock_class(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK,
                                             socket.IPPROTO_TCP)
    try:
        err = raw.connect_ex(address)
        if err == errno.EINPROGRESS:
            err = raw.connect_ex(address)
        sent = 0
        if first and err in (0, errno.EISCONN):
            try:
                sent = raw.send(first)
            except OSError:
                pass
    except BaseException:
        raw.close()
        raise
    sock = ConnectedSocket(family, raw)
    if err in (errno.EALREADY, errno.EINPROGRESS):
        return sock, False, 0
    try:
        _connected(sock, err, unsent_lowat)
    except BaseException:
        sock.close()
        raise
    return sock, True, sent


def finish_connect(sock: ConnectedSocket, address: tuple, timeout: float | None,
                   unsent_lowat: int | None = None) -> None:
    """Wait at most ``timeout`` seconds (socket.timeout) for the handshake
    :func:`start_connect` left in progress, then set the options; errors close the socket."""
    raw = sock._sock
    try:
        gevent.socket.wait_write(raw.fileno(), timeout=timeout)
        _connected(sock, raw.connect_ex(address), unsent_lowat)
    except BaseException:
        sock.close()
        raise


def _connected(sock: ConnectedSocket, err: int, unsent_lowat: int | None) -> None:
    if err not in (0, errno.EISCONN):
        raise OSError(err, os.strerror(err))
    raw = sock._sock
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if unsent_lowat is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, unsent_lowat)
        except OSError:
            pass  # an older kernel: the socket buffer's own bound applies (lib.net.splice)
        else:
            sock.tcp_tuned = True
