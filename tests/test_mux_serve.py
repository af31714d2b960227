"""Session.serve: streams the peer opens handed to a handler by the session's reader, with no
greenlet woken to accept them (lib/net/muxsession.py; bench/README.md,
"Fresh connections, the client's side")."""
from __future__ import annotations

import gevent

from lib.errors import ErrorCode
from tests.support.muxpair import session_pair
from tests.support.switches import SwitchesInto
from tests.support.wait import wait_until


def test_each_stream_is_handed_over_by_the_reader_and_the_serving_greenlet_sleeps():
    client, server = session_pair()
    got = []
    serving = gevent.spawn(server.serve, got.append)
    # serve() has handed out nothing and waits for the session's end: the greenlet has a frame
    # once it ran, and it runs until it waits (its start is then not counted below).
    wait_until(lambda: serving.gr_frame is not None)
    with SwitchesInto(serving) as into:
        streams = [client.open() for _ in range(10)]
        for st in streams:
            st.sendall(b"x")
        wait_until(lambda: len(got) == 10)
    assert into.count == 0  # no greenlet woken per stream (accept() would wake its caller)
    assert sorted(s.id for s in got) == sorted(s.id for s in streams)
    assert all(s.recv(10) == b"x" for s in got)
    assert server.stats.streams_accepted == 10
    client.close()
    assert serving.get(timeout=5) is not None  # the session's end
    server.close()


def test_streams_waiting_before_serve_go_first_and_a_reset_one_is_skipped():
    client, server = session_pair()
    first = client.open()
    gone = client.open()
    gone.reset(ErrorCode.CANCEL)  # opened and reset before anyone took it
    first.sendall(b"1")
    # Frames are read in order: once first's DATA is in, gone's SYN and RST were read before.
    wait_until(lambda: server.stats.bytes_in >= 1)
    got = []
    g = gevent.spawn(server.serve, got.append)
    wait_until(lambda: got)
    later = client.open()
    later.sendall(b"2")
    wait_until(lambda: len(got) == 2)
    # Final: the backlog (first, gone) was handed out by serve() before later's SYN was read.
    assert [s.id for s in got] == [first.id, later.id]
    client.close()
    g.get(timeout=5)
    server.close()


def test_a_handler_that_raises_ends_the_session_not_the_reader_alone():
    # The handler runs in the session's reader: its exception must end the session (serve()
    # returns, the tunnel reconnects), not leave it open with nobody reading until the
    # heartbeat watchdog gives up on it.
    client, server = session_pair(heartbeat=False)

    def handler(stream):
        raise RuntimeError("a bug in the handler")

    serving = gevent.spawn(server.serve, handler)
    gevent.sleep(0)
    client.open().sendall(b"x")
    end = serving.get(timeout=5)
    assert end is not None and end.code == ErrorCode.INTERNAL_ERROR, end
    assert "a bug in the handler" in end.reason
    assert client.wait(timeout=5) is not None  # the transport was closed: the peer sees it
    client.close()


def test_reader_crashes_are_counted_and_their_tracebacks_logged_at_a_bounded_rate(
        monkeypatch, caplog):
    # A bug a peer can reach (here: a handler that raises) ends each session it reaches; a peer
    # that reconnects reaches it again. Every crash is counted; tracebacks are logged ten at
    # once, then one a minute (the clock stands still here), and the hub's handle_error, which
    # printed each one with no limit, is not called.
    from lib.net import muxsession
    from lib.tokenbucket import TokenBucket
    now = [0.0]
    monkeypatch.setattr(muxsession, "crash_log", TokenBucket(10, 1 / 60, clock=lambda: now[0]))
    hub_reported = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", lambda *a: hub_reported.append(a))
    before = muxsession.reader_crashes

    def handler(stream):
        raise RuntimeError("a bug in the handler")

    def crash() -> None:
        client, server = session_pair(heartbeat=False)
        serving = gevent.spawn(server.serve, handler)
        gevent.sleep(0)
        client.open().sendall(b"x")
        assert serving.get(timeout=5).code == ErrorCode.INTERNAL_ERROR
        client.close()
        server.close()

    caplog.set_level("ERROR", logger="shroud.mux")
    for _ in range(15):
        crash()
    assert muxsession.reader_crashes - before == 15
    tracebacks = [r for r in caplog.records if r.exc_info and "reader failed" in r.getMessage()]
    assert len(tracebacks) == 10
    assert "a bug in the handler" in str(tracebacks[0].exc_info[1])
    assert muxsession.crash_log.dropped == 5
    # A minute on: one more line, saying how many were left out before it.
    now[0] += 60
    crash()
    last = [r for r in caplog.records if "reader failed" in r.getMessage()][-1]
    assert "5 such lines dropped before" in last.getMessage(), last.getMessage()
    assert muxsession.crash_log.dropped == 0
    assert muxsession.reader_crashes - before == 16
    assert hub_reported == []
