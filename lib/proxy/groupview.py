"""One host's workers seen as one proxy: what the dashboard, the API and /metrics read, and the
operator actions that reach the worker holding the tunnel.

Public API::

    export_state(registry, workers=None) -> dict     # this worker's live state, JSON-able
    merged_registry(local, states, workers=None) -> Registry   # local + the siblings' states,
                                      # read-only; .workers: one line per worker (pid, rss, ...)
    GroupRegistry(local, workers)     # acts as a Registry: every attribute read comes from
                                      # a merged one (siblings asked once per request)
    GroupActions(actions, workers)    # OperatorActions reaching the tunnel's worker (below)

A sibling's state arrives as plain data (lib/proxy/workers.py, question "state"); the merged
registry holds stand-ins with the attributes the dashboard reads (a tunnel's ``session`` has
only ``heartbeat_rtt`` and ``closed``). Counters add up: a connection counts where it was
accepted, its bytes where it was served (routing.py), so nothing is counted twice. A sibling
that does not answer within ASK_TIMEOUT is left out of that answer.

Operator actions: disconnecting a tunnel asks the sibling that holds it. A block is written
once to the store; every worker's routing and binds read the store's blocks (within its cache
time), and its fleet watcher drops the bindings it covers (lib/proxy/fleet.py).
"""
from __future__ import annotations

import os
import time
from collections import Counter
from types import SimpleNamespace

import gevent

from lib.proxy.registry import RateHistory, Registry

# What crosses the fleet's links (lib/proxy/registry.py: counters, visitors on links now, and
# the links themselves).
FLEET_COUNTS = ("forwarded_in", "forwarded_out", "links_in", "links_out", "link_sessions_in",
                "link_sessions_out", "link_idle_closes")
# A sibling busy beyond this is left out of one dashboard answer rather than stall it.
ASK_TIMEOUT = 1.0
# One dashboard request (one greenlet) reads the registry many times: it merges once; the
# next request merges afresh.
CACHE_SECONDS = 1.0


def export_state(registry: Registry, workers=None) -> dict:
    """This worker's tunnels, bindings and counters as JSON-able data."""
    return {
        "pid": os.getpid(), "rss": rss_bytes(),
        "started": registry.started, "listeners": dict(registry.listeners),
        "connections": registry.connections, "bytes_in": registry.bytes_in,
        **{k: getattr(registry, k) for k in FLEET_COUNTS},
        "bytes_out": registry.bytes_out, "refusals": dict(registry.refusals),
        "history": registry.history.series(),
        "seconds": [list(x) for x in registry.history.seconds],
        "handoffs": dict(workers.counters) if workers is not None else {},
        "names_elsewhere": workers.names_elsewhere() if workers is not None else 0,
        "tunnels": [dict(t.snapshot(), alive=t.alive,
                         bindings=[[b.protocol, b.name] for b in t.bindings])
                    for t in list(registry.tunnels.values())],
        "bindings": [dict(b.snapshot(history=True), tunnel_ids=[t.id for t in b.tunnels],
                          seconds=[list(x) for x in b.history.seconds])
                     for b in list(registry.bindings.values())],
    }


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), for the per-worker baseline."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Tunnel:
    """A sibling's tunnel, as the dashboard reads one."""

    def __init__(self, d: dict):
        self.id, self.peer, self.key = d["id"], d["peer"], d.get("key")
        self.proven = bool(d.get("key_proven"))
        self.client_id, self.transport = d.get("client_id", ""), d.get("transport", "")
        self.connected_at = d.get("connected_at", 0.0)
        rtt = d.get("heartbeat_rtt_ms")
        self.session = SimpleNamespace(heartbeat_rtt=None if rtt is None else rtt / 1000,
                                       closed=not d.get("alive", True))
        self.streams_open, self.streams_total = d.get("streams_open", 0), d.get(
            "streams_total", 0)
        self.bytes_in, self.bytes_out = d.get("bytes_in", 0), d.get("bytes_out", 0)
        self.bindings: set = set()
        self._data = d

    @property
    def alive(self) -> bool:
        return not self.session.closed

    def snapshot(self) -> dict:
        d = {k: v for k, v in self._data.items() if k not in ("alive", "bindings")}
        d["names"] = sorted(b.name for b in self.bindings)
        return d


class _Binding:
    """A name bound on several workers at once (or on a sibling only), as the dashboard reads
    one."""

    def __init__(self, protocol: str, name: str):
        self.protocol, self.name = protocol, name
        self.url, self.owner, self.method, self.bound_at = "", None, "", time.time()
        self.tunnels: list = []
        self.connections = self.bytes_in = self.bytes_out = 0
        self.refusals: Counter = Counter()
        self.history = RateHistory()

    @property
    def streams_open(self) -> int:
        return sum(t.streams_open for t in self.tunnels)

    def __hash__(self):
        return hash((self.protocol, self.name))

    def snapshot(self, history: bool = False) -> dict:
        rate_in, rate_out = self.history.rate()
        d = {"name": self.name, "protocol": self.protocol, "url": self.url,
             "owner": self.owner, "owner_short": (self.owner or "unsigned")[:16],
             "method": self.method, "bound_at": self.bound_at, "tunnels": len(self.tunnels),
             "streams_open": self.streams_open, "connections": self.connections,
             "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "rate_in": rate_in,
             "rate_out": rate_out, "refusals": dict(self.refusals)}
        if history:
            d["history"] = self.history.series()
            d["tunnel_list"] = [t.snapshot() for t in self.tunnels]
        return d


