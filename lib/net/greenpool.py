"""Greenlets kept between jobs, so that a connection does not start greenlets of its own.

Public API::

    pool = WorkerPool(size=None, keep=KEEP_IDLE)
    pool.spawn(func, *args)       # run func(*args) in an idle worker greenlet, or a new one;
                                  # blocks while ``size`` jobs run (as gevent.pool.Pool.spawn);
                                  # returns None: a worker is no handle on one job
    pool.spawn_now(func, *args)   # the same from a hub callback (an accept loop): a parked
                                  # worker is switched in at once and runs the job until it
                                  # first waits, instead of at the next loop turn
    job = pool.start(func, *args) # the same, with a handle on this job (what lib.net.splice
                                  # asks of its second direction's greenlet):
    job.join(timeout=None) -> bool;  job.ready();  job.value (None if it raised)
    job.kill(block=True, timeout=None)   # GreenletExit in its worker, if still running it
    pool.full() -> bool           # size jobs running: gevent's StreamServer stops accepting
    len(pool)                     # jobs running;  pool.idle: workers parked for the next job
    pool.join(timeout=None) -> bool   # until no job runs
    pool.kill(block=True, timeout=None)  # every worker, running or idle (server stop); a job
                                  # handed out but not yet running never runs: abandoned
    pool.close_idle()             # end the parked workers only (running jobs go on)
    close_all_idle()              # every pool's: the memory trimmer's quiet pass (lib.memtrim)
    pool.started, pool.reused     # counters: workers created, jobs run by a kept worker
    pool.abandoned                # counter: jobs killed before they ran (their sockets closed)

A public connection's handler (lib/proxy/server.py), a tunnel stream's (lib/client/tunnels.py)
and a splice's second direction (lib/net/splice.py) each ran in a new greenlet: gevent's
Greenlet object, its links, and under Python 3.11 the
greenlet's first Python frame allocates a 16 KiB data stack chunk by mmap, unmapped when it
ends: an mmap/munmap pair and ~12 us per connection in each process, against ~2 us to hand a
job to a parked greenlet (bench/README.md, "Fresh connections: fewer steps per connection").
A worker runs jobs one after another and parks in the hub between them; at most ``keep`` wait,
the others end. A worker killed inside a job (GreenletExit) ends with it: whoever killed it
waits for its end, as for any greenlet. A job handed to a worker runs at the next loop turn (a
parked worker's hand-off callback, a new worker's start); killed before then (only ``kill()``,
at a server's stop, does that) it never runs, as gevent never runs a greenlet killed before it
started, and is *abandoned*: every socket among its arguments is closed (the handler that would
have closed it never will; a public connection's visitor sees its close at once instead of at
the next garbage collection), and its Job, if any, is done with value None.

It is gevent's Pool for what gevent's StreamServer asks of one (``spawn``, ``full``, ``join``,
``kill``, and ``_semaphore``, which StreamServer links to resume accepting when a slot frees).
A job's exception is reported as gevent reports a greenlet's (the hub's ``handle_error``) and
the worker goes on. Jobs must leave nothing armed behind them (a started gevent.Timeout they
never cancel would fire in the next job): ``with Timeout(...)`` and socket timeouts do not.
"""
from __future__ import annotations

import socket
import sys
import weakref

import gevent
import gevent.socket
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.hub import get_hub, getcurrent
from gevent.lock import Semaphore

from lib import memtrim

# Workers parked for the next job, at most: as many as the jobs of a busy moment (wrk's 64
# connections); each costs its greenlet, its saved stack and its 16 KiB data stack chunk,
# ~30 KiB: 2 MiB at most. A burst beyond it starts new workers, which end after their job.
KEEP_IDLE = 64
# Every pool, so the memory trimmer's quiet pass can end their parked workers (close_all_idle):
# they pay off under load only, and after a 1,000-connection peak three pools' 64 parked
# workers each held ~3 % of the proxy's RSS for good (issue 7's bound is 10 %).
_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def close_all_idle() -> None:
    """End the parked workers of every pool (the memory trimmer's quiet pass calls it)."""
    for pool in list(_POOLS):
        pool.close_idle()


memtrim.before_pass(close_all_idle)


