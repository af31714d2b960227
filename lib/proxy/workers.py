"""The workers of one host: which sibling holds which name, and handing a public connection,
socket and all, to the one that does.

Public API::

    group = WorkerGroup(run_dir, registry, take=callable, answer=callable, pid=None,
                        max_in_flight=HANDOFFS_IN_FLIGHT)
        take(header: dict, peeked: bytes) -> run(sock) | Refused(reason)
            # may this worker serve a handed-over connection? run(sock) serves it
        answer(request: dict) -> JSON-able   # a sibling's question (snapshot, an action)
    group.start()                 # listens on run_dir/<pid>.sock, publishes and reads names
    group.stop()
    group.holder(protocols, name) -> pid | None        # a sibling with a live binding for it
    group.names_elsewhere() -> int                      # names known live on siblings
    group.candidates(protocols, name) -> [pid, ...]     # the holder, else every sibling
    group.hand_off(pid, sock, header, peeked) -> str   # TAKEN, or why not (below)
    group.ask_all(request, timeout) -> list[dict]       # every live sibling's answer
    group.counters                                      # Counter (see below)
    encode_message(header, payload=b"") -> bytes;  MessageReader: sans-I/O framing

How siblings know each other (all in ``run_dir``, a 0700 directory gunicorn's master made):
each worker listens on ``<pid>.sock`` and writes the names it holds live to ``<pid>.names``
(atomically, at most every PUBLISH_INTERVAL, only when its bindings changed); each worker reads
its siblings' files when their size or time changes. A sibling whose process is gone is dropped
at once (its files removed). A name bound on one worker is known to the others within
PUBLISH_INTERVAL + POLL_INTERVAL; until then (and for names bound nowhere) a worker offers the
connection to every sibling in turn, each refusing at once what it does not hold.

Handing over (docs/DESIGN.md, "Workers"): the worker that accepted a connection and peeked its
name sends the holder one message, the header and the peeked bytes, with the connection's
descriptor attached (SCM_RIGHTS): the holder splices the visitor's socket with its tunnel
directly, so no byte is copied between workers. Hand-overs travel on one persistent channel
per sibling (connected at the first; a visitor pays no connect, accept or close:
bench/README.md, "Forwarding between workers and between hosts"), answered in order; questions
take a connection each. The holder answers before it starts::

    holder's answer               the sender does                      counter
    taken                         closes its copy; done                handed_off
    refused (no live binding      answers the visitor as for an        refused_by_sibling
      here: it never forwards       unknown name / lost tunnel
      again, so at most one hop)
    refused busy (it serves       the same                             refused_by_sibling
      MAX_HANDED_SERVED already)
    no answer by the deadline,    the same (the holder takes nothing   sibling_timeout
      or not even sent by it        after the deadline)
      (it stopped reading)
    socket refused / gone         the same, and forgets the sibling    sibling_unreachable
    HANDOFFS_IN_FLIGHT reached    503 / internal_error                 handoff_limit

The connection is counted once: ``connections`` where it was accepted, its bytes and its
binding's count where it is served. Only processes of this user reach ``run_dir``; a
connection from another uid (SO_PEERCRED) is refused and counted (``peer_refused``).

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import time
from collections import Counter, deque
from typing import Callable, NamedTuple

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.server
import gevent.socket

from lib.protocol.sniff import wildcard_candidates
from lib.errors import ShroudError
from lib.tokenbucket import TokenBucket

log = logging.getLogger("shroud.workers")

# How often a worker rewrites its names (when they changed) and reads its siblings'.
PUBLISH_INTERVAL = 0.1
POLL_INTERVAL = 0.1
# A sibling has this long to answer a hand-over (it only looks its binding up): past it the
# visitor gets a clear error; the holder refuses what arrives later than HANDOFF_MARGIN before
# the deadline, so a late take and the sender's error never both happen.
HANDOFF_TIMEOUT = 2.0
HANDOFF_MARGIN = 0.5
# Hand-overs waiting for an answer at once, per worker: past it visitors get 503 at once
# instead of piling up behind a stuck sibling.
HANDOFFS_IN_FLIGHT = 256
# One message's header and payload (the peeked bytes: a ClientHello or request head, at most
# the sniffers' 64 KiB; a snapshot answer: a worker's whole registry).
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 64 * 1024 * 1024
# Names no sibling is known to hold are offered to every sibling (a bind in the last 0.2 s);
# a flood of unknown names (a scanner) must not cost N-1 round trips each: past this budget an
# unknown name is refused here at once (counter blind_offer_limit).
BLIND_OFFER_BURST = 64
BLIND_OFFERS_PER_SECOND = 100.0
# Sibling connections served at once (a channel per sibling for hand-overs, questions).
MAX_SIBLING_CONNECTIONS = 1024
# Connections taken from siblings and served here at once; past it a hand-over is refused
# ("busy": the sender answers the visitor) rather than piling up greenlets and sockets.
MAX_HANDED_SERVED = 20000

TAKEN = "taken"
REFUSED = "refused_by_sibling"
TIMEOUT = "sibling_timeout"
UNREACHABLE = "sibling_unreachable"
LIMIT = "handoff_limit"

# Why a sibling refuses (its routing's refusal counters and ours), counted apiece.
REFUSAL_REASONS = frozenset({"late", "busy", "bad header", "unknown_name", "tunnel_lost",
                             "limit_streams", "blocked", "redirect"})

_LEN = struct.Struct("!II")  # header length, payload length


class Refused(NamedTuple):
    """A handed-over connection this worker will not serve, and why."""
    reason: str


class MessageError(ShroudError):
    """A sibling's message does not parse or is over a bound."""


