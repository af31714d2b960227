"""lib.protocol.websocket (sans-I/O RFC 6455) with byte vectors, and lib.net.wstransport over a socketpair."""
from __future__ import annotations

import hashlib
import os
import struct

import gevent
import gevent.socket
import pytest
from hypothesis import given, settings, strategies as st

from lib.protocol import websocket as ws
from lib.net.muxsession import Session
from lib.net.wstransport import WebSocketTransport, client_handshake, read_head

MASK = bytes.fromhex("37fa213d")


def fixed_rand(n):
    return MASK[:n]


# --- RFC 6455 section 5.7 examples --------------------------------------------------------

RFC_UNMASKED_HELLO = bytes.fromhex("810548656c6c6f")
RFC_MASKED_HELLO = bytes.fromhex("818537fa213d7f9f4d5158")
RFC_FRAGMENTED = [bytes.fromhex("010348656c"), bytes.fromhex("80026c6f")]
RFC_PING_HELLO = bytes.fromhex("890548656c6c6f")
RFC_MASKED_PONG_HELLO = bytes.fromhex("8a8537fa213d7f9f4d5158")


def test_rfc_vectors_encode():
    assert ws.encode_frame(ws.OP_TEXT, b"Hello") == RFC_UNMASKED_HELLO
    assert ws.encode_frame(ws.OP_TEXT, b"Hello", mask_key=MASK) == RFC_MASKED_HELLO
    assert ws.encode_frame(ws.OP_TEXT, b"Hel", fin=False) == RFC_FRAGMENTED[0]
    assert ws.encode_frame(ws.OP_CONTINUATION, b"lo") == RFC_FRAGMENTED[1]
    assert ws.encode_frame(ws.OP_PING, b"Hello") == RFC_PING_HELLO
    assert ws.encode_frame(ws.OP_PONG, b"Hello", mask_key=MASK) == RFC_MASKED_PONG_HELLO
    # 256 bytes: 16-bit length; 64 KiB: 64-bit length (RFC 6455 5.7 last two examples)
    assert ws.encode_frame(ws.OP_BINARY, bytes(256))[:4] == bytes.fromhex("827e0100")
    assert ws.encode_frame(ws.OP_BINARY, bytes(65536))[:10] == bytes.fromhex(
        "827f0000000000010000")


def test_rfc_vectors_parse():
    f, n = ws.parse_frame(RFC_MASKED_HELLO, expect_masked=True)
    assert (f.fin, f.opcode, f.payload, n) == (True, ws.OP_TEXT, b"Hello", 11)
    f, n = ws.parse_frame(RFC_UNMASKED_HELLO + b"tail", expect_masked=False)
    assert f.payload == b"Hello" and n == 7  # trailing bytes stay unread
    f, _ = ws.parse_frame(RFC_FRAGMENTED[0], expect_masked=False)
    assert (f.fin, f.opcode, f.payload) == (False, ws.OP_TEXT, b"Hel")


def test_rfc_handshake_accept_key():
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_apply_mask_matches_bytewise_xor_and_is_an_involution():
    for n in (0, 1, 3, 4, 5, 1000, 65537):
        data = os.urandom(n)
        slow = bytes(b ^ MASK[i % 4] for i, b in enumerate(data))
        assert ws.apply_mask(data, MASK) == slow
        assert ws.apply_mask(slow, MASK) == data


# --- parse_frame: partial input and refusals -------------------------------------------------

def test_every_prefix_needs_more():
    frame = ws.encode_frame(ws.OP_BINARY, os.urandom(300), mask_key=MASK)
    for i in range(len(frame)):
        assert ws.parse_frame(frame[:i], expect_masked=True) is None
    assert ws.parse_frame(frame, expect_masked=True)[1] == len(frame)


@pytest.mark.parametrize("frame, why", [
    (bytes([0x82, 0x00]), "client frames must be masked"),
    (bytes([0xC2, 0x80]) + MASK, "reserved bits"),
    (bytes([0x83, 0x80]) + MASK, "unknown opcode"),
    (bytes([0x09, 0x80]) + MASK, "fragmented control"),
    (bytes([0x89, 0xFE, 0x00, 0x7E]) + MASK, "control frame payload over 125"),
    (bytes([0x82, 0xFE, 0x00, 0x05]) + MASK, "non-minimal"),
    (bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 63), "high bit"),
])
def test_malformed_frames_refused(frame, why):
    with pytest.raises(ws.WebSocketError) as e:
        ws.parse_frame(frame, expect_masked=True)
    assert why in str(e.value) and e.value.close_code == ws.CLOSE_PROTOCOL_ERROR


def test_server_frames_must_not_be_masked():
    with pytest.raises(ws.WebSocketError, match="must not be masked"):
        ws.parse_frame(RFC_MASKED_HELLO, expect_masked=False)


