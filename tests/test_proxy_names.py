"""lib.proxy.names: the names no tunnel may bind (issue 11 item 5); the proxy-level attack is in
tests/test_e2e_proxy.py."""
import pytest

from lib.protocol.sniff import normalize_hostname
from lib.proxy.names import ReservedNames

RESERVED = ReservedNames(["proxy.example.net", "Admin.Example.ORG:443", "127.0.0.1", "", "bad name"])


@pytest.mark.parametrize("name, why", [
    ("proxy.example.net", "this proxy's own name"),
    ("admin.example.org", "this proxy's own name"),
    ("127.0.0.1", "an IP address"),
    ("10.0.0.1", "an IP address"),
    ("[::1]", "an IP address"),
    ("127.1", "an IP address"),
    ("0x7f.1", "an IP address"),
    ("2130706433", "an IP address"),
    ("localhost", "a loopback name"),
    ("app.localhost", "a loopback name"),
    ("abcdefghijklmnop.onion", "an onion name"),
    ("*.localhost", "a wildcard covering a loopback name"),
    ("*.onion", "a wildcard covering an onion name"),
    ("*.example.net", "a wildcard covering this proxy's own name proxy.example.net"),
    ("*.net", "a wildcard covering this proxy's own name proxy.example.net"),
    ("*.127.0.0.1", "a wildcard covering an IP address"),
    ("example.net", None),
    ("web.example.net", None),
    ("*.web.example.net", None),
    ("localhost.example", None),
    ("onion.example", None),
    ("v1.example", None),
    ("*.example.com", None),
])
def test_reserved_names(name, why):
    assert RESERVED.reason(normalize_hostname(name, allow_wildcard=True)) == why


def test_own_names_are_normalised_and_junk_dropped():
    assert RESERVED.own == {"proxy.example.net", "admin.example.org", "127.0.0.1"}


def test_reasons_kept_are_bounded_and_say_the_same():
    """ReservedNames keeps the answers of the last NAMES_KEPT names it was asked (one per
    public connection): a peer naming ever new hosts cannot grow it past the bound, and a kept
    answer is the one worked out."""
    from lib.proxy.names import NAMES_KEPT
    rules = ReservedNames(["proxy.example.net"])
    for i in range(2 * NAMES_KEPT):
        assert rules.reason(f"h{i}.example.com") is None
    assert rules.names_kept == NAMES_KEPT
    for _ in range(2):  # worked out, then kept
        assert rules.reason("proxy.example.net") == "this proxy's own name"
        assert rules.reason("a.localhost") == "a loopback name"
        assert rules.reason("*.example.net") == ("a wildcard covering this proxy's own name "
                                                 "proxy.example.net")
