"""The dashboard in real headless Chromium (Debian's, driven by Playwright) against real
processes: a proxy, clients (--tor none) and an HTTP origin, all on loopback.

One story, in order, over one module-scoped world and one logged-in page:
log in -> a hostname appears when a client binds -> byte counters and the chart move during a
transfer (screenshots) -> block the hostname, the public is refused -> unblock -> disconnect
the tunnel, the client reconnects and is served again -> the audit list shows it all -> log
out. Screenshots land in artifacts/ (gitignored).
"""
from __future__ import annotations

import http.client
import os
import threading
import time

import pytest
from werkzeug.security import generate_password_hash

from tests.support.procs import ROOT, ClientProc, OriginProc, ProxyProc
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
    procs = [origin, proxy]
    w = {"dir": d, "origin": origin, "proxy": proxy, "procs": procs}

    def client(name, data_dir, pairs):
        c = ClientProc(str(d), str(d / data_dir), pairs,
                       [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                       name=name)
        procs.append(c)
        return c

    w["client"] = client
    try:
        yield w
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def page(world):
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        pg = context.new_page()
        pg.set_default_timeout(WAIT_MS)
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("dialog", lambda dlg: dlg.dismiss())  # no native dialogs are expected
        pg.errors = errors
        yield pg
        browser.close()
    assert not errors, errors


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


def test_login_is_required(world, page):
    page.goto(admin(world) + "/")
    assert page.url.startswith(admin(world) + "/login")
    assert page.locator("#username").input_value() == ""  # never pre-filled
    page.locator("#username").fill("admin")
    page.locator("#password").fill("wrong password")
    page.locator("#login").click()
    assert "Wrong user name or password" in page.locator("#login-error").inner_text()
    page.locator("#username").fill("admin")
    page.locator("#password").fill(PASSWORD)
    page.locator("#login").click()
    page.wait_for_url(admin(world) + "/")
    page.locator("#stat-tunnels").filter(has_text="0").wait_for()
    assert page.locator("#empty").is_visible()  # nothing bound yet, said plainly


def test_hostname_appears_when_a_client_binds(world, page):
    origin = world["origin"].port
    world["client"]("client-a", "client-a", [
        "http:web.test", f"127.0.0.1:{origin}", "http:api.test", f"127.0.0.1:{origin}",
        "http:static.test", f"127.0.0.1:{origin}"])
    world["client"]("client-a2", "client-a", ["http:web.test", f"127.0.0.1:{origin}"])
    world["client"]("client-b", "client-b", ["http:blog.test", f"127.0.0.1:{origin}"])
    # The page was open before the clients started: rows arrive by polling, no reload.
    row = page.locator('#hostnames tr[data-name="web.test"]')
    row.wait_for()
    wait_for(lambda: row.locator("td").nth(2).inner_text() == "2", "web.test on 2 tunnels")
    for name in ("api.test", "static.test", "blog.test"):
        page.locator(f'#hostnames tr[data-name="{name}"]').wait_for()
    assert page.locator("#stat-bindings").inner_text() == "4"
    assert page.locator("#stat-tunnels").inner_text() == "3"
    # Server-side search.
    page.locator("#search").fill("blog")
    wait_for(lambda: page.locator("#hostnames tbody tr").count() == 1, "search to filter")
    assert page.locator("#total").inner_text() == "1"
    page.locator("#search").fill("")
    wait_for(lambda: page.locator("#hostnames tbody tr").count() == 4, "search cleared")


def _chart_sum(page, series: int = 2) -> float:
    return page.evaluate(f"() => window.shroud.charts.main.data[{series}]"
                         f".reduce((a, b) => a + (b || 0), 0)")


def test_counters_and_chart_move_during_a_transfer(world, page):
    page.goto(admin(world) + "/h/http/web.test")
    page.locator("#h-state").filter(has_text="bound").wait_for()
    page.locator('#tunnels tbody tr').nth(1).wait_for()  # both tunnels listed
    assert page.locator("#tunnels tbody tr").count() == 2
    out = page.locator("#h-bytes-out")
    before_bytes = int(out.get_attribute("data-bytes") or 0)
    before_chart = _chart_sum(page)
    canvas_before = page.evaluate("() => document.querySelector('#chart canvas').toDataURL()")
    seen = []
    with Transfer(world, "web.test") as t:
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
        page.locator('#hostnames tr[data-name="web.test"]').wait_for()
        wait_for(lambda: _chart_sum(page) > 0, "the proxy-wide chart to show traffic")
        time.sleep(2.5)
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-overview.png"), full_page=True)
    assert t.error is None, t.error
    assert t.bytes > 0
    assert seen == sorted(seen) and seen[-1] > before_bytes
    # The busiest name sorts first; the proxy-wide counter moved too.
    assert page.locator("#hostnames tbody tr").first.get_attribute("data-name") == "web.test"
    wait_for(lambda: int(page.locator("#stat-bytes-out").get_attribute("data-bytes")) >= t.bytes,
             "the proxy-wide out counter to count the whole transfer")
    page.goto(admin(world) + "/h/http/web.test")
    page.locator("#h-state").filter(has_text="bound").wait_for()
    wait_for(lambda: _chart_sum(page) > 0, "chart data")
    canvas_after = page.evaluate("() => document.querySelector('#chart canvas').toDataURL()")
    assert canvas_after != canvas_before  # pixels, not only data, changed


def test_block_hostname_refuses_the_public(world, page):
    assert public_get(world, "web.test")[0] == 200
    page.locator("#block-host").click()
    confirm(page, "abuse report #42")
    page.locator("#h-state").filter(has_text="blocked").wait_for()
    status, body = public_get(world, "web.test")
    assert status == 403 and b"blocked" in body
    assert public_get(world, "api.test")[0] == 200  # the same tunnel's other names still work
    page.locator("#unblock-host").wait_for()
    page.goto(admin(world) + "/")
    page.locator('#hostnames tr[data-name="api.test"]').wait_for()
    assert page.locator('#hostnames tr[data-name="web.test"]').count() == 0  # routing dropped
    assert "refused" in page.locator("#stat-refusals").inner_text()
    page.locator("#refusals").filter(has_text="blocked").wait_for()


def test_unblock_disconnect_and_audit(world, page):
    page.goto(admin(world) + "/blocks")
    row = page.locator('#blocked-hostnames tr[data-target="web.test"]')
    row.wait_for()
    assert "abuse report #42" in row.inner_text()
    row.locator("button.unblock").click()
    confirm(page, "resolved")
    wait_for(lambda: row.count() == 0, "the block to go")
    # The binding was dropped when blocked: the clients serve it again once they reconnect.
    # Disconnect their tunnels from the tunnels page; they come back with backoff.
    page.goto(admin(world) + "/tunnels")
    body = page.locator("#tunnels tbody")
    page.locator("#total").filter(has_text="3").wait_for()
    assert "web.test" not in body.inner_text()  # dropped from routing when blocked
    page.locator("#search").fill("static.test")  # client-a's tunnel, by one of its names
    wait_for(lambda: body.locator("tr").count() == 1 and "static.test" in body.inner_text(),
             "the search to find client-a's tunnel")
    first = body.locator("tr").first
    tunnel_id = first.get_attribute("data-tunnel")
    first.locator("button.disconnect").click()
    confirm(page, "make it rebind")
    wait_for(lambda: page.locator(f'#tunnels tr[data-tunnel="{tunnel_id}"]').count() == 0,
             "the tunnel to leave the list")
    # client-a reconnects, binds again, and the public is served.
    world["proxy"].wait_bound("web.test", timeout=30)
    wait_for(lambda: public_get(world, "web.test")[0] == 200, "web.test served again")
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


def test_log_out(world, page):
    page.goto(admin(world) + "/")
    page.locator("#logout").click()
    page.wait_for_url(admin(world) + "/login")
    page.goto(admin(world) + "/tunnels")
    assert page.url.startswith(admin(world) + "/login")
    status = page.evaluate("async () => (await fetch('/api/overview')).status")
    assert status == 401
