"""The gevent Session over real socket pairs (and TLS): behaviour, bounds, hostile peers."""
import hashlib
import time
import os
import socket

import time

import gevent
import gevent.socket as gsocket
import pytest

from lib.protocol import muxframe as fr
from lib.errors import (ErrorCode, MuxError, SessionClosed, StreamClosed, StreamReset,
                        StreamTimeout)
from lib.net.muxsession import MuxConfig, Session
from lib.protocol import muxstate as mp
from tests.support.calls import ArgumentLengths
from tests.support.muxpair import (echo_server, pki,  # noqa: F401 (pki: a fixture)
                                    session_pair as pair)
from tests.support.wait import wait_for


def roundtrip(session, data):
    st = session.open()
    g = gevent.spawn(lambda: (st.sendall(data), st.shutdown(socket.SHUT_WR)))
    out = bytearray()
    while (d := st.recv(1 << 20)):
        out += d
    g.get()
    st.close()
    return bytes(out)


def test_echo_many_sizes():
    c, s = pair()
    echo_server(s)
    for size in (0, 1, 16383, 16384, 65536, 65537, 3_000_001):
        data = os.urandom(size)
        assert roundtrip(c, data) == data
    c.close()


def test_100_concurrent_streams_every_byte_checked():
    c, s = pair()
    echo_server(s)
    datas = [os.urandom(50_000 + i) for i in range(100)]
    jobs = [gevent.spawn(roundtrip, c, d) for d in datas]
    gevent.joinall(jobs, raise_error=True, timeout=60)
    assert [hashlib.sha256(j.value).digest() for j in jobs] == \
           [hashlib.sha256(d).digest() for d in datas]
    assert c.open_streams == 0


def test_streams_opened_by_listener_side_too():
    c, s = pair()
    echo_server(c)
    assert roundtrip(s, b"from the server") == b"from the server"


def test_half_close_both_directions():
    c, s = pair()
    st = c.open()
    st.shutdown(socket.SHUT_WR)
    peer = s.accept(timeout=5)
    assert peer.recv(10) == b""          # FIN seen
    peer.sendall(b"still open")          # the other way keeps working
    assert st.recv(100) == b"still open"
    with pytest.raises(StreamClosed):
        st.sendall(b"after FIN")
    peer.shutdown(socket.SHUT_WR)
    assert st.recv(10) == b""


def test_reset_reaches_peer_with_code():
    c, s = pair()
    st = c.open()
    st.sendall(b"x")
    peer = s.accept(timeout=5)
    st.reset(ErrorCode.CANCEL)
    with pytest.raises(StreamReset) as e:
        while peer.recv(10):
            pass
    assert e.value.code == ErrorCode.CANCEL


def test_recv_timeout_is_a_timeout_error():
    c, s = pair()
    st = c.open()
    st.settimeout(0.05)
    with pytest.raises(TimeoutError):
        st.recv(1)
    with pytest.raises(StreamTimeout):
        st.recv(1)


def test_slow_reader_bounds_memory_and_sender_blocks():
    # The receiver never reads: the sender must stop at the granted window, not buffer more.
    c, s = pair(receive_window=256 * 1024)
    st = c.open()
    st.settimeout(0.5)
    sent = 0
    with pytest.raises(StreamTimeout):
        while sent < 50 << 20:
            st.sendall(b"x" * 65536)
            sent += 65536
    peer = s.accept(timeout=1)
    assert peer.buffered <= 256 * 1024
    assert sent <= 256 * 1024


def _parked_then_granted(c, s):
    """A stream whose peer (returned too) reads 192 KiB once a send of ours parks for window,
    then stops reading: its grants let the parked send queue more than the first window."""
    st = c.open()
    st.sendall(b"x")
    peer = s.accept(timeout=5)
    assert peer.recv(1) == b"x"
    peer.settimeout(10)

    def read_a_part_once_parked():
        wait_for(lambda: st.waiting_for_window, "the sender to park", sleep=gevent.sleep)
        got = 0
        while got < 192 * 1024:
            got += len(peer.recv(192 * 1024 - got))
    return st, peer, gevent.spawn(read_a_part_once_parked)


