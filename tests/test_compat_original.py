"""Compatibility with the original shroud (2014), both ways, with real processes.

The original's Go side is played by tests/go/gotunnel (go-tunnel's messages declared as go-tunnel
declares them, framed and decoded with encoding/json as go-tunnel does, over muxado v1 over TLS;
fixture in tests/fixtures/gotunnel.py):

(a) the original-style Go client binds a TLS name on OUR proxy (``shroud_proxy.py
    --allow-unsigned NAME``) and a public TLS connection routed by SNI reaches its local HTTPS
    origin, end to end; without --allow-unsigned the Go client gets a BindResp Error and prints it;
(b) OUR client (``shroud.py --tor none --proxy ... --pin ...``) binds on the original-style Go
    proxy, which sends no nonce, so our client binds unsigned, and a public TLS connection to the
    Go proxy's public port reaches our origin;
(c) byte level: every control message each Go program received (AuthResp, BindResp, StartProxy
    from our proxy; Auth and Bind from our client) is re-encoded by Go's encoding/json and must
    be byte-identical to what arrived, and StartProxy is checked byte for byte.
"""
from __future__ import annotations

import hashlib
import http.client
import re
import socket
import ssl
import time

import pytest
import trustme

from lib.certs import cert_fingerprint
from tests.support.origin import pattern
from tests.support.procs import ClientProc, OriginProc, ProxyProc

pytestmark = pytest.mark.timeout(180)

NAME = "old.test"  # the name the Go original-style client binds
OURS = "app.test"  # the name our client binds on the Go original-style proxy
HEX32 = re.compile(r"[0-9a-f]{32}\Z")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the origin's certificate (both names) and the Go proxy's tunnel certificate."""
    d = tmp_path_factory.mktemp("compat-pki")
    ca = trustme.CA()
    files = {"dir": d, "ca": str(d / "ca.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    for label, names in (("origin", (NAME, OURS)), ("goproxy", ("proxy.test",))):
        cert = ca.issue_cert(*names)
        files[label] = (str(d / f"{label}.pem"), str(d / f"{label}.key"))
        cert.cert_chain_pems[0].write_to_path(files[label][0])
        cert.private_key_pem.write_to_path(files[label][1])
    return files


@pytest.fixture(scope="module")
def origin(pki):
    o = OriginProc(str(pki["dir"]), tls=pki["origin"], name="compat-origin")
    yield o
    o.stop()


def https_request(pki, port, name, method="GET", path="/hello", body=None):
    """One HTTPS request to 127.0.0.1:port with SNI ``name``, verified against the test CA.

    Returns (status, body, server certificate DER, our local "ip:port")."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    local = "%s:%d" % raw.getsockname()[:2]
    tls = ctx.wrap_socket(raw, server_hostname=name)
    conn = http.client.HTTPConnection(name, port, timeout=30)
    conn.sock = tls
    conn.request(method, path, body=body)
    r = conn.getresponse()
    data = r.read()
    der = tls.getpeercert(binary_form=True)
    conn.close()
    return r.status, data, der, local


def origin_der(pki) -> bytes:
    with open(pki["origin"][0]) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


# ---- (a) the original-style Go client on our proxy ----------------------------------------