def test_oversized_frame_refused_from_its_header_alone():
    # Only the 10-byte header has arrived: refused before a byte of the payload is buffered.
    head = bytes([0x82, 0x7F]) + struct.pack(">Q", ws.MAX_PAYLOAD + 1)
    with pytest.raises(ws.WebSocketError) as e:
        ws.parse_frame(head, expect_masked=False)
    assert e.value.close_code == ws.CLOSE_MESSAGE_TOO_BIG
    # the limit itself is accepted
    ok = ws.encode_frame(ws.OP_BINARY, bytes(ws.MAX_PAYLOAD))
    assert ws.parse_frame(ok, expect_masked=False)[0].payload == bytes(ws.MAX_PAYLOAD)


# --- WebSocketConnection ---------------------------------------------------------------------

def server_and_client():
    return ws.WebSocketConnection(client=False), ws.WebSocketConnection(client=True,
                                                                        rand=fixed_rand)


def data_of(events):
    return b"".join(e.data for e in events if isinstance(e, ws.DataReceived))


@pytest.mark.parametrize("feed", ["whole", "bytewise"])
def test_binary_stream_round_trip(feed):
    server, client = server_and_client()
    payload = os.urandom(200_000)  # > MAX_SEND_FRAME: several frames
    wire = client.send_data(payload)
    assert wire.count(b"\x82") >= 1 and len(wire) > len(payload)
    assert MASK in wire  # masked by the client
    if feed == "whole":
        events = server.receive_data(wire)
    else:
        events = []
        for i in range(0, len(wire), 997):  # odd-sized pieces cross every boundary
            events += server.receive_data(wire[i:i + 997])
    assert data_of(events) == payload
    back = server.send_data(b"pong-data")
    assert data_of(client.receive_data(back)) == b"pong-data"


def test_fragmented_binary_with_ping_in_between():
    server, client = server_and_client()
    wire = (ws.encode_frame(ws.OP_BINARY, b"ab", fin=False, mask_key=MASK)
            + ws.encode_frame(ws.OP_PING, b"p1", mask_key=MASK)
            + ws.encode_frame(ws.OP_CONTINUATION, b"cd", fin=False, mask_key=MASK)
            + ws.encode_frame(ws.OP_CONTINUATION, b"ef", mask_key=MASK))
    events = server.receive_data(wire)
    assert data_of(events) == b"abcdef"
    assert ws.PingReceived(b"p1") in events
    assert server.data_to_send() == ws.encode_frame(ws.OP_PONG, b"p1")  # unmasked from server


def test_client_answers_ping_with_masked_pong():
    _, client = server_and_client()
    events = client.receive_data(RFC_PING_HELLO)
    assert events == [ws.PingReceived(b"Hello")]
    assert client.data_to_send() == RFC_MASKED_PONG_HELLO


@pytest.mark.parametrize("wire, code", [
    (ws.encode_frame(ws.OP_CONTINUATION, b"x", mask_key=MASK), ws.CLOSE_PROTOCOL_ERROR),
    (ws.encode_frame(ws.OP_TEXT, b"x", mask_key=MASK), ws.CLOSE_UNSUPPORTED_DATA),
    (ws.encode_frame(ws.OP_BINARY, b"x", fin=False, mask_key=MASK)
     + ws.encode_frame(ws.OP_BINARY, b"y", mask_key=MASK), ws.CLOSE_PROTOCOL_ERROR),
    (ws.encode_frame(ws.OP_CLOSE, b"\x03\xe8"[:1], mask_key=MASK), ws.CLOSE_PROTOCOL_ERROR),
    (ws.encode_frame(ws.OP_CLOSE, struct.pack(">H", 999), mask_key=MASK),
     ws.CLOSE_PROTOCOL_ERROR),
])
def test_connection_refusals(wire, code):
    server, _ = server_and_client()
    with pytest.raises(ws.WebSocketError) as e:
        server.receive_data(wire)
    assert e.value.close_code == code


def test_close_is_echoed_once_and_ends_input():
    server, client = server_and_client()
    events = server.receive_data(client.send_close(ws.CLOSE_GOING_AWAY, "bye"))
    assert events == [ws.CloseReceived(ws.CLOSE_GOING_AWAY, "bye")]
    reply = server.data_to_send()
    assert reply == ws.encode_frame(ws.OP_CLOSE, struct.pack(">H", ws.CLOSE_GOING_AWAY))
    assert server.receive_data(ws.encode_frame(ws.OP_BINARY, b"late", mask_key=MASK)) == []
    assert client.receive_data(reply) == [ws.CloseReceived(ws.CLOSE_GOING_AWAY, "")]
    assert client.data_to_send() == b""  # we closed first: no second close
    with pytest.raises(ws.WebSocketError):
        client.send_data(b"after close")


