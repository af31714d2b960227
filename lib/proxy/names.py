"""Names no tunnel may bind, and no public connection is routed by (docs/SECURITY.md, "Names
reserved to the proxy").

Owning SNI and Host for the proxy's own name would pass an ACME challenge for it, i.e. give a
publicly trusted certificate for the name that clients verify the proxy by. Addresses and
loopback names are never a tunnel's to take either. Pure code: no I/O.

Public API::

    reserved = ReservedNames(own_names=["proxy.example.net", "127.0.0.1"],
                             allow_loopback_names=False)
    reserved = ReservedNames.for_config(config)   # lib.proxy.server.ProxyConfig's names
    reserved.reason(name) -> str | None     # why a normalised name (or wildcard) is reserved
    reserved.names_kept                     # answers kept (at most NAMES_KEPT): tests
    reserved.own                            # the proxy's own names, normalised

Rule table (name / answer):

    an IP literal (1.2.3.4, [::1]), or a name whose last label is a number (127.1, 0x7f.1:
    browsers read those as IPv4 addresses, WHATWG URL "ends in a number")   "an IP address"
    localhost, or a name under .localhost (RFC 6761 6.3; names under it may
    be allowed with --allow-loopback-names, for demos on one machine)       "a loopback name"
    a name under .onion (RFC 7686: only Tor resolves them)                  "an onion name"
    one of the proxy's own names (--hostname, one-port admin hosts)         "this proxy's own name"
    a wildcard covering any of the above                     "a wildcard covering ..."
    anything else                                                           None
"""
from __future__ import annotations

import functools
import re

from lib.protocol.sniff import normalize_hostname

_NUMERIC_LABEL_RE = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")
NAMES_KEPT = 1024
_SPECIAL_SUFFIXES = (("localhost", "a loopback name"), ("onion", "an onion name"))


class ReservedNames:
    """The reservation rules for one proxy; ``own_names`` may hold junk (it is dropped)."""

    def __init__(self, own_names=(), allow_loopback_names: bool = False):
        self.allow_loopback_names = allow_loopback_names
        own = set()
        for name in own_names:
            try:
                own.add(normalize_hostname(name))
            except (ValueError, TypeError):
                continue  # not a host name (an empty setting): nothing to reserve
        self.own = frozenset(own)
        # Asked for every public connection: the answers for the last NAMES_KEPT names are
        # kept (they depend on the name and this object only; an LRU, so a peer naming ever
        # new hosts only evicts older ones).
        self._reasons = functools.lru_cache(maxsize=NAMES_KEPT)(self._reason)

    @classmethod
    def for_config(cls, config) -> "ReservedNames":
        """The reservations of a proxy configured by ``config`` (lib.proxy.server.ProxyConfig):
        its --hostname, --admin-hosts and --public-host are its own names."""
        return cls((config.hostname, config.public_host, *config.own_names),
                   allow_loopback_names=config.allow_loopback_names)

    def reason(self, name: str) -> str | None:
        """Why ``name`` (normalised by lib.protocol.sniff.normalize_hostname, a wildcard
        allowed) is reserved, or None when it is not."""
        return self._reasons(name)

    @property
    def names_kept(self) -> int:
        """Names whose answer is kept now: the cache's bound (NAMES_KEPT) holds."""
        return self._reasons.cache_info().currsize

    def _reason(self, name: str) -> str | None:
        if name.startswith("*."):
            base = name[2:]
            why = self._exact(base) or self._special_suffix(base)
            if why is not None:
                return f"a wildcard covering {why}"
            for own in sorted(self.own):
                if own.endswith("." + base):
                    return f"a wildcard covering this proxy's own name {own}"
            return None
        return self._exact(name)

    def _exact(self, name: str) -> str | None:
        if name.startswith("[") or _NUMERIC_LABEL_RE.match(name.rsplit(".", 1)[-1]):
            return "an IP address"
        why = self._special_suffix(name)
        if why is not None and not (self.allow_loopback_names and name.endswith(".localhost")):
            return why
        if name in self.own:
            return "this proxy's own name"
        return None

    @staticmethod
    def _special_suffix(name: str) -> str | None:
        for suffix, why in _SPECIAL_SUFFIXES:
            if name == suffix or name.endswith("." + suffix):
                return why
        return None
