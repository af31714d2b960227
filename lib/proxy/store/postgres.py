"""The fleet's store: PostgreSQL, shared by every proxy instance of an operator.

    PostgresStore(url, clock=time.time, limits=None, pool_size=POOL_SIZE,
                  acquire_timeout=ACQUIRE_TIMEOUT)

- psycopg 3 with a bounded psycopg_pool pool. psycopg is cooperative under gevent's
  monkey-patching (from 3.1.14), which the entry points apply: a slow database parks the
  greenlet that asked, never the event loop. This module does not patch anything.
- Tables live in the schema ``shroud`` (a shared database keeps its own tables apart).
  Migrations are versioned (``shroud.schema_version``), applied at start in one transaction
  under an advisory lock, so several instances starting at once migrate once; a database newer
  than the code is refused with a clear error.
- Blocks and unblocks ``NOTIFY shroud_fleet`` in their transaction; every instance LISTENs on a
  connection of its own (:meth:`PostgresStore.wait_for_change`) and reloads its block cache.
- The database unreachable: every call raises :class:`StoreUnavailable` after at most
  ``acquire_timeout`` (binds are refused with ``store-unavailable``; routing reads memory and
  goes on). The pool reconnects by itself; nothing needs a restart.
- The URL may carry a password: :func:`redact_url` is what logs, errors and the dashboard show.
  ``sslmode`` (and the other libpq parameters) in the URL are honoured as libpq does.
"""
from __future__ import annotations

import contextlib
import functools
import re
import time
import urllib.parse
from typing import Callable

from lib.proxy.store.base import ClaimLimits, OwnershipError, Store, StoreUnavailable

SCHEMA_VERSION = 3
# pg_advisory_xact_lock keys: "Shrd" for migrations; per-key claim locks use it as the class.
LOCK_CLASS = 0x53687264
CHANNEL = "shroud_fleet"
# Connections per instance (plus one for LISTEN): binds are short transactions, so 8 carry a bind
# storm from many tunnels. PostgreSQL's default max_connections (100) thus serves ~11 instances;
# a larger fleet raises it or puts PgBouncer in between (docs/DEPLOY.md).
POOL_SIZE = 8
# A bind waits this long for a connection before it is refused (store-unavailable): the client's
# Bind has 10 s (lib/client/tunnels.py, control timeout) and retries.
ACQUIRE_TIMEOUT = 3.0
# libpq's own connect timeout (whole seconds), and the longest one statement may run: a lock
# held by a stuck session must not park binds for minutes.
CONNECT_TIMEOUT = 3
STATEMENT_TIMEOUT_MS = 5000
# The LISTEN connection says nothing while idle: this often it is pinged, so a dead database
# host is noticed (and the watcher reloads once it is back).
LISTEN_PING = 10.0

