"""Links between the hosts of a fleet (lib/proxy/hostlinks.py): proxies sharing the session's
PostgreSQL (tests/fixtures/postgres.py), each host wholly on its own loopback address (tunnel,
https, http, admin and fleet listeners on 127.0.0.2, .3, .4: the suite runs in a network
namespace with lo up). Real processes throughout: proxies, clients (`shroud.py --tor none`),
origins."""
import hashlib
import json
import signal
import socket
import ssl
import threading
import time

import pytest

from lib.certs import ensure_tunnel_cert
from lib.proxy.hostlinks import LINK_HEARTBEAT, LINK_TIMEOUT, LINK_TOLERANCE, OK, REFUSED
from tests.support.fleetlink import Link
from tests.support.procs import ADMIN_TOKEN, ClientProc, OriginProc, ProxyProc, free_port
from tests.support.visitor import http_get, https_get, tls_site, ws_echo, ws_upgrade
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(240)

BEAT = "0.5"  # fast fleet heartbeats: rows of a killed proxy expire in ~1.5 s
BIG = 100 * 1024 * 1024
VISITS = 20  # links from B to a two-worker A: all 20 on one worker has odds of 2 ** -19


@pytest.fixture
def fleet(tmp_path, pg_url):
    site = tls_site(tmp_path, "app.test")
    procs = [OriginProc(str(tmp_path), tls=(site.cert_pem, site.key_pem), name="tls-origin")]

    def start(name, host, extra=(), workers=None):
        """A proxy on the shared database, every listener on ``host`` (a loopback address);
        with ``workers``, gunicorn from the Procfile's config with WEB_CONCURRENCY=workers."""
        link = f"{host}:{free_port(host)}"
        env = {"SHROUD_DATABASE_URL": pg_url}
        if workers:
            env["WEB_CONCURRENCY"] = str(workers)
        p = ProxyProc(str(tmp_path), str(tmp_path / f"{name}-data"), name=name, host=host,
                      extra=["--fleet-heartbeat", BEAT, "--fleet-addr", link, *extra],
                      env=env, gunicorn=bool(workers))
        p.link = link
        procs.append(p)
        return p

    def origin(hello, proxy_protocol=False):
        o = OriginProc(str(tmp_path), name=f"origin-{hello}", hello=hello,
                       proxy_protocol=proxy_protocol)
        procs.append(o)
        return o

    def client(proxy, pairs, name, extra=()):
        # One key for every client: the names are its, whichever proxy it binds them on.
        c = ClientProc(str(tmp_path), str(tmp_path / "client-key"), pairs,
                       [f"{proxy.host}:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint],
                       name=name, extra=extra)
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


def _tls_served(fleet, proxy, name) -> bool:
    try:
        return https_get(fleet.site.ca_pem, proxy.ports["https"], name, addr=proxy.host)[0] == 200
    except OSError:  # ssl.SSLError too: unrecognized_name until the proxy knows the holder
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
    # (A writes each binding to the store at its next heartbeat: app.test may be a beat later.)
    wait_for(lambda: _tls_served(fleet, b, "app.test"), "app.test served at B", timeout=20)
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


def _link(addr, identity, peer_fingerprint, name="web.test", before_head=None,
          forwarded=True, kind="http"):
    """Speak the link protocol to ``addr`` as a sender would (tests/support/fleetlink.py), with
    ``identity`` ((cert, key) paths, or None: no client certificate) and the holder pinned to
    ``peer_fingerprint``: the holder's answer byte to one stream (b"" when it refused the
    handshake or closed the link). ``before_head``: called between the handshake and the
    stream (a link open while something changes)."""
    try:
        link = Link(addr, identity, peer_fingerprint)
    except OSError:  # ssl.SSLError too: TLS 1.3 shows a refused certificate at the read
        return b""
    try:
        if before_head is not None:
            before_head()
        return link.ask(name, forwarded, kind=kind)
    finally:
        link.close()


def _identity(data_dir):
    """(cert, key) paths of a proxy's tunnel certificate (made when missing: a stranger's)."""
    return ensure_tunnel_cert(str(data_dir))


def test_forged_links_are_refused_and_counted(fleet):
    """TLS client authentication with the store as trust anchor (lib/proxy/hostlinks.py): the
    holder serves only a link whose certificate a live instance registered."""
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    b_id = _identity(fleet.dir / "proxy-b-data")
    stranger = _identity(fleet.dir / "stranger")  # CN=shroud-proxy, as A's and B's

    def refused():
        return a.status()["refusals"].get("fleet_link_refused", 0)
    # The control: B's registered certificate is served (certificates sharing one subject).
    assert _link(a.link, b_id, a.fingerprint) == OK
    assert refused() == 0
    # No certificate; a certificate of no instance; B's, with a head that is not a link's.
    assert _link(a.link, None, a.fingerprint) == b""
    assert _link(a.link, stranger, a.fingerprint) == b""
    assert _link(a.link, b_id, a.fingerprint, forwarded=False) == b""
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

    # B gone (killed, its row expired): its certificate is stale, refused at the handshake
    # of a new link, and a link opened while B was live is closed (counted).
    def b_expired():
        b.signal(signal.SIGKILL)
        wait_for(lambda: _link(a.link, b_id, a.fingerprint) == b"",
                 "B's certificate refused at the handshake once B's row expired", timeout=20)
    assert _link(a.link, b_id, a.fingerprint, before_head=b_expired) == b""
    wait_for(lambda: refused() >= 6, "the stale links counted at A", timeout=10)


def test_a_link_carries_many_visitors_and_may_idle(fleet):
    """A link is kept open (lib/proxy/hostlinks.py): its first stream may come after
    LINK_TIMEOUT, it carries visitor after visitor, and links closed unused are not refused
    links."""
    import gevent
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    b_id = _identity(fleet.dir / "proxy-b-data")
    link = Link(a.link, b_id, a.fingerprint)
    try:
        gevent.sleep(LINK_TIMEOUT + 1)  # the stimulus: an idle link (heartbeats answered)
        for _ in range(5):
            answer, reply = link.ask_reply("web.test")
            assert answer == OK and reply.endswith(b"from-a\n"), (answer, reply)
    finally:
        link.close()
    for _ in range(3):
        Link(a.link, b_id, a.fingerprint).close()
    assert _link(a.link, b_id, a.fingerprint) == OK  # A saw every close by now
    assert a.status()["refusals"].get("fleet_link_refused", 0) == 0


class _CountingRelay:
    """A TCP relay on ``host`` to ``target`` ("host:port", set before the first connection),
    counting the connections it accepted: what a sender dialled. ``blackhole()`` makes the
    connections relayed so far drop every byte both ways, closing nothing (a link dead without
    a FIN, as behind a dead switch); later connections are relayed as usual."""

    def __init__(self, host: str):
        self.listener = socket.create_server((host, 0))
        self.addr = "%s:%d" % self.listener.getsockname()[:2]
        self.target = None
        self.accepted = 0
        self._dropping: list = []  # one Event per connection relayed: set, its bytes vanish
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        for dropping in self._dropping:
            dropping.set()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            host, port = self.target.rsplit(":", 1)
            try:
                up = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                conn.close()
                continue
            dropping = threading.Event()
            self._dropping.append(dropping)
            for src, dst in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(src, dst, dropping),
                                 daemon=True).start()

    @staticmethod
    def _pump(src, dst, dropping) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not dropping.is_set():
                    dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            src.close()
            dst.close()

    def close(self) -> None:
        self.listener.close()


