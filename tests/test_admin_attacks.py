"""Attacks on the dashboard over the wire, against a real proxy process (issue 11 items 10, 13,
14): a guesser rotating X-Forwarded-For, a session cookie replayed after logout, and a tunnel
claiming another client's key. Each test uses its own loopback source addresses, so none
depends on another's throttle state or order.
"""
from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse

import pytest
from werkzeug.security import generate_password_hash

from lib.identity import Identity
from tests.support.greenlets import running_greenlets
from tests.support.loaddrs import loopback_addresses
from tests.support.procs import ADMIN_TOKEN, ClientProc, OriginProc, ProxyProc
from tests.test_hostile import Attacker, _PublicKeyOnly

pytestmark = pytest.mark.timeout(120)

PASSWORD = "wire-test-password"
COOKIE = "shroud_admin"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("admin-attacks")
    procs = []
    try:
        origin = OriginProc(str(d))
        procs.append(origin)
        # A cheap hash: the attacks below make dozens of failed logins.
        proxy = ProxyProc(str(d), str(d / "proxy-data"), extra=[
            "--admin-password-hash", generate_password_hash(PASSWORD, "pbkdf2:sha256:1000")])
        procs.append(proxy)
        client = ClientProc(str(d), str(d / "client"), ["http:victim.test",
                                                        f"127.0.0.1:{origin.port}"],
                            [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
        procs.append(client)
        proxy.wait_bound("victim.test")
        yield dict(dir=d, proxy=proxy)
    finally:
        for p in reversed(procs):
            p.stop()


class Visitor:
    """HTTP/1.1 to the admin listener from a chosen loopback source address, one cookie."""

    def __init__(self, world, source: str):
        self.port = world["proxy"].ports["admin"]
        self.source = source
        self.host = "::1" if ":" in source else "127.0.0.1"
        self.cookie = None

    def request(self, method, path, form=None, headers=None, json_body=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=10,
                                       source_address=(self.source, 0))
        headers = dict(headers or {})
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif json_body is not None:
            body = json.dumps(json_body)
            headers["Content-Type"] = "application/json"
        if self.cookie:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        try:
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        m = re.search(COOKIE + r"=([^;]*)", r.getheader("Set-Cookie") or "")
        if m:
            self.cookie = m.group(1) or None
        return r.status, data, r

    def login(self, password=PASSWORD, forwarded=None) -> int:
        _, page, _ = self.request("GET", "/login")
        token = re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return self.request("POST", "/login", form={
            "username": "admin", "password": password, "csrf_token": token, "next": "/"},
            headers=headers)[0]


def test_rotating_forwarded_for_buys_no_fresh_window(world):
    """Item 10: on a listener clients reach directly, X-Forwarded-For is theirs to forge. Before
    the fix each forged value was a new client: 200 guesses a minute instead of 20."""
    guesser = Visitor(world, "127.0.0.3")
    answers = [guesser.login("guess-%d" % i, forwarded=f"198.51.100.{i}") for i in range(25)]
    assert answers[:20] == [401] * 20
    assert answers[20:] == [429] * 5, answers
    # The right password from the guesser's address waits out the minute too...
    assert guesser.login(forwarded="192.0.2.77") == 429
    # ...but the operator, at another address, is not locked out.
    assert Visitor(world, "127.0.0.2").login() == 302


# Documentation prefixes (RFC 3849), put on the test's own loopback: a guesser's /64 and the
# operator's.
GUESSER_64, OPERATOR_64 = "2001:db8:64:1::", "2001:db8:64:2::"


@pytest.fixture(scope="module")
def world6(tmp_path_factory):
    """A proxy whose dashboard listens dual-stack ([::]), and addresses on lo in two /64s."""
    addrs = [f"{GUESSER_64}{i:x}" for i in range(1, 26)] + [f"{OPERATOR_64}1"]
    d = tmp_path_factory.mktemp("admin-attacks6")
    with loopback_addresses(addrs):
        proxy = ProxyProc(str(d), str(d / "proxy-data"), admin_host="[::]", extra=[
            "--admin-password-hash", generate_password_hash(PASSWORD, "pbkdf2:sha256:1000")])
        try:
            yield dict(dir=d, proxy=proxy)
        finally:
            proxy.stop()


def test_a_guesser_rotating_ipv6_addresses_in_its_64_buys_no_fresh_window(world6):
    """One host holds a whole /64. Keyed by the full address, each of 25 addresses got its own
    20 guesses a minute, and 10 addresses filled the overall cap of 200: the operator, from
    anywhere, was then answered 429 with the right password."""
    answers = [Visitor(world6, f"{GUESSER_64}{i % 25 + 1:x}").login("guess-%d" % i)
               for i in range(25)]
    assert answers[:20] == [401] * 20
    assert answers[20:] == [429] * 5, answers
    assert Visitor(world6, f"{OPERATOR_64}1").login() == 302


def test_ipv4_clients_of_a_dual_stack_dashboard_are_told_apart(world6):
    """IPv4-mapped (::ffff:a.b.c.d) peers count per IPv4 address, not as one /64 of all."""
    guesser = Visitor(world6, "127.0.0.6")
    answers = [guesser.login("guess-%d" % i) for i in range(21)]
    assert answers[20] == 429, answers
    assert Visitor(world6, "127.0.0.7").login() == 302


def test_cookie_replayed_after_logout_is_refused(world):
    """Item 14: logging out revokes the session on the proxy, not only in the browser."""
    alice = Visitor(world, "127.0.0.4")
    assert alice.login() == 302
    status, home, _ = alice.request("GET", "/")
    assert status == 200
    stolen = alice.cookie
    token = re.search(rb'<meta name="csrf-token" content="([^"]+)"', home).group(1).decode()
    mallory = Visitor(world, "127.0.0.5")
    mallory.cookie = stolen
    assert mallory.request("GET", "/api/overview")[0] == 200  # the copy works while live
    assert alice.request("POST", "/logout", form={"csrf_token": token})[0] == 302
    mallory.cookie = stolen
    assert mallory.request("GET", "/api/overview")[0] == 401
    status, _, r = mallory.request("GET", "/tunnels")
    assert status == 302 and r.getheader("Location").startswith("/login")
    mallory.cookie = stolen
    status, _, _ = mallory.request("POST", "/api/block", headers={"X-CSRF-Token": token},
                                   json_body={"kind": "hostname", "target": "victim.test"})
    assert status == 401
    assert not any(b["target"] == "victim.test" for b in blocks(world))


def blocks(world) -> list:
    c = http.client.HTTPConnection("127.0.0.1", world["proxy"].ports["admin"], timeout=10)
    c.request("GET", "/api/blocks", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    out = json.loads(c.getresponse().read())
    c.close()
    return out["hostnames"]


def tunnels(world) -> list:
    c = http.client.HTTPConnection("127.0.0.1", world["proxy"].ports["admin"], timeout=10)
    c.request("GET", "/api/tunnels?per_page=500",
              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    out = json.loads(c.getresponse().read())
    c.close()
    return out["items"]


def test_a_claimed_key_is_listed_unproven(world):
    """Item 13: a tunnel that only claims the victim's public key in Auth is listed with that
    key, marked unproven; the victim's own tunnel, whose signed bind verified, is proven."""
    victim = Identity.load_or_create(str(world["dir"] / "client"))
    running = running_greenlets()
    claimer = Attacker(world["proxy"], _PublicKeyOnly(victim))
    try:
        claimer.auth()
        deadline = time.monotonic() + 10
        while True:
            rows = [t for t in tunnels(world) if t["key"] == victim.fingerprint]
            if len(rows) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        by_proof = {t["key_proven"]: t for t in rows}
        assert set(by_proof) == {True, False}, rows
        assert by_proof[True]["names"] == ["http/victim.test"]
        assert by_proof[False]["names"] == []
        assert claimer.bind("victim.test").error  # and it cannot prove the claim
        row = [t for t in tunnels(world) if t["id"] == by_proof[False]["id"]]
        assert row and row[0]["key_proven"] is False
    finally:
        claimer.close()
    # The tunnel's session greenlets ended with it, not inside the next test.
    assert not running_greenlets() - running
