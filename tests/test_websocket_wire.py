"""lib/protocol/websocket.py as a peer meets it: the exact bytes of our handshake and refusals,
the close codes and reasons we accept or send back (lib/net/wstransport.py puts a
WebSocketError's reason in the close frame it answers), the bounds to the byte (issue 17:
mutation testing; tests/test_websocket.py has the RFC vectors and the transport)."""
import struct

import pytest

from lib.protocol import websocket as ws

MASK = bytes.fromhex("37fa213d")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def close_frame(code: int, reason: bytes = b"", mask_key=MASK) -> bytes:
    return ws.encode_frame(ws.OP_CLOSE, struct.pack(">H", code) + reason, mask_key=mask_key)


def refused(conn, wire):
    """(close_code, reason) of the WebSocketError ``conn.receive_data(wire)`` raises."""
    with pytest.raises(ws.WebSocketError) as info:
        conn.receive_data(wire)
    assert str(info.value) == info.value.reason
    return info.value.close_code, info.value.reason


# --- handshake bytes ------------------------------------------------------------------------
def test_client_request_bytes():
    assert ws.client_request("proxy.test:8443", "/_shroud/tunnel", KEY) == (
        b"GET /_shroud/tunnel HTTP/1.1\r\nHost: proxy.test:8443\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("host,path,key,why", [
    ("a", "x", KEY, "WebSocket path must start with '/'"),
    ("a", "", KEY, "WebSocket path must start with '/'"),
    ("a b", "/", KEY, "bad character in WebSocket handshake field 'a b'"),
    ("a", "/x\r\nX-Injected: 1", KEY,
     "bad character in WebSocket handshake field '/x\\r\\nX-Injected: 1'"),
    ("a", "/", "k\n", "bad character in WebSocket handshake field 'k\\n'"),
    ("caf\u00e9", "/", KEY, "bad character in WebSocket handshake field 'caf\u00e9'"),
    ("a", "/\u00e9", KEY, "bad character in WebSocket handshake field '/\u00e9'"),
])
def test_client_request_refuses_what_would_break_the_head(host, path, key, why):
    with pytest.raises(ValueError) as info:
        ws.client_request(host, path, key)
    assert str(info.value) == why


def test_server_response_bytes():
    assert ws.server_response(KEY) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n\r\n")


def test_new_keys_are_16_random_bytes():
    keys = {ws.new_key() for _ in range(8)}
    assert len(keys) == 8
    for key in keys:
        assert isinstance(key, str) and len(key) == 24
        assert len(__import__("base64").b64decode(key, validate=True)) == 16


def test_handshake_refusal_bytes():
    # 426 tells the client which upgrade and version to ask for (RFC 6455 4.2.2, RFC 9110 15.5.22)
    assert ws.handshake_refusal(426, "upgrade me") == (
        b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 11\r\n"
        b"Connection: close\r\n\r\nupgrade me\n")
    assert ws.handshake_refusal(400, "bad Sec-WebSocket-Key") == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 22\r\nConnection: close\r\n\r\nbad Sec-WebSocket-Key\n")


