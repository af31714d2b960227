"""The dashboard in real headless Chromium (Debian's, driven by Playwright) against real
processes: a proxy, clients (--tor none) and an HTTP origin, all on loopback.

Each test stands alone, in any order or by itself (``-k``): the proxy and origin are shared
(module scope), but every test gets a fresh browser context (no cookies) and logs in through
the form, starts the clients that bind the names it uses (names no other test uses) and stops
them at its end, and undoes its blocks. The stories: log in; a hostname appears when a client
binds; byte counters and the chart move during a transfer (screenshots); block a hostname and
the public is refused; unblock, disconnect a tunnel (the client reconnects) and read the audit
list; log out (and the old cookie is refused); empty tables say so in a row; one time zone
(UTC) in a browser set to another; the chart ranged to a young proxy's life; the public URL as
a link. Screenshots land in artifacts/ (gitignored).
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time

import pytest
from werkzeug.security import generate_password_hash

from tests.support.procs import ADMIN_TOKEN, ROOT, ClientProc, OriginProc, ProxyProc
from tests.support.wait import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

PASSWORD = "browser-test-password"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "artifacts")
WAIT_MS = 15000  # the page polls every 2 s; 15 s is several polls plus a client's backoff


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("dash")
    origin = OriginProc(str(d), name="origin")
    proxy = ProxyProc(str(d), str(d / "proxy-data"),
                      extra=["--admin-password-hash", generate_password_hash(PASSWORD)])
    try:
        yield {"dir": d, "origin": origin, "proxy": proxy}
    finally:
        proxy.stop()
        origin.stop()


@pytest.fixture
def clients(world):
    """start(name, data_dir, names) -> a client serving ``names`` from the origin; all of this
    test's clients stop when it ends, and their tunnels leave the proxy."""
    started = []

    def start(name: str, data_dir: str, names: list[str]) -> ClientProc:
        pairs = []
        for n in names:
            pairs += [f"http:{n}", f"127.0.0.1:{world['origin'].port}"]
        c = ClientProc(str(world["dir"]), str(world["dir"] / data_dir), pairs,
                       [f"127.0.0.1:{world['proxy'].ports['tunnel']}"],
                       pins=[world["proxy"].fingerprint], name=name)
        started.append(c)
        return c

    yield start
    for c in reversed(started):
        c.stop()
    proxy = world["proxy"]
    wait_for(lambda: not any(b["name"] in started_names(started)
                             for b in proxy.status()["bindings"]), "this test's names to go")


