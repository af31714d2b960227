"""The public proxy: tunnels from clients in, public connections routed to them.

Public API::

    config = ProxyConfig(tunnel_addr="0.0.0.0:4443", https_addr="0.0.0.0:443", ...)
    proxy = ProxyServer(config)
    proxy.start()            # binds every configured listener (returns at once)
    proxy.addresses          # {"tunnel": ("0.0.0.0", 4443), ...} as actually bound
    proxy.registry           # live state (lib.proxy.registry.Registry)
    proxy.stop()

Operator actions (the dashboard's), each audited in the ownership store::

    proxy.disconnect_tunnel(tunnel_id, actor, detail="") -> bool   # the client will reconnect
    proxy.block_hostname(name, actor, detail="") -> int   # live bindings dropped at once
    proxy.unblock_hostname(name, actor, detail="") -> bool
    proxy.block_key(key, actor, detail="") -> int         # that key's tunnels disconnected
    proxy.unblock_key(key, actor, detail="") -> bool

Flows (docs/PROTOCOL.md has the bytes):
- Tunnel: TLS handshake (deadline), muxado session as the listener, the first stream carries
  Auth/AuthResp (with a fresh nonce), each later client stream one Bind/BindResp. A bind is
  checked (signature over the nonce, ownership policy, blocks, limits) and registered.
- Public connection on the https listener: the ClientHello is peeked (never consumed) for SNI;
  on the http listener the request head for Host. The name's binding picks a tunnel, a stream
  is opened with StartProxy {Url, ClientAddr} at its head, the peeked bytes are replayed, and
  bytes are spliced both ways, half-close included. TLS is never decrypted.
- Raw TCP binds listen on the requested port (only ports the operator allows).

Every refusal is counted in the registry (by reason) and answered plainly: 404 / TLS
unrecognized_name for unknown names, 403 / access_denied for blocked names, 503 / internal_error
for limits, 502 for HTTP when the origin fails before its first byte.

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field

import gevent
import gevent.pool
import gevent.server

from lib.protocol import messages as msg
from lib.protocol import sniff
from lib.certs import cert_fingerprint, ensure_tunnel_cert, server_tls_context
from lib.errors import ErrorCode, MuxError, ShroudError
from lib.hostport import format_hostport, parse_hostport
from lib.identity import fingerprint as key_fingerprint, verify_bind
from lib.net.muxsession import MuxConfig, PeerLog, Session
from lib.net.sockets import set_nodelay
from lib.protocol.muxstate import WindowPool
from lib.net.tlstransport import TLSTransport
from lib.proxy.registry import ROUTE_BY_HOST, ROUTE_BY_SNI, Binding, Registry, Tunnel
from lib.net.splice import splice

log = logging.getLogger("shroud.proxy")

# TLS alerts we send on refusal (RFC 8446 6.2).
ALERT_ACCESS_DENIED = 49
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112

PROTOCOLS = ("tls", "https", "http", "tcp")
# Window above muxado's 64 KiB granted to visitors' streams, across all tunnels: 64 visitors
# reading at full speed (1 MiB windows) at once; past it streams keep what they have.
VISITOR_WINDOW_POOL = 64 * 1024 * 1024


def parse_addr(addr: str | None, default_host: str = "0.0.0.0", what: str = "a listen address",
               listen: bool = True) -> tuple[str, int] | None:
    """'HOST:PORT', ':PORT' or 'PORT' -> (host, port) by lib.hostport's rules; None stays None."""
    if addr is None or addr == "":
        return None
    return parse_hostport(str(addr), what=what, default_host=default_host,
                          port_zero=listen)


def parse_port_ranges(spec: str | None) -> frozenset[int]:
    """'20000-20100,22022' -> the set of ports."""
    ports: set[int] = set()
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if not (1 <= lo_i <= hi_i <= 65535):
            raise ValueError(f"bad port range {part!r}")
        ports.update(range(lo_i, hi_i + 1))
    return frozenset(ports)