def test_visitors_in_a_row_share_one_tls_link(fleet):
    """One long-lived link per (sender, holder) pair (lib/proxy/hostlinks.py): A advertises a
    relay that counts connections; 10 visitors at B, one after the other, all served by A over
    one TCP (TLS) connection, and B's and A's gauges say one link."""
    relay = _CountingRelay("127.0.0.2")
    try:
        a = fleet.start("proxy-a", "127.0.0.2", extra=["--fleet-advertise", relay.addr])
        relay.target = a.link
        b = fleet.start("proxy-b", "127.0.0.3")
        fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"],
                     "client-a")
        a.wait_bound("web.test")
        wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
        for _ in range(10):
            assert get(b, "web.test") == (200, b"from-a\n")
        assert relay.accepted == 1
        assert (b.status()["link_sessions_out"], a.status()["link_sessions_in"]) == (1, 1)
    finally:
        relay.close()


def _api(proxy, path):
    import http.client
    c = http.client.HTTPConnection(proxy.host, proxy.ports["admin"], timeout=10)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        r = c.getresponse()
        assert r.status == 200, (path, r.status)
        return json.loads(r.read())
    finally:
        c.close()


def test_a_forwarded_connection_counts_once_in_the_fleets_totals(fleet):
    """Accepted at B, served at A: one connection in the fleet's totals (B's), its bytes and
    its name's count at A, and forwarded_out at B = forwarded_in at A."""
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    answers = {"a": [], "b": []}

    def visit(at, key):
        answers[key].append(get(at, "web.test")[0])
        return answers[key][-1] == 200
    wait_for(lambda: visit(b, "b"), "web.test served at B", timeout=20)
    for _ in range(10):
        assert visit(b, "b")
    for _ in range(3):
        assert visit(a, "a")
    at_a, at_b = a.status(), b.status()
    forwarded = answers["b"].count(200)
    assert (at_a["connections"], at_a["forwarded_in"], at_a["forwarded_out"]) == (3, forwarded, 0)
    assert (at_b["connections"], at_b["forwarded_in"], at_b["forwarded_out"]) == (
        len(answers["b"]), 0, forwarded)
    assert at_b["bytes_in"] == at_b["bytes_out"] == 0  # the bytes count where they are served
    web = next(x for x in at_a["bindings"] if x["name"] == "web.test")
    assert web["connections"] == 3 + forwarded

    want = {"connections": 3 + len(answers["b"]), "forwarded_in": forwarded,
            "forwarded_out": forwarded, "bytes_in": at_a["bytes_in"],
            "bytes_out": at_a["bytes_out"]}

    def totals(proxy):
        t = _api(proxy, "/api/fleet")["totals"]
        return {k: t[k] for k in want}
    # The totals come from each instance's heartbeat: the same answer at A and at B.
    wait_for(lambda: totals(a) == want, "A's fleet totals count each connection once",
             timeout=20)
    wait_for(lambda: totals(b) == want, "B's fleet totals count each connection once",
             timeout=20)
    # /metrics carries them as their own series.
    import http.client
    c = http.client.HTTPConnection(b.host, b.ports["admin"], timeout=10)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    metrics = c.getresponse().read().decode()
    c.close()
    assert f'shroud_forwarded_connections_total{{direction="out"}} {forwarded}.0' in metrics