def encode_message(header: dict, payload: bytes = b"") -> bytes:
    """One message: two lengths, a JSON header, the payload."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(head), len(payload)) + head + payload


class MessageReader:
    """Sans-I/O reader of one message: ``feed(data)`` until ``done``; then ``header`` and
    ``payload``. :raises MessageError: over a bound, or a header that is not a JSON object."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.buf = bytearray()
        self.max_payload = max_payload
        self.header: dict | None = None
        self.payload = b""
        self.done = False
        self.rest = b""  # bytes past this message (the next one's start), once done
        self._need: tuple | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        if self._need is None and len(self.buf) >= _LEN.size:
            hlen, plen = _LEN.unpack_from(self.buf)
            if hlen > MAX_HEADER or plen > self.max_payload:
                raise MessageError(f"message over its bound ({hlen} + {plen} bytes)")
            self._need = (hlen, plen)
        if self._need is not None and len(self.buf) >= _LEN.size + sum(self._need):
            hlen, plen = self._need
            try:
                header = json.loads(bytes(self.buf[_LEN.size:_LEN.size + hlen]))
            except ValueError as e:
                raise MessageError(f"header is not JSON: {e}") from None
            if not isinstance(header, dict):
                raise MessageError("header is not a JSON object")
            self.header = header
            end = _LEN.size + hlen + plen
            self.payload = bytes(self.buf[_LEN.size + hlen:end])
            self.rest = bytes(self.buf[end:])
            self.done = True


