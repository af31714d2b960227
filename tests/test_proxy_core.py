"""The proxy core's decisions, in-process and without the network.

- lib/proxy/bindpolicy.py: every rule of the bind decision (its answers and their order),
  with real signatures (lib.identity), the real Registry and the real OwnershipPolicy over a
  SQLite store in a temp dir.
- lib/proxy/tunnels.TunnelService.bind: the decision applied (registered, refused, counted;
  a block made while the bind waited on the store).
- lib/proxy/routing.PublicRouter: which tunnel a public connection for a name goes to (SNI,
  Host, wildcards, the http->https redirect, blocked, unknown, tunnel down, stream limit), and
  the answer a refused connection reads (over a socketpair).

Tunnels are registered with a stand-in session (the registry reads ``closed`` and
``heartbeat_rtt``); nothing here listens or dials.
"""
from __future__ import annotations

import dataclasses
import socket

import pytest

from lib.identity import Identity
from lib.protocol import messages as msg
from lib.protocol import sniff
from lib.proxy import bindpolicy as bp
from lib.proxy.ownership import Blocks, Decision, OwnershipPolicy, OwnershipStore
from lib.proxy.registry import ROUTE_BY_HOST, ROUTE_BY_SNI, Registry
from lib.proxy.routing import (ALERT_ACCESS_DENIED, ALERT_INTERNAL_ERROR,
                               ALERT_UNRECOGNIZED_NAME, FORWARD, REDIRECT, REFUSE, PublicRouter)
from lib.proxy.server import ProxyConfig
from lib.proxy.tunnels import TunnelService

pytestmark = pytest.mark.timeout(60)

CLIENT, OTHER = Identity.generate(), Identity.generate()
NONCE = b"\x07" * msg.NONCE_SIZE
OUR_ID = msg.proxy_id_for_fingerprint("ab" * 32)
THEIR_ID = msg.proxy_id_for_fingerprint("cd" * 32)
RULES = bp.BindRules(max_binds_per_tunnel=3, tcp_ports=frozenset({2222}),
                     public_host="proxy.test")
NO_BLOCKS = Blocks()


class FakeSession:
    def __init__(self):
        self.closed = False
        self.heartbeat_rtt = None
        self.close_reason = None

    def close(self, code=0, reason=""):
        self.closed = True
        self.close_reason = reason


def signed_bind(protocol: str, name: str = "", port: int | None = None, ident=CLIENT,
                to: str = OUR_ID, nonce: bytes = NONCE, signed_name: str | None = None):
    """A Bind as the Shroud client sends it, signed for ``to`` over ``nonce``."""
    if signed_name is None:
        signed_name = str(port or 0) if protocol == "tcp" else name
    sig = ident.sign(msg.bind_signature_payload(nonce, to, protocol, signed_name))
    return msg.Bind(protocol, hostname=name, remote_port=port,
                    extra=msg.bind_extra(sig, to))


def request(protocol="tls", name="app.test", port=None, key=CLIENT.fingerprint,
            proof=bp.PROOF_VALID, held=0, proxy_id=OUR_ID):
    return bp.BindRequest(protocol, name, port or 0, key, proof, held, proxy_id)


@pytest.fixture
def registry():
    return Registry()


@pytest.fixture
def store(tmp_path):
    s = OwnershipStore(str(tmp_path / "ownership.sqlite3"))
    yield s
    s.close()


def tunnel_of(registry, ident=CLIENT, proxy_ids=frozenset({OUR_ID})):
    t = registry.add_tunnel(FakeSession(), "10.0.0.1:5000",
                            ident.fingerprint if ident else None, "c" * 32)
    t.key_b64 = ident.public_key_b64 if ident else None
    t.proxy_ids = proxy_ids
    return t


def bound(registry, names, key=CLIENT.fingerprint, protocol="tls"):
    t = registry.add_tunnel(FakeSession(), "10.0.0.2:5000", key, "d" * 32)
    for n in names:
        registry.bind(t, protocol, n, key, "tofu", f"{protocol}://{n}")
    return t


