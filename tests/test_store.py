"""lib.proxy.store: claim limits (durable squatting), the live registry, change notification
between instances, atomic transactions, and PostgreSQL's own concerns (migrations under a lock,
a newer schema, the URL's password, the database going away and coming back).

Tests taking ``reopen`` run against SQLite and against the session's real PostgreSQL
(tests/fixtures/postgres.py)."""
import os
import threading
import time

import pytest

from lib.identity import Identity
from lib.protocol.messages import REASON_LIMIT, REASON_STORE_UNAVAILABLE
from lib.proxy.ownership import OwnershipPolicy
from lib.proxy.store import (ClaimLimits, ClaimRefused, Instance, LiveBinding, Ownership,
                             OwnershipError, StoreUnavailable, redact_url)

pytestmark = pytest.mark.timeout(120)

K1, K2, K3 = (Identity.generate().fingerprint for _ in range(3))
DAY = 86400.0


@pytest.fixture
def reopen(reopen_store):
    return reopen_store


# --- durable squatting (issue: one key claimed 1,024 names in 1.5 s) -------------------------
def test_key_quota_caps_first_use_names_not_rebinds_or_grants(reopen):
    store = reopen(limits=ClaimLimits(max_names_per_key=3, claim_burst=0))
    for i in range(3):
        assert store.claim(f"n{i}.test", K1)[1]
    with pytest.raises(ClaimRefused, match="--max-names-per-key") as exc:
        store.claim("n3.test", K1)
    assert exc.value.code == REASON_LIMIT and store.owner("n3.test") is None
    assert store.claim("n0.test", K1) == (store.owner("n0.test"), False)  # a rebind is free
    store.assign("granted.test", K1, actor="admin")  # the operator is not limited
    assert store.claim("n3.test", K2)[1]  # another key has its own quota
    decision = OwnershipPolicy(store).decide("n4.test", K1)
    assert not decision.allowed and decision.code == REASON_LIMIT
    store.release("n1.test", actor="admin")
    assert store.claim("n4.test", K1)[1]
    assert store.names_owned(K1) == 3


def test_new_claims_are_rate_limited_per_address_fleet_wide(reopen):
    now = [1_000_000.0]
    limits = ClaimLimits(max_names_per_key=0, claim_burst=2, claims_per_hour=60)
    a = reopen(clock=lambda: now[0], limits=limits)
    b = reopen(clock=lambda: now[0], limits=limits)  # another instance of the fleet
    assert a.claim("a1.test", K1, address="10.0.0.1")[1]
    assert b.claim("a2.test", K2, address="10.0.0.1")[1]
    with pytest.raises(ClaimRefused, match="try again in 60 s"):
        a.claim("a3.test", K3, address="10.0.0.1")  # any key: the bucket is the address's
    with pytest.raises(ClaimRefused):
        b.claim("a3.test", K3, address="10.0.0.1")
    assert a.claim("a3.test", K3, address="10.0.0.2")[1]  # another address
    assert a.claim("a1.test", K1, address="10.0.0.1") == (a.owner("a1.test"), False)
    now[0] += 61
    assert b.claim("a4.test", K1, address="10.0.0.1")[1]  # one more token
    with pytest.raises(ClaimRefused):
        a.claim("a5.test", K1, address="10.0.0.1")
    policy = OwnershipPolicy(a)
    refused = policy.decide("a5.test", K1, address="10.0.0.1")
    assert not refused.allowed and refused.code == REASON_LIMIT and "10.0.0.1" in refused.reason


def test_unused_first_use_claims_lapse_and_live_names_are_kept(reopen):
    now = [1_000_000.0]
    store = reopen(clock=lambda: now[0], limits=ClaimLimits(expiry_days=2, claim_burst=0))
    store.claim("idle.test", K1)
    store.claim("live.test", K1)
    store.assign("granted.test", K1, actor="admin")
    now[0] += 1.5 * DAY
    assert store.touch_names(["live.test"], older_than=now[0] - DAY) == 1  # its instance
    now[0] += 1.0 * DAY
    assert store.covering_owner("idle.test") is None  # lapsed: as if unowned
    assert store.covering_owner("live.test").key == K1
    assert store.covering_owner("granted.test").key == K1  # operator grants never lapse
    policy = OwnershipPolicy(store)
    taken = policy.decide("idle.test", K2)
    assert taken.allowed and taken.method == "tofu" and store.owner("idle.test").key == K2
    entry = store.audit_log(1)[0]
    assert entry.action == "claim-lapsed" and K1 in entry.detail
    refused = policy.decide("live.test", K2)
    assert not refused.allowed
    now[0] += 2.5 * DAY
    assert store.expire_claims() == 2  # idle.test (K2's now) and live.test, untouched since
    assert store.owner("granted.test") is not None and store.owners() == [
        store.owner("granted.test")]
    assert store.audit_log(1)[0].action == "claims-lapsed"


