"""Copy bytes both ways between two socket-like objects (sockets or mux streams).

Public API::

    splice(a, b, *, on_a_to_b=None, on_b_to_a=None, idle_timeout=None, chunk=CHUNK,
           fallback_to_a=None, b_answers=False) -> (n_ab, n_ba)
    splice_detached(a, b, on_done, *, on_a_to_b=None, on_b_to_a=None, chunk=CHUNK) -> bool
        # splice(a, b, b_answers=True) with no greenlet; on_done(n_ab, n_ba) once both closed
    socket_sink(sock) -> sink   # a stream's sink to ``sock`` on its own (tests, tools)

Half-close is carried through: when one side reaches EOF, the other side gets
``shutdown(SHUT_WR)`` and the opposite direction keeps flowing until it ends too. ``a`` to
``b`` runs in the calling greenlet, ``b`` to ``a`` in a kept one (lib.net.greenpool), joined
before return; both ends are closed on return (gevent's rule: when the handler returns, its
socket is closed). An error in either direction ends both. ``on_*`` callbacks get the byte count of each chunk (bandwidth
counters). ``idle_timeout`` bounds how long both directions may stay silent: one repeating
timer, shared by every splice with that ``idle_timeout`` (``_IdleTimers``), looks at each every
``idle_timeout / IDLE_CHECKS`` seconds, and once neither direction
has moved a byte for ``idle_timeout`` it raises TimeoutError in both directions, which then end
as on any other error (the ends themselves wait without a timeout). With ``idle_timeout=None``
(``--idle-timeout 0``) the ends keep their own timeouts, and one that fires ends both
directions like any other error.

A TCP end gets TCP_NOTSENT_LOWAT (``UNSENT_LOWAT``): its kernel queue of bytes not yet sent is
bounded, so a reader that stops (a slow visitor) blocks our send at once instead of after
megabytes of socket buffer, and a mux stream behind it sees that its reader stopped (its
window stops growing: docs/OPERATIONS.md, "Memory per visitor").
``fallback_to_a`` is sent to ``a`` (then both close) when ``b`` ends or fails before sending a
single byte: the proxy's 502 for HTTP.

A mux stream spliced to a gevent socket (with no timeout of its own) gets a sink
(lib.net.muxsession, "Direct delivery"): the session's reader sends what arrives straight to the
socket, non-blocking, and this direction's copy loop wakes only for what the socket did not take
(then waiting for it as before), for EOF and for errors. The sink counts its bytes into this
direction's total, calls ``on_*`` and marks the splice busy (idle timer); a send error it meets
aborts both ends at once, as the copy loop does on any error. An end that is not a socket may
offer its own senders (``end.direct_senders() -> (sendall, send_now, sendmsg_now) | None``: an
HTTP exchange's framer sees every byte, lib.net.httpexchange); send_now and sendmsg_now return
the count of bytes they took, never wait, and raise BlockingIOError when they took none.

Feeding: a gevent socket (with no timeout of its own) spliced to a mux stream is read, after the
copy loop's first FEED_AFTER reads, by an io watcher's callback in the hub: it reads what is there and
queues what the stream takes without waiting (``Stream.send_nowait``), so a request wakes no
greenlet. What the stream does not take (its window or the session's output is full), EOF and
errors are handed to the copy loop, which stops the watcher meanwhile: it sends the rest,
waiting as before (the socket is not read on, so a stream that stops reading stops the
socket), carries EOF and errors as before, and watches again. An abort stops every watcher of
the splice before it closes an end, and ends a copy loop waiting on one.

``b_answers``: ``b`` (a socket fed to stream ``a``) was just sent a request, so its answer is
rarely there yet: the first read waits first, in the watcher's callback (no read finding
nothing: an EAGAIN ``recv``), and reads once more at once, so an origin that answers and closes
has the stream's FIN queued with the answer's DATA (one record, flushed in that loop turn, before
the copy loop wakes to end). The client's target after StartProxy's bytes (lib.client.tunnels);
no ``fallback_to_a`` with it. With no ``idle_timeout`` either, that direction has no greenlet of
its own (``_Answer``): the watcher's callback carries the answer, its EOF (the stream's FIN) and
errors (both ends aborted) by itself, and only what the stream does not take at once starts a
copy loop (a kept greenlet) that sends it, waiting, and goes on as any other; ``splice`` waits
for that direction's end only when its own ends first. One greenlet per fresh connection, not two
(bench/README.md, "Fresh connections, the client's side, second session").

Detached (``splice_detached``): the same splice of a mux stream ``a`` just opened and the
socket ``b`` its request went to (``b_answers``, no idle timeout, no fallback), with no greenlet
at all: it returns at once and calls ``on_done(n_ab, n_ba)`` once both directions are over and
both ends closed. The stream -> socket direction is the stream's waker (``Stream.set_waker``):
the session's reader calls it where a reader greenlet would be woken, and what needs doing (the
stream's EOF: the socket's ``shutdown``, or both closed when the answer is over too; an error:
both aborted) is done in a hub callback, after the read that brought it (a FIN read with the
next connection's SYN does not delay that one's request). More of the visitor's bytes (a request
body, a keep-alive connection's next request), or an answer the stream does not take at once
(the answer's copy loop waits on the stream, so no waker may stay), start a copy loop for that
direction (a kept greenlet, with its sink), as splice's own. The answer's direction is
``_Answer``, told to report its end here. No greenlet
per fresh connection (bench/README.md, "Fresh connections: no greenlet in the client").
"""
from __future__ import annotations

