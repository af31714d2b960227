"""The proxy's live state: tunnels, the names bound through them, and their counters.

Public API::

    registry = Registry()
    tunnel = registry.add_tunnel(session, peer="1.2.3.4:5", key=fp_or_None, client_id="...")
    binding = registry.bind(tunnel, protocol="tls", name="example.com", owner=fp, method="tofu")
    registry.lookup("tls", "www.example.com") -> Binding | None   # exact name, then wildcards
    binding.pick() -> Tunnel | None      # balances new connections across the binding's tunnels
    registry.remove_tunnel(tunnel)        # drops its bindings; a binding with no tunnel goes away
    registry.count_refusal(reason, binding=None, n=1)
    meter = registry.meter(binding, tunnel)   # one per (binding, tunnel), kept in tunnel.meters
    meter.count_in(n) / meter.count_out(n)    # a spliced chunk: every byte counter, one call
    registry.add_listener(name, address)  # shown in the status views as "host:port"
    registry.snapshot() -> dict           # JSON-ready view for the status API and dashboard

Protocols are go-tunnel's: "tls" and "https" are routed by SNI, "http" by Host, "tcp" by port
(name "tcp:PORT"). The registry only holds state; the proxy does the I/O.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from typing import Callable

from lib.hostport import format_hostport
from lib.protocol.sniff import wildcard_candidates

ROUTE_BY_SNI = ("tls", "https")
ROUTE_BY_HOST = ("http",)

# Bandwidth history: 10-second buckets over the last hour (360 per name) keeps a chart smooth
# and costs ~10 KiB per bound name at most.
BUCKET_SECONDS = 10
HISTORY_BUCKETS = 360
# The current rate (dashboard cards, tables, /api/status) is over the last RATE_SECONDS, in
# 1-second buckets: a transfer that ended shows 0 within that much (10 s buckets made a card
# show 1.9 MB/s for up to 20 s after a download ended), and 5 s still smooths a bursty one.
RATE_SECONDS = 5


class RateHistory:
    """Bytes in/out per fixed time bucket, for charts, and per second for current rates."""

    __slots__ = ("buckets", "seconds", "clock")

    def __init__(self, clock=time.time):
        self.buckets: deque[list] = deque(maxlen=HISTORY_BUCKETS)  # [start, in, out]
        self.seconds: deque[list] = deque(maxlen=RATE_SECONDS)  # [second, in, out]
        self.clock = clock

    def add(self, n_in: int = 0, n_out: int = 0) -> None:
        """Count bytes now. The splice's per-chunk path is Meter, which keeps the two buckets
        of the current second itself (bench/README.md, "Per-request cost", counters pass)."""
        bucket, current = self.turn(int(self.clock()))
        bucket[1] += n_in
        bucket[2] += n_out
        current[1] += n_in
        current[2] += n_out

    def turn(self, second: int) -> tuple[list, list]:
        """The chart bucket and the rate bucket ``second`` counts in, appended when it starts
        one: a Meter calls it once per second and adds to the two lists itself."""
        for ring, start in ((self.buckets, second // BUCKET_SECONDS * BUCKET_SECONDS),
                            (self.seconds, second)):
            if not ring or ring[-1][0] != start:
                ring.append([start, 0, 0])
        return self.buckets[-1], self.seconds[-1]

    def series(self) -> list[list]:
        return [list(x) for x in self.buckets]

    def rate(self, now: float | None = None) -> tuple[float, float]:
        """Bytes/s in and out over the last RATE_SECONDS (the current second included).

        Reads at most RATE_SECONDS small buckets, so the dashboard can ask it of thousands of
        names every few seconds.
        """
        now = self.clock() if now is None else now
        first = int(now) - RATE_SECONDS + 1
        n_in = n_out = 0
        for second, b_in, b_out in self.seconds:
            if first <= second <= now:
                n_in += b_in
                n_out += b_out
        span = max(1.0, now - first)
        return n_in / span, n_out / span


class Tunnel:
    """One client connection (a muxado session) and what is bound through it."""

    _ids = itertools.count(1)

    def __init__(self, session, peer: str, key: str | None, client_id: str, transport: str):
        self.id = next(self._ids)
        self.session = session
        self.peer = peer
        self.key = key
        self.client_id = client_id
        self.transport = transport
        self.connected_at = time.time()
        self.bindings: set[Binding] = set()
        self.streams_open = 0
        self.streams_total = 0
        self.proven = False  # a signed bind proved the key (unsigned tunnels never are)
        self.proxy_ids: frozenset[str] = frozenset()  # what its signed binds may name (proxy)
        self.ever_bound = False
        self.bytes_in = 0  # public -> origin
        self.bytes_out = 0  # origin -> public
        # Registry.meter's, one per binding through this tunnel (so bounded like bindings).
        self.meters: dict[Binding, Meter] = {}

    @property
    def alive(self) -> bool:
        return not self.session.closed

    def snapshot(self) -> dict:
        return {
            "id": self.id, "peer": self.peer, "key": self.key, "key_proven": self.proven,
            "client_id": self.client_id,
            "transport": self.transport, "connected_at": self.connected_at,
            "heartbeat_rtt_ms": (None if self.session.heartbeat_rtt is None
                                 else round(self.session.heartbeat_rtt * 1000, 2)),
            "streams_open": self.streams_open, "streams_total": self.streams_total,
            "sends_waiting": self.session.sends_waiting,
            "buffered_in": self.session.buffered_in,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "names": sorted(b.name for b in self.bindings),
        }


class Meter:
    """The byte counters one (binding, tunnel) pair moves: ``count_in(n)`` / ``count_out(n)``
    add a spliced chunk to the binding's, the tunnel's and the registry's totals and to the
    binding's and the registry's rate histories, in one Python call.

    The splice calls one of them per chunk, each way, so they are the proxy's hottest Python
    functions: per keep-alive request Registry.count_bytes and RateHistory.add_at were 6 of
    its 17 Python calls, now 2 (bench/README.md, "Per-request cost (issue 16)", counters
    pass). The four current buckets (chart and per-second, binding and registry) are kept here
    and looked up again (RateHistory.turn) only when the clock leaves their second; the clock
    is read once per chunk and compared as a float (no int()). A live registry's rings are
    only ever appended by turn (lib.proxy.groupview rebuilds rings only in its read-only
    views), so the kept buckets stay the rings' last until the second changes.
    """

    __slots__ = ("registry", "binding", "tunnel", "clock", "_start", "_end",
                 "_b_chart", "_b_rate", "_r_chart", "_r_rate")

    def __init__(self, registry: "Registry", binding: "Binding", tunnel: Tunnel):
        self.registry, self.binding, self.tunnel = registry, binding, tunnel
        self.clock = registry.history.clock  # one clock for both histories, as count_bytes had
        self._start = self._end = 0.0  # [start, end): the second the kept buckets count in
        self._b_chart = self._b_rate = self._r_chart = self._r_rate = None

    def count_in(self, n: int) -> None:
        """``n`` bytes public -> origin."""
        self.binding.bytes_in += n
        self.tunnel.bytes_in += n
        self.registry.bytes_in += n
        now = self.clock()
        if not self._start <= now < self._end:
            self._turn(now)
        self._b_chart[1] += n
        self._b_rate[1] += n
        self._r_chart[1] += n
        self._r_rate[1] += n

    def count_out(self, n: int) -> None:
        """``n`` bytes origin -> public."""
        self.binding.bytes_out += n
        self.tunnel.bytes_out += n
        self.registry.bytes_out += n
        now = self.clock()
        if not self._start <= now < self._end:
            self._turn(now)
        self._b_chart[2] += n
        self._b_rate[2] += n
        self._r_chart[2] += n
        self._r_rate[2] += n

    def _turn(self, now: float) -> None:
        second = int(now)
        self._b_chart, self._b_rate = self.binding.history.turn(second)
        self._r_chart, self._r_rate = self.registry.history.turn(second)
        self._start, self._end = second, second + 1


class Binding:
    """A name bound by one owner key through one or more tunnels."""

    def __init__(self, protocol: str, name: str, owner: str | None, method: str, url: str):
        self.protocol = protocol
        self.name = name
        self.owner = owner
        self.method = method
        self.url = url
        self.bound_at = time.time()
        self.tunnels: list[Tunnel] = []
        self._rr = 0
        self.connections = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.refusals: Counter = Counter()
        self.history = RateHistory()

    def pick(self) -> Tunnel | None:
        """The live tunnel with the fewest open streams; ties rotate."""
        tunnels = self.tunnels
        if len(tunnels) == 1:  # the usual binding: nothing to compare or rotate
            only = tunnels[0]
            return only if not only.session.closed else None
        live = [t for t in tunnels if t.alive]
        if not live:
            return None
        self._rr += 1
        n = len(live)
        rotated = live[self._rr % n:] + live[: self._rr % n]
        return min(rotated, key=lambda t: t.streams_open)

    @property
    def streams_open(self) -> int:
        return sum(t.streams_open for t in self.tunnels)

    def snapshot(self, history: bool = False) -> dict:
        rate_in, rate_out = self.history.rate()
        d = {
            "name": self.name, "protocol": self.protocol, "url": self.url,
            "owner": self.owner, "owner_short": (self.owner or "unsigned")[:16],
            "method": self.method, "bound_at": self.bound_at,
            "tunnels": len(self.tunnels), "streams_open": self.streams_open,
            "connections": self.connections, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "rate_in": rate_in, "rate_out": rate_out,
            "refusals": dict(self.refusals),
        }
        if history:
            d["history"] = self.history.series()
            d["tunnel_list"] = [t.snapshot() for t in self.tunnels]
        return d


class Registry:
    def __init__(self):
        self.bindings: dict[tuple[str, str], Binding] = {}
        self.tunnels: dict[int, Tunnel] = {}
        self.refusals: Counter = Counter()
        self.connections = 0
        self.bytes_in = 0
        self.bytes_out = 0
        # Connections carried between the fleet's hosts (lib/proxy/hostlinks.py): counted at
        # the sender (out, besides ``connections``) and at the holder (in, never in
        # ``connections``), the visitors on links now each way, and the links (TLS
        # connections, each a mux session carrying many visitors) open now each way.
        self.forwarded_in = self.forwarded_out = 0
        self.links_in = self.links_out = 0
        self.link_sessions_in = self.link_sessions_out = 0
        self.link_idle_closes = 0  # links this sender closed unused (--fleet-link-idle)
        self.history = RateHistory()
        self.started = time.time()
        self.listeners: dict[str, str] = {}
        # Bumped whenever a name gains or loses a tunnel (lib/proxy/workers.py republishes).
        self.version = 0
        # Called with each Binding that leaves the table (its last tunnel went, or it was
        # unbound): the proxy closes a tcp:PORT listener nobody is bound to any more.
        self.on_unbound: Callable[[Binding], None] | None = None

    def _gone(self, binding: Binding) -> None:
        if self.on_unbound is not None:
            self.on_unbound(binding)

    def add_listener(self, name: str, address) -> None:
        """Show a listener in the status views; ``address`` is (host, port, ...) as bound."""
        self.listeners[name] = format_hostport(*address[:2])

    def add_tunnel(self, session, peer: str, key: str | None, client_id: str,
                   transport: str = "tls") -> Tunnel:
        t = Tunnel(session, peer, key, client_id, transport)
        self.tunnels[t.id] = t
        return t

    @staticmethod
    def number_tunnels_from(first: int) -> None:
        """New tunnels get ids from ``first`` on (each worker of a host its own range)."""
        Tunnel._ids = itertools.count(first)

    def tunnels_of_key(self, key: str | None) -> list[Tunnel]:
        """Tunnels that proved they hold ``key`` (a claim in Auth alone does not count)."""
        return [t for t in self.tunnels.values()
                if t.key == key and key is not None and t.proven]

    def remove_tunnel(self, tunnel: Tunnel) -> None:
        self.version += 1
        self.tunnels.pop(tunnel.id, None)
        for b in list(tunnel.bindings):
            if tunnel in b.tunnels:
                b.tunnels.remove(tunnel)
            if not b.tunnels and self.bindings.pop((b.protocol, b.name), None) is not None:
                self._gone(b)
        tunnel.bindings.clear()
        tunnel.meters.clear()

    def existing(self, protocol: str, name: str) -> Binding | None:
        return self.bindings.get((protocol, name))

    def bind(self, tunnel: Tunnel, protocol: str, name: str, owner: str | None, method: str,
             url: str) -> Binding:
        self.version += 1
        b = self.bindings.get((protocol, name))
        if b is None:
            b = self.bindings[(protocol, name)] = Binding(protocol, name, owner, method, url)
        if tunnel not in b.tunnels:
            b.tunnels.append(tunnel)
        tunnel.bindings.add(b)
        return b

    def unbind(self, binding: Binding) -> None:
        self.version += 1
        popped = self.bindings.pop((binding.protocol, binding.name), None)
        for t in binding.tunnels:
            t.bindings.discard(binding)
            t.meters.pop(binding, None)
        binding.tunnels.clear()
        if popped is not None:
            self._gone(popped)

    def lookup(self, protocols: tuple[str, ...], hostname: str) -> Binding | None:
        """The live binding for ``hostname`` under one of ``protocols``: the name itself, then
        its wildcards (lib.protocol.sniff.wildcard_candidates), most specific first."""
        get = self.bindings.get
        for protocol in protocols:  # the name itself first, without the generator's two calls
            b = get((protocol, hostname))
            if b is not None and b.tunnels:
                return b
        for candidate in itertools.islice(wildcard_candidates(hostname), 1, None):
            for protocol in protocols:
                b = get((protocol, candidate))
                if b is not None and b.tunnels:
                    return b
        return None

    def count_refusal(self, reason: str, binding: Binding | None = None, n: int = 1) -> None:
        self.refusals[reason] += n
        if binding is not None:
            binding.refusals[reason] += n

    def meter(self, binding: Binding, tunnel: Tunnel) -> Meter:
        """The pair's byte counters, made on first use and kept until the binding or the
        tunnel goes (routing looks in ``tunnel.meters`` first: no call per connection). Kept
        only while the tunnel holds the binding: a connection routed before an unbind asks
        after it, and a client binding and unbinding names must not grow the table."""
        m = tunnel.meters.get(binding)
        if m is None:
            m = Meter(self, binding, tunnel)
            if binding in tunnel.bindings:
                tunnel.meters[binding] = m
        return m

    def count_bytes(self, binding: Binding, tunnel: Tunnel, n_in: int = 0, n_out: int = 0) -> None:
        """Both ways at once (the splice's per-chunk path is Meter.count_in/count_out)."""
        m = self.meter(binding, tunnel)
        if n_in or not n_out:
            m.count_in(n_in)
        if n_out:
            m.count_out(n_out)

    def snapshot(self) -> dict:
        rate_in, rate_out = self.history.rate()
        return {
            "uptime": time.time() - self.started,
            "started": self.started,
            "listeners": dict(self.listeners),
            "tunnels": [t.snapshot() for t in self.tunnels.values()],
            "bindings": [b.snapshot() for b in self.bindings.values()],
            "connections": self.connections,
            "forwarded_in": self.forwarded_in, "forwarded_out": self.forwarded_out,
            "links_in": self.links_in, "links_out": self.links_out,
            "link_sessions_in": self.link_sessions_in,
            "link_sessions_out": self.link_sessions_out,
            "link_idle_closes": self.link_idle_closes,
            "streams_open": sum(t.streams_open for t in self.tunnels.values()),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "rate_in": rate_in, "rate_out": rate_out,
            "refusals": dict(self.refusals),
            "history": self.history.series(),
        }
