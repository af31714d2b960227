"""Run the codec modules through a fixed, seeded workload and print what they produced, one line
per observation: tests/test_native.py runs it on the compiled build and on the sources and
requires the same lines (the wire never depends on the build).

    python tests/support/codec_trace.py [--which]   # SHROUD_PURE picks the build; --which
                                                    # prints lib.native.STATUS first

Covers frames (every type encoded, a byte stream decoded in random pieces), two MuxConnections
talking through random splits (bytes, bytearray and memoryview writes, FIN, RST, windows,
heartbeats, GOAWAY), a hostile peer cut off, and the sniffers and classify on good and bad
input fed whole and in pieces. Deterministic: a seeded Random and a fake clock.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lib.errors import ProtocolError  # noqa: E402
from lib.protocol import muxframe as fr  # noqa: E402
from lib.protocol import muxstate as ms  # noqa: E402
from lib.protocol import sniff  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain(value: object) -> object:
    """A value as comparable text: events and frames as (name, fields), bytes as length and
    digest, codes as ints (the compiled build keeps an IntEnum code as a plain int: equal, same
    hash and str, named alike by lib.errors.code_name; only its repr differs)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,) + tuple(
            plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return data.hex() if len(data) <= 16 else (len(data), hashlib.sha256(data).hexdigest()[:16])
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return repr(value)


def out(*parts: object) -> None:
    print(" ".join(repr(plain(p)) for p in parts))


def frames(rng: random.Random) -> None:
    every = [fr.Syn(3), fr.Syn(5, priority=7, stream_type=9, fin=True), fr.Data(3, b"abc", True),
             fr.Data(7, bytes(fr.MAX_PAYLOAD)), fr.Rst(3, 2), fr.WndInc(3, 65536),
             fr.GoAway(9, 1, b"bye")]
    wire = b"".join(fr.encode(f) for f in every)
    out("encoded", wire)
    out("encode_data", fr.encode_data(5, memoryview(b"xyz"), True).hex(),
        fr.encode_data(5, bytearray(b"q")).hex())
    dec = fr.FrameDecoder()
    i = 0
    while i < len(wire):
        n = rng.randint(1, 40)
        dec.feed(wire[i:i + n] if rng.random() < 0.5 else bytearray(wire[i:i + n]))
        i += n
        while (f := dec.next_frame()) is not None:
            out("decoded", f, dec.buffered)
    for bad in (b"\x00\x04\x00\x04\x00\x00\x00\x03\x00\x00", b"\x00\x00\x00\x09\x00\x00\x00\x03",
                b"\x00\x01\x00\x03\x00\x00\x00\x00x"):
        dec = fr.FrameDecoder()
        dec.feed(bad)
        try:
            out("bad", dec.next_frame())
        except ProtocolError as e:
            out("bad", str(e), int(e.code))
    try:
        fr.encode(object())  # type: ignore[arg-type]
    except TypeError as e:
        out("encode", str(e)[:40])


def pump(a: ms.MuxConnection, b: ms.MuxConnection, rng: random.Random, tag: str) -> None:
    """Move bytes both ways in random pieces until both are quiet; print every event."""
    for _ in range(1000):
        moved = False
        for src, dst, name in ((a, b, tag + ">"), (b, a, tag + "<")):
            data = src.data_to_send(limit=rng.choice([None, 100, 20000]))
            if not data:
                continue
            moved = True
            data = bytes(data)
            i = 0
            while i < len(data):
                n = rng.randint(1, 9000)
                for ev in dst.receive_data(data[i:i + n]):
                    out(name, ev)
                    if isinstance(ev, ms.DataReceived):
                        dst.acknowledge(ev.stream_id, len(ev.data))
                    elif isinstance(ev, ms.StreamOpened):
                        dst.stream_accepted(ev.stream_id)
                i += n
        if not moved:
            return


def sessions(rng: random.Random) -> None:
    clock = Clock()
    pool = ms.WindowPool(8 * 1024 * 1024)
    cfg = ms.MuxConfig(window_pool=pool, grow_windows=True)
    a = ms.MuxConnection(client=True, config=cfg, clock=clock)
    b = ms.MuxConnection(client=False, config=ms.MuxConfig(), clock=clock)
    pump(a, b, rng, "hello")
    sids = [a.open_stream() for _ in range(4)]
    payloads = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 70000))) for _ in sids]
    kinds = [bytes, bytearray, memoryview, bytes]
    for sid, data, kind in zip(sids, payloads, kinds):
        out("sent", sid, a.send_data(sid, kind(data), fin=sid % 4 == 3), a.send_window(sid))
    a.reset_stream(sids[1])
    a.send_heartbeat()
    b.send_heartbeat()
    pump(a, b, rng, "data")
    # The answer direction, 400 KB on one stream: a's window grows as a reads (grow_windows).
    back = bytes(rng.getrandbits(8) for _ in range(400_000))
    pos = 0
    for _ in range(200):
        pos += b.send_data(sids[0], back[pos:])
        pump(a, b, rng, "back")
        if pos == len(back):
            break
    out("back", pos, a.receive_window(sids[0]), b.send_window(sids[0]))
    for sid in sids:
        out("windows", sid, a.send_window(sid), a.receive_window(sid), b.receive_window(sid))
        b.end_stream(sid)
        a.forget_stream(sid)
    pump(a, b, rng, "close")
    out("pool", pool.used, a.open_streams, b.open_streams, a.answers, b.answers,
        a.frames_received, b.frames_received, a.unsent_size, b.unsent_answers)
    b.goaway()
    pump(a, b, rng, "goaway")
    try:
        a.open_stream()
    except ProtocolError as e:
        out("after goaway", str(e))
    a.release()
    out("released", pool.used)


