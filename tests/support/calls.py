"""Counting Python calls: ``with PythonCalls() as calls: ...; calls.names``.

The per-request tests (test_muxproto, test_splice_direct) ask how many Python functions one
step of the data path runs: every Python-level call made while the block runs is recorded by
its qualified name, in order (sys.setprofile: calls of C functions are not recorded). The
profile function set before, if any, is put back at the end.
"""
from __future__ import annotations

import sys


class PythonCalls:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.old = None

    def __enter__(self) -> "PythonCalls":
        names = self.names

        def record(frame, event, arg):
            if event == "call":
                names.append(frame.f_code.co_qualname)
        self.old = sys.getprofile()
        sys.setprofile(record)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self.old)
        if self.names and self.names[-1] == "PythonCalls.__exit__":
            self.names.pop()  # this method's own call, recorded as it began