def _hold(proxy, name="web.test"):
    """A visitor holding a connection open through ``proxy``: a WebSocket to the origin."""
    sock = socket.create_connection((proxy.host, proxy.ports["http"]), timeout=10)
    head = ws_upgrade(sock, name)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_links_past_the_bound_are_refused_at_once_counted_and_freed(fleet):
    """--fleet-max-links 2 at the sender B and the holder A: a third visitor at B gets 503 from
    B (fleet_link_limit); a visitor at C, whose own bound is far, gets 503 because A answers
    BUSY (fleet_link_busy at A); once the held visitors leave, the links are free again."""
    a = fleet.start("proxy-a", "127.0.0.2", extra=["--fleet-max-links", "2"])
    b = fleet.start("proxy-b", "127.0.0.3", extra=["--fleet-max-links", "2"])
    c = fleet.start("proxy-c", "127.0.0.4")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test") and _served(c, "web.test"),
             "web.test served at B and C", timeout=20)

    held = [_hold(b), _hold(b)]
    try:
        assert (b.status()["links_out"], a.status()["links_in"]) == (2, 2)
        assert get(b, "web.test")[0] == 503           # B's own bound
        assert b.status()["refusals"].get("fleet_link_limit") == 1
        assert get(c, "web.test")[0] == 503           # A's bound: it answers BUSY
        assert a.status()["refusals"].get("fleet_link_busy") == 1
        assert c.status()["refusals"].get("fleet_link_limit") == 1
        assert ws_echo(held[0], b"still here") == b"still here"  # the held ones go on
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: (b.status()["links_out"], a.status()["links_in"]) == (0, 0),
             "the links are given back", timeout=20)
    assert get(b, "web.test") == (200, b"from-a\n")
    assert get(c, "web.test") == (200, b"from-a\n")


