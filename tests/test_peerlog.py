"""lib.peerlog.PeerLog with an injected clock and a list for a logger: the per-address window,
the dropped-lines line, IPv6 keyed by its /64, and the table's bound, which an attacker rotating
through more addresses than it holds cannot turn into a fresh log budget per address."""
from __future__ import annotations

import logging

from lib.peerlog import OTHERS, PeerLog


class Lines:
    """A logger that keeps each line it is given."""

    def __init__(self):
        self.lines: list[str] = []

    def log(self, level, fmt, *args):
        self.lines.append(fmt % args)


def peer_log(**kw):
    now = [0.0]
    out = Lines()
    return PeerLog(clock=lambda: now[0], logger=out, **kw), now, out


def test_a_key_gets_lines_per_window_then_one_line_saying_how_many_were_dropped():
    p, now, out = peer_log(lines=3, per=60.0)
    for i in range(10):
        p.log("198.51.100.7", logging.INFO, "line %d", i)
    assert out.lines == ["line 0", "line 1", "line 2"] and p.dropped == 7
    now[0] += 60
    p.log("198.51.100.7", logging.INFO, "again")
    assert out.lines[3:] == ["(7 lines about 198.51.100.7 dropped in the last 60 s)", "again"]


def test_an_ipv6_host_is_one_key_for_its_whole_64():
    p, _, out = peer_log(lines=2)
    for i in range(50):
        p.log(f"2001:db8:0:1::{i:x}", logging.INFO, "from %d", i)
    assert out.lines == ["from 0", "from 1"] and p.dropped == 48


def test_rotating_through_more_addresses_than_the_table_holds_gains_no_fresh_budget():
    """100 addresses, each trying 5 lines, against a table of 4 with 2 lines each: the 4 in
    the table get theirs, the other 96 share one window of 2 (before: the oldest was
    forgotten and every new address got 2 lines of its own, 200 lines)."""
    p, now, out = peer_log(lines=2, per=60.0, max_keys=4)
    for i in range(100):
        for _ in range(5):
            p.log(f"203.0.113.{i}", logging.WARNING, "from %d", i)
        assert p.tracked_keys <= 4
    assert len(out.lines) == 4 * 2 + 2, out.lines
    assert p.table_full == 96 * 5 and p.dropped == 500 - len(out.lines)
    # A window later the table's windows are over: new addresses are given windows again
    # (the forgotten ones say what they dropped), and the shared window says what it dropped.
    now[0] += 60
    out.lines.clear()
    for i in range(100, 110):
        p.log(f"203.0.113.{i}", logging.WARNING, "from %d", i)
    assert p.tracked_keys <= 4
    assert out.lines[:2] == ["(3 lines about 203.0.113.0 dropped in the last 60 s)", "from 100"]
    assert any(line.startswith("(") and OTHERS in line for line in out.lines), out.lines
