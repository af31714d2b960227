"""Fuzz the hostile-input decoders: muxado frames, the mux state machine, control messages and
the SNI/Host sniffers. Nothing may escape but the documented error type.

    python bench/fuzz.py [--engine atheris|mutate] [--targets frame,mux,...] [--inputs N]
                         [--seconds S] [--crash-dir DIR] [--slow-ms MS] [--seed N]

Targets and what each may raise (anything else is an *escape*):

========  ======================================================  ===================
target    code under test                                         allowed error
========  ======================================================  ===================
frame     lib.protocol.muxframe.FrameDecoder (whole buffer and in pieces)     ProtocolError
mux       lib.protocol.muxstate.MuxConnection.receive_data                 nothing at all
messages  lib.protocol.messages.MessageReader / unpack, Extra accessors    MessageError
sni       lib.protocol.sniff.sniff_tls_sni                                 SniffError
http      lib.protocol.sniff.sniff_http_host                               SniffError
classify  lib.protocol.sniff.classify (and both sniffers on prefixes)      SniffError
========  ======================================================  ===================

Besides "no other exception", each target checks properties (a broken one is also an escape):
frames decode the same whole or in pieces, re-encode to themselves, and at most one partial
frame stays buffered; a decoded message re-encodes to itself; a sniffer answers the same for
every TCP segmentation (a prefix is "need more" or the final answer, never an error for bytes
that complete to a valid request), returns only normalised names, and never asks for more bytes
once ``MAX_TLS_PEEK`` / ``MAX_HTTP_HEAD`` bytes are there; classify never refuses a prefix of a
request a sniffer accepts. An input slower than ``--slow-ms`` is reported too (a regex that
backtracks is a denial of service in a one-process gevent proxy).

Engines: ``atheris`` (coverage-guided libFuzzer, one child process per target, seeded with the
corpus below; the default when atheris is installed, pinned in requirements.txt) and ``mutate``
(our own structure-aware mutator, in process, deterministic for a ``--seed``; tests/test_fuzz.py
runs it). Seeds are real: ClientHellos written by Python's ssl through a MemoryBIO (also
re-fragmented into many records), HTTP heads as browsers and curl send them, the Go byte vectors
of tests/test_frame.py, frame sequences of whole sessions and encoded control messages.

Escaping inputs are saved as ``<crash-dir>/<target>-<kind>-<sha1>.bin``; a line per escape and
a summary table (inputs, inputs/s, escapes, slowest input) are printed.

Public API (for tests)::

    TARGETS: dict[str, Target]            # Target(name, check, seeds, max_len, tokens)
    run_mutate(target, inputs, seconds, crash_dir, seed=0, slow_ms=..., progress=None) -> Result
    Result(target, inputs, seconds, escapes: list[Escape], slowest_ms)
    Escape(kind, message, path)
    Violation(AssertionError)             # a broken property, raised by a check
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# lib is imported by _load(), not here: the atheris child must import it inside
# atheris.instrument_imports() to get coverage feedback.
fr = mp = msgs = sniff = errors = None

# Progress at most this often, so a run prints a screenful, not a flood.
PROGRESS_EVERY_S = 5.0
# Inputs slower than this are reported: the proxy is one gevent process, so one input that
# holds the CPU for 100 ms delays every other connection by as much.
DEFAULT_SLOW_MS = 100.0
# Distinct escapes saved per (target, kind): enough to debug, bounded so a systematic bug does
# not fill the disk.
MAX_SAVED_PER_KIND = 20


def _load() -> None:
    global fr, mp, msgs, sniff, errors
    from lib import errors as _errors
    from lib.protocol import messages as _msgs, muxframe as _fr, muxstate as _mp, \
        sniff as _sniff
    fr, mp, msgs, sniff, errors = _fr, _mp, _msgs, _sniff, _errors


class Violation(AssertionError):
    """A property of the decoder under test does not hold for this input."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise Violation(message)


def _cuts(data: bytes, count: int) -> list[int]:
    """Deterministic cut points (the same input always splits the same way)."""
    if len(data) < 2:
        return []
    rng = random.Random(zlib.crc32(data))
    return sorted({rng.randrange(1, len(data)) for _ in range(count)})


