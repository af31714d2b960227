"""One-port mode: the dashboard, tunnels and public HTTP all on the platform's `$PORT`.

On a Procfile platform (Heroku-style) the proxy gets one port behind a router that terminates
TLS and speaks only HTTP/1.1 (WebSocket upgrades included). Every connection gunicorn accepts is
first shown to :meth:`OnePortRouter.dispatch`, which reads the request head (it is replayed,
never lost) and decides by Host and path:

1. Host is one of the proxy's own names (``admin_hosts``):
   ``GET /_shroud/tunnel`` with a WebSocket upgrade becomes a tunnel (muxado over the
   WebSocket's binary messages, lib.net.wstransport); any other path goes to the WSGI app
   (the dashboard), which gunicorn serves as usual.
2. Host is bound by a tunnel: the connection is routed through the tunnel exactly like the
   proxy's http listener (raw bytes, public WebSocket upgrades included), one request per
   router connection (see below).
3. Host unknown but the request is a WebSocket upgrade at ``/_shroud/tunnel``: a tunnel (the
   platform may give the app a name the operator did not list).
4. Anything else: the http listener's answer for an unknown name (404).

The public peer's address comes from ``X-Forwarded-For`` (last entry: the one the platform's
router appended; earlier entries are whatever the visitor claimed) when ``trust_forwarded_for``
is set, which one-port mode does since the router is the only peer that can reach ``$PORT``.
The port is unknown there and reported as 0.

A routed connection carries one exchange (lib.net.httpexchange.OneExchangeSocket): its request
head is sent with ``Connection: close``, what follows its body never reaches the tunnel, the
origin's answer goes back with ``Connection: close`` and anything the origin sends after it is
dropped, because a router that keeps connections to the app alive (Heroku's Router 2.0) may
reuse one for another visitor's request to another host. Only the origin's ``101`` to an
upgrade request makes the connection raw (a WebSocket). Visitors keep their keep-alive with
the router. The dashboard's connections carry one request too (gunicorn answers it and closes).

Public API::

    router = OnePortRouter(proxy, admin_hosts={"proxy.example.net"}, trust_forwarded_for=True)
    sock_or_none = router.dispatch(sock, address)   # a socket for WSGI, or None: handled here
    TUNNEL_PATH = "/_shroud/tunnel"
    forwarded_for(head) -> str | None               # last X-Forwarded-For entry, validated

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import logging


from lib.hostport import format_hostport
from lib.protocol import http1, httphead
from lib.protocol import messages as msg
from lib.protocol import sniff
from lib.protocol import websocket as ws
from lib.net.httpexchange import OneRequestSocket, ReplaySocket
from lib.peerlog import PeerLog
from lib.net.sockets import send_quietly
from lib.proxy.routing import PeekTimeout, peek_with
from lib.proxy.registry import ROUTE_BY_HOST, ROUTE_BY_SNI
from lib.net.wstransport import WebSocketTransport

log = logging.getLogger("shroud.oneport")

TUNNEL_PATH = "/_shroud/tunnel"


def forwarded_for(head: bytes) -> str | None:
    """The address the platform's router appended to ``X-Forwarded-For`` (its last entry).

    Only the last entry is the router's own observation; earlier ones come from the visitor
    and may be forged. Returns None when absent or not an IP address.
    """
    try:
        _, _, headers = http1.request_fields(head)
    except ValueError:
        return None
    values = headers.get("x-forwarded-for")
    if not values:
        return None
    return httphead.forwarded_client(values[-1])


class OnePortRouter:
    def __init__(self, proxy, admin_hosts, trust_forwarded_for: bool = True):
        self.proxy = proxy
        self.admin_hosts = {sniff.normalize_hostname(h) for h in admin_hosts if h}
        self.proxy_ids = frozenset(msg.proxy_id_for_host(h) for h in self.admin_hosts)
        self.trust_forwarded_for = trust_forwarded_for
        self.peer_log = PeerLog(logger=log)  # lines a visitor triggers, per address

    def dispatch(self, sock, address):
        """Decide what a new connection on ``$PORT`` is.

        :returns: a socket (the head replayed) for gunicorn to serve with the WSGI app, or
            None when the connection was handled here (tunnel, routed, or refused).
        """
        sniffer = sniff.HTTPHostSniffer()
        name, data = self._peek(sock, address, sniffer)
        if name is None:
            return None
        # The head as the sniffer parsed it: read and parsed once per connection (it was three
        # times: here, then again by the http listener's route on the head replayed).
        request = sniffer.request
        path = request.path
        headers = http1.fields_by_name(request)
        peer = address
        forwarded = headers.get("x-forwarded-for")
        if self.trust_forwarded_for and forwarded:
            # As forwarded_for(head), from the fields already parsed (one parse per request).
            fwd = httphead.forwarded_client(forwarded[-1])
            if fwd is not None:
                peer = (fwd, 0)
        is_tunnel_path = path == TUNNEL_PATH
        is_upgrade = any(v.lower() == "websocket" for v in headers.get("upgrade", []))
        if name in self.admin_hosts:
            if is_tunnel_path:
                self._tunnel(sock, data, peer)
                return None
            # One request here too: gunicorn would keep the router's connection alive and
            # serve the next request on it, for whatever host, with the dashboard.
            return OneRequestSocket(sock, data, request=request)
        if self._misdirected(sock, name, is_tunnel_path and is_upgrade, peer):
            return None
        # A bound name (or an unknown one: 404), as on the http listener, which carries one
        # exchange, raw both ways only after the origin's 101 (lib.net.httpexchange).
        self.proxy.router.route_named(sock, peer, "http", name, data, ROUTE_BY_HOST, request)
        return None

    def _peek(self, sock, address, sniffer) -> tuple[str | None, bytes]:
        """The request's Host and head (``sniffer``, a new HTTPHostSniffer, keeps the head it
        parsed); (None, b"") when the connection was answered here."""
        proxy = self.proxy
        try:
            name, head = peek_with(sock, sniffer, proxy.config.peek_timeout)
            if name is None:
                sock.close()
                return None, b""
        except PeekTimeout:
            proxy.registry.count_refusal("peek_timeout")
            send_quietly(sock, httphead.http_error_response(408, "Request Timeout",
                                                             "No request arrived in time.\n"))
            sock.close()
            return None, b""
        except sniff.SniffError as e:
            # The http listener's code answers (400 / 405 / 431) and counts it, at once: the
            # replayed bytes fail the same way.
            proxy.router.route(ReplaySocket(sock, e.peeked), address, "http",
                               sniff.HTTPHostSniffer, ROUTE_BY_HOST)
            return None, b""
        except OSError:
            sock.close()
            return None, b""
        return name, bytes(head)

    def _misdirected(self, sock, name: str, tunnel_upgrade: bool, peer) -> bool:
        """Refuse (421) what this port cannot serve for ``name``; True when refused."""
        registry = self.proxy.registry
        router = self.proxy.router
        if router.bound_anywhere(ROUTE_BY_HOST, name):
            return False
        if tunnel_upgrade:
            # Not a tunnel: a client signs its binds for the name it asked for, and this proxy
            # accepts only its own names (a relay could put any Host here).
            registry.count_refusal("tunnel_handshake")
            self.peer_log.log(str(peer[0]), logging.WARNING,
                              "tunnel upgrade for %s refused: not one of this proxy's names (%s)",
                              name, ", ".join(sorted(self.admin_hosts)))
            send_quietly(sock, httphead.http_error_response(
                421, "Misdirected Request", f"{name} is not one of this proxy's names; its "
                f"operator can add it to SHROUD_ADMIN_HOSTS.\n"))
            sock.close()
            return True
        if router.bound_anywhere(ROUTE_BY_SNI, name) and "https" not in self.proxy.servers:
            # Bound for TLS passthrough only, which the platform's TLS-terminating router makes
            # impossible here (the http listener would redirect to https: a loop).
            registry.count_refusal("tls_only_name")
            send_quietly(sock, httphead.http_error_response(
                421, "Misdirected Request", f"{name} is bound for TLS passthrough, which this "
                f"proxy cannot do behind its platform's router; the client should bind "
                f"http:{name}.\n"))
            sock.close()
            return True
        return False

    def _tunnel(self, sock, data: bytes, peer) -> None:
        registry = self.proxy.registry
        head, rest = ws.split_head(data)
        try:
            req = ws.parse_upgrade_request(head)
        except ws.HandshakeError as e:
            registry.count_refusal("tunnel_handshake")
            send_quietly(sock, ws.handshake_refusal(e.http_status, e.reason))
            sock.close()
            return
        try:
            sock.sendall(ws.server_response(req.key))
        except OSError:
            sock.close()
            return
        peer_text = format_hostport(*peer[:2])
        log.info("websocket tunnel from %s", peer_text)
        # The platform's router terminated TLS, so a client signs its binds for the name it
        # asked for: any of this proxy's own names.
        self.proxy.tunnels.serve(WebSocketTransport(sock, client=False, leftover=rest),
                                 peer_text, transport_name="websocket",
                                 proxy_ids=self.proxy_ids)
