"""The public proxy's wiring: its configuration, its parts, and its listeners.

Public API::

    config = ProxyConfig(tunnel_addr="0.0.0.0:4443", https_addr="0.0.0.0:443", ...)
    proxy = ProxyServer(config)
    proxy.start()            # binds every configured listener (returns at once)
    proxy.addresses          # {"tunnel": ("0.0.0.0", 4443), ...} as actually bound
    proxy.registry           # live state (lib.proxy.registry.Registry)
    proxy.tunnels            # tunnels: Auth, binds (lib.proxy.tunnels.TunnelService)
    proxy.router             # public connections (lib.proxy.routing.PublicRouter)
    proxy.actions            # the operator's audited actions (lib.proxy.actions.OperatorActions)
    proxy.policy, proxy.store   # ownership (lib.proxy.ownership); store may be None
    proxy.fleet              # this instance in its fleet (lib.proxy.fleet.FleetMember), once
                             # started; the store's live registry and blocks made elsewhere
    proxy.add_listener(name, server)   # show a listener started elsewhere in the status views
    proxy.open_tcp_port(port) -> bool  # a raw TCP listener for a tcp bind (idempotent); it
                                       # closes when the port's last binding goes
    proxy.stop()             # leaves the fleet, closes every listener and tunnel, and the
                             # store it opened (a PostgreSQL pool's connections and threads)
    parse_addr("HOST:PORT") -> (host, port);  parse_port_ranges("20000-20100,22") -> frozenset

The parts, each in its own module (docs/PROTOCOL.md has the bytes):
- lib/proxy/tunnels.py: a tunnel is a TLS connection (or a WebSocket in one-port mode) with a
  muxado session; its first stream carries Auth/AuthResp (with a fresh nonce), each later
  client stream one Bind/BindResp.
- lib/proxy/bindpolicy.py: whether a bind is accepted (signature, blocks, limits, ownership),
  pure code.
- lib/proxy/routing.py: a public connection on the https listener is routed by the SNI of its
  peeked ClientHello, on the http listener by the Host of its request head, on a raw TCP port by
  the port; TLS is never decrypted.
- lib/proxy/actions.py: block, unblock, disconnect.

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field

import gevent.pool
import gevent.server
import gevent.socket

from lib.certs import cert_fingerprint, ensure_tunnel_cert, leaf_pem, server_tls_context
from lib.errors import ListenError
from lib.hostport import format_hostport, parse_hostport
from lib.net.greenpool import WorkerPool
from lib.net.muxsession import MuxConfig
from lib.net.sockets import (AcceptedSocket, accept_queue, adopt_listener, set_nodelay,
                              tune_listener)
from lib.net.splice import UNSENT_LOWAT
from lib.protocol.muxstate import WindowPool
from lib.protocol import messages as msg
from lib.proxy.actions import OperatorActions
from lib.proxy.fleet import HEARTBEAT_INTERVAL, FleetMember, InstanceIdentity
from lib.proxy.prefork import listening_socket
from lib.proxy.store import Blocks, ClaimLimits, open_store
from lib.proxy.registry import Registry
from lib.proxy.routing import PublicRouter
from lib.proxy.tunnels import TunnelService
from lib.tokenbucket import TokenBucket

log = logging.getLogger("shroud.proxy")
# Runs of failed accepts logged (PublicServer._accept_failed: one line each), all listeners
# together: 10, then one every 6 s; the refusal accept_failed counts every failed accept.
_accept_log = TokenBucket(10, 10 / 60)

# Each worker numbers its tunnels from pid * this: ids stay unique across a host's workers
# (pids are below 2**22, so ids stay below 2**53, exact in JSON).
TUNNEL_IDS_PER_WORKER = 1_000_000

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
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            lo_i = hi_i = 0  # refused just below, with the range that is wrong
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
    # More names of this proxy (one-port admin hosts, the platform's app name): like hostname,
    # no tunnel may bind them (lib/proxy/names.py).
    own_names: tuple[str, ...] = ()
    allow_loopback_names: bool = False  # tunnels may bind names under .localhost (demos)
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
    # Tunnel connections from one address (an IPv6 /64) that have not bound a name yet (TLS,
    # Auth, first bind: seconds for a real client). Without it 2,000 idle TCP connections
    # from one address, renewed every handshake_timeout, held every tunnel slot. A busy Tor
    # exit's clients connect a few at a time; 64 leaves room for many.
    max_pending_tunnels_per_address: int = 64
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
    # The store: PostgreSQL shared by the fleet when set (lib/proxy/store/postgres.py), else
    # SQLite in data_dir. Claim limits bound first-use squatting (docs/SECURITY.md).
    database_url: str | None = None
    claim_limits: ClaimLimits = field(default_factory=ClaimLimits)
    fleet_heartbeat: float = HEARTBEAT_INTERVAL  # seconds (lib/proxy/fleet.py)
    # Links between the fleet's hosts (lib/proxy/hostlinks.py): the listener, and the address
    # other instances use to reach it (None: the listener's own).
    fleet_addr: str | None = None
    fleet_advertise: str | None = None
    fleet_max_links: int = 1024  # links in flight each way (hostlinks.MAX_LINKS: why 1,024)
    fleet_link_idle: float = 300.0  # a link unused this long is closed (hostlinks.LINK_IDLE)


def proxy_mux_config(**overrides) -> MuxConfig:
    """The proxy side's muxado limits (see ProxyConfig.mux). Visitors' streams start at 64 KiB
    windows and grow only while the visitor reads, within one budget for all tunnels
    (docs/OPERATIONS.md, "Memory per visitor")."""
    base = dict(grant_peer_streams=False, max_streams=32, accept_backlog=16, grow_windows=True,
                window_pool=WindowPool(VISITOR_WINDOW_POOL))
    base.update(overrides)
    return MuxConfig(**base)


class _PausesOnFailedAccept:
    """A listener's failed accept (for gevent's StreamServer): counted (``accept_failures``,
    and the registry's refusal ``accept_failed`` once ``registry`` is set), logged once per run
    of failures, accepting paused meanwhile (``_accept_failed``)."""

    registry = None  # the proxy's (lib.proxy.registry.Registry): failed accepts counted there
    accept_failures = 0  # accepts that failed (EMFILE, ENFILE, ENOBUFS...), a counter
    _failed_at = 0.0  # the last one's time (a new run of failures starts the back-off again)
    _pause = 0.0  # the next pause (gevent's own delay is reset by its _do_read)

    def _accept_failed(self, e: OSError) -> None:
        """An accept failed with more than EAGAIN (EMFILE: the process is out of descriptors,
        a flood of connections past the limit; ENFILE, ENOBUFS, ENOMEM): counted, logged once
        per run of failures (at most 10 runs a minute, all listeners), and accepting paused as
        gevent's StreamServer pauses, ``min_delay`` doubling to ``max_delay`` while the failures
        go on (the listener stays readable: watched, it would wake the loop at once, again and
        again). gevent's own path accepted once more to meet the error again and wrote a
        traceback for each, once a second for as long as the descriptors were out."""
        self.accept_failures += 1
        if self.registry is not None:
            self.registry.count_refusal("accept_failed")
        now = time.monotonic()
        if now - self._failed_at > 2 * self.max_delay:  # a new run of failures: one line
            self._pause = self.min_delay
            if _accept_log.take():
                log.warning("listener %s: accept failed (%s): accepting paused, %.2f s doubling "
                            "to %.0f s while it fails (%d failed so far: the refusal "
                            "accept_failed)", format_hostport(*self.address[:2]), e,
                            self._pause, self.max_delay, self.accept_failures)
        self._failed_at = now
        self.stop_accepting()
        self._timer = self.loop.timer(self._pause)
        self._timer.start(self._start_accepting_if_started)
        self._pause = min(self.max_delay, self._pause * 2)


class TunnelServer(_PausesOnFailedAccept, gevent.server.StreamServer):
    """The tunnel listener: gevent's StreamServer, a failed accept paused and counted as a
    public listener's (a flood of TLS connections past the descriptor limit)."""

    def do_read(self):
        try:
            return super().do_read()
        except OSError as e:
            if isinstance(e, BlockingIOError) or self.is_fatal_error(e):
                raise  # gevent's: a listener with a timeout; the server closed
            self._accept_failed(e)
            return None  # gevent's loop goes on as after EAGAIN: paused until the timer


class PublicServer(_PausesOnFailedAccept, gevent.server.StreamServer):
    """A public listener (https, http, tcp:PORT) whose connections cost fewer system calls:
    TCP_NODELAY and the splice's TCP_NOTSENT_LOWAT are set once on the listener and inherited
    by every accepted connection (lib.net.sockets.tune_listener), which arrives as an
    AcceptedSocket carrying the listener's own address when it listens on one (StartProxy's
    PublicAddr without a getsockname). Otherwise gevent's StreamServer (its pool, its back-off).

    With a lib.net.greenpool.WorkerPool (the proxy's), connections are accepted by a loop of
    its own: each handler is switched into a parked worker at once, from the listener's
    callback (WorkerPool.spawn_now), where gevent's loop calls six Python functions per
    connection to spawn a greenlet that runs at the next loop turn. In a serial run that turn
    was on the critical path, and the new connection's stream left in a TLS record of its own
    after the previous connection's FIN (bench/README.md, "Fresh connections: the proxy's
    accept"). A full pool goes through gevent's loop; a failed accept (out of descriptors)
    pauses accepting and is counted (_PausesOnFailedAccept)."""

    _tuned = False
    _local_name: str | None = None
    _ready = None  # the listener's io watcher when accepting by our own loop
    _queued = None  # lib.net.sockets.accept_queue's look at the listener, if the kernel tells
    # Every queued connection is accepted in one wake-up (at most gevent's max_accept, 100):
    # one accept per wake-up (nginx's multi_accept off) made a fresh connection per request at
    # 64 connections cost 1.3x the CPU (bench/README.md, "Fresh connections: the proxy's
    # side"): the handlers of one wake-up share a TLS record. Our loop asks the kernel whether
    # one is left (_queued) instead of accepting until EAGAIN, which cost an accept4 of ~5 us
    # for every connection that arrived alone.

    def init_socket(self):
        super().init_socket()
        # Read once: gevent's family property makes an enum of the kernel's int on every read.
        self._kind = (self.socket.family, self.socket.type, self.socket.proto)
        try:
            tune_listener(self.socket, UNSENT_LOWAT)
            self._tuned = True
        except OSError as e:  # each connection is then tuned as before (routing, splice)
            log.warning("listener %s: TCP options not set on it (%s): set per connection",
                        format_hostport(*self.address[:2]), e)
        host, port = self.address[:2]
        if not ipaddress.ip_address(host).is_unspecified:
            self._local_name = format_hostport(host, port)
        self._queued = accept_queue(self.socket)

    def start_accepting(self):
        if not isinstance(self.pool, WorkerPool):
            super().start_accepting()
        elif self._ready is None:
            self._ready = self.loop.io(self.socket.fileno(), 1)
            self._ready.start(self._accept_ready)

    def stop_accepting(self):
        if self._ready is not None:
            self._ready.stop()
            self._ready.close()
            self._ready = None
        super().stop_accepting()

    def _accept_ready(self) -> None:
        """The listener is readable: accept while connections wait (at most ``max_accept``;
        until EAGAIN when the kernel does not say how many wait), each connection's handler run
        at once in a kept worker (class doc)."""
        pool, accept, serve = self.pool, self.socket._accept, self._serve
        family, kind, proto = self._kind
        local_name, queued = self._local_name, self._queued
        for _ in range(self.max_accept):
            if pool.full():
                self._do_read()  # gevent's: stops accepting until a job ends
                return
            try:
                fd, address = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if self.is_fatal_error(e):  # EBADF, EINVAL, ENOTSOCK: the listener is gone
                    self._do_read()  # gevent's: the error again, and the server closed
                else:
                    self._accept_failed(e)
                return
            # A failure making the socket or handing it on closes the connection, then the hub
            # reports it (a try costs nothing on the normal path in Python 3.11).
            try:
                sock = (AcceptedSocket(family, kind, proto, fd, local_name) if self._tuned
                        else self._wrap(fd))
            except BaseException:
                os.close(fd)
                raise
            try:
                pool.spawn_now(serve, sock, address)
            except BaseException:
                sock.close()
                raise
            try:
                if self._ready is None or (queued is not None and not queued()):
                    return  # stopped by a handler, or none left now (a later one wakes us)
            except OSError:  # the listener was closed by a handler
                return

    def _serve(self, sock, address) -> None:
        try:
            self.handle(sock, address)
        finally:
            sock.close()  # nothing when the handler closed it (AcceptedSocket.close)

    def _wrap(self, fd: int):
        """An accepted descriptor as a gevent socket: an AcceptedSocket when the listener was
        tuned, else one with Nagle turned off here."""
        family, kind, proto = self._kind
        if not self._tuned:
            sock = gevent.socket.socket(family, kind, proto, fileno=fd)
            set_nodelay(sock)
            return sock
        return AcceptedSocket(family, kind, proto, fd, self._local_name)

    def do_read(self):
        """gevent's StreamServer.do_read (one non-blocking accept), the connection wrapped by
        :meth:`_wrap`."""
        sock = self.socket
        try:
            fd, address = sock._accept()
        except BlockingIOError:
            if not sock.timeout:
                return None
            raise
        return self._wrap(fd), address


class ProxyServer:
    def __init__(self, config: ProxyConfig):
        self.config = config
        self.registry = Registry()
        self.servers: dict[str, gevent.server.StreamServer] = {}
        self.tcp_servers: dict[int, gevent.server.StreamServer] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        # Handlers of public connections run in kept greenlets (lib/net/greenpool.py).
        self._public_pool = WorkerPool(config.max_public_connections)
        self._tunnel_pool = gevent.pool.Pool(config.max_tunnels)
        self.policy = config.ownership if config.ownership is not None else self._make_policy()
        self.store = getattr(self.policy, "store", None)
        # A store we opened is ours to close at stop(); a caller's policy keeps its own.
        self._owns_store = config.ownership is None
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        if config.cert and config.key:
            self.cert_path, self.key_path = config.cert, config.key
        else:
            self.cert_path, self.key_path = ensure_tunnel_cert(config.data_dir, config.hostname)
        self.fingerprint = cert_fingerprint(self.cert_path)
        # What a signed bind on a tunnel of ours names (docs/PROTOCOL.md, "Proxy id").
        self.own_proxy_ids = frozenset({msg.proxy_id_for_fingerprint(self.fingerprint)})
        self.started_at = time.time()
        self.tunnels = TunnelService(config, self.registry, self.policy,
                                     server_tls_context(self.cert_path, self.key_path),
                                     self.own_proxy_ids, open_tcp_port=self.open_tcp_port)
        # The store's own blocks() (one call fewer per public connection than self.blocks).
        self.router = PublicRouter(config, self.registry,
                                   blocks=self.store.blocks if self.store is not None else Blocks,
                                   pool_full=self._public_pool.full)
        self.actions = OperatorActions(self.registry, self.store)
        self.fleet = None  # this instance's FleetMember once started (lib/proxy/fleet.py)
        self.links = None  # links to the fleet's other hosts (lib/proxy/hostlinks.py), if any
        self.registry.on_unbound = self._binding_gone
        self.workers = None  # a lib.proxy.workers.WorkerGroup under gunicorn (start(run_dir=))
        # What the dashboard reads and acts through: with siblings, every worker's state.
        self.view_registry, self.view_actions = self.registry, self.actions

    def _make_policy(self):
        from lib.proxy.ownership import OwnershipPolicy
        c = self.config
        # threaded: a SQLite write's fsync never stalls the event loop that serves every
        # visitor; PostgreSQL's I/O is cooperative under the entry points' monkey-patching.
        store = open_store(c.data_dir, c.database_url, threaded=True, limits=c.claim_limits)
        log.info("store: %s", store.describe())
        resolver = parse_addr(c.dns_resolver, "127.0.0.1", "--dns-resolver", listen=False)
        return OwnershipPolicy(store, allowlist_path=c.allowlist, dns_resolver=resolver,
                               tofu=c.tofu, allow_unsigned=set(c.allow_unsigned) or None)

    def blocks(self) -> Blocks:
        """The operator's blocks now (none without a store)."""
        return self.store.blocks() if self.store is not None else Blocks()

    # --- listeners ------------------------------------------------------------------------

    def start(self, listeners: dict | None = None, run_dir: str | None = None) -> None:
        """Open the listeners and join the fleet (``listeners``: sockets opened before gunicorn
        forked, by name, adopted instead of bound; ``run_dir``: this worker's place among its
        siblings, lib/proxy/workers.py). :raises ListenError: one cannot open."""
        c = self.config
        listeners = listeners or {}
        if run_dir is not None:
            self._join_siblings(run_dir)
        plan = [("tunnel", c.tunnel_addr, self.tunnels.handle_connection, self._tunnel_pool),
                ("https", c.https_addr, self.router.handle_https, self._public_pool),
                ("http", c.http_addr, self.router.handle_http, self._public_pool)]
        for name, addr, handler, pool in plan:
            bind = parse_addr(addr)
            if bind is None:
                continue
            inherited = listeners.get(name)
            # The tunnel listener is not a public one: its connections are tuned by
            # lib.proxy.tunnels (no splice, TLS first).
            cls = TunnelServer if name == "tunnel" else PublicServer
            server = (cls(adopt_listener(inherited), handler, spawn=pool)
                      if inherited is not None else cls(bind, handler, spawn=pool, backlog=1024))
            server.registry = self.registry
            try:
                server.start()
            except OSError as e:
                raise ListenError(name, addr, e) from None
            self.servers[name] = server
            self.addresses[name] = server.address[:2]
            self.add_listener(name, server)
            log.info("%s listener on %s:%d", name, *server.address[:2])
        self.start_fleet()

    def start_fleet(self) -> None:
        """Join the fleet's live registry and follow its blocks (lib/proxy/fleet.py)."""
        if self.store is None or self.fleet is not None:
            return
        link_addr = self._start_links()
        # With links, the tunnel certificate itself: the other instances' trust anchor for
        # links from this one (lib/proxy/hostlinks.py).
        identity = InstanceIdentity(self.config.hostname, self.registry.listeners,
                                    self.fingerprint, link_addr,
                                    leaf_pem(self.cert_path) if link_addr else "")
        self.fleet = FleetMember(self.store, self.registry, identity, self.actions.apply_blocks,
                                 heartbeat_interval=self.config.fleet_heartbeat)
        if self.links is not None:
            self.links.self_id = self.fleet.id
        self.fleet.start()

    def _start_links(self) -> str:
        """Listen for the fleet's links (--fleet-addr); the address to register ("" without).
        :raises ListenError:"""
        from lib.proxy.fleet import EXPIRE_BEATS
        from lib.proxy.hostlinks import FleetLinks

        c = self.config
        bind = parse_addr(c.fleet_addr)
        if bind is None:
            return ""
        beat = c.fleet_heartbeat
        self.links = FleetLinks(self.store, self.registry, self.router.take_linked,
                                self.cert_path, self.key_path, self.fingerprint, bind,
                                refresh=min(1.0, beat), max_age=beat * EXPIRE_BEATS,
                                max_links=c.fleet_max_links, idle_timeout=c.idle_timeout,
                                link_idle=c.fleet_link_idle)
        try:
            # Workers: each one opens it (lib/proxy/prefork.py); a link lands on any of them.
            listener = (listening_socket(bind, reuseport=True, factory=gevent.socket.socket)
                        if self.workers is not None else None)
            self.links.start(listener)
        except OSError as e:
            raise ListenError("fleet", c.fleet_addr, e) from None
        self.router.fleet_links = self.links
        self.registry.add_listener("fleet", self.links.address)
        log.info("fleet link listener on %s:%d", *self.links.address)
        return c.fleet_advertise or format_hostport(*self.links.address)

    def _join_siblings(self, run_dir: str) -> None:
        from lib.proxy.groupview import GroupActions, GroupRegistry
        from lib.proxy.workers import WorkerGroup

        self.workers = WorkerGroup(run_dir, self.registry, take=self.router.take_handed,
                                   answer=self.answer_sibling)
        # Tunnel ids unique on the host, for a dashboard showing every worker's tunnels.
        self.registry.number_tunnels_from(os.getpid() * TUNNEL_IDS_PER_WORKER + 1)
        self.workers.start()
        self.router.siblings = self.workers
        self.view_registry = GroupRegistry(self.registry, self.workers)
        self.view_actions = GroupActions(self.actions, self.workers)

    def answer_sibling(self, request: dict):
        """A sibling worker's question (lib/proxy/workers.py): this worker's live state, or an
        operator action on a tunnel that lives here."""
        op = request.get("op")
        if op == "state":
            from lib.proxy.groupview import export_state

            return export_state(self.registry, self.workers)
        if op == "disconnect-tunnel":
            return {"done": self.actions.disconnect_tunnel(
                int(request.get("tunnel", 0)), str(request.get("actor", "?")),
                str(request.get("detail", "")))}
        return {"error": f"unknown question {str(op)[:40]!r}"}

    def add_listener(self, name: str, server) -> None:
        """Show a listener (anything with ``.address``) in the status views."""
        self.registry.add_listener(name, server.address)

    def open_tcp_port(self, port: int) -> bool:
        """Listen on ``port`` for a tcp bind (once; later binds share it); False on failure."""
        if port in self.tcp_servers:
            return True
        addr = (self.config.tcp_bind_host, port)
        try:
            # Workers: each one holding a tunnel for this port opens it (lib/proxy/prefork.py)
            listener = (listening_socket(addr, reuseport=True, factory=gevent.socket.socket)
                        if self.workers is not None else addr)
            server = PublicServer(listener, self.router.handle_tcp, spawn=self._public_pool)
            server.registry = self.registry
            server.start()
        except OSError as e:
            log.error("tcp listener on port %d failed: %s", port, e)
            return False
        self.tcp_servers[port] = server
        return True

    def _binding_gone(self, binding) -> None:
        """A tcp:PORT binding's last tunnel went: stop listening on PORT (a later bind opens
        it again). close(), not stop(): stop() would also kill every handler of the public
        pool the listener shares with the other public listeners."""
        if binding.protocol != "tcp":
            return
        port = int(binding.name.split(":", 1)[1])
        server = self.tcp_servers.pop(port, None)
        if server is not None:
            server.close()
            log.info("tcp listener on port %d closed: nothing is bound to it", port)

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()  # leaves the fleet's registry (else it expires there)
            self.fleet = None
        if self.links is not None:
            self.links.stop()
        if self.workers is not None:
            self.workers.stop()
        for server in list(self.servers.values()) + list(self.tcp_servers.values()):
            server.stop(timeout=1)
        self.tunnels.close_all("proxy shutting down")
        if self._owns_store and self.store is not None:
            # Last: the fleet's leaving and the tunnels' ends above may still write to it. A
            # PostgreSQL pool left open was torn down with the interpreter (its threads then
            # met a finalizing gevent hub).
            self.store.close()
