"""lib.proxy.ownership's bind policy rule by rule, as a client and an operator see it: every
Decision compared whole (allowed, method, the reason the client reads, the wire code), the
allow-list file's format and bounds, the DNS TXT records and their cache, and the log lines an
operator reads. A real SQLite store in a temp dir with a settable clock; DNS answers come from
the policy's ``dns_lookup`` hook (tests/test_ownership.py asks a real resolver).

Written against the surviving mutants of ``./scripts/mutation.sh ownership`` (docs/MUTATION.md).
"""
from __future__ import annotations

import logging
import threading
import time

import pytest

from lib.net import dnsclient
from lib.protocol.messages import (REASON_BAD_REQUEST, REASON_INTERNAL, REASON_INVALID_HOSTNAME,
                                   REASON_LIMIT, REASON_NOT_ALLOWED, REASON_NOT_OWNER,
                                   REASON_SIGNATURE_REQUIRED, REASON_STORE_UNAVAILABLE)
from lib.proxy import ownership
from lib.proxy.ownership import (AllowList, ClaimLimits, Decision, OwnershipError,
                                 OwnershipPolicy, OwnershipStore, StoreUnavailable,
                                 canonical_name)
from lib.proxy.store.base import when

pytestmark = pytest.mark.timeout(60)

K1, K2, K3, K4 = ("a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32)
S1, S2, S3, S4 = (k[:16] for k in (K1, K2, K3, K4))  # short keys, as reasons show them
NO_LIMITS = ClaimLimits(max_names_per_key=0, claim_burst=0, claims_per_hour=0, expiry_days=0,
                        max_first_use_names=0)
T0 = 1_750_000_000.0


@pytest.fixture
def now():
    return [T0]


@pytest.fixture
def store(tmp_path, now):
    s = OwnershipStore(str(tmp_path / "owners.sqlite"), clock=lambda: now[0], limits=NO_LIMITS)
    yield s
    s.close()


def write(path, text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def touch_later(path, seconds: int = 1) -> None:
    """Move the file's mtime on: a file system's mtime granularity may hide a quick rewrite."""
    import os
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


class Txt:
    """A TXT zone for the policy's ``dns_lookup`` hook: ``zone[qname]`` is a list of strings
    or a DnsError to raise; every question is noted in ``asked``."""

    def __init__(self, zone=None):
        self.zone = dict(zone or {})
        self.asked: list[str] = []

    def __call__(self, qname):
        self.asked.append(qname)
        answer = self.zone.get(qname, [])
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


# --- input the client got wrong --------------------------------------------------------------
def test_bad_name_and_bad_key_are_refused_with_their_codes(store):
    policy = OwnershipPolicy(store)
    with pytest.raises(ValueError) as why:
        canonical_name("a..b")
    assert policy.decide("a..b", K1) == Decision(
        False, "invalid", "invalid name 'a..b': %s" % why.value, REASON_INVALID_HOSTNAME)
    assert policy.decide("app.example.com", "beef") == Decision(
        False, "invalid", "a key fingerprint is 64 hex digits", REASON_BAD_REQUEST)
    assert store.owners() == []
    # Upper-case hex is the same key.
    assert policy.decide("App.Example.com", K1.upper()).allowed
    assert store.owner("app.example.com").key == K1


# --- unsigned binds --------------------------------------------------------------------------
def test_unsigned_binds_allowed_only_where_listed(store):
    policy = OwnershipPolicy(store, allow_unsigned=["Legacy.Example.com", "*.old.example.org"])
    assert policy.decide("legacy.example.com") == Decision(
        True, "unsigned", "unsigned binds are allowed for legacy.example.com", "")
    assert policy.decide("a.b.old.example.org") == Decision(
        True, "unsigned", "unsigned binds are allowed for a.b.old.example.org", "")
    assert policy.decide("new.example.com") == Decision(
        False, "none", "new.example.com requires a signed bind: this proxy needs the client's "
        "identity key (use the Shroud client)", REASON_SIGNATURE_REQUIRED)
    assert store.owners() == []  # unsigned binds own nothing
    assert not OwnershipPolicy(store).decide("legacy.example.com").allowed  # the default: none


# --- trust on first use and stored owners ----------------------------------------------------
def test_first_use_then_owner_then_other_key_texts(store, now):
    policy = OwnershipPolicy(store)
    assert policy.decide("app.example.com", K1) == Decision(
        True, "tofu", "first use: app.example.com now belongs to key %s" % S1, "")
    now[0] += 3600
    assert policy.decide("app.example.com", K1) == Decision(
        True, "tofu", "app.example.com belongs to key %s since %s" % (S1, when(T0)), "")
    assert policy.decide("app.example.com", K2) == Decision(
        False, "tofu", "app.example.com belongs to key %s since %s" % (S1, when(T0)),
        REASON_NOT_OWNER)
    assert store.owner("app.example.com").last_bound == T0 + 3600  # the owner's bind touched it


def test_wildcard_owner_covers_names_and_tofu_never_grants_a_wildcard(store):
    policy = OwnershipPolicy(store)
    assert policy.decide("*.example.com", K1) == Decision(
        False, "none", "wildcard *.example.com needs an allow-list entry or a DNS TXT record "
        "_shroud.example.com naming key %s (first use never grants a wildcard)" % S1,
        REASON_NOT_ALLOWED)
    # A wildcard owned by DNS earlier (its record since removed): its owner keeps it...
    store.record("*.example.com", K1, "dns", actor="dns")
    assert policy.decide("*.example.com", K1) == Decision(
        True, "tofu", "*.example.com belongs to key %s since %s" % (S1, when(T0)), "")
    assert policy.decide("www.example.com", K1).allowed
    # ...any other key meets the wildcard's owner...
    assert policy.decide("api.example.com", K2) == Decision(
        False, "tofu", "api.example.com belongs to key %s since %s (through *.example.com)"
        % (S1, when(T0)), REASON_NOT_OWNER)
    # ...and even the owner gets no narrower wildcard by first use.
    narrower = policy.decide("*.sub.example.com", K1)
    assert not narrower.allowed and narrower.code == REASON_NOT_ALLOWED
    assert store.owner("*.sub.example.com") is None


def test_operator_assignment_texts_and_refresh(store, now):
    policy = OwnershipPolicy(store, tofu=False)
    store.assign("*.shop.example.com", K1, actor="admin")
    assert policy.decide("www.shop.example.com", K1) == Decision(
        True, "operator", "the operator assigned *.shop.example.com to key %s" % S1, "")
    assert policy.decide("www.shop.example.com", K2) == Decision(
        False, "operator", "www.shop.example.com belongs to key %s since %s "
        "(through *.shop.example.com)" % (S1, when(T0)), REASON_NOT_OWNER)
    now[0] += 120  # past the store's touch interval: the bind refreshes the assignment
    assert policy.decide("www.shop.example.com", K1).allowed
    assigned = store.owner("*.shop.example.com")
    assert (assigned.method, assigned.last_bound) == ("operator", T0 + 120)


def test_without_tofu_an_unlisted_name_is_refused_naming_where_to_vouch(store):
    policy = OwnershipPolicy(store, tofu=False)
    assert policy.decide("app.example.com", K1) == Decision(
        False, "none", "no allow-list entry or DNS TXT record _shroud.app.example.com lets key "
        "%s bind app.example.com" % S1, REASON_NOT_ALLOWED)
    # A port has no DNS name: only the allow-list can grant it.
    assert policy.decide("tcp:2222", K1) == Decision(
        False, "none", "no allow-list entry lets key %s bind tcp:2222" % S1, REASON_NOT_ALLOWED)
    assert store.owners() == []


def test_claim_limits_refuse_with_the_limit_code_and_pass_the_address(tmp_path):
    store = OwnershipStore(str(tmp_path / "o.sqlite"), limits=ClaimLimits(
        max_names_per_key=2, claim_burst=1, claims_per_hour=1.0, expiry_days=0))
    try:
        policy = OwnershipPolicy(store)
        assert policy.decide("a.example.com", K1, address="198.51.100.1").allowed
        rated = policy.decide("b.example.com", K2, address="198.51.100.1")
        assert (rated.allowed, rated.method, rated.code) == (False, "limit", REASON_LIMIT)
        assert rated.reason.startswith("too many new names from 198.51.100.1 (1 at once")
        assert policy.decide("b.example.com", K2, address="198.51.100.2").allowed
        assert policy.decide("c.example.com", K1).allowed  # no address: no per-address rate
        quota = policy.decide("d.example.com", K1)
        assert (quota.allowed, quota.method, quota.code) == (False, "limit", REASON_LIMIT)
        assert quota.reason.startswith("key %s already owns 2 names by first use" % S1)
        assert store.owner("d.example.com") is None
    finally:
        store.close()


def test_another_bind_winning_the_race_is_a_refusal(store, monkeypatch):
    """The name was free when the policy looked and taken (by another proxy of the fleet)
    before its claim: the claim reports the other owner, and the bind is refused."""
    policy = OwnershipPolicy(store)
    store.claim("race.example.com", K2)
    monkeypatch.setattr(store, "covering_owner", lambda name: None)  # the earlier look
    assert policy.decide("race.example.com", K1) == Decision(
        False, "tofu", "race.example.com belongs to key %s since %s" % (S2, when(T0)),
        REASON_NOT_OWNER)
    assert store.owner("race.example.com").key == K2


# --- a store that fails ----------------------------------------------------------------------
def test_store_failures_refuse_with_their_codes_and_are_logged(store, monkeypatch, caplog):
    policy = OwnershipPolicy(store)

    def unreachable(name):
        raise StoreUnavailable("database db.internal is down")
    monkeypatch.setattr(store, "covering_owner", unreachable)
    caplog.set_level(logging.INFO, logger="shroud.ownership")
    assert policy.decide("app.example.com", K1) == Decision(
        False, "error", "the proxy's ownership store is unavailable; try again shortly "
        "(database db.internal is down)", REASON_STORE_UNAVAILABLE)

    def broken(name):
        raise OwnershipError("disk on fire")
    monkeypatch.setattr(store, "covering_owner", broken)
    assert policy.decide("app.example.com", K1) == Decision(
        False, "error", "the proxy cannot check ownership of app.example.com right now: "
        "disk on fire", REASON_INTERNAL)
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("shroud.ownership", logging.WARNING,
         "bind of app.example.com refused: database db.internal is down"),
        ("shroud.ownership", logging.ERROR, "bind of app.example.com refused: disk on fire")]


def test_store_failure_does_not_refuse_what_the_allowlist_or_dns_grants(tmp_path, store,
                                                                       monkeypatch, caplog):
    path = write(tmp_path / "allow.txt", "app.example.com %s\n" % K1)
    policy = OwnershipPolicy(store, allowlist_path=path,
                             dns_lookup=Txt({"_shroud.dns.example.com": [K1]}))

    def full(*a, **kw):
        raise OwnershipError("database or disk is full")
    monkeypatch.setattr(store, "record", full)
    caplog.set_level(logging.ERROR, logger="shroud.ownership")
    assert policy.decide("app.example.com", K1).allowed
    assert policy.decide("dns.example.com", K1).allowed
    assert [r.getMessage() for r in caplog.records if r.name == "shroud.ownership"] == [
        "bind of app.example.com allowed by allowlist but not recorded: database or disk is "
        "full",
        "bind of dns.example.com allowed by dns but not recorded: database or disk is full"]


def test_first_use_log_lines_are_rate_limited_per_address(store, caplog):
    """A client's binds trigger these lines: one address gets PeerLog's 10 a minute however
    many keys it uses."""
    policy = OwnershipPolicy(store)
    caplog.set_level(logging.INFO, logger="shroud.ownership")
    keys = ["%064x" % (n + 1) for n in range(15)]
    for n, key in enumerate(keys):
        assert policy.decide("n%d.example.com" % n, key, address="203.0.113.7").allowed
    lines = [r.getMessage() for r in caplog.records if r.name == "shroud.ownership"]
    assert lines == ["n%d.example.com now owned by key %s (first use)" % (n, keys[n][:16])
                     for n in range(10)]
    # Another address has its own allowance; without an address the key is the client.
    assert policy.decide("other.example.com", K1, address="203.0.113.8").allowed
    assert policy.decide("keyed.example.com", K2).allowed
    lines = [r.getMessage() for r in caplog.records if r.name == "shroud.ownership"]
    assert lines[10:] == ["other.example.com now owned by key %s (first use)" % S1,
                          "keyed.example.com now owned by key %s (first use)" % S2]


def test_claim_refusals_are_logged_per_address(tmp_path, caplog):
    store = OwnershipStore(str(tmp_path / "o.sqlite"), limits=ClaimLimits(
        max_names_per_key=1, claim_burst=0, expiry_days=0))
    try:
        policy = OwnershipPolicy(store)
        assert policy.decide("a.example.com", K1, address="198.51.100.9").allowed
        caplog.set_level(logging.INFO, logger="shroud.ownership")
        for n in range(12):
            assert policy.decide("x%d.example.com" % n, K1, address="198.51.100.9").code \
                == REASON_LIMIT
        lines = [r.getMessage() for r in caplog.records if r.name == "shroud.ownership"]
        assert len(lines) == 9  # the address's first claim took one of its 10 lines
        assert lines[0].startswith("first use of x0.example.com by key %s refused: key %s "
                                   "already owns 1 names" % (S1, S1))
    finally:
        store.close()


# --- the allow-list file ---------------------------------------------------------------------
def test_allowlist_decisions_say_which_entry_decided(tmp_path, store):
    path = write(tmp_path / "allow.txt",
                 "# the operator's list\n"
                 "\n"
                 "App.Example.com  %s   # K2 is not listed: %s\n"
                 "app.example.com  %s\n"          # a second line for a name adds keys
                 "*.example.com    %s\n"
                 "open.example.net *\n"
                 "tcp:2222         %s\n" % (K1.upper(), K2, K3, K4, K1))
    policy = OwnershipPolicy(store, allowlist_path=path)
    where = "allow-list %s entry" % path
    assert policy.decide("app.example.com", K1) == Decision(
        True, "allowlist", "%s app.example.com lists key %s" % (where, S1), "")
    assert policy.decide("app.example.com", K3).allowed
    assert policy.decide("app.example.com", K2) == Decision(
        False, "allowlist", "app.example.com is on the allow-list for other keys, not %s" % S2,
        REASON_NOT_ALLOWED)
    assert policy.decide("app.example.com") == Decision(
        False, "allowlist", "app.example.com is on the allow-list for specific keys: bind with "
        "one of them (a signed bind)", REASON_SIGNATURE_REQUIRED)
    assert policy.decide("www.example.com", K4) == Decision(
        True, "allowlist", "%s *.example.com lists key %s" % (where, S4), "")
    assert policy.decide("open.example.net") == Decision(
        True, "allowlist", "%s open.example.net allows any key" % where, "")
    assert policy.decide("tcp:2222", K1).allowed and not policy.decide("tcp:2222", K4).allowed
    # An unsigned bind of an open entry owns nothing; a signed one is recorded.
    assert store.owner("open.example.net") is None
    assert policy.decide("open.example.net", K2).allowed
    assert (store.owner("open.example.net").key, store.owner("open.example.net").method) == \
        (K2, "allowlist")


def test_allowlist_grants_replace_an_owner_and_the_audit_says_which_entry(tmp_path, store):
    first_use = OwnershipPolicy(store)
    assert first_use.decide("team.example.com", K1).allowed
    assert first_use.decide("open.example.net", K1).allowed
    path = write(tmp_path / "allow.txt", "team.example.com %s\nopen.example.net *\n" % K2)
    policy = OwnershipPolicy(store, allowlist_path=path)
    assert policy.decide("team.example.com", K2).allowed
    assert policy.decide("open.example.net", K3).allowed
    team, opened = store.audit_log(2)[1], store.audit_log(2)[0]
    assert (team.actor, team.action, team.target) == ("allowlist", "owner-change",
                                                      "team.example.com")
    assert team.detail.endswith("(allowlist): listed in allow-list %s entry team.example.com"
                                % path)
    assert opened.detail.endswith("(allowlist): allow-list %s entry open.example.net allows "
                                  "any key" % path)


def test_allowlist_reload_and_bad_edits_are_logged(tmp_path, store, caplog):
    path = write(tmp_path / "allow.txt", "a.example.com %s\n" % K1)
    policy = OwnershipPolicy(store, allowlist_path=path, tofu=False)
    caplog.set_level(logging.INFO, logger="shroud.ownership")
    assert policy.decide("a.example.com", K1).allowed
    assert caplog.records == []  # unchanged: not re-read
    write(path, "b.example.com %s\nc.example.com *\n" % K1)
    touch_later(path)
    assert policy.decide("b.example.com", K1).allowed
    assert not policy.decide("a.example.com", K1).allowed
    write(path, "b.example.com\n")
    touch_later(path, 2)
    assert policy.decide("b.example.com", K1).allowed  # the last good list stays
    import os
    os.unlink(path)
    assert policy.decide("b.example.com", K1).allowed
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "shroud.ownership"]
    assert lines[0] == (logging.INFO, "allow-list %s reloaded: 2 names" % path)
    assert lines[1][0] == logging.ERROR and lines[1][1].endswith(
        "line 1: 'b.example.com' names no key (write 'hostname fingerprint...', or '*' for any "
        "key); keeping the previous allow-list")
    assert lines[2][0] == logging.ERROR and lines[2][1].startswith(
        "cannot read allow-list %s: " % path)
    assert lines[2][1].endswith("; keeping the previous allow-list")


