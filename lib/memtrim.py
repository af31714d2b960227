"""Give memory back to the OS after a load peak (entry points start it).

    start_memory_trimmer(interval=30.0)     # also logs "memory allocator: jemalloc|system"
    trimmer_stats() -> {"passes": n, "skipped_busy": n}

CPython and glibc keep freed memory for reuse: after 1,000 connections come and go, a proxy's
RSS stayed ~40 % above its start although nothing leaked (bench/load.py). A pass runs the
garbage collector (cycles left by the peak: once the process is idle nothing allocates, so
CPython's own collector never runs again and they stay) and glibc's ``malloc_trim(0)``, which
returns free heap pages. Elsewhere than glibc it does nothing.

A full collection walks every live object and holds the hub meanwhile: 0.1-0.4 s in a proxy with
~1,000 streams live (bench/README.md "Memory trimmer: a pass only when quiet"), during which
every visitor and tunnel waits. So a pass runs only when the process is quiet: the trimmer looks
every ``interval / 6`` seconds, and passes when ``interval`` has gone by since its last pass and
the last window saw at most ``QUIET_GEN0`` young collections of CPython's own collector (each
one means ~700 new container objects: a busy proxy makes ~70 a second). A busy process needs no
pass: its own allocations keep CPython's collector running and reuse the freed memory. The pass
that matters, after a peak, comes within one window of the load ending. At start the trimmer
also moves the objects of start-up (modules, classes, functions: they live as long as the
process) to ``gc.freeze()``'s permanent generation, so no later full collection, ours or
CPython's, walks them again.

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

# Young (generation 0) collections in one window below which the process counts as quiet.
# Measured (bench/README.md "Memory trimmer: a pass only when quiet"): an idle proxy or
# client with its tunnel makes none in 5 s; under load the proxy makes one per ~11 requests
# (~370 per 5 s at ~880 requests/s). Ten per window (5 s at the default interval) is thus
# "below ~20 requests/s": few visitors wait on a pass then, and it is short (small heap).
QUIET_GEN0 = 10
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


def _young_collections() -> int:
    return gc.get_stats()[0]["collections"]


def trim_once() -> None:
    """One pass now, busy or not (tests, and a caller that knows the process is idle)."""
    gc.collect()
    for trim in _trimmers():
        trim()


def trimmer_stats() -> dict:
    """Passes run and windows skipped because the process was busy, since start."""
    return dict(_stats)


def _pass(trimmers: list) -> None:
    start = time.perf_counter()
    gc.collect()
    collected = time.perf_counter()
    for trim in trimmers:
        trim()
    _stats["passes"] += 1
    log.debug("memory trim pass: collect %.1f ms, trim %.1f ms",
              (collected - start) * 1e3, (time.perf_counter() - collected) * 1e3)


def start_memory_trimmer(interval: float = 30.0,
                         quiet_gen0: int = QUIET_GEN0) -> gevent.Greenlet | None:
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
        seen = _young_collections()
        while True:
            gevent.sleep(window)
            now, young = time.monotonic(), _young_collections()
            busy, seen = young - seen > quiet_gen0, young
            if now - last_pass < interval:
                continue
            if busy:
                _stats["skipped_busy"] += 1
                continue
            _pass(trimmers)
            last_pass, seen = time.monotonic(), _young_collections()

    return gevent.spawn(loop)
