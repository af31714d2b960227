"""lib.proxy.routing units with stand-ins for sockets and tunnels (this module only: the real
router runs against real processes in tests/test_e2e_proxy.py and tests/test_e2e_hardening.py).

- peek_name feeds each read to an incremental sniffer: a hello in 1-byte records, one record
  per read, costs work linear in the bytes (issue 11 item 12; bench/sniff_cpu.py measures it).
- The per-tunnel stream limit holds for connections that pass the check at once, while the
  first stream's StartProxy is still being written (issue 11, code-read).
- A handed connection's header (a sibling's, a fleet link's) whose client is not [HOST, PORT] by
  lib.hostport's rules is refused, counted and logged rate-limited, never raised.
"""
from __future__ import annotations

import types
from collections import Counter

import gevent
import pytest

from lib.protocol import sniff
from tests.support.sniffwork import count_records_opened
from lib.proxy import routing
from lib.proxy.registry import ROUTE_BY_HOST, RateHistory, Registry
from lib.proxy.server import ProxyConfig


class Reads:
    """A socket whose recv returns the given pieces, one per call, then EOF."""

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.timeout = None

    def gettimeout(self):
        return self.timeout

    def settimeout(self, t):
        self.timeout = t

    def recv(self, n):
        return self.pieces.pop(0) if self.pieces else b""


def test_peek_name_work_is_linear_in_tiny_records(monkeypatch):
    calls = count_records_opened(monkeypatch)
    n = sniff.MAX_TLS_PEEK // 6  # 1-byte records up to the peek bound
    hello = b"\x01" + (n - 4).to_bytes(3, "big") + b"\x03\x03" + b"\x00" * (n - 6)
    records = [b"\x16\x03\x01\x00\x01" + hello[i:i + 1] for i in range(n)]
    with pytest.raises(sniff.SniffError):  # the body is no ClientHello: refused at its end
        routing.peek_name(Reads(records), sniff.TLSNameSniffer, timeout=60)
    # Re-sniffing the whole buffer after each read checked ~n^2/2 = 5.8 M record headers.
    assert 0 < len(calls) <= 2 * n


def test_peek_name_returns_every_byte_read():
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\nbody"
    name, peeked = routing.peek_name(Reads([head[i:i + 3] for i in range(0, len(head), 3)]),
                                     sniff.HTTPHostSniffer, timeout=5)
    end = head.index(b"\r\n\r\n") + 4
    assert name == "a.test" and head.startswith(peeked) and len(peeked) >= end


class SlowStream:
    """A stream whose sendall yields, as a mux stream's does while the writer is busy."""
    id = 1

    def sendall(self, data):
        gevent.sleep(0.01)

    def send_nowait(self, data):
        return 0  # no room now: what is left goes by sendall, which yields

    def reset(self, code=None):
        pass


class Tunnel:
    def __init__(self):
        self.id, self.key, self.streams_open, self.streams_total = 1, None, 0, 0
        self.bytes_in = self.bytes_out = 0
        self.meters = {}  # Registry.meter keeps the pair's counters here
        self.bindings = set()  # ... while the binding is one of these
        self.session = types.SimpleNamespace(open=SlowStream)


class Binding:
    def __init__(self, tunnel):
        self.url, self.name, self.connections = "http://a.test", "a.test", 0
        self.tunnels = [tunnel]
        tunnel.bindings.add(self)  # as Registry.bind
        self.refusals = Counter()
        self.bytes_in = self.bytes_out = 0  # a Meter counts into them directly
        self.history = RateHistory()

    def pick(self):
        return self.tunnels[0]

    def count(self, n_in=0, n_out=0):
        pass


class Public:
    def __init__(self):
        self.answer = b""

    def sendall(self, data):
        self.answer += data

    def settimeout(self, t):
        pass

    def close(self):
        pass

    def getsockname(self):
        return ("127.0.0.1", 80)


def test_stream_limit_holds_while_start_proxy_is_being_written(monkeypatch):
    limit = 4
    config = ProxyConfig(max_streams_per_tunnel=limit, idle_timeout=None)
    router = routing.PublicRouter(config, Registry())
    tunnel = Tunnel()
    binding = Binding(tunnel)
    forwarded = []
    monkeypatch.setattr(routing, "splice", lambda a, b, **kw: forwarded.append(b) or
                        gevent.sleep(0.05) or (0, 0))

    def visitor():
        sock = Public()
        router.forward(sock, ("127.0.0.1", 1), router.choose_tunnel(binding), b"", None, "http")
        return sock.answer
    answers = [g.get(timeout=10) for g in [gevent.spawn(visitor) for _ in range(3 * limit)]]
    assert len(forwarded) == limit
    assert sum(a.startswith(b"HTTP/1.0 503") for a in answers) == 2 * limit
    assert tunnel.streams_open == 0


class LiveSession:
    closed = False


