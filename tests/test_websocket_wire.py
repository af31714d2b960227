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
