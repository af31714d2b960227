"""muxado v1 frame codec: byte vectors fed three ways (whole, a byte at a time, with trailing
bytes), each vector encoded in the suite by Debian's Go muxado (tests/go/frameenc) and compared,
and properties over random frames and random bytes.

GOAWAY is our one deliberate deviation from Go's writer (docs/PROTOCOL.md, "GOAWAY length"): Go
declares 16 + len(debug) and writes only the 8 fixed bytes; we declare 8.
"""
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


def go_request(frame) -> str:
    """frame as one request line of tests/go/frameenc."""
    if isinstance(frame, fr.Syn):
        assert not frame.fin  # muxado's writer has the flag; we never send it (PROTOCOL.md)
        return f"syn {frame.stream_id} {frame.priority or 0} {frame.stream_type or 0} 0"
    if isinstance(frame, fr.Data):
        return f"data {frame.stream_id} {frame.data.hex() or '-'} {int(frame.fin)}"
    if isinstance(frame, fr.Rst):
        return f"rst {frame.stream_id} {frame.code}"
    if isinstance(frame, fr.WndInc):
        return f"wndinc {frame.stream_id} {frame.increment}"
    return f"goaway {frame.last_stream_id} {frame.code} {frame.debug.hex() or '-'}"


def go_goaway_length(our_bytes: bytes, debug: bytes = b"") -> bytes:
    """Our GOAWAY with the length Go's writer declares (16 + len(debug), header included)."""
    return (16 + len(debug)).to_bytes(2, "big") + our_bytes[2:]


@pytest.mark.parametrize("hexs,frame", VECTORS)
def test_encode_matches_vector(hexs, frame):
    assert fr.encode(frame) == h(hexs)


def test_vectors_are_what_go_muxado_encodes(go_frame_encoder):
    go = go_frame_encoder([go_request(frame) for _, frame in VECTORS])
    for (hexs, frame), got in zip(VECTORS, go):
        if isinstance(frame, fr.GoAway):
            assert got == go_goaway_length(h(hexs)), (frame, got)
        else:
            assert got == h(hexs), (frame, got)


def test_go_goaway_declares_debug_it_never_writes(go_frame_encoder):
    # The deviation in full: Go declares 16 + 3 bytes, writes 8 after the header, never "abc".
    (got,) = go_frame_encoder([go_request(fr.GoAway(2, 1, b"abc"))])
    assert got == h("00 13 00 06 00 00 00 00 00 00 00 02 00 00 00 01")
    assert got == go_goaway_length(fr.encode(fr.GoAway(2, 1)), b"abc")
    frames, d = decode_all(got)  # and we read what Go writes
    assert frames == [fr.GoAway(2, 1)] and d.buffered == 0


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


