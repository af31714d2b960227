"""lib/proxy/workers.py in one process: the message framing, and hand-overs between two
WorkerGroups over real Unix sockets (descriptors passed with SCM_RIGHTS), including a dead
sibling, the in-flight bound and a connection from another user."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import gevent
import gevent.event
import gevent.socket
import pytest

from lib.proxy import workers as w
from lib.proxy.registry import Registry


def test_message_whole_and_byte_by_byte_agree():
    data = w.encode_message({"op": "handoff", "name": "a.test"}, b"\x16\x03\x01hello")
    whole = w.MessageReader()
    whole.feed(data)
    trickle = w.MessageReader()
    for i in range(len(data)):
        assert not trickle.done
        trickle.feed(data[i:i + 1])
    assert whole.done and trickle.done
    assert whole.header == trickle.header == {"op": "handoff", "name": "a.test"}
    assert whole.payload == trickle.payload == b"\x16\x03\x01hello"


@pytest.mark.parametrize("head,payload", [(w.MAX_HEADER + 1, 0), (2, w.MAX_PAYLOAD + 1)])
def test_message_over_its_bound_is_refused_before_it_is_read(head, payload):
    with pytest.raises(w.MessageError):
        w.MessageReader().feed(w._LEN.pack(head, payload))


def test_header_must_be_a_json_object():
    with pytest.raises(w.MessageError):
        w.MessageReader().feed(w._LEN.pack(2, 0) + b"[]")


def green_wait(predicate, what: str, timeout: float = 10.0):
    """tests.support.wait.wait_for, sleeping with gevent (the groups' greenlets must run)."""
    with gevent.Timeout(timeout, AssertionError(f"not within {timeout:g} s: {what}")):
        while not predicate():
            gevent.sleep(0.05)


class Sibling:
    """A WorkerGroup whose take() serves a handed socket by echoing what it reads, prefixed by
    the peeked bytes (as a tunnel would get them first)."""

    def __init__(self, run_dir, pid, gate=None, max_in_flight=2):
        self.registry = Registry()
        self.taken = []
        self.gate = gate
        self.group = w.WorkerGroup(run_dir, self.registry, take=self.take,
                                   answer=lambda req: {"pid": pid, "asked": req.get("op")},
                                   pid=pid, max_in_flight=max_in_flight)

    def take(self, header, peeked):
        if header.get("name") != "held.test":
            return w.Refused("unknown_name")
        if self.gate is not None:
            self.gate.wait()

        def run(sock):
            self.taken.append(header)
            sock.sendall(b"served:" + peeked + sock.recv(100))
            sock.close()
        return run


@pytest.fixture
def pair(tmp_path):
    run_dir = str(tmp_path)
    # two real, live pids (siblings whose process is gone are forgotten)
    a, b = Sibling(run_dir, os.getpid()), Sibling(run_dir, os.getppid())
    a.group.start()
    b.group.start()
    yield a, b
    a.group.stop()
    b.group.stop()


def test_hand_off_passes_the_socket_and_the_peeked_bytes(pair):
    a, b = pair
    visitor, accepted = gevent.socket.socketpair()
    result = a.group.hand_off(b.group.pid, accepted, {"name": "held.test"}, b"PEEKED")
    assert result == w.TAKEN
    accepted.close()  # the sender's copy: the sibling owns the connection now
    visitor.sendall(b"+more")
    visitor.settimeout(5)
    assert visitor.recv(100) == b"served:PEEKED+more"
    assert a.group.counters[w.TAKEN] == 1 and b.group.counters["handoff_taken_here"] == 1


def test_hand_overs_share_one_channel_and_each_visitor_gets_its_own_socket(tmp_path):
    """Hand-overs to a sibling travel on one persistent channel, answered in order: at once
    and mixed with refusals, each visitor still reaches the sibling with its own bytes."""
    a = Sibling(str(tmp_path), os.getpid(), max_in_flight=64)
    b = Sibling(str(tmp_path), os.getppid())
    a.group.start()
    b.group.start()
    try:
        pairs = [gevent.socket.socketpair() for _ in range(30)]
        names = ["held.test" if i % 3 else "other.test" for i in range(30)]
        jobs = [gevent.spawn(a.group.hand_off, b.group.pid, accepted, {"name": name},
                             b"V%02d" % i)
                for i, ((_, accepted), name) in enumerate(zip(pairs, names))]
        gevent.joinall(jobs, timeout=10)
        assert [j.value for j in jobs] == [w.TAKEN if n == "held.test" else w.REFUSED
                                           for n in names]
        for i, (visitor, accepted) in enumerate(pairs):
            accepted.close()  # the sender's copy (a refused one: the visitor sees its end)
            visitor.settimeout(5)
            if names[i] == "held.test":
                visitor.sendall(b"+")
                assert visitor.recv(100) == b"served:V%02d+" % i
            else:
                assert visitor.recv(100) == b""
        assert a.group.counters["channel_opened"] == 1
        # The sibling's end closed (it restarted): the next hand-over opens a new channel.
        b.group.stop()
        b.group.start()
        visitor, accepted = gevent.socket.socketpair()
        green_wait(lambda: a.group.hand_off(b.group.pid, accepted, {"name": "held.test"},
                                            b"") == w.TAKEN, "a hand-over after b restarted")
        assert a.group.counters["channel_opened"] == 2
    finally:
        a.group.stop()
        b.group.stop()


def test_refused_hand_off_leaves_the_connection_with_the_sender(pair):
    a, b = pair
    visitor, accepted = gevent.socket.socketpair()
    assert a.group.hand_off(b.group.pid, accepted, {"name": "other.test"}, b"") == w.REFUSED
    assert a.group.counters["refused:unknown_name"] == 1
    accepted.sendall(b"404")  # still ours to answer
    visitor.settimeout(5)
    assert visitor.recv(10) == b"404"


def test_names_published_and_found_with_wildcards(pair):
    a, b = pair

    class FakeSession:
        closed = False

    t = b.registry.add_tunnel(FakeSession(), "1.2.3.4:5", None, "c" * 32)
    b.registry.bind(t, "http", "*.held.test", None, "tofu", "http://*.held.test")
    green_wait(lambda: a.group.holder(("http",), "x.held.test") == b.group.pid,
               "a sees b's wildcard")
    assert a.group.holder(("tls",), "x.held.test") is None
    b.registry.remove_tunnel(t)
    green_wait(lambda: a.group.holder(("http",), "x.held.test") is None, "a sees it gone")


def test_hand_off_to_a_dead_sibling_is_refused_at_once(pair, tmp_path):
    a, _ = pair
    dead = 999_999_999  # no such process; its socket file stays behind, nobody listening
    s = socket.socket(socket.AF_UNIX)
    s.bind(a.group.path(dead, "sock"))
    s.close()
    visitor, accepted = gevent.socket.socketpair()
    with gevent.Timeout(1.0):  # ECONNREFUSED, not the hand-over deadline
        assert a.group.hand_off(dead, accepted, {"name": "held.test"}, b"") == w.UNREACHABLE
    assert not os.path.exists(a.group.path(dead, "sock"))  # forgotten, its file removed


def test_hand_overs_in_flight_are_bounded(tmp_path):
    gate = gevent.event.Event()
    a, b = Sibling(str(tmp_path), os.getpid()), Sibling(str(tmp_path), os.getppid(), gate)
    a.group.start()
    b.group.start()
    try:
        socks = [gevent.socket.socketpair() for _ in range(3)]
        jobs = [gevent.spawn(a.group.hand_off, b.group.pid, s[1], {"name": "held.test"}, b"")
                for s in socks[:2]]
        gevent.sleep(0.2)  # both wait in b's take (the gate)
        assert a.group.hand_off(b.group.pid, socks[2][1], {"name": "held.test"}, b"") == w.LIMIT
        assert a.group.counters[w.LIMIT] == 1
        gate.set()
        gevent.joinall(jobs, timeout=5)
        assert [j.value for j in jobs] == [w.TAKEN, w.TAKEN]
    finally:
        a.group.stop()
        b.group.stop()


def test_questions_reach_every_sibling(pair):
    a, b = pair
    green_wait(lambda: a.group.siblings() == [b.group.pid], "a knows b")
    assert a.group.ask_all({"op": "state"}) == [{"pid": b.group.pid, "asked": "state"}]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_another_user_is_refused_and_counted():
    import shutil
    import tempfile

    # A run directory others may enter (the real one is 0700: the first protection), so the
    # connection reaches the second one, SO_PEERCRED.
    run_dir = tempfile.mkdtemp(prefix="shroud-peercred-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    a = Sibling(run_dir, os.getpid())
    a.group.start()
    try:
        path = a.group.path(a.group.pid, "sock")
        os.chmod(path, 0o777)
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(b'x'); print('closed' if s.recv(10) == b'' else 'answered')")
        job = gevent.get_hub().threadpool.spawn(
            subprocess.run, ["/usr/bin/python3", "-c", code, path],
            preexec_fn=lambda: os.setuid(65534), capture_output=True, text=True, timeout=20)
        out = job.get(timeout=30)
        # connected (the directory let it), then dropped unanswered: closed or reset
        assert "answered" not in out.stdout and "Permission" not in out.stderr, out
        assert a.group.counters["peer_refused"] == 1
    finally:
        a.group.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_merged_view_adds_up_every_workers_state():
    from lib.proxy.groupview import export_state, merged_registry

    class FakeSession:
        closed = False
        heartbeat_rtt = 0.01
        sends_waiting = 0
        buffered_in = 0

    here, there = Registry(), Registry()
    Registry.number_tunnels_from(1_000_001)
    t1 = here.add_tunnel(FakeSession(), "1.1.1.1:1", None, "a" * 32)
    Registry.number_tunnels_from(2_000_001)
    t2 = there.add_tunnel(FakeSession(), "2.2.2.2:2", None, "b" * 32)
    b1 = here.bind(t1, "tls", "app.test", None, "tofu", "tls://app.test")
    b2 = there.bind(t2, "tls", "app.test", None, "tofu", "tls://app.test")
    there.bind(t2, "http", "web.test", None, "tofu", "http://web.test")
    here.connections, there.connections = 3, 4
    b1.connections, b2.connections = 1, 2
    here.count_bytes(b1, t1, n_in=100)
    there.count_bytes(b2, t2, n_in=50, n_out=7)
    view = merged_registry(here, [json_roundtrip(export_state(there))])
    assert set(view.bindings) == {("tls", "app.test"), ("http", "web.test")}
    app = view.bindings[("tls", "app.test")]
    assert sorted(t.id for t in app.tunnels) == [1_000_001, 2_000_001]
    assert (app.connections, app.bytes_in, app.bytes_out) == (3, 150, 7)
    assert app.history.rate()[0] > 0  # the per-second buckets add up too
    assert view.connections == 7 and len(view.tunnels) == 2 and len(view.workers) == 2
    snap = view.snapshot()  # what /api/status serves
    assert sorted(t["names"] for t in snap["tunnels"]) == [["app.test"], ["app.test", "web.test"]]


def json_roundtrip(data):
    import json
    return json.loads(json.dumps(data))


def test_blind_offers_of_unknown_names_are_bounded(pair):
    """A name no sibling is known to hold goes to every sibling, within a budget: a flood of
    unknown names (a scanner) is refused at once past it, and counted."""
    a, b = pair
    green_wait(lambda: a.group.siblings() == [b.group.pid], "a knows b")
    offered = [a.group.candidates(("http",), f"n{i}.test") for i in range(w.BLIND_OFFER_BURST + 20)]
    assert offered[0] == [b.group.pid]
    assert sum(1 for o in offered if o) <= w.BLIND_OFFER_BURST + 2  # refill while looping
    assert a.group.counters["blind_offer_limit"] >= 18


STUCK_SIBLING = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(os.path.join(sys.argv[1], "%d.sock" % os.getpid()))
s.listen(16)
conns = [s.accept()[0]]  # accepted, then never read: a sibling stuck in a long call
print("ready", flush=True)
time.sleep(120)
"""


def test_a_stuck_sibling_costs_each_hand_over_its_deadline_at_most(tmp_path):
    """A sibling process that accepted the channel and then stopped reading (stuck, stopped):
    once its socket buffer is full, a hand-over's send must still end by the hand-over's
    deadline, and the hand-overs queued behind it too (they wait for the channel's lock).
    Was: the channel's reader set the shared socket to no timeout, so the send blocked until
    the sibling died and every hand-over to it waited, holding its in-flight slot."""
    stuck = subprocess.Popen([sys.executable, "-c", STUCK_SIBLING, str(tmp_path)],
                             stdout=subprocess.PIPE)
    a = Sibling(str(tmp_path), os.getpid(), max_in_flight=64)
    a.group.start()
    try:
        path = a.group.path(stuck.pid, "sock")
        green_wait(lambda: os.path.exists(path), "the stuck sibling listens")
        peeked = b"x" * 60_000  # a few messages fill the Unix socket's buffer
        pairs = [gevent.socket.socketpair() for _ in range(12)]
        first = a.group.hand_off(stuck.pid, pairs[0][1], {"name": "held.test"}, peeked)
        assert first == w.TIMEOUT
        # A hang guard, not a speed bound: each ends by its own deadline (HANDOFF_TIMEOUT).
        with gevent.Timeout(4 * w.HANDOFF_TIMEOUT + 5, AssertionError("hand-overs hang")):
            jobs = [gevent.spawn(a.group.hand_off, stuck.pid, accepted, {"name": "held.test"},
                                 peeked) for _, accepted in pairs[1:]]
            gevent.joinall(jobs, raise_error=True)
        assert {j.value for j in jobs} <= {w.TIMEOUT, w.UNREACHABLE}
    finally:
        a.group.stop()
        stuck.kill()
        stuck.wait()
