"""The sans-I/O state machine: a ConnectionPair joined by a fake link, and hostile peers."""
import pytest
from hypothesis import given, settings, strategies as st

from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp
from lib.errors import ErrorCode, ProtocolError
from tests.support.calls import PythonCalls


def cfg(**kw):
    kw.setdefault("heartbeat", False)
    kw.setdefault("receive_window", mp.INITIAL_WINDOW)
    return mp.MuxConfig(**kw)


class Pair:
    """Two connections joined by a fake link; pump() moves bytes until both are quiet."""

    def __init__(self, **kw):
        self.client = mp.MuxConnection(True, cfg(**kw))
        self.server = mp.MuxConnection(False, cfg(**kw))
        self.events = {True: [], False: []}

    def pump(self):
        for _ in range(1000):
            a, b = self.client.data_to_send(), self.server.data_to_send()
            if not a and not b:
                return
            if a:
                self.events[False] += self.server.receive_data(a)
            if b:
                self.events[True] += self.client.receive_data(b)
        raise AssertionError("link never went quiet")


def frames(data):
    d = fr.FrameDecoder()
    d.feed(data)
    out = []
    while (f := d.next_frame()) is not None:
        out.append(f)
    return out


def test_ids_odd_from_3_for_dialer_even_from_2_for_listener():
    p = Pair()
    assert [p.client.open_stream() for _ in range(3)] == [3, 5, 7]
    assert [p.server.open_stream() for _ in range(3)] == [2, 4, 6]


def test_open_send_fin_round_trip():
    p = Pair()
    sid = p.client.open_stream()
    assert p.client.send_data(sid, b"hello", fin=True) == 5
    p.pump()
    assert p.events[False] == [mp.StreamOpened(sid), mp.DataReceived(sid, b"hello", True)]


def test_sender_never_exceeds_window_and_wndinc_reopens_it():
    p = Pair()
    sid = p.client.open_stream()
    assert p.client.send_data(sid, bytes(100_000)) == 65536
    assert p.client.send_data(sid, b"x") == 0
    p.pump()
    got = sum(len(e.data) for e in p.events[False] if isinstance(e, mp.DataReceived))
    assert got == 65536
    p.server.acknowledge(sid, 65536)
    p.pump()
    assert mp.WindowOpened(sid) in p.events[True]
    assert p.client.send_window(sid) == 65536


def test_frames_never_exceed_max_payload():
    c = mp.MuxConnection(True, cfg())
    sid = c.open_stream()
    c.send_data(sid, bytes(40000))
    sizes = [len(f.data) for f in frames(c.data_to_send()) if isinstance(f, fr.Data)]
    assert sizes == [16383, 16383, 7234]


def test_larger_receive_window_granted_early():
    c = mp.MuxConnection(True, cfg(receive_window=1 << 20))
    sid = c.open_stream()
    assert frames(c.data_to_send()) == [fr.Syn(sid), fr.WndInc(sid, (1 << 20) - 65536)]


def test_window_budget_bounds_larger_windows():
    c = mp.MuxConnection(True, cfg(receive_window=1 << 20, session_window_budget=2 << 20))
    for _ in range(4):
        c.open_stream()
    incs = [f for f in frames(c.data_to_send()) if isinstance(f, fr.WndInc)]
    assert len(incs) == 2  # the budget covers two boosted streams; the rest keep 64 KiB


def test_half_close_keeps_other_direction_open():
    p = Pair()
    sid = p.client.open_stream()
    p.client.end_stream(sid)
    p.pump()
    assert mp.StreamEnded(sid) in p.events[False]
    assert p.server.send_data(sid, b"reply") == 5
    p.pump()
    assert mp.DataReceived(sid, b"reply") in p.events[True]


def test_rst_fails_stream_and_late_data_is_answered_with_rst4():
    p = Pair()
    sid = p.client.open_stream()
    p.pump()
    p.server.reset_stream(sid, ErrorCode.CANCEL)
    p.pump()
    assert mp.StreamReset(sid, ErrorCode.CANCEL) in p.events[True]
    # a frame for the forgotten stream: dropped, answered RST(4), session unharmed
    late = p.server.receive_data(fr.encode(fr.Data(sid, b"late")))
    assert late == []
    assert frames(p.server.data_to_send()) == [fr.Rst(sid, ErrorCode.STREAM_CLOSED)]
    assert p.server.terminated is None


def test_duplicate_fin_after_close_is_dropped_quietly():
    p = Pair()
    sid = p.client.open_stream()
    p.client.end_stream(sid)
    p.pump()
    p.server.end_stream(sid)
    p.pump()
    assert p.server.receive_data(fr.encode(fr.Data(sid, b"", True))) == []
    assert p.server.data_to_send() == b""


def test_heartbeat_is_echoed_and_kept_out_of_accept():
    c = mp.MuxConnection(True, mp.MuxConfig())
    s = mp.MuxConnection(False, mp.MuxConfig())
    s_events = s.receive_data(c.data_to_send())
    assert s_events == []  # the heartbeat stream is not offered to accept()
    c.receive_data(s.data_to_send())
    assert c.send_heartbeat()
    s.receive_data(c.data_to_send())
    assert c.receive_data(s.data_to_send()) == [mp.HeartbeatEchoed(1)]


def test_goaway_refuses_new_streams_and_fails_ours_above_last():
    p = Pair()
    a = p.client.open_stream()
    p.pump()
    b = p.client.open_stream()  # not yet seen by the server
    p.server.goaway(ErrorCode.NO_ERROR)
    p.events[True] += p.client.receive_data(p.server.data_to_send())
    ev = [e for e in p.events[True] if isinstance(e, mp.GoAwayReceived)][0]
    assert ev.last_stream_id == a and ev.refused == [b]
    with pytest.raises(ProtocolError):
        p.client.open_stream()


def test_goaway_sent_has_length_8():
    s = mp.MuxConnection(False, cfg())
    s.goaway(ErrorCode.NO_ERROR)
    assert s.data_to_send() == bytes.fromhex("0008000600000000" "00000001" "00000000")


# --- hostile peers: the right GOAWAY code --------------------------------------------------

def server_after(wire):
    s = mp.MuxConnection(False, cfg(max_streams=4, accept_backlog=4, max_refused=8))
    events = s.receive_data(wire)
    return s, events, frames(s.data_to_send())


def goaway_code(out):
    gs = [f for f in out if isinstance(f, fr.GoAway)]
    return gs[-1].code if gs else None


