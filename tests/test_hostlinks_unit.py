"""lib/proxy/hostlinks.py alone: the holder trusts exactly the certificates the live instances
registered (a stand-in store; real TLS on loopback, in-process under gevent)."""
import time

import gevent
import pytest

from lib.certs import cert_fingerprint, ensure_tunnel_cert, leaf_pem
from lib.proxy.hostlinks import REFUSED, FleetLinks
from lib.proxy.registry import Registry
from lib.proxy.store.base import Instance, LiveBinding
from lib.proxy.workers import Refused
from tests.support.fleetlink import ask


class Rows:
    """The store as FleetLinks reads it: instance rows, no bindings."""

    def __init__(self):
        self.rows = []

    def instances(self):
        return list(self.rows)

    def live_bindings(self):
        return []


def _row(name, cert_path, fingerprint=None, heartbeat=None):
    return Instance(name, name, {}, "127.0.0.1:1", fingerprint or cert_fingerprint(cert_path),
                    0.0, time.time() if heartbeat is None else heartbeat, {},
                    leaf_pem(cert_path))


@pytest.fixture
def holder(tmp_path):
    ids = {n: ensure_tunnel_cert(str(tmp_path / n)) for n in ("a", "b", "c", "stranger")}
    store, registry = Rows(), Registry()
    links = FleetLinks(store, registry, lambda header, peeked: Refused("unknown_name"),
                       *ids["a"], cert_fingerprint(ids["a"][0]), ("127.0.0.1", 0))
    links.start()
    yield links, store, registry, ids
    links.stop()


def _ask(links, identity) -> bytes:
    """A link from ``identity`` ((cert, key) paths), one stream: the holder's answer byte, b""
    when it refused the handshake or closed the link."""
    return ask("%s:%d" % links.address, identity)


def test_the_holder_trusts_exactly_the_live_rows_certificates(holder):
    links, store, registry, ids = holder
    stale = time.time() - 3600
    store.rows = [_row("a", ids["a"][0]), _row("b", ids["b"][0]),
                  _row("old", ids["stranger"][0], heartbeat=stale),  # expired: not trusted
                  _row("c", ids["c"][0], fingerprint=cert_fingerprint(ids["b"][0]))]
    links.refresh()
    # B's row: trusted (the holder answers: no live tunnel here). Every certificate shares
    # one subject (CN=shroud-proxy), so OpenSSL's issuer lookup by name would pick any of them.
    assert _ask(links, ids["b"]) == REFUSED
    assert _ask(links, ids["a"]) == REFUSED  # a sibling worker shares this instance's cert
    # A stranger; an expired row's certificate; C's certificate in a row whose fingerprint is
    # B's (the row is inconsistent: its certificate is left out).
    assert _ask(links, ids["stranger"]) == b""
    assert _ask(links, ids["c"]) == b""
    # B's row gone: the context is rebuilt without its certificate.
    deadline = time.monotonic() + 10
    while links.registry.link_sessions_in and time.monotonic() < deadline:
        gevent.sleep(0.01)  # the holder saw our links close (else refresh closes them)
    store.rows = store.rows[:1]
    links.refresh()
    assert _ask(links, ids["b"]) == b""
    assert registry.refusals["fleet_link_refused"] == 3


def test_links_past_the_bound_per_certificate_close_the_oldest(holder, monkeypatch):
    """A fleet member re-dialling in a loop holds at most SESSIONS_PER_PEER links at the holder
    (lib/proxy/hostlinks.py): past it the oldest is closed, the newest serve."""
    import lib.proxy.hostlinks as hostlinks
    from tests.support.fleetlink import Link
    links, store, registry, ids = holder
    monkeypatch.setattr(hostlinks, "SESSIONS_PER_PEER", 2)
    store.rows = [_row("a", ids["a"][0]), _row("b", ids["b"][0])]
    links.refresh()
    addr = "%s:%d" % links.address
    opened = []
    try:
        for _ in range(4):
            opened.append(Link(addr, ids["b"]))
            assert opened[-1].ask() == REFUSED  # served (no tunnel here): the link is up
        deadline = time.monotonic() + 10
        while [x.session.closed for x in opened] != [True, True, False, False] and (
                time.monotonic() < deadline):
            gevent.sleep(0.01)  # the holder's close reaches our side
        assert [link.session.closed for link in opened] == [True, True, False, False]
        assert registry.link_sessions_in == 2
        assert [link.ask() for link in opened] == [b"", b"", REFUSED, REFUSED]
    finally:
        for link in opened:
            link.close()


class Fleet2(Rows):
    """Two instances' rows, their heartbeats always fresh, and ``a`` holding web.test."""

    def instances(self):
        return [r._replace(heartbeat=time.time()) for r in self.rows]

    def live_bindings(self):
        return [LiveBinding("a", "http", "web.test", 1, "", 0.0)]


def test_a_link_closed_under_a_visitor_is_redialled_for_it(tmp_path):
    """B's link to A was closed by A (here: B's row left A's view, and came back) and B has not
    read the close yet when the next visitor comes: that visitor's stream fails before any
    answer, and B dials a new link for it instead of answering 502 (lib/proxy/hostlinks.py)."""
    import gevent.socket
    from lib.proxy.workers import TAKEN
    ids = {n: ensure_tunnel_cert(str(tmp_path / n)) for n in ("a", "b")}
    store = Fleet2()

    def take(header, peeked):
        def run(sock):
            sock.sendall(b"served " + peeked)
            sock.close()
        return run
    a = FleetLinks(store, Registry(), take, *ids["a"], cert_fingerprint(ids["a"][0]),
                   ("127.0.0.1", 0))
    b = FleetLinks(store, Registry(), take, *ids["b"], cert_fingerprint(ids["b"][0]),
                   ("127.0.0.1", 0))
    a.self_id, b.self_id = "a", "b"
    a.start()
    b.start()
    try:
        rows = [_row("a", ids["a"][0])._replace(fleet_addr="127.0.0.1:%d" % a.address[1]),
                _row("b", ids["b"][0])._replace(fleet_addr="127.0.0.1:%d" % b.address[1])]

        def visit():
            mine, theirs = gevent.socket.socketpair()
            g = gevent.spawn(b.send, mine, {"kind": "http", "name": "web.test",
                                            "client": ["10.0.0.1", 1]}, b"GET", ["http"])
            g.link(lambda _: mine.close())  # not TAKEN: nobody else closes it
            theirs.settimeout(10)
            got = theirs.recv(100)
            theirs.close()
            return got, g.get(timeout=10)
        store.rows = rows
        a.refresh()
        b.refresh()
        assert visit() == (b"served GET", TAKEN)
        assert (b.registry.link_sessions_out, a.registry.link_sessions_in) == (1, 1)
        store.rows = rows[:1]
        a.refresh()  # closes B's link at A (counted)
        store.rows = rows
        a.refresh()
        assert visit() == (b"served GET", TAKEN)  # no yield since: B had not seen the close
        assert a.registry.refusals["fleet_link_refused"] == 1
    finally:
        a.stop()
        b.stop()