@dataclass
class ProxyConfig:
    data_dir: str = "./proxy-data"
    tunnel_addr: str | None = "0.0.0.0:4443"
    https_addr: str | None = None
    http_addr: str | None = None
    admin_addr: str | None = "127.0.0.1:8080"
    cert: str | None = None
    key: str | None = None
    hostname: str = "shroud-proxy"  # the proxy's own name (tunnel certificate, dashboard)
    public_host: str = "127.0.0.1"  # host tcp binds are reported under (tcp://HOST:PORT)
    tcp_ports: frozenset[int] = frozenset()
    tcp_bind_host: str = "0.0.0.0"
    allowlist: str | None = None
    dns_resolver: str | None = None  # "HOST:PORT" for DNS TXT ownership proofs
    tofu: bool = True
    allow_unsigned: tuple[str, ...] = ()  # name patterns the original Go client may bind
    # Limits, each with a counter in the registry. Public connections: one greenlet and two
    # sockets each (~40 KiB): 20,000 is ~1 GiB, the most a small VM should hold.
    max_public_connections: int = 20000
    max_tunnels: int = 2000
    max_tunnels_per_key: int = 8  # 3 proxies' worth of clients, a few replicas each
    max_binds_per_tunnel: int = 256
    # Public connections carried by one tunnel at once. A closing stream holds its slot until
    # the client's FIN returns (0.2-1 s under load), so 1,000 busy visitors with churn need
    # ~1,300 slots (bench/load.py): 4096 leaves room; memory is bounded by windows.
    max_streams_per_tunnel: int = 4096
    # Bind requests per tunnel: a token bucket. A client binds all its names at once when it
    # connects (the burst: as many as it may hold) and rarely after (a refused name is retried
    # every 5 s at most); 5 a second sustained is far above that, yet a bind storm then costs
    # the ownership store at most 5 decisions a second per tunnel.
    bind_burst: int = 256
    bind_rate: float = 5.0
    # Go-vhost's 10 s to read a name; a ClientHello comes in one round trip, a head in a few.
    peek_timeout: float = 10.0
    handshake_timeout: float = 15.0  # TLS + Auth on a tunnel, over Tor's slower path
    control_timeout: float = 10.0  # one control message
    idle_timeout: float | None = 3600.0  # silent public connection
    # The tunnel session as the proxy runs it. Clients open only control streams (Auth, one per
    # Bind, handled one at a time) toward the proxy: a few at once, 64 KiB windows, small
    # backlog. The streams the proxy opens (visitors) keep the large windows.
    mux: MuxConfig = field(default_factory=lambda: proxy_mux_config())
    ownership: object | None = None  # an OwnershipPolicy; built from the fields above if None


def proxy_mux_config(**overrides) -> MuxConfig:
    """The proxy side's muxado limits (see ProxyConfig.mux). Visitors' streams start at 64 KiB
    windows and grow only while the visitor reads, within one budget for all tunnels
    (docs/OPERATIONS.md, "Memory per visitor")."""
    base = dict(grant_peer_streams=False, max_streams=32, accept_backlog=16, grow_windows=True,
                window_pool=WindowPool(VISITOR_WINDOW_POOL))
    base.update(overrides)
    return MuxConfig(**base)