@pytest.mark.parametrize("hexs,code,message", [
    ("00 00 00 07 00 00 00 03", ErrorCode.PROTOCOL_ERROR, "unknown frame type 7"),
    ("00 00 00 05 00 00 00 03", ErrorCode.PROTOCOL_ERROR, "unknown frame type 5"),  # PRI
    ("00 00 00 00 00 00 00 03", ErrorCode.PROTOCOL_ERROR, "unknown frame type 0"),
    ("00 05 00 02 00 00 00 03 00 00 00 00 00", ErrorCode.FRAME_SIZE_ERROR, "RST length must be 4"),
    ("00 03 00 04 00 00 00 03 00 00 01", ErrorCode.FRAME_SIZE_ERROR, "WNDINC length must be 4"),
    ("00 0C 00 01 00 00 00 03" + " 00" * 12, ErrorCode.FRAME_SIZE_ERROR,
     "SYN length 12 does not match flags 0x0"),
    ("00 04 00 01 00 00 00 03 00 00 00 01", ErrorCode.FRAME_SIZE_ERROR,
     "SYN length 4 does not match flags 0x0"),
    ("00 04 00 06 00 00 00 00 00 00 00 02", ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length 4 < 8"),
    ("00 01 00 03 00 00 00 00 41", ErrorCode.PROTOCOL_ERROR, "frame type 3 on stream 0"),
    ("00 04 00 04 00 00 00 00 00 00 00 01", ErrorCode.PROTOCOL_ERROR, "frame type 4 on stream 0"),
])
def test_malformed_frames(hexs, code, message):
    d = fr.FrameDecoder()
    d.feed(h(hexs))
    with pytest.raises(ProtocolError) as e:
        d.next_frame()
    assert e.value.code == code and e.value.args[0] == message  # the wire code and the log line
    # The session is over: the decoder refuses to go on, whatever is fed next.
    d.feed(fr.encode(fr.Data(3, b"x")))
    with pytest.raises(ProtocolError) as again:
        d.next_frame()
    assert again.value.args[0] == "decoder used after a protocol error"


def test_syn_fin_flag_and_priority_with_fin():
    # We never send SYN FIN, but muxado defines it: read and written as the flag says.
    for frame, hexs in [(fr.Syn(3, fin=True), "00 00 01 01 00 00 00 03"),
                        (fr.Syn(3, priority=1, fin=True), "00 04 03 01 00 00 00 03 00 00 00 01"),
                        (fr.Syn(3, stream_type=2), "00 04 04 01 00 00 00 03 00 00 00 02")]:
        assert fr.encode(frame) == h(hexs)
        assert decode_all(h(hexs))[0] == [frame]


def test_new_decoder_holds_nothing():
    d = fr.FrameDecoder()
    assert d.buffered == 0 and d.next_frame() is None


def test_goaway_debug_remainder_skipped_across_many_pieces():
    d = fr.FrameDecoder()
    # GOAWAY declaring 10 debug bytes; they arrive 3, 4 and 3 at a time, then a DATA frame.
    d.feed(h("00 12 00 06 00 00 00 00 00 00 00 02 00 00 00 00") + b"abc")
    assert d.next_frame() == fr.GoAway(2, 0, b"abc")
    d.feed(b"defg")
    assert d.next_frame() is None and d.buffered == 0
    d.feed(b"hij" + fr.encode(fr.Data(3, b"x")))
    assert d.next_frame() == fr.Data(3, b"x") and d.buffered == 0


def test_encode_bounds():
    assert fr.encode_data(3) == h("00 00 00 03 00 00 00 03")  # empty, no FIN by default
    assert len(fr.encode(fr.Data(3, bytes(fr.MAX_PAYLOAD)))) == fr.HEADER_SIZE + fr.MAX_PAYLOAD
    with pytest.raises(ValueError, match=f"DATA payload of {fr.MAX_PAYLOAD + 1} bytes exceeds"):
        fr.encode_data(3, bytes(fr.MAX_PAYLOAD + 1))
    for bad in (0, fr.STREAM_ID_MASK + 1):
        with pytest.raises(ValueError, match=f"window increment {bad} out of range"):
            fr.encode(fr.WndInc(3, bad))
    assert fr.encode(fr.WndInc(3, fr.STREAM_ID_MASK))[8:] == h("7F FF FF FF")
    with pytest.raises(TypeError, match="not a muxado frame"):
        fr.encode(object())


def test_encode_refuses_oversized_data():
    with pytest.raises(ValueError):
        fr.encode(fr.Data(3, bytes(fr.MAX_PAYLOAD + 1)))


def decode_pieces(data, step):
    """(frames with GOAWAY debug dropped, error code or None, bytes left buffered), feeding
    ``data`` ``step`` bytes at a time and draining after each piece."""
    d = fr.FrameDecoder()
    frames = []
    try:
        for i in range(0, len(data), step):
            d.feed(data[i:i + step])
            while (f := d.next_frame()) is not None:
                frames.append(fr.GoAway(f.last_stream_id, f.code) if isinstance(f, fr.GoAway)
                              else f)
    except ProtocolError as e:
        return frames, e.code, d.buffered
    return frames, None, d.buffered


def wire_size(frame) -> int:
    if isinstance(frame, fr.Data):
        return fr.HEADER_SIZE + len(frame.data)
    if isinstance(frame, fr.Syn):
        return fr.HEADER_SIZE + 4 * (frame.priority is not None) + 4 * (frame.stream_type is not None)
    return fr.HEADER_SIZE + 4


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.integers(2, 40))
def test_random_bytes_decode_the_same_in_any_pieces(data, step):
    # Only ProtocolError may escape (anything else fails the test), and the three ways agree:
    # the whole buffer, a byte at a time and ``step`` bytes at a time give the same frames and
    # the same error; every frame decoded re-encodes to itself.
    whole = decode_pieces(data, max(1, len(data)))
    assert decode_pieces(data, 1)[:2] == whole[:2]
    assert decode_pieces(data, step)[:2] == whole[:2]
    frames, code, buffered = whole
    for f in frames:
        if isinstance(f, fr.WndInc) and f.increment == 0:
            continue  # legal on the wire (ignored by the state machine), refused by our encoder
        assert decode_all(fr.encode(f))[0] == [f]
    if code is None and not any(isinstance(f, fr.GoAway) for f in frames):
        # What is not a whole frame stays buffered, and only that: one partial frame.
        assert buffered == len(data) - sum(wire_size(f) for f in frames)
        assert buffered < fr.HEADER_SIZE or \
            buffered < fr.HEADER_SIZE + (int.from_bytes(data[-buffered:][:2], "big") & 0x3FFF)


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


