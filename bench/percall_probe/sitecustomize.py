"""bench/percall.py's probe, loaded through PYTHONPATH into a proxy or client it starts.

With PERCALL_OUT set: SIGUSR1 starts counting (Python calls by function, C calls by name through
``sys.setprofile``, or with PERCALL_OPCODES=1 Python calls and bytecodes through ``sys.settrace``
and ``f_trace_opcodes``, or with PERCALL_LINES=1 Python calls and lines executed by function and by
file through ``sys.settrace``; greenlet switches through ``greenlet.settrace``), SIGUSR2 stops
and writes the counts to ``$PERCALL_OUT.<pid>.json``. Without PERCALL_OUT it does nothing.
"""
import collections
import json
import os
import signal
import sys

_OUT = os.environ.get("PERCALL_OUT")
if _OUT:
    _calls: collections.Counter = collections.Counter()
    _ccalls: collections.Counter = collections.Counter()
    _counts = {"switches": 0, "opcodes": 0}
    _lines: collections.Counter = collections.Counter()  # by function (PERCALL_LINES)
    _files: collections.Counter = collections.Counter()  # by file

    def _name(code) -> str:
        return f"{code.co_qualname} {os.path.basename(code.co_filename)}:{code.co_firstlineno}"

    def _profile(frame, event, arg):
        if event == "call":
            _calls[_name(frame.f_code)] += 1
        elif event == "c_call":
            _ccalls[getattr(arg, "__qualname__", None) or repr(arg)] += 1

    def _trace(frame, event, arg):
        if event == "call":
            frame.f_trace_opcodes = True
            _calls[_name(frame.f_code)] += 1
        elif event == "opcode":
            _counts["opcodes"] += 1
        return _trace

    def _line_trace(frame, event, arg):
        if event == "call":
            _calls[_name(frame.f_code)] += 1
            return _line_trace
        if event == "line":
            code = frame.f_code
            _lines[_name(code)] += 1
            _files[os.path.basename(code.co_filename)] += 1
        return _line_trace

    def _switch(event, args):
        _counts["switches"] += 1

    def _start(signum, frame):
        import greenlet
        _calls.clear()
        _ccalls.clear()
        _lines.clear()
        _files.clear()
        _counts.update(switches=0, opcodes=0)
        greenlet.settrace(_switch)
        if os.environ.get("PERCALL_LINES"):
            sys.settrace(_line_trace)
        elif os.environ.get("PERCALL_OPCODES"):
            sys.settrace(_trace)
        else:
            sys.setprofile(_profile)

    def _stop(signum, frame):
        import greenlet
        sys.setprofile(None)
        sys.settrace(None)
        greenlet.settrace(None)
        with open(f"{_OUT}.{os.getpid()}.json", "w") as f:
            json.dump({"calls": _calls.most_common(), "ccalls": _ccalls.most_common(),
                       "lines": _lines.most_common(), "files": _files.most_common(), **_counts}, f)

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