class ProxyServer:
    def __init__(self, config: ProxyConfig):
        self.config = config
        self.registry = Registry()
        self.servers: dict[str, gevent.server.StreamServer] = {}
        self.tcp_servers: dict[int, gevent.server.StreamServer] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self._public_pool = gevent.pool.Pool(config.max_public_connections)
        self._tunnel_pool = gevent.pool.Pool(config.max_tunnels)
        self._peer_log = PeerLog()  # log lines a tunnel's peer triggers, per address
        self.policy = config.ownership if config.ownership is not None else self._make_policy()
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        if config.cert and config.key:
            self.cert_path, self.key_path = config.cert, config.key
        else:
            self.cert_path, self.key_path = ensure_tunnel_cert(config.data_dir, config.hostname)
        self.fingerprint = cert_fingerprint(self.cert_path)
        # What a signed bind on a tunnel of ours names (docs/PROTOCOL.md, "Proxy id").
        self.own_proxy_ids = frozenset({msg.proxy_id_for_fingerprint(self.fingerprint)})
        self._tls = server_tls_context(self.cert_path, self.key_path)
        self.started_at = time.time()

    def _make_policy(self):
        from lib.proxy.ownership import OwnershipPolicy, OwnershipStore
        c = self.config
        os.makedirs(c.data_dir, mode=0o700, exist_ok=True)
        # threaded: a write's fsync never stalls the event loop that serves every visitor
        store = OwnershipStore(os.path.join(c.data_dir, "ownership.sqlite3"), threaded=True)
        resolver = parse_addr(c.dns_resolver, "127.0.0.1", "--dns-resolver", listen=False)
        return OwnershipPolicy(store, allowlist_path=c.allowlist, dns_resolver=resolver,
                               tofu=c.tofu, allow_unsigned=set(c.allow_unsigned) or None)

    @property
    def store(self):
        return getattr(self.policy, "store", None)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        c = self.config
        plan = [("tunnel", c.tunnel_addr, self._handle_tunnel, self._tunnel_pool),
                ("https", c.https_addr, self._handle_https, self._public_pool),
                ("http", c.http_addr, self._handle_http, self._public_pool)]
        for name, addr, handler, pool in plan:
            bind = parse_addr(addr)
            if bind is None:
                continue
            server = gevent.server.StreamServer(bind, handler, spawn=pool, backlog=1024)
            server.start()
            self.servers[name] = server
            self.addresses[name] = server.address[:2]
            self.registry.listeners[name] = "%s:%d" % server.address[:2]
            log.info("%s listener on %s:%d", name, *server.address[:2])

    def add_listener(self, name: str, server) -> None:
        """Register a listener started elsewhere (the admin app) for the status views."""
        self.registry.listeners[name] = "%s:%d" % server.address[:2]

    def stop(self) -> None:
        for server in list(self.servers.values()) + list(self.tcp_servers.values()):
            server.stop(timeout=1)
        for tunnel in list(self.registry.tunnels.values()):
            tunnel.session.close(ErrorCode.NO_ERROR, "proxy shutting down")

    # --- operator actions -----------------------------------------------------------------

    def _require_store(self):
        if self.store is None:
            raise RuntimeError("this proxy has no ownership store: blocks cannot be kept")
        return self.store

    def disconnect_tunnel(self, tunnel_id: int, actor: str, detail: str = "") -> bool:
        """Close one tunnel now (GOAWAY); its client reconnects with backoff unless blocked."""
        tunnel = self.registry.tunnels.get(int(tunnel_id))
        if tunnel is None:
            return False
        names = ", ".join(sorted(b.name for b in tunnel.bindings)) or "no names"
        self.registry.remove_tunnel(tunnel)
        tunnel.session.close(ErrorCode.NO_ERROR, "disconnected by the operator")
        log.warning("tunnel %d from %s disconnected by %s", tunnel.id, tunnel.peer, actor)
        if self.store is not None:
            self.store.audit(actor, "disconnect-tunnel", f"tunnel {tunnel.id}",
                             f"peer {tunnel.peer}, key {(tunnel.key or 'unsigned')[:16]}"
                             f"{'' if tunnel.proven or tunnel.key is None else ' (unproven)'}, "
                             f"{names}" + (f": {detail}" if detail else ""))
        return True

    def block_hostname(self, name: str, actor: str, detail: str = "") -> int:
        """Block ``name`` (or a wildcard) durably and drop the live bindings it covers, so no
        new public connection is routed to them; returns how many were dropped."""
        from lib.proxy.ownership import canonical_name

        store = self._require_store()
        blocked = canonical_name(name)
        store.block_hostname(blocked, actor, detail)
        dropped = 0
        for binding in list(self.registry.bindings.values()):
            covered = binding.name == blocked or (
                blocked.startswith("*.") and binding.name.endswith(blocked[1:]))
            if covered:
                self.registry.unbind(binding)
                dropped += 1
        log.warning("%s blocked by %s (%d live binding(s) dropped)", blocked, actor, dropped)
        return dropped

    def unblock_hostname(self, name: str, actor: str, detail: str = "") -> bool:
        return self._require_store().unblock_hostname(name, actor, detail)

    def block_key(self, key: str, actor: str, detail: str = "") -> int:
        """Block a client key durably and disconnect its tunnels; returns how many."""
        store = self._require_store()
        store.block_key(key, actor, detail)
        key = key.lower()
        tunnels = [t for t in self.registry.tunnels.values() if t.key == key]
        for tunnel in tunnels:
            self.registry.remove_tunnel(tunnel)
            tunnel.session.close(ErrorCode.NO_ERROR, "key blocked by the operator")
        log.warning("key %s blocked by %s (%d tunnel(s) disconnected)", key[:16], actor,
                    len(tunnels))
        return len(tunnels)

    def unblock_key(self, key: str, actor: str, detail: str = "") -> bool:
        return self._require_store().unblock_key(key, actor, detail)

    # --- tunnels --------------------------------------------------------------------------

    def _handle_tunnel(self, sock, address) -> None:
        peer = "%s:%d" % address[:2]
        set_nodelay(sock)
        try:
            # One deadline for the whole handshake: a peer trickling a byte at a time must not
            # hold a tunnel slot for hours.
            with gevent.Timeout(self.config.handshake_timeout, TimeoutError):
                tls = TLSTransport.server(sock, self._tls, self.config.handshake_timeout)
        except (OSError, ValueError) as e:
            log.info("tunnel from %s: TLS handshake failed: %s", peer, e)
            self.registry.count_refusal("tunnel_handshake")
            sock.close()
            return
        self.serve_tunnel(tls, peer, transport_name="tls")

    def serve_tunnel(self, transport, peer: str, transport_name: str = "tls",
                     proxy_ids: frozenset[str] | None = None) -> None:
        """Run one tunnel (any socket-like transport: TLS socket, WebSocket) until it ends.

        ``proxy_ids``: what a signed bind on it may name as its proxy (lib.protocol.messages
        proxy_id_for_*); by default this proxy's tunnel certificate, which the client saw in
        a TLS handshake it made with us."""
        # Untrusted until Auth: the mux runs from the handshake, keyless (lib.protocol.muxstate)
        session = Session(transport, client=False, config=self.config.mux, name=f"tunnel {peer}",
                          trusted=False, log_limiter=self._peer_log, log_key=peer.rsplit(":", 1)[0])
        tunnel = None
        watchdog = None
        try:
            tunnel, nonce = self._authenticate(session, peer, transport_name)
            if tunnel is None:
                return
            session.trust()
            tunnel.proxy_ids = proxy_ids if proxy_ids is not None else self.own_proxy_ids
            # Auth's key is a claim until a signed bind proves it (docs/OPERATIONS.md).
            log.info("tunnel %d up from %s claiming key=%s (unproven)", tunnel.id, peer,
                     (tunnel.key or "unsigned")[:16])
            # A tunnel that binds nothing holds a slot for nothing: it gets the handshake's time.
            watchdog = gevent.spawn_later(self.config.handshake_timeout, self._drop_if_unbound,
                                          tunnel)
            bucket = TokenBucket(self.config.bind_burst, self.config.bind_rate)
            while not session.closed:
                try:
                    stream = session.accept()
                except MuxError:
                    break
                if not self._handle_bind_stream(tunnel, stream, nonce, bucket):
                    # A real client never sends a malformed control message: drop the tunnel.
                    session.close(ErrorCode.PROTOCOL_ERROR, "malformed control message")
                    break
        finally:
            if watchdog is not None:
                watchdog.kill(block=False)
            if tunnel is not None:
                self.registry.remove_tunnel(tunnel)
                log.info("tunnel %d from %s down: %s", tunnel.id, peer, session.end)
            session.close()
            self._count_session_end(session)

    def _count_session_end(self, session: Session) -> None:
        """Counters for what the mux layer cut off: refused streams, protocol violations."""
        if session.refused_streams:
            self.registry.count_refusal("streams_refused", n=session.refused_streams)
        end = session.end
        if end is not None and end.hostile:
            # provoked answers past the bucket, did not read them, frames before Auth
            self.registry.count_refusal("tunnel_hostile")
        elif end is not None and not end.remote and end.code != ErrorCode.NO_ERROR:
            # SYN flood, oversized or invalid frames, window overrun, malformed control message
            self.registry.count_refusal("tunnel_protocol_error")

    def _authenticate(self, session: Session, peer: str, transport_name: str):
        c = self.config
        try:
            with gevent.Timeout(c.handshake_timeout, TimeoutError):
                stream = session.accept(timeout=c.handshake_timeout)
                stream.settimeout(c.control_timeout)
                auth = msg.read_message(stream)
        except (MuxError, EOFError, msg.MessageError, TimeoutError) as e:
            log.info("tunnel from %s: no valid Auth: %s", peer, e)
            self.registry.count_refusal("tunnel_auth")
            return None, None
        with stream:
            if not isinstance(auth, msg.Auth) or msg.PROTOCOL_VERSION not in auth.version:
                self._auth_refuse(stream, "unsupported protocol version", peer)
                return None, None
            key = auth.public_key
            fp = key_fingerprint(key) if key else None
            version = msg.shroud_version(auth.extra)
            if key and version != msg.SHROUD_VERSION:
                self._auth_refuse(stream, f"Shroud protocol {version} is not spoken here (this "
                                          f"proxy speaks {msg.SHROUD_VERSION}): upgrade the "
                                          f"client", peer)
                return None, None
            if fp and self.store is not None and self.store.is_blocked(key=fp):
                self._auth_refuse(stream, f"key {fp[:16]} is blocked by the operator", peer)
                return None, None
            client_id = auth.client_id if _is_client_id(auth.client_id) else secrets.token_hex(16)
            if fp is None:
                # An unsigned (original Go) client replaces its stale tunnel at once, as
                # go-tunnel did. A keyed one does so on its first signed bind (_bind): the key
                # in Auth is only a claim until a signature proves it.
                self._replace_stale(client_id, None, keep=None)
            if fp and len(self.registry.tunnels_of_key(fp)) >= c.max_tunnels_per_key:
                self.registry.count_refusal("limit_tunnels_per_key")
                self._auth_refuse(stream, f"too many tunnels for this key "
                                          f"(limit {c.max_tunnels_per_key})", peer)
                return None, None
            nonce = os.urandom(msg.NONCE_SIZE)
            tunnel = self.registry.add_tunnel(session, peer, fp, client_id, transport_name)
            tunnel.key_b64 = base64.b64encode(key).decode("ascii") if key else None
            try:
                msg.write_message(stream, msg.AuthResp(version=msg.PROTOCOL_VERSION,
                                                       client_id=client_id,
                                                       extra=msg.auth_resp_extra(nonce)))
            except MuxError:
                self.registry.remove_tunnel(tunnel)
                return None, None
            stream.shutdown(socket.SHUT_WR)
        return tunnel, nonce

    def _replace_stale(self, client_id: str, key: str | None, keep: Tunnel | None) -> None:
        """A reconnecting client replaces its own stale tunnel at once."""
        for old in list(self.registry.tunnels.values()):
            if old is not keep and old.client_id == client_id and old.key == key:
                log.info("tunnel %d replaced by a reconnect of client %s", old.id, client_id)
                self.registry.remove_tunnel(old)
                old.session.close(ErrorCode.NO_ERROR, "replaced by a newer tunnel")

    def _drop_if_unbound(self, tunnel: Tunnel) -> None:
        if not tunnel.ever_bound and tunnel.alive:
            log.info("tunnel %d from %s bound nothing in %.0f s: dropped", tunnel.id,
                     tunnel.peer, self.config.handshake_timeout)
            self.registry.count_refusal("tunnel_unbound")
            tunnel.session.close(ErrorCode.NO_ERROR, "no bind")

    def _auth_refuse(self, stream, error: str, peer: str) -> None:
        log.warning("tunnel from %s refused: %s", peer, error)
        self.registry.count_refusal("tunnel_auth")
        try:
            msg.write_message(stream, msg.AuthResp(version=msg.PROTOCOL_VERSION, error=error))
        except MuxError:
            pass

    def _handle_bind_stream(self, tunnel: Tunnel, stream, nonce: bytes,
                            bucket: "TokenBucket | None" = None) -> bool:
        """Answer one Bind; False when the client sent something no real client sends."""
        stream.settimeout(self.config.control_timeout)
        with stream:
            try:
                bind = msg.read_message(stream)
            except msg.MessageError as e:
                log.warning("tunnel %d from %s: malformed control message: %s", tunnel.id,
                            tunnel.peer, e)
                self.registry.count_refusal("bad_bind")
                return False
            except (MuxError, EOFError) as e:
                log.info("tunnel %d: no control message: %s", tunnel.id, e)
                self.registry.count_refusal("bad_bind")
                return True
            if not isinstance(bind, msg.Bind):
                log.warning("tunnel %d from %s: %s where a Bind belongs", tunnel.id,
                            tunnel.peer, type(bind).__name__)
                self.registry.count_refusal("bad_bind")
                return False
            if bucket is not None and not bucket.take():
                resp = msg.BindResp(url="", protocol=bind.protocol, extra=msg.refusal_extra(
                    msg.REASON_LIMIT), error=f"too many bind requests (limit "
                    f"{self.config.bind_rate:g} a second after {self.config.bind_burst})")
                self.registry.count_refusal("limit_bind_rate")
                if self.registry.refusals["limit_bind_rate"] % 1000 == 1:
                    log.warning("tunnel %d from %s: bind rate limit", tunnel.id, tunnel.peer)
            else:
                resp = self._bind(tunnel, bind, nonce)
            try:
                msg.write_message(stream, resp)
                stream.shutdown(socket.SHUT_WR)
            except MuxError:
                pass
        return True

    def _bind(self, tunnel: Tunnel, bind: msg.Bind, nonce: bytes) -> msg.BindResp:
        c = self.config

        def refuse(reason_code: str, text: str, counter: str = "ownership") -> msg.BindResp:
            log.warning("tunnel %d bind %s %s refused: %s", tunnel.id, bind.protocol,
                        bind.hostname or bind.remote_port, text)
            self.registry.count_refusal(counter)
            return msg.BindResp(url="", protocol=bind.protocol, error=text,
                                extra=msg.refusal_extra(reason_code))

        protocol = bind.protocol
        if protocol not in PROTOCOLS:
            return refuse(msg.REASON_UNSUPPORTED_PROTOCOL, f"unsupported protocol {protocol!r}",
                          "bad_bind")
        if len(tunnel.bindings) >= c.max_binds_per_tunnel:
            return refuse(msg.REASON_LIMIT, f"too many names on one tunnel "
                                            f"(limit {c.max_binds_per_tunnel})", "limit_binds")
        if protocol == "tcp":
            port = bind.remote_port or 0
            if port not in c.tcp_ports:
                return refuse(msg.REASON_NOT_ALLOWED, f"tcp port {port} is not offered by "
                                                      f"this proxy", "not_allowed")
            name = f"tcp:{port}"
            url = f"tcp://{c.public_host}:{port}"
        else:
            try:
                name = sniff.normalize_hostname(bind.hostname, allow_wildcard=True)
            except ValueError as e:
                return refuse(msg.REASON_INVALID_HOSTNAME, f"invalid hostname: {e}", "bad_bind")
            url = f"{protocol}://{name}"
        # Signature over the nonce and this proxy's id: proves the tunnel holds the key it
        # claimed in Auth, and that the client meant this proxy. A proxy the client trusts
        # could otherwise relay our nonce to it and its signature back to us (DESIGN: the
        # proxy is not trusted with other proxies' names).
        if tunnel.key is not None:
            sig = (bind.extra or {}).get(msg.EXTRA_SIG) if isinstance(bind.extra, dict) else None
            try:
                to = bind.proxy_id
            except msg.MessageError as e:
                return refuse(msg.REASON_BAD_REQUEST, f"bind: {e}", "bad_bind")
            if sig and to is not None and to not in tunnel.proxy_ids:
                return refuse(msg.REASON_WRONG_PROXY,
                              f"bind was signed for another proxy ({to[:21]}...); a proxy "
                              f"between you and us may be relaying your binds", "wrong_proxy")
            if not sig or to is None or not verify_bind(
                    tunnel.key_b64, sig, msg.bind_signature_payload(nonce, to, protocol,
                                                                    bind.signed_name)):
                return refuse(msg.REASON_BAD_SIGNATURE, "bind signature missing or invalid")
        if self.store is not None and self.store.is_blocked(hostname=name):
            return refuse(msg.REASON_NOT_ALLOWED, f"{name} is blocked by the operator", "blocked")
        existing = self.registry.existing(protocol, name)
        if existing is not None and existing.tunnels:
            same_owner = existing.owner is not None and existing.owner == tunnel.key
            if not same_owner:
                return refuse(msg.REASON_NOT_OWNER, f"{name} is already bound by another "
                                                    f"{'key' if existing.owner else 'client'}")
        try:
            decision = self.policy.decide(name, tunnel.key)
        except Exception as e:  # a broken store must refuse, loudly, never allow
            log.exception("ownership check failed for %s", name)
            return refuse(msg.REASON_INTERNAL, f"ownership check failed: {e}", "ownership_error")
        if not decision.allowed:
            return refuse(decision.code, decision.reason,
                          "ownership_error" if decision.method == "error" else "ownership")
        if self.store is not None and self.store.is_blocked(hostname=name, key=tunnel.key):
            # Blocked while this bind waited on the store (an operator's block drops what is
            # bound, not what is still being decided).
            return refuse(msg.REASON_NOT_ALLOWED, f"{name} is blocked by the operator", "blocked")
        if protocol == "tcp" and not self._ensure_tcp_listener(bind.remote_port):
            return refuse(msg.REASON_INTERNAL, f"cannot listen on tcp port {bind.remote_port}",
                          "tcp_listen")
        self.registry.bind(tunnel, protocol, name, tunnel.key, decision.method, url)
        tunnel.ever_bound = True
        if tunnel.key is not None and not tunnel.proven:
            tunnel.proven = True  # the signature over our nonce proved the key
            log.info("tunnel %d proved key %s", tunnel.id, tunnel.key[:16])
            self._replace_stale(tunnel.client_id, tunnel.key, keep=tunnel)
        log.info("tunnel %d bound %s (%s)", tunnel.id, url, decision.method)
        return msg.BindResp(url=url, protocol=protocol)

    def _ensure_tcp_listener(self, port: int) -> bool:
        if port in self.tcp_servers:
            return True
        try:
            server = gevent.server.StreamServer((self.config.tcp_bind_host, port),
                                                self._handle_tcp, spawn=self._public_pool)
            server.start()
        except OSError as e:
            log.error("tcp listener on port %d failed: %s", port, e)
            return False
        self.tcp_servers[port] = server
        return True

    # --- public connections ---------------------------------------------------------------

    def _handle_https(self, sock, address) -> None:
        self._route(sock, address, "tls", sniff.sniff_tls_sni, ROUTE_BY_SNI)

    def _handle_http(self, sock, address) -> None:
        self._route(sock, address, "http", sniff.sniff_http_host, ROUTE_BY_HOST)

    def _handle_tcp(self, sock, address) -> None:
        port = sock.getsockname()[1]
        set_nodelay(sock)
        self.registry.connections += 1
        self._note_pool_full()
        binding = self.registry.bindings.get(("tcp", f"tcp:{port}"))
        if binding is None or not binding.tunnels:
            self.registry.count_refusal("unknown_name")
            sock.close()
            return
        self._forward(sock, address, binding, b"", None)

    def _route(self, sock, address, kind: str, sniffer, protocols) -> None:
        set_nodelay(sock)
        self.registry.connections += 1
        self._note_pool_full()
        try:
            name, peeked = peek_name(sock, sniffer, self.config.peek_timeout)
            if name is None:
                self.registry.count_refusal("closed_before_name")
                sock.close()
                return
        except PeekTimeout:
            self.registry.count_refusal("peek_timeout")
            self._refuse(sock, kind, 408, "Request Timeout", "No request arrived in time.\n",
                         None)
            return
        except sniff.SniffError as e:
            self.registry.count_refusal("bad_request")
            self._refuse(sock, kind, e.http_status or 400, "Bad Request", f"{e.reason}\n",
                         e.alert or sniff.ALERT_DECODE_ERROR, linger=True)
            return
        except OSError:
            sock.close()
            return
        if not name:
            self.registry.count_refusal("no_name")
            self._refuse(sock, kind, 400, "Bad Request", "No host name given.\n",
                         ALERT_UNRECOGNIZED_NAME)
            return
        store = self.store
        if store is not None and store.is_blocked(hostname=name):
            self.registry.count_refusal("blocked")
            self._refuse(sock, kind, 403, "Forbidden",
                         f"{name} is blocked by this proxy's operator.\n", ALERT_ACCESS_DENIED)
            return
        binding = self.registry.lookup(protocols, name)
        if binding is None:
            if kind == "http" and self.registry.lookup(ROUTE_BY_SNI, name) is not None:
                # Only TLS is bound: send visitors to https, as the original proxy did.
                _send_quietly(sock, _redirect_to_https(name, bytes(peeked)))
                sock.close()
                return
            self.registry.count_refusal("unknown_name")
            self._refuse(sock, kind, 404, "Not Found", f"No service is bound for {name}.\n",
                         ALERT_UNRECOGNIZED_NAME)
            return
        fallback = (sniff.http_error_response(502, "Bad Gateway",
                                              f"The origin of {name} is not reachable.\n")
                    if kind == "http" else None)
        self._forward(sock, address, binding, bytes(peeked), fallback, kind)

    def _forward(self, sock, address, binding: Binding, peeked: bytes, fallback: bytes | None,
                 kind: str = "tcp") -> None:
        registry = self.registry
        tunnel = binding.pick()
        if tunnel is None:
            registry.count_refusal("tunnel_lost", binding)
            self._refuse(sock, kind, 502, "Bad Gateway", "The tunnel is down.\n",
                         ALERT_INTERNAL_ERROR)
            return
        if tunnel.streams_open >= self.config.max_streams_per_tunnel:
            registry.count_refusal("limit_streams", binding)
            self._refuse(sock, kind, 503, "Service Unavailable", "Too many connections.\n",
                         ALERT_INTERNAL_ERROR)
            return
        client_addr = format_hostport(*address[:2])  # "[v6]:port", as Go's net.Addr writes it
        # Only a Shroud client (it has a key) is told the listener: go-tunnel's StartProxy has
        # exactly two fields, and the original client is checked byte for byte against it.
        public_addr = _public_addr(sock) if tunnel.key is not None else None
        stream = None
        try:
            stream = tunnel.session.open()
            stream.sendall(msg.encode(msg.StartProxy(url=binding.url, client_addr=client_addr,
                                                     public_addr=public_addr)) + peeked)
        except MuxError as e:
            registry.count_refusal("tunnel_lost", binding)
            log.info("stream to tunnel %d failed: %s", tunnel.id, e)
            if stream is not None:
                stream.reset(ErrorCode.CANCEL)  # free its slot and window now
            self._refuse(sock, kind, 502, "Bad Gateway", "The tunnel is down.\n",
                         ALERT_INTERNAL_ERROR)
            return
        binding.connections += 1
        tunnel.streams_open += 1
        tunnel.streams_total += 1
        registry.count_bytes(binding, tunnel, n_in=len(peeked))
        # Sizes and names only: the bytes themselves are never logged (docs/SECURITY.md).
        log.debug("%s %s from %s: tunnel %d stream %d", kind, binding.name, client_addr,
                  tunnel.id, stream.id)
        try:
            splice(sock, stream,
                   on_a_to_b=lambda n: registry.count_bytes(binding, tunnel, n_in=n),
                   on_b_to_a=lambda n: registry.count_bytes(binding, tunnel, n_out=n),
                   idle_timeout=self.config.idle_timeout, fallback_to_a=fallback)
        finally:
            tunnel.streams_open -= 1
            log.debug("tunnel %d stream %d for %s ended", tunnel.id, stream.id, binding.name)

    def _note_pool_full(self) -> None:
        # This connection took the last slot: the public listeners stop accepting until one
        # ends (the kernel's backlog holds the next ones). Tunnels have their own pool.
        if self._public_pool.full():
            self.registry.count_refusal("limit_public_connections")

    @staticmethod
    def _refuse(sock, kind: str, status: int, reason: str, body: str, alert: int | None,
                linger: bool = False) -> None:
        if kind == "http":
            _send_quietly(sock, sniff.http_error_response(status, reason, body))
        elif kind == "tls" and alert is not None:
            _send_quietly(sock, sniff.tls_alert(alert))
        if linger:
            _lingering_close(sock)  # the client may still be sending: let it read our answer
        else:
            try:
                sock.close()
            except OSError:
                pass


