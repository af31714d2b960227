#!/usr/bin/env python3
"""Proxy benchmark: Shroud (proxy + client --tor none) against ``ssh -R`` and a direct connection.

    .venv/bin/python bench/proxy_bench.py [--runs 3] [--bulk-bytes 1073741824] [--wrk-seconds 10]
                                          [--idle 1000] [--ttfb-samples 200] [--no-readme]
                                          [--phases idle,bulk,wrk,cost] [--fresh-conns 1000]

Everything runs on 127.0.0.1 in one go, side by side, three paths to the same nginx origin:

- direct: the load tool talks to nginx itself;
- ssh -R: our own sshd (generated host key, authorized key, ``UsePAM no``) and one
  ``ssh -N -R PORT:ORIGIN`` per run, carrying an HTTP and a TLS forward;
- shroud: ``shroud_proxy.py`` and ``shroud.py --tor none`` carrying ``app.test`` (TLS routed by
  SNI, passed through) and ``http:web.test`` (HTTP routed by Host) over one tunnel.

Measured per path and run: bulk MiB/s (curl downloads from nginx, sendfile of a sparse file;
one connection moving --bulk-bytes, and 16 at once moving --bulk-bytes in total) over TLS (SNI)
and HTTP (Host); wrk requests/s and p50/p99 latency at 1 and 64 connections over HTTP; fresh
connection time to first byte (connect, one small GET, first response byte) p50/p99, alone
and while --idle keep-alive connections are held open through the same path; and RSS growth
of the path's processes (proxy, client; sshd tree, ssh) per held connection. Each cell is the
median of --runs runs; ssh and Shroud processes are started fresh for every run, so memory
deltas are not hidden by memory kept from an earlier run.

The ``cost`` phase uses a second origin that answers in one write (bench/single_write_origin.py,
a 13-byte and a 1 KiB body, reached through Shroud as a ``tcp:`` bind (connections kept alive,
as through ssh -R) and as ``http:one.test`` (routed by Host: one exchange per connection, so wrk
reconnects for every request); through ssh -R by a third ``-R``): nginx's two-write
answers provoke ssh's Nagle/delayed-ACK stalls, which flatter Shroud's requests/s. It reports
wrk requests/s at 1 and 64 connections, TTFB of --fresh-conns fresh connections, and the CPU
the path itself burns: user+sys seconds (/proc/PID/stat) of proxy+client, or of the sshd tree
+ ssh, per 1,000 requests and per fresh connection. CPU seconds per request do not depend on
how busy the shared cores are, so they are the figure to compare across runs; the ratios are
against ssh -R measured in the same run.

Results: progress lines on stderr, a table on stdout, and (unless --no-readme) the table
between the proxy-bench markers in the "Proxy and client (--tor none) vs ssh -R vs direct"
section of bench/README.md. Every process started here is stopped in a ``finally``; every load
is bounded in size and time.

Needs root (sshd) and Debian's nginx, wrk, curl, openssh-server. No monkey-patching: the bench
itself only uses blocking sockets and subprocesses.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lib.net.sockets import set_nodelay  # noqa: E402
from tests.support.procs import admin_status, free_port, wait_port  # noqa: E402
PY = sys.executable
README = os.path.join(ROOT, "bench", "README.md")
SECTION = "## Proxy and client (--tor none) vs ssh -R vs direct"
BEGIN, END = "<!-- proxy-bench:begin -->", "<!-- proxy-bench:end -->"
PATHS = ("direct", "ssh", "shroud")
PHASES = ("idle", "bulk", "wrk", "cost")
TLS_NAME, HTTP_NAME, ONE_NAME = "app.test", "web.test", "one.test"
# The single-write origin's two answers (bench/single_write_origin.py): 13 bytes and 1 KiB.
ONE_BODIES = {"small": "/small", "1k": "/1k"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL = "/small.txt"
SMALL_BYTES = 1024  # a small static file: the request/response cost dominates, not the bytes
PARALLEL = 16  # "16 at once" in the brief
# A response head plus the small body fits in this; the reader stops at Content-Length anyway.
HEAD_LIMIT = 64 * 1024


def log(msg: str) -> None:
    print(f"[proxy-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- processes -------------------------------------------------------------------------------


class Proc:
    """A subprocess in its own session, logging to a file; stop() ends it and its group."""

    def __init__(self, name: str, argv: list[str], logdir: str, env: dict | None = None,
                 cwd: str = ROOT):
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")

    def stop(self, timeout: float = 5.0) -> None:
        # sshd's per-connection children call setsid(): find them by parent before the
        # master goes, and end each by its pid.
        kids = descendants(self.pid) if self.alive() else []
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.p.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.p.wait(5)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def _proc_table() -> dict[int, int]:
    """pid -> parent pid for every process we can see."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parens: the fields start after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        table[int(d)] = int(fields[1])
    return table


