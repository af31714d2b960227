"""A stream's common lifecycle, counted, and the inline steps held to the rules' handlers.

The common lifecycle is one HTTP exchange per stream, as a fresh public connection makes in each
process: the proxy opens the stream with SYN and the request's DATA, the client answers and
ends, the proxy ends, both forget the stream (bench/README.md, "Per-request cost (issue 16)",
branch fmux). The counts pinned here go red when that pass's steps are undone. The inline steps
(``MuxConnection.inline_frames``, the decoder's inline SYN) must give what the rules' handlers
give: each case of the table runs both ways and compares events, output and the session's end.
"""
from __future__ import annotations

from collections import Counter

import gevent
import pytest

from lib.errors import ErrorCode, ProtocolError
from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp
from tests.support.calls import Opcodes, PythonCalls
from tests.support.muxpair import session_pair

REQUEST = b"GET /small HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world\n"


def _pair():
    """(proxy, client) as the two processes configure theirs (the proxy opens visitors'
    streams with growing windows and grants the client's none)."""
    proxy = mp.MuxConnection(False, mp.MuxConfig(heartbeat=False, grow_windows=True,
                                                 grant_peer_streams=False))
    client = mp.MuxConnection(True, mp.MuxConfig(heartbeat=False))
    return proxy, client


def _lifecycle(proxy, client) -> list:
    sid = proxy.open_stream()
    assert proxy.offer_data(sid, REQUEST) == len(REQUEST)
    events = client.receive_data(proxy.data_to_send())  # SYN + DATA in one read
    client.stream_accepted(sid)
    client.acknowledge(sid, len(REQUEST))
    assert client.offer_data(sid, ANSWER) == len(ANSWER)
    client.end_stream(sid)
    events += proxy.receive_data(client.data_to_send())  # the answer's DATA and FIN
    proxy.acknowledge(sid, len(ANSWER))
    proxy.end_stream(sid)
    proxy.forget_stream(sid)
    events += client.receive_data(proxy.data_to_send())  # the proxy's FIN
    client.forget_stream(sid)
    proxy.batch_written()
    client.batch_written()
    return events


def test_the_common_lifecycle_gives_its_events_and_frees_the_stream():
    proxy, client = _pair()
    events = _lifecycle(proxy, client)
    sid = 2
    assert events == [mp.StreamOpened(sid), mp.DataReceived(sid, REQUEST),
                      mp.DataReceived(sid, ANSWER), mp.DataReceived(sid, b"", True),
                      mp.StreamEnded(sid), mp.DataReceived(sid, b"", True), mp.StreamEnded(sid)]
    assert proxy.open_streams == client.open_streams == 0
    assert not proxy.data_to_send() and not client.data_to_send()  # nothing else was queued


def test_the_common_lifecycle_runs_few_python_calls_and_bytecodes():
    proxy, client = _pair()
    _lifecycle(proxy, client)  # warm (the first stream of a session is not the common one)
    with PythonCalls(under="lib") as calls:
        _lifecycle(proxy, client)
    with Opcodes() as ops:
        _lifecycle(proxy, client)
    counts = Counter(calls.names)
    # Both processes' state machines, one stream: 62 calls and 2,855 bytecodes at main
    # 3887563; 37 and 2,115 with the branch fmux (bench/README.md, "Per-request cost (issue
    # 16)"; 2,160 before the answer bucket's limits were looked up at trust, not per read:
    # MuxConnection._spend). Gone: _open, encode, _header, _grant_extra (open_stream's SYN is a bare header),
    # _emit, encode_data, _local_fin (end_stream's and forget_stream's FIN), _unreserve (no
    # larger window to give back), _handle, _on_data, _known_or_idle (DATA+FIN inline, a FIN
    # read alone too), and the decoder's _next_in_place, _decode, _syn, _expect for a SYN with
    # no fields.
    for gone in ("MuxConnection._open", "encode", "MuxConnection._grant_extra",
                 "MuxConnection._emit", "encode_data", "MuxConnection._local_fin",
                 "MuxConnection._unreserve", "MuxConnection._on_data",
                 "FrameDecoder._decode", "FrameDecoder._syn"):
        assert gone not in counts, counts
    assert sum(counts.values()) <= 37, counts
    assert ops.total <= 2120, ops.counts


# --- the inline steps against the rules' handlers ---------------------------------------------

