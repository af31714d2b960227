"""tests.support.wait: the one polling helper."""
import pytest

from tests.support.wait import wait_for


def test_returns_the_first_truthy_value():
    calls = iter([0, None, [], "ready", "later"])
    assert wait_for(lambda: next(calls), "a value", timeout=5, interval=0) == "ready"


def test_fails_naming_what_and_the_last_value():
    with pytest.raises(AssertionError, match=r"not within 0.05 s: the moon \(last 0\)"):
        wait_for(lambda: 0, "the moon", timeout=0.05, interval=0.01)
