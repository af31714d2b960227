#!/usr/bin/env python3
"""Functions longer than a limit, longest first: the style's "no function over 60 lines" check.

    python scripts/long_functions.py [--limit 60] [--top N] [PATH ...]

PATHs default to lib/, the entry points, scripts/ and bench/ (tests are exempt). Nested functions
count inside their parent and again on their own. Exits 0 always: it lists, it does not judge.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys

DEFAULT_PATHS = ["lib", "shroud.py", "shroud_proxy.py", "gunicorn.conf.py", "scripts", "bench"]


def functions(path: str):
    """(qualified name, first line, length in lines) of every function in ``path``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                yield name, child.lineno, child.end_lineno - child.lineno + 1
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def python_files(root: str):
    if root.endswith(".py"):
        yield root
        return
    for directory, _, names in os.walk(root):
        yield from (os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=60, help="list functions longer than this")
    ap.add_argument("--top", type=int, default=0, help="list the N longest, whatever their length")
    ap.add_argument("paths", nargs="*", default=DEFAULT_PATHS)
    args = ap.parse_args(argv)
    rows = sorted(((n, f"{path}:{line}", name) for root in args.paths if os.path.exists(root)
                   for path in python_files(root) for name, line, n in functions(path)),
                  reverse=True)
    rows = rows[:args.top] if args.top else [r for r in rows if r[0] > args.limit]
    for n, where, name in rows:
        print(f"{n:4d}  {where:44s} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
