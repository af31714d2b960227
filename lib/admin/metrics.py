"""Prometheus metrics for one proxy, read from its live registry at scrape time.

``live`` is anything with the proxy's ``registry`` and ``store`` (lib.admin.views.Live, or the
proxy itself).

Public API::

    registry = metrics_registry(live, top_hostnames=TOP_HOSTNAMES)   # a CollectorRegistry
    body, content_type = render(registry)                            # for GET /metrics

Proxy-wide series (``shroud_tunnels``, ``shroud_bytes_total{direction}``,
``shroud_refusals_total{reason}``, ...) have a fixed, small label set. Per-hostname series are
bounded: only the ``top_hostnames`` names with the most traffic get their own
``{protocol, hostname}`` series; every other name is summed into ``hostname="__other__"``, and
``shroud_metrics_hostnames_folded`` says how many were folded. So a flood of bound names costs
a constant number of series, never one per name.

Caveat: a name moving in or out of the top set moves its bytes between its own series and
``__other__``, which Prometheus reads as a counter reset of ``__other__``. The proxy-wide
counters are exact; use them for totals.
"""
from __future__ import annotations

import heapq
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lib.net import muxsession

# 50 names x ~6 series each = 300 series: enough to see who carries the traffic, small
# enough that a proxy with 100,000 names costs a scraper what a proxy with 50 does.
TOP_HOSTNAMES = 50
OTHER = "__other__"


def gauge(name: str, doc: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def by_direction(family, name: str, doc: str, in_value, out_value):
    """A metric family with a ``direction`` label: its ``in`` and ``out`` samples."""
    f = family(name, doc, labels=["direction"])
    f.add_metric(["in"], in_value)
    f.add_metric(["out"], out_value)
    return f


class ShroudCollector:
    def __init__(self, live, top_hostnames: int = TOP_HOSTNAMES):
        self.live = live
        self.top = top_hostnames

    def describe(self):
        return []  # collected on demand; nothing to check at registration

    def collect(self):
        reg = self.live.registry
        yield from self._proxy_wide(reg)
        yield from self._per_hostname(list(reg.bindings.values()))

    def _proxy_wide(self, reg):
        tunnels = list(reg.tunnels.values())
        yield gauge("shroud_uptime_seconds", "Seconds since the proxy started.",
                    max(0.0, time.time() - reg.started))
        yield gauge("shroud_tunnels", "Live tunnels from clients.", len(tunnels))
        yield gauge("shroud_bindings", "Names bound through live tunnels.", len(reg.bindings))
        yield gauge("shroud_streams_open", "Open public connections inside tunnels.",
                    sum(t.streams_open for t in tunnels))
        yield CounterMetricFamily("shroud_public_connections", "Public connections accepted.",
                                  value=reg.connections)
        yield by_direction(CounterMetricFamily, "shroud_bytes", "Bytes carried: in = public "
                           "to origin, out = origin to public.", reg.bytes_in, reg.bytes_out)
        yield by_direction(CounterMetricFamily, "shroud_forwarded_connections", "Public "
                           "connections carried between the fleet's proxies: out = accepted "
                           "here, served by another; in = accepted by another, served here.",
                           reg.forwarded_in, reg.forwarded_out)
        yield by_direction(GaugeMetricFamily, "shroud_fleet_links_open", "Visitors on links to "
                           "(out) and from (in) the fleet's other proxies now.",
                           reg.links_in, reg.links_out)
        yield by_direction(GaugeMetricFamily, "shroud_fleet_link_sessions_open", "Links (TLS "
                           "connections, each carrying many visitors) to (out) and from (in) "
                           "the fleet's other proxies open now.",
                           reg.link_sessions_in, reg.link_sessions_out)
        yield CounterMetricFamily("shroud_fleet_link_idle_closes", "Links to the fleet's other "
                                  "proxies closed here after --fleet-link-idle seconds without "
                                  "a visitor.", value=reg.link_idle_closes)
        yield CounterMetricFamily("shroud_mux_reader_crashes", "Tunnel sessions ended "
                                  "INTERNAL_ERROR by a bug in what their reader called, in "
                                  "this process (tracebacks logged ten at once, then one a "
                                  "minute: lib/net/muxsession.py).",
                                  value=muxsession.reader_crashes)
        c = CounterMetricFamily("shroud_refusals", "Refused connections and binds by reason.",
                                labels=["reason"])
        for reason, n in sorted(reg.refusals.items()):
            c.add_metric([reason], n)
        yield c
        store = self.live.store
        if store is not None:
            # From memory (the blocks in force here): a scrape never waits on the database.
            blocks = store.blocks()
            yield gauge("shroud_blocked_hostnames", "Names blocked by the operator.",
                        len(blocks.names))
            yield gauge("shroud_blocked_keys", "Client keys blocked by the operator.",
                        len(blocks.keys))
        fleet = getattr(self.live, "fleet", None)
        if fleet is not None:
            yield gauge("shroud_store_reachable", "1 while this instance's last heartbeat "
                        "reached the store (lib/proxy/fleet.py), else 0.", int(fleet.reachable))

    def _per_hostname(self, bindings):
        """Series for the top names by traffic, the rest summed into OTHER: bounded."""
        top = heapq.nlargest(self.top, bindings, key=lambda b: b.bytes_in + b.bytes_out)
        top_ids = {id(b) for b in top}
        rest = [b for b in bindings if id(b) not in top_ids]
        yield gauge("shroud_metrics_hostnames_folded",
                    f"Bound names beyond the top {self.top} by traffic, summed into "
                    f"hostname=\"{OTHER}\".", len(rest))
        labels = ["protocol", "hostname"]
        h_bytes = CounterMetricFamily("shroud_hostname_bytes", "Bytes carried per name.",
                                      labels=labels + ["direction"])
        h_conns = CounterMetricFamily("shroud_hostname_connections",
                                      "Public connections routed per name.", labels=labels)
        h_streams = GaugeMetricFamily("shroud_hostname_streams_open",
                                      "Open public connections per name.", labels=labels)
        h_tunnels = GaugeMetricFamily("shroud_hostname_tunnels",
                                      "Live tunnels per name.", labels=labels)
        for b in top:
            lv = [b.protocol, b.name]
            h_bytes.add_metric(lv + ["in"], b.bytes_in)
            h_bytes.add_metric(lv + ["out"], b.bytes_out)
            h_conns.add_metric(lv, b.connections)
            h_streams.add_metric(lv, b.streams_open)
            h_tunnels.add_metric(lv, len(b.tunnels))
        if rest:
            lv = ["", OTHER]
            h_bytes.add_metric(lv + ["in"], sum(b.bytes_in for b in rest))
            h_bytes.add_metric(lv + ["out"], sum(b.bytes_out for b in rest))
            h_conns.add_metric(lv, sum(b.connections for b in rest))
            h_streams.add_metric(lv, sum(b.streams_open for b in rest))
            h_tunnels.add_metric(lv, sum(len(b.tunnels) for b in rest))
        yield from (h_bytes, h_conns, h_streams, h_tunnels)


def metrics_registry(live, top_hostnames: int = TOP_HOSTNAMES) -> CollectorRegistry:
    """A registry of its own (not the process-global one), so several proxies in one
    process, as in tests, never collide."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShroudCollector(live, top_hostnames))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