@settings(max_examples=300, deadline=None)
@given(st.lists(frames_strategy.filter(lambda f: not isinstance(f, fr.GoAway)), min_size=1,
                max_size=20))
def test_go_muxado_encodes_random_frames_as_we_do(go_frame_encoder, frames):
    # Go's writer has no way to send a present-but-zero priority or type (0 means absent), and
    # no SYN FIN (we never send one): compare the frames both can write.
    frames = [fr.Syn(f.stream_id, f.priority or None, f.stream_type or None)
              if isinstance(f, fr.Syn) else f for f in frames]
    assert go_frame_encoder([go_request(f) for f in frames]) == [fr.encode(f) for f in frames]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([h(x) for x, _ in VECTORS] + [fr.encode_data(5, bytes(300))]),
                min_size=1, max_size=12),
       st.lists(st.integers(1, 400), min_size=1, max_size=8), st.integers(0, 6))
def test_pieces_fed_before_the_last_is_drained(frames, cuts, drain_every):
    # The decoder decodes a piece where it lies and keeps a view of it: fed again before it
    # returned None, it must carry the undecoded rest, in order, whatever frames were taken in
    # between (its carried buffer then holds many frames, compacted as it is topped up).
    data = b"".join(frames)
    want = decode_all(data)[0]
    d = fr.FrameDecoder()
    got = []
    pos = i = 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        d.feed(bytearray(data[pos:pos + n]))  # a fresh buffer each time, as a socket read
        pos += n
        i += 1
        for _ in range(drain_every):
            f = d.next_frame()
            if f is None:
                break
            got.append(f)
    while (f := d.next_frame()) is not None:
        got.append(f)
    strip = [fr.GoAway(f.last_stream_id, f.code) if isinstance(f, fr.GoAway) else f for f in got]
    assert strip == [fr.GoAway(f.last_stream_id, f.code) if isinstance(f, fr.GoAway) else f
                     for f in want] and d.buffered == 0