# --- the signature --------------------------------------------------------------------------
def test_check_proof_every_outcome():
    key = CLIENT.public_key_b64
    ours = frozenset({OUR_ID})
    assert bp.check_proof(None, NONCE, msg.Bind("tls", hostname="a.test"), ours) \
        == bp.PROOF_UNSIGNED
    assert bp.check_proof(key, NONCE, signed_bind("tls", "a.test"), ours) == bp.PROOF_VALID
    assert bp.check_proof(key, NONCE, signed_bind("tcp", port=2222), ours) == bp.PROOF_VALID
    # signed for another proxy (a relay passing our nonce on): wrong-proxy, not bad-signature
    assert bp.check_proof(key, NONCE, signed_bind("tls", "a.test", to=THEIR_ID), ours) \
        == bp.PROOF_WRONG_PROXY
    malformed = msg.Bind("tls", hostname="a.test", extra={msg.EXTRA_SIG: "x", "to": "nope"})
    assert bp.check_proof(key, NONCE, malformed, ours) == bp.PROOF_MALFORMED
    invalid = [msg.Bind("tls", hostname="a.test"),                      # no signature
               signed_bind("tls", "a.test", ident=OTHER),               # another key signed
               signed_bind("tls", "a.test", nonce=b"\x08" * msg.NONCE_SIZE),  # old session
               signed_bind("tls", "a.test", signed_name="b.test"),      # another name
               dataclasses.replace(signed_bind("http", "a.test"), protocol="tls")]  # protocol
    for bind in invalid:
        assert bp.check_proof(key, NONCE, bind, ours) == bp.PROOF_INVALID, bind


def test_check_proof_odd_extras_are_invalid():
    """Extra that is not a JSON object, or a signature naming no proxy id: invalid, no crash."""
    key = CLIENT.public_key_b64
    ours = frozenset({OUR_ID})
    for extra in (["sig"], "sig", 7):
        assert bp.check_proof(key, NONCE, msg.Bind("tls", hostname="a.test", extra=extra),
                              ours) == bp.PROOF_INVALID, extra
    no_to = signed_bind("tls", "a.test")
    no_to.extra = {msg.EXTRA_SIG: no_to.extra[msg.EXTRA_SIG]}
    assert bp.check_proof(key, NONCE, no_to, ours) == bp.PROOF_INVALID


def test_bind_request_reads_the_bind():
    """Every field BindRequest.of takes from the Bind, exactly; a malformed proxy id is kept
    as the note the client reads, with no proxy id."""
    of = bp.BindRequest.of
    key = CLIENT.fingerprint
    assert of(signed_bind("tls", "App.test", to=THEIR_ID), key=key, proof=bp.PROOF_WRONG_PROXY,
              bindings_held=2) == ("tls", "App.test", 0, key, bp.PROOF_WRONG_PROXY, 2,
                                   THEIR_ID, "")
    assert of(msg.Bind("tcp", remote_port=2222), key=None, proof=bp.PROOF_UNSIGNED,
              bindings_held=0) == ("tcp", "", 2222, None, bp.PROOF_UNSIGNED, 0, "", "")
    malformed = msg.Bind("tls", hostname="a.test", extra={msg.EXTRA_SIG: "x", "to": "nope"})
    assert of(malformed, key=key, proof=bp.PROOF_MALFORMED, bindings_held=1) == (
        "tls", "a.test", 0, key, bp.PROOF_MALFORMED, 1, "", "Extra.to: malformed proxy id 'nope'")


# --- the bind decision: each rule -----------------------------------------------------------
REFUSALS = [  # (request, blocks, the REASON_* answered, the refusal counter)
    (request(protocol="ftp"), NO_BLOCKS, msg.REASON_UNSUPPORTED_PROTOCOL, "bad_bind"),
    (request(held=3), NO_BLOCKS, msg.REASON_LIMIT, "limit_binds"),
    (request(protocol="tcp", port=2223), NO_BLOCKS, msg.REASON_NOT_ALLOWED, "not_allowed"),
    (request(name="bad..name"), NO_BLOCKS, msg.REASON_INVALID_HOSTNAME, "bad_bind"),
    (request(proof=bp.PROOF_MALFORMED), NO_BLOCKS, msg.REASON_BAD_REQUEST, "bad_bind"),
    (request(proof=bp.PROOF_WRONG_PROXY, proxy_id=THEIR_ID), NO_BLOCKS,
     msg.REASON_WRONG_PROXY, "wrong_proxy"),
    (request(proof=bp.PROOF_INVALID), NO_BLOCKS, msg.REASON_BAD_SIGNATURE, "ownership"),
    (request(), Blocks(names=frozenset({"app.test"})), msg.REASON_NOT_ALLOWED, "blocked"),
    (request(name="x.y.app.test"), Blocks(names=frozenset({"*.app.test"})),
     msg.REASON_NOT_ALLOWED, "blocked"),
    (request(protocol="tcp", port=2222), Blocks(names=frozenset({"tcp:2222"})),
     msg.REASON_NOT_ALLOWED, "blocked"),
    (request(), Blocks(keys=frozenset({CLIENT.fingerprint})), msg.REASON_NOT_ALLOWED,
     "blocked"),
]


