#!/usr/bin/env python3
"""The demo's sample HTTPS site: static files over TLS on 127.0.0.1.

    demo_site.py PORT CERT KEY DIRECTORY
"""
import functools
import http.server
import ssl
import sys


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, handler, ctx):
        super().__init__(addr, handler)
        self.ctx = ctx

    def finish_request(self, request, client_address):
        request.settimeout(10)
        try:
            request = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        request.settimeout(60)
        super().finish_request(request, client_address)


def main() -> int:
    port, cert, key, root = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
    Server(("127.0.0.1", port), handler, ctx).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
