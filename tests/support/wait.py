"""Poll until something holds, with a deadline: the one wait helper of the tests.

    wait_for(predicate, what, timeout=20.0, interval=0.1, sleep=time.sleep)
        -> the predicate's truthy value
    wait_until(predicate, timeout=5.0, every=0.02)   # wait_for with gevent.sleep, for a test
        -> the predicate's truthy value              # whose state moves in its own greenlets

No fixed sleep decides an outcome: a test waits for the state it needs and fails, naming
``what`` and the last value seen, when the deadline passes. A test whose state moves in
greenlets of its own thread (an in-process mux session) passes ``sleep=gevent.sleep``.
Deadlines come from ``time.monotonic()``, never from the hub's ``loop.now()``: that is the time
the loop last ran, which in a full-suite run can be an earlier test's (the tests between never
enter the hub), so a deadline taken from it can be past before the first sleep (the wrong-pin
test's flake: tests/test_client_cli.py).
"""
from __future__ import annotations

import time


def wait_for(predicate, what: str, timeout: float = 20.0, interval: float = 0.1,
             sleep=time.sleep):
    """Call ``predicate`` until it returns something truthy; return that.

    :raises AssertionError: not within ``timeout`` seconds (the message names ``what``).
    """
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what} (last {last!r})")
        sleep(interval)


def wait_until(predicate, timeout: float = 5.0, every: float = 0.02):
    """``wait_for`` with ``gevent.sleep``, for a test whose state moves in greenlets of its own
    thread (an in-process mux session, a splice): named by the predicate's source line."""
    import gevent  # here: the tests of other processes need not import it
    code = getattr(predicate, "__code__", None)
    what = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else repr(predicate)
    return wait_for(predicate, what, timeout, every, gevent.sleep)