@pytest.mark.parametrize("text, message", [
    ("app.example.com\n", "line 1: 'app.example.com' names no key (write 'hostname "
                          "fingerprint...', or '*' for any key)"),
    ("# x\nbad..name %s\n" % K1, "line 2: bad name 'bad..name': "),
    ("app.example.com %s deadbeef\n" % K1, "line 1: 'deadbeef' is not a key fingerprint (64 "
                                           "hex digits) or '*'"),
])
def test_allowlist_errors_name_the_file_the_line_and_the_fix(tmp_path, text, message):
    path = write(tmp_path / "allow.txt", text)
    with pytest.raises(OwnershipError) as exc:
        AllowList(path)
    assert str(exc.value).startswith("allow-list %s %s" % (path, message))


def test_allowlist_must_be_utf8_and_within_its_size_bound(tmp_path, monkeypatch):
    path = write(tmp_path / "allow.txt", b"caf\xe9.example.com *\n")
    with pytest.raises(OwnershipError) as exc:
        AllowList(path)
    assert str(exc.value) == "allow-list %s is not UTF-8" % path
    monkeypatch.setattr(ownership, "MAX_ALLOWLIST_SIZE", 100)
    line = b"a.example.com *\n"
    write(path, line + b"#" * (100 - len(line)))  # exactly at the bound: read
    assert AllowList(path).lookup("a.example.com") == ("a.example.com", frozenset({"*"}))
    write(path, line + b"#" * (101 - len(line)))
    with pytest.raises(OwnershipError) as exc:
        AllowList(path)
    assert str(exc.value) == "allow-list %s is larger than 100 bytes" % path


