"""The multiplexer's inline steps held to its rules' handlers on random sessions.

``MuxConnection.inline_frames`` (on in every real session) decodes a connection's common frames
(bare SYN and FIN headers, a read that is one DATA frame, DATA+FIN) inline instead of through
the rules' handlers (lib/protocol/muxstate.py; bench/README.md, "Per-request cost (issue 16)",
branch fmux). tests/test_mux_lifecycle.py holds them to the handlers on a table of named
cases; here hypothesis writes the cases: a script of our own steps (open, offer, end, reset,
forget, accept, acknowledge) and the peer's reads (frames made whole or with a header byte
changed, sent together or cut anywhere), run once each way. Every step's events, output,
windows and open streams, the exceptions our steps meet and the session's end must be the same.

A frame for a stream that does not exist ends the session and drops its read's events, so the
scripts are weighted to live: most open our stream and let the peer open its own first, and the
ids and header changes that end a session are rare. test_the_random_sessions_reach_the_inline_
steps holds the weighting to what it is for (the shares of scripts that deliver data, a FIN, an
end and a grant).
"""
from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp


def _weighted(*choices):
    """One of the strategies, by weight: ``_weighted((9, common), (1, rare))``. (Repeating a
    strategy inside st.one_of weighs nothing: one_of keeps one copy of each.)"""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(table))).flatmap(lambda i: table[i])


def _data(ids):
    """DATA frames on ``ids``: up to 24 bytes, a FIN one time in three."""
    return st.builds(fr.encode_data, ids, st.binary(max_size=24),
                     st.sampled_from([False, False, True]))


def _mutated(frame: bytes, at: int, value: int) -> bytes:
    """``frame`` with header byte ``at`` (0-7) replaced: a flag, a type, a length, an id."""
    return frame[:at] + bytes([value]) + frame[at + 1:]


def _frames(ours: int, theirs: int):
    """The peer's frames, their ids mostly the streams of this session: the peer's first
    (``theirs``, opened by its SYN), ours (after an "open" step), the peer's second; now and
    then another (0, idle ids of either parity, the largest) or a header byte changed
    (reserved bits, unknown flags, another type, a length that does not match), each of which
    ends most sessions, so rare: a script must live long enough to reach the inline steps."""
    odd = st.sampled_from([0, 1, 4, 5, 6, 8, fr.STREAM_ID_MASK])
    # A frame for a stream that does not exist ends the session and drops the read's events
    # with it: those ids are rare (1 in ~40 frames each).
    ids = _weighted((40, st.sampled_from([theirs, theirs, ours])), (1, st.just(theirs + 2)),
                    (1, odd))
    # A SYN mostly opens the peer's next stream; now and then it reuses one, or takes ours.
    syn_ids = _weighted((6, st.just(theirs + 2)), (1, st.sampled_from([theirs, ours])),
                        (1, odd))
    syn = st.builds(lambda sid, fin: fr.encode(fr.Syn(sid, fin=fin)), syn_ids,
                    st.sampled_from([False, False, True]))
    # A SYN with fields: a priority, a stream type (the heartbeat's, often).
    syn_fields = st.builds(lambda sid, p, t, fin: fr.encode(fr.Syn(sid, p, t, fin=fin)),
                           syn_ids,
                           st.one_of(st.none(), st.integers(0, 9),
                                     st.just(mp.HEARTBEAT_PRIORITY)),
                           st.sampled_from([None, 0, 7, mp.HEARTBEAT_TYPE, mp.HEARTBEAT_TYPE]),
                           st.booleans())
    data = _data(ids)
    frame = _weighted(
        (8, data), (1, syn), (1, syn_fields),
        (1, st.builds(lambda sid, n: fr.encode_data(sid, b"x" * n), ids,
                      st.sampled_from([16383, 9000]))),
        (1, st.builds(lambda sid, code: fr.encode(fr.Rst(sid, code)), ids, st.integers(0, 9))),
        # Increments encode_wndinc refuses to make (0, beyond 2^31-1) packed by hand.
        (1, st.builds(lambda sid, n: fr.WNDINC.pack(4, 0, fr.TYPE_WNDINC, sid, n), ids,
                      st.sampled_from([0, 1, 100, 16383, 65536, fr.STREAM_ID_MASK,
                                       0xFFFFFFFF]))),
        (3, st.builds(fr.encode_wndinc, ids, st.sampled_from([1, 100, 16383, 65536]))),
        (1, st.builds(lambda last, code: fr.encode(fr.GoAway(last, code)), ids,
                      st.integers(0, 9))),
    )
    return _weighted((40, frame), (1, st.builds(_mutated, frame, st.integers(0, 7),
                                                st.integers(0, 255))))


