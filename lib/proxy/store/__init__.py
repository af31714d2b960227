"""The proxy's durable store: ownership, blocks, audit, claim limits and the fleet's live
registry, behind one API with two backends.

Public API::

    open_store(data_dir, database_url=None, threaded=True, limits=None) -> Store
        # PostgreSQL when database_url is given (the fleet's), else SQLite in the data dir
    database_url_from_env(environ) -> str | None   # SHROUD_DATABASE_URL, else DATABASE_URL
    redact_url(url) -> str                          # the URL without its password

    Store (lib.proxy.store.base): owner, covering_owner, owners, names_owned, claim, record,
        assign, release, touch_names, expire_claims, block_hostname, unblock_hostname,
        block_key, unblock_key, is_blocked, blocks, blocked_name, blocked_hostnames, blocked_keys,
        reload_blocks, wait_for_change, audit, audit_log, register_instance, heartbeat,
        deregister, expire_instances, instances, live_bindings, describe, close
    SqliteStore (lib.proxy.store.sqlite), PostgresStore (lib.proxy.store.postgres)
    Ownership, Block, AuditEntry, Instance, LiveBinding, ClaimLimits
    OwnershipError > StoreUnavailable;  ClaimRefused

Both backends run the same SQL (lib/proxy/store/base.py) and the same test suite
(tests/test_ownership.py runs against each), so their behaviour cannot drift.
"""
from __future__ import annotations

import os

from lib.proxy.store.base import (AuditEntry, Block, Blocks, ClaimLimits, ClaimRefused,
                                  Instance, LiveBinding, Ownership, OwnershipError, Store,
                                  StoreUnavailable)
from lib.proxy.store.postgres import redact_url

SQLITE_FILE = "ownership.sqlite3"

__all__ = ["AuditEntry", "Block", "Blocks", "ClaimLimits", "ClaimRefused", "Instance",
           "LiveBinding", "Ownership", "OwnershipError", "Store", "StoreUnavailable",
           "database_url_from_env", "open_store", "redact_url", "SQLITE_FILE"]


def database_url_from_env(environ=os.environ) -> str | None:
    """SHROUD_DATABASE_URL, else DATABASE_URL (as platforms set it), else None."""
    return environ.get("SHROUD_DATABASE_URL") or environ.get("DATABASE_URL") or None


def open_store(data_dir: str, database_url: str | None = None, threaded: bool = True,
               limits: ClaimLimits | None = None) -> Store:
    """The proxy's store. :raises OwnershipError: it cannot be opened (the message names the
    file, or the database without its password)."""
    if database_url:
        if not database_url.startswith(("postgres://", "postgresql://")) \
                and "=" not in database_url:
            raise OwnershipError("--database-url %s is not a PostgreSQL URL (write "
                                 "postgresql://USER@HOST:PORT/DB)" % redact_url(database_url))
        from lib.proxy.store.postgres import PostgresStore

        return PostgresStore(database_url, limits=limits)
    from lib.proxy.store.sqlite import SqliteStore

    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    return SqliteStore(os.path.join(data_dir, SQLITE_FILE), threaded=threaded, limits=limits)