def _syn(sid, fin=False):
    return fr.encode(fr.Syn(sid, fin=fin))


def _data(sid, payload=b"", fin=False):
    return fr.encode_data(sid, payload, fin)


# Each case: what the fed side (a dialler: stream 3 is its own, the peer's are even) did before,
# then its reads (lists of frames sent together).
CASES = {
    "syn, data": ([], [[_syn(2), _data(2, b"req")]]),
    "syn+fin": ([], [[_syn(2, fin=True)]]),
    "syn, data+fin": ([], [[_syn(2), _data(2, b"req", True)]]),
    "syn, data, fin alone": ([], [[_syn(2), _data(2, b"req")], [_data(2, b"", True)]]),
    "fin then data after it": ([], [[_syn(2), _data(2, b"", True)], [_data(2, b"late")]]),
    "fin twice": ([], [[_syn(2), _data(2, b"", True), _data(2, b"", True)]]),
    "data beyond the window": ([], [[_syn(2)] + [_data(2, b"x" * 16383)] * 4
                                    + [_data(2, b"xxxxx")]]),
    "a whole read beyond the window": (["open", "fill"], [[_data(3, b"xxxx")]]),
    "data filling the window exactly": ([], [[_syn(2)] + [_data(2, b"x" * 16383)] * 4
                                             + [_data(2, b"xxxx")]]),
    "a whole read filling the window exactly": (["open", "fill"], [[_data(3, b"xxx")]]),
    "data on an id never opened": ([], [[_data(6, b"x")]]),
    "fin on an id never opened": ([], [[_data(6, b"", True)]]),
    "syn with our parity": ([], [[_syn(3)]]),
    "syn id reused": ([], [[_syn(2), _syn(2)]]),
    "syn id going down": ([], [[_syn(4), _syn(2)]]),
    "our stream, data and fin": (["open"], [[_data(3, b"ans"), _data(3, b"", True)]]),
    "our stream ended by us, then the peer's fin": (["open", "end"], [[_data(3, b"ans", True)]]),
    "our stream ended by us, then a fin alone": (["open", "end"], [[_data(3, b"", True)]]),
    "our stream forgotten, late data": (["open", "forget"], [[_data(3, b"late")]]),
    "our stream forgotten, late fin": (["open", "forget"], [[_data(3, b"", True)]]),
    "our stream reset by the peer, then data": (["open"], [[fr.encode(fr.Rst(3, 1)),
                                                             _data(3, b"x")]]),
    "grant then fin": (["open"], [[fr.encode_wndinc(3, 100), _data(3, b"", True)]]),
    "grant past 2^31-1": (["open"], [[fr.encode_wndinc(3, fr.STREAM_ID_MASK)]]),
    "syn with a type": ([], [[fr.encode(fr.Syn(2, stream_type=7)), _data(2, b"x")]]),
    "syn with a priority, fin": ([], [[fr.encode(fr.Syn(2, priority=9, fin=True))]]),
    "a whole read of one data frame": (["open"], [[_data(3, b"one")]]),
    "a whole read of one fin": (["open"], [[_data(3, b"", True)]]),
    "a whole read of data and fin": (["open"], [[_data(3, b"one", True)]]),
    "the peer's heartbeat, then a fin on it": ([], [[fr.encode(fr.Syn(
        2, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE)), _data(2, b"ping")], [_data(2, b"", True)]]),
    "goaway then data": (["open"], [[fr.encode(fr.GoAway(0, 0)), _data(3, b"x")]]),
}


def _run(case: str, inline: bool):
    before, reads = CASES[case]
    # The client is the dialler here (odd ids of its own from 3); "open" opens its stream 3.
    conn = mp.MuxConnection(True, mp.MuxConfig(heartbeat=False, receive_window=65536))
    conn.inline_frames = inline
    for step in before:
        if step == "open":
            assert conn.open_stream() == 3
        elif step == "end":
            conn.end_stream(3)
        elif step == "forget":
            conn.forget_stream(3)
        elif step == "fill":  # the peer has used all of the window but 3 bytes
            conn.receive_data(b"".join([_data(3, b"x" * 16383)] * 4 + [_data(3, b"x")]))
    conn.data_to_send()
    seen = []
    for read in reads:
        seen.append((conn.receive_data(b"".join(read)), bytes(conn.data_to_send()),
                     conn.open_streams, conn.send_window(3), conn.receive_window(3)))
    return seen, conn.terminated, conn.answers


