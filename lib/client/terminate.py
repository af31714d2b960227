"""TLS that ends at the hidden origin, for ``https:NAME`` services (docs/DESIGN.md,
"Decisions", automatic HTTPS): the proxies pass the visitor's TLS through by SNI as for any TLS
name, and this client decrypts it and hands plain bytes to the local target.

    book = CertBook()
    book.set_certificate("example.com", cert_path, key_path)   # issued by lib.client.acme
    book.add_challenge("example.com", cert_pem, key_pem)       # TLS-ALPN-01, while ordering
    book.remove_challenge("example.com")
    tls = terminate(stream, "example.com", book, timeout=15)   # a TLSTransport, or None
    Replay(stream, head)       # a stream whose first reads return ``head`` (bytes taken from it)
    book.set_protocols("example.com", local_protocols(("127.0.0.1", 8080)))   # at start

Which certificate a connection gets ("visitor offers / we answer"):

    ALPN acme-tls/1, a challenge pending   -> the challenge certificate, ALPN acme-tls/1; the
                                              handshake is the whole answer (RFC 8737 section 3)
    ALPN acme-tls/1, no challenge pending  -> TLS alert handshake_failure
    anything else, a certificate issued     -> the certificate, ALPN what the local target speaks
                                              (local_protocols: h2 when it answers HTTP/2 with
                                              prior knowledge, http/1.1 when it answers that;
                                              http/1.1 when it answers neither at start)
    anything else, no certificate yet       -> TLS alert handshake_failure: never a self-signed
                                              certificate a visitor could learn to click through
    not a ClientHello                      -> the alert lib.protocol.sniff names

A renewal swaps the name's context: connections already open keep the one they started with, new
ones get the new certificate; nobody is cut off.
"""
from __future__ import annotations

import logging
import os
import ssl
import tempfile

import gevent.socket as gsocket

from lib.acmetls import ACME_TLS_ALPN, client_hello_alpn
from lib.errors import MuxError
from lib.peerlog import PeerLog
from lib.net.tlstransport import TLSTransport
from lib.protocol.sniff import SniffError, TLSNameSniffer, tls_alert


ALERT_HANDSHAKE_FAILURE = 40
# The ClientHello is read before the handshake (to choose by ALPN): sniff bounds its size.
HELLO_READ = 16 * 1024
SITE_ALPN = ["http/1.1"]  # what we offer when the local target's protocols are not known
# RFC 9113 section 3.4: the client preface, then our (empty) SETTINGS frame.
_H2_PROBE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H1_PROBE = b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
PROBE_TIMEOUT = 2.0  # seconds per probe of the local target, at start
# Any visitor can trigger these lines (one per connection): 10 a minute per name.
_peer_log = PeerLog(lines=10, per=60.0)


