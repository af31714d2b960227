"""The client's live console in a real terminal (tmux): one panel, logs above it, nothing cut.

- a scripted console (tests/support/console_driver.py) interleaves log lines (some wrapping),
  prints, connections and a multi-line error with its redraws: the whole scrollback must hold
  every log line once, in order, and exactly one panel (a miscounted redraw leaves copies);
- a real client (--tor none, a real proxy and origin) shows its identity fingerprint, a
  Forwarding line per public name and proxy -> local target, and each visitor connection.

Each test runs its own tmux server (-L), so nothing is shared with a user's tmux.
"""
from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import uuid

import pytest

from lib.identity import Identity
from tests.support.procs import OriginProc, ProxyProc
from tests.support.wait import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ARTIFACTS = os.path.join(ROOT, "artifacts")  # tmux captures of the console (gitignored)


def save_capture(name: str, text: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, name), "w") as f:
        f.write(text)


class Tmux:
    """A private tmux server with one pane running ``command``; big scrollback."""

    def __init__(self, tmp_path, command: str, width: int = 100, height: int = 40):
        self.socket = f"shroud-test-{uuid.uuid4().hex[:12]}"
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g history-limit 20000\nset -g remain-on-exit on\n")
        self.tmux(["-f", str(conf), "new-session", "-d", "-s", "t", "-x", str(width), "-y",
                   str(height), "-c", ROOT, f"env -u COLUMNS -u LINES {command}"])

    def tmux(self, args: list[str]) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    def screen(self) -> str:
        return self.tmux(["capture-pane", "-p", "-t", "t"])

    def history(self) -> str:
        return self.tmux(["capture-pane", "-p", "-J", "-S", "-", "-E", "-", "-t", "t"])

    def keys(self, *keys: str) -> None:
        self.tmux(["send-keys", "-t", "t", *keys])

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30)


@pytest.fixture
def tmux_runs():
    runs: list[Tmux] = []
    yield runs
    for t in runs:
        t.kill()


def test_redraw_under_interleaved_logs_keeps_one_panel(tmp_path, tmux_runs):
    rounds = 40
    t = Tmux(tmp_path, f"{PY} tests/support/console_driver.py {rounds}")
    tmux_runs.append(t)
    wait_for(lambda: "DRIVER-DONE" in t.history(), "the driver to finish", timeout=60)
    text = t.history()
    assert text.count("Shroud client") == 1, text
    assert text.count("Ctrl-C to stop") == 1, text
    positions = [text.find(f"log line {i:03d}") for i in range(rounds)]
    assert all(p >= 0 for p in positions), text
    assert positions == sorted(positions), "log lines out of order"
    for i in range(rounds):
        assert text.count(f"log line {i:03d}") == 1, f"log line {i:03d} repeated:\n{text}"
    for i in range(0, rounds, 5):
        assert text.count(f"a print to stdout {i:03d}") == 1, text
    # Logs above the panel, the panel last; the tunnel's multi-line error in full.
    assert text.rfind("log line") < text.find("Shroud client")
    assert "END-OF-ERROR" in text[text.find("Shroud client"):]
    assert "Connections (40)" in text


def visit(port: int, host: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", "/hello", headers={"Host": host})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_real_client_console_shows_forwarding_identity_and_connections(tmp_path, tmux_runs):
    origin = OriginProc(str(tmp_path))
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "proxy-data"))
    data = tmp_path / "client"
    fingerprint = Identity.load_or_create(str(data)).fingerprint
    tunnel = f"127.0.0.1:{proxy.ports['tunnel']}"
    try:
        t = Tmux(tmp_path, f"{PY} shroud.py --tor none --data-dir {data} --proxy {tunnel} "
                           f"--pin {proxy.fingerprint} http:web.test 127.0.0.1:{origin.port}; "
                           f"echo CLIENT-EXIT=$?")
        tmux_runs.append(t)
        forwarding = (f"Forwarding http://web.test (proxy {tunnel}) -> "
                      f"127.0.0.1:{origin.port}")
        wait_for(lambda: forwarding in t.screen(), "the Forwarding line", timeout=30)
        assert visit(proxy.ports["http"], "web.test") == 200
        assert visit(proxy.ports["http"], "web.test") == 200
        screen = wait_for(lambda: "Connections (2)" in t.screen() and t.screen(),
                          "two connections on the console", timeout=15)
        assert f"identity key {fingerprint}" in screen, screen
        assert "Tor: none: the proxies see this machine's address" in screen
        assert re.search(rf"^{re.escape(tunnel)}\s+online\s+-\s+\d+\s+2\s", screen, re.M), screen
        rows = re.findall(r"^\d\d:\d\d:\d\d\s+127\.0\.0\.1:\d+\s+web\.test\s+\S+\s+\S+\s+"
                          r"[\d.]+s\s+ok\s*$", screen, re.M)
        assert len(rows) == 2, screen
        save_capture("console-direct.txt", screen)
        t.keys("C-c")
        wait_for(lambda: "CLIENT-EXIT=0" in t.history(), "the client to stop on Ctrl-C",
                 timeout=20)
        assert t.history().count("Shroud client") == 1
    finally:
        proxy.stop()
        origin.stop()


