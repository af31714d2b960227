"""A probe of CPython's collector in a real Shroud process (tests/test_collector.py): put this
directory on PYTHONPATH and Python loads it at start-up, before the entry point.

Counts every collection by generation (``gc.callbacks``). On SIGUSR2 the process writes
``{"pid", "threshold", "collections": [gen0, gen1, gen2]}`` (counts since start) to
``$SHROUD_GC_PROBE_DIR/gc-<pid>.json``, written whole then renamed, so a reader never sees half
a file. Only for tests: nothing in the project imports it.
"""
import gc
import json
import os
import signal

_collections = [0, 0, 0]


def _count(phase, info):
    if phase == "stop":
        _collections[info["generation"]] += 1


def _dump(*_):
    path = os.path.join(os.environ["SHROUD_GC_PROBE_DIR"], f"gc-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "threshold": list(gc.get_threshold()),
                   "collections": list(_collections)}, f)
    os.replace(path + ".tmp", path)


if os.environ.get("SHROUD_GC_PROBE_DIR"):
    gc.callbacks.append(_count)
    signal.signal(signal.SIGUSR2, _dump)