def test_allowlist_that_cannot_be_opened_or_parsed_names_itself(tmp_path):
    with pytest.raises(OwnershipError) as exc:
        AllowList(str(tmp_path))  # a directory: stat works, open does not
    assert str(exc.value).startswith("cannot read allow-list %s: [Errno 21] Is a directory"
                                     % tmp_path)
    with pytest.raises(OwnershipError) as exc:
        AllowList.parse(b"app.example.com\n")
    assert str(exc.value).startswith("allow-list <allow-list> line 1: ")
    with pytest.raises(OwnershipError, match="'deadbeef' is not a key fingerprint"):
        AllowList.parse(b"app.example.com * deadbeef\n")  # checked after a '*' too
    assert AllowList.parse(b"app.example.com * %s\n" % K1.encode()) == {
        "app.example.com": frozenset({"*", K1})}


def test_allowlist_lookup_is_most_specific_first(tmp_path):
    allow = AllowList(write(tmp_path / "a.txt", "*.example.com %s\n*.b.example.com %s\n"
                                                "c.b.example.com %s\n" % (K1, K2, K3)))
    assert allow.lookup("c.b.example.com") == ("c.b.example.com", frozenset({K3}))
    assert allow.lookup("d.b.example.com") == ("*.b.example.com", frozenset({K2}))
    assert allow.lookup("x.example.com") == ("*.example.com", frozenset({K1}))
    assert allow.lookup("example.org") is None