@pytest.mark.parametrize("req,blocks,code,counter", REFUSALS)
def test_each_refusal_has_its_reason_and_counter(registry, req, blocks, code, counter):
    answer = bp.decide_bind(req, RULES, blocks, registry)
    assert answer.verdict == bp.REFUSE
    assert (answer.code, answer.counter) == (code, counter), answer
    assert answer.text


def refused(code, text, counter, name=""):
    return bp.BindAnswer(bp.REFUSE, name=name, code=code, text=text, counter=counter)


EXACT_REFUSALS = [  # (request, blocks, the whole answer: code, the text the client shows,
    # counter, and the name the refusal is about, "" before the name is known)
    (request(protocol="ftp"), NO_BLOCKS,
     refused(msg.REASON_UNSUPPORTED_PROTOCOL, "unsupported protocol 'ftp'", "bad_bind")),
    (request(held=3), NO_BLOCKS,
     refused(msg.REASON_LIMIT, "too many names on one tunnel (limit 3)", "limit_binds")),
    (request(protocol="tcp", port=2223), NO_BLOCKS,
     refused(msg.REASON_NOT_ALLOWED, "tcp port 2223 is not offered by this proxy",
             "not_allowed")),
    (request(name="a.localhost"), NO_BLOCKS,
     refused(msg.REASON_RESERVED, "a.localhost is reserved: it is a loopback name",
             "reserved_name", "a.localhost")),
    (request(proof=bp.PROOF_MALFORMED), NO_BLOCKS,
     refused(msg.REASON_BAD_REQUEST, "bind: malformed proxy id", "bad_bind", "app.test")),
    (request(proof=bp.PROOF_MALFORMED)._replace(note="Extra.to: malformed proxy id 'x'"),
     NO_BLOCKS, refused(msg.REASON_BAD_REQUEST, "bind: Extra.to: malformed proxy id 'x'",
                        "bad_bind", "app.test")),
    (request(proof=bp.PROOF_WRONG_PROXY, proxy_id=THEIR_ID), NO_BLOCKS,
     refused(msg.REASON_WRONG_PROXY, f"bind was signed for another proxy ({THEIR_ID[:21]}...);"
             f" a proxy between you and us may be relaying your binds", "wrong_proxy",
             "app.test")),
    (request(proof=bp.PROOF_INVALID), NO_BLOCKS,
     refused(msg.REASON_BAD_SIGNATURE, "bind signature missing or invalid", "ownership",
             "app.test")),
    (request(), Blocks(names=frozenset({"app.test"})),
     refused(msg.REASON_NOT_ALLOWED, "app.test is blocked by the operator", "blocked",
             "app.test")),
    (request(name="x.app.test"), Blocks(names=frozenset({"*.app.test"})),
     refused(msg.REASON_NOT_ALLOWED, "x.app.test is blocked by the operator (*.app.test is "
             "blocked)", "blocked", "x.app.test")),
    (request(), Blocks(keys=frozenset({CLIENT.fingerprint})),
     refused(msg.REASON_NOT_ALLOWED, f"key {CLIENT.fingerprint[:16]} is blocked by the "
             f"operator", "blocked", "app.test")),
]


@pytest.mark.parametrize("req,blocks,answer", EXACT_REFUSALS)
def test_refusals_exactly(registry, req, blocks, answer):
    """The whole answer, text included: the text is what the client shows its user."""
    assert bp.decide_bind(req, RULES, blocks, registry) == answer


def test_owner_and_ownership_refusals_name_the_name(registry):
    bound(registry, ["theirs.test"], key=OTHER.fingerprint)
    assert bp.decide_bind(request(name="theirs.test"), RULES, NO_BLOCKS, registry) == refused(
        msg.REASON_NOT_OWNER, "theirs.test is already bound by another key", "ownership",
        "theirs.test")
    no = Decision(False, "tofu", "app.test belongs to key 0123", msg.REASON_NOT_OWNER)
    assert bp.decide_bind(request(), RULES, NO_BLOCKS, registry, ownership=no) == refused(
        msg.REASON_NOT_OWNER, "app.test belongs to key 0123", "ownership", "app.test")


