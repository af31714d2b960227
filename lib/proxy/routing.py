"""Public connections: peek the name (SNI or Host), choose the tunnel, open a stream, splice.

Public API::

    router = PublicRouter(config, registry, blocks=callable() -> Blocks, pool_full=callable())
    router.handle_https(sock, address)    # the listeners' handlers
    router.handle_http(sock, address)
    router.handle_tcp(sock, address)
    router.route(sock, address, kind, new_sniffer, protocols)   # peek, choose, forward or refuse
    router.route_named(sock, address, kind, name, peeked, protocols, request=None)
        # the same for a connection whose name was peeked already (one-port mode)
    router.choose(kind, name, protocols) -> Route           # the decision alone (no I/O)
    router.forward(sock, address, route, peeked, fallback, kind)
    router.forward_exchange(sock, address, route, head, name)   # HTTP: one exchange, 502 fallback
    router.siblings = WorkerGroup | None    # this host's other workers (lib/proxy/workers.py)
    router.fleet_links = FleetLinks | None  # the fleet's other hosts (lib/proxy/hostlinks.py)
    router.take_handed(header, peeked) -> run(sock) | Refused   # a sibling's connection
        # a header it cannot read: Refused("bad header"), counted bad_handed_header
    router.take_linked(header, peeked) -> run(sock) | Refused   # another host's (relayed to
                                                                # the sibling holding it)
    router.bound_anywhere(protocols, name) -> bool   # live here or on a sibling
    peek_name(sock, new_sniffer, timeout) -> (name | None, peeked bytes);  PeekTimeout
        # new_sniffer: lib.protocol.sniff.TLSNameSniffer or HTTPHostSniffer (fed each read)
    peek_with(sock, sniffer, timeout)   # the same with the sniffer made (read it afterwards)

The decision, in order (``kind`` is the listener: "tls" by SNI, "http" by Host; tcp binds go
by port straight to the binding)::

    the public connection asks for             we answer (http / tls)          counter
    a reserved name (lib/proxy/names.py)       404 / unrecognized_name         reserved_name
    a blocked name (or under a blocked *.)     403 / access_denied             blocked
    a name bound for its kind (exact, then     forward through the binding's
      the nearest wildcard)                      least-busy live tunnel
    ... whose tunnels are all gone             502 / internal_error            tunnel_lost
    ... whose tunnel carries max streams       503 / internal_error            limit_streams
    http, a name bound only for TLS            301 to https://name/path        -
    any other name                             404 / unrecognized_name         unknown_name

With siblings (gunicorn workers), an unknown name or a binding whose tunnels are all gone is
first handed, socket and peeked bytes, to a sibling holding a live tunnel for it, then (with
--fleet-addr) sent over a fleet link to another instance holding it; only when none takes it is
it refused as above, or::

    the siblings or the fleet's links answer     we answer (http / tls)     counter
    too many hand-overs in flight                503 / internal_error       handoff_limit
    too many links, or every holder busy         503 / internal_error       fleet_link_limit
    a holder known, none answered in time        502 / internal_error       fleet_link_failed

A handed connection is never handed on (one hop); a linked one (from another host) is served
where it lands or by the sibling holding it there, never sent to another host.

Before a name is known: no name in time 408 (peek_timeout), bytes that are not the listener's
protocol 400/405/431 or a TLS alert (bad_request), no name given 400 (no_name). TLS is never
decrypted; the peeked bytes are replayed to the origin.

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import functools
import logging
import socket
import time
from typing import NamedTuple

import gevent.socket

from lib.errors import ErrorCode, MuxError, ShroudError
from lib.hostport import AddressError, format_hostport, parse_hostport
from lib.net.httpexchange import OneExchangeSocket
from lib.peerlog import PeerLog
from lib.net.sockets import recv_nowait, send_quietly, set_nodelay
from lib.net.splice import splice
from lib.protocol import messages as msg
from lib.protocol import sniff
from lib.protocol.httphead import http_error_response, parse_request_head, split_head
from lib.protocol.sniff import ALERT_ACCESS_DENIED, ALERT_INTERNAL_ERROR, ALERT_UNRECOGNIZED_NAME
from lib.proxy.names import ReservedNames
from lib.proxy.ownership import Blocks
from lib.proxy.registry import ROUTE_BY_HOST, ROUTE_BY_SNI, Binding, Registry, Tunnel
from lib.proxy.workers import LIMIT, TAKEN, UNREACHABLE, Refused

log = logging.getLogger("shroud.proxy")

# What a worker hands to a sibling instead of refusing (the name is live elsewhere).
HAND_OVER = frozenset({"unknown_name", "tunnel_lost"})
KIND_PROTOCOLS = {"tls": ROUTE_BY_SNI, "http": ROUTE_BY_HOST, "tcp": ("tcp",)}

# What the fleet's links answered (lib/proxy/hostlinks.py), told apart from the siblings'.
FLEET_LIMIT = "fleet_link_limit"
FLEET_UNREACHABLE = "fleet_link_failed"

FORWARD = "forward"
REDIRECT = "redirect"
REFUSE = "refuse"


class Refusal(NamedTuple):
    """How a public connection is turned away: an HTTP answer or a TLS alert."""
    counter: str          # the registry's refusal counter
    status: int
    reason: str
    body: str
    alert: int | None     # TLS alert (None: close without one)


class Route(NamedTuple):
    action: str                   # FORWARD | REDIRECT | REFUSE
    binding: Binding | None = None
    tunnel: Tunnel | None = None  # FORWARD: the tunnel chosen
    refusal: Refusal | None = None


def _refused(counter: str, status: int, reason: str, body: str, alert: int | None,
             binding: Binding | None = None) -> Route:
    return Route(REFUSE, binding, None, Refusal(counter, status, reason, body, alert))


class PeekTimeout(ShroudError):
    """No name arrived within the peek deadline."""


class PublicRouter:
    """Routes public connections to tunnels (config: lib.proxy.server.ProxyConfig)."""

    def __init__(self, config, registry: Registry, blocks=Blocks, pool_full=lambda: False):
        self.config = config
        self.registry = registry
        self.blocks = blocks          # () -> the operator's blocks now
        self.pool_full = pool_full    # () -> whether this connection took the last slot
        self.reserved = ReservedNames.for_config(config)
        self.siblings = None          # a lib.proxy.workers.WorkerGroup under gunicorn
        self.fleet_links = None       # a lib.proxy.hostlinks.FleetLinks with --fleet-addr
        self.peer_log = PeerLog(logger=log)  # lines a handed connection's header triggers
        # The https and http listeners' handlers (sock, address): route() for their kind, as
        # partials (no Python frame of their own per connection).
        self.handle_https = functools.partial(self.route, kind="tls",
                                              new_sniffer=sniff.TLSNameSniffer,
                                              protocols=ROUTE_BY_SNI)
        self.handle_http = functools.partial(self.route, kind="http",
                                             new_sniffer=sniff.HTTPHostSniffer,
                                             protocols=ROUTE_BY_HOST)

    # --- the decision ---------------------------------------------------------------------

    def choose(self, kind: str, name: str, protocols: tuple[str, ...]) -> Route:
        """Where a public connection for ``name`` goes (see the module docstring's table)."""
        if self.reserved.reason(name) is not None:
            # Never a tunnel's, whatever is bound (a binding made before the name was
            # reserved, a wildcard): the proxy's own names answer only for the proxy.
            return _refused("reserved_name", 404, "Not Found",
                            f"{name} is not served through this proxy.\n",
                            ALERT_UNRECOGNIZED_NAME)
        if self.blocks().covering(name) is not None:
            return _refused("blocked", 403, "Forbidden",
                            f"{name} is blocked by this proxy's operator.\n", ALERT_ACCESS_DENIED)
        binding = self.registry.lookup(protocols, name)
        if binding is None:
            if kind == "http" and self.bound_anywhere(ROUTE_BY_SNI, name):
                # Only TLS is bound: send visitors to https, as the original proxy did.
                return Route(REDIRECT)
            return _refused("unknown_name", 404, "Not Found",
                            f"No service is bound for {name}.\n", ALERT_UNRECOGNIZED_NAME)
        return self.choose_tunnel(binding)

    def choose_tunnel(self, binding: Binding) -> Route:
        """The binding's least-busy live tunnel, or why none can take a connection."""
        tunnel = binding.pick()
        if tunnel is None:
            return _refused("tunnel_lost", 502, "Bad Gateway", "The tunnel is down.\n",
                            ALERT_INTERNAL_ERROR, binding)
        if tunnel.streams_open >= self.config.max_streams_per_tunnel:
            return _refused("limit_streams", 503, "Service Unavailable",
                            "Too many connections.\n", ALERT_INTERNAL_ERROR, binding)
        return Route(FORWARD, binding, tunnel)

    # --- the listeners' handlers ----------------------------------------------------------

    def handle_tcp(self, sock, address) -> None:
        # The listener's "host:port" is the bind's port and StartProxy's PublicAddr: known
        # without a system call on a one-address listener, one getsockname on a wildcard one
        # (there were two: the port's, then forward's PublicAddr).
        public = _public_addr(sock)
        name = _tcp_name(public) if public else f"tcp:{sock.getsockname()[1]}"
        self._accepted()
        route = self._tcp_route(name)
        if route.action == REFUSE and self._hand_over(sock, address, "tcp", name, b"", route):
            return
        self.forward(sock, address, route, b"", None, "tcp", public)

    def _tcp_route(self, name: str) -> Route:
        binding = self.registry.bindings.get(("tcp", name))
        if binding is None or not binding.tunnels:
            return _refused("unknown_name", 0, "", "", None)
        return self.choose_tunnel(binding)

    def _accepted(self) -> None:
        """Count a public connection. Its TCP options are the listener's (lib.proxy.server.
        PublicServer sets them on a listener it could not tune)."""
        self.registry.connections += 1
        if self.pool_full():
            # This connection took the last slot: the public listeners stop accepting until
            # one ends (the kernel's backlog holds the next ones). Tunnels have their own pool.
            self.registry.count_refusal("limit_public_connections")

    def route(self, sock, address, kind: str, new_sniffer, protocols) -> None:
        """Serve one public connection on a ``kind`` ("tls" or "http") listener: peek its
        name with a ``new_sniffer()``, then forward it or answer the refusal (sock is closed).

        An HTTP connection carries one exchange (lib.net.httpexchange.OneExchangeSocket): a
        second request on it would otherwise reach this request's origin, whatever its Host
        (docs/SECURITY.md, "A front that pools connections")."""
        self._accepted()
        sniffer = new_sniffer()
        name, peeked = self._peek(sock, kind, sniffer)
        if name is None:
            return
        self._route_named(sock, address, kind, name, peeked, protocols,
                          getattr(sniffer, "request", None))

    def route_named(self, sock, address, kind: str, name: str, peeked: bytes, protocols,
                    request=None) -> None:
        """:meth:`route` for a connection whose name was peeked already (one-port mode,
        lib/proxy/oneport.py): ``peeked`` is every byte read, ``request`` the head as
        lib.protocol.httphead parsed it, if it was (an HTTP connection's head is then not read
        or parsed again)."""
        set_nodelay(sock)
        self._accepted()
        self._route_named(sock, address, kind, name, peeked, protocols, request)

    def _route_named(self, sock, address, kind: str, name: str, peeked: bytes, protocols,
                     request) -> None:
        route = self.choose(kind, name, protocols)
        if route.action == REFUSE and self._hand_over(sock, address, kind, name, peeked, route):
            return
        if route.action == REDIRECT:
            send_quietly(sock, _redirect_to_https(name, peeked))
            sock.close()
            return
        if kind == "http" and route.action == FORWARD:
            # The exchange starts from the head the sniffer read (not read a second time).
            self.forward_exchange(sock, address, route, peeked, name, request=request)
        else:
            self.forward(sock, address, route, peeked, None, kind)

    def _peek(self, sock, kind: str, sniffer) -> tuple[str | None, bytes]:
        """The connection's name and the bytes read; (None, ...) when it was answered here."""
        try:
            name, peeked = peek_with(sock, sniffer, self.config.peek_timeout)
        except PeekTimeout:
            self.registry.count_refusal("peek_timeout")
            refuse(sock, kind, Refusal("peek_timeout", 408, "Request Timeout",
                                       "No request arrived in time.\n", None))
            return None, b""
        except sniff.SniffError as e:
            self.registry.count_refusal("bad_request")
            refuse(sock, kind, Refusal("bad_request", e.http_status or 400, "Bad Request",
                                       f"{e.reason}\n", e.alert or sniff.ALERT_DECODE_ERROR),
                   linger=True)
            return None, b""
        except OSError:
            sock.close()
            return None, b""
        if name is None:
            self.registry.count_refusal("closed_before_name")
            sock.close()
            return None, peeked
        if not name:
            self.registry.count_refusal("no_name")
            refuse(sock, kind, Refusal("no_name", 400, "Bad Request", "No host name given.\n",
                                       ALERT_UNRECOGNIZED_NAME))
            return None, peeked
        return name, peeked

    # --- siblings (lib/proxy/workers.py) ---------------------------------------------------

    def _hand_over(self, sock, address, kind: str, name: str, peeked: bytes,
                   route: Route) -> bool:
        """Hand a connection this worker would refuse to a sibling holding its name live, else
        to another instance of the fleet that does (lib/proxy/hostlinks.py); True when it was
        taken, or answered here (503: too many hand-overs or links in flight). Callers ask only
        for a REFUSE route (one call fewer per forwarded connection)."""
        if ((self.siblings is None and self.fleet_links is None) or route.action != REFUSE
                or route.refusal.counter not in HAND_OVER):
            return False
        # "public": the listener the visitor reached (StartProxy.PublicAddr, the PROXY header's
        # destination), which the serving worker's socket (a link, a socket pair) is not.
        header = {"kind": kind, "name": name, "client": [address[0], address[1]],
                  "public": _public_addr(sock)}
        result = None
        for pid in (self.siblings.candidates(KIND_PROTOCOLS[kind], name)
                    if self.siblings is not None else ()):
            result = self.siblings.hand_off(pid, sock, header, peeked)
            if result in (TAKEN, LIMIT):
                break
        if result not in (TAKEN, LIMIT) and self.fleet_links is not None and kind != "tcp":
            # tcp:PORT is not forwarded between hosts: a port means nothing on another host.
            result = self.fleet_links.send(sock, header, peeked, KIND_PROTOCOLS[kind])
            result = {LIMIT: FLEET_LIMIT, UNREACHABLE: FLEET_UNREACHABLE}.get(result, result)
        if result == TAKEN:
            sock.close()  # our copy of the descriptor; the sibling or the link serves it
            return True
        if result in (LIMIT, FLEET_LIMIT):
            counter = "handoff_limit" if result == LIMIT else "fleet_link_limit"
            self.registry.count_refusal(counter)
            refuse(sock, kind, Refusal(counter, 503, "Service Unavailable",
                                       "Too many connections.\n", ALERT_INTERNAL_ERROR))
            return True
        if result == FLEET_UNREACHABLE:  # held elsewhere, but no holder answered in time
            self.registry.count_refusal("fleet_link_failed")
            refuse(sock, kind, Refusal("fleet_link_failed", 502, "Bad Gateway",
                                       "The tunnel is down.\n", ALERT_INTERNAL_ERROR))
            return True
        return False  # refused or unreachable everywhere: answered here as it would have been

    def bound_anywhere(self, protocols, name: str) -> bool:
        """Whether ``name`` has a live binding under ``protocols`` here or on a sibling."""
        return self.registry.lookup(protocols, name) is not None or (
            self.siblings is not None and self.siblings.holder(protocols, name) is not None)

    def take_handed(self, header: dict, peeked: bytes):
        """A sibling's connection for ``header["name"]``: a runner serving it (``run(sock)``)
        when this worker has a live tunnel for it, else :class:`Refused` (never handed on)."""
        kind, name = header.get("kind"), header.get("name")
        if kind not in KIND_PROTOCOLS or not isinstance(name, str):
            return self._bad_header(f"kind {kind!r:.40}, name {name!r:.80}")
        try:
            address = handed_client(header.get("client"))
            public = handed_public(header.get("public"))
        except AddressError as e:
            return self._bad_header(str(e))
        route = (self._tcp_route(name) if kind == "tcp"
                 else self.choose(kind, name, KIND_PROTOCOLS[kind]))
        if route.action != FORWARD:
            return Refused(route.refusal.counter if route.refusal else route.action)

        def run(sock) -> None:
            set_nodelay(sock)
            try:
                if kind == "http":
                    self.forward_exchange(sock, address, route, peeked, name, public)
                else:
                    self.forward(sock, address, route, peeked, None, kind, public)
            finally:
                sock.close()
        return run

    def _bad_header(self, why: str) -> Refused:
        """Refuse a handed connection whose header this worker cannot read (a sibling or an
        instance of another version, a bug): counted, logged at most PeerLog's lines a minute."""
        self.registry.count_refusal("bad_handed_header")
        self.peer_log.log("handed", logging.WARNING, "refused a handed connection: %s", why)
        return Refused("bad header")

    def take_linked(self, header: dict, peeked: bytes):
        """A connection arriving over a fleet link (lib/proxy/hostlinks.py): served here as
        :meth:`take_handed` serves it, else relayed to the sibling worker holding its name.
        The link's TLS socket cannot cross SCM_RIGHTS, so the sibling gets one end of a socket
        pair (handed over as a visitor's socket is) and this worker splices the link's
        plaintext to the other end (docs/DESIGN.md, "Workers"). Never on to another host."""
        run = self.take_handed(header, peeked)
        if not isinstance(run, Refused) or run.reason not in HAND_OVER or self.siblings is None:
            return run
        mine, theirs = gevent.socket.socketpair()
        try:
            for pid in self.siblings.candidates(KIND_PROTOCOLS[header["kind"]], header["name"]):
                result = self.siblings.hand_off(pid, theirs, header, peeked)
                if result == TAKEN:
                    # Closes both when done, or silent --idle-timeout (as the sibling's own).
                    return lambda link: splice(link, mine,
                                               idle_timeout=self.config.idle_timeout)
                if result == LIMIT:
                    break
        finally:
            theirs.close()  # our copy; a sibling that took it holds its own
        mine.close()
        return run

    # --- forwarding -----------------------------------------------------------------------

    def forward_exchange(self, sock, address, route: Route, head: bytes, name: str,
                         public: str | None = None, request=None) -> None:
        """Forward one HTTP exchange: its ``head`` is framed by the exchange (with
        Connection: close) and sent with StartProxy; a 502 answers when the origin sends
        nothing.
        ``request``: the head as lib.protocol.httphead read it, if the sniffer did."""
        if public is None and route.tunnel is not None and route.tunnel.key is not None:
            # The visitor's socket, not the wrapper; an AcceptedSocket's listener without a call.
            public = getattr(sock, "local_name", None) or _public_addr(sock)
        exchange = OneExchangeSocket(sock, head, request=request)
        # The head (Connection: close added) goes with StartProxy in the stream's first frame:
        # one DATA frame fewer to encode here and to decode in the client than when the splice
        # replayed it (bench/README.md, "Fresh connections: the proxy's side").
        self.forward(exchange, address, route, exchange.take_head(),
                     origin_unreachable(name), "http", public)

    def forward(self, sock, address, route: Route, peeked: bytes, fallback: bytes | None,
                kind: str = "tcp", public: str | None = None) -> None:
        """Carry the connection through ``route``'s tunnel (a stream with StartProxy and the
        peeked bytes at its head), or answer ``route``'s refusal. ``public``: the listener
        the visitor reached, when ``sock`` is not the visitor's own (a handed connection)."""
        registry = self.registry
        binding, tunnel = route.binding, route.tunnel
        if route.action != FORWARD:
            registry.count_refusal(route.refusal.counter, binding)
            refuse(sock, kind, route.refusal)
            return
        client_addr = format_hostport(*address[:2])  # "[v6]:port", as Go's net.Addr writes it
        # Only a Shroud client (it has a key) is told the listener: go-tunnel's StartProxy has
        # exactly two fields, and the original client is checked byte for byte against it.
        public_addr = (public or _public_addr(sock)) if tunnel.key is not None else None
        # Counted before the first call that can yield (sendall waits for the writer): the
        # limit choose_tunnel checked must hold for every connection that passed it at once.
        tunnel.streams_open += 1
        stream = None
        try:
            stream = tunnel.session.open()
            first = msg.encode_start_proxy(binding.url, client_addr, public_addr) + peeked
            # The stream's first frame, queued without waiting (a new stream's window takes
            # a head): one call where sendall makes six; sendall only for what it left.
            sent = stream.send_nowait(first)
            if sent < len(first):
                stream.sendall(memoryview(first)[sent:])
        except MuxError as e:
            tunnel.streams_open -= 1
            registry.count_refusal("tunnel_lost", binding)
            log.info("stream to tunnel %d failed: %s", tunnel.id, e)
            if stream is not None:
                stream.reset(ErrorCode.CANCEL)  # free its slot and window now
            refuse(sock, kind, Refusal("tunnel_lost", 502, "Bad Gateway",
                                       "The tunnel is down.\n", ALERT_INTERNAL_ERROR))
            return
        binding.connections += 1
        tunnel.streams_total += 1
        # The pair's counters (made once per binding and tunnel, not per connection): one
        # Python call per chunk (bench/README.md, "Per-request cost (issue 16)", counters pass).
        meter = tunnel.meters.get(binding) or registry.meter(binding, tunnel)
        if peeked:
            meter.count_in(len(peeked))
        # Sizes and names only: the bytes themselves are never logged (docs/SECURITY.md).
        debug = log.isEnabledFor(logging.DEBUG)  # asked once for the connection's two lines
        if debug:
            log.debug("%s %s from %s: tunnel %d stream %d", kind, binding.name, client_addr,
                      tunnel.id, stream.id)
        try:
            splice(sock, stream, on_a_to_b=meter.count_in, on_b_to_a=meter.count_out,
                   idle_timeout=self.config.idle_timeout, fallback_to_a=fallback)
        finally:
            tunnel.streams_open -= 1
            if debug:
                log.debug("tunnel %d stream %d for %s ended", tunnel.id, stream.id,
                          binding.name)


def handed_client(client) -> tuple[str, int]:
    """The visitor's address in a handed connection's header (``[HOST, PORT]``, as _hand_over
    and lib/proxy/hostlinks.py write it), checked by lib.hostport's rules; port 0 is allowed
    (unknown: one-port mode's X-Forwarded-For visitor).

    :raises AddressError: not a [HOST, PORT] pair, or not an address by those rules.
    """
    what = "a handed connection's client"
    if not (isinstance(client, list) and len(client) == 2 and isinstance(client[0], str)
            and type(client[1]) is int):
        raise AddressError(f"{what} must be [HOST, PORT], got {client!r:.120}")
    return parse_hostport(format_hostport(client[0], client[1]), what=what, port_zero=True)


def handed_public(public) -> str | None:
    """The listener a handed visitor reached (``"HOST:PORT"`` or None, as _hand_over writes
    it), checked. :raises AddressError:"""
    if public is None:
        return None
    if not isinstance(public, str):
        raise AddressError(f"a handed connection's listener must be HOST:PORT, got "
                           f"{public!r:.120}")
    return format_hostport(*parse_hostport(public, what="a handed connection's listener"))


@functools.lru_cache(maxsize=1024)  # built for every routed HTTP connection, used by few
def origin_unreachable(name: str) -> bytes:
    """The 502 an HTTP visitor gets when the client could not reach ``name``'s origin (splice's
    fallback: sent only when the origin sent nothing)."""
    return http_error_response(502, "Bad Gateway", f"The origin of {name} is not reachable.\n")


def refuse(sock, kind: str, refusal: Refusal, linger: bool = False) -> None:
    """Answer ``refusal`` as the ``kind`` listener speaks ("http": an HTTP response, "tls": an
    alert, "tcp": nothing) and close ``sock``."""
    if kind == "http":
        send_quietly(sock, http_error_response(refusal.status, refusal.reason,
                                                      refusal.body))
    elif kind == "tls" and refusal.alert is not None:
        send_quietly(sock, sniff.tls_alert(refusal.alert))
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


def peek_name(sock, new_sniffer, timeout: float) -> tuple[str | None, bytes]:
    """Read a public connection's first bytes until a ``new_sniffer()`` (lib.protocol.sniff's
    TLSNameSniffer or HTTPHostSniffer), fed each read, finds its name; nothing read is lost:
    the bytes come back for replay. ``(None, peeked)`` when the peer closed first. The sniffer
    looks at each byte once: a peer splitting its hello or head into tiny pieces costs time
    linear in what it sends (re-sniffing the whole buffer after each read cost 6-7 s of CPU
    for a 20 KiB hello in 1-byte records, docs/OPERATIONS.md).

    :raises PeekTimeout: after ``timeout`` seconds in all (slow senders are cut here).
    :raises lib.protocol.sniff.SniffError: the bytes are not what the listener speaks, or too many
        (its ``peeked`` attribute holds what was read).
    """
    return peek_with(sock, new_sniffer(), timeout)


def peek_with(sock, sniffer, timeout: float) -> tuple[str | None, bytes]:
    """:func:`peek_name` with the sniffer made already (the caller reads what it found)."""
    if isinstance(sock, gevent.socket.socket):
        # A visitor's first bytes are usually there already: one read of what is there (no
        # timeout set and restored, no gevent frame), then the timed loop only if needed.
        try:
            data = recv_nowait(sock, 8192)
        except BlockingIOError:
            data = None
        if data is not None:
            if not data:
                return None, b""
            try:
                name = sniffer.feed(data)
            except sniff.SniffError as e:
                e.peeked = data  # for a caller that replays them elsewhere
                raise
            if name is not None:
                return name, data
            return _peek_rest(sock, sniffer, timeout, bytearray(data))
    return _peek_rest(sock, sniffer, timeout, bytearray())


def _peek_rest(sock, sniffer, timeout: float, peeked: bytearray) -> tuple[str | None, bytes]:
    """peek_name's reads that may have to wait, ``peeked`` holding what was read before."""
    # The deadline is the socket's own timeout, set to what is left before each read: gevent
    # arms a timer only for a read that has to wait, and a visitor's first bytes are usually
    # there already (a gevent.Timeout around the loop cost a timer per connection).
    deadline = time.monotonic() + timeout
    before = sock.gettimeout()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data = sock.recv(8192)
            if not data:
                return None, bytes(peeked)
            peeked += data
            try:
                name = sniffer.feed(data)
            except sniff.SniffError as e:
                e.peeked = bytes(peeked)  # for a caller that replays them elsewhere
                raise
            if name is not None:
                return name, bytes(peeked)
    except TimeoutError:
        raise PeekTimeout(f"no name within {timeout:g} s") from None
    finally:
        try:
            sock.settimeout(before)
        except OSError:  # closed meanwhile
            pass


@functools.lru_cache(maxsize=256)  # one entry per tcp: listener (a port range at most)
def _tcp_name(public: str) -> str:
    """The tcp binding's name for a connection that reached the listener ``public``
    ("host:port"): parsed once per listener, not per connection (15 Python calls)."""
    return f"tcp:{parse_hostport(public)[1]}"


def _public_addr(sock) -> str | None:
    """The "ip:port" of the listener a public connection arrived on (StartProxy.PublicAddr);
    an AcceptedSocket of a one-address listener knows it without a system call."""
    local = getattr(sock, "local_name", None)
    if local is not None:
        return local
    try:
        return format_hostport(*sock.getsockname()[:2])
    except (OSError, AttributeError, TypeError):  # a wrapped or already closed socket
        return None


def _redirect_to_https(name: str, head: bytes) -> bytes:
    try:
        split = split_head(head)  # the head passed the Host sniffer; a body may follow it
        target = parse_request_head(split[0] if split else head).target
    except ValueError:
        target = "/"
    if not target.startswith("/") or not target.isascii():
        target = "/"
    return http_error_response(301, body=b"", headers=[("Location", f"https://{name}{target}")],
                               version="1.1")
