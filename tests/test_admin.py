"""The admin app with Flask's test client over a ProxyServer built in-process (no listeners).

Tunnels are registered with a stand-in session (the registry only reads ``closed``,
``heartbeat_rtt``, ``sends_waiting`` and ``buffered_in``, and the actions call ``close``); everything else is real: the registry, the
SQLite ownership store, the Flask app, its templates and static files.
"""
from __future__ import annotations

import re
import time

import pytest
from urllib.parse import urlparse
from werkzeug.security import generate_password_hash

from lib.admin import dashboard
from lib.proxy import ownership
from lib.admin.app import SECRET_FILE, create_admin_app
from lib.admin.metrics import OTHER, TOP_HOSTNAMES
from lib.proxy.server import ProxyConfig, ProxyServer

PASSWORD = "correct horse battery"
TOKEN = "test-token-0123456789"
KEY_A = "a" * 64
KEY_B = "b" * 64


class FakeSession:
    def __init__(self, rtt=0.012):
        self.closed = False
        self.heartbeat_rtt = rtt
        self.sends_waiting = 0
        self.buffered_in = 0
        self.close_reason = None

    def close(self, code=0, reason=""):
        self.closed = True
        self.close_reason = reason


@pytest.fixture
def proxy(tmp_path):
    p = ProxyServer(ProxyConfig(data_dir=str(tmp_path / "data"), tunnel_addr=None,
                                admin_addr=None))
    p.registry.add_listener("tunnel", ("127.0.0.1", 4443))
    p.registry.add_listener("https", ("127.0.0.1", 8443))
    yield p
    p.store.close()


def make_tunnel(proxy, names, key=KEY_A, peer="10.0.0.1:5000", protocol="https", proven=True):
    """A tunnel as the proxy registers it; ``proven``: a signed bind verified on it (the proxy
    sets this on the first one; with ``proven=False`` the key is only Auth's claim)."""
    t = proxy.registry.add_tunnel(FakeSession(), peer, key, "c" * 32)
    t.proven = proven and key is not None
    bindings = [proxy.registry.bind(t, protocol, n, key, "tofu", f"{protocol}://{n}")
                for n in names]
    return t, bindings