def descendants(pid: int) -> list[int]:
    table = _proc_table()
    out, frontier = [], [pid]
    for _ in range(64):  # depth bound: process trees here are 3 deep at most
        frontier = [c for c, parent in table.items() if parent in frontier]
        if not frontier:
            break
        out += frontier
    return out


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pids) -> float:
    """user+sys CPU seconds of these processes so far (/proc/PID/stat utime and stime)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / CLK_TCK


def run(argv: list[str], timeout: float, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


# --- the origin: nginx ---------------------------------------------------------------------


def make_tls(d: str) -> tuple[str, str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(TLS_NAME)
    paths = (os.path.join(d, "origin.pem"), os.path.join(d, "origin.key"), os.path.join(d, "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    ca.cert_pem.write_to_path(paths[2])
    return paths


def start_nginx(d: str, bulk_bytes: int) -> tuple[Proc, int, int, str]:
    www = os.path.join(d, "www")
    os.makedirs(www)
    os.makedirs(os.path.join(d, "nginx-tmp"))
    with open(os.path.join(www, SMALL.lstrip("/")), "wb") as f:
        f.write(b"x" * (SMALL_BYTES - 1) + b"\n")
    # Sparse files: nginx sendfile()s zero pages, so the origin costs almost nothing and the
    # path under test is what limits the rate.
    for name, size in (("bulk1", bulk_bytes), ("bulk16", bulk_bytes // PARALLEL)):
        with open(os.path.join(www, name), "wb") as f:
            f.truncate(size)
    cert, key, ca = make_tls(d)
    http_port, tls_port = free_port(), free_port()
    tmp = os.path.join(d, "nginx-tmp")
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
user root;
worker_processes 1;  # one core for the origin, one left for the path under test
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}  # 1,000 held + 64 wrk + slack, with room to spare
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    output_buffers 4 256k;  # TLS can't sendfile: big reads keep nginx from being the limit
    keepalive_timeout 600s;  # held idle connections must outlive a run
    keepalive_requests 100000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{ listen 127.0.0.1:{http_port}; root {www}; }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {www};
    }}
}}
""")
    p = Proc("nginx", ["nginx", "-p", d, "-c", conf, "-g", "daemon off;"], d)
    try:
        wait_port(http_port)
        wait_port(tls_port)
    except TimeoutError:
        raise RuntimeError(f"nginx did not start:\n{p.log_tail()}") from None
    return p, http_port, tls_port, ca


def start_single_write(d: str) -> tuple[Proc, int]:
    port = free_port()
    p = Proc("single-write-origin", [PY, os.path.join(ROOT, "bench", "single_write_origin.py"),
                                     str(port)], d)
    try:
        wait_port(port)
    except TimeoutError:
        raise RuntimeError(f"single-write origin did not start:\n{p.log_tail()}") from None
    return p, port


# --- the paths ---------------------------------------------------------------------------------


class Path:
    """One way to reach the origin: ports for HTTP and TLS, and the processes that carry it."""

    name = "?"

    def __init__(self, http_port: int, tls_port: int, one_port: int):
        self.http_port = http_port
        self.tls_port = tls_port
        self.one_port = one_port  # the single-write origin, keep-alive (Shroud: a tcp: bind)
        self.one_http_port = one_port  # the same origin by Host (Shroud: one exchange/connection)
        self.procs: list[Proc] = []

    def mem_pids(self) -> dict[str, list[int]]:
        return {}

    def cpu_pids(self) -> list[int]:
        """Every process of the path, read again each time (sshd forks per session)."""
        return [pid for pids in self.mem_pids().values() for pid in pids]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


class Direct(Path):
    name = "direct"


