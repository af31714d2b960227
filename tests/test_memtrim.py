"""lib.memtrim: the trimmer's full collection holds the hub, so it runs only once the process
is quiet, and then still gives the peak's garbage back. In a real process of its own (the
trimmer freezes the start-up objects, which must not touch pytest's)."""
import json
import subprocess
import sys

import pytest

from tests.support.procs import ROOT

pytestmark = pytest.mark.timeout(90)

# Two busy phases (a greenlet making container objects, so CPython's own young collections run;
# one hashing, which makes none, as keep-alive traffic makes none), then a quiet one with a
# garbage cycle that only a full collection frees. Every gc.collect() after start-up is recorded
# with the phase it fell in. Every phase ends on what the trimmer does or on a deadline, never
# on a fixed sleep.
PROBE = """
import gc, hashlib, json, sys, time, weakref
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

# Keeps the process busy with work() until the trimmer skipped `windows` more windows as busy
# (or ran a pass, or a deadline passed).
def busy_with(work, name, windows=2):
    phase[0] = name
    def spin():
        while phase[0] == name:
            work()
            gevent.sleep(0)
    worker = gevent.spawn(spin)
    first = stats()["skipped_busy"]
    deadline = time.monotonic() + 20
    while (time.monotonic() < deadline and name not in collects
           and stats()["skipped_busy"] - first < windows):
        gevent.sleep(0.05)
    skipped = stats()["skipped_busy"] - first
    phase[0] = "between"
    worker.join()
    return skipped

# Busy making container objects (CPython's own young collections run), then busy with no
# lasting container objects, as a proxy under keep-alive traffic is (its young count stays put).
skipped = busy_with(lambda: [[i] for i in range(2000)], "busy")
skipped_plain = busy_with(lambda: hashlib.sha256(b"x" * 65536).digest(), "busy_plain")

phase[0] = "quiet"
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
print(json.dumps({"collects": collects, "skipped_busy": skipped,
                  "skipped_plain": skipped_plain, "freed": bool(freed),
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
    assert "busy_plain" not in r["collects"], \
        "the trimmer ran a full collection while busy without new container objects"
    assert r["skipped_busy"] >= 2 and r["skipped_plain"] >= 2
    assert r["freed"] and "quiet" in r["collects"] and r["passes"] >= 1
