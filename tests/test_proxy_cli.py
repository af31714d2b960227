"""shroud_proxy.py's options: flags, SHROUD_* environment variables, validation."""
import importlib

import pytest


def load(monkeypatch, env=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    import shroud_proxy
    return importlib.reload(shroud_proxy)  # defaults are read from the environment at parse


def test_flags_become_config(monkeypatch):
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args(["--tcp-ports", "20000-20002,22022",
                                         "--heartbeat-interval", "1",
                                         "--heartbeat-timeout", "3",
                                         "--max-streams-per-tunnel", "100"])
    c = sp.config_from_args(args)
    assert c.tcp_ports == frozenset({20000, 20001, 20002, 22022})
    assert (c.mux.heartbeat_interval, c.mux.heartbeat_tolerance) == (1.0, 2.0)
    assert c.max_streams_per_tunnel == 100


def test_environment_supplies_options_and_flags_win(monkeypatch):
    sp = load(monkeypatch, {"SHROUD_HTTPS_ADDR": "127.0.0.1:8443",
                            "SHROUD_HEARTBEAT_INTERVAL": "2"})
    args = sp.build_parser().parse_args(["--https-addr", "127.0.0.1:9443"])
    c = sp.config_from_args(args)
    assert c.https_addr == "127.0.0.1:9443"
    assert c.mux.heartbeat_interval == 2.0


def test_bad_heartbeat_refused(monkeypatch):
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args(["--heartbeat-interval", "5", "--heartbeat-timeout", "3"])
    with pytest.raises(ValueError, match="--heartbeat-interval .* must be above 0 and below "
                                         "--heartbeat-timeout"):
        sp.config_from_args(args)


@pytest.mark.timeout(120)
def test_a_bad_option_halts_gunicorn_in_one_line(tmp_path):
    """A mistake in the options is a boot error under gunicorn: one line, and gunicorn stops
    (a SystemExit from the option check made the worker exit 1, which gunicorn restarted in a
    loop, silently)."""
    import os
    import subprocess
    import sys

    from tests.support.procs import ROOT, free_port

    env = dict(os.environ, WEB_CONCURRENCY="1", SHROUD_ADMIN_ADDR=f"127.0.0.1:{free_port()}",
               SHROUD_ARGS=f"--data-dir {tmp_path / 'data'} --tunnel-addr 127.0.0.1:"
                           f"{free_port()} --heartbeat-interval 5 --heartbeat-timeout 3")
    env.pop("PORT", None)
    argv = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c", "gunicorn.conf.py",
            "shroud_proxy:app"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode != 0, done.stderr
    assert ("shroud_proxy: cannot start: --heartbeat-interval (5) must be above 0 and below "
            "--heartbeat-timeout (3)") in done.stderr, done.stderr
    assert done.stderr.count("Booting worker") == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("flag, value, want", [
    ("--max-tunnels-per-key", "eight", "--max-tunnels-per-key (or SHROUD_MAX_TUNNELS_PER_KEY) "
     "must be a whole number, got 'eight'"),
    ("--bind-rate", "fast", "--bind-rate (or SHROUD_BIND_RATE) must be a number, got 'fast'"),
    ("--heartbeat-interval", "x", "--heartbeat-interval (or SHROUD_HEARTBEAT_INTERVAL) must be "
     "a number, got 'x'"),
    ("--tcp-ports", "20000-abc", "--tcp-ports: bad port range '20000-abc'"),
])
def test_a_bad_number_names_its_flag(monkeypatch, flag, value, want):
    """A value that is not a number is one line naming the flag (start_proxy turns the
    ValueError into 'cannot start: ...'), not Python's 'invalid literal for int()'."""
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args([flag, value])
    with pytest.raises(ValueError) as e:
        sp.config_from_args(args)
    assert want in str(e.value)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_fleet_heartbeat_must_be_above_zero(monkeypatch, value):
    """0 would beat in a busy loop and expire this very instance at every beat."""
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args(["--fleet-heartbeat", value])
    with pytest.raises(ValueError, match="--fleet-heartbeat must be above 0"):
        sp.config_from_args(args)


@pytest.mark.parametrize("value, want", [
    ("-1", "--fleet-link-idle must be 0 (never close an unused link) or more seconds, got -1"),
    ("nan", "--fleet-link-idle must be 0 (never close an unused link) or more seconds"),
    ("soon", "--fleet-link-idle (or SHROUD_FLEET_LINK_IDLE) must be a number")])
def test_fleet_link_idle_is_zero_or_more_seconds(monkeypatch, value, want):
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args(["--fleet-link-idle", value])
    with pytest.raises(ValueError) as e:
        sp.config_from_args(args)
    assert want in str(e.value)
    assert sp.config_from_args(sp.build_parser().parse_args([])).fleet_link_idle == 300
    monkeypatch.setenv("SHROUD_FLEET_LINK_IDLE", "0")
    assert sp.config_from_args(sp.build_parser().parse_args([])).fleet_link_idle == 0


@pytest.mark.parametrize("value, want", [
    ("0", "--fleet-max-links must be at least 1, got 0; to forward nothing between proxies, "
          "leave --fleet-addr unset"),
    ("many", "--fleet-max-links (or SHROUD_FLEET_MAX_LINKS) must be a whole number")])
def test_fleet_max_links_is_a_positive_number(monkeypatch, value, want):
    """0 would refuse every link while the instance still registered as a holder."""
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args(["--fleet-max-links", value])
    with pytest.raises(ValueError) as e:
        sp.config_from_args(args)
    assert want in str(e.value)


def test_fleet_max_links_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHROUD_FLEET_MAX_LINKS", "7")
    sp = load(monkeypatch)
    assert sp.config_from_args(sp.build_parser().parse_args([])).fleet_max_links == 7


@pytest.mark.parametrize("given", [["--cert", "c.pem"], ["--key", "k.pem"]])
def test_cert_and_key_go_together(monkeypatch, given):
    """One without the other used to be ignored silently (a certificate was generated)."""
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args(given)
    with pytest.raises(ValueError, match="--cert and --key go together"):
        sp.config_from_args(args)


@pytest.mark.parametrize("given, want", [
    (["--log-level", "loud"], "--log-level 'loud' is not one of debug, info, warning, error"),
    (["--log-format", "xml"], "--log-format 'xml' is not one of text, json"),
])
def test_log_options_are_checked(monkeypatch, given, want):
    """A log level or format the proxy does not know was taken silently (info, text)."""
    sp = load(monkeypatch)
    args = sp.build_parser().parse_args(given)
    with pytest.raises(ValueError) as e:
        sp.config_from_args(args)
    assert want in str(e.value)
    sp.config_from_args(sp.build_parser().parse_args(["--log-level", "DEBUG"]))  # any case


# Each listener flag of the proxy: a port in use on it is one line naming that flag.
LISTENER_FLAGS = ["--tunnel-addr", "--https-addr", "--http-addr", "--discovery-addr"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("entry", ["python", "gunicorn"])
@pytest.mark.parametrize("flag", LISTENER_FLAGS)
def test_both_entry_points_refuse_a_busy_port_in_one_line(tmp_path, entry, flag):
    """`python shroud_proxy.py` and gunicorn start the proxy through one path
    (shroud_proxy.start_proxy): a port in use is one line naming the flag and the fix (not a
    Python address tuple), never a traceback, and the process ends with an error status
    (gunicorn halts instead of restarting its worker)."""
    import os
    import socket
    import subprocess
    import sys

    from tests.support.procs import ROOT, free_port

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    args = ["--data-dir", str(tmp_path / "data"), "--tunnel-addr", f"127.0.0.1:{free_port()}"]
    args += [flag, addr]
    if flag == "--discovery-addr":
        args += ["--fleet", "p1.example:4443"]  # the role needs one to start
    env = dict(os.environ)
    if entry == "python":
        argv = [sys.executable, "shroud_proxy.py", *args, "--admin-addr", ""]
    else:
        env["SHROUD_ARGS"] = " ".join(args)
        env["SHROUD_ADMIN_ADDR"] = f"127.0.0.1:{free_port()}"
        argv = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c",
                "gunicorn.conf.py", "shroud_proxy:app"]
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=90)
    finally:
        busy.close()
    assert done.returncode != 0, done.stderr
    want = (f"shroud_proxy: cannot start: {flag} {addr}: address already in use; "
            "choose another port or stop the process using it")
    assert want in done.stderr, done.stderr
    assert f"('127.0.0.1', {port})" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ["python", "gunicorn"])