def test_a_link_landing_on_the_worker_without_the_name_is_relayed_to_its_holder(fleet):
    """A under gunicorn with two workers, its one tunnel on one of them; both listen on the
    fleet port (SO_REUSEPORT), so a link lands on either: B's one link on one of them (every
    visitor served, by Host and by SNI), and of VISITS new links from here about half on the
    other worker, which relays each stream to the holder (routing.take_linked)."""
    a = fleet.start("proxy-a", "127.0.0.2", workers=2)
    b = fleet.start("proxy-b", "127.0.0.3")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}",
                     "app.test", f"127.0.0.1:{fleet.tls_origin.port}"], "client-a")
    a.wait_bound("web.test")
    a.wait_bound("app.test")
    wait_for(lambda: len(a.status()["workers"]) == 2 and all(
        w["bindings"] + w["names_elsewhere"] >= 2 for w in a.status()["workers"]),
        "both of A's workers know the names", timeout=30)
    assert len([w for w in a.status()["workers"] if w["tunnels"]]) == 1
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    # Both names: B may learn them from the store in two looks (its watcher backs off when idle).
    wait_for(lambda: _tls_served(fleet, b, "app.test"), "app.test served at B", timeout=20)
    before = a.status()["forwarded_in"]
    with open(fleet.site.cert_pem) as f:
        origin_der = ssl.PEM_cert_to_DER_cert(f.read())
    for _ in range(VISITS):
        assert get(b, "web.test") == (200, b"from-a\n"), a.status()["workers"]
        status, _, der = https_get(fleet.site.ca_pem, b.ports["https"], "app.test",
                                   addr=b.host)
        assert (status, der) == (200, origin_der)
    b_id = _identity(fleet.dir / "proxy-b-data")
    for _ in range(VISITS):
        link = Link(a.link, b_id, a.fingerprint)
        try:
            answer, reply = link.ask_reply("web.test")
        finally:
            link.close()
        assert answer == OK and reply.endswith(b"from-a\n"), (answer, reply)
    workers = a.status()["workers"]
    # Links landed on both workers: the one without the tunnel handed them to its sibling.
    assert sum(w["handoffs"].get("taken", 0) for w in workers) > 0, workers
    assert a.status()["forwarded_in"] - before == 3 * VISITS


def test_the_visitors_address_reaches_the_origin_through_a_link(fleet):
    """The origin behind A's tunnel reads a PROXY header (the client's --proxy-protocol v1)
    naming the visitor who reached B, from its own address, and B's listener: not the link's
    ends."""
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    pp = fleet.origin("pp", proxy_protocol=True)
    fleet.client(a, ["http:pp.test", f"127.0.0.1:{pp.port}"], "client-pp",
                 extra=["--proxy-protocol", "v1"])
    a.wait_bound("pp.test")
    wait_for(lambda: _served(b, "pp.test"), "pp.test served at B", timeout=20)
    import http.client
    c = http.client.HTTPConnection(b.host, b.ports["http"], timeout=10,
                                   source_address=("127.0.0.9", 0))
    c.connect()
    port = c.sock.getsockname()[1]
    c.request("GET", "/peer", headers={"Host": "pp.test"})
    info = json.loads(c.getresponse().read())
    c.close()
    assert info["proxy_header"] == f"PROXY TCP4 127.0.0.9 127.0.0.3 {port} {b.ports['http']}\r\n"


