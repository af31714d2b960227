"""What a public visitor does in end-to-end tests, and the certificates of the test sites.

    site = tls_site(directory, "app.test", "*.wild.test")   # .ca .ca_pem .cert_pem .key_pem
    status, body, der = https_get(site.ca_pem, port, "app.test", "/hello")
    status, body = http_get(port, "web.test", "/hello", addr="127.0.0.1")
    ws_upgrade(sock, "web.test", "/ws") -> response head;  ws_echo(sock, b"msg") -> echoed bytes
"""
from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import struct
from dataclasses import dataclass

import trustme


@dataclass
class Site:
    ca: trustme.CA
    ca_pem: str
    cert_pem: str
    key_pem: str


def tls_site(directory, *names: str) -> Site:
    """A throwaway CA and a certificate for ``names``, written as PEM files in ``directory``."""
    ca = trustme.CA()
    cert = ca.issue_cert(*names)
    d = str(directory)
    paths = [os.path.join(d, n) for n in ("ca.pem", "origin.pem", "origin.key")]
    ca.cert_pem.write_to_path(paths[0])
    cert.cert_chain_pems[0].write_to_path(paths[1])
    cert.private_key_pem.write_to_path(paths[2])
    return Site(ca, *paths)


def https_get(ca_pem: str, port: int, name: str, path: str = "/hello", timeout: float = 30.0,
              addr: str = "127.0.0.1"):
    """GET over TLS with SNI ``name`` to addr:port: (status, body, server's cert DER)."""
    ctx = ssl.create_default_context(cafile=ca_pem)
    raw = socket.create_connection((addr, port), timeout=timeout)
    tls = ctx.wrap_socket(raw, server_hostname=name)
    conn = http.client.HTTPConnection(name, port, timeout=timeout)
    conn.sock = tls
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        return r.status, body, tls.getpeercert(binary_form=True)
    finally:
        conn.close()


def http_get(port: int, host: str, path: str = "/hello", timeout: float = 30.0,
             addr: str = "127.0.0.1"):
    """GET with Host ``host`` to addr:port: (status, body)."""
    c = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def ws_upgrade(sock, host: str, path: str = "/ws") -> bytes:
    """Send a WebSocket upgrade request; the response head."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = sock.recv(1)
        if not b:
            break
        head += b
    return head


def ws_echo(sock, msg: bytes) -> bytes:
    """Send one masked binary message; read one message back."""
    mask = os.urandom(4)
    n = len(msg)
    hdr = b"\x82" + (bytes([0x80 | n]) if n < 126 else
                     (b"\xfe" + struct.pack(">H", n) if n < 65536 else
                      b"\xff" + struct.pack(">Q", n)))
    sock.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
    f = sock.makefile("rb")
    h2 = f.read(2)
    ln = h2[1] & 0x7F
    if ln == 126:
        ln = struct.unpack(">H", f.read(2))[0]
    elif ln == 127:
        ln = struct.unpack(">Q", f.read(8))[0]
    return f.read(ln)
