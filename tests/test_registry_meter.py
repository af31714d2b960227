"""lib.proxy.registry's byte counters (Meter): what they count and what a chunk costs.

- Every figure the status API, the dashboard and the metrics read (binding, tunnel and registry
  totals; the chart's 10-second buckets; the per-second rate buckets) comes out exactly as a
  plain recount of the same chunks gives it, with a fake clock crossing second and 10-second
  boundaries (float and integer times, several tunnels and bindings sharing the registry's
  history, both directions interleaved, rings past their bound).
- A spliced chunk costs one Python call (the Meter's count_in/count_out, which routing hands
  to the splice), counted with sys.setprofile: it was three (Registry.count_bytes and two
  RateHistory.add_at), bench/README.md "Per-request cost (issue 16)", counters pass.
"""
from __future__ import annotations

import random
import types
from collections import Counter, defaultdict

from lib.proxy import routing
from lib.proxy.registry import BUCKET_SECONDS, HISTORY_BUCKETS, RATE_SECONDS, Registry
from lib.proxy.server import ProxyConfig
from tests.support.calls import PythonCalls


class FakeSession:
    closed = False
    heartbeat_rtt = 0.01
    sends_waiting = 0
    buffered_in = 0

    def __init__(self, open_stream=None):
        self.open = open_stream


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def recount(chunks, width: int, keep: int) -> list[list]:
    """[start, in, out] per ``width``-second bucket with traffic, the last ``keep`` of them."""
    sums = defaultdict(lambda: [0, 0])
    order = []
    for t, n_in, n_out in chunks:
        start = int(t) // width * width
        if start not in sums:
            order.append(start)
        sums[start][0] += n_in
        sums[start][1] += n_out
    return [[s, *sums[s]] for s in order][-keep:]


def test_every_figure_matches_a_recount_across_second_boundaries():
    clock = Clock(50_000.0)
    r = Registry()
    r.history.clock = clock
    ta = r.add_tunnel(FakeSession(), "192.0.2.1:1", None, "a" * 32)
    tb = r.add_tunnel(FakeSession(), "192.0.2.2:2", None, "b" * 32)
    web = r.bind(ta, "http", "web.test", None, "tofu", "http://web.test")
    r.bind(tb, "http", "web.test", None, "tofu", "http://web.test")  # a second tunnel
    app = r.bind(tb, "tls", "app.test", None, "tofu", "tls://app.test")
    meters = [r.meter(web, ta), r.meter(web, tb), r.meter(app, tb)]
    assert r.meter(web, ta) is meters[0]  # kept, not made per connection
    rng = random.Random(16)
    chunks = {id(web): [], id(app): [], "all": []}
    by_tunnel = defaultdict(lambda: [0, 0])
    steps = [0.0, 0.001, 0.25, 0.999, 1.0, 1.5, 3.0, 9.999, 10.0, 0.0001]
    for i in range(3000):
        clock.now += rng.choice(steps)
        if i % 97 == 0:
            clock.now = float(int(clock.now) + 1)  # exactly on a second
        if i % 211 == 0:
            clock.now = int(clock.now) + 2  # an int clock, as a test's may be
        m = rng.choice(meters)
        n = rng.randrange(1, 70_000)
        chunk = (clock.now, n, 0) if rng.random() < 0.5 else (clock.now, 0, n)
        (m.count_in if chunk[1] else m.count_out)(n)
        chunks[id(m.binding)].append(chunk)
        chunks["all"].append(chunk)
        by_tunnel[m.tunnel.id][0] += chunk[1]
        by_tunnel[m.tunnel.id][1] += chunk[2]
    assert clock.now - 50_000 > BUCKET_SECONDS * HISTORY_BUCKETS  # the chart ring overflowed
    for counted, history, key in ((web, web.history, id(web)), (app, app.history, id(app)),
                                  (r, r.history, "all")):
        seen = chunks[key]
        assert (counted.bytes_in, counted.bytes_out) == (sum(c[1] for c in seen),
                                                         sum(c[2] for c in seen))
        assert history.series() == recount(seen, BUCKET_SECONDS, HISTORY_BUCKETS)
        assert [list(s) for s in history.seconds] == recount(seen, 1, RATE_SECONDS)
    for t in (ta, tb):
        assert [t.bytes_in, t.bytes_out] == by_tunnel[t.id]
    snap = r.snapshot()  # what /api/status and the dashboard read
    assert (snap["bytes_in"], snap["bytes_out"]) == (r.bytes_in, r.bytes_out)


