"""The sans-I/O state machine: a ConnectionPair joined by a fake link, and hostile peers."""
import pytest
from hypothesis import given, settings, strategies as st

from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp
from lib.errors import ErrorCode, ProtocolError


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
