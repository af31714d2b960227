#!/usr/bin/env python3
"""Compile lib.protocol's codec modules with mypyc into build/native (scripts/setup.sh runs it).

    .venv/bin/python scripts/build_native.py [--force] [--check]

Builds lib.native.MODULES as one mypyc group (the extension modules and their shared library
``lib/protocol/native__mypyc``) under build/native, out of the tree and ignored by git, and
writes build/native/SOURCES last: line 1 the digest lib.native checks at import, line 2 the
mypy that compiled it. Nothing is rebuilt while both still match. The sources stay where they
are and remain the fallback (lib/native.py says when each is used).

``--check`` only says whether the build is up to date (exit 0) or not (exit 1).
Exit 2: no C compiler or no Python headers (the message names what to install); scripts/setup.sh
turns that into a failure for CI and into a note for the demo, which then runs the sources.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lib import native  # noqa: E402


def wanted_stamp() -> str:
    from mypy.version import __version__ as mypy_version
    return f"{native.sources_digest()}\nmypy {mypy_version}\n"


def toolchain_problem() -> str | None:
    """What is missing to compile a C extension for this Python, or None."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}): install gcc (Debian: apt-get install gcc)"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers in {include}: install python3-dev"
    return None


def build() -> None:
    """mypyc -> C -> extension modules, through setuptools, in a temporary directory; moved
    into place only when whole, so an interrupted build leaves the old one or none."""
    from mypyc.build import mypycify
    from setuptools import setup

    sources = [os.path.join("lib", "protocol", m + ".py") for m in native.MODULES]
    os.chdir(ROOT)  # mypycify names modules by their path from here
    tmp = tempfile.mkdtemp(prefix="native-", dir=os.path.dirname(native.BUILD_DIR))
    try:
        out = os.path.join(tmp, "out")
        # opt_level 3 is mypyc's default; debug_level 0: the extensions are for speed, and a
        # traceback through them still names the .py lines.
        # Modules the sources import (lib.errors) are type-checked only as far as they are used.
        exts = mypycify(["--follow-imports=silent", *sources], opt_level="3", debug_level="0", group_name="lib.protocol.native",
                        target_dir=os.path.join(tmp, "c"))
        setup(name="shroud-native", ext_modules=exts, script_name="build_native.py",
              script_args=["-q", "build_ext", "--build-lib", out,
                           "--build-temp", os.path.join(tmp, "obj")])
        with open(os.path.join(out, "SOURCES"), "w") as f:
            f.write(wanted_stamp())
        if os.path.exists(native.BUILD_DIR):
            shutil.rmtree(native.BUILD_DIR)
        os.rename(out, native.BUILD_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def up_to_date() -> bool:
    try:
        with open(native.STAMP) as f:
            return f.read() == wanted_stamp()
    except FileNotFoundError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument("--check", action="store_true", help="exit 0 if up to date, else 1")
    args = ap.parse_args()
    if args.check:
        return 0 if up_to_date() else 1
    if up_to_date() and not args.force:
        return 0
    problem = toolchain_problem()
    if problem:
        print(f"build_native: cannot compile lib.protocol: {problem}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(native.BUILD_DIR), exist_ok=True)
    print(f"build_native: compiling lib.protocol {', '.join(native.MODULES)} with mypyc "
          f"into {os.path.relpath(native.BUILD_DIR, ROOT)}", file=sys.stderr)
    try:
        build()
    except (subprocess.CalledProcessError, SystemExit) as e:
        # setuptools reports a failed compile as SystemExit with the compiler's message
        print(f"build_native: the build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
