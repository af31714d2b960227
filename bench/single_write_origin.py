#!/usr/bin/env python3
"""An HTTP/1.1 origin that answers every request in one write (head and body in one send()).

    python bench/single_write_origin.py PORT

``GET /small`` answers a 13-byte body, ``GET /1k`` a 1,024-byte body, anything else 404; keep-alive
unless the request says ``Connection: close`` (then the answer says so too, and the
connection ends after it, so a load tool such as wrk reconnects instead of writing the next
request into a closed connection). nginx answers a static file in two writes (the head,
then the body by sendfile), which provokes Nagle/delayed-ACK stalls in a path that does not set
TCP_NODELAY everywhere (ssh -R); this origin takes that stall out, so a path's own cost per request
is what bench/proxy_bench.py sees. One process, one epoll loop, non-blocking sockets; a request
head over 8 KiB closes its connection (the bench sends ~80 bytes).
"""
from __future__ import annotations

import selectors
import socket
import sys

HEAD_LIMIT = 8192


def response(body: bytes, status: str = "200 OK", close: bool = False) -> bytes:
    conn = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"{conn}\r\n").encode() + body


BODIES = {b"/small": b"hello, world\n", b"/1k": b"x" * 1023 + b"\n"}
KEEP = {k: response(v) for k, v in BODIES.items()}
CLOSE = {k: response(v, close=True) for k, v in BODIES.items()}
NOT_FOUND = {c: response(b"not found\n", "404 Not Found", close=c) for c in (False, True)}


def answer(head: bytes) -> tuple[bytes, bool]:
    """(response, close after it) for one request head."""
    line, _, fields = head.partition(b"\r\n")
    parts = line.split(b" ")
    target = parts[1] if len(parts) == 3 else b""
    close = b"connection: close" in fields.lower()
    return (CLOSE if close else KEEP).get(target, NOT_FOUND[close]), close


class Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "closing", "mask")

    def __init__(self, sock: socket.socket):
        self.sock, self.inbuf, self.outbuf, self.closing = sock, b"", b"", False
        self.mask = selectors.EVENT_READ


def serve(port: int) -> None:
    sel = selectors.DefaultSelector()
    lsock = socket.create_server(("127.0.0.1", port), backlog=4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    while True:
        for key, events in sel.select():
            if key.data is None:
                accept(sel, lsock)
            else:
                step(sel, key.data, events)


def accepted(lsock: socket.socket, limit: int = 64):
    """The connections waiting on a non-blocking ``lsock``, at most ``limit`` (bounded per
    wake-up: the loop serves the open ones too), each non-blocking with TCP_NODELAY set
    (bench/gevent_relay.py's lean way accepts with it too)."""
    for _ in range(limit):
        try:
            s, _ = lsock.accept()
        except BlockingIOError:
            return
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield s


def accept(sel, lsock) -> None:
    for s in accepted(lsock):
        sel.register(s, selectors.EVENT_READ, Conn(s))


def drop(sel, c: Conn) -> None:
    sel.unregister(c.sock)
    c.sock.close()


def step(sel, c: Conn, events: int) -> None:
    try:
        if events & selectors.EVENT_READ and not c.closing:
            data = c.sock.recv(65536)
            if not data:
                return drop(sel, c)
            c.inbuf += data
            out = []
            while b"\r\n\r\n" in c.inbuf and not c.closing:
                head, _, c.inbuf = c.inbuf.partition(b"\r\n\r\n")
                resp, c.closing = answer(head)
                out.append(resp)
            if len(c.inbuf) > HEAD_LIMIT:
                return drop(sel, c)
            c.outbuf += b"".join(out)
        if c.outbuf:
            n = c.sock.send(c.outbuf)  # one write per answer (several only when pipelined)
            c.outbuf = c.outbuf[n:]
        if not c.outbuf and c.closing:
            return drop(sel, c)
        mask = selectors.EVENT_WRITE if c.outbuf else selectors.EVENT_READ
        if mask != c.mask:  # epoll_ctl only on a change: the origin should cost little
            c.mask = mask
            sel.modify(c.sock, mask, c)
    except OSError:
        drop(sel, c)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