def test_a_fed_buffer_is_let_go_once_decoded_or_detached():
    # A view kept on a caller's bytearray would forbid resizing it (BufferError): after None
    # (every byte decoded or carried) or detach() the decoder holds none.
    frame = fr.encode_data(3, b"x" * 100)
    buf = bytearray(frame + frame[:20])
    d = fr.FrameDecoder()
    d.feed(buf)
    assert d.next_frame() == fr.Data(3, b"x" * 100)
    assert d.next_frame() is None
    buf += b"more"  # no export left
    d.feed(bytearray(frame[20:]))
    assert d.next_frame() == fr.Data(3, b"x" * 100) and d.buffered == 0
    buf2 = bytearray(frame * 3)
    d.feed(buf2)
    assert d.next_frame() == fr.Data(3, b"x" * 100)
    d.detach()  # a caller stopping at a budget
    buf2[:] = b"\xff" * len(buf2)  # reused: what was not decoded was copied
    assert [d.next_frame(), d.next_frame(), d.next_frame()] == [fr.Data(3, b"x" * 100)] * 2 + [None]


def test_wndinc_fast_path_is_the_frame_and_checks_its_bounds():
    assert fr.encode_wndinc(3, 20000) == h("00 04 00 04 00 00 00 03 00 00 4E 20")
    for sid, inc in ((1, 1), (0x7FFFFFFF, fr.STREAM_ID_MASK), (2, 65536)):
        assert fr.encode_wndinc(sid, inc) == fr.encode(fr.WndInc(sid, inc))
    for bad in (0, -1, fr.STREAM_ID_MASK + 1):
        with pytest.raises(ValueError, match="out of range"):
            fr.encode_wndinc(3, bad)


@pytest.mark.parametrize("cls", [fr.Syn, fr.Data, fr.Rst, fr.WndInc, fr.GoAway])
def test_frames_are_values_made_without_a_python_setattr(cls):
    # One is made per frame received: a frozen dataclass sets each field through
    # object.__setattr__ (1.4 us for a Data, against 0.3 us: bench/README.md, "Bulk and the
    # multiplexer against Go"). They stay values: equal and hashed by their fields.
    assert "__setattr__" not in vars(cls)
    a, b = cls(3, 7), cls(3, 7)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1 and a != cls(5, 7)


def _changed(frame: bytes, at: int, value: int) -> bytes:
    return frame[:at] + bytes([value]) + frame[at + 1:] if at < len(frame) else frame


# Frames as a peer writes them, then now and then one byte changed: in the header (a flag, the
# type, the length, the id's reserved bit) or in the payload's first word (a WNDINC's or a SYN
# field's reserved bit). Bare SYN and FIN headers, whole DATA and WNDINC frames are what the
# decoder's inline steps take (next_frame); a byte at a time takes none of them.
_wire_frames = st.lists(st.one_of(
    frames_strategy.map(fr.encode),
    st.builds(lambda sid, fin: fr.encode(fr.Syn(sid, fin=fin)), st.integers(1, 9), st.booleans()),
    st.builds(fr.encode_data, st.integers(1, 9), st.binary(max_size=8), st.booleans()),
    st.builds(_changed, frames_strategy.map(fr.encode), st.integers(0, 11), st.integers(0, 255)),
), min_size=1, max_size=12)


@settings(max_examples=1500, deadline=None)
@given(_wire_frames, st.integers(2, 40))
def test_the_inline_steps_decode_as_the_carried_path_does(frames, step):
    data = b"".join(frames)
    whole = decode_pieces(data, len(data))
    assert decode_pieces(data, 1)[:2] == whole[:2]
    assert decode_pieces(data, step)[:2] == whole[:2]