def test_empty_close_answered_with_1000():
    server, _ = server_and_client()
    assert server.receive_data(ws.encode_frame(ws.OP_CLOSE, b"", mask_key=MASK)) == [
        ws.CloseReceived(ws.CLOSE_NO_STATUS, "")]
    assert server.data_to_send() == ws.encode_frame(ws.OP_CLOSE, b"\x03\xe8")


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.binary(max_size=3000), max_size=8), cut=st.integers(1, 50))
def test_any_byte_stream_survives_any_split(chunks, cut):
    server, client = server_and_client()
    wire = b"".join(client.send_data(c) for c in chunks)
    events = []
    for i in range(0, len(wire), cut):
        events += server.receive_data(wire[i:i + cut])
    assert data_of(events) == b"".join(chunks)


# --- handshake -----------------------------------------------------------------------------

def test_handshake_round_trip():
    key = ws.new_key()
    req = ws.client_request("proxy.test:8443", "/_shroud/tunnel", key)
    head, rest = ws.split_head(req + b"\x82\x00")
    assert rest == b"\x82\x00"
    parsed = ws.parse_upgrade_request(head)
    assert (parsed.path, parsed.host, parsed.key) == ("/_shroud/tunnel", "proxy.test:8443", key)
    ws.check_server_response(ws.server_response(key), key)
    with pytest.raises(ws.HandshakeError, match="Accept"):
        ws.check_server_response(ws.server_response(ws.new_key()), key)


@pytest.mark.parametrize("head, status", [
    (b"GET /_shroud/tunnel HTTP/1.1\r\nHost: a\r\n\r\n", 426),
    (b"POST /_shroud/tunnel HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
     b"Connection: Upgrade\r\n\r\n", 405),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 426),
])
def test_bad_upgrade_requests(head, status):
    with pytest.raises(ws.HandshakeError) as e:
        ws.parse_upgrade_request(head)
    assert e.value.http_status == status
    assert ws.handshake_refusal(status, e.value.reason).startswith(f"HTTP/1.1 {status} ".encode())


def test_server_refusal_reported_with_its_status():
    with pytest.raises(ws.HandshakeError, match="404"):
        ws.check_server_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "k")


def test_oversized_head_refused():
    with pytest.raises(ws.HandshakeError) as e:
        ws.split_head(b"GET / HTTP/1.1\r\nX: " + b"a" * ws.MAX_HEAD)
    assert e.value.http_status == 431


# --- lib.net.wstransport: a muxado session over a WebSocket over a socketpair ----------------------

def ws_pair():
    a, b = gevent.socket.socketpair()
    server_box = {}

    def serve():
        head, rest = read_head(b, 5)
        req = ws.parse_upgrade_request(head)
        b.sendall(ws.server_response(req.key))
        server_box["t"] = WebSocketTransport(b, client=False, leftover=rest)

    g = gevent.spawn(serve)
    client = client_handshake(a, "proxy.test", "/_shroud/tunnel", 5)
    g.get(timeout=5)
    return client, server_box["t"]


def test_transport_carries_a_mux_session_and_answers_pings():
    c, s = ws_pair()
    cs, ss = Session(c, client=True), Session(s, client=False)
    try:
        payload = os.urandom(3 << 20)
        st = cs.open()

        def echo():
            peer = ss.accept(timeout=5)
            h = hashlib.sha256()
            while data := peer.recv(65536):
                h.update(data)
            peer.sendall(h.hexdigest().encode())
            peer.close()

        g = gevent.spawn(echo)
        st.sendall(payload)
        st.shutdown(2 - 1)  # SHUT_WR
        got = b""
        with gevent.Timeout(20):
            while data := st.recv(1024):
                got += data
        g.get(timeout=5)
        assert got.decode() == hashlib.sha256(payload).hexdigest()
        # a WebSocket ping from the server side is answered by the client's reader
        s._send_raw(ws.encode_frame(ws.OP_PING, b"are-you-there"))
        gevent.sleep(0.2)
        assert not cs.closed and not ss.closed
    finally:
        cs.close()
        ss.close()


def test_transport_protocol_error_closes_with_code():
    c, s = ws_pair()
    c.sock.sendall(ws.encode_frame(ws.OP_BINARY, b"unmasked from a client"))
    with pytest.raises(ConnectionResetError, match="must be masked"):
        s.recv()
    # the client gets a close frame with 1002
    c.sock.settimeout(5)
    data = c.sock.recv(100)
    frame, _ = ws.parse_frame(data, expect_masked=False)
    assert frame.opcode == ws.OP_CLOSE and frame.payload[:2] == struct.pack(">H", 1002)
    c.close()
    s.close()


def test_transport_close_gives_peer_eof():
    c, s = ws_pair()
    c.sendall(b"last words")
    c.close()
    with gevent.Timeout(5):
        assert s.recv() == b"last words"
        assert s.recv() == b""
    assert s.close_code == ws.CLOSE_NORMAL
    s.close()


