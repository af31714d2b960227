"""A hostile proxy for client tests: it takes one tunnel, answers its binds, then opens streams
of its own choosing toward the client (tests/test_hostile_hub.py).

    python tests/support/stream_proxy.py --port PORT --data-dir DIR --binds N
        [--unknown COUNT] [--client-addr ADDR --public-addr ADDR] [--name NAME]

It speaks the tunnel protocol with lib.net.muxsession and lib.protocol.messages (TLS with its own
certificate, whose fingerprint it prints as ``fingerprint HEX``; Auth answered with a nonce;
each Bind answered as bound, as ``http://NAME``). Once N binds are answered it opens, in order:

- ``--unknown COUNT`` streams whose StartProxy names a URL the client never bound (a flood the
  client must refuse), then prints ``unknown COUNT reset R`` (R: the streams the client reset);
- with ``--client-addr``, one stream for ``http://NAME`` whose StartProxy carries that
  ClientAddr and ``--public-addr``, with a ``GET /peer`` behind it; prints ``peer ANSWER``
  (the answer's JSON body, one line; ``peer none`` when the stream ended without one);
- one ordinary ``GET /hello`` stream: prints ``hello STATUS-LINE`` (``hello none`` when the
  session was gone), then ``done``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from gevent import monkey

monkey.patch_all()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gevent  # noqa: E402
import gevent.server  # noqa: E402

from lib.errors import MuxError  # noqa: E402
from lib.net.muxsession import Session  # noqa: E402
from lib.protocol import messages as msg  # noqa: E402
from tests.support.fakeproxy import serve_auth, tls_context  # noqa: E402

# Every answer comes from the client on this host; 10 s means it is not coming.
ANSWER_TIMEOUT = 10
_ran: list = []


def request(session: Session, url: str, client_addr: str, public_addr: str | None,
            head: bytes | None) -> bytes | None:
    """One stream: StartProxy (and ``head``); what came back to EOF, None when it was reset."""
    st = session.open()
    st.settimeout(ANSWER_TIMEOUT)
    try:
        data = msg.encode(msg.StartProxy(url=url, client_addr=client_addr,
                                         public_addr=public_addr))
        st.sendall(data + (head or b""))
        out = b""
        while chunk := st.recv(65536):
            out += chunk
        return out
    except MuxError:
        return None
    finally:
        st.close()


def scenario(session: Session, a) -> None:
    url = f"http://{a.name}"
    if a.unknown:
        # All opened before any answer is read: the client meets them in a few reads.
        streams = []
        for _ in range(a.unknown):
            st = session.open()
            st.settimeout(ANSWER_TIMEOUT)
            st.send_nowait(msg.encode(msg.StartProxy(url="http://nobody.test",
                                                     client_addr="192.0.2.1:1")))
            streams.append(st)
        reset = 0
        for st in streams:
            try:
                st.recv(1)
            except MuxError:
                reset += 1
            st.close()
        print(f"unknown {a.unknown} reset {reset}", flush=True)
    if a.client_addr is not None:
        out = request(session, url, a.client_addr, a.public_addr,
                      f"GET /peer HTTP/1.1\r\nHost: {a.name}\r\nConnection: close\r\n\r\n"
                      .encode())
        body = out.split(b"\r\n\r\n", 1)[1].decode("latin-1") if out and b"\r\n\r\n" in out \
            else "none"
        print(f"peer {body}", flush=True)
    out = None if session.closed else request(
        session, url, "192.0.2.1:1", None,
        f"GET /hello HTTP/1.1\r\nHost: {a.name}\r\nConnection: close\r\n\r\n".encode())
    line = out.split(b"\r\n", 1)[0].decode("latin-1") if out else "none"
    print(f"hello {line}", flush=True)
    print("done", flush=True)


def serve(sock, _address, ctx, a) -> None:
    session = serve_auth(sock, ctx, "stream-proxy")
    if session is None:
        return
    try:
        for _ in range(a.binds):
            st = session.accept()
            bind = msg.read_message(st)
            msg.write_message(st, msg.BindResp(url=f"{bind.protocol}://{bind.hostname}",
                                               protocol=bind.protocol))
            st.close()
        gevent.sleep(0.2)  # the client reads the answers and serves
        if not _ran:  # once: a client whose tunnel ended comes back, and is only served
            _ran.append(True)
            scenario(session, a)
        session.wait()
    except Exception as e:  # a test helper: whatever ends the session, say so and stop
        print(f"session ended: {e!r}", flush=True)
    finally:
        session.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--binds", type=int, default=1)
    p.add_argument("--name", default="a.test")
    p.add_argument("--unknown", type=int, default=0)
    p.add_argument("--client-addr")
    p.add_argument("--public-addr")
    a = p.parse_args()
    ctx = tls_context(a.data_dir)
    gevent.server.StreamServer(("127.0.0.1", a.port),
                               lambda s, addr: serve(s, addr, ctx, a)).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
