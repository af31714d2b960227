"""Who may bind which hostname on a public proxy: the durable store and the bind policy.

A *name* is a host name (``app.example.com``), a wildcard (``*.example.com``: one or more leading
labels, as routing matches them) or a TCP port (``tcp:2222``). A *key* is a client's identity
fingerprint (64 lower-case hex, :func:`lib.identity.fingerprint`). Unsigned binds (the original
Go client sends no key) have key ``None``.

:class:`OwnershipPolicy` decides a bind in this order; the first rule that speaks wins:

Blocks (the operator's kill switch) are kept by the store but are not a rule here: the bind
decision (lib/proxy/bindpolicy.py) refuses a blocked name or key before it asks this policy.

1. **Allow-list file**: lines ``name-or-wildcard  fingerprint [fingerprint ...]`` (``#`` starts a
   comment; fingerprint ``*`` means any key, unsigned binds included). The most specific pattern
   listing the name decides alone: only its keys may bind. Re-read when the file changes.
2. **Unsigned binds** stop here: allowed when the name matches ``allow_unsigned``, else refused
   (``signature-required``). They never own a name.
3. **DNS**: TXT records at ``_shroud.<name>`` (``_shroud.<base>`` for ``*.<base>``) holding
   ``shroud-key=<fingerprint>`` or the bare fingerprint. If they name keys, only those keys may
   bind, and a stored owner for another key is replaced (the domain's owner vouches; the change
   goes into the audit log). Answers are cached ``dns_cache_ttl`` seconds (errors 5 s) in a
   bounded LRU, and concurrent binds for one name share one lookup. When DNS fails, an
   existing owner keeps its name but no new name is granted (``internal``, try again).
4. **Stored owner / trust on first use**: the owner of the name, or of the most specific
   wildcard covering it, keeps it; any other key is refused (``not-owner``, naming the owner's
   short fingerprint and since when). With ``tofu=True`` the first key to bind an unowned name
   becomes its owner, durably. TOFU never grants a wildcard: those need rule 1 or 3.

4a. **Claim limits** (docs/SECURITY.md, "Another client"; :class:`ClaimLimits`): a new first-use
   claim is refused (``limit``) beyond the key's quota of names or its address's rate; a
   first-use claim nobody bound for ``expiry_days`` lapses and may be claimed anew.

The store behind the policy is any :class:`lib.proxy.store.Store` (SQLite in the data dir, or
the fleet's PostgreSQL): this module holds the rules, ``lib/proxy/store/`` the records. A store
that cannot be reached refuses with ``store-unavailable`` (the client retries); any other store
failure with ``internal``.

Public API::

    canonical_name(name) -> str          # normalised host/wildcard/"tcp:PORT"; ValueError
    OwnershipStore(path, ...)            # = lib.proxy.store.sqlite.SqliteStore (see there and
                                         # lib/proxy/store/__init__.py for the store's API)
    OwnershipPolicy(store, allowlist_path=None, dns_resolver=None, tofu=True,
                    allow_unsigned=None, dns_timeout=2.0, dns_cache_ttl=60.0,
                    dns_cache_size=1024, dns_lookup=None, clock=time.monotonic)
        .decide(hostname, key=None, address=None) -> Decision
        address: the tunnel's peer host, for the per-address claim rate.
        dns_resolver: (host, port) of a resolver; dns_lookup: callable(qname) -> list[str]
        (TXT strings, raising lib.net.dnsclient.DnsError) replacing it, e.g. one going via Tor.
    Decision(allowed, method, reason, code)
        method: "allowlist" | "dns" | "tofu" | "operator" | "unsigned" | "invalid" |
                "none" | "limit" | "error";  code: "" or a REASON_* value
    Ownership, Block, Blocks, AuditEntry, ClaimLimits, OwnershipError, StoreUnavailable,
    ClaimRefused
                                         # re-exported from lib.proxy.store
    AllowList(path)  .lookup(name) -> (pattern, frozenset) | None,  .reload_if_changed()
    short_key(key) -> str       # first 16 hex digits, as reasons show it
"""
from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from typing import Callable, NamedTuple

