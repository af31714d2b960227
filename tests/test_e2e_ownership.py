"""End to end: who may bind a name, balancing, restarts, DNS proofs, gunicorn, HTTP/2.

Each test starts its own proxy (real `shroud_proxy.py` or gunicorn) and clients (`shroud.py
--tor none`), since they restart processes or fight over names.
"""
from __future__ import annotations

import os
import socket
import ssl
import subprocess

import pytest

from lib.identity import Identity
from lib.protocol import messages as msg
from tests.support.loaddrs import loopback_addresses
from tests.support.procs import ClientProc, OriginProc, ProxyProc, free_port, wait_port
from tests.support.rawtunnel import RawTunnel
from tests.support.visitor import https_get, tls_site

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def site(tmp_path):
    pki = tls_site(tmp_path, "app.test", "dns.test")
    ca_pem, cert_pem, key_pem = pki.ca_pem, pki.cert_pem, pki.key_pem
    origin = OriginProc(str(tmp_path), tls=(cert_pem, key_pem))
    procs = [origin]
    yield dict(dir=tmp_path, ca_pem=ca_pem, origin=origin, procs=procs, cert=cert_pem,
               key=key_pem)
    for p in reversed(procs):
        p.stop()


def start_proxy(site, name="proxy", **kw):
    p = ProxyProc(str(site["dir"]), str(site["dir"] / f"{name}-data"), name=name, **kw)
    site["procs"].append(p)
    return p


def start_client(site, proxy, key_dir, pairs=None, name="client", extra=()):
    pairs = pairs or ["app.test", f"127.0.0.1:{site['origin'].port}"]
    c = ClientProc(str(site["dir"]), str(site["dir"] / key_dir), pairs,
                   [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint], name=name,
                   extra=extra)
    site["procs"].append(c)
    return c


def get(site, proxy, name="app.test"):
    status, body, _ = https_get(site["ca_pem"], proxy.ports["https"], name)
    return status, body


def wait_log(proc, text, timeout=20.0):
    proc.wait_log(text, timeout)


def test_second_key_refused_with_reason(site):
    proxy = start_proxy(site)
    start_client(site, proxy, "key-a", name="client-a")
    owner_a = proxy.wait_bound("app.test")["owner"]
    b = start_client(site, proxy, "key-b", name="client-b")
    wait_log(b, "refused app.test")
    assert "owned by" in b.log() or "belongs to" in b.log() or "bound by another" in b.log()
    binding = proxy.wait_bound("app.test")
    assert binding["tunnels"] == 1 and binding["owner"] == owner_a
    assert get(site, proxy) == (200, b"hello from origin\n")


def test_claim_rate_counts_an_ipv6_peer_by_its_64(site):
    """One host holds a whole /64. Keyed by the full address, three addresses of one /64, each
    with a fresh key (free), claimed --claim-burst new names each: enough of them fill the
    store's --max-first-use-names, after which no first use is granted to anyone."""
    squatter = [f"2001:db8:65:1::{i}" for i in (1, 2, 3)]
    honest = "2001:db8:65:2::1"
    with loopback_addresses(squatter + [honest]):
        port = free_port()
        proxy = start_proxy(site, ports={"tunnel": port}, extra=[
            "--tunnel-addr", f"[::]:{port}", "--claim-burst", "4", "--claims-per-hour", "1"])
        answers = []
        for n, source in enumerate(squatter):
            t = RawTunnel(proxy, Identity.load_or_create(str(site["dir"] / f"squat-{n}")),
                          host="::1", source=source)
            try:
                t.auth()
                answers += [t.bind(f"squat-{n}-{i}.test").reason for i in (1, 2)]
            finally:
                t.close()
        assert answers == [None] * 4 + [msg.REASON_LIMIT] * 2, answers
        t = RawTunnel(proxy, Identity.load_or_create(str(site["dir"] / "honest")),
                      host="::1", source=honest)
        try:
            t.auth()
            assert t.bind("honest.test").reason is None  # another /64 has its own bucket
        finally:
            t.close()


def test_same_key_twice_is_balanced(site):
    proxy = start_proxy(site)
    start_client(site, proxy, "key-a", name="client-1")
    start_client(site, proxy, "key-a", name="client-2")
    proxy.wait_bound("app.test", tunnels=2)
    for _ in range(20):
        assert get(site, proxy)[0] == 200
    tunnels = proxy.status()["tunnels"]
    served = [t["streams_total"] for t in tunnels if "app.test" in t["names"]]
    assert len(served) == 2 and min(served) >= 5, served


