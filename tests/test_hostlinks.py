"""Links between the hosts of a fleet (lib/proxy/hostlinks.py): proxies sharing the session's
PostgreSQL (tests/fixtures/postgres.py), each host wholly on its own loopback address (tunnel,
https, http, admin and fleet listeners on 127.0.0.2, .3, .4: the suite runs in a network
namespace with lo up). Real processes throughout: proxies, clients (`shroud.py --tor none`),
origins."""
import base64
import hashlib
import json
import signal
import socket
import ssl
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lib.certs import ensure_tunnel_cert
from lib.proxy.hostlinks import LABEL, NONCE_BYTES, OK
from tests.support.procs import ClientProc, OriginProc, ProxyProc, free_port
from tests.support.visitor import http_get, https_get, tls_site
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(240)

BEAT = "0.5"  # fast fleet heartbeats: rows of a killed proxy expire in ~1.5 s
BIG = 100 * 1024 * 1024


@pytest.fixture
def fleet(tmp_path, pg_url):
    site = tls_site(tmp_path, "app.test")
    procs = [OriginProc(str(tmp_path), tls=(site.cert_pem, site.key_pem), name="tls-origin")]

    def start(name, host, extra=()):
        """A proxy on the shared database, every listener on ``host`` (a loopback address)."""
        link = f"{host}:{free_port(host)}"
        p = ProxyProc(str(tmp_path), str(tmp_path / f"{name}-data"), name=name, host=host,
                      extra=["--fleet-heartbeat", BEAT, "--fleet-addr", link, *extra],
                      env={"SHROUD_DATABASE_URL": pg_url})
        p.link = link
        procs.append(p)
        return p

    def origin(hello):
        o = OriginProc(str(tmp_path), name=f"origin-{hello}", hello=hello)
        procs.append(o)
        return o

    def client(proxy, pairs, name):
        # One key for every client: the names are its, whichever proxy it binds them on.
        c = ClientProc(str(tmp_path), str(tmp_path / "client-key"), pairs,
                       [f"{proxy.host}:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                       name=name)
        procs.append(c)
        return c

    yield type("Fleet", (), {"start": staticmethod(start), "origin": staticmethod(origin),
                             "client": staticmethod(client), "site": site, "dir": tmp_path,
                             "tls_origin": procs[0]})
    for p in reversed(procs):
        p.stop()


def get(proxy, name, path="/hello", timeout=10):
    """A visitor's GET at ``proxy``'s http listener, on the proxy's own address."""
    return http_get(proxy.ports["http"], name, path, timeout=timeout, addr=proxy.host)


def _served(proxy, name, want=200):
    try:
        return get(proxy, name)[0] == want
    except OSError:
        return False


def _on_own_address(proxy) -> None:
    """Every listener of ``proxy`` is on its own address, none on 127.0.0.1."""
    listeners = proxy.status()["listeners"]
    assert set(listeners) >= {"tunnel", "https", "http", "admin", "fleet"}, listeners
    assert all(a.rsplit(":", 1)[0] == proxy.host for a in listeners.values()), listeners
    for kind in ("tunnel", "https", "http", "admin"):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.ports[kind]), timeout=5).close()


def test_visitor_at_b_reaches_a_tunnel_held_only_on_a(fleet):
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    web = fleet.origin("from-a")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{web.port}",
                     "app.test", f"127.0.0.1:{fleet.tls_origin.port}"], "client-a")
    a.wait_bound("web.test")
    a.wait_bound("app.test")
    assert all(x["name"] not in ("web.test", "app.test") for x in b.status()["bindings"])
    _on_own_address(a)
    _on_own_address(b)

    # By Host: B carries the visitor to A's tunnel once it has read A's rows.
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    assert get(b, "web.test") == (200, b"from-a\n")
    # By SNI: the visitor's TLS reaches the origin undecrypted; it sees the origin's own cert.
    status, body, der = https_get(fleet.site.ca_pem, b.ports["https"], "app.test",
                                  addr=b.host)
    with open(fleet.site.cert_pem) as f:
        origin_der = ssl.PEM_cert_to_DER_cert(f.read())
    assert (status, der) == (200, origin_der)

    # A large download arrives intact through B, the link and A's tunnel.
    import http.client
    c = http.client.HTTPConnection(b.host, b.ports["http"], timeout=120)
    c.request("GET", f"/bytes/{BIG}", headers={"Host": "web.test"})
    r = c.getresponse()
    digest, n = hashlib.sha256(), 0
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        digest.update(chunk)
        n += len(chunk)
    c.close()
    from tests.support.origin import pattern
    assert n == BIG and digest.hexdigest() == hashlib.sha256(pattern(BIG)).hexdigest()

    # A name held nowhere is still a clear 404 at B.
    assert get(b, "nobody.test")[0] == 404
    # Each forwarded exchange ended cleanly at both ends: the splice half-closes the link
    # (lib.proxy.hostlinks.LinkEnd), which SSLSocket.shutdown would unwrap under its reader.
    for proxy in (a, b):
        assert "Traceback" not in proxy.log(), proxy.log()[-3000:]