def hostile(rng: random.Random) -> None:
    clock = Clock()
    victim = ms.MuxConnection(client=False, trusted=False, clock=clock)
    # More frames than an untrusted peer may send: PeerAbuse, the session ends hostile.
    flood = fr.encode(fr.Syn(3)) + b"".join(fr.encode(fr.WndInc(3, 1)) for _ in range(400))
    for ev in victim.receive_data(flood):
        out("flood", ev)
    victim.data_to_send()
    v2 = ms.MuxConnection(client=False, clock=clock)
    for ev in v2.receive_data(fr.encode(fr.Syn(4))):  # our parity
        out("parity", ev)
    out("goaway bytes", bytes(v2.data_to_send()).hex())


def vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


_SNI = b"\x00\x00" + vec(2, vec(2, b"\x00" + vec(2, b"www.Example.com")))
_MESSAGE = b"\x01" + vec(3, b"\x03\x03" + b"\x22" * 32 + vec(1, b"\x11" * 32) + vec(2, b"\x13\x01")
                        + vec(1, b"\x00") + vec(2, _SNI))
HELLO = b"\x16\x03\x01" + vec(2, _MESSAGE)  # a ClientHello for www.example.com, one record
SPLIT = b"".join(b"\x16\x03\x01" + vec(2, _MESSAGE[i:i + 10]) for i in range(0, len(_MESSAGE), 10))