def test_first_use_names_in_the_whole_store_are_bounded(reopen):
    now = [1_000_000.0]
    limits = ClaimLimits(max_names_per_key=0, claim_burst=0, expiry_days=0,
                         max_first_use_names=4)
    a = reopen(clock=lambda: now[0], limits=limits)
    b = reopen(clock=lambda: now[0], limits=limits)  # another instance of the fleet
    for i in range(2):
        assert a.claim(f"a{i}.test", Identity.generate().fingerprint)[1]
        assert b.claim(f"b{i}.test", Identity.generate().fingerprint)[1]
    now[0] += 61  # both instances re-count: 4 in the store
    for store in (a, b):
        with pytest.raises(ClaimRefused, match="--max-first-use-names"):
            store.claim("one-too-many.test", K1)
    a.assign("granted.test", K1, actor="admin")  # the operator is not bounded by it
    assert a.claim("a0.test", a.owner("a0.test").key)[1] is False  # owners keep binding
    a.release("a0.test", actor="admin")
    now[0] += 61
    assert b.claim("room-again.test", K1)[1]
    assert len(a.owners()) == 5


def test_claim_rate_table_is_bounded(reopen, monkeypatch):
    import lib.proxy.store.base as base

    monkeypatch.setattr(base, "MAX_RATE_ROWS", 5)
    # One claim per address an hour: an address whose row is kept has no token left, one whose
    # row was dropped starts afresh with a full bucket.
    store = reopen(limits=ClaimLimits(max_names_per_key=0, claim_burst=1,
                                      claims_per_hour=1))
    for i in range(12):
        assert store.claim(f"r{i}.test", K1, address=f"10.0.1.{i}")[1]
    store.expire_claims()
    for i in range(7, 12):  # the five newest rows are kept
        with pytest.raises(ClaimRefused):
            store.claim(f"again{i}.test", K1, address=f"10.0.1.{i}")
    for i in range(7):  # the older ones went: the table holds MAX_RATE_ROWS
        assert store.claim(f"again{i}.test", K1, address=f"10.0.1.{i}")[1]


# --- transactions ---------------------------------------------------------------------------
def test_failed_transaction_leaves_nothing_half_written(store_and_backend):
    store = store_and_backend

    # import_records writes the owner, then fails on a block row of the wrong shape (one value
    # for four columns): one transaction, so the owner must not stay.
    with pytest.raises(OwnershipError):
        store.import_records([Ownership("half.test", K1, "tofu", 1.0, 1.0)], [("bad",)], [], [])
    assert store.owner("half.test") is None
    assert store.claim("half.test", K1)[1]  # the store is usable after the failure


@pytest.fixture
def store_and_backend(reopen):
    return reopen()


# --- the live registry ----------------------------------------------------------------------
def _instance(name, now):
    return Instance(name, f"{name}.proxy", {"https": "127.0.0.1:443"}, "", "ab" * 32, now, now,
                    {"tunnels": 0})


def test_live_registry_heartbeats_bindings_and_expiry(reopen):
    now = [1_000_000.0]
    a = reopen(clock=lambda: now[0])
    b = reopen(clock=lambda: now[0])
    a.register_instance(_instance("A", now[0]))
    b.register_instance(_instance("B", now[0]))
    assert a.heartbeat("A", {"tunnels": 1}, add=[
        LiveBinding("A", "tls", "x.test", 1, K1, now[0]),
        LiveBinding("A", "http", "x.test", 1, K1, now[0])])
    assert b.heartbeat("B", {"tunnels": 1}, add=[LiveBinding("B", "tls", "x.test", 7, K1,
                                                             now[0])])
    assert {(i.id, i.stats["tunnels"]) for i in a.instances()} == {("A", 1), ("B", 1)}
    assert [(x.instance, x.protocol, x.tunnel) for x in b.live_bindings()] == [
        ("A", "http", 1), ("A", "tls", 1), ("B", "tls", 7)]
    for _ in range(3):  # A keeps beating, B has stopped (SIGKILLed)
        now[0] += 5
        assert a.heartbeat("A", {"tunnels": 1}, remove=[("http", "x.test", 1)])
    assert a.expire_instances(max_age=15) == []
    now[0] += 1
    assert a.expire_instances(max_age=15) == ["B"]
    assert [i.id for i in a.instances()] == ["A"]
    assert [(x.instance, x.protocol) for x in a.live_bindings()] == [("A", "tls")]
    assert b.heartbeat("B", {}) is False  # B came back: it must register again
    a.deregister("A")
    assert a.instances() == [] and a.live_bindings() == []


