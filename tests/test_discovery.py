"""Discovery without Tor: answer parsing (both forms), bounds, errors, SRV order, the server role.

The HTTPS exchanges are real: a DiscoveryServer (gevent, TLS) on 127.0.0.1 and the client's
fetch_proxies with gevent sockets, in this process without monkey-patching. SRV lookups go to
the loopback DNS fixture over TCP.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import time

import gevent
import gevent.socket as gsocket
import pytest
import trustme
from werkzeug.test import Client as WsgiClient

from lib.client import discovery as disc
from lib.net import dnsclient
from lib.certs import cert_fingerprint, server_tls_context
from lib.client.tunnels import ProxyAddr, Service, direct_dial
from lib.client.discovery import DiscoveryError, fetch_proxies, parse_proxy_list, srv_proxies
from lib.proxy.discovery import (Discovery, DiscoveryServer, FleetEntry, create_discovery_app,
                                  parse_fleet, start_discovery)

FP1 = "ab" * 32
FP2 = "cd" * 32


# --- parsing ------------------------------------------------------------------------------------

def test_text_form_original_lines():
    body = b"p1.example.net:4443\r\np2.example.net.:443\n\n# comment\n[::1]:4443\n"
    assert parse_proxy_list(body, "text/plain") == [
        ProxyAddr("p1.example.net", 4443), ProxyAddr("p2.example.net", 443),
        ProxyAddr("::1", 4443)]


def test_text_form_duplicates_dropped_order_kept():
    assert parse_proxy_list(b"b:1\na:2\nb:1\n") == [ProxyAddr("b", 1), ProxyAddr("a", 2)]


def test_json_form_fingerprints_become_pins():
    body = json.dumps({"proxies": [
        {"addr": "p1:4443", "fingerprint": FP1.upper()},
        {"addr": "p2:4443", "fingerprint": ":".join(FP2[i:i + 2] for i in range(0, 64, 2))},
        {"addr": "p3:4443"},
        {"addr": "wss://one.example/_shroud/tunnel", "fingerprint": FP1}]}).encode()
    got = parse_proxy_list(body, "application/json; charset=utf-8")
    assert got[0] == ProxyAddr("p1", 4443, pin=FP1)
    assert got[1] == ProxyAddr("p2", 4443, pin=FP2)
    assert got[2] == ProxyAddr("p3", 4443) and got[2].pin is None
    assert got[3].scheme == "wss" and got[3].pin == FP1 and got[3].path == "/_shroud/tunnel"


@pytest.mark.parametrize("body,ctype,message", [
    (b"p1.example.net\n", "text/plain", "line 1 is not HOST:PORT"),
    (b"ok:1\np1:99999\n", "text/plain", "line 2 is not HOST:PORT"),
    (b"a b:1\n", "text/plain", "not HOST:PORT"),
    (b"\xff\xfe:1", "text/plain", "not UTF-8"),
    (b"\n\n", "text/plain", "no proxies"),
    (b"{", "application/json", "not valid JSON"),
    (b'{"proxies": "p1:1"}', "application/json", 'no "proxies" list'),
    (b'{"proxies": [{"host": "p1"}]}', "application/json", "entry 0"),
    (b'{"proxies": [{"addr": "p1:1", "fingerprint": "zz"}]}', "application/json",
     "not a SHA-256"),
    (b'{"proxies": []}', "application/json", "no proxies"),
])
def test_malformed_answers_refused_with_reason(body, ctype, message):
    with pytest.raises(DiscoveryError, match=message):
        parse_proxy_list(body, ctype)


def test_bounds_on_entries_and_size():
    many = "".join(f"p{i}:1\n" for i in range(disc.MAX_PROXIES + 1)).encode()
    with pytest.raises(DiscoveryError, match="more than 256"):
        parse_proxy_list(many)
    doc = json.dumps({"proxies": [{"addr": f"p{i}:1"} for i in range(disc.MAX_PROXIES + 1)]})
    with pytest.raises(DiscoveryError, match="257 proxies"):
        parse_proxy_list(doc.encode(), "application/json")
    with pytest.raises(DiscoveryError, match="larger than"):
        parse_proxy_list(b"p:1\n" * (disc.MAX_BODY_BYTES // 4 + 1))


def test_target_and_request():
    assert disc.discovery_target("https://d.example/proxies", "example.com") == (
        "d.example", 443, "/proxies?q=example.com")
    assert disc.discovery_target("https://127.0.0.1:8443/p?v=1", "a.b") == (
        "127.0.0.1", 8443, "/p?v=1&q=a.b")
    for bad in ("http://d.example/proxies", "https:///x", "https://u:p@d/x", "ftp://x"):
        with pytest.raises(DiscoveryError):
            disc.discovery_target(bad, "a.b")
    req = disc.build_request("127.0.0.1", 8443, "/proxies?q=a.b")
    headers = dict(req.headers)
    assert headers[b"host"] == b"127.0.0.1:8443"
    assert b"application/json" in headers[b"accept"]
    assert b"user-agent" not in headers  # nothing identifying the client's version


def test_discovery_domain_is_first_named_service():
    svcs = [Service.parse("tcp:20001", "127.0.0.1:22"), Service.parse("http:*.b.example", "127.0.0.1:80"),
            Service.parse("a.example", "127.0.0.1:443")]
    assert disc.discovery_domain(svcs) == "b.example"
    assert disc.discovery_domain(svcs[2:]) == "a.example"
    with pytest.raises(DiscoveryError, match="tcp:PORT"):
        disc.discovery_domain(svcs[:1])


def test_parse_fleet():
    assert parse_fleet(f"a:1={FP1}, b:2  wss://c/x") == [
        FleetEntry("a:1", FP1), FleetEntry("b:2", None), FleetEntry("wss://c/x", None)]
    assert parse_fleet("") == []
    with pytest.raises(ValueError, match="host:port"):
        parse_fleet("nohost")
    with pytest.raises(ValueError, match="SHA-256"):
        parse_fleet("a:1=beef")


# --- the server's decision ----------------------------------------------------------------------

def _srv(*records):
    return [dnsclient.SrvRecord(*r) for r in records]


def test_cname_check_and_fleet():
    cnames = {"good.example": "good.example.proxy.test", "bad.example": "elsewhere.test"}
    d = Discovery(fleet=[FleetEntry("p1:4443", FP1)], proxy_domain="proxy.test.",
                  lookup_cname=cnames.get, lookup_srv=lambda n: [])
    assert d.answer("good.example") == (200, [FleetEntry("p1:4443", FP1)], "")
    a = d.answer("bad.example")
    assert a.status == 403 and "CNAME for elsewhere.test, not bad.example.proxy.test" in a.reason
    a = d.answer("none.example")
    assert a.status == 403 and "no CNAME record" in a.reason


def test_dns_error_is_500():
    def broken(name):
        raise dnsclient.DnsServerError("resolver answered SERVFAIL", name=name)
    d = Discovery(proxy_domain="proxy.test", lookup_cname=broken, lookup_srv=broken)
    a = d.answer("x.example")
    assert a.status == 500 and "SERVFAIL" in a.reason


def test_srv_specific_then_general_like_the_original():
    asked = []
    table = {"_shroud._tls.proxy.test": _srv((10, 1, 4443, "p1.proxy.test"),
                                             (20, 1, 4443, "p2.proxy.test"))}

    def srv(name):
        asked.append(name)
        return table.get(name, [])
    d = Discovery(proxy_domain="proxy.test", lookup_cname=lambda n: f"{n}.proxy.test",
                  lookup_srv=srv)
    a = d.answer("x.example")
    assert asked == ["_shroud._tls.x.example.proxy.test", "_shroud._tls.proxy.test"]
    assert [e.addr for e in a.entries] == ["p1.proxy.test:4443", "p2.proxy.test:4443"]
    table.clear()
    a = d.answer("x.example")
    assert a.status == 500 and "no proxies" in a.reason


def test_role_needs_fleet_or_domain():
    with pytest.raises(ValueError, match="--fleet"):
        Discovery()


def test_wsgi_app_forms_and_errors():
    d = Discovery(fleet=[FleetEntry("p1:4443", FP1), FleetEntry("p2:4443")])
    c = WsgiClient(create_discovery_app(d))
    r = c.get("/proxies?q=Example.COM")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    assert r.data == b"p1:4443\np2:4443\n"
    r = c.get("/proxies?q=example.com", headers={"Accept": "application/json"})
    assert r.mimetype == "application/json"
    assert r.get_json() == {"proxies": [{"addr": "p1:4443", "fingerprint": FP1},
                                        {"addr": "p2:4443"}]}
    assert c.get("/proxies?q=example.com&format=json").mimetype == "application/json"
    assert c.get("/proxies?q=example.com",
                 headers={"Accept": "application/json;q=0, text/plain"}).mimetype == "text/plain"
    assert c.get("/proxies").status_code == 400
    assert c.get("/proxies?q=bad..name").status_code == 400
    assert c.get("/other?q=a.b").status_code == 404
    assert c.post("/proxies?q=a.b").status_code == 405


def test_answers_logged_within_a_bound_per_address(caplog):
    """Anyone may ask discovery: its line per answer stays within PeerLog's 10 a minute for
    one address, logged as shroud.discovery."""
    d = Discovery(fleet=[FleetEntry("p1:4443", FP1)])
    c = WsgiClient(create_discovery_app(d))
    with caplog.at_level(logging.INFO, logger="shroud.discovery"):
        for _ in range(30):
            assert c.get("/proxies?q=example.com").status_code == 200
    lines = [r for r in caplog.records if r.getMessage().startswith("discovery example.com")]
    assert 1 <= len(lines) <= 10, len(lines)
    assert {r.name for r in lines} == {"shroud.discovery"}


# --- HTTPS end to end in this process ------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    d = tmp_path_factory.mktemp("disc-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {k: str(d / k) for k in ("ca.pem", "cert.pem", "key.pem", "other-ca.pem")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    cert.cert_chain_pems[0].write_to_path(paths["cert.pem"])
    cert.private_key_pem.write_to_path(paths["key.pem"])
    trustme.CA().cert_pem.write_to_path(paths["other-ca.pem"])
    paths["fp"] = cert_fingerprint(paths["cert.pem"])
    return paths


def _serve(app, tls_material):
    server = DiscoveryServer(("127.0.0.1", 0), app,
                             server_tls_context(tls_material["cert.pem"], tls_material["key.pem"]))
    server.start()
    return server


@pytest.fixture
def fleet_server(tls_material):
    d = Discovery(fleet=[FleetEntry("127.0.0.1:4001", FP1), FleetEntry("127.0.0.1:4002", FP2)])
    server = _serve(create_discovery_app(d), tls_material)
    yield f"https://127.0.0.1:{server.address[1]}/proxies"
    server.stop(timeout=1)


def test_fetch_with_ca_gets_pins(fleet_server, tls_material):
    got = fetch_proxies(fleet_server, "example.com", direct_dial, cafile=tls_material["ca.pem"],
                        timeout=10)
    assert got == [ProxyAddr("127.0.0.1", 4001, pin=FP1), ProxyAddr("127.0.0.1", 4002, pin=FP2)]


def test_fetch_with_pin(fleet_server, tls_material):
    got = fetch_proxies(fleet_server, "example.com", direct_dial, pin=tls_material["fp"],
                        timeout=10)
    assert [p.pin for p in got] == [FP1, FP2]


def test_fetch_refuses_wrong_ca_and_wrong_pin(fleet_server, tls_material):
    with pytest.raises(DiscoveryError, match="certificate refused"):
        fetch_proxies(fleet_server, "example.com", direct_dial,
                      cafile=tls_material["other-ca.pem"], timeout=10)
    with pytest.raises(DiscoveryError, match="not the pinned"):
        fetch_proxies(fleet_server, "example.com", direct_dial, pin=FP1, timeout=10)
    # the system CAs do not know trustme's CA
    with pytest.raises(DiscoveryError, match="certificate refused"):
        fetch_proxies(fleet_server, "example.com", direct_dial, timeout=10)


def test_fetch_uses_the_dial_function_with_discovery_isolation(fleet_server, tls_material):
    calls = []

    def dial(host, port, isolation_key, timeout):
        calls.append((host, port, isolation_key))
        return direct_dial(host, port, isolation_key, timeout)
    fetch_proxies(fleet_server, "example.com", dial, cafile=tls_material["ca.pem"], timeout=10)
    assert calls == [("127.0.0.1", int(fleet_server.split(":")[2].split("/")[0]), "discovery")]


def test_fetch_reports_the_servers_refusal(tls_material):
    d = Discovery(fleet=[FleetEntry("p:1")], proxy_domain="proxy.test",
                  lookup_cname=lambda n: "elsewhere.test", lookup_srv=lambda n: [])
    server = _serve(create_discovery_app(d), tls_material)
    try:
        url = f"https://127.0.0.1:{server.address[1]}/proxies"
        with pytest.raises(DiscoveryError, match=r"answered 403 for bad\.example: bad\.example "
                                                 r"is a CNAME for elsewhere\.test"):
            fetch_proxies(url, "bad.example", direct_dial, cafile=tls_material["ca.pem"],
                          timeout=10)
    finally:
        server.stop(timeout=1)


def test_fetch_bounds_body_size(tls_material):
    def huge(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"p:1\n" * 1024] * (disc.MAX_BODY_BYTES // 4096 + 2)  # streamed, no length
    server = _serve(huge, tls_material)
    try:
        url = f"https://127.0.0.1:{server.address[1]}/proxies"
        with pytest.raises(DiscoveryError, match="larger than 65536"):
            fetch_proxies(url, "a.example", direct_dial, cafile=tls_material["ca.pem"],
                          timeout=10)
    finally:
        server.stop(timeout=1)


def test_fetch_bounds_time(tls_material):
    def stall(environ, start_response):
        gevent.sleep(30)
        start_response("200 OK", [])
        return [b""]
    server = _serve(stall, tls_material)
    try:
        url = f"https://127.0.0.1:{server.address[1]}/proxies"
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError, match="in time"):
            fetch_proxies(url, "a.example", direct_dial, cafile=tls_material["ca.pem"],
                          timeout=1.0)
        assert time.monotonic() - t0 < 3
    finally:
        server.stop(timeout=0.1)


def test_fetch_unreachable_is_clear():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(DiscoveryError, match=f"cannot reach discovery service 127.0.0.1:{port}"):
        fetch_proxies(f"https://127.0.0.1:{port}/proxies", "a.example", direct_dial, timeout=5)


def test_server_drops_silent_connection_after_timeout(tls_material, monkeypatch):
    import lib.proxy.discovery as ds
    monkeypatch.setattr(ds, "IO_TIMEOUT", 0.3)
    d = Discovery(fleet=[FleetEntry("p:1")])
    server = _serve(create_discovery_app(d), tls_material)
    try:
        s = gsocket.create_connection(("127.0.0.1", server.address[1]), timeout=5)
        t0 = time.monotonic()
        assert s.recv(1) == b""  # never sent a ClientHello: closed by the server
        assert time.monotonic() - t0 < 3
        s.close()
    finally:
        server.stop(timeout=0.1)


def test_start_discovery_from_proxy_options(tls_material):
    class FakeProxy:
        cert_path, key_path = tls_material["cert.pem"], tls_material["key.pem"]
        listeners = {}

        def add_listener(self, name, server):
            self.listeners[name] = server.address
    args = argparse.Namespace(discovery_addr="127.0.0.1:0", discovery_cert=None,
                              discovery_key=None, fleet=f"127.0.0.1:4001={FP1}",
                              proxy_domain="", dns_resolver=None)
    proxy = FakeProxy()
    server = start_discovery(args, proxy)
    try:
        assert "discovery" in proxy.listeners
        got = fetch_proxies(f"https://127.0.0.1:{server.address[1]}/proxies", "a.example",
                            direct_dial, pin=tls_material["fp"], timeout=10)
        assert got == [ProxyAddr("127.0.0.1", 4001, pin=FP1)]
    finally:
        server.stop(timeout=1)
    args.discovery_addr = ""
    assert start_discovery(args, proxy) is None


# --- SRV ----------------------------------------------------------------------------------------

def test_srv_order_and_tcp(dns_server):
    name = "_shroud._tls.example.com"
    dns_server.add(name, "SRV", (20, 0, 4443, "backup.example.net."))
    dns_server.add(name, "SRV", (10, 60, 4443, "a.example.net."))
    dns_server.add(name, "SRV", (10, 40, 4444, "b.example.net."))
    connects = []

    def connect(host, port, timeout):
        connects.append((host, port))
        return socket.create_connection((host, port), timeout=timeout)
    firsts = set()
    for seed in range(20):
        got = srv_proxies("example.com", dns_server.address, connect=connect,
                          rng=random.Random(seed))
        assert len(got) == 3 and got[2] == ProxyAddr("backup.example.net", 4443)
        firsts.add(got[0].host)
    assert firsts == {"a.example.net", "b.example.net"}  # weighted, both get picked first
    assert connects and all(c == tuple(dns_server.address) for c in connects)
    assert {t for t, n, _ in dns_server.queries if n == name} == {"tcp"}


def test_srv_none_is_clear(dns_server):
    with pytest.raises(DiscoveryError, match=r"no SRV records at _shroud\._tls\.nothing\.example"):
        srv_proxies("nothing.example", dns_server.address)
    dns_server.add("_shroud._tls.dot.example", "SRV", (0, 0, 0, "."))
    with pytest.raises(DiscoveryError, match="no SRV records"):
        srv_proxies("dot.example", dns_server.address)
    dns_server.fail("_shroud._tls.broken.example", "SERVFAIL")
    with pytest.raises(DiscoveryError, match="SRV lookup .* failed"):
        srv_proxies("broken.example", dns_server.address)


# --- discover_proxies: what shroud.py calls -----------------------------------------------------

def _args(**kw):
    base = dict(discovery=None, discovery_ca=None, discovery_pin=None, srv=False,
                dns_resolver="127.0.0.1:53", count=3)
    base.update(kw)
    return argparse.Namespace(**base)


def test_discover_takes_count_and_needs_a_method(dns_server):
    name = "_shroud._tls.example.com"
    for i in range(5):
        dns_server.add(name, "SRV", (i, 0, 4000 + i, f"p{i}.example.net"))
    svcs = [Service.parse("example.com", "127.0.0.1:443")]
    resolver = "%s:%d" % tuple(dns_server.address)
    got = disc.discover_proxies(_args(srv=True, dns_resolver=resolver), svcs, None)
    assert [p.port for p in got] == [4000, 4001, 4002]
    got = disc.discover_proxies(_args(srv=True, dns_resolver=resolver, count=1), svcs, None)
    assert [p.port for p in got] == [4000]
    with pytest.raises(DiscoveryError, match="--proxy HOST:PORT"):
        disc.discover_proxies(_args(), svcs, None)


def test_discover_falls_back_to_srv_when_discovery_fails(dns_server):
    dns_server.add("_shroud._tls.example.com", "SRV", (0, 0, 4443, "p.example.net"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    got = disc.discover_proxies(
        _args(discovery=f"https://127.0.0.1:{port}/proxies", srv=True,
              dns_resolver="%s:%d" % tuple(dns_server.address)),
        [Service.parse("example.com", "127.0.0.1:443")], None)
    assert got == [ProxyAddr("p.example.net", 4443)]


def test_discover_through_tor_uses_tor_dial(dns_server):
    dns_server.add("_shroud._tls.example.com", "SRV", (0, 0, 4443, "p.example.net"))
    calls = []

    class FakeTor:
        def open_connection(self, host, port, isolation_key, timeout):
            calls.append((host, port, isolation_key))
            return socket.create_connection((host, port), timeout=timeout)
    disc.discover_proxies(_args(srv=True, dns_resolver="%s:%d" % tuple(dns_server.address)),
                          [Service.parse("example.com", "127.0.0.1:443")], FakeTor())
    assert calls == [(*dns_server.address, "discovery")]


def test_discovery_role_under_gunicorn(tmp_path):
    """start_in_worker starts the role too; its certificate is the proxy's own (pinnable)."""
    from tests.support.procs import ProxyProc, free_port, wait_port

    port = free_port()
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "data"), gunicorn=True, extra=[
        "--discovery-addr", f"127.0.0.1:{port}", "--fleet", f"127.0.0.1:4001={FP1}"])
    try:
        wait_port(port)
        got = fetch_proxies(f"https://127.0.0.1:{port}/proxies", "a.example", direct_dial,
                            pin=proxy.fingerprint, timeout=10)
        assert got == [ProxyAddr("127.0.0.1", 4001, pin=FP1)]
        assert proxy.status()["listeners"]["discovery"] == f"127.0.0.1:{port}"
    finally:
        proxy.stop()


def test_deeply_nested_json_is_a_discovery_error():
    from lib.client.discovery import DiscoveryError, parse_proxy_list
    with pytest.raises(DiscoveryError):
        parse_proxy_list(b"[" * 60000, "application/json")
