"""Shared pytest fixtures. Fixture modules live in tests/fixtures/ and are listed here."""
import os
import sys

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
