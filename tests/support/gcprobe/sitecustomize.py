"""A probe of CPython's collector in a real Shroud process (tests/test_collector.py): put this
directory on PYTHONPATH and Python loads it at start-up, before the entry point.

Counts every collection by generation (``gc.callbacks``). On SIGUSR2 the process writes
``{"pid", "threshold", "collections": [gen0, gen1, gen2]}`` (counts since start) to
``$SHROUD_GC_PROBE_DIR/gc-<pid>.json``; a child forked from it (a gunicorn worker, whose
USR2 gunicorn takes back) writes ``{"pid", "frozen_at_fork"}`` (``gc.get_freeze_count()`` as
the fork left it) to ``fork-<pid>.json`` at once. Files are written whole then renamed, so a
reader never sees half of one. Only for tests: nothing in the project imports it.
"""
import gc
import json
import os
import signal

_collections = [0, 0, 0]


def _count(phase, info):
    if phase == "stop":
        _collections[info["generation"]] += 1


def _write(name: str, data: dict) -> None:
    path = os.path.join(os.environ["SHROUD_GC_PROBE_DIR"], f"{name}-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _dump(*_):
    _write("gc", {"pid": os.getpid(), "threshold": list(gc.get_threshold()),
                  "collections": list(_collections)})


def _forked():
    _write("fork", {"pid": os.getpid(), "frozen_at_fork": gc.get_freeze_count()})


if os.environ.get("SHROUD_GC_PROBE_DIR"):
    gc.callbacks.append(_count)
    signal.signal(signal.SIGUSR2, _dump)
    os.register_at_fork(after_in_child=_forked)