def test_a_linked_connection_is_never_forwarded_again(fleet):
    """At most one link: B, asked over a link for a name only C holds, refuses it (the sender
    tries its next holder) rather than carry it on to C, though B itself forwards visitors
    for that name to C."""
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    c = fleet.start("proxy-c", "127.0.0.4")
    fleet.client(c, ["http:web.test", f"127.0.0.1:{fleet.origin('from-c').port}"], "client-c")
    c.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test"), "web.test served at B, by C", timeout=20)
    before_b, before_c = b.status(), c.status()
    assert _link(b.link, _identity(fleet.dir / "proxy-a-data"), b.fingerprint,
                 name="web.test") == REFUSED
    after_b, after_c = b.status(), c.status()
    assert after_b["forwarded_out"] == before_b["forwarded_out"]
    assert after_c["forwarded_in"] == before_c["forwarded_in"]
    assert after_b["refusals"].get("fleet_link_refused", 0) == 0  # a refusal, not a forgery


def test_a_hung_holder_costs_a_visitor_a_second_then_a_clear_error(fleet):
    """Heartbeats every 5 s (rows live 15-20 s): A and C hold web.test; A hangs (SIGSTOP).
    Visitors at B are served by C (A gets ATTEMPT_TIMEOUT of their wait, then is tried last);
    with C hung too, a visitor gets 502 (fleet_link_failed), not a hang; once the rows expire
    the name is unknown at B (404)."""
    slow = ["--fleet-heartbeat", "5"]
    a = fleet.start("proxy-a", "127.0.0.2", extra=slow)
    b = fleet.start("proxy-b", "127.0.0.3", extra=slow)
    c = fleet.start("proxy-c", "127.0.0.4", extra=slow)
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    fleet.client(c, ["http:web.test", f"127.0.0.1:{fleet.origin('from-c').port}"], "client-c")
    a.wait_bound("web.test")
    c.wait_bound("web.test")
    seen = set()

    def both_seen():
        status, body = get(b, "web.test")
        seen.add(body if status == 200 else status)
        return {b"from-a\n", b"from-c\n"} <= seen
    wait_for(both_seen, "B forwards to both holders", timeout=30)
    try:
        a.signal(signal.SIGSTOP)
        for _ in range(10):
            assert get(b, "web.test") == (200, b"from-c\n")
        c.signal(signal.SIGSTOP)
        status, body = get(b, "web.test", timeout=10)  # 1 s for each holder, then the answer
        assert (status, body) == (502, b"The tunnel is down.\n")
        assert b.status()["refusals"].get("fleet_link_failed", 0) >= 1
        wait_for(lambda: get(b, "web.test")[0] == 404, "A's and C's rows expired at B",
                 timeout=40)
    finally:
        for p in (a, c):
            p.signal(signal.SIGKILL)


