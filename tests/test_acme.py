"""https:NAME end to end: a real proxy, a real client, pebble as the CA (issue 15).

The client binds app.test for TLS, orders a certificate from pebble, answers pebble's
TLS-ALPN-01 validation through the proxy (pebble's tlsPort is the proxy's public TLS port),
ends visitors' TLS itself and hands plain HTTP to the origin.
"""
from __future__ import annotations

import glob
import os
import socket
import ssl
import stat
import subprocess

import pytest
from cryptography import x509

from tests.support.procs import ClientProc, OriginProc, ProxyProc
from tests.support.wait import wait_for

NAME = "app.test"
ISSUE_TIMEOUT = 60  # order + validation + issuance on a loaded 2-core box


def start_proxy(tmp_path, pebble, name="proxy"):
    return ProxyProc(str(tmp_path), str(tmp_path / f"{name}-data"), name=name,
                     extra=["--log-level", "debug"], ports={"https": pebble.tls_port})


def start_client(tmp_path, proxy, pebble, origin, name="client", data="client-data",
                 extra=()):
    return ClientProc(str(tmp_path), str(tmp_path / data),
                      [f"https:{NAME}", f"127.0.0.1:{origin.port}"],
                      [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                      name=name, extra=["--acme-directory", pebble.directory,
                                        "--acme-ca", pebble.ca_file, *extra])


def curl(root: str, port: int, path: str = "/hello") -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", root,
                           "--resolve", f"{NAME}:{port}:127.0.0.1", "-w", "\n%{http_version}",
                           f"https://{NAME}:{port}{path}"],
                          capture_output=True, text=True, timeout=30)


def peer_cert(port: int, root: str) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=root)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


@pytest.fixture
def site(tmp_path, pebble):
    origin = OriginProc(str(tmp_path), hello="hello from the plain origin")
    proxy = start_proxy(tmp_path, pebble)
    procs = [origin, proxy]
    yield origin, proxy, procs
    for p in reversed(procs):
        p.stop()


def test_curl_gets_plain_origin_with_pebble_certificate(tmp_path, pebble, site):
    origin, proxy, procs = site
    client = start_client(tmp_path, proxy, pebble, origin)
    procs.append(client)
    proxy.wait_bound(NAME)
    client.wait_log(f"{NAME}: certificate issued", timeout=ISSUE_TIMEOUT)
    root = pebble.root_file(str(tmp_path))
    r = curl(root, pebble.tls_port)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from the plain origin\n\n1.1", r.stdout
    cert = peer_cert(pebble.tls_port, root)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == [NAME]
    assert "Pebble" in cert.issuer.rfc4514_string()
    # The key and certificate files are the client's only: 0600 in its data dir.
    files = [f for f in glob.glob(str(tmp_path / "client-data" / "acme" / "**"), recursive=True)
             if os.path.isfile(f)]
    assert len(files) == 3, files  # account.json, app.test/cert.pem, app.test/key.pem
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_no_certificate_yet_is_a_tls_alert(tmp_path, pebble, site):
    """Before a certificate exists (here: the CA is unreachable), a visitor gets an alert,
    never a self-signed certificate."""
    origin, proxy, procs = site
    client = ClientProc(str(tmp_path), str(tmp_path / "client-data"),
                        [f"https:{NAME}", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                        extra=["--acme-directory", "https://127.0.0.1:1/dir",
                               "--acme-ca", pebble.ca_file])
    procs.append(client)
    proxy.wait_bound(NAME)
    client.wait_log("certificate not obtained", timeout=ISSUE_TIMEOUT)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # would accept any certificate: none must come
    with socket.create_connection(("127.0.0.1", pebble.tls_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            ctx.wrap_socket(raw, server_hostname=NAME)


def test_wildcard_https_is_refused_with_reason(tmp_path):
    r = subprocess.run([ClientProc.__init__.__globals__["PY"], "shroud.py", "--tor", "none",
                        "--proxy", "127.0.0.1:1", "--data-dir", str(tmp_path),
                        "https:*.example.com", "127.0.0.1:8080"],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "DNS-01" in r.stderr and "Traceback" not in r.stderr, r.stderr
