"""Speak the fleet's link protocol (lib/proxy/hostlinks.py) as a sender would, from a test:
TLS 1.3 with a client certificate, a muxado session over it, one stream per visitor.

    link = Link(addr, identity, peer_fingerprint=None)   # identity: (cert, key) paths, or None
    link.ask(name="web.test", forwarded=True, peeked=None, kind="http") -> the answer byte
                                                         (b"": the stream or the link closed)
    link.ask_reply(...) -> (answer, the bytes after it until the holder closes)
    link.close()
    ask(addr, identity, ...) -> answer byte of one stream on a new link (b"" when the
                               handshake was refused)

gevent sockets, no monkey-patching: the session's greenlets run while the test waits on a
gevent call (a stream's recv), and sleep meanwhile (time.sleep blocks the hub).
"""
from __future__ import annotations

import hashlib
import json
import ssl
import struct

import gevent
import gevent.socket

from lib.net.muxsession import Session
from lib.net.tlstransport import TLSTransport

HEAD = {"v": 2, "kind": "http", "client": ["10.9.8.7", 4242], "public": "127.0.0.1:80"}


def request(name: str) -> bytes:
    return f"GET /hello HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()


class Link:
    """One link (a session) to ``addr`` ("host:port") with ``identity``; the holder's
    certificate checked against ``peer_fingerprint`` when given.
    :raises OSError, ssl.SSLError: the handshake failed."""

    def __init__(self, addr: str, identity, peer_fingerprint: str | None = None,
                 timeout: float = 10.0):
        host, port = addr.rsplit(":", 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if identity is not None:
            ctx.load_cert_chain(*identity)
        self.timeout = timeout
        raw = gevent.socket.create_connection((host, int(port)), timeout=timeout)
        try:
            tls = TLSTransport.client(raw, ctx, timeout=timeout)
        except BaseException:
            raw.close()
            raise
        if peer_fingerprint is not None:
            der = tls.getpeercert(binary_form=True)
            assert hashlib.sha256(der).hexdigest() == peer_fingerprint
        self.session = Session(tls, client=True, name="test link")

    def ask_reply(self, name: str = "web.test", forwarded: bool = True, peeked=None,
                  reply: bool = True, kind: str = "http") -> tuple:
        """Open a stream, send a head (and ``peeked``: a GET of /hello by default); the
        answer byte and, with ``reply``, what follows until the holder closes."""
        peeked = request(name) if peeked is None else peeked
        head = dict(HEAD, kind=kind, name=name, peeked=len(peeked))
        if forwarded:
            head["forwarded"] = True
        body = json.dumps(head).encode()
        try:
            stream = self.session.open()
            stream.settimeout(self.timeout)
            stream.sendall(struct.pack(">I", len(body)) + body + peeked)
            answer = stream.recv(1)
            rest = b""
            while reply and answer:
                data = stream.recv(65536)
                if not data:
                    break
                rest += data
            stream.close()
            return answer, rest
        except OSError:  # lib.errors.MuxError: the stream or the link ended
            return b"", b""

    def ask(self, name: str = "web.test", forwarded: bool = True, peeked=None,
            kind: str = "http") -> bytes:
        return self.ask_reply(name, forwarded, peeked, reply=False, kind=kind)[0]

    def close(self) -> None:
        self.session.close()


def ask(addr: str, identity, peer_fingerprint: str | None = None, **kw) -> bytes:
    """One stream on a new link: the holder's answer (b"" when the handshake was refused or
    the holder closed the link)."""
    try:
        link = Link(addr, identity, peer_fingerprint)
    except OSError:  # ssl.SSLError too
        return b""
    try:
        return link.ask(**kw)
    finally:
        link.close()