def test_an_instance_row_carries_its_certificate_and_a_worker_tunnel_id(reopen):
    """The certificate (the fleet links' trust anchor, lib/proxy/hostlinks.py) round-trips;
    a gunicorn worker's tunnel id (pid * 10^6 + n, past 2^31) is stored whole."""
    now = 1_000_000.0
    a, b = reopen(), reopen()
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    a.register_instance(_instance("A", now)._replace(cert=pem))
    b.register_instance(_instance("B", now))
    assert {i.id: i.cert for i in b.instances()} == {"A": pem, "B": ""}
    tunnel = 4_194_303 * 1_000_000 + 1
    assert a.heartbeat("A", {}, add=[LiveBinding("A", "tls", "x.test", tunnel, K1, now)])
    assert [x.tunnel for x in b.live_bindings()] == [tunnel]


# --- blocks reach the other instances -------------------------------------------------------
def _drain(store):
    while store.wait_for_change(0.2):  # a fresh LISTEN connection reports a change once
        store.reload_blocks()


def test_block_on_one_instance_reaches_another(reopen):
    a, b = reopen(), reopen()
    b.watched = True  # b's cache now changes only through its watcher
    _drain(b)
    assert b.wait_for_change(0.3) is False  # nothing happened
    a.block_hostname("evil.test", actor="admin")
    a.block_key(K2, actor="admin")
    assert a.is_blocked(hostname="evil.test")  # its own change: at once
    deadline = time.monotonic() + 10
    while not b.is_blocked(hostname="evil.test"):
        assert time.monotonic() < deadline, "the block never reached the other instance"
        if b.wait_for_change(1.0):
            b.reload_blocks()
    assert b.is_blocked(key=K2)
    a.unblock_hostname("evil.test", actor="admin")
    deadline = time.monotonic() + 10
    while b.is_blocked(hostname="evil.test"):
        assert time.monotonic() < deadline, "the unblock never reached the other instance"
        if b.wait_for_change(1.0):
            b.reload_blocks()


class _FakeClock:
    """time.monotonic for lib.proxy.store.sqlite, moved on only by its own sleep."""

    def __init__(self):
        self.t = 1000.0

    def monotonic(self):
        return self.t

    def sleep(self, seconds):
        assert seconds > 0, seconds  # a watcher loop that spins would sleep 0
        self.t += seconds


def test_an_idle_sqlite_watcher_looks_once_a_second_and_sees_a_change_within_it(tmp_path,
                                                                                 monkeypatch):
    # The fleet's watcher calls wait_for_change(WATCH_TIMEOUT) in a loop. With nothing changing
    # it looked at data_version 4 times a second and once more per call (an idle proxy's loop
    # woke for it 5 times a second): now once a second, and a change is still seen within
    # IDLE_POLL_INTERVAL, the next one within POLL_INTERVAL (bursts are looked for closely).
    from types import SimpleNamespace

    from lib.proxy.fleet import WATCH_TIMEOUT
    from lib.proxy.store import sqlite

    path = str(tmp_path / "ownership.sqlite3")
    a, b = sqlite.SqliteStore(path), sqlite.SqliteStore(path)
    clock = _FakeClock()
    monkeypatch.setattr(sqlite, "time", SimpleNamespace(monotonic=clock.monotonic))
    looks = []
    b.set_trace_callback(looks.append)

    def watch_until_change(limit):
        start = clock.t
        while not b.wait_for_change(WATCH_TIMEOUT, sleep=clock.sleep):
            assert clock.t - start < limit, "no change seen"
        return clock.t - start

    with pytest.raises(AssertionError, match="no change seen"):
        watch_until_change(60)  # a quiet minute
    assert looks == ["PRAGMA data_version"] * len(looks) and len(looks) <= 64
    a.block_hostname("evil.test", actor="admin")  # another process's commit
    assert watch_until_change(10) <= sqlite.IDLE_POLL_INTERVAL
    a.block_hostname("worse.test", actor="admin")
    assert watch_until_change(10) <= sqlite.POLL_INTERVAL
    a.close()
    b.close()


def test_reload_blocks_reports_what_was_newly_blocked(reopen):
    a, b = reopen(), reopen()
    a.block_hostname("one.test", actor="x")
    a.block_key(K1, actor="x")
    assert b.reload_blocks() == ({"one.test"}, {K1})
    assert b.reload_blocks() == (set(), set())


# --- PostgreSQL's own concerns --------------------------------------------------------------
def test_instances_starting_at_once_migrate_once(pg_url):
    from lib.proxy.store.postgres import SCHEMA_VERSION, PostgresStore

    stores, errors = [], []

    def start():
        try:
            stores.append(PostgresStore(pg_url))
        except Exception as exc:  # reported below with the others
            errors.append(exc)
    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(stores) == 8
        import psycopg
        with psycopg.connect(pg_url, autocommit=True) as conn:
            rows = conn.execute("SELECT version FROM shroud.schema_version "
                                "ORDER BY version").fetchall()
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert stores[3].claim("m.test", K1)[1] and stores[5].owner("m.test").key == K1
    finally:
        for s in stores:
            s.close()


