"""lib.proxy.ownership and lib.proxy.store: the durable store, the kill switch, and the bind policy
(allow-list, DNS TXT against the loopback DNS server, trust on first use).

Tests taking ``store`` or ``reopen`` run twice: against SQLite in a temp dir and against a fresh
database on the session's real PostgreSQL server (tests/fixtures/postgres.py), so the two
backends cannot drift. Tests taking ``db`` are about the SQLite file itself."""
import contextlib
import os
import sqlite3
import threading
import time

import pytest

from lib.identity import Identity
from lib.protocol.messages import (REASON_INTERNAL, REASON_INVALID_HOSTNAME, REASON_NOT_ALLOWED,
                          REASON_NOT_OWNER, REASON_SIGNATURE_REQUIRED)
from lib.proxy.ownership import (SCHEMA_VERSION, AllowList, ClaimLimits, OwnershipError,
                                 OwnershipPolicy, OwnershipStore, canonical_name)
from lib.proxy.store import sqlite as sqlite_store

pytestmark = pytest.mark.timeout(60)

K1, K2, K3 = (Identity.generate().fingerprint for _ in range(3))
NO_LIMITS = ClaimLimits(max_names_per_key=0, claim_burst=0, claims_per_hour=0, expiry_days=0)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "ownership.sqlite")


@pytest.fixture
def reopen(reopen_store):
    return reopen_store


@pytest.fixture
def store(reopen):
    return reopen()


def test_canonical_names():
    assert canonical_name("App.Example.COM.") == "app.example.com"
    assert canonical_name("*.Example.com") == "*.example.com"
    assert canonical_name("TCP:02222") == "tcp:2222"
    for bad in ("tcp:0", "tcp:70000", "a..b", "*.", "exa mple.com"):
        with pytest.raises(ValueError):
            canonical_name(bad)


# --- store ----------------------------------------------------------------------------------
def test_tofu_survives_restart_and_second_key_is_refused_with_reason(reopen):
    store = reopen()
    first = OwnershipPolicy(store).decide("app.example.com", K1)
    assert first.allowed and first.method == "tofu" and "first use" in first.reason
    store.close()

    store = reopen()  # the proxy restarted
    policy = OwnershipPolicy(store)
    again = policy.decide("APP.example.com", K1)
    assert again.allowed and again.method == "tofu"
    other = policy.decide("app.example.com", K2)
    assert not other.allowed and other.code == REASON_NOT_OWNER
    since = time.strftime("%Y-%m-%d", time.gmtime())
    assert "belongs to key %s since %s" % (K1[:16], since) in other.reason
    owner = store.owner("app.example.com")
    assert owner.key == K1 and owner.method == "tofu" and owner.first_bound <= owner.last_bound


def test_file_is_wal_and_schema_versioned(db):
    store = OwnershipStore(db)
    store.claim("a.example.com", K1)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute("PRAGMA user_version=99")
    conn.close()
    store.close()
    with pytest.raises(OwnershipError, match="schema version 99"):
        OwnershipStore(db)


