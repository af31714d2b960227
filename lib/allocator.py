"""Run Shroud's entry points on jemalloc when the machine has it.

    reexec_with_jemalloc()   # first statement of an entry point's __main__; may not return
    active() -> str          # "jemalloc" or "system", for the start-up log line

Why: CPython returns a 1 MiB small-object arena to the OS only when every object in it is gone,
and glibc's heap behaves alike at page size. After a load peak (1,000 connections come and go) a
few thousand surviving small objects are scattered over the peak's arenas, so a proxy stayed
21 % and a client 16 % above their cold-start RSS although nothing leaked and live bytes were
back to the start (bench/README.md, "Load and soak": 11 extra arenas holding 9.5 MB of empty
pools). With ``PYTHONMALLOC=malloc`` and jemalloc (``LD_PRELOAD``) freed pages go back whatever
survives next to them: +3 % and +8 % in the same run, at the same requests/s.

Both settings must be in place before the interpreter starts, so the entry point re-executes
itself once (same pid, same argv, ``sys.orig_argv``) with them. The variables are then removed
from ``os.environ`` again, so the processes we start (tor, helpers) keep their own allocator.

``SHROUD_ALLOCATOR``: ``auto`` (default: jemalloc when ``libjemalloc.so.2`` is installed, Debian
package ``libjemalloc2``, else the system allocator), ``jemalloc`` (required: exit with an error
when missing or when it fails to load) or ``system`` (never re-execute). A library that fails
to load (ld.so says why) costs one more re-execution back to the system allocator, never a run
on malloc without pymalloc. ``SHROUD_JEMALLOC`` names the library where it is elsewhere. gunicorn.conf.py calls it too, so a gunicorn
master re-executes itself before it opens a socket (its workers are forked from it); a master
reloading its configuration is on jemalloc already and stays as it is.
"""
from __future__ import annotations

import glob
import json
import os
import sys

ENV_CHOICE = "SHROUD_ALLOCATOR"
ENV_LIBRARY = "SHROUD_JEMALLOC"  # optional: the library's path, where it is not in /usr/lib
# Set across the re-exec: the variables we changed, with their original values (JSON; null =
# unset), restored in the re-executed process.
_MARK = "_SHROUD_ALLOCATOR_ORIGINAL"
_CHANGED = ("LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF")
_SEARCH = ("/usr/lib/*-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
           "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# Let jemalloc's own thread return freed pages a few seconds after a peak, idle or not.
DEFAULT_MALLOC_CONF = "background_thread:true"

_pymalloc_off = os.environ.get("PYTHONMALLOC") == "malloc"  # as this interpreter started


def find_jemalloc() -> str | None:
    """``SHROUD_JEMALLOC`` (a library path) if set, else the first libjemalloc.so.2 found,
    this interpreter's architecture first."""
    import sysconfig

    given = os.environ.get(ENV_LIBRARY)
    if given:
        return given if os.access(given, os.R_OK) else None

    multiarch = sysconfig.get_config_var("MULTIARCH")  # this interpreter's: x86_64-linux-gnu
    search = ((f"/usr/lib/{multiarch}/libjemalloc.so.2",) if multiarch else ()) + _SEARCH
    for pattern in search:
        for path in sorted(glob.glob(pattern)):
            if os.access(path, os.R_OK):
                return path
    return None


def active() -> str:
    """The malloc this process runs on: "jemalloc" when it is mapped (and Python's objects go
    through malloc), else "system"."""
    try:
        with open("/proc/self/maps") as f:
            mapped = "libjemalloc" in f.read()
    except OSError:
        mapped = False
    return "jemalloc" if mapped and _pymalloc_off else "system"


def reexec_with_jemalloc() -> None:
    """Re-execute this process on jemalloc (see the module docstring); returns when it is
    already running on it, or when it will not (choice ``system``, not installed, not Linux)."""
    env = os.environ
    choice = env.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    if choice not in ("auto", "jemalloc", "system"):
        sys.exit(f"{ENV_CHOICE} must be auto, jemalloc or system, not {choice!r}")
    if _MARK in env:  # we are the re-executed process
        try:
            original = json.loads(env.pop(_MARK))
        except ValueError:
            original = {}
        for name in _CHANGED:
            if original.get(name) is None:
                env.pop(name, None)
            else:
                env[name] = original[name]
        if active() == "jemalloc":
            return
        # The preload failed (ld.so said why on stderr): do not run on malloc without
        # pymalloc, the worst of both.
        if choice == "jemalloc":
            sys.exit(f"{ENV_CHOICE}=jemalloc but jemalloc could not be loaded")
        env[ENV_CHOICE] = "system"
        _execve(dict(env))
        return
    if choice == "system" or not sys.platform.startswith("linux") or active() == "jemalloc":
        return  # (already on it: started that way, or a gunicorn master reloading its config)
    path = find_jemalloc()
    if path is None:
        if choice == "jemalloc":
            sys.exit(f"{ENV_CHOICE}=jemalloc but libjemalloc.so.2 is not installed "
                     f"(Debian: apt-get install libjemalloc2)")
        return
    new = dict(env)
    new[_MARK] = json.dumps({name: env.get(name) for name in _CHANGED})
    new["LD_PRELOAD"] = " ".join(x for x in (path, env.get("LD_PRELOAD", "")) if x)
    new["PYTHONMALLOC"] = "malloc"
    new.setdefault("MALLOC_CONF", DEFAULT_MALLOC_CONF)
    _execve(new)


def _execve(env: dict) -> None:
    # argv[0] must name this interpreter (a bare "python" would be looked up in PATH and could
    # leave the virtual environment); interpreter options such as -u are kept.
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = sys.executable
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # cannot re-execute (odd sandbox): run on as we are
