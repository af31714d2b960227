"""Mux sessions a test leaves open, closed after it (the autouse fixture in tests/conftest.py).

    mark() -> int              every Session made from here on is watched (Session.__init__ is
                               wrapped on the first call); the mark to give close_left
    close_left(mark) -> list   close the sessions made since ``mark`` that are still open; the
                               ones it closed (their reprs say what they were)

A session left open keeps its heartbeat for the rest of the pytest process and wakes greenlets
inside a later test's counts (tests/support/switches.py: CI failed once on twelve wake-ups of
such sessions' writers in test_mux_hubreader).
"""
from __future__ import annotations

import weakref

import gevent

from lib.net.muxsession import Session

_made: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()
_count = 0  # sessions made while watched: each is kept under its number


def _install() -> None:
    if getattr(Session.__init__, "_watched", False):
        return
    original = Session.__init__

    def init(self, *args, **kwargs):
        global _count
        original(self, *args, **kwargs)
        _count += 1
        _made[_count] = self
    init._watched = True  # type: ignore[attr-defined]
    Session.__init__ = init  # type: ignore[method-assign]


def mark() -> int:
    _install()
    return _count + 1


def close_left(since: int) -> list[str]:
    left = [s for n, s in list(_made.items()) if n >= since and not s.closed]
    for s in left:
        s.close()
    if left:
        gevent.sleep(0)  # their greenlets see the end here, not inside the next test
    return [repr(s) for s in left]
