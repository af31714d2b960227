"""Counting Python calls: ``with PythonCalls() as calls: ...; calls.names``.
Counting calls of C functions by name: ``with NativeCalls() as calls: ...; calls.count("recv_into")``.
Only Shroud's own: ``PythonCalls(under="lib")`` records the functions of files under the
repository's ``lib/`` (a test's own socket calls, gevent's Python, left out).
The bytecodes they run: ``with Opcodes() as ops: ...; ops.counts``.
What one function was given: ``with ArgumentLengths(qualname, argument) as seen: ...; seen.lengths``.
Python and C calls in one order: ``with Events() as ev: ...; ev.between(("py", "f"), ("c", "send"))``.

The per-request tests (test_muxproto, test_splice_direct) ask how many Python functions one
step of the data path runs: every Python-level call made while the block runs is recorded by
its qualified name, in order (sys.setprofile: calls of C functions are not recorded). The
profile function set before, if any, is put back at the end.
"""
from __future__ import annotations

import os
import sys
from collections import Counter


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PythonCalls:
    def __init__(self, under: str | None = None) -> None:
        self.names: list[str] = []
        self.old = None
        self.prefix = None if under is None else os.path.join(_ROOT, under) + os.sep

    def __enter__(self) -> "PythonCalls":
        names, prefix = self.names, self.prefix

        def record(frame, event, arg):
            if event == "call" and (prefix is None or frame.f_code.co_filename.startswith(prefix)):
                names.append(frame.f_code.co_qualname)
        self.old = sys.getprofile()
        sys.setprofile(record)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self.old)
        if self.names and self.names[-1] == "PythonCalls.__exit__":
            self.names.pop()  # this method's own call, recorded as it began


class ArgumentLengths:
    """``len()`` of one argument of every call of one Python function (by qualified name, e.g.
    ``"MuxConnection.receive_data"``), in order, while the block runs: what a module hands its
    helper, seen through the same profile hook as PythonCalls (no attribute of it replaced)."""

    def __init__(self, qualname: str, argument: str) -> None:
        self.qualname = qualname
        self.argument = argument
        self.lengths: list[int] = []
        self.old = None

    def __enter__(self) -> "ArgumentLengths":
        lengths, qualname, argument = self.lengths, self.qualname, self.argument

        def record(frame, event, arg):
            if event == "call" and frame.f_code.co_qualname == qualname:
                lengths.append(len(frame.f_locals[argument]))
        self.old = sys.getprofile()
        sys.setprofile(record)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self.old)


class NativeCalls:
    """The names of the C functions and methods called while the block runs (every greenlet
    of this thread), in order: a read of the OS socket is a ``recv_into``, whatever Python
    wrapper made it (the same profile hook as PythonCalls). ``fd``: only the methods of the
    object whose ``fileno()`` is ``fd`` (a socket's own reads, not those of another test's
    greenlet that happens to run meanwhile)."""

    def __init__(self, fd: int | None = None) -> None:
        self.names: list[str] = []
        self.old = None
        self.fd = fd

    def __enter__(self) -> "NativeCalls":
        names, fd = self.names, self.fd

        def record(frame, event, arg):
            if event != "c_call":
                return
            if fd is not None:
                fileno = getattr(getattr(arg, "__self__", None), "fileno", None)
                try:
                    if fileno is None or fileno() != fd:
                        return
                except (OSError, TypeError):
                    return
            names.append(getattr(arg, "__name__", "?"))
        self.old = sys.getprofile()
        sys.setprofile(record)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self.old)

    def count(self, name: str) -> int:
        return self.names.count(name)


class Opcodes:
    """Bytecodes executed by Shroud's own functions (files under the repository's ``lib/``)
    while the block runs, by qualified name: ``with Opcodes() as ops: ...; ops.counts``
    (sys.settrace with per-opcode events; functions outside ``lib/`` are not traced). The
    per-request tests ask it how much Python one step runs, where a call count misses a
    function's body growing. The trace function set before is put back at the end."""

    def __init__(self, under: str = "lib") -> None:
        self.counts: Counter = Counter()
        self.prefix = os.path.join(_ROOT, under) + os.sep
        self.old = None

    def __enter__(self) -> "Opcodes":
        counts, prefix = self.counts, self.prefix

        def trace(frame, event, arg):
            code = frame.f_code
            if not code.co_filename.startswith(prefix):
                return None
            frame.f_trace_opcodes = True
            name = code.co_qualname

            def local(frame, event, arg):
                if event == "opcode":
                    counts[name] += 1
                return local
            return local
        self.old = sys.gettrace()
        sys.settrace(trace)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self.old)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Events:
    """Python calls (``("py", qualname)``, only those of files under ``under``) and calls of C
    functions (``("c", name)``) while the block runs, in one list, in order: where a C call
    (a socket's ``send``) comes among the Python steps of a path (the same profile hook as
    PythonCalls; every greenlet of this thread)."""

    def __init__(self, under: str = "lib") -> None:
        self.names: list[tuple[str, str]] = []
        self.prefix = os.path.join(_ROOT, under) + os.sep
        self.old = None

    def __enter__(self) -> "Events":
        names, prefix = self.names, self.prefix

        def record(frame, event, arg):
            if event == "c_call":
                names.append(("c", getattr(arg, "__name__", "?")))
            elif event == "call" and frame.f_code.co_filename.startswith(prefix):
                names.append(("py", frame.f_code.co_qualname))
        self.old = sys.getprofile()
        sys.setprofile(record)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self.old)

    def between(self, first: tuple, last: tuple) -> list[tuple[str, str]]:
        """The events from the first ``first`` to the first ``last`` after it (both in)."""
        i = self.names.index(first)
        return self.names[i:self.names.index(last, i) + 1]