import errno
import socket
import struct
import time
from itertools import islice

import gevent
import gevent.socket
from gevent.hub import Waiter

from lib.net.muxsession import Stream
from lib.net.greenpool import WorkerPool
from lib.net.sockets import (IOV_MAX, SCRATCH_SIZE, nowait_reader, nowait_sender,
                             nowait_sendmsg, read_watcher, reader, recv_copy,
                             sender)

# A read returns what is there, up to this: large reads mean fewer system calls and hub
# switches per MiB in bulk transfers, and cost nothing while a connection is idle (the buffer
# is only allocated once data is readable).
CHUNK = 256 * 1024
# Reads from a mux stream, which are copies of frames already in memory (16 KiB each): a
# larger read saves no system call, and what one read takes is held while the other end is
# slow to accept it, per connection.
STREAM_CHUNK = 64 * 1024
# ...but a stream whose window grew to BULK_WINDOW (its reader keeps up: MuxConfig.grow_windows)
# is read up to BULK_STREAM_CHUNK at a time after a read of over half a chunk: a quarter of the copy
# loop's turns (a wake-up, a join, a send) per GiB, -8 % CPU per GiB at the proxy in bulk HTTP
# by Host (bench/README.md, "Bulk: the sender"). A visitor that stops reading keeps a 64-128 KiB
# window, and so 64 KiB reads (docs/OPERATIONS.md, "Memory per visitor").
BULK_WINDOW = 256 * 1024
BULK_STREAM_CHUNK = 256 * 1024
# Bytes a TCP end may hold unsent in its kernel queue (beyond what is in flight): 64 KiB keeps
# a fast path busy between two of our writes (the kernel still autotunes what is in flight).
UNSENT_LOWAT = 64 * 1024
# How often, per idle_timeout, a splice's timer looks for silence: an idle connection ends
# between 1 and 1 + 1/IDLE_CHECKS idle_timeouts after its last byte. One timer for the splices
# instead of a timeout on every read: gevent arms a Timeout object for each read or write that has to
# wait on an end with a timeout, which cost the proxy ~12 % of its CPU per request
# (bench/README.md, "Per-request cost").
IDLE_CHECKS = 4
# Reads a socket -> stream copy loop makes itself before an io watcher's callback takes over
# (Feeding): the first carries bytes already waiting at once (splice()), and a connection that
# ends after one answer (a fresh connection per request) never pays for a watcher.
FEED_AFTER = 2
# b -> a runs in a kept greenlet (a Job: joined, killed, its value read as a greenlet's), not
# a new one per splice: a greenlet's start and end cost ~12 us and an mmap/munmap pair
# (lib/net/greenpool.py).
_DIRECTIONS = WorkerPool()


class _State:
    __slots__ = ("last", "idle_timeout", "dead", "pumps", "ended", "feeders", "watch")

    def __init__(self, idle_timeout: float | None) -> None:
        self.last = time.monotonic()
        self.idle_timeout = idle_timeout
        self.dead = False
        # The greenlets inside _pump's copy loop, the one owing a fallback answer first: told of
        # idleness first, it answers before the other direction aborts both ends.
        self.pumps: list = []
        self.ended = 0  # directions whose copy loop returned
        self.feeders: list = []  # _Feeder: their watchers stop before an end is closed
        self.watch: set | None = None  # the idle check's splices (_IdleTimers), when timed


