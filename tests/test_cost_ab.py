"""bench/cost_ab.py's arithmetic (medians, pooled user/sys, ratios, the round order) and the
single-write origin's closing answer that its fresh-connection-per-request row relies on. The
bench itself (real processes, wrk, sshd) is run by hand: bench/README.md."""
from __future__ import annotations

from bench import cost_ab, single_write_origin


def m(n, us, ut=0, st=0, **kw):
    """One measurement: n requests costing us µs each (schedstat ns), ut/st ticks."""
    return dict(n=n, ns=us * n * 1000, ut=ut, st=st, errors=0, opens=0, **kw)


def test_summary_is_the_median_over_rounds_and_user_sys_are_pooled_ticks():
    tick_us = 1e6 / cost_ab.pb.CLK_TCK
    s = cost_ab.summarize([m(1000, 10.0, ut=1, st=0), m(1000, 30.0, ut=2, st=1),
                           m(1000, 20.0, ut=0, st=2)])
    assert s["us"] == 20.0
    assert s["per_round"] == [10.0, 30.0, 20.0]
    assert s["user"] == 3 * tick_us / 3000 and s["sys"] == 3 * tick_us / 3000
    assert cost_ab.summarize([]) is None


def test_ratios_and_the_per_round_spread_pair_the_same_rounds():
    base = cost_ab.summarize([m(100, 10.0), m(100, 20.0)])
    changed = cost_ab.summarize([m(100, 11.0), m(100, 18.0)])
    assert cost_ab.ratio(changed, base) == f"{14.5 / 15.0:.2f}"
    assert cost_ab.spread(changed, base) == "0.90-1.10"
    assert cost_ab.ratio(changed, None) == "-" and cost_ab.spread(None, base) == "-"


def test_table_has_every_row_and_ttfb_lines_for_fresh_rows():
    res = {"ka64": {"ssh": [m(100, 5.0)], "base": [m(100, 10.0)], "changed": [m(100, 10.0)]},
           "fresh": {"ssh": [m(10, 400.0, ttfb=0.5)], "base": [m(10, 2000.0, ttfb=1.0)],
                     "changed": [m(10, 1000.0, ttfb=1.5)]}}
    lines = cost_ab.table(res).splitlines()
    assert len(lines) == 2 + 3
    ka = lines[2].split(" | ")
    assert ka[1:5] == ["5.0", "10.0", "10.0", "1.00"] and ka[6:8] == ["2.00", "2.00"]
    assert lines[3].split(" | ")[4] == "0.50"  # fresh CPU changed/base
    assert "TTFB" in lines[4] and lines[4].split(" | ")[4] == "1.50"


def test_table_without_ssh_leaves_its_columns_empty():
    res = {"ka1": {"base": [m(10, 1.0)], "changed": [m(10, 2.0)]}}
    cells = cost_ab.table(res).splitlines()[2].split(" | ")
    assert cells[1] == "-" and cells[4] == "2.00" and cells[6] == "-"


def test_each_path_takes_each_place_over_the_rounds():
    three = ["ssh", "base", "changed"]
    orders = [tuple(cost_ab.order_of(three, r)) for r in range(6)]
    assert len(set(orders)) == 6  # every order of three, once each
    two = ["base", "changed"]
    assert [cost_ab.order_of(two, r) for r in range(4)] == [
        ["base", "changed"], ["changed", "base"], ["changed", "base"], ["base", "changed"]]


def test_single_write_origin_says_connection_close_when_it_closes():
    head = b"GET /small HTTP/1.1\r\nHost: one.test\r\nConnection: close"
    resp, close = single_write_origin.answer(head)
    assert close and b"\r\nConnection: close\r\n" in resp and resp.endswith(b"hello, world\n")
    resp, close = single_write_origin.answer(b"GET /small HTTP/1.1\r\nHost: one.test")
    assert not close and b"Connection" not in resp
    resp, close = single_write_origin.answer(b"GET /nope HTTP/1.1\r\nConnection: close")
    assert close and b"404" in resp and b"Connection: close" in resp


def test_the_floor_table_sets_both_relays_beside_ssh_and_shroud():
    res = {"fresh": {"ssh": [m(10, 400.0, ttfb=0.4)], "base": [m(10, 700.0, ttfb=0.7)],
                     "changed": [m(10, 800.0, ttfb=0.8)], "relay": [m(10, 1000.0, ttfb=1.0)],
                     "lean": [m(10, 200.0, ttfb=0.5)]}}
    lines = cost_ab.table(res).splitlines()
    assert "| row | ssh -R | relay | lean | changed |" in lines[7]
    cells = lines[9].split(" | ")
    assert cells[1:5] == ["400.0", "1000.0", "200.0", "800.0"]
    assert cells[5:8] == ["2.50", "0.50", "4.00"]  # relay/ssh, lean/ssh, changed/lean
    ttfb = lines[10].split(" | ")
    assert "TTFB" in ttfb[0] and ttfb[5:8] == ["2.50", "1.25", "1.60"]
    no_relay = {"fresh": {k: v for k, v in res["fresh"].items() if k not in ("relay", "lean")}}
    assert "relay" not in cost_ab.table(no_relay)