# --- DNS TXT ---------------------------------------------------------------------------------
def test_dns_decisions_texts_and_record_parsing(store):
    txt = Txt({"_shroud.app.example.com": [
        "  %s  " % K1.upper(),                      # a bare fingerprint, any case
        "v=spf1 SHROUD-KEY=%s -all" % K2.upper(),  # the labelled form among other tokens
        "shroud-key=deadbeef",                      # not a key
        "other=%s" % K3]})                          # another label
    policy = OwnershipPolicy(store, dns_lookup=txt)
    assert policy.decide("app.example.com", K1) == Decision(
        True, "dns", "_shroud.app.example.com vouches for key %s" % S1, "")
    assert policy.decide("app.example.com", K2).allowed
    assert policy.decide("app.example.com", K3) == Decision(
        False, "dns", "the DNS TXT record _shroud.app.example.com names other keys for "
        "app.example.com, not %s" % S3, REASON_NOT_OWNER)
    assert (store.owner("app.example.com").key, store.owner("app.example.com").method) == \
        (K2, "dns")
    entry = store.audit_log(1)[0]
    assert (entry.actor, entry.action) == ("dns", "owner-change")
    assert entry.detail.endswith("(dns): TXT _shroud.app.example.com names this key")


def test_dns_records_naming_no_key_fall_through_to_first_use(store):
    txt = Txt({"_shroud.app.example.com": ["v=spf1 -all", "shroud-key=", "deadbeef"]})
    policy = OwnershipPolicy(store, dns_lookup=txt)
    assert policy.decide("app.example.com", K3).method == "tofu"