def test_a_send_parked_for_room_that_timed_out_is_passed_over_as_the_output_drains():
    # A send parked at the output bound (Stream._park) that timed out stays in the session's
    # queue of parked sends with nothing left to send; the writer feeding that queue as the
    # output drains (Session._feed_parked) must pass it over: the stream and the session go on.
    a, b = gsocket.socketpair()
    s = Session(b, client=True, config=MuxConfig(heartbeat=False, write_high_water=64 * 1024))
    st = s.open()
    dec = fr.FrameDecoder()
    while (syn := dec.next_frame()) is None:
        dec.feed(a.recv(100))
    a.sendall(fr.encode_wndinc(st.id, 64 << 20))  # a big window, and nothing read for now
    wait_for(lambda: st.send_window > 1 << 20, "the grant", sleep=gevent.sleep)
    st.settimeout(0.5)
    with pytest.raises(StreamTimeout) as timed_out:
        st.sendall(bytes(16 << 20))  # the socket and then the output fill: parked for room
    sent = timed_out.value.sent
    assert 0 < sent < 16 << 20 and s.unsent_size >= 64 * 1024  # (still at the bound)
    got = [0]

    def read() -> None:
        while (data := a.recv(1 << 20)):
            dec.feed(data)
            while (f := dec.next_frame()) is not None:
                if isinstance(f, fr.Data) and f.stream_id == st.id:
                    got[0] += len(f.data)
    reader = gevent.spawn(read)
    wait_for(lambda: s.unsent_size == 0, "the output drained", 10, sleep=gevent.sleep)
    st.settimeout(None)
    st.sendall(b"after")  # nothing parked now: queued at once, written by the writer
    wait_for(lambda: got[0] == sent + 5, "every byte queued", 10, sleep=gevent.sleep)
    s.close()
    a.close()
    reader.join(timeout=5)


def test_a_send_that_timed_out_parked_for_room_then_waits_for_window_reports_so():
    # A send parked for output room that times out leaves the session's queue of parked
    # sends: its stream's next send, waiting for the peer's window while the output has room
    # (between half the bound and the bound: the queue not fed yet), is reported as waiting
    # for window (sends_waiting), not for room.
    frame = mp.SEND_THRESHOLD
    high = 192 * 1024
    a, b = gsocket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s = Session(b, client=True, config=MuxConfig(heartbeat=False, write_high_water=high))
    st, filler = s.open(), s.open()

    def read_until(done) -> None:
        while not done():
            a.recv(4096)
    # The stream's window spent but a frame and 100 bytes (nothing granted back).
    first = gevent.spawn(st.sendall, bytes(mp.INITIAL_WINDOW - frame - 100))
    read_until(lambda: first.ready() and s.unsent_size == 0)
    first.get()
    stuffer = gevent.spawn(filler.sendall, bytes(8 << 20))  # fills the output: parked for room
    wait_for(lambda: filler.waiting_for_window, "the filler's window spent", 5,
             sleep=gevent.sleep)
    a.sendall(fr.encode_wndinc(filler.id, 64 << 20))
    wait_for(lambda: filler.waiting_for_room, "the output full", 5, sleep=gevent.sleep)
    st.settimeout(0.3)
    with pytest.raises(StreamTimeout):
        st.sendall(bytes(frame + 200))  # a frame's window: parked for room, times out
    read_until(lambda: s.unsent_size < high)  # one batch written: room, the queue not fed
    assert s.unsent_size >= high // 2 and filler.waiting_for_room
    st.settimeout(None)
    second = gevent.spawn(st.sendall, bytes(frame + 200))  # a frame, then 100 bytes of window
    wait_for(lambda: st.bytes_out > mp.INITIAL_WINDOW - 200, "a frame sent", 5,
             sleep=gevent.sleep)
    wait_for(lambda: st.waiting_for_window, "waiting for window", 5, sleep=gevent.sleep)
    assert not st.waiting_for_room and s.sends_waiting == 1
    second.kill()
    stuffer.kill()
    s.close()
    a.close()


def test_a_send_that_times_out_reports_the_bytes_it_queued():
    # The parked bytes the session's reader queues on a grant before the timeout reach the
    # peer: sendall's StreamTimeout says how many it queued in all (.sent), and send returns
    # them as a socket's send would (raising, the caller would send them twice).
    c, s = pair(receive_window=256 * 1024)
    st, peer, part = _parked_then_granted(c, s)
    st.settimeout(2)
    with pytest.raises(StreamTimeout) as timed_out:
        st.sendall(bytes(4 << 20))
    part.get(timeout=5)
    sent = timed_out.value.sent
    assert sent > 256 * 1024  # not only the first window (64 KiB): what the grants let in too
    st.shutdown(socket.SHUT_WR)  # after what was queued: the peer reads to its EOF
    got = 192 * 1024
    while (d := peer.recv(1 << 20)):
        got += len(d)
    assert got == sent
    st, peer, part = _parked_then_granted(c, s)
    st.settimeout(2)
    first = st.send(bytes(1 << 20))  # the window's worth, then a send that parks
    second = st.send(bytes(1 << 20))
    part.get(timeout=5)
    assert 0 < second < 1 << 20
    st.shutdown(socket.SHUT_WR)
    got = 192 * 1024
    while (d := peer.recv(1 << 20)):
        got += len(d)
    assert got == first + second
    c.close()
    s.close()


