"""A read that is one whole DATA frame (a keep-alive request or answer) is decoded without
feeding the decoder: FrameDecoder.whole_data and MuxConnection.receive_data's fast path give
what feed + next_frame and the decoding loop give, with the same state after (bench/README.md,
"Per-request cost (issue 16)", branch kaone)."""
import pytest

from lib.errors import ErrorCode
from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp
from tests.support.calls import PythonCalls


def _slow(piece):
    d = fr.FrameDecoder()
    d.feed(piece)
    frames = []
    while (f := d.next_frame()) is not None:
        frames.append(f)
    return frames, d.buffered


@pytest.mark.parametrize("piece", [
    fr.encode_data(5, b"hello"),
    fr.encode_data(5, b"x" * fr.MAX_PAYLOAD),
    fr.encode_data(7, b"bye", True),
    memoryview(bytearray(fr.encode_data(9, b"in a view"))),
])
def test_a_piece_of_one_data_frame_is_that_frame(piece):
    frames, left = _slow(piece)
    d = fr.FrameDecoder()
    assert [d.whole_data(piece)] == frames and left == 0
    assert d.buffered == 0  # untouched: nothing fed
    assert d.next_frame() is None


@pytest.mark.parametrize("piece", [
    b"",
    fr.encode_data(5, b"hello")[:-1],                         # a frame's start
    fr.encode_data(5, b"hello") + fr.encode_data(5, b"more"),  # two frames
    fr.encode_data(5, b"hello") + b"\x00",                     # and a byte of the next
    fr.encode_wndinc(5, 100),                                  # not DATA
    fr.HEADER.pack(5, 0, fr.TYPE_DATA, 0) + b"hello",          # stream 0: the decoder's error
])
def test_anything_else_is_left_to_feed(piece):
    d = fr.FrameDecoder()
    assert d.whole_data(piece) is None
    assert d.buffered == 0


def test_nothing_is_taken_whole_while_the_decoder_carries_bytes():
    first = fr.encode_data(5, b"first")
    d = fr.FrameDecoder()
    d.feed(first[:3])
    assert d.next_frame() is None and d.buffered == 3
    # The rest of the first frame plus a whole second one: the second is not "the" piece's
    # frame, the carried start comes first.
    assert d.whole_data(fr.encode_data(5, b"second")) is None
    d.feed(first[3:])
    assert d.next_frame() == fr.Data(5, b"first")


def _pair():
    c, s = mp.MuxConnection(client=True), mp.MuxConnection(client=False)
    sid = c.open_stream()
    c.send_data(sid, b"open")
    s.receive_data(c.data_to_send())
    return c, s, sid


def test_a_one_frame_read_is_decoded_in_two_calls_with_the_loop_s_state_after():
    c, s, sid = _pair()
    c.send_data(sid, b"request")
    wire = c.data_to_send()
    received = s.frames_received
    with PythonCalls() as calls:
        events = s.receive_data(memoryview(bytearray(wire)))
    assert events == [mp.DataReceived(sid, b"request")]
    # whole_data, the event's constructor, _spend: no feed, no next_frame.
    assert "FrameDecoder.feed" not in calls.names and "FrameDecoder.next_frame" not in calls.names
    assert len(calls.names) <= 5, calls.names
    assert s.frames_received == received + 1
    assert s.receive_window(sid) == mp.INITIAL_WINDOW
    # The next read goes on as usual: two frames in one piece take the loop.
    c.send_data(sid, b"one")
    c.send_data(sid, b"two")
    assert s.receive_data(c.data_to_send()) == [mp.DataReceived(sid, b"one"),
                                                mp.DataReceived(sid, b"two")]


def test_a_one_frame_read_past_the_window_is_still_a_flow_control_error():
    c, s, sid = _pair()
    s.receive_data(c.data_to_send())
    big = fr.encode_data(sid, b"x" * fr.MAX_PAYLOAD)
    events = []
    for _ in range(mp.INITIAL_WINDOW // fr.MAX_PAYLOAD + 1):
        events += s.receive_data(big)
    assert s.terminated is not None and s.terminated.code == ErrorCode.FLOW_CONTROL_ERROR
    assert events[-1] is s.terminated


def test_a_one_frame_read_with_fin_takes_the_loop():
    c, s, sid = _pair()
    c.end_stream(sid)
    assert mp.StreamEnded(sid) in s.receive_data(c.data_to_send())


def test_one_frame_reads_before_trust_still_count_against_the_untrusted_bound():
    config = mp.MuxConfig(heartbeat=False, untrusted_frames=8)
    c = mp.MuxConnection(client=True, config=config)
    u = mp.MuxConnection(client=False, config=config, trusted=False)
    sid = c.open_stream()
    c.send_data(sid, b"open")
    u.receive_data(c.data_to_send())
    for i in range(10):
        c.send_data(sid, b"%d" % i)
        u.receive_data(c.data_to_send())  # one DATA frame a read
    assert u.terminated is not None and u.terminated.hostile
