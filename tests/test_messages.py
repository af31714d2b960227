"""Byte-vector, round-trip, Go cross-check and fuzz tests for lib/protocol/messages.py and
lib/identity.py (go-tunnel control messages, Shroud's signed binds)."""
import base64
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from lib import identity as identity_mod
from lib.protocol import messages as m
from lib.identity import Identity, IdentityError, fingerprint, verify_bind
from lib.protocol.messages import (
    MAX_MESSAGE, Auth, AuthResp, Bind, BindResp, MessageError, MessageReader, StartProxy,
    encode, pack, read_message, unpack, write_message,
)

# Five byte examples of go-tunnel's messages, as Go's encoder writes them (docs/PROTOCOL.md,
# "Control messages"; the cross-check below compares with Go's encoding/json itself).
VECTORS = [
    (Auth(),
     "46 00 00 00 00 00 00 00",
     b'{"Type":"Auth","Payload":{"Version":["1"],"ClientId":"","Extra":null}}'),
    (AuthResp(version="1", client_id="0123456789abcdef0123456789abcdef"),
     "73 00 00 00 00 00 00 00",
     b'{"Type":"AuthResp","Payload":{"Version":"1","ClientId":"0123456789abcdef0123456789ab'
     b'cdef","Error":"","Extra":null}}'),
    (Bind("tls", hostname="example.com"),
     "6d 00 00 00 00 00 00 00",
     b'{"Type":"Bind","Payload":{"Protocol":"tls","Options":{"Hostname":"example.com",'
     b'"Subdomain":""},"Extra":null}}'),
    (BindResp("tls://example.com"),
     "5f 00 00 00 00 00 00 00",
     b'{"Type":"BindResp","Payload":{"Url":"tls://example.com","Protocol":"","Error":"",'
     b'"Extra":null}}'),
    (StartProxy("tls://example.com", "203.0.113.7:51514"),
     "5c 00 00 00 00 00 00 00",
     b'{"Type":"StartProxy","Payload":{"Url":"tls://example.com","ClientAddr":'
     b'"203.0.113.7:51514"}}'),
]

NONCE = bytes(range(32))
KEY = bytes(range(100, 132))
SIG = bytes(range(64))
PROXY = "cert:" + bytes(range(32, 64)).hex()  # the proxy id of the worked example


def frame(body):
    return struct.pack("<q", len(body)) + body


# --- byte vectors ---------------------------------------------------------------------------
@pytest.mark.parametrize("msg,prefix,body", VECTORS, ids=[v[0].TYPE for v in VECTORS])
def test_encode_matches_go_bytes(msg, prefix, body):
    assert encode(msg) == bytes.fromhex(prefix) + body
    assert pack(msg) == body
    assert unpack(body) == msg


def test_other_encodings():
    assert pack(Bind("tcp", remote_port=8080)) == \
        b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":8080},"Extra":null}}'
    assert pack(Bind("tcp")) == \
        b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":0},"Extra":null}}'
    assert pack(Bind("http", subdomain="app", auth="u:p")) == \
        (b'{"Type":"Bind","Payload":{"Protocol":"http","Options":{"Hostname":"","Subdomain":'
         b'"app","Auth":"u:p"},"Extra":null}}')
    # Go escapes HTML-sensitive characters, U+2028/9, control characters (\u0008 in Go 1.19),
    # and writes other non-ASCII as UTF-8.
    assert pack(StartProxy('<a&b>"\\\n\r\t\b\f\x00\x7f\u2028\u2029é☃\U0001f600', "")) == (
        b'{"Type":"StartProxy","Payload":{"Url":"\\u003ca\\u0026b\\u003e\\"\\\\\\n\\r\\t'
        b'\\u0008\\u000c\\u0000\x7f\\u2028\\u2029' + "é☃\U0001f600".encode() +
        b'","ClientAddr":""}}')
    # maps (Extra) are written with sorted keys, as Go writes a map[string]interface{}
    assert pack(Auth(extra={"z": [1, None, True], "a": {"y": "", "b": False}})).endswith(
        b'"Extra":{"a":{"b":false,"y":""},"z":[1,null,true]}}}')


def test_encode_refuses_what_go_would_not_write_the_same():
    for bad in [Auth(extra=1.5), Auth(extra={1: "x"}), Auth(version="1"), Auth(client_id=None),
                Bind("tcp", remote_port=70000), Bind("tcp", remote_port=True),
                StartProxy("u", 5)]:
        with pytest.raises(ValueError):
            encode(bad)
    with pytest.raises(TypeError, match=r"\Anot a control message: \{'Type': 'Auth'\}\Z"):
        encode({"Type": "Auth"})


# --- decoding like Go -----------------------------------------------------------------------
def test_keys_case_insensitive_last_wins_unknown_ignored():
    body = (b'{"type":"Bind","PAYLOAD":{"protocol":"tls","options":{"hostNAME":"a.example",'
            b'"subdomain":null,"Color":"red"},"Junk":[1,2,{}]}}')
    assert unpack(body) == Bind("tls", hostname="a.example")
    dup = b'{"Type":"StartProxy","Payload":{"Url":"first","url":"second","ClientAddr":"x"}}'
    assert unpack(dup).url == "second"
    # Go's fold maps LONG S and KELVIN SIGN onto s and k
    fold = '{"Type":"Auth","Payload":{"Ver\u017fion":["1"],"ClientId":"c"}}'.encode()
    assert unpack(fold) == Auth(version=["1"], client_id="c")


def test_null_is_the_zero_value():
    body = (b'{"Type":"AuthResp","Payload":{"Version":null,"ClientId":null,"Error":null,'
            b'"Extra":null}}')
    assert unpack(body) == AuthResp(version="", client_id="", error="")
    assert unpack(b'{"Type":"Auth","Payload":{"Version":null,"ClientId":""}}').version == []
    tcp = b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":null}}}'
    assert unpack(tcp) == Bind("tcp", remote_port=0)


def test_extra_is_plain_json():
    body = b'{"Type":"Auth","Payload":{"Version":["1"],"ClientId":"","Extra":{"a":1.5,"b":[{}]}}}'
    assert unpack(body).extra == {"a": 1.5, "b": [{}]}
    surrogate = b'{"Type":"StartProxy","Payload":{"Url":"\\ud800x","ClientAddr":""}}'
    assert unpack(surrogate).url == "\ufffdx"  # as Go decodes it, and encodable again
    encode(unpack(surrogate))


