"""Security properties, checked with real processes.

- A Tor exit that intercepts TLS (stand-in: this test's own SOCKS5 server that terminates TLS
  with its own certificate and relays to the real proxy): the client refuses the tunnel, says
  why, and sends the interceptor nothing. The same server relaying honestly is accepted.
- A proxy the client trusts relays its tunnel to another proxy: the other proxy refuses the
  binds, which were signed for the relay (reason wrong-proxy).
- Every tunnel session gets its own bind nonce, so a signed Bind captured on one session and
  replayed on another (by someone who has the public key, not the private one) is refused.
- The dashboard, over HTTP to a real proxy process: no credentials, no access; an action without
  the session's own CSRF token changes nothing.
- The proxy never logs or stores the secrets of plain-HTTP requests it routes or refuses
  (headers, cookies, body; debug logging on).
- In Tor mode (private Tor network) the client connects only to its tor and to the local
  target, and resolves no name itself: every connect() and name-service file it opens is traced
  with strace.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import http.cookiejar
import json
import os
import re
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request

import pytest
from dnslib import A, QTYPE, RR, DNSRecord
import trustme
from werkzeug.security import generate_password_hash

from lib.identity import Identity
from lib.protocol import messages as msg
from lib.certs import cert_fingerprint, ensure_tunnel_cert
from tests.support.procs import (ADMIN_TOKEN, PY, ClientProc, OriginProc, Proc, ProxyProc,
                                 free_port, wait_port)
from tests.support.visitor import http_get
from tests.support.rawtunnel import RawTunnel
from tests.support.straceaudit import CONNECT_CALLS, ClientTrace, socket_calls, strace_argv
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(180)


def wait_log(proc, rx, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = re.search(rx, proc.log())
        if m:
            return m
        time.sleep(0.05)
    raise TimeoutError(f"{rx!r} not in {proc.name}'s log:\n{proc.log()[-3000:]}")


# --- a TLS-intercepting exit ------------------------------------------------------------------

class Socks5Exit(socketserver.ThreadingTCPServer):
    """A SOCKS5 server standing in for a Tor exit. It resolves every name to 127.0.0.1 (as an
    exit would resolve it) and either relays bytes honestly, or terminates the client's TLS
    with its own certificate and relays the plaintext to the real proxy (a MITM)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, intercept_cert: trustme.LeafCert | None):
        super().__init__(("127.0.0.1", 0), _Socks5Handler)
        self.port = self.server_address[1]
        self.requests: list[tuple[int, str, int]] = []  # (address type, host, port)
        self.plaintext_from_client = 0
        self.ctx = None
        if intercept_cert is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            intercept_cert.configure_cert(self.ctx)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()


class _Socks5Handler(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        s.settimeout(10)
        f = s.makefile("rb")
        ver, n = f.read(2)
        methods = f.read(n)
        method = 2 if 2 in methods else 0
        s.sendall(bytes([5, method]))
        if method == 2:  # RFC 1929 username/password (the client isolates circuits by it)
            f.read(1)
            f.read(f.read(1)[0])
            f.read(f.read(1)[0])
            s.sendall(b"\x01\x00")
        _, cmd, _, atyp = f.read(4)
        if atyp == 3:
            host = f.read(f.read(1)[0]).decode()
        elif atyp == 1:
            host = socket.inet_ntoa(f.read(4))
        else:
            return
        port = struct.unpack(">H", f.read(2))[0]
        self.server.requests.append((atyp, host, port))
        up = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port))
        if self.server.ctx is None:
            _relay(s, up)
            return
        try:
            client_side = self.server.ctx.wrap_socket(s, server_side=True)
        except (ssl.SSLError, OSError):
            up.close()
            return  # the client saw our certificate and hung up: what we want
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        proxy_side = ctx.wrap_socket(up)
        try:
            while True:
                data = client_side.recv(65536)
                if not data:
                    break
                self.server.plaintext_from_client += len(data)
                proxy_side.sendall(data)
        except (ssl.SSLError, OSError):
            pass
        finally:
            proxy_side.close()
            client_side.close()


def _relay(a, b):
    a.settimeout(None)
    b.settimeout(None)
    socks = [a, b]
    try:
        while True:
            ready, _, _ = select.select(socks, [], [], 30)
            if not ready:
                return
            for r in ready:
                data = r.recv(65536)
                if not data:
                    return
                (b if r is a else a).sendall(data)
    except OSError:
        pass
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def mitm_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("mitm")
    origin = OriginProc(str(d))
    proxy = ProxyProc(str(d), str(d / "proxy-data"))
    try:
        yield dict(dir=d, origin=origin, proxy=proxy)
    finally:
        proxy.stop()
        origin.stop()


