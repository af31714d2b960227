"""lib.net.greenpool.WorkerPool: jobs in kept greenlets (no new greenlet per connection)."""
import socket

import gevent
import gevent.event
import gevent.socket as gsocket
import pytest

from lib.net.greenpool import WorkerPool


def test_jobs_one_after_another_run_in_one_kept_greenlet():
    # Red when every job gets a greenlet of its own again (the cost this pool removes).
    pool = WorkerPool(size=4)
    ran_in = []
    for i in range(50):
        done = gevent.event.Event()
        pool.spawn(lambda i=i, done=done: (ran_in.append(gevent.getcurrent()), done.set()))
        done.wait(5)
    assert len(ran_in) == 50 and len(set(map(id, ran_in))) == 1
    assert (pool.started, pool.reused, pool.idle, len(pool)) == (1, 49, 1, 0)


def test_size_bounds_the_jobs_running_and_spawn_waits_for_a_slot():
    pool = WorkerPool(size=2)
    gate = gevent.event.Event()
    pool.spawn(gate.wait)
    assert not pool.full()
    pool.spawn(gate.wait)
    assert pool.full() and len(pool) == 2 and pool.free_count() == 0
    third = gevent.spawn(pool.spawn, lambda: None)
    gevent.sleep(0.05)
    assert not third.ready()  # waits, as gevent's Pool.spawn does
    gate.set()
    third.join(5)
    assert third.ready() and pool.join(5) and not pool.full()


def test_parked_workers_are_bounded_by_keep():
    # A burst past the bound starts workers that end after their job: at most `keep` wait.
    pool = WorkerPool(keep=8)
    gate = gevent.event.Event()
    for _ in range(100):
        pool.spawn(gate.wait)
    gevent.sleep(0)
    assert len(pool) == 100 and pool.started == 100
    gate.set()
    assert pool.join(5)
    gevent.sleep(0)
    assert pool.idle == 8


def test_a_failing_job_is_reported_and_the_worker_goes_on(monkeypatch):
    pool = WorkerPool()
    reported = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", lambda ctx, t, v, tb: reported.append(v))
    pool.spawn(lambda: 1 / 0)
    assert pool.join(5)
    done = gevent.event.Event()
    pool.spawn(done.set)
    assert done.wait(5)
    assert [type(e) for e in reported] == [ZeroDivisionError]
    assert (pool.started, pool.reused) == (1, 1)


def test_kill_ends_running_and_parked_workers():
    pool = WorkerPool(size=8)
    cleaned = []

    def job(gate):
        try:
            gate.wait()
        finally:
            cleaned.append(True)

    for _ in range(4):
        pool.spawn(lambda: None)
    gevent.sleep(0.01)  # four parked
    for _ in range(3):
        pool.spawn(job, gevent.event.Event())
    gevent.sleep(0.01)
    assert len(pool) == 3 and pool.idle == 1
    pool.kill(block=True, timeout=5)
    assert cleaned == [True] * 3 and len(pool) == 0 and pool.idle == 0
    assert pool.join(0) and pool.free_count() == 8


def test_close_idle_leaves_running_jobs_alone():
    pool = WorkerPool()
    gate = gevent.event.Event()
    pool.spawn(lambda: None)
    gevent.sleep(0.01)
    pool.spawn(gate.wait)  # the parked worker takes it
    pool.spawn(lambda: None)  # a second worker, parked after it
    gevent.sleep(0.01)
    assert pool.idle == 1 and len(pool) == 1
    pool.close_idle()
    gevent.sleep(0.01)
    assert pool.idle == 0 and len(pool) == 1
    gate.set()
    assert pool.join(5)


def test_close_idle_leaves_a_job_handed_but_not_yet_run_alone():
    # A client's stop (lib.client.tunnels.Client.stop) ends only the parked workers: a stream's
    # handler handed to one just before still runs, and closes what it holds (the target's
    # socket of its _Opening, which kill()'s abandon would not see) and counts its stream over.
    pool = WorkerPool()
    pool.spawn(lambda: None)
    gevent.sleep(0.01)
    assert pool.idle == 1
    ran = []
    pool.spawn(ran.append, "ran")  # the parked worker's hand-off: at the next loop turn
    pool.close_idle()
    assert pool.join(5) and ran == ["ran"] and pool.abandoned == 0


