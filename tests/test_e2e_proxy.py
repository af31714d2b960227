"""End to end with real processes: proxy, client (--tor none), origins, curl and Python clients.

One proxy, one HTTPS origin, one HTTP origin and one client exposing several services are shared
by the module; tests that restart or fight over names start their own.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import struct
import subprocess
import time

import pytest

from lib.client.tunnels import PP2_TYPE_SHROUD_PROXY
from lib.identity import Identity
from tests.support.origin import pattern
from tests.support import visitor
from tests.support.procs import ClientProc, OriginProc, ProxyProc, free_port

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    pki = visitor.tls_site(d, "app.test", "*.wild.test")
    ca, ca_pem, cert_pem, key_pem = pki.ca, pki.ca_pem, pki.cert_pem, pki.key_pem
    tls_origin = OriginProc(str(d), tls=(cert_pem, key_pem), name="tls-origin")
    # A second TLS name on the same tunnel, with its own CA, certificate and body: SNI routing
    # is seen to pick the right origin, not just an origin.
    (d / "site-b").mkdir()
    pki_b = visitor.tls_site(d / "site-b", "other.test")
    tls_origin_b = OriginProc(str(d), tls=(pki_b.cert_pem, pki_b.key_pem), name="tls-origin-b",
                              hello="hello from origin b")
    http_origin = OriginProc(str(d), name="http-origin")
    pp_origin = OriginProc(str(d), name="pp-origin", proxy_protocol=True)
    tcp_port = free_port()
    key_a = Identity.load_or_create(str(d / "client-a")).fingerprint
    allowlist = d / "allowlist"
    allowlist.write_text(f"# wildcards need the operator's word\n*.wild.test {key_a}\n")
    proxy = ProxyProc(str(d), str(d / "proxy-data"),
                      extra=["--tcp-ports", f"{tcp_port}", "--peek-timeout", "2",
                             "--allowlist", str(allowlist)])
    client = ClientProc(str(d), str(d / "client-a"), [
        "app.test", f"127.0.0.1:{tls_origin.port}",
        "other.test", f"127.0.0.1:{tls_origin_b.port}",
        "*.wild.test", f"127.0.0.1:{tls_origin.port}",
        "http:web.test", f"127.0.0.1:{http_origin.port}",
        "http:down.test", f"127.0.0.1:{free_port()}",
        f"tcp:{tcp_port}", f"127.0.0.1:{http_origin.port}",
    ], [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    client_pp = ClientProc(str(d), str(d / "client-a"), [
        "http:pp.test", f"127.0.0.1:{pp_origin.port}"],
        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint], name="client-pp",
        extra=["--proxy-protocol", "v1"])
    client_pp2 = ClientProc(str(d), str(d / "client-a"), [
        "http:pp2.test", f"127.0.0.1:{pp_origin.port}"],
        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint], name="client-pp2",
        extra=["--proxy-protocol", "v2"])
    w = dict(dir=d, ca=ca, ca_pem=ca_pem, origin_cert=cert_pem, tls_origin=tls_origin,
             http_origin=http_origin, proxy=proxy, client=client, tcp_port=tcp_port,
             pki_b=pki_b)
    try:
        for name in ("app.test", "*.wild.test", "web.test", "down.test", f"tcp:{tcp_port}",
                     "pp.test", "pp2.test", "other.test"):
            proxy.wait_bound(name)
        yield w
    finally:
        for p in (client, client_pp, client_pp2, proxy, tls_origin, tls_origin_b, http_origin,
                  pp_origin):
            p.stop()


def https_get(w, name, path="/hello", port=None):
    return visitor.https_get(w["ca_pem"], port or w["proxy"].ports["https"], name, path)


def http_conn(w, port=None):
    return http.client.HTTPConnection("127.0.0.1", port or w["proxy"].ports["http"], timeout=30)


def http_get(w, host, path="/hello"):
    return visitor.http_get(w["proxy"].ports["http"], host, path)


def test_sni_passthrough_client_sees_origin_certificate(world):
    w = world
    status, body, der = https_get(w, "app.test")
    assert status == 200 and body == b"hello from origin\n"
    with open(w["origin_cert"]) as f:
        origin_der = ssl.PEM_cert_to_DER_cert(f.read())
    assert der == origin_der  # end-to-end TLS: the proxy never terminated it


def test_curl_with_resolve_reaches_origin(world):
    port = world["proxy"].ports["https"]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--cacert", world["ca_pem"],
         "--resolve", f"app.test:{port}:127.0.0.1", f"https://app.test:{port}/hello"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from origin\n"


def test_wildcard_binding_routes_subdomains(world):
    status, body, _ = https_get(world, "deep.wild.test")
    assert status == 200 and body == b"hello from origin\n"


def test_each_request_reaches_its_own_hosts_origin(world):
    """Issue 11 item 4. A visitor (or a front pooling connections) sends requests for two
    names on one keep-alive connection: each reaches its own name's origin. The proxy carries
    one exchange per public connection (the answer says Connection: close, and http.client
    opens the next connection by itself); routing a whole connection by its first Host used to
    send pp.test's request, cookie included, to web.test's origin."""
    before = world["proxy"].status()["connections"]
    c = http_conn(world)
    for host in ("web.test", "pp.test", "WEB.test:80", "pp.test"):
        c.request("GET", "/peer", headers={"Host": host, "Cookie": f"session-for={host}"})
        r = c.getresponse()
        info = json.loads(r.read())
        assert r.status == 200 and r.getheader("Connection") == "close"
        # pp.test's origin reads a PROXY header (its client sends one); web.test's does not.
        assert info["proxy_header"].startswith("PROXY ") == host.startswith("pp."), (host, info)
    c.close()
    assert world["proxy"].status()["connections"] - before == 4


def test_pipelined_second_request_reaches_no_origin(world):
    s = socket.create_connection(("127.0.0.1", world["proxy"].ports["http"]), timeout=30)
    s.sendall(b"GET /peer HTTP/1.1\r\nHost: web.test\r\n\r\n"
              b"GET /peer HTTP/1.1\r\nHost: pp.test\r\nCookie: secret=1\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    assert data.count(b"HTTP/1.") == 1 and b"pp.test" not in data, data


def raw_exchange(world, head: bytes) -> bytes:
    s = socket.create_connection(("127.0.0.1", world["proxy"].ports["http"]), timeout=30)
    s.sendall(head)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data


def test_a_body_framed_two_ways_reaches_no_origin(world):
    """A request with both Content-Length and Transfer-Encoding (lib/protocol/http1.py's
    request table): an origin framing it by the length would read the chunked body's tail as a
    second request of its own. The proxy aborts the connection before forwarding a byte of it;
    the same body framed one way is served."""
    body = b"4\r\nabcd\r\n0\r\n\r\n"
    for fields in (b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                   b"Transfer-Encoding: chunked\r\nContent-Length: 15\r\n"):
        try:
            data = raw_exchange(world, b"POST /sha256 HTTP/1.1\r\nHost: web.test\r\n" + fields
                                + b"\r\n" + body)
        except ConnectionResetError:
            data = b""
        assert data == b"" or data.startswith(b"HTTP/1.0 502 "), data
    data = raw_exchange(world, b"POST /sha256 HTTP/1.1\r\nHost: web.test\r\n"
                        b"Content-Length: 4\r\n\r\nabcd")  # (the test origin reads no chunks)
    assert data.startswith(b"HTTP/1.") and hashlib.sha256(b"abcd").hexdigest().encode() in data


def test_absolute_form_whose_host_differs_is_refused_and_reaches_no_origin(world):
    """docs/SECURITY.md, "Absolute-form requests": we route by the request target's host, the
    origin may read the Host header, so the two must name the same host. A request for
    web.test's origin that says Host: pp.test used to reach web.test's origin as pp.test."""
    before = world["proxy"].status()["refusals"].get("bad_request", 0)
    for target, host in (("http://web.test/peer", "pp.test"), ("http://pp.test/peer", "web.test"),
                         ("https://web.test:80/peer", "nobody.test")):
        data = raw_exchange(world, b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                            % (target.encode(), host.encode()))
        assert data.startswith(b"HTTP/1.0 400 ") and b"proxy_header" not in data, (target, data)
        assert b"Host" in data.split(b"\r\n\r\n", 1)[1], data
    assert world["proxy"].status()["refusals"]["bad_request"] - before == 3
    # The same host both ways (case, port and a trailing dot aside) is served, as is
    # HTTP/1.0's absolute form without a Host header.
    for head in (b"GET http://web.test/peer HTTP/1.1\r\nHost: WEB.test.:80\r\n\r\n",
                 b"GET http://WEB.TEST:80/peer HTTP/1.1\r\nHost: web.test\r\n\r\n",
                 b"GET http://web.test/peer HTTP/1.0\r\n\r\n"):
        data = raw_exchange(world, head)
        assert data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0], data
        info = json.loads(data.split(b"\r\n\r\n", 1)[1])
        # web.test's origin (pp.test's reads a PROXY header), given the target as sent.
        assert info["proxy_header"] == "" and info["target"].lower().startswith("http://web.test")


def test_a_host_that_is_not_ascii_gets_our_reason_and_is_counted(world):
    """A Host of UTF-8 bytes was answered with Python's codec message ("'ascii' codec can't
    decode byte 0xc3 ..."); it gets the one-line reason of every other bad name, and counts as
    a bad request."""
    before = world["proxy"].status()["refusals"].get("bad_request", 0)
    for host in (b"caf\xc3\xa9.test", b"web.test\xff"):
        data = raw_exchange(world, b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                            % host)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 "), data
        assert body == (b"invalid host: host name must be ASCII (give an internationalised "
                        b"name in its xn-- form)\n"), data
    assert world["proxy"].status()["refusals"]["bad_request"] - before == 2


def test_http_to_tls_only_name_redirects_to_https(world):
    status, _ = http_get(world, "app.test", "/x?y=1")
    assert status == 301


def test_unknown_name_http_404_and_tls_unrecognized_name(world):
    status, body = http_get(world, "nobody.test")
    assert status == 404 and b"nobody.test" in body
    with pytest.raises(ssl.SSLError) as e:
        https_get(world, "nobody.test")
    assert "UNRECOGNIZED_NAME" in str(e.value).upper()
    refusals = world["proxy"].status()["refusals"]
    assert refusals.get("unknown_name", 0) >= 2


def test_local_service_refusing_gives_502(world):
    status, body = http_get(world, "down.test")
    assert status == 502


def test_100_mib_download_and_upload_checksummed(world):
    n = 100 * 1024 * 1024
    ctx = ssl.create_default_context(cafile=world["ca_pem"])
    port = world["proxy"].ports["https"]
    conn = http.client.HTTPSConnection("app.test", port, context=ctx, timeout=120)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                server_hostname="app.test")
    conn.request("GET", f"/bytes/{n}")
    r = conn.getresponse()
    h = hashlib.sha256()
    got = 0
    while chunk := r.read(1 << 20):
        h.update(chunk)
        got += len(chunk)
    assert got == n and h.hexdigest() == hashlib.sha256(pattern(n)).hexdigest()
    body = os.urandom(1 << 20) * 100
    conn.request("POST", "/sha256", body=body)
    r = conn.getresponse()
    assert r.read().decode().strip() == hashlib.sha256(body).hexdigest()
    conn.close()


def test_websocket_upgrade_through_host_routing(world):
    s = socket.create_connection(("127.0.0.1", world["proxy"].ports["http"]), timeout=30)
    assert visitor.ws_upgrade(s, "web.test").startswith(b"HTTP/1.1 101")
    for msg in (b"hi", os.urandom(300), os.urandom(70000)):
        assert visitor.ws_echo(s, msg) == msg
    s.close()


def test_half_close_carried_end_to_end(world):
    # Raw TCP bind to the HTTP origin: send a request with a body, shut down our write side,
    # and still read the whole response (the origin sees our FIN only after the body).
    s = socket.create_connection(("127.0.0.1", world["tcp_port"]), timeout=30)
    body = os.urandom(200_000)
    s.sendall(b"POST /sha256 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(body).hexdigest().encode() in data


def test_sni_routes_each_name_to_its_own_origin(world):
    w = world
    a_status, a_body, a_der = https_get(w, "app.test")
    b_status, b_body, b_der = visitor.https_get(w["pki_b"].ca_pem, w["proxy"].ports["https"],
                                               "other.test")
    assert (a_status, a_body) == (200, b"hello from origin\n")
    assert (b_status, b_body) == (200, b"hello from origin b\n")
    assert a_der == open_der(w["origin_cert"]) and b_der == open_der(w["pki_b"].cert_pem)
    assert a_der != b_der
    # Each name's certificate verifies only against its own CA: the visitor reached origin b.
    with pytest.raises(ssl.SSLCertVerificationError):
        visitor.https_get(w["ca_pem"], w["proxy"].ports["https"], "other.test")


def open_der(pem_path: str) -> bytes:
    with open(pem_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def peer_info_through_proxy(world, host):
    """GET /peer for ``host`` on the proxy's http listener: (our local port, origin's answer)."""
    s = socket.create_connection(("127.0.0.1", world["proxy"].ports["http"]), timeout=30)
    local_port = s.getsockname()[1]
    s.sendall(b"GET /peer HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return local_port, json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_proxy_protocol_v1_gives_origin_the_visitor_and_the_public_listener(world):
    local_port, info = peer_info_through_proxy(world, "pp.test")
    # Source: the visitor's socket; destination: the proxy's public listener it connected to.
    assert info["proxy_header"] == \
        f"PROXY TCP4 127.0.0.1 127.0.0.1 {local_port} {world['proxy'].ports['http']}\r\n"


def test_proxy_protocol_v2_end_to_end(world):
    proxy = world["proxy"]
    local_port, info = peer_info_through_proxy(world, "pp2.test")
    assert info["proxy_header"].startswith("v2:"), info
    raw = bytes.fromhex(info["proxy_header"][3:])
    assert raw[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert raw[12:14] == b"\x21\x11"  # version 2 PROXY, TCP over IPv4
    length = struct.unpack(">H", raw[14:16])[0]
    body = raw[16:]
    assert len(body) == length
    src, dst = socket.inet_ntoa(body[0:4]), socket.inet_ntoa(body[4:8])
    src_port, dst_port = struct.unpack(">HH", body[8:12])
    assert (src, src_port) == ("127.0.0.1", local_port)
    assert (dst, dst_port) == ("127.0.0.1", proxy.ports["http"])
    tlv_type, tlv_len = struct.unpack(">BH", body[12:15])
    assert tlv_type == PP2_TYPE_SHROUD_PROXY
    assert body[15:15 + tlv_len].decode() == f"127.0.0.1:{proxy.ports['tunnel']}"
    assert 15 + tlv_len == length


def test_hostile_inputs_refused_within_deadline_others_unharmed(world):
    before = world["proxy"].status()["refusals"]
    port_https = world["proxy"].ports["https"]
    port_http = world["proxy"].ports["http"]

    def answer(port, data, wait=10):
        s = socket.create_connection(("127.0.0.1", port), timeout=wait)
        t0 = time.monotonic()
        try:
            s.sendall(data)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
        except OSError:
            out = b"<reset>"
        s.close()
        return out, time.monotonic() - t0

    # garbage to the TLS listener: an alert (decode_error family), not a hang
    out, dt = answer(port_https, b"\x16\x03\x01\x00\x05hello-garbage" * 3)
    assert out[:1] == b"\x15" and dt < 3
    # not TLS at all
    out, dt = answer(port_https, b"GET / HTTP/1.1\r\n\r\n")
    assert out[:1] == b"\x15" and dt < 3
    # oversized request head: 431 long before any deadline
    out, dt = answer(port_http, b"GET / HTTP/1.1\r\nHost: web.test\r\nX: " + b"a" * 70000)
    assert out.startswith(b"HTTP/1.0 431"), out[:100]
    # truncated ClientHello, then silence: refused at the 2 s peek deadline
    hello = _client_hello("app.test")
    out, dt = answer(port_https, hello[:40])
    assert dt < 5
    # slow sender: one byte a second, never completes a head
    slow = socket.create_connection(("127.0.0.1", port_http), timeout=10)
    t0 = time.monotonic()
    closed_after = None
    for b in b"GET / HTTP/1.1\r\nHost: web.te":
        try:
            slow.sendall(bytes([b]))
            # meanwhile a normal visitor is served
            status, _ = http_get(world, "web.test")
            assert status == 200
            time.sleep(0.3)
        except OSError:
            closed_after = time.monotonic() - t0
            break
        slow.settimeout(0.01)
        try:
            if slow.recv(100) is not None:
                closed_after = time.monotonic() - t0
                break
        except socket.timeout:
            pass
        slow.settimeout(10)
    assert closed_after is not None and closed_after < 5
    st = world["proxy"].status()
    def grew(key):
        return st["refusals"].get(key, 0) - before.get(key, 0)
    assert grew("peek_timeout") >= 2  # the truncated hello and the slow sender
    assert grew("bad_request") >= 3  # garbage, not-TLS, oversized head


def _client_hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_status_api_reports_bindings_and_bytes(world):
    https_get(world, "app.test")
    st = world["proxy"].status()
    app = [b for b in st["bindings"] if b["name"] == "app.test"][0]
    assert app["connections"] >= 1 and app["bytes_out"] > 0 and app["tunnels"] == 1
    assert app["owner"] == Identity.load_or_create(str(world["dir"] / "client-a")).fingerprint
