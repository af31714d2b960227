"""Connected ends for the lib.net tests: TLS transports and muxado sessions over a socket pair.

    pki                          pytest fixture (module scope): Pki(server, client, ca), gevent
                                 SSL contexts for "tunnel.test" under a throw-away trustme CA
    tls_pair(pki, server_bio=True, client_bio=True, small_buffers=False, sockets=None)
                                 -> (client, server): TLSTransport ends (or the standard
                                 SSLSocket, ``*_bio=False``) over ``sockets`` (a connected
                                 pair of gevent sockets) or a new socket pair
    session_pair(transports=None, **config) -> (client, server)
                                 two Sessions with MuxConfig(**config), over ``transports`` or a
                                 plain socket pair (one the test leaves open is closed after it:
                                 tests/support/leftsessions.py)
    echo_server(session) -> Greenlet   answers every stream it accepts with its own bytes
    tcp_pair() -> (out, inner)   two connected TCP gevent sockets on loopback (TCP options such
                                 as TCP_NOTSENT_LOWAT apply to TCP only, not a socket pair)

A test module takes the fixture by importing it (``from tests.support.muxpair import pki``).
"""
from __future__ import annotations

import socket
import ssl
from typing import NamedTuple

import gevent
import gevent.socket as gsocket
import gevent.ssl
import pytest
import trustme

from lib.errors import MuxError
from lib.net.muxsession import MuxConfig, Session
from lib.net.tlstransport import TLSTransport

SERVER_NAME = "tunnel.test"


class Pki(NamedTuple):
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca: trustme.CA


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = trustme.CA()
    server = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(SERVER_NAME).configure_cert(server)
    client = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return Pki(server, client, ca)


def tls_pair(pki: Pki, server_bio: bool = True, client_bio: bool = True,
             small_buffers: bool = False, sockets=None):
    """Both ends handshaken; ``small_buffers``: 8 KiB kernel buffers (the kernel takes little,
    so writes leave tails)."""
    a, b = sockets if sockets is not None else gsocket.socketpair()
    if small_buffers:
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)

    def serve():
        return (TLSTransport.server(b, pki.server) if server_bio
                else pki.server.wrap_socket(b, server_side=True))
    g = gevent.spawn(serve)
    c = (TLSTransport.client(a, pki.client, SERVER_NAME) if client_bio
         else pki.client.wrap_socket(a, server_hostname=SERVER_NAME))
    return c, g.get(timeout=10)


def session_pair(transports=None, **config):
    a, b = transports if transports is not None else gsocket.socketpair()
    cfg = MuxConfig(**config)
    return Session(a, client=True, config=cfg), Session(b, client=False, config=cfg)


def echo_server(session: Session):
    def serve(st):
        with st:
            while (d := st.recv(65536)):
                st.sendall(d)
            st.shutdown(socket.SHUT_WR)

    def loop():
        while True:
            try:
                st = session.accept()
            except MuxError:
                return
            gevent.spawn(serve, st)
    return gevent.spawn(loop)


def tcp_pair():
    """Two connected TCP gevent sockets on loopback: (the connecting end, the accepted end)."""
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    out = gsocket.create_connection(lsock.getsockname())
    inner, _ = lsock.accept()
    lsock.close()
    return out, inner
