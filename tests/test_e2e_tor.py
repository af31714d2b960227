"""End to end over the private Tor network: the client reaches every proxy only through Tor.

Three proxies, one HTTPS origin, one client `--tor launch --tor-config client.torrc` (the tor it
launches joins the session's private network). Public visitors go straight to the proxies.
"""
from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import time

import pytest
import stem.control
import trustme

from tests.support.procs import ClientProc, OriginProc, ProxyProc

pytestmark = [pytest.mark.tor, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def tor_world(tor_network, tmp_path_factory):
    d = tmp_path_factory.mktemp("tor-e2e")
    ca = trustme.CA()
    cert = ca.issue_cert("hidden.test")
    cert_pem, key_pem = str(d / "o.pem"), str(d / "o.key")
    cert.cert_chain_pems[0].write_to_path(cert_pem)
    cert.private_key_pem.write_to_path(key_pem)
    ca_pem = str(d / "ca.pem")
    ca.cert_pem.write_to_path(ca_pem)
    procs = []
    try:
        origin = OriginProc(str(d), tls=(cert_pem, key_pem))
        procs.append(origin)
        proxies = [ProxyProc(str(d), str(d / f"proxy{i}-data"), name=f"proxy{i}")
                   for i in range(3)]
        procs += proxies
        client_dir = d / "client"
        client = ClientProc(str(d), str(client_dir), ["hidden.test", f"127.0.0.1:{origin.port}"],
                            [f"127.0.0.1:{p.ports['tunnel']}" for p in proxies],
                            pins=[p.fingerprint for p in proxies], tor="launch",
                            extra=["--tor-config", tor_network.client_torrc_path])
        procs.append(client)
        for p in proxies:
            p.wait_bound("hidden.test", timeout=120)
        yield dict(dir=d, ca_pem=ca_pem, proxies=proxies, client=client, client_dir=client_dir,
                   origin=origin, net=tor_network)
    finally:
        for p in reversed(procs):
            p.stop()


def get(world, proxy, path="/hello"):
    ctx = ssl.create_default_context(cafile=world["ca_pem"])
    port = proxy.ports["https"]
    conn = http.client.HTTPConnection("hidden.test", port, timeout=30)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                server_hostname="hidden.test")
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def client_controller(world) -> stem.control.Controller:
    tor_dir = world["client_dir"] / "tor"
    with open(tor_dir / "control-port") as f:
        addr = f.read().strip().split("=", 1)[1]
    host, port = addr.rsplit(":", 1)
    c = stem.control.Controller.from_port(host, int(port))
    c.authenticate()
    return c


def test_visitors_reach_origin_through_each_proxy(tor_world):
    for p in tor_world["proxies"]:
        assert get(tor_world, p) == (200, b"hello from origin\n")
    port = tor_world["proxies"][0].ports["https"]
    out = subprocess.run(["curl", "-sS", "--max-time", "30", "--cacert", tor_world["ca_pem"],
                          "--resolve", f"hidden.test:{port}:127.0.0.1",
                          f"https://hidden.test:{port}/hello"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "hello from origin\n", out.stderr


def test_tunnels_crossed_tor_on_three_distinct_circuits(tor_world):
    client_pid = tor_world["client"].pid
    tunnel_ports = {p.ports["tunnel"] for p in tor_world["proxies"]}
    ss = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True).stdout
    mine = [ln for ln in ss.splitlines() if f"pid={client_pid}," in ln]
    assert mine, ss
    for ln in mine:
        peer_port = int(ln.split()[4].rsplit(":", 1)[1])
        assert peer_port not in tunnel_ports, f"client talks to a proxy directly: {ln}"
    with client_controller(tor_world) as c:
        streams = [s for s in c.get_streams() if s.target_port in tunnel_ports]
        assert len(streams) == 3, streams
        circuits = {s.circ_id for s in streams}
        assert len(circuits) == 3
        exits = {fp for fp, _ in []}
        for cid in circuits:
            circ = c.get_circuit(cid)
            assert len(circ.path) >= 3
            exit_fp = circ.path[-1][0]
            relay = [r for r in tor_world["net"].relays if r.fingerprint == exit_fp]
            assert relay and relay[0].role == "exit"
