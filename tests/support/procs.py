"""Real processes for end-to-end tests: the proxy, the client, gunicorn, the origin.

Each helper starts the real entry point as a subprocess on loopback ports and waits until it is
usable; ``Proc.stop()`` terminates it (SIGTERM, then SIGKILL). Logs go to files in the test's
directory so a failure can show them.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
# The bearer token every test proxy's admin API accepts (ProxyProc passes --admin-token).
ADMIN_TOKEN = "shroud-test-admin-token"


# Ports handed to child processes are bound by them later. A port from the kernel's ephemeral
# range (bind to 0) could meanwhile become the local port of one of the thousands of outgoing
# connections the tests make, and the child's bind would fail. So: below that range, random,
# checked free now, and never handed out twice by this process.
_PORT_RANGE = (10000, 32000)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (a loopback address of its own: 127.0.0.2, ...)."""
    import random

    for _ in range(200):
        port = random.randint(*_PORT_RANGE)
        if port in _handed_out:
            continue
        s = socket.socket()
        try:
            s.bind((host, port))
        except OSError:
            continue
        finally:
            s.close()
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def admin_status(port: int, token: str | None, timeout: float = 10.0,
                 host: str = "127.0.0.1") -> dict:
    """GET /api/status of a proxy's admin listener on ``host``:``port``."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c.request("GET", "/api/status", headers=headers)
        r = c.getresponse()
        body = r.read()
    finally:
        c.close()
    if r.status != 200:
        raise RuntimeError(f"status API answered {r.status}: {body[:200]!r}")
    return json.loads(body)


class Proc:
    def __init__(self, name: str, argv: list[str], logdir: str, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.p = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                  env=full_env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, text: str, timeout: float = 20.0) -> str:
        """Wait until ``text`` appears in the process's log; the log so far."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() >= deadline:
                raise AssertionError(f"{text!r} not in {self.name} log after {timeout} s:\n"
                                     f"{log[-3000:]}")
            time.sleep(0.1)

    def signal(self, sig) -> None:
        if self.alive():
            os.killpg(self.p.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._log.close()


class ProxyProc(Proc):
    """A proxy whose listeners (tunnel, https, http, admin) are on ``host``, a loopback address
    (a host of a fleet gets one of its own: 127.0.0.2, ...); the admin listener on
    ``admin_host`` when given."""

    def __init__(self, logdir: str, data_dir: str, name: str = "proxy", extra: list[str] = (),
                 gunicorn: bool = False, env: dict | None = None, ports: dict | None = None,
                 admin_host: str | None = None, host: str = "127.0.0.1"):
        ports = dict(ports or {})
        self.host = host
        admin_addr = f"{admin_host or host}:{ports.setdefault('admin', free_port(host))}"
        for k in ("tunnel", "https", "http", "admin"):
            ports.setdefault(k, free_port(host))
        self.ports = ports
        self.data_dir = data_dir
        args = ["--data-dir", data_dir, "--tunnel-addr", f"{host}:{ports['tunnel']}",
                "--https-addr", f"{host}:{ports['https']}",
                "--http-addr", f"{host}:{ports['http']}", "--admin-token", ADMIN_TOKEN,
                *extra]
        if gunicorn:
            env = dict(env or {})
            env["SHROUD_ARGS"] = " ".join(args)
            env["SHROUD_ADMIN_ADDR"] = admin_addr
            argv = [os.path.join(os.path.dirname(PY), "gunicorn"), "-c", "gunicorn.conf.py",
                    "shroud_proxy:app"]
        else:
            argv = [PY, "shroud_proxy.py", *args, "--admin-addr", admin_addr]
        super().__init__(name, argv, logdir, env)
        for k in ("tunnel", "admin"):
            try:
                wait_port(ports[k], host=host)
            except TimeoutError:
                raise RuntimeError(f"{name} did not start:\n{self.log()}") from None
        self.fingerprint = self.status()["fingerprint"]

    def status(self, token: str | None = ADMIN_TOKEN) -> dict:
        return admin_status(self.ports["admin"], token, host=self.host)

    def wait_bound(self, name: str, tunnels: int = 1, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status()
            for b in last["bindings"]:
                if b["name"] == name and b["tunnels"] >= tunnels:
                    return b
            time.sleep(0.1)
        raise TimeoutError(f"{name} not bound with {tunnels} tunnel(s) on {self.name}: {last}")


class ClientProc(Proc):
    def __init__(self, logdir: str, data_dir: str, pairs: list[str], proxies: list,
                 pins: list[str] = (), name: str = "client", extra: list[str] = (),
                 tor: str = "none", env: dict | None = None):
        argv = [PY, "shroud.py", "--tor", tor, "--data-dir", data_dir, "--status", "plain"]
        for p in proxies:
            argv += ["--proxy", p]
        for pin in pins:
            argv += ["--pin", pin]
        argv += list(extra) + list(pairs)
        super().__init__(name, argv, logdir, env)


class OriginProc(Proc):
    def __init__(self, logdir: str, tls: tuple[str, str] | None = None, name: str = "origin",
                 proxy_protocol: bool = False, hello: str | None = None):
        self.port = free_port()
        argv = [PY, "tests/support/origin.py", "--port", str(self.port)]
        if hello is not None:
            argv += ["--hello", hello]
        if tls:
            argv += ["--tls", *tls]
        if proxy_protocol:
            argv.append("--proxy-protocol")
        super().__init__(name, argv, logdir)
        wait_port(self.port)