def test_decoding_edges_a_peer_can_reach():
    # Version entries may be null (Go's zero value), and the list may be a tuple when we encode.
    body = b'{"Type":"Auth","Payload":{"Version":[null,"1"],"ClientId":""}}'
    assert unpack(body).version == ["", "1"]
    assert pack(Auth(version=("1", "2"), extra=(1, "a"))) == \
        b'{"Type":"Auth","Payload":{"Version":["1","2"],"ClientId":"","Extra":[1,"a"]}}'
    # Extra objects: the last duplicate wins at every depth; lone surrogates in keys and list
    # items decode to U+FFFD as in strings, so every decoded Extra encodes again.
    body = (b'{"Type":"Auth","Payload":{"Version":["\\udc00"],"ClientId":"","Extra":'
            b'{"a":1,"a":[{"b":1,"b":2}],"\\ud800":3}}}')
    auth = unpack(body)
    assert auth == Auth(version=["\ufffd"], extra={"a": [{"b": 2}], "\ufffd": 3})
    assert '"\ufffd":3'.encode() in pack(auth)  # U+FFFD itself is valid: written as UTF-8
    # A key that is not ASCII after Go's fold matches no field.
    body = '{"Type":"StartProxy","Payload":{"Url":"u","ClientAddr":"a","\u00dcrl":"x"}}'
    assert unpack(body.encode()) == StartProxy("u", "a")
    # Bind options: Auth absent -> None (a tls/https bind), null -> "", Hostname null -> "".
    opts = b'{"Type":"Bind","Payload":{"Protocol":"http","Options":{%s}}}'
    assert unpack(opts % b'"Hostname":null,"Subdomain":"s"').auth is None
    assert unpack(opts % b'"Hostname":"h","Subdomain":"","Auth":null') == \
        Bind("http", hostname="h", auth="")
    assert unpack(opts % b'"Hostname":"","Subdomain":"","auth":"u:p"').auth == "u:p"
    # RemotePort: both ends of the range, the key matched case-insensitively.
    tcp = b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"remoteport":%d}}}'
    assert unpack(tcp % 0) == Bind("tcp", remote_port=0)
    assert unpack(tcp % 65535) == Bind("tcp", remote_port=65535)
    # A signed tcp bind keeps its Extra (the signature and the proxy it names).
    signed = unpack(pack(Bind("tcp", remote_port=22, extra=m.bind_extra(SIG, PROXY))))
    assert (signed.signature, signed.proxy_id, signed.signed_name) == (SIG, PROXY, "22")
    # PublicAddr (Shroud's): absent, null and "" all mean "not told".
    for public in (b"", b',"PublicAddr":null', b',"PublicAddr":""'):
        body = b'{"Type":"StartProxy","Payload":{"Url":"u","ClientAddr":"a"%s}}' % public
        assert unpack(body).public_addr is None
    assert unpack(b'{"Type":"StartProxy","Payload":{"Url":"u","ClientAddr":"a",'
                  b'"publicaddr":"198.51.100.1:80"}}').public_addr == "198.51.100.1:80"
    # The unknown type a peer names is logged cut to 40 characters.
    with pytest.raises(MessageError) as e:
        unpack(b'{"Type":"%s","Payload":{}}' % (b"A" * 500))
    assert e.value.reason == "unknown message type %r" % ("A" * 40)


def test_encoding_edges():
    # Go writes a lone surrogate (invalid UTF-8 there) as U+FFFD: both ends of the range.
    assert pack(StartProxy("a\ud800b\udfff", "\ud7ff\ue000")) == (
        b'{"Type":"StartProxy","Payload":{"Url":"a\\ufffdb\\ufffd","ClientAddr":"'
        + "\ud7ff\ue000".encode() + b'"}}')
    for port in (0, 65535):
        assert unpack(pack(Bind("tcp", remote_port=port))).remote_port == port
    # auth="" is an HTTP bind without credentials: the field is written (None omits it).
    assert pack(Bind("http", auth="")).endswith(b'"Subdomain":"","Auth":""},"Extra":null}}')
    assert pack(StartProxy("u", "a", public_addr="")).endswith(b',"PublicAddr":""}}')


@pytest.mark.parametrize("msg,error", [
    (Auth(extra=1.5), "cannot encode float in a control message"),
    (Auth(extra={"a": {1: "x"}}), "JSON object keys must be strings"),
    (Auth(extra=object()), "cannot encode object in a control message"),
    (Auth(version="1"), "Auth.version must be a list of str"),
    (Auth(version=[1]), "Auth.version must be a str"),
    (Auth(client_id=None), "Auth.client_id must be a str"),
    (AuthResp(version=1), "AuthResp.version must be a str"),
    (AuthResp(client_id=1), "AuthResp.client_id must be a str"),
    (AuthResp(error=1), "AuthResp.error must be a str"),
    (Bind(None), "Bind.protocol must be a str"),
    (Bind("tcp", remote_port=-1), "Bind.remote_port must be 0-65535"),
    (Bind("tcp", remote_port=65536), "Bind.remote_port must be 0-65535"),
    (Bind("tcp", remote_port="80"), "Bind.remote_port must be 0-65535"),
    (Bind("tls", hostname=1), "Bind.hostname must be a str"),
    (Bind("tls", subdomain=1), "Bind.subdomain must be a str"),
    (Bind("http", auth=1), "Bind.auth must be a str"),
    (BindResp(1), "BindResp.url must be a str"),
    (BindResp("u", protocol=1), "BindResp.protocol must be a str"),
    (BindResp("u", error=1), "BindResp.error must be a str"),
    (StartProxy(1, "a"), "StartProxy.url must be a str"),
    (StartProxy("u", 1), "StartProxy.client_addr must be a str"),
    (StartProxy("u", "a", public_addr=1), "StartProxy.public_addr must be a str"),
])
def test_encode_refusals_name_the_field(msg, error):
    with pytest.raises(ValueError) as e:
        pack(msg)
    assert str(e.value) == error


JSON_ERROR = "control message is not valid JSON: "
BAD_PORT = "Bind.Options.RemotePort must be an integer 0-65535"


