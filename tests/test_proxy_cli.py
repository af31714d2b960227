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
    with pytest.raises(SystemExit):
        sp.config_from_args(args)
