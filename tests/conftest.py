"""Shared pytest fixtures. Fixture modules live in tests/fixtures/ and are listed here."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


pytest_plugins = [
    "tests.fixtures.tor",
    "tests.fixtures.gopeer",
    "tests.fixtures.gotunnel",
    "tests.fixtures.dns",
    "tests.fixtures.postgres",
    "tests.fixtures.pebble",
]


@pytest.fixture(autouse=True)
def close_left_sessions(request):
    """After each test (and its own fixtures' teardown), the mux sessions made during it and
    left open are closed: their heartbeats would wake greenlets in later tests
    (tests/support/leftsessions.py). Broader fixtures' sessions, made before, are kept.
    SHROUD_LEFT_SESSIONS=FILE appends a line per test that left any: its id and how many."""
    from tests.support import leftsessions
    since = leftsessions.mark()
    yield
    left = leftsessions.close_left(since)
    if left and os.environ.get("SHROUD_LEFT_SESSIONS"):
        with open(os.environ["SHROUD_LEFT_SESSIONS"], "a") as f:
            f.write(f"{request.node.nodeid} {len(left)}\n")