class _Sink:
    """Direct delivery from a mux stream to a socket (lib.net.muxsession, "Direct delivery"):
    ``offer`` runs in the session's reader, ``send`` is the copy loop's own (waiting) send."""

    __slots__ = ("stream", "sock", "on_bytes", "state", "busy", "sent", "error", "_sendall",
                 "_send_now", "_sendmsg_now")

    def __init__(self, stream, sock, on_bytes, state: _State, senders=None) -> None:
        self.stream = stream
        self.sock = sock
        self.on_bytes = on_bytes
        self.state = state
        self.busy = False  # the copy loop is sending: offers wait behind it (byte order)
        self.sent = 0
        self.error: OSError | None = None
        # sendall, one send() never waiting, the same for a read's frames (or None); or the
        # end's own (``direct_senders``: an HTTP exchange frames what it sends)
        self._sendall, self._send_now, self._sendmsg_now = senders or (
            sender(sock), nowait_sender(sock), nowait_sendmsg(sock))

    def offer(self, data, send=None) -> int:
        """Send what the socket takes now, never waiting (lib.net.sockets.nowait_sender, or
        ``send``: offer_many's sendmsg); 0 on EAGAIN or an error. An error aborts both ends at
        once, as the copy loop would: the socket's reset is reported to one call only, and the
        other direction's read would otherwise take the dead socket for a clean EOF and send
        the stream a FIN. One call per keep-alive answer, no helper under it (bench/README.md,
        "Per-request cost (issue 16)", kapath pass)."""
        if self.error is not None:
            return 0
        try:
            n = self._send_now(data) if send is None else send(data)
        except BlockingIOError:
            return 0
        except OSError as e:
            self.error = e
            self.state.dead = True
            _abort(self.state, self.stream, self.sock, hard=True)
            return 0
        if n:
            self.sent += n
            self.state.last = time.monotonic()
            if self.on_bytes is not None:
                self.on_bytes(n)
        return n

    def offer_many(self, chunks) -> int:
        """``offer`` for a read's data in pieces (a frame's payload each), in one ``sendmsg``
        instead of a join (a copy of every byte: bench/README.md, "Bulk: the sender")."""
        if self._sendmsg_now is None:
            return self.offer(b"".join(chunks))
        if len(chunks) > IOV_MAX:
            chunks = list(islice(chunks, IOV_MAX))
        return self.offer(chunks, self._sendmsg_now)

    def stream_failed(self) -> None:
        """The stream failed (reset, its session's end) while ``send`` waits on the socket
        (lib.net.muxsession, "Direct delivery"): the socket is aborted, which ends that wait
        with an error and the copy loop as any error does. It waited for the socket to read
        again, for good if it never did (an origin not reading an upload: the splice, its
        descriptor and the client's streams_open held)."""
        self.state.dead = True
        _abort(self.state, self.sock, hard=True)

    def send(self, data) -> None:
        if self.error is not None:
            raise self.error
        self.busy = True
        try:
            self._sendall(data)
        finally:
            self.busy = False


def _sink_for(src, dst, on_bytes, state: _State) -> _Sink | None:
    # A stream with a timeout of its own measures silence by its reads: direct delivery would
    # starve them, so it keeps the copy loop.
    if not isinstance(src, Stream) or src.gettimeout() is not None:
        return None
    if isinstance(dst, gevent.socket.socket):
        return _Sink(src, dst, on_bytes, state)
    # An end with senders of its own (lib.net.httpexchange.OneExchangeSocket: its framer sees
    # every byte), or None when it has none for this socket.
    senders = getattr(dst, "direct_senders", None)
    senders = senders and senders()
    return _Sink(src, dst, on_bytes, state, senders) if senders else None


def socket_sink(sock):
    """The sink splice gives a stream bound for gevent socket ``sock`` (module doc), on its own:
    tied to no stream and no splice, for tests and tools that drive ``offer``/``offer_many``
    and read ``sent`` (the bytes the socket took)."""
    return _Sink(None, sock, None, _State(None))


