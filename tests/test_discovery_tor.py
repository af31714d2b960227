"""Discovery over the private Tor network: the client finds its proxies with no --proxy.

Three proxies form the fleet; two more run the discovery role (one with a certificate from a
test CA and the original's CNAME check against a loopback DNS server, one with its own tunnel
certificate, pinned). Clients run `--tor launch --tor-config client.torrc` and give no --proxy
and no --pin: the fingerprints of the JSON answer are what verifies each proxy (the proxies'
certificates are self-signed, so nothing else would let the tunnels up).
"""
from __future__ import annotations

import http.client
import socket
import ssl

import pytest
import stem.control
import trustme

from lib.client.tor import socks_credentials
from tests.fixtures.dns import FakeDns
from tests.support.procs import ClientProc, OriginProc, ProxyProc, free_port, wait_port

pytestmark = [pytest.mark.tor, pytest.mark.timeout(400)]

NAMES = ("disc.test", "pin.test", "srv.test", "bad.test")
PROXY_DOMAIN = "proxy.test"
# A client's tor bootstraps in 2-12 s on the private network; discovery plus three tunnels
# through fresh circuits add a few seconds more.
BIND_TIMEOUT = 120


@pytest.fixture(scope="module")
def world(tor_network, tmp_path_factory):
    d = tmp_path_factory.mktemp("disc-tor")
    ca = trustme.CA()
    ca_pem = str(d / "ca.pem")
    ca.cert_pem.write_to_path(ca_pem)
    origin_cert = ca.issue_cert(*NAMES)
    disc_cert = ca.issue_cert("127.0.0.1")
    files = {}
    for label, cert in (("origin", origin_cert), ("disc", disc_cert)):
        files[label] = (str(d / f"{label}.pem"), str(d / f"{label}.key"))
        cert.cert_chain_pems[0].write_to_path(files[label][0])
        cert.private_key_pem.write_to_path(files[label][1])
    dns = FakeDns()
    for name in NAMES:
        dns.add(name, "CNAME", f"{name}.{PROXY_DOMAIN}" if name != "bad.test" else "elsewhere.test")
    procs = []
    try:
        origin = OriginProc(str(d), tls=files["origin"])
        procs.append(origin)
        fleet = [ProxyProc(str(d), str(d / f"proxy{i}-data"), name=f"proxy{i}") for i in range(3)]
        procs += fleet
        fleet_arg = ",".join(f"127.0.0.1:{p.ports['tunnel']}={p.fingerprint}" for p in fleet)
        ca_port, pin_port = free_port(), free_port()
        # Discovery with a CA-issued certificate and the original's CNAME check.
        disc_ca = ProxyProc(str(d), str(d / "disc-ca-data"), name="disc-ca", extra=[
            "--discovery-addr", f"127.0.0.1:{ca_port}", "--discovery-cert", files["disc"][0],
            "--discovery-key", files["disc"][1], "--fleet", fleet_arg,
            "--proxy-domain", PROXY_DOMAIN, "--dns-resolver", "%s:%d" % dns.address])
        procs.append(disc_ca)
        # Discovery on the proxy's own (self-signed) certificate: clients pin it.
        disc_pin = ProxyProc(str(d), str(d / "disc-pin-data"), name="disc-pin", extra=[
            "--discovery-addr", f"127.0.0.1:{pin_port}", "--fleet", fleet_arg])
        procs.append(disc_pin)
        wait_port(ca_port)
        wait_port(pin_port)
        yield dict(dir=d, ca_pem=ca_pem, fleet=fleet, origin=origin, dns=dns, net=tor_network,
                   ca_url=f"https://127.0.0.1:{ca_port}/proxies",
                   pin_url=f"https://127.0.0.1:{pin_port}/proxies", pin=disc_pin.fingerprint,
                   procs=procs)
    finally:
        for p in reversed(procs):
            p.stop()
        dns.stop()


def tor_client(world, name: str, extra: list[str]) -> ClientProc:
    c = ClientProc(str(world["dir"]), str(world["dir"] / f"client-{name}"),
                   [name, f"127.0.0.1:{world['origin'].port}"], proxies=[], tor="launch",
                   name=f"client-{name}",
                   extra=["--tor-config", world["net"].client_torrc_path, *extra])
    c.data_dir = world["dir"] / f"client-{name}"
    world["procs"].append(c)
    return c