def test_texts_name_the_cause(registry):
    covered = bp.decide_bind(request(name="x.app.test"), RULES,
                             Blocks(names=frozenset({"*.app.test"})), registry)
    assert "*.app.test is blocked" in covered.text
    relayed = bp.decide_bind(request(proof=bp.PROOF_WRONG_PROXY, proxy_id=THEIR_ID), RULES,
                             NO_BLOCKS, registry)
    assert THEIR_ID[:21] in relayed.text and "relaying" in relayed.text
    limit = bp.decide_bind(request(held=3), RULES, NO_BLOCKS, registry)
    assert "limit 3" in limit.text
    key = bp.decide_bind(request(), RULES, Blocks(keys=frozenset({CLIENT.fingerprint})),
                         registry)
    assert CLIENT.fingerprint[:16] in key.text


def test_rules_in_order(registry):
    """The first rule that speaks answers: a bind wrong in several ways gets the earliest."""
    everything = Blocks(names=frozenset({"app.test"}), keys=frozenset({CLIENT.fingerprint}))
    bound(registry, ["app.test"], key=OTHER.fingerprint)
    steps = [(request(protocol="ftp", held=3, proof=bp.PROOF_INVALID), "unsupported-protocol"),
             (request(held=3, proof=bp.PROOF_INVALID), "limit"),
             (request(name="bad..name", proof=bp.PROOF_INVALID), "invalid-hostname"),
             (request(proof=bp.PROOF_INVALID), "bad-signature"),
             (request(), "not-allowed")]
    for req, code in steps:
        assert bp.decide_bind(req, RULES, everything, registry).code == code, req
    # unblocked, the live binding of the other key answers
    assert bp.decide_bind(request(), RULES, NO_BLOCKS, registry).code == msg.REASON_NOT_OWNER


def test_names_and_urls_asked_of_the_ownership_policy(registry):
    tls = bp.decide_bind(request(name="App.Test."), RULES, NO_BLOCKS, registry)
    assert (tls.verdict, tls.name, tls.url) == (bp.ASK_OWNERSHIP, "app.test", "tls://app.test")
    wild = bp.decide_bind(request(protocol="http", name="*.app.test"), RULES, NO_BLOCKS,
                          registry)
    assert (wild.name, wild.url) == ("*.app.test", "http://*.app.test")
    tcp = bp.decide_bind(request(protocol="tcp", port=2222), RULES, NO_BLOCKS, registry)
    assert (tcp.verdict, tcp.name, tcp.url) == (bp.ASK_OWNERSHIP, "tcp:2222",
                                                "tcp://proxy.test:2222")
    unsigned = bp.decide_bind(request(key=None, proof=bp.PROOF_UNSIGNED), RULES, NO_BLOCKS,
                              registry)
    assert unsigned.verdict == bp.ASK_OWNERSHIP


def test_live_binding_owner(registry):
    bound(registry, ["mine.test"])
    bound(registry, ["theirs.test"], key=OTHER.fingerprint)
    bound(registry, ["legacy.test"], key=None)
    # the same key (another replica of the client) may add its tunnel to the name
    assert bp.decide_bind(request(name="mine.test"), RULES, NO_BLOCKS, registry).verdict \
        == bp.ASK_OWNERSHIP
    theirs = bp.decide_bind(request(name="theirs.test"), RULES, NO_BLOCKS, registry)
    assert theirs.code == msg.REASON_NOT_OWNER and "another key" in theirs.text
    # an unsigned binding is nobody's: a second unsigned client cannot join it
    legacy = bp.decide_bind(request(name="legacy.test", key=None, proof=bp.PROOF_UNSIGNED),
                            RULES, NO_BLOCKS, registry)
    assert legacy.code == msg.REASON_NOT_OWNER and "another client" in legacy.text
    # a binding of another protocol does not count
    assert bp.decide_bind(request(protocol="http", name="theirs.test"), RULES, NO_BLOCKS,
                          registry).verdict == bp.ASK_OWNERSHIP


