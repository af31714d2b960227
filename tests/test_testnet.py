"""The private Tor network (lib.testnet): it comes up usable and tears down cleanly."""
import os
import signal
import subprocess
import sys
import time

import pytest

from lib.testnet import AUTHORITY, EXIT, TestnetError, TorNetwork, parse_consensus_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_consensus_flags():
    text = ("network-status-version 3 microdesc\n"
            "r auth0 AAAA 2024-01-01 00:00:00 127.0.0.2 5000 0\n"
            "m abc\n"
            "s Authority Guard Running V2Dir Valid\n"
            "r exit0 BBBB 2024-01-01 00:00:00 127.0.0.5 5001 0\n"
            "s Exit Fast Running Valid\n"
            "r lost CCCC 2024-01-01 00:00:00 127.0.0.6 5002 0\n")
    assert parse_consensus_flags(text) == {
        "auth0": {"Authority", "Guard", "Running", "V2Dir", "Valid"},
        "exit0": {"Exit", "Fast", "Running", "Valid"},
        "lost": set(),
    }


@pytest.mark.tor
def test_network_is_up_with_client_torrc(tor_network):
    roles = [r.role for r in tor_network.relays]
    assert roles.count(AUTHORITY) == 3 and roles.count(EXIT) >= 2
    addresses = [r.address for r in tor_network.relays]
    assert len(set(addresses)) == len(addresses) and "127.0.0.1" not in addresses  # testnet pitfall 2, docs/DESIGN.md
    for r in tor_network.relays:
        os.kill(r.pid, 0)  # running
        flags = parse_consensus_flags(open(os.path.join(r.data_dir, "cached-microdesc-consensus")).read())
        assert set(flags) == {x.nickname for x in tor_network.relays}, r.nickname
        assert all("Exit" in flags[x.nickname] for x in tor_network.by_role(EXIT))
    with open(tor_network.client_torrc_path) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert lines == tor_network.client_torrc_lines()
    assert lines[0] == "TestingTorNetwork 1"
    assert sum(line.startswith("DirAuthority ") for line in lines) == 3
    assert "LearnCircuitBuildTimeout 0" in lines


@pytest.mark.tor
def test_relay_control_port_reports_its_fingerprint(tor_network):
    exit0 = tor_network.by_role(EXIT)[0]
    with tor_network.relay_controller(exit0.nickname) as c:
        assert c.get_info("fingerprint") == exit0.fingerprint
        assert c.get_conf("ExitRelay") == "1"
    time.sleep(0.5)
    assert exit0.process.poll() is None  # closing our controller did not stop the relay


@pytest.mark.tor
def test_directory_already_holding_a_network_is_refused(tor_network):
    with pytest.raises(TestnetError, match="fresh directory"):
        TorNetwork(tor_network.directory, log=None).start(timeout=5)


@pytest.mark.tor
@pytest.mark.slow
def test_cli_starts_writes_client_torrc_and_stops_on_sigterm(tmp_path):
    directory = tmp_path / "net"
    proc = subprocess.Popen([sys.executable, "-m", "lib.testnet", "--dir", str(directory),
                             "--exit-ports", "1-65535",
                             # disjoint from the session network's 127.0.0.2+ addresses
                             "--first-address", "200"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (directory / "client.torrc").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no client.torrc after 120 s"
            time.sleep(0.5)
        pids = []
        for name in os.listdir(directory):
            if name.startswith(("auth", "exit")):
                out = subprocess.run(["pgrep", "-f", f"tor -f {directory / name}/torrc"],
                                     capture_output=True, text=True).stdout.split()
                pids += [int(p) for p in out]
        assert len(pids) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read().decode()
        assert "event=ready" in err and "event=stopped tors=5" in err
        out = proc.stdout.read().decode()
        assert out.startswith("TestingTorNetwork 1")
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