def test_transport_death_fails_streams_with_session_closed():
    a, b = gsocket.socketpair()
    c = Session(a, client=True)
    st = c.open()
    b.close()
    with pytest.raises(SessionClosed):
        st.recv(1)
    assert c.wait(5) is not None and c.closed


def test_close_sends_goaway_and_peer_ends():
    c, s = pair()
    c.close()
    end = s.wait(5)
    assert end.remote and end.code == ErrorCode.NO_ERROR
    with pytest.raises(SessionClosed):
        s.open()


def test_heartbeat_dead_peer_detected():
    a, b = gsocket.socketpair()
    c = Session(a, client=True, config=MuxConfig(heartbeat_interval=0.1, heartbeat_tolerance=0.3))
    # b reads everything and never answers: no echo.
    sink = gevent.spawn(lambda: [None for _ in iter(lambda: b.recv(65536), b"")])
    end = c.wait(5)
    assert end is not None and "heartbeat" in end.reason
    sink.kill()


def test_heartbeat_keeps_session_alive_and_measures_rtt():
    c, s = pair(heartbeat_interval=0.05, heartbeat_tolerance=0.2)
    # Alive across three of its own timeout windows (a "not too early" bound: without echoes
    # it would end after one), and a round trip measured; how fast is bench/'s business.
    windows_end = time.monotonic() + 3 * (0.05 + 0.2)
    while time.monotonic() < windows_end and not (c.closed or s.closed):
        gevent.sleep(0.05)
    assert not c.closed and not s.closed
    deadline = time.monotonic() + 10
    while c.heartbeat_rtt is None and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert c.heartbeat_rtt is not None and c.heartbeat_rtt > 0


def raw_peer_session(wire):
    """A Session (server side) fed hostile bytes by a raw socket; returns (session, GOAWAY)."""
    a, b = gsocket.socketpair()
    s = Session(b, client=False, config=MuxConfig(max_streams=8, accept_backlog=8, max_refused=16))
    def send():
        try:
            a.sendall(wire)
        except OSError:
            pass  # the session hung up mid-flood, as it should
    gevent.spawn(send)
    end = s.wait(5)
    got = b""
    a.settimeout(2)
    try:
        while (d := a.recv(65536)):
            got += d
    except OSError:
        pass
    dec = fr.FrameDecoder()
    dec.feed(got)
    frames = []
    while (f := dec.next_frame()) is not None:
        frames.append(f)
    return end, [f for f in frames if isinstance(f, fr.GoAway)]


@pytest.mark.parametrize("name,wire,code", [
    ("window overrun", fr.encode(fr.Syn(3)) + b"".join(
        fr.encode(fr.Data(3, bytes(16383))) for _ in range(80)), ErrorCode.FLOW_CONTROL_ERROR),
    ("id reuse", fr.encode(fr.Syn(3)) + fr.encode(fr.Syn(3)), ErrorCode.PROTOCOL_ERROR),
    ("wrong parity", fr.encode(fr.Syn(4)), ErrorCode.PROTOCOL_ERROR),
    ("unknown type", bytes.fromhex("0000001100000003"), ErrorCode.PROTOCOL_ERROR),
    ("SYN flood", b"".join(fr.encode(fr.Syn(2 * i + 3)) for i in range(5000)),
     ErrorCode.PROTOCOL_ERROR),
])
def test_hostile_peer_gets_goaway_while_other_session_works(name, wire, code):
    c, s = pair()
    echo_server(s)
    end, goaways = raw_peer_session(wire)
    assert end is not None and end.code == code, (name, end)
    assert goaways and goaways[-1].code == code
    assert roundtrip(c, b"unharmed") == b"unharmed"


