"""What both store backends share: the records, the names, the errors, and every rule.

:class:`Store` holds all of the store's behaviour as SQL that both SQLite and PostgreSQL run
(``?`` placeholders, ``INSERT ... ON CONFLICT``); a backend supplies only the plumbing:

    backend._transaction(what, body) -> body(tx)'s result   # one transaction; tx.execute(sql,
                                                            # args) -> cursor; all or nothing
    backend._rows(sql, args=()) -> list[tuple]              # one read
    backend._notify(tx, payload)                            # tell the fleet (PostgreSQL only)
    backend.wait_for_change(timeout) -> bool                # another instance changed blocks
    backend.describe() -> str                               # for logs; never a password
    backend.FOR_UPDATE                                      # row lock suffix ("" for SQLite)

Errors (a tree; callers catch what they can act on)::

    OwnershipError            the store cannot do this (corrupt, full, newer schema, ...)
      StoreUnavailable        the database cannot be reached now; try again (code
                              "store-unavailable")
    ClaimRefused              a new first-use claim is over a limit (docs/SECURITY.md,
                              "Another client"); code "limit"

Durable squatting (docs/SECURITY.md) is bounded here, in one transaction with the claim, so the
limits hold fleet-wide: :class:`ClaimLimits` caps the first-use names one key may own, rate
limits new claims per source address (a token bucket per address, in the store), and lets
first-use claims that nobody has bound for ``expiry_days`` lapse.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

from lib.errors import ShroudError
from lib.protocol.messages import REASON_LIMIT, REASON_STORE_UNAVAILABLE
from lib.protocol.sniff import normalize_hostname, wildcard_candidates

# Enough history for an operator to see weeks of kill-switch and ownership changes; trimmed so
# the log cannot grow without end.
AUDIT_KEEP = 10000
# last_bound is refreshed at most this often per name: a reconnect storm must not become an
# fsync storm, and a minute is precise enough for "last seen".
TOUCH_INTERVAL = 60.0
# Without a fleet watcher (a CLI, a test) blocks are re-read this often; with one (every proxy
# instance runs one, lib/proxy/fleet.py) only when told of a change. Routing never reads the
# database (docs/DESIGN.md, "Process model").
BLOCK_CACHE_TTL = 5.0
# The per-address claim buckets: one row per address that claimed recently. Rows whose bucket is
# full again carry no information and are pruned; beyond this many the oldest go first, so a
# flood of addresses grows the table to a bound, not without end.
MAX_RATE_ROWS = 100_000
# A fleet's live bindings are written in batches of this many rows per statement.
BATCH = 500
# The store-wide count of first-use names is re-read at most this often per instance (one
# index scan); between reads each instance adds its own claims. Other instances' claims of the
# last minute may overshoot the bound by that much: a bound, not an account.
COUNT_REFRESH = 60.0

METHODS = ("allowlist", "dns", "tofu", "operator")
KEY_RE = re.compile(r"[0-9a-f]{64}\Z")
_TCP_RE = re.compile(r"tcp:([0-9]{1,5})\Z")


class OwnershipError(ShroudError):
    """The ownership store cannot be read or written; the message names the file/database."""


class StoreUnavailable(OwnershipError):
    """The database cannot be reached right now; nothing was written. Retry later."""

    code = REASON_STORE_UNAVAILABLE


class ClaimRefused(ShroudError):
    """A new first-use claim is over a limit; nothing was written."""

    code = REASON_LIMIT


@dataclass(frozen=True)
class ClaimLimits:
    """Bounds on first-use (TOFU) claims; 0 turns one off.

    The defaults let a client bind its names on a fleet of proxies at once, reconnect, and add
    names now and then, while a free key or a free address cannot fill the store
    (docs/SECURITY.md, "Another client").
    """

    # One client's services: a few dozen names is a large configuration.
    max_names_per_key: int = 100
    # New names per source address: a client's first connect claims all its names at once;
    # then one a minute. Tor clients share exits: a busy exit shares one bucket.
    claim_burst: int = 64
    claims_per_hour: float = 60.0
    # A first-use claim nobody has bound for this long lapses (a name bound all along is
    # touched by its instance, lib/proxy/fleet.py).
    expiry_days: float = 90.0
    # First-use names in the whole store: ~300k rows is what SQLite's 64 MiB cap holds, and far
    # beyond a real fleet; PostgreSQL has no file cap, so this is its bound.
    max_first_use_names: int = 300_000


class Ownership(NamedTuple):
    name: str
    key: str
    method: str
    first_bound: float
    last_bound: float


class Block(NamedTuple):
    target: str
    actor: str
    since: float
    detail: str


class Blocks(NamedTuple):
    """The operator's blocks at one moment: canonical names and wildcards, and keys."""
    names: frozenset = frozenset()
    keys: frozenset = frozenset()

    def covering(self, name: str) -> str | None:
        """The block covering canonical ``name``: itself, else the most specific blocked
        wildcard over it; None when it is not blocked."""
        if not self.names:
            return None
        return next((c for c in candidates(name) if c in self.names), None)

    def has_key(self, key: str | None) -> bool:
        return key is not None and key.lower() in self.keys


