"""``shroud_proxy.py migrate-store``: move a proxy's SQLite store into the fleet's PostgreSQL.

    python shroud_proxy.py migrate-store --data-dir DIR --database-url URL

Copies first-use and granted owners, blocks and the audit log, in one transaction; what the
database already holds wins (an owner there is kept, and the report names each name whose
owners differ). Running it again copies nothing new: idempotent. The SQLite file's records are only read
(its schema is brought up to date first, as a proxy's start would).
Prints one line of counts; a mistake (no store in DIR, an unreachable database) is one line
naming the flag and exit status 1. The URL's password is never printed.

Public API::

    migrate(source: Store, target: Store) -> dict     # the counts (Store.import_records)
    main(argv) -> int                                  # the subcommand
"""
from __future__ import annotations

import argparse
import os
import sys

from lib.proxy.store import SQLITE_FILE, database_url_from_env, open_store, redact_url
from lib.proxy.store.base import AUDIT_KEEP, ClaimLimits, OwnershipError

# Every owner row: the SQLite store's size cap (64 MiB) holds ~300k.
MAX_OWNERS = 10_000_000


def migrate(source, target) -> dict:
    """Copy ``source``'s records into ``target``; the counts. :raises OwnershipError:"""
    owners = source.owners(limit=MAX_OWNERS)
    audit = list(reversed(source.audit_log(limit=AUDIT_KEEP)))
    counts = target.import_records(owners, source.blocked_hostnames(), source.blocked_keys(),
                                   audit)
    target.audit("migrate-store", "migrate-store", source.describe(), summary(counts))
    return counts


def summary(counts: dict) -> str:
    line = ("owners: %d copied, %d already there; blocks: %d copied, %d already there; "
            "audit entries: %d copied, %d already there" % (
                counts["owners"], counts["owners_present"], counts["blocks"],
                counts["blocks_present"], counts["audit"], counts["audit_present"]))
    conflicts = counts["conflicts"]
    if conflicts:
        line += "; %d name(s) owned by another key in the database, kept as they are: %s" % (
            len(conflicts), ", ".join(c[0] for c in conflicts[:20])
            + (", ..." if len(conflicts) > 20 else ""))
    return line


def main(argv) -> int:
    p = argparse.ArgumentParser(
        prog="shroud_proxy.py migrate-store",
        description="Copy a proxy's SQLite store (owners, blocks, audit) into PostgreSQL.")
    p.add_argument("--data-dir", default=os.environ.get("SHROUD_DATA_DIR", "./proxy-data"),
                   help="the data dir holding %s [env SHROUD_DATA_DIR]" % SQLITE_FILE)
    p.add_argument("--database-url", default=database_url_from_env(),
                   help="the fleet's PostgreSQL URL [env SHROUD_DATABASE_URL, DATABASE_URL]")
    args = p.parse_args(argv)
    path = os.path.join(args.data_dir, SQLITE_FILE)
    if not args.database_url:
        print("migrate-store: give --database-url (or SHROUD_DATABASE_URL): the PostgreSQL "
              "database to copy into", file=sys.stderr)
        return 1
    if not os.path.isfile(path):
        print("migrate-store: no store at %s: --data-dir must be the proxy's data dir" % path,
              file=sys.stderr)
        return 1
    # No claim limits: this copies, it claims nothing.
    limits = ClaimLimits(max_names_per_key=0, claim_burst=0, expiry_days=0)
    source = target = None
    try:
        source = open_store(args.data_dir, threaded=False, limits=limits)
        target = open_store(args.data_dir, args.database_url, limits=limits)
        counts = migrate(source, target)
    except OwnershipError as exc:
        print("migrate-store: %s" % exc, file=sys.stderr)
        return 1
    finally:
        for store in (source, target):
            if store is not None:
                store.close()
    print("migrate-store: %s -> %s: %s" % (path, redact_url(args.database_url),
                                           summary(counts)))
    return 0