class WorkerPool:
    """Runs jobs in kept greenlets (module doc); ``size`` bounds the jobs running at once."""

    def __init__(self, size: int | None = None, keep: int = KEEP_IDLE):
        self.size = size
        self.keep = keep
        # gevent's StreamServer links this (a pool it is given must have a size).
        self._semaphore = Semaphore(size) if size is not None else None
        # full(): the semaphore's own (compiled) locked(), no Python frame: the accept loop and
        # routing ask it once per public connection each.
        self.full = self._semaphore.locked if size is not None else _never
        self._running: set[Greenlet] = set()  # workers inside a job
        self._idle: list[Greenlet] = []       # parked, most recent last (warmest stack)
        self._handing: dict[Greenlet, tuple] = {}  # chosen, its job not yet switched in
        self._empty = Event()
        self._empty.set()
        self._closing = False
        self.started = 0
        self.reused = 0
        self.abandoned = 0
        _POOLS.add(self)

    def __len__(self) -> int:
        return len(self._running)

    def __bool__(self) -> bool:
        return True  # a pool is there even when idle (StreamServer.stop tests `if pool`)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def free_count(self) -> int:
        return self._semaphore.counter if self._semaphore is not None else sys.maxsize

    def spawn(self, func, *args) -> None:
        """Run ``func(*args)`` in a worker (blocking while the pool is full)."""
        self._run((func, args, None))

    def spawn_now(self, func, *args) -> None:
        """:meth:`spawn` for a caller running in the hub (a watcher's callback): a parked
        worker runs the job now, up to its first wait, then the caller goes on; no parked
        worker (or a caller that is not the hub): as :meth:`spawn`. Saves the hand-off's loop
        turn and callback (bench/README.md, "Fresh connections: the proxy's accept"). A caller
        in the hub asks :meth:`full` first: a full pool's wait for a slot cannot be made there
        (gevent refuses to block the hub)."""
        self._run((func, args, None), now=True)

    def start(self, func, *args) -> "Job":
        """Run ``func(*args)`` in a worker, as :meth:`spawn`; a :class:`Job` to join or kill."""
        job = Job()
        self._run((func, args, job))
        return job

    def _run(self, job: tuple, now: bool = False) -> None:
        if self._semaphore is not None:
            self._semaphore.acquire()
        self._closing = False
        self._empty.clear()
        if self._idle:
            worker = self._idle.pop()
            self._running.add(worker)
            self.reused += 1
            hub = get_hub()
            if now and getcurrent() is hub:
                worker.switch(job)  # parked in hub.switch(): it takes the job and runs it
                return
            # The worker's own switch at the next turn (no frame of ours); kill() stops it.
            self._handing[worker] = (job, hub.loop.run_callback(worker.switch, job))
        else:
            # The job goes by _handing, not as the greenlet's argument: gevent keeps a
            # greenlet's start arguments until it ends, and a kept worker lives on.
            worker = Greenlet(self._work)
            self._running.add(worker)
            self.started += 1
            self._handing[worker] = (job, None)
            worker.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job runs; False if ``timeout`` passed first."""
        return self._empty.wait(timeout)

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        """Kill every worker, in a job or parked; none is kept afterwards. A job handed out but
        not yet running is abandoned (module doc)."""
        self._closing = True
        workers = list(self._running) + self._idle
        self._idle = []
        # First, so that no hand-off callback of this turn runs a job after its server stopped.
        handed = list(self._handing)
        for worker in handed:
            self._abandon(worker)
        gevent.killall(workers, block=block, timeout=timeout)
        for worker in handed:
            # Killed before its start (gevent cancels that at once): no _work of its own will
            # say it finished. A parked one says so itself, from its park's finally.
            if worker.dead and worker in self._running:
                self._finished(worker, None, None)

    def close_idle(self) -> None:
        """End the parked workers (a client stopping: its streams end on their own)."""
        idle, self._idle = self._idle, []
        gevent.killall(idle, block=False)

    # --- the workers --------------------------------------------------------------------

    def _abandon(self, worker: Greenlet) -> None:
        """``worker``'s job, handed to it and not yet run, will not run: close its sockets and
        finish its Job (the caller ends the worker)."""
        (func, args, handle), handoff = self._handing.pop(worker)
        if handoff is not None:
            handoff.stop()  # the switch into it at the next turn, if not run yet
        self.abandoned += 1
        for arg in args:
            if isinstance(arg, (socket.socket, gevent.socket.socket)):
                arg.close()
        if handle is not None:
            handle.done.set()

    def _work(self) -> None:
        me = gevent.getcurrent()
        handing = self._handing
        job = self._handing.pop(me)[0]
        hub = get_hub()
        while True:
            func, args, handle = job
            if handle is not None:
                handle.worker = me
            try:
                value = func(*args)
            except gevent.GreenletExit:
                self._finished(me, handle, None)
                raise  # killed: this worker ends with its job
            except BaseException:  # noqa: BLE001 - a job's error, reported as gevent would
                hub.handle_error(me, *sys.exc_info())
                value = None
            self._finished(me, handle, value)
            job = func = args = handle = value = None  # nothing of the job kept while parked
            if self._closing or len(self._idle) >= self.keep:
                return
            self._idle.append(me)
            try:
                while job is None:  # parked: spawn() switches back with a job
                    got = hub.switch()
                    if type(got) is tuple:
                        job = got
                        handing.pop(me, None)  # handed at a loop turn (not switched in at once)
                    got = None  # the next park must not keep this job
            finally:
                if job is None:  # killed while parked
                    if me in self._running:  # ... just after spawn() chose it: no job ran
                        if me in self._handing:
                            self._abandon(me)
                        self._finished(me, None, None)
                    elif me in self._idle:
                        self._idle.remove(me)

    def _finished(self, worker: Greenlet, handle: "Job | None", value) -> None:
        if handle is not None:
            handle.value = value
            handle.worker = None
            handle.done.set()
        self._running.discard(worker)
        if self._semaphore is not None:
            self._semaphore.release()
        if not self._running:
            self._empty.set()


def _never() -> bool:
    return False


class Job:
    """One job started by :meth:`WorkerPool.start`: join it, kill it, read its value."""

    __slots__ = ("worker", "value", "done")

    def __init__(self) -> None:
        self.worker: Greenlet | None = None  # the worker running it, once it runs
        self.value = None
        self.done = Event()

    def ready(self) -> bool:
        return self.done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        """GreenletExit in the job (from the hub, as gevent's kill), then wait for its end; its
        worker ends with it. A job handed to a worker but not yet running gets it once it runs
        (unlike gevent's kill of a greenlet not started, which never runs it)."""
        if self.ready():
            return
        get_hub().loop.run_callback(self._throw)
        if block:
            self.done.wait(timeout)

    def _throw(self) -> None:
        if self.ready():
            return
        if self.worker is None:  # handed to a worker that has not run it yet: next turn
            get_hub().loop.run_callback(self._throw)
            return
        self.worker.throw(gevent.GreenletExit)