@pytest.mark.parametrize("body,reason", [
    (b"", JSON_ERROR),
    (b"{", JSON_ERROR),
    (b"[]", "message must be a JSON object"),
    (b'{"Type":"Auth"}', "Auth message has no Payload"),
    (b'{"Type":"Nope","Payload":{}}', "unknown message type 'Nope'"),
    # the Type value is matched exactly
    (b'{"Type":"auth","Payload":{}}', "unknown message type 'auth'"),
    (b'{"Type":"Unbind","Payload":{"Url":""}}',
     "unknown message type 'Unbind'"),  # not registered in go-tunnel
    (b'{"Type":1,"Payload":{}}', "message has no Type"),
    (b'{"Payload":{}}', "message has no Type"),
    (b'{"Type":"Auth","Payload":[]}', "Auth must be a JSON object"),
    (b'{"Type":"Auth","Payload":null}', "Auth must be a JSON object"),
    (b'{"Type":"Auth","Payload":{"ClientId":""}}', "Auth has no Version"),
    (b'{"Type":"Auth","Payload":{"Version":"1","ClientId":""}}',
     "Auth.Version must be a list of strings"),
    (b'{"Type":"Auth","Payload":{"Version":[1],"ClientId":""}}',
     "Auth.Version must be a list of strings"),
    (b'{"Type":"Auth","Payload":{"Version":["1"]}}', "Auth has no ClientId"),
    (b'{"Type":"AuthResp","Payload":{"Version":"1","ClientId":5,"Error":""}}',
     "AuthResp.ClientId must be a string"),
    (b'{"Type":"Bind","Payload":{"Protocol":"tls"}}', "Bind has no Options"),
    (b'{"Type":"Bind","Payload":{"Protocol":"tls","Options":"x"}}',
     "Bind.Options must be a JSON object"),
    (b'{"Type":"Bind","Payload":{"Protocol":"tls","Options":{"Hostname":"a"}}}',
     "Bind.Options has no Subdomain"),
    (b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{}}}',
     "Bind.Options has no RemotePort"),
    (b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":65536}}}', BAD_PORT),
    (b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":-1}}}', BAD_PORT),
    (b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":80.0}}}', BAD_PORT),
    (b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":"80"}}}', BAD_PORT),
    (b'{"Type":"Bind","Payload":{"Protocol":"tcp","Options":{"RemotePort":true}}}', BAD_PORT),
    (b'{"Type":"BindResp","Payload":{"Protocol":"","Error":""}}', "BindResp has no Url"),
    (b'{"Type":"StartProxy","Payload":{"Url":"u"}}', "StartProxy has no ClientAddr"),
    (b'{"Type":"StartProxy","Payload":{"Url":"u","ClientAddr":"a"}} x', JSON_ERROR),
    (b'{"Type":"Auth","Payload":{"Version":["1"],"ClientId":"","Extra":NaN}}',
     "NaN is not valid JSON"),
    (b'{"Type":"StartProxy","Payload":{"Url":"\xff","ClientAddr":""}}',
     "control message is not valid UTF-8"),
    (b'{"Type":"Auth","Payload":{"Version":["1"],"ClientId":"","Extra":' + b"9" * 5000 + b"}}",
     JSON_ERROR),
    (b'{"Type":"Auth","Payload":{"Version":["1"],"ClientId":"","Extra":' + b"[" * 30000
     + b"]" * 30000 + b"}}",
     "control message nested too deeply"),
])
def test_malformed_messages(body, reason):
    """Each refusal's reason exactly (the proxy logs it, rate-limited, and drops the stream);
    JSON_ERROR is a prefix, the rest is Python's json module's own words."""
    def check(exc):
        assert str(exc) == exc.reason
        if reason == JSON_ERROR:
            assert exc.reason.startswith(JSON_ERROR)
        else:
            assert exc.reason == reason
    with pytest.raises(MessageError) as e:
        unpack(body)
    check(e.value)
    reader = MessageReader()
    reader.feed(frame(body))
    with pytest.raises(MessageError) as e:
        reader.next_message()
    check(e.value)
    with pytest.raises(MessageError) as again:  # the error is sticky
        reader.next_message()
    assert again.value is e.value


# Every message type's payload, whole; each refusal below names the type and the field.
WHOLE = {
    "Auth": {"Version": ["1"], "ClientId": "c", "Extra": None},
    "AuthResp": {"Version": "1", "ClientId": "c", "Error": "", "Extra": None},
    "Bind": {"Protocol": "http", "Options": {"Hostname": "h", "Subdomain": "s", "Auth": "a"},
             "Extra": None},
    "BindResp": {"Url": "u", "Protocol": "p", "Error": "", "Extra": None},
    "StartProxy": {"Url": "u", "ClientAddr": "a", "PublicAddr": "p"},
}
OPTIONAL = {"Extra", "PublicAddr"}
NOT_A_STRING = {"Auth.Version": "Auth.Version must be a list of strings",
                "Bind.Options": "Bind.Options must be a JSON object"}


def refusal(msg_type, payload):
    with pytest.raises(MessageError) as e:
        unpack(json.dumps({"Type": msg_type, "Payload": payload}).encode())
    return e.value.reason


@pytest.mark.parametrize("msg_type", sorted(WHOLE))
def test_every_field_refused_by_name(msg_type):
    whole = WHOLE[msg_type]
    msg = unpack(json.dumps({"Type": msg_type, "Payload": whole}).encode())
    assert json.loads(pack(msg))["Payload"] == whole  # every field read, and read where it goes
    for payload in ([], None, "x", 1):
        assert refusal(msg_type, payload) == "%s must be a JSON object" % msg_type
    for name in whole:
        if name == "Extra":
            continue
        where = "%s.%s" % (msg_type, name)
        assert refusal(msg_type, dict(whole, **{name: 5})) == \
            NOT_A_STRING.get(where, where + " must be a string")
        if name not in OPTIONAL:
            rest = {k: v for k, v in whole.items() if k != name}
            assert refusal(msg_type, rest) == "%s has no %s" % (msg_type, name)
    if msg_type == "Bind":
        options = whole["Options"]
        for name in options:
            assert refusal("Bind", dict(whole, Options=dict(options, **{name: 5}))) == \
                "Bind.Options.%s must be a string" % name
        assert refusal("Bind", dict(whole, Protocol="tcp", Options=[])) == \
            "Bind.Options must be a JSON object"


# --- MessageReader --------------------------------------------------------------------------
def all_vectors():
    return b"".join(encode(v[0]) for v in VECTORS)


def test_reader_whole_buffer():
    reader = MessageReader()
    reader.feed(all_vectors())
    got = []
    for _ in range(10):
        msg = reader.next_message()
        if msg is None:
            break
        got.append(msg)
    assert got == [v[0] for v in VECTORS]
    assert reader.trailing_data == b""


def test_reader_byte_at_a_time():
    reader = MessageReader()
    got = []
    for byte in all_vectors():
        reader.feed(bytes([byte]))
        msg = reader.next_message()
        if msg is not None:
            got.append(msg)
            assert reader.next_message() is None
    assert got == [v[0] for v in VECTORS]


def test_reader_leaves_trailing_bytes_for_the_splice():
    # On a proxy stream the public connection's peeked bytes follow StartProxy at once.
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    reader = MessageReader()
    reader.feed(encode(VECTORS[4][0]) + client_hello)
    assert reader.next_message() == VECTORS[4][0]
    assert reader.trailing_data == client_hello
    with pytest.raises(MessageError):  # (the trailing bytes are not a message)
        reader.next_message()


@pytest.mark.parametrize("length", [MAX_MESSAGE + 1, 2 ** 62, 2 ** 63 - 1, -1, -(2 ** 63)])
def test_hostile_lengths_refused_from_the_prefix_alone(length):
    reader = MessageReader()
    reader.feed(struct.pack("<q", length))
    with pytest.raises(MessageError, match="length"):
        reader.next_message()


def test_length_bound_is_exact_and_configurable():
    body = pack(Auth(extra="x" * (MAX_MESSAGE - len(pack(Auth(extra=""))))))
    assert len(body) == MAX_MESSAGE
    reader = MessageReader()
    reader.feed(frame(body))
    assert reader.next_message().extra.startswith("xxx")
    small = MessageReader(max_size=64)
    small.feed(encode(VECTORS[1][0]))
    with pytest.raises(MessageError, match=r"\Amessage length 115 exceeds 64\Z"):
        small.next_message()
    assert MessageReader().max_size == MAX_MESSAGE
    too_long = MessageReader()
    too_long.feed(struct.pack("<q", MAX_MESSAGE + 1))
    with pytest.raises(MessageError, match=r"\Amessage length 65537 exceeds 65536\Z"):
        too_long.next_message()
    negative = MessageReader()
    negative.feed(struct.pack("<q", -1))
    with pytest.raises(MessageError, match=r"\Anegative message length -1\Z"):
        negative.next_message()


def test_message_bound_fits_one_stream_window():
    """MAX_MESSAGE is 64 KiB: no more than a muxado stream's initial window (all a peer's
    stream gets from the proxy), so one hostile stream makes us hold at most that much."""
    from lib.protocol.muxstate import INITIAL_WINDOW
    assert MAX_MESSAGE == 64 * 1024 <= INITIAL_WINDOW


def test_reader_prefix_boundaries():
    reader = MessageReader()
    reader.feed(encode(VECTORS[0][0])[:7])  # 7 bytes: not even a length yet
    assert reader.next_message() is None
    reader.feed(encode(VECTORS[0][0])[7:8])  # the whole length, none of the body
    assert reader.next_message() is None
    assert reader.trailing_data == encode(VECTORS[0][0])[:8]
    empty = MessageReader()
    empty.feed(struct.pack("<q", 0))  # a zero length is an empty body: not JSON
    with pytest.raises(MessageError, match=r"\Acontrol message is not valid JSON: "):
        empty.next_message()


# --- read_message / write_message over real sockets ------------------------------------------
def test_stream_helpers_over_a_socketpair():
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(5)
        right.settimeout(5)
        for msg, _, _ in VECTORS:
            write_message(left, msg)
        left.sendall(b"raw bytes after")
        for msg, _, _ in VECTORS:
            assert read_message(right) == msg
        assert right.recv(100) == b"raw bytes after"  # read_message read nothing past its message
        left.sendall(frame(b'{"Type":"Auth","Payload":{}}')[:12])
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(MessageError, match="closed inside"):
            read_message(right)
    a, b = socket.socketpair()
    with a, b:
        a.close()
        b.settimeout(5)
        with pytest.raises(EOFError):
            read_message(b)


def test_read_message_bounds_length_before_reading_body():
    class OneShot:
        def __init__(self, data):
            self.data = data
            self.reads = 0

        def recv(self, n):
            self.reads += 1
            chunk, self.data = self.data[:n], self.data[n:]
            return chunk

    stream = OneShot(struct.pack("<q", 10 ** 12))
    with pytest.raises(MessageError):
        read_message(stream)
    stream = OneShot(encode(VECTORS[0][0]))
    with pytest.raises(MessageError, match=r"\Amessage length 70 exceeds 10\Z"):
        read_message(stream, max_size=10)
    assert stream.reads == 1  # the prefix alone: the body was never read


class Chunks:
    """A stream on which the given pieces arrive one by one, then it closes: recv(n) returns at
    most n bytes of the piece at hand, as a socket does."""

    def __init__(self, *pieces):
        self.pieces = [p for p in pieces if p]

    def recv(self, n):
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
        return piece[:n]


def test_read_message_ends():
    data = encode(VECTORS[0][0])
    # Pieces of any size are joined: the prefix in two, the body in three.
    assert read_message(Chunks(data[:3], data[3:8], data[8:9], data[9:20], data[20:])) == \
        VECTORS[0][0]
    # Nothing past the message is read, however the bytes arrive.
    stream = Chunks(data[:3], data[3:] + b"after")
    assert read_message(stream) == VECTORS[0][0] and stream.pieces == [b"after"]
    with pytest.raises(EOFError, match=r"\Astream closed before a control message\Z"):
        read_message(Chunks())
    # Closed inside the length prefix, right after it, or inside the body: a broken message.
    for pieces in [(data[:1],), (data[:3], data[3:7]), (data[:8],), (data[:8], data[8:20])]:
        with pytest.raises(MessageError, match=r"\Astream closed inside a control message\Z"):
            read_message(Chunks(*pieces))
    with pytest.raises(MessageError, match=r"\Acontrol message is not valid JSON: "):
        read_message(Chunks(struct.pack("<q", 0)))  # an empty body reads nothing more


class Counted(Chunks):
    """Chunks that counts its reads."""

    reads = 0

    def recv(self, n):
        self.reads += 1
        return super().recv(n)


def test_read_message_ahead_takes_the_message_and_what_came_behind_it_in_one_read():
    start = StartProxy(url="http://one.test", client_addr="127.0.0.1:5", public_addr="1.2.3.4:80")
    head = b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n"
    stream = Counted(encode(start) + head, b"later")
    assert m.read_message_ahead(stream) == (start, head)
    assert stream.reads == 1 and stream.pieces == [b"later"]  # what came later is not read
    stream = Counted(encode(start))
    assert m.read_message_ahead(stream) == (start, b"") and stream.reads == 1


def test_read_message_ahead_split_anywhere_is_read_message():
    data = encode(VECTORS[4][0]) + b"after"
    for cut in range(1, len(data)):
        for second in (cut + 1, len(data)):  # in two pieces, or three
            pieces = (data[:cut], data[cut:second], data[second:])
            stream = Chunks(*pieces)
            msg, ahead = m.read_message_ahead(stream)
            assert msg == VECTORS[4][0] == read_message(Chunks(*pieces))
            # Every byte read past the message is handed back, in order, nothing else.
            assert ahead + b"".join(stream.pieces) == b"after"
    for bufsize in (1, 3, 8, 9):  # reads smaller than the message
        stream = Chunks(data)
        msg, ahead = m.read_message_ahead(stream, bufsize=bufsize)
        assert msg == VECTORS[4][0] and ahead + b"".join(stream.pieces) == b"after"


def test_read_message_ahead_ends_and_bounds_as_read_message():
    data = encode(VECTORS[0][0])
    with pytest.raises(EOFError, match=r"\Astream closed before a control message\Z"):
        m.read_message_ahead(Chunks())
    for pieces in [(data[:1],), (data[:3], data[3:7]), (data[:8],), (data[:8], data[8:20])]:
        with pytest.raises(MessageError, match=r"\Astream closed inside a control message\Z"):
            m.read_message_ahead(Chunks(*pieces))
    # A hostile length is refused at the first read, before anything more is read or kept.
    stream = Counted(struct.pack("<q", 10 ** 12) + b"x" * 100, b"more")
    with pytest.raises(MessageError, match="exceeds"):
        m.read_message_ahead(stream)
    assert stream.reads == 1
    stream = Counted(data[:5], data[5:])  # the prefix split: found by the reader
    with pytest.raises(MessageError, match=r"\Amessage length 70 exceeds 10\Z"):
        m.read_message_ahead(stream, max_size=10)
    assert stream.reads == 2


# --- Shroud extras and signatures -----------------------------------------------------------
def test_shroud_extras_on_the_wire():
    auth = Auth(extra=m.auth_extra(KEY))
    assert pack(auth) == (b'{"Type":"Auth","Payload":{"Version":["1"],"ClientId":"","Extra":'
                          b'{"key":"' + base64.b64encode(KEY) + b'","shroud":2}}}')
    assert unpack(pack(auth)).public_key == KEY
    assert m.shroud_version(unpack(pack(auth)).extra) == 2
    resp = AuthResp(client_id="c" * 32, extra=m.auth_resp_extra(NONCE))
    assert unpack(pack(resp)).nonce == NONCE
    bind = Bind("tls", hostname="example.com", extra=m.bind_extra(SIG, PROXY))
    assert unpack(pack(bind)).signature == SIG and unpack(pack(bind)).proxy_id == PROXY
    refused = BindResp("", error="example.com is bound by another key",
                       extra=m.refusal_extra(m.REASON_NOT_OWNER))
    assert unpack(pack(refused)).reason == "not-owner"
    # a plain go-tunnel peer (original shroud): no key, nonce, sig, reason, version
    for msg, _, _ in VECTORS[:4]:
        assert m.shroud_version(msg.extra) is None
    assert Auth().public_key is None and AuthResp().nonce is None
    assert Bind("tls").signature is None and BindResp("u").reason is None
    assert Bind("tls").proxy_id is None


@pytest.mark.parametrize("value", [5, "", "cert:", "cert:" + "A" * 64, "cert:" + "a" * 63,
                                   "host:", "host:a b", "host:a\0b", "other:x",
                                   "host:" + "a" * 400])
def test_malformed_proxy_ids(value):
    with pytest.raises(MessageError):
        _ = Bind("tls", extra={"sig": "x", "to": value}).proxy_id
    with pytest.raises(ValueError):
        m.bind_extra(SIG, value)
    if isinstance(value, str) and value.startswith("host:") and len(value) > 5:
        with pytest.raises(ValueError):
            m.proxy_id_for_host(value[5:])


def test_proxy_ids():
    assert m.proxy_id_for_cert(b"der") == "cert:" + hashlib.sha256(b"der").hexdigest()
    for host in ["Proxy.Example.NET", "proxy.example.net:443", "proxy.example.net."]:
        assert m.proxy_id_for_host(host) == "host:proxy.example.net"
    assert m.proxy_id_for_host("[::1]:8080") == "host:[::1]"
    with pytest.raises(ValueError):
        m.proxy_id_for_cert(b"")

def test_proxy_id_bounds_and_refusals():
    longest = "host:" + "a" * (m.MAX_PROXY_ID - 5)  # 300 characters in all
    assert m.check_proxy_id(longest) == longest and len(longest) == 300
    for bad in ["host:" + "a" * 296, "host:A", "cert:" + "a" * 65, " cert:" + "a" * 64, None]:
        with pytest.raises(ValueError, match=r"\Amalformed proxy id "):
            m.check_proxy_id(bad)
    assert m.check_proxy_id("host:[2001:db8::1]") == "host:[2001:db8::1]"
    assert m.check_proxy_id("host:a_b-c.d") == "host:a_b-c.d"
    assert m.proxy_id_for_cert(bytearray(b"der")) == m.proxy_id_for_cert(b"der")
    for bad in [b"", "der", None]:
        with pytest.raises(ValueError, match=r"\Acertificate must be non-empty DER bytes\Z"):
            m.proxy_id_for_cert(bad)
    with pytest.raises(ValueError, match=r"\Ahost must be a str\Z"):
        m.proxy_id_for_host(5)
    assert m.proxy_id_for_fingerprint("ab" * 32) == "cert:" + "ab" * 32
    # Extra "to": absent, null, or Extra not an object -> unsigned-for-a-proxy (None).
    for extra in [None, [], "to", {"to": None}, {"sig": "x"}]:
        assert Bind("tls", extra=extra).proxy_id is None
    with pytest.raises(MessageError) as e:
        _ = Bind("tls", extra={"to": 5}).proxy_id
    assert e.value.reason == "Extra.to: malformed proxy id 5"


def test_extra_fields_exactly():
    assert m.auth_extra(bytearray(KEY)) == {"shroud": 2, "key": base64.b64encode(KEY).decode()}
    assert m.auth_resp_extra(NONCE) == {"shroud": 2, "nonce": base64.b64encode(NONCE).decode()}
    assert m.bind_extra(SIG, PROXY) == {"sig": base64.b64encode(SIG).decode(), "to": PROXY}
    assert m.refusal_extra(m.REASON_LIMIT) == {"reason": "limit"}
    for call, error in [(lambda: m.auth_extra(KEY[:31]), "key must be 32 bytes"),
                        (lambda: m.auth_extra("k" * 32), "key must be 32 bytes"),
                        (lambda: m.auth_resp_extra(NONCE + b"x"), "nonce must be 32 bytes"),
                        (lambda: m.bind_extra(SIG[:63], PROXY), "signature must be 64 bytes"),
                        (lambda: m.refusal_extra(5), "reason must be a str")]:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == error
    # The version a peer announced: an int, never a bool, a string or anything outside an object.
    assert m.shroud_version({"shroud": 3}) == 3
    for extra in [{"shroud": True}, {"shroud": "2"}, {"shroud": 2.0}, {}, [2], 2, None]:
        assert m.shroud_version(extra) is None
    # The refusal code: a string in an object, else none.
    assert BindResp("", extra={"reason": "limit", "x": 1}).reason == "limit"
    for extra in [{"reason": 5}, {"reason": None}, ["reason"], "limit"]:
        assert BindResp("", extra=extra).reason is None


def test_extra_bytes_refusals_exactly():
    short = base64.b64encode(b"short").decode()
    cases = [(5, "Extra.key must be a base64 string"), ([], "Extra.key must be a base64 string"),
             ("not base64!", "Extra.key is not valid base64"),
             # strict: a lenient decoder would skip the "!" and find 32 bytes
             (base64.b64encode(KEY).decode()[:8] + "!" + base64.b64encode(KEY).decode()[8:],
              "Extra.key is not valid base64"),
             ("\u00e9" * 4, "Extra.key is not valid base64"),  # not even ASCII
             (short, "Extra.key must hold 32 bytes, not 5")]
    for value, reason in cases:
        with pytest.raises(MessageError) as e:
            _ = Auth(extra={"key": value}).public_key
        assert e.value.reason == reason
    with pytest.raises(MessageError, match=r"\AExtra\.nonce must hold 32 bytes, not 5\Z"):
        _ = AuthResp(extra={"nonce": short}).nonce
    with pytest.raises(MessageError, match=r"\AExtra\.sig must hold 64 bytes, not 5\Z"):
        _ = Bind("tls", extra={"sig": short}).signature
    for extra in [None, {"key": None}, {"other": "x"}, ["key"]]:
        assert Auth(extra=extra).public_key is None


@pytest.mark.parametrize("value", [5, "not base64!", base64.b64encode(b"short").decode(),
                                   base64.b64encode(KEY).decode().rstrip("=")])
def test_malformed_extra_values(value):
    with pytest.raises(MessageError):
        _ = Auth(extra={"key": value}).public_key
    with pytest.raises(MessageError):
        _ = AuthResp(extra={"nonce": value}).nonce
    with pytest.raises(MessageError):
        _ = Bind("tls", extra={"sig": value}).signature


def test_bind_signature_payload_exact_bytes():
    payload = m.bind_signature_payload(NONCE, PROXY, "tls", "example.com")
    assert payload == (b"shroud-bind-v2\x00" + NONCE + b"\x00" + PROXY.encode()
                       + b"\x00tls\x00example.com")
    assert m.bind_signature_payload(NONCE, "host:p.example", "tcp",
                                    Bind("tcp", remote_port=22).signed_name) \
        == b"shroud-bind-v2\x00" + NONCE + b"\x00host:p.example\x00tcp\x0022"
    assert Bind("tls", hostname="Example.COM.").signed_name == "Example.COM."
    assert m.bind_signature_payload(bytearray(NONCE), PROXY, "tls", "é") == \
        b"shroud-bind-v2\x00" + NONCE + b"\x00" + PROXY.encode() + b"\x00tls\x00\xc3\xa9"
    for args, error in [((NONCE[:31], PROXY, "tls", "a"), "nonce must be 32 bytes"),
                        (("n" * 32, PROXY, "tls", "a"), "nonce must be 32 bytes"),
                        ((NONCE, PROXY, "tls\0", "a"), "protocol must not contain NUL"),
                        ((NONCE, PROXY, "tls", "a\0b"), "name must not contain NUL"),
                        ((NONCE, PROXY, None, "a"), "protocol must be a str"),
                        ((NONCE, PROXY, "tls", 22), "name must be a str")]:
        with pytest.raises(ValueError) as e:
            m.bind_signature_payload(*args)
        assert str(e.value) == error
    assert Bind("tcp").signed_name == "0"
    for args in [(NONCE[:31], PROXY, "tls", "a"), (NONCE, PROXY, "tls\0", "a"),
                 (NONCE, PROXY, "tls", "a\0b"), (NONCE, "host:a\0b", "tls", "a"),
                 (NONCE, "example.com", "tls", "a")]:
        with pytest.raises(ValueError):
            m.bind_signature_payload(*args)


def test_signed_bind_end_to_end(tmp_path):
    client = Identity.load_or_create(str(tmp_path / "client"))
    # client -> proxy: Auth with the key; proxy -> client: nonce; client signs the Bind.
    auth = unpack(pack(Auth(extra=m.auth_extra(client.public_key))))
    resp = unpack(pack(AuthResp(client_id="c" * 32, extra=m.auth_resp_extra(NONCE))))
    payload = m.bind_signature_payload(resp.nonce, PROXY, "tls", "example.com")
    bind = unpack(pack(Bind("tls", hostname="example.com",
                            extra=m.bind_extra(client.sign(payload), PROXY))))
    key_b64 = auth.extra["key"]
    sig_b64 = bind.extra["sig"]
    assert key_b64 == client.public_key_b64
    assert verify_bind(key_b64, sig_b64, m.bind_signature_payload(NONCE, bind.proxy_id, "tls",
                                                                  bind.signed_name))
    # anything else changed: refused
    other = Identity.generate()
    assert not verify_bind(other.public_key_b64, sig_b64, payload)
    for changed in [(NONCE, PROXY, "tls", "evil.com"), (b"\1" * 32, PROXY, "tls", "example.com"),
                    (NONCE, PROXY, "http", "example.com"),
                    (NONCE, "cert:" + "0" * 64, "tls", "example.com"),
                    (NONCE, "host:example.com", "tls", "example.com")]:
        assert not verify_bind(key_b64, sig_b64, m.bind_signature_payload(*changed))
    for bad_key, bad_sig in [("", sig_b64), (key_b64, ""), ("!!", sig_b64), (key_b64, "x"),
                             (base64.b64encode(b"\0" * 32).decode(), sig_b64), (None, None)]:
        assert verify_bind(bad_key, bad_sig, payload) is False


# --- Identity -------------------------------------------------------------------------------
def test_identity_created_once_with_private_permissions(tmp_path):
    data_dir = str(tmp_path / "data")
    first = Identity.load_or_create(data_dir)
    key_file = os.path.join(data_dir, identity_mod.KEY_FILENAME)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert open(key_file, "rb").read().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = Identity.load_or_create(data_dir)
    assert again.public_key == first.public_key
    assert first.fingerprint == fingerprint(first.public_key) == \
        __import__("hashlib").sha256(first.public_key).hexdigest()
    assert len(first.fingerprint) == 64 and len(first.public_key) == 32
    assert base64.b64decode(first.public_key_b64) == first.public_key
    assert [p for p in os.listdir(data_dir)] == [identity_mod.KEY_FILENAME]  # no temp left
    assert len(first.sign(b"x")) == 64


def test_identity_refuses_open_or_bad_key_files(tmp_path):
    data_dir = str(tmp_path)
    Identity.load_or_create(data_dir)
    key_file = os.path.join(data_dir, identity_mod.KEY_FILENAME)
    os.chmod(key_file, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(data_dir)
    os.chmod(key_file, 0o600)
    with open(key_file, "wb") as f:
        f.write(b"not a key")
    with pytest.raises(IdentityError, match="not a PEM"):
        Identity.load_or_create(data_dir)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    with open(key_file, "wb") as f:
        f.write(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    with pytest.raises(IdentityError, match="not an Ed25519"):
        Identity.load_or_create(data_dir)


# --- Cross-check against Go's encoding/json --------------------------------------------------
GO_REPACK = r'''
package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

type Auth struct {
	Version  []string
	ClientId string
	Extra    interface{}
}
type AuthResp struct {
	Version  string
	ClientId string
	Error    string
	Extra    interface{}
}
type TLSOptions struct{ Hostname, Subdomain string }
type HTTPOptions struct{ Hostname, Subdomain, Auth string }
type TCPOptions struct{ RemotePort uint16 }
type Bind struct {
	Protocol string
	Options  json.RawMessage
	Extra    interface{}
}
type BindResp struct {
	Url      string
	Protocol string
	Error    string
	Extra    interface{}
}
type StartProxy struct{ Url, ClientAddr string }
type Envelope struct {
	Type    string
	Payload json.RawMessage
}

// Reads "kind hexjson" lines; decodes each as go-tunnel does and writes proto.Pack's output.
func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		parts := strings.SplitN(in.Text(), " ", 2)
		raw, _ := hex.DecodeString(parts[1])
		var env Envelope
		if err := json.Unmarshal(raw, &env); err != nil {
			fmt.Println("error", err)
			continue
		}
		var payload interface{}
		var err error
		switch parts[0] {
		case "Auth":
			var p Auth
			err = json.Unmarshal(env.Payload, &p)
			payload = &p
		case "AuthResp":
			var p AuthResp
			err = json.Unmarshal(env.Payload, &p)
			payload = &p
		case "BindResp":
			var p BindResp
			err = json.Unmarshal(env.Payload, &p)
			payload = &p
		case "StartProxy":
			var p StartProxy
			err = json.Unmarshal(env.Payload, &p)
			payload = &p
		default: // Bind-tls, Bind-http, Bind-tcp: typed options, as the Go client sends them
			var p Bind
			err = json.Unmarshal(env.Payload, &p)
			var opts interface{} = &TLSOptions{}
			if parts[0] == "Bind-http" {
				opts = &HTTPOptions{}
			} else if parts[0] == "Bind-tcp" {
				opts = &TCPOptions{}
			}
			if err == nil {
				err = json.Unmarshal(p.Options, opts)
			}
			payload = &struct {
				Protocol string
				Options  interface{}
				Extra    interface{}
			}{p.Protocol, opts, p.Extra}
			env.Type = "Bind"
		}
		if err != nil {
			fmt.Println("error", err)
			continue
		}
		out, err := json.Marshal(struct {
			Type    string
			Payload interface{}
		}{env.Type, payload})
		if err != nil {
			fmt.Println("error", err)
			continue
		}
		fmt.Println("ok", hex.EncodeToString(out))
	}
}
'''


@pytest.fixture(scope="module")
def go_repack(tmp_path_factory):
    """A Go program that decodes our JSON and re-encodes it with Go's encoding/json."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is missing (apt-get install golang-go): the cross-check "
                    "against Go's encoder is the point of this test")
    work = tmp_path_factory.mktemp("gorepack")
    (work / "main.go").write_text(GO_REPACK)
    env = dict(os.environ, GO111MODULE="off", GOFLAGS="", GOPROXY="off", CGO_ENABLED="0",
               GOPATH=str(work / "gopath"))
    env.setdefault("GOCACHE", str(work / "gocache"))
    # Building a stdlib-only program takes 1-20 s depending on the cache.
    subprocess.run([go, "build", "-o", str(work / "repack"), "main.go"], cwd=work, env=env,
                   check=True, capture_output=True, timeout=180)

    def repack(msgs):
        lines = []
        for msg in msgs:
            kind = msg.TYPE
            if isinstance(msg, Bind):
                kind = "Bind-" + ("tcp" if msg.protocol == "tcp" else
                                  "http" if msg.auth is not None else "tls")
            lines.append("%s %s\n" % (kind, pack(msg).hex()))
        proc = subprocess.run([str(work / "repack")], input="".join(lines), text=True,
                              capture_output=True, timeout=60, check=True)
        out = proc.stdout.splitlines()
        assert len(out) == len(msgs), proc.stdout
        return [bytes.fromhex(line[3:]) if line.startswith("ok ") else line for line in out]
    return repack


# JSON values Go's interface{} decoding round-trips exactly: small ints (Go uses float64).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 53), 2 ** 53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
texts = st.text(max_size=40)
messages = st.one_of(
    st.builds(Auth, version=st.lists(texts, max_size=3), client_id=texts, extra=json_values),
    st.builds(AuthResp, version=texts, client_id=texts, error=texts, extra=json_values),
    st.builds(Bind, protocol=st.sampled_from(["tls", "https", "http"]) | texts.filter(lambda p: p != "tcp"), hostname=texts,
              subdomain=texts, extra=json_values, auth=st.none() | texts),
    st.builds(Bind, protocol=st.just("tcp"), remote_port=st.integers(0, 65535),
              extra=json_values),
    st.builds(BindResp, url=texts, protocol=texts, error=texts, extra=json_values),
    st.builds(StartProxy, url=texts, client_addr=texts),
)


def test_go_reencodes_our_vectors_identically(go_repack):
    extras = [Auth(extra=m.auth_extra(KEY)), AuthResp(extra=m.auth_resp_extra(NONCE)),
              Bind("tls", hostname="example.com", extra=m.bind_extra(SIG, PROXY)),
              BindResp("", error="no", extra=m.refusal_extra(m.REASON_NOT_OWNER)),
              Bind("tcp", remote_port=443), Bind("http", hostname="h", auth="u:p"),
              StartProxy("<&>\u2028\b\f\x01\x7f é", "\U0001f600")]
    msgs = [v[0] for v in VECTORS] + extras
    assert go_repack(msgs) == [pack(msg) for msg in msgs]


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, min_size=1, max_size=10))
def test_fuzz_go_agrees_byte_for_byte(go_repack, msgs):
    assert go_repack(msgs) == [pack(msg) for msg in msgs]


# --- fuzz -----------------------------------------------------------------------------------
@settings(max_examples=1000, deadline=None)
@given(messages)
def test_fuzz_round_trip(msg):
    decoded = unpack(pack(msg))
    if isinstance(msg, Bind) and msg.protocol == "tcp":
        assert decoded == msg
    elif isinstance(msg, Bind):
        assert (decoded.protocol, decoded.hostname, decoded.subdomain, decoded.auth) == \
            (msg.protocol, msg.hostname, msg.subdomain, msg.auth)
    else:
        assert decoded == msg
    assert encode(decoded) == encode(msg)


def has_float(value) -> bool:
    if isinstance(value, dict):
        return any(has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(has_float(v) for v in value)
    return isinstance(value, float)


def assert_reencodes_to_itself(msg):
    try:
        body = pack(msg)
    except ValueError:
        assert has_float(getattr(msg, "extra", None))  # the one thing we refuse to re-encode
        return
    assert unpack(body) == msg
    assert next_messages(encode(msg), len(encode(msg))) == ([msg], None, b"")


def next_messages(data, step):
    """(messages, MessageError reason or None, trailing bytes) feeding ``step`` bytes at a time
    and draining after each piece; only MessageError may escape the reader."""
    reader = MessageReader()
    out = []
    for start in range(0, len(data), step):
        reader.feed(data[start:start + step])
        try:
            while (msg := reader.next_message()) is not None:
                out.append(msg)
        except MessageError as exc:
            with pytest.raises(MessageError):  # the stream stays unusable
                reader.next_message()
            return out, exc.reason, None
    return out, None, reader.trailing_data


def assert_three_ways_agree(data, step):
    whole = next_messages(data, max(1, len(data)))
    assert next_messages(data, 1) == whole
    assert next_messages(data, step) == whole
    msgs, reason, trailing = whole
    for msg in msgs:
        assert_reencodes_to_itself(msg)
    if reason is None:
        # Only an incomplete message stays buffered, and it is the end of the input.
        assert data.endswith(trailing)
        assert len(trailing) < 8 or struct.unpack_from("<q", trailing)[0] > len(trailing) - 8
    return whole


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.integers(2, 64))
def test_fuzz_random_bytes_only_message_error(data, step):
    assert_three_ways_agree(data, step)
    try:
        msg = unpack(data)
    except MessageError:
        return
    assert_reencodes_to_itself(msg)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_fuzz_mutated_messages_only_message_error(data):
    raw = bytearray(b"".join(encode(v[0]) for v in VECTORS))
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    msgs, reason, _ = assert_three_ways_agree(bytes(raw), data.draw(st.integers(2, 64)))
    if reason is None and len(msgs) == len(VECTORS):
        # Mutations the decoder accepted (key case, whitespace...) still give five messages of
        # the same types in order.
        assert [type(msg) for msg in msgs] == [type(v[0]) for v in VECTORS]


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                    max_leaves=10),
       st.sampled_from(["Auth", "AuthResp", "Bind", "BindResp", "StartProxy"]))
def test_fuzz_arbitrary_json_payloads(payload, msg_type):
    body = json.dumps({"Type": msg_type, "Payload": payload}).encode()
    try:
        msg = unpack(body)
    except MessageError:
        return
    assert msg.TYPE == msg_type


def test_worked_example_in_protocol_doc():
    """The signed-bind example of docs/PROTOCOL.md: Ed25519 seed of 32 zero bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    client = Identity(Ed25519PrivateKey.from_private_bytes(bytes(32)))
    assert client.fingerprint == \
        "139e3940e64b5491722088d9a0d741628fc826e09475d341a780acde3c4b8070"
    assert encode(Auth(extra=m.auth_extra(client.public_key))) == bytes.fromhex(
        "8300000000000000") + (b'{"Type":"Auth","Payload":{"Version":["1"],"ClientId":"",'
                               b'"Extra":{"key":"O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=",'
                               b'"shroud":2}}}')
    assert PROXY == "cert:202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
    payload = m.bind_signature_payload(NONCE, PROXY, "tls", "example.com")
    assert payload.hex() == ("7368726f75642d62696e642d763200" + NONCE.hex() + "00"
                             + PROXY.encode().hex() + "00746c73006578616d706c652e636f6d")
    bind = Bind("tls", hostname="example.com", extra=m.bind_extra(client.sign(payload), PROXY))
    assert encode(bind) == bytes.fromhex("1801000000000000") + (
        b'{"Type":"Bind","Payload":{"Protocol":"tls","Options":{"Hostname":"example.com",'
        b'"Subdomain":""},"Extra":{"sig":"SC6dV/6Tr7WfSofGbV3g2SSUjnQxA+IYZ4TA2p3G29MOy/9K7kqL'
        b'buONF+AeHvDEu1iWShMyq1k8erIDZsQ1Aw==","to":"' + PROXY.encode() + b'"}}}')
    assert verify_bind(client.public_key_b64, bind.extra["sig"], payload)


def test_start_proxy_public_addr_is_shroud_only_and_ignored_by_go(go_repack):
    plain = StartProxy("http://a.test", "203.0.113.7:51514")
    told = StartProxy("http://a.test", "203.0.113.7:51514", public_addr="198.51.100.1:80")
    assert pack(plain) == (b'{"Type":"StartProxy","Payload":{"Url":"http://a.test",'
                           b'"ClientAddr":"203.0.113.7:51514"}}')  # go-tunnel's two fields
    assert pack(told) == pack(plain)[:-2] + b',"PublicAddr":"198.51.100.1:80"}}'
    assert unpack(pack(told)) == told and unpack(pack(plain)) == plain
    # A go-tunnel client decodes it and sees its own two fields.
    assert go_repack([told]) == [pack(plain)]


# --- StartProxy's plain paths (one per public connection: no general codec) ----------------
PLAIN = b'{"Type":"StartProxy","Payload":{"Url":"http://a.test","ClientAddr":"203.0.113.7:1"}}'


def _general_unpack(monkeypatch, body: bytes):
    """unpack with the plain path switched off: the general decoder's verdict."""
    with monkeypatch.context() as mp:
        mp.setattr(m, "_unpack_plain_start_proxy", lambda body: None)
        try:
            return unpack(body)
        except MessageError as e:
            return ("error", e.reason)


def _general_pack(monkeypatch, msg) -> bytes:
    with monkeypatch.context() as mp:
        mp.setattr(m, "_pack_plain_start_proxy", lambda msg: None)
        return pack(msg)


def test_a_plain_start_proxy_skips_the_json_codec(monkeypatch):
    # Goes red when the plain paths are gone (or never taken): the JSON codec is what they
    # save per public connection.
    def no_json(*a, **k):
        raise AssertionError("the general codec ran")
    monkeypatch.setattr(m.json, "loads", no_json)
    monkeypatch.setattr(m, "_go_json", no_json)
    told = StartProxy("http://a.test", "203.0.113.7:1", public_addr="198.51.100.1:80")
    assert unpack(pack(told)) == told
    assert unpack(PLAIN) == StartProxy("http://a.test", "203.0.113.7:1")
    assert pack(StartProxy("tls://é.test", "[2001:db8::1]:443")) == (
        '{"Type":"StartProxy","Payload":{"Url":"tls://é.test","ClientAddr":"[2001:db8::1]:443"}}'
        .encode())
    # Anything else is the general codec's: a spelling Go would also accept, an escape.
    for other in (PLAIN.replace(b'"Url"', b'"url"'), PLAIN.replace(b":1", b":\\u0031"),
                  PLAIN.replace(b",", b", ")):
        with pytest.raises(AssertionError, match="general codec"):
            unpack(other)
    with pytest.raises(AssertionError, match="general codec"):
        pack(StartProxy("http://a.test/<", "x"))


@pytest.mark.parametrize("body", [
    PLAIN,
    PLAIN.replace(b"}}", b',"PublicAddr":""}}'),          # empty: None, as Go's zero value
    PLAIN.replace(b"}}", b',"PublicAddr":"1.2.3.4:5"}}'),
    PLAIN.replace(b"a.test", b"\xc3\xa9\xe2\x80\xa8\x7f"),  # UTF-8, raw U+2028, DEL
    PLAIN.replace(b"a.test", b"\xff"),                       # not UTF-8
    PLAIN.replace(b"a.test", b"\xed\xa0\x80"),               # an encoded surrogate
    PLAIN.replace(b"a.test", b"\xc0\xae"),                   # overlong
    PLAIN.replace(b"a.test", b"\x01"),                       # a raw control byte
    PLAIN.replace(b"a.test", b"a\\\"b"),                     # an escape
    PLAIN.replace(b"}}", b',"Url":"second"}}'),              # a duplicate: the last wins
    PLAIN.replace(b'"Url":"http://a.test",', b""),           # a field missing
    PLAIN + b" ", b" " + PLAIN, PLAIN[:-1],
])
def test_plain_start_proxy_decodes_as_the_general_decoder(monkeypatch, body):
    try:
        fast = unpack(body)
    except MessageError as e:
        fast = ("error", e.reason)
    assert fast == _general_unpack(monkeypatch, body)


@settings(max_examples=500, deadline=None)
@given(texts, texts, st.none() | texts)
def test_fuzz_plain_start_proxy_paths_agree_with_the_general_codec(url, client, public):
    with pytest.MonkeyPatch.context() as mp:
        msg = StartProxy(url, client, public_addr=public)
        body = pack(msg)
        assert body == _general_pack(mp, msg)
        assert unpack(body) == _general_unpack(mp, body)
        raw = PLAIN.replace(b"http://a.test", url.encode("utf-8", "surrogatepass"))
        try:
            fast = unpack(raw)
        except MessageError as e:
            fast = ("error", e.reason)
        assert fast == _general_unpack(mp, raw)


def _split_verdict(data: bytes):
    try:
        return m.split_message(data)
    except MessageError as e:
        return ("error", e.reason)


@pytest.mark.parametrize("body", [
    PLAIN,
    PLAIN.replace(b"}}", b',"PublicAddr":""}}'),
    PLAIN.replace(b"}}", b',"PublicAddr":"1.2.3.4:5"}}'),
    PLAIN.replace(b"a.test", b"\xc3\xa9\xe2\x80\xa8\x7f"),
    PLAIN.replace(b"a.test", b"\xff"),
    PLAIN.replace(b"a.test", b"\xed\xa0\x80"),
    PLAIN.replace(b"a.test", b"a\\\"b"),
    PLAIN.replace(b"}}", b',"Url":"second"}}'),
    PLAIN + b" ", PLAIN[:-1],
])
@pytest.mark.parametrize("rest", [b"", b"GET / HTTP/1.1\r\n\r\n"])
def test_split_message_reads_a_start_proxy_as_unpack_does(monkeypatch, body, rest):
    """split_message's own match of a plain StartProxy gives what the length prefix and
    unpack give (the general decoder's verdict where it does not match), and the bytes after."""
    data = struct.pack("<q", len(body)) + body + rest
    expect = _general_unpack(monkeypatch, body)
    is_error = isinstance(expect, tuple)
    assert _split_verdict(data) == (expect if is_error else (expect, rest))
    for cut in (3, len(data) - len(rest) - 1):
        assert m.split_message(data[:cut]) is None
    # The length prefix is judged first, as before: negative, or over max_size.
    assert _split_verdict(struct.pack("<q", -1) + body) == ("error",
                                                            "negative message length -1")
    with pytest.raises(MessageError, match="exceeds"):
        m.split_message(data, max_size=len(body) - 1)


def test_split_message_parses_a_plain_start_proxy_in_one_call():
    """The client parses one StartProxy per public connection before it connects to its target
    (lib.client.tunnels): one Python call of lib/, where the length check, unpack, a copy of the
    body and the plain decoder were four (bench/README.md, "Fresh connections: the client's
    critical path")."""
    from tests.support.calls import PythonCalls

    data = m.encode(StartProxy("http://a.test", "203.0.113.7:1", "198.51.100.1:80")) + b"GET"
    with PythonCalls(under="lib") as calls:
        got = m.split_message(data)
    assert got == (StartProxy("http://a.test", "203.0.113.7:1", "198.51.100.1:80"), b"GET")
    assert calls.names == ["split_message"]