class AuditEntry(NamedTuple):
    time: float
    actor: str
    action: str
    target: str
    detail: str


class Instance(NamedTuple):
    """One proxy instance of the fleet, as it registered itself."""
    id: str
    hostname: str
    addresses: dict      # listener name -> "host:port"
    fleet_addr: str      # how other instances reach it ("" until forwarding exists)
    fingerprint: str     # its tunnel certificate's SHA-256
    started: float
    heartbeat: float
    stats: dict          # tunnels, bindings, connections, bytes_in, bytes_out, rates
    # Its tunnel certificate (PEM): the fleet's links trust exactly the live instances'
    # certificates (lib/proxy/hostlinks.py); "" from an instance that predates it.
    cert: str = ""


class LiveBinding(NamedTuple):
    instance: str
    protocol: str
    name: str
    tunnel: int
    key: str             # "" for an unsigned bind
    since: float


def canonical_name(name: str) -> str:
    """The stored form of a bind name: normalised host name, ``*.base`` wildcard or
    ``tcp:PORT``. :raises ValueError: with the reason."""
    if not isinstance(name, str):
        raise ValueError("name must be a str")
    match = _TCP_RE.match(name.lower())
    if match:
        port = int(match.group(1))
        if not 1 <= port <= 65535:
            raise ValueError("TCP port out of range in %r" % name)
        return "tcp:%d" % port
    return normalize_hostname(name, allow_wildcard=True)


def canonical_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key.lower()):
        raise ValueError("a key fingerprint is 64 hex digits")
    return key.lower()


def candidates(name: str) -> list:
    """The name, then the wildcards covering it, most specific first, without repeats."""
    if name.startswith("tcp:"):
        return [name]
    return list(dict.fromkeys(wildcard_candidates(name)))


def short_key(key: str) -> str:
    return key[:16]


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


_OWNER_COLUMNS = "name, key, method, first_bound, last_bound"


