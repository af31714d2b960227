"""Copy bytes both ways between two socket-like objects (sockets or mux streams).

Public API::

    splice(a, b, *, on_a_to_b=None, on_b_to_a=None, idle_timeout=None, chunk=65536) -> (n_ab, n_ba)

Half-close is carried through: when one side reaches EOF, the other side gets
``shutdown(SHUT_WR)`` and the opposite direction keeps flowing until it ends too. Both copier
greenlets are joined before return, and both ends are closed (gevent's rule: when the handler
returns, its socket is closed). An error in either direction ends both. ``on_*`` callbacks get
the byte count of each chunk (bandwidth counters). ``idle_timeout`` bounds how long both
directions may stay silent. ``fallback_to_a`` is sent to ``a`` (then both close) when ``b`` ends
or fails before sending a single byte: the proxy's 502 for HTTP.
"""
from __future__ import annotations

import socket
import time

import gevent

# One mux frame carries 16 KiB; 64 KiB per read keeps per-chunk overhead low without holding
# much memory per connection.
CHUNK = 65536


class _Idle:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()


def _pump(src, dst, on_bytes, idle: _Idle, chunk: int, fallback: bytes | None = None) -> int:
    total = 0
    try:
        while True:
            data = src.recv(chunk)
            if not data:
                break
            dst.sendall(data)
            n = len(data)
            total += n
            idle.last = time.monotonic()
            if on_bytes is not None:
                on_bytes(n)
    except OSError:
        # Either side failed: abort both directions (after the fallback answer, if due).
        _send_fallback(dst, fallback, total)
        _abort(src, dst)
        return total
    if _send_fallback(dst, fallback, total):
        _abort(src, dst)
        return total
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return total


def _send_fallback(dst, fallback: bytes | None, total: int) -> bool:
    if fallback is None or total:
        return False
    try:
        dst.sendall(fallback)
    except OSError:
        pass
    return True


def _abort(*ends) -> None:
    for end in ends:
        try:
            end.close()
        except OSError:
            pass


def splice(a, b, *, on_a_to_b=None, on_b_to_a=None, idle_timeout: float | None = None,
           chunk: int = CHUNK, fallback_to_a: bytes | None = None) -> tuple[int, int]:
    idle = _Idle()
    g1 = gevent.spawn(_pump, a, b, on_a_to_b, idle, chunk)
    g2 = gevent.spawn(_pump, b, a, on_b_to_a, idle, chunk, fallback_to_a)
    try:
        if idle_timeout is None:
            gevent.joinall([g1, g2])
        else:
            while not (g1.ready() and g2.ready()):
                gevent.joinall([g1, g2], timeout=min(idle_timeout, 5.0))
                if time.monotonic() - idle.last > idle_timeout and not (g1.ready() and g2.ready()):
                    break
    finally:
        if not (g1.ready() and g2.ready()):
            _abort(a, b)
            gevent.killall([g1, g2], block=True, timeout=1)
        _abort(a, b)
    return (g1.value or 0, g2.value or 0)