def test_ownership_answer_decides_last(registry):
    req = request()
    allowed = Decision(True, "tofu", "first use", "")
    accept = bp.decide_bind(req, RULES, NO_BLOCKS, registry, ownership=allowed)
    assert accept.accepted and (accept.name, accept.url, accept.method) == (
        "app.test", "tls://app.test", "tofu")
    refused = bp.decide_bind(req, RULES, NO_BLOCKS, registry, ownership=Decision(
        False, "tofu", "app.test belongs to key 0123", msg.REASON_NOT_OWNER))
    assert (refused.code, refused.counter, refused.text) == (
        msg.REASON_NOT_OWNER, "ownership", "app.test belongs to key 0123")
    away = bp.decide_bind(req, RULES, NO_BLOCKS, registry, ownership=Decision(
        False, "error", "store unavailable", msg.REASON_STORE_UNAVAILABLE))
    assert (away.code, away.counter) == (msg.REASON_STORE_UNAVAILABLE, "store_unavailable")
    broken = bp.decide_bind(req, RULES, NO_BLOCKS, registry, ownership=Decision(
        False, "error", "database is full", msg.REASON_INTERNAL))
    assert (broken.code, broken.counter) == (msg.REASON_INTERNAL, "ownership_error")
    limited = bp.decide_bind(req, RULES, NO_BLOCKS, registry, ownership=Decision(
        False, "limit", "key already owns 100 names", msg.REASON_LIMIT))
    assert (limited.code, limited.counter) == (msg.REASON_LIMIT, "claim_limit")
    # blocks still win over an allowed answer (the second call, after the wait on the store)
    late = bp.decide_bind(req, RULES, Blocks(names=frozenset({"app.test"})), registry,
                          ownership=allowed)
    assert (late.verdict, late.counter) == (bp.REFUSE, "blocked")


# --- with the real ownership policy ---------------------------------------------------------
def decide_with(policy, req, registry, blocks=NO_BLOCKS):
    answer = bp.decide_bind(req, RULES, blocks, registry)
    if answer.verdict == bp.ASK_OWNERSHIP:
        decision = policy.decide(answer.name, req.key)
        answer = bp.decide_bind(req, RULES, blocks, registry, ownership=decision)
    return answer


def test_with_policy_tofu_unsigned_and_allowlist(tmp_path, store, registry):
    allow = tmp_path / "allow.txt"
    allow.write_text(f"team.test {OTHER.fingerprint}\n")
    policy = OwnershipPolicy(store, allowlist_path=str(allow), allow_unsigned={"*.legacy.test"})
    first = decide_with(policy, request(name="mine.test"), registry)
    assert first.accepted and first.method == "tofu"
    other = decide_with(policy, request(name="mine.test", key=OTHER.fingerprint), registry)
    assert other.code == msg.REASON_NOT_OWNER and CLIENT.fingerprint[:16] in other.text
    unsigned = request(name="a.legacy.test", key=None, proof=bp.PROOF_UNSIGNED)
    assert decide_with(policy, unsigned, registry).method == "unsigned"
    needs_key = decide_with(policy, unsigned._replace(hostname="mine2.test"), registry)
    assert needs_key.code == msg.REASON_SIGNATURE_REQUIRED
    listed = decide_with(policy, request(name="team.test", key=OTHER.fingerprint), registry)
    assert listed.accepted and listed.method == "allowlist"
    not_listed = decide_with(policy, request(name="team.test"), registry)
    assert not_listed.code == msg.REASON_NOT_ALLOWED
    tcp = decide_with(policy, request(protocol="tcp", port=2222), registry)
    assert tcp.accepted and tcp.url == "tcp://proxy.test:2222"
    # a blocked key is refused before the policy runs: nothing is claimed for it
    blocked = decide_with(policy, request(name="fresh.test"), registry,
                          Blocks(keys=frozenset({CLIENT.fingerprint})))
    assert blocked.counter == "blocked" and store.owner("fresh.test") is None


# --- the decision applied: TunnelService.bind -----------------------------------------------
def service(registry, policy, can_listen: bool = True):
    """A TunnelService as ProxyServer wires it; ``opened`` lists the tcp ports it asked for."""
    c = ProxyConfig(data_dir="unused", max_binds_per_tunnel=3, tcp_ports=frozenset({2222}),
                    public_host="proxy.test")
    opened = []

    def open_tcp_port(port):
        opened.append(port)
        return can_listen

    s = TunnelService(c, registry, policy, None, frozenset({OUR_ID}), open_tcp_port)
    s.opened = opened
    return s