def test_processes_opening_a_new_sqlite_store_at_once_all_start(tmp_path):
    # Two gunicorn workers open the proxy's new ownership database at the same moment: the
    # switch to WAL said "database is locked" at once (no busy wait) and a worker failed to
    # boot, taking gunicorn down; or one saw the other's fresh tables as a stranger's. Real
    # processes, three at a time, released together; 12 of 40 rounds failed before.
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, time\n"
            "from lib.proxy.store.sqlite import SqliteStore\n"
            "from lib.proxy.store.base import OwnershipError\n"
            "start = float(sys.argv[2])\n"
            "while time.time() < start: pass\n"
            "try:\n"
            "    SqliteStore(sys.argv[1]).close()\n"
            "except OwnershipError as exc:\n"
            "    print(exc); sys.exit(1)\n")
    failures = []
    for rnd in range(16):
        path = str(tmp_path / f"own{rnd}.sqlite3")
        start = time.time() + 0.4
        procs = [subprocess.Popen([sys.executable, "-c", code, path, str(start)], cwd=root,
                                  stdout=subprocess.PIPE, text=True) for _ in range(3)]
        for p in procs:
            out, _ = p.communicate(timeout=30)
            if p.returncode:
                failures.append(out.strip())
    assert failures == []


def test_database_newer_than_the_code_is_refused(pg_url):
    from lib.proxy.store.postgres import PostgresStore

    PostgresStore(pg_url).close()
    import psycopg
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO shroud.schema_version VALUES (99)")
    with pytest.raises(OwnershipError, match="schema version 99.*downgrade refused"):
        PostgresStore(pg_url)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:s3cret@db.example:5432/x", "postgresql://u:***@db.example:5432/x"),
    ("postgresql://u@db/x?password=s3cret&sslmode=require",
     "postgresql://u@db/x?password=***&sslmode=require"),
    ("host=db user=u password=s3cret dbname=x", "host=db user=u password=*** dbname=x"),
    ("postgres://db/x", "postgres://db/x"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_password_never_appears_in_errors(postgres_server):
    from lib.proxy.store.postgres import PostgresStore
    from tests.support.procs import free_port

    url = f"postgresql://shroud:s3cret-pw@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(OwnershipError) as exc:
        PostgresStore(url)
    assert "s3cret-pw" not in str(exc.value) and "shroud:***@" in str(exc.value)


def test_tls_to_the_database_as_the_url_asks(postgres_server, pg_url, tmp_path):
    from lib.proxy.store.postgres import PostgresStore
    from tests.support.visitor import tls_site

    import psycopg
    store = PostgresStore(f"{pg_url}?sslmode=verify-full&sslrootcert={postgres_server.ca_pem}"
                          "&application_name=shroud-tls-test")
    try:
        assert store.claim("tls.test", K1)[1]
        # The store's connections, as the server sees them (looked at from one of our own).
        with psycopg.connect(pg_url, autocommit=True) as conn:
            rows = conn.execute("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a "
                                "USING (pid) WHERE a.application_name = %s",
                                ("shroud-tls-test",)).fetchall()
        assert rows and all(r[0] for r in rows)
    finally:
        store.close()
    other_ca = tls_site(tmp_path, "elsewhere.test").ca_pem  # not the server's CA
    with pytest.raises(OwnershipError, match="certificate"):
        PostgresStore(f"{pg_url}?sslmode=verify-full&sslrootcert={other_ca}")


def test_database_down_refuses_with_store_unavailable_then_recovers(postgres_server, pg_url):
    from lib.proxy.store.postgres import PostgresStore

    store = PostgresStore(pg_url, acquire_timeout=1.0)
    try:
        store.claim("before.test", K1)
        store.block_hostname("blocked.test", actor="admin")
        policy = OwnershipPolicy(store)
        postgres_server.kill()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as exc:
            store.claim("during.test", K1)
        assert exc.value.code == REASON_STORE_UNAVAILABLE
        assert time.monotonic() - t0 < 10  # bounded by the pool's wait (no hang)
        refused = policy.decide("during.test", K1)
        assert not refused.allowed and refused.code == REASON_STORE_UNAVAILABLE
        assert store.is_blocked(hostname="blocked.test")  # routing reads memory
        store.watched = True
        assert store.is_blocked(hostname="blocked.test")
        postgres_server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert store.claim("during.test", K1)[1]
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store never came back"
                time.sleep(0.2)
        assert store.owner("before.test").key == K1
    finally:
        if not postgres_server.running():
            postgres_server.start()
        store.close()
