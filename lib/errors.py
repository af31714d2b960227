"""The multiplexer's errors: one small hierarchy, each carrying its muxado wire code.

::

    MuxError (OSError)            .code: an ErrorCode
      +- ProtocolError            the peer broke muxado v1; fatal for its session
      +- SessionClosed            the session is gone (GOAWAY, transport EOF, close(), heartbeat)
      +- StreamError
           +- StreamReset         RST received (or sent by us); .code is the RST code
           +- StreamClosed        use of a direction already shut down or a closed stream
           +- StreamTimeout       also a TimeoutError, like a socket timeout

``MuxError`` subclasses ``OSError`` so that splice code handling sockets handles streams the same
way; no raw socket error leaves a stream except as one of these.
"""
from __future__ import annotations

import enum


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


class MuxError(OSError):
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
    """A recv or send did not complete within the stream's timeout."""

    default_code = ErrorCode.CANCEL
