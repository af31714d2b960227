"""Give memory back to the OS after a load peak (entry points start it).

    start_memory_trimmer(interval=30.0)     # also logs "memory allocator: jemalloc|system"

CPython and glibc keep freed memory for reuse: after 1,000 connections come and go, a proxy's
RSS stayed ~40 % above its start although nothing leaked (bench/load.py). Every ``interval``
seconds this runs the garbage collector and glibc's ``malloc_trim(0)``, which returns free heap
pages; each pass costs a few milliseconds. Elsewhere than glibc it does nothing.

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

import gevent

log = logging.getLogger("shroud.memtrim")

# jemalloc's MALLCTL_ARENAS_ALL is 4096: "arena.4096.purge" purges every arena.
_JEMALLOC_PURGE_ALL = b"arena.4096.purge"


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


def trim_once() -> None:
    gc.collect()
    for trim in _trimmers():
        trim()


def start_memory_trimmer(interval: float = 30.0) -> gevent.Greenlet | None:
    """Start the trimmer (every entry point does, once); logs the process's allocator."""
    from lib.allocator import active

    log.info("memory allocator: %s", active())
    trimmers = _trimmers()
    if not trimmers:
        log.debug("neither malloc_trim nor jemalloc available: memory trimmer off")
        return None

    def loop() -> None:
        while True:
            gevent.sleep(interval)
            gc.collect()
            for trim in trimmers:
                trim()

    return gevent.spawn(loop)