@pytest.mark.parametrize("verify", ["pin", "ca"])
def test_tls_intercepting_exit_is_refused_and_named(mitm_world, tmp_path, verify):
    w = mitm_world
    proxy = w["proxy"]
    exit_ca = trustme.CA()  # the interceptor's own CA, trusted by nobody here
    mitm = Socks5Exit(exit_ca.issue_cert("proxy.shroud.test"))
    if verify == "pin":
        how = ["--pin", proxy.fingerprint]
        said = r"matches no pinned fingerprint: refusing the tunnel .*intercepting TLS"
    else:
        ca_pem = tmp_path / "ca.pem"
        trustme.CA().cert_pem.write_to_path(str(ca_pem))  # the operator's CA
        how = ["--proxy-ca", str(ca_pem)]
        said = r"CERTIFICATE_VERIFY_FAILED.*intercepting TLS; the tunnel is refused"
    client = ClientProc(str(tmp_path), str(tmp_path / "client"),
                        ["http:mitm.test", f"127.0.0.1:{w['origin'].port}"],
                        [f"proxy.shroud.test:{proxy.ports['tunnel']}"],
                        extra=["--socks", f"127.0.0.1:{mitm.port}", *how])
    try:
        m = wait_log(client, said)
        print(f"intercepting exit ({verify}): {m.group(0)[:160]}")
        time.sleep(0.5)
        # The name went to the exit unresolved (SOCKS5 domain name), as through Tor.
        assert (3, "proxy.shroud.test", proxy.ports["tunnel"]) in mitm.requests
        # Not a byte of the tunnel protocol reached the interceptor, nor the proxy.
        assert mitm.plaintext_from_client == 0
        st = proxy.status()
        assert not st["tunnels"] and not st["bindings"]
        assert client.alive()  # it keeps refusing (and retrying), it does not give in
    finally:
        client.stop()
        mitm.shutdown()
        mitm.server_close()


