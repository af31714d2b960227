"""A hostile origin behind a client: it answers each request with a canned response, a few bytes
per write (tests/test_hostile_exchange.py).

    python tests/support/trickle_origin.py --port PORT [--piece N]

The request's path picks the response (RESPONSES: a second response behind the first, bytes
after a chunked body's end, a body shorter than its Content-Length, a malformed head...). Each
is written ``--piece`` bytes at a time (1 by default) with TCP_NODELAY and a millisecond between
writes, so the client reads it in as many pieces and the proxy gets them as as many DATA
frames: the response's head is met by the proxy's framer split across frames. The connection
is closed after the last byte.
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhacked"
RESPONSES = {
    "/second": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + SECOND,
    "/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n" + SECOND),
    "/interim": (b"HTTP/1.1 100 Continue\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + SECOND),
    "/short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
    "/malformed": b"HTTP/1.1 2x0 OK\r\nContent-Length: 5\r\n\r\nhello" + SECOND,
    "/two-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 11\r\n\r\n"
                     b"hello" + SECOND),
    "/length-and-chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                            + SECOND),
}


def serve(conn: socket.socket, piece: int) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                return
            head += data
        path = head.split(b" ", 2)[1].decode("latin-1")
        out = RESPONSES.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        for i in range(0, len(out), piece):
            conn.sendall(out[i:i + piece])
            time.sleep(0.001)
    except OSError:
        pass
    finally:
        conn.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--piece", type=int, default=1)
    a = p.parse_args()
    srv = socket.create_server(("127.0.0.1", a.port))
    print(a.port, flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, a.piece), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