def _steps(ours: int, theirs: int):
    peer = _frames(ours, theirs)
    # A read that opens the peer's stream first (its SYN, bare or the heartbeat's) and then
    # sends on it: one DATA frame alone is the one-frame read, several the inline loop.
    on_theirs = _data(st.just(theirs))
    opening = st.builds(lambda syn, rest: [syn, *rest],
                        st.sampled_from([fr.encode(fr.Syn(theirs))] * 3 + [fr.encode(fr.Syn(
                            theirs, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE))]),
                        st.lists(_weighted((2, on_theirs), (1, peer)), max_size=4))
    read = st.tuples(st.just("read"), st.one_of(st.lists(peer, min_size=1, max_size=8),
                                                st.lists(peer, min_size=1, max_size=1)),
                     st.integers(0, 60))
    opening_read = st.tuples(st.just("read"), opening, st.integers(0, 60))
    ids = st.sampled_from([theirs, theirs, ours, ours, theirs + 2, 0, 1, 6])
    ours_step = st.one_of(
        st.tuples(st.just("open")),
        st.tuples(st.sampled_from(["end", "forget", "accept"]), ids),
        st.tuples(st.just("reset"), ids, st.integers(0, 9)),
        st.tuples(st.just("offer"), ids, st.binary(min_size=1, max_size=24)),
        st.tuples(st.just("offer"), ids,
                  st.sampled_from([b"x" * 16383, b"x" * 50000, b"x" * 70000])),
        st.tuples(st.just("acknowledge"), ids, st.integers(1, 70000)),
        st.tuples(st.just("written")),
        st.tuples(st.just("fill"), st.just(ours)),
    )
    return opening_read, _weighted((2, read), (1, ours_step))


@st.composite
def sessions(draw) -> tuple[list, bool, bool]:
    """(script, client, trusted): a script of our steps and the peer's reads. Each side's
    first stream: 3 for the dialler (client), 2 for the other. The one-frame read's inline
    step is taken only for a trusted peer (before trust(), one frame per read)."""
    client = draw(st.booleans())
    trusted = draw(st.sampled_from([True, True, False]))
    ours, theirs = (3, 2) if client else (2, 3)
    opening_read, steps = _steps(ours, theirs)
    # Most scripts open our stream and let the peer open its own first, so that the frames'
    # ids meet streams that exist.
    first = draw(st.sampled_from([[("open",), 1]] * 3 + [[1, ("open",)]] * 3
                                 + [[1], [("open",)]]))
    first = [draw(opening_read) if f == 1 else f for f in first]
    script = first + draw(st.lists(steps, min_size=1, max_size=14))
    if draw(st.booleans()):  # our stream's window spent, then the peer's grant (WindowOpened)
        at = draw(st.integers(len(first), len(script)))
        grant = fr.encode_wndinc(ours, draw(st.sampled_from([16383, 65536])))
        script[at:at] = [("fill", ours), ("read", [grant], draw(st.integers(0, 12)))]
    return script, client, trusted


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
        if kind == "fill":  # send until the peer's window is spent (a grant then opens it)
            sent = []
            for _ in range(8):
                taken = conn.offer_data(sid, b"x" * fr.MAX_PAYLOAD)
                sent += [taken, bytes(conn.data_to_send())]
                conn.batch_written()
                if not taken:
                    break
            return sent
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


def _run(script: list, client: bool, inline: bool, trusted: bool = True) -> list:
    # The clock stands still: the answer bucket refills the same both ways however often each
    # way asks the time.
    conn = mp.MuxConnection(client, mp.MuxConfig(heartbeat=False, max_streams=4,
                                                 accept_backlog=3, max_refused=3),
                            trusted=trusted, clock=lambda: 0.0)
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


def _reached(seen: list) -> set[str]:
    """What a run reached: the events the inline steps make, and how the session ended."""
    got = set()
    for entry in seen[:-1]:
        if entry[0] == "read":
            for e in entry[1] if isinstance(entry[1], list) else ():
                if isinstance(e, mp.DataReceived):
                    if e.data:
                        got.add("data")
                    if e.fin:
                        got.add("fin")
                elif isinstance(e, mp.StreamEnded):
                    got.add("ended")
                elif isinstance(e, mp.WindowOpened):
                    got.add("window")
    got.add("terminated" if seen[-1][1] is not None else "alive")
    return got


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_random_sessions_answer_the_same_inline_and_through_the_handlers(session):
    script, client, trusted = session
    inline = _run(script, client, True, trusted)
    assert inline == _run(script, client, False, trusted)
    for what in sorted(_reached(inline)):
        event(what)  # pytest --hypothesis-show-statistics shows the shares


def test_the_random_sessions_reach_the_inline_steps():
    # The property above is worth what its scripts reach: a fixed-seed sample of them must
    # deliver data, FINs and grants and mostly outlive their first reads.
    counts: Counter = Counter()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(sessions())
    def sample(session):
        script, client, trusted = session
        counts["runs"] += 1
        counts.update(_reached(_run(script, client, True, trusted)))
    sample()
    n = counts["runs"]
    shares = {k: round(v / n, 2) for k, v in counts.items() if k != "runs"}
    for what, least in (("data", 0.3), ("fin", 0.05), ("ended", 0.03), ("window", 0.1),
                        ("alive", 0.3)):
        assert counts[what] >= least * n, (what, shares)


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