def test_bind_registers_proves_and_replaces_stale(store, registry):
    tunnels = service(registry, OwnershipPolicy(store))
    stale = tunnel_of(registry)
    stale.proven = True
    fresh = tunnel_of(registry)
    resp = tunnels.bind(fresh, signed_bind("https", "Shop.Test"), NONCE)
    assert (resp.error, resp.url) == ("", "https://shop.test")
    binding = registry.lookup(ROUTE_BY_SNI, "shop.test")
    assert binding.tunnels == [fresh] and binding.owner == CLIENT.fingerprint
    assert fresh.proven and fresh.ever_bound
    # the same client's older tunnel is replaced once the new one proved the key
    assert stale.id not in registry.tunnels and stale.session.closed
    tcp = tunnels.bind(fresh, signed_bind("tcp", port=2222), NONCE)
    assert tcp.url == "tcp://proxy.test:2222" and tunnels.opened == [2222]


def test_bind_refusals_are_answered_and_counted(store, registry):
    tunnels = service(registry, OwnershipPolicy(store), can_listen=False)
    t = tunnel_of(registry)
    malformed = tunnels.bind(t, msg.Bind("tls", hostname="a.test", extra={"to": "nope"}),
                             NONCE)
    assert malformed.reason == msg.REASON_BAD_REQUEST and "malformed proxy id" in malformed.error
    relayed = tunnels.bind(t, signed_bind("tls", "a.test", to=THEIR_ID), NONCE)
    assert relayed.reason == msg.REASON_WRONG_PROXY and relayed.url == ""
    forged = tunnels.bind(t, signed_bind("tls", "a.test", ident=OTHER), NONCE)
    assert forged.reason == msg.REASON_BAD_SIGNATURE
    no_port = tunnels.bind(t, signed_bind("tcp", port=2222), NONCE)
    assert no_port.reason == msg.REASON_INTERNAL and "2222" in no_port.error
    assert registry.refusals == {"bad_bind": 1, "wrong_proxy": 1, "ownership": 1,
                                 "tcp_listen": 1}
    assert not registry.bindings and not t.proven


def test_a_block_made_while_the_bind_waits_on_the_store_refuses_it(store, registry):
    policy = OwnershipPolicy(store)

    class BlockedMeanwhile:
        """The real policy; the operator blocks the name while it decides."""
        store = policy.store

        def decide(self, name, key=None, address=None):
            answer = policy.decide(name, key)
            store.block_hostname(name, "operator")
            return answer

    tunnels = service(registry, BlockedMeanwhile())
    resp = tunnels.bind(tunnel_of(registry), signed_bind("tls", "late.test"), NONCE)
    assert resp.reason == msg.REASON_NOT_ALLOWED and "blocked" in resp.error
    assert registry.lookup(ROUTE_BY_SNI, "late.test") is None
    assert registry.refusals == {"blocked": 1}


def test_a_policy_that_raises_refuses(store, registry):
    class Broken:
        store = None

        def decide(self, name, key=None, address=None):
            raise RuntimeError("disk on fire")

    tunnels = service(registry, Broken())
    resp = tunnels.bind(tunnel_of(registry), signed_bind("tls", "x.test"), NONCE)
    assert resp.reason == msg.REASON_INTERNAL and "disk on fire" in resp.error
    assert registry.refusals == {"ownership_error": 1} and not registry.bindings


# --- routing: the decision ------------------------------------------------------------------
def router(registry, blocks=Blocks, max_streams=4096):
    return PublicRouter(ProxyConfig(data_dir="unused", max_streams_per_tunnel=max_streams),
                        registry, blocks=blocks)


def test_route_by_sni_exact_and_wildcard(registry):
    exact = bound(registry, ["www.site.test"])
    wild = bound(registry, ["*.site.test"])
    r = router(registry)
    assert r.choose("tls", "www.site.test", ROUTE_BY_SNI)[:3] == (
        FORWARD, registry.bindings[("tls", "www.site.test")], exact)
    deep = r.choose("tls", "a.b.site.test", ROUTE_BY_SNI)
    assert deep.action == FORWARD and deep.tunnel is wild and deep.binding.name == "*.site.test"
    assert r.choose("tls", "site.test", ROUTE_BY_SNI).refusal.status == 404  # not under *.