@pytest.mark.parametrize("wire,code", [
    (fr.encode(fr.Syn(1)), ErrorCode.PROTOCOL_ERROR),                      # stream 1
    (fr.encode(fr.Syn(4)), ErrorCode.PROTOCOL_ERROR),                      # wrong parity
    (fr.encode(fr.Syn(5)) + fr.encode(fr.Syn(3)), ErrorCode.PROTOCOL_ERROR),  # id going back
    (fr.encode(fr.Syn(3)) + fr.encode(fr.Syn(3)), ErrorCode.PROTOCOL_ERROR),  # id reuse
    (fr.encode(fr.Data(9, b"x")), ErrorCode.PROTOCOL_ERROR),               # idle stream
    (fr.encode(fr.Syn(3)) + b"".join(fr.encode(fr.Data(3, bytes(16383))) for _ in range(5)),
     ErrorCode.FLOW_CONTROL_ERROR),                                         # window overrun
    (bytes.fromhex("0000000700000003"), ErrorCode.PROTOCOL_ERROR),        # unknown type
    (b"".join(fr.encode(fr.Syn(2 * i + 3)) for i in range(20)), ErrorCode.PROTOCOL_ERROR),  # flood
])
def test_hostile_sequences_end_session_with_right_code(wire, code):
    s, events, out = server_after(wire)
    assert isinstance(events[-1], mp.ConnectionTerminated)
    assert events[-1].code == code
    assert goaway_code(out) == code
    assert s.receive_data(fr.encode(fr.Syn(1001))) == []  # terminated: nothing more happens


def test_syns_beyond_limit_are_refused_not_fatal():
    wire = b"".join(fr.encode(fr.Syn(2 * i + 3)) for i in range(6))
    s, events, out = server_after(wire)
    assert [type(e) for e in events] == [mp.StreamOpened] * 4
    assert [f for f in out if isinstance(f, fr.Rst)] == [
        fr.Rst(11, ErrorCode.REFUSED_STREAM), fr.Rst(13, ErrorCode.REFUSED_STREAM)]
    assert s.terminated is None and s.refused_streams == 2


def test_extension_stream_other_than_heartbeat_is_rst4():
    s, events, out = server_after(fr.encode(fr.Syn(3, None, 0xFFFFFF00)))
    assert events == [] and out == [fr.Rst(3, ErrorCode.STREAM_CLOSED)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(
    st.builds(fr.Syn, st.integers(1, 40)),
    st.builds(fr.Data, st.integers(1, 40), st.binary(max_size=40), st.booleans()),
    st.builds(fr.Rst, st.integers(1, 40), st.integers(0, 9)),
    st.builds(fr.WndInc, st.integers(1, 40), st.integers(1, 1 << 20)),
    st.builds(fr.GoAway, st.integers(0, 40), st.integers(0, 9)),
), max_size=30))
def test_random_frame_sequences_never_crash(seq):
    s = mp.MuxConnection(False, cfg(max_streams=8, accept_backlog=8, max_refused=4))
    events = s.receive_data(b"".join(fr.encode(f) for f in seq))
    terminated = [e for e in events if isinstance(e, mp.ConnectionTerminated)]
    assert len(terminated) <= 1
    if terminated:
        assert terminated[0] is events[-1]
        assert goaway_code(frames(s.data_to_send())) == terminated[0].code


def test_peer_streams_keep_64k_when_told_so():
    # The proxy's setting: a client can make it buffer at most 64 KiB per control stream.
    s = mp.MuxConnection(False, mp.MuxConfig(heartbeat=False, grant_peer_streams=False))
    events = s.receive_data(fr.encode(fr.Syn(3)))
    assert events == [mp.StreamOpened(3)]
    assert not [f for f in frames(s.data_to_send()) if isinstance(f, fr.WndInc)]
    over = b"".join(fr.encode(fr.Data(3, bytes(16383))) for _ in range(5))  # 80 KiB
    assert isinstance(s.receive_data(over)[-1], mp.ConnectionTerminated)


def test_proxy_side_defaults_bound_what_a_client_can_make_it_hold():
    from lib.proxy.server import ProxyConfig
    c = ProxyConfig().mux
    assert not c.grant_peer_streams and c.max_streams <= 64 and c.accept_backlog <= 32


# --- the state machine's bookkeeping, rule by rule (found by mutation testing) --------------

def conn(client=False, **kw):
    return mp.MuxConnection(client, cfg(**kw))


def syn(*sids, **kw):
    return b"".join(fr.encode(fr.Syn(sid, **kw)) for sid in sids)


def data(sid, payload=b"", fin=False):
    return fr.encode(fr.Data(sid, payload, fin))


def test_fresh_connection_has_nothing_queued_and_counts_what_it_queues():
    c = conn(True)
    assert c.outgoing_size == 0 and c.data_to_send() == b""
    a, b = c.open_stream(), c.open_stream()
    assert c.outgoing_size == 2 * fr.HEADER_SIZE
    out = c.data_to_send()
    assert frames(out) == [fr.Syn(a), fr.Syn(b)] and c.outgoing_size == 0
    c.send_data(a, b"xyz")
    assert c.outgoing_size == fr.HEADER_SIZE + 3
    assert c.data_to_send() == data(a, b"xyz") and c.outgoing_size == 0


def test_heartbeat_stream_is_opened_with_gos_priority_and_type():
    c = mp.MuxConnection(True, mp.MuxConfig(receive_window=mp.INITIAL_WINDOW))
    assert frames(c.data_to_send()) == [fr.Syn(3, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE)]


def test_open_stream_refusals_carry_their_code():
    c = conn(True)
    c.receive_data(fr.encode(fr.GoAway(0, 0)))
    with pytest.raises(ProtocolError) as e:
        c.open_stream()
    assert e.value.code == ErrorCode.REFUSED_STREAM
    assert e.value.args[0] == "peer sent GOAWAY: no new streams"
    c = conn(True)
    c.terminate(ErrorCode.INTERNAL_ERROR, "gone")
    with pytest.raises(ProtocolError) as e:
        c.open_stream()
    assert e.value.code == ErrorCode.INTERNAL_ERROR and e.value.args[0] == "session is closed"


def test_stream_ids_end_at_2_31_minus_1():
    c = conn(True)
    c._next_local = fr.STREAM_ID_MASK  # the last odd id (white box: 2^30 opens otherwise)
    assert c.open_stream() == fr.STREAM_ID_MASK
    with pytest.raises(ProtocolError) as e:
        c.open_stream()
    assert e.value.code == ErrorCode.REFUSED_STREAM and e.value.args[0] == "stream ids exhausted"


def test_extra_window_granted_exactly_within_the_budget():
    extra = 1000
    c = conn(True, receive_window=mp.INITIAL_WINDOW + extra, session_window_budget=extra)
    a = c.open_stream()
    assert frames(c.data_to_send()) == [fr.Syn(a), fr.WndInc(a, extra)]
    b = c.open_stream()  # the budget is spent: 64 KiB only
    assert frames(c.data_to_send()) == [fr.Syn(b)]
    c.forget_stream(a)  # gives its share back
    c.data_to_send()
    d = c.open_stream()
    assert frames(c.data_to_send()) == [fr.Syn(d), fr.WndInc(d, extra)]
    # The peer may send the whole larger window, and not a byte more.
    c.receive_data(data(d, bytes(16383)) * 4)
    tail = mp.INITIAL_WINDOW + extra - 4 * 16383
    assert c.receive_data(data(d, bytes(tail))) == [mp.DataReceived(d, bytes(tail))]
    assert c.receive_data(data(d, b"x"))[-1].code == ErrorCode.FLOW_CONTROL_ERROR