class _Strangers:
    """``n`` TCP connections from ``source`` to ``addr`` held open in their handshake (no byte
    sent), each reopened when the holder closes it: no key, only an address on the network."""

    def __init__(self, addr: str, n: int, source: str = "127.0.0.9"):
        import threading
        host, port = addr.rsplit(":", 1)
        self.target, self.source = (host, int(port)), source
        self.stop = threading.Event()
        self.opened = 0
        self.threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _hold(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection(self.target, timeout=2,
                                              source_address=(self.source, 0)) as s:
                    self.opened += 1
                    s.settimeout(1)
                    while not self.stop.is_set():
                        try:
                            if not s.recv(100):
                                break  # closed by the holder: open the next
                        except socket.timeout:
                            continue
            except OSError:
                self.stop.wait(0.05)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


def test_strangers_holding_handshakes_open_do_not_starve_the_links(fleet):
    """Anyone who can reach --fleet-addr can open TCP connections and send nothing: each sat in
    the holder's link pool for its handshake's LINK_TIMEOUT, so max_links + BUSY_ANSWERS of
    them (renewed every 3 s) stopped A accepting links at all, and visitors at B got 502.
    Handshakes have slots of their own (MAX_HANDSHAKES, the oldest closed past them)."""
    from lib.proxy.hostlinks import BUSY_ANSWERS, MAX_HANDSHAKES
    a = fleet.start("proxy-a", "127.0.0.2", extra=["--fleet-max-links", "2"])
    b = fleet.start("proxy-b", "127.0.0.3")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    n = max(2 + BUSY_ANSWERS, MAX_HANDSHAKES) + 40  # past the old pool and the new slots
    strangers = _Strangers(a.link, n)
    try:
        wait_for(lambda: strangers.opened >= n, f"{n} strangers' connections at A", timeout=30)
        # B's link (opened before) serves the first visitors; its dead-link re-dial would
        # need a handshake among the strangers'.
        answers = [get(b, "web.test")[0] for _ in range(6)]
    finally:
        strangers.close()
    assert answers == [200] * 6, (answers, b.status()["refusals"])
    assert "Traceback" not in a.log(), a.log()[-3000:]


def test_a_link_carries_http_or_tls_only(fleet):
    """The holder's table: a head of an unknown kind closes the link (fleet_link_refused). A
    sender never sends tcp:PORT (a port means nothing on another host); the holder served a
    head of kind "tcp" by its own tcp:PORT binding, and refused an unknown kind with REFUSED
    (bad_handed_header) instead of closing the link."""
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3")
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    b_id = _identity(fleet.dir / "proxy-b-data")
    assert _link(a.link, b_id, a.fingerprint) == OK  # the control
    for kind in ("tcp", "smtp", None):
        assert _link(a.link, b_id, a.fingerprint, name=str(a.ports["http"]), kind=kind) == b""
    wait_for(lambda: a.status()["refusals"].get("fleet_link_refused", 0) == 3,
             "3 refused links counted at A", timeout=10)


def test_a_visitor_silent_after_its_answer_gives_its_link_back(fleet):
    """A visitor at B for a name held on A reads its answer, gets the end of it (FIN), and then
    neither sends nor closes. B's splice of it with the link waited on the visitor without the
    idle timeout (every other public connection has one), so each such visitor held one of B's
    --fleet-max-links for good: two of them and B answered 503 to everyone for names held
    elsewhere. Now B's link (and the visitor) end after --idle-timeout of silence."""
    a = fleet.start("proxy-a", "127.0.0.2")
    b = fleet.start("proxy-b", "127.0.0.3",
                    extra=["--fleet-max-links", "2", "--idle-timeout", "2"])
    fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"], "client-a")
    a.wait_bound("web.test")
    wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
    silent = []
    try:
        for _ in range(2):
            sock = socket.create_connection((b.host, b.ports["http"]), timeout=10)
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: web.test\r\n\r\n")
            answer = b""
            while True:  # to the end of the answer: B passes A's FIN on
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"from-a\n")
            silent.append(sock)  # and now: silence, never a close
        wait_for(lambda: b.status()["links_out"] == 0,
                 "B's links given back after --idle-timeout", timeout=30)
        assert get(b, "web.test") == (200, b"from-a\n")
    finally:
        for sock in silent:
            sock.close()