@pytest.mark.parametrize("case", sorted(CASES))
def test_inline_steps_answer_as_the_rules_handlers_do(case):
    assert _run(case, True) == _run(case, False)


def test_the_table_reaches_the_rules_it_names():
    # A few of the table's verdicts, so that both ways agreeing is not both ways doing nothing.
    assert _run("data beyond the window", True)[1].code == ErrorCode.FLOW_CONTROL_ERROR
    assert _run("a whole read beyond the window", True)[1].code == ErrorCode.FLOW_CONTROL_ERROR
    assert _run("syn id reused", True)[1].code == ErrorCode.PROTOCOL_ERROR
    for case in ("data filling the window exactly", "a whole read filling the window exactly"):
        assert _run(case, True)[1] is None and _run(case, False)[1] is None, case
    seen, end, _ = _run("fin then data after it", True)
    assert end is None and mp.StreamReset(2, ErrorCode.STREAM_CLOSED, remote=False) in seen[1][0]
    seen, _, answers = _run("our stream forgotten, late data", True)
    assert answers == 1 and seen[0][1] == fr.encode(fr.Rst(3, ErrorCode.STREAM_CLOSED))


def test_the_inline_steps_are_taken():
    # The common frames of the table take the inline steps: the rules' handlers are not called.
    for inline, expected in ((True, False), (False, True)):
        with PythonCalls(under="lib") as calls:
            _run("syn, data, fin alone", inline)
            _run("our stream, data and fin", inline)
        assert ("MuxConnection._on_data" in calls.names) is expected, calls.names


def test_open_stream_sends_the_syn_encode_sends():
    conn = mp.MuxConnection(False, mp.MuxConfig(heartbeat=False, grow_windows=False))
    sid = conn.open_stream()
    # A SYN with no priority and no type, then the early grant of the larger window.
    assert bytes(conn.data_to_send()) == fr.encode(fr.Syn(sid)) + fr.encode_wndinc(
        sid, conn.config.receive_window - mp.INITIAL_WINDOW)
    conn.end_stream(sid)
    conn.forget_stream(sid)
    assert bytes(conn.data_to_send()) == fr.encode_data(sid, b"", True)
    sid = conn.open_stream()
    conn.data_to_send()
    conn.forget_stream(sid)  # its FIN, then forgotten
    assert bytes(conn.data_to_send()) == fr.encode_data(sid, b"", True)


@pytest.mark.parametrize("flags", range(8))
@pytest.mark.parametrize("length", [0, 4, 8])
def test_a_syn_decodes_inline_as_through_the_carried_path(flags, length):
    # Whole in one piece (next_frame's inline SYN, when it has no fields) and cut after its
    # first byte (the carried path: _decode and _syn check it): the same frame or the same error.
    wire = fr.HEADER.pack(length, flags, fr.TYPE_SYN, 7) + bytes(range(1, length + 1))

    def decode(pieces):
        d = fr.FrameDecoder()
        try:
            for piece in pieces:
                d.feed(piece)
                if (f := d.next_frame()) is not None:
                    return f
        except Exception as e:  # noqa: BLE001 - the verdict compared
            return (type(e), e.args)
        return None
    assert decode([wire]) == decode([wire[:1], wire[1:]])
    assert decode([wire]) is not None


class _Sink:
    """A socket that takes everything (lib.net.splice's sink, as the proxy's splice sets one
    on a visitor's stream: muxsession's module doc, "Direct delivery")."""

    busy = False

    def __init__(self):
        self.taken = bytearray()

    def offer(self, data) -> int:
        self.taken += data
        return len(data)

    def offer_many(self, chunks) -> int:
        return sum(self.offer(c) for c in chunks)