def sniffers(rng: random.Random) -> None:
    heads = [b"GET / HTTP/1.1\r\nHost: Example.COM:80\r\n\r\nbody",
             b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n",
             b"POST / HTTP/1.0\nHost: c.test\n\n", b"GET / HTTP/1.1\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"BREW / HTCPCP/1.0\r\n\r\n",
             b"G\x00T / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nX: a\x01b\r\nHost: a\r\n\r\n",
             b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a" * 900]
    hellos = [HELLO, SPLIT, HELLO[:40], HELLO[:5] + b"\x02" + HELLO[6:], b"\x16\x03\x01\x00\x00",
              b"\x80\x2e\x01\x03\x01", HELLO + b"\x14\x03\x03\x00\x01\x01"]
    for name, make, inputs in (("http", sniff.HTTPHostSniffer, heads),
                               ("tls", sniff.TLSNameSniffer, hellos)):
        for data in inputs:
            for pieces in (1, 3, len(data)):
                fed = make()
                answers = []
                step = max(1, len(data) // pieces)
                for i in range(0, len(data), step):
                    piece = data[i:i + step]
                    try:
                        answers.append(fed.feed(memoryview(piece) if rng.random() < .3 else piece))
                    except sniff.SniffError as e:
                        answers.append(("error", str(e), e.alert, e.http_status))
                        break
                out(name, pieces, answers[-1], len(answers))
    for data in [b"", b"\x16", b"GET ", b"get /", b"\x00abc", HELLO, heads[0], bytearray(b"PUT")]:
        try:
            out("classify", sniff.classify(data))
        except sniff.SniffError as e:
            out("classify", str(e), e.alert, e.http_status)


def noise(rng: random.Random) -> None:
    """Random bytes (some behind a TLS record header or a request line) as bytes, bytearray or
    memoryview, whole and in random pieces, through every sniffer, the frame decoder and a
    session: a hostile peer's input, where a compiled build must answer and refuse as the
    sources (a type check mypyc adds must never fire on what a peer can send)."""
    for _ in range(150):
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 5, 9, 40, 300, 3000])))
        data = rng.choice([b"", b"\x16\x03\x01", b"GET / HTTP/1.1\r\nHost: "]) + data
        kind = rng.choice([bytes, bytearray, memoryview])
        for name, call in (("sni", sniff.sniff_tls_sni), ("host", sniff.sniff_http_host),
                           ("classify", sniff.classify)):
            try:
                out("noise", name, call(kind(data)))
            except sniff.SniffError as e:
                out("noise", name, str(e), e.alert, e.http_status)
        for make in (sniff.TLSNameSniffer, sniff.HTTPHostSniffer):
            fed, answer, i = make(), None, 0
            try:
                while i < len(data) and answer is None:
                    n = rng.randint(1, 64)
                    answer = fed.feed(kind(data[i:i + n]))
                    i += n
                out("noise feed", make.__name__, answer, i)
            except sniff.SniffError as e:
                out("noise feed", make.__name__, str(e), e.alert, e.http_status, i)
        dec, got, i = fr.FrameDecoder(), [], 0
        try:
            while i < len(data):
                n = rng.randint(1, 64)
                dec.feed(kind(data[i:i + n]))
                i += n
                while (f := dec.next_frame()) is not None:
                    got.append(f)
            out("noise frames", got, dec.buffered)
        except ProtocolError as e:
            out("noise frames", got, str(e), int(e.code))
        conn = ms.MuxConnection(client=rng.random() < .5, trusted=rng.random() < .5,
                                clock=Clock())
        events, i = [], 0
        while i < len(data):
            n = rng.randint(1, 200)
            events += conn.receive_data(kind(data[i:i + n]))
            i += n
        out("noise session", events, conn.data_to_send())
    for name in ("", ".", "a..b", "*.x.test", "x" * 300, "\u00e9.test", "[::1]", "1.2.3.4:80",
                 "a.test.", "A_B.test", "*", "**.a"):
        for wild in (False, True):
            try:
                out("normalize", sniff.normalize_hostname(name, allow_wildcard=wild))
            except ValueError as e:
                out("normalize", name, str(e))
        out("candidates", list(sniff.wildcard_candidates(name)))


def main() -> None:
    if "--which" in sys.argv:  # first line: which build ran (lib/native.py)
        from lib import native
        print(native.STATUS)
    rng = random.Random(20261202)
    frames(rng)
    sessions(rng)
    hostile(rng)
    sniffers(rng)
    noise(rng)


if __name__ == "__main__":
    main()
