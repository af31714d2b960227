#!/usr/bin/env python3
"""The Shroud demo: everything on loopback, in one command (./scripts/demo.sh).

Brings up a private Tor network, three public proxies (the third under gunicorn, as the
Procfile runs it), a sample HTTPS site, and a Shroud client that exposes the site through the
three proxies over Tor. Prints the URL to open, the dashboard and its login, and how to stop.
Ctrl-C (or SIGTERM) tears it all down: only the processes it started.

The Tor network's exits accept only the proxies' tunnel ports (besides 127.0.0.0/8), so
nothing here can leave the machine even outside a network namespace.
"""
from __future__ import annotations

import argparse
import datetime
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
SITE = "shroud-demo.test"
PAGE = """<!doctype html><meta charset=utf-8><title>Shroud demo</title>
<style>body{font:18px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;color:#223}
code{background:#eef;padding:.1em .3em}</style>
<h1>Hello from a shrouded origin</h1>
<p>This page is served by a site on <code>127.0.0.1</code> that no visitor connects to. You
reached it through a public Shroud proxy, which read only the TLS SNI of your connection and
passed the encrypted bytes through a tunnel that crosses a (private) Tor network to the origin.
The proxy never saw this page in plaintext and does not know where the origin is.</p>
<p>Served at {when}.</p>
"""


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


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


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start listening on port {port} within {timeout:.0f} s")


def make_site_certs(d: str) -> tuple[str, str, str]:
    """A throwaway CA and a certificate for the demo site."""
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
    return tuple(paths)  # type: ignore[return-value]