def test_dns_names_asked_for_wildcards_ports_and_addresses(store):
    txt = Txt({"_shroud.example.org": [K1]})
    policy = OwnershipPolicy(store, dns_lookup=txt)
    assert policy.decide("*.example.org", K1).method == "dns"
    assert policy.decide("tcp:2222", K1).method == "tofu"
    assert policy.decide("192.0.2.1", K1).method == "tofu"
    assert policy.decide("[2001:db8::1]", K1).method == "tofu"
    assert txt.asked == ["_shroud.example.org"]


def test_dns_name_at_the_length_limit(store):
    """A qname of 253 characters is asked; a longer one cannot exist and is not."""
    txt = Txt()
    policy = OwnershipPolicy(store, dns_lookup=txt)
    def name_of(length, letter):
        label = letter * 63
        return ".".join([label, label, label, letter * (length - 3 * 64)])
    longest, one_more = name_of(245, "a"), name_of(246, "b")  # + "_shroud." = 253, 254
    assert (len(longest), len(one_more)) == (245, 246)
    assert policy.decide(longest, K1).allowed
    assert policy.decide(one_more, K1).allowed
    assert txt.asked == ["_shroud." + longest]


def test_dns_failure_refuses_new_names_and_keeps_owners(store):
    failure = dnsclient.DnsServerError("SERVFAIL for _shroud.x", name="x")
    txt = Txt({"_shroud.new.example.com": failure, "_shroud.kept.example.com": failure})
    store.claim("kept.example.com", K1)
    policy = OwnershipPolicy(store, dns_lookup=txt)
    assert policy.decide("new.example.com", K1) == Decision(
        False, "dns", "cannot check DNS for new.example.com (SERVFAIL for _shroud.x); try "
        "again later", REASON_INTERNAL)
    assert policy.decide("kept.example.com", K1).allowed
    assert not policy.decide("kept.example.com", K2).allowed
    assert store.owner("new.example.com") is None