class SshPath(Path):
    name = "ssh"

    def __init__(self, d: str, origin_http: int, origin_tls: int, origin_one: int):
        sd = os.path.join(d, "sshd")
        os.makedirs(sd, exist_ok=True)
        host_key, user_key = os.path.join(sd, "host_key"), os.path.join(sd, "user_key")
        if not os.path.exists(host_key):
            for k in (host_key, user_key):
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], 30).check_returncode()
            shutil.copy(user_key + ".pub", os.path.join(sd, "authorized_keys"))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        sshd_port = free_port()
        conf = os.path.join(sd, "sshd_config")
        with open(conf, "w") as f:
            f.write(f"Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
                    f"PidFile {sd}/sshd.pid\nAuthorizedKeysFile {sd}/authorized_keys\n"
                    "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "AllowTcpForwarding yes\nGatewayPorts no\nUseDNS no\nPrintMotd no\n"
                    "MaxSessions 10\n")
        super().__init__(free_port(), free_port(), free_port())
        self.sshd = Proc("sshd", ["/usr/sbin/sshd", "-f", conf, "-D", "-e"], d)
        self.procs.append(self.sshd)
        try:
            wait_port(sshd_port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"sshd did not start:\n{self.sshd.log_tail()}") from None
        self.ssh = Proc("ssh", [
            "ssh", "-N", "-F", "/dev/null",
            "-R", f"127.0.0.1:{self.http_port}:127.0.0.1:{origin_http}",
            "-R", f"127.0.0.1:{self.tls_port}:127.0.0.1:{origin_tls}",
            "-R", f"127.0.0.1:{self.one_port}:127.0.0.1:{origin_one}",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-i", user_key, "-p", str(sshd_port), "root@127.0.0.1"], d)
        self.procs.append(self.ssh)
        try:
            wait_port(self.http_port)
            wait_port(self.tls_port)
            wait_port(self.one_port)
        except TimeoutError:
            tail = self.ssh.log_tail() + self.sshd.log_tail()
            self.stop()
            raise RuntimeError(f"ssh -R did not come up:\n{tail}") from None

    def mem_pids(self) -> dict[str, list[int]]:
        return {"sshd": [self.sshd.pid, *descendants(self.sshd.pid)], "ssh": [self.ssh.pid]}


class RelayPath(Path):
    """Two plain gevent forwarders in a chain (bench/gevent_relay.py), load -> relay -> relay
    -> origin, in the proxy's and the client's places: what two gevent processes cost per
    request and per fresh connection with none of Shroud's work (bench/cost_ab.py --relay).
    ``lean``: the forwarders' ``--lean`` way (watcher callbacks, no greenlet per connection).
    Only the single-write origin is forwarded (``one_port``)."""

    def __init__(self, d: str, origin_one: int, lean: bool = False):
        self.name = "lean" if lean else "relay"
        first, second = free_port(), free_port()
        super().__init__(0, 0, first)
        script = [PY, os.path.join(ROOT, "bench", "gevent_relay.py")] + (["--lean"] if lean else [])
        self.near = Proc(f"{self.name}-near", script + [str(first), str(second)], d)
        self.procs.append(self.near)
        self.far = Proc(f"{self.name}-far", script + [str(second), str(origin_one)], d)
        self.procs.append(self.far)
        try:
            wait_port(first)
            wait_port(second)
        except TimeoutError:
            tail = self.near.log_tail() + self.far.log_tail()
            self.stop()
            raise RuntimeError(f"the gevent relays did not start:\n{tail}") from None

    def mem_pids(self) -> dict[str, list[int]]:
        return {"near": [self.near.pid], "far": [self.far.pid]}


class ShroudPath(Path):
    """``root``: the source tree whose shroud_proxy.py and shroud.py run (the same venv python),
    so bench/cost_ab.py can run a base tree beside a changed one; ``name`` tells them apart."""

    name = "shroud"
    env: dict = {}  # extra environment for the proxy and client processes

    def __init__(self, d: str, origin_http: int, origin_tls: int, origin_one: int,
                 root: str = ROOT, name: str | None = None):
        if name is not None:
            self.name = name
        self.root = root
        pdata, cdata = (os.path.join(d, f"{self.name}-proxy-data"),
                        os.path.join(d, f"{self.name}-client-data"))
        out = run([PY, "shroud_proxy.py", "--data-dir", pdata, "--print-fingerprint"], 60, cwd=root)
        if out.returncode:
            raise RuntimeError(f"shroud_proxy.py --print-fingerprint failed: {out.stderr}")
        pin = out.stdout.strip()
        tunnel, self.admin = free_port(), free_port()
        self.token = secrets.token_hex(16)  # the status API wants a bearer token
        # The single-write origin twice: by Host (one.test; the proxy lets a routed HTTP
        # connection carry one exchange, docs/SECURITY.md) and as a raw tcp: bind, whose
        # connections stay open for many requests as ssh -R's do.
        http, raw = free_port(), free_port()
        super().__init__(http, free_port(), raw)
        self.one_http_port = http
        self.proxy = Proc(f"{self.name}-proxy", [
            PY, "shroud_proxy.py", "--data-dir", pdata,
            "--tunnel-addr", f"127.0.0.1:{tunnel}", "--https-addr", f"127.0.0.1:{self.tls_port}",
            "--http-addr", f"127.0.0.1:{self.http_port}", "--admin-addr", f"127.0.0.1:{self.admin}",
            "--admin-token", self.token,
            # 1,000 held + 64 wrk + closing streams stay under the client's own 1,024 limit.
            "--max-streams-per-tunnel", "4096", "--log-level", "warning",
            "--tcp-ports", str(raw)], d, env=self.env, cwd=root)
        self.procs.append(self.proxy)
        try:
            wait_port(tunnel)
            wait_port(self.admin)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"proxy did not start:\n{self.proxy.log_tail()}") from None
        self.client = Proc(f"{self.name}-client", [
            PY, "shroud.py", "--tor", "none", "--data-dir", cdata, "--status", "plain",
            "--log-level", "warning", "--proxy", f"127.0.0.1:{tunnel}", "--pin", pin,
            TLS_NAME, f"127.0.0.1:{origin_tls}", f"http:{HTTP_NAME}", f"127.0.0.1:{origin_http}",
            f"http:{ONE_NAME}", f"127.0.0.1:{origin_one}", f"tcp:{raw}", f"127.0.0.1:{origin_one}"], d,
            env=self.env, cwd=root)
        self.procs.append(self.client)
        try:
            self._wait_bound((TLS_NAME, HTTP_NAME, ONE_NAME, f"tcp:{raw}"), 30)
            wait_port(raw)
        except TimeoutError as e:
            tail = self.client.log_tail() + self.proxy.log_tail()
            self.stop()
            raise RuntimeError(f"{e}\n{tail}") from None

    def _wait_bound(self, names, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = admin_status(self.admin, self.token, timeout=5)
            bound = {b["name"] for b in last.get("bindings", []) if b.get("tunnels")}
            if all(n in bound for n in names):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{names} not bound after {timeout} s: {last}")

    def mem_pids(self) -> dict[str, list[int]]:
        return {"proxy": [self.proxy.pid], "client": [self.client.pid]}


# --- load: small HTTP on plain sockets -------------------------------------------------------


def request_bytes(keep_alive: bool, target: str = SMALL, host: str = HTTP_NAME) -> bytes:
    conn = "keep-alive" if keep_alive else "close"
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n".encode()


def read_response(sock: socket.socket) -> bytes:
    """Read one response with a Content-Length body (nginx's static file answer)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(HEAD_LIMIT)
        if not data:
            raise ConnectionError(f"connection closed mid-response: {buf[:200]!r}")
        buf += data
        if len(buf) > HEAD_LIMIT:
            raise ConnectionError("response head too long")
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer: {head[:200]!r}")
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    want = int(m.group(1)) if m else 0
    while len(body) < want:
        data = sock.recv(HEAD_LIMIT)
        if not data:
            raise ConnectionError("connection closed mid-body")
        body += data
    return body


def ttfb_samples(port: int, n: int, timeout: float = 10.0, req: bytes | None = None) -> list[float]:
    """n fresh connections, one after another: seconds from connect() to the first byte."""
    req = req or request_bytes(keep_alive=False)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            set_nodelay(s)
            s.sendall(req)
            first = s.recv(HEAD_LIMIT)
            out.append(time.perf_counter() - t0)
            if not first.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"unexpected answer: {first[:200]!r}")
            while s.recv(HEAD_LIMIT):  # Connection: close: drain to EOF (bounded by timeout)
                pass
        finally:
            s.close()
    return out


def hold_idle(port: int, n: int, req: bytes, timeout: float = 10.0) -> list[socket.socket]:
    """n keep-alive connections, each after one answered GET: established end to end, idle."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            held.append(s)
            s.sendall(req)
            read_response(s)
    except BaseException:
        release(held)
        raise
    return held


def release(held: list[socket.socket]) -> None:
    for s in held:
        try:
            s.close()
        except OSError:
            pass
    held.clear()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


# --- load: bulk with curl, requests with wrk -----------------------------------------------


def bulk(path: Path, proto: str, conns: int, total: int, ca: str, timeout: float) -> float:
    """MiB/s of `total` bytes downloaded over `conns` connections at once (curl, to /dev/null)."""
    name = "bulk1" if conns == 1 else "bulk16"
    each = total if conns == 1 else total // PARALLEL
    if proto == "tls":
        port = path.tls_port
        args = ["--cacert", ca, "--resolve", f"{TLS_NAME}:{port}:127.0.0.1",
                f"https://{TLS_NAME}:{port}/{name}"]
    else:
        port = path.http_port
        args = ["-H", f"Host: {HTTP_NAME}", f"http://127.0.0.1:{port}/{name}"]
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(int(timeout)),
            "-w", "%{http_code} %{size_download}", *args]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(conns)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout + 10))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    elapsed = time.perf_counter() - t0
    for (out, err), p in zip(outs, procs):
        code, _, size = out.strip().partition(" ")
        if p.returncode or code != "200" or int(size or 0) != each:
            raise RuntimeError(f"bulk {proto} via {path.name} failed: rc={p.returncode} "
                               f"out={out!r} err={err.strip()!r}")
    return each * conns / elapsed / (1 << 20)


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(path: Path, conns: int, seconds: int, port: int | None = None, target: str = SMALL,
        host: str = HTTP_NAME, addr: str = "127.0.0.1", headers: tuple[str, ...] = ()) -> dict:
    """``headers``: more request header lines for wrk's -H (e.g. "Connection: close")."""
    threads = 1 if conns == 1 else min(2, os.cpu_count() or 1)
    port = port or path.http_port
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--latency",
            "--timeout", "5s", "-H", f"Host: {host}",
            *(a for h in headers for a in ("-H", h)), f"http://{addr}:{port}{target}"]
    out = run(argv, seconds + 30)
    if out.returncode:
        raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    dist = dict(re.findall(r"^\s*(50|99)%\s+(\S+)", text, re.M))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    return {"rps": rps, "p50": _ms(dist["50"]), "p99": _ms(dist["99"]), "errors": errors,
            "requests": requests}


