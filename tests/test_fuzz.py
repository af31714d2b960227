"""A short run of bench/fuzz.py in the suite: 20,000 mutated inputs per decoder, only the
documented error types may escape and each target's properties hold; plus the inputs fuzzing
found, kept as regressions. How fast an input decodes is bench/fuzz.py's report (--slow-ms;
the inputs that once backtracked are among its HTTP seeds), not an assertion here."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import fuzz
from lib.protocol import sniff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = 20_000
SECONDS = 15  # a bound, not the expected time (1-5 s per target on 2 CPUs)


@pytest.mark.parametrize("name", ["frame", "mux", "messages", "sni", "http", "classify"])
def test_mutated_inputs_raise_only_documented_errors(name, tmp_path):
    target = fuzz.TARGETS[name]
    result = fuzz.run_mutate(target, INPUTS, SECONDS, str(tmp_path), seed=7,
                             slow_ms=float("inf"))  # speed: bench/fuzz.py
    assert result.escapes == [], "\n".join(f"{e.kind}: {e.message}" for e in result.escapes)
    assert result.inputs >= min(INPUTS, 2000)  # it really ran (time-bounded on a busy host)


def test_seeds_are_valid_inputs():
    # The corpus seeds real structure: every TLS seed names a host, every HTTP seed too.
    assert all(sniff.sniff_tls_sni(s) is not None for s in fuzz.tls_seeds())
    assert sum(1 for s in fuzz.tls_seeds() if sniff.sniff_tls_sni(s)) >= 7  # not the no-SNI or IP ones
    assert all(sniff.sniff_http_host(s) for s in fuzz.http_seeds())


def test_harness_catches_escapes_and_saves_them(tmp_path):
    # A decoder that leaks an IndexError and breaks a property: both must be reported and saved.
    def leaky(data: bytes) -> None:
        if data[:1] == b"\x00":
            raise IndexError("leaked")
        if len(data) > 3:
            raise fuzz.Violation("too long")
    target = fuzz.Target("leaky", leaky, lambda: [b"\x00", b"abcd", b"ab"], 64)
    result = fuzz.run_mutate(target, 500, 10, str(tmp_path), seed=1)
    kinds = {e.kind for e in result.escapes}
    assert {"IndexError", "Violation"} <= kinds
    assert result.escape_count >= 2
    for e in result.escapes:
        assert os.path.exists(e.path) and e.path.startswith(str(tmp_path))


def test_harness_reports_slow_inputs(tmp_path):
    target = fuzz.Target("sleepy", lambda d: time.sleep(0.02), lambda: [b"x"], 8)
    result = fuzz.run_mutate(target, 3, 10, str(tmp_path), slow_ms=5)
    assert result.escapes and result.escapes[0].kind == "slow"


# --- found by fuzzing -----------------------------------------------------------------------
def test_header_line_of_spaces_answers_the_same_whole_and_cut():
    # Was 2 s of CPU for one 16 KiB head (a regex backtracking over a run of spaces before a
    # forbidden byte); bench/fuzz.py times these heads (seeds). Here: the answers are right.
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX: a" + b" " * 16000
    with pytest.raises(sniff.SniffError):
        sniff.sniff_http_host(head + b"\x01\r\n\r\n")
    assert sniff.sniff_http_host(head + b"\r\n\r\n") == "a.test"
    assert head + b"\r\n\r\n" in fuzz.http_seeds()


def test_header_values_still_trimmed_and_control_bytes_refused():
    assert sniff.sniff_http_host(b"GET / HTTP/1.1\r\nHost: \t a.test \t \r\n\r\n") == "a.test"
    for bad in (b"X: a\x01b", b"X: a\rb", b"X: \x7f"):
        with pytest.raises(sniff.SniffError):
            sniff.sniff_http_host(b"GET / HTTP/1.1\r\nHost: a.test\r\n" + bad + b"\r\n\r\n")


def test_long_method_refused_whole_as_in_pieces():
    # Was accepted when the head arrived in one read and refused when split after 65 bytes.
    data = b"E" * 65 + b" / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    with pytest.raises(sniff.SniffError):
        sniff.sniff_http_host(data[:70])
    with pytest.raises(sniff.SniffError):
        sniff.sniff_http_host(data)
    assert sniff.sniff_http_host(b"E" * 64 + data[65:]) == "a.test"


def test_atheris_engine_runs_when_installed(tmp_path):
    import atheris  # noqa: F401  (pinned in requirements.txt: missing is a failure)
    out = subprocess.run(
        [sys.executable, "bench/fuzz.py", "--engine", "atheris", "--targets", "http",
         "--inputs", "3000", "--seconds", "20", "--crash-dir", str(tmp_path / "crashes")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| http | atheris | 3,000 |" in out.stdout
