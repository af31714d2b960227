"""go-tunnel control messages, byte for byte as Go's encoder writes them, plus Shroud's Extras.

Sans-I/O codec (except the three tiny stream helpers at the end). A message on the wire is an
8-byte little-endian signed int64 length followed by that many bytes of JSON::

    {"Type":"<name>","Payload":{<fields in Go's declared order>}}

encoded the way Go's ``encoding/json`` does it: compact, every field present (empty strings and
``null`` included), map keys sorted, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as ``\\u003c``
etc., other non-ASCII written as UTF-8. Decoding follows Go's decoder where it matters for
compatibility: keys match field names case-insensitively (the last duplicate wins), unknown keys
are ignored, ``null`` means the zero value. It is stricter where Go is dangerously lenient: the
length is bounded (``MAX_MESSAGE``), every field but ``Extra`` must be present, and the JSON must
be valid UTF-8.

Public API::

    Auth(version=["1"], client_id="", extra=None)              .public_key -> bytes | None
    AuthResp(version="1", client_id="", error="", extra=None)   .nonce -> bytes | None
    Bind(protocol, hostname="", subdomain="", remote_port=None, extra=None, auth=None)
                  .signature -> bytes | None, .proxy_id -> str | None, .signed_name -> str
    BindResp(url, protocol="", error="", extra=None)             .reason -> str | None
    StartProxy(url, client_addr, public_addr=None)
    Message = Auth | AuthResp | Bind | BindResp | StartProxy

    encode(msg) -> bytes                       # length prefix + JSON
    encode_start_proxy(url, client_addr, public_addr=None) -> bytes   # the same for a
                                               # StartProxy, without the object (the proxy's)
    pack(msg) -> bytes                         # the JSON alone (Go's proto.Pack)
    unpack(json_bytes) -> Message              # raises MessageError
    MessageReader(max_size=MAX_MESSAGE): feed(data), next_message() -> Message | None,
                                         trailing_data -> bytes
    read_message(stream, max_size=MAX_MESSAGE) -> Message   # stream has recv(n)
    read_message_ahead(stream, max_size=MAX_MESSAGE, bufsize=READ_AHEAD)
                  -> (Message, bytes read past it)          # one read for StartProxy + data
    split_message(data, max_size=MAX_MESSAGE) -> (Message, rest) | None  # no I/O: None if cut
    write_message(stream, msg) -> None                      # stream has sendall(b)
    MessageError(ValueError) .reason

    Shroud additions (see docs/PROTOCOL.md, "Control messages"):
    auth_extra(public_key) / auth_resp_extra(nonce) / bind_extra(signature, proxy_id) /
    refusal_extra(reason) -> dict;  shroud_version(extra) -> int | None
    proxy_id_for_cert(der) / proxy_id_for_fingerprint(hex) / proxy_id_for_host(host) -> str
                                                  # what a bind is signed for
    bind_signature_payload(nonce, proxy_id, protocol, name) -> bytes
    SHROUD_VERSION, NONCE_SIZE, PUBLIC_KEY_SIZE, SIGNATURE_SIZE, BIND_SIGNATURE_CONTEXT,
    EXTRA_VERSION, EXTRA_KEY, EXTRA_NONCE, EXTRA_SIG, EXTRA_TO, EXTRA_REASON, REASON_* codes
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Union

from lib.errors import ShroudError

# A length prefix is read before the body, so it must be bounded before anything is buffered:
# go-tunnel allocates whatever int64 the peer declares. The largest real message is a Bind with
# a 253-character hostname and a signature, under 600 bytes; 64 KiB is 100x that, and no more
# than a muxado stream's initial window (64 KiB, all a peer's stream gets from the proxy), so one
# hostile stream can make us hold at most 64 KiB.
MAX_MESSAGE = 64 * 1024
LENGTH_PREFIX = 8
_LENGTH = struct.Struct("<q")

PROTOCOL_VERSION = "1"  # go-tunnel's proto.Version

# --- Shroud's additions, carried in the Extra fields ----------------------------------------
# 2: a Bind signature names the proxy it is meant for (EXTRA_TO), so a proxy cannot relay
# another proxy's nonce and the client's signature to bind the name there. Version 1 (the
# payload without the proxy) is refused both ways.
SHROUD_VERSION = 2
EXTRA_VERSION = "shroud"   # Auth.Extra and AuthResp.Extra: Shroud protocol version (int)
EXTRA_KEY = "key"          # Auth.Extra: base64 of the client's raw Ed25519 public key
EXTRA_NONCE = "nonce"      # AuthResp.Extra: base64 of NONCE_SIZE random bytes from the proxy
EXTRA_SIG = "sig"          # Bind.Extra: base64 Ed25519 signature of bind_signature_payload()
EXTRA_TO = "to"            # Bind.Extra: the proxy id the signature names (proxy_id_for_*)
EXTRA_REASON = "reason"    # BindResp.Extra (and AuthResp.Extra): machine-readable refusal code
NONCE_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
BIND_SIGNATURE_CONTEXT = b"shroud-bind-v2\0"
# A proxy id is "cert:" + 64 hex digits or "host:" + a hostname: short printable ASCII.
MAX_PROXY_ID = 300
_PROXY_ID = re.compile(r"\A(?:cert:[0-9a-f]{64}|host:[a-z0-9.\-_\[\]:]{1,%d})\Z" % (MAX_PROXY_ID - 5))

# Refusal codes for Extra["reason"]; Error carries the human sentence.
REASON_BAD_REQUEST = "bad-request"            # malformed Bind / Options
REASON_UNSUPPORTED_PROTOCOL = "unsupported-protocol"
REASON_INVALID_HOSTNAME = "invalid-hostname"
REASON_SIGNATURE_REQUIRED = "signature-required"  # unsigned bind where the policy wants one
REASON_BAD_SIGNATURE = "bad-signature"
REASON_NOT_OWNER = "not-owner"                # another key owns this name
REASON_WRONG_PROXY = "wrong-proxy"            # the signature names another proxy (a relay)
REASON_NOT_ALLOWED = "not-allowed"            # no rule lets this key bind this name
REASON_LIMIT = "limit"                        # too many tunnels / binds
REASON_INTERNAL = "internal"
REASON_RESERVED = "reserved"                  # the proxy's own names, addresses, localhost, .onion
# The proxy's ownership store (its fleet's database) cannot be reached: nothing is wrong with the
# bind; the client asks again soon (lib/client/tunnels.py), live bindings keep serving.
REASON_STORE_UNAVAILABLE = "store-unavailable"


class MessageError(ShroudError, ValueError):
    """A control message could not be decoded; the stream carrying it is unusable.

    :ivar reason: what was wrong, for logs.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- Go-compatible JSON encoding ------------------------------------------------------------