@pytest.mark.parametrize("client", [
    ["1.2.3.4", "x"], ["1.2.3.4", 70000], ["1.2.3.4", -1], ["1.2.3.4", True], ["1.2.3.4", 80.5],
    ["a b", 80], ["2001:db8::1::2", 80], [None, 80], "1.2.3.4:80", ["1.2.3.4"], None,
])
def test_a_handed_header_with_a_bad_client_is_refused_counted_and_logged_rate_limited(
        client, caplog):
    """A sibling's (or a fleet link's) header whose client is not [HOST, PORT] by
    lib.hostport's rules is refused ("bad header"), never raised out of take_handed."""
    registry = Registry()
    router = routing.PublicRouter(ProxyConfig(), registry)
    tunnel = registry.add_tunnel(LiveSession(), "127.0.0.1:5", None, "c" * 32)
    registry.bind(tunnel, "http", "a.test", None, "tofu", "http://a.test")
    header = {"kind": "http", "name": "a.test", "client": client}
    lines = router.peer_log.lines
    with caplog.at_level("WARNING", logger="shroud.proxy"):
        for _ in range(3 * lines):
            assert router.take_handed(header, b"") == routing.Refused("bad header")
    assert registry.refusals["bad_handed_header"] == 3 * lines
    said = [r.getMessage() for r in caplog.records if "handed connection" in r.getMessage()]
    assert len(said) == lines and "handed connection's client" in said[0], said[:2]


@pytest.mark.parametrize("client,address", [
    (["1.2.3.4", 80], ("1.2.3.4", 80)), (["2001:db8::1", 443], ("2001:db8::1", 443)),
    (["203.0.113.9", 0], ("203.0.113.9", 0)),  # one-port mode's X-Forwarded-For visitor
])
def test_a_handed_header_with_a_good_client_is_taken(client, address):
    assert routing.handed_client(client) == address
    registry = Registry()
    router = routing.PublicRouter(ProxyConfig(), registry)
    tunnel = registry.add_tunnel(LiveSession(), "127.0.0.1:5", None, "c" * 32)
    registry.bind(tunnel, "http", "a.test", None, "tofu", "http://a.test")
    assert callable(router.take_handed({"kind": "http", "name": "a.test", "client": client}, b""))
    assert not registry.refusals