def _recv_message(sock, deadline: float) -> MessageReader:
    """Read one message from ``sock`` by ``deadline`` (monotonic): a question's answer.
    :raises MessageError, OSError, TimeoutError:"""
    reader = MessageReader()
    while not reader.done:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no message in time")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise MessageError("closed before a whole message")
        reader.feed(data)
    return reader


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Inbox:
    """The messages arriving on one sibling connection, in turn: each ``next()`` waits as long
    as it takes for a message to start, then HANDOFF_TIMEOUT for the rest of it. Descriptors
    passed alongside (SCM_RIGHTS) queue in ``fds`` in the order sent: each hand-over message
    carries one, and Linux ends a read at the end of the bytes a descriptor came with, so a
    message is never complete before its descriptor is here."""

    def __init__(self, sock):
        self.sock = sock
        self.fds: deque = deque()
        self._rest = b""

    def next(self) -> MessageReader | None:
        """The next message; None at a clean end between messages.
        :raises MessageError, OSError, TimeoutError:"""
        reader = MessageReader()
        if self._rest:
            reader.feed(self._rest)
        deadline = None
        while not reader.done:
            if reader.buf and deadline is None:
                deadline = time.monotonic() + HANDOFF_TIMEOUT
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("a sibling's message did not end in time")
            self.sock.settimeout(left)
            data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(cdata[:len(cdata) - len(cdata) % arr.itemsize])
                    self.fds.extend(arr)
            if not data:
                if reader.buf:
                    raise MessageError("closed inside a message")
                return None
            reader.feed(data)
        self._rest = reader.rest
        return reader

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popleft())


class _Channel:
    """One persistent connection to a sibling, for hand-overs: no connect, accept or new
    greenlet per visitor (each cost the visitor a round of the hub, in both processes).
    Messages go out one at a time (a lock); the sibling answers them in order, so answers are
    matched to a queue of waiters by one reader greenlet. When the connection ends, every
    waiter gets None (UNREACHABLE) and the channel is dropped; the next hand-over opens one."""

    def __init__(self, sock, on_close: Callable):
        self.sock = sock
        # The reader's own socket object on the same connection: _Inbox sets its timeout to
        # none between messages, which on a shared object lifted the senders' deadline too (a
        # sibling that stopped reading held a send, and everyone behind the lock, forever).
        self._rsock = sock.dup()
        self.dead = False
        self._lock = gevent.lock.Semaphore()
        self._waiting: deque = deque()
        self._on_close = on_close
        self._reader = gevent.spawn(self._read)

    def send(self, message: bytes, fd: int, deadline: float) -> gevent.event.AsyncResult:
        """Send one hand-over message with ``fd`` by ``deadline`` (monotonic); its answer's
        header arrives in the result (None: the channel ended first).
        :raises TimeoutError: not sent by the deadline (the channel is closed if it had begun).
        :raises OSError: the channel is dead now."""
        result = gevent.event.AsyncResult()
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the channel to this sibling is busy sending")
        try:
            if self.dead:
                raise OSError("the channel to this sibling has ended")
            self._waiting.append(result)
            try:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                fds = array.array("i", [fd]).tobytes()
                sent = self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                      fds)])
                if sent < len(message):
                    self.sock.sendall(message[sent:])
            except OSError:
                self.close()  # half a message may be out: the stream is unusable
                raise
        finally:
            self._lock.release()
        return result

    def _read(self) -> None:
        inbox = _Inbox(self._rsock)
        try:
            while self._waiting or not self.dead:
                msg = inbox.next()
                if msg is None or not self._waiting:
                    break  # closed, or an answer nobody asked for
                self._waiting.popleft().set(msg.header)
        except (OSError, MessageError, TimeoutError) as e:
            log.info("sibling channel ended: %s", e)
        finally:
            inbox.close()
            self.close(reader=False)

    def close(self, reader: bool = True) -> None:
        if self.dead:
            return
        self.dead = True
        while self._waiting:
            self._waiting.popleft().set(None)
        self.sock.close()
        self._rsock.close()
        if reader:
            self._reader.kill(block=False)
        self._on_close(self)