class _Struct(tuple):
    """Ordered (name, value) pairs: a Go struct, encoded in declared order."""


_ESCAPE_RE = re.compile("[\x00-\x1f\"\\\\<>&\u2028\u2029\ud800-\udfff]")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    char = match.group()
    if char in _ESCAPES:
        return _ESCAPES[char]
    if "\ud800" <= char <= "\udfff":
        return "\\ufffd"  # Go writes invalid UTF-8 as U+FFFD; a lone surrogate is the analogue
    return "\\u%04x" % ord(char)  # Go 1.19: \b and \f too, lower-case hex


def _go_json(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + _ESCAPE_RE.sub(_escape_char, value) + '"'
    if isinstance(value, _Struct):
        return "{" + ",".join(_go_json(k) + ":" + _go_json(v) for k, v in value) + "}"
    if isinstance(value, dict):
        # Go encodes a map with its keys sorted (and an Extra decoded by Go is a map).
        items = sorted(value.items())
        for key, _ in items:
            if not isinstance(key, str):
                raise ValueError("JSON object keys must be strings")
        return "{" + ",".join(_go_json(k) + ":" + _go_json(v) for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_go_json(v) for v in value) + "]"
    # Floats are refused: Go's float formatting differs from Python's, and nothing here needs them.
    raise ValueError("cannot encode %s in a control message" % type(value).__name__)


# --- Go-compatible decoding helpers ---------------------------------------------------------
class _Object(list):
    """A decoded JSON object as its (key, value) pairs, duplicates and order kept."""


def _fold(name: str) -> str | None:
    # Go's decoder matches keys case-insensitively, and its fold also maps KELVIN SIGN to k and
    # LONG S to s. Field names are ASCII, so a key that is not ASCII after that cannot match.
    folded = name.replace("\u017f", "s").replace("\u212a", "k")
    return folded.lower() if folded.isascii() else None


def _fields(obj: Any, names: tuple[str, ...], what: str) -> dict[str, Any]:
    """Map Go field names to values the way Go's decoder does: exact or case-folded key match,
    the last matching key wins, unknown keys ignored."""
    if not isinstance(obj, _Object):
        raise MessageError("%s must be a JSON object" % what)
    folded = {name.lower(): name for name in names}
    found: dict[str, Any] = {}
    for key, value in obj:
        name = key if key in names else folded.get(_fold(key) or "")
        if name is not None:
            found[name] = value
    return found


def _plain(value: Any) -> Any:
    """Decoded JSON as plain Python values (objects as dicts, last duplicate winning)."""
    if isinstance(value, _Object):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _string(found: dict, name: str, what: str, required: bool = True) -> str:
    if name not in found:
        if required:
            raise MessageError("%s has no %s" % (what, name))
        return ""
    value = found[name]
    if value is None:
        return ""  # Go leaves the zero value for null
    if not isinstance(value, str):
        raise MessageError("%s.%s must be a string" % (what, name))
    return value


def _reject_constant(name: str) -> None:
    raise MessageError("%s is not valid JSON" % name)


def _repair_surrogates(value: Any) -> Any:
    # JSON may spell a lone surrogate as \\ud800; Go decodes it as U+FFFD, and so do we, so that
    # every decoded string can be encoded again.
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


# --- Messages -------------------------------------------------------------------------------
def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError("%s must be a str" % name)
    return value


@dataclass
class Auth:
    """Client -> proxy, the first message on the first stream the client opens."""
    version: list[str] = field(default_factory=lambda: [PROTOCOL_VERSION])
    client_id: str = ""
    extra: Any = None

    TYPE = "Auth"

    def _payload(self) -> _Struct:
        if not isinstance(self.version, (list, tuple)):
            raise ValueError("Auth.version must be a list of str")
        return _Struct([("Version", [_check_str(v, "Auth.version") for v in self.version]),
                        ("ClientId", _check_str(self.client_id, "Auth.client_id")),
                        ("Extra", self.extra)])

    @classmethod
    def _from_payload(cls, payload: Any) -> Auth:
        found = _fields(payload, ("Version", "ClientId", "Extra"), "Auth")
        if "Version" not in found:
            raise MessageError("Auth has no Version")
        version = found["Version"]
        if version is None:
            version = []
        if not isinstance(version, list) or not all(isinstance(v, (str, type(None)))
                                                    for v in version):
            raise MessageError("Auth.Version must be a list of strings")
        return cls(version=[v or "" for v in version],
                   client_id=_string(found, "ClientId", "Auth"),
                   extra=_plain(found.get("Extra")))

    @property
    def public_key(self) -> bytes | None:
        """The client's raw Ed25519 public key from Extra, or None (not a Shroud client).

        :raises MessageError: the key is present but not base64 of 32 bytes.
        """
        return _extra_bytes(self.extra, EXTRA_KEY, PUBLIC_KEY_SIZE)


@dataclass
class AuthResp:
    """Proxy -> client, the answer to Auth. A non-empty ``error`` refuses the session."""
    version: str = PROTOCOL_VERSION
    client_id: str = ""
    error: str = ""
    extra: Any = None

    TYPE = "AuthResp"

    def _payload(self) -> _Struct:
        return _Struct([("Version", _check_str(self.version, "AuthResp.version")),
                        ("ClientId", _check_str(self.client_id, "AuthResp.client_id")),
                        ("Error", _check_str(self.error, "AuthResp.error")),
                        ("Extra", self.extra)])

    @classmethod
    def _from_payload(cls, payload: Any) -> AuthResp:
        found = _fields(payload, ("Version", "ClientId", "Error", "Extra"), "AuthResp")
        return cls(version=_string(found, "Version", "AuthResp"),
                   client_id=_string(found, "ClientId", "AuthResp"),
                   error=_string(found, "Error", "AuthResp"),
                   extra=_plain(found.get("Extra")))

    @property
    def nonce(self) -> bytes | None:
        """The proxy's bind nonce from Extra, or None (not a Shroud proxy).

        :raises MessageError: the nonce is present but not base64 of 32 bytes.
        """
        return _extra_bytes(self.extra, EXTRA_NONCE, NONCE_SIZE)


@dataclass
class Bind:
    """Client -> proxy, one per stream: bind a name (or for "tcp" a port) to this session.

    ``auth`` is go-tunnel's HTTP basic-auth option; it is emitted only when not None, so a
    Shroud "tls" bind is byte-identical to the original shroud client's.
    """
    protocol: str
    hostname: str = ""
    subdomain: str = ""
    remote_port: int | None = None
    extra: Any = None
    auth: str | None = None

    TYPE = "Bind"

    def _payload(self) -> _Struct:
        _check_str(self.protocol, "Bind.protocol")
        if self.protocol == "tcp":
            port = self.remote_port or 0
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError("Bind.remote_port must be 0-65535")
            options = _Struct([("RemotePort", port)])
        else:
            pairs = [("Hostname", _check_str(self.hostname, "Bind.hostname")),
                     ("Subdomain", _check_str(self.subdomain, "Bind.subdomain"))]
            if self.auth is not None:
                pairs.append(("Auth", _check_str(self.auth, "Bind.auth")))
            options = _Struct(pairs)
        return _Struct([("Protocol", self.protocol), ("Options", options),
                        ("Extra", self.extra)])

    @classmethod
    def _from_payload(cls, payload: Any) -> Bind:
        found = _fields(payload, ("Protocol", "Options", "Extra"), "Bind")
        protocol = _string(found, "Protocol", "Bind")
        if "Options" not in found:
            raise MessageError("Bind has no Options")
        extra = _plain(found.get("Extra"))
        if protocol == "tcp":
            options = _fields(found["Options"], ("RemotePort",), "Bind.Options")
            if "RemotePort" not in options:
                raise MessageError("Bind.Options has no RemotePort")
            port = options["RemotePort"]
            if port is None:
                port = 0
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise MessageError("Bind.Options.RemotePort must be an integer 0-65535")
            return cls(protocol=protocol, remote_port=port, extra=extra)
        options = _fields(found["Options"], ("Hostname", "Subdomain", "Auth"), "Bind.Options")
        auth = _string(options, "Auth", "Bind.Options", required=False) \
            if "Auth" in options else None
        return cls(protocol=protocol,
                   hostname=_string(options, "Hostname", "Bind.Options"),
                   subdomain=_string(options, "Subdomain", "Bind.Options"),
                   extra=extra, auth=auth)

    @property
    def signed_name(self) -> str:
        """The name the bind signature covers: the decimal port for "tcp", else the Hostname
        exactly as sent (before any normalisation)."""
        if self.protocol == "tcp":
            return str(self.remote_port or 0)
        return self.hostname

    @property
    def signature(self) -> bytes | None:
        """The Ed25519 bind signature from Extra, or None (unsigned bind).

        :raises MessageError: present but not base64 of 64 bytes.
        """
        return _extra_bytes(self.extra, EXTRA_SIG, SIGNATURE_SIZE)

    @property
    def proxy_id(self) -> str | None:
        """The proxy id the signature names (Extra "to"), or None when absent.

        :raises MessageError: present but not a well-formed proxy id.
        """
        if not isinstance(self.extra, dict) or self.extra.get(EXTRA_TO) is None:
            return None
        try:
            return check_proxy_id(self.extra[EXTRA_TO])
        except ValueError as e:
            raise MessageError("Extra.%s: %s" % (EXTRA_TO, e)) from None


@dataclass
class BindResp:
    """Proxy -> client, the answer to Bind. A non-empty ``error`` refuses the bind."""
    url: str
    protocol: str = ""
    error: str = ""
    extra: Any = None

    TYPE = "BindResp"

    def _payload(self) -> _Struct:
        return _Struct([("Url", _check_str(self.url, "BindResp.url")),
                        ("Protocol", _check_str(self.protocol, "BindResp.protocol")),
                        ("Error", _check_str(self.error, "BindResp.error")),
                        ("Extra", self.extra)])

    @classmethod
    def _from_payload(cls, payload: Any) -> BindResp:
        found = _fields(payload, ("Url", "Protocol", "Error", "Extra"), "BindResp")
        return cls(url=_string(found, "Url", "BindResp"),
                   protocol=_string(found, "Protocol", "BindResp"),
                   error=_string(found, "Error", "BindResp"),
                   extra=_plain(found.get("Extra")))

    @property
    def reason(self) -> str | None:
        """The machine-readable refusal code from Extra, if any."""
        if isinstance(self.extra, dict) and isinstance(self.extra.get(EXTRA_REASON), str):
            return self.extra[EXTRA_REASON]
        return None


@dataclass
class StartProxy:
    """Proxy -> client, the first bytes of every stream the proxy opens. ``client_addr`` is the
    public peer's "ip:port" (go-tunnel's StartProxy has no Extra). ``public_addr`` is Shroud's
    addition: the "ip:port" of the proxy's public listener the peer connected to (the
    destination of a PROXY protocol header); written only when set, so a go-tunnel client sees
    exactly go-tunnel's two fields, and a reader that does not know it ignores it."""
    url: str
    client_addr: str
    public_addr: str | None = None

    TYPE = "StartProxy"

    def _payload(self) -> _Struct:
        fields = [("Url", _check_str(self.url, "StartProxy.url")),
                  ("ClientAddr", _check_str(self.client_addr, "StartProxy.client_addr"))]
        if self.public_addr is not None:
            fields.append(("PublicAddr", _check_str(self.public_addr, "StartProxy.public_addr")))
        return _Struct(fields)

    @classmethod
    def _from_payload(cls, payload: Any) -> StartProxy:
        found = _fields(payload, ("Url", "ClientAddr", "PublicAddr"), "StartProxy")
        public = _string(found, "PublicAddr", "StartProxy", required=False)
        return cls(url=_string(found, "Url", "StartProxy"),
                   client_addr=_string(found, "ClientAddr", "StartProxy"),
                   public_addr=public or None)


Message = Union[Auth, AuthResp, Bind, BindResp, StartProxy]
_TYPES = {cls.TYPE: cls for cls in (Auth, AuthResp, Bind, BindResp, StartProxy)}


# --- Codec ----------------------------------------------------------------------------------
def pack(msg: Message) -> bytes:
    """The JSON envelope of a message, byte-identical to go-tunnel's ``proto.Pack``.

    :raises ValueError: a field has the wrong type, or Extra holds a float or other value that
        has no Go encoding.
    """
    if type(msg) is StartProxy:
        fast = _pack_plain_start_proxy(msg)
        if fast is not None:
            return fast
    elif type(msg) not in _TYPES.values():
        raise TypeError("not a control message: %r" % (msg,))
    envelope = _Struct([("Type", msg.TYPE), ("Payload", msg._payload())])
    return _go_json(envelope).encode("utf-8")


# StartProxy is the one message per public connection (the others come once per tunnel or
# bind): it skips the general encoder and decoder when its strings need no escaping, which is
# every real one (a URL, two "ip:port"s). Same bytes, same result: tests/test_messages.py holds
# both paths to each other and to Go's encoder. The general path cost 8-13 us to encode and
# 13-20 us to decode (bench/README.md, "Fresh connections: fewer steps per connection").
_PLAIN = r'[^"\\\x00-\x1f]*'
_START_PROXY_PLAIN = re.compile(
    (r'\{"Type":"StartProxy","Payload":\{"Url":"(%s)","ClientAddr":"(%s)"'
     r'(?:,"PublicAddr":"(%s)")?\}\}' % (_PLAIN, _PLAIN, _PLAIN)).encode("ascii"))


def _pack_plain_start_proxy(msg: StartProxy) -> bytes | None:
    """Go's bytes for ``msg`` when no string in it needs escaping, else None."""
    return _plain_start_proxy(msg.url, msg.client_addr, msg.public_addr)


def _plain_start_proxy(url, client, public) -> bytes | None:
    """Go's bytes for StartProxy(url, client, public) when no string needs escaping, else None."""
    if not (isinstance(url, str) and isinstance(client, str)
            and (public is None or isinstance(public, str))):
        return None  # the general path names the field
    if _ESCAPE_RE.search(url) or _ESCAPE_RE.search(client) or (
            public is not None and _ESCAPE_RE.search(public)):
        return None
    tail = "}}" if public is None else ',"PublicAddr":"' + public + '"}}'
    return ('{"Type":"StartProxy","Payload":{"Url":"' + url + '","ClientAddr":"' + client
            + '"' + tail).encode("utf-8")


def _unpack_plain_start_proxy(body: bytes) -> StartProxy | None:
    """``body`` decoded when it is a StartProxy exactly as Go and :func:`pack` write it with
    strings that hold no escape; None for anything else (the general decoder judges it)."""
    m = _START_PROXY_PLAIN.fullmatch(body)
    if m is None:
        return None
    url, client, public = m.groups()
    try:
        return StartProxy(url=url.decode("utf-8"), client_addr=client.decode("utf-8"),
                          public_addr=public.decode("utf-8") or None if public else None)
    except UnicodeDecodeError:
        return None


def encode(msg: Message) -> bytes:
    """A message ready for the wire: 8-byte little-endian length, then :func:`pack`."""
    body = pack(msg)
    return _LENGTH.pack(len(body)) + body


def encode_start_proxy(url: str, client_addr: str, public_addr: str | None = None) -> bytes:
    """``encode(StartProxy(url=..., client_addr=..., public_addr=...))``, the same bytes, in two
    Python calls where that takes four (the message object, encode, pack, the plain form): the
    proxy writes one per public connection."""
    body = _plain_start_proxy(url, client_addr, public_addr)
    if body is None:
        return encode(StartProxy(url=url, client_addr=client_addr, public_addr=public_addr))
    return _LENGTH.pack(len(body)) + body


def unpack(body: bytes) -> Message:
    """Decode one JSON envelope (no length prefix).

    :raises MessageError: invalid UTF-8 or JSON, unknown Type, missing or ill-typed fields.
    """
    body = bytes(body)
    fast = _unpack_plain_start_proxy(body)
    if fast is not None:
        return fast
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("control message is not valid UTF-8") from None
    try:
        return _unpack_tree(json.loads(text, object_pairs_hook=_Object,
                                       parse_constant=_reject_constant))
    except MessageError:
        raise
    except RecursionError:
        # json refuses nesting past the interpreter's recursion limit; whatever depth it
        # accepted, walking the tree must not be what fails.
        raise MessageError("control message nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise MessageError("control message is not valid JSON: %s" % exc) from None


def _unpack_tree(tree: Any) -> Message:
    tree = _walk_strings(tree)
    envelope = _fields(tree, ("Type", "Payload"), "message")
    msg_type = envelope.get("Type")
    if not isinstance(msg_type, str):
        raise MessageError("message has no Type")
    cls = _TYPES.get(msg_type)  # Go looks the Type up exactly, case-sensitively
    if cls is None:
        raise MessageError("unknown message type %r" % msg_type[:40])
    if "Payload" not in envelope:
        raise MessageError("%s message has no Payload" % msg_type)
    return cls._from_payload(envelope["Payload"])


def _walk_strings(value: Any) -> Any:
    if isinstance(value, _Object):
        return _Object((_repair_surrogates(k), _walk_strings(v)) for k, v in value)
    if isinstance(value, list):
        return [_walk_strings(v) for v in value]
    return _repair_surrogates(value)


class MessageReader:
    """Reassemble control messages from bytes as they arrive (sans-I/O).

    ``feed()`` whatever was received, then call ``next_message()`` until it returns None.
    Bytes after a message stay buffered: on a proxy stream the bytes after StartProxy are the
    public connection's, so take them from ``trailing_data`` once you stop reading messages.
    After a :class:`MessageError` the stream is unusable and every later call raises it again.

    The reader keeps what it is fed; its caller bounds it by feeding one ``recv`` at a time and
    draining ``next_message()`` in between, so it holds at most one message (``max_size``
    bounds that) plus one read.
    """

    def __init__(self, max_size: int = MAX_MESSAGE):
        self.max_size = max_size
        self._buffer = bytearray()
        self._error: MessageError | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def trailing_data(self) -> bytes:
        """The buffered bytes not yet returned as a message."""
        return bytes(self._buffer)

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed.

        :raises MessageError: a hostile length or an undecodable message.
        """
        if self._error is not None:
            raise self._error
        if len(self._buffer) < LENGTH_PREFIX:
            return None
        try:
            length = _check_length(_LENGTH.unpack_from(self._buffer)[0], self.max_size)
            if len(self._buffer) < LENGTH_PREFIX + length:
                return None
            msg = unpack(self._buffer[LENGTH_PREFIX:LENGTH_PREFIX + length])
        except MessageError as exc:
            self._error = exc
            raise
        del self._buffer[:LENGTH_PREFIX + length]
        return msg


def _check_length(length: int, max_size: int) -> int:
    if length < 0:
        raise MessageError("negative message length %d" % length)
    if length > max_size:
        raise MessageError("message length %d exceeds %d" % (length, max_size))
    return length


# --- The only I/O: blocking helpers over a socket-like object -------------------------------
def _recv_exactly(stream: Any, n: int, started: bool) -> bytes:
    chunks, got = [], 0
    while got < n:  # each pass reads >= 1 byte or ends: at most n passes
        chunk = stream.recv(n - got)
        if not chunk:
            if not started and got == 0:
                raise EOFError("stream closed before a control message")
            raise MessageError("stream closed inside a control message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_message(stream: Any, max_size: int = MAX_MESSAGE) -> Message:
    """Read one message from ``stream`` (anything with ``recv(n)``), reading no byte past it,
    so the stream can carry other data afterwards (as after StartProxy).

    :raises EOFError: the stream ended cleanly before the first byte.
    :raises MessageError: the stream ended mid-message, or the message is invalid.
    """
    length = _check_length(_LENGTH.unpack(_recv_exactly(stream, LENGTH_PREFIX, False))[0],
                           max_size)
    return unpack(_recv_exactly(stream, length, True))


# What read_message_ahead asks of each read: a mux stream's (lib.net.splice's STREAM_CHUNK). The
# proxy sends a routed request's head in the same DATA frame as StartProxy (lib/proxy/routing.py)
# and a mux stream's recv hands out what is buffered, so one read takes both.
READ_AHEAD = 64 * 1024


def split_message(data: bytes, max_size: int = MAX_MESSAGE) -> tuple[Message, bytes] | None:
    """The message at the head of ``data`` and the bytes after it; None when ``data`` does not
    hold it whole (read on, as :func:`read_message_ahead` does). No I/O: a caller that must not
    wait (the client's session reader, lib.client.tunnels) parses what it already has.

    A plain StartProxy (:func:`unpack`'s own first look) is matched where it lies, in one call:
    no copy of its body and no helper under it (the client parses one per public connection on
    its way to connect: bench/README.md, "Fresh connections: the client's critical path").

    :raises MessageError: the length prefix is over ``max_size``, or the message is invalid.
    """
    if len(data) >= LENGTH_PREFIX:
        length = _LENGTH.unpack_from(data)[0]
        end = LENGTH_PREFIX + length
        if len(data) >= end:
            m = _START_PROXY_PLAIN.fullmatch(data, LENGTH_PREFIX, end)
            if m is not None and length <= max_size:
                url, client, public = m.groups()
                try:
                    return StartProxy(url.decode(), client.decode(),
                                      public.decode() or None if public else None), data[end:]
                except UnicodeDecodeError:
                    pass  # the general decoder's verdict
        end = LENGTH_PREFIX + _check_length(length, max_size)
        if len(data) >= end:
            return unpack(data[LENGTH_PREFIX:end]), data[end:]
    return None


def read_message_ahead(stream: Any, max_size: int = MAX_MESSAGE,
                       bufsize: int = READ_AHEAD) -> tuple[Message, bytes]:
    """Read one message from ``stream`` in reads of ``bufsize``: (the message, the bytes read
    past it), which are the caller's to pass on (after StartProxy, the visitor's first bytes).
    A message that came whole is one read, where :func:`read_message` makes two, each of which
    cuts a mux stream's buffered chunk (a copy of the rest) when the chunk holds more. Longer
    messages are reassembled by a :class:`MessageReader`, bounded by ``max_size`` plus a read.

    :raises EOFError: the stream ended cleanly before the first byte.
    :raises MessageError: the stream ended mid-message, or the message is invalid.
    """
    data = stream.recv(bufsize)
    if not data:
        raise EOFError("stream closed before a control message")
    whole = split_message(data, max_size)
    if whole is not None:
        return whole
    reader = MessageReader(max_size)
    reader.feed(data)
    while (msg := reader.next_message()) is None:
        data = stream.recv(bufsize)
        if not data:
            raise MessageError("stream closed inside a control message")
        reader.feed(data)
    return msg, reader.trailing_data


def write_message(stream: Any, msg: Message) -> None:
    """Write one message to ``stream`` (anything with ``sendall``), in a single write."""
    stream.sendall(encode(msg))


# --- Shroud Extras --------------------------------------------------------------------------
def _b64(data: bytes, size: int, what: str) -> str:
    if not isinstance(data, (bytes, bytearray)) or len(data) != size:
        raise ValueError("%s must be %d bytes" % (what, size))
    return base64.b64encode(bytes(data)).decode("ascii")


def auth_extra(public_key: bytes) -> dict:
    """Auth.Extra for a Shroud client: protocol version and its raw Ed25519 public key."""
    return {EXTRA_VERSION: SHROUD_VERSION, EXTRA_KEY: _b64(public_key, PUBLIC_KEY_SIZE, "key")}


def auth_resp_extra(nonce: bytes) -> dict:
    """AuthResp.Extra from a Shroud proxy: protocol version and the nonce binds must sign."""
    return {EXTRA_VERSION: SHROUD_VERSION, EXTRA_NONCE: _b64(nonce, NONCE_SIZE, "nonce")}


def bind_extra(signature: bytes, proxy_id: str) -> dict:
    """Bind.Extra: the signature over :func:`bind_signature_payload` and the proxy id it names."""
    return {EXTRA_SIG: _b64(signature, SIGNATURE_SIZE, "signature"),
            EXTRA_TO: check_proxy_id(proxy_id)}


def proxy_id_for_cert(der: bytes) -> str:
    """The proxy id of a tunnel whose TLS the client verified itself: ``"cert:"`` + the
    lower-case hex SHA-256 of the proxy's leaf certificate (DER), as the client saw it."""
    if not isinstance(der, (bytes, bytearray)) or not der:
        raise ValueError("certificate must be non-empty DER bytes")
    return proxy_id_for_fingerprint(hashlib.sha256(bytes(der)).hexdigest())


def proxy_id_for_fingerprint(fingerprint: str) -> str:
    """The same id from the certificate's SHA-256 in hex (what the proxy knows of its own,
    lib.certs.cert_fingerprint)."""
    return check_proxy_id("cert:" + fingerprint)


def proxy_id_for_host(host: str) -> str:
    """The proxy id of a tunnel whose TLS a platform's router terminates (WebSocket tunnels):
    ``"host:"`` + the host the client asked for, normalised as routing normalises names
    (lib.protocol.sniff.normalize_hostname: lower-case, no port, no trailing dot, compressed IPv6).

    :raises ValueError: not a valid host name.
    """
    from lib.protocol.sniff import normalize_hostname  # pure, like this module

    return check_proxy_id("host:" + normalize_hostname(_check_str(host, "host")))


def check_proxy_id(proxy_id: Any) -> str:
    """``proxy_id`` if it is a well-formed proxy id, else ValueError."""
    if not isinstance(proxy_id, str) or not _PROXY_ID.match(proxy_id):
        raise ValueError("malformed proxy id %r" % (proxy_id,))
    return proxy_id


def refusal_extra(reason: str) -> dict:
    """BindResp.Extra (or AuthResp.Extra) naming why a request was refused (REASON_*)."""
    return {EXTRA_REASON: _check_str(reason, "reason")}


def shroud_version(extra: Any) -> int | None:
    """The Shroud protocol version a peer announced in Extra, or None for a plain go-tunnel
    peer (original shroud, ngrok-style clients)."""
    if isinstance(extra, dict):
        version = extra.get(EXTRA_VERSION)
        if isinstance(version, int) and not isinstance(version, bool):
            return version
    return None


def _extra_bytes(extra: Any, key: str, size: int) -> bytes | None:
    if not isinstance(extra, dict) or extra.get(key) is None:
        return None
    value = extra[key]
    if not isinstance(value, str):
        raise MessageError("Extra.%s must be a base64 string" % key)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise MessageError("Extra.%s is not valid base64" % key) from None
    if len(raw) != size:
        raise MessageError("Extra.%s must hold %d bytes, not %d" % (key, size, len(raw)))
    return raw


def bind_signature_payload(nonce: bytes, proxy_id: str, protocol: str, name: str) -> bytes:
    """The exact bytes a Bind signature covers::

        b"shroud-bind-v2\\0" + nonce + b"\\0" + proxy_id + b"\\0" + protocol + b"\\0" + name

    ``nonce`` is the 32 raw bytes from AuthResp.Extra (fixed length, so it may contain NUL);
    ``proxy_id`` (:func:`proxy_id_for_cert` / :func:`proxy_id_for_host`) names the proxy the
    client verified; ``protocol`` and ``name`` (see :attr:`Bind.signed_name`) are UTF-8 and
    must not contain NUL, which keeps the fields unambiguous.
    """
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_SIZE:
        raise ValueError("nonce must be %d bytes" % NONCE_SIZE)
    parts = [check_proxy_id(proxy_id).encode("ascii")]
    for what, text in (("protocol", protocol), ("name", name)):
        _check_str(text, what)
        if "\0" in text:
            raise ValueError("%s must not contain NUL" % what)
        parts.append(text.encode("utf-8"))
    return BIND_SIGNATURE_CONTEXT + bytes(nonce) + b"\0" + b"\0".join(parts)
