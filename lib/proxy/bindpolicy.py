"""The bind decision: may this tunnel bind this name here? Pure code: no sockets, no gevent, no
store. Its inputs are values (the request, the operator's blocks, the registry's live
bindings, the ownership policy's answer) and its answer is a value; lib/proxy/tunnels.py does
the I/O around it.

Public API::

    rules = BindRules(max_binds_per_tunnel=256, tcp_ports=frozenset({2222}), public_host="h")
    proof = check_proof(key_b64, nonce, bind, proxy_ids)   # PROOF_*: the signature, verified
    request = BindRequest.of(bind, key=fingerprint_or_None, proof=proof, bindings_held=3)
    answer = decide_bind(request, rules, blocks, registry)    # ownership not asked yet...
    if answer.verdict == ASK_OWNERSHIP:                       # ...every other rule passed:
        decision = policy.decide(answer.name, request.key)    # the store and DNS (I/O)
        answer = decide_bind(request, rules, store.blocks(), registry, ownership=decision)
    answer.verdict: ACCEPT | REFUSE | ASK_OWNERSHIP
    answer.name, .url, .method (ACCEPT: the ownership rule that allowed it)
    answer.code (REFUSE: a lib.protocol.messages REASON_* code), .text, .counter (the
        registry's refusal counter)

The second call checks everything again with the blocks and bindings as they are after the
wait on the store: an operator's block made meanwhile refuses the bind (a block drops what is
bound, not what is still being decided).

The rules, in order; the first that speaks answers (``blocks`` is a lib.proxy.ownership.Blocks,
``registry`` a lib.proxy.registry.Registry)::

    the bind / the tunnel                        we answer (REASON_*)    counter
    protocol not tls/https/http/tcp              unsupported-protocol    bad_bind
    tunnel holds max_binds_per_tunnel names      limit                   limit_binds
    tcp port the operator does not offer         not-allowed             not_allowed
    host name invalid                            invalid-hostname        bad_bind
    name reserved (lib/proxy/names.py)           reserved                reserved_name
    keyed tunnel, bind's proxy id malformed      bad-request             bad_bind
    keyed tunnel, signed for another proxy       wrong-proxy             wrong_proxy
    keyed tunnel, signature missing or invalid   bad-signature           ownership
    name (or a wildcard covering it) blocked     not-allowed             blocked
    key blocked                                  not-allowed             blocked
    name bound live by another key (or unsigned) not-owner               ownership
    no ownership answer yet                      ASK_OWNERSHIP           -
    ownership policy refuses                     its code                ownership(_error)
    otherwise                                    ACCEPT, url             -

Why the signature (docs/SECURITY.md): it is over the nonce we sent in AuthResp and this proxy's
id, so it proves the tunnel holds the key it claimed in Auth and that the client meant this
proxy. A proxy the client trusts could otherwise relay our nonce to it and its signature back
to us. Unsigned tunnels (the original Go client: no key) skip it; the ownership policy decides
what they may bind (its allow_unsigned patterns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from lib.identity import verify_bind
from lib.protocol import messages as msg
from lib.protocol.sniff import normalize_hostname
from lib.proxy.names import ReservedNames

PROTOCOLS = ("tls", "https", "http", "tcp")

# What check_proof found (keyed tunnels only).
PROOF_UNSIGNED = "unsigned"      # the tunnel has no key: nothing to prove
PROOF_VALID = "valid"            # signed by the tunnel's key, over our nonce and our id
PROOF_MALFORMED = "malformed"    # the bind's proxy id cannot be read
PROOF_WRONG_PROXY = "wrong-proxy"  # a valid-looking signature for another proxy's id
PROOF_INVALID = "invalid"        # signature missing, or it does not verify

ACCEPT = "accept"
REFUSE = "refuse"
ASK_OWNERSHIP = "ask-ownership"


@dataclass(frozen=True)
class BindRules:
    """The operator's settings a bind is checked against (lib.proxy.server.ProxyConfig's)."""
    max_binds_per_tunnel: int = 256
    tcp_ports: frozenset = frozenset()
    public_host: str = "127.0.0.1"  # tcp binds are reported as tcp://public_host:PORT
    # Names no tunnel may bind (the proxy's own, addresses, localhost, .onion): whoever holds
    # the proxy's name passes ACME for it (docs/SECURITY.md, "Names reserved to the proxy").
    reserved: ReservedNames = field(default_factory=ReservedNames)


class BindRequest(NamedTuple):
    protocol: str
    hostname: str          # as the client sent it (not normalised)
    remote_port: int       # tcp binds
    key: str | None        # the tunnel's key fingerprint; None: an unsigned tunnel
    proof: str             # PROOF_*
    bindings_held: int     # names the tunnel holds already
    proxy_id: str = ""     # what the bind was signed for (for the wrong-proxy text)
    note: str = ""         # why the proxy id could not be read (PROOF_MALFORMED)

    @classmethod
    def of(cls, bind: msg.Bind, key: str | None, proof: str, bindings_held: int,
           ) -> "BindRequest":
        proxy_id, note = "", ""
        try:
            proxy_id = bind.proxy_id or ""
        except msg.MessageError as e:
            note = str(e)
        return cls(bind.protocol, bind.hostname or "", bind.remote_port or 0, key, proof,
                   bindings_held, proxy_id, note)


class BindAnswer(NamedTuple):
    verdict: str           # ACCEPT | REFUSE | ASK_OWNERSHIP
    name: str = ""         # the registry's name: normalised host, "*.base" or "tcp:PORT"
    url: str = ""
    method: str = ""       # ACCEPT: the ownership rule ("tofu", "allowlist", ...)
    code: str = ""         # REFUSE: REASON_*
    text: str = ""         # REFUSE: the error the client shows its user
    counter: str = ""      # REFUSE: the registry's refusal counter

    @property
    def accepted(self) -> bool:
        return self.verdict == ACCEPT


def _refuse(code: str, text: str, counter: str = "ownership", name: str = "") -> BindAnswer:
    return BindAnswer(REFUSE, name=name, code=code, text=text, counter=counter)


def check_proof(key_b64: str | None, nonce: bytes, bind: msg.Bind,
                proxy_ids: frozenset) -> str:
    """Verify a bind's signature (see the module docstring); a PROOF_* value.

    :param key_b64: the tunnel's Ed25519 public key from Auth (base64), None if unsigned.
    :param proxy_ids: the ids a signed bind on this tunnel may name (lib.protocol.messages
        proxy_id_for_*).
    """
    if key_b64 is None:
        return PROOF_UNSIGNED
    sig = (bind.extra or {}).get(msg.EXTRA_SIG) if isinstance(bind.extra, dict) else None
    try:
        to = bind.proxy_id
    except msg.MessageError:
        return PROOF_MALFORMED
    if sig and to is not None and to not in proxy_ids:
        return PROOF_WRONG_PROXY
    if not sig or to is None or not verify_bind(
            key_b64, sig, msg.bind_signature_payload(nonce, to, bind.protocol,
                                                     bind.signed_name)):
        return PROOF_INVALID
    return PROOF_VALID


def name_and_url(request: BindRequest, rules: BindRules) -> BindAnswer:
    """The registry name and public URL of a bind (verdict ACCEPT), or its refusal."""
    protocol = request.protocol
    if protocol not in PROTOCOLS:
        return _refuse(msg.REASON_UNSUPPORTED_PROTOCOL, f"unsupported protocol {protocol!r}",
                       "bad_bind")
    if request.bindings_held >= rules.max_binds_per_tunnel:
        return _refuse(msg.REASON_LIMIT, f"too many names on one tunnel "
                                         f"(limit {rules.max_binds_per_tunnel})", "limit_binds")
    if protocol == "tcp":
        port = request.remote_port
        if port not in rules.tcp_ports:
            return _refuse(msg.REASON_NOT_ALLOWED, f"tcp port {port} is not offered by "
                                                   f"this proxy", "not_allowed")
        return BindAnswer(ACCEPT, name=f"tcp:{port}", url=f"tcp://{rules.public_host}:{port}")
    try:
        name = normalize_hostname(request.hostname, allow_wildcard=True)
    except ValueError as e:
        return _refuse(msg.REASON_INVALID_HOSTNAME, f"invalid hostname: {e}", "bad_bind")
    why = rules.reserved.reason(name)
    if why is not None:
        # Before any ownership rule: nothing is recorded for a reserved name.
        return _refuse(msg.REASON_RESERVED, f"{name} is reserved: it is {why}",
                       "reserved_name", name)
    return BindAnswer(ACCEPT, name=name, url=f"{protocol}://{name}")


def _proof_refusal(request: BindRequest) -> BindAnswer | None:
    proof = request.proof
    if proof in (PROOF_UNSIGNED, PROOF_VALID):
        return None
    if proof == PROOF_MALFORMED:
        return _refuse(msg.REASON_BAD_REQUEST, f"bind: {request.note or 'malformed proxy id'}",
                       "bad_bind")
    if proof == PROOF_WRONG_PROXY:
        return _refuse(msg.REASON_WRONG_PROXY,
                       f"bind was signed for another proxy ({request.proxy_id[:21]}...); a "
                       f"proxy between you and us may be relaying your binds", "wrong_proxy")
    return _refuse(msg.REASON_BAD_SIGNATURE, "bind signature missing or invalid")


def _ownership_counter(decision) -> str:
    """The refusal counter for an ownership policy's "no" (docs/OPERATIONS.md, Counters)."""
    if decision.code == msg.REASON_STORE_UNAVAILABLE:
        return "store_unavailable"  # the database is away; the client asks again soon
    return {"error": "ownership_error", "limit": "claim_limit"}.get(decision.method,
                                                                   "ownership")