def test_a_busy_admin_port_names_its_flag(tmp_path, entry):
    """The dashboard's port: --admin-addr for shroud_proxy.py; under gunicorn it is gunicorn's
    own bind, set by SHROUD_ADMIN_ADDR (or $PORT): named so, one line, not gunicorn's five
    'Connection in use: ('127.0.0.1', P)' retries."""
    import os
    import socket
    import subprocess
    import sys

    from tests.support.procs import ROOT, free_port

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    addr = "127.0.0.1:%d" % busy.getsockname()[1]
    args = ["--data-dir", str(tmp_path / "data"), "--tunnel-addr", f"127.0.0.1:{free_port()}"]
    env = dict(os.environ)
    if entry == "python":
        argv = [sys.executable, "shroud_proxy.py", *args, "--admin-addr", addr]
        flag = "--admin-addr"
    else:
        env.update(SHROUD_ARGS=" ".join(args), SHROUD_ADMIN_ADDR=addr, WEB_CONCURRENCY="1")
        env.pop("PORT", None)
        argv = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c",
                "gunicorn.conf.py", "shroud_proxy:app"]
        flag = "SHROUD_ADMIN_ADDR"
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=90)
    finally:
        busy.close()
    assert done.returncode != 0, done.stderr
    assert (f"shroud_proxy: cannot start: {flag} {addr}: address already in use; "
            "choose another port or stop the process using it") in done.stderr, done.stderr
    assert "Connection in use" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_outside_the_virtual_environment_says_how_to_run_it():
    """The README's first step is the virtual environment; without it, one line saying so."""
    import subprocess
    import sys

    from tests.support.procs import ROOT

    r = subprocess.run([sys.executable, "-S", "shroud_proxy.py", "--version"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)  # -S: no gevent
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "shroud_proxy: gevent is not installed for this Python: run the proxy with the "
        "project's virtual environment, .venv/bin/python shroud_proxy.py ... "
        "(./scripts/setup.sh creates it)")
