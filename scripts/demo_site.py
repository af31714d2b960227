#!/usr/bin/env python3
"""The demo's sample HTTPS site: one page saying when it was served, to whom and through which
public proxy.

    demo_site.py PORT CERT KEY PROXIES_JSON

Every connection comes from the Shroud client (run with ``--proxy-protocol v2``) and starts with
a PROXY protocol v2 header: the visitor's address and, in the Shroud TLV
(lib.client.tunnels.PP2_TYPE_SHROUD_PROXY), the tunnel address of the proxy that carried it.
PROXIES_JSON maps those tunnel addresses to the demo's proxy names. Then TLS, then HTTP.
"""
import datetime
import html
import http.server
import ipaddress
import json
import ssl
import struct
import sys

PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_SHROUD_PROXY = 0xE0  # lib.client.tunnels.PP2_TYPE_SHROUD_PROXY
HEADER_TIMEOUT = 10  # seconds; the client sends the header at once, before any visitor byte

PAGE = """<!doctype html><meta charset=utf-8><title>Shroud demo</title>
<style>body{{font:18px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;color:#223}}
code{{background:#eef;padding:.1em .3em}}</style>
<h1>Hello from a shrouded origin</h1>
<p>This page is served by a site on <code>127.0.0.1</code> that no visitor connects to. You
reached it through a public Shroud proxy, which read only the TLS SNI of your connection and
passed the encrypted bytes through a tunnel that crosses a (private) Tor network to the origin.
The proxy never saw this page in plaintext and does not know where the origin is.</p>
<p id=served>Served at <b>{when}</b> through <b>{proxy}</b> to visitor <code>{visitor}</code>.</p>
<p>Reload to see another request; open the other proxies' ports to see the same origin behind
each of them.</p>
"""


def read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed inside the PROXY header")
        data += chunk
    return data


def read_proxy_v2(sock) -> tuple[str, str]:
    """(visitor address, proxy tunnel address) from a PROXY v2 header; '?' where absent."""
    head = read_exactly(sock, 16)
    if head[:12] != PP2_SIGNATURE:
        raise ValueError("no PROXY v2 header (is the client running with --proxy-protocol v2?)")
    body = read_exactly(sock, struct.unpack(">H", head[14:16])[0])
    family = head[13]
    if head[12] & 0x0F == 0 or family not in (0x11, 0x21):  # LOCAL, or not TCP over IP
        return "?", "?"
    n = 4 if family == 0x11 else 16
    src = ipaddress.ip_address(body[:n])
    port = struct.unpack(">H", body[2 * n:2 * n + 2])[0]
    visitor = f"{src}:{port}" if src.version == 4 else f"[{src}]:{port}"
    proxy, tlvs = "?", body[2 * n + 4:]
    while len(tlvs) >= 3:
        kind, length = tlvs[0], struct.unpack(">H", tlvs[1:3])[0]
        if kind == PP2_TYPE_SHROUD_PROXY:
            proxy = tlvs[3:3 + length].decode("utf-8", "replace")
        tlvs = tlvs[3 + length:]
    return visitor, proxy


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server API)
        if self.path not in ("/", "/index.html"):
            self.send_error(404)
            return
        visitor, proxy = self.request.shroud_peer
        names = self.server.proxy_names
        shown = f"{names[proxy]} (tunnel {proxy})" if proxy in names else proxy
        now = datetime.datetime.now(datetime.timezone.utc)
        body = PAGE.format(when=now.strftime("%Y-%m-%d %H:%M:%S UTC"), proxy=html.escape(shown),
                           visitor=html.escape(visitor)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # each reload shows its own request
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.request.shroud_peer[0], fmt % args))


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, ctx, proxy_names: dict):
        super().__init__(addr, Handler)
        self.ctx = ctx
        self.proxy_names = proxy_names

    def finish_request(self, request, client_address):
        request.settimeout(HEADER_TIMEOUT)
        try:
            peer = read_proxy_v2(request)
            request = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, EOFError, ValueError) as e:  # ssl.SSLError is an OSError
            sys.stderr.write(f"connection from {client_address[0]}: {e}\n")
            return
        request.shroud_peer = peer
        request.settimeout(60)
        super().finish_request(request, client_address)


def main() -> int:
    port, cert, key, proxies = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    Server(("127.0.0.1", port), ctx, json.loads(proxies)).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