class _Feeder:
    """Socket -> mux stream from an io watcher's callback in the hub (module doc, "Feeding"):
    ``recv`` is the copy loop's; it returns only what the callback could not queue."""

    __slots__ = ("sock", "stream", "on_bytes", "state", "chunk", "watcher", "waiter", "sent",
                 "reads", "_read_now", "first", "fin_now", "own_watcher", "owner")

    def __init__(self, sock, stream, on_bytes, state: _State, chunk: int,
                 wait_first: bool = False, watcher=None, read_now=None) -> None:
        self.sock = sock
        self.stream = stream
        self.on_bytes = on_bytes
        self.state = state
        self.chunk = min(chunk, SCRATCH_SIZE)  # read through the scratch buffer
        # Made once the connection has shown it lasts (FEED_AFTER), or given: the socket's own
        # (read_watcher, for _Answer), with its lib.net.sockets.nowait_reader.
        self.watcher = watcher
        self._read_now = read_now
        self.waiter: Waiter | None = None
        self.sent = 0
        # An answer not there yet (splice's b_answers): the watcher's callback takes the first
        # read too, after the wait, instead of a read finding nothing (an EAGAIN recv).
        self.reads = FEED_AFTER if wait_first else 0
        self.first = wait_first  # the next callback is the answer's first (_first_readable)
        self.fin_now = False  # EOF seen by _first_readable: the FIN is queued at once
        self.own_watcher = watcher is None  # False: the socket's own, closed with it
        self.owner: _Answer | None = None  # no copy loop: the callback's hand-offs go there

    def recv(self, n: int) -> bytes:
        if self.reads < FEED_AFTER:
            self.reads += 1
            return recv_copy(self.sock, n)
        if self.watcher is None:
            # A connection that may end after one answer (b_answers) borrows the socket's own.
            self.watcher = self.first and read_watcher(self.sock)
            if self.watcher:
                self.own_watcher = False
            else:
                self.watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)  # 1: readable
            self._read_now = nowait_reader(self.sock)
        self.waiter = waiter = Waiter()
        self.watcher.start(self._first_readable if self.first else self._readable)
        try:
            return waiter.get()  # the callback's hand-off: the rest, b"" at EOF, or an error
        finally:
            self.watcher.stop()
            self.waiter = None

    def _readable(self) -> None:
        try:
            data = self._read_now(self.chunk)
            if not data:
                self._hand(b"")
                return
            n = self.stream.send_nowait(data)
        except BlockingIOError:
            return  # readable was stale
        except OSError as e:  # the socket's, or the stream's (MuxError)
            self._hand(e)
            return
        if n:
            self.sent += n
            self.state.last = time.monotonic()
            if self.on_bytes is not None:
                self.on_bytes(n)
        if n < len(data):
            self._hand(data[n:])  # the window or the session's output is full: wait there

    def _first_readable(self) -> None:
        """The answer's first read (splice's b_answers), then one more at once: an origin that
        answers once and closes has its EOF behind the answer already, and the stream's FIN
        then joins the answer's DATA in this loop turn's flush, one record, before the copy
        loop wakes to end (bench/README.md, "Fresh connections: the answer's path")."""
        self.first = False
        self.watcher.callback = self._readable
        self._readable()
        if self.watcher.active:  # all of it queued, nothing handed to the copy loop
            self.fin_now = True
            try:
                self._readable()  # stale (EAGAIN): the watcher waits for the rest as usual
            finally:
                self.fin_now = False

    def _hand(self, what) -> None:
        self.watcher.stop()
        if self.owner is not None:
            self.owner.handed(what)
            return
        waiter = self.waiter
        if waiter is not None:
            if isinstance(what, BaseException):
                waiter.throw(what)
            elif what or not self.fin_now:
                waiter.switch(what)
            else:  # EOF right behind the first answer: the FIN now, the copy loop after
                try:
                    self.stream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the copy loop's own shutdown meets it again
                gevent.get_hub().loop.run_callback(self._eof, waiter)

    def throw(self, error: BaseException) -> None:
        """gevent's close of the socket while its own watcher (``own_watcher`` False) feeds us
        throws its error into the callback's owner, taken for a greenlet (the hub's
        ``_cancel_wait``): the feed ends as on a read's error. splice's own closes cancel first
        (``cancel``), a close by anyone else comes here."""
        self._hand(error() if isinstance(error, type) else error)  # a class, as for throw()

    def _eof(self, waiter: Waiter) -> None:
        if self.waiter is waiter:  # not cancelled meanwhile
            waiter.switch(b"")

    def cancel(self) -> None:
        """An end is about to be closed: stop watching, and end a copy loop waiting here."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.owner is not None:
            self.owner.over()
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            gevent.get_hub().loop.run_callback(
                waiter.throw, OSError(errno.EBADF, "splice ended while reading"))


class _Answer:
    """b -> a of ``splice(..., b_answers=True)`` without a greenlet (module doc, "b_answers"): a
    feeder watching the socket's own watcher from the start, whose callback ends this direction
    itself at EOF (the stream's FIN, queued in that loop turn) or on an error (both ends
    aborted), and starts a copy loop (``_answer_rest``, a kept greenlet) only for what the
    stream did not take at once. For splice, a Job's surface: ``join``, ``ready``, ``kill``,
    ``value`` (the bytes moved, once over)."""

    __slots__ = ("feeder", "job", "joiner", "value", "detached")

    def __init__(self, feeder: _Feeder) -> None:
        self.feeder = feeder
        self.job = None  # the copy loop, once started
        self.joiner: Waiter | None = None  # splice's greenlet, its own direction over first
        self.value: int | None = None
        self.detached: _Detached | None = None  # a detached splice's: told of this direction

    @classmethod
    def start(cls, sock, stream, on_bytes, state: _State, chunk: int) -> "_Answer | None":
        """Watching ``sock`` for the answer; None when a copy loop must do it (``sock`` has a
        timeout of its own or is no plain gevent socket, ``stream`` is no mux stream)."""
        watcher = read_watcher(sock)
        if not watcher or not isinstance(stream, Stream) or sock.gettimeout() is not None:
            return None
        feeder = _Feeder(sock, stream, on_bytes, state, chunk, True, watcher, nowait_reader(sock))
        state.feeders.append(feeder)
        answer = feeder.owner = cls(feeder)
        watcher.start(feeder._first_readable)
        return answer

    def handed(self, what) -> None:
        """The feeder's callback could not carry ``what`` itself (it stopped the watcher)."""
        feeder = self.feeder
        if isinstance(what, BaseException):  # as the copy loop's error: both ends aborted
            feeder.state.dead = True
            self.over()
            _abort(feeder.state, feeder.sock, feeder.stream, hard=True)
        elif not what:  # EOF: the FIN now, with the answer's DATA when it came this turn
            try:
                feeder.stream.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the stream failed: splice's own direction meets it
            self.over()
        else:  # the stream's window or the session's output is full: a copy loop waits
            if self.detached is not None:  # its sendall waits on the stream: no waker then
                self.detached.to_loop()
            self.job = _DIRECTIONS.start(_answer_rest, self, what)
            self._wake()

    def over(self) -> None:
        """This direction is done (EOF, an error, or splice's abort cancelled the feeder)."""
        if self.value is None and self.job is None:
            self.value = self.feeder.sent
            self.feeder.state.ended += 1
            if self.joiner is not None:  # splice's greenlet (a detached splice has none)
                self._wake()
            if self.detached is not None:
                self.detached.answered()

    def _wake(self) -> None:
        joiner = self.joiner
        if joiner is not None:
            self.joiner = None
            gevent.get_hub().loop.run_callback(joiner.switch, None)

    def join(self) -> None:
        while self.value is None and self.job is None:
            self.joiner = waiter = Waiter()
            try:
                waiter.get()
            finally:
                self.joiner = None
        if self.job is not None:
            self.job.join()
            self.value = self.job.value

    def ready(self) -> bool:
        job = self.job
        return self.value is not None if job is None else job.ready()

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        if self.job is not None:
            self.job.kill(block=block, timeout=timeout)
        else:
            self.over()