class WorkerGroup:
    def __init__(self, run_dir: str, registry, take: Callable, answer: Callable,
                 pid: int | None = None, max_in_flight: int = HANDOFFS_IN_FLIGHT):
        self.run_dir = run_dir
        self.registry = registry
        self.take = take
        self.answer = answer
        self.pid = pid or os.getpid()
        self.counters: Counter = Counter()
        self._index: dict = {}          # (protocol, name) -> [pid, ...]
        self._siblings: dict = {}       # pid -> ((mtime_ns, size), names)
        self._published_version = None
        self._in_flight = gevent.lock.BoundedSemaphore(max_in_flight)
        self._blind = TokenBucket(BLIND_OFFER_BURST, BLIND_OFFERS_PER_SECOND)
        self._server = None
        self._greenlets: list = []
        self._channels: dict = {}       # pid -> _Channel (hand-overs to that sibling)
        self._served = gevent.pool.Pool(MAX_HANDED_SERVED)  # connections taken from siblings

    def path(self, pid: int, ext: str) -> str:
        return os.path.join(self.run_dir, f"{pid}.{ext}")

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        path = self.path(self.pid, "sock")
        if os.path.exists(path):
            os.unlink(path)  # a previous process with our pid (the directory is ours)
        listener = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1024)
        self._server = gevent.server.StreamServer(
            listener, self._serve, spawn=gevent.pool.Pool(MAX_SIBLING_CONNECTIONS))
        self._server.start()
        self._greenlets = [gevent.spawn(self._publish_loop), gevent.spawn(self._poll_loop)]
        log.info("worker %d among siblings in %s", self.pid, self.run_dir)

    def stop(self) -> None:
        gevent.killall(self._greenlets, timeout=1)
        for channel in list(self._channels.values()):
            channel.close()
        if self._server is not None:
            self._server.stop(timeout=1)
        self._served.join(timeout=1)  # as the server's own handlers: a second, then killed
        self._served.kill(block=False)
        for ext in ("names", "sock"):
            try:
                os.unlink(self.path(self.pid, ext))
            except OSError:
                pass

    # --- who holds what --------------------------------------------------------------------
    def holder(self, protocols, name: str) -> int | None:
        """A sibling holding a live binding for ``name`` under one of ``protocols`` (exact,
        then the nearest wildcard, as lib.proxy.registry.Registry.lookup)."""
        for candidate in wildcard_candidates(name):
            for protocol in protocols:
                pids = self._index.get((protocol, candidate))
                if pids:
                    return pids[0] if len(pids) == 1 else pids[int(time.monotonic() * 1e6)
                                                                % len(pids)]
        return None

    def siblings(self) -> list:
        return sorted(self._siblings)

    def candidates(self, protocols, name: str) -> list:
        """Whom to offer a connection for ``name``: the sibling known to hold it, else every
        sibling (a name bound within the last PUBLISH_INTERVAL + POLL_INTERVAL is not in
        their files yet; each refuses at once what it does not hold), within the blind-offer
        budget (BLIND_OFFERS_PER_SECOND); past it, nobody."""
        pid = self.holder(protocols, name)
        if pid is not None:
            return [pid]
        siblings = self.siblings()
        if siblings and not self._blind.take():
            self.counters["blind_offer_limit"] += 1
            return []
        return siblings

    def names_elsewhere(self) -> int:
        """How many (protocol, name) this worker knows live on its siblings."""
        return len(self._index)

    def _publish_loop(self) -> None:
        while True:
            try:
                self.publish()
            except OSError as e:
                log.warning("cannot write %s: %s", self.path(self.pid, "names"), e)
            gevent.sleep(PUBLISH_INTERVAL)

    def publish(self) -> None:
        """Write the names bound here with a live tunnel, if they changed since last time."""
        version = self.registry.version
        if version == self._published_version:
            return
        names = sorted([b.protocol, b.name] for b in list(self.registry.bindings.values())
                       if b.tunnels)
        tmp = self.path(self.pid, "names.tmp")
        with open(tmp, "w") as f:
            json.dump({"pid": self.pid, "names": names}, f)
        os.replace(tmp, self.path(self.pid, "names"))
        self._published_version = version

    def _poll_loop(self) -> None:
        while True:
            self.poll()
            gevent.sleep(POLL_INTERVAL)

    def poll(self) -> None:
        """Read the siblings' names that changed; forget siblings that are gone."""
        seen = {}
        try:
            entries = os.listdir(self.run_dir)
        except OSError:
            return
        for entry in entries:
            stem, _, ext = entry.partition(".")
            if ext != "names" or not stem.isdigit() or int(stem) == self.pid:
                continue
            pid = int(stem)
            try:
                st = os.stat(os.path.join(self.run_dir, entry))
            except OSError:
                continue
            seen[pid] = (st.st_mtime_ns, st.st_size, st.st_ino)  # a rewrite is a new inode
        changed = False
        for pid in list(self._siblings):
            if pid not in seen or not pid_alive(pid):
                self.forget(pid)
                changed = True
        for pid, stamp in seen.items():
            known = self._siblings.get(pid)
            if known is not None and known[0] == stamp:
                continue
            if not pid_alive(pid):
                self.forget(pid)
                continue
            names = self._read_names(pid)
            if names is not None:
                self._siblings[pid] = (stamp, names)
                changed = True
        if changed:
            self._reindex()

    def _read_names(self, pid: int) -> list | None:
        try:
            with open(self.path(pid, "names")) as f:
                data = json.load(f)
            return [tuple(n) for n in data["names"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # half-written by a dying sibling: read it when it changes

    def forget(self, pid: int) -> None:
        """Drop a sibling that is gone (its files too: the directory is the group's)."""
        if self._siblings.pop(pid, None) is not None:
            log.info("worker %d is gone; its names are no longer handed to it", pid)
            self._reindex()
        if not pid_alive(pid):
            for ext in ("names", "sock"):
                try:
                    os.unlink(self.path(pid, ext))
                except OSError:
                    pass

    def _reindex(self) -> None:
        index: dict = {}
        for pid, (_, names) in self._siblings.items():
            for key in names:
                index.setdefault(key, []).append(pid)
        self._index = index

    # --- handing over ----------------------------------------------------------------------
    def hand_off(self, pid: int, sock, header: dict, peeked: bytes) -> str:
        """Pass ``sock`` (with ``peeked``, the bytes already read from it) to sibling ``pid``.

        :returns: TAKEN (the sibling serves it; close your copy, write nothing), else why not
            (REFUSED, TIMEOUT, UNREACHABLE, LIMIT): the connection is still the caller's.
        """
        if not self._in_flight.acquire(blocking=False):
            self.counters[LIMIT] += 1
            return LIMIT
        try:
            result = self._hand_off(pid, sock, header, peeked)
        finally:
            self._in_flight.release()
        self.counters[result] += 1
        return result

    def _hand_off(self, pid: int, sock, header: dict, peeked: bytes) -> str:
        deadline = time.monotonic() + HANDOFF_TIMEOUT  # CLOCK_MONOTONIC: one for the host
        message = encode_message(dict(header, op="handoff", deadline=deadline), peeked)
        try:
            channel = self._channel(pid)
        except OSError as e:
            log.info("worker %d unreachable (%s): forgetting it", pid, e)
            self.forget(pid)
            return UNREACHABLE
        try:
            result = channel.send(message, sock.fileno(), deadline)
        except TimeoutError:  # stuck behind a send to a sibling that stopped reading
            return TIMEOUT
        except OSError:
            return UNREACHABLE
        try:
            reply = result.get(timeout=max(0.0, deadline - time.monotonic()))
        except gevent.Timeout:
            return TIMEOUT
        if reply is None:
            return UNREACHABLE
        if reply.get("taken"):
            return TAKEN
        reason = str(reply.get("reason", ""))
        if reason in REFUSAL_REASONS:
            self.counters[f"refused:{reason}"] += 1  # which refusal: a fixed, small set
        return REFUSED

    def _channel(self, pid: int) -> _Channel:
        """The open channel to sibling ``pid``, connected now if there is none.
        :raises OSError: the sibling's socket refuses or is gone."""
        channel = self._channels.get(pid)
        if channel is not None and not channel.dead:
            return channel
        sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HANDOFF_TIMEOUT)
            sock.connect(self.path(pid, "sock"))
        except OSError:
            sock.close()
            raise
        channel = self._channels.get(pid)
        if channel is not None and not channel.dead:  # another greenlet connected meanwhile
            sock.close()
            return channel
        self.counters["channel_opened"] += 1
        channel = self._channels[pid] = _Channel(
            sock, lambda c: self._channels.pop(pid, None) if self._channels.get(pid) is c
            else None)
        return channel

    def _serve(self, link, _address) -> None:
        """A sibling's connection: hand-overs (a channel, many in turn) or one question."""
        inbox = _Inbox(link)
        try:
            if not self._same_user(link):
                self.counters["peer_refused"] += 1
                return
            while True:
                try:
                    msg = inbox.next()
                except (OSError, MessageError, TimeoutError) as e:
                    log.info("sibling message refused: %s", e)
                    return
                if msg is None:
                    return
                if msg.header.get("op") == "handoff":
                    if not inbox.fds:
                        log.info("sibling message refused: a hand-over without its socket")
                        return
                    self._taken(link, msg.header, msg.payload, inbox.fds.popleft())
                    continue
                inbox.close()  # a question carries no descriptor
                try:
                    answer = self.answer(msg.header)
                except (ValueError, TypeError, KeyError) as e:  # a malformed question
                    answer = {"error": f"bad question: {e}"}
                body = json.dumps(answer, separators=(",", ":")).encode()
                link.sendall(encode_message({"ok": True}, body))
        except OSError:
            pass
        finally:
            inbox.close()
            link.close()

    def _taken(self, link, header: dict, peeked: bytes, fd: int) -> None:
        sock = gevent.socket.socket(fileno=fd)
        try:
            late = time.monotonic() > float(header.get("deadline", 0)) - HANDOFF_MARGIN
        except (TypeError, ValueError):
            late = True  # no usable deadline: never take it
        if late:
            decision = Refused("late")
        elif self._served.full():
            decision = Refused("busy")
        else:
            decision = self.take(header, peeked)
        if isinstance(decision, Refused):
            self.counters["handoff_refused_here"] += 1
            sock.close()  # our copy only (no shutdown): the sender answers the visitor
            link.sendall(encode_message({"taken": False, "reason": decision.reason}))
            return
        try:
            link.sendall(encode_message({"taken": True}))
        except OSError:
            sock.close()  # the sender gave up: it answers the visitor
            raise
        self.counters["handoff_taken_here"] += 1
        self._served.spawn(decision, sock)  # the channel reads the next hand-over meanwhile

    @staticmethod
    def _same_user(link) -> bool:
        creds = link.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return uid == os.getuid()

    # --- questions -------------------------------------------------------------------------
    def ask(self, pid: int, request: dict, timeout: float = 2.0) -> dict | None:
        """One sibling's answer to ``request`` (None: gone or silent)."""
        link = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        try:
            link.settimeout(timeout)
            link.connect(self.path(pid, "sock"))
            link.sendall(encode_message(request))
            return json.loads(_recv_message(link, deadline).payload)
        except (OSError, MessageError, TimeoutError, ValueError) as e:
            log.info("worker %d did not answer %s: %s", pid, request.get("op"), e)
            return None
        finally:
            link.close()

    def ask_all(self, request: dict, timeout: float = 2.0) -> list:
        """Every known sibling's answer (asked at once); the silent ones are left out."""
        jobs = [gevent.spawn(self.ask, pid, request, timeout) for pid in self.siblings()]
        gevent.joinall(jobs, timeout=timeout + 0.5)
        return [j.value for j in jobs if j.value is not None]
