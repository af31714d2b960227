"""Read-only views of the proxy's live state for the dashboard and its JSON API.

Pure functions over a :class:`lib.proxy.registry.Registry` (and the ownership store for blocks); no
Flask, no I/O. ``live`` is anything with ``registry``, ``store``, ``hostname`` and ``fingerprint``
(lib.admin.views.Live). Rates are the registry's own (``RateHistory.rate``). They never change the live state, and they are cheap enough to run every few
seconds with thousands of bound names: a page of rows is built in full, the rest only as far
as filtering and sorting need.

Public API::

    overview(live, now=None) -> dict        # proxy-wide: uptime, listeners, counts, totals,
                                            # rates, refusals, throughput chart
    query_bindings(registry, q="", protocol="", sort="name", order="asc", page=1,
                   per_page=DEFAULT_PER_PAGE, now=None) -> Page
    binding_detail(registry, protocol, name, now=None) -> dict | None   # with tunnels and chart
    query_tunnels(registry, q="", sort="connected_at", order="desc", page=1,
                  per_page=DEFAULT_PER_PAGE, now=None) -> Page
    blocks(store) -> dict                    # {"hostnames": [...], "keys": [...]}
    blocked_state(store, name=None, key=None) -> bool
    audit(store, limit=200) -> list[dict]
    fleet(store, member, now=None) -> dict   # every instance of the fleet and every name
                                             # bound anywhere (from the store's live registry)
    chart(history, now=None, since=None) -> dict  # {"t", "in", "out"} bytes/s from since
    public_link(protocol, name, listeners) -> str | None  # what a visitor opens: https://NAME
    QueryError(ValueError)                   # a bad sort key, order or page; says which

A Page is a dict: ``{"items", "total", "page", "per_page", "pages", "sort", "order", "q"}``.
"""
from __future__ import annotations

import time

from lib.errors import ShroudError
from lib.hostport import AddressError, parse_hostport
from lib.proxy.registry import BUCKET_SECONDS, HISTORY_BUCKETS

# One page of the hostname table: 50 rows fills a screen; 500 is the most a browser table
# renders smoothly every two seconds, and bounds the work a single API call can ask for.
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 500
# A search string longer than any host name (253) plus some slack is not a search.
MAX_QUERY_LEN = 300
# The audit list shown: a screenful of recent history; the store keeps more (AUDIT_KEEP).
MAX_AUDIT = 1000
# The fleet view reads at most this many live binding rows and lists at most MAX_FLEET_NAMES
# names (the busiest-looking first: most instances); the totals are always exact counts of
# what was read.
MAX_FLEET_ROWS = 20000
MAX_FLEET_NAMES = 1000

BINDING_SORTS = {
    "name": lambda r: r["name"],
    "protocol": lambda r: (r["protocol"], r["name"]),
    "owner": lambda r: (r["owner"] or "", r["name"]),
    "tunnels": lambda r: r["tunnels"],
    "streams": lambda r: r["streams_open"],
    "connections": lambda r: r["connections"],
    "bytes_in": lambda r: r["bytes_in"],
    "bytes_out": lambda r: r["bytes_out"],
    "bytes": lambda r: r["bytes_in"] + r["bytes_out"],
    "rate": lambda r: r["rate_in"] + r["rate_out"],
    "refusals": lambda r: r["refusals_total"],
    "bound_at": lambda r: r["bound_at"],
}
TUNNEL_SORTS = {
    "id": lambda t: t.id,
    "peer": lambda t: t.peer,
    "key": lambda t: t.key or "",
    "connected_at": lambda t: t.connected_at,
    "streams": lambda t: t.streams_open,
    "bytes": lambda t: t.bytes_in + t.bytes_out,
    "rtt": lambda t: (t.session.heartbeat_rtt is None, t.session.heartbeat_rtt or 0.0),
}


class QueryError(ShroudError, ValueError):
    """A query parameter the API cannot honour; the message names it and the choices."""


# --- rates and charts ------------------------------------------------------------------------

