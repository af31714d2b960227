#!/usr/bin/env python3
"""CPU per codec operation, compiled build vs pure-Python sources (lib/native.py), no I/O.

    .venv/bin/python bench/codec_bench.py [--rounds 20000]

Runs each workload in a child process twice, once per build (SHROUD_PURE unset / =1), and
reports the CPU time (time.process_time) per operation and the ratio. Workloads, each what one
keep-alive request costs the session layer of one process: a small request and answer over
a stream (send_data, data_to_send, receive_data of DATA, acknowledge), a new stream (SYN,
StreamOpened, FIN both ways), and the sniffers on a Host head and a ClientHello.
The per-request share of these modules in the real processes is in bench/README.md ("Per-request
cost"): the ratio here bounds what compiling them can save there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workloads(rounds: int) -> dict[str, float]:
    """CPU seconds per operation for each workload, on whichever build this process loaded."""
    sys.path.insert(0, ROOT)
    from lib.protocol import muxstate as ms
    from lib.protocol import sniff

    request, answer = b"GET /small HTTP/1.1\r\nHost: one.test\r\n\r\n", b"x" * 160
    a, b = ms.MuxConnection(client=True), ms.MuxConnection(client=False)
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    sid = a.open_stream()
    for ev in b.receive_data(a.data_to_send()):
        if isinstance(ev, ms.StreamOpened):
            b.stream_accepted(ev.stream_id)
    results = {}

    start = time.process_time()
    for _ in range(rounds):
        a.send_data(sid, request)
        for ev in b.receive_data(a.data_to_send()):
            b.acknowledge(ev.stream_id, len(ev.data))
        b.send_data(sid, answer)
        for ev in a.receive_data(b.data_to_send()):
            a.acknowledge(ev.stream_id, len(ev.data))
        a.receive_data(b.data_to_send())  # the WNDINCs
        b.receive_data(a.data_to_send())
    results["keep-alive exchange"] = (time.process_time() - start) / rounds

    start = time.process_time()
    for _ in range(rounds // 4):
        s = a.open_stream()
        a.send_data(s, request)
        for ev in b.receive_data(a.data_to_send()):
            if isinstance(ev, ms.StreamOpened):
                b.stream_accepted(ev.stream_id)
        b.send_data(s, answer, fin=True)
        a.receive_data(b.data_to_send())
        a.forget_stream(s)
        b.receive_data(a.data_to_send())
    results["new stream, one exchange"] = (time.process_time() - start) / (rounds // 4)

    hello = bytes.fromhex(
        "1603010077010000730303" + "22" * 32 + "20" + "11" * 32 + "000213010100"
        + "0018" + "0000" + "0014" + "0012" + "00" + "000f" + "www.example.com".encode().hex())
    start = time.process_time()
    for _ in range(rounds):
        sniff.HTTPHostSniffer().feed(request)
        sniff.TLSNameSniffer().feed(hello)
    results["sniff Host + SNI"] = (time.process_time() - start) / rounds
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, ROOT)
        import lib.protocol  # noqa: F401
        from lib import native
        print(json.dumps({"status": native.STATUS, "cpu": workloads(args.rounds)}))
        return 0
    runs = {}
    for build, extra in (("compiled", {}), ("pure", {"SHROUD_PURE": "1"})):
        env = {k: v for k, v in os.environ.items() if k != "SHROUD_PURE"}
        env.update(extra)
        out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)],
                             env=env, capture_output=True, text=True, check=True, timeout=600)
        runs[build] = json.loads(out.stdout)
        print(f"{build}: {runs[build]['status']}", file=sys.stderr)
    print("| workload | pure µs | compiled µs | compiled / pure |")
    print("| --- | ---: | ---: | ---: |")
    for name, pure in runs["pure"]["cpu"].items():
        comp = runs["compiled"]["cpu"][name]
        print(f"| {name} | {pure * 1e6:.1f} | {comp * 1e6:.1f} | {comp / pure:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