def test_go_original_client_binds_on_our_proxy_and_serves_by_sni(pki, origin, gotunnel, tmp_path):
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "proxy-data"),
                      extra=["--allow-unsigned", NAME])
    try:
        client = gotunnel("-mode", "client", "-proxy", f"127.0.0.1:{proxy.ports['tunnel']}",
                          "-pin", proxy.fingerprint, "-name", NAME,
                          "-target", f"127.0.0.1:{origin.port}")
        auth = client.expect("auth")
        assert auth["error"] == "" and auth["version"] == "1"
        assert HEX32.match(auth["client_id"]), auth
        # Our AuthResp carries Shroud's nonce in Extra; Go decodes it as free JSON.
        assert auth["extra"]["shroud"] == 2 and auth["extra"]["nonce"]
        assert auth["reencode_equal"], auth["wire"]  # (c) exactly what Go's encoder writes

        bind = client.expect("bind")
        assert bind["error"] == "" and bind["url"] == f"tls://{NAME}", bind
        assert bind["reencode_equal"], bind["wire"]
        # go-tunnel's server leaves Protocol empty; ours names it (the Go client ignores it).
        assert bind["wire"] == ('{"Type":"BindResp","Payload":{"Url":"tls://%s","Protocol":"tls",'
                                '"Error":"","Extra":null}}' % NAME)
        bound = proxy.wait_bound(NAME)
        assert bound["tunnels"] == 1

        # A public TLS connection by SNI reaches the Go client's HTTPS origin, end to end.
        status, body, der, local = https_request(pki, proxy.ports["https"], NAME)
        assert status == 200 and body == b"hello from origin\n"
        assert der == origin_der(pki)  # TLS is terminated at the origin, not on the way

        # (c) The StartProxy our proxy wrote, as the Go client received and decoded it.
        start = client.expect("proxy")
        assert start["url"] == f"tls://{NAME}" and start["client_addr"] == local
        assert start["wire"] == ('{"Type":"StartProxy","Payload":{"Url":"tls://%s",'
                                 '"ClientAddr":"%s"}}' % (NAME, local))
        assert start["reencode_equal"]
        client.expect("proxy_done")

        # Bulk both ways through the Go client's splice (muxado flow control on both sides).
        n = 3 * 1024 * 1024
        status, body, _, _ = https_request(pki, proxy.ports["https"], NAME, path=f"/bytes/{n}")
        assert status == 200 and body == pattern(n)
        upload = pattern(2 * 1024 * 1024 + 7)
        status, body, _, _ = https_request(pki, proxy.ports["https"], NAME, "POST", "/sha256",
                                           upload)
        assert status == 200 and body.decode().strip() == hashlib.sha256(upload).hexdigest()
        # (expect() lets the reader greenlet catch up: the requests above block without yielding)
        assert all(client.expect("proxy")["reencode_equal"] for _ in range(2))
        assert len(client.find("proxy")) == 3 and not client.find("proxy_error")
        assert proxy.alive() and client.proc.poll() is None
    finally:
        proxy.stop()


def test_go_original_client_refused_without_allow_unsigned(pki, origin, gotunnel, tmp_path):
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "proxy-data"))
    try:
        client = gotunnel("-mode", "client", "-proxy", f"127.0.0.1:{proxy.ports['tunnel']}",
                          "-pin", proxy.fingerprint, "-name", NAME,
                          "-target", f"127.0.0.1:{origin.port}")
        assert client.expect("auth")["error"] == ""  # auth itself is open to go-tunnel peers
        bind = client.expect("bind")
        assert bind["url"] == ""
        assert "requires a signed bind" in bind["error"] and NAME in bind["error"], bind
        assert bind["extra"] == {"reason": "signature-required"}
        assert bind["reencode_equal"], bind["wire"]
        assert client.expect("bind_refused")["error"] == bind["error"]
        assert client.wait(timeout=15) == 3  # permanent, as go-tunnel treats a BindResp Error
        # What the Go program printed for people (stderr):
        assert f"Failed to bind {NAME}: {bind['error']}" in client.trace_tail(20)
        assert all(b["name"] != NAME for b in proxy.status()["bindings"])
        # Nothing is routed for the name: the public connection gets unrecognized_name.
        with pytest.raises(ssl.SSLError) as e:
            https_request(pki, proxy.ports["https"], NAME)
        assert "UNRECOGNIZED_NAME" in str(e.value).upper()
    finally:
        proxy.stop()


# ---- (b) our client on the original-style Go proxy ----------------------------------------