def test_one_byte_of_extra_window_is_granted():
    c = conn(True, receive_window=mp.INITIAL_WINDOW + 1)
    a = c.open_stream()
    assert frames(c.data_to_send()) == [fr.Syn(a), fr.WndInc(a, 1)]


def test_send_data_on_a_closed_or_unknown_stream_is_refused():
    c = conn(True)
    a = c.open_stream()
    c.end_stream(a)
    for sid in (a, 99):
        with pytest.raises(ProtocolError) as e:
            c.send_data(sid, b"x")
        assert e.value.code == ErrorCode.STREAM_CLOSED
        assert e.value.args[0] == f"stream {sid} is closed for writing"
    assert c.send_window(99) == 0 and c.send_window(a) == mp.INITIAL_WINDOW
    c.end_stream(99)  # unknown: nothing
    c.data_to_send()
    c.end_stream(a)  # already half-closed: no second FIN
    assert c.data_to_send() == b""


def test_send_data_takes_what_the_window_allows_and_fin_only_with_the_last_byte():
    c = conn(True)
    a = c.open_stream()
    c.data_to_send()
    n = 2 * fr.MAX_PAYLOAD + 5
    assert c.send_data(a, bytes(n)) == n
    assert c.outgoing_size == n + 3 * fr.HEADER_SIZE
    c.data_to_send()
    left = mp.INITIAL_WINDOW - n
    # More than the window with fin: takes the window, no FIN, stream still open for writing.
    assert c.send_data(a, bytes(left + 10), fin=True) == left
    assert not any(f.fin for f in frames(c.data_to_send()))
    assert c.send_window(a) == 0
    assert c.send_data(a, b"more") == 0 and c.data_to_send() == b""  # nothing fits
    assert c.send_data(a, b"", fin=True) == 0  # an empty FIN always fits
    assert frames(c.data_to_send()) == [fr.Data(a, b"", True)]
    with pytest.raises(ProtocolError):
        c.send_data(a, b"x")


def test_empty_send_without_fin_queues_nothing():
    c = conn(True)
    a = c.open_stream()
    c.data_to_send()
    assert c.send_data(a, b"") == 0 and c.data_to_send() == b""
    assert c.send_data(a, b"ab", fin=True) == 2
    assert frames(c.data_to_send()) == [fr.Data(a, b"ab", True)]


def test_a_mutable_buffer_is_copied_when_queued():
    c = conn(True)
    a = c.open_stream()
    c.data_to_send()
    buf = bytearray(b"before")
    c.send_data(a, buf)
    buf[:] = b"AFTER!"
    assert frames(c.data_to_send()) == [fr.Data(a, b"before")]


def test_forget_stream_sends_fin_once_and_answers_late_data():
    p = Pair()
    a = p.client.open_stream()
    p.pump()
    p.client.forget_stream(a)
    assert frames(p.client.data_to_send()) == [fr.Data(a, b"", True)]
    p.client.forget_stream(a)  # gone: nothing more
    assert p.client.data_to_send() == b""
    assert p.client.receive_data(data(a, b"late")) == []
    assert frames(p.client.data_to_send()) == [fr.Rst(a, ErrorCode.STREAM_CLOSED)]
    b = p.client.open_stream()
    p.client.end_stream(b)
    p.client.data_to_send()
    p.client.forget_stream(b)  # FIN already sent: none again
    assert p.client.data_to_send() == b""


def test_freed_peer_streams_make_room_and_ours_do_not_count():
    s = conn(False, max_streams=1, accept_backlog=8)
    assert s.receive_data(syn(3)) == [mp.StreamOpened(3)]
    s.stream_accepted(3)
    mine = s.open_stream()  # our own stream does not count against the peer's limit...
    s.forget_stream(mine)  # ...nor does dropping it make room for the peer
    s.data_to_send()
    assert s.receive_data(syn(5)) == []  # refused: 3 is still open
    assert frames(s.data_to_send()) == [fr.Rst(5, ErrorCode.REFUSED_STREAM)]
    s.forget_stream(3)
    s.data_to_send()
    assert s.receive_data(syn(7)) == [mp.StreamOpened(7)]
    assert s.refused_streams == 1


def test_accept_backlog_is_freed_by_accepting_and_never_below_zero():
    s = conn(False, max_streams=100, accept_backlog=2)
    s.stream_accepted(1)  # nothing waiting: stays at zero
    assert s.receive_data(syn(3, 5)) == [mp.StreamOpened(3), mp.StreamOpened(5)]
    assert s.receive_data(syn(7)) == []  # backlog full
    for sid in (3, 5):
        s.stream_accepted(sid)
    s.stream_accepted(5)
    assert s.receive_data(syn(9, 11)) == [mp.StreamOpened(9), mp.StreamOpened(11)]
    assert s.receive_data(syn(13)) == []


def test_syn_flood_needs_more_than_max_refused_in_a_row_and_a_freed_stream_resets_it():
    s = conn(False, max_streams=1, accept_backlog=8, max_refused=2)
    s.receive_data(syn(3))
    assert s.receive_data(syn(5, 7)) == [] and s.terminated is None  # 2 refusals: allowed
    s.forget_stream(3)  # a stream freed: the streak starts again
    s.receive_data(syn(9))
    assert s.receive_data(syn(11, 13)) == [] and s.terminated is None
    ev = s.receive_data(syn(15))
    assert ev[-1].code == ErrorCode.PROTOCOL_ERROR
    assert ev[-1].reason == "SYN flood: 3 streams refused in a row"


def test_after_our_goaway_every_peer_stream_is_refused_and_goaway_is_sent_once():
    s = conn(False)
    s.goaway(ErrorCode.NO_ERROR)
    s.goaway(ErrorCode.PROTOCOL_ERROR)
    # Last peer id before any: 1 for a listener (the dialer's ids start at 3), 0 for a dialer.
    assert frames(s.data_to_send()) == [fr.GoAway(1, ErrorCode.NO_ERROR)]
    assert s.goaway_sent is True
    c = conn(True)
    c.goaway()
    assert frames(c.data_to_send()) == [fr.GoAway(0, ErrorCode.NO_ERROR)]
    assert s.receive_data(syn(3)) == []
    assert frames(s.data_to_send()) == [fr.Rst(3, ErrorCode.REFUSED_STREAM)]


def test_peer_stream_type_is_reported_and_a_second_heartbeat_refused():
    s = conn(False)
    assert s.receive_data(syn(3, stream_type=5)) == [mp.StreamOpened(3, 5)]
    hb = fr.Syn(5, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE)
    assert s.receive_data(fr.encode(hb)) == []
    assert s.receive_data(fr.encode(fr.Syn(7, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE))) == []
    assert frames(s.data_to_send()) == [fr.Rst(7, ErrorCode.STREAM_CLOSED)]


