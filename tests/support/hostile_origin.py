"""An attacker's origin for hijack tests: it keeps every connection alive, whatever it is told.

    python tests/support/hostile_origin.py --port PORT --log FILE

Each request head it receives is appended to FILE (one JSON line: request line, Host, Cookie),
so a test can tell whether another visitor's request reached it. Every request is answered
``200 OK`` with ``Connection: keep-alive`` and the body ``hijacked\\n`` (a WebSocket upgrade
too: no ``101``). When the connection's other side half-closes, one more unsolicited
response is sent before closing: a front that reused the connection for another visitor
would hand that visitor this answer.
"""
import argparse
import json
import socket
import sys
import threading

EVIL = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n"
        b"Connection: keep-alive\r\n\r\nhijacked\n")


def heads(sock):
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            yield head


def serve(sock, log_path, lock):
    try:
        for head in heads(sock):
            lines = head.decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(":") for line in lines[1:])}
            with lock, open(log_path, "a") as f:
                f.write(json.dumps({"line": lines[0], "host": fields.get("host"),
                                    "cookie": fields.get("cookie")}) + "\n")
            sock.sendall(EVIL)
        sock.sendall(EVIL)  # unsolicited, after the peer's FIN
    except OSError:
        pass
    finally:
        sock.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    lock = threading.Lock()
    srv = socket.create_server(("127.0.0.1", a.port))
    print(a.port, flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, a.log, lock), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