def test_our_client_binds_unsigned_on_go_original_proxy(pki, origin, gotunnel, tmp_path):
    server = gotunnel("-mode", "server", "-cert", pki["goproxy"][0], "-key", pki["goproxy"][1])
    _, tunnel_port = server.listening()
    public_port = int(server.find("listening")[0]["public"].rsplit(":", 1)[1])
    pin = cert_fingerprint(pki["goproxy"][0])
    client = ClientProc(str(tmp_path), str(tmp_path / "client-data"),
                        [OURS, f"127.0.0.1:{origin.port}"], [f"127.0.0.1:{tunnel_port}"],
                        pins=[pin])
    try:
        auth = server.expect("auth")
        # Our Auth: go-tunnel's fields, Shroud's key in Extra, bytes exactly as Go writes them.
        assert auth["version"] == ["1"] and auth["client_id"] == ""
        assert auth["extra"]["shroud"] == 2 and len(auth["extra"]["key"]) == 44
        assert auth["reencode_equal"], auth["wire"]

        bind = server.expect("bind")
        assert bind["error"] == "" and bind["url"] == f"tls://{OURS}"
        assert bind["protocol"] == "tls" and bind["hostname"] == OURS
        assert bind["subdomain"] == ""
        # The Go proxy sent no nonce, so the bind is unsigned: exactly the original's Bind.
        assert bind["extra"] is None
        assert bind["wire"] == ('{"Type":"Bind","Payload":{"Protocol":"tls","Options":'
                                '{"Hostname":"%s","Subdomain":""},"Extra":null}}' % OURS)
        assert bind["reencode_equal"]

        status, body, der, local = https_request(pki, public_port, OURS)
        assert status == 200 and body == b"hello from origin\n"
        assert der == origin_der(pki)
        start = server.expect("proxy")
        assert start["sni"] == OURS and start["client_addr"] == local
        server.expect("proxy_done")

        n = 3 * 1024 * 1024
        status, body, _, _ = https_request(pki, public_port, OURS, path=f"/bytes/{n}")
        assert status == 200 and body == pattern(n)
        upload = pattern(2 * 1024 * 1024 + 7)
        status, body, _, _ = https_request(pki, public_port, OURS, "POST", "/sha256", upload)
        assert status == 200 and body.decode().strip() == hashlib.sha256(upload).hexdigest()

        assert [server.expect("proxy")["sni"] for _ in range(2)] == [OURS, OURS]
        assert client.alive() and server.proc.poll() is None
        assert not server.find("session_error") and not server.find("session_end")
        assert not server.find("public_refused")
        assert "sent no nonce" in client.log()
    finally:
        client.stop()


def test_our_client_refuses_go_proxy_with_wrong_pin(pki, origin, gotunnel, tmp_path):
    """The pin is what stands in for the original's compiled-in CA: a wrong one, no session."""
    server = gotunnel("-mode", "server", "-cert", pki["goproxy"][0], "-key", pki["goproxy"][1])
    _, tunnel_port = server.listening()
    client = ClientProc(str(tmp_path), str(tmp_path / "client-data"),
                        [OURS, f"127.0.0.1:{origin.port}"], [f"127.0.0.1:{tunnel_port}"],
                        pins=["00" * 32])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "matches no pinned" not in client.log():
            time.sleep(0.1)
        assert "matches no pinned fingerprint" in client.log(), client.log()
        assert not server.find("auth") and not server.find("bind")
    finally:
        client.stop()


# ---- heartbeats: both sessions outlive Go muxado's 13 s heartbeat timeout -------------------

# Go's muxado heartbeat closes a session when no echo came for 13 s (docs/PROTOCOL.md, "Heartbeat");
# 16 s idle proves our side echoes Go's heartbeats and Go echoes ours, both directions at once.
IDLE_PAST_HEARTBEAT = 16


def test_sessions_with_go_survive_idle_past_heartbeat_timeout(pki, origin, gotunnel, tmp_path):
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "proxy-data"),
                      extra=["--allow-unsigned", NAME])
    server = gotunnel("-mode", "server", "-cert", pki["goproxy"][0], "-key", pki["goproxy"][1])
    _, tunnel_port = server.listening()
    public_port = int(server.find("listening")[0]["public"].rsplit(":", 1)[1])
    client = None
    try:
        go_client = gotunnel("-mode", "client", "-proxy", f"127.0.0.1:{proxy.ports['tunnel']}",
                             "-pin", proxy.fingerprint, "-name", NAME,
                             "-target", f"127.0.0.1:{origin.port}")
        assert go_client.expect("bind")["error"] == ""
        client = ClientProc(str(tmp_path), str(tmp_path / "client-data"),
                            [OURS, f"127.0.0.1:{origin.port}"], [f"127.0.0.1:{tunnel_port}"],
                            pins=[cert_fingerprint(pki["goproxy"][0])])
        assert server.expect("bind")["error"] == ""
        time.sleep(IDLE_PAST_HEARTBEAT)
        for port, name in ((proxy.ports["https"], NAME), (public_port, OURS)):
            status, body, _, _ = https_request(pki, port, name)
            assert (status, body) == (200, b"hello from origin\n"), name
        go_client.expect("proxy")
        server.expect("proxy")
        assert not go_client.find("session_end") and not server.find("session_end")
        assert proxy.status()["bindings"][0]["tunnels"] == 1
        # No reconnect in between: one Auth on each Go side, one connect by our client.
        assert len(server.find("auth")) == 1 and len(go_client.find("auth")) == 1
        assert client.log().count(": connecting") == 1, client.log()
    finally:
        if client is not None:
            client.stop()
        proxy.stop()
