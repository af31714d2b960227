"""Which build of the codec modules runs: compiled by mypyc, or the pure-Python sources.

Public API::

    MODULES                  # the lib.protocol modules scripts/build_native.py compiles
    DEPENDS                  # the lib/ files they import (a build is keyed on them too)
    BUILD_DIR                # build/native: out of the tree (.gitignore), one per checkout
    sources_digest() -> str  # what a build is keyed on: the sources and the Python version
    install(path) -> str     # lib.protocol's __init__ calls it with its __path__; returns STATUS
    STATUS                   # one line for the start-up log: "compiled (...)" or "pure Python (why)"
    compiled() -> bool

The compiled modules behave exactly as the sources (the same tests run against both, see
scripts/test.sh); they only cost less CPU per frame (bench/README.md, "Per-request cost").
They are used when all of this holds, else the sources are, and STATUS says why:

- ``SHROUD_PURE`` is unset or ``0`` (``SHROUD_PURE=1`` forces the sources);
- ``build/native/SOURCES`` names the digest of the current sources: an edited module (or a
  module of lib/ it imports: DEPENDS) or another Python makes the build stale, never silently
  used (scripts/setup.sh rebuilds it, and also when the pinned mypy changes);
- the build's shared library imports (built for this Python, not corrupted).

Then ``install`` puts ``build/native/lib/protocol`` before the package's own directory on its
``__path__``, so ``import lib.protocol.muxframe`` finds the extension module first; every other
module of the package (and the sources, kept beside) still comes from the tree. A checkout
without a build (a clean clone, a machine without a C compiler) runs the sources.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "native")
STAMP = os.path.join(BUILD_DIR, "SOURCES")
# The pure codec modules on the per-frame and per-connection path (bench/README.md, "Per-request
# cost"): frames, the session state machine, the sniffers. Not lib.protocol.httphead (2 % of a
# fresh connection's CPU): websocket.py subclasses its HeadError, which a compiled class forbids.
MODULES = ("muxframe", "muxstate", "sniff")
# The modules of lib/ the compiled ones import: mypyc compiled them against these modules'
# types (a call's result is checked against its annotation), so an edit here can break a build
# that still matches MODULES: get_all returning a tuple made every compiled sniff of an HTTP
# head a TypeError. Part of the digest (tests/test_native.py checks the list is whole).
DEPENDS = ("lib/errors.py", "lib/protocol/httphead.py")
# The shared library mypyc builds for the group (scripts/build_native.py).
GROUP = "native__mypyc"
PURE_ENV = "SHROUD_PURE"

STATUS = "pure Python (lib.protocol not loaded yet)"


def sources_digest() -> str:
    """sha256 over the compiled modules' sources, those they import (DEPENDS) and the Python
    that runs them. (The build's stamp also names the mypy that compiled it, so a new pin
    rebuilds; the check here stays cheap: importing mypy to ask its version costs ~80 ms at
    every start.)"""
    h = hashlib.sha256()
    h.update(f"{platform.python_implementation()} {sys.version}\n".encode())
    for name in MODULES:
        with open(os.path.join(ROOT, "lib", "protocol", name + ".py"), "rb") as f:
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    for path in DEPENDS:
        with open(os.path.join(ROOT, path), "rb") as f:
            h.update(path.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _why_not() -> str | None:
    """None when the build may be used; else the reason, for STATUS."""
    if os.environ.get(PURE_ENV, "0") not in ("", "0"):
        return f"{PURE_ENV}={os.environ[PURE_ENV]}"
    try:
        with open(STAMP) as f:
            built = f.readline().strip()  # line 1: sources_digest(); line 2: mypy's version
    except FileNotFoundError:
        return "no compiled build: ./scripts/setup.sh makes one where a C compiler exists"
    except OSError as e:
        return f"cannot read {STAMP}: {e.strerror}"
    if built != sources_digest():
        return "the compiled build is stale, its sources changed: run ./scripts/setup.sh"
    return None


def install(path: list[str]) -> str:
    """Put the compiled build first on ``path`` (lib.protocol's ``__path__``) if it may be
    used. Returns and sets STATUS."""
    global STATUS
    why = _why_not()
    if why is None:
        native = os.path.join(BUILD_DIR, "lib", "protocol")
        path.insert(0, native)
        try:
            importlib.import_module("lib.protocol." + GROUP)
        except ImportError as e:
            path.remove(native)
            why = f"the compiled build does not load ({e}): run ./scripts/setup.sh"
    if why is None:
        STATUS = "compiled (mypyc): lib.protocol." + ", ".join(MODULES)
    else:
        STATUS = "pure Python (" + why + ")"
    return STATUS


def compiled() -> bool:
    return STATUS.startswith("compiled")