def _answer_rest(answer: _Answer, data: bytes) -> int:
    """An _Answer's copy loop: the bytes its stream did not take at once, sent waiting, then
    the socket -> stream direction as any other (``_pump``). Its bytes moved in all."""
    feeder = answer.feeder
    total = feeder.sent
    try:
        total = _send_rest(answer, data)
    finally:
        if answer.detached is not None:  # a detached splice: no join, this direction reports
            answer.value = total
            answer.detached.answered()
    return total


def _send_rest(answer: _Answer, data: bytes) -> int:
    feeder = answer.feeder
    state, stream = feeder.state, feeder.stream
    state.feeders.remove(feeder)  # its watcher (the socket's own) is stopped: _pump has its own
    try:
        stream.sendall(data)
    except OSError:
        state.dead = True
        state.ended += 1
        _abort(state, feeder.sock, stream, hard=True)
        return feeder.sent
    state.last = time.monotonic()
    if feeder.on_bytes is not None:
        feeder.on_bytes(len(data))
    return feeder.sent + len(data) + _pump(feeder.sock, stream, feeder.on_bytes, state,
                                           feeder.chunk)


class _Detached:
    """``splice_detached``'s splice (module doc, "Detached"): the stream's waker (``set``,
    from the session's reader) and the answer's ``_Answer``; ``on_done`` once both directions
    are over and both ends closed."""

    __slots__ = ("state", "stream", "sock", "answer", "on_a_to_b", "on_done", "chunk",
                 "n_ab", "request_over", "answer_over", "queued", "looping", "finished")

    def __init__(self, stream, sock, state: _State, answer: _Answer, on_a_to_b, on_done,
                 chunk: int) -> None:
        self.state = state
        self.stream = stream
        self.sock = sock
        self.answer = answer
        self.on_a_to_b = on_a_to_b
        self.on_done = on_done
        self.chunk = chunk
        self.n_ab = 0  # the stream -> socket direction's bytes (its copy loop's)
        self.request_over = False  # the stream -> socket direction
        self.answer_over = False  # socket -> stream
        self.queued = False  # _step is queued in the hub
        self.looping = False  # the stream -> socket direction is a copy loop's (to_loop)
        self.finished = False

    def set(self) -> None:
        """The stream's waker (Stream.set_waker), inline in the session's reader: a look that
        changes nothing; what must be done is done in a hub callback (``_step``)."""
        if self.queued or self.looping or self.request_over or not self.stream.readable:
            return  # a grant: nothing to do
        self.queued = True
        gevent.get_hub().loop.run_callback(self._step)

    def _step(self) -> None:
        self.queued = False
        if self.request_over or self.looping:
            return
        stream, state = self.stream, self.state
        if state.dead:  # aborted already (the answer's error)
            self._request_ended()
            return
        if stream.buffered:  # more of the visitor's bytes: a copy loop sends them, with a sink
            self.to_loop()
            return
        try:
            stream.recv_nowait()  # nothing buffered: b"" at EOF, or it raises
        except BlockingIOError:
            return
        except OSError:  # as the copy loop's error: both ends aborted
            state.dead = True
            self._unhook()
            _abort(state, stream, self.sock, hard=True)
            self._request_ended()
            return
        if not self.answer_over:  # EOF before the answer's: the origin is told
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        state.ended += 1
        self._request_ended()

    def _unhook(self) -> None:
        self.stream.set_waker(None)

    def _request_ended(self) -> None:
        self._unhook()
        self.request_over = True
        self._maybe_finish()

    def to_loop(self) -> None:
        """The stream -> socket direction goes on in a copy loop (a kept greenlet) waiting
        on the stream: for what the socket did not take at once, or because the answer's own
        copy loop waits on the stream to send (no waker may be set then)."""
        if self.looping or self.request_over:
            return
        self.looping = True
        self._unhook()
        _DIRECTIONS.start(self._copy_rest)

    def _copy_rest(self) -> None:
        """The stream -> socket direction's copy loop, in a kept greenlet, from what the
        socket did not take at once."""
        try:
            self.n_ab += _pump(self.stream, self.sock, self.on_a_to_b, self.state, self.chunk)
        finally:
            self.request_over = True
            self._maybe_finish()

    def answered(self) -> None:
        """From the _Answer: the socket -> stream direction is over."""
        self.answer_over = True
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.finished or not (self.request_over and self.answer_over):
            return
        self.finished = True
        # Both directions over: their watchers stopped, nothing waits on either end (_abort's
        # cancels are for a direction still running).
        for end in (self.stream, self.sock):
            try:
                end.close()
            except OSError:
                pass
        self.on_done(self.n_ab, self.answer.value or 0)