def test_claim_is_atomic_first_writer_wins(store):
    results = []

    def bind(key):
        results.append(store.claim("race.example.com", key))
    threads = [threading.Thread(target=bind, args=(k,)) for k in (K1, K2, K3) * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    created = [owner for owner, was_created in results if was_created]
    assert len(created) == 1 and len(results) == 15
    assert {owner.key for owner, _ in results} == {created[0].key}


def test_last_bound_refreshed_at_most_once_a_minute(reopen):
    now = [1_000_000.0]
    store = reopen(clock=lambda: now[0])
    store.claim("a.example.com", K1)
    now[0] += 30
    assert store.claim("a.example.com", K1)[0].last_bound == 1_000_000.0
    now[0] += 31
    assert store.claim("a.example.com", K1)[0].last_bound == 1_000_061.0
    assert store.owner("a.example.com").first_bound == 1_000_000.0


@pytest.mark.parametrize("content", [
    b"this is not an sqlite database at all, just text " * 100,
    b"SQLite format 3\x00" + b"\xff" * 100,
    b"",  # empty is a valid new database, not corruption: checked below
])
def test_corrupt_file_is_a_clear_error_naming_the_file(db, content):
    with open(db, "wb") as f:
        f.write(content)
    if not content:
        OwnershipStore(db).close()
        return
    with pytest.raises(OwnershipError) as exc:
        OwnershipStore(db)
    assert db in str(exc.value)


def test_truncated_database_is_a_clear_error(db):
    store = OwnershipStore(db, limits=NO_LIMITS)
    for i in range(300):
        store.claim("host%d.example.com" % i, K1)
        store.audit("test", "fill", "x" * 200)
    store.close()
    # Fold the WAL into the main file, then cut the file in half.
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    size = os.path.getsize(db)
    assert size > 8192
    with open(db, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(OwnershipError) as exc:
        OwnershipStore(db)
    assert db in str(exc.value)


def test_damaged_inner_page_is_found_at_open(db):
    store = OwnershipStore(db, limits=NO_LIMITS)
    for i in range(300):
        store.claim("host%d.example.com" % i, K1)
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:  # overwrite the b-tree page header of page 4
        f.seek(3 * page_size)
        f.write(b"\xff" * 64)
    with pytest.raises(OwnershipError) as exc:
        OwnershipStore(db)
    assert db in str(exc.value) and ("corrupt" in str(exc.value)
                                     or "malformed" in str(exc.value))


def test_foreign_sqlite_database_is_refused(db):
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE something_else (x)")
    conn.commit()
    conn.close()
    with pytest.raises(OwnershipError, match="not a Shroud ownership database"):
        OwnershipStore(db)


def test_full_database_refuses_writes_and_keeps_previous_data(db):
    # The size cap stands in for a full disk: sqlite raises the same SQLITE_FULL
    # ("database or disk is full") either way.
    store = OwnershipStore(db, max_size_bytes=64 * 1024, limits=NO_LIMITS)
    store.claim("kept.example.com", K1)
    store.block_key(K3, actor="admin")
    with pytest.raises(OwnershipError) as exc:
        for i in range(10000):
            store.claim("filler-%05d-%s.example.com" % (i, "x" * 40), K2)
    assert "full" in str(exc.value) and db in str(exc.value)
    # The failed write changed nothing, and new binds are refused with a clear code.
    policy = OwnershipPolicy(store)
    assert policy.decide("kept.example.com", K1).allowed
    refused = policy.decide("brand-new-%s.example.com" % ("y" * 40), K2)
    assert not refused.allowed and refused.code == REASON_INTERNAL and "full" in refused.reason
    count = len(store.owners(limit=100000))
    store.close()

    store = OwnershipStore(db, limits=NO_LIMITS)  # restarted (default cap): all committed is there
    assert store.owner("kept.example.com").key == K1
    assert store.is_blocked(key=K3)
    assert len(store.owners(limit=100000)) == count
    assert store.claim("after.example.com", K2)[1]  # room again with the bigger cap
    store.close()


@pytest.fixture
def short_busy_timeout(monkeypatch):
    """Stores opened from now on wait 0.1 s, not the full 5 s, for another writer's lock."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT", 0.1)


@contextlib.contextmanager
def _write_lock_held(db):
    """A second process holds the file's write lock: our writes fail with OperationalError
    (after the busy timeout) until the block ends."""
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_sqlite_operational_error_on_write_becomes_ownership_error(db, short_busy_timeout):
    store = OwnershipStore(db)
    store.claim("a.example.com", K1)
    with _write_lock_held(db), pytest.raises(OwnershipError, match="locked"):
        store.claim("b.example.com", K1)
    assert store.owner("b.example.com") is None and store.owner("a.example.com").key == K1
    store.close()


# --- blocks and audit -----------------------------------------------------------------------
def test_blocked_name_and_key_are_refused_persisted_and_audited(reopen):
    store = reopen()
    policy = OwnershipPolicy(store)
    assert policy.decide("evil.example.com", K1).allowed
    assert store.block_hostname("Evil.example.com", actor="alice", detail="phishing")
    assert not store.block_hostname("evil.example.com", actor="alice")  # already blocked
    assert store.block_hostname("*.bad.example.org", actor="alice")
    assert store.block_key(K2, actor="bob", detail="abuse")
    store.close()

    store = reopen()
    policy = OwnershipPolicy(store)
    # Blocks persist; refusing a blocked bind is the bind decision's rule
    # (lib/proxy/bindpolicy.py, tests/test_proxy_core.py), not the ownership policy's.
    blocks = store.blocks()
    assert blocks.covering("evil.example.com") == "evil.example.com"
    assert blocks.covering("x.y.bad.example.org") == "*.bad.example.org"
    assert blocks.covering("fine.example.com") is None
    assert blocks.has_key(K2) and not blocks.has_key(K1) and not blocks.has_key(None)
    assert store.is_blocked(hostname="evil.example.com")
    assert store.is_blocked(key=K2) and not store.is_blocked(key=K1)
    assert not store.is_blocked(hostname="good.example.com", key=K1)
    assert [b.target for b in store.blocked_hostnames()] == ["*.bad.example.org",
                                                             "evil.example.com"]
    assert store.blocked_keys()[0].actor == "bob"

    assert store.unblock_hostname("evil.example.com", actor="carol")
    assert not store.unblock_hostname("evil.example.com", actor="carol")
    assert store.unblock_key(K2, actor="carol", detail="appeal")
    assert store.blocks().covering("evil.example.com") is None
    assert not store.blocks().has_key(K2)
    assert policy.decide("evil.example.com", K1).allowed
    assert policy.decide("fine.example.com", K2).allowed

    log = store.audit_log(limit=10)
    assert [(e.actor, e.action, e.target) for e in log] == [
        ("carol", "unblock-key", K2),
        ("carol", "unblock-hostname", "evil.example.com"),
        ("bob", "block-key", K2),
        ("alice", "block-hostname", "*.bad.example.org"),
        ("alice", "block-hostname", "evil.example.com"),
    ]
    assert log[-1].detail == "phishing" and log[0].detail == "appeal"
    assert store.audit_log(limit=2) == log[:2]


def test_operator_assign_and_release(store):
    policy = OwnershipPolicy(store, tofu=False)
    store.assign("shop.example.com", K1, actor="admin", detail="ticket 42")
    assert policy.decide("shop.example.com", K1).method == "operator"
    refused = policy.decide("shop.example.com", K2)
    assert not refused.allowed and refused.code == REASON_NOT_OWNER
    assert not policy.decide("other.example.com", K1).allowed  # tofu off
    assert store.release("shop.example.com", actor="admin")
    assert store.owner("shop.example.com") is None
    assert [e.action for e in store.audit_log()] == ["release", "assign"]


def test_audit_log_is_trimmed(store, monkeypatch):
    import lib.proxy.store.base as base
    monkeypatch.setattr(base, "AUDIT_KEEP", 5)
    for i in range(12):
        store.audit("t", "act", "target%d" % i)
    entries = store.audit_log(limit=100)
    assert [e.target for e in entries] == ["target%d" % i for i in range(11, 6, -1)]


# --- allow-list -----------------------------------------------------------------------------
def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    # mtime granularity differs between file systems: move it on explicitly.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_allowlist_exact_wildcard_any_and_reload(tmp_path, store):
    path = str(tmp_path / "allow.txt")
    _write(path, "# operator's list\n"
                 "app.example.com   %s %s   # two keys\n"
                 "*.example.com     %s\n"
                 "open.example.net  *\n"
                 "tcp:2222          %s\n" % (K1, K2.upper(), K3, K1))
    policy = OwnershipPolicy(store, allowlist_path=path)
    assert policy.decide("app.example.com", K1).method == "allowlist"
    assert policy.decide("app.example.com", K2).allowed
    listed_elsewhere = policy.decide("app.example.com", K3)  # exact entry wins over wildcard
    assert not listed_elsewhere.allowed and listed_elsewhere.code == REASON_NOT_ALLOWED
    assert policy.decide("deep.sub.example.com", K3).allowed
    assert policy.decide("*.sub.example.com", K3).allowed  # wildcard bind under the wildcard
    assert not policy.decide("other.example.com", K1).allowed
    unsigned = policy.decide("app.example.com", None)
    assert not unsigned.allowed and unsigned.code == REASON_SIGNATURE_REQUIRED
    assert policy.decide("open.example.net", None).allowed
    assert policy.decide("open.example.net", K2).allowed
    assert policy.decide("tcp:2222", K1).allowed and not policy.decide("tcp:2222", K2).allowed
    # An allow-list grant is recorded as such.
    assert store.owner("app.example.com").method == "allowlist"

    _write(path, "other.example.com %s\n" % K1)
    assert policy.decide("other.example.com", K1).allowed
    # *.example.com is no longer listed: K3 is refused for a name the list granted before.
    assert policy.decide("deep.sub.example.com", K3).method == "tofu"
    # app.example.com is no longer listed: its recorded owner (K2, bound last) keeps it.
    assert not policy.decide("app.example.com", K1).allowed
    _write(path, "broken line without key\n")
    assert policy.decide("other.example.com", K1).allowed  # bad edit: previous list kept


def test_allowlist_listed_name_overrides_tofu_owner_and_audits(tmp_path, store):
    policy = OwnershipPolicy(store)
    assert policy.decide("team.example.com", K1).method == "tofu"
    path = str(tmp_path / "allow.txt")
    _write(path, "team.example.com %s\n" % K2)
    policy = OwnershipPolicy(store, allowlist_path=path)
    assert policy.decide("team.example.com", K2).allowed
    assert not policy.decide("team.example.com", K1).allowed
    assert store.owner("team.example.com").key == K2
    entry = store.audit_log(1)[0]
    assert entry.action == "owner-change" and K1 in entry.detail and K2 in entry.detail


@pytest.mark.parametrize("text, message", [
    ("app.example.com\n", "line 1"),
    ("ok.example.com %s\nbad..name %s\n" % ("a" * 64, "a" * 64), "line 2"),
    ("app.example.com deadbeef\n", "not a key fingerprint"),
])
def test_allowlist_errors_name_file_and_line(tmp_path, text, message):
    path = str(tmp_path / "allow.txt")
    _write(path, text)
    with pytest.raises(OwnershipError) as exc:
        AllowList(path)
    assert path in str(exc.value) and message in str(exc.value)
    with pytest.raises(OwnershipError, match="cannot read"):
        AllowList(str(tmp_path / "missing.txt"))


# --- unsigned binds -------------------------------------------------------------------------
def test_unsigned_binds_only_for_allow_unsigned_patterns(store):
    policy = OwnershipPolicy(store, allow_unsigned={"legacy.example.com", "*.old.example.org"})
    assert policy.decide("legacy.example.com", None).method == "unsigned"
    assert policy.decide("a.b.old.example.org", None).allowed
    refused = policy.decide("new.example.com", None)
    assert not refused.allowed and refused.code == REASON_SIGNATURE_REQUIRED
    assert store.owners() == []  # unsigned binds own nothing
    bad = policy.decide("bad..name", K1)
    assert not bad.allowed and bad.code == REASON_INVALID_HOSTNAME


def test_tofu_never_grants_wildcards_and_wildcard_owner_covers_names(store):
    policy = OwnershipPolicy(store)
    wildcard = policy.decide("*.example.com", K1)
    assert not wildcard.allowed and "wildcard" in wildcard.reason
    store.assign("*.example.com", K1, actor="admin")
    assert policy.decide("*.example.com", K1).allowed
    assert policy.decide("www.example.com", K1).allowed
    covered = policy.decide("api.example.com", K2)
    assert not covered.allowed and "through *.example.com" in covered.reason


# --- DNS TXT --------------------------------------------------------------------------------
def test_dns_txt_vouches_for_keys(dns_server, store):
    dns = dns_server
    dns.add("_shroud.app.example.com", "TXT", "shroud-key=" + K1)
    dns.add("_shroud.app.example.com", "TXT", K2.upper())  # bare fingerprint, any case
    dns.add("_shroud.app.example.com", "TXT", "v=spf1 -all")  # unrelated record
    dns.add("_shroud.example.org", "TXT", "shroud-key=" + K3)
    policy = OwnershipPolicy(store, dns_resolver=dns.address)
    assert policy.decide("app.example.com", K1).method == "dns"
    assert policy.decide("app.example.com", K2).method == "dns"
    refused = policy.decide("app.example.com", K3)
    assert not refused.allowed and refused.code == REASON_NOT_OWNER
    assert "_shroud.app.example.com" in refused.reason
    # Wildcard binds look at _shroud.<base domain>.
    assert policy.decide("*.example.org", K3).method == "dns"
    assert not policy.decide("*.example.org", K1).allowed
    # No TXT at all: falls through to first use.
    assert policy.decide("plain.example.com", K3).method == "tofu"
    assert dns.count("_shroud.example.org") == 1  # second decision came from the cache


def test_dns_overrides_earlier_tofu_owner_and_audits(dns_server, store):
    policy = OwnershipPolicy(store, dns_resolver=dns_server.address, dns_cache_ttl=0.0)
    assert policy.decide("blog.example.com", K1).method == "tofu"
    dns_server.add("_shroud.blog.example.com", "TXT", "shroud-key=" + K2)
    taken = policy.decide("blog.example.com", K2)
    assert taken.allowed and taken.method == "dns"
    assert not policy.decide("blog.example.com", K1).allowed
    owner = store.owner("blog.example.com")
    assert owner.key == K2 and owner.method == "dns"
    entry = store.audit_log(1)[0]
    assert (entry.actor, entry.action, entry.target) == ("dns", "owner-change",
                                                         "blog.example.com")
    assert K1 in entry.detail and K2 in entry.detail
    # The record is removed later: K2 stays the owner (stored), K1 stays refused.
    dns_server.remove("_shroud.blog.example.com")
    assert policy.decide("blog.example.com", K2).allowed
    assert not policy.decide("blog.example.com", K1).allowed


def test_dns_failure_keeps_existing_owner_but_grants_nothing_new(dns_server, store):
    policy = OwnershipPolicy(store, dns_resolver=dns_server.address, dns_timeout=0.5)
    assert policy.decide("kept.example.com", K1).allowed
    dns_server.fail("_shroud.kept.example.com", "SERVFAIL")
    dns_server.fail("_shroud.new.example.com", "SERVFAIL")
    policy = OwnershipPolicy(store, dns_resolver=dns_server.address, dns_timeout=0.5)
    assert policy.decide("kept.example.com", K1).allowed
    new = policy.decide("new.example.com", K1)
    assert not new.allowed and new.code == REASON_INTERNAL and "SERVFAIL" in new.reason
    assert store.owner("new.example.com") is None


def test_dns_cache_is_shared_by_a_bind_storm_and_bounded(dns_server, store):
    dns_server.add("_shroud.storm.example.com", "TXT", "shroud-key=" + K1)
    now = [0.0]
    policy = OwnershipPolicy(store, dns_resolver=dns_server.address, dns_cache_size=4,
                             clock=lambda: now[0])
    decisions = []
    threads = [threading.Thread(target=lambda: decisions.append(
        policy.decide("storm.example.com", K1))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(decisions) == 20 and all(d.allowed for d in decisions)
    assert dns_server.count("_shroud.storm.example.com") == 1
    now[0] += 61  # past the cache lifetime
    assert policy.decide("storm.example.com", K1).allowed
    assert dns_server.count("_shroud.storm.example.com") == 2
    for i in range(10):
        policy.decide("n%d.example.com" % i, K1)
    # Bounded at 4: the last four names are answered from the cache, the fifth is asked again.
    for i in (9, 8, 7, 6, 5):
        policy.decide("n%d.example.com" % i, K1)
    assert [dns_server.count("_shroud.n%d.example.com" % i) for i in (9, 8, 7, 6, 5)] == \
        [1, 1, 1, 1, 2]


def test_long_name_under_dns_policy_is_decided_not_crashed(tmp_path):
    from lib.proxy.ownership import OwnershipPolicy, OwnershipStore
    name = ".".join(["a" * 60] * 4)[:247].rstrip(".") + ".test"
    store = OwnershipStore(str(tmp_path / "o.sqlite3"))
    calls = []
    policy = OwnershipPolicy(store, dns_lookup=lambda q: calls.append(q) or [])
    d = policy.decide(name, "ab" * 32)
    assert d.allowed and d.method == "tofu" and calls == []


# --- the threaded store (the proxy's): a slow disk never stalls the event loop ---------------
SLOW_COMMIT = 0.5  # seconds an insert takes below (a stand-in for a slow fsync)


class _SlowInserts:
    """Every ownership insert takes SLOW_COMMIT seconds more, in whatever thread runs it (the
    store's trace callback, called as sqlite starts each statement, sleeps), and notes the event
    loop's tick count as it starts and ends (``during``: ticks while it ran)."""

    def __init__(self, store, ticks: list | None = None):
        self.ticks = ticks if ticks is not None else []
        self.started = threading.Event()
        self.during: list[int] = []
        store.set_trace_callback(self._statement)

    def _statement(self, sql: str) -> None:
        if not sql.lstrip().upper().startswith("INSERT INTO OWNERSHIP"):
            return
        before = len(self.ticks)
        self.started.set()
        time.sleep(SLOW_COMMIT)
        self.during.append(len(self.ticks) - before)


def _ticks_while(work, ticks: list) -> None:
    """Run ``work`` in a greenlet while another appends to ``ticks`` every 5 ms."""
    import gevent

    def tick():
        while True:
            gevent.sleep(0.005)
            ticks.append(1)

    ticker = gevent.spawn(tick)
    try:
        gevent.spawn(work).get(timeout=10)
    finally:
        ticker.kill()


@pytest.mark.parametrize("threaded", [True, False])
def test_threaded_store_writes_leave_the_event_loop_free(db, threaded):
    # Ordering, not speed: did the event loop tick while the slow insert ran?
    store = OwnershipStore(db, threaded=threaded)
    try:
        ticks: list = []
        slow = _SlowInserts(store, ticks)
        _ticks_while(lambda: store.claim("slow.example", K1), ticks)
        assert store.owner("slow.example").key == K1
        assert len(slow.during) == 1
        if threaded:
            assert slow.during[0] > 0  # the loop kept running meanwhile
        else:
            assert slow.during[0] == 0  # the unthreaded store blocks it
    finally:
        store.close()


def test_threaded_store_interrupted_caller_leaves_a_consistent_store(db, short_busy_timeout):
    import gevent

    store = OwnershipStore(db, threaded=True)
    try:
        slow = _SlowInserts(store)
        g = gevent.spawn(store.claim, "cut.example", K1)
        deadline = time.monotonic() + 10
        while not slow.started.is_set() and time.monotonic() < deadline:
            gevent.sleep(0.005)
        assert slow.started.is_set()  # the transaction is running in its thread
        g.kill()  # e.g. the tunnel's greenlet ended
        # The next user waits for that transaction; the claim committed whole.
        assert store.claim("cut.example", K2) == (store.owner("cut.example"), False)
        assert store.owner("cut.example").key == K1
        with _write_lock_held(db), pytest.raises(OwnershipError, match="locked"):
            store.claim("failed.example", K2)  # a transaction that fails in its thread
        assert store.claim("after.example", K2)[1] is True
    finally:
        store.close()


def test_threaded_store_serialises_concurrent_greenlets(db, short_busy_timeout):
    """Many greenlets writing at once (this test process is not monkey-patched, as an
    embedding may not be): every claim succeeds once, no transaction sees another's."""
    import gevent

    store = OwnershipStore(db, threaded=True)
    try:
        jobs = [gevent.spawn(store.claim, f"n{i}.example", K1 if i % 2 else K2)
                for i in range(100)]
        gevent.joinall(jobs, timeout=30, raise_error=True)
        assert all(job.value[1] is True for job in jobs)
        assert len(store.owners(limit=1000)) == 100
        # An error comes back to its caller, once, and the store goes on.
        with _write_lock_held(db), pytest.raises(OwnershipError, match="locked"):
            store.claim("failed.example", K1)
        assert store.claim("after.example", K1)[1] is True
    finally:
        store.close()
