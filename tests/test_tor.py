"""The client's Tor access (lib.client.tor) against the private network: real tors, real sockets."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from stem.control import EventType

from lib.testnet import AUTHORITY, EXIT
from lib.client.tor import TorConnectError, TorError, launch_tor, socks_credentials
from tests.fixtures.tor import EchoServer, heal_network
from tests.support.wait import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.tor


def _echo_roundtrip(sock, payload=b"hello through tor"):
    sock.settimeout(30)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the echo came back"
        got += chunk
    return got


def test_client_bootstraps_with_progress(client_tor_factory):
    seen = []
    t0 = time.monotonic()
    tor = client_tor_factory(progress=lambda pct, summary: seen.append((pct, summary)))
    took = time.monotonic() - t0
    assert seen[-1] == (100, "Done")
    # Progress before the end, in order. How many steps the 0.1 s polls catch depends on how
    # fast tor is (a warm private network went 75 -> 100 in one poll), so not a fixed count.
    assert [p for p, _ in seen] == sorted(p for p, _ in seen) and len(seen) >= 2
    assert seen[0][0] < 100
    assert tor.socks_address[0] == "127.0.0.1" and tor.socks_address[1] > 0
    assert tor.controller.get_info("status/circuit-established") == "1"
    assert tor.process.poll() is None
    print(f"client bootstrap {took:.2f} s, {len(seen)} progress steps")
    tor.close()
    assert tor.process.poll() is not None


def test_connection_through_an_exit_reaches_echo_server(client_tor, tor_network):
    with EchoServer() as echo:
        t0 = time.monotonic()
        sock = client_tor.open_connection("127.0.0.1", echo.port, isolation_key="echo")
        connect_ms = (time.monotonic() - t0) * 1000
        with sock:
            assert _echo_roundtrip(sock) == b"hello through tor"
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.getpeername() == client_tor.socks_address  # we only talk to our tor
            circ = client_tor.circuit_for_connection(sock)
        assert circ.status == "BUILT" and len(circ.path) == 3
        exits = {r.fingerprint: r.nickname for r in tor_network.by_role(EXIT)}
        assert circ.exit_fingerprint in exits and circ.exit_nickname == exits[circ.exit_fingerprint]
        assert circ.socks_username == socks_credentials("echo")[0]
        assert echo.peers and echo.peers[0][0] == "127.0.0.1"
    print(f"SOCKS connect through the exit {connect_ms:.1f} ms, path "
          f"{[nick for _, nick in circ.path]}")


def _circuit_group(tor, circ_id: str) -> str:
    """What an isolation key is given: a circuit's id, or for a leg of a conflux set the set's
    (tor's CONFLUX_ID), since the set's streams may go on any of its legs."""
    circ = tor.controller.get_circuit(circ_id)
    return circ.keyword_args.get("CONFLUX_ID") or circ.id


def test_isolation_keys_get_distinct_circuits(client_tor):
    with EchoServer() as echo:
        a1 = client_tor.open_connection("127.0.0.1", echo.port, isolation_key="tunnel-a")
        b = client_tor.open_connection("127.0.0.1", echo.port, isolation_key="tunnel-b")
        a2 = client_tor.open_connection("127.0.0.1", echo.port, isolation_key="tunnel-a")
        with a1, b, a2:
            for s in (a1, b, a2):
                _echo_roundtrip(s)
            ga1, gb, ga2 = (_circuit_group(client_tor, client_tor.circuit_for_connection(s).id)
                            for s in (a1, b, a2))
    assert ga1 != gb
    # Same key, same circuit, or the same conflux set: its two legs are circuits of their own,
    # and the key's second stream may go on the other one (seen: 3 and 7, 1 loaded run in 20).
    assert ga1 == ga2


def test_names_are_resolved_by_tor_not_locally(client_tor):
    targets = []

    def on_stream(event):
        targets.append(event.target_address)

    client_tor.controller.add_event_listener(on_stream, EventType.STREAM)
    try:
        # No DNS exists in the test namespace: a local lookup would fail before reaching tor.
        # The exit's lookup goes unanswered, so the connection times out (3 s keeps it short).
        with pytest.raises(TorConnectError, match="shroud-rdns-check.example:80"):
            client_tor.open_connection("shroud-rdns-check.example", 80, timeout=3)
        wait_for(lambda: "shroud-rdns-check.example" in targets, "tor to see the name", timeout=5)
    finally:
        client_tor.controller.remove_event_listener(on_stream)


def test_circuit_listener_reports_a_closed_circuit(client_tor):
    closed = []
    remove = client_tor.add_circuit_listener(closed.append)
    try:
        with EchoServer() as echo:
            sock = client_tor.open_connection("127.0.0.1", echo.port, isolation_key="to-close")
            with sock:
                _echo_roundtrip(sock)
                circ = client_tor.circuit_for_connection(sock)
                client_tor.controller.close_circuit(circ.id)
                wait_for(lambda: any(c.id == circ.id for c in closed), "CIRC CLOSED", timeout=10)
                # No EOF check here: on a CONFLUX_LINKED circuit the stream may move to the
                # other leg and live on (seen); a killed exit does end it (the last test).
        event = next(c for c in closed if c.id == circ.id)
        assert event.status == "CLOSED" and event.reason == "REQUESTED"
    finally:
        remove()


def _build_with_retries(tor, auths, exit_relay, attempts=10):
    """An explicit circuit to exit_relay. A build sometimes fails (DESTROYED) for a few seconds
    in a network about a minute old (seen only when other tests ran first; cause not pinned
    down), so retry with other hops and a pause, as a real client would."""
    for attempt in range(attempts):
        try:
            return tor.build_circuit([auths[attempt % 3].fingerprint,
                                      auths[(attempt + 1) % 3].fingerprint, exit_relay.fingerprint])
        except TorError as e:
            print(f"explicit circuit to {exit_relay.nickname}, attempt {attempt + 1}: {e}")
            if attempt == attempts - 1:
                raise
            time.sleep(1)


def test_explicit_paths_give_a_distinct_exit_per_connection(client_tor, tor_network):
    auths = tor_network.by_role(AUTHORITY)
    exits = tor_network.by_role(EXIT)[:2]
    with EchoServer() as echo:
        seen = []
        for i, exit_relay in enumerate(exits):
            circ_id = _build_with_retries(client_tor, auths, exit_relay)
            sock = client_tor.open_connection("127.0.0.1", echo.port, isolation_key=f"pin{i}",
                                              circuit_id=circ_id)
            with sock:
                _echo_roundtrip(sock)
                circ = client_tor.circuit_for_connection(sock)
            assert circ.id == circ_id
            seen.append(circ.exit_nickname)
        # an ordinary connection still works while streams are attached by hand
        with client_tor.open_connection("127.0.0.1", echo.port, isolation_key="free") as sock:
            _echo_roundtrip(sock)
    assert seen == [e.nickname for e in exits]


def test_missing_tor_is_a_clear_error(tmp_path):
    with pytest.raises(TorError, match="tor not found"):
        launch_tor(str(tmp_path), tor_cmd="/nonexistent/tor", timeout=5)


def test_bad_torrc_line_is_reported_with_tors_words(tmp_path):
    with pytest.raises(TorError, match="NoSuchShroudOption"):
        launch_tor(str(tmp_path), ["NoSuchShroudOption 1"], timeout=20)


def test_stuck_bootstrap_times_out_with_a_clear_error(tmp_path):
    # A network whose only authority does not exist: tor never gets a consensus.
    lines = ["TestingTorNetwork 1",
             "DirAuthority nowhere orport=1 v3ident=" + "A" * 40 + " 127.0.0.9:1 " + "B" * 40]
    t0 = time.monotonic()
    with pytest.raises(TorError, match=r"did not finish bootstrapping within 3 s: stuck at \d+%"):
        launch_tor(str(tmp_path), lines, timeout=3)
    assert time.monotonic() - t0 < 15
    port_file = tmp_path / "tor" / "control-port"
    # the tor we started is gone
    pid_lines = subprocess.run(["pgrep", "-f", f"tor -f {tmp_path}/torrc"],
                               capture_output=True, text=True).stdout.split()
    assert pid_lines == [], port_file


GEVENT_SCRIPT = textwrap.dedent("""
    import gevent.monkey
    gevent.monkey.patch_all()
    import json, sys, time
    import gevent
    sys.path.insert(0, sys.argv[1])
    from lib.client.tor import attach_tor

    tor = attach_tor(sys.argv[2], timeout=30)
    closed, gaps = [], []
    tor.add_circuit_listener(closed.append)

    def ticker():  # proves the hub keeps running while we wait on tor
        last = time.monotonic()
        while True:
            gevent.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    g = gevent.spawn(ticker)
    gevent.sleep(0.02)
    before_open = len(gaps)
    sock = tor.open_connection("127.0.0.1", int(sys.argv[3]), "gevent-subprocess", timeout=30)
    ticks_during_open = len(gaps) - before_open
    sock.sendall(b"ping")
    reply = sock.recv(4)
    circ = tor.circuit_for_connection(sock)
    circuit_ids = [c.id for c in tor.controller.get_circuits()]
    tor.controller.close_circuit(circ.id)
    deadline = time.monotonic() + 10
    while not any(c.id == circ.id for c in closed) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    g.kill()
    print(json.dumps({
        "reply": reply.decode(), "socket_module": type(sock).__module__,
        "path_len": len(circ.path), "circuit_listed": circ.id in circuit_ids,
        "closed_event": [c.status for c in closed if c.id == circ.id],
        "ticks_during_open": ticks_during_open,
    }))
    tor.close()
""")


def test_stem_and_socks_work_in_a_gevent_patched_process(client_tor, tmp_path):
    script = tmp_path / "gevent_tor.py"
    script.write_text(GEVENT_SCRIPT)
    control_port = client_tor.controller.get_socket().port
    with EchoServer() as echo:
        proc = subprocess.run([sys.executable, str(script), ROOT, f"127.0.0.1:{control_port}",
                               str(echo.port)], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reply"] == "ping"
    assert result["socket_module"].startswith("gevent")
    assert result["path_len"] == 3 and result["circuit_listed"]
    assert result["closed_event"] == ["CLOSED"]
    # Ordering, not speed: other greenlets ran while open_connection waited on tor (a blocking
    # call would let none run until it returned). Latency is bench/'s business.
    assert result["ticks_during_open"] > 0, result
    # attach_tor + close in the subprocess must not have stopped our tor
    assert client_tor.process.poll() is None


def _circuit_carrying(tor, port: int):
    """The circuit tor carries our one stream to 127.0.0.1:``port`` on now (GETINFO
    stream-status), or None. A conflux set moves its streams to another leg when a leg closes,
    with no STREAM event (tor: linked_update_stream_backpointers), so the circuit of the
    stream's last event is not always the one carrying it."""
    for st in tor.controller.get_streams():
        if st.target_address == "127.0.0.1" and st.target_port == port:
            return st.circ_id
    return None


def _tor_state(tor, closed) -> str:
    """What the client tor says now, for a failure's message: its circuits (a circuit whose
    close is held back shows here, e.g. purpose PATH_BIAS_TESTING while tor probes it before
    closing it: tor's pathbias_check_close), its streams, and the CIRC closes seen."""
    info = [tor.controller.get_info(k, "?") for k in ("circuit-status", "stream-status")]
    return (f"circuits:\n{info[0]}\nstreams:\n{info[1]}\nclosed: "
            f"{[(c.id, c.status, c.reason, c.remote_reason) for c in closed]}")


def test_killing_the_exit_fails_its_circuit(client_tor, tor_network):
    """Runs last in this module: it kills a relay and starts it again at once.

    Restart at once: while an exit is down, relays that try to extend to it remember the failure
    for 60 s and refuse to retry (measured: usable 60 s after a restart with traffic during the
    downtime, 1.5 s without).

    What tor guarantees: every circuit through the killed relay is destroyed (its neighbour
    sees the TCP connection close and sends DESTROY back) and the client's CIRC event follows
    when the circuit is freed. The circuit watched is the one carrying the stream when the
    exit dies, as tor's stream-status says (a conflux leg may have handed it on).

    Not promptly, always: in 2 of ~30 loaded runs the stream's circuit (conflux legs through
    an authority to the killed exit) stayed BUILT past 30 s while no relay listed an open
    connection to the dead exit any more and the stream no longer echoed; once the DESTROY
    came 40.5 s after the kill (DESTROYED/DESTROYED: passed on by the guard). So the wait is
    90 s: tor's teardown, not a retry.
    """
    closed = []
    remove = client_tor.add_circuit_listener(closed.append)
    auths = tor_network.by_role(AUTHORITY)
    with EchoServer() as echo:
        sock = client_tor.open_connection("127.0.0.1", echo.port, isolation_key="doomed")
        try:
            _echo_roundtrip(sock)
            circ = client_tor.circuit_for_connection(sock)
            carrying = _circuit_carrying(client_tor, echo.port)
            if carrying is not None and carrying != circ.id:
                print(f"stream moved from circuit {circ.id} to {carrying} (conflux)")
                circ = next(c for c in client_tor.circuits() if c.id == carrying)
            killed = tor_network.relay(circ.exit_nickname)
            t0 = time.monotonic()
            tor_network.kill_relay(killed.nickname)
            try:
                try:
                    wait_for(lambda: any(c.id == circ.id for c in closed),
                             "CIRC event after kill", timeout=90)
                except AssertionError as e:
                    raise AssertionError(f"{e}; circuit {circ.id} through "
                                         f"{[n for _, n in circ.path]}; "
                                         f"{_tor_state(client_tor, closed)}") from None
                detect_ms = (time.monotonic() - t0) * 1000
            finally:
                tor_network.restart_relay(killed.nickname)
                heal_network(tor_network, killed.nickname, client_tor.controller)
            event = next(c for c in closed if c.id == circ.id)
            assert event.status in ("CLOSED", "FAILED")
            sock.settimeout(10)
            try:
                rest = sock.recv(100)
            except ConnectionError:  # a reset is as good as an EOF; a timeout is not
                rest = b""
            assert rest == b"", rest
            print(f"exit {killed.nickname} killed: circuit {event.status} ({event.reason}/"
                  f"{event.remote_reason}) after {detect_ms:.0f} ms")
        finally:
            sock.close()
            remove()
        # Leave the session's network healthy: the restarted exit carries a stream again.
        deadline = time.monotonic() + 90
        for attempt in range(90):
            try:
                circ_id = client_tor.build_circuit(
                    [auths[attempt % 3].fingerprint, auths[(attempt + 1) % 3].fingerprint,
                     killed.fingerprint], timeout=5)
                with client_tor.open_connection("127.0.0.1", echo.port, f"revived{attempt}",
                                                timeout=5, circuit_id=circ_id) as s:
                    assert _echo_roundtrip(s) == b"hello through tor"
                break
            except TorError:
                assert time.monotonic() < deadline, f"{killed.nickname} unusable after restart"
                time.sleep(1)
        print(f"{killed.nickname} usable again {time.monotonic() - t0:.1f} s after the kill")