def test_a_link_unused_for_fleet_link_idle_is_closed_and_redialled(fleet):
    """--fleet-link-idle: B (the sender) closes its link to A once no visitor used it for that
    long (counted link_idle_closes; A sees its end), never while a visitor is on it, and the
    next visitor at B dials a new one through A's counting relay and is served."""
    relay = _CountingRelay("127.0.0.2")
    try:
        a = fleet.start("proxy-a", "127.0.0.2", extra=["--fleet-advertise", relay.addr])
        relay.target = a.link
        b = fleet.start("proxy-b", "127.0.0.3", extra=["--fleet-link-idle", "2"])
        web = fleet.origin("from-a")
        fleet.client(a, ["http:web.test", f"127.0.0.1:{web.port}"], "client-a")
        a.wait_bound("web.test")
        wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
        assert relay.accepted == 1
        # A visitor on the link (a WebSocket, silent) for twice the idle time keeps it.
        ws = socket.create_connection((b.host, b.ports["http"]), timeout=30)
        try:
            assert b" 101 " in ws_upgrade(ws, "web.test")
            time.sleep(2 * 2 + 1)  # the stimulus: a link with a visitor, past --fleet-link-idle
            assert ws_echo(ws, b"still here") == b"still here"
        finally:
            ws.close()
        assert (b.status()["link_idle_closes"], relay.accepted) == (0, 1)
        # Unused: closed at both ends, counted at the sender only.
        wait_for(lambda: b.status()["link_sessions_out"] == 0, "B closed its idle link",
                 timeout=20)
        wait_for(lambda: a.status()["link_sessions_in"] == 0, "A saw the link end", timeout=20)
        assert (b.status()["link_idle_closes"], a.status()["link_idle_closes"]) == (1, 0)
        assert a.status()["refusals"].get("fleet_link_refused", 0) == 0
        assert get(b, "web.test") == (200, b"from-a\n")
        assert relay.accepted == 2 and b.status()["link_sessions_out"] == 1
    finally:
        relay.close()


def test_a_link_dead_without_a_fin_is_noticed_by_its_heartbeat_and_redialled(fleet):
    """The link from B to A goes dead with nothing closed (A's relay drops its bytes both ways;
    A itself and its rows stay live, so only the heartbeat can tell): B notices once silent
    past LINK_HEARTBEAT + LINK_TOLERANCE, checked each LINK_HEARTBEAT, so within 7 s of the
    last echo (the deadline is twice that; nothing else ever closes such a link: the relay
    takes every byte), so does A, and the next visitor at B dials a new link and is served,
    with no failure counted."""
    relay = _CountingRelay("127.0.0.2")
    try:
        a = fleet.start("proxy-a", "127.0.0.2", extra=["--fleet-advertise", relay.addr])
        relay.target = a.link
        b = fleet.start("proxy-b", "127.0.0.3")
        fleet.client(a, ["http:web.test", f"127.0.0.1:{fleet.origin('from-a').port}"],
                     "client-a")
        a.wait_bound("web.test")
        wait_for(lambda: _served(b, "web.test"), "web.test served at B", timeout=20)
        assert relay.accepted == 1 and b.status()["link_sessions_out"] == 1
        relay.blackhole()
        bound = LINK_HEARTBEAT + LINK_TOLERANCE + LINK_HEARTBEAT  # silence, then one check
        started = time.monotonic()
        wait_for(lambda: b.status()["link_sessions_out"] == 0,
                 "B's heartbeat closed the silent link", timeout=2 * bound, interval=0.05)
        print(f"B noticed the dead link after {time.monotonic() - started:.1f} s "
              f"(bound {bound:g} s)")
        wait_for(lambda: a.status()["link_sessions_in"] == 0, "A closed its end too",
                 timeout=2 * bound)
        assert get(b, "web.test") == (200, b"from-a\n")
        assert relay.accepted == 2 and b.status()["link_sessions_out"] == 1
        refusals = b.status()["refusals"]
        assert refusals.get("fleet_link_failed", 0) == 0, refusals
    finally:
        relay.close()