def test_frames_for_ids_never_opened_end_the_session_naming_the_id():
    c = conn(True)
    a = c.open_stream()  # 3; the next would be 5
    c.forget_stream(a)
    assert c.receive_data(data(a, b"")) == []  # opened and closed: fine
    ev = c.receive_data(fr.encode(fr.WndInc(5, 1)))
    assert ev[-1].reason == "frame for stream 5 we never opened"
    s = conn(False)
    ev = s.receive_data(fr.encode(fr.Rst(3, 0)))
    assert ev[-1].reason == "frame for stream 3 the peer never opened"
    s = conn(False)
    ev = s.receive_data(syn(2))
    assert ev[-1].reason == "peer opened stream 2 with our parity"
    s = conn(False)
    ev = s.receive_data(syn(5, 3))
    assert ev[-1].reason == "peer reused stream id 3 (last was 5)"


def test_data_after_fin_resets_that_stream_only():
    s = conn(False)
    s.receive_data(syn(3, 5))
    assert s.receive_data(data(3, b"", True)) == [mp.DataReceived(3, b"", True),
                                                  mp.StreamEnded(3)]
    s.data_to_send()
    assert s.receive_data(data(3, b"")) == []  # empty after FIN: ignored
    assert s.receive_data(data(3, b"x")) == [mp.StreamReset(3, ErrorCode.STREAM_CLOSED,
                                                            remote=False)]
    assert frames(s.data_to_send()) == [fr.Rst(3, ErrorCode.STREAM_CLOSED)]
    assert s.terminated is None
    assert s.receive_data(data(5, b"ok")) == [mp.DataReceived(5, b"ok")]


def test_acknowledge_grants_back_an_eighth_of_the_window_at_a_time():
    s = conn(False)
    s.receive_data(syn(3))
    s.receive_data(data(3, bytes(16383)) * 4 + data(3, bytes(4)))  # the whole 64 KiB
    s.data_to_send()
    s.acknowledge(3, 0)
    s.acknowledge(3, -5)
    s.acknowledge(3, 8191)
    assert s.data_to_send() == b""
    s.acknowledge(3, 1)
    assert frames(s.data_to_send()) == [fr.WndInc(3, 8192)]
    # Exactly the granted bytes may come now, no more.
    assert s.receive_data(data(3, bytes(8192)))[-1] == mp.DataReceived(3, bytes(8192))
    assert s.receive_data(data(3, b"x"))[-1].code == ErrorCode.FLOW_CONTROL_ERROR


def test_no_window_given_back_after_the_peers_fin():
    s = conn(False)
    s.receive_data(syn(3) + data(3, bytes(9000), True))
    s.data_to_send()
    s.acknowledge(3, 9000)
    assert s.data_to_send() == b""


def test_window_opened_only_when_a_full_frame_fits_again():
    p = Pair()
    a = p.client.open_stream()
    p.pump()
    p.client.send_data(a, bytes(mp.INITIAL_WINDOW - (mp.SEND_THRESHOLD - 1)))
    p.client.data_to_send()
    assert p.client.send_window(a) == mp.SEND_THRESHOLD - 1
    assert p.client.receive_data(fr.encode(fr.WndInc(a, 1))) == [mp.WindowOpened(a)]
    assert p.client.receive_data(fr.encode(fr.WndInc(a, 1))) == []  # already open
    assert p.client.receive_data(fr.HEADER.pack(4, 0, fr.TYPE_WNDINC, a) + bytes(4)) == []
    ev = p.client.receive_data(fr.encode(fr.WndInc(a, fr.STREAM_ID_MASK)))
    assert ev[-1].code == ErrorCode.FLOW_CONTROL_ERROR
    assert ev[-1].reason == f"stream {a}: window above 2^31-1"


def test_window_at_exactly_2_31_minus_1_is_allowed():
    c = conn(True)
    a = c.open_stream()
    assert c.receive_data(fr.encode(fr.WndInc(a, fr.STREAM_ID_MASK - mp.INITIAL_WINDOW))) == []
    assert c.terminated is None and c.send_window(a) == fr.STREAM_ID_MASK


