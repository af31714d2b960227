"""The keep-alive request's path, the proxy's and the client's halves in one process: what a
request and its answer cost in Python (bench/README.md, "Per-request cost (issue 16)", kaone
pass).

A visitor's TCP connection spliced to a mux stream of the proxy's session (with the idle
timer, as lib.proxy.routing splices), over TLS on TCP to the client's session, whose stream is
spliced to the origin's TCP connection (as lib.client.tunnels does). Per exchange: the request
read by the proxy's feeder, queued and flushed as one record, read by the client's hub reader
and offered to the origin by its sink; the answer back the same way.
"""
from collections import Counter

import gevent
import pytest

from lib.net.splice import splice
from tests.support.calls import Opcodes, PythonCalls
from tests.support.muxpair import pki, session_pair, tcp_pair, tls_pair  # noqa: F401
from tests.support.switches import SwitchesInto

REQUEST = b"GET /small HTTP/1.1\r\nHost: one.test\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nhello, world\n"
EXCHANGES = 50


class KeepAlivePath:
    def __init__(self, pki):
        client_tls, proxy_tls = tls_pair(pki, sockets=tcp_pair())
        self.client, self.proxy = session_pair((client_tls, proxy_tls), heartbeat=False)
        self.visitor, public = tcp_pair()
        self.origin, local = tcp_pair()
        stream = self.proxy.open()
        self.splices = [gevent.spawn(splice, public, stream, idle_timeout=60)]
        self.visitor.sendall(b"hello")
        accepted = self.client.accept(timeout=5)
        self.splices.append(gevent.spawn(splice, accepted, local))
        assert self.origin.recv(100) == b"hello"
        for _ in range(5):  # past the feeders' first reads (lib.net.splice.FEED_AFTER)
            self.exchange()

    def exchange(self) -> None:
        self.visitor.sendall(REQUEST)
        assert self.origin.recv(1000) == REQUEST
        self.origin.sendall(ANSWER)
        assert self.visitor.recv(1000) == ANSWER

    def close(self) -> None:
        self.visitor.close()
        self.origin.close()
        for g in self.splices:
            g.join(timeout=5)
        self.client.close()
        self.proxy.close()


@pytest.fixture
def path(pki):
    p = KeepAlivePath(pki)
    yield p
    p.close()


def per_exchange(counts: Counter) -> dict:
    return {k: v / EXCHANGES for k, v in counts.most_common()}


def test_an_exchange_wakes_no_greenlet(path):
    with SwitchesInto(gevent.get_hub(), gevent.getcurrent(), but=True) as others:
        for _ in range(EXCHANGES):
            path.exchange()
    assert others.count == 0, others.woken


def test_a_read_of_one_frame_is_decoded_and_offered_in_few_calls(path):
    # A read whose one frame is DATA for a stream with an idle sink is offered to the sink by
    # the hub reader in one call (Session._offer_alone), not through the dispatch, the stream's
    # buffer and the read's sink flush: 4 calls fewer per request in each process.
    with PythonCalls(under="lib") as calls:
        for _ in range(EXCHANGES):
            path.exchange()
    counts = per_exchange(Counter(calls.names))
    assert counts.get("Session._offer_alone") == 2, counts
    for name in ("Session._dispatch", "Stream._deliver", "Session._flush_sinks",
                 "Stream._sink_flush"):
        assert name not in counts, counts
    # A read of one DATA frame is decoded without feeding the decoder (whole_data).
    assert "FrameDecoder.feed" not in counts and "FrameDecoder.next_frame" not in counts, counts
    # 23 per process at main 0364d15, 20 with _offer_alone, 17 with whole_data (and ka3's
    # read_nowait).
    assert sum(counts.values()) <= 34, counts


def test_the_bytecodes_of_an_exchange(path):
    with Opcodes() as ops:
        for _ in range(EXCHANGES):
            path.exchange()
    # Both processes' halves of a request: 2,582 at main 0364d15, 2,318 with _offer_alone,
    # 2,082 with whole_data (main 02c765a under it), 2,046 with data_to_send's (main e2ef055).
    counts = per_exchange(ops.counts)
    assert ops.total / EXCHANGES <= 2050, counts
    # MuxConnection.data_to_send hands the whole queue over without copying or clearing it,
    # and skips the answer marks when none are queued: 76 bytecodes a flush before, 60.
    assert counts["MuxConnection.data_to_send"] <= 2 * 60, counts


def test_what_the_socket_leaves_of_a_one_frame_read_waits_in_order(path):
    # One frame per read (8 KiB pieces, one at a time) to a visitor that does not read: once
    # its socket is full, what a read's frame leaves waits in the stream's buffer and the
    # splice's copy loop sends it (_Sink.send), in order, as the dispatched path does.
    pieces = [bytes([i % 251]) * 8192 for i in range(96)]

    def write():
        for piece in pieces:
            path.origin.sendall(piece)
            gevent.sleep(0.002)  # the next piece is a read of its own
    with PythonCalls(under="lib") as calls:
        writer = gevent.spawn(write)
        gevent.sleep(0.3)  # the visitor's socket fills meanwhile
        got = bytearray()
        while len(got) < 8192 * len(pieces):
            got += path.visitor.recv(65536)
        writer.get(timeout=10)
    assert got == b"".join(pieces)
    assert "_Sink.send" in calls.names and "Session._offer_alone" in calls.names
    path.exchange()
