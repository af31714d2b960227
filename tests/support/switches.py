"""Counting greenlet switches: ``with SwitchesInto(g) as into: ...; into.count``.

The tests of the data path's wake-ups (test_mux_flush, test_mux_bulk, test_splice_direct) ask
how often a greenlet was woken: every switch or throw into ``target`` while the block runs is
counted (greenlet.settrace; a trace function set before is kept and called too).
"""
from __future__ import annotations

import greenlet


class SwitchesInto:
    def __init__(self, target):
        self.target = target
        self.count = 0
        self.old = None

    def __enter__(self) -> "SwitchesInto":
        def trace(event, args):
            if event in ("switch", "throw") and args[1] is self.target:
                self.count += 1
            if self.old is not None:
                self.old(event, args)
        self.old = greenlet.settrace(trace)
        return self

    def __exit__(self, *exc) -> None:
        greenlet.settrace(self.old)
