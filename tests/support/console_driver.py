"""Drives lib.client.console.Console live with a scripted client, for tests/test_console.py.

    python tests/support/console_driver.py ROUNDS

Each round logs a line (some long enough to wrap), prints to stdout, ends a visitor connection,
flips one tunnel's error between a short one and one of several terminal lines, and redraws.
Ends with DRIVER-DONE on stderr, after the console has stopped.
"""
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lib.client.console import Console  # noqa: E402
from lib.client.tunnels import StreamRecord  # noqa: E402
from lib.logsetup import setup_logging  # noqa: E402

LONG_ERROR = ("cannot reach proxy 127.0.0.1:4444: " + "a long explanation " * 20
              + "END-OF-ERROR")


def row(proxy: str, state: str, error=None) -> dict:
    return {"proxy": proxy, "state": state, "error": error, "streams_open": 0,
            "streams_total": 3, "bytes_in": 1234, "bytes_out": 56789, "bound": [],
            "refused": {}, "circuit": {"id": "7", "path": ["g", "m", "exit1"], "exit": "exit1"},
            "heartbeat_rtt_ms": 12.5, "retry_at": None}


class ScriptedClient:
    def __init__(self):
        self.rows = [row("127.0.0.1:4443", "online"), row("127.0.0.1:4444", "backoff")]
        self.rows[0]["bound"] = ["tls://demo.example"]
        self.rows[0]["targets"] = {"tls://demo.example": "127.0.0.1:8443"}

    def status(self):
        return self.rows


def main() -> int:
    rounds = int(sys.argv[1])
    setup_logging("info", "text")
    client = ScriptedClient()
    console = Console(client, "ab" * 32, "launch", live=True)
    console.start()
    console.tor_ready("launched, SOCKS 127.0.0.1:9050")
    log = logging.getLogger("shroud.test")
    for i in range(rounds):
        client.rows[1]["error"] = LONG_ERROR if i % 2 else "short error"
        log.info("log line %03d %s", i, "wrapping " * (i % 3 * 12))
        if i % 5 == 0:
            print(f"a print to stdout {i:03d}")
        console.stream_done(StreamRecord(started=time.time(), proxy="127.0.0.1:4443",
                                         visitor=f"203.0.113.{i}:5{i:04d}",
                                         name="demo.example", bytes_in=100 * i,
                                         bytes_out=1000 * i, duration=0.25, result="ok"))
        console.refresh()
    console.stop()
    sys.stderr.write("DRIVER-DONE\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
