"""The embedded store: one SQLite file in the data dir (the default; serves the workers of one
host).

    SqliteStore(path, max_size_bytes=DEFAULT_MAX_SIZE, clock=time.time, threaded=False,
                limits=None)
    store.set_trace_callback(callback | None)   # every SQL statement it runs (tests, debugging)

Storage: WAL mode with ``synchronous=FULL`` (a bind that was answered "allowed" is on disk),
schema version in ``PRAGMA user_version``, a size cap (``max_size_bytes``) so a flood of
first-use binds fills a bounded file, not the disk. All calls take a lock and are short (one
small transaction), so greenlets may share one store; the store never calls out to the network.
With ``threaded=True`` (the proxy's setting) each write transaction, whose COMMIT waits for the
disk, runs in gevent's thread pool while the calling greenlet waits, so a slow disk or a burst
of first-use binds never stalls the event loop that serves every other connection; reads
(small, no fsync) stay on the calling greenlet.

Other processes sharing the file (gunicorn's workers, a CLI) are noticed through
``PRAGMA data_version``, which changes when another connection commits:
:meth:`SqliteStore.wait_for_change` polls it.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from typing import Callable

from lib.proxy.store.base import ClaimLimits, OwnershipError, Store

SCHEMA_VERSION = 3
# Ownership rows are ~200 bytes: 64 MiB holds ~300k names, far beyond one proxy's real use, yet
# a flood of first-use binds with fresh keys stops there instead of filling the disk.
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
# Another process (e.g. a dashboard) holding the write lock: wait this long before failing.
BUSY_TIMEOUT = 5.0
# How often a store being opened looks again while another process prepares the same file.
BUSY_RETRY = 0.05
# How often wait_for_change looks at data_version: every POLL_INTERVAL just after a change
# (changes come in bursts: a block, then its audit, another block), twice as long after each
# look that finds none, up to IDLE_POLL_INTERVAL. A block made by another worker of this host
# applies here within that (plus the watcher's reload), inside the fleet's 2 s; an idle proxy
# looks (and wakes) once a second, not four times (bench/README.md, "Per-request cost").
POLL_INTERVAL = 0.25
IDLE_POLL_INTERVAL = 1.0

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
    2: [  # the live registry and the claim limits (docs/SECURITY.md, "Another client")
        "CREATE INDEX ownership_expiry ON ownership(method, last_bound)",
        """CREATE TABLE instance (
               id TEXT PRIMARY KEY, hostname TEXT NOT NULL, addresses TEXT NOT NULL,
               fleet_addr TEXT NOT NULL, fingerprint TEXT NOT NULL, started REAL NOT NULL,
               heartbeat REAL NOT NULL, stats TEXT NOT NULL)""",
        """CREATE TABLE live_binding (
               instance TEXT NOT NULL, protocol TEXT NOT NULL, name TEXT NOT NULL,
               tunnel INTEGER NOT NULL, key TEXT NOT NULL, since REAL NOT NULL,
               PRIMARY KEY (instance, protocol, name, tunnel))""",
        "CREATE INDEX live_binding_name ON live_binding(name)",
        """CREATE TABLE claim_rate (
               address TEXT PRIMARY KEY, tokens REAL NOT NULL, stamp REAL NOT NULL)""",
    ],
    # Each instance's tunnel certificate: the trust anchors of the fleet's links.
    3: ["ALTER TABLE instance ADD COLUMN cert TEXT NOT NULL DEFAULT ''"],
}


class SqliteStore(Store):
    """The store in one SQLite file.

    :raises OwnershipError: the file is not a usable Shroud ownership database (corrupt, not
        SQLite, from a newer Shroud, unreadable).
    """

    dialect = "sqlite"

    def __init__(self, path: str, max_size_bytes: int = DEFAULT_MAX_SIZE,
                 clock: Callable[[], float] = time.time, threaded: bool = False,
                 limits: ClaimLimits | None = None):
        super().__init__(clock, limits)
        self.path = str(path)
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
            self._prepare_when_free(conn, max_size_bytes)
        except sqlite3.Error as exc:
            conn.close()
            raise OwnershipError("ownership database %s is unusable: %s" % (self.path, exc)) \
                from None
        except OwnershipError:
            conn.close()
            raise
        self._conn = conn
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        self._poll_interval = POLL_INTERVAL
        self._looked_at = float("-inf")  # time.monotonic() of wait_for_change's last look
        self.reload_blocks()

    def _prepare_when_free(self, conn, max_size_bytes: int) -> None:
        """_prepare, again while another process holds the file: two gunicorn workers opening
        a new database at once got "database is locked" at once from the switch to WAL, which
        does not wait for the busy timeout (12 of 40 three-way races; a worker that fails to
        boot takes gunicorn's master down)."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                return self._prepare(conn, max_size_bytes)
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    raise
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            time.sleep(BUSY_RETRY)

    def _prepare(self, conn, max_size_bytes: int) -> None:
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

    def _migrate(self, conn) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OwnershipError("ownership database %s has schema version %d; this Shroud "
                                 "knows up to %d (downgrade refused)"
                                 % (self.path, version, SCHEMA_VERSION))
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another worker may have migrated while we waited for the write lock.
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                if current >= target:
                    conn.execute("COMMIT")
                    continue
                # Looked at under the write lock: read before it, another worker's first
                # migration, committed meanwhile, looked like a stranger's tables.
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if current == 0 and tables:
                    raise OwnershipError("%s is an SQLite database but not a Shroud ownership "
                                         "database" % self.path)
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute("PRAGMA user_version=%d" % target)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def describe(self) -> str:
        return "SQLite %s" % self.path

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def set_trace_callback(self, callback: Callable[[str], None] | None) -> None:
        """Pass every SQL statement this store runs to ``callback`` (None: stop): sqlite3's
        ``Connection.set_trace_callback``, for tests and debugging (what a path queries)."""
        with self._lock:
            self._connection().set_trace_callback(callback)

    # --- plumbing ---------------------------------------------------------------------
    def _connection(self):
        if self._conn is None:
            raise OwnershipError("ownership database %s is closed" % self.path)
        return self._conn

    def _transaction(self, what: str, body: Callable):
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

        with self._lock:
            if not self._threaded:
                return transaction()
            return _in_threadpool(transaction)

    def _rows(self, sql: str, args=()) -> list:
        with self._lock:
            try:
                return self._connection().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise OwnershipError("cannot read ownership database %s: %s"
                                     % (self.path, exc)) from None

    def wait_for_change(self, timeout: float, sleep: Callable = time.sleep) -> bool:
        """Whether another connection committed within ``timeout`` seconds: ``PRAGMA
        data_version`` looked at every POLL_INTERVAL to IDLE_POLL_INTERVAL (see there), with
        ``sleep`` in between (gevent.sleep in a proxy). A look the last call made less than
        POLL_INTERVAL ago is not made again: a watcher calling this in a loop looks once per
        interval, not once more per call."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now - self._looked_at >= POLL_INTERVAL:
                self._looked_at = now
                version = self._rows("PRAGMA data_version")[0][0]
                if version != self._data_version:
                    self._data_version = version
                    self._poll_interval = POLL_INTERVAL
                    return True
                self._poll_interval = min(2 * self._poll_interval, IDLE_POLL_INTERVAL)
            left = deadline - now
            if left <= 0:
                return False
            sleep(min(self._looked_at + self._poll_interval - now, left))


def _in_threadpool(transaction: Callable):
    """``transaction()`` in gevent's thread pool; the calling greenlet waits (cooperatively).
    The caller holds the store's lock."""
    import gevent  # only the threaded store needs it

    def in_thread():
        # Errors come back as values: gevent's pool would print each raised one to stderr.
        try:
            return None, transaction()
        except BaseException as exc:  # re-raised in the calling greenlet below
            return exc, None

    job = gevent.get_hub().threadpool.spawn(in_thread)
    interrupted = None
    while True:
        try:
            error, result = job.get()
            break
        except BaseException as exc:
            # Killed or timed out while the thread still uses the connection: keep the lock
            # until it is done with it, then pass the interruption on.
            interrupted = exc
    if interrupted is not None:
        raise interrupted
    if error is not None:
        raise error
    return result
