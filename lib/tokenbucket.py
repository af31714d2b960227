"""A token bucket: ``burst`` at once, then ``rate`` a second.

::

    bucket = TokenBucket(burst, rate, clock=time.monotonic)
    bucket.take() -> bool      # True (one token spent) while under the rate
    bucket.dropped             # refusals since the owner last reset it to 0

Used where a peer's or a visitor's pace must be held (the proxy's bind requests per tunnel,
lib/proxy/tunnels.py; its blind offers of unknown names to sibling workers,
lib/proxy/workers.py; the client's plain connection log, lib/client/console.py). No I/O; the
clock is injectable for tests. A shared leaf below every floor (docs/DESIGN.md, "Floors").
"""
from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    __slots__ = ("burst", "rate", "tokens", "stamp", "clock", "dropped")

    def __init__(self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic):
        self.burst, self.rate, self.clock = burst, rate, clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.dropped = 0

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False