def started_names(procs) -> set:
    return {a.split(":", 1)[1] for c in procs for a in c.argv if a.startswith("http:")}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def fresh_page(browser):
    """A page in a new browser context (no cookies), not logged in."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda dlg: dlg.dismiss())  # no native dialogs are expected
    yield pg
    context.close()
    assert not errors, errors


@pytest.fixture
def page(world, fresh_page):
    """A fresh page, logged in through the form, on the overview."""
    log_in(world, fresh_page)
    return fresh_page


def log_in(world, pg, password: str = PASSWORD) -> None:
    pg.goto(admin(world) + "/login")
    pg.locator("#username").fill("admin")
    pg.locator("#password").fill(password)
    pg.locator("#login").click()
    if password == PASSWORD:
        pg.wait_for_url(admin(world) + "/")


def api(world, method: str, path: str, body: dict | None = None) -> dict:
    """The JSON API with the bearer token (for set-up and clean-up, not what is tested)."""
    c = http.client.HTTPConnection("127.0.0.1", world["proxy"].ports["admin"], timeout=10)
    try:
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                           "Content-Type": "application/json"})
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def admin(world) -> str:
    return f"http://127.0.0.1:{world['proxy'].ports['admin']}"


def public_get(world, host: str, path: str = "/hello") -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", world["proxy"].ports["http"], timeout=20)
    try:
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def confirm(page, reason: str) -> None:
    page.locator("#confirm-reason").fill(reason)
    page.locator("#confirm-ok").click()


class Transfer:
    """Downloads from the origin through the proxy in a loop until stopped."""

    def __init__(self, world, host: str, size: int = 4_000_000):
        self.world, self.host, self.size = world, host, size
        self.stop_flag = threading.Event()
        self.bytes = 0
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            for _ in range(2000):  # bounded; stopped long before
                if self.stop_flag.is_set():
                    return
                status, body = public_get(self.world, self.host, f"/bytes/{self.size}")
                assert status == 200 and len(body) == self.size
                self.bytes += len(body)
                time.sleep(0.05)  # a steady stream, not a CPU-bound spin
        except Exception as e:  # reported by the test
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join(30)


def test_login_is_required(world, fresh_page, tmp_path):
    page = fresh_page
    page.goto(admin(world) + "/")
    assert page.url.startswith(admin(world) + "/login")
    assert page.locator("#username").input_value() == ""  # never pre-filled
    log_in(world, page, password="wrong password")
    assert "Wrong user name or password" in page.locator("#login-error").inner_text()
    log_in(world, page)
    want = api(world, "GET", "/api/overview")
    page.locator("#stat-tunnels").filter(has_text=str(want["tunnels"])).wait_for()
    # The empty-state row shows exactly when nothing is bound (said plainly).
    wait_for(lambda: page.locator("#hostnames tr.empty-row").is_visible() == (
        api(world, "GET", "/api/overview")["bindings"] == 0), "the empty-state row")


def test_hostname_appears_when_a_client_binds(world, page, clients):
    before = api(world, "GET", "/api/overview")
    clients("client-a", "appear-a", ["web-appear.test", "api-appear.test", "static-appear.test"])
    clients("client-a2", "appear-a", ["web-appear.test"])
    clients("client-b", "appear-b", ["blog-appear.test"])
    # The page was open before the clients started: rows arrive by polling, no reload.
    row = page.locator('#hostnames tr[data-name="web-appear.test"]')
    row.wait_for()
    wait_for(lambda: row.locator("td").nth(2).inner_text() == "2", "web-appear on 2 tunnels")
    for name in ("api-appear.test", "static-appear.test", "blog-appear.test"):
        page.locator(f'#hostnames tr[data-name="{name}"]').wait_for()
    wait_for(lambda: page.locator("#stat-bindings").inner_text() == str(before["bindings"] + 4),
             "four more names in the header")
    wait_for(lambda: page.locator("#stat-tunnels").inner_text() == str(before["tunnels"] + 3),
             "three more tunnels in the header")
    # Server-side search.
    page.locator("#search").fill("blog-appear")
    wait_for(lambda: page.locator("#hostnames tbody tr").count() == 1, "search to filter")
    assert page.locator("#total").inner_text() == "1"
    page.locator("#search").fill("appear")
    wait_for(lambda: page.locator("#hostnames tbody tr").count() == 4, "search widened")


def _chart_sum(page, series: int = 2) -> float:
    return page.evaluate(f"() => window.shroud.charts.main.data[{series}]"
                         f".reduce((a, b) => a + (b || 0), 0)")


def test_counters_and_chart_move_during_a_transfer(world, page, clients):
    clients("client-chart", "chart-a", ["chart.test"])
    clients("client-chart2", "chart-a", ["chart.test"])
    world["proxy"].wait_bound("chart.test", tunnels=2)
    page.goto(admin(world) + "/h/http/chart.test")
    page.locator("#h-state").filter(has_text="bound").wait_for()
    page.locator('#tunnels tbody tr').nth(1).wait_for()  # both tunnels listed
    assert page.locator("#tunnels tbody tr").count() == 2
    out = page.locator("#h-bytes-out")
    before_bytes = int(out.get_attribute("data-bytes") or 0)
    before_chart = _chart_sum(page)
    canvas_before = page.evaluate("() => document.querySelector('#chart canvas').toDataURL()")
    seen = []
    with Transfer(world, "chart.test") as t:
        for _ in range(3):  # three successive polls, each higher than the last
            last = seen[-1] if seen else before_bytes
            wait_for(lambda: int(out.get_attribute("data-bytes")) > last,
                     "the out counter to move")
            seen.append(int(out.get_attribute("data-bytes")))
        wait_for(lambda: _chart_sum(page) > before_chart, "the chart to move")
        wait_for(lambda: page.locator("#h-rate-out").inner_text() != "0 B/s", "a rate")
        page.locator('.range button[data-range="300"]').click()  # zoom to the last 5 min
        assert page.evaluate("() => window.shroud.charts.main.data[0].length") <= 31
        time.sleep(2.5)  # one more poll so the screenshot shows the transfer in flight
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-hostname.png"), full_page=True)
        page.goto(admin(world) + "/?sort=bytes&order=desc")
        page.locator('#hostnames tr[data-name="chart.test"]').wait_for()
        wait_for(lambda: _chart_sum(page) > 0, "the proxy-wide chart to show traffic")
        time.sleep(2.5)
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-overview.png"), full_page=True)
    assert t.error is None, t.error
    assert t.bytes > 0
    assert seen == sorted(seen) and seen[-1] > before_bytes
    # The busiest name sorts first; the proxy-wide counter moved too.
    wait_for(lambda: page.locator("#hostnames tbody tr").first.get_attribute("data-name")
             == "chart.test", "the busiest name first")
    wait_for(lambda: int(page.locator("#stat-bytes-out").get_attribute("data-bytes")) >= t.bytes,
             "the proxy-wide out counter to count the whole transfer")
    page.goto(admin(world) + "/h/http/chart.test")
    page.locator("#h-state").filter(has_text="bound").wait_for()
    wait_for(lambda: _chart_sum(page) > 0, "chart data")
    canvas_after = page.evaluate("() => document.querySelector('#chart canvas').toDataURL()")
    assert canvas_after != canvas_before  # pixels, not only data, changed


def test_empty_tables_say_so_in_a_row(world, page):
    """A table with nothing to list shows one row across all its columns saying why, not
    headers alone; a search that matches nothing says that instead."""
    def empty_row(table: str, text: str) -> None:
        row = page.locator(f"#{table} tbody tr.empty-row")
        row.filter(has_text=text).wait_for()
        assert page.locator(f"#{table} tbody tr").count() == 1
        columns = page.locator(f"#{table} thead th").count()
        assert row.locator("td").get_attribute("colspan") == str(columns)

    page.locator("#search").fill("no-such-name-anywhere")
    empty_row("hostnames", "No hostname matches this search.")
    page.goto(admin(world) + "/tunnels?q=no-such-tunnel-anywhere")
    empty_row("tunnels", "No tunnel matches this search.")
    page.goto(admin(world) + "/blocks")
    empty_row("blocked-keys", "No key is blocked.")  # this module never blocks a key
    page.goto(admin(world) + "/h/http/never-bound.test")
    page.locator("#h-state").filter(has_text="not bound").wait_for()
    empty_row("tunnels", "No live tunnel.")


def test_one_time_zone_and_a_chart_ranged_to_the_data(world, browser):
    """In a browser set to New York the chart's axis and legend read UTC clock times (24 h),
    as the cards do, and a proxy younger than an hour charts its own life, not an hour."""
    import datetime
    import re

    context = browser.new_context(viewport={"width": 1440, "height": 1000},
                                  timezone_id="America/New_York")
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        log_in(world, page)
        page.locator("#stat-started").filter(has_text="UTC").wait_for()
        wait_for(lambda: page.evaluate("() => window.shroud.charts.main.data[0].length") > 1,
                 "chart data")
        o = api(world, "GET", "/api/overview")
        assert o["uptime"] < 3000  # this module's proxy is minutes old
        span = page.evaluate("() => { const x = window.shroud.charts.main.scales.x;"
                             " return x.max - x.min; }")
        assert span <= o["uptime"] + 20, (span, o["uptime"])
        # the axis' tick labels for a known instant, and the legend under the cursor
        ts = 1_796_000_400  # 2026-11-30 01:00 UTC, 8 pm the day before in New York
        ticks = page.evaluate(f"""() => {{ const u = window.shroud.charts.main;
            return u.axes[0].values(u, [{ts}, {ts + 600}], 0, 50, 600); }}""")
        assert ticks == ["01:00", "01:10"], ticks
        assert page.evaluate(f"() => window.shroud.charts.main.axes[0].values("
                             f"window.shroud.charts.main, [{ts + 30}], 0, 50, 30)") == ["01:00:30"]
        box = page.locator("#chart .u-over").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        legend = page.locator("#chart .u-legend .u-series").first
        wait_for(lambda: re.fullmatch(r"\d\d:\d\d:\d\d", legend.locator(".u-value").inner_text()),
                 "a time in the legend")
        assert "UTC" in legend.locator(".u-label").inner_text()
        hovered = page.evaluate("() => { const u = window.shroud.charts.main;"
                                " return u.data[0][u.cursor.idx]; }")
        want = datetime.datetime.fromtimestamp(hovered, datetime.timezone.utc).strftime("%H:%M:%S")
        assert legend.locator(".u-value").inner_text() == want
        assert not re.search(r"[ap]m\b", page.locator("#cards").inner_text(), re.I)
    finally:
        context.close()


def test_public_url_is_a_link(world, page, clients):
    clients("client-link", "link-a", ["link.test"])
    world["proxy"].wait_bound("link.test")
    want = f"http://link.test:{world['proxy'].ports['http']}"
    row_link = page.locator('#hostnames tr[data-name="link.test"] a.public-link')
    row_link.wait_for()
    assert row_link.get_attribute("href") == want
    page.goto(admin(world) + "/h/http/link.test")
    link = page.locator("#h-meta a.public-link")
    link.wait_for()
    assert link.get_attribute("href") == want and link.inner_text() == want
    assert link.get_attribute("target") == "_blank"
    assert "noopener" in link.get_attribute("rel")
    # A name bound seconds ago: its chart spans 10-20 s, and the axis as drawn (uPlot's
    # axes[0]._values) shows no label twice (ticks were half-seconds, each printed twice).
    wait_for(lambda: page.evaluate("() => (window.shroud.charts.main.axes[0]._values || [])"
                                   ".length") > 1, "the chart's axis drawn")
    drawn = page.evaluate("() => window.shroud.charts.main.axes[0]._values")
    assert len(drawn) == len(set(drawn)), drawn


@pytest.fixture
def unblock_after(world):
    """Names this test may block: unblocked (through the API) when it ends, pass or fail."""
    names = []
    yield names
    for name in names:
        api(world, "POST", "/api/unblock", {"kind": "hostname", "target": name})


def block_from_its_page(world, page, name: str, reason: str) -> None:
    page.goto(admin(world) + f"/h/http/{name}")
    page.locator("#h-state").filter(has_text="bound").wait_for()
    page.locator("#block-host").click()
    confirm(page, reason)
    page.locator("#h-state").filter(has_text="blocked").wait_for()


def test_block_hostname_refuses_the_public(world, page, clients, unblock_after):
    clients("client-block", "block-a", ["blocked.test", "sibling.test"])
    world["proxy"].wait_bound("sibling.test")
    world["proxy"].wait_bound("blocked.test")
    assert public_get(world, "blocked.test")[0] == 200
    unblock_after.append("blocked.test")
    refused_before = api(world, "GET", "/api/overview")["refusals"].get("blocked", 0)
    block_from_its_page(world, page, "blocked.test", "abuse report #41")
    status, body = public_get(world, "blocked.test")
    assert status == 403 and b"blocked" in body
    assert public_get(world, "sibling.test")[0] == 200  # the same tunnel's other names work
    page.locator("#unblock-host").wait_for()
    page.goto(admin(world) + "/")
    page.locator('#hostnames tr[data-name="sibling.test"]').wait_for()
    assert page.locator('#hostnames tr[data-name="blocked.test"]').count() == 0  # unrouted
    assert api(world, "GET", "/api/overview")["refusals"]["blocked"] > refused_before
    assert "refused" in page.locator("#stat-refusals").inner_text()
    page.locator("#refusals").filter(has_text="blocked").wait_for()


def test_unblock_disconnect_and_audit(world, page, clients, unblock_after):
    clients("client-audit", "audit-a", ["audit.test", "audit-side.test"])
    world["proxy"].wait_bound("audit.test")
    world["proxy"].wait_bound("audit-side.test")
    unblock_after.append("audit.test")
    block_from_its_page(world, page, "audit.test", "abuse report #42")
    page.goto(admin(world) + "/blocks")
    row = page.locator('#blocked-hostnames tr[data-target="audit.test"]')
    row.wait_for()
    assert "abuse report #42" in row.inner_text()
    row.locator("button.unblock").click()
    confirm(page, "resolved")
    wait_for(lambda: row.count() == 0, "the block to go")
    # The binding was dropped when blocked: the client serves it again once it reconnects.
    # Disconnect its tunnel from the tunnels page; it comes back with backoff.
    page.goto(admin(world) + "/tunnels")
    body = page.locator("#tunnels tbody")
    page.locator("#search").fill("audit-side.test")  # the client's tunnel, by its other name
    wait_for(lambda: body.locator("tr").count() == 1 and "audit-side.test" in body.inner_text(),
             "the search to find the client's tunnel")
    assert "audit.test," not in body.inner_text()  # dropped from routing when blocked
    first = body.locator("tr").first
    tunnel_id = first.get_attribute("data-tunnel")
    first.locator("button.disconnect").click()
    confirm(page, "make it rebind")
    wait_for(lambda: page.locator(f'#tunnels tr[data-tunnel="{tunnel_id}"]').count() == 0,
             "the tunnel to leave the list")
    # The client reconnects, binds again, and the public is served.
    world["proxy"].wait_bound("audit.test", timeout=30)
    wait_for(lambda: public_get(world, "audit.test")[0] == 200, "audit.test served again")
    page.goto(admin(world) + "/blocks")
    audit = page.locator("#audit tbody")
    audit.locator("tr").nth(2).wait_for()
    text = audit.inner_text().lower()  # badges are drawn upper-case
    for expected in ("block-hostname", "unblock-hostname", "disconnect-tunnel", "abuse report #42",
                     "resolved", "make it rebind", f"tunnel {tunnel_id}"):
        assert expected in text, expected
    rows = [r.split("\t") for r in text.splitlines()]
    assert [r[2] for r in rows[:3]] == ["disconnect-tunnel", "unblock-hostname",
                                        "block-hostname"]
    assert all(r[1] == "admin" for r in rows[:3])


def test_fleet_page_lists_this_instance_and_blocks_fleet_wide(world, page, clients,
                                                             unblock_after):
    clients("client-fleet", "fleet-a", ["fleet-one.test", "fleet-two.test"])
    world["proxy"].wait_bound("fleet-two.test")
    page.goto(admin(world) + "/fleet")
    me = page.locator("#instances tbody tr").filter(has_text="(this)")
    me.wait_for()
    assert "live" in me.inner_text().lower()
    # The admin listener opens after the proxy joined the fleet: the row gets it at the next
    # heartbeat that sees the addresses changed (5 s), and the page at its next poll. (20 s
    # once ran out under load: the first registration's write, slowed by a loaded disk's
    # fsync, outlasted the admin listener's start, and the beat took the addresses as they
    # were after the write as written; fixed in lib/proxy/fleet.py by 0346845. Shown with
    # every fsync of the proxy 0.4 s slower: admin missing for good 4 of 4 before, 0 of 4
    # after.)
    wait_for(lambda: "admin 127.0.0.1:" in me.inner_text(), "the admin listener in the row",
             timeout=20)
    row = page.locator('#fleet-names tr[data-name="fleet-one.test"]')
    row.wait_for()  # written by the heartbeat, read back from the store
    assert me.get_attribute("data-instance") in row.inner_text()
    unblock_after.append("fleet-one.test")
    row.locator("button.block").click()
    confirm(page, "fleet page test")
    row.locator(".badge.blocked").wait_for()  # next poll: blocked, and the row stays until
    assert public_get(world, "fleet-one.test")[0] == 403  # the next heartbeat drops it
    assert public_get(world, "fleet-two.test")[0] == 200
    wait_for(lambda: page.locator('#fleet-names tr[data-name="fleet-one.test"]').count() == 0,
             "the blocked name leaves the fleet's registry", timeout=20)


def test_a_hung_request_does_not_stop_the_polling(world, page):
    """The fleet page's first /api/fleet request is held by the browser's router and never
    answered: the dashboard gives it up after its request deadline (10 s) and its next poll
    fills the table. With no deadline the page's one request in flight stayed in flight and
    the table stayed empty for good."""
    held, failed = [], []
    page.route("**/api/fleet", lambda route: held.append(route), times=1)
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(admin(world) + "/fleet")
    me = page.locator("#instances tbody tr").filter(has_text="(this)")
    me.wait_for(timeout=45000)  # the deadline, a poll period, and a loaded machine
    assert len(held) == 1
    assert [u for u in failed if "/api/fleet" in u], failed  # the held one, aborted
    assert page.evaluate("window.shroud.polls") >= 1


def test_log_out(world, page, browser):
    stolen = page.context.cookies()
    page.locator("#logout").click()
    page.wait_for_url(admin(world) + "/login")
    page.goto(admin(world) + "/tunnels")
    assert page.url.startswith(admin(world) + "/login")
    status = page.evaluate("async () => (await fetch('/api/overview')).status")
    assert status == 401
    # The cookie from before the logout, put back into another browser, is refused too.
    other = browser.new_context()
    try:
        other.add_cookies(stolen)
        replay = other.new_page()
        replay.goto(admin(world) + "/api/overview")
        assert "authentication required" in replay.content()
        replay.goto(admin(world) + "/")
        assert replay.url.startswith(admin(world) + "/login")
    finally:
        other.close()
