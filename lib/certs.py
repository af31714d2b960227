"""Certificates for the proxy's tunnel listener, and fingerprints clients pin.

Public API::

    ensure_tunnel_cert(data_dir, hostname) -> (cert_path, key_path)   # created on first run
    cert_fingerprint(der_or_pem_path_or_bytes) -> str                 # hex SHA-256 of the DER
    leaf_pem(cert_path) -> str                        # the file's first certificate, PEM
    normalize_pin(text) -> str                        # 64 lower-case hex; raises ValueError
    client_tls_context(cafile=None, pinned=False) -> SSLContext
    check_pin(tls, pins) -> fingerprint               # raises PinMismatch(.fingerprint)
    server_tls_context(cert_path, key_path) -> SSLContext   # CertificateError names the file

The one pin check, for tunnels and discovery alike: a pin replaces the CA (the context verifies
nothing; the fingerprint of the leaf is compared right after the handshake), and a CA given with
a pin keeps both checks.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lib.errors import ShroudError

CERT_FILE = "tunnel-cert.pem"
KEY_FILE = "tunnel-key.pem"


def ensure_tunnel_cert(data_dir: str, hostname: str = "shroud-proxy") -> tuple[str, str]:
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    cert_path = os.path.join(data_dir, CERT_FILE)
    key_path = os.path.join(data_dir, KEY_FILE)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(key_path + ".tmp", key_path)
    os.replace(cert_path + ".tmp", cert_path)
    return cert_path, key_path


def leaf_pem(cert_path: str) -> str:
    """The first certificate of a PEM file (the leaf a peer sees), as PEM text.
    :raises ValueError: none in the file. :raises OSError:"""
    with open(cert_path, "rb") as f:
        data = f.read()
    begin, marker = data.find(b"-----BEGIN CERTIFICATE-----"), b"-----END CERTIFICATE-----"
    end = data.find(marker, begin)
    if begin < 0 or end < 0:
        raise ValueError(f"{cert_path} holds no PEM certificate")
    return data[begin:end + len(marker)].decode("ascii") + "\n"


def cert_fingerprint(cert: bytes | str) -> str:
    """SHA-256 of the certificate's DER bytes, lower-case hex (what ``--pin`` takes)."""
    if isinstance(cert, str):
        with open(cert, "rb") as f:
            cert = f.read()
    begin = cert.find(b"-----BEGIN CERTIFICATE-----")
    if begin >= 0:
        # The leaf: the first certificate of a PEM file, whatever text or chain surrounds it
        # (what a client sees first in the handshake, and what it pins).
        marker = b"-----END CERTIFICATE-----"
        end = cert.find(marker, begin)
        if end < 0:
            raise ValueError("PEM certificate without its END line")
        cert = ssl.PEM_cert_to_DER_cert(cert[begin:end + len(marker)].decode("ascii"))
    return hashlib.sha256(cert).hexdigest()


def normalize_pin(pin: str) -> str:
    """Accept hex with or without colons, any case."""
    p = pin.replace(":", "").strip().lower()
    if len(p) != 64 or any(c not in "0123456789abcdef" for c in p):
        raise ValueError(f"not a SHA-256 fingerprint: {pin!r}")
    return p


class PinMismatch(ShroudError, ValueError):
    """The peer's certificate matches no pin; ``fingerprint`` is what it presented."""

    def __init__(self, fingerprint: str):
        super().__init__(f"certificate {fingerprint[:16]}... matches no pinned fingerprint")
        self.fingerprint = fingerprint


def check_pin(tls, pins) -> str:
    """Compare the leaf certificate of a finished handshake with ``pins`` (normalised).

    :returns: its fingerprint. :raises PinMismatch: none matches (or no certificate).
    """
    der = tls.getpeercert(binary_form=True)
    fingerprint = hashlib.sha256(der).hexdigest() if der else "none"
    if fingerprint not in pins:
        raise PinMismatch(fingerprint)
    return fingerprint


def client_tls_context(cafile: str | None = None, pinned: bool = False) -> ssl.SSLContext:
    """A verifying client context whose sockets cooperate with gevent, patched or not.

    With ``pinned`` and no ``cafile``, the pin is the check (check_pin, right after the
    handshake), not a CA: the context verifies neither chain nor name.

    (``gevent.ssl.create_default_context`` is the standard library's function and returns a
    blocking context unless the process is monkey-patched.)
    """
    import gevent.ssl

    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if pinned and not cafile:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class CertificateError(ShroudError, ValueError):
    """A certificate or key file cannot be used; the message names the file and the fix."""


def server_tls_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """:raises CertificateError: naming the file that is unreadable, damaged or mismatched
    (OpenSSL's own error, "[SSL] PEM lib", names none)."""
    import gevent.ssl

    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:
        raise CertificateError(_which_file(cert_path, key_path, e)) from None
    return ctx


def _which_file(cert_path: str, key_path: str, error: Exception) -> str:
    generated = os.path.basename(cert_path) == CERT_FILE and os.path.basename(key_path) == KEY_FILE
    fix = (f"; to start over, move {cert_path} and {key_path} aside: a new pair is generated "
           f"and every client must pin its new fingerprint (--print-fingerprint)"
           if generated else "; give the PEM files with --cert and --key")
    for path, load in ((cert_path, x509.load_pem_x509_certificate),
                       (key_path, lambda b: serialization.load_pem_private_key(b, None))):
        try:
            with open(path, "rb") as f:
                load(f.read())
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        except (ValueError, TypeError) as e:
            return f"{path} is damaged or not PEM ({str(e).split('.')[0]}){fix}"
    return f"the key {key_path} does not belong to the certificate {cert_path} ({error}){fix}"
