"""The multiplexer's inline steps held to its rules' handlers on random sessions.

``MuxConnection.inline_frames`` (on in every real session) decodes a connection's common frames
(bare SYN and FIN headers, a read that is one DATA frame, DATA+FIN) inline instead of through
the rules' handlers (lib/protocol/muxstate.py; bench/README.md, "Per-request cost (issue 16)",
branch fmux). tests/test_mux_lifecycle.py holds them to the handlers on a table of named
cases; here hypothesis writes the cases: a script of our own steps (open, offer, end, reset,
forget, accept, acknowledge) and the peer's reads (frames made whole or with a header byte
changed, sent together or cut anywhere), run once each way. Every step's events, output,
windows and open streams, the exceptions our steps meet and the session's end must be the same.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp

# Mostly the first stream of each side (2 and 3, so that frames meet a stream they opened),
# now and then another id: 0, an idle one, the largest.
IDS = st.one_of(st.sampled_from([2, 3]), st.sampled_from([2, 3]),
                st.sampled_from([0, 1, 4, 5, 6, 8, 0x7FFFFFFF]))


def _mutated(frame: bytes, at: int, value: int) -> bytes:
    """``frame`` with header byte ``at`` (0-7) replaced: a flag, a type, a length, an id."""
    return frame[:at] + bytes([value]) + frame[at + 1:]


SYN = st.builds(lambda sid, fin: fr.encode(fr.Syn(sid, fin=fin)), IDS, st.booleans())
# A SYN with fields: a priority, a stream type (the heartbeat's, half the time).
SYN_FIELDS = st.builds(lambda sid, p, t, fin: fr.encode(fr.Syn(sid, p, t, fin=fin)), IDS,
                       st.one_of(st.none(), st.integers(0, 9), st.just(mp.HEARTBEAT_PRIORITY)),
                       st.sampled_from([None, 0, 7, mp.HEARTBEAT_TYPE, mp.HEARTBEAT_TYPE]),
                       st.booleans())
DATA = st.builds(fr.encode_data, IDS, st.binary(max_size=24), st.booleans())
FRAME = st.one_of(
    SYN, SYN_FIELDS, SYN_FIELDS, DATA, DATA, DATA,
    st.builds(lambda sid, n: fr.encode_data(sid, b"x" * n), IDS, st.sampled_from([16383, 9000])),
    st.builds(lambda sid, code: fr.encode(fr.Rst(sid, code)), IDS, st.integers(0, 9)),
    st.builds(lambda sid, n: fr.WNDINC.pack(4, 0, fr.TYPE_WNDINC, sid, n), IDS,
              st.sampled_from([0, 1, 100, 16383, 65536, fr.STREAM_ID_MASK, 0xFFFFFFFF])),
    st.builds(lambda last, code: fr.encode(fr.GoAway(last, code)), IDS, st.integers(0, 9)),
)
# Now and then a header byte is changed: reserved bits, unknown flags, another type, a length
# that does not match, an id of the other parity.
PEER_FRAME = st.one_of(
    FRAME,
    st.builds(_mutated, FRAME, st.integers(0, 7), st.integers(0, 255)),
)
PEER_READ = st.tuples(st.just("read"), st.lists(PEER_FRAME, min_size=1, max_size=8),
                      st.integers(0, 60))
OUR_STEP = st.one_of(
    st.tuples(st.just("open")),
    st.tuples(st.sampled_from(["end", "forget", "accept"]), IDS),
    st.tuples(st.just("reset"), IDS, st.integers(0, 9)),
    st.tuples(st.just("offer"), IDS, st.binary(min_size=1, max_size=24)),
    st.tuples(st.just("offer"), IDS, st.sampled_from([b"x" * 16383, b"x" * 50000])),
    st.tuples(st.just("acknowledge"), IDS, st.integers(1, 70000)),
    st.tuples(st.just("written")),
)
SCRIPT = st.lists(st.one_of(PEER_READ, PEER_READ, OUR_STEP), min_size=1, max_size=14)


def _step(conn: mp.MuxConnection, step: tuple):
    kind = step[0]
    try:
        if kind == "read":
            data = b"".join(step[1])
            cut = min(step[2], len(data))
            got = conn.receive_data(data[:cut]) + conn.receive_data(data[cut:])
            while conn.more_to_decode:
                got += conn.receive_data(b"")
            return got
        if kind == "open":
            return conn.open_stream()
        if kind == "written":
            return conn.batch_written()
        sid = step[1]
        if kind == "end":
            return conn.end_stream(sid)
        if kind == "forget":
            return conn.forget_stream(sid)
        if kind == "accept":
            return conn.stream_accepted(sid)
        if kind == "reset":
            return conn.reset_stream(sid, step[2])
        if kind == "offer":
            return conn.offer_data(sid, step[2])
        return conn.acknowledge(sid, step[2])
    except Exception as e:  # our own steps may be refused (an unknown stream): the same way
        return ("raised", type(e).__name__, str(e))


def _windows(conn: mp.MuxConnection) -> tuple:
    out = []
    for sid in (1, 2, 3, 4, 5, 6, 8):
        try:
            out.append((conn.send_window(sid), conn.receive_window(sid)))
        except Exception as e:
            out.append(type(e).__name__)
    return tuple(out)


def _run(script: list, client: bool, inline: bool) -> list:
    clock = iter(range(1_000_000)).__next__  # the same instants both ways (answer bucket)
    conn = mp.MuxConnection(client, mp.MuxConfig(heartbeat=False, max_streams=4,
                                                 accept_backlog=3, max_refused=3),
                            clock=lambda: clock() / 1000)
    conn.inline_frames = inline
    seen = []
    for step in script:
        result = _step(conn, step)
        size = conn.outgoing_size
        out = bytes(conn.data_to_send())
        assert size == len(out)  # the inline steps keep the output's size as the handlers do
        seen.append((step[0], result, out, conn.open_streams, _windows(conn), conn.answers,
                     conn.unsent_size))
    seen.append(("end", conn.terminated))
    return seen


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCRIPT, st.booleans())
def test_random_sessions_answer_the_same_inline_and_through_the_handlers(script, client):
    assert _run(script, client, True) == _run(script, client, False)


def test_the_scripts_reach_the_inline_steps_and_the_rules():
    # The property above is only worth what its scripts reach: a fixed script through the
    # common lifecycle and a broken rule, checked to end as the rules say, both ways.
    sid = 2
    script = [("read", [fr.encode(fr.Syn(sid)), fr.encode_data(sid, b"req")], 3),
              ("accept", sid), ("acknowledge", sid, 3), ("offer", sid, b"ans"), ("end", sid),
              ("read", [fr.encode_data(sid, b"", True)], 8), ("forget", sid),
              ("read", [fr.encode_data(sid, b"late")], 0),
              ("read", [fr.encode(fr.Syn(1))], 0)]  # the dialler's own parity: PROTOCOL_ERROR
    for inline in (True, False):
        seen = _run(script, True, inline)
        assert seen[0][1] == [mp.StreamOpened(sid), mp.DataReceived(sid, b"req")]
        assert seen[5][1] == [mp.DataReceived(sid, b"", True), mp.StreamEnded(sid)]
        assert seen[7][2] == fr.encode(fr.Rst(sid, mp.ErrorCode.STREAM_CLOSED))
        assert seen[-1][1] is not None and seen[-1][1].code == mp.ErrorCode.PROTOCOL_ERROR