# --- one run ----------------------------------------------------------------------------------


def phase_idle(path: Path, args, res: dict) -> None:
    """RSS growth per held connection, and TTFB while they are held; then TTFB alone."""
    tag = path.name
    for _ in range(3):  # warm the path (first stream, first connection to the origin)
        ttfb_samples(path.http_port, 5)
    pids = path.mem_pids()
    before = {k: rss_kib(v) for k, v in pids.items()}
    t0 = time.monotonic()
    # Held on the single-write origin's keep-alive port: through Shroud a connection routed by
    # Host ends after one exchange (docs/SECURITY.md), so it would not stay held; the tcp: bind
    # carries it as ssh -R's forward does.
    req = request_bytes(keep_alive=True, target=ONE_BODIES["small"], host=ONE_NAME)
    held = hold_idle(path.one_port, args.idle, req)
    try:
        time.sleep(1.0)  # let the last streams settle before reading RSS
        after = {k: rss_kib(v) for k, v in pids.items()}
        for k in pids:
            res[f"mem_{k}"] = (after[k] - before[k]) / args.idle
            res[f"rss_{k}"] = after[k] / 1024
        if pids:
            res["mem_total"] = sum(after[k] - before[k] for k in pids) / args.idle
        log(f"  {tag}: {args.idle} held in {time.monotonic() - t0:.1f} s; RSS growth "
            + (", ".join(f"{k} {res[f'mem_{k}']:.1f} KiB/conn" for k in pids) or "-"))
        xs = ttfb_samples(path.http_port, args.ttfb_samples)
        res["ttfb_held_p50"], res["ttfb_held_p99"] = percentile(xs, 50) * 1e3, percentile(xs, 99) * 1e3
        # The held connections must still be alive (not silently dropped by the path).
        for s in held[:: max(1, len(held) // 20)]:
            s.sendall(req)
            read_response(s)
    finally:
        release(held)
    time.sleep(0.5)
    xs = ttfb_samples(path.http_port, args.ttfb_samples)
    res["ttfb_p50"], res["ttfb_p99"] = percentile(xs, 50) * 1e3, percentile(xs, 99) * 1e3
    log(f"  {tag}: ttfb p50 {res['ttfb_p50']:.2f} ms p99 {res['ttfb_p99']:.2f} ms; with "
        f"{args.idle} held p50 {res['ttfb_held_p50']:.2f} ms p99 {res['ttfb_held_p99']:.2f} ms")


def phase_bulk(path: Path, args, ca: str, res: dict, proto: str, conns: int) -> None:
    v = bulk(path, proto, conns, args.bulk_bytes, ca, args.bulk_timeout)
    res[f"bulk_{proto}_{conns}"] = v
    log(f"  {path.name}: bulk {proto} x{conns}: {v:.0f} MiB/s")


def phase_wrk(path: Path, args, res: dict, conns: int) -> None:
    w = wrk(path, conns, args.wrk_seconds)
    if w["errors"]:
        log(f"  {path.name}: wrk c={conns}: {w['errors']} errors")
    res[f"wrk{conns}_rps"], res[f"wrk{conns}_p50"], res[f"wrk{conns}_p99"] = (
        w["rps"], w["p50"], w["p99"])
    res[f"wrk{conns}_errors"] = w["errors"]
    log(f"  {path.name}: wrk c={conns}: {w['rps']:.0f} req/s p50 {w['p50']:.2f} ms "
        f"p99 {w['p99']:.2f} ms")


def phase_cost(path: Path, args, res: dict, body: str, conns: int, by_host: bool = False) -> None:
    """wrk against the single-write origin; the path's CPU (user+sys) per 1,000 requests.
    ``by_host``: Shroud routes by Host, one request per connection (wrk reconnects)."""
    pids = path.cpu_pids()
    c0 = cpu_seconds(pids)
    w = wrk(path, conns, args.wrk_seconds, port=path.one_http_port if by_host else path.one_port,
            target=ONE_BODIES[body], host=ONE_NAME)
    cpu = cpu_seconds(pids) - c0
    tag = f"one_{body}_{conns}" + ("_host" if by_host else "")
    res[f"{tag}_rps"], res[f"{tag}_p50"] = w["rps"], w["p50"]
    if pids and w["requests"]:
        res[f"{tag}_cpu"] = cpu / w["requests"] * 1000
    log(f"  {path.name}: single-write {body} c={conns}: {w['rps']:.0f} req/s p50 {w['p50']:.2f} ms"
        + (f", CPU {res[f'{tag}_cpu']:.3f} s per 1,000 requests" if f"{tag}_cpu" in res else "")
        + (f", {w['errors']} errors" if w["errors"] else ""))


def phase_fresh(path: Path, args, res: dict) -> None:
    """Fresh connections to the single-write origin, one after another: TTFB and the path's
    CPU per connection."""
    req = request_bytes(keep_alive=False, target=ONE_BODIES["small"], host=ONE_NAME)
    ttfb_samples(path.one_http_port, 5, req=req)  # warm
    pids = path.cpu_pids()
    c0 = cpu_seconds(pids)
    xs = ttfb_samples(path.one_http_port, args.fresh_conns, req=req)
    cpu = cpu_seconds(pids) - c0
    res["one_ttfb_p50"], res["one_ttfb_p99"] = percentile(xs, 50) * 1e3, percentile(xs, 99) * 1e3
    if pids:
        res["one_conn_cpu"] = cpu / len(xs) * 1e3
    log(f"  {path.name}: single-write fresh conn TTFB p50 {res['one_ttfb_p50']:.2f} ms p99 "
        f"{res['one_ttfb_p99']:.2f} ms" + (f", CPU {res['one_conn_cpu']:.3f} ms per connection"
                                          if pids else ""))


def one_run(live: list[Path], args, ca: str) -> dict[str, dict]:
    """Every phase on every path, the paths taking turns within each phase, so a busy moment
    on a shared machine does not land on one path only. Held-connection memory comes first,
    on fresh processes: earlier loads leave freed-but-kept memory that would hide its cost."""
    res: dict[str, dict] = {p.name: {} for p in live}
    phases = []
    if "idle" in args.phase_list:
        phases.append(lambda p: phase_idle(p, args, res[p.name]))
    if "bulk" in args.phase_list:
        for proto in ("tls", "http"):
            for conns in (1, PARALLEL):
                phases.append(lambda p, proto=proto, conns=conns:
                              phase_bulk(p, args, ca, res[p.name], proto, conns))
    if "wrk" in args.phase_list:
        for conns in (1, 64):
            phases.append(lambda p, conns=conns: phase_wrk(p, args, res[p.name], conns))
    if "cost" in args.phase_list:
        phases.append(lambda p: phase_fresh(p, args, res[p.name]))
        for body in ONE_BODIES:
            for conns in (1, 64):
                phases.append(lambda p, body=body, conns=conns:
                              phase_cost(p, args, res[p.name], body, conns))
        phases.append(lambda p: phase_cost(p, args, res[p.name], "small", 64, by_host=True))
    for phase in phases:
        for path in live:
            phase(path)
    return res


# --- report -------------------------------------------------------------------------------------

# (key, label, unit, higher is better)
ROWS = [
    ("bulk_tls_1", "bulk TLS by SNI, 1 conn", "MiB/s", True),
    ("bulk_tls_16", "bulk TLS by SNI, 16 conns", "MiB/s", True),
    ("bulk_http_1", "bulk HTTP by Host, 1 conn", "MiB/s", True),
    ("bulk_http_16", "bulk HTTP by Host, 16 conns", "MiB/s", True),
    ("wrk1_rps", "wrk 1 conn", "req/s", True),
    ("wrk1_p50", "wrk 1 conn p50", "ms", False),
    ("wrk1_p99", "wrk 1 conn p99", "ms", False),
    ("wrk64_rps", "wrk 64 conns", "req/s", True),
    ("wrk64_p50", "wrk 64 conns p50", "ms", False),
    ("wrk64_p99", "wrk 64 conns p99 (goal < 10 ms)", "ms", False),
    ("ttfb_p50", "fresh conn TTFB p50", "ms", False),
    ("ttfb_p99", "fresh conn TTFB p99", "ms", False),
    ("ttfb_held_p50", "TTFB p50, 1,000 held", "ms", False),
    ("ttfb_held_p99", "TTFB p99, 1,000 held", "ms", False),
    ("mem_total", "RSS per held conn (path total)", "KiB", False),
    # The single-write origin (bench/single_write_origin.py): no Nagle stall to hide behind.
    ("one_small_1_rps", "single-write small keep-alive, 1 conn", "req/s", True),
    ("one_small_1_p50", "single-write small keep-alive, 1 conn p50", "ms", False),
    ("one_small_64_rps", "single-write small keep-alive, 64 conns", "req/s", True),
    ("one_1k_1_rps", "single-write 1 KiB keep-alive, 1 conn", "req/s", True),
    ("one_1k_64_rps", "single-write 1 KiB keep-alive, 64 conns", "req/s", True),
    ("one_small_1_cpu", "CPU per 1,000 req keep-alive, small, 1 conn", "cpu s", False),
    ("one_small_64_cpu", "CPU per 1,000 req keep-alive, small, 64 conns", "cpu s", False),
    ("one_1k_1_cpu", "CPU per 1,000 req keep-alive, 1 KiB, 1 conn", "cpu s", False),
    ("one_1k_64_cpu", "CPU per 1,000 req keep-alive, 1 KiB, 64 conns", "cpu s", False),
    ("one_small_64_host_rps", "single-write small by Host (1 req/conn), 64 conns", "req/s", True),
    ("one_small_64_host_cpu", "CPU per 1,000 req by Host (1 req/conn), 64 conns", "cpu s", False),
    ("one_ttfb_p50", "single-write fresh conn TTFB p50", "ms", False),
    ("one_ttfb_p99", "single-write fresh conn TTFB p99", "ms", False),
    ("one_conn_cpu", "CPU per fresh conn", "cpu ms", False),
]
MEM_DETAIL = [("ssh", "mem_sshd", "sshd"), ("ssh", "mem_ssh", "ssh"),
              ("shroud", "mem_proxy", "proxy"), ("shroud", "mem_client", "client")]


def median(runs: list[dict], key: str):
    xs = [r[key] for r in runs if key in r]
    return statistics.median(xs) if xs else None


def fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("ms",):
        return f"{v:.2f}"
    if unit in ("cpu s", "cpu ms"):
        return f"{v:.3f}"
    if unit == "KiB":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(results: dict[str, list[dict]], idle: int) -> str:
    med = {p: {k: median(results[p], k) for k, *_ in ROWS + [(m, 0, 0, 0) for _, m, _ in MEM_DETAIL]}
           for p in PATHS}
    lines = ["| row | unit | direct | ssh -R | Shroud | Shroud / ssh -R | Shroud / direct | goal |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, label, unit, higher in ROWS:
        if "held" in label:
            label = label.replace("1,000", f"{idle:,}")
        d, s, h = med["direct"][key], med["ssh"][key], med["shroud"][key]
        if d is None and s is None and h is None:
            continue  # a phase left out (--phases)
        if h is None or s is None:
            goal = "-"
        elif higher:
            goal = "met" if h >= s else "**missed**"
        else:
            goal = "met" if h <= s else "**missed**"
        if key == "wrk64_p99" and h is not None:
            goal += ", < 10 ms " + ("met" if h < 10 else "**missed**")
        lines.append(f"| {label} | {unit} | {fmt(d, unit)} | {fmt(s, unit)} | {fmt(h, unit)} | "
                     f"{ratio(h, s)} | {ratio(h, d)} | {goal} |")
    if all(med[p][k] is None for p, k, _ in MEM_DETAIL):
        return "\n".join(lines)
    detail = ", ".join(f"{label} {fmt(med[p][k], 'KiB')}" for p, k, label in MEM_DETAIL)
    lines.append("")
    lines.append(f"RSS growth per held connection by process (KiB): {detail}.")
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}, {platform.machine()}), Linux {platform.release()}"


def versions() -> str:
    def first(argv):
        try:
            out = run(argv, 10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"
    return (f"Python {platform.python_version()}, {first(['nginx', '-v'])}, "
            f"{first(['ssh', '-V'])}, {first(['curl', '--version']).split(' (')[0]}, "
            f"wrk {first(['wrk', '-v']).split()[1] if first(['wrk', '-v']) != '?' else '?'}")


def update_readme(block: str) -> None:
    text = open(README).read() if os.path.exists(README) else "# Benchmarks\n"
    body = f"{BEGIN}\n{block}\n{END}"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{body}\n"
    else:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        section = text[start: nxt if nxt >= 0 else len(text)]
        if BEGIN in section and END in section:
            a, b = section.index(BEGIN), section.index(END) + len(END)
            section = section[:a] + body + section[b:]
        else:
            section = section.rstrip("\n") + f"\n\n{body}\n"
        text = text[:start] + section + (text[nxt:] if nxt >= 0 else "")
    with open(README, "w") as f:
        f.write(text)


# --- main ---------------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per row; the median is reported")
    ap.add_argument("--bulk-bytes", type=int, default=1 << 30,
                    help="bytes per bulk measurement (one connection, or split over 16)")
    ap.add_argument("--bulk-timeout", type=float, default=60.0, help="seconds per bulk transfer")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections held open")
    ap.add_argument("--ttfb-samples", type=int, default=200, help="fresh connections per TTFB row")
    ap.add_argument("--paths", default="direct,ssh,shroud",
                    help="subset of " + ",".join(PATHS))
    ap.add_argument("--phases", default=",".join(PHASES), help="subset of " + ",".join(PHASES))
    ap.add_argument("--fresh-conns", type=int, default=1000,
                    help="fresh connections for the CPU-per-connection row")
    ap.add_argument("--no-readme", action="store_true", help="do not write bench/README.md")
    args = ap.parse_args()
    args.path_list = [p for p in args.paths.split(",") if p]
    args.phase_list = [p for p in args.phases.split(",") if p]
    if any(p not in PHASES for p in args.phase_list):
        ap.error(f"bad --phases: pick from {','.join(PHASES)}")
    if any(p not in PATHS for p in args.path_list) or args.runs < 1:
        ap.error("bad --paths or --runs")
    if os.geteuid() != 0 and "ssh" in args.path_list:
        ap.error("the ssh -R baseline starts its own sshd: run as root (or --paths direct,shroud)")
    for tool in ("nginx", "wrk", "curl", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (Debian packages nginx, wrk, curl, openssh-server)")
    return args


def main() -> int:
    args = parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.idle + 1024)), hard))
    started = time.time()
    d = tempfile.mkdtemp(prefix="shroud-proxy-bench-")
    log(f"work dir {d}; {args.runs} run(s), paths {', '.join(args.path_list)}")
    try:
        results = run_all(args, d)
    finally:
        if os.environ.get("PROXY_BENCH_KEEP"):
            log(f"logs kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)

    took = time.time() - started
    tab = table(results, args.idle)
    header = (f"`.venv/bin/python bench/proxy_bench.py --runs {args.runs} --phases {args.phases}` on "
              f"{time.strftime('%Y-%m-%d')}, {machine()}; {versions()}. Median of {args.runs} "
              f"run(s), {took / 60:.1f} min in all. Bulk: {args.bulk_bytes / (1 << 20):.0f} MiB "
              f"per row; wrk {args.wrk_seconds} s per row; TTFB {args.ttfb_samples} fresh "
              f"connections per row; {args.idle} idle keep-alive connections held.")
    print(header + "\n\n" + tab)
    print("\nraw runs:\n" + json.dumps(results, indent=1), file=sys.stderr)
    if not args.no_readme:
        update_readme(header + "\n\n" + tab)
        log(f"wrote {README}")
    return 0


def run_all(args, d: str) -> dict[str, list[dict]]:
    """nginx once, then ``--runs`` runs of every path, each path started fresh per run."""
    paths = args.path_list
    results: dict[str, list[dict]] = {p: [] for p in PATHS}
    nginx = one = None
    live: list[Path] = []
    try:
        nginx, origin_http, origin_tls, ca = start_nginx(d, args.bulk_bytes)
        one, origin_one = start_single_write(d)
        log(f"nginx on :{origin_http} (HTTP) and :{origin_tls} (TLS); single-write origin on "
            f":{origin_one}")
        for i in range(args.runs):
            # Rotate the order each run; ssh and Shroud start fresh for every run.
            order = paths[i % len(paths):] + paths[:i % len(paths)]
            log(f"run {i + 1}/{args.runs}: starting {', '.join(order)}")
            for name in order:
                if name == "direct":
                    live.append(Direct(origin_http, origin_tls, origin_one))
                elif name == "ssh":
                    live.append(SshPath(d, origin_http, origin_tls, origin_one))
                else:
                    live.append(ShroudPath(d, origin_http, origin_tls, origin_one))
            try:
                for name, res in one_run(live, args, ca).items():
                    results[name].append(res)
            finally:
                while live:
                    live.pop().stop()
    finally:
        while live:
            live.pop().stop()
        if nginx is not None:
            nginx.stop()
        if one is not None:
            one.stop()
    return results


if __name__ == "__main__":
    sys.exit(main())
