"""The project's exceptions: one base, ``ShroudError``, and each module's errors under it.

Catch ``ShroudError`` for "anything Shroud refused or failed on purpose"; catch a module's own
class for its meaning. Each error keeps the builtin base its callers catch (a codec's error is a
``ValueError``, a stream's an ``OSError``) and carries what to answer on the wire::

    ShroudError
      +- MuxError (OSError)          .code: the muxado ErrorCode for RST/GOAWY   lib.errors
      |    +- ProtocolError          the peer broke muxado v1; fatal for its session
      |    |    +- PeerAbuse         it provoked more than a bound allows: hostile  lib.errors
      |    +- SessionClosed          the session is gone (GOAWAY, transport EOF, close(), heartbeat)
      |    +- StreamError
      |         +- StreamReset       RST received (or sent by us); .code is the RST code
      |         +- StreamClosed      use of a direction already shut down or a closed stream
      |         +- StreamTimeout     also a TimeoutError, like a socket timeout
      +- MessageError (ValueError)   a go-tunnel message that does not decode   lib.protocol.messages
      +- SniffError (ValueError)     .alert (TLS) / .http_status (HTTP) to answer  lib.protocol.sniff
      +- HeadError (ValueError)      .http_status to answer                      lib.protocol.httphead
      |    +- HandshakeError         a WebSocket opening handshake we refuse     lib.protocol.websocket
      +- WebSocketError (ValueError) .close_code to close with                   lib.protocol.websocket
      +- FramingError (ValueError)   a routed exchange's request or response we  lib.protocol.http1
      |                              do not frame (smuggling, not HTTP/1.x)
      +- AddressError (ValueError)   not HOST:PORT (the message names the input) lib.hostport
      +- PinMismatch (ValueError)    .fingerprint the peer presented             lib.certs
      +- CertificateError (ValueError) a certificate or key file cannot be used  lib.certs
      +- IdentityError               the identity key file cannot be used        lib.identity
      +- PeerFlood (ConnectionResetError) a WebSocket peer over its ping bound lib.net.wstransport
      +- DnsError                    .kind (nxdomain, servfail, timeout...)      lib.net.dnsclient
      +- TunnelError                 .permanent: not worth retrying soon         lib.client.tunnels
      +- TorError                    tor missing, failed, or refused             lib.client.tor
      |    +- TorConnectError        also a ConnectionError: tor's SOCKS reply
      +- DiscoveryError (ValueError) no proxies found, and why                   lib.client.discovery
      +- OwnershipError              the ownership store failed                  lib.proxy.store.base
      |    +- StoreUnavailable       .code: the bind answer (store-unavailable)
      +- ClaimRefused                .code: the bind answer (limit)              lib.proxy.store.base
      +- PreforkError                a listener setting the master cannot honour lib.proxy.prefork
      +- MessageError (workers)      a sibling worker's message we refuse        lib.proxy.workers
      +- LinkRefused                 a fleet link the holder will not serve      lib.proxy.hostlinks
      +- NoStore                     a block on a proxy without a store (503)    lib.proxy.actions
      +- PeekTimeout                 no routing name within the peek deadline    lib.proxy.server
      +- ListenError (OSError)       a listener cannot open: .listener, .addr    lib.errors
      +- QueryError (ValueError)     an API query parameter we cannot honour     lib.admin.dashboard
      +- TestnetError                the private Tor network did not start       lib.testnet

``MuxError`` subclasses ``OSError`` so that splice code handling sockets handles streams the same
way; no raw socket error leaves a stream except as one of these.

A library's own errors are caught by their documented tree, never by ``except Exception``:
stem's ``stem.ControllerError`` / ``stem.SocketError``, ``ssl.SSLError``, ``OSError``, h11's
``h11.ProtocolError``.
"""
from __future__ import annotations

import enum
import errno


class ErrorCode(enum.IntEnum):
    """RST and GOAWAY codes of muxado v1 (Go never sends a RST code >= 8 but accepts any)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    REFUSED_STREAM = 6
    CANCEL = 7


def code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN_{code}"


class ShroudError(Exception):
    """Base of every error Shroud raises on purpose (the tree is in the module docstring)."""


class ListenError(ShroudError, OSError):
    """A listener could not open its address. ``listener`` names it ("tunnel", "https",
    "http", "discovery", "admin"), ``addr`` is the address as the operator gave it, ``errno``
    the system's reason. :meth:`line` is the one line an operator reads, naming the flag."""

    # errno -> what to do about it (the rest: the system's own words)
    _FIXES = {
        errno.EADDRINUSE: "address already in use; choose another port or stop the process "
                          "using it",
        errno.EACCES: "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE "
                      "(docs/DEPLOY.md), or choose a port above 1023",
        errno.EADDRNOTAVAIL: "no such address on this machine; use one of its addresses, or "
                             "0.0.0.0 for all",
    }

    def __init__(self, listener: str, addr: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.listener, self.addr = listener, addr

    def reason(self) -> str:
        return self._FIXES.get(self.errno, self.strerror or "cannot listen")

    def line(self, flag: str | None = None) -> str:
        """'--tunnel-addr 127.0.0.1:4443: address already in use; choose another port ...'"""
        return f"{flag or self.listener} {self.addr}: {self.reason()}"

    def __str__(self) -> str:
        return self.line()


class MuxError(ShroudError, OSError):
    """Base of every multiplexer error; ``code`` is the muxado error code it maps to."""

    default_code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = self.default_code if code is None else code

    def __str__(self) -> str:
        return f"{self.args[0]} ({code_name(self.code)})"


class ProtocolError(MuxError):
    """The peer sent something muxado v1 forbids. The session ends with GOAWAY(code)."""

    default_code = ErrorCode.PROTOCOL_ERROR


class PeerAbuse(ProtocolError):
    """The peer provoked more than a bound allows: a hostile peer, not a broken one
    (lib.protocol.muxstate raises it; the session's ConnectionTerminated says ``hostile``)."""


class SessionClosed(MuxError):
    """The session has ended; ``code`` is the GOAWAY code that ended it."""

    default_code = ErrorCode.NO_ERROR


class StreamError(MuxError):
    """An error confined to one stream."""


class StreamReset(StreamError):
    """The stream was reset: both directions failed at once."""

    default_code = ErrorCode.CANCEL


class StreamClosed(StreamError):
    """The stream (or this direction of it) is already closed."""

    default_code = ErrorCode.STREAM_CLOSED


class StreamTimeout(StreamError, TimeoutError):
    """A recv or send did not complete within the stream's timeout. ``sent``: from
    ``Stream.sendall``, the bytes it queued before the timeout (they reach the peer)."""

    default_code = ErrorCode.CANCEL
    sent = 0
