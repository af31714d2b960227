"""A tunnel client written with lib.net.muxsession and lib.protocol.messages directly, for tests
that speak the protocol to a real proxy and then misbehave (floods, forged or replayed binds).

    t = RawTunnel(proxy, identity)      # TLS to proxy.ports["tunnel"], a client mux session
    RawTunnel(proxy, identity, host="::1", source="2001:db8::5")   # from a chosen address
    t.auth() -> AuthResp                # t.nonce is the proxy's nonce for this session
    t.signed_bind(name, protocol="http") -> Bind   # signed over t.nonce for this proxy
    t.bind(name, protocol="http", sign=True, bad_signature=False) -> BindResp
    t.send(message) -> the answer       # one control message on a new stream
    t.close()                           # and its session's greenlets have ended

The proxy's certificate is not verified: these tests attack the proxy, they do not protect a
client from it.
"""
from __future__ import annotations

import ssl

import gevent
import gevent.socket
import gevent.ssl

from lib.protocol import messages as msg
from lib.identity import Identity
from lib.net.muxsession import MuxConfig, Session

# Every answer comes from a local proxy; 10 s means it is not coming.
REPLY_TIMEOUT = 10
# Session.close kills its greenlets without waiting; they end at the hub's next turn, so 5 s
# means one is stuck (shown here, not as a greenlet running inside the next test).
CLOSE_TIMEOUT = 5


class RawTunnel:
    """Speaks just enough of the tunnel protocol to get in, then does what the test says."""

    def __init__(self, proxy, identity: Identity | None, mux: MuxConfig | None = None,
                 host: str = "127.0.0.1", source: str | None = None):
        ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = gevent.socket.create_connection((host, proxy.ports["tunnel"]),
                                              timeout=REPLY_TIMEOUT,
                                              source_address=(source, 0) if source else None)
        self.tls = ctx.wrap_socket(raw)
        self.tls.settimeout(None)
        self.proxy_id = msg.proxy_id_for_cert(self.tls.getpeercert(binary_form=True))
        self.session = Session(self.tls, client=True, config=mux or MuxConfig(),
                               name="raw-tunnel")
        self.identity = identity
        self.nonce = None

    def send(self, message: msg.Message) -> msg.Message:
        """One control message on a new stream; the proxy's answer."""
        with self.session.open() as st:
            st.settimeout(REPLY_TIMEOUT)
            msg.write_message(st, message)
            return msg.read_message(st)

    def auth(self) -> msg.AuthResp:
        extra = msg.auth_extra(self.identity.public_key) if self.identity else None
        resp = self.send(msg.Auth(extra=extra))
        assert isinstance(resp, msg.AuthResp) and not resp.error, resp
        self.nonce = resp.nonce
        return resp

    def signed_bind(self, name: str, protocol: str = "http", bad_signature: bool = False
                    ) -> msg.Bind:
        b = msg.Bind(protocol=protocol, hostname=name)
        payload = msg.bind_signature_payload(self.nonce, self.proxy_id, protocol, b.signed_name)
        sig = self.identity.sign(payload)
        if bad_signature:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        return msg.Bind(protocol=protocol, hostname=name, extra=msg.bind_extra(sig, self.proxy_id))

    def bind(self, name: str, protocol: str = "http", sign: bool = True,
             bad_signature: bool = False) -> msg.BindResp:
        if sign and self.identity is not None:
            return self.send(self.signed_bind(name, protocol, bad_signature))
        return self.send(msg.Bind(protocol=protocol, hostname=name))

    def close(self) -> None:
        """Close the session and wait, at most CLOSE_TIMEOUT, for its reader, writer and
        watchdog greenlets to end (tests/support/greenlets.py says why)."""
        self.session.close()
        mine = [g for g in self.session.greenlets if g is not None]
        gevent.joinall(mine, timeout=CLOSE_TIMEOUT)
        alive = [g for g in mine if not g.dead]
        assert not alive, f"RawTunnel.close: {alive} still running after {CLOSE_TIMEOUT} s"
