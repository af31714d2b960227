"""Unit tests of lib.client.circuits.ExitPlanner with a stand-in for lib.client.tor.TorAccess (this module
only: the real planner runs against real tor in tests/test_e2e_tor.py)."""
import random
import types

import pytest
import stem

from lib.client import tor as torlib
from lib.client.circuits import DistinctExitError, ExitPlanner

AUTHS = [c * 40 for c in "ABC"]
EXITS = ["E" * 40, "F" * 40]


def _status(fp, *flags):
    return types.SimpleNamespace(fingerprint=fp, flags=set(flags) | {"Running", "Valid"})


class FakeTor:
    """Consensus of three guards and two exits; build_circuit fails while a bad relay is in
    the path (as a relay whose OR connection to the exit is in tor's failure cache)."""

    def __init__(self, bad=(), connect_fails=False):
        self.bad = set(bad)
        self.connect_fails = connect_fails
        self.built, self.opened, self.closed = [], [], []
        self.controller = self

    def close_circuit(self, circ):
        self.closed.append(circ)

    def get_network_statuses(self):
        return [_status(fp, "Guard") for fp in AUTHS] + [_status(fp, "Exit") for fp in EXITS]

    def get_info(self, key):
        raise stem.InvalidArguments(message="no entry-guards here")  # what stem raises

    def build_circuit(self, path, timeout):
        self.built.append(list(path))
        if self.bad & set(path):
            raise torlib.TorError(f"could not build a circuit through {path}: DESTROYED")
        return str(len(self.built))

    def open_connection(self, host, port, isolation_key, timeout, circuit_id=None):
        self.opened.append(circuit_id)
        if self.connect_fails and circuit_id is not None:
            raise torlib.TorConnectError("SOCKS error: connection refused")
        return object()


def test_each_tunnel_index_gets_its_own_exit():
    planner = ExitPlanner(FakeTor(), rng=random.Random(1))
    assert planner.path_for(0)[-1] != planner.path_for(1)[-1]
    for i in range(len(EXITS)):
        guard, middle, exit_fp = planner.path_for(i)
        assert len({guard, middle, exit_fp}) == 3 and guard in AUTHS


def test_avoided_relays_are_skipped_while_others_remain():
    planner = ExitPlanner(FakeTor(), rng=random.Random(2))
    for _ in range(50):
        guard, middle, _exit = planner.path_for(0, frozenset(AUTHS[:2]))
        assert guard == AUTHS[2] and middle != AUTHS[0] and middle != AUTHS[1]
    # Everything avoided: the planner still returns a path rather than none.
    assert len(planner.path_for(0, frozenset(AUTHS + EXITS))) == 3


def test_dial_retries_around_a_relay_that_cannot_extend():
    tor = FakeTor(bad={AUTHS[0]})
    planner = ExitPlanner(tor, rng=random.Random(3))
    planner.dial("127.0.0.1", 80, "shroud-tunnel-1-0", timeout=5)
    assert tor.opened[-1] is not None, "fell back although a clean path existed"
    assert AUTHS[0] not in tor.built[-1]
    assert all(p[-1] == EXITS[1] for p in tor.built)
    assert len(tor.built) <= ExitPlanner.ATTEMPTS


def test_dial_fails_closed_after_the_attempts():
    # --distinct-exits is a privacy option the user asked for: never tor's own choice instead.
    tor = FakeTor(bad=set(EXITS))
    with pytest.raises(DistinctExitError, match="no circuit with its own exit for tunnel 0"):
        ExitPlanner(tor, rng=random.Random(4)).dial("127.0.0.1", 80, "shroud-tunnel-0-0",
                                                    timeout=5)
    assert len(tor.built) == ExitPlanner.ATTEMPTS
    assert tor.opened == []


def test_more_tunnels_than_exits_fail_closed():
    tor = FakeTor()
    planner = ExitPlanner(tor, rng=random.Random(6))
    planner.dial("127.0.0.1", 80, "shroud-tunnel-1-0", timeout=5)
    with pytest.raises(DistinctExitError, match="consensus has 2 exit"):
        planner.dial("127.0.0.1", 80, "shroud-tunnel-2-0", timeout=5)  # would share EXITS[0]
    assert tor.opened == ["1"]


def test_a_consensus_tor_will_not_give_fails_closed():
    tor = FakeTor()

    def no_consensus():
        raise torlib.TorError("control connection lost")
    tor.get_network_statuses = no_consensus
    with pytest.raises(DistinctExitError):
        ExitPlanner(tor).dial("127.0.0.1", 80, "shroud-tunnel-0-0", timeout=5)
    assert tor.opened == []


@pytest.mark.parametrize("key", ["other", "shroud-tunnel-x-0", "discovery"])
def test_dial_without_a_tunnel_index_lets_tor_choose(key):
    tor = FakeTor()
    ExitPlanner(tor).dial("127.0.0.1", 80, key, timeout=5)
    assert tor.built == [] and tor.opened == [None]


def test_a_connection_failure_over_a_built_circuit_closes_it_and_fails_closed():
    """The circuit worked (the proxy or the exit's reach did not): no relay is blamed, the
    circuit is not left open, and tor is not asked to choose another exit."""
    tor = FakeTor(connect_fails=True)
    with pytest.raises(DistinctExitError, match="not letting tor choose"):
        ExitPlanner(tor, rng=random.Random(5)).dial("127.0.0.1", 80, "shroud-tunnel-0-0",
                                                    timeout=5)
    assert len(tor.built) == 1 and tor.closed == ["1"]
    assert tor.opened == ["1"]