def test_a_session_stream_lifecycle_runs_few_mux_calls():
    # The same lifecycle through two Sessions on a socket pair (hub readers, the writer
    # greenlets), the proxy's stream with a sink: the mux's own functions, counted.
    client, proxy = session_pair(heartbeat=False)
    got = []

    def handler(stream):
        got.append(stream)
    server = gevent.spawn(client.serve, handler)
    try:
        def one():
            st = proxy.open()
            sink = _Sink()
            st.set_sink(sink)
            st.sendall(REQUEST)
            gevent.sleep(0.01)
            (cs,) = got
            got.clear()
            assert cs.recv(65536) == REQUEST
            cs.sendall(ANSWER)
            cs.shutdown()
            gevent.sleep(0.01)
            assert sink.taken == ANSWER and st.recv(65536) == b""
            st.shutdown()
            st.close()
            gevent.sleep(0.01)
            assert cs.recv(65536) == b""
            cs.close()
            gevent.sleep(0.01)
        one()
        with PythonCalls(under="lib") as calls:
            one()
        mux = Counter(n for n in calls.names
                      if n.split(".")[0] in ("Session", "Stream", "MuxConnection", "_Stream",
                                             "FrameDecoder"))
        assert proxy.open_streams == client.open_streams == 0
        # 126 at main 8a32c07; 98 with the branch fmux (both sides, their readers and writers):
        # the state machine's steps above, and Session._hand_streams looks at the backlog
        # before asking it (one _next_accepted a stream, not two), the wake-ups of a DATA+FIN
        # (and its StreamEnded, and the close after it) are made inline, once (Stream._wake 8
        # -> 2), and the answer read with its FIN is offered to the sink as a read of it alone
        # (Session._offer_alone; no _deliver, no _sink_flush); a close whose FIN left already
        # does not call _wake_writer.
        assert mux["Session._next_accepted"] == 1, mux
        assert mux["Stream._wake"] <= 2, mux
        assert mux["Session._offer_alone"] == 1 and "Stream._sink_flush" not in mux, mux
        assert sum(mux.values()) <= 98, mux
    finally:
        proxy.close()
        client.close()
        server.kill()


class _HalfSink(_Sink):
    """Takes half of what it is offered: the rest waits in the stream's buffer."""

    def offer(self, data) -> int:
        half = len(data) // 2
        self.taken += data[:half]
        return half


def test_an_answer_and_its_fin_offered_in_part_leave_the_rest_then_the_eof():
    # The answer read with its FIN (Session._decoded's offer of it alone): what the sink did not
    # take is read before the EOF, as through the dispatch.
    client, proxy = session_pair(heartbeat=False)
    got = []
    server = gevent.spawn(client.serve, got.append)
    try:
        st = proxy.open()
        sink = _HalfSink()
        st.set_sink(sink)
        st.sendall(REQUEST)
        gevent.sleep(0.01)
        (cs,) = got
        assert cs.recv(65536) == REQUEST
        with PythonCalls(under="lib") as calls:
            cs.sendall(ANSWER)
            cs.shutdown()
            gevent.sleep(0.01)
        assert "Session._offer_alone" in calls.names
        st.set_sink(None)
        assert bytes(sink.taken) + st.recv(65536) == ANSWER
        assert st.recv(65536) == b""
    finally:
        proxy.close()
        client.close()
        server.kill()


# --- the one-frame read and the frame budget: what the counting tests above do not pin ---------

def _fed(trusted: bool = True, **config) -> mp.MuxConnection:
    """A listener with the peer's stream 3 open (its SYN read), its clock standing still."""
    conn = mp.MuxConnection(False, mp.MuxConfig(heartbeat=False, **config), trusted=trusted,
                            clock=lambda: 0.0)
    assert conn.receive_data(_syn(3)) == [mp.StreamOpened(3)]
    conn.stream_accepted(3)
    conn.data_to_send()
    return conn


def test_reads_of_one_data_frame_spend_the_bucket_as_a_read_of_many_does():
    # A read that is one DATA frame takes the step before the decoder (branch kaone); it must
    # count the frame and spend its 1/FRAMES_PER_ANSWER of a token as the loop does, so a
    # trusted peer that writes one frame per record is cut off where a batching one is.
    burst = 2
    limit = burst * mp.FRAMES_PER_ANSWER  # frames the bucket pays for, the SYN's included
    one_by_one = _fed(answer_burst=burst, answer_rate=0.0)
    ends = [one_by_one.receive_data(_data(3, b"x")) for _ in range(limit + 5)]
    cut = next(i for i, ev in enumerate(ends) if ev and isinstance(ev[-1], mp.ConnectionTerminated))
    end = ends[cut][-1]
    assert end.code == ErrorCode.PROTOCOL_ERROR and end.hostile and "answers" in end.reason
    assert one_by_one.terminated is end and ends[cut + 1:] == [[]] * (len(ends) - cut - 1)
    # The SYN and the frames the bucket paid for, then the one that found it empty.
    assert one_by_one.frames_received == cut + 2 == limit + 1
    assert [f.code for f in _frames(one_by_one.data_to_send()) if isinstance(f, fr.GoAway)] == [
        ErrorCode.PROTOCOL_ERROR]
    # The same frames in one read: the read is decoded (a read is bounded: READ_SIZE), then
    # paid for, and the session ends the same way.
    batched = _fed(answer_burst=burst, answer_rate=0.0)
    events = batched.receive_data(b"".join(_data(3, b"x") for _ in range(limit + 5)))
    assert events[-1].code == ErrorCode.PROTOCOL_ERROR and events[-1].hostile
    assert batched.frames_received == limit + 6


