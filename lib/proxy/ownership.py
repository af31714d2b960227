"""Who may bind which hostname on a public proxy: the durable store and the bind policy.

A *name* is a host name (``app.example.com``), a wildcard (``*.example.com``: one or more leading
labels, as routing matches them) or a TCP port (``tcp:2222``). A *key* is a client's identity
fingerprint (64 lower-case hex, :func:`lib.identity.fingerprint`). Unsigned binds (the original
Go client sends no key) have key ``None``.

:class:`OwnershipPolicy` decides a bind in this order; the first rule that speaks wins:

1. **Blocked** (operator kill switch): a blocked name (or a blocked wildcard covering it) or a
   blocked key is refused.
2. **Allow-list file**: lines ``name-or-wildcard  fingerprint [fingerprint ...]`` (``#`` starts a
   comment; fingerprint ``*`` means any key, unsigned binds included). The most specific pattern
   listing the name decides alone: only its keys may bind. Re-read when the file changes.
3. **Unsigned binds** stop here: allowed when the name matches ``allow_unsigned``, else refused
   (``signature-required``). They never own a name.
4. **DNS**: TXT records at ``_shroud.<name>`` (``_shroud.<base>`` for ``*.<base>``) holding
   ``shroud-key=<fingerprint>`` or the bare fingerprint. If they name keys, only those keys may
   bind, and a stored owner for another key is replaced (the domain's owner vouches; the change
   goes into the audit log). Answers are cached ``dns_cache_ttl`` seconds (errors 5 s) in a
   bounded LRU, and concurrent binds for one name share one lookup. When DNS fails, an
   existing owner keeps its name but no new name is granted (``internal``, try again).
5. **Stored owner / trust on first use**: the owner of the name, or of the most specific
   wildcard covering it, keeps it; any other key is refused (``not-owner``, naming the owner's
   short fingerprint and since when). With ``tofu=True`` the first key to bind an unowned name
   becomes its owner, durably. TOFU never grants a wildcard: those need rule 2 or 4.

Public API::

    canonical_name(name) -> str          # normalised host/wildcard/"tcp:PORT"; ValueError
    OwnershipStore(path, max_size_bytes=DEFAULT_MAX_SIZE, clock=time.time, threaded=False)
        .path
        .owner(name) -> Ownership | None
        .covering_owner(name) -> Ownership | None    # the name's, else nearest wildcard's
        .owners(limit=1000) -> list[Ownership]       # most recently bound first
        .claim(name, key, method="tofu") -> (Ownership, created: bool)   # atomic first-use
        .record(name, key, method, actor, detail="") -> Ownership  # set owner (audits changes)
        .assign(name, key, actor, detail="") -> Ownership          # operator grant (method
                                                                   # "operator")
        .release(name, actor, detail="") -> bool
        .block_hostname(name, actor, detail="") -> bool      # True when newly blocked
        .unblock_hostname(name, actor, detail="") -> bool
        .block_key(key, actor, detail="") -> bool
        .unblock_key(key, actor, detail="") -> bool
        .is_blocked(hostname=None, key=None) -> bool
        .blocked_hostnames() -> list[Block]    .blocked_keys() -> list[Block]
        .audit(actor, action, target, detail="") -> None
        .audit_log(limit=100) -> list[AuditEntry]            # newest first
        .close()
    OwnershipPolicy(store, allowlist_path=None, dns_resolver=None, tofu=True,
                    allow_unsigned=None, dns_timeout=2.0, dns_cache_ttl=60.0,
                    dns_cache_size=1024, dns_lookup=None, clock=time.monotonic)
        .decide(hostname, key=None) -> Decision
        dns_resolver: (host, port) of a resolver; dns_lookup: callable(qname) -> list[str]
        (TXT strings, raising lib.net.dnsclient.DnsError) replacing it, e.g. one going via Tor.
    Decision(allowed, method, reason, code)
        method: "allowlist" | "dns" | "tofu" | "operator" | "unsigned" | "blocked" |
                "invalid" | "none" | "error";  code: "" or a lib.protocol.messages REASON_* value
    Ownership(name, key, method, first_bound, last_bound)     # times: Unix seconds
    Block(target, actor, since, detail)
    AuditEntry(time, actor, action, target, detail)
    AllowList(path)  .lookup(name) -> (pattern, frozenset) | None,  .reload_if_changed()
    OwnershipError(Exception)   the store cannot be used (corrupt, full, unwritable); the
                                message names the file. A failed write changes nothing.
    short_key(key) -> str       # first 16 hex digits, as reasons show it

Storage: SQLite in WAL mode with ``synchronous=FULL`` (a bind that was answered "allowed" is on
disk), schema version in ``PRAGMA user_version``, a size cap (``max_size_bytes``) so a flood of
first-use binds fills a bounded file, not the disk, and an audit log trimmed to ``AUDIT_KEEP``
rows. All calls take a lock and are short (one small transaction), so greenlets may share one
store; the store never calls out to the network. With ``threaded=True`` (the proxy's setting)
each write transaction, whose COMMIT waits for the disk, runs in gevent's thread pool while the
calling greenlet waits, so a slow disk or a burst of first-use binds never stalls the event
loop that serves every other connection; reads (small, no fsync) stay on the calling greenlet.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import sqlite3
import threading
import time
from typing import Callable, NamedTuple

from lib.net import dnsclient
from lib.protocol.messages import (REASON_BAD_REQUEST, REASON_INTERNAL, REASON_INVALID_HOSTNAME,
                          REASON_NOT_ALLOWED, REASON_NOT_OWNER, REASON_SIGNATURE_REQUIRED)
from lib.protocol.sniff import normalize_hostname, wildcard_candidates

log = logging.getLogger("shroud.ownership")

SCHEMA_VERSION = 1
# Ownership rows are ~200 bytes: 64 MiB holds ~300k names, far beyond one proxy's real use, yet
# a flood of first-use binds with fresh keys stops there instead of filling the disk.
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
# Enough history for an operator to see weeks of kill-switch and ownership changes; trimmed so
# the log cannot grow without end.
AUDIT_KEEP = 10000
# last_bound is refreshed at most this often per name: a reconnect storm must not become an
# fsync storm, and a minute is precise enough for "last seen".
TOUCH_INTERVAL = 60.0
# Another process (e.g. a dashboard) holding the write lock: wait this long before failing.
BUSY_TIMEOUT = 5.0
# The allow-list is an operator's file: 4 MiB is ~40k lines, far beyond a hand-kept list.
MAX_ALLOWLIST_SIZE = 4 * 1024 * 1024
# DNS failures are remembered briefly so a bind storm against a broken zone stays cheap, but
# short enough that a fixed zone is seen quickly.
DNS_ERROR_TTL = 5.0
# is_blocked runs on every public connection, so blocks are answered from memory. Changes made
# through this store apply at once; changes by another process sharing the file (a fleet's
# database, a CLI) are picked up within this many seconds.
BLOCK_CACHE_TTL = 5.0

METHODS = ("allowlist", "dns", "tofu", "operator")
_KEY_RE = re.compile(r"[0-9a-f]{64}\Z")
_TCP_RE = re.compile(r"tcp:([0-9]{1,5})\Z")


class OwnershipError(Exception):
    """The ownership store cannot be read or written; the message names the file."""


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


class AuditEntry(NamedTuple):
    time: float
    actor: str
    action: str
    target: str
    detail: str


class Decision(NamedTuple):
    allowed: bool
    method: str
    reason: str
    code: str  # "" when allowed, else a lib.protocol.messages REASON_* code


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


def _canonical_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key.lower()):
        raise ValueError("a key fingerprint is 64 hex digits")
    return key.lower()


def _candidates(name: str) -> list:
    """The name, then the wildcards covering it, most specific first, without repeats."""
    if name.startswith("tcp:"):
        return [name]
    return list(dict.fromkeys(wildcard_candidates(name)))


def short_key(key: str) -> str:
    return key[:16]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


# --- the store ------------------------------------------------------------------------------
_MIGRATIONS = {
    1: [
        """CREATE TABLE ownership (
               name TEXT PRIMARY KEY,
               key TEXT NOT NULL,
               method TEXT NOT NULL,
               first_bound REAL NOT NULL,
               last_bound REAL NOT NULL)""",
        "CREATE INDEX ownership_key ON ownership(key)",
        """CREATE TABLE blocked_name (
               name TEXT PRIMARY KEY, actor TEXT NOT NULL, since REAL NOT NULL,
               detail TEXT NOT NULL)""",
        """CREATE TABLE blocked_key (
               key TEXT PRIMARY KEY, actor TEXT NOT NULL, since REAL NOT NULL,
               detail TEXT NOT NULL)""",
        """CREATE TABLE audit (
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               time REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
               target TEXT NOT NULL, detail TEXT NOT NULL)""",
    ],
}


class OwnershipStore:
    """Durable ownership records, blocks and the audit log in one SQLite file.

    :raises OwnershipError: the file is not a usable Shroud ownership database (corrupt, not
        SQLite, from a newer Shroud, unreadable).
    """

    def __init__(self, path: str, max_size_bytes: int = DEFAULT_MAX_SIZE,
                 clock: Callable[[], float] = time.time, threaded: bool = False):
        self.path = str(path)
        self._clock = clock
        self._threaded = threaded
        if threaded:
            # Greenlets must wait for each other while one's transaction runs in a pool thread;
            # an unpatched threading.RLock would let every greenlet of the hub's thread in.
            import gevent.lock

            self._lock = gevent.lock.RLock()
        else:
            self._lock = threading.RLock()
        self._conn = None
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise OwnershipError("cannot open ownership database %s: %s" % (self.path, exc)) \
                from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() not in ("wal", "memory"):
                raise OwnershipError("ownership database %s cannot use WAL mode (got %s)"
                                     % (self.path, mode))
            conn.execute("PRAGMA synchronous=FULL")
            result = conn.execute("PRAGMA quick_check").fetchall()
            if result != [("ok",)]:
                raise OwnershipError("ownership database %s is corrupt: %s" % (
                    self.path, "; ".join(str(r[0]) for r in result[:3])))
            self._migrate(conn)
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute("PRAGMA max_page_count=%d" % max(1, max_size_bytes // page_size))
        except sqlite3.Error as exc:
            conn.close()
            raise OwnershipError("ownership database %s is unusable: %s" % (self.path, exc)) \
                from None
        except OwnershipError:
            conn.close()
            raise
        self._conn = conn
        self._blocks_loaded_at = float("-inf")
        self._blocked_names: frozenset = frozenset()
        self._blocked_keys: frozenset = frozenset()

    def _migrate(self, conn) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OwnershipError("ownership database %s has schema version %d; this Shroud "
                                 "knows up to %d (downgrade refused)"
                                 % (self.path, version, SCHEMA_VERSION))
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise OwnershipError("%s is an SQLite database but not a Shroud ownership "
                                     "database" % self.path)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute("PRAGMA user_version=%d" % target)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- plumbing ---------------------------------------------------------------------
    def _connection(self):
        if self._conn is None:
            raise OwnershipError("ownership database %s is closed" % self.path)
        return self._conn

    def _write(self, what: str, body: Callable):
        """Run ``body(conn)`` in one IMMEDIATE transaction; its result. Any failure rolls the
        transaction back and an sqlite3 error becomes OwnershipError. With ``threaded`` the
        transaction runs in gevent's thread pool (see the module docstring)."""
        def transaction():
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = body(conn)
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the original error is the one worth reporting
                if isinstance(exc, sqlite3.Error):
                    raise OwnershipError("cannot %s in ownership database %s: %s"
                                         % (what, self.path, exc)) from None
                raise

        def in_thread():
            # Errors come back as values: gevent's pool would print each raised one to stderr.
            try:
                return None, transaction()
            except BaseException as exc:  # re-raised in the calling greenlet below
                return exc, None

        with self._lock:
            if not self._threaded:
                return transaction()
            import gevent  # only the threaded store needs it

            job = gevent.get_hub().threadpool.spawn(in_thread)
            interrupted = None
            while True:
                try:
                    error, result = job.get()
                    break
                except BaseException as exc:
                    # Killed or timed out while the thread still uses the connection: keep
                    # the lock until it is done with it, then pass the interruption on.
                    interrupted = exc
            if interrupted is not None:
                raise interrupted
            if error is not None:
                raise error
            return result

    def _read(self, sql: str, args=()) -> list:
        with self._lock:
            try:
                return self._connection().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise OwnershipError("cannot read ownership database %s: %s"
                                     % (self.path, exc)) from None

    def _audit(self, conn, actor: str, action: str, target: str, detail: str) -> None:
        conn.execute("INSERT INTO audit (time, actor, action, target, detail) "
                     "VALUES (?, ?, ?, ?, ?)",
                     (self._clock(), str(actor), action, target, str(detail)))
        conn.execute("DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - ?",
                     (AUDIT_KEEP,))

    # --- ownership --------------------------------------------------------------------
    def owner(self, name: str) -> Ownership | None:
        rows = self._read("SELECT name, key, method, first_bound, last_bound FROM ownership "
                          "WHERE name = ?", (canonical_name(name),))
        return Ownership(*rows[0]) if rows else None

    def covering_owner(self, name: str) -> Ownership | None:
        """The owner of ``name`` itself, else of the most specific wildcard covering it."""
        candidates = _candidates(canonical_name(name))
        rows = self._read("SELECT name, key, method, first_bound, last_bound FROM ownership "
                          "WHERE name IN (%s)" % ",".join("?" * len(candidates)), candidates)
        by_name = {row[0]: Ownership(*row) for row in rows}
        for candidate in candidates:
            if candidate in by_name:
                return by_name[candidate]
        return None

    def owners(self, limit: int = 1000) -> list:
        rows = self._read("SELECT name, key, method, first_bound, last_bound FROM ownership "
                          "ORDER BY last_bound DESC LIMIT ?", (int(limit),))
        return [Ownership(*row) for row in rows]

    def claim(self, name: str, key: str, method: str = "tofu") -> tuple:
        """Make ``key`` the owner of ``name`` unless it already has one (atomically).

        :returns: (the owner now recorded, whether this call created it). The owner may be
            another key: the caller refuses the bind then.
        """
        name, key = canonical_name(name), _canonical_key(key)
        now = self._clock()

        def body(conn):
            row = _owner_row(conn, name)
            if row is None:
                _insert_owner(conn, name, key, method, now)
                return Ownership(name, key, method, now, now), True
            current = Ownership(*row)
            if current.key == key and now - current.last_bound >= TOUCH_INTERVAL:
                conn.execute("UPDATE ownership SET last_bound = ? WHERE name = ?", (now, name))
                current = current._replace(last_bound=now)
            return current, False

        return self._write("record ownership of %s" % name, body)

    def record(self, name: str, key: str, method: str, actor: str,
               detail: str = "") -> Ownership:
        """Set ``key`` as the owner of ``name`` by ``method``, replacing another owner (the
        replacement is written to the audit log with ``actor`` and ``detail``)."""
        if method not in METHODS:
            raise ValueError("unknown ownership method %r" % method)
        name, key = canonical_name(name), _canonical_key(key)
        now = self._clock()

        def body(conn):
            row = _owner_row(conn, name)
            if row is None:
                _insert_owner(conn, name, key, method, now)
                if method == "operator":
                    self._audit(conn, actor, "assign", name, "to key %s%s" % (
                        key, ": " + detail if detail else ""))
                return Ownership(name, key, method, now, now)
            current = Ownership(*row)
            if current.key == key:
                if current.method != method or now - current.last_bound >= TOUCH_INTERVAL:
                    conn.execute("UPDATE ownership SET method = ?, last_bound = ? "
                                 "WHERE name = ?", (method, now, name))
                    current = current._replace(method=method, last_bound=now)
                return current
            conn.execute("UPDATE ownership SET key = ?, method = ?, first_bound = ?, "
                         "last_bound = ? WHERE name = ?", (key, method, now, now, name))
            self._audit(conn, actor, "owner-change", name,
                        "from key %s (%s since %s) to key %s (%s)%s" % (
                            current.key, current.method, _when(current.first_bound), key,
                            method, ": " + detail if detail else ""))
            return Ownership(name, key, method, now, now)

        return self._write("record ownership of %s" % name, body)

    def assign(self, name: str, key: str, actor: str, detail: str = "") -> Ownership:
        """Operator grant: ``key`` owns ``name`` (method "operator"), audited."""
        return self.record(name, key, "operator", actor, detail)

    def release(self, name: str, actor: str, detail: str = "") -> bool:
        """Forget the owner of ``name`` (the next key to bind may claim it)."""
        name = canonical_name(name)

        def body(conn):
            row = conn.execute("SELECT key FROM ownership WHERE name = ?", (name,)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM ownership WHERE name = ?", (name,))
            self._audit(conn, actor, "release", name, "was key %s%s" % (
                row[0], ": " + detail if detail else ""))
            return True

        return self._write("release %s" % name, body)

    # --- blocks (operator kill switch) ------------------------------------------------
    def _block(self, table: str, column: str, target: str, actor: str, detail: str,
               action: str) -> bool:
        def body(conn):
            cursor = conn.execute("INSERT OR IGNORE INTO %s (%s, actor, since, detail) "
                                  "VALUES (?, ?, ?, ?)" % (table, column),
                                  (target, str(actor), self._clock(), str(detail)))
            if cursor.rowcount:
                self._audit(conn, actor, action, target, detail)
            return bool(cursor.rowcount)

        added = self._write("%s %s" % (action, target), body)
        self._blocks_loaded_at = float("-inf")  # reload the cache from what is now on disk
        return added

    def _unblock(self, table: str, column: str, target: str, actor: str, detail: str,
                 action: str) -> bool:
        def body(conn):
            cursor = conn.execute("DELETE FROM %s WHERE %s = ?" % (table, column), (target,))
            if cursor.rowcount:
                self._audit(conn, actor, action, target, detail)
            return bool(cursor.rowcount)

        removed = self._write("%s %s" % (action, target), body)
        self._blocks_loaded_at = float("-inf")
        return removed

    def _blocks(self) -> tuple:
        """(blocked names, blocked keys) from memory, reloaded after BLOCK_CACHE_TTL."""
        now = self._clock()
        if now - self._blocks_loaded_at >= BLOCK_CACHE_TTL:
            with self._lock:
                names = frozenset(r[0] for r in self._read("SELECT name FROM blocked_name"))
                keys = frozenset(r[0] for r in self._read("SELECT key FROM blocked_key"))
                self._blocked_names, self._blocked_keys = names, keys
                self._blocks_loaded_at = now
        return self._blocked_names, self._blocked_keys

    def block_hostname(self, name: str, actor: str, detail: str = "") -> bool:
        """Refuse every bind of ``name`` (a wildcard blocks every name it covers)."""
        return self._block("blocked_name", "name", canonical_name(name), actor, detail,
                           "block-hostname")

    def unblock_hostname(self, name: str, actor: str, detail: str = "") -> bool:
        return self._unblock("blocked_name", "name", canonical_name(name), actor, detail,
                             "unblock-hostname")

    def block_key(self, key: str, actor: str, detail: str = "") -> bool:
        """Refuse every bind by ``key``."""
        return self._block("blocked_key", "key", _canonical_key(key), actor, detail,
                           "block-key")

    def unblock_key(self, key: str, actor: str, detail: str = "") -> bool:
        return self._unblock("blocked_key", "key", _canonical_key(key), actor, detail,
                             "unblock-key")

    def is_blocked(self, hostname: str | None = None, key: str | None = None) -> bool:
        """Whether ``hostname`` (or a blocked wildcard covering it) or ``key`` is blocked.

        Answered from memory (see BLOCK_CACHE_TTL): cheap enough for every public connection.
        """
        if hostname is not None and self._blocked_name(canonical_name(hostname)):
            return True
        if key is not None:
            return _canonical_key(key) in self._blocks()[1]
        return False

    def _blocked_name(self, name: str) -> str | None:
        blocked = self._blocks()[0]
        if not blocked:
            return None
        return next((c for c in _candidates(name) if c in blocked), None)

    def blocked_hostnames(self) -> list:
        return [Block(*r) for r in self._read(
            "SELECT name, actor, since, detail FROM blocked_name ORDER BY name")]

    def blocked_keys(self) -> list:
        return [Block(*r) for r in self._read(
            "SELECT key, actor, since, detail FROM blocked_key ORDER BY key")]

    # --- audit ------------------------------------------------------------------------
    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self._write("write audit entry",
                    lambda conn: self._audit(conn, actor, action, target, detail))

    def audit_log(self, limit: int = 100) -> list:
        return [AuditEntry(*r) for r in self._read(
            "SELECT time, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?",
            (int(limit),))]


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
def _owner_row(conn, name: str):
    return conn.execute("SELECT name, key, method, first_bound, last_bound "
                        "FROM ownership WHERE name = ?", (name,)).fetchone()


def _insert_owner(conn, name: str, key: str, method: str, now: float) -> None:
    conn.execute("INSERT INTO ownership VALUES (?, ?, ?, ?, ?)", (name, key, method, now, now))


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

    def __init__(self, store: OwnershipStore, allowlist_path: str | None = None,
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
    def decide(self, hostname: str, key: str | None = None) -> Decision:
        """May ``key`` (a fingerprint, or None for an unsigned bind) bind ``hostname``?

        An allowed signed bind is recorded in the store (first use, or the allow-list/DNS
        owner). A store failure refuses with code ``internal`` rather than raising.
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
            return self._decide(name, key)
        except OwnershipError as exc:
            log.error("bind of %s refused: %s", name, exc)
            return _refused("error", "the proxy cannot check ownership of %s right now: %s"
                            % (name, exc), REASON_INTERNAL)

    def _decide(self, name: str, key: str | None) -> Decision:
        blocked = self.store._blocked_name(name)
        if blocked is not None:
            return _refused("blocked", "%s is blocked by the proxy operator%s" % (
                name, "" if blocked == name else " (%s is blocked)" % blocked),
                REASON_NOT_ALLOWED)
        if key is not None and self.store.is_blocked(key=key):
            return _refused("blocked", "key %s is blocked by the proxy operator"
                            % short_key(key), REASON_NOT_ALLOWED)

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
        return self._by_store(name, key, dns_failed)

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
        # a full or broken store must not refuse the bind. It is logged, never silent.
        try:
            self.store.record(name, key, method, actor=method, detail=detail)
        except OwnershipError as exc:
            log.error("bind of %s allowed by %s but not recorded: %s", name, method, exc)

    def _by_store(self, name: str, key: str, dns_failed) -> Decision:
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
            return _refused("none", "no allow-list entry or DNS TXT record %s lets key %s "
                            "bind %s" % (_dns_name(name) or "", short_key(key), name),
                            REASON_NOT_ALLOWED)
        if name.startswith("*.") and (cover is None or cover.name != name):
            return _refused("none", "wildcard %s needs an allow-list entry or a DNS TXT "
                            "record %s naming key %s (first use never grants a wildcard)"
                            % (name, _dns_name(name), short_key(key)), REASON_NOT_ALLOWED)
        owner, created = self.store.claim(name, key, "tofu")
        if owner.key != key:  # another bind won the race for this name
            return _refused("tofu", "%s belongs to key %s since %s" % (
                name, short_key(owner.key), _when(owner.first_bound)), REASON_NOT_OWNER)
        if created:
            log.info("%s now owned by key %s (first use)", name, short_key(key))
            return _allowed("tofu", "first use: %s now belongs to key %s"
                            % (name, short_key(key)))
        return _allowed("tofu", "%s belongs to key %s since %s"
                        % (name, short_key(key), _when(owner.first_bound)))