class CertBook:
    """The contexts this client presents, by name; swapped whole, never edited in place."""

    def __init__(self) -> None:
        self._sites: dict[str, ssl.SSLContext] = {}
        self._challenges: dict[str, ssl.SSLContext] = {}
        self._alpn: dict[str, list[str]] = {}

    def set_protocols(self, name: str, alpn: list[str]) -> None:
        """What visitors may negotiate for ``name`` (before its certificate is set)."""
        self._alpn[name] = list(alpn)

    def set_certificate(self, name: str, cert_path: str, key_path: str) -> None:
        self._sites[name] = _context(cert_path, key_path, self._alpn.get(name, SITE_ALPN))

    def has_certificate(self, name: str) -> bool:
        return name in self._sites

    def add_challenge(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        # load_cert_chain reads files only: a private temporary directory, gone at once.
        with tempfile.TemporaryDirectory(prefix="shroud-acme-") as d:
            cert_path, key_path = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            self._challenges[name] = _context(cert_path, key_path, [ACME_TLS_ALPN])

    def remove_challenge(self, name: str) -> None:
        self._challenges.pop(name, None)

    def context_for(self, name: str, offered: list[str]) -> ssl.SSLContext | None:
        if ACME_TLS_ALPN in offered:
            return self._challenges.get(name)
        return self._sites.get(name)


def _context(cert_path: str, key_path: str, alpn: list[str]) -> ssl.SSLContext:
    import gevent.ssl

    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(alpn)
    return ctx


def local_protocols(target: tuple[str, int], timeout: float = PROBE_TIMEOUT) -> list[str]:
    """The ALPN names to offer for a local target: ``h2`` when it answers an HTTP/2 preface
    with a SETTINGS frame (prior knowledge, RFC 9113 section 3.3), ``http/1.1`` when it answers
    an HTTP/1.1 request; ``["http/1.1"]`` when it answers neither (not up yet)."""
    h2 = _answers(target, _H2_PROBE, lambda b: len(b) >= 9 and b[3] == 4, timeout)
    h1 = _answers(target, _H1_PROBE, lambda b: b.startswith(b"HTTP/1."), timeout)
    return (["h2"] if h2 else []) + (["http/1.1"] if h1 or not h2 else [])


def _answers(target, probe: bytes, check, timeout: float) -> bool:
    try:
        sock = gsocket.create_connection(target, timeout=timeout)
    except OSError:
        return False
    try:
        sock.sendall(probe)
        data = b""
        while len(data) < 9:
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
        return check(data)
    except OSError:
        return False
    finally:
        sock.close()


class Replay:
    """A stream whose first reads return bytes already taken from it (the ClientHello; the
    visitor's first bytes, read with StartProxy by lib.client.tunnels)."""

    def __init__(self, stream, head: bytes):
        self._stream = stream
        self._head = head

    def recv(self, n: int = 65536) -> bytes:
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._stream.recv(n)

    def __getattr__(self, attr):
        return getattr(self._stream, attr)


def read_client_hello(stream) -> tuple[bytes, str] | None:
    """(the ClientHello's bytes, its server name); None after sending the alert for a
    connection that is not TLS, or EOF."""
    sniffer = TLSNameSniffer()
    head = bytearray()
    while True:
        data = stream.recv(HELLO_READ)
        if not data:
            return None
        head += data
        try:
            name = sniffer.feed(data)
        except SniffError as e:
            _alert(stream, e.alert or ALERT_HANDSHAKE_FAILURE)
            return None
        if name is not None:
            return bytes(head), name


def terminate(stream, name: str, book: CertBook, timeout: float = 15.0):
    """The visitor's TLS on ``stream`` ended here: a TLSTransport carrying plain bytes, or
    None when the connection is finished (an ACME validation answered, an alert sent)."""
    stream.settimeout(timeout)
    try:
        got = read_client_hello(stream)
    except (OSError, MuxError) as e:
        _peer_log.log(name, logging.INFO, "%s: no ClientHello: %s", name, e)
        return None
    if got is None:
        return None
    head, _sni = got
    offered = client_hello_alpn(head)
    ctx = book.context_for(name, offered)
    if ctx is None:
        _peer_log.log(name, logging.INFO, "%s: no %s yet: TLS alert", name,
                 "challenge" if ACME_TLS_ALPN in offered else "certificate")
        _alert(stream, ALERT_HANDSHAKE_FAILURE)
        return None
    try:
        tls = TLSTransport.server(Replay(stream, head), ctx, timeout)
    except (ssl.SSLError, OSError, EOFError, MuxError) as e:
        _peer_log.log(name, logging.INFO, "%s: TLS handshake failed: %s", name, e)
        return None
    if tls.selected_alpn_protocol() == ACME_TLS_ALPN:
        _peer_log.log(name, logging.INFO, "%s: answered a TLS-ALPN-01 validation", name)
        tls.close()
        return None
    stream.settimeout(None)
    return tls


def _alert(stream, description: int) -> None:
    try:
        stream.sendall(tls_alert(description))
    except OSError:
        pass
