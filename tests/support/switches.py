"""Counting greenlet switches: ``with SwitchesInto(g) as into: ...; into.count``.

The tests of the data path's wake-ups (test_mux_flush, test_mux_bulk, test_splice_direct) ask
how often a greenlet was woken: every switch or throw into ``target`` while the block runs is
counted (greenlet.settrace; a trace function set before is kept and called too).
``SwitchesInto(g, *more, but=True)`` counts the switches into every greenlet *but* the given
ones (test_mux_hubreader: no greenlet other than a stream's two users is woken per exchange),
``into.woken`` which they were.
"""
from __future__ import annotations

import greenlet


class SwitchesInto:
    def __init__(self, target, *more, but: bool = False):
        self.targets = (target,) + more
        self.but = but
        self.count = 0
        self.woken: set = set()
        self.old = None

    def __enter__(self) -> "SwitchesInto":
        def trace(event, args):
            if event in ("switch", "throw") and (
                    any(args[1] is t for t in self.targets) is not self.but):
                self.count += 1
                self.woken.add(args[1])
            if self.old is not None:
                self.old(event, args)
        self.old = greenlet.settrace(trace)
        return self

    def __exit__(self, *exc) -> None:
        greenlet.settrace(self.old)