def test_peek_deadline_is_for_all_reads_and_the_socket_timeout_comes_back():
    # The deadline is the socket's timeout, reset to what is left before each read: a peer
    # sending a byte now and then cannot stretch it, and the socket leaves the peek with the
    # timeout it had (None: a splice with --idle-timeout 0 relies on it).
    import gevent.socket as gsocket

    ours, peer = gsocket.socketpair()
    trickle = gevent.spawn(lambda: [(peer.sendall(b"G"), gevent.sleep(0.05)) for _ in range(200)])
    try:
        with gevent.Timeout(5, AssertionError("the peek deadline was stretched")):
            with pytest.raises(routing.PeekTimeout):
                routing.peek_name(ours, sniff.HTTPHostSniffer, timeout=0.3)
        assert ours.gettimeout() is None
    finally:
        trickle.kill()
        ours.close()
        peer.close()
    ours, peer = gsocket.socketpair()
    with ours, peer:
        peer.sendall(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
        name, _ = routing.peek_name(ours, sniff.HTTPHostSniffer, timeout=5)
        assert name == "b.test" and ours.gettimeout() is None


def route_a_post(monkeypatch, router, binding, head: bytes) -> None:
    """A visitor sends ``head``, a 2-byte body "ok" and the start of a next request; the router
    routes it by Host to ``binding``'s tunnel (what it answers the visitor is dropped)."""
    monkeypatch.setattr(router, "choose", lambda *a: router.choose_tunnel(binding))

    class Visitor(Reads):
        def sendall(self, data):
            pass
    router.route(Visitor([head, b"ok", b"GET /next HTTP/1.1\r\n"]), ("127.0.0.1", 1), "http",
                 sniff.HTTPHostSniffer, ROUTE_BY_HOST)


def test_a_routed_exchange_reads_its_head_once(monkeypatch):
    """The head the sniffer read (lib.protocol.httphead) is the one the exchange frames from
    (lib.net.httpexchange): parsed once per connection, where it was three times with h11."""
    from lib.protocol import httphead
    parsed = []
    parse = httphead.parse_request_head
    monkeypatch.setattr(httphead, "parse_request_head",
                        lambda head: parsed.append(head) or parse(head))
    router = routing.PublicRouter(ProxyConfig(), Registry())
    exchanges = []
    monkeypatch.setattr(router, "forward",
                        lambda sock, address, route, peeked, *a, **kw:
                        exchanges.append((sock, peeked)))
    route_a_post(monkeypatch, router, Binding(Tunnel()),
                 b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\n")
    assert len(parsed) == 1
    ((exchange, sent_with_start),) = exchanges
    assert sent_with_start.endswith(b"Connection: close\r\n\r\n")
    assert exchange.recv(65536) == b"ok" and exchange.recv(65536) == b""


def test_a_routed_exchange_sends_its_head_with_start_proxy(monkeypatch):
    """StartProxy and the request head leave in the stream's first write (one DATA frame, one
    TLS record), not the head replayed by the splice afterwards as a second frame; the
    exchange's reads go on after the head (a body, then EOF at the request's end)."""
    from lib.protocol import messages as msg

    class RecordingStream(SlowStream):
        def __init__(self):
            self.writes = []

        def sendall(self, data):
            self.writes.append(bytes(data))
    tunnel = Tunnel()
    streams = []
    tunnel.session = types.SimpleNamespace(open=lambda: streams.append(RecordingStream())
                                           or streams[-1])
    binding = Binding(tunnel)
    router = routing.PublicRouter(ProxyConfig(idle_timeout=None), Registry())
    spliced = []
    monkeypatch.setattr(routing, "splice", lambda a, b, **kw: spliced.append(
        (a.recv(65536), a.recv(65536))))
    route_a_post(monkeypatch, router, binding,
                 b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\n")
    (stream,) = streams
    sent = (b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n")
    start = msg.encode(msg.StartProxy(url=binding.url, client_addr="127.0.0.1:1"))
    assert stream.writes == [start + sent]
    assert spliced == [(b"ok", b"")]
    assert binding.bytes_in == len(sent)  # counted once, as the splice counted it


def test_a_head_already_there_is_peeked_in_one_read_without_a_timeout():
    """A visitor's head is usually there when its handler runs: peek_name reads what is there
    once, without setting and restoring the socket's timeout (the timed loop runs only when
    the name is not whole yet); every byte read still comes back, a refusal's too."""
    import gevent.socket as gsocket

    class Counting(gsocket.socket):
        settimeouts = 0

        def settimeout(self, t):
            Counting.settimeouts += 1
            super().settimeout(t)

    def pair():
        a, b = gsocket.socketpair()
        return Counting(a.family, a.type, a.proto, fileno=a.detach()), b

    ours, peer = pair()
    with ours, peer:
        peer.sendall(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\nbody")
        assert routing.peek_name(ours, sniff.HTTPHostSniffer, timeout=5) == (
            "b.test", b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\nbody")
        assert Counting.settimeouts == 0 and ours.gettimeout() is None
    ours, peer = pair()
    with ours, peer:  # half a head now, the rest later: the timed loop, nothing lost
        peer.sendall(b"GET / HTTP/1.1\r\nHo")
        later = gevent.spawn_later(0.05, peer.sendall, b"st: c.test\r\n\r\n")
        assert routing.peek_name(ours, sniff.HTTPHostSniffer, timeout=5) == (
            "c.test", b"GET / HTTP/1.1\r\nHost: c.test\r\n\r\n")
        later.join()
        assert Counting.settimeouts > 0 and ours.gettimeout() is None
    ours, peer = pair()
    with ours, peer:
        peer.sendall(b"\x00\x01 not http")
        with pytest.raises(sniff.SniffError) as refused:
            routing.peek_name(ours, sniff.HTTPHostSniffer, timeout=5)
        assert refused.value.peeked == b"\x00\x01 not http"
    ours, peer = pair()
    with ours:
        peer.close()
        assert routing.peek_name(ours, sniff.HTTPHostSniffer, timeout=5) == (None, b"")


def test_a_routed_get_reaches_its_first_frame_in_few_python_calls(monkeypatch):
    """Everything a fresh connection by Host runs before its stream's first frame is queued
    (StartProxy and the head, flushed at the end of the loop turn) is on the time to its first
    byte: the peek, the sniff, the choice, the exchange wrapper. Counted in Python calls from the
    handler's start to that write, for a GET whose head is there, on a connection as the
    listener accepts it (bench/README.md, "Fresh connections: the proxy's critical path"): a
    request without a body shares one ended body framer, its Upgrade header is read in the
    framer's one pass over the fields, its head is taken without the read path under it, the
    sniffer reads the Host fields in a loop of its own, and the exchange's waiting sender is
    made only if its copy loop sends (47 calls before, 34 after, two of them this test's
    stand-ins)."""
    import socket as _socket
    from lib.net.sockets import AcceptedSocket
    from tests.support.calls import PythonCalls

    seen = []

    class FirstFrame(SlowStream):
        def send_nowait(self, data):
            seen.append((len(calls.names), bytes(data)))
            return len(data)
    tunnel = Tunnel()
    tunnel.session = types.SimpleNamespace(open=FirstFrame)
    binding = Binding(tunnel)
    router = routing.PublicRouter(ProxyConfig(idle_timeout=None), Registry())
    monkeypatch.setattr(router, "choose", lambda *a: routing.Route(routing.FORWARD, binding,
                                                                   tunnel))
    monkeypatch.setattr(routing, "splice", lambda a, b, **kw: None)
    head = b"GET /small HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    for _ in range(2):  # the first connection fills the caches (names, the 502's bytes)
        ours, peer = _socket.socketpair()
        visitor = AcceptedSocket(ours.family, ours.type, ours.proto, ours.detach(),
                                 "127.0.0.1:80")
        with visitor, peer:
            peer.sendall(head)
            with PythonCalls() as calls:
                router.handle_http(visitor, ("127.0.0.1", 1))
    before, first = seen[-1]
    assert first.endswith(head)
    assert before <= 34, "\n".join(calls.names[:before])
