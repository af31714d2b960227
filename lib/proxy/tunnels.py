"""Tunnels from clients: authentication, binds, and each tunnel's life on the proxy.

Public API::

    tunnels = TunnelService(config, registry, policy, tls_context, own_proxy_ids,
                            open_tcp_port=callable(port) -> bool)
    tunnels.handle_connection(sock, address)   # the tunnel listener's handler (TLS first)
    tunnels.serve(transport, peer, transport_name="tls", proxy_ids=None)   # until it ends
    tunnels.authenticate(session, peer, transport_name) -> (Tunnel, nonce) | (None, None)
    tunnels.answer_bind_stream(tunnel, stream, nonce, bucket=None) -> bool
    tunnels.bind(tunnel, bind, nonce) -> BindResp          # decide (bindpolicy), then register
    tunnels.close_all(reason)

A tunnel is a muxado session (lib.net.muxsession) whose first stream carries Auth/AuthResp
(with a fresh nonce) and each later client stream one Bind/BindResp (docs/PROTOCOL.md). Which
binds are accepted is lib/proxy/bindpolicy.py's decision; this module feeds it (the signature,
the store's blocks, the ownership policy's answer) and acts on its answer.

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import socket

import gevent

from lib.errors import ErrorCode, MuxError
from lib.hostport import AddressError, client_network, format_hostport, parse_hostport
from lib.identity import fingerprint as key_fingerprint
from lib.net.muxsession import Session
from lib.net.sockets import set_nodelay
from lib.peerlog import PeerLog
from lib.net.tlstransport import TLSTransport
from lib.protocol import messages as msg
from lib.proxy import bindpolicy
from lib.proxy.names import ReservedNames
from lib.proxy.ownership import Blocks, Decision
from lib.proxy.registry import Registry, Tunnel
from lib.tokenbucket import TokenBucket

log = logging.getLogger("shroud.proxy")


class TunnelService:
    """Runs every tunnel of one proxy (config: lib.proxy.server.ProxyConfig)."""

    def __init__(self, config, registry: Registry, policy, tls_context,
                 own_proxy_ids: frozenset, open_tcp_port=lambda port: False):
        self.config = config
        self.registry = registry
        self.policy = policy
        self.store = getattr(policy, "store", None)
        self.tls_context = tls_context
        self.own_proxy_ids = own_proxy_ids
        self.open_tcp_port = open_tcp_port
        self.peer_log = PeerLog()  # log lines a tunnel's peer triggers, per address
        # Tunnel connections not yet bound, per client network (handle_connection)
        self.pending: dict[str, int] = {}
        self.rules = bindpolicy.BindRules(max_binds_per_tunnel=config.max_binds_per_tunnel,
                                          tcp_ports=frozenset(config.tcp_ports),
                                          public_host=config.public_host,
                                          reserved=ReservedNames.for_config(config))

    def blocks(self) -> Blocks:
        return self.store.blocks() if self.store is not None else Blocks()

    # --- one tunnel's life ----------------------------------------------------------------

    def handle_connection(self, sock, address) -> None:
        """The tunnel listener's handler: TLS handshake (one deadline), then :meth:`serve`.

        Until it has bound a name, a connection counts against its address's
        --max-pending-tunnels-per-address (an IPv6 peer: its /64); past that it is closed at
        once (counter ``limit_pending_tunnels``)."""
        peer = format_hostport(*address[:2])  # "[v6]:port": peer_host reads it back
        network = client_network(str(address[0]))
        if self.pending.get(network, 0) >= self.config.max_pending_tunnels_per_address:
            self.registry.count_refusal("limit_pending_tunnels")
            self.peer_log.log(network, logging.INFO, "tunnel from %s refused: %d connections "
                              "from its address have not bound yet", peer,
                              self.pending[network])
            sock.close()
            return
        slot = _PendingSlot(self.pending, network)
        try:
            set_nodelay(sock)
            timeout = self.config.handshake_timeout
            try:
                # One deadline for the whole handshake: a peer trickling a byte at a time must
                # not hold a tunnel slot for hours.
                with gevent.Timeout(timeout, TimeoutError):
                    tls = TLSTransport.server(sock, self.tls_context, timeout)
            except (OSError, ValueError) as e:
                self.peer_log.log(peer_host(peer), logging.INFO,
                                  "tunnel from %s: TLS handshake failed: %s", peer, e)
                self.registry.count_refusal("tunnel_handshake")
                sock.close()
                return
            self.serve(tls, peer, transport_name="tls", pending=slot)
        finally:
            slot.release()

    def serve(self, transport, peer: str, transport_name: str = "tls",
              proxy_ids: frozenset[str] | None = None, pending=None) -> None:
        """Run one tunnel (any socket-like transport: TLS socket, WebSocket) until it ends.

        ``proxy_ids``: what a signed bind on it may name as its proxy (lib.protocol.messages
        proxy_id_for_*); by default this proxy's tunnel certificate, which the client saw in
        a TLS handshake it made with us."""
        # Untrusted until Auth: the mux runs from the handshake, keyless (lib.protocol.muxstate)
        session = Session(transport, client=False, config=self.config.mux, name=f"tunnel {peer}",
                          trusted=False, log_limiter=self.peer_log, log_key=peer_host(peer))
        tunnel = None
        watchdog = None
        try:
            tunnel, nonce = self.authenticate(session, peer, transport_name)
            if tunnel is None:
                return
            session.trust()
            tunnel.proxy_ids = proxy_ids if proxy_ids is not None else self.own_proxy_ids
            tunnel.pending_slot = pending  # released by its first bind (bind())
            # Auth's key is a claim until a signed bind proves it (docs/OPERATIONS.md).
            log.info("tunnel %d up from %s claiming key=%s (unproven)", tunnel.id, peer,
                     (tunnel.key or "unsigned")[:16])
            # A tunnel that binds nothing holds a slot for nothing: it gets the handshake's time.
            watchdog = gevent.spawn_later(self.config.handshake_timeout, self.drop_if_unbound,
                                          tunnel)
            self._answer_binds(session, tunnel, nonce)
        finally:
            if watchdog is not None:
                watchdog.kill(block=False)
            if tunnel is not None:
                self.registry.remove_tunnel(tunnel)
                log.info("tunnel %d from %s down: %s", tunnel.id, peer, session.end)
            session.close()
            self._count_session_end(session)

    def _answer_binds(self, session: Session, tunnel: Tunnel, nonce: bytes) -> None:
        bucket = TokenBucket(self.config.bind_burst, self.config.bind_rate)
        while not session.closed:
            try:
                stream = session.accept()
            except MuxError:
                break
            if not self.answer_bind_stream(tunnel, stream, nonce, bucket):
                # A real client never sends a malformed control message: drop the tunnel.
                session.close(ErrorCode.PROTOCOL_ERROR, "malformed control message")
                break

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

    def drop_if_unbound(self, tunnel: Tunnel) -> None:
        """Close ``tunnel`` if it never bound a name (the watchdog :meth:`serve` starts)."""
        if not tunnel.ever_bound and tunnel.alive:
            log.info("tunnel %d from %s bound nothing in %.0f s: dropped", tunnel.id,
                     tunnel.peer, self.config.handshake_timeout)
            self.registry.count_refusal("tunnel_unbound")
            tunnel.session.close(ErrorCode.NO_ERROR, "no bind")

    def replace_stale(self, client_id: str, key: str | None, keep: Tunnel | None) -> None:
        """A reconnecting client replaces its own stale tunnel at once."""
        for old in list(self.registry.tunnels.values()):
            if old is not keep and old.client_id == client_id and old.key == key:
                log.info("tunnel %d replaced by a reconnect of client %s", old.id, client_id)
                self.registry.remove_tunnel(old)
                old.session.close(ErrorCode.NO_ERROR, "replaced by a newer tunnel")

    def close_all(self, reason: str) -> None:
        for tunnel in list(self.registry.tunnels.values()):
            tunnel.session.close(ErrorCode.NO_ERROR, reason)

    # --- Auth -----------------------------------------------------------------------------

    def authenticate(self, session: Session, peer: str, transport_name: str):
        """Read Auth on the session's first stream and answer it.

        :returns: (the registered Tunnel, the nonce its binds sign), or (None, None) when
            refused (the AuthResp says why) or the peer sent no valid Auth in time.
        """
        c = self.config
        try:
            with gevent.Timeout(c.handshake_timeout, TimeoutError):
                stream = session.accept(timeout=c.handshake_timeout)
                stream.settimeout(c.control_timeout)
                auth = msg.read_message(stream)
        except (MuxError, EOFError, msg.MessageError, TimeoutError) as e:
            self.peer_log.log(peer_host(peer), logging.INFO,
                              "tunnel from %s: no valid Auth: %s", peer, e)
            self.registry.count_refusal("tunnel_auth")
            return None, None
        with stream:
            error = self._auth_refusal(auth, peer)
            if error is not None:
                self._auth_refuse(stream, error, peer)
                return None, None
            key = auth.public_key
            fp = key_fingerprint(key) if key else None
            client_id = auth.client_id if _is_client_id(auth.client_id) else secrets.token_hex(16)
            if fp is None:
                # An unsigned (original Go) client replaces its stale tunnel at once, as
                # go-tunnel did. A keyed one does so on its first signed bind (bind()): the key
                # in Auth is only a claim until a signature proves it.
                self.replace_stale(client_id, None, keep=None)
            if fp and not self._room_for_key(fp, client_id):
                self.registry.count_refusal("limit_tunnels_per_key")
                self._auth_refuse(stream, f"too many tunnels for this key "
                                          f"(limit {c.max_tunnels_per_key})", peer)
                return None, None
            return self._accept_auth(session, stream, peer, transport_name, key, fp, client_id)

    def _room_for_key(self, fp: str, client_id: str) -> bool:
        """Whether a new tunnel claiming key ``fp`` may be admitted: the key has fewer than
        --max-tunnels-per-key tunnels that proved it, not counting ``client_id``'s own (a
        reconnect replaces them when it proves; see :meth:`_over_key_cap`)."""
        others = [t for t in self.registry.tunnels_of_key(fp) if t.client_id != client_id]
        return len(others) < self.config.max_tunnels_per_key

    def _over_key_cap(self, tunnel: Tunnel) -> bool:
        """Whether ``tunnel``, about to prove its key, would pass --max-tunnels-per-key.

        The cap holds where a key is proven (its first signed bind), not at Auth: Auth's key
        is a claim anyone who knows the public key can make. Counted at Auth, with the oldest
        unproven claim closed to make room, eight claims sent in the round trip between a
        client's AuthResp and its first bind (0.1 s on loopback; a Tor circuit's round trip
        is longer) closed the holder's fresh tunnel, every time: a lock-out for whoever
        learned the key (any proxy the client uses). Counting only at Auth the tunnels that
        had bound let one key authenticate 40 and bind them all (issue 11 item 11); here the
        ninth bind is refused. Unproven claims hold no name and are dropped after
        --handshake-timeout (drop_if_unbound), like a fresh key's tunnels. The client's own
        stale tunnels are not counted: replace_stale closes them when this one proves.
        """
        if tunnel.key is None or tunnel.proven:
            return False
        others = [t for t in self.registry.tunnels_of_key(tunnel.key)
                  if t.client_id != tunnel.client_id]
        return len(others) >= self.config.max_tunnels_per_key

    def _auth_refusal(self, auth, peer: str) -> str | None:
        """Why an Auth message is refused before any state is made, or None."""
        if not isinstance(auth, msg.Auth) or msg.PROTOCOL_VERSION not in auth.version:
            return "unsupported protocol version"
        key = auth.public_key
        version = msg.shroud_version(auth.extra)
        if key and version != msg.SHROUD_VERSION:
            return (f"Shroud protocol {version} is not spoken here (this proxy speaks "
                    f"{msg.SHROUD_VERSION}): upgrade the client")
        fp = key_fingerprint(key) if key else None
        if fp and self.blocks().has_key(fp):
            return f"key {fp[:16]} is blocked by the operator"
        return None

    def _accept_auth(self, session, stream, peer, transport_name, key, fp, client_id):
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

    def _auth_refuse(self, stream, error: str, peer: str) -> None:
        self.peer_log.log(peer_host(peer), logging.WARNING, "tunnel from %s refused: %s", peer,
                          error)
        self.registry.count_refusal("tunnel_auth")
        try:
            msg.write_message(stream, msg.AuthResp(version=msg.PROTOCOL_VERSION, error=error))
        except MuxError:
            pass

    # --- Bind -----------------------------------------------------------------------------

    def answer_bind_stream(self, tunnel: Tunnel, stream, nonce: bytes,
                           bucket: TokenBucket | None = None) -> bool:
        """Answer one Bind; False when the client sent something no real client sends."""
        stream.settimeout(self.config.control_timeout)
        with stream:
            try:
                bind = msg.read_message(stream)
            except msg.MessageError as e:
                self.peer_log.log(peer_host(tunnel.peer), logging.WARNING,
                                  "tunnel %d from %s: malformed control message: %s",
                                  tunnel.id, tunnel.peer, e)
                self.registry.count_refusal("bad_bind")
                return False
            except (MuxError, EOFError) as e:
                # repeatable at will (open a stream, close it): rate-limited per address
                self.peer_log.log(peer_host(tunnel.peer), logging.INFO,
                                  "tunnel %d: no control message: %s", tunnel.id, e)
                self.registry.count_refusal("bad_bind")
                return True
            if not isinstance(bind, msg.Bind):
                self.peer_log.log(peer_host(tunnel.peer), logging.WARNING,
                                  "tunnel %d from %s: %s where a Bind belongs", tunnel.id,
                                  tunnel.peer, type(bind).__name__)
                self.registry.count_refusal("bad_bind")
                return False
            if bucket is not None and not bucket.take():
                resp = self._rate_limited(tunnel, bind)
            else:
                resp = self.bind(tunnel, bind, nonce)
            try:
                msg.write_message(stream, resp)
                stream.shutdown(socket.SHUT_WR)
            except MuxError:
                pass
        return True

    def _rate_limited(self, tunnel: Tunnel, bind: msg.Bind) -> msg.BindResp:
        self.registry.count_refusal("limit_bind_rate")
        if self.registry.refusals["limit_bind_rate"] % 1000 == 1:
            log.warning("tunnel %d from %s: bind rate limit", tunnel.id, tunnel.peer)
        return msg.BindResp(url="", protocol=bind.protocol, extra=msg.refusal_extra(
            msg.REASON_LIMIT), error=f"too many bind requests (limit "
            f"{self.config.bind_rate:g} a second after {self.config.bind_burst})")

    def bind(self, tunnel: Tunnel, bind: msg.Bind, nonce: bytes) -> msg.BindResp:
        """Decide one Bind (lib/proxy/bindpolicy.py) and, if accepted, register it."""
        proof = bindpolicy.check_proof(getattr(tunnel, "key_b64", None), nonce, bind,
                                       tunnel.proxy_ids)
        request = bindpolicy.BindRequest.of(bind, key=tunnel.key, proof=proof,
                                            bindings_held=len(tunnel.bindings))
        answer = bindpolicy.decide_bind(request, self.rules, self.blocks(), self.registry)
        if answer.verdict != bindpolicy.REFUSE and self._over_key_cap(tunnel):
            answer = self._key_cap_refusal()  # before the store: no claim is written
        if answer.verdict == bindpolicy.ASK_OWNERSHIP:
            # Claim rates per client network: an IPv6 peer's /64 (docs/SECURITY.md, "Another
            # client")
            decision = self._ownership(answer.name, tunnel.key,
                                       client_network(peer_host(tunnel.peer)))
            # Asked again with the blocks and bindings as they are after the wait on the store.
            answer = bindpolicy.decide_bind(request, self.rules, self.blocks(), self.registry,
                                            ownership=decision)
        if answer.accepted and bind.protocol == "tcp" and not self.open_tcp_port(
                request.remote_port):
            answer = bindpolicy.BindAnswer(
                bindpolicy.REFUSE, code=msg.REASON_INTERNAL, counter="tcp_listen",
                text=f"cannot listen on tcp port {request.remote_port}")
        if answer.accepted and self._over_key_cap(tunnel):
            # Checked again after the store's wait (it yields): no overshoot under load.
            answer = self._key_cap_refusal()
        if not answer.accepted:
            return self._bind_refused(tunnel, bind, answer)
        self.registry.bind(tunnel, bind.protocol, answer.name, tunnel.key, answer.method,
                           answer.url)
        slot = getattr(tunnel, "pending_slot", None)
        if slot is not None:
            slot.release()  # bound: no longer pending (handle_connection)
        tunnel.ever_bound = True
        if tunnel.key is not None and not tunnel.proven:
            tunnel.proven = True  # the signature over our nonce proved the key
            log.info("tunnel %d proved key %s", tunnel.id, tunnel.key[:16])
            self.replace_stale(tunnel.client_id, tunnel.key, keep=tunnel)
        log.info("tunnel %d bound %s (%s)", tunnel.id, answer.url, answer.method)
        return msg.BindResp(url=answer.url, protocol=bind.protocol)

    def _key_cap_refusal(self) -> bindpolicy.BindAnswer:
        return bindpolicy.BindAnswer(
            bindpolicy.REFUSE, code=msg.REASON_LIMIT, counter="limit_tunnels_per_key",
            text=f"too many tunnels for this key (limit {self.config.max_tunnels_per_key})")

    def _ownership(self, name: str, key: str | None, address: str):
        try:
            return self.policy.decide(name, key, address=address)
        except Exception as e:  # a broken policy must refuse, loudly, never allow
            log.exception("ownership check failed for %s", name)
            return Decision(False, "error", f"ownership check failed: {e}", msg.REASON_INTERNAL)

    def _bind_refused(self, tunnel: Tunnel, bind: msg.Bind,
                      answer: bindpolicy.BindAnswer) -> msg.BindResp:
        log.warning("tunnel %d bind %s %s refused: %s", tunnel.id, bind.protocol,
                    bind.hostname or bind.remote_port, answer.text)
        self.registry.count_refusal(answer.counter)
        return msg.BindResp(url="", protocol=bind.protocol, error=answer.text,
                            extra=msg.refusal_extra(answer.code))


class _PendingSlot:
    """One tunnel connection counted in ``table[network]`` until it binds or ends."""

    def __init__(self, table: dict, network: str):
        self.table, self.network, self.held = table, network, True
        table[network] = table.get(network, 0) + 1

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        left = self.table.get(self.network, 0) - 1
        if left > 0:
            self.table[self.network] = left
        else:
            self.table.pop(self.network, None)


def peer_host(peer: str) -> str:
    """The host of a tunnel's "host:port" / "[v6]:port" peer: whom claim rates are kept for."""
    try:
        return parse_hostport(peer, what="a tunnel's peer", port_zero=True)[0]
    except AddressError:
        return peer


def _is_client_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)
