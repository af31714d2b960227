"""lib.memtrim: the trimmer's full collection holds the hub, so it runs only once the process
is quiet, and then still gives the peak's garbage back. In a real process of its own (the
trimmer freezes the start-up objects, which must not touch pytest's)."""
import json
import subprocess
import sys

import pytest

from tests.support.procs import ROOT

pytestmark = pytest.mark.timeout(90)

# A busy phase (a greenlet making container objects, so CPython's own young collections run)
# then a quiet one with a garbage cycle that only a full collection frees. Every gc.collect()
# after start-up is recorded with the phase it fell in. Both phases end on what the trimmer
# does or on a deadline, never on a fixed sleep.
PROBE = """
import gc, json, sys, time, weakref
import gevent
from lib import memtrim

phase = ["start"]
collects = []
real_collect = gc.collect
def recording_collect(*a, **kw):
    collects.append(phase[0])
    return real_collect(*a, **kw)

# Windows of 0.5 s: a busy window stays busy even if this loaded machine takes the CPU away
# from the process for part of one.
INTERVAL = 3.0
memtrim.start_memory_trimmer(interval=INTERVAL)
gc.collect = recording_collect
stats = getattr(memtrim, "trimmer_stats", lambda: {"skipped_busy": 0, "passes": 0})

phase[0] = "busy"
def busy():
    while phase[0] == "busy":
        keep = [[i] for i in range(2000)]
        gevent.sleep(0)
worker = gevent.spawn(busy)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not collects and stats()["skipped_busy"] < 2:
    gevent.sleep(0.05)
skipped = stats()["skipped_busy"]

phase[0] = "quiet"
worker.join()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
freed = []
weakref.finalize(a, freed.append, True)
del a, b
gc.disable()  # only a full collection by the trimmer may free the cycle now
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not freed:
    gevent.sleep(0.05)
print(json.dumps({"collects": collects, "skipped_busy": skipped, "freed": bool(freed),
                  "passes": stats()["passes"]}))
"""


def run_probe():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_trimmer_waits_while_busy_then_frees_the_peaks_garbage():
    r = run_probe()
    assert "busy" not in r["collects"], "the trimmer ran a full collection while busy"
    assert r["skipped_busy"] >= 2
    assert r["freed"] and "quiet" in r["collects"] and r["passes"] >= 1