@pytest.mark.tor
def test_console_over_tor_shows_tor_state_and_each_tunnels_exit(tmp_path, tmux_runs,
                                                                 tor_network):
    origin = OriginProc(str(tmp_path))
    proxies = [ProxyProc(str(tmp_path), str(tmp_path / f"p{i}"), name=f"p{i}") for i in range(2)]
    exits = {r.nickname for r in tor_network.by_role("exit")}
    try:
        args = " ".join(f"--proxy 127.0.0.1:{p.ports['tunnel']} --pin {p.fingerprint}"
                        for p in proxies)
        t = Tmux(tmp_path, f"{PY} shroud.py --tor launch --tor-config "
                           f"{tor_network.client_torrc_path} --data-dir {tmp_path / 'client'} "
                           f"{args} http:web.test 127.0.0.1:{origin.port}")
        tmux_runs.append(t)

        def exits_shown():
            screen = t.screen()
            rows = re.findall(r"^127\.0\.0\.1:\d+\s+online\s+(\S+)\s", screen, re.M)
            return len(rows) == 2 and all(r in exits for r in rows) and screen

        screen = wait_for(exits_shown, "both tunnels online with their Tor exit", timeout=120)
        save_capture("console-tor.txt", t.history())
        assert re.search(r"^Tor: ready, launched, SOCKS 127\.0\.0\.1:\d+$", screen, re.M), screen
        assert screen.count("Forwarding http://web.test") == 2, screen
        history = t.history()
        assert "GETINFO" not in history and "stem" not in history, "stem's logger not quieted"
        assert history.count("Shroud client") == 1, history
    finally:
        for p in (*proxies, origin):
            p.stop()


class _NoTunnels:
    def status(self):
        return []


def test_plain_connection_log_is_rate_limited_and_the_panel_bounded(caplog):
    """Visitors decide how many connections there are: past the burst, lines are dropped and
    the next logged one says how many; the panel keeps the last CONNECTION_ROWS."""
    import logging

    from lib.client import console as consolemod
    from lib.client.tunnels import StreamRecord

    now = [0.0]
    c = consolemod.Console(_NoTunnels(), "ab" * 32, "none", live=False,
                           monotonic=lambda: now[0])
    caplog.set_level(logging.INFO, logger="shroud.client")
    pushed = consolemod.CONNECTION_LOG_BURST * 5
    for i in range(pushed):
        c.stream_done(StreamRecord(started=0, proxy="p:1", visitor=f"192.0.2.1:{i}", name="n"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("visitor ")]
    assert len(lines) == consolemod.CONNECTION_LOG_BURST
    assert c.connection_count == pushed
    assert len(c.connections) == consolemod.CONNECTION_ROWS
    assert c.connections[-1].visitor == f"192.0.2.1:{pushed - 1}"
    now[0] += 1.0  # a second later: CONNECTION_LOG_RATE more lines, the first counting the gap
    c.stream_done(StreamRecord(started=0, proxy="p:1", visitor="192.0.2.9:1", name="n"))
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("visitor ")][-1]
    dropped = pushed - consolemod.CONNECTION_LOG_BURST
    assert f"({dropped} connections before this one not logged)" in last
