"""The pure parts of TLS-ALPN-01 (RFC 8737) and of TLS termination: no I/O.

    cert_pem, key_pem = challenge_certificate("example.com", key_authorization)
    offered = client_hello_alpn(hello_bytes)   # ["acme-tls/1"] / ["h2", "http/1.1"] / []
    ACME_TLS_ALPN                              # "acme-tls/1"

``challenge_certificate`` builds the self-signed certificate a CA's validation connection must
see (RFC 8737 section 3): one dNSName, the critical id-pe-acmeIdentifier extension holding the
SHA-256 of the key authorization. The ``acme`` library can build one too, but through pyOpenSSL's
deprecated X509 API; this is ten lines of ``cryptography``.

``client_hello_alpn`` reads the ALPN list out of a complete ClientHello (the bytes
lib.protocol.sniff.TLSNameSniffer found whole): the challenge certificate must be chosen before
the handshake starts, and OpenSSL picks the certificate (SNI callback) before it looks at ALPN.
"""
from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

ACME_TLS_ALPN = "acme-tls/1"
# RFC 8737 section 6.1: id-pe-acmeIdentifier
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
# A validation takes seconds; a day absorbs any clock skew between us and the CA.
_CHALLENGE_VALIDITY = datetime.timedelta(days=1)

_EXT_ALPN = 16
_MAX_ALPN = 64  # names kept: a ClientHello is at most ~16 KiB (sniff's bound) anyway


def challenge_certificate(domain: str, key_authorization: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) answering TLS-ALPN-01 for ``domain``."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    # The extension's value is the DER OCTET STRING of the digest (RFC 8737 section 3).
    value = b"\x04\x20" + digest
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CHALLENGE_VALIDITY)
            .not_valid_after(now + _CHALLENGE_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, value), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def client_hello_alpn(data: bytes) -> list[str]:
    """The protocol names a complete ClientHello offers (possibly spread over several
    records); ``[]`` without an ALPN extension or when the bytes do not parse (the TLS library
    then refuses the handshake with the right alert)."""
    try:
        return _alpn_of_hello(_handshake_bytes(data))
    except (IndexError, ValueError):
        return []


def _handshake_bytes(data: bytes) -> bytes:
    """The handshake message reassembled from its records (type 22)."""
    out = bytearray()
    i = 0
    while i + 5 <= len(data) and data[i] == 22:
        n = int.from_bytes(data[i + 3:i + 5], "big")
        out += data[i + 5:i + 5 + n]
        i += 5 + n
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    return bytes(out)


def _alpn_of_hello(hs: bytes) -> list[str]:
    if not hs or hs[0] != 1:
        return []
    end = 4 + int.from_bytes(hs[1:4], "big")
    i = 4 + 2 + 32  # type+length, version, random
    i += 1 + hs[i]  # session id
    i += 2 + int.from_bytes(hs[i:i + 2], "big")  # cipher suites
    i += 1 + hs[i]  # compression methods
    if i + 2 > end:
        return []
    ext_end = i + 2 + int.from_bytes(hs[i:i + 2], "big")
    i += 2
    while i + 4 <= min(ext_end, end):
        ext_type = int.from_bytes(hs[i:i + 2], "big")
        n = int.from_bytes(hs[i + 2:i + 4], "big")
        if ext_type == _EXT_ALPN:
            return _names(hs[i + 4:i + 4 + n])
        i += 4 + n
    return []


def _names(ext: bytes) -> list[str]:
    names = []
    i = 2
    while i < len(ext) and len(names) < _MAX_ALPN:
        n = ext[i]
        names.append(ext[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return names