from lib.net import dnsclient
from lib.peerlog import PeerLog
from lib.protocol.messages import (REASON_BAD_REQUEST, REASON_INTERNAL, REASON_INVALID_HOSTNAME,
                                   REASON_NOT_ALLOWED, REASON_NOT_OWNER,
                                   REASON_SIGNATURE_REQUIRED)
from lib.proxy.store.base import (AUDIT_KEEP, BLOCK_CACHE_TTL, KEY_RE as _KEY_RE, METHODS,
                                  TOUCH_INTERVAL, AuditEntry, Block, Blocks, ClaimLimits,
                                  ClaimRefused, Ownership, OwnershipError, Store,
                                  StoreUnavailable,
                                  canonical_key as _canonical_key, canonical_name,
                                  candidates as _candidates, short_key, when as _when)
from lib.proxy.store.sqlite import (BUSY_TIMEOUT, DEFAULT_MAX_SIZE, SCHEMA_VERSION,
                                    SqliteStore as OwnershipStore)

log = logging.getLogger("shroud.ownership")

__all__ = ["AUDIT_KEEP", "BLOCK_CACHE_TTL", "BUSY_TIMEOUT", "DEFAULT_MAX_SIZE", "METHODS",
           "SCHEMA_VERSION", "TOUCH_INTERVAL", "AllowList", "AuditEntry", "Block", "Blocks",
           "ClaimLimits", "ClaimRefused", "Decision", "Ownership", "OwnershipError",
           "OwnershipPolicy", "OwnershipStore", "Store", "StoreUnavailable", "canonical_name",
           "short_key"]

# The allow-list is an operator's file: 4 MiB is ~40k lines, far beyond a hand-kept list.
MAX_ALLOWLIST_SIZE = 4 * 1024 * 1024
# DNS failures are remembered briefly so a bind storm against a broken zone stays cheap, but
# short enough that a fixed zone is seen quickly.
DNS_ERROR_TTL = 5.0


class Decision(NamedTuple):
    allowed: bool
    method: str
    reason: str
    code: str  # "" when allowed, else a lib.protocol.messages REASON_* code


