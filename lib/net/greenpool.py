"""Greenlets kept between jobs: one per connection, without a new greenlet per connection.

Public API::

    pool = WorkerPool(size=None, keep=KEEP_IDLE)
    pool.spawn(func, *args)       # run func(*args) in an idle worker greenlet, or a new one;
                                  # blocks while ``size`` jobs run (as gevent.pool.Pool.spawn);
                                  # returns None: a worker is no handle on one job
    pool.full() -> bool           # size jobs running: gevent's StreamServer stops accepting
    len(pool)                     # jobs running;  pool.idle: workers parked for the next job
    pool.join(timeout=None) -> bool   # until no job runs
    pool.kill(block=True, timeout=None)  # every worker, running or idle (server stop)
    pool.close_idle()             # end the parked workers only (running jobs go on)
    pool.started, pool.reused     # counters: workers created, jobs run by a kept worker

A public connection's handler (lib/proxy/server.py) and a tunnel stream's (lib/client/tunnels.py)
each ran in a new greenlet: gevent's Greenlet object, its links, and under Python 3.11 the
greenlet's first Python frame allocates a 16 KiB data stack chunk by mmap, unmapped when it
ends: an mmap/munmap pair and ~12 us per connection in each process, against ~2 us to hand a
job to a parked greenlet (bench/README.md, "Fresh connections: fewer steps per connection").
A worker runs jobs one after another and parks in the hub between them; at most ``keep`` wait,
the others end. A worker killed inside a job (GreenletExit) ends with it: whoever killed it
waits for its end, as for any greenlet.

It is gevent's Pool for what gevent's StreamServer asks of one (``spawn``, ``full``, ``join``,
``kill``, and ``_semaphore``, which StreamServer links to resume accepting when a slot frees).
A job's exception is reported as gevent reports a greenlet's (the hub's ``handle_error``) and
the worker goes on. Jobs must leave nothing armed behind them (a started gevent.Timeout they
never cancel would fire in the next job): ``with Timeout(...)`` and socket timeouts do not.
"""
from __future__ import annotations

import sys

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.hub import get_hub
from gevent.lock import Semaphore

# Workers parked for the next job, at most: as many as the jobs of a busy moment (wrk's 64
# connections); each costs its greenlet, its saved stack and its 16 KiB data stack chunk,
# ~30 KiB: 2 MiB at most. A burst beyond it starts new workers, which end after their job.
KEEP_IDLE = 64


class WorkerPool:
    """Runs jobs in kept greenlets (module doc); ``size`` bounds the jobs running at once."""

    def __init__(self, size: int | None = None, keep: int = KEEP_IDLE):
        self.size = size
        self.keep = keep
        # gevent's StreamServer links this (a pool it is given must have a size).
        self._semaphore = Semaphore(size) if size is not None else None
        self._running: set[Greenlet] = set()  # workers inside a job
        self._idle: list[Greenlet] = []       # parked, most recent last (warmest stack)
        self._empty = Event()
        self._empty.set()
        self._closing = False
        self.started = 0
        self.reused = 0

    def __len__(self) -> int:
        return len(self._running)

    def __bool__(self) -> bool:
        return True  # a pool is there even when idle (StreamServer.stop tests `if pool`)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def full(self) -> bool:
        return self._semaphore is not None and self._semaphore.locked()

    def free_count(self) -> int:
        return self._semaphore.counter if self._semaphore is not None else sys.maxsize

    def spawn(self, func, *args) -> None:
        """Run ``func(*args)`` in a worker (blocking while the pool is full)."""
        if self._semaphore is not None:
            self._semaphore.acquire()
        self._closing = False
        self._empty.clear()
        job = (func, args)
        if self._idle:
            worker = self._idle.pop()
            self._running.add(worker)
            self.reused += 1
            get_hub().loop.run_callback(self._hand, worker, job)
        else:
            worker = Greenlet(self._work, job)
            self._running.add(worker)
            self.started += 1
            worker.start()

    @staticmethod
    def _hand(worker: Greenlet, job) -> None:
        if not worker.dead:  # not killed since it was chosen
            worker.switch(job)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job runs; False if ``timeout`` passed first."""
        return self._empty.wait(timeout)

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        """Kill every worker, in a job or parked; none is kept afterwards."""
        self._closing = True
        workers = list(self._running) + self._idle
        self._idle = []
        gevent.killall(workers, block=block, timeout=timeout)

    def close_idle(self) -> None:
        """End the parked workers (a client stopping: its streams end on their own)."""
        idle, self._idle = self._idle, []
        gevent.killall(idle, block=False)

    # --- the workers --------------------------------------------------------------------

    def _work(self, job) -> None:
        me = gevent.getcurrent()
        hub = get_hub()
        while True:
            try:
                job[0](*job[1])
            except gevent.GreenletExit:
                self._finished(me)
                raise  # killed: this worker ends with its job
            except BaseException:  # noqa: BLE001 - a job's error, reported as gevent would
                hub.handle_error(me, *sys.exc_info())
            self._finished(me)
            job = None
            if self._closing or len(self._idle) >= self.keep:
                return
            self._idle.append(me)
            try:
                while job is None:  # parked: spawn() switches back with a job
                    got = hub.switch()
                    if type(got) is tuple:
                        job = got
            finally:
                if job is None:  # killed while parked
                    if me in self._running:  # ... just after spawn() chose it: no job ran
                        self._finished(me)
                    elif me in self._idle:
                        self._idle.remove(me)

    def _finished(self, worker: Greenlet) -> None:
        self._running.discard(worker)
        if self._semaphore is not None:
            self._semaphore.release()
        if not self._running:
            self._empty.set()