def test_an_honest_socks_exit_is_accepted(mitm_world, tmp_path):
    w = mitm_world
    proxy = w["proxy"]
    honest = Socks5Exit(None)
    client = ClientProc(str(tmp_path), str(tmp_path / "client"),
                        ["http:honest.test", f"127.0.0.1:{w['origin'].port}"],
                        [f"proxy.shroud.test:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                        extra=["--socks", f"127.0.0.1:{honest.port}"])
    try:
        proxy.wait_bound("honest.test")
        c = http.client.HTTPConnection("127.0.0.1", proxy.ports["http"], timeout=10)
        c.request("GET", "/hello", headers={"Host": "honest.test"})
        assert c.getresponse().read() == b"hello from origin\n"
        c.close()
        assert honest.requests and honest.requests[0][:2] == (3, "proxy.shroud.test")
    finally:
        client.stop()
        honest.shutdown()
        honest.server_close()


# --- a proxy relaying a client's binds to another proxy ---------------------------------------

class RelayingProxy:
    """A malicious proxy the client trusts (it pins this relay's own certificate): it terminates
    the client's tunnel TLS and relays the plaintext, both ways and unchanged, over its own TLS
    connection to another proxy. The other proxy's nonce reaches the client and the client's
    signed binds reach the other proxy, so without a proxy id in the signed payload the relay
    would bind the client's name there, in the client's place."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        cert = trustme.CA().issue_cert("relay.shroud.test")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        self.fingerprint = hashlib.sha256(
            ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())).hexdigest()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.relayed = 0  # plaintext bytes client -> target
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn):
        try:
            conn.settimeout(10)
            client_side = self.ctx.wrap_socket(conn, server_side=True)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            target = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.target_port),
                                                              timeout=10))
        except (ssl.SSLError, OSError):
            conn.close()
            return
        client_side.settimeout(60)
        target.settimeout(60)

        def pump(src, dst, count):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if count:
                        self.relayed += len(data)
                    dst.sendall(data)
            except (ssl.SSLError, OSError):
                pass
            finally:
                for x in (src, dst):
                    try:
                        x.close()
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(target, client_side, False), daemon=True).start()
        pump(client_side, target, True)

    def close(self):
        self.listener.close()


def test_a_relaying_proxy_cannot_bind_the_clients_name_elsewhere(mitm_world, tmp_path):
    """The client signs each bind for the proxy whose certificate it verified; the proxy behind
    the relay sees its nonce signed for another proxy and refuses (reason wrong-proxy)."""
    w = mitm_world
    proxy = w["proxy"]
    before = proxy.status()["refusals"].get("wrong_proxy", 0)
    relay = RelayingProxy(proxy.ports["tunnel"])
    client = ClientProc(str(tmp_path), str(tmp_path / "client"),
                        ["http:relayed.test", f"127.0.0.1:{w['origin'].port}"],
                        [f"127.0.0.1:{relay.port}"], pins=[relay.fingerprint])
    try:
        m = wait_log(client, r"refused relayed\.test: bind was signed for another proxy")
        print(f"relayed bind: {m.group(0)}")
        assert relay.relayed > 0  # the Auth and the signed Bind did cross the relay
        st = proxy.status()
        assert st["refusals"].get("wrong_proxy", 0) > before
        assert not any(b["name"] == "relayed.test" for b in st["bindings"]), st["bindings"]
        c = http.client.HTTPConnection("127.0.0.1", proxy.ports["http"], timeout=10)
        c.request("GET", "/hello", headers={"Host": "relayed.test"})
        assert c.getresponse().status == 404
        c.close()
    finally:
        client.stop()
        relay.close()


# --- a hostile proxy cannot re-route the client's services on honest proxies ------------------

def test_a_lying_bind_answer_does_not_reroute_services_on_other_proxies(mitm_world, tmp_path):
    """Issue 11 item 8. A proxy the client uses answers the bind for a.test with the URL
    http://b.test. The client must not believe it: visitors of b.test through an honest proxy
    still reach b.test's target, never a.test's. The hostile proxy comes up after the honest
    one has bound both names, so its answer is the last one the client hears."""
    w = mitm_world
    proxy = w["proxy"]
    a_log = tmp_path / "a-origin.jsonl"
    a_log.write_text("")
    a_port, evil_port = free_port(), free_port()
    a_origin = Proc("a-origin", [PY, "tests/support/hostile_origin.py", "--port", str(a_port),
                                 "--log", str(a_log)], str(tmp_path))
    evil = client = None
    try:
        wait_port(a_port)
        # The hostile proxy's certificate (and pin) exists before it listens.
        evil_cert, _ = ensure_tunnel_cert(str(tmp_path / "evil-data"))
        client = ClientProc(str(tmp_path), str(tmp_path / "client"),
                            ["http:a.test", f"127.0.0.1:{a_port}",
                             "http:b.test", f"127.0.0.1:{w['origin'].port}"],
                            [f"127.0.0.1:{proxy.ports['tunnel']}", f"127.0.0.1:{evil_port}"],
                            pins=[proxy.fingerprint, cert_fingerprint(evil_cert)])
        proxy.wait_bound("a.test")
        proxy.wait_bound("b.test")
        evil = Proc("evil-proxy", [PY, "tests/support/evil_proxy.py", "--port", str(evil_port),
                                   "--data-dir", str(tmp_path / "evil-data"),
                                   "--answer", "a.test=http://b.test",
                                   "--answer", "b.test=http://elsewhere.test"], str(tmp_path))
        evil.wait_log("answered a.test with http://b.test")
        # The client has read that answer once it has asked the next name (b.test) too.
        evil.wait_log("answered b.test with http://elsewhere.test")
        for _ in range(3):
            assert http_get(proxy.ports["http"], "b.test") == (200, b"hello from origin\n")
        assert a_log.read_text() == "", "b.test's visitors reached a.test's target"
        assert http_get(proxy.ports["http"], "a.test") == (200, b"hijacked\n")  # a.test's own
        wait_log(client, r"answered the bind for a\.test with 'http://b\.test', which is not")
    finally:
        for p in (client, evil, a_origin):
            if p is not None:
                p.stop()


# --- bind nonces: one per session, so a signed Bind cannot be replayed ------------------------

class _ClaimsKey:
    """Claims a key in Auth without holding its private key (it can only replay signatures)."""

    def __init__(self, victim: Identity):
        self.public_key = victim.public_key


def test_each_session_gets_a_fresh_nonce_and_a_replayed_bind_is_refused(mitm_world):
    proxy = mitm_world["proxy"]
    victim = Identity.generate()
    tunnels = []
    try:
        first, second = RawTunnel(proxy, victim), RawTunnel(proxy, victim)
        tunnels += [first, second]
        nonces = [first.auth().nonce, second.auth().nonce]
        assert all(len(n) == msg.NONCE_SIZE for n in nonces)
        assert nonces[0] != nonces[1], "two sessions were given the same bind nonce"
        captured = first.signed_bind("replayed.test")
        assert not first.send(captured).error  # valid on the session it was signed for
        first.close()
        # Replayed on the victim's other live session, and on an attacker's new one.
        attacker = RawTunnel(proxy, _ClaimsKey(victim))
        tunnels.append(attacker)
        assert attacker.auth().nonce not in nonces
        before = proxy.status()["refusals"].get("ownership", 0)
        for session in (second, attacker):
            resp = session.send(captured)
            assert resp.error and resp.reason == msg.REASON_BAD_SIGNATURE, resp
        assert proxy.status()["refusals"].get("ownership", 0) == before + 2
        # Once the first session's end is processed, no tunnel holds the name.
        wait_for(lambda: not [t for t in proxy.status()["tunnels"]
                              if "replayed.test" in t["names"]],
                 "replayed.test bound by no tunnel after its signer left", timeout=10)
    finally:
        for t in tunnels:
            t.close()


# --- the dashboard over the wire --------------------------------------------------------------

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def dash_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("dash")
    origin = OriginProc(str(d))
    proxy = ProxyProc(str(d), str(d / "proxy-data"),
                      extra=["--admin-password-hash", generate_password_hash(PASSWORD)])
    client = ClientProc(str(d), str(d / "client"), ["http:dash.test", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    try:
        proxy.wait_bound("dash.test")
        yield dict(proxy=proxy, base=f"http://127.0.0.1:{proxy.ports['admin']}")
    finally:
        for p in (client, proxy, origin):
            p.stop()


class Browser:
    """urllib with a cookie jar, never following redirects (we look at them)."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    def __init__(self, base):
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), self._NoRedirect())

    def request(self, method, path, data=None, headers=None, form=None):
        body = None
        headers = dict(headers or {})
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            r = self.opener.open(req, timeout=10)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers
        return r.status, r.read(), r.headers

    def login(self):
        _, page, _ = self.request("GET", "/login")
        token = re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()
        status, _, _ = self.request("POST", "/login", form={
            "username": "admin", "password": PASSWORD, "csrf_token": token, "next": "/"})
        assert status == 302
        _, home, _ = self.request("GET", "/")
        return re.search(rb'<meta name="csrf-token" content="([^"]+)"', home).group(1).decode()