def test_dns_failure_is_logged_and_cached_five_seconds(store, caplog):
    clock = [100.0]
    txt = Txt({"_shroud.new.example.com": dnsclient.DnsTimeout("no answer", name="x")})
    policy = OwnershipPolicy(store, dns_lookup=txt, clock=lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="shroud.ownership")
    assert not policy.decide("new.example.com", K1).allowed
    clock[0] = 104.9
    assert not policy.decide("new.example.com", K1).allowed
    assert len(txt.asked) == 1
    txt.zone["_shroud.new.example.com"] = []  # the zone is fixed
    clock[0] = 105.0  # DNS_ERROR_TTL later
    assert policy.decide("new.example.com", K1).allowed
    assert len(txt.asked) == 2
    assert [r.getMessage() for r in caplog.records if r.name == "shroud.ownership"] == [
        "DNS TXT lookup of _shroud.new.example.com failed: no answer"]


def test_dns_answers_are_cached_for_the_ttl(store):
    clock = [100.0]
    txt = Txt({"_shroud.app.example.com": [K1]})
    default = OwnershipPolicy(store, dns_lookup=txt, clock=lambda: clock[0])
    assert default.decide("app.example.com", K1).allowed
    clock[0] = 159.9
    assert default.decide("app.example.com", K1).allowed and len(txt.asked) == 1
    clock[0] = 160.0  # the default 60 s later
    assert default.decide("app.example.com", K1).allowed and len(txt.asked) == 2
    short = OwnershipPolicy(store, dns_lookup=txt, dns_cache_ttl=5.0, clock=lambda: clock[0])
    assert short.decide("app.example.com", K1).allowed and len(txt.asked) == 3
    clock[0] = 165.0
    assert short.decide("app.example.com", K1).allowed and len(txt.asked) == 4