class Demo:
    def __init__(self, workdir: str, keep: bool):
        self.dir = workdir
        self.keep = keep
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.net: TorNetwork | None = None

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        e = dict(os.environ, PYTHONUNBUFFERED="1")
        e.update(env or {})
        p = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=e,
                             start_new_session=True)
        self.procs.append((name, p))
        return p

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see "
                                   f"{os.path.join(self.dir, name + '.log')}")

    def stop(self) -> None:
        say("stopping everything ...")
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name, p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        if self.net is not None:
            self.net.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        say("stopped.")

    def run(self) -> None:
        d = self.dir
        ca_pem, site_cert, site_key = make_site_certs(d)
        www = os.path.join(d, "www")
        os.makedirs(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write(PAGE.replace("{when}", time.strftime("%Y-%m-%d %H:%M:%S")))

        # The sample site: HTTPS on loopback, never reached by visitors directly.
        site_port = free_port()
        self.spawn("site", [PY, os.path.join(ROOT, "scripts", "demo_site.py"), str(site_port),
                            site_cert, site_key, www])
        wait_port(site_port, 15, "sample site")

        tunnel_ports = [free_port(4443 + i) for i in range(3)]
        https_ports = [free_port(8443 + i) for i in range(3)]
        http_ports = [free_port(8080 + i) for i in range(3)]
        admin_ports = [free_port(9000 + i) for i in range(3)]

        say("starting a private Tor network (3 authorities, 2 exits; about 20 s) ...")
        self.net = TorNetwork(os.path.join(d, "tornet"),
                              exit_ports=",".join(str(p) for p in tunnel_ports),
                              log=lambda line: print(f"[demo] tor: {line}", flush=True))
        self.net.start(timeout=180)

        password = secrets.token_urlsafe(9)
        pw_hash = generate_password_hash(password)
        fingerprints = []
        for i in range(3):
            args = ["--data-dir", os.path.join(d, f"proxy{i}"),
                    "--tunnel-addr", f"127.0.0.1:{tunnel_ports[i]}",
                    "--https-addr", f"127.0.0.1:{https_ports[i]}",
                    "--http-addr", f"127.0.0.1:{http_ports[i]}",
                    "--hostname", f"proxy{i}.demo.test"]
            env = {"SHROUD_ADMIN_PASSWORD_HASH": pw_hash}
            if i == 2:
                env.update(SHROUD_ARGS=" ".join(args),
                           SHROUD_ADMIN_ADDR=f"127.0.0.1:{admin_ports[i]}")
                argv = [os.path.join(os.path.dirname(PY), "gunicorn"), "-c",
                        "gunicorn.conf.py", "shroud_proxy:app"]
            else:
                argv = [PY, "shroud_proxy.py", *args,
                        "--admin-addr", f"127.0.0.1:{admin_ports[i]}"]
            fp = subprocess.run([PY, "shroud_proxy.py", "--data-dir",
                                 os.path.join(d, f"proxy{i}"), "--hostname",
                                 f"proxy{i}.demo.test", "--print-fingerprint"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
            fingerprints.append(fp)
            self.spawn(f"proxy{i}", argv, env)
        for i in range(3):
            wait_port(tunnel_ports[i], 30, f"proxy{i}")
            wait_port(admin_ports[i], 30, f"proxy{i} dashboard")
        say("three proxies up (proxy2 under gunicorn)")

        say("starting the Shroud client: it launches its own tor and tunnels to each proxy ...")
        client_argv = [PY, "shroud.py", "--tor", "launch", "--tor-config",
                       self.net.client_torrc_path, "--data-dir", os.path.join(d, "client"),
                       "--status", "plain"]
        for i in range(3):
            client_argv += ["--proxy", f"127.0.0.1:{tunnel_ports[i]}", "--pin", fingerprints[i]]
        client_argv += [SITE, f"127.0.0.1:{site_port}"]
        t0 = time.monotonic()
        self.spawn("client", client_argv)
        self.wait_bound(admin_ports, timeout=120)
        say(f"the client bound {SITE} on all three proxies in {time.monotonic() - t0:.1f} s")

        # Prove it end to end once, as a visitor would.
        ctx = ssl.create_default_context(cafile=ca_pem)
        raw = socket.create_connection(("127.0.0.1", https_ports[0]), timeout=30)
        conn = http.client.HTTPConnection(SITE, https_ports[0], timeout=30)
        conn.sock = ctx.wrap_socket(raw, server_hostname=SITE)
        conn.request("GET", "/")
        ok = conn.getresponse().status == 200
        conn.close()
        say("a test visit through proxy0 " + ("succeeded" if ok else "FAILED"))

        print(f"""
============================================================================
 Shroud demo is running.

 Visit the hidden site through any of the three proxies:

   curl --cacert {ca_pem} \\
        --resolve {SITE}:{https_ports[0]}:127.0.0.1 https://{SITE}:{https_ports[0]}/

 In a browser: add "127.0.0.1 {SITE}" to /etc/hosts, then open
   https://{SITE}:{https_ports[0]}/   (or :{https_ports[1]}, :{https_ports[2]})
 and accept the demo certificate (or import {ca_pem}).

 Dashboards (user: admin, password: {password}):
   proxy0  http://127.0.0.1:{admin_ports[0]}/
   proxy1  http://127.0.0.1:{admin_ports[1]}/
   proxy2  http://127.0.0.1:{admin_ports[2]}/   (gunicorn)

 Logs and state: {d}
 Stop: press Ctrl-C (everything started here is stopped and removed).
============================================================================
""", flush=True)

    def wait_bound(self, admin_ports: list[int], timeout: float) -> None:
        token = self.token
        deadline = time.monotonic() + timeout
        pending = set(range(3))
        while pending and time.monotonic() < deadline:
            self.check_alive()
            for i in list(pending):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", admin_ports[i], timeout=5)
                    c.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"})
                    st = json.loads(c.getresponse().read())
                    c.close()
                except (OSError, ValueError):
                    continue
                if any(b["name"] == SITE and b["tunnels"] for b in st.get("bindings", [])):
                    pending.discard(i)
                    say(f"proxy{i}: {SITE} bound")
            time.sleep(0.5)
        if pending:
            raise RuntimeError(f"{SITE} not bound on proxies {sorted(pending)} after "
                               f"{timeout:.0f} s; see {self.dir}/client.log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="work directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory on exit")
    args = p.parse_args()
    workdir = args.dir or tempfile.mkdtemp(prefix="shroud-demo-")
    os.makedirs(workdir, exist_ok=True)
    demo = Demo(workdir, keep=args.keep or bool(args.dir))
    demo.token = secrets.token_urlsafe(16)
    os.environ["SHROUD_ADMIN_TOKEN"] = demo.token
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        demo.run()
        while True:
            time.sleep(1)
            demo.check_alive()
    except KeyboardInterrupt:
        print()
        return 0
    except Exception as e:  # report plainly, then tear down
        say(f"error: {e}")
        return 1
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
