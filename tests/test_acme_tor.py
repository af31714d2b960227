"""https:NAME in Tor mode: the ACME requests go through the private Tor network's exits, never
straight to the CA, and the client's connection audit (strace, as in test_security's Tor-mode
audit) still shows only its tor and its local target while a certificate is obtained."""
from __future__ import annotations

import os
import re

import pytest

from tests.support.procs import PY, OriginProc, Proc
from tests.test_acme import NAME, curl, start_proxy
from tests.test_security import socket_calls, wait_log

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
    argv = ["strace", "-f", "-qq", "-s", "64", "-o", trace,
            "-e", "trace=connect,sendto,sendmsg,execve", "-e", "signal=none",
            PY, "shroud.py", "--tor", "launch", "--tor-config", tor_network.client_torrc_path,
            "--data-dir", str(client_dir), "--status", "plain",
            "--proxy", f"127.0.0.1:{proxy.ports['tunnel']}", "--pin", proxy.fingerprint,
            "--acme-directory", pebble.directory, "--acme-ca", pebble.ca_file,
            f"https:{NAME}", f"127.0.0.1:{origin.port}"]
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
    lines = open(trace, encoding="utf-8", errors="replace").read().splitlines()
    tor_pids = {ln.split()[0] for ln in lines if re.search(r'execve\("[^"]*/tor"', ln)}
    assert tor_pids, "the client did not launch tor"
    mine = [ln for ln in lines if ln.split()[0] not in tor_pids]
    allowed = {socks_port: "tor SOCKS", control_port: "tor control", origin.port: "local target"}
    seen: dict[str, int] = {}
    for family, addr, port, path, ln in socket_calls(mine):
        assert family != "UNIX" or path in ("", None), f"unix socket connect: {ln}"
        if family in ("INET", "INET6"):
            assert port != pebble.port, f"the client reached the CA directly: {ln}"
            assert addr == "127.0.0.1" and port in allowed, \
                f"the client connected somewhere else: {ln}"
            seen[allowed[port]] = seen.get(allowed[port], 0) + 1
    assert set(seen) == {"tor SOCKS", "tor control", "local target"}, seen
    # The tunnel plus the ACME requests (directory, account, order, challenge, polls,
    # finalize, certificate) all went in through tor's SOCKS port.
    socks_connects = [ln for _, _, port, _, ln in socket_calls(mine)
                      if port == socks_port and " connect(" in ln]
    assert len(socks_connects) >= 2, socks_connects
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
