"""lib.allocator: the entry points run on jemalloc (Debian's libjemalloc2, installed by
scripts/setup.sh) with Python's objects in malloc, and their children keep their own allocator.
Real processes: the re-execution is the thing under test."""
import json
import os
import subprocess
import sys

import pytest

from lib import allocator
from tests.support.procs import ROOT, ProxyProc

pytestmark = pytest.mark.timeout(60)

# Re-executes itself through lib.allocator like the entry points, then reports what it runs on
# and what a child process it starts inherits.
PROBE = """
import json, os, subprocess, sys
from lib.allocator import active, reexec_with_jemalloc
reexec_with_jemalloc()
child = subprocess.run([sys.executable, "-c",
                        "import os, json; print(json.dumps({k: os.environ.get(k) for k in "
                        "('LD_PRELOAD', 'PYTHONMALLOC', 'MALLOC_CONF')}))"],
                       capture_output=True, text=True, check=True)
print(json.dumps({"active": active(), "pid": os.getpid(), "argv": sys.argv,
                  "env": {k: os.environ.get(k) for k in ("LD_PRELOAD", "PYTHONMALLOC",
                                                         "MALLOC_CONF")},
                  "child": json.loads(child.stdout)}))
"""


def probe(choice=None, extra_env=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF", allocator.ENV_CHOICE)}
    if choice is not None:
        env[allocator.ENV_CHOICE] = choice
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-u", "-c", PROBE, "arg1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


def test_jemalloc_is_installed():
    assert allocator.find_jemalloc(), "libjemalloc.so.2 missing: run ./scripts/setup.sh as root"


def test_reexec_runs_on_jemalloc_and_children_keep_their_allocator():
    out = probe()
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["active"] == "jemalloc"
    assert r["argv"][-1] == "arg1"  # same arguments after the re-execution
    # The variables are gone again: tor and other children start on their own allocator.
    assert r["env"] == {"LD_PRELOAD": None, "PYTHONMALLOC": None, "MALLOC_CONF": None}
    assert r["child"] == r["env"]


def test_original_variables_are_restored_for_children():
    out = probe(extra_env={"MALLOC_CONF": "narenas:2", "PYTHONMALLOC": "pymalloc_debug"})
    r = json.loads(out.stdout)
    assert r["active"] == "jemalloc"
    assert r["child"] == {"LD_PRELOAD": None, "PYTHONMALLOC": "pymalloc_debug",
                          "MALLOC_CONF": "narenas:2"}


def test_system_choice_does_not_reexecute():
    r = json.loads(probe("system").stdout)
    assert r["active"] == "system"


def test_bad_choice_is_a_clear_error():
    out = probe("tcmalloc")
    assert out.returncode != 0
    assert "SHROUD_ALLOCATOR must be auto, jemalloc or system" in out.stderr


def test_proxy_process_runs_on_jemalloc(tmp_path):
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "data"))
    try:
        assert "memory allocator: jemalloc" in proxy.log()
        with open(f"/proc/{proxy.pid}/maps") as f:
            assert "libjemalloc" in f.read()  # the pid Popen knows: re-executed in place
    finally:
        proxy.stop()
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "data2"), name="proxy-system",
                      env={allocator.ENV_CHOICE: "system"})
    try:
        assert "memory allocator: system" in proxy.log()
    finally:
        proxy.stop()


def test_gunicorn_master_and_worker_run_on_jemalloc(tmp_path):
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "data"), gunicorn=True, name="gproxy")
    try:
        assert "memory allocator: jemalloc" in proxy.log()  # logged by the worker
        with open(f"/proc/{proxy.pid}/maps") as f:
            assert "libjemalloc" in f.read()  # the master, re-executed by gunicorn.conf.py
    finally:
        proxy.stop()


def test_a_library_that_fails_to_load_falls_back_to_the_system_allocator(tmp_path):
    broken = tmp_path / "libjemalloc.so.2"
    broken.write_bytes(b"not an ELF file")
    out = probe(extra_env={allocator.ENV_LIBRARY: str(broken)})
    assert out.returncode == 0, out.stderr
    assert "cannot be preloaded" in out.stderr  # ld.so's own word, left visible
    r = json.loads(out.stdout)
    assert r["active"] == "system"
    # not left on malloc without pymalloc, and nothing leaks to children
    assert r["env"]["PYTHONMALLOC"] is None and r["env"]["LD_PRELOAD"] is None
    out = probe("jemalloc", extra_env={allocator.ENV_LIBRARY: str(broken)})
    assert out.returncode != 0 and "jemalloc could not be loaded" in out.stderr
