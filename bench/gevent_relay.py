#!/usr/bin/env python3
"""A plain TCP forwarder in gevent, the floor under Shroud's per-connection cost.

    python bench/gevent_relay.py [--lean] LISTEN_PORT TARGET_PORT

Every connection to 127.0.0.1:LISTEN_PORT gets one to 127.0.0.1:TARGET_PORT, and bytes are
copied both ways; an EOF is passed on as a half-close, and the connection ends when both ways
have. TCP_NODELAY on both sockets. No TLS, no multiplexer, no routing, no limits. Two ways to
write it:

- the default, as gevent forwarders are written: monkey-patched sockets, gevent's StreamServer
  (a greenlet per connection, which copies visitor -> target) and a second greenlet per
  connection for target -> visitor;
- ``--lean``: no greenlet and no gevent socket object per connection, only the hub's loop:
  non-blocking sockets from the standard library, an io watcher per socket and direction whose
  callback does one ``recv`` and one ``send`` (a write watcher only for what the peer could not
  take at once, and for the connect), the accept in the listener's watcher. The least Python a
  gevent process can run to carry a connection.

bench/proxy_bench.py's RelayPath runs two in a chain (load -> relay -> relay -> origin: the
proxy's and the client's places) so bench/cost_ab.py ``--relay`` can set Shroud's CPU per
request and per fresh connection beside what two gevent processes cost by themselves, both ways
(bench/README.md, "Per-request cost (issue 16)", "Where it stands (2026-12-04 01:56, main
7c326c5): the floor under it").
The chain has one more TCP connection per visitor than Shroud (relay to relay), so its kernel
time is not a floor; its user time is.
"""
import errno
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from single_write_origin import accepted  # noqa: E402

CHUNK = 65536
ACCEPTS_PER_WAKE = 64


def run_greenlets(listen: int, target: int) -> None:
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.server import StreamServer

    def copy(src, dst) -> None:
        """src -> dst to src's EOF, passed on as a half-close; an error (a reset) shuts both
        sockets down, so the other way's greenlet ends too and nothing is left open."""
        try:
            while data := src.recv(CHUNK):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle(visitor, _addr) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", target))
        except OSError:
            visitor.close()
            return
        for s in (visitor, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = gevent.spawn(copy, up, visitor)
        copy(visitor, up)
        back.join()
        up.close()
        visitor.close()

    StreamServer(("127.0.0.1", listen), handle, backlog=1024).serve_forever()


class _Pair:
    """One visitor's two sockets and their watchers (the lean relay)."""

    __slots__ = ("loop", "a", "b", "reads", "writes", "pending", "open_ways")

    def __init__(self, loop, a: socket.socket, b: socket.socket):
        self.loop, self.a, self.b = loop, a, b
        self.reads = [loop.io(a.fileno(), 1), loop.io(b.fileno(), 1)]
        self.writes = [loop.io(b.fileno(), 2), loop.io(a.fileno(), 2)]  # [i]: way i's dst
        self.pending = [b"", b""]
        self.open_ways = 2
        self.writes[0].start(self.connected)  # b's connect completes: writable

    def connected(self) -> None:
        self.writes[0].stop()
        if self.b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return self.close()
        self.b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reads[0].start(self.readable, 0)
        self.reads[1].start(self.readable, 1)

    def readable(self, way: int) -> None:
        src, dst = (self.a, self.b) if way == 0 else (self.b, self.a)
        try:
            data = src.recv(CHUNK)
            if not data:
                self.reads[way].stop()
                dst.shutdown(socket.SHUT_WR)
                self.open_ways -= 1
                if not self.open_ways:
                    self.close()
                return
        except BlockingIOError:
            return
        except OSError:
            return self.close()
        try:
            sent = dst.send(data)
        except BlockingIOError:  # dst's buffer is full: all of it waits for the write watcher
            sent = 0
        except OSError:
            return self.close()
        if sent < len(data):  # the peer is slow: stop reading this way until it takes the rest
            self.pending[way] = data[sent:]
            self.reads[way].stop()
            self.writes[way].start(self.writable, way)

    def writable(self, way: int) -> None:
        dst = self.b if way == 0 else self.a
        try:
            sent = dst.send(self.pending[way])
        except BlockingIOError:
            return
        except OSError:
            return self.close()
        self.pending[way] = self.pending[way][sent:]
        if not self.pending[way]:
            self.writes[way].stop()
            self.reads[way].start(self.readable, way)

    def close(self) -> None:
        for w in self.reads + self.writes:
            w.stop()
            w.close()  # libev would not need it; gevent's libuv loop does
        self.a.close()
        self.b.close()


def run_lean(listen: int, target: int) -> None:
    from gevent import get_hub
    hub = get_hub()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen))
    server.listen(1024)
    server.setblocking(False)

    def accept() -> None:
        for a in accepted(server, ACCEPTS_PER_WAKE):
            b = socket.socket()
            b.setblocking(False)
            if b.connect_ex(("127.0.0.1", target)) not in (0, errno.EINPROGRESS):
                a.close()
                b.close()
                continue
            _Pair(hub.loop, a, b)  # its watchers hold it while they are active

    watcher = hub.loop.io(server.fileno(), 1)
    watcher.start(accept)
    hub.join()  # the loop runs until the process is stopped


def main() -> int:
    argv = sys.argv[1:]
    lean = bool(argv) and argv[0] == "--lean"
    argv = argv[1:] if lean else argv
    if len(argv) != 2 or not all(a.isdigit() and 0 < int(a) < 65536 for a in argv):
        print("usage: gevent_relay.py [--lean] LISTEN_PORT TARGET_PORT (ports 1-65535)",
              file=sys.stderr)
        return 2
    (run_lean if lean else run_greenlets)(int(argv[0]), int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