def test_a_public_server_serves_connections_through_kept_workers():
    from lib.proxy.server import PublicServer

    pool = WorkerPool(size=16)

    def echo(sock, address):
        sock.sendall(sock.recv(100))

    server = PublicServer(("127.0.0.1", 0), echo, spawn=pool)
    server.start()
    try:
        for i in range(20):
            c = gsocket.create_connection(("127.0.0.1", server.address[1]), timeout=5)
            c.sendall(b"x%d" % i)
            assert c.recv(100) == b"x%d" % i
            c.close()
        assert pool.join(5)
        assert pool.started <= 2 and pool.reused >= 18
    finally:
        server.stop(timeout=1)
    assert pool.idle == 0  # stop() kills the pool's workers, parked ones too
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.address[1]), timeout=1)


def test_a_started_job_is_joined_for_its_value_and_runs_in_a_kept_worker():
    pool = WorkerPool()
    first = pool.start(lambda: gevent.getcurrent())
    assert first.join(5) and first.ready()
    second = pool.start(lambda x: (x, gevent.getcurrent()), 7)
    assert second.join(5)
    assert second.value == (7, first.value)  # the same greenlet, kept between jobs
    failing = pool.start(lambda: 1 / 0)
    assert failing.join(5) and failing.value is None


def test_killing_a_job_ends_it_and_only_it():
    pool = WorkerPool()
    cleaned = []

    def blocked():
        try:
            gevent.sleep(60)
        finally:
            cleaned.append("finally ran")

    job = pool.start(blocked)
    gevent.sleep(0.01)
    job.kill(block=True, timeout=5)
    assert job.ready() and cleaned == ["finally ran"] and job.value is None
    job.kill()  # done: nothing happens
    late = pool.start(lambda: "still serving")
    assert late.join(5) and late.value == "still serving"


def test_the_memory_trimmers_pass_ends_every_pools_parked_workers():
    # Parked workers pay off under load only: after a peak the trimmer's quiet pass lets them go
    # (lib/memtrim.py before_pass), so they do not hold the proxy's RSS above issue 7's bound.
    from lib import memtrim

    pools = [WorkerPool(), WorkerPool(size=8)]
    for pool in pools:
        for _ in range(5):
            pool.spawn(gevent.sleep, 0.01)
        assert pool.join(5)
        gevent.sleep(0)
        assert pool.idle == 5
    memtrim.trim_once()
    gevent.sleep(0)
    assert [pool.idle for pool in pools] == [0, 0]
    pools[0].spawn(gevent.sleep, 0)  # a pool goes on working after the pass: a new worker
    assert pools[0].join(5) and pools[0].started == 6


def test_a_parked_worker_keeps_nothing_of_its_jobs():
    # A job's arguments (in splice: the stream, its session and transport, the socket) must be
    # free once the job ends, though its worker stays parked: not the first job (gevent keeps a
    # greenlet's start arguments), not the latest (the value the park's switch returned).
    import gc
    import weakref

    class Payload:
        pass

    pool = WorkerPool()
    refs = []
    for _ in range(3):
        payload = Payload()
        refs.append(weakref.ref(payload))
        pool.spawn(lambda p: gevent.sleep(0), payload)
        del payload
        assert pool.join(5)
        gevent.sleep(0)
    assert pool.idle == 1 and pool.started == 1
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


@pytest.mark.parametrize("parked", [True, False], ids=["parked-worker", "new-worker"])
def test_a_job_killed_before_it_ran_has_its_sockets_closed(parked):
    # At stop, kill() can meet a job handed to a worker that has not run it yet (a parked
    # worker's hand-off or a new worker's start waits for the next loop turn): the job never
    # runs, so the socket it would have closed is closed by the pool, not left to the collector.
    pool = WorkerPool(size=4)
    if parked:
        pool.spawn(lambda: None)
        assert pool.join(5)
        gevent.sleep(0)
        assert pool.idle == 1
    ran = []
    ours, theirs = gsocket.socketpair()
    pool.spawn(lambda sock, address: ran.append(sock), ours, ("127.0.0.1", 1))
    job = pool.start(ran.append, "never")
    pool.kill(block=True, timeout=5)
    assert ran == [] and ours.fileno() == -1 and job.ready()
    assert theirs.recv(10) == b""  # the peer sees the close at once
    assert pool.abandoned == 2 and len(pool) == 0 and pool.join(0) and pool.free_count() == 4
    theirs.close()


def test_a_job_killed_before_it_ran_without_blocking_is_abandoned_all_the_same():
    pool = WorkerPool(size=2)
    pool.spawn(lambda: None)
    assert pool.join(5)
    gevent.sleep(0)
    ours, theirs = gsocket.socketpair()
    pool.spawn(lambda sock: None, ours)  # the parked worker is handed it
    pool.spawn(lambda sock: None, theirs)  # a new worker for it
    pool.kill(block=False)
    assert pool.join(5) and ours.fileno() == -1 and theirs.fileno() == -1
    assert pool.abandoned == 2 and pool.free_count() == 2