def splice_detached(a, b, on_done, *, on_a_to_b=None, on_b_to_a=None,
                    chunk: int = CHUNK) -> bool:
    """``splice(a, b, on_a_to_b=..., on_b_to_a=..., b_answers=True)`` with no greenlet
    (module doc, "Detached"): ``a`` a mux stream and ``b`` a gevent socket, neither with a
    timeout of its own; returns at once, and ``on_done(n_ab, n_ba)`` is called (in the hub, or
    the greenlet of a copy loop it started) once both directions are over and both ends
    closed. False, with nothing done, for ends it cannot serve so: the caller splices them."""
    if not isinstance(a, Stream) or a.gettimeout() is not None:
        return False
    state = _State(None)
    answer = _Answer.start(b, a, on_b_to_a, state, chunk)
    if answer is None:
        return False
    if not getattr(b, "tcp_tuned", False):  # the client's target has it (start_connect)
        _limit_unsent(b)
    detached = _Detached(a, b, state, answer, on_a_to_b, on_done, chunk)
    answer.detached = detached
    a.set_waker(detached)
    if a.readable:  # what came with the stream already: more bytes, its EOF, a reset
        detached.set()
    return True


def _feeder_for(src, dst, on_bytes, state: _State, chunk: int,
                wait_first: bool = False) -> _Feeder | None:
    # A socket with a timeout of its own measures silence by its reads: a watcher would
    # not, so it keeps the copy loop's reads.
    if (isinstance(dst, Stream) and isinstance(src, gevent.socket.socket)
            and src.gettimeout() is None):
        feeder = _Feeder(src, dst, on_bytes, state, chunk, wait_first)
        state.feeders.append(feeder)
        return feeder
    return None


