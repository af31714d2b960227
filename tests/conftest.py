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
def close_left_sessions():
    """After each test, the mux sessions tests.support.muxpair.session_pair made and the test
    left open are closed: their heartbeats would wake greenlets in later tests."""
    yield
    muxpair = sys.modules.get("tests.support.muxpair")
    if muxpair is not None:
        muxpair.close_left_sessions()
