"""The entry points as a newcomer meets them: --version, --help, the environment, and bad input.

Bad input is refused before anything starts (no tor, no connection), with one line naming the
flag or file and the fix, exit status 2, and never a traceback. Most cases call the client's
check_inputs() in-process (fast); a few run the real entry point to see exactly what a user sees.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shroud
from lib.identity import Identity
from tests.support.wait import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
GOOD_PIN = "ab" * 32


def run(argv: list[str], env: dict | None = None, prefix: list[str] = (),
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, PY, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})),
                          stdin=subprocess.DEVNULL)


def check(argv: list[str], data_dir) -> shroud.Inputs:
    parser = shroud.build_parser()
    args = parser.parse_args(["--data-dir", str(data_dir), *argv])
    return shroud.check_inputs(parser, args)


def refused(argv: list[str], data_dir) -> str:
    with pytest.raises(shroud.UsageError) as e:
        check(argv, data_dir)
    return str(e.value)


@pytest.fixture(autouse=True)
def no_shroud_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SHROUD_"):
            monkeypatch.delenv(name)


# --- --version and --help ---------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["shroud.py", "shroud_proxy.py"])
def test_version(entry):
    from lib.version import __version__

    r = run([entry, "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{entry} {__version__} (Shroud protocol 2; muxado v1)"


def test_client_help_shows_defaults_and_every_environment_variable():
    r = run(["shroud.py", "--help"], env={"COLUMNS": "200"})
    assert r.returncode == 0
    for text in ("(default: launch)", "(default: 9.9.9.9:53)", "(default: 13)",
                 "(default: 4096)", "[env SHROUD_CLIENT_DATA_DIR]", "[env SHROUD_PROXY]"):
        assert text in r.stdout, text
    options = [a for a in shroud.build_parser()._actions
               if a.option_strings and a.dest not in ("help", "version")]
    for a in options:
        assert f"[env {shroud.env_name(a.option_strings[0])}]" in a.help, a.option_strings


def test_proxy_help_shows_defaults():
    r = run(["shroud_proxy.py", "--help"], env={"COLUMNS": "200"})
    assert r.returncode == 0
    for text in ("(default: 0.0.0.0:4443)", "(default: 127.0.0.1:8080)", "(default: 13)"):
        assert text in r.stdout, text


def _sample(action):
    """A valid value for an option, as text for the environment and as parsed."""
    if action.choices:
        return action.choices[-1], action.choices[-1]
    if action.const is True:  # store_true
        return "1", True
    if action.type is int:
        return "7", 7
    if action.type is float:
        return "7.5", 7.5
    if action.dest in ("proxy", "pin"):
        return "a.example:1,b.example:2", ["a.example:1", "b.example:2"]
    return "some-value", "some-value"


def test_every_client_option_comes_from_the_environment(monkeypatch):
    options = [a for a in shroud.build_parser()._actions
               if a.option_strings and a.dest not in ("help", "version")]
    assert len(options) >= 20
    for a in options:
        text, parsed = _sample(a)
        monkeypatch.setenv(shroud.env_name(a.option_strings[0]), text)
    args = shroud.build_parser().parse_args([])
    for a in options:
        assert getattr(args, a.dest) == _sample(a)[1], a.option_strings


def test_command_line_replaces_the_environment(monkeypatch):
    monkeypatch.setenv("SHROUD_PROXY", "env.example:1,env2.example:2")
    monkeypatch.setenv("SHROUD_TOR", "none")
    args = shroud.build_parser().parse_args(["--proxy", "cli.example:3", "--proxy",
                                             "cli2.example:4", "--tor", "launch"])
    assert args.proxy == ["cli.example:3", "cli2.example:4"]
    assert args.tor == "launch"


def test_services_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHROUD_SERVICES", "a.example 127.0.0.1:443 tcp:20001 127.0.0.1:22")
    inputs = check(["--proxy", "p.example:4443"], tmp_path)
    assert [s.name for s in inputs.services] == ["a.example", "tcp:20001"]


# --- bad input: one line, the flag and the fix -------------------------------------------------

BAD = [
    (["x.example", "127.0.0.1:99999", "--proxy", "p:1"],
     "the target of x.example must be HOST:PORT, got '127.0.0.1:99999' (port 99999 is outside "
     "1-65535)"),
    (["tcp:99999", "127.0.0.1:22", "--proxy", "p:1"],
     "tcp:99999: a raw TCP service is tcp:PORT, PORT (1-65535) the port to open on each proxy"),
    (["x.example", ":99999", "--proxy", "p:1"], "the target of x.example must be HOST:PORT"),
    (["x.example", "127.0.0.1:1", "--proxy", ":99999"],
     "--proxy must be HOST:PORT, got ':99999'"),
    (["x.example", "127.0.0.1:1"], "no proxies: give --proxy HOST:PORT"),
    (["x.example"], "'x.example' has no target"),
    ([], "no services: give NAME TARGET pairs"),
    (["x.example", "127.0.0.1:1", "--proxy", "p:1", "--pin", "abc"],
     "--pin: not a SHA-256 fingerprint: 'abc'; take it from `shroud_proxy.py "
     "--print-fingerprint`"),
    (["x.example", "127.0.0.1:1", "--proxy", "p:1", "--proxy-ca", "/nonexistent/ca.pem"],
     "--proxy-ca /nonexistent/ca.pem: cannot read it (No such file or directory)"),
    (["x.example", "127.0.0.1:1", "--proxy", "p:1", "--proxy-ca", "/etc/hostname"],
     "--proxy-ca /etc/hostname: not a PEM CA bundle"),
    (["x.example", "127.0.0.1:1", "--proxy", "p:1", "--heartbeat-interval", "20"],
     "--heartbeat-interval (20) must be above 0 and below --heartbeat-timeout (13)"),
    (["x.example", "127.0.0.1:1", "--proxy", "p:1", "--tor", "none", "--distinct-exits"],
     "--distinct-exits needs a tor of our own (--tor launch)"),
    (["x.example", "127.0.0.1:1", "--proxy", "p:1", "--tor", "127.0.0.1:99999"],
     "--tor (launch, none or a control port HOST:PORT) must be HOST:PORT"),
    (["x.example", "127.0.0.1:1", "--socks", "127.0.0.1:1080"], "--socks needs --proxy"),
    (["x.example", "127.0.0.1:1", "--proxy", "p:1", "--count", "0"],
     "--count must be at least 1, got 0"),
    # A URL where a service name goes: the name to write instead.
    (["https:/example.com", "127.0.0.1:1", "--proxy", "p:1"],
     "https:/example.com: a service name has no slashes; write https:example.com (a "
     "certificate obtained here, TLS ended by this client) or example.com (TLS passed through)"),
    (["https://example.com/", "127.0.0.1:1", "--proxy", "p:1"],
     "https://example.com/: a service name has no slashes; write https:example.com"),
    (["http://example.com/app", "127.0.0.1:1", "--proxy", "p:1"],
     "http://example.com/app: a service name has no slashes; write http:example.com (a path "
     "is not part of it: the whole host is served)"),
    (["https:https://example.com", "127.0.0.1:1", "--proxy", "p:1"],
     "write https:example.com"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_one_line_with_the_fix(argv, message, tmp_path):
    text = refused(argv, tmp_path)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("name,value,message", [
    ("SHROUD_COUNT", "x", "SHROUD_COUNT='x' is not a valid int for --count"),
    ("SHROUD_STATUS", "bogus", "SHROUD_STATUS='bogus' is not one of auto, live, plain"),
])
def test_bad_environment_names_the_variable(monkeypatch, tmp_path, name, value, message):
    monkeypatch.setenv(name, value)
    assert message in refused(["x.example", "127.0.0.1:1", "--proxy", "p:1"], tmp_path)


def test_damaged_identity_key_warns_that_a_new_key_loses_the_names(tmp_path):
    key = tmp_path / "identity.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    text = refused(["x.example", "127.0.0.1:1", "--proxy", "p:1"], tmp_path)
    assert f"identity key {key} is damaged" in text
    assert "a new key loses every name the proxies granted to the old one" in text
    assert f"mv {key} {key}.damaged" in text


def test_valid_input_passes_and_creates_the_key(tmp_path):
    inputs = check(["a.example", "127.0.0.1:443", "http:b.example", "[::1]:80", "--proxy",
                    "p.example:4443", "--pin", GOOD_PIN.upper()], tmp_path / "new")
    assert inputs.pins == {GOOD_PIN}
    assert inputs.identity.fingerprint == Identity.load_or_create(str(tmp_path / "new")).fingerprint


def test_https_slashes_name_warns_once_with_the_spelling_for_a_certificate(tmp_path, caplog):
    """https://NAME is the older spelling of a passed-through TLS name (README), easily taken
    for https:NAME: accepted, with one line saying what it does and what to write instead."""
    with caplog.at_level("WARNING", logger="shroud"):
        inputs = check(["https://Example.com", "127.0.0.1:8080", "https:b.example",
                        "127.0.0.1:8081", "--proxy", "p.example:4443"], tmp_path)
    assert [(s.name, s.terminate) for s in inputs.services] == [("example.com", False),
                                                                ("b.example", True)]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ["https://Example.com passes TLS through to 127.0.0.1:8080, which must end "
                    "TLS itself; for a certificate obtained here (TLS ended by this client), "
                    "write https:Example.com"], said


# --- as a user sees it: the real entry point ---------------------------------------------------

def assert_refused_before_start(r: subprocess.CompletedProcess, message: str, data_dir) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("shroud:")]
    assert len(lines) == 1, r.stderr
    assert not os.path.exists(os.path.join(data_dir, "tor")), "tor was started"


def test_outside_the_virtual_environment_says_how_to_run_it():
    r = run(["-S", "shroud.py", "--version"])  # no site-packages: no gevent
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "shroud: gevent is not installed for this Python: run the client with the project's "
        "virtual environment, .venv/bin/python shroud.py ... (./scripts/setup.sh creates it)")


def test_bad_port_exits_before_tor_starts(tmp_path):
    # --tor launch is the default: before, Tor was launched (and bootstrapped) before --proxy
    # was read.
    r = run(["shroud.py", "--data-dir", str(tmp_path), "--proxy", "127.0.0.1:99999",
             "x.example", "127.0.0.1:443"])
    assert_refused_before_start(r, "--proxy must be HOST:PORT, got '127.0.0.1:99999' (port "
                                   "99999 is outside 1-65535)", tmp_path)


def test_damaged_identity_key_is_one_line(tmp_path):
    key = tmp_path / "identity.key"
    key.write_bytes(b"\x00" * 100)
    key.chmod(0o600)
    r = run(["shroud.py", "--data-dir", str(tmp_path), "--proxy", "127.0.0.1:4443",
             "x.example", "127.0.0.1:443"])
    assert_refused_before_start(r, "is damaged", tmp_path)


def test_read_only_data_dir_as_a_regular_user(tmp_path):
    from tests.support.users import unprivileged

    data = tmp_path / "ro"
    data.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o555)
    r = run(["shroud.py", "--data-dir", str(data), "--proxy", "127.0.0.1:4443", "x.example",
             "127.0.0.1:443"], prefix=unprivileged())
    assert_refused_before_start(r, f"--data-dir (or SHROUD_CLIENT_DATA_DIR) {data} is not "
                                   f"writable by this user", data)


def test_proxy_damaged_tunnel_key_names_the_file(tmp_path):
    assert run(["shroud_proxy.py", "--data-dir", str(tmp_path), "--print-fingerprint"]
               ).returncode == 0
    (tmp_path / "tunnel-key.pem").write_text("junk\n")
    r = run(["shroud_proxy.py", "--data-dir", str(tmp_path), "--tunnel-addr", "127.0.0.1:0",
             "--admin-addr", ""])
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    assert f"{tmp_path}/tunnel-key.pem is damaged or not PEM" in r.stderr
    assert "a new pair is generated and every client must pin its new fingerprint" in r.stderr


# --- permanent failures: reported once, with the fix, then retried slowly ---------------------

def test_wrong_pin_is_reported_once_with_the_whole_fingerprint(monkeypatch, caplog, tmp_path):
    """In-process against a TLS listener with another certificate; the slow retry shortened so
    that several attempts happen: one ERROR line in all."""
    import logging

    import gevent
    import gevent.server
    import gevent.ssl

    from lib.certs import cert_fingerprint, ensure_tunnel_cert
    from lib.client import tunnels

    cert, key = ensure_tunnel_cert(str(tmp_path))
    # gevent's SSLContext: the standard one would take the gevent socket's descriptor into a
    # blocking socket, and its handshake would hold the hub (and the client in it) until a timeout.
    ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    accepted = []

    def handle(sock, addr):
        accepted.append(addr)
        try:
            ctx.wrap_socket(sock, server_side=True).recv(1)
        except OSError:
            pass

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    monkeypatch.setattr(tunnels, "PERMANENT_RETRY_BASE", 0.02)
    monkeypatch.setattr(tunnels, "PERMANENT_RETRY_CAP", 0.04)
    client = tunnels.Client(tunnels.ClientConfig(
        services=[tunnels.Service.parse("x.example", "127.0.0.1:1")],
        proxies=[tunnels.ProxyAddr("127.0.0.1", server.server_port)], pins={GOOD_PIN}))
    caplog.set_level(logging.INFO, logger="shroud.client")
    client.start()
    try:
        # The real clock: the hub's loop.now() is the time its loop last ran, which in a
        # full-suite run can be an earlier test's (the tests between never enter the hub), so
        # a deadline taken from it had passed by the first sleep (one accept, nothing logged).
        wait_for(lambda: len(accepted) >= 4, "four attempts", timeout=20, interval=0.02,
                 sleep=gevent.sleep)
    finally:
        client.stop()
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "shroud.client"
             and r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert f"presented certificate {cert_fingerprint(cert)}, which matches no pinned" in lines[0]
    assert "`shroud_proxy.py --print-fingerprint`" in lines[0]
    assert "Retrying every few minutes" in lines[0]


def test_name_owned_by_another_key_says_how_a_dns_txt_proof_settles_it(tmp_path):
    from tests.support.procs import ClientProc, OriginProc, ProxyProc

    origin = OriginProc(str(tmp_path))
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "proxy-data"))
    pair = ["http:owned.test", f"127.0.0.1:{origin.port}"]
    tunnel = [f"127.0.0.1:{proxy.ports['tunnel']}"]
    first = second = None
    try:
        first = ClientProc(str(tmp_path), str(tmp_path / "a"), pair, tunnel,
                           pins=[proxy.fingerprint], name="first")
        proxy.wait_bound("owned.test")
        first.stop()
        second = ClientProc(str(tmp_path), str(tmp_path / "b"), pair, tunnel,
                            pins=[proxy.fingerprint], name="second")
        log = second.wait_log("belongs to key")
        fingerprint = Identity.load_or_create(str(tmp_path / "b")).fingerprint
        assert (f'publish the DNS TXT record _shroud.owned.test "shroud-key={fingerprint}"'
                in log), log
        assert "next in" in log and log.count("belongs to key") == 1, log
    finally:
        for p in (second, first, proxy, origin):
            if p is not None:
                p.stop()