def chart(history, now: float | None = None, since: float | None = None) -> dict:
    """Bytes/s per 10 s bucket, gaps filled with zeros (uPlot's columns), from ``since`` (when
    the proxy started or the name was bound) or an hour ago, whichever is later: a young
    proxy's chart spans its own life, not an hour of zeros with a spike at the right edge. At
    least two buckets, so the chart has a width.

    The newest bucket is still filling: its rate is over the seconds elapsed so far.
    """
    now = time.time() if now is None else now
    last = int(now) // BUCKET_SECONDS * BUCKET_SECONDS
    first = last - (HISTORY_BUCKETS - 1) * BUCKET_SECONDS
    if since is not None:
        first = max(first, min(last - BUCKET_SECONDS,
                               int(since) // BUCKET_SECONDS * BUCKET_SECONDS))
    by_start = {b[0]: b for b in history.buckets if b[0] >= first}
    t, r_in, r_out = [], [], []
    for start in range(first, last + 1, BUCKET_SECONDS):
        b = by_start.get(start)
        span = BUCKET_SECONDS if start < last else max(1.0, now - start)
        t.append(start)
        r_in.append(round(b[1] / span, 1) if b else 0)
        r_out.append(round(b[2] / span, 1) if b else 0)
    return {"t": t, "in": r_in, "out": r_out, "bucket_seconds": BUCKET_SECONDS}


# --- rows ------------------------------------------------------------------------------------

# A bound protocol -> (the URL scheme a visitor's browser uses, the listener serving it, the
# scheme's default port). tcp: names and wildcards have no page to open.
LINKS = {"tls": ("https", "https", 443), "https": ("https", "https", 443),
         "http": ("http", "http", 80)}


def public_link(protocol: str, name: str, listeners: dict) -> str | None:
    """What a visitor opens for a bound name: ``https://NAME`` (with the port when the https
    listener is not on 443), ``http://NAME`` for http: names; on a one-port platform, whose
    router ends TLS, ``https://NAME``. None when there is nothing to open (tcp:, wildcards,
    no listener for it)."""
    if protocol not in LINKS or name.startswith("*."):
        return None
    scheme, listener, default = LINKS[protocol]
    addr = listeners.get(listener)
    if addr is None:
        return f"https://{name}" if protocol == "http" and "one-port" in listeners else None
    try:
        port = parse_hostport(addr, port_zero=True)[1]
    except AddressError:
        return None
    return f"{scheme}://{name}" + ("" if port == default else f":{port}")


def _binding_row(b, now: float, listeners: dict) -> dict:
    rate_in, rate_out = b.history.rate(now)
    return {
        "id": f"{b.protocol}/{b.name}", "name": b.name, "protocol": b.protocol, "url": b.url,
        "link": public_link(b.protocol, b.name, listeners),
        "owner": b.owner, "owner_short": (b.owner or "unsigned")[:16], "method": b.method,
        "bound_at": b.bound_at, "tunnels": len(b.tunnels), "streams_open": b.streams_open,
        "connections": b.connections, "bytes_in": b.bytes_in, "bytes_out": b.bytes_out,
        "rate_in": round(rate_in, 1), "rate_out": round(rate_out, 1),
        "refusals": dict(b.refusals), "refusals_total": sum(b.refusals.values()),
    }


def _tunnel_row(t, now: float) -> dict:
    rtt = t.session.heartbeat_rtt
    return {
        # The key as Auth claimed it; proven once a signed bind verified on this tunnel.
        "id": t.id, "peer": t.peer, "key": t.key, "key_proven": t.proven,
        "key_short": (t.key or "unsigned")[:16],
        "client_id": t.client_id, "transport": t.transport, "connected_at": t.connected_at,
        "heartbeat_rtt_ms": None if rtt is None else round(rtt * 1000, 2),
        "streams_open": t.streams_open, "streams_total": t.streams_total,
        "bytes_in": t.bytes_in, "bytes_out": t.bytes_out, "alive": t.alive,
        "names": sorted(f"{b.protocol}/{b.name}" for b in t.bindings),
    }


def _page(items: list, sort: str, order: str, page, per_page, q: str) -> dict:
    per_page = _int(per_page, "per_page", DEFAULT_PER_PAGE)
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise QueryError(f"per_page must be 1..{MAX_PER_PAGE}")
    page = _int(page, "page", 1)
    if page < 1:
        raise QueryError("page must be 1 or more")
    total = len(items)
    pages = max(1, -(-total // per_page))
    page = min(page, pages)  # a table that shrank under the reader shows its last page
    lo = (page - 1) * per_page
    return {"items": items[lo:lo + per_page], "total": total, "page": page,
            "per_page": per_page, "pages": pages, "sort": sort, "order": order, "q": q}


def _int(value, what: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise QueryError(f"{what} must be an integer, not {str(value)[:20]!r}") from None


def _check(sort: str, order: str, q: str, sorts: dict) -> None:
    if sort not in sorts:
        raise QueryError(f"sort must be one of {', '.join(sorted(sorts))}")
    if order not in ("asc", "desc"):
        raise QueryError("order must be asc or desc")
    if len(q) > MAX_QUERY_LEN:
        raise QueryError(f"search text is longer than {MAX_QUERY_LEN} characters")


def query_bindings(registry, q: str = "", protocol: str = "", sort: str = "name",
                   order: str = "asc", page=1, per_page=DEFAULT_PER_PAGE, now=None) -> dict:
    """Bound names matching ``q`` (a substring of the name, URL or owner key), one page."""
    q = (q or "").strip().lower()
    _check(sort, order, q, BINDING_SORTS)
    now = time.time() if now is None else now
    rows = []
    for b in list(registry.bindings.values()):
        if protocol and b.protocol != protocol:
            continue
        if q and q not in b.name and q not in (b.owner or "unsigned") and q not in b.url:
            continue
        rows.append(_binding_row(b, now, registry.listeners))
    rows.sort(key=BINDING_SORTS[sort], reverse=(order == "desc"))
    return _page(rows, sort, order, page, per_page, q)


def query_tunnels(registry, q: str = "", sort: str = "connected_at", order: str = "desc",
                  page=1, per_page=DEFAULT_PER_PAGE, now=None) -> dict:
    """Live tunnels matching ``q`` (id, peer address, key or a bound name), one page."""
    q = (q or "").strip().lower()
    _check(sort, order, q, TUNNEL_SORTS)
    now = time.time() if now is None else now
    tunnels = list(registry.tunnels.values())
    if q:
        tunnels = [t for t in tunnels if q == str(t.id) or q in t.peer
                   or q in (t.key or "unsigned") or any(q in b.name for b in t.bindings)]
    tunnels.sort(key=TUNNEL_SORTS[sort], reverse=(order == "desc"))
    result = _page(tunnels, sort, order, page, per_page, q)
    result["items"] = [_tunnel_row(t, now) for t in result["items"]]
    return result


def binding_detail(registry, protocol: str, name: str, now=None) -> dict | None:
    """One bound name with its tunnels and last hour's chart; None if it is not bound."""
    now = time.time() if now is None else now
    b = registry.bindings.get((protocol, name))
    if b is None:
        return None
    d = _binding_row(b, now, registry.listeners)
    d["tunnel_list"] = [_tunnel_row(t, now) for t in b.tunnels]
    d["chart"] = chart(b.history, now, since=b.bound_at)
    return d


def blocked_state(store, name: str | None = None, key: str | None = None) -> bool:
    if store is None:
        return False
    try:
        return store.is_blocked(hostname=name, key=key)
    except ValueError:  # not a host name (e.g. "tcp:PORT" passes; garbage does not)
        return False


def overview(live, now=None) -> dict:
    """Proxy-wide state: what the overview page's header and chart show."""
    now = time.time() if now is None else now
    reg = live.registry
    rate_in, rate_out = reg.history.rate(now)
    tunnels = list(reg.tunnels.values())
    proven = {t.key for t in tunnels if t.key is not None and t.proven}
    store = live.store
    return {
        "hostname": live.hostname,
        "fingerprint": live.fingerprint,
        "started": reg.started, "uptime": now - reg.started, "now": now,
        "listeners": dict(reg.listeners),
        "tunnels": len(tunnels), "bindings": len(reg.bindings),
        # Keys proven by a signed bind; those only claimed in Auth (anyone may claim a public
        # key) are counted apart.
        "keys": len(proven),
        "keys_unproven": len({t.key for t in tunnels if t.key is not None} - proven),
        "streams_open": sum(t.streams_open for t in tunnels),
        "connections": reg.connections,
        "forwarded_in": reg.forwarded_in, "forwarded_out": reg.forwarded_out,
        "links_in": reg.links_in, "links_out": reg.links_out,
        "link_sessions_in": reg.link_sessions_in, "link_sessions_out": reg.link_sessions_out,
        "link_idle_closes": reg.link_idle_closes,
        "bytes_in": reg.bytes_in, "bytes_out": reg.bytes_out,
        "rate_in": round(rate_in, 1), "rate_out": round(rate_out, 1),
        "refusals": dict(reg.refusals), "refusals_total": sum(reg.refusals.values()),
        # From the proxy's memory (store.blocks()): the overview works with the database away.
        "blocked_hostnames": len(store.blocks().names) if store is not None else 0,
        "blocked_keys": len(store.blocks().keys) if store is not None else 0,
        "chart": chart(reg.history, now, since=reg.started),
    }


def blocks(store) -> dict:
    if store is None:
        return {"hostnames": [], "keys": []}
    return {"hostnames": [b._asdict() for b in store.blocked_hostnames()],
            "keys": [b._asdict() for b in store.blocked_keys()]}


def audit(store, limit: int = 200) -> list:
    if store is None:
        return []
    return [e._asdict() for e in store.audit_log(max(1, min(int(limit), MAX_AUDIT)))]


# What each instance's heartbeat reports (lib/proxy/fleet.py), and the fleet view sums.
INSTANCE_STATS = ("tunnels", "bindings", "connections", "bytes_in", "bytes_out", "rate_in",
                  "rate_out", "streams_open", "forwarded_in", "forwarded_out", "links_in",
                  "links_out")


def fleet(store, member, now: float | None = None) -> dict:
    """The fleet as the store's live registry has it: instances (state "live", or "late" when a
    heartbeat is overdue) and the names bound anywhere, with the instances holding them.

    :raises lib.proxy.store.OwnershipError: the store cannot be read (the caller answers 503).
    """
    now = time.time() if now is None else now
    interval = member.interval if member is not None else 5.0
    rows = store.live_bindings(limit=MAX_FLEET_ROWS)
    names: dict = {}
    per_instance: dict = {}
    for b in rows:
        entry = names.setdefault(b.name, {"name": b.name, "protocols": set(), "instances": set(),
                                          "tunnels": 0, "key": b.key})
        entry["protocols"].add(b.protocol)
        entry["instances"].add(b.instance)
        entry["tunnels"] += 1
        per_instance.setdefault(b.instance, set()).add(b.name)
    instances = []
    for i in store.instances():
        age = max(0.0, now - i.heartbeat)
        instances.append({
            "id": i.id, "hostname": i.hostname, "addresses": i.addresses,
            "fingerprint": i.fingerprint, "started": i.started, "heartbeat": i.heartbeat,
            "age": age, "state": "live" if age <= 2 * interval else "late",
            "this": member is not None and i.id == member.id,
            "names": len(per_instance.get(i.id, ())), **{
                k: i.stats.get(k, 0) for k in INSTANCE_STATS}})
    blocks = store.blocks()
    listed = sorted(names.values(), key=lambda e: (-len(e["instances"]), e["name"]))
    return {
        "store": store.describe(), "this": member.id if member is not None else None,
        "reachable": member.reachable if member is not None else True,
        "heartbeat_interval": interval, "instances": instances,
        # Each connection once: where it was accepted (connections), its bytes where it was
        # served; a forwarded one also as forwarded_out at its sender and forwarded_in at its
        # holder (lib/proxy/hostlinks.py), never as a second connection.
        "totals": {k: sum(i[k] for i in instances) for k in INSTANCE_STATS},
        "names_total": len(names), "rows_read": len(rows), "truncated": len(rows) >= MAX_FLEET_ROWS,
        "names": [{**e, "protocols": sorted(e["protocols"]), "instances": sorted(e["instances"]),
                   "key_short": (e["key"] or "unsigned")[:16],
                   "blocked": blocks.covering(e["name"]) is not None}
                  for e in listed[:MAX_FLEET_NAMES]],
    }
