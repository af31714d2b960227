"""Re-check chosen mutants of a finished ``scripts/mutation.sh`` run in one pytest process.

    cd artifacts/mutation/MODULE/mutants
    ../../../../.venv/bin/python -m pytest -p no:cacheprovider -q \\
        -p mutation_recheck --names NAMES_FILE --out RESULTS_JSON TEST_FILE...

(run with ``PYTHONPATH=../../../../scripts``). mutmut starts a pytest session per mutant; on a
loaded shared machine that start costs seconds, which is most of a survivor re-check. This
plugin collects the given tests once and, for each mutant named in NAMES_FILE (one
``module.x_function__mutmut_N`` a line, as ``mutmut results`` prints them), activates it through
mutmut's own trampoline switch and runs the tests (fastest file first, as listed) until one
fails: killed, else survived. A test running over 30 s counts as a timeout (killed), as mutmut
counts it. Only for re-checking survivors after adding tests: the score of record comes from
``scripts/mutation.sh`` (docs/MUTATION.md says which numbers came from which).
"""
from __future__ import annotations

import json
import os
import signal

import pytest
from _pytest.runner import runtestprotocol

ITEM_TIMEOUT = 30  # seconds: a mutant that hangs a test is a timeout, as in mutmut


def pytest_addoption(parser):
    parser.addoption("--names", help="file of mutant names, one a line")
    parser.addoption("--out", help="where to write {name: 'killed'|'survived'|'timeout'}")
    parser.addoption("--stats", help="mutmut-stats.json: run only the tests that cover the "
                     "mutated function (as mutmut does)")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _verdict(items) -> str:
    for item in items:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(ITEM_TIMEOUT)
        try:
            reports = runtestprotocol(item, nextitem=None, log=False)
        except _Timeout:
            return "timeout"
        finally:
            signal.alarm(0)
        if any(r.failed for r in reports):
            return "killed"
    return "survived"


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    from mutmut.mutation.trampoline import set_mutant_under_test

    config = session.config
    names = [n.strip() for n in open(config.getoption("--names")) if n.strip()]
    covering, duration = None, {}
    if config.getoption("--stats"):
        with open(config.getoption("--stats")) as f:
            stats = json.load(f)
        covering, duration = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    results = {}
    for name in names:
        set_mutant_under_test(name)
        items = session.items
        if covering is not None:
            tests = set(covering.get(name.rsplit("__mutmut_", 1)[0], ()))
            items = sorted((item for item in items if item.nodeid in tests),
                           key=lambda item: duration.get(item.nodeid, 0.0))  # fastest first
        results[name] = _verdict(items)
        print("%s %s" % (results[name], name), flush=True)
    set_mutant_under_test(None)
    os.environ.pop("MUTANT_UNDER_TEST", None)
    with open(config.getoption("--out"), "w") as f:
        json.dump(results, f, indent=1)
    return True