def test_close_reason_cut_on_a_character_boundary():
    from lib.protocol import websocket as ws
    frame = ws.WebSocketConnection(client=False).send_close(1000, "é" * 100)
    payload = frame[2:]  # a server frame: no mask, short length
    assert len(payload) <= 125
    payload[2:].decode("utf-8")  # a whole number of characters


def _raw_frame(sock, expect_masked: bool, timeout: float = 5.0):
    """One frame read from a raw socket (the other end of a transport)."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        parsed = ws.parse_frame(buf, expect_masked=expect_masked)
        if parsed is not None:
            return parsed[0]
        data = sock.recv(4096)
        assert data, "closed before a whole frame"
        buf += data


@pytest.mark.parametrize("side", ["server", "client"])
def test_transport_answers_a_ping_with_a_pong_carrying_its_payload(side):
    # The transport under test reads; its raw peer pings and reads the answer byte for byte.
    c, s = ws_pair()
    transport, raw = (s, c.sock) if side == "server" else (c, s.sock)
    peer_masks = side == "server"  # the raw peer is the client: it masks, the answer is not
    reader = gevent.spawn(transport.recv)
    try:
        payload = b"are-you-there-" + os.urandom(8).hex().encode()
        raw.sendall(ws.encode_frame(ws.OP_PING, payload, mask_key=MASK if peer_masks else None))
        frame = _raw_frame(raw, expect_masked=not peer_masks)
        assert frame.opcode == ws.OP_PONG and frame.payload == payload
        # and the stream goes on: data after the ping still arrives
        raw.sendall(ws.encode_frame(ws.OP_BINARY, b"after", mask_key=MASK if peer_masks else None))
        assert reader.get(timeout=5) == b"after"
    finally:
        reader.kill()
        c.close()
        s.close()


@pytest.mark.parametrize("side", ["server", "client"])
def test_transport_answers_a_close_with_a_close_and_ends(side):
    c, s = ws_pair()
    transport, raw = (s, c.sock) if side == "server" else (c, s.sock)
    peer_masks = side == "server"
    try:
        raw.sendall(ws.encode_frame(ws.OP_CLOSE, struct.pack(">H", ws.CLOSE_GOING_AWAY) + b"bye",
                                    mask_key=MASK if peer_masks else None))
        with gevent.Timeout(5):
            assert transport.recv() == b""
        assert transport.close_code == ws.CLOSE_GOING_AWAY
        frame = _raw_frame(raw, expect_masked=not peer_masks)
        assert frame.opcode == ws.OP_CLOSE
        assert frame.payload[:2] == struct.pack(">H", ws.CLOSE_GOING_AWAY)  # the code echoed
    finally:
        c.close()
        s.close()


def test_a_ping_flood_is_answered_up_to_the_bucket_then_closed_1008():
    from lib.net.wstransport import PING_BURST, PeerFlood
    c, s = ws_pair()
    try:
        ping = ws.encode_frame(ws.OP_PING, b"p", mask_key=MASK)
        c.sock.sendall(ping * (PING_BURST * 4))
        with pytest.raises(PeerFlood) as e, gevent.Timeout(5):
            s.recv()
        assert e.value.hostile
        pongs = 0
        while True:
            frame = _raw_frame(c.sock, expect_masked=False)
            if frame.opcode != ws.OP_PONG:
                break
            pongs += 1
        assert frame.opcode == ws.OP_CLOSE and frame.payload[:2] == struct.pack(">H", 1008)
        assert pongs <= PING_BURST
    finally:
        c.close()
        s.close()


class _Trickle:
    """A socket whose recv returns one byte at a time."""

    def __init__(self, data: bytes):
        self.data = data

    def recv(self, n: int) -> bytes:
        out, self.data = self.data[:1], self.data[1:]
        return out


@pytest.mark.parametrize("size", [ws.MAX_HEAD - 64, ws.MAX_HEAD + 64])
def test_read_head_splits_once_when_sent_byte_by_byte(monkeypatch, size):
    """A hostile proxy answering the client's upgrade a byte a time: the head was split
    (searched and copied whole) on every read, ~n^2 work (1.6 s of CPU for 16 KiB)."""
    from lib.net import wstransport
    calls = []
    split = ws.split_head
    monkeypatch.setattr(ws, "split_head", lambda buf: calls.append(len(buf)) or split(buf))
    head = b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"a" * size + b"\r\n\r\n"
    try:
        got, rest = wstransport.read_head(_Trickle(head + b"more"), timeout=30)
    except ws.HandshakeError:
        assert size > ws.MAX_HEAD  # over the bound: refused, as before
    else:
        assert got == head and rest == b""
    assert len(calls) <= 2, len(calls)