def test_over_tls(pki):
    sctx, cctx = pki.server, pki.client
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    holder = {}

    def serve():
        conn, _ = lsock.accept()
        tconn = sctx.wrap_socket(conn, server_side=True)
        holder["s"] = Session(tconn, client=False)
        echo_server(holder["s"])
    g = gevent.spawn(serve)
    raw = gsocket.create_connection(("127.0.0.1", port))
    tls = cctx.wrap_socket(raw, server_hostname="tunnel.test")
    c = Session(tls, client=True)
    g.join(5)
    data = os.urandom(2_000_000)
    jobs = [gevent.spawn(roundtrip, c, data) for _ in range(10)]
    gevent.joinall(jobs, raise_error=True, timeout=30)
    assert all(j.value == data for j in jobs)
    c.close()


# --- windows that grow only while the application reads (the proxy's visitors' streams) ---

def _grow_pair(pool):
    a, b = gsocket.socketpair()
    client = Session(a, client=True)
    server = Session(b, client=False, config=MuxConfig(grow_windows=True, window_pool=pool,
                                                       heartbeat=False))
    return client, server


def _push(stream, n):
    stream.settimeout(10)
    try:
        stream.sendall(bytes(n))
    except MuxError:
        pass


def test_windows_grow_while_read_and_stay_at_64k_when_not():
    pool = mp.WindowPool(64 << 20)
    client, server = _grow_pair(pool)
    fast, deaf = server.open(), server.open()
    fast.sendall(b"a")
    deaf.sendall(b"b")
    assert fast.receive_window == deaf.receive_window == mp.INITIAL_WINDOW
    c_fast, c_deaf = client.accept(timeout=5), client.accept(timeout=5)
    pushers = [gevent.spawn(_push, c_fast, 4 << 20), gevent.spawn(_push, c_deaf, 4 << 20)]
    got = 0
    fast.settimeout(10)
    while got < 4 << 20:
        got += len(fast.recv(1 << 20))
    assert fast.receive_window == MuxConfig().receive_window  # grew: the reader kept up
    assert deaf.receive_window == mp.INITIAL_WINDOW  # never read: never grew
    assert deaf.buffered <= mp.INITIAL_WINDOW
    assert pool.used == MuxConfig().receive_window - mp.INITIAL_WINDOW
    fast.close()
    deadline = time.monotonic() + 5
    while pool.used and time.monotonic() < deadline:  # freed when the peer's FIN comes back
        c_fast.close()
        gevent.sleep(0.01)
    assert pool.used == 0
    server.close()
    gevent.killall(pushers)


def test_window_pool_bounds_growth_across_sessions():
    limit = 3 * mp.INITIAL_WINDOW
    pool = mp.WindowPool(limit)
    pairs = [_grow_pair(pool) for _ in range(3)]
    for client, server in pairs:
        st = server.open()
        st.sendall(b"x")
        peer = client.accept(timeout=5)
        g = gevent.spawn(_push, peer, 2 << 20)
        st.settimeout(10)
        got = 0
        while got < 2 << 20:
            got += len(st.recv(1 << 20))
        g.get(timeout=10)
        assert pool.used <= limit
    assert pool.used == limit and pool.refused > 0  # the budget, not the demand, decided
    for client, server in pairs:
        server.close()
        client.close()
    assert pool.used == 0  # a session that ends gives its share back


def test_output_that_stops_moving_closes_the_session_as_hostile():
    # The peer keeps sending (harmless WNDINCs on a closed stream), so it looks alive, but it
    # never reads: our output stays queued; past write_stall_timeout the session is closed.
    a, b = gsocket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s = Session(b, client=False, config=MuxConfig(write_stall_timeout=0.5, heartbeat_interval=0.1,
                                                  heartbeat_tolerance=60))

    def chatter():
        while True:
            a.sendall(fr.encode(fr.WndInc(1, 1)))
            gevent.sleep(0.05)

    g = gevent.spawn(chatter)
    st = s.open()
    writer = gevent.spawn(_push, st, 60000)
    try:
        end = s.wait(10)
        assert end is not None, "a peer that never reads kept the session"
        assert end.hostile and "stopped reading" in end.reason, end
    finally:
        g.kill()
        writer.kill()
        a.close()


def test_writers_keep_output_under_the_high_water_mark():
    # The peer grants a huge window but reads nothing: one sendall must not queue more than
    # the high-water mark plus one frame (it used to queue all it was given).
    a, b = gsocket.socketpair()
    s = Session(b, client=False, config=MuxConfig(write_high_water=256 * 1024, heartbeat=False))
    st = s.open()
    a.sendall(fr.encode(fr.WndInc(st.id, 64 << 20)))
    deadline = time.monotonic() + 5
    while st.send_window < 64 << 20 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    writer = gevent.spawn(_push, st, 32 << 20)
    deadline = time.monotonic() + 5
    while s.unsent_size < 256 * 1024 and time.monotonic() < deadline:
        gevent.sleep(0.01)  # until the writer is held at the mark
    for _ in range(10):
        gevent.sleep(0)
    assert s.unsent_size <= 256 * 1024 + fr.MAX_PAYLOAD + fr.HEADER_SIZE
    writer.kill()
    a.close()


