"""Byte vectors from notes/muxado-wire.md (produced by Go muxado's encoder), fed three ways."""
import pytest
from hypothesis import given, settings, strategies as st

from lib.protocol import muxframe as fr
from lib.errors import ErrorCode, ProtocolError

VECTORS = [
    ("00 00 00 01 00 00 00 03", fr.Syn(3)),
    ("00 08 06 01 00 00 00 05 7F FF FF FF FF FF FE FF", fr.Syn(5, 0x7FFFFFFF, 0xFFFFFEFF)),
    ("00 05 00 03 00 00 00 03 68 65 6C 6C 6F", fr.Data(3, b"hello")),
    ("00 00 01 03 00 00 00 03", fr.Data(3, b"", fin=True)),
    ("00 04 00 04 00 00 00 03 00 00 4E 20", fr.WndInc(3, 20000)),
    ("00 04 00 02 00 00 00 03 00 00 00 07", fr.Rst(3, ErrorCode.CANCEL)),
    ("00 08 00 06 00 00 00 00 00 00 00 02 00 00 00 00", fr.GoAway(2, 0)),
    ("00 04 00 02 00 00 28 43 00 00 00 01", fr.Rst(0x2843, 1)),
]


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def decode_all(data):
    d = fr.FrameDecoder()
    d.feed(data)
    out = []
    while (f := d.next_frame()) is not None:
        out.append(f)
    return out, d


@pytest.mark.parametrize("hexs,frame", VECTORS)
def test_encode_matches_go(hexs, frame):
    assert fr.encode(frame) == h(hexs)


@pytest.mark.parametrize("hexs,frame", VECTORS)
def test_decode_whole(hexs, frame):
    frames, d = decode_all(h(hexs))
    assert frames == [frame] and d.buffered == 0


@pytest.mark.parametrize("hexs,frame", VECTORS)
def test_decode_byte_at_a_time(hexs, frame):
    d = fr.FrameDecoder()
    data = h(hexs)
    got = []
    for i in range(len(data)):
        d.feed(data[i:i + 1])
        f = d.next_frame()
        if f is not None:
            got.append((i, f))
    assert got == [(len(data) - 1, frame)]


@pytest.mark.parametrize("hexs,frame", VECTORS)
def test_trailing_bytes_stay_unread(hexs, frame):
    trailer = b"\x00\x05\x00"  # the start of another frame
    frames, d = decode_all(h(hexs) + trailer)
    assert frames == [frame]
    assert d.buffered == len(trailer)


def test_go_close_goaway_with_missing_debug_is_read_tolerantly():
    # Go's Close(): length 31 but only the 8 fixed bytes, then EOF.
    frames, d = decode_all(h("00 1F 00 06 00 00 00 00 00 00 00 02 00 00 00 00"))
    assert frames == [fr.GoAway(2, 0)]
    assert d.buffered == 0


def test_goaway_debug_remainder_is_skipped_as_it_arrives():
    d = fr.FrameDecoder()
    d.feed(h("00 0B 00 06 00 00 00 00 00 00 00 02 00 00 00 00") + b"ab")
    assert d.next_frame() == fr.GoAway(2, 0, b"ab")
    d.feed(b"c" + fr.encode(fr.Data(3, b"x")))  # last debug byte, then a real frame
    assert d.next_frame() == fr.Data(3, b"x")


def test_max_header_fields():
    frames, _ = decode_all(h("3F FF FF 03 7F FF FF FF") + bytes(0x3FFF))
    assert frames[0].stream_id == 0x7FFFFFFF and len(frames[0].data) == 0x3FFF


def test_reserved_bits_ignored_on_read():
    frames, _ = decode_all(h("C0 05 00 E3 80 00 00 03") + b"hello")
    assert frames == [fr.Data(3, b"hello")]


@pytest.mark.parametrize("hexs,code", [
    ("00 00 00 07 00 00 00 03", ErrorCode.PROTOCOL_ERROR),         # unknown type
    ("00 00 00 05 00 00 00 03", ErrorCode.PROTOCOL_ERROR),         # PRI
    ("00 00 00 00 00 00 00 03", ErrorCode.PROTOCOL_ERROR),         # type 0
    ("00 05 00 02 00 00 00 03 00 00 00 00 00", ErrorCode.FRAME_SIZE_ERROR),  # RST length 5
    ("00 0C 00 01 00 00 00 03" + " 00" * 12, ErrorCode.FRAME_SIZE_ERROR),     # SYN length 12
    ("00 04 00 01 00 00 00 03 00 00 00 01", ErrorCode.FRAME_SIZE_ERROR),      # SYN len vs flags
    ("00 04 00 06 00 00 00 00 00 00 00 02", ErrorCode.FRAME_SIZE_ERROR),      # GOAWAY < 8
    ("00 01 00 03 00 00 00 00 41", ErrorCode.PROTOCOL_ERROR),      # DATA on stream 0
])
def test_malformed_frames(hexs, code):
    with pytest.raises(ProtocolError) as e:
        decode_all(h(hexs))
    assert e.value.code == code


def test_encode_refuses_oversized_data():
    with pytest.raises(ValueError):
        fr.encode(fr.Data(3, bytes(fr.MAX_PAYLOAD + 1)))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_random_bytes_raise_only_protocol_error(data, step):
    d = fr.FrameDecoder()
    try:
        for i in range(0, len(data), step):
            d.feed(data[i:i + step])
            while d.next_frame() is not None:
                pass
    except ProtocolError:
        pass


frames_strategy = st.one_of(
    st.builds(fr.Syn, st.integers(1, 0x7FFFFFFF), st.none() | st.integers(0, 0x7FFFFFFF),
              st.none() | st.integers(0, 0xFFFFFFFF)),
    st.builds(fr.Data, st.integers(1, 0x7FFFFFFF), st.binary(max_size=64), st.booleans()),
    st.builds(fr.Rst, st.integers(1, 0x7FFFFFFF), st.integers(0, 7)),
    st.builds(fr.WndInc, st.integers(1, 0x7FFFFFFF), st.integers(1, 0x7FFFFFFF)),
    st.builds(fr.GoAway, st.integers(0, 0x7FFFFFFF), st.integers(0, 7)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(frames_strategy, max_size=20))
def test_encode_decode_round_trip(frames):
    wire = b"".join(fr.encode(f) for f in frames)
    got, d = decode_all(wire)
    assert got == frames and d.buffered == 0