# --- the allow-list file --------------------------------------------------------------------
class AllowList:
    """The operator's allow-list file, re-read when its mtime, size or inode changes.

    :raises OwnershipError: at construction, when the file is missing or malformed. A later
        bad edit is logged and the last good version stays in force.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._stamp = None
        self._entries: dict = {}
        self._load(self._stat())

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise OwnershipError("cannot read allow-list %s: %s" % (self.path, exc)) from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, stamp) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_ALLOWLIST_SIZE + 1)
        except OSError as exc:
            raise OwnershipError("cannot read allow-list %s: %s" % (self.path, exc)) from None
        if len(data) > MAX_ALLOWLIST_SIZE:
            raise OwnershipError("allow-list %s is larger than %d bytes"
                                 % (self.path, MAX_ALLOWLIST_SIZE))
        self._entries = self.parse(data, self.path)
        self._stamp = stamp

    @staticmethod
    def parse(data: bytes, path: str = "<allow-list>") -> dict:
        """``{pattern: frozenset(fingerprints or "*")}``. :raises OwnershipError: naming the
        file and line."""
        entries: dict = {}
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise OwnershipError("allow-list %s is not UTF-8" % path) from None
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) < 2:
                raise OwnershipError("allow-list %s line %d: %r names no key (write "
                                     "'hostname fingerprint...', or '*' for any key)"
                                     % (path, number, fields[0]))
            try:
                pattern = canonical_name(fields[0])
            except ValueError as exc:
                raise OwnershipError("allow-list %s line %d: bad name %r: %s"
                                     % (path, number, fields[0], exc)) from None
            keys = set()
            for field in fields[1:]:
                if field == "*":
                    keys.add("*")
                    continue
                try:
                    keys.add(_canonical_key(field))
                except ValueError:
                    raise OwnershipError("allow-list %s line %d: %r is not a key fingerprint "
                                         "(64 hex digits) or '*'" % (path, number, field)) \
                        from None
            entries[pattern] = entries.get(pattern, frozenset()) | keys
        return entries

    def reload_if_changed(self) -> None:
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._load(stamp)
                log.info("allow-list %s reloaded: %d names", self.path, len(self._entries))
        except OwnershipError as exc:
            log.error("%s; keeping the previous allow-list", exc)

    def lookup(self, name: str):
        """The most specific (pattern, keys) listing ``name``, or None."""
        for candidate in _candidates(name):
            keys = self._entries.get(candidate)
            if keys is not None:
                return candidate, keys
        return None


# --- the policy -----------------------------------------------------------------------------
def _dns_name(name: str) -> str | None:
    """Where the TXT record vouching for ``name`` lives, or None (ports, IP literals)."""
    if name.startswith("tcp:") or name.startswith("[") or re.match(r"[0-9.]+\Z", name):
        return None
    if name.startswith("*."):
        name = name[2:]
    qname = "_shroud." + name
    # A valid 246-253 character name has no room for the prefix: no record can vouch for it.
    return qname if len(qname) <= 253 else None


def _txt_keys(records) -> frozenset:
    keys = set()
    for record in records:
        text = record.strip()
        if _KEY_RE.match(text.lower()):
            keys.add(text.lower())
            continue
        for token in text.split():
            label, _, value = token.partition("=")
            if label.lower() == "shroud-key" and _KEY_RE.match(value.lower()):
                keys.add(value.lower())
    return frozenset(keys)


def _allowed(method: str, reason: str) -> Decision:
    return Decision(True, method, reason, "")


def _refused(method: str, reason: str, code: str) -> Decision:
    return Decision(False, method, reason, code)


class OwnershipPolicy:
    """Decides binds (see the module docstring for the order of the rules)."""

    def __init__(self, store: Store, allowlist_path: str | None = None,
                 dns_resolver=None, tofu: bool = True, allow_unsigned=None,
                 dns_timeout: float = 2.0, dns_cache_ttl: float = 60.0,
                 dns_cache_size: int = 1024, dns_lookup=None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.allowlist = AllowList(allowlist_path) if allowlist_path else None
        self.tofu = tofu
        self._unsigned = frozenset(canonical_name(p) for p in (allow_unsigned or ()))
        if dns_lookup is None and dns_resolver is not None:
            resolver = (str(dns_resolver[0]), int(dns_resolver[1]))

            def dns_lookup(qname):
                return dnsclient.lookup_txt(qname, resolver=resolver, timeout=dns_timeout)
        self._dns_lookup = dns_lookup
        self._dns_timeout = dns_timeout
        self._dns_ttl = dns_cache_ttl
        self._dns_cache_size = dns_cache_size  # bounded LRU: one entry per distinct name
        self._dns_cache: collections.OrderedDict = collections.OrderedDict()
        self._dns_inflight: dict = {}
        self._dns_lock = threading.Lock()
        self._clock = clock
        # Lines a client's binds trigger, rate-limited per address ("store" for the store's
        # own failures, which every bind meets while the database is away); under this
        # module's logger, not PeerLog's default (the mux's).
        self._peer_log = PeerLog(logger=log)

    # --- DNS --------------------------------------------------------------------------
    def _dns_keys(self, qname: str):
        """Keys named at ``qname`` (frozenset, maybe empty), or the DnsError of the lookup."""
        with self._dns_lock:
            hit = self._dns_cache.get(qname)
            if hit is not None and hit[0] > self._clock():
                self._dns_cache.move_to_end(qname)
                return hit[1]
            event = self._dns_inflight.get(qname)
            leader = event is None
            if leader:
                event = self._dns_inflight[qname] = threading.Event()
        if not leader:
            # Another bind is asking already: wait for its answer (bounded by its timeout).
            event.wait(self._dns_timeout + 1.0)
            with self._dns_lock:
                hit = self._dns_cache.get(qname)
            if hit is not None:
                return hit[1]
            return dnsclient.DnsTimeout("DNS lookup of %s still in progress" % qname,
                                        name=qname)
        # Leader: ask, then publish the answer (an unexpected exception publishes a generic
        # failure, so followers never wait on a lookup that is gone).
        result, ttl = dnsclient.DnsError("DNS lookup of %s failed" % qname, name=qname), \
            DNS_ERROR_TTL
        try:
            result, ttl = _txt_keys(self._dns_lookup(qname)), self._dns_ttl
        except dnsclient.DnsError as exc:
            result = exc
            log.warning("DNS TXT lookup of %s failed: %s", qname, exc)
        finally:
            with self._dns_lock:
                self._dns_cache[qname] = (self._clock() + ttl, result)
                self._dns_cache.move_to_end(qname)
                while len(self._dns_cache) > self._dns_cache_size:
                    self._dns_cache.popitem(last=False)
                del self._dns_inflight[qname]
            event.set()
        return result

    # --- the decision -----------------------------------------------------------------
    def decide(self, hostname: str, key: str | None = None,
               address: str | None = None) -> Decision:
        """May ``key`` (a fingerprint, or None for an unsigned bind) bind ``hostname``?

        An allowed signed bind is recorded in the store (first use, or the allow-list/DNS
        owner). A store failure refuses rather than raising: ``store-unavailable`` when the
        database cannot be reached, else ``internal``.
        """
        try:
            name = canonical_name(hostname)
        except ValueError as exc:
            return _refused("invalid", "invalid name %r: %s" % (hostname, exc),
                            REASON_INVALID_HOSTNAME)
        if key is not None:
            try:
                key = _canonical_key(key)
            except ValueError as exc:
                return _refused("invalid", str(exc), REASON_BAD_REQUEST)
        try:
            return self._decide(name, key, address)
        except StoreUnavailable as exc:
            self._peer_log.log("store", logging.WARNING, "bind of %s refused: %s", name, exc)
            return _refused("error", "the proxy's ownership store is unavailable; try again "
                            "shortly (%s)" % exc, StoreUnavailable.code)
        except OwnershipError as exc:
            self._peer_log.log("store", logging.ERROR, "bind of %s refused: %s", name, exc)
            return _refused("error", "the proxy cannot check ownership of %s right now: %s"
                            % (name, exc), REASON_INTERNAL)

    def _decide(self, name: str, key: str | None, address: str | None) -> Decision:
        if self.allowlist is not None:
            self.allowlist.reload_if_changed()
            listed = self.allowlist.lookup(name)
            if listed is not None:
                return self._by_allowlist(name, key, *listed)

        if key is None:
            if any(c in self._unsigned for c in _candidates(name)):
                return _allowed("unsigned", "unsigned binds are allowed for %s" % name)
            return _refused("none", "%s requires a signed bind: this proxy needs the client's "
                            "identity key (use the Shroud client)" % name,
                            REASON_SIGNATURE_REQUIRED)

        qname = _dns_name(name) if self._dns_lookup is not None else None
        dns_failed = None
        if qname is not None:
            vouched = self._dns_keys(qname)
            if isinstance(vouched, dnsclient.DnsError):
                dns_failed = vouched
            elif vouched:
                if key not in vouched:
                    return _refused("dns", "the DNS TXT record %s names other keys for %s, "
                                    "not %s" % (qname, name, short_key(key)), REASON_NOT_OWNER)
                self._record_quietly(name, key, "dns", "TXT %s names this key" % qname)
                return _allowed("dns", "%s vouches for key %s" % (qname, short_key(key)))
        return self._by_store(name, key, dns_failed, address)

    def _by_allowlist(self, name: str, key: str | None, pattern: str, keys) -> Decision:
        where = "allow-list %s entry %s" % (self.allowlist.path, pattern)
        if "*" in keys:
            if key is not None:
                self._record_quietly(name, key, "allowlist", "%s allows any key" % where)
            return _allowed("allowlist", "%s allows any key" % where)
        if key is None:
            return _refused("allowlist", "%s is on the allow-list for specific keys: bind with "
                            "one of them (a signed bind)" % name, REASON_SIGNATURE_REQUIRED)
        if key not in keys:
            return _refused("allowlist", "%s is on the allow-list for other keys, not %s"
                            % (name, short_key(key)), REASON_NOT_ALLOWED)
        self._record_quietly(name, key, "allowlist", "listed in %s" % where)
        return _allowed("allowlist", "%s lists key %s" % (where, short_key(key)))

    def _record_quietly(self, name: str, key: str, method: str, detail: str) -> None:
        # The allow-list or DNS is the authority here; the store only keeps the history, so
        # a full, broken or unreachable store must not refuse the bind. It is logged, never
        # silent.
        try:
            self.store.record(name, key, method, actor=method, detail=detail)
        except OwnershipError as exc:
            log.error("bind of %s allowed by %s but not recorded: %s", name, method, exc)

    def _by_store(self, name: str, key: str, dns_failed, address: str | None) -> Decision:
        cover = self.store.covering_owner(name)
        if cover is not None and cover.key != key:
            through = "" if cover.name == name else " (through %s)" % cover.name
            return _refused("tofu" if cover.method != "operator" else "operator",
                            "%s belongs to key %s since %s%s" % (
                                name, short_key(cover.key), _when(cover.first_bound), through),
                            REASON_NOT_OWNER)
        if cover is not None and cover.method == "operator":
            self.store.claim(cover.name, key, "operator")  # refreshes last_bound
            return _allowed("operator", "the operator assigned %s to key %s"
                            % (cover.name, short_key(key)))
        if dns_failed is not None and cover is None:
            return _refused("dns", "cannot check DNS for %s (%s); try again later"
                            % (name, dns_failed), REASON_INTERNAL)
        if not self.tofu:
            qname = _dns_name(name)  # a port or an address has none: only the allow-list
            vouchers = "allow-list entry" + (" or DNS TXT record %s" % qname if qname else "")
            return _refused("none", "no %s lets key %s bind %s" % (
                vouchers, short_key(key), name), REASON_NOT_ALLOWED)
        if name.startswith("*.") and (cover is None or cover.name != name):
            return _refused("none", "wildcard %s needs an allow-list entry or a DNS TXT "
                            "record %s naming key %s (first use never grants a wildcard)"
                            % (name, _dns_name(name), short_key(key)), REASON_NOT_ALLOWED)
        try:
            owner, created = self.store.claim(name, key, "tofu", address=address)
        except ClaimRefused as exc:
            self._peer_log.log(address or key, logging.INFO, "first use of %s by key %s "
                               "refused: %s", name, short_key(key), exc)
            return _refused("limit", str(exc), ClaimRefused.code)
        if owner.key != key:  # another bind won the race for this name
            return _refused("tofu", "%s belongs to key %s since %s" % (
                name, short_key(owner.key), _when(owner.first_bound)), REASON_NOT_OWNER)
        if created:
            self._peer_log.log(address or key, logging.INFO, "%s now owned by key %s (first use)",
                               name, short_key(key))
            return _allowed("tofu", "first use: %s now belongs to key %s"
                            % (name, short_key(key)))
        return _allowed("tofu", "%s belongs to key %s since %s"
                        % (name, short_key(key), _when(owner.first_bound)))
