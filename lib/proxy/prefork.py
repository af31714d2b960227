"""Several gunicorn workers on one host: the raw listeners, opened once before the fork.

Public API (stdlib only: it runs in gunicorn's master, which gevent never patches)::

    worker_count(environ=os.environ, cpus=os.cpu_count()) -> int
        # WEB_CONCURRENCY (gunicorn's and the platforms' convention), default the cores
    plan = listener_plan({"tunnel": "0.0.0.0:4443", "https": ":443", "http": None})
    sockets = open_listeners(plan, slots=n)   # {"tunnel": [socket per slot], ...}, listening,
                                              # in the master
    slot_listeners(sockets, slot) -> {"tunnel": socket, ...}   # what worker ``slot`` adopts
    make_run_dir() -> path             # 0700 directory for the workers' Unix sockets
    listening_socket((host, port), reuseport=False, factory=socket.socket) -> socket
        # one listener; a raw tcp bind's port (opened after the fork) with reuseport=True

Every worker serves the same listeners, on sockets gunicorn's master opened before the fork
(``on_starting`` in gunicorn.conf.py): one socket per worker and listener, all bound to the same
port with ``SO_REUSEPORT``, and each worker adopts its own slot's (``pre_fork`` gives a worker
the slot its predecessor left). Why this and not the alternatives (docs/DESIGN.md, "Workers"):

- one socket shared by all workers (plain inheritance): every worker's epoll wakes for each new
  connection and gevent accepts up to 100 at a time, so whichever worker woke first takes a
  whole burst: 40 visitors opening at once all landed on one worker of two in our test. The
  kernel spreads connections over ``SO_REUSEPORT`` sockets by a hash of their addresses.
- each worker opening its own ``SO_REUSEPORT`` socket after the fork: a worker that dies takes
  its accept queue with it (those visitors are reset), and a configured port 0 would be a
  different port per worker. Here the master keeps every socket open: a dead worker's queued
  connections wait for its replacement, which adopts the same socket.

The price: a worker that is busy does not hand its hashed share of new connections to an idle
one (they wait in its queue); tunnels and visitors are cheap greenlets, so a worker is rarely
busy long enough for this to show.

Raw TCP binds (``tcp:PORT``) are opened when a client binds them, inside whichever worker
holds that tunnel, after the fork; with ``SO_REUSEPORT`` a second worker holding a tunnel for
the same port opens it too. A connection landing where the tunnel is gone is handed over
(lib/proxy/workers.py).
"""
from __future__ import annotations

import os
import socket
import tempfile

from lib.errors import ListenError, ShroudError
from lib.hostport import AddressError, format_hostport, parse_hostport

# The kernel's accept queue per listener: bursts of visitors wait here while every worker is
# busy (as gevent.server's default for ours, and bounded by net.core.somaxconn).
BACKLOG = 1024
# More workers than this is a configuration mistake (WEB_CONCURRENCY=1000): each worker holds a
# whole proxy's state (~30 MiB, docs/OPERATIONS.md).
MAX_WORKERS = 256


class PreforkError(ShroudError):
    """A user's mistake or the system's refusal, in one line naming the setting."""


def worker_count(environ=os.environ, cpus: int | None = None) -> int:
    """gunicorn's worker count: ``WEB_CONCURRENCY`` when set, else the number of cores.

    :raises PreforkError: WEB_CONCURRENCY is not a whole number from 1 to MAX_WORKERS.
    """
    value = environ.get("WEB_CONCURRENCY", "").strip()
    if not value:
        return max(1, cpus if cpus is not None else (os.cpu_count() or 1))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKERS:
        raise PreforkError(f"WEB_CONCURRENCY={value!r} is not a worker count: give a whole "
                           f"number from 1 to {MAX_WORKERS} (or unset it for one per core)")
    return n


def listener_plan(addrs: dict) -> dict:
    """``{"https": "HOST:PORT" | ":PORT" | "" | None}`` -> ``{"https": (host, port)}`` for
    the ones set. :raises PreforkError: an address that does not parse (named)."""
    plan = {}
    for name, addr in addrs.items():
        if not addr:
            continue
        try:
            plan[name] = parse_hostport(str(addr), what=f"the {name} listen address",
                                        default_host="0.0.0.0", port_zero=True)
        except AddressError as e:
            raise PreforkError(str(e)) from None
    return plan


def listening_socket(addr: tuple, reuseport: bool = False, factory=socket.socket):
    """A socket listening on ``addr``; ``reuseport``: other workers may open it as well;
    ``factory``: the socket class (a worker passes gevent's). :raises OSError:"""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = factory(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def open_listeners(plan: dict, slots: int = 1) -> dict:
    """Open ``slots`` sockets listening on every address of ``plan`` (see :func:`listener_plan`),
    with SO_REUSEPORT when more than one; a port 0 is chosen once and shared.

    :raises lib.errors.ListenError: one cannot be opened (the ones already open are closed).
    """
    opened: dict = {}
    try:
        for name, addr in plan.items():
            opened[name] = []
            for _ in range(slots):
                try:
                    sock = listening_socket(addr, reuseport=slots > 1)
                except OSError as e:
                    raise ListenError(name, format_hostport(*addr), e) from None
                opened[name].append(sock)
                addr = sock.getsockname()[:2]  # port 0: the next slots take the same port
    except ListenError:
        for socks in opened.values():
            for sock in socks:
                sock.close()
        raise
    return opened


def slot_listeners(sockets: dict, slot: int) -> dict:
    """The sockets worker ``slot`` adopts: its own, or a shared one when gunicorn runs more
    workers than slots (after TTIN)."""
    return {name: socks[slot % len(socks)] for name, socks in sockets.items() if socks}


def make_run_dir(base: str | None = None) -> str:
    """A fresh directory only this user can enter, for the workers' Unix sockets (their only
    protection: whoever can connect to one could hand a worker any socket)."""
    return tempfile.mkdtemp(prefix="shroud-workers-", dir=base)