def _pieces(data: bytes, count: int = 4) -> list[bytes]:
    cuts = [0, *_cuts(data, count), len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


# --- frame ----------------------------------------------------------------------------------
def _decode(pieces: list[bytes]):
    d = fr.FrameDecoder()
    frames = []
    for piece in pieces:
        d.feed(piece)
        try:
            while (f := d.next_frame()) is not None:
                frames.append(f)
        except errors.ProtocolError as e:
            return frames, e.code, d
        _require(d.buffered < fr.HEADER_SIZE + fr.MAX_PAYLOAD,
                 f"{d.buffered} bytes left buffered after draining: more than one partial frame")
    return frames, None, d


def _no_debug(frames):
    return [fr.GoAway(f.last_stream_id, f.code) if isinstance(f, fr.GoAway) else f
            for f in frames]


def check_frame(data: bytes) -> None:
    whole, code, _ = _decode([data])
    split, split_code, _ = _decode(_pieces(data))
    _require(_no_debug(whole) == _no_debug(split) and code == split_code,
             f"whole buffer gave {len(whole)} frames/{code}, pieces {len(split)}/{split_code}")
    for f in _no_debug(whole):
        if isinstance(f, fr.WndInc) and f.increment == 0:
            continue  # legal on the wire (ignored), refused by our encoder
        again, again_code, _ = _decode([fr.encode(f)])
        _require(again == [f] and again_code is None, f"{f!r} does not re-encode to itself")


# --- mux ------------------------------------------------------------------------------------
def check_mux(data: bytes) -> None:
    """The first byte picks the role and limits; the rest arrives in pieces. Events are acted
    on the way the gevent session does (accept, acknowledge, answer), so local paths run too."""
    if not data:
        return
    ctl, body = data[0], data[1:]
    small = bool(ctl & 2)
    config = mp.MuxConfig(max_streams=4 if small else 1024, accept_backlog=2 if small else 256,
                          max_refused=8 if small else 1024,
                          receive_window=mp.INITIAL_WINDOW if ctl & 4 else 1024 * 1024,
                          session_window_budget=2 * 1024 * 1024, heartbeat=not ctl & 8)
    conn = mp.MuxConnection(client=bool(ctl & 1), config=config)
    conn.data_to_send()
    ended = False
    for piece in _pieces(body, 6):
        try:
            events = conn.receive_data(piece)
        except Exception as e:
            raise Violation(f"receive_data raised {type(e).__name__}: {e}") from e
        _require(not (ended and events), f"events after ConnectionTerminated: {events!r}")
        for ev in events:
            t = type(ev)
            if t is mp.StreamOpened:
                conn.stream_accepted(ev.stream_id)
                if ctl & 16:
                    _local(conn.send_data, ev.stream_id, b"hello")
            elif t is mp.DataReceived:
                conn.acknowledge(ev.stream_id, len(ev.data))
                if ev.fin and ctl & 32:
                    _local(conn.end_stream, ev.stream_id)
                elif ctl & 64:
                    _local(conn.forget_stream, ev.stream_id)
            elif t is mp.StreamEnded and ctl & 32:
                _local(conn.end_stream, ev.stream_id)
            elif t is mp.ConnectionTerminated:
                ended = True
        if ctl & 128 and not ended:
            _local(conn.open_stream)
            conn.send_heartbeat()
        out = conn.data_to_send()
        _require(isinstance(out, (bytes, bytearray)), "data_to_send returned no bytes")
        _require(conn.outgoing_size == 0, "outgoing_size not reset by data_to_send")
        if conn.terminated is not None:
            ended = True


def _local(action: Callable, *args) -> None:
    """A local action may refuse with ProtocolError (closed stream, GOAWAY); nothing else."""
    try:
        action(*args)
    except errors.ProtocolError:
        pass


# --- messages -------------------------------------------------------------------------------
def _has_float(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def _check_message(msg) -> None:
    for prop in ("public_key", "nonce", "signature", "proxy_id", "reason", "signed_name"):
        if hasattr(type(msg), prop):
            try:
                getattr(msg, prop)
            except msgs.MessageError:
                pass
    msgs.shroud_version(getattr(msg, "extra", None))
    try:
        body = msgs.pack(msg)
    except ValueError as e:
        _require(_has_float(getattr(msg, "extra", None)),
                 f"decoded {type(msg).__name__} cannot be re-encoded: {e}")
        return
    _require(msgs.unpack(body) == msg, f"{msg!r} does not re-encode to itself")


def check_messages(data: bytes) -> None:
    """Odd first byte: the rest goes through MessageReader in pieces; even: unpack() alone."""
    if not data:
        return
    mode, body = data[0], data[1:]
    if not mode & 1:
        try:
            msg = msgs.unpack(body)
        except msgs.MessageError:
            return
        _check_message(msg)
        return
    reader = msgs.MessageReader()
    for piece in _pieces(body, 3):
        reader.feed(piece)
        try:
            while (msg := reader.next_message()) is not None:
                _check_message(msg)
        except msgs.MessageError:
            try:
                reader.next_message()
            except msgs.MessageError:
                return
            raise Violation("MessageReader usable again after a MessageError")


# --- sniffers -------------------------------------------------------------------------------
def _sniff(sniffer, data: bytes):
    """('name', str) | ('more', None) | ('error', SniffError)."""
    try:
        value = sniffer(data)
    except sniff.SniffError as e:
        return "error", e
    _require(value is None or isinstance(value, str), f"sniffer returned {value!r}")
    return ("more", None) if value is None else ("name", value)


def _check_sniffer(sniffer, bound: int, data: bytes, padding: bytes, incremental=None) -> tuple:
    kind, value = _sniff(sniffer, data)
    if incremental is not None and data:
        # Fed in pieces, as the proxy feeds reads, the answer (or the error) is the one the
        # whole-buffer sniffer gives at the first piece where it decides.
        fed, seen, want = incremental(), b"", None
        for piece in _pieces(data):
            seen += piece
            got = _sniff(fed.feed, piece)
            want = want if want and want[0] != "more" else _sniff(sniffer, seen)
            _require(got[0] == want[0] and str(got[1]) == str(want[1]),
                     f"fed in pieces: {got!r} after {len(seen)} bytes, whole: {want!r}")
    if kind == "name" and value:
        _require(sniff.normalize_hostname(value, allow_wildcard=False) == value,
                 f"name {value!r} is not normalised")
    if kind == "more":
        _require(len(data) < bound, f"needs more after {len(data)} bytes (bound {bound})")
        if zlib.crc32(data) % 8 == 0:
            # Fill up to the bound: the sniffer must decide by then, whatever the bytes are.
            padded = data + padding * ((bound - len(data)) // len(padding) + 1)
            _require(_sniff(sniffer, padded[:bound])[0] != "more",
                     f"still needs more at the bound of {bound} bytes")
    for cut in _cuts(data, 3):
        pkind, pvalue = _sniff(sniffer, data[:cut])
        if kind in ("name", "more"):
            # A prefix of an acceptable (or still acceptable) buffer must not be refused, and
            # must not decide on something else: TCP may split a request anywhere.
            _require(pkind == "more" or (pkind, pvalue) == (kind, value),
                     f"prefix of {cut} bytes gave {pkind} {pvalue!r}, whole gave {kind} {value!r}")
        if pkind == "name":
            _require((kind, value) == (pkind, pvalue),
                     f"prefix of {cut} bytes named {pvalue!r}, whole gave {kind} {value!r}")
    return kind, value


def check_sni(data: bytes) -> None:
    _check_sniffer(sniff.sniff_tls_sni, sniff.MAX_TLS_PEEK, data, b"\x00", sniff.TLSNameSniffer)


def check_http(data: bytes) -> None:
    _check_sniffer(sniff.sniff_http_host, sniff.MAX_HTTP_HEAD, data, b"a", sniff.HTTPHostSniffer)


def check_classify(data: bytes) -> None:
    try:
        kind = sniff.classify(data)
    except sniff.SniffError:
        kind = "error"
    _require((kind is None) == (not data), f"classify gave {kind!r} for {len(data)} bytes")
    if kind == "tls":
        _require(data[0] == 22, "classify said tls without a handshake record byte")
    accepted = None
    if kind == "tls" and _sniff(sniff.sniff_tls_sni, data)[0] == "name":
        accepted = "tls"
    elif kind == "http" and _sniff(sniff.sniff_http_host, data)[0] == "name":
        accepted = "http"
    for cut in _cuts(data, 3):
        try:
            pkind = sniff.classify(data[:cut])
        except sniff.SniffError:
            pkind = "error"
        if accepted or kind != "error":
            _require(pkind == kind, f"classify of a {cut}-byte prefix gave {pkind!r}, "
                                    f"of the whole {kind!r}")
    if kind == "error":
        # The proxy refuses; the sniffers need not agree, but they must still not escape.
        _sniff(sniff.sniff_http_host, data)


# --- seeds ----------------------------------------------------------------------------------
def _client_hello(server_name: str | None, **opts) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if "alpn" in opts:
        ctx.set_alpn_protocols(opts["alpn"])
    if "maximum" in opts:
        ctx.maximum_version = opts["maximum"]
    if "minimum" in opts:
        ctx.minimum_version = opts["minimum"]
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _refragment(record: bytes, size: int) -> bytes:
    """The same handshake in records of ``size`` bytes (TLS allows any fragmentation)."""
    body = record[5:]
    out = bytearray()
    for i in range(0, len(body), size):
        chunk = body[i:i + size]
        out += record[:3] + struct.pack(">H", len(chunk)) + chunk
    return bytes(out)


def tls_seeds() -> list[bytes]:
    hellos = [
        _client_hello("app.test"),
        _client_hello("deep.wild.test", alpn=["h2", "http/1.1"]),
        _client_hello(None),
        _client_hello("a" * 63 + ".example.com", maximum=ssl.TLSVersion.TLSv1_2),
        _client_hello("xn--bcher-kva.example", minimum=ssl.TLSVersion.TLSv1_3),
        _client_hello("127.0.0.1"),
    ]
    seeds = list(hellos)
    seeds.append(_refragment(hellos[0], 100))
    seeds.append(_refragment(hellos[1], 7))
    seeds.append(_refragment(hellos[2], 1))
    seeds.append(hellos[0] + bytes.fromhex("140303000101") + b"\x17\x03\x03\x00\x05early")
    return seeds


def http_seeds() -> list[bytes]:
    return [
        b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n",
        b"GET /hello?x=1 HTTP/1.1\r\nHost: WEB.test:8080\r\nUser-Agent: curl/7.88.1\r\n"
        b"Accept: */*\r\n\r\n",
        b"POST /form HTTP/1.1\r\nHost: app.test\r\nContent-Type: application/x-www-form-"
        b"urlencoded\r\nContent-Length: 7\r\n\r\na=b&c=d",
        b"GET http://abs.test:80/x HTTP/1.1\r\nHost: ABS.test\r\n\r\n",
        b"GET / HTTP/1.0\nHost: bare-lf.test\n\n",
        b"OPTIONS * HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nCookie: " + b"k=v; " * 200 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\t tab.test \t\r\nX-Empty:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
        # Found by fuzzing: a header regex backtracked quadratically over a run of spaces
        # before a forbidden byte (2 s of CPU for one head). A seed (a valid head; the
        # mutator puts the bytes after it) so --slow-ms reports a regression here.
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX: a" + b" " * 16000 + b"\r\n\r\n",
    ]


def frame_seeds() -> list[bytes]:
    vectors = [
        "00 00 00 01 00 00 00 03", "00 08 06 01 00 00 00 05 7F FF FF FF FF FF FE FF",
        "00 05 00 03 00 00 00 03 68 65 6C 6C 6F", "00 00 01 03 00 00 00 03",
        "00 04 00 04 00 00 00 03 00 00 4E 20", "00 04 00 02 00 00 00 03 00 00 00 07",
        "00 08 00 06 00 00 00 00 00 00 00 02 00 00 00 00", "00 04 00 02 00 00 28 43 00 00 00 01",
        "00 1F 00 06 00 00 00 00 00 00 00 02 00 00 00 00",  # Go's Close(): debug never sent
        "C0 05 00 E3 80 00 00 03 68 65 6C 6C 6F",  # reserved bits set
    ]
    seeds = [bytes.fromhex(v.replace(" ", "")) for v in vectors]
    seeds.append(bytes.fromhex("3FFFFF037FFFFFFF") + bytes(0x3FFF))
    seeds += _session_seeds()
    return seeds


def _session_seeds() -> list[bytes]:
    """Whole sessions as a peer would send them, for either role."""
    out = []
    for first in (2, 3):  # the listener opens even ids, the dialler odd ones
        hb = fr.encode(fr.Syn(first, 0x7FFFFFFF, 0xFFFFFEFF))
        sid = first + 2
        out.append(hb + fr.encode(fr.Data(first, b"\0\0\0\0")) + fr.encode(fr.Syn(sid))
                   + fr.encode(fr.WndInc(sid, 983040)) + fr.encode(fr.Data(sid, b"GET / HTTP/1.1"))
                   + fr.encode(fr.Data(sid, b"", fin=True)) + fr.encode(fr.WndInc(sid, 100))
                   + fr.encode(fr.Rst(sid, 0)) + fr.encode(fr.GoAway(sid, 0)))
        out.append(b"".join(fr.encode(fr.Syn(first + 2 * i)) for i in range(1, 12))
                   + fr.encode(fr.Data(first + 2, b"x" * 300)))
        out.append(fr.encode(fr.Syn(sid, fin=True)) + fr.encode(fr.Data(sid, b"late")))
    return out


def mux_seeds() -> list[bytes]:
    seeds = []
    for ctl in (0x00, 0x01, 0x13, 0x32, 0x61, 0x80, 0xF7, 0x3E):
        for s in _session_seeds() + frame_seeds()[:8]:
            seeds.append(bytes([ctl]) + s)
    return seeds


def message_seeds() -> list[bytes]:
    key, nonce, sig = bytes(range(32)), bytes(range(32, 64)), bytes(range(64))
    messages = [
        msgs.Auth(extra=msgs.auth_extra(key)),
        msgs.Auth(version=["1", "2"], client_id="abc"),
        msgs.AuthResp(client_id="abc", extra=msgs.auth_resp_extra(nonce)),
        msgs.AuthResp(error="refused <&>", extra=msgs.refusal_extra(msgs.REASON_LIMIT)),
        msgs.Bind("tls", hostname="app.test", extra=msgs.bind_extra(sig, "cert:" + "ab" * 32)),
        msgs.Bind("http", hostname="web.test", extra=msgs.bind_extra(sig, "host:proxy.test")),
        msgs.Bind("http", hostname="web.test", subdomain="", auth="user:pw"),
        msgs.Bind("tcp", remote_port=20001),
        msgs.BindResp("https://app.test", "tls"),
        msgs.BindResp("", error="not yours", extra=msgs.refusal_extra(msgs.REASON_NOT_OWNER)),
        msgs.StartProxy("https://app.test:443", "203.0.113.7:51234"),
        msgs.StartProxy("http://w\u00e9b.test", "[2001:db8::1]:80"),
    ]
    seeds = []
    for m in messages:
        seeds.append(b"\x00" + msgs.pack(m))
        seeds.append(b"\x01" + msgs.encode(m))
    seeds.append(b"\x01" + b"".join(msgs.encode(m) for m in messages[:5]) + b"trailing")
    seeds.append(b"\x00" + b'{"type":"bind","payload":{"PROTOCOL":"tls","options":'
                           b'{"hostname":"x.test","subdomain":null},"Extra":{"sig":null}}}')
    return seeds


# --- targets --------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    check: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    max_len: int  # longest input to generate: past every bound the code under test has
    tokens: list[bytes] = field(default_factory=list)  # dictionary for mutations


def _targets() -> dict[str, Target]:
    return {t.name: t for t in [
        # 4 KiB, not 16 KiB: a partial full-size frame behaves as a partial small one, and 32 KiB
        # of 8-byte frames costs ~40 ms per input (three decodes), a tenth of the rate.
        Target("frame", lambda d: check_frame(d), lambda: frame_seeds(), 4096,
               [b"\x3f\xff", b"\x7f\xff\xff\xff", b"\xff\xff\xfe\xff", b"\x00\x00\x00\x08"]),
        Target("mux", lambda d: check_mux(d), lambda: mux_seeds(), 4096,
               [b"\x7f\xff\xff\xff", b"\xff\xff\xfe\xff", b"\x00\x0f\x00\x00", b"\x00\x00\x00\x01"]),
        Target("messages", lambda d: check_messages(d), lambda: message_seeds(), 8192,
               [b'"Type"', b'"Payload"', b'"Extra"', b'"Auth"', b'"Bind"', b'"BindResp"',
                b'"AuthResp"', b'"StartProxy"', b"null", b"[[[[", b"\\ud800", b'"tcp"',
                b'"RemotePort":', b"1e400", b"-0", b"\xff\xff\xff\xff\xff\xff\xff\x7f"]),
        Target("sni", lambda d: check_sni(d), lambda: tls_seeds(), 20480 + 256,
               [b"\x16\x03\x01", b"\x00\x00", b"\x3f\xff", b"\x40\x01", b"\xff\xff", b"\x01\x00"]),
        Target("http", lambda d: check_http(d), lambda: http_seeds(), 16384 + 256,
               [b"\r\n", b"\n", b"\r\n\r\n", b"Host: ", b"host:", b" HTTP/1.1", b"http://",
                b"@", b"[::1]", b":65536", b" " * 64, b"\t", b"CONNECT ", b"*"]),
        Target("classify", lambda d: check_classify(d),
               lambda: tls_seeds()[:3] + http_seeds()[:5], 4096,
               [b"\x16\x03\x01", b"GET ", b" HTTP/1.1\r\n", b"\r\n\r\n", b"Host: "]),
    ]}


def __getattr__(name):  # TARGETS is built on first use, after lib is loaded
    if name == "TARGETS":
        _load()
        return _targets()
    raise AttributeError(name)


# --- our own mutator ------------------------------------------------------------------------
_INTERESTING = [0, 1, 2, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x3FFF, 0x4000, 0x7FFF, 0xFFFF,
                0x7FFFFFFF, 0xFFFFFFFF, 16384, 16385, 20480, 65536]


class Mutator:
    """Structure-aware byte mutations over seeds and a small pool of inputs that got far.

    Without coverage feedback, "got far" means the input did not end in the allowed error
    (a valid message, a whole frame sequence, a name or "need more"): mutating those keeps
    the outer structure intact, so inner fields get exercised.
    """

    POOL_SIZE = 2000  # kept inputs; bounded so memory stays flat over millions of inputs

    def __init__(self, seeds: list[bytes], tokens: list[bytes], max_len: int, seed: int):
        self.rng = random.Random(seed)
        self.seeds = [s[:max_len] for s in seeds]
        self.pool: list[bytes] = list(self.seeds)
        self.tokens = tokens or [b"\x00"]
        self.max_len = max_len

    def keep(self, data: bytes) -> None:
        if len(self.pool) < self.POOL_SIZE:
            self.pool.append(data)
        else:
            self.pool[self.rng.randrange(len(self.seeds), self.POOL_SIZE)] = data

    def next(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.02:
            return rng.randbytes(rng.randrange(0, 64))
        data = bytearray(rng.choice(self.pool if rng.random() < 0.7 else self.seeds))
        for _ in range(1 + int(rng.expovariate(0.5))):
            self._mutate(data)
        return bytes(data[: self.max_len])

    def _mutate(self, data: bytearray) -> None:
        rng = self.rng
        n = len(data)
        op = rng.randrange(10)
        pos = rng.randrange(n + 1)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            data[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x0A, 0x0D, 0x16))
        elif op == 2 and n >= 2:  # an interesting 16- or 32-bit big-endian integer (lengths)
            width = rng.choice((2, 4))
            i = rng.randrange(max(1, n - width + 1))
            value = rng.choice(_INTERESTING) + rng.choice((-1, 0, 0, 1))
            data[i:i + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
        elif op == 3 and n:  # delete a range
            del data[pos:pos + rng.randrange(1, 16)]
        elif op == 4:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        elif op == 5:  # insert a dictionary token
            data[pos:pos] = rng.choice(self.tokens)
        elif op == 6 and n:  # duplicate a range (repetition finds length and backtracking bugs)
            a = rng.randrange(n)
            chunk = data[a:a + rng.randrange(1, 64)]
            data[pos:pos] = chunk * rng.choice((1, 2, 8, 64, 512))
        elif op == 7 and n:  # truncate
            del data[rng.randrange(n):]
        elif op == 8:  # splice with another input
            other = rng.choice(self.pool)
            data[pos:] = other[rng.randrange(len(other) + 1):]
        elif op == 9 and n:  # overwrite a range with one repeated byte
            a = rng.randrange(n)
            data[a:a + rng.randrange(1, 32)] = bytes([rng.randrange(256)]) * rng.randrange(1, 32)
        if len(data) > self.max_len:
            del data[self.max_len:]


# --- running --------------------------------------------------------------------------------
@dataclass
class Escape:
    kind: str  # exception type name, "Violation", or "slow"
    message: str
    path: str | None


@dataclass
class Result:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    escapes: list[Escape] = field(default_factory=list)
    escape_count: int = 0
    slowest_ms: float = 0.0
    engine: str = "mutate"

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


class Recorder:
    """Runs one input under the oracle, times it and saves what escapes."""

    def __init__(self, target: Target, crash_dir: str, slow_ms: float, result: Result):
        self.target = target
        self.crash_dir = crash_dir
        self.slow_ms = slow_ms
        self.result = result
        self.saved: dict[str, int] = {}
        self.seen: set[str] = set()

    def run(self, data: bytes) -> bool:
        """True if the input went cleanly (no escape)."""
        started = time.perf_counter()
        try:
            self.target.check(data)
        except Exception as exc:  # noqa: BLE001 - catching everything is the point
            kind = "Violation" if isinstance(exc, Violation) else type(exc).__name__
            where = traceback.extract_tb(exc.__traceback__)[-1]
            message = f"{exc} (at {os.path.relpath(where.filename, ROOT)}:{where.lineno})"
            self._record(kind, message[:300], data)
        elapsed = (time.perf_counter() - started) * 1000
        self.result.inputs += 1
        if elapsed > self.slow_ms:
            # Confirm on a retry: on a shared host a descheduled process looks slow.
            elapsed = min(elapsed, self._time_again(data), self._time_again(data))
            if elapsed > self.slow_ms:
                self._record("slow", f"{elapsed:.0f} ms for {len(data)} bytes", data)
        if elapsed > self.result.slowest_ms:
            self.result.slowest_ms = elapsed

    def _time_again(self, data: bytes) -> float:
        started = time.perf_counter()
        try:
            self.target.check(data)
        except Exception:  # noqa: BLE001 - already recorded on the first run
            pass
        return (time.perf_counter() - started) * 1000

    def _record(self, kind: str, message: str, data: bytes) -> None:
        self.result.escape_count += 1
        digest = hashlib.sha1(data).hexdigest()[:16]
        path = None
        if self.saved.get(kind, 0) < MAX_SAVED_PER_KIND and digest not in self.seen:
            self.seen.add(digest)
            self.saved[kind] = self.saved.get(kind, 0) + 1
            os.makedirs(self.crash_dir, exist_ok=True)
            path = os.path.join(self.crash_dir, f"{self.target.name}-{kind}-{digest}.bin")
            with open(path, "wb") as f:
                f.write(data)
            self.result.escapes.append(Escape(kind, message, path))
            print(f"[fuzz] {self.target.name}: ESCAPE {kind}: {message} -> {path}",
                  file=sys.stderr, flush=True)


def _progress_line(result: Result, elapsed: float) -> str:
    rate = result.inputs / elapsed if elapsed else 0.0
    return (f"[fuzz] {result.target}: {result.inputs:,} inputs, {elapsed:.0f} s, "
            f"{rate:,.0f}/s, escapes {result.escape_count}, slowest {result.slowest_ms:.1f} ms")


def run_mutate(target: Target, inputs: int, seconds: float, crash_dir: str, seed: int = 0,
               slow_ms: float = DEFAULT_SLOW_MS, progress: Callable[[str], None] | None = None
               ) -> Result:
    """Run ``target`` on at most ``inputs`` generated inputs for at most ``seconds``."""
    result = Result(target.name, engine="mutate")
    recorder = Recorder(target, crash_dir, slow_ms, result)
    mutator = Mutator(target.seeds(), target.tokens, target.max_len, seed)
    started = time.monotonic()
    deadline = started + seconds
    next_progress = started + PROGRESS_EVERY_S
    for seed_input in mutator.seeds:  # every seed first: they must all pass
        recorder.run(seed_input)
    # Bounded by count and by time; the clock is read every 256 inputs to keep it cheap.
    while result.inputs < inputs:
        data = mutator.next()
        if recorder.run(data) and _went_far(target, data):
            mutator.keep(data)
        if result.inputs & 255 == 0:
            now = time.monotonic()
            if now >= deadline:
                break
            if progress and now >= next_progress:
                progress(_progress_line(result, now - started))
                next_progress = now + PROGRESS_EVERY_S
    result.seconds = time.monotonic() - started
    return result


def _went_far(target: Target, data: bytes) -> bool:
    """Cheap "did not end in the allowed error" signal for the mutator's pool."""
    try:
        if target.name == "sni":
            sniff.sniff_tls_sni(data)
        elif target.name == "http":
            sniff.sniff_http_host(data)
        elif target.name == "classify":
            sniff.classify(data)
        elif target.name == "messages":
            return data[:1] == b"\x00" and msgs.unpack(data[1:]) is not None
        elif target.name == "frame":
            return _decode([data])[1] is None
        else:
            return True
    except Exception:  # noqa: BLE001 - only a signal
        return False
    return True


# --- atheris --------------------------------------------------------------------------------
def _atheris_child(args) -> None:
    import atheris

    with atheris.instrument_imports(include=["lib"]):
        _load()
    target = _targets()[args.child]
    result = Result(target.name, engine="atheris")
    recorder = Recorder(target, args.crash_dir, args.slow_ms, result)
    started = time.monotonic()
    state = {"next": started + PROGRESS_EVERY_S}

    def write_stats():
        result.seconds = time.monotonic() - started
        tmp = args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"inputs": result.inputs, "seconds": result.seconds,
                       "escape_count": result.escape_count, "slowest_ms": result.slowest_ms,
                       "escapes": [e.__dict__ for e in result.escapes]}, f)
        os.replace(tmp, args.stats)

    def one_input(data: bytes) -> None:
        recorder.run(data)  # catches every escape itself, so libFuzzer keeps going
        if result.inputs & 1023 == 0 or result.inputs >= args.inputs:
            now = time.monotonic()
            if now >= state["next"] or result.inputs >= args.inputs:
                print(_progress_line(result, now - started), file=sys.stderr, flush=True)
                state["next"] = now + PROGRESS_EVERY_S
                write_stats()

    corpus = tempfile.mkdtemp(prefix=f"shroud-fuzz-{target.name}-")
    for i, seed in enumerate(target.seeds()):
        with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
            f.write(seed)
    dictionary = os.path.join(corpus, "..", f"{os.path.basename(corpus)}.dict")
    with open(dictionary, "w") as f:
        for tok in target.tokens:
            f.write('"' + "".join("\\x%02x" % b for b in tok) + '"\n')
    argv = [sys.argv[0], f"-runs={args.inputs}", f"-max_total_time={int(args.seconds)}",
            f"-max_len={target.max_len}", f"-dict={dictionary}", "-timeout=10",
            "-rss_limit_mb=2048", f"-seed={args.seed or 1}", "-print_final_stats=1",
            f"-artifact_prefix={os.path.join(args.crash_dir, target.name)}-", corpus]
    os.makedirs(args.crash_dir, exist_ok=True)
    import atexit
    atexit.register(write_stats)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def run_atheris(target_name: str, inputs: int, seconds: float, crash_dir: str, seed: int,
                slow_ms: float, log_dir: str) -> Result:
    stats = os.path.join(log_dir, f"fuzz-{target_name}.json")
    log_path = os.path.join(log_dir, f"fuzz-{target_name}.log")
    argv = [sys.executable, os.path.abspath(__file__), "--child", target_name,
            "--inputs", str(inputs), "--seconds", str(seconds), "--crash-dir", crash_dir,
            "--seed", str(seed), "--slow-ms", str(slow_ms), "--stats", stats]
    started = time.monotonic()
    with open(log_path, "w") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            for line in child.stderr:  # ends when the child exits (bounded by -max_total_time)
                log.write(line)
                if line.startswith("[fuzz]") or line.startswith("Done "):
                    print(line.rstrip(), flush=True)
            child.wait(timeout=seconds + 60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    result = Result(target_name, engine="atheris")
    try:
        with open(stats) as f:
            s = json.load(f)
    except (OSError, ValueError):
        s = {}
    result.inputs = s.get("inputs", 0)
    result.seconds = s.get("seconds", time.monotonic() - started)
    result.escape_count = s.get("escape_count", 0)
    result.slowest_ms = s.get("slowest_ms", 0.0)
    result.escapes = [Escape(**e) for e in s.get("escapes", [])]
    if child.returncode not in (0, None):
        # libFuzzer itself stopped the run: a timeout, an out-of-memory or a hard crash.
        result.escape_count += 1
        result.escapes.append(Escape("libfuzzer", f"child exited {child.returncode}, "
                                     f"see {log_path}", None))
    return result


# --- main -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("atheris", "mutate"), default=None,
                   help="default: atheris if installed, else mutate")
    p.add_argument("--targets", default="frame,mux,messages,sni,http,classify")
    p.add_argument("--inputs", type=int, default=1_000_000, help="per target")
    p.add_argument("--seconds", type=float, default=600, help="per target")
    p.add_argument("--crash-dir", default=os.path.join(ROOT, "artifacts", "fuzz-crashes"))
    p.add_argument("--slow-ms", type=float, default=DEFAULT_SLOW_MS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _atheris_child(args)
        return 0
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "mutate"
    _load()
    targets = _targets()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in targets]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(targets)}")
    print(f"[fuzz] engine {engine}, {args.inputs:,} inputs or {args.seconds:.0f} s per target, "
          f"crashes to {args.crash_dir}", flush=True)
    results = []
    for name in names:
        if engine == "atheris":
            log_dir = os.path.join(os.path.dirname(args.crash_dir), "fuzz-logs")
            os.makedirs(log_dir, exist_ok=True)
            r = run_atheris(name, args.inputs, args.seconds, args.crash_dir, args.seed,
                            args.slow_ms, log_dir)
        else:
            r = run_mutate(targets[name], args.inputs, args.seconds, args.crash_dir, args.seed,
                           args.slow_ms, progress=lambda line: print(line, flush=True))
        print(_progress_line(r, r.seconds) + " (done)", flush=True)
        results.append(r)
    print()
    print("| target | engine | inputs | seconds | inputs/s | escapes | slowest input ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r.target} | {r.engine} | {r.inputs:,} | {r.seconds:.0f} | {r.rate:,.0f} | "
              f"{r.escape_count} | {r.slowest_ms:.1f} |")
    for r in results:
        for e in r.escapes:
            print(f"  {r.target}: {e.kind}: {e.message}" + (f" [{e.path}]" if e.path else ""))
    short = [r.target for r in results if r.inputs < args.inputs]
    if short:
        print(f"[fuzz] stopped by --seconds before --inputs: {', '.join(short)}")
    return 1 if any(r.escape_count for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