def test_count_bytes_and_the_meter_fill_the_same_buckets():
    """count_bytes (both ways at once) and a meter's calls land in one set of buckets: the
    registry's clock serves both histories, read once per call."""
    clock = Clock(60_009.5)
    r = Registry()
    r.history.clock = clock
    t = r.add_tunnel(FakeSession(), "192.0.2.1:1", None, "a" * 32)
    b = r.bind(t, "tcp", "tcp:20000", None, "tofu", "tcp://127.0.0.1:20000")
    r.count_bytes(b, t, n_in=100, n_out=13)
    r.meter(b, t).count_out(7)
    clock.now = 60_010.0  # a new second and a new chart bucket
    r.meter(b, t).count_in(5)
    r.count_bytes(b, t, n_out=1)
    for h in (b.history, r.history):
        assert h.series() == [[60_000, 100, 20], [60_010, 5, 1]]
        assert [list(s) for s in h.seconds] == [[60_009, 100, 20], [60_010, 5, 1]]
    span = RATE_SECONDS - 1  # from the first second counted to now, on a whole second
    assert h.rate(60_010.0) == ((100 + 5) / span, (20 + 1) / span)


def test_meters_go_with_their_binding_or_tunnel():
    """tunnel.meters holds one meter per binding through it: unbinding or losing the tunnel
    drops them (bounded like the bindings)."""
    r = Registry()
    t = r.add_tunnel(FakeSession(), "192.0.2.1:1", None, "a" * 32)
    a = r.bind(t, "http", "a.test", None, "tofu", "http://a.test")
    b = r.bind(t, "http", "b.test", None, "tofu", "http://b.test")
    r.meter(a, t), r.meter(b, t)
    r.unbind(a)
    assert list(t.meters) == [b]
    r.remove_tunnel(t)
    assert t.meters == {}


def test_a_spliced_chunk_costs_one_python_call(monkeypatch):
    """Routing hands the splice the pair's meter; N chunks each way cost N Python calls each
    way, plus a few once a second (three per chunk before: Registry.count_bytes and
    RateHistory.add_at twice)."""
    n = 2000
    r = Registry()
    sent = []
    stream = types.SimpleNamespace(id=1, sendall=sent.append,
                                   send_nowait=lambda data: sent.append(data) or len(data))
    t = r.add_tunnel(FakeSession(open_stream=lambda: stream), "192.0.2.1:1", None, "a" * 32)
    b = r.bind(t, "http", "a.test", None, "tofu", "http://a.test")
    router = routing.PublicRouter(ProxyConfig(idle_timeout=None), r)
    measured = []

    def splice(a, s, on_a_to_b, on_b_to_a, **kw):
        on_a_to_b(1), on_b_to_a(1)  # the meter's first second turned outside the probe
        with PythonCalls() as calls:
            for _ in range(n):
                on_a_to_b(13)
                on_b_to_a(13)
        measured.append(Counter(calls.names))
        return 0, 0
    monkeypatch.setattr(routing, "splice", splice)
    router.forward(types.SimpleNamespace(getsockname=lambda: ("127.0.0.1", 80)),
                   ("127.0.0.1", 1), router.choose_tunnel(b), b"GET", None, "http")
    (names,) = measured
    # A second boundary or two while it runs: a few calls each (Meter._turn, RateHistory.turn).
    turns = {k: v for k, v in names.items() if k in ("Meter._turn", "RateHistory.turn")}
    assert sum(turns.values()) <= 10
    assert names - Counter(turns) == Counter({"Meter.count_in": n, "Meter.count_out": n})
    assert (b.bytes_in, b.bytes_out) == (3 + 1 + 13 * n, 1 + 13 * n)
    assert (t.bytes_in, r.bytes_out) == (b.bytes_in, b.bytes_out)


def test_a_meter_asked_for_after_its_binding_went_is_not_kept():
    # A connection routed just before an unbind asks for its meter after it (routing does,
    # once StartProxy is sent): kept, it stayed in tunnel.meters until the tunnel went, so a
    # client binding and unbinding a name while visitors come grew the table without bound.
    r = Registry()
    t = r.add_tunnel(FakeSession(), "192.0.2.1:1", None, "a" * 32)
    for _ in range(100):
        b = r.bind(t, "http", "churn.test", None, "tofu", "http://churn.test")
        r.unbind(b)
        r.meter(b, t).count_in(1)  # still counted
    assert t.meters == {}
    assert r.bytes_in == 100
    kept = r.bind(t, "http", "kept.test", None, "tofu", "http://kept.test")
    assert r.meter(kept, t) is r.meter(kept, t) is t.meters[kept]