def test_a_reader_that_lags_does_not_grow_the_window():
    # Data always waiting when it reads: the reader, not the window, holds the stream back.
    client, server = _grow_pair(mp.WindowPool(64 << 20))
    st = server.open()
    st.sendall(b"x")
    peer = client.accept(timeout=5)
    g = gevent.spawn(_push, peer, 1 << 20)
    st.settimeout(10)
    got = 0
    deadline = time.monotonic() + 20
    while got < 512 * 1024 and time.monotonic() < deadline:
        while st.buffered < 48 * 1024 and time.monotonic() < deadline:
            gevent.sleep(0.001)
        got += len(st.recv(16 * 1024))
    assert got >= 512 * 1024
    assert st.receive_window == mp.INITIAL_WINDOW
    g.kill()
    server.close()


# --- what a peer may provoke (lib.protocol.muxstate), with a clock that does not move ----------

class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _server(trusted=True, **kw):
    clock = _Clock()
    conn = mp.MuxConnection(False, MuxConfig(heartbeat=False, **kw), trusted=trusted, clock=clock)
    conn.receive_data(fr.encode(fr.Syn(99999)))  # every lower odd id is now "closed"
    conn.data_to_send()
    return conn, clock


def _rst_bait(n, first=3):
    return b"".join(fr.encode_data(first + 2 * i, b"x") for i in range(n))


def _hostile(events):
    ends = [e for e in events if isinstance(e, mp.ConnectionTerminated)]
    return ends[0] if ends else None


def test_before_trust_sixteen_answers_then_hostile_and_after_trust_the_larger_bucket():
    conn, clock = _server(trusted=False)
    assert _hostile(conn.receive_data(_rst_bait(15))) is None  # (each frame costs 1/64 too)
    end = _hostile(conn.receive_data(_rst_bait(2, first=101)))
    assert end is not None and end.hostile and end.code == ErrorCode.PROTOCOL_ERROR
    conn, clock = _server(trusted=False)
    conn.trust()
    assert _hostile(conn.receive_data(_rst_bait(4000))) is None
    end = _hostile(conn.receive_data(_rst_bait(200, first=9001)))
    assert end is not None and end.hostile


def test_the_bucket_refills_with_time():
    conn, clock = _server()
    for k in range(10):  # 4,000 answers every second for 10 s: never past the bucket
        clock.now += 1.0
        assert _hostile(conn.receive_data(_rst_bait(3900, first=3 + 8000 * k))) is None
        conn.data_to_send()


def test_frames_that_provoke_nothing_still_cost_and_a_flood_is_cut():
    conn, clock = _server()
    noop = fr.encode(fr.WndInc(3, 1)) * 8192
    sent = 0
    end = None
    while end is None and sent < 1_000_000:
        end = _hostile(conn.receive_data(noop))
        sent += 8192
    assert end is not None and end.hostile, "a no-op frame flood was never cut"
    assert sent <= (MuxConfig().answer_burst + 1) * mp.FRAMES_PER_ANSWER + 8192


def test_frames_before_trust_are_capped():
    conn, _ = _server(trusted=False)
    end = _hostile(conn.receive_data(fr.encode(fr.WndInc(3, 1)) * 300))
    assert end is not None and end.hostile and "before Auth" in end.reason


def test_one_rst_per_closed_stream_id():
    conn, _ = _server()
    conn.receive_data(fr.encode_data(3, b"x") * 100)
    out = conn.data_to_send()
    assert out == fr.encode(fr.Rst(3, ErrorCode.STREAM_CLOSED))


def test_answers_nobody_reads_are_bounded_in_bytes():
    conn, _ = _server(answer_burst=100_000)
    end = None
    first = 3
    while end is None and first < 200_000:
        end = _hostile(conn.receive_data(_rst_bait(1000, first)))
        first += 2000
    assert end is not None and end.hostile and "does not read" in end.reason
    assert conn.unsent_answers == 0  # dropped: the GOAWAY goes out alone
    assert conn.data_to_send() == fr.encode(fr.GoAway(99999, ErrorCode.PROTOCOL_ERROR))