def _pump(src, dst, on_bytes, state: _State, chunk: int, fallback: bytes | None = None,
          wait_first: bool = False) -> int:
    me = gevent.getcurrent()
    state.pumps.insert(0 if fallback is not None else len(state.pumps), me)
    try:
        return _copy(src, dst, on_bytes, state, chunk, fallback,
                     wait_first and fallback is None)
    finally:
        state.pumps.remove(me)
        state.ended += 1


def _copy(src, dst, on_bytes, state: _State, chunk: int, fallback: bytes | None,
          wait_first: bool = False) -> int:
    total = 0
    if getattr(src, "family", None) is None:  # a mux stream (sockets have a family)
        chunk = min(chunk, STREAM_CHUNK)
    bulk_later = chunk == STREAM_CHUNK and isinstance(src, Stream)
    recv, send = reader(src), sender(dst)
    sink = _sink_for(src, dst, on_bytes, state)
    if sink is not None:
        send = sink.send
        src.set_sink(sink)
    feeder = _feeder_for(src, dst, on_bytes, state, chunk, wait_first)
    if feeder is not None:
        recv = feeder.recv
    try:
        while True:
            try:
                data = recv(chunk)
            except TimeoutError:
                idle = state.idle_timeout
                if idle is not None and time.monotonic() - state.last < idle and not state.dead:
                    continue  # the other direction is busy: this one may stay quiet
                raise
            if not data:
                break
            send(data)
            n = len(data)
            if bulk_later and n > chunk // 2 and src.receive_window >= BULK_WINDOW:
                chunk, bulk_later = BULK_STREAM_CHUNK, False
            total += n
            state.last = time.monotonic()
            if on_bytes is not None:
                on_bytes(n)
    except OSError:
        # Either side failed (or both were idle too long): abort both directions, after the
        # fallback answer if one is due. Aborted, not closed: the other ends must see a reset,
        # not a clean end that would pass a truncated upload off as complete.
        state.dead = True
        total += _done(src, sink, feeder)
        if _send_fallback(dst, fallback, total):
            _abort(state, src, dst)
        else:
            _abort(state, src, dst, hard=True)
        return total
    total += _done(src, sink, feeder)
    if _send_fallback(dst, fallback, total):
        state.dead = True
        _abort(state, src, dst)
        return total
    if state.ended and getattr(dst, "family", None) is not None:
        return total  # the other direction is over: splice closes the socket now (a FIN too)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return total


def _done(src, sink: _Sink | None, feeder: _Feeder | None) -> int:
    """This direction's copy loop is over: the bytes its sink or feeder moved."""
    if feeder is not None:
        feeder.cancel()
        feeder.state.feeders.remove(feeder)
        if feeder.watcher is not None and feeder.own_watcher:
            feeder.watcher.close()
        return feeder.sent
    if sink is None:
        return 0
    src.set_sink(None)
    return sink.sent


def _send_fallback(dst, fallback: bytes | None, total: int) -> bool:
    if fallback is None or total:
        return False
    try:
        dst.sendall(fallback)
    except OSError:
        pass
    return True


