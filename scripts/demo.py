#!/usr/bin/env python3
"""The Shroud demo: everything on loopback, in one command (./scripts/demo.sh).

Brings up a private Tor network, three public proxies (the third under gunicorn, as the
Procfile runs it), a sample HTTPS site, and a Shroud client that exposes the site through the
three proxies over Tor. Prints a URL a browser opens with no root step (a name under
.localhost), the dashboards and their login.

Stopping leaves nothing behind, however it comes (Ctrl-C, twice; SIGTERM; SIGHUP; a closed
pipe such as ``demo.sh | tee log`` whose tee died with the same Ctrl-C):
- every child runs in its own session, so a terminal's Ctrl-C reaches only this process;
- the first signal starts the stop and every later one is ignored, so nothing interrupts it;
- the stop kills first and prints after, and a broken stdout is tolerated;
- every process started here, directly or not, carries SHROUD_DEMO_RUN=<token> in its
  environment; the stop ends by killing whatever still carries it (a child whose start was cut
  short by the signal is found that way too);
- the work directory (keys, logs) is removed, unless --keep or --dir was given.

The Tor network's exits accept only the proxies' tunnel ports (besides 127.0.0.0/8), so
nothing here can leave the machine even outside a network namespace.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from werkzeug.security import generate_password_hash  # noqa: E402

from lib.testnet import TorNetwork  # noqa: E402

PY = sys.executable
# Browsers resolve every name under .localhost to loopback themselves (RFC 6761 section 6.3):
# no /etc/hosts edit, and never a query to a real resolver.
SITE = "shroud-demo.localhost"
MARKER = "SHROUD_DEMO_RUN"  # environment variable every process of one run carries
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROC_GRACE = 10.0  # seconds a child has to exit after SIGTERM before SIGKILL
SWEEP_WAIT = 5.0  # seconds to wait for SIGKILLed stragglers to disappear


# --- output that survives a closed pipe --------------------------------------------------------

def say(msg: str) -> None:
    """Print a line; once stdout is gone (``| tee`` killed by the same Ctrl-C), print nothing
    more: stdout is pointed at /dev/null so neither we nor the interpreter's exit fails."""
    try:
        print(f"[demo] {msg}", flush=True)
    except (BrokenPipeError, ValueError, OSError):
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# --- signals: the first one stops, the rest are ignored ----------------------------------------

def ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def install_stop_signals() -> None:
    def on_signal(signum, frame):
        ignore_stop_signals()  # before anything else: a second Ctrl-C must not cut the stop
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


# --- processes ---------------------------------------------------------------------------------

def marked_pids(token: str) -> list[int]:
    """Processes (other than this one) whose environment carries MARKER=token."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue  # gone, or not ours to read
    return found


def sweep(token: str) -> list[int]:
    """SIGKILL every process still carrying the marker; wait until they are gone."""
    killed = marked_pids(token)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + SWEEP_WAIT
    while marked_pids(token) and time.monotonic() < deadline:
        time.sleep(0.05)  # a zombie has an empty environ: this ends once they are dead
    return killed


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port(preferred: int | None = None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", candidate))
            return s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port")


def pick_ports(first: int, what: str) -> list[int]:
    """Three ports from ``first`` on, saying which preferred ones were taken."""
    ports = []
    for i in range(3):
        port = free_port(first + i)
        if port != first + i:
            say(f"port {first + i} is taken: {what} of proxy{i} uses {port} instead")
        ports.append(port)
    return ports


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start listening on port {port} within {timeout:.0f} s")


# --- certificates ------------------------------------------------------------------------------

def make_site_certs(d: str) -> tuple[str, str, str, str]:
    """A throwaway CA and a certificate for the demo site: (ca, cert, key, SPKI sha256 b64)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Shroud demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SITE)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SITE)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(d, n) for n in ("ca.pem", "site.pem", "site.key")]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return (*paths, base64.b64encode(hashlib.sha256(spki).digest()).decode())


# --- the demo ----------------------------------------------------------------------------------