def test_an_untrusted_peer_reading_one_frame_at_a_time_is_held_to_untrusted_frames():
    # Before trust() every frame is counted against untrusted_frames, one frame per read too:
    # the step before the decoder is for trusted peers only.
    conn = _fed(trusted=False, untrusted_frames=10, untrusted_answer_burst=1000)
    ends = [conn.receive_data(_data(3, b"x")) for _ in range(12)]
    assert ends[8] == [mp.DataReceived(3, b"x")]  # the SYN and 9 frames: 10
    end = ends[9][-1]
    assert isinstance(end, mp.ConnectionTerminated) and end.hostile
    assert "before Auth" in end.reason


def test_a_read_cut_at_the_frame_budget_says_so_and_goes_on_where_it_stopped():
    conn = _fed()
    frames = [_data(3, bytes([i])) for i in range(5)]
    assert conn.receive_data(b"".join(frames), max_frames=2) == [
        mp.DataReceived(3, b"\x00"), mp.DataReceived(3, b"\x01")]
    assert conn.more_to_decode is True
    assert conn.receive_data(b"", max_frames=2) == [
        mp.DataReceived(3, b"\x02"), mp.DataReceived(3, b"\x03")]
    assert conn.more_to_decode is True
    assert conn.receive_data(b"", max_frames=2) == [mp.DataReceived(3, b"\x04")]
    assert conn.more_to_decode is False
    assert conn.frames_received == 6


def test_outgoing_size_is_what_data_to_send_hands_out():
    # The inline steps keep the output's size themselves (offer_data's one frame, end_stream's
    # and forget_stream's FIN): it bounds what a writer may queue (write_high_water), so it
    # must be the bytes queued, each step queued behind the others, and after a session's end.
    conn = mp.MuxConnection(True, mp.MuxConfig(heartbeat=True))
    a, b = conn.open_stream(), conn.open_stream()
    conn.offer_data(a, b"request")
    conn.offer_data(b, b"x" * 9000)
    conn.end_stream(a)
    conn.forget_stream(b)
    conn.offer_data(conn.open_stream(), b"more")
    sizes = [conn.outgoing_size]
    lengths = [len(conn.data_to_send())]
    c = conn.open_stream()
    conn.offer_data(c, b"last")
    conn.terminate(ErrorCode.NO_ERROR, "done")
    sizes.append(conn.outgoing_size)
    lengths.append(len(conn.data_to_send()))
    assert sizes == lengths and all(sizes), (sizes, lengths)


def test_data_offered_after_our_fin_is_refused_not_sent():
    conn = mp.MuxConnection(True, mp.MuxConfig(heartbeat=False))
    sid = conn.open_stream()
    conn.end_stream(sid)
    sent = conn.data_to_send()
    with pytest.raises(ProtocolError, match="closed for writing"):
        conn.offer_data(sid, b"late")
    assert conn.data_to_send() == b"" and _frames(sent)[-1] == fr.Data(sid, b"", True)


@pytest.mark.parametrize("client", [True, False])
def test_streams_opened_after_the_heartbeat_take_the_next_ids_of_our_parity(client):
    conn = mp.MuxConnection(client, mp.MuxConfig(heartbeat=True))
    syns = [f.stream_id for f in _frames(conn.data_to_send()) if isinstance(f, fr.Syn)]
    ids = [conn.open_stream() for _ in range(3)]
    assert len(syns) == 1  # the heartbeat's
    assert ids == [syns[0] + 2, syns[0] + 4, syns[0] + 6]
    assert {i % 2 for i in syns + ids} == {1 if client else 0}


def _frames(data) -> list:
    d = fr.FrameDecoder()
    d.feed(bytes(data))
    out = []
    while (f := d.next_frame()) is not None:
        out.append(f)
    return out