def dash_served(w) -> int:
    c = http.client.HTTPConnection("127.0.0.1", w["proxy"].ports["http"], timeout=10)
    c.request("GET", "/hello", headers={"Host": "dash.test"})
    status = c.getresponse().status
    c.close()
    return status


def test_dashboard_refuses_requests_without_credentials(dash_world):
    w = dash_world
    anon = Browser(w["base"])
    assert anon.request("GET", "/healthz")[0] == 200
    for path in ("/api/status", "/api/hostnames", "/api/tunnels", "/api/audit", "/metrics"):
        status, body, headers = anon.request("GET", path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert anon.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
    for path in ("/", "/tunnels", "/blocks", "/h/http/dash.test"):
        status, _, headers = anon.request("GET", path)
        assert status == 302 and headers["Location"].startswith("/login"), path
    tunnel_id = w["proxy"].status()["tunnels"][0]["id"]
    for path, data in (("/api/block", {"kind": "hostname", "target": "dash.test"}),
                       (f"/api/tunnels/{tunnel_id}/disconnect", {})):
        assert anon.request("POST", path, data=data)[0] == 401
    assert anon.request("POST", "/login", form={"username": "admin",
                                                "password": PASSWORD})[0] == 400  # no token
    assert dash_served(w) == 200  # nothing happened
    assert w["proxy"].status()["tunnels"][0]["id"] == tunnel_id


def test_dashboard_actions_need_the_sessions_csrf_token(dash_world):
    w = dash_world
    alice = Browser(w["base"])
    token = alice.login()
    mallory = Browser(w["base"])
    other_token = mallory.login()  # a valid token, of another session
    action = {"kind": "hostname", "target": "dash.test"}
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": other_token}):
        status, body, _ = alice.request("POST", "/api/block", data=action, headers=headers)
        assert status == 403 and b"CSRF" in body, (headers, body)
    assert dash_served(w) == 200
    blocks = w["proxy"].status(ADMIN_TOKEN)
    assert all(b["name"] != "dash.test" or b["tunnels"] for b in blocks["bindings"])
    # With its own token the same action works (so the refusals above were the CSRF check).
    status, body, _ = alice.request("POST", "/api/block", data=action,
                                    headers={"X-CSRF-Token": token})
    assert status == 200, body
    assert dash_served(w) == 403
    status, body, _ = alice.request("POST", "/api/unblock", data=action,
                                    headers={"X-CSRF-Token": token})
    assert status == 200, body


# --- plain HTTP secrets stay out of the proxy's logs --------------------------------------------
# Passthrough TLS cannot leak (the proxy has no key to decrypt it); plain-HTTP names are where the
# proxy holds plaintext: it reads the head for Host. Debug logging on, secrets in headers,
# cookies, the body, and in the heads it refuses (a bad header line, an unknown name).

def _raw_http(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_proxy_never_logs_plain_http_secrets_even_at_debug(tmp_path):
    d = tmp_path
    origin = OriginProc(str(d))
    proxy = ProxyProc(str(d), str(d / "proxy-data"), extra=["--log-level", "debug"])
    client = ClientProc(str(d), str(d / "client"), ["http:plain.test", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    secret = "SHROUD-SECRET-" + os.urandom(12).hex()
    basic = base64.b64encode(f"user:{secret}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}", "Cookie": f"session={secret}; theme=dark",
               "X-Api-Key": secret}
    try:
        proxy.wait_bound("plain.test")
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.ports["http"], timeout=10)
            body = secret.encode() * 100
            conn.request("POST", "/sha256", body=body, headers={"Host": "plain.test", **headers})
            r = conn.getresponse()
            assert r.read().decode().strip() == hashlib.sha256(body).hexdigest()
            conn.close()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        refused = {
            "unknown name": f"GET / HTTP/1.1\r\nHost: other.test\r\n{head}\r\n",
            "bad header line": f"GET / HTTP/1.1\r\nHost: plain.test\r\n{head}X: a\x01b\r\n\r\n",
            "no host": f"GET / HTTP/1.1\r\n{head}\r\n",
        }
        for what, request in refused.items():
            reply = _raw_http(proxy.ports["http"], request.encode())
            assert reply.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), (what, reply[:80])
        before_stop = proxy.log()
    finally:
        client.stop()
        proxy.stop()  # flushes and closes everything it writes
        origin.stop()
    # Debug logging was on and the requests were logged, by name only.
    assert re.search(r"DEBUG +shroud.proxy: http plain.test from 127.0.0.1:\d+: tunnel",
                     before_stop), before_stop[-2000:]
    needles = {"secret": secret.encode(), "basic credentials": basic.encode(),
               "secret hex": secret.encode().hex().encode()}
    files = [proxy.log_path]
    for root, _, names in os.walk(d / "proxy-data"):
        files += [os.path.join(root, n) for n in names]
    for path in files:
        data = open(path, "rb").read()
        for what, needle in needles.items():
            assert needle not in data, f"{what} found in {path}"
    print(f"plain HTTP secrets: {len(files)} files of the proxy searched "
          f"({sum(os.path.getsize(f) for f in files)} bytes), none found")


# --- Tor mode: the client's connections -------------------------------------------------------

class TinyDns(threading.Thread):
    """A UDP DNS server on 127.0.0.1:53 for the private network's exits (their resolv.conf
    names 127.0.0.1): *.shroud.test is 127.0.0.1. Records who asked what."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.2)
        self.queries: list[tuple[str, str]] = []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                q = DNSRecord.parse(data)
            except Exception:
                continue
            name = str(q.q.qname).rstrip(".").lower()
            self.queries.append((peer[0], name))
            reply = q.reply()
            if name.endswith(".shroud.test") and q.q.qtype == QTYPE.A:
                reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
            self.sock.sendto(reply.pack(), peer)

    def stop(self):
        self.stopped.set()
        self.sock.close()


def test_socket_call_parser_fails_on_what_it_cannot_read():
    lines = [
        '12 connect(5, {sa_family=AF_INET, sin_port=htons(9050), '
        'sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '12 sendto(5, "x", 1, MSG_NOSIGNAL, NULL, 0) = 1',
        '14 sendto(3, "TAKEOWNERSHIP\\r\\n", 15, 0, NULL, 0 <unfinished ...>',
        '13 connect(6, {sa_family=AF_UNIX, sun_path="/run/x"}, 110 <unfinished ...>',
        '13 <... connect resumed>) = -1 ENOENT',
        '12 openat(AT_FDCWD, "/etc/hosts", O_RDONLY) = 3',
    ]
    assert [c[:4] for c in socket_calls(lines)] == [("INET", "127.0.0.1", 9050, None),
                                                    ("UNIX", None, None, "/run/x")]
    with pytest.raises(AssertionError, match="not understood"):
        socket_calls(['12 connect(5, 0x7ffd1234, 16) = -1 EFAULT'])


def served_through(proxy, times: int) -> None:
    for _ in range(times):
        c = http.client.HTTPConnection("127.0.0.1", proxy.ports["http"], timeout=30)
        c.request("GET", "/hello", headers={"Host": "anon.test"})
        assert c.getresponse().read() == b"hello from origin\n"
        c.close()


def wait_log_since(proc, rx, since, timeout=60.0):
    return wait_for(lambda: re.search(rx, proc.log()[since:]), f"{rx!r} in {proc.name}'s log",
                    timeout=timeout)


@pytest.mark.tor
def test_tor_mode_client_connects_only_to_its_tor_and_the_local_target(tor_network, tmp_path):
    if not os.path.exists("/usr/bin/strace"):
        pytest.fail("strace not installed: run ./scripts/setup.sh as root")
    d = tmp_path
    dns = TinyDns()
    dns.start()
    origin = OriginProc(str(d))
    proxy = ProxyProc(str(d), str(d / "proxy-data"))
    trace = str(d / "client.strace")
    client_dir = d / "client"
    argv = strace_argv(trace, [
        PY, "shroud.py", "--tor", "launch", "--tor-config", tor_network.client_torrc_path,
        "--data-dir", str(client_dir), "--status", "plain",
        "--proxy", f"proxy0.shroud.test:{proxy.ports['tunnel']}", "--pin", proxy.fingerprint,
        "http:anon.test", f"127.0.0.1:{origin.port}"], calls=CONNECT_CALLS + ",openat,open")
    client = Proc("client-traced", argv, str(d))
    proxy2 = None
    try:
        proxy.wait_bound("anon.test", timeout=120)
        served_through(proxy, 3)
        socks_port = int(wait_log(client, r"tor ready: SOCKS 127\.0\.0\.1:(\d+)").group(1))
        with open(client_dir / "tor" / "control-port") as f:
            control_port = int(f.read().strip().rsplit(":", 1)[1])
        # A redial: the proxy goes away and comes back on the same ports; the client's second
        # connection is audited too.
        ports = dict(proxy.ports)
        mark = len(client.log())
        proxy.stop()
        wait_log_since(client, r"retrying in", mark)
        proxy2 = ProxyProc(str(d), str(d / "proxy-data"), name="proxy-restarted", ports=ports)
        proxy2.wait_bound("anon.test", timeout=120)
        served_through(proxy2, 1)
    finally:
        client.stop()
        for p in (proxy2, proxy):
            if p is not None:
                p.stop()
        origin.stop()
        dns.stop()
    client_trace = ClientTrace.read(trace)
    seen = client_trace.audit(
        {socks_port: "tor SOCKS", control_port: "tor control", origin.port: "local target"})
    # The first tunnel and the redial each went through tor's SOCKS port.
    socks_connects = client_trace.connects_to(socks_port)
    assert len(socks_connects) >= 2, socks_connects
    name_lookups = client_trace.name_lookups()
    assert not name_lookups, f"the client looked up a name itself: {name_lookups[:3]}"
    mine, tor_pids = client_trace.mine, client_trace.tor_pids
    assert not any(":53" in ln or "htons(53)" in ln for ln in mine)
    # The exit resolved the proxy's name; the client never asked.
    assert any(name == "proxy0.shroud.test" for _, name in dns.queries), dns.queries
    print(f"tor mode (first connection and a redial): {len(mine)} traced calls of the client, "
          f"connect() calls {seen}; "
          f"tor pids excluded {sorted(tor_pids)}; exits' DNS queries {len(dns.queries)}")