def decide_bind(request: BindRequest, rules: BindRules, blocks, registry,
                ownership=None) -> BindAnswer:
    """The answer to one bind (see the module docstring for the rules and their order).

    :param blocks: the operator's blocks (lib.proxy.ownership.Blocks), as of now.
    :param registry: the live bindings (lib.proxy.registry.Registry); only read.
    :param ownership: the ownership policy's Decision for this name and key, or None when it
        was not asked yet (the answer is then ASK_OWNERSHIP if every other rule passes).
    """
    named = name_and_url(request, rules)
    if not named.accepted:
        return named
    name, url = named.name, named.url
    refused = _proof_refusal(request)
    if refused is not None:
        return refused._replace(name=name)
    covering = blocks.covering(name)
    if covering is not None:
        through = "" if covering == name else f" ({covering} is blocked)"
        return _refuse(msg.REASON_NOT_ALLOWED, f"{name} is blocked by the operator{through}",
                       "blocked", name)
    if blocks.has_key(request.key):
        return _refuse(msg.REASON_NOT_ALLOWED, f"key {request.key[:16]} is blocked by the "
                                               f"operator", "blocked", name)
    existing = registry.existing(request.protocol, name)
    if existing is not None and existing.tunnels:
        if existing.owner is None or existing.owner != request.key:
            return _refuse(msg.REASON_NOT_OWNER, f"{name} is already bound by another "
                                                 f"{'key' if existing.owner else 'client'}",
                           name=name)
    if ownership is None:
        return BindAnswer(ASK_OWNERSHIP, name=name, url=url)
    if not ownership.allowed:
        return _refuse(ownership.code, ownership.reason, _ownership_counter(ownership), name)
    return BindAnswer(ACCEPT, name=name, url=url, method=ownership.method)
