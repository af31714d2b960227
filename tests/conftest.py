"""Shared pytest fixtures. Fixture modules live in tests/fixtures/ and are listed here."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)



def pytest_report_header(config):
    """Which build of the codec modules this run tests (lib/native.py)."""
    import lib.protocol  # noqa: F401  (chooses the build)
    from lib import native

    return f"codec modules: {native.STATUS}"


pytest_plugins = [
    "tests.fixtures.tor",
    "tests.fixtures.gopeer",
    "tests.fixtures.gotunnel",
    "tests.fixtures.dns",
    "tests.fixtures.postgres",
    "tests.fixtures.pebble",
]