def discovery_circuits(client: ClientProc) -> list:
    """Circuits of the client's tor carrying the isolation key "discovery" (SOCKS username):
    present only if the discovery request went through Tor."""
    with open(client.data_dir / "tor" / "control-port") as f:
        host, port = f.read().strip().split("=", 1)[1].rsplit(":", 1)
    with stem.control.Controller.from_port(host, int(port)) as c:
        c.authenticate()
        user = socks_credentials("discovery")[0]
        return [circ for circ in c.get_circuits() if circ.socks_username == user]


def bound_on(proxy: ProxyProc, name: str) -> int:
    return sum(b["tunnels"] for b in proxy.status()["bindings"] if b["name"] == name)


def get(world, proxy, name):
    ctx = ssl.create_default_context(cafile=world["ca_pem"])
    port = proxy.ports["https"]
    conn = http.client.HTTPConnection(name, port, timeout=30)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                server_hostname=name)
    conn.request("GET", "/hello")
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def test_discovery_with_ca_binds_all_three_pinned_by_json(world):
    client = tor_client(world, "disc.test", ["--discovery", world["ca_url"],
                                             "--discovery-ca", world["ca_pem"]])
    for p in world["fleet"]:
        p.wait_bound("disc.test", timeout=BIND_TIMEOUT)
    assert client.alive()
    log = client.log()
    assert "discovery (" + world["ca_url"] in log and log.count("(pinned)") == 3, log
    circuits = discovery_circuits(client)
    assert circuits and all(len(c.path) >= 3 for c in circuits), circuits
    for p in world["fleet"]:
        assert get(world, p, "disc.test") == (200, b"hello from origin\n")
    client.stop()


def test_discovery_pinned_server_and_count(world):
    client = tor_client(world, "pin.test", ["--discovery", world["pin_url"],
                                            "--discovery-pin", world["pin"], "--count", "2"])
    first, second, third = world["fleet"]
    first.wait_bound("pin.test", timeout=BIND_TIMEOUT)
    second.wait_bound("pin.test", timeout=BIND_TIMEOUT)
    assert bound_on(third, "pin.test") == 0  # --count 2: the first two of the answer only
    assert client.alive() and client.log().count("(pinned)") == 2
    client.stop()


def test_discovery_refuses_wrong_pin(world):
    client = tor_client(world, "pin.test", ["--discovery", world["pin_url"],
                                            "--discovery-pin", world["fleet"][0].fingerprint])
    assert client.p.wait(timeout=BIND_TIMEOUT) == 1
    assert "not the pinned" in client.log()


def test_cname_check_refuses_domain_not_pointing_at_proxy_domain(world):
    client = tor_client(world, "bad.test", ["--discovery", world["ca_url"],
                                            "--discovery-ca", world["ca_pem"]])
    assert client.p.wait(timeout=BIND_TIMEOUT) == 1
    log = client.log()
    assert "answered 403 for bad.test: bad.test is a CNAME for elsewhere.test, not " \
           "bad.test.proxy.test" in log, log
    assert all(bound_on(p, "bad.test") == 0 for p in world["fleet"])


def test_srv_over_tcp_through_tor(world, dns_server):
    srv_name = "_shroud._tls.srv.test"
    for i, p in enumerate(world["fleet"]):
        dns_server.add(srv_name, "SRV", (10 + i, 0, p.ports["tunnel"], "127.0.0.1"))
    client = tor_client(world, "srv.test", [
        "--srv", "--dns-resolver", "%s:%d" % dns_server.address,
        *[a for p in world["fleet"] for a in ("--pin", p.fingerprint)]])
    for p in world["fleet"]:
        p.wait_bound("srv.test", timeout=BIND_TIMEOUT)
    transports = [t for t, n, _ in dns_server.queries if n == srv_name]
    assert transports and set(transports) == {"tcp"}, dns_server.queries
    assert "SRV _shroud._tls.srv.test" in client.log()
    assert discovery_circuits(client), "the SRV lookup did not go through Tor"
    client.stop()