def test_dns_cache_is_a_bounded_lru(store):
    txt = Txt()
    policy = OwnershipPolicy(store, dns_lookup=txt, dns_cache_size=2, tofu=False)
    for name in ("a", "b", "a", "c", "a", "b"):
        policy.decide(name + ".example.com", K1)
    # a b (a: cached, now newest) c (b goes) a (cached) b (asked again)
    assert txt.asked == ["_shroud.%s.example.com" % n for n in ("a", "b", "c", "b")]


def test_dns_cache_default_bound(store):
    txt = Txt()
    policy = OwnershipPolicy(store, dns_lookup=txt, tofu=False)
    for n in range(1025):
        policy.decide("n%d.example.com" % n, K1)
    policy.decide("n2.example.com", K1)  # still cached
    policy.decide("n0.example.com", K1)  # the oldest went at 1025
    assert len(txt.asked) == 1026 and txt.asked[-1] == "_shroud.n0.example.com"


def test_an_unexpected_lookup_error_is_raised_and_remembered_as_a_failure(store):
    def lookup(qname):
        raise RuntimeError("resolver bug")
    policy = OwnershipPolicy(store, dns_lookup=lookup)
    with pytest.raises(RuntimeError):
        policy.decide("app.example.com", K1)
    assert policy.decide("app.example.com", K1) == Decision(
        False, "dns", "cannot check DNS for app.example.com (DNS lookup of "
        "_shroud.app.example.com failed); try again later", REASON_INTERNAL)