def _limit_unsent(end) -> None:
    if getattr(end, "tcp_tuned", False):
        return  # inherited from its listener (lib.net.sockets.AcceptedSocket)
    if getattr(end, "family", None) in (socket.AF_INET, socket.AF_INET6):  # not a mux stream
        try:
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_LOWAT)
        except OSError:
            pass  # an older kernel: the socket buffer's own bound applies


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def _abort(state: _State, *ends, hard: bool = False) -> None:
    for feeder in state.feeders:  # before the sockets they watch are closed
        feeder.cancel()
    for end in ends:
        try:
            if hard:
                if hasattr(end, "reset"):  # a mux stream: RST CANCEL
                    end.reset()
                    continue
                end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (OSError, AttributeError):
            pass
        try:
            end.close()
        except OSError:
            pass


class _IdleTimers:
    """The splices' idle checks: one repeating timer per hub loop and ``idle_timeout`` value,
    shared by every splice using that value, instead of a timer made, started, stopped and
    closed per splice (bench/README.md, "Fresh connections: the first frame before the
    splice"). ``add`` a splice's state as it starts, ``discard`` it as it ends. A tick that
    finds no splice stops the timer; the next ``add`` starts it again. The table holds one
    timer per value callers pass (the proxy's --idle-timeout: one) per hub; the states, one per
    live splice, are bounded by the connections the caller accepts."""

    def __init__(self) -> None:
        self._watches: dict = {}  # (loop, idle_timeout) -> (timer, set of _State)

    def add(self, state: _State) -> None:
        loop = gevent.get_hub().loop
        watch = self._watches.get((loop, state.idle_timeout))
        if watch is None:
            every = state.idle_timeout / IDLE_CHECKS
            # ref=False: a loop with nothing else to do does not stay up for it.
            watch = (loop.timer(every, every, ref=False), set())
            self._watches[(loop, state.idle_timeout)] = watch
        timer, states = watch
        states.add(state)
        state.watch = states
        if not timer.active:
            timer.start(_check_idle, states, timer)

    @staticmethod
    def discard(state: _State) -> None:
        state.watch.discard(state)


def _check_idle(states: set, timer) -> None:
    """The idle timer's callback (in the hub), for each splice watched: both directions silent
    for idle_timeout -> TimeoutError raised in each copy loop still running, as an end's own
    timeout would (the splice is watched no more)."""
    now = time.monotonic()
    for state in list(states):
        if state.dead:  # ending already
            states.discard(state)
        elif now - state.last >= state.idle_timeout:
            states.discard(state)
            for g in list(state.pumps):
                if g in state.pumps:  # not ended by the one before
                    g.throw(TimeoutError(f"idle for {state.idle_timeout:g} s"))
    if not states:
        timer.stop()


# One per process (the hub's loop: gevent runs one hub per thread, and splices run in the hub
# thread's greenlets).
_IDLE = _IdleTimers()


def splice(a, b, *, on_a_to_b=None, on_b_to_a=None, idle_timeout: float | None = None,
           chunk: int = CHUNK, fallback_to_a: bytes | None = None,
           b_answers: bool = False) -> tuple[int, int]:
    state = _State(idle_timeout)
    for end in (a, b):
        _limit_unsent(end)
        if idle_timeout is not None:
            try:
                end.settimeout(None)  # the idle timer bounds waiting (IDLE_CHECKS)
            except OSError:
                pass
    if idle_timeout is not None:
        _IDLE.add(state)
    # a -> b in this greenlet, at once: bytes already waiting in a (the proxy's replayed
    # request head, the client's first bytes from the visitor) join what the caller just
    # wrote to b (a new stream's SYN and StartProxy) in one TLS record and one send().
    g = None
    if b_answers and fallback_to_a is None and idle_timeout is None:
        g = _Answer.start(b, a, on_b_to_a, state, chunk)  # no greenlet: module doc, b_answers
    if g is None:
        g = _DIRECTIONS.start(_pump, b, a, on_b_to_a, state, chunk, fallback_to_a, b_answers)
    try:
        n_ab = _pump(a, b, on_a_to_b, state, chunk)
        g.join()
    finally:
        if idle_timeout is not None:
            _IDLE.discard(state)
        if not g.ready():
            _abort(state, a, b)
            g.kill(block=True, timeout=1)
        _abort(state, a, b)
    return (n_ab, g.value or 0)