def test_whole_data_is_the_one_data_frame_a_piece_is_or_none():
    # A keep-alive read is one DATA frame: whole_data gives it without feed/next_frame.
    d = fr.FrameDecoder()
    assert d.whole_data(fr.encode_data(3, b"req")) == fr.Data(3, b"req")
    assert d.whole_data(fr.encode_data(5, b"", True)) == fr.Data(5, b"", True)
    assert d.whole_data(memoryview(fr.encode_data(7, b"x" * 16383))) == fr.Data(7, b"x" * 16383)
    # The reserved bit of the id is ignored, as next_frame does; the flags other than FIN too.
    assert d.whole_data(h("00 02 00 03 80 00 00 03 68 69")) == fr.Data(3, b"hi")
    assert d.whole_data(h("00 02 FE 03 00 00 00 03 68 69")) == fr.Data(3, b"hi")
    assert d.whole_data(h("00 02 03 83 00 00 00 03 68 69")) == fr.Data(3, b"hi", True)
    assert d.buffered == 0
    frame = fr.encode_data(3, b"req")
    for piece in (frame[:7],  # shorter than a header
                  frame[:-1], frame + b"\x00",  # the length is not the piece's
                  frame + fr.encode_data(3, b"more"),  # two frames
                  fr.encode(fr.Rst(3, 1)), fr.encode_wndinc(3, 5), fr.encode(fr.Syn(3)),
                  fr.encode_data(0, b"req")):  # stream 0: next_frame's error to raise
        assert d.whole_data(piece) is None, piece
    assert d.buffered == 0  # untouched
    # Something carried or pending from an earlier piece: the piece is not a frame of its own.
    carried = fr.FrameDecoder()
    carried.feed(frame[:5])
    assert carried.next_frame() is None and carried.whole_data(frame) is None
    pending = fr.FrameDecoder()
    pending.feed(frame)
    assert pending.whole_data(frame) is None
    skipping = fr.FrameDecoder()
    skipping.feed(go_goaway_length(fr.encode(fr.GoAway(1, 0)), b"dbg"))  # 3 debug bytes due
    assert skipping.next_frame() == fr.GoAway(1, 0) and skipping.whole_data(frame) is None
    failed = fr.FrameDecoder()
    failed.feed(h("00 00 00 00 00 00 00 03"))
    with pytest.raises(ProtocolError):
        failed.next_frame()
    assert failed.whole_data(frame) is None


@pytest.mark.parametrize("fmt", ["H", "I"])
def test_views_of_wider_items_are_read_as_bytes(fmt):
    # A buffer of 2- or 4-byte items (an array, a cast view) is decoded by its bytes.
    frames = fr.encode_data(3, b"abcdefgh") + fr.encode(fr.Rst(3, 7))  # 28 bytes
    got, d = decode_all(memoryview(frames).cast(fmt))
    assert got == [fr.Data(3, b"abcdefgh"), fr.Rst(3, 7)] and d.buffered == 0
    got, _ = decode_all(memoryview(frames).cast("B", (len(frames) // 4, 4)))  # two dimensions
    assert got == [fr.Data(3, b"abcdefgh"), fr.Rst(3, 7)]


def test_detach_keeps_decoding_with_nothing_carried_and_with_a_start_carried():
    # detach() with nothing carried makes the rest the piece decoded in place: frames that
    # take the full path (RST, GOAWAY), then a frame's start carried and completed later.
    data = fr.encode_data(3, b"x") + fr.encode(fr.Rst(3, 2)) + fr.encode(fr.GoAway(5, 1))
    tail = fr.encode_data(3, b"tail")
    buf = bytearray(data + tail[:5])
    d = fr.FrameDecoder()
    d.feed(buf)
    assert d.next_frame() == fr.Data(3, b"x")
    d.detach()
    buf[:] = b"\xff" * len(buf)
    assert d.next_frame() == fr.Rst(3, 2)
    assert d.next_frame() == fr.GoAway(5, 1)
    assert d.next_frame() is None and d.buffered == 5
    d.feed(tail[5:])
    assert d.next_frame() == fr.Data(3, b"tail") and d.buffered == 0
    # Something carried and a new piece fed: detach() keeps the carried start (copies the
    # piece after it), not the piece alone.
    d = fr.FrameDecoder()
    d.feed(tail[:5])
    assert d.next_frame() is None
    buf = bytearray(tail[5:] + fr.encode(fr.Rst(3, 1)))
    d.feed(buf)
    d.detach()
    buf[:] = b"\xff" * len(buf)
    assert [d.next_frame(), d.next_frame(), d.next_frame()] == [
        fr.Data(3, b"tail"), fr.Rst(3, 1), None]