class Demo:
    def __init__(self, workdir: str, keep: bool, token: str):
        self.dir = workdir
        self.keep = keep
        self.token = token  # the MARKER value, and the dashboards' API token
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.net: TorNetwork | None = None

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        e = dict(os.environ, PYTHONUNBUFFERED="1")
        e.update(env or {})
        with open(os.path.join(self.dir, f"{name}.log"), "ab") as log:
            # Its own session: a terminal's Ctrl-C reaches the demo only, which stops it.
            p = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=e, start_new_session=True)
        self.procs.append((name, p))
        return p

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see "
                                   f"{os.path.join(self.dir, name + '.log')}")

    def stop(self) -> None:
        """Kill everything started here and remove the work directory; cannot be interrupted
        (stop signals are ignored from here on) and prints only once the killing is done."""
        ignore_stop_signals()
        try:
            self._terminate()
        finally:  # whatever went wrong above, the sweep and the removal still happen
            stragglers = sweep(self.token)
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
        say("stopped: every process started here has exited"
            + (f" ({len(stragglers)} killed by the final sweep)" if stragglers else "")
            + ("" if self.keep else f"; {self.dir} removed"))

    def _terminate(self) -> None:
        """SIGTERM to every child's process group and every relay, then wait; SIGKILL the
        process groups that outlive PROC_GRACE."""
        for _, p in reversed(self.procs):
            if p.poll() is None:
                _killpg(p.pid, signal.SIGTERM)
        if self.net is not None:
            self.net.stop()  # SIGTERM to each relay, then waits (and SIGKILLs laggards)
        deadline = time.monotonic() + PROC_GRACE
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def run(self) -> None:
        d = self.dir
        ca_pem, site_cert, site_key, site_spki = make_site_certs(d)
        tunnel_ports = pick_ports(4443, "the tunnel port")
        https_ports = pick_ports(8443, "the public HTTPS port")
        http_ports = pick_ports(8080, "the public HTTP port")
        admin_ports = pick_ports(9000, "the dashboard")
        site_port = free_port()
        names = {f"127.0.0.1:{p}": f"proxy{i}" for i, p in enumerate(tunnel_ports)}
        # The sample site: HTTPS on loopback, never reached by visitors directly.
        self.spawn("site", [PY, os.path.join(ROOT, "scripts", "demo_site.py"), str(site_port),
                            site_cert, site_key, json.dumps(names)])
        wait_port(site_port, 15, "sample site")

        say("starting a private Tor network (3 authorities, 2 exits; about 20 s) ...")
        self.net = TorNetwork(os.path.join(d, "tornet"),
                              exit_ports=",".join(str(p) for p in tunnel_ports),
                              log=lambda line: say(f"tor: {line}"),
                              # Relays on 127.0.0.20 and up: the tests' own network (and
                              # `python -m lib.testnet`'s default) use .2 and up.
                              first_address=20)
        self.net.start(timeout=180)

        password = secrets.token_urlsafe(9)
        self.start_proxies(tunnel_ports, https_ports, http_ports, admin_ports, password)
        fingerprints = [self.proxy_fingerprint(i) for i in range(3)]
        self.start_client(tunnel_ports, fingerprints, site_port, admin_ports)
        ok = self.visit(ca_pem, https_ports[0])
        say("a test visit through proxy0 " + ("succeeded" if ok else "FAILED"))
        self.banner(ca_pem, site_spki, https_ports, admin_ports, password)

    def start_proxies(self, tunnel_ports, https_ports, http_ports, admin_ports, password):
        pw_hash = generate_password_hash(password)
        for i in range(3):
            args = ["--data-dir", os.path.join(self.dir, f"proxy{i}"),
                    "--tunnel-addr", f"127.0.0.1:{tunnel_ports[i]}",
                    "--https-addr", f"127.0.0.1:{https_ports[i]}",
                    "--http-addr", f"127.0.0.1:{http_ports[i]}",
                    "--hostname", f"proxy{i}.demo.test",
                    "--allow-loopback-names"]  # the site is a .localhost name
            env = {"SHROUD_ADMIN_PASSWORD_HASH": pw_hash, "SHROUD_ADMIN_TOKEN": self.token}
            if i == 2:
                env.update(SHROUD_ARGS=" ".join(args),
                           SHROUD_ADMIN_ADDR=f"127.0.0.1:{admin_ports[i]}")
                argv = [os.path.join(os.path.dirname(PY), "gunicorn"), "-c",
                        "gunicorn.conf.py", "shroud_proxy:app"]
            else:
                argv = [PY, "shroud_proxy.py", *args,
                        "--admin-addr", f"127.0.0.1:{admin_ports[i]}"]
            self.spawn(f"proxy{i}", argv, env)
        # Ready when the dashboard's API answers (the proxy starts its listeners first). Never
        # probe the tunnel port itself: the proxy would count it as a refused tunnel handshake.
        for i in range(3):
            self.wait_status(admin_ports[i], 30, f"proxy{i}")
        say("three proxies up (proxy2 under gunicorn)")

    def proxy_fingerprint(self, i: int) -> str:
        return subprocess.run(
            [PY, "shroud_proxy.py", "--data-dir", os.path.join(self.dir, f"proxy{i}"),
             "--hostname", f"proxy{i}.demo.test", "--print-fingerprint"], cwd=ROOT,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True).stdout.strip()

    def start_client(self, tunnel_ports, fingerprints, site_port, admin_ports) -> None:
        say("starting the Shroud client: it launches its own tor and tunnels to each proxy ...")
        argv = [PY, "shroud.py", "--tor", "launch", "--tor-config",
                self.net.client_torrc_path, "--data-dir", os.path.join(self.dir, "client"),
                "--status", "plain", "--proxy-protocol", "v2"]
        for i in range(3):
            argv += ["--proxy", f"127.0.0.1:{tunnel_ports[i]}", "--pin", fingerprints[i]]
        argv += [SITE, f"127.0.0.1:{site_port}"]
        t0 = time.monotonic()
        self.spawn("client", argv)
        self.wait_bound(admin_ports, timeout=120)
        say(f"the client bound {SITE} on all three proxies in {time.monotonic() - t0:.1f} s")

    def visit(self, ca_pem: str, port: int) -> bool:
        """One visit through a proxy, as a browser would make it."""
        ctx = ssl.create_default_context(cafile=ca_pem)
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        conn = http.client.HTTPConnection(SITE, port, timeout=30)
        conn.sock = ctx.wrap_socket(raw, server_hostname=SITE)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    def api_status(self, port: int) -> dict | None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/api/status", headers={"Authorization": f"Bearer {self.token}"})
            r = c.getresponse()
            body = r.read()
            c.close()
            return json.loads(body) if r.status == 200 else None
        except (OSError, ValueError):
            return None

    def wait_status(self, port: int, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while self.api_status(port) is None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer on its dashboard port {port} within "
                                   f"{timeout:.0f} s; see {self.dir}/{what}.log")
            time.sleep(0.2)

    def wait_bound(self, admin_ports: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(3))
        while pending and time.monotonic() < deadline:
            self.check_alive()
            for i in sorted(pending):
                st = self.api_status(admin_ports[i]) or {}
                if any(b["name"] == SITE and b["tunnels"] for b in st.get("bindings", [])):
                    pending.discard(i)
                    say(f"proxy{i}: {SITE} bound")
            time.sleep(0.5)
        if pending:
            raise RuntimeError(f"{SITE} not bound on proxies {sorted(pending)} after "
                               f"{timeout:.0f} s; see {self.dir}/client.log")

    def banner(self, ca_pem, site_spki, https_ports, admin_ports, password) -> None:
        url = f"https://{SITE}:{https_ports[0]}/"
        chromium = (f"chromium --user-data-dir={self.dir}/chromium "
                    f"--ignore-certificate-errors-spki-list={site_spki} {url}")
        say(f"""
============================================================================
 Shroud demo is running.

 Open in a browser (any name under .localhost is this machine; nothing to edit):
   {url}   (or :{https_ports[1]}, :{https_ports[2]}: the other two proxies)
 The site's certificate is from a throwaway demo CA: click through the browser's
 warning, or start a Chromium that trusts this one site's key and nothing else:
   {chromium}
 From a shell:
   curl --cacert {ca_pem} {url}

 Dashboards (user: admin, password: {password}):
   proxy0  http://127.0.0.1:{admin_ports[0]}/
   proxy1  http://127.0.0.1:{admin_ports[1]}/
   proxy2  http://127.0.0.1:{admin_ports[2]}/   (gunicorn)

 Logs and state: {self.dir}
 Stop: press Ctrl-C (everything started here is stopped and removed).
============================================================================""")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="work directory, kept on exit (default: a new temporary "
                                 "one, removed on exit)")
    p.add_argument("--keep", action="store_true", help="keep the work directory on exit")
    args = p.parse_args()
    token = secrets.token_urlsafe(16)
    os.environ[MARKER] = token  # inherited by every process started from here on
    workdir = args.dir or tempfile.mkdtemp(prefix="shroud-demo-")
    demo = Demo(workdir, keep=args.keep or bool(args.dir), token=token)
    install_stop_signals()
    try:
        os.makedirs(workdir, exist_ok=True)
        say(f"work directory {workdir}")
        demo.run()
        while True:
            time.sleep(1)
            demo.check_alive()
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # any failure: one line, then the same teardown as Ctrl-C
        ignore_stop_signals()
        say(f"error: {e}")
        return 1
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
