"""A small origin for end-to-end tests: HTTP/1.1 keep-alive, optional TLS, WebSocket echo.

    python tests/support/origin.py --port 0 [--tls CERT KEY] --port-file FILE

Endpoints: GET /hello ("hello from origin" or --hello TEXT), GET /bytes/N (N deterministic bytes), POST /sha256 (hash of the body),
GET /peer (what the origin saw: PROXY header, peer address, Host and request target), GET /ws (WebSocket echo).
With --proxy-protocol, a PROXY v1/v2 header is expected at the start of every connection.
"""
import argparse
import base64
import hashlib
import http.server
import json
import socket
import ssl
import struct
import sys


def pattern(n: int) -> bytes:
    block = hashlib.sha256(b"shroud").digest() * 2048  # 64 KiB
    out = block * (n // len(block)) + block[: n % len(block)]
    return out


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy_header = b""

    def log_message(self, *a):
        pass

    def _send(self, code, body: bytes, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path.startswith(("http://", "https://")):  # absolute-form: a server MUST accept it
            parts = path.split("/", 3)                # (RFC 9112 3.2.2)
            path = "/" + (parts[3] if len(parts) > 3 else "")
        if path == "/hello":
            self._send(200, self.server.hello)
        elif path.startswith("/bytes/"):
            n = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            data = pattern(n)
            view = memoryview(data)
            for i in range(0, n, 1 << 20):
                self.wfile.write(view[i:i + (1 << 20)])
        elif path == "/peer":
            body = json.dumps({"peer": list(self.client_address[:2]),
                               "proxy_header": self.server.proxy_headers.get(
                                   self.client_address[:2], b"").decode("latin-1"),
                               "host": self.headers.get("Host"), "target": self.path}).encode()
            self._send(200, body, "application/json")
        elif path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
        else:
            self._send(404, b"not found\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        left = n
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        self._send(200, (h.hexdigest() + "\n").encode())

    def _websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        r = self.rfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            opcode = head[0] & 0x0F
            n = head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", r.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            hdr = bytes([0x80 | opcode])
            hdr += bytes([n]) if n < 126 else (b"\x7e" + struct.pack(">H", n) if n < 65536
                                                else b"\x7f" + struct.pack(">Q", n))
            self.wfile.write(hdr + payload)
            self.wfile.flush()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, addr, handler, tls_ctx, expect_proxy):
        super().__init__(addr, handler)
        self.tls_ctx = tls_ctx
        self.expect_proxy = expect_proxy
        self.proxy_headers = {}
        self.hello = b"hello from origin\n"

    def finish_request(self, request, client_address):
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.expect_proxy:
            self.proxy_headers[client_address[:2]] = read_proxy_header(request)
        if self.tls_ctx is not None:
            request.settimeout(10)
            try:
                request = self.tls_ctx.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


def read_proxy_header(sock) -> bytes:
    first = sock.recv(16, socket.MSG_PEEK)
    if first.startswith(b"PROXY "):
        line = b""
        while not line.endswith(b"\r\n"):
            line += sock.recv(1)
        return line
    if first.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
        head = b""
        while len(head) < 16:
            head += sock.recv(16 - len(head))
        n = struct.unpack(">H", head[14:16])[0]
        body = b""
        while len(body) < n:
            body += sock.recv(n - len(body))
        return b"v2:" + base64.b16encode(head + body)
    return b""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--port-file")
    p.add_argument("--proxy-protocol", action="store_true")
    p.add_argument("--hello", default="hello from origin", help="the body of GET /hello")
    a = p.parse_args()
    ctx = None
    if a.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*a.tls)
        ctx.set_alpn_protocols(["http/1.1"])
    srv = Server(("127.0.0.1", a.port), Handler, ctx, a.proxy_protocol)
    srv.hello = a.hello.encode() + b"\n"
    port = srv.server_address[1]
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write(str(port))
        import os
        os.replace(a.port_file + ".tmp", a.port_file)
    print(port, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