class Store:
    """Ownership, blocks, audit, claim limits and the fleet's live registry.

    Subclasses: :class:`lib.proxy.store.sqlite.SqliteStore`,
    :class:`lib.proxy.store.postgres.PostgresStore`.
    """

    FOR_UPDATE = ""
    dialect = ""

    def __init__(self, clock: Callable[[], float] = time.time,
                 limits: ClaimLimits | None = None):
        self._clock = clock
        self.limits = limits or ClaimLimits()
        self.watched = False  # a fleet watcher keeps the block cache fresh (no lazy reloads)
        self._blocks_loaded_at = float("-inf")
        self._blocks_cache = Blocks()
        self._first_use_count = 0
        self._first_use_counted_at = float("-inf")

    # --- backend plumbing (overridden) -------------------------------------------------
    def _transaction(self, what: str, body: Callable):
        raise NotImplementedError

    def _rows(self, sql: str, args=()) -> list:
        raise NotImplementedError

    def _notify(self, tx, payload: str) -> None:
        """Tell the other instances, at commit, that ``payload`` ("blocks") changed."""

    def _lock_key(self, tx, key: str) -> None:
        """Serialise this key's claims until commit (SQLite's write lock already does)."""

    def wait_for_change(self, timeout: float) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- shared helpers ----------------------------------------------------------------
    def _audit(self, tx, actor: str, action: str, target: str, detail: str) -> None:
        tx.execute("INSERT INTO audit (time, actor, action, target, detail) "
                   "VALUES (?, ?, ?, ?, ?)",
                   (self._clock(), str(actor), action, target, str(detail)))
        tx.execute("DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - ?",
                   (AUDIT_KEEP,))

    def _owner_row(self, tx, name: str, lock: bool = False):
        row = tx.execute("SELECT %s FROM ownership WHERE name = ?%s" % (
            _OWNER_COLUMNS, self.FOR_UPDATE if lock else ""), (name,)).fetchone()
        return Ownership(*row) if row else None

    def _lapsed(self, owner: Ownership, now: float) -> bool:
        """A first-use claim nobody bound for ``limits.expiry_days``: as if unowned."""
        days = self.limits.expiry_days
        return (owner.method == "tofu" and days > 0
                and now - owner.last_bound > days * 86400.0)

    # --- ownership ---------------------------------------------------------------------
    def owner(self, name: str) -> Ownership | None:
        rows = self._rows("SELECT %s FROM ownership WHERE name = ?" % _OWNER_COLUMNS,
                          (canonical_name(name),))
        return Ownership(*rows[0]) if rows else None

    def covering_owner(self, name: str) -> Ownership | None:
        """The owner of ``name`` itself, else of the most specific wildcard covering it; a
        lapsed first-use claim counts as no owner."""
        names = candidates(canonical_name(name))
        rows = self._rows("SELECT %s FROM ownership WHERE name IN (%s)"
                          % (_OWNER_COLUMNS, ",".join("?" * len(names))), names)
        now = self._clock()
        by_name = {row[0]: Ownership(*row) for row in rows}
        for candidate in names:
            owner = by_name.get(candidate)
            if owner is not None and not self._lapsed(owner, now):
                return owner
        return None

    def owners(self, limit: int = 1000) -> list:
        rows = self._rows("SELECT %s FROM ownership ORDER BY last_bound DESC LIMIT ?"
                          % _OWNER_COLUMNS, (int(limit),))
        return [Ownership(*row) for row in rows]

    def names_owned(self, key: str, method: str = "tofu") -> int:
        rows = self._rows("SELECT count(*) FROM ownership WHERE key = ? AND method = ?",
                          (canonical_key(key), method))
        return int(rows[0][0])

    def claim(self, name: str, key: str, method: str = "tofu",
              address: str | None = None) -> tuple:
        """Make ``key`` the owner of ``name`` unless it already has one (atomically, fleet-wide).

        A lapsed first-use claim of another key is taken over (audited). A new first-use claim
        must pass :class:`ClaimLimits` for ``key`` and ``address`` (the tunnel's peer host).

        :returns: (the owner now recorded, whether this call created it). The owner may be
            another key: the caller refuses the bind then.
        :raises ClaimRefused: a new claim over a limit (nothing written).
        """
        name, key = canonical_name(name), canonical_key(key)
        now = self._clock()
        # The common case, an owner binding again within a minute of the last touch, is a read:
        # no transaction, no row lock, nothing to commit (PostgreSQL flushes its WAL for a
        # transaction that locked a row).
        rows = self._rows("SELECT %s FROM ownership WHERE name = ?" % _OWNER_COLUMNS, (name,))
        if rows:
            current = Ownership(*rows[0])
            if current.key == key and now - current.last_bound < TOUCH_INTERVAL:
                return current, False

        def body(tx):
            current = self._owner_row(tx, name, lock=True)
            if current is not None and current.key != key and self._lapsed(current, now):
                tx.execute("DELETE FROM ownership WHERE name = ?", (name,))
                self._audit(tx, "expiry", "claim-lapsed", name, "key %s, unbound since %s"
                            % (current.key, when(current.last_bound)))
                current = None
            if current is None:
                if method == "tofu":
                    refusal = self._claim_limit(tx, key, address, now)
                    if refusal:
                        return refusal
                cursor = tx.execute("INSERT INTO ownership (%s) VALUES (?, ?, ?, ?, ?) "
                                    "ON CONFLICT (name) DO NOTHING" % _OWNER_COLUMNS,
                                    (name, key, method, now, now))
                if cursor.rowcount == 1:
                    if method == "tofu":
                        self._first_use_count += 1
                    return Ownership(name, key, method, now, now), True
                current = self._owner_row(tx, name)  # another instance claimed it just now
            if current.key == key and now - current.last_bound >= TOUCH_INTERVAL:
                tx.execute("UPDATE ownership SET last_bound = ? WHERE name = ?", (now, name))
                current = current._replace(last_bound=now)
            return current, False

        result = self._transaction("record ownership of %s" % name, body)
        if isinstance(result, str):
            raise ClaimRefused(result)
        return result

    def _claim_limit(self, tx, key: str, address: str | None, now: float) -> str:
        """Why a new first-use claim by ``key`` from ``address`` is refused, or ""; takes a
        token from the address's bucket when it is not."""
        limits = self.limits
        if limits.max_first_use_names > 0:
            if now - self._first_use_counted_at >= COUNT_REFRESH:
                self._first_use_count = tx.execute(
                    "SELECT count(*) FROM ownership WHERE method = ?", ("tofu",)).fetchone()[0]
                self._first_use_counted_at = now
            if self._first_use_count >= limits.max_first_use_names:
                return ("this proxy's store holds its limit of %d first-use names "
                        "(--max-first-use-names); no new name is granted by first use"
                        % limits.max_first_use_names)
        if limits.max_names_per_key > 0:
            self._lock_key(tx, key)
            owned = tx.execute("SELECT count(*) FROM ownership WHERE key = ? AND method = ?",
                               (key, "tofu")).fetchone()[0]
            if owned >= limits.max_names_per_key:
                return ("key %s already owns %d names by first use (this proxy's limit, "
                        "--max-names-per-key); release one or ask the operator"
                        % (short_key(key), owned))
        if not address or limits.claim_burst <= 0:
            return ""
        row = tx.execute("SELECT tokens, stamp FROM claim_rate WHERE address = ?%s"
                         % self.FOR_UPDATE, (address,)).fetchone()
        rate = limits.claims_per_hour / 3600.0
        tokens = float(limits.claim_burst)
        if row is not None:
            tokens = min(tokens, row[0] + max(0.0, now - row[1]) * rate)
        if tokens < 1.0:
            wait = (1.0 - tokens) / rate if rate > 0 else float("inf")
            return ("too many new names from %s (%d at once, %g an hour; this proxy's "
                    "--claim-burst/--claims-per-hour): try again in %.0f s"
                    % (address, limits.claim_burst, limits.claims_per_hour, wait))
        tx.execute("INSERT INTO claim_rate (address, tokens, stamp) VALUES (?, ?, ?) "
                   "ON CONFLICT (address) DO UPDATE SET tokens = excluded.tokens, "
                   "stamp = excluded.stamp", (address, tokens - 1.0, now))
        return ""

    def record(self, name: str, key: str, method: str, actor: str,
               detail: str = "") -> Ownership:
        """Set ``key`` as the owner of ``name`` by ``method``, replacing another owner (the
        replacement is written to the audit log with ``actor`` and ``detail``)."""
        if method not in METHODS:
            raise ValueError("unknown ownership method %r" % method)
        name, key = canonical_name(name), canonical_key(key)
        now = self._clock()

        def body(tx):
            cursor = tx.execute("INSERT INTO ownership (%s) VALUES (?, ?, ?, ?, ?) "
                                "ON CONFLICT (name) DO NOTHING" % _OWNER_COLUMNS,
                                (name, key, method, now, now))
            if cursor.rowcount == 1:
                if method == "operator":
                    self._audit(tx, actor, "assign", name, "to key %s%s" % (
                        key, ": " + detail if detail else ""))
                return Ownership(name, key, method, now, now)
            current = self._owner_row(tx, name, lock=True)
            if current.key == key:
                if current.method != method or now - current.last_bound >= TOUCH_INTERVAL:
                    tx.execute("UPDATE ownership SET method = ?, last_bound = ? "
                               "WHERE name = ?", (method, now, name))
                    current = current._replace(method=method, last_bound=now)
                return current
            tx.execute("UPDATE ownership SET key = ?, method = ?, first_bound = ?, "
                       "last_bound = ? WHERE name = ?", (key, method, now, now, name))
            self._audit(tx, actor, "owner-change", name,
                        "from key %s (%s since %s) to key %s (%s)%s" % (
                            current.key, current.method, when(current.first_bound), key,
                            method, ": " + detail if detail else ""))
            return Ownership(name, key, method, now, now)

        return self._transaction("record ownership of %s" % name, body)

    def assign(self, name: str, key: str, actor: str, detail: str = "") -> Ownership:
        """Operator grant: ``key`` owns ``name`` (method "operator"), audited."""
        return self.record(name, key, "operator", actor, detail)

    def release(self, name: str, actor: str, detail: str = "") -> bool:
        """Forget the owner of ``name`` (the next key to bind may claim it)."""
        name = canonical_name(name)

        def body(tx):
            row = tx.execute("DELETE FROM ownership WHERE name = ? RETURNING key",
                             (name,)).fetchone()
            if row is None:
                return False
            self._audit(tx, actor, "release", name, "was key %s%s" % (
                row[0], ": " + detail if detail else ""))
            return True

        return self._transaction("release %s" % name, body)

    def touch_names(self, names, older_than: float) -> int:
        """Mark ``names`` as bound now where their last_bound is before ``older_than``: a name
        served by one tunnel for months must not lapse. :returns: rows touched."""
        names = sorted(set(names))
        now = self._clock()

        def body(tx):
            touched = 0
            for i in range(0, len(names), BATCH):
                chunk = names[i:i + BATCH]
                touched += tx.execute(
                    "UPDATE ownership SET last_bound = ? WHERE last_bound < ? AND name IN (%s)"
                    % ",".join("?" * len(chunk)), [now, older_than] + chunk).rowcount
            return touched

        return self._transaction("touch live names", body) if names else 0

    def expire_claims(self) -> int:
        """Delete lapsed first-use claims and stale claim-rate rows (one audit line);
        :returns: names freed."""
        if self.limits.expiry_days <= 0 and self.limits.claim_burst <= 0:
            return 0
        now = self._clock()
        limits = self.limits

        def body(tx):
            freed = 0
            if limits.expiry_days > 0:
                freed = tx.execute("DELETE FROM ownership WHERE method = ? AND last_bound < ?",
                                   ("tofu", now - limits.expiry_days * 86400.0)).rowcount
                if freed:
                    self._audit(tx, "expiry", "claims-lapsed", "%d names" % freed,
                                "first-use claims unbound for %g days" % limits.expiry_days)
            refill = (limits.claim_burst / (limits.claims_per_hour / 3600.0)
                      if limits.claims_per_hour > 0 else float("inf"))
            if refill != float("inf"):
                tx.execute("DELETE FROM claim_rate WHERE stamp < ?", (now - refill,))
            tx.execute("DELETE FROM claim_rate WHERE address IN (SELECT address FROM "
                       "claim_rate ORDER BY stamp DESC LIMIT -1 OFFSET ?)"
                       if self.dialect == "sqlite" else
                       "DELETE FROM claim_rate WHERE address IN (SELECT address FROM "
                       "claim_rate ORDER BY stamp DESC OFFSET ?)", (MAX_RATE_ROWS,))
            return freed

        return self._transaction("expire claims", body)

    # --- blocks (operator kill switch) -------------------------------------------------
    def _block(self, table: str, column: str, target: str, actor: str, detail: str,
               action: str, add: bool) -> bool:
        def body(tx):
            if add:
                cursor = tx.execute("INSERT INTO %s (%s, actor, since, detail) "
                                    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
                                    % (table, column),
                                    (target, str(actor), self._clock(), str(detail)))
            else:
                cursor = tx.execute("DELETE FROM %s WHERE %s = ?" % (table, column), (target,))
            if cursor.rowcount:
                self._audit(tx, actor, action, target, detail)
                self._notify(tx, "blocks")
            return bool(cursor.rowcount)

        changed = self._transaction("%s %s" % (action, target), body)
        # This instance sees its own change at once, without a read on anyone's path.
        field = "names" if table == "blocked_name" else "keys"
        current = getattr(self._blocks_cache, field)
        self._blocks_cache = self._blocks_cache._replace(
            **{field: current | {target} if add else current - {target}})
        return changed

    def block_hostname(self, name: str, actor: str, detail: str = "") -> bool:
        """Refuse every bind of ``name`` (a wildcard blocks every name it covers)."""
        return self._block("blocked_name", "name", canonical_name(name), actor, detail,
                           "block-hostname", True)

    def unblock_hostname(self, name: str, actor: str, detail: str = "") -> bool:
        return self._block("blocked_name", "name", canonical_name(name), actor, detail,
                           "unblock-hostname", False)

    def block_key(self, key: str, actor: str, detail: str = "") -> bool:
        """Refuse every bind by ``key``."""
        return self._block("blocked_key", "key", canonical_key(key), actor, detail,
                           "block-key", True)

    def unblock_key(self, key: str, actor: str, detail: str = "") -> bool:
        return self._block("blocked_key", "key", canonical_key(key), actor, detail,
                           "unblock-key", False)

    def reload_blocks(self) -> tuple:
        """Re-read the blocks into memory. :returns: (names, keys) newly blocked since the
        last load, so a watcher can drop what they cover.
        :raises OwnershipError: (the cache keeps its previous contents)."""
        names = frozenset(r[0] for r in self._rows("SELECT name FROM blocked_name"))
        keys = frozenset(r[0] for r in self._rows("SELECT key FROM blocked_key"))
        old = self._blocks_cache
        self._blocks_cache = Blocks(names, keys)
        self._blocks_loaded_at = self._clock()
        return names - old.names, keys - old.keys

    def blocks(self) -> Blocks:
        """Every block, from memory; without a watcher, reloaded after BLOCK_CACHE_TTL (a
        failed reload keeps the previous ones)."""
        if not self.watched and self._clock() - self._blocks_loaded_at >= BLOCK_CACHE_TTL:
            try:
                self.reload_blocks()
            except OwnershipError:
                self._blocks_loaded_at = self._clock()  # not again before the TTL
        return self._blocks_cache

    def is_blocked(self, hostname: str | None = None, key: str | None = None) -> bool:
        """Whether ``hostname`` (or a blocked wildcard covering it) or ``key`` is blocked.

        Answered from memory: cheap enough for every public connection.
        """
        blocks = self.blocks()
        if hostname is not None and blocks.covering(canonical_name(hostname)) is not None:
            return True
        return key is not None and blocks.has_key(canonical_key(key))

    def blocked_name(self, name: str) -> str | None:
        """The blocked pattern covering canonical ``name`` (itself or a wildcard), or None."""
        return self.blocks().covering(name)

    def blocked_hostnames(self) -> list:
        return [Block(*r) for r in self._rows(
            "SELECT name, actor, since, detail FROM blocked_name ORDER BY name")]

    def blocked_keys(self) -> list:
        return [Block(*r) for r in self._rows(
            "SELECT key, actor, since, detail FROM blocked_key ORDER BY key")]

    # --- audit -------------------------------------------------------------------------
    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self._transaction("write audit entry",
                          lambda tx: self._audit(tx, actor, action, target, detail))

    def audit_log(self, limit: int = 100) -> list:
        return [AuditEntry(*r) for r in self._rows(
            "SELECT time, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?",
            (int(limit),))]

    # --- moving a store (lib/proxy/store/migrate.py) ------------------------------------
    def import_records(self, owners, name_blocks, key_blocks, audit_entries) -> dict:
        """Copy another store's records in, in one transaction; what is already here stays
        (an owner here wins over the copy's). Idempotent: a second run copies nothing.

        :returns: counts {"owners", "owners_present", "blocks", "blocks_present", "audit",
            "audit_present"} and "conflicts": [(name, key here, key in the copy)].
        """
        def body(tx):
            counts = dict.fromkeys(("owners", "owners_present", "blocks", "blocks_present",
                                    "audit", "audit_present"), 0)
            counts["conflicts"] = []
            for o in owners:
                if tx.execute("INSERT INTO ownership (%s) VALUES (?, ?, ?, ?, ?) ON CONFLICT "
                              "(name) DO NOTHING" % _OWNER_COLUMNS, tuple(o)).rowcount:
                    counts["owners"] += 1
                    continue
                counts["owners_present"] += 1
                here = self._owner_row(tx, o.name)
                if here.key != o.key:
                    counts["conflicts"].append((o.name, here.key, o.key))
            for table, column, blocks in (("blocked_name", "name", name_blocks),
                                          ("blocked_key", "key", key_blocks)):
                for b in blocks:
                    added = tx.execute("INSERT INTO %s (%s, actor, since, detail) VALUES "
                                       "(?, ?, ?, ?) ON CONFLICT DO NOTHING" % (table, column),
                                       tuple(b)).rowcount
                    counts["blocks" if added else "blocks_present"] += 1
            for e in audit_entries:  # oldest first, so ids keep their order
                present = tx.execute("SELECT 1 FROM audit WHERE time = ? AND actor = ? AND "
                                     "action = ? AND target = ? AND detail = ?",
                                     tuple(e)).fetchone()
                if present:
                    counts["audit_present"] += 1
                    continue
                tx.execute("INSERT INTO audit (time, actor, action, target, detail) VALUES "
                           "(?, ?, ?, ?, ?)", tuple(e))
                counts["audit"] += 1
            if counts["blocks"]:
                self._notify(tx, "blocks")
            return counts

        return self._transaction("import records", body)

    # --- the fleet's live registry -----------------------------------------------------
    def register_instance(self, instance: Instance) -> None:
        """Insert or replace this instance's row (its bindings are written separately)."""
        args = (instance.id, instance.hostname, json.dumps(instance.addresses),
                instance.fleet_addr, instance.fingerprint, instance.started,
                instance.heartbeat, json.dumps(instance.stats), instance.cert)
        self._transaction("register instance %s" % instance.id, lambda tx: tx.execute(
            "INSERT INTO instance (id, hostname, addresses, fleet_addr, fingerprint, started, "
            "heartbeat, stats, cert) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO "
            "UPDATE SET hostname = excluded.hostname, addresses = excluded.addresses, "
            "fleet_addr = excluded.fleet_addr, fingerprint = excluded.fingerprint, "
            "started = excluded.started, heartbeat = excluded.heartbeat, "
            "stats = excluded.stats, cert = excluded.cert", args))

    def heartbeat(self, instance_id: str, stats: dict, add=(), remove=()) -> bool:
        """Refresh this instance's heartbeat and stats, and apply binding changes
        (``add``: LiveBinding, ``remove``: (protocol, name, tunnel)) in one transaction.

        :returns: False when the row is gone (expired by another instance): the caller
            registers again and writes all its bindings.
        """
        now = self._clock()

        def body(tx):
            cursor = tx.execute("UPDATE instance SET heartbeat = ?, stats = ? WHERE id = ?",
                                (now, json.dumps(stats), instance_id))
            if cursor.rowcount != 1:
                return False
            for protocol, name, tunnel in remove:
                tx.execute("DELETE FROM live_binding WHERE instance = ? AND protocol = ? AND "
                           "name = ? AND tunnel = ?", (instance_id, protocol, name, tunnel))
            for b in add:
                tx.execute("INSERT INTO live_binding (instance, protocol, name, tunnel, key, "
                           "since) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           (instance_id, b.protocol, b.name, b.tunnel, b.key, b.since))
            return True

        return self._transaction("heartbeat of %s" % instance_id, body)

    def deregister(self, instance_id: str) -> None:
        """Remove this instance and its bindings (a clean shutdown)."""
        def body(tx):
            tx.execute("DELETE FROM live_binding WHERE instance = ?", (instance_id,))
            tx.execute("DELETE FROM instance WHERE id = ?", (instance_id,))

        self._transaction("deregister %s" % instance_id, body)

    def expire_instances(self, max_age: float) -> list:
        """Remove instances silent for ``max_age`` seconds, and their bindings.
        :returns: their ids."""
        cutoff = self._clock() - max_age

        def body(tx):
            gone = [r[0] for r in tx.execute("SELECT id FROM instance WHERE heartbeat < ?",
                                             (cutoff,)).fetchall()]
            for instance_id in gone:
                tx.execute("DELETE FROM live_binding WHERE instance = ?", (instance_id,))
                tx.execute("DELETE FROM instance WHERE id = ?", (instance_id,))
            # Bindings whose instance row is gone (a crash between statements elsewhere).
            tx.execute("DELETE FROM live_binding WHERE instance NOT IN (SELECT id FROM "
                       "instance)")
            return gone

        return self._transaction("expire instances", body)

    def instances(self) -> list:
        rows = self._rows("SELECT id, hostname, addresses, fleet_addr, fingerprint, started, "
                          "heartbeat, stats, cert FROM instance ORDER BY hostname, id")
        return [Instance(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], json.loads(r[7]),
                         r[8]) for r in rows]

    def live_bindings(self, limit: int = 100_000) -> list:
        rows = self._rows("SELECT instance, protocol, name, tunnel, key, since FROM "
                          "live_binding ORDER BY name, protocol, instance, tunnel LIMIT ?",
                          (int(limit),))
        return [LiveBinding(*r) for r in rows]
