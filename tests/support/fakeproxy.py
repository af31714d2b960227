"""The tunnel side of the hostile proxies run as scripts (tests/support/evil_proxy.py,
tests/support/stream_proxy.py): TLS with a certificate of their own, a muxado session, and
Auth answered with a nonce. Each goes on from there with its own lies.

    ctx = tls_context(data_dir)          # its certificate; prints ``fingerprint HEX``
    session = serve_auth(sock, ctx, name)    # -> Session past Auth, or None (said why)
"""
from __future__ import annotations

import secrets
import ssl

from lib.certs import cert_fingerprint, ensure_tunnel_cert, server_tls_context
from lib.net.muxsession import MuxConfig, Session
from lib.net.tlstransport import TLSTransport
from lib.protocol import messages as msg


def tls_context(data_dir: str) -> ssl.SSLContext:
    """The proxy's TLS context, its certificate made in ``data_dir``; prints its fingerprint
    (the tests pin the client to it)."""
    cert, key = ensure_tunnel_cert(data_dir)
    print(f"fingerprint {cert_fingerprint(cert)}", flush=True)
    return server_tls_context(cert, key)


def serve_auth(sock, ctx: ssl.SSLContext, name: str) -> Session | None:
    """A tunnel accepted on ``sock``: the TLS handshake, the session, the client's Auth answered
    with a nonce. None when the handshake failed, or the Auth (printed as ``session ended:
    ERROR``, the session closed)."""
    try:
        session = Session(TLSTransport.server(sock, ctx), client=False, config=MuxConfig(),
                          name=name)
    except OSError:
        return None
    try:
        with session.accept() as st:
            msg.read_message(st)
            msg.write_message(st, msg.AuthResp(client_id=secrets.token_hex(16),
                                               extra=msg.auth_resp_extra(secrets.token_bytes(32))))
    except Exception as e:  # a test helper: whatever ends the session, say so and stop
        print(f"session ended: {e!r}", flush=True)
        session.close()
        return None
    return session
