"""A raw muxado v1 peer over TLS, for attacks that a well-behaved Session would never send.

    peer = RawPeer(port)                    # TLS to a proxy's tunnel listener (no certificate check)
    peer.handshake(identity, "name.test")   # Auth (and a signed http bind), read synchronously
    peer.send(fr.encode(...)) / peer.send_many(frame_bytes, times)
    peer.start_reading()                    # count the proxy's answers by frame type, in a greenlet
    peer.counts[fr.TYPE_RST], peer.goaway   # what came back; goaway = (last id, code) or None
    peer.data_in[sid], peer.syns            # DATA bytes per stream, the streams the proxy opened
    peer.granted[sid]                       # WNDINC increments per stream (its window: 64 KiB
                                            # plus these, less what we sent on it)
    peer.wait_closed(timeout) -> bool       # the proxy closed the connection (EOF or reset)
    peer.close()

``rcvbuf`` shrinks the socket's receive buffer before connecting: with ``start_reading`` never
called, that is a peer that stops reading, and the proxy's answers back up in the proxy.
Used by tests/test_hostile.py and bench/hostile_bench.py.
"""
from __future__ import annotations

import socket
import ssl

import gevent
import gevent.event
import gevent.socket
import gevent.ssl

from lib.protocol import messages as msg
from lib.protocol import muxframe as fr


class RawPeer:
    def __init__(self, port: int, rcvbuf: int | None = None, host: str = "127.0.0.1"):
        ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect((host, port))
        self.tls = ctx.wrap_socket(raw)
        self.tls.settimeout(None)
        self.counts: dict[int, int] = {}
        self.bytes_in = 0
        self.goaway: tuple[int, int] | None = None
        self.data_in: dict[int, int] = {}
        self.syns: list[int] = []
        self.granted: dict[int, int] = {}
        self.closed = gevent.event.Event()
        self._reader = None
        self._dec = fr.FrameDecoder()  # one for the connection: frames may straddle reads

    def handshake(self, identity=None, name: str | None = None) -> None:
        """Auth on stream 3 (keyless when ``identity`` is None), then a signed http bind of
        ``name`` on stream 5; raises AssertionError when the proxy refuses either."""
        extra = msg.auth_extra(identity.public_key) if identity is not None else None
        resp = self._exchange(3, msg.Auth(extra=extra))
        assert isinstance(resp, msg.AuthResp) and not resp.error, resp
        if name is None:
            return
        proxy_id = msg.proxy_id_for_cert(self.tls.getpeercert(binary_form=True))
        payload = msg.bind_signature_payload(resp.nonce, proxy_id, "http", name)
        bind = msg.Bind(protocol="http", hostname=name,
                        extra=msg.bind_extra(identity.sign(payload), proxy_id))
        resp = self._exchange(5, bind)
        assert isinstance(resp, msg.BindResp) and not resp.error, resp

    def _exchange(self, sid: int, message) -> msg.Message:
        self.tls.sendall(fr.encode(fr.Syn(sid)) + fr.encode_data(sid, msg.encode(message)))
        dec = self._dec
        reader = msg.MessageReader()
        self.tls.settimeout(10)
        try:
            while True:
                data = self.tls.recv(65536)
                if not data:
                    raise AssertionError("the proxy closed the connection during the handshake")
                dec.feed(data)
                while (f := dec.next_frame()) is not None:
                    if isinstance(f, fr.Data) and f.stream_id == sid:
                        reader.feed(f.data)
                        if (m := reader.next_message()) is not None:
                            return m
        finally:
            self.tls.settimeout(None)

    def send(self, data: bytes) -> bool:
        """False once the proxy has closed the connection."""
        try:
            self.tls.sendall(data)
            return True
        except OSError:
            self.closed.set()
            return False

    def send_many(self, frame: bytes, times: int, batch: int = 4096) -> int:
        """``frame`` ``times`` times, in writes of ``batch`` frames; how many were sent before
        the proxy closed the connection."""
        block = frame * batch
        sent = 0
        while sent < times and not self.closed.is_set():
            n = min(batch, times - sent)
            if not self.send(block if n == batch else frame * n):
                break
            sent += n
        return sent

    def start_reading(self) -> None:
        self._reader = gevent.spawn(self._read_loop)

    def _read_loop(self) -> None:
        dec = self._dec
        try:
            while True:
                data = self.tls.recv(65536)
                if not data:
                    break
                self.bytes_in += len(data)
                dec.feed(data)
                while (f := dec.next_frame()) is not None:
                    t = _TYPES[type(f)]
                    self.counts[t] = self.counts.get(t, 0) + 1
                    if t == fr.TYPE_GOAWAY:
                        self.goaway = (f.last_stream_id, f.code)
                    elif t == fr.TYPE_DATA:
                        self.data_in[f.stream_id] = self.data_in.get(f.stream_id, 0) + len(f.data)
                    elif t == fr.TYPE_SYN:
                        self.syns.append(f.stream_id)
                    elif t == fr.TYPE_WNDINC:
                        self.granted[f.stream_id] = (self.granted.get(f.stream_id, 0)
                                                     + f.increment)
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()

    def wait_closed(self, timeout: float) -> bool:
        if self._reader is None:
            # Not reading: learn of the close by a write failing.
            deadline = gevent.Timeout(timeout)
            deadline.start()
            try:
                while self.send(fr.encode(fr.WndInc(1, 1))):
                    gevent.sleep(0.1)
                return True
            except gevent.Timeout:
                return False
            finally:
                deadline.cancel()
        return self.closed.wait(timeout)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.kill(block=False)
        try:
            self.tls.close()
        except OSError:
            pass


_TYPES = {fr.Syn: fr.TYPE_SYN, fr.Data: fr.TYPE_DATA, fr.Rst: fr.TYPE_RST,
          fr.WndInc: fr.TYPE_WNDINC, fr.GoAway: fr.TYPE_GOAWAY}
