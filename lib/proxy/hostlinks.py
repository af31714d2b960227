"""Links between the hosts of a fleet: a public connection for a name that no tunnel of this
instance (nor a sibling worker) holds live, but another instance of the fleet does, goes to that
instance over a mutually authenticated TLS link (docs/DESIGN.md, "Workers"; docs/SECURITY.md,
"Links between proxies").

Public API::

    links = FleetLinks(store, registry, take, cert_path, key_path, fingerprint,
                       listen_addr=("0.0.0.0", 7443), refresh=1.0, max_age=15.0)
        take(header, peeked) -> run(sock) | lib.proxy.workers.Refused   (router.take_handed)
    links.start(); links.stop()
    links.address                      # the fleet listener as bound: (host, port)
    links.self_id = "instance id"      # set once this instance is in the registry
    links.send(sock, header, peeked, protocols) -> TAKEN | LIMIT | None
        # the sender's side: None when no holder took it (the caller refuses as before)

The store is the trust anchor: an instance row carries the advertised link address and the
tunnel certificate's SHA-256; only rows whose heartbeat is younger than ``max_age`` count. A
background greenlet reads the rows (and the live bindings) every ``refresh`` seconds, so no
connection waits on the store.

The link, after a TLS handshake in which the sender pins the holder's certificate to the
holder's row::

    holder -> sender   NONCE: 32 random bytes
    sender -> holder   u32 length, JSON head {"v": 1, "cert": base64 DER of the sender's tunnel
                       certificate, "kind", "name", "client": [ip, port], "forwarded": true,
                       "peeked": n}; u16 length, ECDSA-SHA256 signature with the sender's
                       tunnel key over LABEL | NONCE | holder's fingerprint | the JSON head;
                       then the n peeked bytes
    holder -> sender   one byte: OK (a splice of the visitor's bytes follows), REFUSED, BUSY

The sender presents its certificate inside the link, signed over the holder's fresh nonce,
rather than as a TLS client certificate: Python's ssl module checks a client certificate only
against CA files, and fleet certificates are self-signed, known by their fingerprint. The
guarantee is the same: the holder serves only a peer that holds the private key of a
certificate registered by a live instance; the sender only talks to the certificate the holder
registered.

    the holder sees                                   it answers            counter
    no head, a head without cert/signature, a bad     closes the link       fleet_link_refused
      signature, a certificate of no live instance
    a head without "forwarded" or an unknown kind     closes the link       fleet_link_refused
    a name it holds no live tunnel for                REFUSED               (its refusal)
    more links than MAX_LINKS at once                 BUSY                  fleet_link_limit

A forwarded connection is served where it lands, never forwarded again (take_handed does not
hand on). Counting: the sender counted the connection, the holder counts its bytes.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
import time

import gevent
import gevent.lock
import gevent.pool
import gevent.server
import gevent.socket
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lib.certs import PinMismatch, check_pin, client_tls_context, server_tls_context
from lib.errors import ShroudError
from lib.hostport import parse_hostport
from lib.net.sockets import set_nodelay
from lib.net.splice import splice
from lib.proxy.store.base import OwnershipError, candidates
from lib.proxy.workers import LIMIT, TAKEN, Refused

log = logging.getLogger("shroud.fleet")

LABEL = b"shroud-fleet-link/1\0"
NONCE_BYTES = 32
OK, REFUSED, BUSY = b"\x00", b"\x01", b"\x02"
# A visitor waits at most this long for the links (connect, TLS, the holder's answer) before
# the clear error it would have had here; on a LAN a link takes a millisecond.
LINK_TIMEOUT = 3.0
# Links in flight, each way: each is a greenlet and a TLS socket (~60 KiB). Past it the
# visitor gets 503 here (sender) or the sender tries the next holder (BUSY).
MAX_LINKS = 1024
# A head carries a certificate (under 1 KiB) and a name; peeked bytes are bounded by the
# sniffers (a ClientHello or a request head), well under this.
MAX_HEAD = 16 * 1024
MAX_SIGNATURE = 512
MAX_PEEKED = 256 * 1024
# One line per this many seconds for refused links: a scanner must not flood the log.
REFUSED_LOG_INTERVAL = 30.0


class LinkRefused(ShroudError):
    """A link the holder will not serve (the reason is logged, rate-limited, and counted)."""


class FleetLinks:
    def __init__(self, store, registry, take, cert_path: str, key_path: str, fingerprint: str,
                 listen_addr: tuple, refresh: float = 1.0, max_age: float = 15.0):
        self.store = store
        self.registry = registry
        self.take = take
        self.fingerprint = fingerprint
        self.listen_addr = listen_addr
        self.refresh_interval = refresh
        self.max_age = max_age
        self.self_id = None
        with open(cert_path, "rb") as f:
            self._cert_der = x509.load_pem_x509_certificate(f.read()).public_bytes(
                serialization.Encoding.DER)
        with open(key_path, "rb") as f:
            self._key = serialization.load_pem_private_key(f.read(), password=None)
        self._server_ctx = server_tls_context(cert_path, key_path)
        self._client_ctx = client_tls_context(pinned=True)
        self._instances: dict = {}   # id -> Instance, live ones only
        self._holders: dict = {}     # (protocol, name) -> [instance id]
        self._out = gevent.lock.BoundedSemaphore(MAX_LINKS)
        self._server = None
        self._refresher = None
        self._logged_at = float("-inf")
        self.address = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, listener=None) -> None:
        """Listen (on ``listener``, a socket, when given) and start following the store."""
        self._server = gevent.server.StreamServer(
            listener if listener is not None else self.listen_addr, self._serve,
            spawn=gevent.pool.Pool(MAX_LINKS + 1))
        self._server.start()
        self.address = self._server.address[:2]
        self._refresher = gevent.spawn(self._refresh_loop)

    def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.kill()
        if self._server is not None:
            self._server.stop(timeout=1)

    def _refresh_loop(self) -> None:
        while True:
            try:
                self.refresh()
            except OwnershipError as exc:  # the store is away: keep the last view
                log.warning("fleet links: could not read the registry: %s", exc)
            gevent.sleep(self.refresh_interval)

    def refresh(self) -> None:
        """Re-read the live instances and their bindings (the background greenlet does)."""
        now = time.time()
        live = {i.id: i for i in self.store.instances()
                if now - i.heartbeat <= self.max_age and i.fleet_addr and i.fingerprint}
        holders: dict = {}
        for b in self.store.live_bindings():
            if b.instance in live and b.instance != self.self_id:
                holders.setdefault((b.protocol, b.name), []).append(b.instance)
        self._instances, self._holders = live, holders

    # --- sender --------------------------------------------------------------------------
    def holders(self, protocols, name: str) -> list:
        """Live instances holding ``name`` (exact, then the nearest wildcard), shuffled."""
        for candidate in candidates(name):
            found = []
            for protocol in protocols:
                found += self._holders.get((protocol, candidate), [])
            found = [i for i in dict.fromkeys(found) if i in self._instances]
            if found:
                return sorted(found, key=lambda _: os.urandom(4))
        return []

    def send(self, sock, header: dict, peeked: bytes, protocols):
        """Carry a visitor's connection to a live holder of ``header["name"]`` and splice
        (returns when it ends): TAKEN; LIMIT (too many links in flight, answer 503); None
        (no holder took it within LINK_TIMEOUT: answer as without the fleet)."""
        holders = self.holders(protocols, header["name"])
        if not holders:
            return None
        if not self._out.acquire(blocking=False):
            return LIMIT
        try:
            deadline = time.monotonic() + LINK_TIMEOUT
            for instance_id in holders:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                instance = self._instances.get(instance_id)
                link = instance and self._open(instance, header, peeked, left)
                if link is not None:
                    splice(sock, LinkEnd(link))  # closes both when the visitor or the holder is done
                    return TAKEN
            return None
        finally:
            self._out.release()

    def _open(self, instance, header: dict, peeked: bytes, timeout: float):
        """A link to ``instance`` whose holder answered OK, else None."""
        tls = None
        try:
            with gevent.Timeout(timeout):
                host, port = parse_hostport(instance.fleet_addr)
                raw = gevent.socket.create_connection((host, port))
                set_nodelay(raw)  # the nonce, head and answer are small writes (Nagle: 40 ms)
                tls = self._client_ctx.wrap_socket(raw, server_hostname=None)
                check_pin(tls, {instance.fingerprint})
                nonce = _read_exact(tls, NONCE_BYTES)
                head = dict(header, v=1, forwarded=True, peeked=len(peeked),
                            cert=base64.b64encode(self._cert_der).decode())
                body = json.dumps(head, separators=(",", ":")).encode()
                sig = self._key.sign(LABEL + nonce + instance.fingerprint.encode() + body,
                                     ec.ECDSA(hashes.SHA256()))
                tls.sendall(struct.pack(">I", len(body)) + body + struct.pack(">H", len(sig))
                            + sig + peeked)
                answer = _read_exact(tls, 1)
            if answer == OK:
                return tls
            log.debug("fleet link to %s: answer %r", instance.id, answer)
        except (OSError, ValueError, PinMismatch, gevent.Timeout) as exc:
            log.debug("fleet link to %s failed: %s", instance.id, exc)
        if tls is not None:
            tls.close()
        return None

    # --- holder --------------------------------------------------------------------------
    def _serve(self, raw, address) -> None:
        set_nodelay(raw)
        try:
            with gevent.Timeout(LINK_TIMEOUT):
                tls = self._server_ctx.wrap_socket(raw, server_side=True)
                nonce = os.urandom(NONCE_BYTES)
                tls.sendall(nonce)
                header, peeked = self._read_head(tls, nonce)
            if self._server is not None and self._server.pool.free_count() <= 1:
                self.registry.count_refusal("fleet_link_limit")
                tls.sendall(BUSY)
                tls.close()
                return
            run = self.take(header, peeked)
            if isinstance(run, Refused):
                tls.sendall(REFUSED)
                tls.close()
                return
            tls.sendall(OK)
        except LinkRefused as exc:
            self.registry.count_refusal("fleet_link_refused")
            self._log_refused(address, str(exc))
            raw.close()
            return
        except (OSError, ValueError, gevent.Timeout) as exc:
            self.registry.count_refusal("fleet_link_refused")
            self._log_refused(address, "handshake: %s" % (exc or type(exc).__name__))
            raw.close()
            return
        run(LinkEnd(tls))

    def _read_head(self, tls, nonce: bytes) -> tuple:
        """The sender's head and peeked bytes, checked. :raises LinkRefused:"""
        (n,) = struct.unpack(">I", _read_exact(tls, 4))
        if n > MAX_HEAD:
            raise LinkRefused("head of %d bytes" % n)
        body = _read_exact(tls, n)
        (m,) = struct.unpack(">H", _read_exact(tls, 2))
        if m > MAX_SIGNATURE:
            raise LinkRefused("signature of %d bytes" % m)
        sig = _read_exact(tls, m)
        try:
            head = json.loads(body)
            der = base64.b64decode(head["cert"], validate=True)
            size = int(head["peeked"])
        except (ValueError, KeyError, TypeError):
            raise LinkRefused("no certificate in the head") from None
        if not isinstance(head, dict) or head.get("forwarded") is not True or not (
                0 <= size <= MAX_PEEKED):
            raise LinkRefused("not a forwarded connection")
        fingerprint = hashlib.sha256(der).hexdigest()
        if fingerprint not in {i.fingerprint for i in self._instances.values()}:
            raise LinkRefused("certificate %s... of no live instance" % fingerprint[:16])
        try:
            key = x509.load_der_x509_certificate(der).public_key()
            key.verify(sig, LABEL + nonce + self.fingerprint.encode() + body,
                       ec.ECDSA(hashes.SHA256()))
        except (ValueError, TypeError, InvalidSignature):
            raise LinkRefused("bad signature for certificate %s..." % fingerprint[:16]) from None
        return head, _read_exact(tls, size)

    def _log_refused(self, address, reason: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= REFUSED_LOG_INTERVAL:
            self._logged_at = now
            log.warning("fleet link from %s refused: %s (counter fleet_link_refused; one "
                        "line per %g s)", address[0], reason, REFUSED_LOG_INTERVAL)


class LinkEnd:
    """A TLS link as one end of a splice (lib/net/splice.py half-closes its ends). Python's ssl
    cannot half-close TLS: SSLSocket.shutdown drops the TLS state, and the next read of the
    other direction raised ValueError (a traceback at the holder after every forwarded HTTP
    exchange). Here SHUT_WR sends the TCP FIN alone, no close_notify (the peer's ssl reads it as
    the end, suppress_ragged_eofs), and reads go on. Everything else is the TLS socket's."""

    def __init__(self, tls):
        self._tls = tls

    def __getattr__(self, name):
        return getattr(self._tls, name)

    def shutdown(self, how: int) -> None:
        gevent.socket.socket.shutdown(self._tls, how)


def _read_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ValueError("the link closed early")
        buf += data
    return bytes(buf)