def _merge_ring(ring, series) -> None:
    by_start = {b[0]: b for b in ring}
    for start, n_in, n_out in series:
        if start in by_start:
            by_start[start][1] += n_in
            by_start[start][2] += n_out
        else:
            by_start[start] = [start, n_in, n_out]
    ring.clear()
    ring.extend(by_start[k] for k in sorted(by_start)[-(ring.maxlen or len(by_start)):])


def _merge_history(into: RateHistory, series, seconds=()) -> None:
    """Add a worker's chart buckets and per-second rate buckets into ``into``."""
    _merge_ring(into.buckets, series)
    _merge_ring(into.seconds, seconds)


def merged_registry(local: Registry, states: list, workers=None) -> Registry:
    """A Registry holding ``local``'s state and every one of ``states`` (export_state's
    answers), for reading. :raises KeyError, TypeError: a malformed state."""
    view = Registry()
    view.listeners = dict(local.listeners)
    view.started = local.started
    view.workers = []  # one line per worker: the dashboard's and the benchmark's breakdown
    for state in [export_state(local, workers)] + list(states):
        _merge_one(view, state)
        view.workers.append({k: state.get(k) for k in ("pid", "rss", "connections",
                                                       "handoffs", "names_elsewhere")}
                            | {"tunnels": len(state["tunnels"]),
                               "bindings": len(state["bindings"])})
    view.workers.sort(key=lambda w: w["pid"] or 0)
    return view


def _merge_one(view: Registry, state: dict) -> None:
    view.started = min(view.started, state["started"])
    view.connections += state["connections"]
    for k in FLEET_COUNTS:
        setattr(view, k, getattr(view, k) + state.get(k, 0))
    view.bytes_in += state["bytes_in"]
    view.bytes_out += state["bytes_out"]
    view.refusals.update(state["refusals"])
    _merge_history(view.history, state["history"], state.get("seconds", ()))
    tunnels = {}
    for d in state["tunnels"]:
        tunnels[d["id"]] = view.tunnels[d["id"]] = _Tunnel(d)
    for d in state["bindings"]:
        key = (d["protocol"], d["name"])
        b = view.bindings.get(key)
        if b is None:
            b = view.bindings[key] = _Binding(*key)
            b.url, b.owner, b.method, b.bound_at = d["url"], d["owner"], d["method"], d[
                "bound_at"]
        b.bound_at = min(b.bound_at, d["bound_at"])
        b.connections += d["connections"]
        b.bytes_in += d["bytes_in"]
        b.bytes_out += d["bytes_out"]
        b.refusals.update(d["refusals"])
        _merge_history(b.history, d.get("history", []), d.get("seconds", ()))
        for tid in d["tunnel_ids"]:
            t = tunnels.get(tid)
            if t is not None:
                b.tunnels.append(t)
                t.bindings.add(b)


class GroupActions:
    """The proxy's OperatorActions, reaching the sibling workers too."""

    def __init__(self, actions, workers):
        self.actions = actions
        self.workers = workers

    def disconnect_tunnel(self, tunnel_id: int, actor: str, detail: str = "") -> bool:
        if self.actions.disconnect_tunnel(tunnel_id, actor, detail):
            return True
        answers = self.workers.ask_all({"op": "disconnect-tunnel", "tunnel": int(tunnel_id),
                                        "actor": actor, "detail": detail}, ASK_TIMEOUT)
        return any(a.get("done") for a in answers if isinstance(a, dict))

    def __getattr__(self, name):
        return getattr(self.actions, name)  # blocks: the store, read by every worker


class GroupRegistry:
    """Reads as a Registry holding every worker's state (``local``'s and its siblings')."""

    def __init__(self, local: Registry, group):
        self.local = local
        self.group = group  # the WorkerGroup (``workers`` reads the merged breakdown)
        self._merged: Registry | None = None
        self._for = None  # (the greenlet that asked, when)

    def merged(self) -> Registry:
        now, asker = time.monotonic(), gevent.getcurrent()
        if (self._merged is None or self._for[0] is not asker
                or now - self._for[1] > CACHE_SECONDS):
            states = [s for s in self.group.ask_all({"op": "state"}, ASK_TIMEOUT)
                      if isinstance(s, dict) and "tunnels" in s]
            self._merged = merged_registry(self.local, states, self.group)
            self._for = (asker, now)
        return self._merged

    def __getattr__(self, name):
        return getattr(self.merged(), name)
