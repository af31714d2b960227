"""https:NAME in Tor mode: the ACME requests go through the private Tor network's exits, never
straight to the CA, and the client's connection audit (strace, as in test_security's Tor-mode
audit) still shows only its tor and its local target while a certificate is obtained."""
from __future__ import annotations

import os
import re

import pytest

from tests.support.procs import PY, OriginProc, Proc
from tests.test_acme import NAME, curl, start_proxy
from tests.support.straceaudit import ClientTrace, strace_argv
from tests.test_security import wait_log

ISSUE_TIMEOUT = 180  # tunnel up through Tor, then each ACME request over a fresh circuit


@pytest.mark.tor
def test_acme_through_tor_and_the_audit_holds(tor_network, pebble, tmp_path):
    if not os.path.exists("/usr/bin/strace"):
        pytest.fail("strace not installed: run ./scripts/setup.sh as root")
    d = tmp_path
    origin = OriginProc(str(d), hello="hello from the plain origin")
    proxy = start_proxy(d, pebble)
    trace = str(d / "client.strace")
    client_dir = d / "client"
    argv = strace_argv(trace, [
        PY, "shroud.py", "--tor", "launch", "--tor-config", tor_network.client_torrc_path,
        "--data-dir", str(client_dir), "--status", "plain",
        "--proxy", f"127.0.0.1:{proxy.ports['tunnel']}", "--pin", proxy.fingerprint,
        "--acme-directory", pebble.directory, "--acme-ca", pebble.ca_file,
        f"https:{NAME}", f"127.0.0.1:{origin.port}"])
    client = Proc("client-traced", argv, str(d))
    try:
        proxy.wait_bound(NAME, timeout=120)
        wait_log(client, re.escape(f"{NAME}: certificate issued"), timeout=ISSUE_TIMEOUT)
        r = curl(pebble.root_file(str(d)), pebble.tls_port)
        assert r.returncode == 0 and r.stdout.startswith("hello from the plain origin"), r
        socks_port = int(wait_log(client, r"tor ready: SOCKS 127\.0\.0\.1:(\d+)").group(1))
        with open(client_dir / "tor" / "control-port") as f:
            control_port = int(f.read().strip().rsplit(":", 1)[1])
    finally:
        client.stop()
        proxy.stop()
        origin.stop()
    client_trace = ClientTrace.read(trace)
    seen = client_trace.audit(
        {socks_port: "tor SOCKS", control_port: "tor control", origin.port: "local target"},
        forbidden={pebble.port: "the CA"})
    # The tunnel plus the ACME requests (directory, account, order, challenge, polls,
    # finalize, certificate) all went in through tor's SOCKS port.
    socks_connects = client_trace.connects_to(socks_port)
    assert len(socks_connects) >= 2, socks_connects
    mine = client_trace.mine
    # The SOCKS user names the client sent (strace shows the start of each send): the order's
    # requests carried one of their own, so tor gave them a circuit of their own (tor's
    # IsolateSOCKSAuth), apart from the tunnel's.
    users = set(re.findall(r'"\\1[^"]*?(shroud-acme-order-[\w.-]+|shroud:shroud-tunnel-[\w-]+)',
                           "\n".join(mine)))
    orders = {u for u in users if u.startswith("shroud-acme-order-")}
    assert orders and any(u.startswith("shroud:shroud-tunnel-") for u in users), users
    log = client.log()
    stamps = [re.search(rf"^(\S+) .*{re.escape(what)}", log, re.M).group(1)
              for what in ("online in", "ordering a certificate", "certificate issued")]
    print(f"tor mode with ACME: connect() calls {seen}, {len(socks_connects)} through SOCKS; "
          f"tunnel online / ordering / issued at {stamps}; SOCKS users {sorted(users)}")
