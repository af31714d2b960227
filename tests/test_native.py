"""The compiled codec modules (lib/native.py, scripts/build_native.py): used when they match the
sources, never when stale, broken or SHROUD_PURE=1, and byte for byte the same as the sources.

These need the build (scripts/setup.sh makes it; CI has a C compiler): a missing build fails
here, it is not skipped.
"""
import os
import shutil
import subprocess
import sys

import pytest

import lib.protocol  # noqa: F401  (chooses the build)
from lib import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(ROOT, "tests", "support", "codec_trace.py")
PROBE = ("import lib.protocol.muxframe as m, lib.protocol.muxstate, lib.protocol.sniff, lib.native as n;"
         "print(m.__file__); print(n.STATUS)")


def _env(pure: bool) -> dict:
    env = dict(os.environ)
    env.pop("SHROUD_PURE", None)
    if pure:
        env["SHROUD_PURE"] = "1"
    return env


def _probe(cwd: str, pure: bool = False) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=_env(pure), check=True,
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    return out[0], out[1]


@pytest.fixture
def checkout(tmp_path):
    """A copy of lib/ and of the build, to edit or break without touching the real ones."""
    assert os.path.exists(native.STAMP), "no compiled build: run ./scripts/setup.sh"
    shutil.copytree(os.path.join(ROOT, "lib"), tmp_path / "lib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(native.BUILD_DIR, tmp_path / "build" / "native")
    return tmp_path


def test_this_run_tests_the_build_it_was_asked_for():
    """scripts/test.sh names the build each pass must test: a pass that silently ran the other
    one (no compiler, a stale build) fails here."""
    expected = os.environ.get("SHROUD_EXPECT_BUILD")
    if expected:
        assert ("compiled" if native.compiled() else "pure") == expected, native.STATUS
    from lib.protocol import muxframe, muxstate, sniff
    for module in (muxframe, muxstate, sniff):
        if native.compiled():
            assert module.__file__.startswith(native.BUILD_DIR + os.sep), module.__file__
            assert not module.__file__.endswith(".py"), module.__file__
        else:
            assert module.__file__ == os.path.join(ROOT, "lib", "protocol",
                                                   module.__name__.rsplit(".", 1)[1] + ".py")


def test_a_matching_build_is_used_and_shroud_pure_forces_the_sources(checkout):
    path, status = _probe(checkout)
    assert path.startswith(str(checkout / "build" / "native" / "lib" / "protocol" / "muxframe."))
    assert path.endswith(".so") and status.startswith("compiled (mypyc)")
    path, status = _probe(checkout, pure=True)
    assert path == str(checkout / "lib" / "protocol" / "muxframe.py")
    assert status == "pure Python (SHROUD_PURE=1)"


def test_an_edited_source_makes_the_build_stale_and_the_edit_runs(checkout):
    source = checkout / "lib" / "protocol" / "muxstate.py"
    source.write_text(source.read_text() + "\nEDITED = True\n")
    path, status = _probe(checkout)
    assert path == str(checkout / "lib" / "protocol" / "muxframe.py")
    assert "stale" in status and "./scripts/setup.sh" in status
    out = subprocess.run([sys.executable, "-c", "import lib.protocol.muxstate as s; print(s.EDITED)"],
                         cwd=checkout, env=_env(False), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_an_edited_module_the_compiled_ones_import_makes_the_build_stale(checkout):
    """mypyc compiled sniff against httphead's types: get_all returning a tuple (a fine edit
    for the sources) made every compiled HTTP sniff a TypeError while the build still counted
    as current. An edit to a module in DEPENDS makes the build stale; the sources run."""
    source = checkout / "lib" / "protocol" / "httphead.py"
    text = source.read_text()
    edited = text.replace("def get_all(self, name: str) -> list[str]:",
                          "def get_all(self, name: str) -> tuple[str, ...]:").replace(
        "return [v for n, v in self.fields if n == name]",
        "return tuple(v for n, v in self.fields if n == name)")
    assert edited != text
    source.write_text(edited)
    sniffed = subprocess.run(
        [sys.executable, "-c", "import lib.native as n, lib.protocol.sniff as s; print(n.STATUS);"
         " print(s.sniff_http_host(b'GET / HTTP/1.1\\r\\nHost: a.test\\r\\n\\r\\n'))"],
        cwd=checkout, env=_env(False), capture_output=True, text=True, timeout=60)
    assert sniffed.returncode == 0, sniffed.stderr
    status, name = sniffed.stdout.splitlines()
    assert "stale" in status and name == "a.test"


def test_every_module_of_lib_the_compiled_ones_import_is_in_the_digest():
    """A new import of lib/ in a compiled module must join native.DEPENDS."""
    import ast
    imported = set()
    for name in native.MODULES:
        with open(os.path.join(ROOT, "lib", "protocol", name + ".py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lib"):
                modules = [node.module + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names if a.name.startswith("lib")]
            else:
                continue
            for module in modules:  # "from lib.protocol import httphead" names a module
                path = module.replace(".", "/")
                if os.path.exists(os.path.join(ROOT, path + ".py")):
                    imported.add(path + ".py")
                elif os.path.exists(os.path.join(ROOT, path.rsplit("/", 1)[0] + ".py")):
                    imported.add(path.rsplit("/", 1)[0] + ".py")
    compiled = {f"lib/protocol/{m}.py" for m in native.MODULES}
    assert imported - compiled == set(native.DEPENDS)


def test_a_build_that_does_not_load_falls_back_to_the_sources(checkout):
    shared = [f for f in os.listdir(checkout / "build" / "native" / "lib" / "protocol")
              if f.startswith(native.GROUP)]
    assert len(shared) == 1
    (checkout / "build" / "native" / "lib" / "protocol" / shared[0]).write_bytes(b"not an ELF")
    path, status = _probe(checkout)
    assert path == str(checkout / "lib" / "protocol" / "muxframe.py")
    assert status.startswith("pure Python (the compiled build does not load")


def test_no_build_runs_the_sources(checkout):
    shutil.rmtree(checkout / "build")
    path, status = _probe(checkout)
    assert path == str(checkout / "lib" / "protocol" / "muxframe.py")
    assert status.startswith("pure Python (no compiled build")


def test_compiled_and_pure_produce_the_same_bytes_and_events():
    """Frames, two sessions talking through random splits, a hostile peer, the sniffers: the
    compiled build and the sources must print the same trace (tests/support/codec_trace.py)."""
    assert os.path.exists(native.STAMP), "no compiled build: run ./scripts/setup.sh"
    traces = {}
    for pure in (False, True):
        done = subprocess.run([sys.executable, TRACE, "--which"], cwd=ROOT, env=_env(pure),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        which, _, trace = done.stdout.partition("\n")
        assert which.startswith("pure" if pure else "compiled"), which
        traces[pure] = trace
    assert len(traces[True].splitlines()) > 100
    assert traces[False] == traces[True]