def test_route_by_host_and_redirect_to_https(registry):
    web = bound(registry, ["web.test"], protocol="http")
    bound(registry, ["tls-only.test"], protocol="https")
    r = router(registry)
    assert r.choose("http", "web.test", ROUTE_BY_HOST).tunnel is web
    assert r.choose("http", "tls-only.test", ROUTE_BY_HOST).action == REDIRECT
    # an http binding never takes TLS
    assert r.choose("tls", "web.test", ROUTE_BY_SNI).refusal.counter == "unknown_name"


def test_route_refusals(registry, store):
    t = bound(registry, ["app.test", "busy.test"])
    store.block_hostname("*.blocked.test", "op")
    bound(registry, ["x.blocked.test"])
    r = router(registry, blocks=store.blocks)
    blocked = r.choose("tls", "x.blocked.test", ROUTE_BY_SNI)
    assert (blocked.action, blocked.refusal[:2], blocked.refusal.alert) == (
        REFUSE, ("blocked", 403), ALERT_ACCESS_DENIED)
    unknown = r.choose("http", "nobody.test", ROUTE_BY_HOST)
    assert (unknown.refusal.counter, unknown.refusal.status, unknown.refusal.alert) == (
        "unknown_name", 404, ALERT_UNRECOGNIZED_NAME)
    t.streams_open = 2
    full = router(registry, max_streams=2).choose("tls", "busy.test", ROUTE_BY_SNI)
    assert (full.refusal.counter, full.refusal.status, full.binding.name) == (
        "limit_streams", 503, "busy.test")
    t.session.closed = True
    down = r.choose("tls", "app.test", ROUTE_BY_SNI)
    assert (down.refusal.counter, down.refusal.status, down.refusal.alert) == (
        "tunnel_lost", 502, ALERT_INTERNAL_ERROR)


def test_route_picks_the_least_busy_live_tunnel(registry):
    a = bound(registry, ["app.test"])
    b = bound(registry, ["app.test"])
    a.streams_open, b.streams_open = 5, 1
    r = router(registry)
    assert [r.choose("tls", "app.test", ROUTE_BY_SNI).tunnel for _ in range(4)] == [b] * 4
    b.session.closed = True
    assert r.choose("tls", "app.test", ROUTE_BY_SNI).tunnel is a


# --- routing: what a refused visitor reads --------------------------------------------------
def route_http(r, head: bytes) -> bytes:
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(head)
        r.route(ours, ("192.0.2.1", 4000), "http", sniff.HTTPHostSniffer, ROUTE_BY_HOST)
        theirs.settimeout(5)
        answer = b""
        while chunk := theirs.recv(65536):
            answer += chunk
    return answer


def test_route_answers_over_a_socket(registry, store):
    bound(registry, ["tls-only.test"], protocol="https")
    store.block_hostname("bad.test", "op")
    r = router(registry, blocks=store.blocks)
    redirect = route_http(r, b"GET /path?q=1 HTTP/1.1\r\nHost: tls-only.test\r\n\r\n")
    assert redirect.startswith(b"HTTP/1.1 301 ")
    assert b"Location: https://tls-only.test/path?q=1\r\n" in redirect
    assert route_http(r, b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n").startswith(
        b"HTTP/1.0 404 ")
    assert route_http(r, b"GET / HTTP/1.1\r\nHost: bad.test\r\n\r\n").startswith(
        b"HTTP/1.0 403 ")
    assert registry.refusals == {"unknown_name": 1, "blocked": 1}
    assert registry.connections == 3


def test_parts_are_public_on_the_server(tmp_path):
    """Other modules reach the parts through public attributes (lib/proxy/oneport.py calls
    proxy.router.route and proxy.tunnels.serve; the dashboard proxy.actions)."""
    from lib.proxy.server import ProxyServer

    proxy = ProxyServer(ProxyConfig(data_dir=str(tmp_path / "d"), tunnel_addr=None,
                                    admin_addr=None))
    try:
        assert callable(proxy.router.route) and callable(proxy.tunnels.serve)
        assert callable(proxy.actions.block_hostname)
        proxy.registry.add_listener("one-port", ("127.0.0.1", 5000, 0, 0))
        assert proxy.registry.snapshot()["listeners"] == {"one-port": "127.0.0.1:5000"}
        assert proxy.blocks() == Blocks()
    finally:
        proxy.store.close()