def test_holder_killed_the_other_holder_takes_over(fleet):
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    c = fleet.start("proxy-c", "127.0.0.4")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    fleet.client(c, ["http:web.test", f"127.0.0.1:{fleet.origin('from-c').port}"], "client-c")
    c.wait_bound("web.test")
    seen = set()

    def both_seen():
        status, body = get(b, "web.test")
        seen.add(body if status == 200 else status)
        return {b"from-a\n", b"from-c\n"} <= seen
    wait_for(both_seen, "B forwards to both holders", timeout=30)

    a.signal(signal.SIGKILL)  # no clean shutdown: A's rows stay until they expire
    for _ in range(20):       # served at once by C, whether B tries A first or not
        assert get(b, "web.test") == (200, b"from-c\n")


def _link(addr, cert_der, key, peer_fingerprint, name="web.test", send_cert=True):
    """Speak the link protocol to ``addr`` as a sender would; the holder's answer byte (b""
    when it closed the link)."""
    host, port = addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            nonce = b""
            while len(nonce) < NONCE_BYTES:
                nonce += tls.recv(NONCE_BYTES - len(nonce))
            peeked = f"GET /hello HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
            head = {"v": 1, "kind": "http", "name": name, "client": ["10.9.8.7", 4242],
                    "forwarded": True, "peeked": len(peeked)}
            if send_cert:
                head["cert"] = base64.b64encode(cert_der).decode()
            body = json.dumps(head).encode()
            sig = key.sign(LABEL + nonce + peer_fingerprint.encode() + body,
                           ec.ECDSA(hashes.SHA256()))
            try:
                tls.sendall(struct.pack(">I", len(body)) + body + struct.pack(">H", len(sig))
                            + sig + peeked)
                return tls.recv(1)
            except (ssl.SSLError, OSError):
                return b""


def _identity(data_dir):
    cert_path, key_path = ensure_tunnel_cert(str(data_dir))
    with open(cert_path) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    with open(key_path, "rb") as f:
        return der, serialization.load_pem_private_key(f.read(), password=None)


def test_forged_links_are_refused_and_counted(fleet):
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    b_der, b_key = _identity(fleet.dir / "proxy-b-data")
    stranger_der, stranger_key = _identity(fleet.dir / "stranger")

    def refused():
        return a.status()["refusals"].get("fleet_link_refused", 0)
    # The control: B's registered certificate and key are served.
    assert _link(a.link, b_der, b_key, a.fingerprint) == OK
    assert refused() == 0
    # No certificate; a certificate of no instance; B's certificate without B's key.
    assert _link(a.link, b_der, b_key, a.fingerprint, send_cert=False) == b""
    assert _link(a.link, stranger_der, stranger_key, a.fingerprint) == b""
    assert _link(a.link, b_der, stranger_key, a.fingerprint) == b""
    # Not TLS at all.
    host, port = a.link.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
        try:
            while raw.recv(100):  # an alert at most, then the close
                pass
        except ConnectionResetError:
            pass
    wait_for(lambda: refused() == 4, "4 refused links counted at A", timeout=10)

    # B gone (killed, its row expired): its certificate is stale and refused.
    b.signal(signal.SIGKILL)
    wait_for(lambda: _link(a.link, b_der, b_key, a.fingerprint) == b"",
             "B's certificate refused once B's row expired", timeout=20)
