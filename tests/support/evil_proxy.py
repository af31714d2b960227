"""A hostile proxy for client tests: it accepts tunnels and answers binds with URLs of its choosing.

    python tests/support/evil_proxy.py --port PORT --data-dir DIR --answer a.test=http://b.test

It speaks the tunnel protocol with lib.net.muxsession and lib.protocol.messages (TLS with its own
certificate, whose fingerprint it prints as ``fingerprint HEX``; Auth answered with a nonce; each
Bind answered as bound). A bind for a name given with ``--answer`` gets the URL given there
instead of its own (a lie about what was bound); every answer is logged as ``answered NAME
with URL``. It routes no visitors: what it wants is for the client to believe the URL.
"""
from __future__ import annotations

import argparse
import os
import sys

from gevent import monkey

monkey.patch_all()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gevent.server  # noqa: E402

from lib.protocol import messages as msg  # noqa: E402
from tests.support.fakeproxy import serve_auth, tls_context  # noqa: E402


def serve(sock, _address, ctx, answers) -> None:
    session = serve_auth(sock, ctx, "evil")
    if session is None:
        return
    try:
        while True:
            st = session.accept()
            bind = msg.read_message(st)
            name = bind.hostname or f"tcp:{bind.remote_port}"
            url = answers.get(name, f"{bind.protocol}://{name}")
            msg.write_message(st, msg.BindResp(url=url, protocol=bind.protocol))
            st.close()
            print(f"answered {name} with {url}", flush=True)
    except Exception as e:  # a test helper: whatever ends the session, say so and stop
        print(f"session ended: {e!r}", flush=True)
    finally:
        session.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--answer", action="append", default=[], help="NAME=URL")
    a = p.parse_args()
    answers = dict(item.split("=", 1) for item in a.answer)
    ctx = tls_context(a.data_dir)
    gevent.server.StreamServer(("127.0.0.1", a.port),
                               lambda s, addr: serve(s, addr, ctx, answers)).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
