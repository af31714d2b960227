"""The greenlets running in this process, to show a test leaves none of its own behind.

    before = running_greenlets()
    ...                                     # the test's work, then its clean-up
    assert not running_greenlets() - before

A greenlet counts from its start to its end: one killed with ``kill(block=False)`` still counts
until the hub has thrown GreenletExit into it, which happens at the hub's next turn, inside
whatever test runs next if nobody waits.
"""
from __future__ import annotations

import gc

import gevent
import greenlet


def running_greenlets() -> set:
    """Every started, unfinished greenlet of this thread but the hub and the current one
    (found by gc). Other threads' (gevent's thread pool workers) are theirs to end."""
    here = _root(greenlet.getcurrent())
    skip = {id(gevent.get_hub()), id(greenlet.getcurrent())}
    return {g for g in gc.get_objects()
            if isinstance(g, greenlet.greenlet) and g and g.parent is not None
            and id(g) not in skip and _root(g) is here}


def _root(g):
    """The main greenlet of g's thread (every greenlet's chain of parents ends there)."""
    while g.parent is not None:
        g = g.parent
    return g