_MIGRATIONS = {
    1: [
        """CREATE TABLE ownership (
               name TEXT PRIMARY KEY, key TEXT NOT NULL, method TEXT NOT NULL,
               first_bound DOUBLE PRECISION NOT NULL, last_bound DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX ownership_key ON ownership(key)",
        "CREATE INDEX ownership_expiry ON ownership(method, last_bound)",
        """CREATE TABLE blocked_name (
               name TEXT PRIMARY KEY, actor TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
               detail TEXT NOT NULL)""",
        """CREATE TABLE blocked_key (
               key TEXT PRIMARY KEY, actor TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
               detail TEXT NOT NULL)""",
        """CREATE TABLE audit (
               id BIGSERIAL PRIMARY KEY, time DOUBLE PRECISION NOT NULL,
               actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
               detail TEXT NOT NULL)""",
        """CREATE TABLE instance (
               id TEXT PRIMARY KEY, hostname TEXT NOT NULL, addresses TEXT NOT NULL,
               fleet_addr TEXT NOT NULL, fingerprint TEXT NOT NULL,
               started DOUBLE PRECISION NOT NULL, heartbeat DOUBLE PRECISION NOT NULL,
               stats TEXT NOT NULL)""",
        """CREATE TABLE live_binding (
               instance TEXT NOT NULL, protocol TEXT NOT NULL, name TEXT NOT NULL,
               tunnel INTEGER NOT NULL, key TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
               PRIMARY KEY (instance, protocol, name, tunnel))""",
        "CREATE INDEX live_binding_name ON live_binding(name)",
        """CREATE TABLE claim_rate (
               address TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL,
               stamp DOUBLE PRECISION NOT NULL)""",
    ],
    # Tunnel ids of gunicorn workers are pid * 10^6 + n (lib/proxy/server.py), past INTEGER's
    # 2^31: every heartbeat of a worker holding a tunnel failed ("integer out of range").
    2: ["ALTER TABLE live_binding ALTER COLUMN tunnel TYPE BIGINT"],
    # Each instance's tunnel certificate: the trust anchors of the fleet's links.
    3: ["ALTER TABLE instance ADD COLUMN cert TEXT NOT NULL DEFAULT ''"],
}

_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (URL or key=value form)."""
    if "://" not in url:
        return _PASSWORD_KV.sub(r"\1***", url)
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = "%s%s@%s" % (user, ":***" if colon else "", hostinfo)
    query = "&".join(
        ("%s=***" % k) if k.lower() == "password" else ("%s=%s" % (k, v)) if v else k
        for k, v in (p.partition("=")[::2] for p in parts.query.split("&") if p))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _password(url: str) -> str | None:
    import psycopg
    import psycopg.conninfo

    try:
        return psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:  # an unparsable URL fails at connect, with its own (scrubbed) message
        return None


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """The shared SQL's ``?`` placeholders in psycopg's ``%s`` form."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Tx:
    """What a transaction body sees: ``execute(sql, args) -> cursor``, as sqlite3 offers."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, args=()):
        return self.conn.execute(_pg(sql), args)


class PostgresStore(Store):
    """The store in PostgreSQL. :raises OwnershipError: at start, the database cannot be
    reached or used (the message names it without its password)."""

    dialect = "postgresql"
    FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str, clock: Callable[[], float] = time.time,
                 limits: ClaimLimits | None = None, pool_size: int = POOL_SIZE,
                 acquire_timeout: float = ACQUIRE_TIMEOUT):
        import psycopg
        import psycopg_pool

        super().__init__(clock, limits)
        self._psycopg, self._pool_errors = psycopg, (psycopg_pool.PoolTimeout,
                                                      psycopg_pool.PoolClosed)
        self.url = url
        self.safe_url = redact_url(url)
        self._secret = _password(url)
        self._acquire_timeout = acquire_timeout
        self._listener = None
        self._listener_pinged = 0.0
        self._connect_args = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT}
        try:
            with psycopg.connect(url, **self._connect_args) as conn:
                _configure(conn)
                self._migrate(conn)
        except psycopg.Error as exc:
            raise OwnershipError("cannot use the database %s: %s (check --database-url)"
                                 % (self.safe_url, self._scrub(exc))) from None
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=acquire_timeout, open=False,
            kwargs=self._connect_args, configure=_configure, name="shroud-store",
            check=psycopg_pool.ConnectionPool.check_connection)
        self._pool.open(wait=False)
        self.reload_blocks()

    def _scrub(self, exc) -> str:
        text = str(exc).strip().replace("\n", " ")
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    def _migrate(self, conn) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_CLASS,))
            conn.execute("CREATE SCHEMA IF NOT EXISTS shroud")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if version > SCHEMA_VERSION:
                raise OwnershipError(
                    "the database %s has Shroud schema version %d; this Shroud knows up to %d "
                    "(upgrade Shroud; downgrade refused)" % (self.safe_url, version,
                                                             SCHEMA_VERSION))
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (%s)", (target,))

    def describe(self) -> str:
        return "PostgreSQL %s" % self.safe_url

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._pool.close(timeout=1.0)

    # --- plumbing ---------------------------------------------------------------------
    def _unavailable(self, what: str, exc) -> StoreUnavailable:
        return StoreUnavailable("cannot %s: the database %s is unavailable (%s)"
                                % (what, self.safe_url, self._scrub(exc) or type(exc).__name__))

    @contextlib.contextmanager
    def _errors(self, what: str):
        """psycopg's and the pool's errors as the store's (see the module docstring)."""
        psycopg = self._psycopg
        try:
            yield
        except self._pool_errors as exc:
            raise self._unavailable(what, exc) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self._unavailable(what, exc) from None
        except psycopg.Error as exc:
            raise OwnershipError("cannot %s in the database %s: %s"
                                 % (what, self.safe_url, self._scrub(exc))) from None

    def _transaction(self, what: str, body: Callable):
        with self._errors(what), self._pool.connection() as conn, conn.transaction():
            return body(_Tx(conn))

    def _rows(self, sql: str, args=()) -> list:
        # One statement on an autocommit connection is its own transaction: no BEGIN/COMMIT
        # round trips for a read.
        with self._errors("read the ownership store"), self._pool.connection() as conn:
            return conn.execute(_pg(sql), args).fetchall()

    def _notify(self, tx, payload: str) -> None:
        tx.execute("SELECT pg_notify(?, ?)", (CHANNEL, payload))

    def _lock_key(self, tx, key: str) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (LOCK_CLASS, key))

    def wait_for_change(self, timeout: float, sleep: Callable = time.sleep) -> bool:
        """Wait up to ``timeout`` s for a NOTIFY from any instance. True also right after the
        LISTEN connection was (re)made: changes may have been missed meanwhile.

        :raises StoreUnavailable: the database cannot be reached (after sleeping up to
            ``timeout``, so a caller's loop does not spin).
        """
        psycopg = self._psycopg
        if self._listener is None:
            try:
                conn = psycopg.connect(self.url, **self._connect_args)
                conn.execute("LISTEN " + CHANNEL)
            except psycopg.Error as exc:
                sleep(timeout)
                raise self._unavailable("listen for changes", exc) from None
            self._listener, self._listener_pinged = conn, time.monotonic()
            return True
        try:
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                return True
            if time.monotonic() - self._listener_pinged >= LISTEN_PING:
                self._listener.execute("SELECT 1")
                self._listener_pinged = time.monotonic()
            return False
        except psycopg.Error as exc:
            self._listener.close()
            self._listener = None
            raise self._unavailable("listen for changes", exc) from None


def _configure(conn) -> None:
    conn.execute("SET search_path TO shroud")
    conn.execute("SET statement_timeout = %d" % STATEMENT_TIMEOUT_MS)