def test_a_second_goaway_ends_the_session():
    conn, _ = _server()
    ga = fr.encode(fr.GoAway(0, ErrorCode.NO_ERROR))
    assert _hostile(conn.receive_data(ga)) is None
    end = _hostile(conn.receive_data(ga))
    assert end is not None and end.code == ErrorCode.PROTOCOL_ERROR and not end.hostile


def test_streams_reset_before_accept_are_not_handed_out():
    # SYN then RST, in a loop: the application must not read (and log) each dead stream.
    a, b = gsocket.socketpair()
    s = Session(b, client=False, config=MuxConfig(heartbeat=False))
    wire = b"".join(fr.encode(fr.Syn(3 + 2 * i)) + fr.encode(fr.Rst(3 + 2 * i, ErrorCode.CANCEL))
                    for i in range(100))
    a.sendall(wire + fr.encode(fr.Syn(1001)) + fr.encode_data(1001, b"alive"))
    st = s.accept(timeout=5)
    assert st.id == 1001 and st.recv(10) == b"alive"
    s.close()
    a.close()



class _RecordsReads(gsocket.socket):
    """A gevent socket recording the sizes asked of recv(): recv(n) allocates n bytes."""
    sizes: list = []

    def recv(self, n, *args):
        _RecordsReads.sizes.append(n)
        return super().recv(n, *args)


def test_the_reader_allocates_no_read_sized_buffer_per_read():
    # The reader's 256 KiB reads from a plain socket go through lib.net.sockets' scratch
    # buffer: recv(256 KiB) allocated that much per read (bench/README.md, "Per-request cost").
    import socket as stdsocket
    x, y = stdsocket.socketpair()
    a, b = _RecordsReads(fileno=x.detach()), gsocket.socket(fileno=y.detach())
    c, s = Session(a, client=True), Session(b, client=False)
    st = s.open()
    st.sendall(b"ping")
    assert c.accept(timeout=5).recv(10) == b"ping"
    assert not [n for n in _RecordsReads.sizes if n > 16 * 1024]
    c.close()
    s.close()


def test_a_read_of_many_frames_gives_others_turns_while_it_is_decoded():
    # A read is decoded in place, whole, but the reader yields every YIELD_FRAMES frames: a peer
    # sending a flood of tiny frames in one read must not hold the hub for all of them.
    a, b = gsocket.socketpair()
    s = Session(b, client=False, config=MuxConfig(heartbeat=False))
    n = 10_000
    a.sendall(fr.encode(fr.Syn(3)) + fr.encode(fr.WndInc(3, 1)) * n)  # ~120 KB: a read or two
    seen = set()
    deadline = time.monotonic() + 10
    while s.frames_received < n + 1 and time.monotonic() < deadline:
        seen.add(s.frames_received)
        gevent.sleep(0)
    assert s.frames_received == n + 1
    between = {k for k in seen if 1 < k < n + 1}  # the ticker ran in the middle of a read
    assert len(between) >= n // 256 // 2, sorted(between)
    s.close()
    a.close()


def test_bulk_is_decoded_a_whole_read_at_a_time():
    # 16 KiB frames: the decoder gets each read whole (cutting reads into 4 KiB pieces cost a
    # Python sink 0.3-0.5 s of CPU per GiB: bench/README.md, "Bulk and the multiplexer
    # against Go"), and a frame a read ends in the middle of is the only thing carried.
    a, b = gsocket.socketpair()
    s = Session(b, client=False, config=MuxConfig(heartbeat=False))
    payload = os.urandom(fr.MAX_PAYLOAD)
    # A peer stream's larger window comes with its first WNDINC (lib.protocol.muxstate): read
    # one frame, take the grant, then send more than 64 KiB in one write.
    a.sendall(fr.encode(fr.Syn(3)) + fr.encode_data(3, payload))
    st = s.accept(timeout=5)
    assert st.recv(1 << 20) == payload
    grant = fr.FrameDecoder()
    grant.feed(a.recv(64))
    assert isinstance(grant.next_frame(), fr.WndInc)
    with ArgumentLengths("MuxConnection.receive_data", "data") as fed:
        a.sendall(fr.encode_data(3, payload) * 8)
        got = b""
        while len(got) < 8 * len(payload):
            got += st.recv(1 << 20)
    assert got == payload * 8
    assert max(fed.lengths) > 4 * fr.MAX_PAYLOAD, fed.lengths  # not cut into small pieces
    s.close()
    a.close()