@pytest.fixture
def config(tmp_path):
    return {"ADMIN_PASSWORD_HASH": generate_password_hash(PASSWORD), "ADMIN_TOKEN": TOKEN,
            "DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def app(proxy, config):
    return create_admin_app(proxy, config)


@pytest.fixture
def client(app):
    return app.test_client()


def bearer(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def csrf_of(html: bytes) -> str:
    m = re.search(rb'name="csrf_token" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1).decode()


def login(client, password=PASSWORD, user="admin"):
    page = client.get("/login")
    assert page.status_code == 200
    r = client.post("/login", data={"username": user, "password": password,
                                    "csrf_token": csrf_of(page.data), "next": "/"})
    return r


def logged_in_csrf(client) -> str:
    r = login(client)
    assert r.status_code == 302, r.data
    page = client.get("/")
    m = re.search(rb'<meta name="csrf-token" content="([^"]+)"', page.data)
    return m.group(1).decode()


# --- access ----------------------------------------------------------------------------------

def test_healthz_is_open(client):
    assert client.get("/healthz").json == {"ok": True}


@pytest.mark.parametrize("path", ["/api/status", "/api/overview", "/api/hostnames",
                                  "/api/tunnels", "/api/blocks", "/api/audit", "/metrics"])
def test_api_needs_credentials(client, path):
    r = client.get(path)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "authentication required" in r.json["error"]
    assert client.get(path, headers=bearer("wrong")).status_code == 401
    assert client.get(path, headers=bearer()).status_code == 200


def test_pages_redirect_to_login(client):
    r = client.get("/tunnels?x=1")
    assert r.status_code == 302
    assert r.headers["Location"].startswith("/login?next=/tunnels")
    # A bearer token is for the API, not the pages.
    assert client.get("/", headers=bearer()).status_code == 302


def test_login_logout(client):
    assert login(client, password="wrong").status_code == 401
    assert client.get("/").status_code == 302
    r = login(client)
    assert r.status_code == 302 and r.headers["Location"] == "/"
    page = client.get("/")
    assert page.status_code == 200 and b'id="hostnames"' in page.data
    assert client.get("/api/overview").status_code == 200  # the session works for the API
    # Logging out needs the CSRF token too, then the session is gone.
    assert client.post("/logout").status_code == 403
    r = client.post("/logout", data={"csrf_token": csrf_of(page.data)})
    assert r.status_code == 302
    assert client.get("/").status_code == 302
    assert client.get("/api/overview").status_code == 401


def test_login_form_needs_its_csrf_token(client):
    client.get("/login")
    r = client.post("/login", data={"username": "admin", "password": PASSWORD})
    assert r.status_code == 400
    assert client.get("/").status_code == 302


def test_login_never_redirects_off_site(client):
    page = client.get("/login")
    r = client.post("/login", data={"username": "admin", "password": PASSWORD,
                                    "csrf_token": csrf_of(page.data),
                                    "next": "https://evil.example/"})
    assert r.headers["Location"] == "/"


def test_failed_logins_are_throttled(client):
    for _ in range(20):
        assert login(client, password="nope").status_code == 401
    r = login(client)  # even the right password waits out the minute
    assert r.status_code == 429


# A cheap hash for the throttle tests, which make hundreds of failed logins.
FAST_HASH = generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000")


def attempt(c, password, addr="127.0.0.1", forwarded=None):
    """One login from the socket address ``addr`` (and an X-Forwarded-For, if given)."""
    env = {"REMOTE_ADDR": addr}
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    page = c.get("/login", environ_base=env)
    return c.post("/login", data={"username": "admin", "password": password,
                                  "csrf_token": csrf_of(page.data), "next": "/"},
                  headers=headers, environ_base=env).status_code


@pytest.fixture
def fast_config(config):
    return dict(config, ADMIN_PASSWORD_HASH=FAST_HASH)


def test_throttle_is_per_client_so_a_guesser_cannot_lock_the_operator_out(proxy, fast_config):
    app = create_admin_app(proxy, fast_config)
    guesser, operator = app.test_client(), app.test_client()
    for _ in range(20):
        assert attempt(guesser, "nope", "203.0.113.9") == 401
    assert attempt(guesser, PASSWORD, "203.0.113.9") == 429
    assert attempt(operator, PASSWORD, "198.51.100.7") == 302


def test_forged_forwarded_for_buys_no_fresh_window(proxy, fast_config):
    """On a listener clients reach directly, X-Forwarded-For is the client's own claim: a new
    value per guess must not open a new window (issue 11 item 10)."""
    c = create_admin_app(proxy, fast_config).test_client()
    for i in range(20):
        assert attempt(c, "nope", "203.0.113.9", forwarded=f"198.51.100.{i}") == 401
    assert attempt(c, PASSWORD, "203.0.113.9", forwarded="192.0.2.1") == 429


@pytest.mark.parametrize("trusted", [False, True], ids=["direct", "one-port"])
def test_overall_cap_holds_across_many_clients(proxy, fast_config, trusted):
    """Ten clients at their own limit fill the overall window: an eleventh waits too."""
    app = create_admin_app(proxy, dict(fast_config, TRUST_FORWARDED_FOR=trusted))
    c = app.test_client()

    def client(n):  # a distinct client: its own socket, or its own router-appended entry
        return ("10.1.0.%d" % n, None) if not trusted else ("10.9.9.9", f"1.2.3.4, 10.1.0.{n}")
    for n in range(10):
        addr, fwd = client(n)
        for _ in range(20):
            assert attempt(c, "nope", addr, fwd) == 401
        assert attempt(c, "nope", addr, fwd) == 429  # this client's own window is full
    addr, fwd = client(10)
    assert attempt(c, PASSWORD, addr, fwd) == 429  # a fresh client: the overall cap


def test_trusted_forwarded_for_keys_on_the_routers_entry(proxy, fast_config):
    """One-port mode: the router's (last) entry names the client; what the visitor put before
    it is ignored, and one visitor's guesses do not lock out another behind the same router."""
    c = create_admin_app(proxy, dict(fast_config, TRUST_FORWARDED_FOR=True)).test_client()
    router = "10.9.9.9"
    for i in range(20):
        assert attempt(c, "nope", router, f"198.51.100.{i}, 203.0.113.9") == 401
    assert attempt(c, PASSWORD, router, "192.0.2.1, 203.0.113.9") == 429
    assert attempt(c, PASSWORD, router, "203.0.113.9, 198.51.100.7") == 302


@pytest.mark.parametrize("value, want", [
    ("203.0.113.9", "203.0.113.9"), ("1.2.3.4, 203.0.113.9", "203.0.113.9"),
    ("203.0.113.9:4711", "203.0.113.9"), ("x, [2001:db8::1]:443", "2001:db8::1"),
    ("203.0.113.9, junk", None), ("", None), ("unknown", None)])
def test_forwarded_client_is_the_last_entry_if_an_address(value, want):
    """Junk from the router's side falls back to the socket's peer (login_client)."""
    from lib.admin.auth import forwarded_client

    assert forwarded_client(value) == want


def test_login_throttle_forgets_clients_past_its_bound():
    from lib.admin.auth import MAX_THROTTLED_CLIENTS, LoginThrottle

    t = LoginThrottle(limit=1, clock=lambda: 0.0)
    t.overall.limit = 10 ** 6  # only the per-client table is under test here
    for n in range(MAX_THROTTLED_CLIENTS + 100):
        t.failed(f"client-{n}")
    assert len(t.clients) == MAX_THROTTLED_CLIENTS and t.forgotten == 100
    assert t.allowed("client-0") and not t.allowed(f"client-{MAX_THROTTLED_CLIENTS + 99}")


def test_login_form_does_not_prefill_the_user_name(client):
    html = client.get("/login").data
    field = re.search(rb'<input[^>]*name="username"[^>]*>', html).group(0)
    assert b"value=" not in field and b"admin" not in field


def test_logout_revokes_the_session_server_side(proxy, config):
    """A copy of the cookie taken before logout is refused after it, here and after a
    restart (issue 11 item 14)."""
    app = create_admin_app(proxy, config)
    c = app.test_client()
    token = logged_in_csrf(c)
    stolen = c.get_cookie("shroud_admin").value
    assert c.post("/logout", data={"csrf_token": token}).status_code == 302
    replay = app.test_client()
    replay.set_cookie("shroud_admin", stolen)
    assert replay.get("/").status_code == 302
    assert replay.get("/api/overview").status_code == 401
    assert replay.post("/api/block", json={"kind": "key", "target": KEY_B},
                       headers={"X-CSRF-Token": token}).status_code == 401
    later = create_admin_app(proxy, config).test_client()  # restarted, same data dir
    later.set_cookie("shroud_admin", stolen)
    assert later.get("/api/overview").status_code == 401


def test_session_table_is_bounded_and_persisted(tmp_path):
    from lib.admin.auth import SESSION_HOURS, SessionTable

    now = [1000.0]
    table = SessionTable(str(tmp_path), limit=3, clock=lambda: now[0])
    sids = []
    for _ in range(5):
        now[0] += 1
        sids.append(table.issue())
    assert [table.valid(s) for s in sids] == [False, False, True, True, True]
    assert table.evicted == 2 and len(table.live) == 3
    again = SessionTable(str(tmp_path), limit=3, clock=lambda: now[0])  # a restart
    assert [again.valid(s) for s in sids] == [False, False, True, True, True]
    again.revoke(sids[2])
    assert not SessionTable(str(tmp_path), clock=lambda: now[0]).valid(sids[2])
    now[0] += SESSION_HOURS * 3600
    assert not again.valid(sids[4])  # expired
    assert (tmp_path / "admin-sessions").stat().st_mode & 0o077 == 0
    assert sids[3] not in (tmp_path / "admin-sessions").read_text()  # digests, not ids
    # Nowhere to write (here: a file where the directory should be): still usable, from memory.
    blocked = SessionTable(str(tmp_path / "admin-sessions" / "sub"), clock=lambda: now[0])
    assert blocked.valid(blocked.issue())


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example", "/\\evil.example",
                                    "/\t/evil.example", "javascript:alert(1)"])
def test_login_next_stays_on_site(client, target):
    page = client.get("/login")
    r = client.post("/login", data={"username": "admin", "password": PASSWORD,
                                    "csrf_token": csrf_of(page.data), "next": target})
    loc = r.headers["Location"]
    # a browser treats "//host" and "/\\host" as another site: only a plain path may come back
    assert loc.startswith("/") and loc[1:2] not in ("/", "\\")
    assert urlparse(loc).netloc == "" and urlparse(loc).scheme == ""


def test_session_survives_restart_through_the_persisted_secret(proxy, config, tmp_path):
    a = create_admin_app(proxy, config).test_client()
    assert login(a).status_code == 302
    cookie = a.get_cookie("shroud_admin")
    secret = (tmp_path / "data" / SECRET_FILE)
    assert secret.stat().st_mode & 0o077 == 0
    b = create_admin_app(proxy, config).test_client()  # "restarted": same data dir
    b.set_cookie("shroud_admin", cookie.value)
    assert b.get("/").status_code == 200


def test_without_a_password_hash_pages_refuse_and_explain(proxy, tmp_path):
    c = create_admin_app(proxy, {"DATA_DIR": str(tmp_path / "d"), "ADMIN_TOKEN": TOKEN}) \
        .test_client()
    for path in ("/", "/login", "/h/https/x.test"):
        r = c.get(path)
        assert r.status_code == 503
        assert b"lib.admin hash-password" in r.data and b"SHROUD_ADMIN_PASSWORD_HASH" in r.data
    assert c.get("/api/status", headers=bearer()).status_code == 200
    bad = create_admin_app(proxy, {"ADMIN_PASSWORD_HASH": "plaintext"}).test_client()
    r = bad.get("/")
    assert r.status_code == 503 and b"not a werkzeug hash" in r.data


def test_security_headers(client):
    login(client)
    r = client.get("/")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-store"


def test_static_assets_are_served_locally(client):
    for path in ("/static/vendor/uplot/uPlot.iife.min.js", "/static/dashboard.js",
                 "/static/app.css", "/static/vendor/uplot/LICENSE"):
        r = client.get(path)
        assert r.status_code == 200 and len(r.data) > 500, path
    login(client)
    html = client.get("/").data
    assert b"http://" not in html and b"https://" not in html  # no CDN, nothing off-box


# --- the parts alone ---------------------------------------------------------------------------

def test_the_blueprint_serves_any_live_state_without_a_proxy(tmp_path):
    """views.bp and auth need only what app.extensions holds: no ProxyServer, no listeners."""
    from flask import Flask

    from lib.admin import auth, views
    from lib.proxy.registry import Registry

    class Actions:
        def __init__(self):
            self.calls = []

        def disconnect_tunnel(self, tunnel_id, actor, detail=""):
            self.calls.append((tunnel_id, actor, detail))
            return True

    registry, actions = Registry(), Actions()
    app = Flask(__name__, template_folder=str(tmp_path))
    app.secret_key = b"k" * 32
    app.extensions[views.EXTENSION] = views.Live(registry=registry, store=None, hostname="p.test",
                                                 fingerprint="f" * 64, actions=actions)
    app.extensions[auth.EXTENSION] = auth.AuthSettings(password_hash=None, token=TOKEN)
    app.register_blueprint(views.bp)
    c = app.test_client()
    registry.add_tunnel(FakeSession(), "10.0.0.3:3", KEY_A, "c" * 32)
    o = c.get("/api/overview", headers=bearer()).json
    assert o["hostname"] == "p.test" and o["tunnels"] == 1 and o["blocked_keys"] == 0
    r = c.post("/api/tunnels/7/disconnect", json={"detail": "x"}, headers=bearer())
    assert r.json == {"ok": True, "tunnel": 7} and actions.calls == [(7, "api-token", "x")]
    assert c.get("/api/overview").status_code == 401


def test_a_block_without_a_store_is_a_clear_503_naming_it(tmp_path):
    """A proxy without an ownership store (an embedding that passed its own policy) cannot keep
    a block: /api/block and /api/unblock say so in JSON, naming the store and its flags."""
    from flask import Flask

    from lib.admin import auth, views
    from lib.proxy.actions import OperatorActions
    from lib.proxy.registry import Registry

    registry = Registry()
    app = Flask(__name__, template_folder=str(tmp_path))
    app.secret_key = b"k" * 32
    app.extensions[views.EXTENSION] = views.Live(
        registry=registry, store=None, hostname="p.test", fingerprint="f" * 64,
        actions=OperatorActions(registry, store=None))
    app.extensions[auth.EXTENSION] = auth.AuthSettings(password_hash=None, token=TOKEN)
    app.register_blueprint(views.bp)
    c = app.test_client()
    for path in ("/api/block", "/api/unblock"):
        for kind, target in (("hostname", "app.test"), ("key", KEY_B)):
            r = c.post(path, json={"kind": kind, "target": target}, headers=bearer())
            assert r.status_code == 503 and r.json["missing"] == "store", (path, r.data)
            assert "no ownership store" in r.json["error"], r.json
            assert "--data-dir" in r.json["error"] and "--database-url" in r.json["error"]


def test_login_throttle_alone():
    now = [0.0]
    from lib.admin.auth import LoginThrottle

    t = LoginThrottle(limit=3, clock=lambda: now[0])
    for _ in range(3):
        assert t.allowed("a")
        t.failed("a")
    assert not t.allowed("a") and t.allowed("b")
    now[0] += 60
    assert t.allowed("a")  # a rolling minute


# --- CSRF on actions -------------------------------------------------------------------------

def test_actions_from_a_session_need_the_csrf_token(client, proxy):
    t, _ = make_tunnel(proxy, ["app.test"])
    token = logged_in_csrf(client)
    body = {"kind": "hostname", "target": "app.test"}
    for path, data in (("/api/block", body), ("/api/unblock", body),
                       (f"/api/tunnels/{t.id}/disconnect", {})):
        r = client.post(path, json=data)
        assert r.status_code == 403 and "CSRF" in r.json["error"], path
        r = client.post(path, json=data, headers={"X-CSRF-Token": "forged"})
        assert r.status_code == 403, path
    assert not proxy.store.is_blocked(hostname="app.test")
    assert not t.session.closed
    r = client.post("/api/block", json=body, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json["bindings_dropped"] == 1
    assert proxy.store.is_blocked(hostname="app.test")


def test_bearer_actions_need_no_csrf(client, proxy):
    r = client.post("/api/block", json={"kind": "key", "target": KEY_B}, headers=bearer())
    assert r.status_code == 200
    assert proxy.store.is_blocked(key=KEY_B)
    assert proxy.store.audit_log(1)[0].actor == "api-token"


# --- the views over live state ---------------------------------------------------------------

def test_status_keeps_its_shape(client, proxy):
    make_tunnel(proxy, ["app.test"])
    s = client.get("/api/status", headers=bearer()).json
    assert s["fingerprint"] == proxy.fingerprint
    assert s["bindings"][0]["name"] == "app.test" and s["bindings"][0]["tunnels"] == 1
    assert s["tunnels"][0]["sends_waiting"] == 0


def test_overview_counts_and_chart(client, proxy):
    t, (b,) = make_tunnel(proxy, ["app.test"])
    proxy.registry.connections = 3
    proxy.registry.count_bytes(b, t, n_in=1000, n_out=5000)
    proxy.registry.count_refusal("unknown_name")
    o = client.get("/api/overview", headers=bearer()).json
    assert o["tunnels"] == 1 and o["bindings"] == 1 and o["keys"] == 1
    assert o["connections"] == 3 and o["bytes_in"] == 1000 and o["bytes_out"] == 5000
    assert o["refusals"] == {"unknown_name": 1} and o["refusals_total"] == 1
    assert o["listeners"]["https"] == "127.0.0.1:8443"
    assert o["rate_out"] > 0
    c = o["chart"]
    assert len(c["t"]) == len(c["in"]) == len(c["out"]) >= 2
    assert c["t"][1] - c["t"][0] == 10 and sum(c["out"]) > 0 and c["out"][-1] > 0


def test_chart_ranges_to_the_data_on_a_young_proxy(client, proxy):
    """A proxy up for 35 s charts its 35 s (a spike on an hour of zeros is unreadable); an
    old one charts the last hour; a name bound a minute ago charts that minute."""
    started = proxy.registry.started = time.time() - 35
    c = client.get("/api/overview", headers=bearer()).json["chart"]
    assert c["t"][0] <= started < c["t"][0] + 10 and len(c["t"]) <= 6, c["t"]
    proxy.registry.started = time.time() - 7200
    c = client.get("/api/overview", headers=bearer()).json["chart"]
    assert len(c["t"]) == 360
    proxy.registry.started = time.time() - 1  # at least two points: the chart has a width
    assert len(client.get("/api/overview", headers=bearer()).json["chart"]["t"]) >= 2
    t, (b,) = make_tunnel(proxy, ["app.test"])
    b.bound_at = time.time() - 60
    c = client.get("/api/hostnames/https/app.test", headers=bearer()).json["chart"]
    assert c["t"][0] <= b.bound_at < c["t"][0] + 10 and len(c["t"]) <= 8, c["t"]


def test_public_link_is_what_a_visitor_opens(client, proxy):
    """The dashboard links each name to its public page: https://NAME with the https
    listener's port unless 443, http://NAME for http: names; nothing for tcp: or wildcards."""
    make_tunnel(proxy, ["app.test", "*.wild.test"])
    make_tunnel(proxy, ["plain.test"], protocol="http", peer="10.0.0.2:1")
    proxy.registry.add_listener("http", ("0.0.0.0", 80))
    links = {b["name"]: b["link"] for b in
             client.get("/api/hostnames", headers=bearer()).json["items"]}
    assert links == {"app.test": "https://app.test:8443", "*.wild.test": None,
                     "plain.test": "http://plain.test"}
    d = client.get("/api/hostnames/https/app.test", headers=bearer()).json
    assert d["link"] == "https://app.test:8443"
    link = dashboard.public_link
    assert link("tls", "a.test", {"https": "[::]:443"}) == "https://a.test"
    assert link("tcp", "tcp:2000", {"https": "0.0.0.0:443"}) is None
    assert link("http", "a.test", {"one-port": "0.0.0.0:5000"}) == "https://a.test"
    assert link("https", "a.test", {"tunnel": "0.0.0.0:4443"}) is None


def test_hostnames_filter_sort_paginate(client, proxy):
    names = [f"host{i:04d}.test" for i in range(1200)]
    t, bindings = make_tunnel(proxy, names[:600], key=KEY_A)
    t2, bindings2 = make_tunnel(proxy, names[600:], key=KEY_B, peer="10.0.0.2:6000")
    for i, b in enumerate(bindings + bindings2):
        proxy.registry.count_bytes(b, t, n_out=i)
    get = lambda qs: client.get("/api/hostnames?" + qs, headers=bearer())
    r = get("per_page=100&page=3").json
    assert r["total"] == 1200 and r["pages"] == 12 and len(r["items"]) == 100
    assert r["items"][0]["name"] == "host0200.test"
    r = get("sort=bytes_out&order=desc&per_page=5").json
    assert [x["name"] for x in r["items"]] == [f"host{i:04d}.test" for i in range(1199, 1194, -1)]
    r = get("q=HOST011").json  # case-insensitive substring
    assert r["total"] == 10 and {x["name"] for x in r["items"]} == {
        f"host{i:04d}.test" for i in range(110, 120)}
    r = get(f"q={KEY_B[:16]}&per_page=1").json  # by owner key
    assert r["total"] == 600
    r = get("page=999").json  # past the end: the last page
    assert r["page"] == r["pages"] == 24
    for bad in ("sort=nope", "order=up", "per_page=100000", "page=x", "q=" + "x" * 400):
        r = get(bad)
        assert r.status_code == 400 and r.json["error"], bad


def test_hostname_detail(client, proxy):
    t, (b,) = make_tunnel(proxy, ["app.test"])
    t.streams_open = 2
    proxy.registry.count_bytes(b, t, n_in=10, n_out=20)
    d = client.get("/api/hostnames/https/app.test", headers=bearer()).json
    assert d["bound"] and not d["blocked"] and d["owner"] == KEY_A
    assert d["streams_open"] == 2 and d["bytes_out"] == 20
    (tl,) = d["tunnel_list"]
    assert tl["peer"] == "10.0.0.1:5000" and tl["heartbeat_rtt_ms"] == 12.0
    assert tl["bytes_in"] == 10 and tl["streams_open"] == 2
    assert 2 <= len(d["chart"]["t"]) <= 3  # bound just now: the chart spans its life
    r = client.get("/api/hostnames/https/other.test", headers=bearer())
    assert r.status_code == 404 and r.json["bound"] is False


def test_tunnels_api(client, proxy):
    make_tunnel(proxy, ["a.test"], peer="10.0.0.1:1")
    make_tunnel(proxy, ["b.test"], key=KEY_B, peer="10.0.0.2:2")
    r = client.get("/api/tunnels?q=10.0.0.2", headers=bearer()).json
    assert r["total"] == 1 and r["items"][0]["names"] == ["https/b.test"]
    r = client.get("/api/tunnels?q=a.test", headers=bearer()).json
    assert r["total"] == 1 and r["items"][0]["peer"] == "10.0.0.1:1"


def test_unproven_keys_are_shown_as_unproven(client, proxy):
    """Auth's key is a claim (anyone who knows a client's public key can make it): the API says
    which tunnels proved theirs, and the overview counts claims apart (issue 11 item 13)."""
    make_tunnel(proxy, ["a.test"], key=KEY_A, peer="10.0.0.1:1")
    claim, _ = make_tunnel(proxy, [], key=KEY_A, peer="10.6.6.6:1", proven=False)
    squat, _ = make_tunnel(proxy, [], key=KEY_B, peer="10.6.6.6:2", proven=False)
    rows = {r["peer"]: r for r in client.get("/api/tunnels", headers=bearer()).json["items"]}
    assert rows["10.0.0.1:1"]["key_proven"] is True
    assert rows["10.6.6.6:1"]["key_proven"] is False and rows["10.6.6.6:2"]["key_proven"] is False
    st = {t["peer"]: t for t in client.get("/api/status", headers=bearer()).json["tunnels"]}
    assert st["10.0.0.1:1"]["key_proven"] is True and st["10.6.6.6:1"]["key_proven"] is False
    o = client.get("/api/overview", headers=bearer()).json
    assert o["keys"] == 1 and o["keys_unproven"] == 1  # KEY_B is only claimed
    # The audit log says it too when the operator disconnects such a tunnel.
    assert client.post(f"/api/tunnels/{squat.id}/disconnect", headers=bearer()).json["ok"]
    assert f"key {KEY_B[:16]} (unproven)" in proxy.store.audit_log(1)[0].detail
    claim.proven = True  # what lib/proxy/server.py does once a signed bind verifies
    row = client.get("/api/tunnels?q=10.6.6.6:1", headers=bearer()).json["items"][0]
    assert row["key_proven"] is True


# --- actions -----------------------------------------------------------------------------------

def test_block_hostname_drops_routing_and_is_audited(client, proxy):
    t, _ = make_tunnel(proxy, ["app.test", "keep.test"])
    _, (wild,) = make_tunnel(proxy, ["*.wild.test"], key=KEY_B)
    r = client.post("/api/block", json={"kind": "hostname", "target": "app.test",
                                        "detail": "phishing"}, headers=bearer())
    assert r.json == {"ok": True, "kind": "hostname", "target": "app.test",
                      "bindings_dropped": 1}
    assert proxy.registry.lookup(("https",), "app.test") is None
    assert proxy.registry.lookup(("https",), "keep.test") is not None
    assert not t.session.closed  # the tunnel keeps serving its other names
    # A wildcard block drops the bound names it covers.
    r = client.post("/api/block", json={"kind": "hostname", "target": "*.wild.test"},
                    headers=bearer())
    assert r.json["bindings_dropped"] == 1
    assert proxy.registry.lookup(("https",), "x.wild.test") is None
    d = client.get("/api/hostnames/https/app.test", headers=bearer())
    assert d.status_code == 404 and d.json["blocked"] is True
    blocks = client.get("/api/blocks", headers=bearer()).json
    assert [b["target"] for b in blocks["hostnames"]] == ["*.wild.test", "app.test"]
    assert blocks["hostnames"][1]["detail"] == "phishing"
    r = client.post("/api/unblock", json={"kind": "hostname", "target": "app.test"},
                    headers=bearer())
    assert r.json["was_blocked"] is True
    assert not proxy.store.is_blocked(hostname="app.test")
    audit = client.get("/api/audit", headers=bearer()).json["items"]
    assert [(e["action"], e["target"]) for e in audit][:3] == [
        ("unblock-hostname", "app.test"), ("block-hostname", "*.wild.test"),
        ("block-hostname", "app.test")]


def test_block_key_disconnects_its_tunnels(client, proxy):
    t1, _ = make_tunnel(proxy, ["a.test"], key=KEY_A)
    t2, _ = make_tunnel(proxy, ["b.test"], key=KEY_A, peer="10.0.0.9:9")
    t3, _ = make_tunnel(proxy, ["c.test"], key=KEY_B)
    r = client.post("/api/block", json={"kind": "key", "target": KEY_A.upper()},
                    headers=bearer())
    assert r.json["tunnels_disconnected"] == 2
    assert t1.session.closed and t2.session.closed and not t3.session.closed
    assert set(proxy.registry.tunnels) == {t3.id}
    assert proxy.store.is_blocked(key=KEY_A)


def test_disconnect_tunnel(client, proxy):
    t, _ = make_tunnel(proxy, ["a.test"])
    r = client.post(f"/api/tunnels/{t.id}/disconnect", json={"detail": "rotating"},
                    headers=bearer())
    assert r.json == {"ok": True, "tunnel": t.id}
    assert t.session.closed and t.session.close_reason == "disconnected by the operator"
    assert proxy.registry.lookup(("https",), "a.test") is None
    e = proxy.store.audit_log(1)[0]
    assert e.action == "disconnect-tunnel" and "a.test" in e.detail and "rotating" in e.detail
    assert client.post(f"/api/tunnels/{t.id}/disconnect", headers=bearer()).status_code == 404


def test_bad_actions_are_refused_plainly(client):
    r = client.post("/api/block", json={"kind": "key", "target": "short"}, headers=bearer())
    assert r.status_code == 400 and "64 hex" in r.json["error"]
    r = client.post("/api/block", json={"kind": "hostname", "target": "bad name!"},
                    headers=bearer())
    assert r.status_code == 400 and "cannot block" in r.json["error"]
    r = client.post("/api/block", json={"kind": "thing", "target": "x"}, headers=bearer())
    assert r.status_code == 400
    r = client.post("/api/block", json={"kind": "hostname", "target": "a.test",
                                        "detail": "x" * 600}, headers=bearer())
    assert r.status_code == 400 and "detail" in r.json["error"]


# --- pages render ------------------------------------------------------------------------------

def test_pages_render(client, proxy):
    make_tunnel(proxy, ["app.test"])
    login(client)
    for path, marker in (("/", b'id="hostnames"'), ("/h/https/app.test", b'data-name="app.test"'),
                         ("/tunnels", b'id="tunnels"'), ("/blocks", b'id="audit"')):
        r = client.get(path)
        assert r.status_code == 200 and marker in r.data, path
    # A hostile name in the URL is escaped, never markup.
    r = client.get("/h/https/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert b"<script>alert(1)" not in r.data and b"&lt;script&gt;" in r.data


# --- Prometheus --------------------------------------------------------------------------------

def _series(text: str, metric: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(metric + "{")
            or line.startswith(metric + " ")]


def test_metrics(client, proxy, monkeypatch):
    from lib.net import muxsession
    t, (b,) = make_tunnel(proxy, ["app.test"])
    proxy.registry.count_bytes(b, t, n_in=7, n_out=9)
    proxy.registry.count_refusal("blocked")
    monkeypatch.setattr(muxsession, "reader_crashes", 3)
    text = client.get("/metrics", headers=bearer()).data.decode()
    assert "shroud_mux_reader_crashes_total 3.0" in text
    assert "shroud_tunnels 1.0" in text
    assert 'shroud_bytes_total{direction="out"} 9.0' in text
    assert 'shroud_refusals_total{reason="blocked"} 1.0' in text
    assert ('shroud_hostname_bytes_total{direction="in",hostname="app.test",protocol="https"} 7.0'
            in text)


def test_metrics_per_hostname_series_are_bounded(client, proxy):
    n = 2000
    t, bindings = make_tunnel(proxy, [f"flood{i}.test" for i in range(n)])
    for i, b in enumerate(bindings):
        proxy.registry.count_bytes(b, t, n_in=i, n_out=1)
    text = client.get("/metrics", headers=bearer()).data.decode()
    series = _series(text, "shroud_hostname_bytes_total")
    assert len(series) == 2 * (TOP_HOSTNAMES + 1)  # in+out for the top names and __other__
    names = {re.search(r'hostname="([^"]+)"', s).group(1) for s in series}
    assert OTHER in names and f"flood{n - 1}.test" in names and "flood0.test" not in names
    other_in = [s for s in series if OTHER in s and 'direction="in"' in s][0]
    assert float(other_in.split()[-1]) == sum(range(n - TOP_HOSTNAMES))
    assert f"shroud_metrics_hostnames_folded {float(n - TOP_HOSTNAMES)}" in text
    total = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    assert total < 400, total  # the whole scrape stays small with 2000 names bound


# --- the blocks cache in the ownership store ---------------------------------------------------

def test_is_blocked_is_answered_from_memory(tmp_path):
    store = ownership.OwnershipStore(str(tmp_path / "o.sqlite3"))
    store.block_hostname("*.bad.test", "op")
    store.block_key(KEY_A, "op")
    statements = []
    store.set_trace_callback(statements.append)
    for _ in range(1000):
        assert store.is_blocked(hostname="x.bad.test")
        assert not store.is_blocked(hostname="good.test")
        assert store.is_blocked(key=KEY_A)
    assert len([s for s in statements if "blocked" in s]) <= 2  # one reload at most
    store.close()


def test_blocks_cache_follows_changes(tmp_path):
    now = [1000.0]
    path = str(tmp_path / "o.sqlite3")
    store = ownership.OwnershipStore(path, clock=lambda: now[0])
    other = ownership.OwnershipStore(path, clock=lambda: now[0])  # e.g. another process
    assert not store.is_blocked(hostname="a.test")
    store.block_hostname("a.test", "op")
    assert store.is_blocked(hostname="a.test")  # this store's own change: at once
    store.unblock_hostname("a.test", "op")
    assert not store.is_blocked(hostname="a.test")
    other.block_key(KEY_B, "op")
    assert not store.is_blocked(key=KEY_B)  # cached...
    now[0] += ownership.BLOCK_CACHE_TTL
    assert store.is_blocked(key=KEY_B)  # ...until the TTL passes
    store.close()
    other.close()


def test_rate_reads_the_last_few_seconds():
    """One rate for the registry, the status API and the dashboard (RateHistory.rate): the
    bytes of the last RATE_SECONDS over the time they span, so a card shows the transfer now."""
    from lib.proxy.registry import RATE_SECONDS, RateHistory

    now = [10_000.5]
    h = RateHistory(clock=lambda: now[0])
    for i in range(400):
        now[0] += 0.25
        h.add(i, 2 * i)
    first = int(now[0]) - RATE_SECONDS + 1
    recent = [i for i in range(400) if int(10_000.5 + 0.25 * (i + 1)) >= first]
    span = now[0] - first
    want = (sum(recent) / span, 2 * sum(recent) / span)
    assert h.rate() == pytest.approx(want) and want[0] > 0
    assert h.rate(now[0] + 3600) == (0.0, 0.0)  # an hour later: nothing recent


def test_rate_falls_to_zero_seconds_after_a_transfer_ends():
    """A download at 2 MB/s for a minute, then nothing: the card reads 0 once RATE_SECONDS
    have passed (over 10 s buckets it read ~1.9 MB/s for up to 20 s more)."""
    from lib.proxy.registry import RATE_SECONDS, RateHistory

    now = [20_000.0]
    h = RateHistory(clock=lambda: now[0])
    for _ in range(600):  # 60 s in 0.1 s steps
        now[0] += 0.1
        h.add(0, 200_000)
    assert h.rate()[1] == pytest.approx(2_000_000, rel=0.15)
    now[0] += RATE_SECONDS + 0.01
    assert h.rate() == (0.0, 0.0)


def test_counts_survive_rings_rebuilt_elsewhere():
    """RateHistory.add keeps the current second's buckets at hand (it runs twice per spliced
    chunk); rings rebuilt outside it (lib.proxy.groupview merges) are looked up again."""
    from lib.proxy.registry import RateHistory

    h = RateHistory(clock=lambda: 30_000.5)
    h.add(5, 1)
    h.add(5, 1)
    assert list(h.seconds[-1]) == [30_000, 10, 2] and h.series()[-1] == [30_000, 10, 2]
    h.seconds.clear()
    h.buckets.clear()
    h.add(7, 0)
    assert list(h.seconds[-1]) == [30_000, 7, 0] and h.series() == [[30_000, 7, 0]]



def test_count_bytes_reads_the_clock_once_for_every_counter():
    """Registry.count_bytes runs twice per spliced chunk: one clock read serves the binding's
    and the registry's histories (it was one each, with Binding.count's call between), and
    every counter gets the bytes."""
    from lib.proxy.registry import Registry

    reads = []

    def clock():
        reads.append(1)
        return 40_000.5

    class Session:
        closed = False

    r = Registry()
    r.history.clock = clock
    tunnel = r.add_tunnel(Session(), peer="192.0.2.1:5", key=None, client_id="c")
    b = r.bind(tunnel, protocol="tcp", name="tcp:20000", owner=None, method="tofu",
               url="tcp://127.0.0.1:20000")
    b.history.clock = clock
    r.count_bytes(b, tunnel, n_in=100)
    r.count_bytes(b, tunnel, n_out=13)
    assert len(reads) == 2
    for counted in (b, tunnel, r):
        assert (counted.bytes_in, counted.bytes_out) == (100, 13)
    for h in (b.history, r.history):
        assert list(h.seconds[-1]) == [40_000, 100, 13] and h.series() == [[40_000, 100, 13]]

# --- the fleet view ------------------------------------------------------------------------------

def test_fleet_view_and_blocks_made_by_another_instance(proxy, config):
    from lib.proxy.fleet import FleetMember, InstanceIdentity

    make_tunnel(proxy, ["a.test", "b.test"], key=KEY_A)
    member = FleetMember(proxy.store, proxy.registry, InstanceIdentity(
        "p1", proxy.registry.listeners, proxy.fingerprint), proxy.actions.apply_blocks)
    member.beat()  # what its heartbeat greenlet does every few seconds
    proxy.fleet = member
    client = create_admin_app(proxy, config).test_client()
    f = client.get("/api/fleet", headers=bearer()).json
    assert [(i["id"], i["this"], i["state"], i["tunnels"], i["names"])
            for i in f["instances"]] == [(member.id, True, "live", 1, 2)]
    assert f["instances"][0]["addresses"]["https"] == "127.0.0.1:8443"
    assert [(n["name"], n["instances"], n["protocols"], n["blocked"]) for n in f["names"]] == [
        ("a.test", [member.id], ["https"], False), ("b.test", [member.id], ["https"], False)]
    assert f["store"] == "SQLite " + proxy.store.path
    # Another instance (another process on the same store) blocks b.test: the watcher's
    # reload hands it to apply_blocks, which drops the live binding here.
    other = ownership.OwnershipStore(proxy.store.path)
    other.block_hostname("b.test", "op-elsewhere")
    other.close()
    member.refresh_blocks()
    assert [b.name for b in proxy.registry.bindings.values()] == ["a.test"]
    member.beat()
    f = client.get("/api/fleet", headers=bearer()).json
    assert [n["name"] for n in f["names"]] == ["a.test"]
    assert "shroud_store_reachable 1.0" in client.get("/metrics", headers=bearer()).text
    # A key blocked elsewhere: its tunnels here are cut.
    tunnel = next(iter(proxy.registry.tunnels.values()))
    other = ownership.OwnershipStore(proxy.store.path)
    other.block_key(KEY_A, "op-elsewhere")
    other.close()
    member.refresh_blocks()
    assert proxy.registry.tunnels == {} and tunnel.session.closed
    login(client)
    page = client.get("/fleet")
    assert page.status_code == 200 and b'id="instances"' in page.data
    member.stop()
    assert client.get("/api/fleet", headers=bearer()).json["instances"] == []
