"""A Shroud client's Ed25519 identity, and verification of signed binds.

The client proves it owns a hostname by signing each Bind over a nonce the proxy sent in
AuthResp (see :func:`lib.protocol.messages.bind_signature_payload`). The proxy knows the client by the
fingerprint of its public key: the hex SHA-256 of the raw 32-byte key, which is what
allow-lists and ``_shroud.<hostname>`` TXT records name.

Public API::

    Identity.load_or_create(data_dir) -> Identity   # key file KEY_FILENAME, mode 0600
    Identity.generate() -> Identity                 # in memory only (tests)
    identity.public_key: bytes (32)  .public_key_b64: str  .fingerprint: str (64 hex)
    identity.sign(payload: bytes) -> bytes (64)
    fingerprint(public_key: bytes) -> str
    verify_bind(pubkey_b64: str, sig_b64: str, payload: bytes) -> bool
    IdentityError(Exception)
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey, Ed25519PublicKey,
)

from lib.errors import ShroudError

KEY_FILENAME = "identity.key"  # PKCS#8 PEM, readable by `openssl pkey`
# A PEM Ed25519 key is 119 bytes; anything much larger in the key file is not our key.
_MAX_KEY_FILE = 4096


class IdentityError(ShroudError):
    """The identity key file cannot be used (unreadable, malformed, or too open)."""


def fingerprint(public_key: bytes) -> str:
    """Hex SHA-256 of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(public_key).hexdigest()


class Identity:
    """An Ed25519 key pair. Create with :meth:`load_or_create` or :meth:`generate`."""

    def __init__(self, private_key: Ed25519PrivateKey, path: str | None = None):
        self._private_key = private_key
        self.path = path
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str) -> Identity:
        """Load ``data_dir/identity.key``, creating the directory (0700) and a new key (0600)
        on first run.

        :raises IdentityError: the file is readable by group or others (as ssh, we refuse to
            use a key others may have copied), is not a PEM Ed25519 private key, or cannot be
            read or written.
        """
        path = os.path.join(data_dir, KEY_FILENAME)
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            return cls(_create_key_file(path), path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise IdentityError("cannot create identity key %s: %s" % (path, exc)) from None
        return cls(_load_key_file(path), path)

    @property
    def public_key_b64(self) -> str:
        """The raw public key in standard base64, as sent in Auth.Extra["key"]."""
        return base64.b64encode(self.public_key).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, payload: bytes) -> bytes:
        """A 64-byte Ed25519 signature over ``payload``."""
        return self._private_key.sign(bytes(payload))

    def __repr__(self) -> str:
        return "<Identity %s>" % self.fingerprint[:16]


def _create_key_file(path: str) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Write a private temporary file, then link it into place: a concurrent first run or a
    # crash never leaves a half-written key, and O_EXCL on the link makes one creator win.
    tmp = "%s.tmp.%d.%s" % (path, os.getpid(), os.urandom(4).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # raises FileExistsError if another process won
    finally:
        os.unlink(tmp)
    return key


def _load_key_file(path: str) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise IdentityError("cannot read identity key %s: %s" % (path, exc)) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError("identity key %s is accessible by others (mode %o); run "
                                "chmod 600 %s" % (path, stat.S_IMODE(mode), path))
        pem = f.read(_MAX_KEY_FILE + 1)
    if len(pem) > _MAX_KEY_FILE:
        raise IdentityError("identity key %s is too large to be a key" % path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError("identity key %s is not a PEM private key: %s" % (path, exc)) \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError("identity key %s is not an Ed25519 key" % path)
    return key


def verify_bind(pubkey_b64: str, sig_b64: str, payload: bytes) -> bool:
    """Whether ``sig_b64`` is a valid Ed25519 signature by ``pubkey_b64`` over ``payload``.

    Both are standard base64 (as in Auth.Extra and Bind.Extra). Malformed input is simply not
    a valid signature: returns False, never raises.
    """
    try:
        public = base64.b64decode(pubkey_b64, validate=True)
        signature = base64.b64decode(sig_b64, validate=True)
        if len(public) != 32 or len(signature) != 64:
            return False
        Ed25519PublicKey.from_public_bytes(public).verify(signature, bytes(payload))
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True