def test_concurrent_binds_share_one_lookup(store):
    gate, entered, txt = threading.Event(), threading.Event(), Txt()

    def slow_lookup(qname):
        entered.set()
        gate.wait(10)
        return txt(qname) + [K1]
    policy = OwnershipPolicy(store, dns_lookup=slow_lookup)
    decisions = []
    leader = threading.Thread(target=lambda: decisions.append(
        policy.decide("app.example.com", K1)))
    leader.start()
    assert entered.wait(10)
    follower = threading.Thread(target=lambda: decisions.append(
        policy.decide("app.example.com", K1)))
    follower.start()
    # Only gives the follower time to queue behind the leader; either order passes.
    time.sleep(0.2)
    gate.set()
    for t in (leader, follower):
        t.join(10)
    assert [d.method for d in decisions] == ["dns", "dns"] and len(txt.asked) == 1


def test_a_follower_gives_up_after_the_leaders_timeout(store):
    """A lookup that hangs past its own timeout: the binds waiting on it are refused (DNS
    cannot be checked), after dns_timeout + 1 s, not sooner."""
    gate, entered = threading.Event(), threading.Event()

    def hung(qname):
        entered.set()
        gate.wait(30)
        return [K1]
    policy = OwnershipPolicy(store, dns_lookup=hung, dns_timeout=0.2)
    leader = threading.Thread(target=policy.decide, args=("app.example.com", K1))
    leader.start()
    try:
        assert entered.wait(10)
        start = time.monotonic()
        waited = policy.decide("app.example.com", K1)
        assert time.monotonic() - start >= 1.2 - 0.05  # not too early (no upper bound)
        assert waited == Decision(
            False, "dns", "cannot check DNS for app.example.com (DNS lookup of "
            "_shroud.app.example.com still in progress); try again later", REASON_INTERNAL)
    finally:
        gate.set()
        leader.join(10)
    assert policy.decide("app.example.com", K1).method == "dns"


def test_dns_resolver_address_and_timeout_reach_the_client(store, monkeypatch):
    asked = []

    def lookup_txt(qname, resolver, timeout):
        asked.append((qname, resolver, timeout))
        return [K1]
    monkeypatch.setattr(dnsclient, "lookup_txt", lookup_txt)
    policy = OwnershipPolicy(store, dns_resolver=["127.0.0.53", "5353"], dns_timeout=0.7)
    assert policy.decide("app.example.com", K1).method == "dns"
    assert asked == [("_shroud.app.example.com", ("127.0.0.53", 5353), 0.7)]
    hook = Txt({"_shroud.b.example.com": [K1]})  # dns_lookup replaces the resolver
    assert OwnershipPolicy(store, dns_resolver=("127.0.0.53", 53), dns_lookup=hook) \
        .decide("b.example.com", K1).method == "dns"
    assert hook.asked == ["_shroud.b.example.com"] and len(asked) == 1
    OwnershipPolicy(store, dns_resolver=("127.0.0.53", 53)).decide("d.example.com", K1)
    assert asked[-1] == ("_shroud.d.example.com", ("127.0.0.53", 53), 2.0)  # the default
    assert OwnershipPolicy(store).decide("c.example.com", K1).method == "tofu"  # no DNS