# --- the server's answer, as the client checks it ---------------------------------------------
def response(status_line=b"HTTP/1.1 101 Switching Protocols", **headers):
    fields = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": ACCEPT}
    for name, value in headers.items():
        name = name.replace("_", "-")
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    lines = [status_line] + [f"{n}: {v}".encode() for n, v in fields.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize("head", [
    response(),
    response(Upgrade="WebSocket", Connection="keep-alive, upgrade"),
    response(Sec_WebSocket_Extensions=""),
])
def test_server_response_accepted(head):
    ws.check_server_response(head, KEY)


@pytest.mark.parametrize("head,status,why", [
    (response(Upgrade=None), 400, "101 without Upgrade: websocket / Connection: Upgrade"),
    (response(Upgrade="h2c"), 400, "101 without Upgrade: websocket / Connection: Upgrade"),
    (response(Connection=None), 400, "101 without Upgrade: websocket / Connection: Upgrade"),
    (response(Connection="keep-alive"), 400,
     "101 without Upgrade: websocket / Connection: Upgrade"),
    (response(Sec_WebSocket_Accept=None), 400, "wrong Sec-WebSocket-Accept"),
    (response(Sec_WebSocket_Extensions="permessage-deflate"), 400,
     "server chose an extension we did not offer"),
    (response(b"HTTP/1.1 403 Forbidden"), 403,
     "server answered 403 Forbidden instead of 101 Switching Protocols"),
    (response(b"HTTP/1.1 502 " + b"x" * 200), 502,
     "server answered 502 " + "x" * 120 + " instead of 101 Switching Protocols"),
])
def test_server_response_refused(head, status, why):
    with pytest.raises(ws.HandshakeError) as info:
        ws.check_server_response(head, KEY)
    assert (info.value.http_status, info.value.reason) == (status, why)


def test_unparsable_server_response_has_no_status():
    with pytest.raises(ws.HandshakeError) as info:
        ws.check_server_response(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", KEY)
    assert info.value.http_status == 0 and info.value.reason


# --- control frames we send -----------------------------------------------------------------
def test_ping_bytes():
    server = ws.WebSocketConnection(client=False)
    client = ws.WebSocketConnection(client=True, rand=lambda n: MASK[:n])
    assert server.send_ping() == b"\x89\x00"
    assert server.send_ping(b"hi") == b"\x89\x02hi"
    assert client.send_ping() == b"\x89\x80" + MASK
    assert client.send_ping(b"Hello") == b"\x89\x85" + MASK + ws.apply_mask(b"Hello", MASK)


# --- close frames we accept (RFC 6455 7.4) --------------------------------------------------
@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 1014, 3000, 4000,
                                  4999])
def test_close_codes_accepted_and_echoed(code):
    server = ws.WebSocketConnection(client=False)
    assert server.receive_data(close_frame(code, b"why")) == [ws.CloseReceived(code, "why")]
    assert server.data_to_send() == b"\x88\x02" + struct.pack(">H", code)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 32768,
                                  65535])
def test_close_codes_refused(code):
    server = ws.WebSocketConnection(client=False)
    assert refused(server, close_frame(code)) == (ws.CLOSE_PROTOCOL_ERROR,
                                                  "invalid close code %d" % code)


def test_close_frame_refusals_say_why():
    server = ws.WebSocketConnection(client=False)
    assert refused(server, ws.encode_frame(ws.OP_CLOSE, b"\x03", mask_key=MASK)) == (
        ws.CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    server = ws.WebSocketConnection(client=False)
    assert refused(server, close_frame(1000, b"\xff")) == (1007, "close reason is not UTF-8")
    server = ws.WebSocketConnection(client=False)
    assert server.receive_data(close_frame(1000, "é".encode())) == [
        ws.CloseReceived(1000, "é")]


# --- frames we refuse: the close code and the reason the peer reads ---------------------------
@pytest.mark.parametrize("head,code,why", [
    (bytes([0xC2, 0x80]), 1002, "reserved bits set (no extension was negotiated)"),
    (bytes([0xA2, 0x80]), 1002, "reserved bits set (no extension was negotiated)"),
    (bytes([0x92, 0x80]), 1002, "reserved bits set (no extension was negotiated)"),
    (bytes([0x83, 0x80]), 1002, "unknown opcode 0x3"),
    (bytes([0x8B, 0x80]), 1002, "unknown opcode 0xb"),
    (bytes([0x82, 0x00]), 1002, "client frames must be masked"),
    (bytes([0x08, 0x80]), 1002, "fragmented control frame"),
    (bytes([0x0A, 0x80]), 1002, "fragmented control frame"),
    (bytes([0x89, 0xFE, 0x00, 0x7E]), 1002, "control frame payload over 125 bytes"),
    (bytes([0x88, 0xFF]) + struct.pack(">Q", 65536), 1002,
     "control frame payload over 125 bytes"),
    (bytes([0x82, 0xFE, 0x00, 0x7D]), 1002, "non-minimal payload length"),
    (bytes([0x82, 0xFF]) + struct.pack(">Q", 65535), 1002, "non-minimal payload length"),
    (bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 63), 1002,
     "payload length with the high bit set"),
    (bytes([0x82, 0xFF]) + struct.pack(">Q", (1 << 64) - 1), 1002,
     "payload length with the high bit set"),
    (bytes([0x82, 0xFF]) + struct.pack(">Q", ws.MAX_PAYLOAD + 1), 1009,
     "frame of 1048577 bytes exceeds 1048576"),
])
def test_frames_refused_with_code_and_reason(head, code, why):
    server = ws.WebSocketConnection(client=False)
    assert refused(server, head) == (code, why)