# A refused client may still be sending (an oversized head, say: only those refusals linger, an
# idle one would just hold its slot longer). Closing with its bytes unread
# makes the kernel answer with a reset, which can destroy our answer before the client reads it;
# so: FIN, then read and discard a little for a moment, as nginx's lingering_close does.
LINGER_SECONDS = 1.0
LINGER_BYTES = 256 * 1024


def _lingering_close(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_SECONDS)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` a second; injectable clock for tests."""

    __slots__ = ("burst", "rate", "tokens", "stamp", "clock")

    def __init__(self, burst: int, rate: float, clock=time.monotonic):
        self.burst, self.rate, self.clock = burst, rate, clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class PeekTimeout(ShroudError):
    """No name arrived within the peek deadline."""


def peek_name(sock, sniffer, timeout: float) -> tuple[str | None, bytes]:
    """Read a public connection's first bytes until ``sniffer`` finds its name; nothing read is
    lost: the bytes come back for replay. ``(None, peeked)`` when the peer closed first.

    :raises PeekTimeout: after ``timeout`` seconds in all (slow senders are cut here).
    :raises lib.protocol.sniff.SniffError: the bytes are not what the listener speaks, or too many
        (its ``peeked`` attribute holds what was read).
    """
    peeked = bytearray()
    try:
        with gevent.Timeout(timeout):
            while True:
                data = sock.recv(8192)
                if not data:
                    return None, bytes(peeked)
                peeked += data
                try:
                    name = sniffer(bytes(peeked))
                except sniff.SniffError as e:
                    e.peeked = bytes(peeked)  # for a caller that replays them elsewhere
                    raise
                if name is not None:
                    return name, bytes(peeked)
    except gevent.Timeout:
        raise PeekTimeout(f"no name within {timeout:g} s") from None


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.settimeout(2.0)
        sock.sendall(data)
    except OSError:
        pass


def _public_addr(sock) -> str | None:
    """The "ip:port" of the listener a public connection arrived on (StartProxy.PublicAddr)."""
    try:
        return format_hostport(*sock.getsockname()[:2])
    except (OSError, AttributeError, TypeError):  # a wrapped or already closed socket
        return None


def _redirect_to_https(name: str, head: bytes) -> bytes:
    try:
        target = head.split(b" ", 2)[1].decode("ascii")
    except (IndexError, UnicodeDecodeError):
        target = "/"
    if not target.startswith("/"):
        target = "/"
    location = f"https://{name}{target}"
    return (f"HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\nContent-Length: 0\r\n"
            f"Connection: close\r\n\r\n").encode("ascii", "replace")



def _is_client_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)