def test_heartbeat_stream_window_is_not_a_writer_wakeup():
    c = mp.MuxConnection(True, mp.MuxConfig(receive_window=mp.INITIAL_WINDOW))
    c.data_to_send()
    for _ in range((mp.INITIAL_WINDOW - mp.SEND_THRESHOLD) // 4 + 1):
        assert c.send_heartbeat()
    c.data_to_send()
    assert c.receive_data(fr.encode(fr.WndInc(3, 8))) == []


def test_send_heartbeat_needs_four_bytes_of_window():
    c = mp.MuxConnection(True, mp.MuxConfig(receive_window=mp.INITIAL_WINDOW))
    for _ in range(mp.INITIAL_WINDOW // 4):
        assert c.send_heartbeat()
    assert not c.send_heartbeat()
    c.receive_data(fr.encode(fr.WndInc(3, 3)))
    assert not c.send_heartbeat()
    c.receive_data(fr.encode(fr.WndInc(3, 1)))
    assert c.send_heartbeat()


def test_partial_heartbeat_echoes_are_counted_when_whole():
    c = mp.MuxConnection(True, mp.MuxConfig(receive_window=mp.INITIAL_WINDOW))
    c.data_to_send()
    assert c.receive_data(data(3, bytes(6))) == [mp.HeartbeatEchoed(1)]
    assert c.receive_data(data(3, bytes(2))) == [mp.HeartbeatEchoed(1)]
    assert c.receive_data(data(3, bytes(3))) == []
    assert frames(c.data_to_send()) == [fr.WndInc(3, 6), fr.WndInc(3, 2), fr.WndInc(3, 3)]


def test_our_heartbeat_stream_reset_stops_heartbeats():
    c = mp.MuxConnection(True, mp.MuxConfig(receive_window=mp.INITIAL_WINDOW))
    c.data_to_send()
    assert c.receive_data(fr.encode(fr.Rst(3, ErrorCode.CANCEL))) == []  # not a user stream
    assert not c.send_heartbeat()


def test_goaway_received_is_reported_whole_and_only_once():
    c = conn(True)
    a, b = c.open_stream(), c.open_stream()
    ev = c.receive_data(fr.HEADER.pack(11, 0, fr.TYPE_GOAWAY, 0) + fr.U32X2.pack(a, 2) + b"bye")
    assert ev == [mp.GoAwayReceived(a, ErrorCode.INTERNAL_ERROR, b"bye", [b])]
    assert c.send_window(b) == 0 and c.send_window(a) == mp.INITIAL_WINDOW
    ev = c.receive_data(fr.encode(fr.GoAway(a, 0)))
    assert ev[-1].code == ErrorCode.PROTOCOL_ERROR and ev[-1].reason == "a second GOAWAY"


def test_termination_is_reported_once_with_its_reason():
    s = conn(False)
    ev = s.receive_data(syn(2) + syn(3))
    assert ev == [mp.ConnectionTerminated(ErrorCode.PROTOCOL_ERROR,
                                          "peer opened stream 2 with our parity")]
    assert s.terminated is ev[0] and not ev[0].remote
    assert s.receive_data(syn(5)) == []


def test_grown_windows_start_at_64k_and_double_after_two_windows_read():
    c = conn(True, grow_windows=True, receive_window=2 * mp.INITIAL_WINDOW)
    a = c.open_stream()
    assert frames(c.data_to_send()) == [fr.Syn(a)]  # no early grant: it grows as it is read
    assert c.receive_window(a) == mp.INITIAL_WINDOW and c.receive_window(99) == 0
    whole = data(a, bytes(16383)) * 4 + data(a, bytes(4))  # one 64 KiB window
    c.receive_data(whole)
    c.acknowledge(a, mp.INITIAL_WINDOW)  # one window read: not yet
    assert frames(c.data_to_send()) == [fr.WndInc(a, mp.INITIAL_WINDOW)]
    assert c.receive_window(a) == mp.INITIAL_WINDOW
    c.receive_data(whole)
    c.acknowledge(a, mp.INITIAL_WINDOW)  # two, nothing left unread: doubles
    assert frames(c.data_to_send()) == [fr.WndInc(a, 2 * mp.INITIAL_WINDOW)]
    assert c.receive_window(a) == 2 * mp.INITIAL_WINDOW
    for _ in range(4):  # at receive_window: never more
        c.receive_data(whole)
        c.acknowledge(a, mp.INITIAL_WINDOW)
    assert c.receive_window(a) == 2 * mp.INITIAL_WINDOW
    assert all(f.increment == mp.INITIAL_WINDOW for f in frames(c.data_to_send()))


def test_a_window_with_bytes_unread_does_not_grow():
    c = conn(True, grow_windows=True, receive_window=4 * mp.INITIAL_WINDOW)
    a = c.open_stream()
    c.data_to_send()
    whole = data(a, bytes(16383)) * 4 + data(a, bytes(4))  # one 64 KiB window
    c.receive_data(whole)
    c.acknowledge(a, mp.INITIAL_WINDOW)
    c.receive_data(whole)
    c.acknowledge(a, mp.INITIAL_WINDOW - 1)  # one byte still waits for the application
    c.acknowledge(a, 0)
    assert c.receive_window(a) == mp.INITIAL_WINDOW


def test_shared_window_pool_bounds_extra_windows_across_streams():
    pool = mp.WindowPool(1000)
    c = conn(True, receive_window=mp.INITIAL_WINDOW + 1000, window_pool=pool)
    a = c.open_stream()
    assert frames(c.data_to_send()) == [fr.Syn(a), fr.WndInc(a, 1000)]
    assert (pool.used, pool.refused) == (1000, 0)  # exactly the limit: taken
    b = c.open_stream()
    assert frames(c.data_to_send()) == [fr.Syn(b)]
    assert (pool.used, pool.refused) == (1000, 1)
    c.forget_stream(a)
    assert pool.used == 0
    d = c.open_stream()
    assert pool.used == 1000
    c.terminate(ErrorCode.NO_ERROR, "done")
    assert pool.used == 0  # released with the session
    c.forget_stream(d)
    assert pool.used == 0


def test_untrusted_peer_may_provoke_few_answers_until_trusted():
    def pings(conn, n):
        conn.receive_data(fr.encode(fr.Syn(3, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE)))
        return conn.receive_data(data(3, bytes(4)) * n)

    limits = dict(heartbeat=False, untrusted_answer_burst=4, untrusted_answer_rate=0.0001)
    s = mp.MuxConnection(False, cfg(**limits), trusted=False)
    ev = pings(s, 5)
    assert ev[-1].hostile and ev[-1].code == ErrorCode.PROTOCOL_ERROR
    s = mp.MuxConnection(False, cfg(**limits), trusted=False)
    s.trust()
    assert s.trusted and pings(s, 5) == [] and s.terminated is None


# --- answers the peer provokes, and shared windows (second mutation pass) -------------------

def test_window_pool_counts_takes_and_refusals():
    pool = mp.WindowPool(2000)
    assert pool.take(1000) and pool.take(1000) and pool.used == 2000
    assert not pool.take(1) and not pool.take(1) and pool.refused == 2
    pool.give(500)
    assert pool.used == 1500


def test_pooled_windows_of_several_streams_all_return():
    pool = mp.WindowPool(10_000)
    c = conn(True, receive_window=mp.INITIAL_WINDOW + 1000, window_pool=pool)
    c.open_stream(), c.open_stream()
    assert pool.used == 2000
    c.terminate(ErrorCode.NO_ERROR, "done")
    assert pool.used == 0
    one = mp.WindowPool(1)
    c = conn(True, receive_window=mp.INITIAL_WINDOW + 1, window_pool=one)
    c.forget_stream(c.open_stream())
    assert one.used == 0


def test_freed_budget_is_exactly_what_the_stream_had():
    c = conn(True, receive_window=mp.INITIAL_WINDOW + 1000, session_window_budget=1000)
    c.forget_stream(c.open_stream())
    c.open_stream()
    c.data_to_send()
    e = c.open_stream()  # the budget holds one extra window: this one gets 64 KiB
    assert frames(c.data_to_send()) == [fr.Syn(e)]


def heartbeat_peer(**kw):
    s = mp.MuxConnection(False, cfg(**kw))
    s.receive_data(fr.encode(fr.Syn(3, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE)))
    return s


def test_answers_are_counted_and_bounded_exactly():
    s = heartbeat_peer()
    s.receive_data(data(3, bytes(4)) * 3)
    assert s.answers == 3
    assert s.unsent_answers == 3 * (fr.HEADER_SIZE + 4 + fr.HEADER_SIZE + 4)  # echo + WNDINC
    s.data_to_send()
    assert s.unsent_answers == 3 * 24 and s.unsent_size == 3 * 24  # handed out, not written
    s.batch_written()
    assert s.unsent_answers == 0 and s.unsent_size == 0
    # A bucket of 5 (each frame also costs 1/64): four answers at once are allowed, a fifth
    # is hostile.
    s = heartbeat_peer(answer_burst=5, answer_rate=0.0001)
    assert s.receive_data(data(3, bytes(4)) * 4) == [] and s.terminated is None
    assert s.receive_data(data(3, bytes(4)))[-1].hostile


def test_unwritten_answers_bounded_at_exactly_max_queued_answers():
    s = conn(False, max_streams=100, accept_backlog=100, max_queued_answers=3 * 12)
    s.receive_data(syn(3, 5, 7, 9, 11, 13, 15))
    for sid in (3, 5, 7, 9, 11, 13, 15):
        s.reset_stream(sid)
    s.data_to_send()
    s.batch_written()
    assert s.receive_data(data(3, b"x") + data(5, b"x") + data(7, b"x")) == []
    assert s.unsent_answers == 36 and s.terminated is None  # at the bound: allowed
    s.data_to_send()
    s.batch_written()  # written: three more fit again
    assert s.receive_data(data(9, b"x") + data(11, b"x") + data(13, b"x")) == []
    ev = s.receive_data(data(15, b"x"))  # 48 bytes unwritten: over
    assert ev[-1].hostile and ev[-1].code == ErrorCode.PROTOCOL_ERROR
    assert ev[-1].reason == "peer does not read: 48 bytes of answers unwritten (limit 36)"


def test_a_closed_stream_is_answered_once_among_the_recent_ones():
    s = conn(False, max_streams=2000, accept_backlog=2000, answer_burst=5000)
    ids = [2 * i + 3 for i in range(mp.RECENT_RSTS + 1)]
    s.receive_data(syn(*ids))
    for sid in ids:
        s.reset_stream(sid)
    s.data_to_send()
    s.receive_data(data(ids[0], b"x") * 2)  # answered once
    assert frames(s.data_to_send()) == [fr.Rst(ids[0], ErrorCode.STREAM_CLOSED)]
    s.receive_data(b"".join(data(sid, b"x") for sid in ids[1:]))  # 1,024 more: ids[0] forgotten
    assert len(frames(s.data_to_send())) == mp.RECENT_RSTS
    s.receive_data(data(ids[1], b"x"))  # still among the recent: no answer
    assert s.data_to_send() == b""
    s.receive_data(data(ids[0], b"x"))  # forgotten: answered again
    assert frames(s.data_to_send()) == [fr.Rst(ids[0], ErrorCode.STREAM_CLOSED)]


def test_partial_acknowledge_restores_exactly_the_credit_used():
    s = conn(False)
    s.receive_data(syn(3) + data(3, bytes(8192)))
    s.acknowledge(3, 8192)
    assert frames(s.data_to_send())[-1] == fr.WndInc(3, 8192)
    full = data(3, bytes(16383)) * 4 + data(3, bytes(4))  # the whole window again
    assert s.receive_data(full)[-1] == mp.DataReceived(3, bytes(4))
    ev = s.receive_data(data(3, b"x"))
    assert ev[-1].reason == "stream 3: 1 bytes exceed the window of 0"


def test_peer_streams_do_not_grow_even_when_ours_do():
    s = conn(False, grow_windows=True, grant_peer_streams=False,
             receive_window=2 * mp.INITIAL_WINDOW)
    s.receive_data(syn(3))
    whole = data(3, bytes(16383)) * 4 + data(3, bytes(4))
    for _ in range(3):
        s.receive_data(whole)
        s.acknowledge(3, mp.INITIAL_WINDOW)
    assert s.receive_window(3) == mp.INITIAL_WINDOW


def test_windows_grow_by_doubling_up_to_the_limit_exactly():
    c = conn(True, grow_windows=True, receive_window=3 * mp.INITIAL_WINDOW)
    a = c.open_stream()
    whole = data(a, bytes(16383)) * 4 + data(a, bytes(4))
    for _ in range(2):
        c.receive_data(whole)
        c.acknowledge(a, mp.INITIAL_WINDOW)
    assert c.receive_window(a) == 2 * mp.INITIAL_WINDOW
    # Two windows of 128 KiB more, less one byte: not yet; the last byte: grows to the limit
    # (3 x 64 KiB, not double).
    c.receive_data(whole * 2)
    c.acknowledge(a, 2 * mp.INITIAL_WINDOW)
    c.receive_data(whole * 2)
    c.acknowledge(a, 2 * mp.INITIAL_WINDOW - 1)
    assert c.receive_window(a) == 2 * mp.INITIAL_WINDOW
    c.acknowledge(a, 1)
    assert c.receive_window(a) == 3 * mp.INITIAL_WINDOW
    assert c.terminated is None


def test_backlog_frees_one_slot_per_accept():
    s = conn(False, max_streams=100, accept_backlog=2)
    s.receive_data(syn(3, 5))
    s.stream_accepted(3)
    assert s.receive_data(syn(7)) == [mp.StreamOpened(7)]
    assert s.receive_data(syn(9)) == []


def test_heartbeat_windows_are_given_back_for_ever():
    # The peer's heartbeat stream: its window comes back with every echo (8,200 pings are more
    # than 64 KiB); then one larger ping still fits.
    def feed(conn):
        events = []
        for chunk in [data(3, bytes(4)) * 200] * 41 + [data(3, bytes(64))]:
            events += conn.receive_data(chunk)
            conn.data_to_send()
            conn.batch_written()
        return events

    s = heartbeat_peer(answer_burst=20_000)
    assert feed(s) == [] and s.terminated is None
    # Our heartbeat stream: the peer's echoes likewise.
    c = mp.MuxConnection(True, mp.MuxConfig(receive_window=mp.INITIAL_WINDOW, answer_burst=20_000))
    c.data_to_send()
    ev = feed(c)
    assert c.terminated is None and sum(e.count for e in ev) == 8200 + 16


def test_a_reset_user_stream_leaves_the_heartbeat_alone():
    c = mp.MuxConnection(True, mp.MuxConfig(receive_window=mp.INITIAL_WINDOW))
    a = c.open_stream()
    c.data_to_send()
    assert c.receive_data(fr.encode(fr.Rst(a, ErrorCode.CANCEL))) == [
        mp.StreamReset(a, ErrorCode.CANCEL)]
    assert c.send_heartbeat()


# --- output batches and termination (third mutation pass) ------------------------------------

def test_data_to_send_hands_out_whole_pieces_up_to_about_the_limit():
    c = conn(True)
    ids = [c.open_stream() for _ in range(3)]  # three 8-byte SYNs
    assert c.data_to_send(limit=8) == fr.encode(fr.Syn(ids[0]))
    assert c.outgoing_size == 16
    assert c.data_to_send(limit=9) == syn(*ids[1:])  # at most one piece more than the limit
    assert c.outgoing_size == 0 and c.data_to_send(limit=8) == b""


def test_answers_count_as_unsent_until_their_batch_is_written():
    s = heartbeat_peer()
    own = s.open_stream()
    s.send_data(own, bytes(100))  # 116 bytes of our own output first
    s.receive_data(data(3, bytes(4)))  # then a 24-byte answer
    s.data_to_send(limit=50)  # our output only: the answer still waits
    s.batch_written()
    assert s.unsent_answers == 24
    s.data_to_send()
    assert s.unsent_answers == 24
    s.batch_written()
    assert s.unsent_answers == 0


def test_answer_bucket_refills_with_time():
    now = [0.0]
    s = mp.MuxConnection(False, cfg(answer_burst=5, answer_rate=1.0), clock=lambda: now[0])
    s.receive_data(fr.encode(fr.Syn(3, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE)))
    assert s.receive_data(data(3, bytes(4)) * 4) == []
    now[0] += 10  # the bucket is full again
    assert s.receive_data(data(3, bytes(4)) * 4) == [] and s.terminated is None
    ev = s.receive_data(data(3, bytes(4)) * 2)
    assert ev[-1].reason == ("peer provoked more than 5 answers at once or 1 a second "
                             "(a frame counts 1/64)")
    u = mp.MuxConnection(False, cfg(untrusted_answer_burst=1), trusted=False)
    u.receive_data(fr.encode(fr.Syn(3, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE)))
    ev = u.receive_data(data(3, bytes(4)) * 2)
    assert ev[-1].reason == ("peer provoked more than 1 answers at once or 2 a second before "
                             "Auth (a frame counts 1/64)")


def test_termination_drops_queued_output_only_when_it_is_an_error_of_ours():
    def queued():
        c = conn(True)
        a = c.open_stream()
        c.send_data(a, b"queued")
        return c, a

    c, a = queued()
    ended = c.terminate(ErrorCode.NO_ERROR, "bye")
    assert not ended.hostile and not ended.remote
    assert frames(c.data_to_send()) == [fr.Syn(a), fr.Data(a, b"queued"), fr.GoAway(0, 0)]
    c, a = queued()
    c.terminate(ErrorCode.PROTOCOL_ERROR, "broken")
    assert frames(c.data_to_send()) == [fr.GoAway(0, ErrorCode.PROTOCOL_ERROR)]
    assert c.outgoing_size == 0
    c, a = queued()
    c.terminate(ErrorCode.NO_ERROR, "abuse", hostile=True)
    assert frames(c.data_to_send()) == [fr.GoAway(0, 0)]
    c, a = queued()
    ended = c.terminate(ErrorCode.PROTOCOL_ERROR, "the peer's", remote=True)
    assert ended.remote and frames(c.data_to_send()) == [fr.Syn(a), fr.Data(a, b"queued")]


def test_send_data_counts_headers_exactly_and_takes_a_last_byte_of_window():
    c = conn(True)
    a = c.open_stream()
    c.data_to_send()
    c.send_data(a, bytes(1))
    assert c.outgoing_size == fr.HEADER_SIZE + 1
    c.data_to_send()
    c.send_data(a, bytes(fr.MAX_PAYLOAD))
    assert c.outgoing_size == fr.HEADER_SIZE + fr.MAX_PAYLOAD
    c.data_to_send()
    c.send_data(a, bytes(c.send_window(a) - 1))
    assert c.send_window(a) == 1 and c.send_data(a, b"ab") == 1


def test_both_fins_forget_the_stream():
    p = Pair()
    a = p.client.open_stream()
    p.pump()
    p.server.end_stream(a)
    p.pump()
    assert p.client.open_streams == 1
    p.client.send_data(a, b"last", fin=True)
    assert p.client.open_streams == 0 and p.client.send_window(a) == 0


def test_frames_are_counted_and_capped_exactly_before_trust():
    s = mp.MuxConnection(False, cfg(untrusted_frames=3), trusted=False)
    assert s.frames_received == 0
    assert s.receive_data(syn(3, 5)) == [mp.StreamOpened(3), mp.StreamOpened(5)]
    assert s.receive_data(syn(7)) == [mp.StreamOpened(7)] and s.frames_received == 3
    ev = s.receive_data(syn(9))  # the fourth before trust(): hostile
    assert ev[-1].hostile and ev[-1].reason == "more than 3 frames before Auth"
    t = mp.MuxConnection(False, cfg(untrusted_frames=3), trusted=True)
    t.receive_data(syn(3, 5, 7, 9, 11))
    assert t.terminated is None and t.frames_received == 5


def test_syn_with_fin_opens_a_stream_the_peer_will_not_write_on():
    s = conn(False)
    assert s.receive_data(fr.encode(fr.Syn(3, fin=True))) == [mp.StreamOpened(3),
                                                             mp.StreamEnded(3)]
    s.data_to_send()
    assert s.receive_data(data(3, b"x")) == [mp.StreamReset(3, ErrorCode.STREAM_CLOSED,
                                                            remote=False)]


def test_fresh_connection_has_nothing_unsent():
    c = conn(True)
    assert c.unsent_size == 0 and c.unsent_answers == 0


def test_a_peer_stream_gets_its_larger_window_with_its_first_wndinc():
    # No WNDINC of its own at the SYN: on a fresh public connection that was a TLS record, a
    # send() here and a wake-up of the peer (bench/README.md, "Fresh connections: fewer steps
    # per connection"). Red when the grant goes back to the SYN.
    extra = 1 << 20
    s = conn(False, receive_window=mp.INITIAL_WINDOW + extra)
    s.receive_data(syn(3) + data(3, b"GET / HTTP/1.1\r\n\r\n"))
    assert s.data_to_send() == b"" and s.receive_window(3) == mp.INITIAL_WINDOW
    s.acknowledge(3, 18)  # a request's head: far under an eighth of 64 KiB, nothing due
    assert s.data_to_send() == b""
    s.receive_data(_chunked(3, mp.INITIAL_WINDOW - 18))  # the whole initial window
    s.acknowledge(3, 8192 - 18)
    assert frames(s.data_to_send()) == [fr.WndInc(3, 8192 + extra)]
    assert s.receive_window(3) == mp.INITIAL_WINDOW + extra
    # The peer may now have the larger window in flight, and not a byte more.
    assert isinstance(s.receive_data(_chunked(3, extra + 8192))[-1], mp.DataReceived)
    assert s.receive_data(data(3, b"x"))[-1].code == ErrorCode.FLOW_CONTROL_ERROR


def _chunked(sid, n):
    """n zero bytes of DATA on ``sid`` in frames of at most 16 KiB."""
    step = fr.MAX_PAYLOAD
    return b"".join(data(sid, bytes(min(step, n - i))) for i in range(0, n, step))


def test_peer_streams_that_never_need_a_larger_window_reserve_none():
    # The budget is taken when the grant is sent: many small streams at once leave it whole for
    # the one that reads a lot (each took 1 MiB of it at its SYN before).
    extra = 1 << 20
    s = conn(False, receive_window=mp.INITIAL_WINDOW + extra, session_window_budget=extra)
    sids = [3 + 2 * i for i in range(50)]
    s.receive_data(syn(*sids))
    for sid in sids[:-1]:
        s.receive_data(data(sid, b"small"))
        s.acknowledge(sid, 5)
    big = sids[-1]
    s.receive_data(data(big, bytes(8192)))
    s.acknowledge(big, 8192)
    assert frames(s.data_to_send()) == [fr.WndInc(big, 8192 + extra)]
    assert s.receive_window(big) == mp.INITIAL_WINDOW + extra
    # The budget is spent now: the next stream keeps 64 KiB, and its WNDINCs give back reads.
    s.receive_data(syn(sids[-1] + 2) + data(sids[-1] + 2, bytes(8192)))
    s.acknowledge(sids[-1] + 2, 8192)
    assert frames(s.data_to_send()) == [fr.WndInc(sids[-1] + 2, 8192)]


def test_data_on_an_open_stream_costs_two_python_calls_per_frame_to_decode():
    """The per-request path (bench/README.md, "Per-request cost (issue 16)", kapath pass): a
    read of DATA frames for an open stream is decoded inline, each frame one ``next_frame``
    and the frame's own constructor (it is the DataReceived event), plus a handful per read.
    Before, each frame took eight calls (the in-place decoder, _decode, _handle, _on_data,
    _known_or_idle and a second object for the event)."""
    c, s = mp.MuxConnection(client=True), mp.MuxConnection(client=False)
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    for i in range(64):
        c.send_data(sid, b"request %d" % i)
    wire = c.data_to_send()
    with PythonCalls() as calls:
        events = s.receive_data(wire)
    assert events == [mp.DataReceived(sid, b"request %d" % i) for i in range(64)]
    assert all(type(e) is mp.DataReceived for e in events)
    assert len(calls.names) <= 2 * 64 + 4, calls.names


@pytest.mark.parametrize("size", [1, 13, fr.MAX_PAYLOAD, fr.MAX_PAYLOAD + 1, 40_000])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_send_data_wire_is_the_same_whatever_path_queues_it(size, kind):
    """send_data's one-frame fast path (immutable bytes, within the window) and the general
    path write the same frames: header, payload, split at MAX_PAYLOAD."""
    c = mp.MuxConnection(client=True, config=cfg(heartbeat=False))
    sid = c.open_stream()
    c.data_to_send()
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert c.send_data(sid, kind(payload)) == size
    want = b"".join(fr.encode_data(sid, payload[i:i + fr.MAX_PAYLOAD])
                    for i in range(0, size, fr.MAX_PAYLOAD))
    assert c.outgoing_size == len(want)
    assert bytes(c.data_to_send()) == want
    assert c.send_window(sid) == mp.INITIAL_WINDOW - size


def test_offer_data_takes_only_what_the_room_and_window_allow():
    """offer_data (Stream.send_nowait's, never waiting): 0 with no output room, 0 for a window
    under a frame and under the data (no sliver), else what the window takes."""
    c = mp.MuxConnection(client=True, config=cfg(heartbeat=False, write_high_water=100_000))
    sid = c.open_stream()
    c.data_to_send()
    assert c.offer_data(sid, bytes(13)) == 13
    assert c.offer_data(sid, bytes(70_000)) == mp.INITIAL_WINDOW - 13  # the window's rest
    assert c.offer_data(sid, bytes(10)) == 0  # window 0: wait for WindowOpened
    c.receive_data(fr.encode_wndinc(sid, 200_000))
    room = 100_000 - c.unsent_size
    assert room > mp.SEND_THRESHOLD
    assert c.offer_data(sid, bytes(100_000)) == room  # up to the high-water mark
    assert c.unsent_size >= 100_000
    assert c.offer_data(sid, bytes(10)) == 0  # past the high-water mark: no room
    assert c.offer_data(sid + 2, b"x") == 0  # no such stream (forgotten): nothing taken


@pytest.mark.parametrize("size", [1, 13, fr.MAX_PAYLOAD, fr.MAX_PAYLOAD + 1, 40_000])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_offer_data_wire_is_send_data_s(size, kind):
    """offer_data's inline one-frame step and send_data write the same frames and take the
    same window."""
    wires = []
    for queue in ("send_data", "offer_data"):
        c = mp.MuxConnection(client=True, config=cfg(heartbeat=False))
        sid = c.open_stream()
        c.data_to_send()
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert getattr(c, queue)(sid, kind(payload)) == size
        wires.append((c.outgoing_size, bytes(c.data_to_send()), c.send_window(sid)))
    assert wires[0] == wires[1]


def test_offer_data_of_a_request_is_one_python_call():
    """Stream.send_nowait's offer_data queues a visitor's request (or an origin's answer) in
    one call: send_data's one-frame step is inline (bench/README.md, "Per-request cost (issue
    16)", branch ka3); it was offer_data and send_data, once per keep-alive request in each
    process. A stream closed for writing still raises (send_data's refusal)."""
    c = mp.MuxConnection(client=True, config=cfg(heartbeat=False))
    sid = c.open_stream()
    c.data_to_send()
    for i in range(20):
        with PythonCalls() as calls:
            assert c.offer_data(sid, b"request %d" % i) == len(b"request %d" % i)
        assert calls.names == ["MuxConnection.offer_data"]
    c.end_stream(sid)
    with pytest.raises(ProtocolError):
        c.offer_data(sid, b"after the FIN")


def test_a_window_update_costs_two_python_calls_to_decode():
    """A Go peer acknowledges every Read (a WNDINC per 8 KiB its sink reads): ~131k of them per
    GiB sent to it, decoded inline as DATA is, each one ``next_frame`` and the frame's own
    constructor, plus a handful per read and the WindowOpened once a frame fits (bench/README.md,
    "Whole frames and the Python peers against Go"). Before, each took eight calls (the in-place
    decoder, _decode, _expect, _handle, _on_wndinc, _known_or_idle)."""
    c, s = mp.MuxConnection(client=True), mp.MuxConnection(client=False)
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    c.send_data(sid, bytes(mp.INITIAL_WINDOW))  # the window spent: grants reopen it
    s.receive_data(c.data_to_send())
    wire = fr.encode_wndinc(sid, 1024) * 64
    with PythonCalls() as calls:
        events = c.receive_data(wire)
    assert events == [mp.WindowOpened(sid)]  # at the 16th grant: 16,384 >= a frame
    assert c.send_window(sid) == 64 * 1024
    assert len(calls.names) <= 2 * 64 + 5, calls.names
    # The rules still hold on the inline path: an overflow ends the session, a grant for a
    # stream never opened too.
    ev = c.receive_data(fr.encode_wndinc(sid, fr.STREAM_ID_MASK))
    assert ev[-1].code == ErrorCode.FLOW_CONTROL_ERROR
    c2 = mp.MuxConnection(client=True)
    assert c2.receive_data(fr.encode_wndinc(7, 1))[-1].code == ErrorCode.PROTOCOL_ERROR


def test_frames_left_at_the_frame_budget_are_still_decoded_inline():
    """A read decoded a budget at a time (lib.net.muxsession's YIELD_FRAMES): the decoder lets
    go of the caller's buffer at each stop (detach), and what it copied is decoded in place as
    the read was, two calls a frame, not through the carried path's seven."""
    c, s = mp.MuxConnection(client=True), mp.MuxConnection(client=False)
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    c.send_data(sid, bytes(mp.INITIAL_WINDOW))
    s.receive_data(c.data_to_send())
    wire = bytearray(fr.encode_wndinc(sid, 1024) * 64)
    with PythonCalls() as calls:
        events = c.receive_data(wire, 16)
        wire[:] = bytes(len(wire))  # the caller's buffer, reused: the decoder copied the rest
        while c.more_to_decode:
            events += c.receive_data(b"", 16)
    assert events == [mp.WindowOpened(sid)]
    assert c.send_window(sid) == 64 * 1024
    assert len(calls.names) <= 2 * 64 + 4 * 8, calls.names
