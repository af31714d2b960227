"""Give memory back to the OS after a load peak (entry points start it).

    start_memory_trimmer(interval=30.0)     # also logs "memory allocator: jemalloc|system"
    trimmer_stats() -> {"passes": n, "skipped_busy": n}
    before_pass(hook)                       # hook() runs first in every pass: a module that
                                            # keeps things for busy times lets them go
    gc.set_threshold(*GC_THRESHOLDS)        # what the entry points do after start-up

CPython and glibc keep freed memory for reuse: after 1,000 connections come and go, a proxy's
RSS stayed ~40 % above its start although nothing leaked (bench/load.py). A pass runs the
garbage collector (cycles left by the peak: once the process is idle nothing allocates, so
CPython's own collector never runs again and they stay) and glibc's ``malloc_trim(0)``, which
returns free heap pages. Elsewhere than glibc it does nothing.

A full collection walks every live object and holds the hub meanwhile: 0.1-0.4 s in a proxy with
~1,000 streams live (bench/README.md "Memory trimmer: a pass only when quiet"), during which
every visitor and tunnel waits. So a pass runs only when the process is quiet: the trimmer looks
every ``interval / 6`` seconds, and passes when ``interval`` has gone by since its last pass and
the process used at most ``QUIET_CPU`` of a core in the last window (``time.process_time``). An
idle proxy or client uses ~0.2 %; keep-alive traffic allocates no lasting objects, so CPython's
own young collections, the measure before, stayed at zero under it and a pass ran under load
(bench/README.md "The cost of a loop turn, and the collector"). A busy process needs no pass:
its own allocations reuse the freed memory. The pass that matters, after a peak, comes within one
window of the load ending. At start the trimmer also moves the objects of start-up (modules,
classes, functions: they live as long as the process) to ``gc.freeze()``'s permanent
generation, so no later full collection, ours or CPython's, walks them again.

The entry points also raise CPython's young-generation threshold to ``GC_THRESHOLDS`` (they
call ``gc.set_threshold``; nothing in lib/ tunes the interpreter): at 64 concurrent fresh
connections the default 700 ran a young collection every ~16 requests in the proxy (18-19 us of
CPU per request, ~3 %), though nearly every object a connection makes is freed by reference
counting first.

Under jemalloc (``LD_PRELOAD=libjemalloc.so.2 PYTHONMALLOC=malloc``, see bench/README.md "Load
and soak") a pass also purges the dirty pages of all jemalloc arenas (``mallctl
arena.4096.purge``): without jemalloc's background thread an idle process keeps them until its
next allocations.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time

import gevent

log = logging.getLogger("shroud.memtrim")

# jemalloc's MALLCTL_ARENAS_ALL is 4096: "arena.4096.purge" purges every arena.
_JEMALLOC_PURGE_ALL = b"arena.4096.purge"

# Share of one core the process may use in a window and still count as quiet: an idle proxy
# or client uses ~0.2 % (timers, heartbeats); 2 % is ~70 fresh connections or a few hundred
# keep-alive requests in a 5 s window (bench/README.md "Per-request cost"): few visitors wait
# on a pass then.
QUIET_CPU = 0.02
# CPython's collector thresholds, set by the entry points (gc.set_threshold): a young collection
# after 10,000 net new container objects instead of 700. Under 64 concurrent fresh connections
# the count rose past 700 every ~16 requests in the proxy (49-63 collections per 1,000 requests,
# 18-19 us of CPU per request; the client 6.5-8) and past 10,000 not once in thousands of
# requests: a connection's objects are freed by reference counting before they add up. Under
# 1,000 connections at once the proxy's collector CPU halved and its full collections went from
# 17 to 3 in 20,000 requests, RSS unchanged. What a collection finds (cycles) waits for at most
# 10,000 allocations: a few MiB at most. The older generations keep CPython's 10 and 10
# (bench/README.md "The cost of a loop turn, and the collector").
GC_THRESHOLDS = (10_000, 10, 10)
# Windows per interval: the pass after a peak comes at most interval / 6 after it ends.
_WINDOWS = 6

_stats = {"passes": 0, "skipped_busy": 0}


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def _jemalloc_purge():
    """None unless jemalloc is the process's malloc (its ``mallctl`` is then in the global
    symbol namespace, e.g. through LD_PRELOAD)."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return lambda: mallctl(_JEMALLOC_PURGE_ALL, None, None, None, 0)


def _trimmers() -> list:
    return [t for t in (_malloc_trim(), _jemalloc_purge()) if t is not None]


# Run first in every pass (before_pass): what a busy time kept for reuse, let go once quiet.
_hooks: list = []


def before_pass(hook) -> None:
    """``hook()`` runs at the start of every pass (lib.net.greenpool ends its parked workers)."""
    _hooks.append(hook)


def _run_hooks() -> None:
    for hook in list(_hooks):
        hook()


def trim_once() -> None:
    """One pass now, busy or not (tests, and a caller that knows the process is idle)."""
    _run_hooks()
    gc.collect()
    for trim in _trimmers():
        trim()


def trimmer_stats() -> dict:
    """Passes run and windows skipped because the process was busy, since start."""
    return dict(_stats)


def _pass(trimmers: list) -> None:
    start = time.perf_counter()
    _run_hooks()
    gc.collect()
    collected = time.perf_counter()
    for trim in trimmers:
        trim()
    _stats["passes"] += 1
    log.debug("memory trim pass: collect %.1f ms, trim %.1f ms",
              (collected - start) * 1e3, (time.perf_counter() - collected) * 1e3)


def start_memory_trimmer(interval: float = 30.0,
                         quiet_cpu: float = QUIET_CPU) -> gevent.Greenlet | None:
    """Start the trimmer (every entry point does, once, after start-up); logs the process's
    allocator and freezes the start-up objects (see the overview)."""
    from lib.allocator import active

    log.info("memory allocator: %s", active())
    trimmers = _trimmers()
    if not trimmers:
        log.debug("neither malloc_trim nor jemalloc available: memory trimmer off")
        return None
    gc.collect()  # start-up's garbage is not frozen with the rest
    gc.freeze()
    window = interval / _WINDOWS

    def loop() -> None:
        last_pass = time.monotonic()
        cpu = time.process_time()
        while True:
            gevent.sleep(window)
            now, used = time.monotonic(), time.process_time()
            busy, cpu = used - cpu > quiet_cpu * window, used
            if now - last_pass < interval:
                continue
            if busy:
                _stats["skipped_busy"] += 1
                continue
            _pass(trimmers)
            last_pass, cpu = time.monotonic(), time.process_time()

    return gevent.spawn(loop)
