"""Log lines a peer can trigger, rate-limited per peer address and bounded overall.

::

    peer_log = PeerLog(lines=10, per=60.0, max_keys=4096, clock=time.monotonic, logger=None)
    peer_log.log(key, level, fmt, *args)   # logged, or dropped and counted
    peer_log.dropped                        # lines dropped, all keys together
    peer_log.table_full                     # lines of new keys that found the table full
    peer_log.tracked_keys                   # keys with a window now (at most max_keys)

Used wherever a peer's behaviour becomes a log line: the mux (lib/net/muxsession.py), the
tunnel listener (lib/proxy/tunnels.py), ownership decisions (lib/proxy/ownership.py), one-port
mode (lib/proxy/oneport.py), discovery answers (lib/proxy/discovery.py), handed connections
(lib/proxy/routing.py), the client's TLS termination (lib/client/terminate.py). No I/O besides
the logger; the clock is injectable for tests. A shared leaf below every floor (docs/DESIGN.md,
"Floors").

A key counts as its client network (lib.hostport.client_network: an IPv6 /64): one host holds a
whole /64, and keyed by the full address it logged a line per connection from a fresh address.

==========================================  ===============================================
a line about a key that                     we
==========================================  ===============================================
has room in its window                      log it (``lines`` per ``per`` seconds)
is over its window's ``lines``              drop it and count it; when the key's next window
                                            starts, one line says how many were dropped
is new, the table has room                  open a window for it and log as above
is new, the table is full, and its oldest   forget the oldest (saying what it dropped), open
  window is over                              a window for the new key
is new, the table is full of live windows   one shared window for all such keys
                                            (``lines`` per ``per``); counted ``table_full``
==========================================  ===============================================

Why the last row: with the oldest key simply forgotten, an attacker rotating through more than
``max_keys`` addresses (a /48 holds 65,536 /64s) found a fresh window at every address, so its
log budget grew with its address pool. Now at most ``max_keys`` windows are live per ``per``
seconds, and every key beyond them shares one: in any ``per`` seconds the log gets at most
``(max_keys + 1) * (lines + 1)`` lines, however many addresses a peer has.
"""
from __future__ import annotations

import logging
import time

from lib.hostport import client_network

# The shared window of the keys that found the table full, as its dropped-lines line names it.
OTHERS = "addresses beyond the table"


class PeerLog:
    """Rate-limits log lines that a peer can trigger (the module's rule table)."""

    def __init__(self, lines: int = 10, per: float = 60.0, max_keys: int = 4096,
                 clock=time.monotonic, logger: logging.Logger | None = None):
        # 10 a minute shows what a peer does without letting it write the log; 4,096 addresses
        # (~1 MiB of table) cover the peers a busy proxy sees at once.
        self.lines, self.per, self.max_keys, self.clock = lines, per, max_keys, clock
        self.logger = logger or logging.getLogger("shroud.peer")
        # key -> [window start, lines in it, dropped], oldest window first (a key whose window
        # restarts moves to the end), so the first entry is the one that may be forgotten.
        self._keys: dict[str, list] = {}
        self._others = [clock(), 0, 0]  # the shared window (the last row of the table)
        self.dropped = 0
        self.table_full = 0

    @property
    def tracked_keys(self) -> int:
        """Keys with a window of their own now: the table's bound (``max_keys``) holds. (A
        count, not __len__: an empty PeerLog must stay truthy for ``log_limiter or ...``.)"""
        return len(self._keys)

    def log(self, key: str, level: int, fmt: str, *args) -> None:
        """Log ``fmt % args`` at ``level`` unless ``key``'s window (or the shared one) is over."""
        key = client_network(key)
        now = self.clock()
        entry = self._keys.get(key)
        if entry is None:
            entry = self._admit(key, now, level)
        elif now - entry[0] >= self.per:
            del self._keys[key]
            self._say_dropped(key, entry, level)
            entry = self._keys[key] = [now, 0, 0]
        if entry[1] >= self.lines:
            entry[2] += 1
            self.dropped += 1
            return
        entry[1] += 1
        self.logger.log(level, fmt, *args)

    def _admit(self, key: str, now: float, level: int) -> list:
        """A window for a new key: a fresh one while the table has room (or its oldest window is
        over, which is forgotten), else the shared one."""
        if len(self._keys) >= self.max_keys:
            oldest = next(iter(self._keys))
            if now - self._keys[oldest][0] < self.per:
                self.table_full += 1
                if now - self._others[0] >= self.per:
                    self._say_dropped(OTHERS, self._others, level)
                    self._others = [now, 0, 0]
                return self._others
            self._say_dropped(oldest, self._keys.pop(oldest), level)
        entry = self._keys[key] = [now, 0, 0]
        return entry

    def _say_dropped(self, key: str, entry: list, level: int) -> None:
        if entry[2]:
            self.logger.log(level, "(%d lines about %s dropped in the last %.0f s)",
                            entry[2], key, self.per)