def test_proxy_restart_rebind_and_tofu_remembered(site):
    proxy = start_proxy(site)
    a = start_client(site, proxy, "key-a", name="client-a")
    owner = proxy.wait_bound("app.test")["owner"]
    ports = proxy.ports
    proxy.stop()
    a.signal(19)  # SIGSTOP: keep the owner away while another key tries its luck
    proxy2 = start_proxy(site, name="proxy", ports=ports)
    assert proxy2.fingerprint == proxy.fingerprint  # same data dir, same certificate
    b = start_client(site, proxy2, "key-b", name="client-b")
    wait_log(b, "refused app.test")  # TOFU survived the restart
    a.signal(18)  # SIGCONT: the owner reconnects with its backoff and binds again
    binding = proxy2.wait_bound("app.test", timeout=60)
    assert binding["owner"] == owner
    assert get(site, proxy2) == (200, b"hello from origin\n")


def test_dns_txt_proof_decides_owner(site, dns_server):
    key_b = Identity.load_or_create(str(site["dir"] / "key-b")).fingerprint
    dns_server.add("_shroud.dns.test", "TXT", f"shroud-key={key_b}")
    proxy = start_proxy(site, extra=["--dns-resolver", f"127.0.0.1:{dns_server.address[1]}"])
    a = start_client(site, proxy, "key-a", pairs=["dns.test", f"127.0.0.1:{site['origin'].port}"],
                     name="client-a")
    wait_log(a, "refused dns.test")
    start_client(site, proxy, "key-b", pairs=["dns.test", f"127.0.0.1:{site['origin'].port}"],
                 name="client-b")
    binding = proxy.wait_bound("dns.test")
    assert binding["owner"] == key_b and binding["method"] == "dns"
    assert get(site, proxy, "dns.test") == (200, b"hello from origin\n")


def test_under_gunicorn(site):
    proxy = start_proxy(site, gunicorn=True)
    start_client(site, proxy, "key-a")
    proxy.wait_bound("app.test")
    assert get(site, proxy) == (200, b"hello from origin\n")
    assert "gunicorn" in open(f"/proc/{proxy.pid}/cmdline", "rb").read().decode(errors="replace")


def test_http2_by_alpn_through_passthrough(site):
    d = site["dir"]
    port = free_port()
    conf = d / "nginx.conf"
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("h2 origin\n")
    conf.write_text(f"""
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{
    listen 127.0.0.1:{port} ssl http2;
    server_name app.test;
    ssl_certificate {site['cert']};
    ssl_certificate_key {site['key']};
    root {d}/www;
  }}
}}
""")
    nginx = subprocess.Popen(["nginx", "-p", str(d), "-c", str(conf)],
                             stderr=subprocess.PIPE)
    try:
        wait_port(port)
        proxy = start_proxy(site)
        start_client(site, proxy, "key-a", pairs=["app.test", f"127.0.0.1:{port}"])
        proxy.wait_bound("app.test")
        hp = proxy.ports["https"]
        out = subprocess.run(
            ["curl", "-sS", "--http2", "--max-time", "20", "--cacert", site["ca_pem"],
             "--resolve", f"app.test:{hp}:127.0.0.1", "-w", "\\n%{http_version}",
             f"https://app.test:{hp}/index.html"], capture_output=True, text=True, timeout=40)
        assert out.returncode == 0, out.stderr
        body, version = out.stdout.rsplit("\n", 1)
        assert body == "h2 origin\n" and version == "2"
    finally:
        nginx.terminate()
        nginx.wait(10)


def test_print_fingerprint_matches_served_certificate(site):
    proxy = start_proxy(site)
    out = subprocess.run([os.sys.executable, "shroud_proxy.py", "--data-dir", proxy.data_dir,
                          "--print-fingerprint"], capture_output=True, text=True, timeout=30,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == proxy.fingerprint
    raw = socket.create_connection(("127.0.0.1", proxy.ports["tunnel"]), timeout=10)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    der = ctx.wrap_socket(raw).getpeercert(binary_form=True)
    import hashlib
    assert hashlib.sha256(der).hexdigest() == proxy.fingerprint


def test_client_refuses_unpinned_proxy_certificate(site):
    proxy = start_proxy(site)
    c = ClientProc(str(site["dir"]), str(site["dir"] / "key-a"),
                   ["app.test", f"127.0.0.1:{site['origin'].port}"],
                   [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=["00" * 32], name="client-bad")
    site["procs"].append(c)
    wait_log(c, "matches no pinned fingerprint")
    assert "intercepting TLS" in c.log()
    assert proxy.status()["bindings"] == []
