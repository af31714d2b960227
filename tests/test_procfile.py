"""The Procfile on a one-port platform, for real: honcho runs `web: gunicorn ...` with only
$PORT set (plus SHROUD_* settings), behind nginx terminating TLS on loopback as the platform's
router (WebSocket upgrades passed, X-Forwarded-For added, 55 s idle timeout). Clients reach the
proxy with --proxy wss://localhost:PORT/_shroud/tunnel, verifying nginx's certificate by CA or
pin; the public reaches origins through nginx -> gunicorn -> tunnel.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import time

import pytest
from werkzeug.security import generate_password_hash

from tests.support.origin import pattern
from tests.support.procs import PY, ROOT, ClientProc, OriginProc, Proc, free_port, wait_port
from tests.support.visitor import tls_site, ws_echo, ws_upgrade
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(300)

TOKEN = "procfile-test-token"
DASH_PASSWORD = "procfile-dashboard-password"
VENV_BIN = os.path.join(ROOT, ".venv", "bin")


class NginxFront(Proc):
    """nginx as a platform router: TLS terminated, HTTP/1.1 and WebSocket upgrades proxied to
    one upstream port, X-Forwarded-For appended, connections idle `idle` seconds cut."""

    def __init__(self, logdir: str, upstream_port: int, cert: str, key: str, idle: int = 55,
                 name: str = "nginx", keepalive: bool = False):
        self.port = free_port()
        d = os.path.join(logdir, name)
        os.makedirs(d, exist_ok=True)
        user = "user root root;" if os.geteuid() == 0 else ""
        # keepalive: a pool of idle connections to the app, reused for any visitor's request
        # to any host (as Heroku's Router 2.0 does); without it, one connection per request.
        pool = "keepalive 8; keepalive_requests 1000;" if keepalive else ""
        no_upgrade = "''" if keepalive else "close"
        conf = f"""
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' {no_upgrade}; }}
    upstream app {{ server 127.0.0.1:{upstream_port}; {pool} }}
    server {{
        listen 127.0.0.1:{self.port} ssl;
        server_name _;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout {idle}s;
            proxy_send_timeout {idle}s;
        }}
    }}
}}
"""
        conf_path = os.path.join(d, "nginx.conf")
        with open(conf_path, "w") as f:
            f.write(conf)
        super().__init__(name, ["nginx", "-p", d, "-c", conf_path, "-g", "daemon off;"], logdir)
        try:
            wait_port(self.port, 10)
        except TimeoutError:
            raise RuntimeError(f"nginx did not start:\n{self.log()}") from None


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    d = tmp_path_factory.mktemp("procfile")
    site = tls_site(d, "localhost", "web.test", "pp.test", "idle.test", "tlsonly.test",
                    "nobody.test")
    cert_pem, key_pem, ca_pem = site.cert_pem, site.key_pem, site.ca_pem
    with open(cert_pem) as f:
        front_pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()

    procs = []
    try:
        http_origin = OriginProc(str(d), name="http-origin")
        procs.append(http_origin)
        pp_origin = OriginProc(str(d), name="pp-origin", proxy_protocol=True)
        procs.append(pp_origin)
        port = free_port()
        # Only $PORT and SHROUD_* settings, as a platform's config vars would give.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHROUD_")}
        # Two workers (issue 13): tunnels and visitors land on either; each serves every name.
        env.update(PORT=str(port), PATH=VENV_BIN + os.pathsep + env.get("PATH", ""),
                   WEB_CONCURRENCY="2",
                   SHROUD_DATA_DIR=str(d / "proxy-data"), SHROUD_HOSTNAME="localhost",
                   SHROUD_ADMIN_TOKEN=TOKEN, SHROUD_PEEK_TIMEOUT="3",
                   SHROUD_ADMIN_PASSWORD_HASH=generate_password_hash(DASH_PASSWORD,
                                                                     "pbkdf2:sha256:1000"))
        web = Proc("honcho", [os.path.join(VENV_BIN, "honcho"), "start", "-f", "Procfile",
                              "-p", str(port)], str(d), env=env)
        procs.append(web)
        try:
            wait_port(port, 30)
        except TimeoutError:
            raise RuntimeError(f"honcho/gunicorn did not start:\n{web.log()}") from None
        front = NginxFront(str(d), port, cert_pem, key_pem, idle=55)
        procs.append(front)
        tunnel_url = f"wss://localhost:{front.port}/_shroud/tunnel"
        client = ClientProc(str(d), str(d / "client-a"), [
            "http:web.test", f"127.0.0.1:{http_origin.port}",
            "tlsonly.test", f"127.0.0.1:{http_origin.port}"],
            [tunnel_url], extra=["--proxy-ca", ca_pem])
        procs.append(client)
        # the PROXY-protocol client verifies the platform's certificate by pin instead of CA
        client_pp = ClientProc(str(d), str(d / "client-pp"), [
            "http:pp.test", f"127.0.0.1:{pp_origin.port}"], [tunnel_url], pins=[front_pin],
            name="client-pp", extra=["--proxy-protocol", "v1"])
        procs.append(client_pp)
        w = dict(dir=d, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, port=port,
                 front=front, web=web, client=client, http_origin=http_origin,
                 tunnel_url=tunnel_url, front_pin=front_pin)
        for name in ("web.test", "pp.test"):
            wait_bound(w, name)
        # each worker holds every name or knows the sibling that does (lib/proxy/workers.py)
        wait_for(lambda: all(x["bindings"] + x["names_elsewhere"] >= 3
                             for x in status(w)["workers"]), "every worker knows every name", 30)
        yield w
    finally:
        for p in reversed(procs):
            p.stop()


# --- helpers ---------------------------------------------------------------------------------

def front_conn(w, host: str, port: int | None = None, timeout: float = 60,
               source: str | None = None) -> http.client.HTTPConnection:
    """An HTTPS connection to the front (nginx) for `host`, SNI and certificate checked."""
    ctx = ssl.create_default_context(cafile=w["ca_pem"])
    port = port or w["front"].port
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                   source_address=(source, 0) if source else None)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = ctx.wrap_socket(raw, server_hostname=host)
    return conn


def front_get(w, host, path, headers=None, port=None):
    c = front_conn(w, host, port)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def status(w) -> dict:
    code, body = front_get(w, "localhost", "/api/status",
                           {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200, body[:300]
    return json.loads(body)


def wait_bound(w, name, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = status(w)
        except (OSError, AssertionError, ValueError):
            time.sleep(0.2)
            continue
        for t in last["tunnels"]:
            if name in t["names"]:
                return t
        time.sleep(0.2)
    raise TimeoutError(f"{name} not bound: {last}\n{w['web'].log()[-3000:]}")


def tls_to_front(w, host, port=None):
    ctx = ssl.create_default_context(cafile=w["ca_pem"])
    raw = socket.create_connection(("127.0.0.1", port or w["front"].port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname=host)


# --- tests -----------------------------------------------------------------------------------

def test_tunnels_arrive_as_websockets_on_port(platform):
    st = status(platform)
    assert st["listeners"].get("one-port", "").endswith(f":{platform['port']}")
    assert "tunnel" not in st["listeners"]  # no raw tunnel port opened on a platform
    tunnels = [t for t in st["tunnels"] if "web.test" in t["names"]]
    assert len(tunnels) == 1 and tunnels[0]["transport"] == "websocket"
    # gunicorn's two workers serve everything, started by honcho from the Procfile
    assert "web.1" in platform["web"].log()


def test_two_workers_each_serve_every_name(platform):
    """WEB_CONCURRENCY=2: router connections land on either worker; each tunnel lives on one,
    and the other hands its visitors over (lib/proxy/workers.py); the API shows both."""
    st = status(platform)
    assert len(st["workers"]) == 2, st.get("workers")
    for _ in range(30):  # one router connection per request: each lands on either worker
        assert front_get(platform, "web.test", "/hello") == (200, b"hello from origin\n")
    workers = status(platform)["workers"]
    assert sum(w["handoffs"].get("taken", 0) for w in workers) > 0, workers
    assert all(w["rss"] for w in workers), workers  # memory per worker, reported


def test_host_routing_through_front_and_tunnel(platform):
    for _ in range(3):
        code, body = front_get(platform, "web.test", "/hello")
        assert code == 200 and body == b"hello from origin\n"


def test_visitor_keepalive_through_front(platform):
    c = front_conn(platform, "web.test")
    for _ in range(20):
        c.request("GET", "/hello")
        r = c.getresponse()
        assert r.status == 200 and r.read() == b"hello from origin\n"
    c.close()


def test_reused_router_connection_carries_one_request_only(platform):
    # A router keeping its connection to $PORT alive (Heroku's Router 2.0) could send another
    # visitor's request for another host next; it must not reach web.test's origin.
    s = socket.create_connection(("127.0.0.1", platform["port"]), timeout=30)
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: web.test\r\n\r\n"
              b"GET /api/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
              + TOKEN.encode() + b"\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    assert data.count(b"HTTP/1.1 ") == 1 and data.endswith(b"hello from origin\n")


def test_reused_router_connection_after_a_dashboard_request(platform):
    # The other order: the dashboard's request first. gunicorn must not keep serving the
    # router's connection itself, or the next visitor's request (for web.test, with its own
    # cookies) would be answered by the dashboard.
    s = socket.create_connection(("127.0.0.1", platform["port"]), timeout=30)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
              b"GET /hello HTTP/1.1\r\nHost: web.test\r\nCookie: secret=1\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    assert data.count(b"HTTP/1.1 ") == 1 and b'"ok"' in data
    assert b"hello from origin" not in data


WS_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize("attack", ["upgrade", "plain"])
def test_pooled_router_connection_is_not_handed_to_an_attackers_origin(platform, attack):
    """Issue 11 item 1. A front that pools its connections to $PORT (nginx's upstream
    keepalive here, Heroku's Router 2.0 in production) puts any visitor's request on any idle
    connection. An attacker binds a name whose origin answers its own request with a keep-alive
    200 (to a WebSocket upgrade: no 101) and, when the next request's EOF arrives, one more
    unsolicited answer. Victims' requests for web.test must neither reach that origin nor be
    answered by it."""
    d = platform["dir"]
    log_path = d / f"hostile-{attack}.jsonl"
    log_path.write_text("")
    evil_port = free_port()
    name = f"evil-{attack}.test"
    evil = Proc(f"hostile-origin-{attack}", [PY, "tests/support/hostile_origin.py", "--port",
                                             str(evil_port), "--log", str(log_path)], str(d))
    pooled = attacker = None
    try:
        wait_port(evil_port)
        pooled = NginxFront(str(d), platform["port"], platform["cert_pem"], platform["key_pem"],
                            name=f"nginx-pool-{attack}", keepalive=True)
        attacker = ClientProc(str(d), str(d / f"client-evil-{attack}"),
                              [f"http:{name}", f"127.0.0.1:{evil_port}"],
                              [platform["tunnel_url"]], name=f"client-evil-{attack}",
                              extra=["--proxy-ca", platform["ca_pem"]])
        wait_bound(platform, name)
        # The attacker's own request, through the pooling front (SNI web.test: the test
        # certificate does not name the attacker's host; nginx routes all names alike).
        c = front_conn(platform, "web.test", port=pooled.port)
        c.putrequest("GET", "/ws", skip_host=True)
        c.putheader("Host", name)
        for k, v in (WS_HEADERS if attack == "upgrade" else {}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"hijacked\n")
        c.close()
        for i in range(3):
            code, body = front_get(platform, "web.test", "/hello",
                                   {"Cookie": f"session=victim{i}"}, port=pooled.port)
            assert (code, body) == (200, b"hello from origin\n"), f"victim {i} got {body!r}"
        seen = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert [s["host"] for s in seen] == [name], seen
    finally:
        for p in (attacker, pooled, evil):
            if p is not None:
                p.stop()


def test_the_proxys_own_names_cannot_be_bound_in_one_port_mode(platform):
    """Issue 11 item 5: the admin host (SHROUD_HOSTNAME, here localhost) and addresses are
    reserved to the proxy; a fresh key's binds for them are refused."""
    d = platform["dir"]
    squatter = ClientProc(str(d), str(d / "client-squat"),
                          ["http:localhost", f"127.0.0.1:{platform['http_origin'].port}",
                           "http:127.0.0.1", f"127.0.0.1:{platform['http_origin'].port}",
                           "http:squat-ok.test", f"127.0.0.1:{platform['http_origin'].port}"],
                          [platform["tunnel_url"]], name="client-squat",
                          extra=["--proxy-ca", platform["ca_pem"]])
    try:
        wait_bound(platform, "squat-ok.test")
        squatter.wait_log("localhost is reserved")
        squatter.wait_log("127.0.0.1 is reserved")
        tunnel = wait_bound(platform, "squat-ok.test")
        assert tunnel["names"] == ["squat-ok.test"]
        code, body = front_get(platform, "localhost", "/healthz")  # still the dashboard
        assert code == 200 and json.loads(body) == {"ok": True}
    finally:
        squatter.stop()


def test_dashboard_on_own_hostname_only(platform):
    code, body = front_get(platform, "localhost", "/healthz")
    assert code == 200 and json.loads(body) == {"ok": True}
    code, _ = front_get(platform, "localhost", "/api/status")
    assert code in (401, 403)  # the dashboard's own auth applies
    # the same path on a public name goes to that name's origin, not to the dashboard
    code, body = front_get(platform, "web.test", "/healthz")
    assert code == 404 and body == b"not found\n"
    # a name nobody bound: the proxy's 404
    code, body = front_get(platform, "nobody.test", "/")
    assert code == 404 and b"nobody.test" in body
    # the tunnel endpoint without an upgrade says what it wants
    code, body = front_get(platform, "localhost", "/_shroud/tunnel")
    assert code == 426
    # a tunnel upgrade on a name that is not the proxy's own: refused (a client signs its binds
    # for the name it dials, and the proxy accepts only its own names)
    code, body = front_get(platform, "nobody.test", "/_shroud/tunnel",
                           {"Connection": "Upgrade", "Upgrade": "websocket",
                            "Sec-WebSocket-Version": "13",
                            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert code == 421 and b"nobody.test is not one of this proxy's names" in body


def test_tls_only_bind_gets_a_clear_answer(platform):
    code, body = front_get(platform, "tlsonly.test", "/hello")
    assert code == 421 and b"http:tlsonly.test" in body


def test_public_websocket_through_front(platform):
    s = tls_to_front(platform, "web.test")
    head = ws_upgrade(s, "web.test")
    assert head.startswith(b"HTTP/1.1 101")
    for msg in (b"hi", os.urandom(300), os.urandom(70000)):
        assert ws_echo(s, msg) == msg
    s.close()


def test_client_addr_from_x_forwarded_for_reaches_origin(platform):
    # The visitor connects to the front from 127.0.0.2 and forges an X-Forwarded-For entry;
    # nginx connects to gunicorn from 127.0.0.1 and appends 127.0.0.2. The origin must see
    # 127.0.0.2: not the router's socket address, not the forged entry.
    c = front_conn(platform, "pp.test", source="127.0.0.2")
    c.request("GET", "/peer", headers={"X-Forwarded-For": "203.0.113.7"})
    r = c.getresponse()
    info = json.loads(r.read())
    c.close()
    assert r.status == 200
    assert info["proxy_header"].startswith("PROXY TCP4 127.0.0.2 127.0.0.1 0 "), info


def test_100_mib_both_ways_checksummed(platform):
    n = 100 * 1024 * 1024
    c = front_conn(platform, "web.test", timeout=180)
    c.request("GET", f"/bytes/{n}")
    r = c.getresponse()
    h = hashlib.sha256()
    got = 0
    t0 = time.monotonic()
    while chunk := r.read(1 << 20):
        h.update(chunk)
        got += len(chunk)
    down = time.monotonic() - t0
    assert got == n and h.hexdigest() == hashlib.sha256(pattern(n)).hexdigest()
    body = os.urandom(1 << 20) * 100
    t0 = time.monotonic()
    c.request("POST", "/sha256", body=body)
    r = c.getresponse()
    assert r.read().decode().strip() == hashlib.sha256(body).hexdigest()
    up = time.monotonic() - t0
    c.close()
    print(f"100 MiB through nginx+gunicorn+WebSocket tunnel: down {n / down / 1e6:.1f} MB/s, "
          f"up {n / up / 1e6:.1f} MB/s")


def test_wrong_pin_on_platform_certificate_refused(platform):
    d = platform["dir"]
    bad = ClientProc(str(d), str(d / "client-bad"), ["http:bad.test", "127.0.0.1:9"],
                     [platform["tunnel_url"]], pins=["00" * 32], name="client-badpin")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "matches no pinned" not in bad.log():
            time.sleep(0.2)
        assert "matches no pinned fingerprint" in bad.log()
        assert not any("bad.test" in t["names"] for t in status(platform)["tunnels"])
    finally:
        bad.stop()


def test_quiet_tunnel_survives_router_idle_timeout(platform):
    """A platform cuts connections idle 55 s (Heroku's rule). Here a second front cuts them
    after 5 s, and the tunnel stays quiet (no public traffic) for 8 s: equivalent, because what
    keeps the tunnel open is muxado's heartbeat every 3 s, well inside either timeout, and a
    control (a public WebSocket left silent through the same front) shows the 5 s cut is real.
    """
    d = platform["dir"]
    front5 = NginxFront(str(d), platform["port"], platform["cert_pem"], platform["key_pem"],
                        idle=5, name="nginx-idle5")
    url = f"wss://localhost:{front5.port}/_shroud/tunnel"
    client = ClientProc(str(d), str(d / "client-idle"), [
        "http:idle.test", f"127.0.0.1:{platform['http_origin'].port}"], [url],
        name="client-idle", extra=["--proxy-ca", platform["ca_pem"]])
    try:
        tunnel = wait_bound(platform, "idle.test")
        control = tls_to_front(platform, "web.test", port=front5.port)
        assert ws_upgrade(control, "web.test").startswith(b"HTTP/1.1 101")
        assert ws_echo(control, b"still here?") == b"still here?"
        time.sleep(8)
        control.settimeout(5)
        try:
            cut = control.recv(100) == b""
        except (ConnectionError, ssl.SSLError):
            cut = True
        assert cut, "nginx did not cut the silent WebSocket: the idle timeout is not in force"
        after = wait_bound(platform, "idle.test")
        assert after["id"] == tunnel["id"], "the tunnel was cut and redialled"
        code, body = front_get(platform, "idle.test", "/hello", port=front5.port)
        assert code == 200 and body == b"hello from origin\n"
        assert client.log().count(": online") == 1
    finally:
        client.stop()
        front5.stop()


def _dashboard_login(w, source: str, password: str, forwarded: str) -> int:
    """A login through the front from loopback address ``source``, with a visitor-supplied
    X-Forwarded-For (nginx appends the address it saw after it)."""
    c = front_conn(w, "localhost", source=source)
    try:
        c.request("GET", "/login")
        r = c.getresponse()
        page = r.read()
        cookie = r.getheader("Set-Cookie").split(";", 1)[0]
        token = page.split(b'name="csrf_token" value="', 1)[1].split(b'"', 1)[0].decode()
    finally:
        c.close()
    c = front_conn(w, "localhost", source=source)
    try:
        form = f"username=admin&password={password}&csrf_token={token}&next=/"
        c.request("POST", "/login", body=form, headers={
            "Cookie": cookie, "X-Forwarded-For": forwarded,
            "Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_dashboard_login_throttle_keys_on_the_routers_entry(platform):
    """One-port mode: the router's X-Forwarded-For entry (the last) names the client, so what
    a guesser forges before it buys no fresh window, and the operator behind the same router
    at another address is not locked out (issue 11 item 10)."""
    answers = [_dashboard_login(platform, "127.0.0.3", f"guess{i}", f"198.51.100.{i}")
               for i in range(21)]
    assert answers == [401] * 20 + [429], answers
    assert _dashboard_login(platform, "127.0.0.3", DASH_PASSWORD, "192.0.2.1") == 429
    assert _dashboard_login(platform, "127.0.0.4", DASH_PASSWORD, "198.51.100.0") == 302
