"""lib.acmetls: the TLS-ALPN-01 certificate (RFC 8737 section 3) and ALPN from a ClientHello."""
import hashlib
import ssl

from cryptography import x509

from lib.acmetls import ACME_IDENTIFIER_OID, challenge_certificate, client_hello_alpn


def client_hello(alpn, name="app.test") -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_alpn_offered_is_read():
    assert client_hello_alpn(client_hello(["acme-tls/1"])) == ["acme-tls/1"]
    assert client_hello_alpn(client_hello(["h2", "http/1.1"])) == ["h2", "http/1.1"]
    assert client_hello_alpn(client_hello(None)) == []


def test_alpn_across_records_and_garbage():
    hello = client_hello(["acme-tls/1"])
    body = hello[5:]
    split = b"".join(b"\x16\x03\x01" + len(p).to_bytes(2, "big") + p
                     for p in (body[:7], body[7:100], body[100:]))
    assert client_hello_alpn(split) == ["acme-tls/1"]
    for junk in (b"", b"\x16\x03\x01\x00", hello[:60], b"GET / HTTP/1.1\r\n\r\n"):
        assert client_hello_alpn(junk) == []


def test_challenge_certificate_carries_key_authorization():
    cert_pem, _key = challenge_certificate("app.test", "token.thumb")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumb").digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["app.test"]


class _FakeStream:
    """A peer sending ``data`` in 4 KiB reads; records what we send back."""

    def __init__(self, data: bytes):
        self.data, self.sent, self.reads = data, b"", 0

    def recv(self, n):
        self.reads += 1
        chunk, self.data = self.data[:min(n, 4096)], self.data[min(n, 4096):]
        return chunk

    def sendall(self, b):
        self.sent += b


def test_terminator_reads_a_bounded_client_hello():
    """A ClientHello in 1-byte records that would take 96 KB is cut at
    lib.protocol.sniff's MAX_TLS_PEEK and answered with an alert; a real one is read whole."""
    from lib.client.terminate import read_client_hello
    from lib.protocol.sniff import MAX_TLS_PEEK

    hello = client_hello(["http/1.1"])
    # A 16,000-byte ClientHello announced, sent one byte per record: 96 KB before it ends.
    announced = b"\x01\x00\x3e\x80\x03\x03" + bytes(15994)
    endless = b"".join(b"\x16\x03\x01\x00\x01" + announced[i:i + 1]
                       for i in range(len(announced)))
    peer = _FakeStream(endless)
    assert read_client_hello(peer) is None
    assert peer.sent[:1] == b"\x15"  # a TLS alert record
    assert peer.reads * 4096 <= MAX_TLS_PEEK + 4096
    got = read_client_hello(_FakeStream(hello + b"more"))
    assert got is not None and got[1] == "app.test"
