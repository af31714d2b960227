"""Issue 11's proxy-routing items, attacked on the wire against a real proxy and client.

- Item 5: the proxy's own names (its --hostname), IP literals, localhost and names under
  .localhost or .onion cannot be bound by anyone (a name's owner passes ACME for it); public
  requests for them never reach a tunnel, and no ownership is recorded for them.
- Item 11: the per-key tunnel cap counts tunnels at Auth: authenticating many tunnels for one
  key before binding any leaves at most the cap open.
- Code-read: a tcp:PORT listener closes when its last binding goes.
"""
from __future__ import annotations

import socket

import pytest

from lib.errors import MuxError
from lib.identity import Identity
from lib.protocol import messages as msg
from tests.support.procs import ClientProc, OriginProc, ProxyProc, free_port
from tests.support.rawtunnel import RawTunnel
from tests.support.visitor import http_get
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(180)

PROXY_NAME = "proxy.test"
CAP = 8  # --max-tunnels-per-key's default


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    origin = OriginProc(str(d))
    tcp_port = free_port()
    proxy = ProxyProc(str(d), str(d / "proxy-data"),
                      extra=["--hostname", PROXY_NAME, "--tcp-ports", str(tcp_port)])
    try:
        yield dict(dir=d, origin=origin, proxy=proxy, tcp_port=tcp_port)
    finally:
        proxy.stop()
        origin.stop()


RESERVED = ["http:" + PROXY_NAME, PROXY_NAME, "http:127.0.0.1", "http:localhost",
            "http:[::1]", "http:app.localhost", "http:abcdefghijklmnop.onion", "http:127.1",
            "*.localhost"]


def test_the_proxys_own_names_and_addresses_cannot_be_bound(world, tmp_path):
    proxy, origin = world["proxy"], world["origin"]
    pairs = []
    for name in RESERVED + ["http:fine.test"]:
        pairs += [name, f"127.0.0.1:{origin.port}"]
    client = ClientProc(str(tmp_path), str(tmp_path / "squatter"), pairs,
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    try:
        proxy.wait_bound("fine.test")
        wait_for(lambda: client.log().count("is reserved") >= len(RESERVED), timeout=20,
                 what=f"{len(RESERVED)} refusals in the client's log:\n{client.log()[-3000:]}")
        st = proxy.status()
        assert [b["name"] for b in st["bindings"]] == ["fine.test"], st["bindings"]
        assert st["refusals"].get("reserved_name", 0) >= len(RESERVED)
        # Public requests for them reach no tunnel: the proxy's own answer.
        for host in (PROXY_NAME, "127.0.0.1", "localhost", "[::1]", "app.localhost"):
            status, body = http_get(proxy.ports["http"], host)
            assert status in (404, 421) and b"hello from origin" not in body, (host, body)
        # ... and nobody owns them: a second key may not bind them either, for the same
        # reason (not because the first one's claim was recorded).
        raw = RawTunnel(proxy, Identity.load_or_create(str(tmp_path / "second")))
        try:
            raw.auth()
            resp = raw.bind("localhost")
            assert resp.error and resp.reason == "reserved", resp
        finally:
            raw.close()
    finally:
        client.stop()


def test_tunnels_per_key_are_capped_where_the_key_is_proven(world, tmp_path):
    """Authenticating every tunnel before binding any used to give 40 tunnels for one key:
    the cap holds at the first signed bind, so at most CAP of them prove the key and bind."""
    proxy = world["proxy"]
    identity = Identity.load_or_create(str(tmp_path / "many"))
    tunnels, bound = [], 0
    try:
        for _ in range(5 * CAP):
            t = RawTunnel(proxy, identity)
            tunnels.append(t)
            try:
                resp = t.send(msg.Auth(extra=msg.auth_extra(identity.public_key)))
            except (MuxError, EOFError, OSError):
                continue  # closed by the proxy: not a tunnel
            t.nonce = None if resp.error else resp.nonce
        for i, t in enumerate(tunnels):
            if t.nonce is None or t.session.closed:
                continue
            try:
                if not t.bind(f"n{i}.many.test").error:
                    bound += 1
            except (MuxError, EOFError, OSError):
                continue  # a tunnel the proxy closed: not bound
        live = [x for x in proxy.status()["tunnels"]
                if x["key"] == identity.fingerprint and x["key_proven"]]
        assert bound <= CAP and len(live) <= CAP, (bound, len(live))
        assert bound >= 1  # the cap is not a ban
    finally:
        for t in tunnels:
            t.close()


def test_tcp_listener_closes_after_its_last_binding(world, tmp_path):
    proxy, port = world["proxy"], world["tcp_port"]
    client = ClientProc(str(tmp_path), str(tmp_path / "tcp"),
                        [f"tcp:{port}", f"127.0.0.1:{world['origin'].port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                        name="tcp-client")
    try:
        proxy.wait_bound(f"tcp:{port}")
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        client.stop()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False
    wait_for(refused, timeout=20, what=f"the tcp:{port} listener to close")
    # A later bind of the port opens it again.
    again = ClientProc(str(tmp_path), str(tmp_path / "tcp"),
                       [f"tcp:{port}", f"127.0.0.1:{world['origin'].port}"],
                       [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                       name="tcp-client-again")
    try:
        proxy.wait_bound(f"tcp:{port}")
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.close()
    finally:
        again.stop()