def test_a_masked_frame_from_the_server_is_refused():
    client = ws.WebSocketConnection(client=True)
    assert refused(client, ws.encode_frame(ws.OP_BINARY, b"x", mask_key=MASK)) == (
        1002, "server frames must not be masked")


@pytest.mark.parametrize("n,header", [
    (0, "8200"), (125, "827d"), (126, "827e007e"), (65535, "827effff"),
    (65536, "827f0000000000010000"),
])
def test_payload_length_encodings_both_ways(n, header):
    frame = ws.encode_frame(ws.OP_BINARY, bytes(n))
    assert frame[:len(header) // 2] == bytes.fromhex(header)
    assert len(frame) == len(header) // 2 + n
    assert ws.parse_frame(frame, expect_masked=False) == (ws.Frame(True, ws.OP_BINARY, bytes(n)),
                                                          len(frame))
    for cut in range(len(header) // 2):  # a header that has not all arrived: read more
        assert ws.parse_frame(frame[:cut], expect_masked=False) is None


def test_max_payload_is_the_connections_bound():
    server = ws.WebSocketConnection(client=False, max_payload=1000)
    frame = ws.encode_frame(ws.OP_BINARY, bytes(1000), mask_key=MASK)
    assert server.receive_data(frame) == [ws.DataReceived(bytes(1000))]
    too_big = ws.encode_frame(ws.OP_BINARY, bytes(1001), mask_key=MASK)
    assert refused(server, too_big[:4]) == (1009, "frame of 1001 bytes exceeds 1000")
    ws.parse_frame(bytes([0x82, 0x7F]) + struct.pack(">Q", ws.MAX_PAYLOAD), expect_masked=False)


def test_control_frame_of_125_bytes_is_read():
    f, n = ws.parse_frame(ws.encode_frame(ws.OP_PING, bytes(125), mask_key=MASK),
                          expect_masked=True)
    assert (f, n) == (ws.Frame(True, ws.OP_PING, bytes(125)), 2 + 4 + 125)


@pytest.mark.parametrize("args,why", [
    ((0x3, b""), "unknown opcode 3"),
    ((ws.OP_PING, bytes(126)), "control frames carry at most 125 bytes and are never fragmented"),
    ((ws.OP_CLOSE, b"", False), "control frames carry at most 125 bytes and are never fragmented"),
])
def test_encode_frame_refuses(args, why):
    opcode, payload, *fin = args
    with pytest.raises(ValueError) as info:
        ws.encode_frame(opcode, payload, fin=fin[0] if fin else True)
    assert str(info.value) == why
    with pytest.raises(ValueError, match="^mask key must be 4 bytes$"):
        ws.encode_frame(ws.OP_BINARY, b"x", mask_key=b"abc")
    assert ws.encode_frame(ws.OP_PONG, bytes(125))[:2] == b"\x8a\x7d"
    assert ws.encode_frame(ws.OP_CLOSE) == b"\x88\x00"  # no payload unless given


# --- the connection: events and what it owes the peer -------------------------------------------
def counting_rand(n):
    return bytes(range(1, n + 1))  # n bytes exactly: a 5-byte mask would be refused


def test_client_frames_use_a_fresh_4_byte_mask_each():
    keys = iter([b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", b"\x09\x0a\x0b\x0c"])
    client = ws.WebSocketConnection(client=True, rand=lambda n: next(keys)[:n])
    assert client.send_data(b"ab") == b"\x82\x82\x01\x02\x03\x04" + ws.apply_mask(
        b"ab", b"\x01\x02\x03\x04")
    assert client.send_ping(b"p")[2:6] == b"\x05\x06\x07\x08"
    assert client.send_close(1000)[2:6] == b"\x09\x0a\x0b\x0c"
    counted = ws.WebSocketConnection(client=True, rand=counting_rand)
    assert counted.send_ping() == b"\x89\x80\x01\x02\x03\x04"


def test_send_data_frames_at_most_max_send_frame():
    server = ws.WebSocketConnection(client=False)
    assert server.send_data(b"") == b""
    one = server.send_data(bytes(ws.MAX_SEND_FRAME))
    assert one == ws.encode_frame(ws.OP_BINARY, bytes(ws.MAX_SEND_FRAME))
    two = server.send_data(bytes(ws.MAX_SEND_FRAME) + b"x")
    assert two == one + ws.encode_frame(ws.OP_BINARY, b"x")


def test_send_close_bytes_and_after():
    server = ws.WebSocketConnection(client=False)
    assert not server.close_sent
    assert server.send_close() == b"\x88\x02\x03\xe8"
    assert server.close_sent
    assert server.send_close(1001, "again") == b""  # one close frame per connection
    with pytest.raises(ws.WebSocketError) as info:
        server.send_data(b"x")
    assert (info.value.close_code, info.value.reason) == (1000, "WebSocket already closed by us")
    other = ws.WebSocketConnection(client=False)
    assert other.send_close(4000, "r" * 200) == b"\x88\x7d\x0f\xa0" + b"r" * 123


def test_bytes_after_a_close_frame_are_not_read():
    server = ws.WebSocketConnection(client=False)
    wire = close_frame(1000) + ws.encode_frame(ws.OP_BINARY, b"late", mask_key=MASK)
    assert server.receive_data(wire) == [ws.CloseReceived(1000, "")]
    assert server.close_received == ws.CloseReceived(1000, "")


def test_no_pong_and_no_close_reply_once_we_closed():
    client = ws.WebSocketConnection(client=True, rand=counting_rand)
    client.send_close(1000)
    assert client.receive_data(b"\x89\x01p") == [ws.PingReceived(b"p")]
    assert client.receive_data(b"\x8a\x01q") == [ws.PongReceived(b"q")]
    assert client.receive_data(b"\x88\x02\x03\xe9") == [ws.CloseReceived(1001, "")]
    assert client.data_to_send() == b""


def test_pongs_are_queued_in_order_and_handed_out_once():
    server = ws.WebSocketConnection(client=False)
    wire = (ws.encode_frame(ws.OP_PING, b"1", mask_key=MASK)
            + ws.encode_frame(ws.OP_PONG, b"x", mask_key=MASK)
            + ws.encode_frame(ws.OP_PING, b"2", mask_key=MASK))
    assert server.receive_data(wire) == [ws.PingReceived(b"1"), ws.PongReceived(b"x"),
                                         ws.PingReceived(b"2")]
    assert server.data_to_send() == b"\x8a\x011\x8a\x012"
    assert server.data_to_send() == b""


def test_fragmented_messages_and_empty_frames():
    server = ws.WebSocketConnection(client=False)
    wire = (ws.encode_frame(ws.OP_BINARY, b"", fin=False, mask_key=MASK)
            + ws.encode_frame(ws.OP_CONTINUATION, b"", mask_key=MASK)
            + ws.encode_frame(ws.OP_BINARY, b"next", mask_key=MASK)
            + ws.encode_frame(ws.OP_BINARY, b"", mask_key=MASK))
    # empty frames carry no event; a finished message lets the next one start
    assert server.receive_data(wire) == [ws.DataReceived(b"next")]
    assert refused(server, ws.encode_frame(ws.OP_CONTINUATION, b"x", mask_key=MASK)) == (
        1002, "continuation frame outside a message")


@pytest.mark.parametrize("wire,code,why", [
    (ws.encode_frame(ws.OP_TEXT, b"x", mask_key=MASK), 1003,
     "text messages are not part of a tunnel"),
    (ws.encode_frame(ws.OP_BINARY, b"x", fin=False, mask_key=MASK)
     + ws.encode_frame(ws.OP_TEXT, b"y", mask_key=MASK), 1002,
     "new message before the previous one finished"),
    (ws.encode_frame(ws.OP_BINARY, b"x", fin=False, mask_key=MASK)
     + ws.encode_frame(ws.OP_BINARY, b"y", mask_key=MASK), 1002,
     "new message before the previous one finished"),
])
def test_data_frame_refusals(wire, code, why):
    assert refused(ws.WebSocketConnection(client=False), wire) == (code, why)


def test_a_frame_split_anywhere_is_read_once():
    server = ws.WebSocketConnection(client=False)
    wire = (ws.encode_frame(ws.OP_BINARY, b"abc", mask_key=MASK)
            + ws.encode_frame(ws.OP_PING, b"p", mask_key=MASK)
            + ws.encode_frame(ws.OP_BINARY, bytes(300), mask_key=MASK))
    for cut in range(len(wire) + 1):
        server = ws.WebSocketConnection(client=False)
        events = server.receive_data(wire[:cut]) + server.receive_data(wire[cut:])
        assert events == [ws.DataReceived(b"abc"), ws.PingReceived(b"p"),
                          ws.DataReceived(bytes(300))], cut


# --- the client's upgrade request, as the server checks it --------------------------------------
def upgrade(request_line=b"GET /_shroud/tunnel HTTP/1.1", **headers):
    fields = {"Host": "proxy.test", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"}
    for name, value in headers.items():
        name = name.replace("_", "-")
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    lines = [request_line] + [f"{n}: {v}".encode() for n, v in fields.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_upgrade_request_fields():
    req = ws.parse_upgrade_request(upgrade(X_Forwarded_For="192.0.2.1"))
    assert (req.path, req.host, req.key) == ("/_shroud/tunnel", "proxy.test", KEY)
    assert req.headers == {"host": "proxy.test", "upgrade": "websocket", "connection": "Upgrade",
                           "sec-websocket-key": KEY, "sec-websocket-version": "13",
                           "x-forwarded-for": "192.0.2.1"}
    assert ws.parse_upgrade_request(upgrade(Host=None)).host == ""
    assert ws.parse_upgrade_request(upgrade(Upgrade="WebSocket",
                                            Connection="keep-alive,upgrade")).key == KEY


@pytest.mark.parametrize("head,status,why", [
    (upgrade(b"GET /_shroud/tunnel HTTP/1.0"), 400, "WebSocket handshake needs HTTP/1.1"),
    (upgrade(b"POST /_shroud/tunnel HTTP/1.1"), 405,
     "WebSocket handshake must be GET, not POST"),
    (upgrade(Upgrade=None), 426, "this endpoint only accepts WebSocket upgrades"),
    (upgrade(Upgrade="h2c"), 426, "this endpoint only accepts WebSocket upgrades"),
    (upgrade(Connection=None), 426, "this endpoint only accepts WebSocket upgrades"),
    (upgrade(Connection="keep-alive Upgrade"), 426,
     "this endpoint only accepts WebSocket upgrades"),
    (upgrade(Sec_WebSocket_Version=None), 426, "unsupported Sec-WebSocket-Version (need 13)"),
    (upgrade(Sec_WebSocket_Version="8"), 426, "unsupported Sec-WebSocket-Version (need 13)"),
    (upgrade(Sec_WebSocket_Key=None), 400, "bad Sec-WebSocket-Key"),
    (upgrade(Sec_WebSocket_Key="c2hvcnQ="), 400, "bad Sec-WebSocket-Key"),
    (upgrade(Sec_WebSocket_Key="not base64!!"), 400, "bad Sec-WebSocket-Key"),
])
def test_upgrade_request_refused(head, status, why):
    with pytest.raises(ws.HandshakeError) as info:
        ws.parse_upgrade_request(head)
    assert (info.value.http_status, info.value.reason) == (status, why)


def test_upgrade_head_errors_keep_their_status_and_reason():
    with pytest.raises(ws.HandshakeError) as info:
        ws.parse_upgrade_request(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    assert (info.value.http_status, info.value.reason) == (400, "malformed header line")
    with pytest.raises(ws.HandshakeError) as info:
        ws.split_head(b"GET / HTTP/1.1\r\nX: " + b"a" * ws.MAX_HEAD)
    assert (info.value.http_status, info.value.reason) == (431, "HTTP head exceeds 16384 bytes")
    fits = b"GET / HTTP/1.1\r\nX: "
    fits += b"a" * (ws.MAX_HEAD - len(fits) - 4) + b"\r\n\r\n"
    assert ws.split_head(fits + b"\x82") == (fits, b"\x82")
