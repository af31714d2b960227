#!/usr/bin/env python3
"""Shroud client: expose local services at public names through public proxies, over Tor.

    python shroud.py example.com 127.0.0.1:443
    python shroud.py a.example 127.0.0.1:443 http:b.example 127.0.0.1:8080 tcp:20001 127.0.0.1:22
    python shroud.py --tor none --proxy proxy.example.net:4443 --pin SHA256 example.com 127.0.0.1:443

NAME forms: ``example.com`` or ``tls:example.com`` (TLS routed by SNI and passed through
undecrypted to a TLS target), ``http:example.com`` (HTTP routed by Host), ``*.example.com``
(wildcard), ``tcp:PORT`` (a raw TCP port on each proxy).
"""
from __future__ import annotations

if __name__ == "__main__":
    # Entry point: on jemalloc when installed (lib/allocator.py: memory goes back to the OS
    # after a load peak); this may re-execute the process, so it comes first.
    from lib.allocator import reexec_with_jemalloc

    reexec_with_jemalloc()
    # Patch before anything else imports socket or threading.
    from gevent import monkey

    monkey.patch_all()

import argparse
import logging
import os
import signal
import sys

log = logging.getLogger("shroud.client")

DEFAULT_PROXY_COUNT = 3  # the seed's default: one tunnel to each of three proxies


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="shroud.py",
        description="Expose local services at public names through Shroud public proxies, "
                    "reaching the proxies only through Tor.",
        epilog="NAME TARGET pairs: example.com 127.0.0.1:443 | http:example.com 127.0.0.1:80 "
               "| tcp:20001 127.0.0.1:22")
    p.add_argument("pairs", nargs="+", metavar="NAME TARGET",
                   help="service name and local HOST:PORT, repeated")
    p.add_argument("--proxy", action="append", default=[], metavar="HOST:PORT|wss://HOST/PATH",
                   help="public proxy's tunnel address, or the WebSocket URL of a proxy behind "
                        "a platform's router (repeatable; one tunnel each)")
    p.add_argument("--pin", action="append", default=[], metavar="SHA256",
                   help="accepted proxy certificate fingerprint (repeatable)")
    p.add_argument("--proxy-ca", metavar="FILE", help="CA bundle that signs the proxies' certificates")
    p.add_argument("--tor", default=env("SHROUD_TOR", "launch"), metavar="launch|none|HOST:PORT",
                   help="launch our own tor (default), attach to a control port, or none "
                        "(no anonymity: the proxy sees this machine's address)")
    p.add_argument("--tor-config", metavar="FILE", help="extra torrc lines (bridges, private network)")
    p.add_argument("--tor-password", default=env("SHROUD_TOR_PASSWORD"),
                   help="control port password for --tor HOST:PORT")
    p.add_argument("--distinct-exits", action="store_true",
                   help="build each tunnel's circuit with stem so every proxy is reached "
                        "through a different exit; a tunnel that cannot get its own exit "
                        "waits and retries, never falls back to tor's choice")
    p.add_argument("--tor-timeout", type=float, default=120.0,
                   help="seconds to wait for tor to bootstrap")
    p.add_argument("--discovery", metavar="URL",
                   help="discovery service URL, e.g. https://discovery.example/proxies "
                        "(asked through Tor; its JSON answer's fingerprints pin the proxies)")
    p.add_argument("--discovery-ca", metavar="FILE",
                   help="CA bundle for the discovery service's certificate (default: system CAs)")
    p.add_argument("--discovery-pin", metavar="SHA256",
                   help="the discovery service's certificate fingerprint, instead of a CA")
    p.add_argument("--srv", action="store_true",
                   help="find proxies by SRV _shroud._tls.<domain>, asked over TCP through Tor "
                        "(an exit can alter the answer: verify proxies with --pin or --proxy-ca)")
    p.add_argument("--dns-resolver", metavar="HOST:PORT", default="9.9.9.9:53",
                   help="resolver for --srv, reached over TCP through Tor")
    p.add_argument("--count", type=int, default=DEFAULT_PROXY_COUNT,
                   help="number of proxies to use from discovery")
    p.add_argument("--data-dir", default=env("SHROUD_CLIENT_DATA_DIR", os.path.expanduser("~/.shroud")),
                   help="identity key and tor state")
    p.add_argument("--proxy-protocol", choices=["v1", "v2"],
                   help="send the public peer's address to the local service (PROXY protocol)")
    p.add_argument("--socks", metavar="HOST:PORT",
                   help="advanced: dial the proxies through this SOCKS5 server (e.g. a tor's "
                        "SocksPort whose control port we cannot use) instead of --tor; names "
                        "are resolved by it; no circuit watching; needs --proxy")
    p.add_argument("--heartbeat-interval", type=float, default=3.0, metavar="SECONDS",
                   help="seconds between heartbeats on each tunnel (default 3, as Go muxado)")
    p.add_argument("--heartbeat-timeout", type=float, default=13.0, metavar="SECONDS",
                   help="seconds without a heartbeat echo before a tunnel is declared dead and "
                        "redialled (default 13, Go muxado's 3 + 10: under load a Tor circuit's "
                        "queues can hold an echo for several seconds)")
    p.add_argument("--max-streams", type=int, default=4096,
                   help="visitor connections served at once per tunnel")
    p.add_argument("--receive-window", type=int, default=None,
                   help="per-stream receive window in bytes (larger helps over Tor)")
    p.add_argument("--status", choices=["auto", "live", "plain"], default="auto",
                   help="live terminal status, or plain log lines")
    p.add_argument("--log-level", default=env("SHROUD_LOG_LEVEL", "info"))
    p.add_argument("--log-format", default=env("SHROUD_LOG_FORMAT", "text"), choices=["text", "json"])
    return p


def parse_services(pairs: list[str]):
    from lib.client.tunnels import Service

    if len(pairs) % 2:
        raise ValueError("services come in NAME TARGET pairs, e.g. example.com 127.0.0.1:443")
    return [Service.parse(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]


class StatusDisplay:
    """A live table on a terminal (like ngrok's), or a log line per change elsewhere."""

    def __init__(self, client, live: bool, out=sys.stderr):
        self.client = client
        self.live = live
        self.out = out
        self._lines = 0
        self._last: dict = {}

    def changed(self, runner) -> None:
        if self.live:
            return
        key = (runner.state, runner.error)
        if self._last.get(runner.index) != key:
            self._last[runner.index] = key
            log.info("tunnel %s: %s%s", runner.proxy, runner.state,
                     f" ({runner.error})" if runner.error and runner.state != "online" else "")

    def render(self) -> None:
        rows = self.client.status()
        lines = ["Shroud", ""]
        lines.append(f"{'proxy':<28} {'state':<11} {'streams':>8} {'total':>7} "
                     f"{'in':>10} {'out':>10} {'rtt':>8}")
        for r in rows:
            rtt = f"{r['heartbeat_rtt_ms']:.0f}ms" if r["heartbeat_rtt_ms"] is not None else "-"
            lines.append(f"{r['proxy']:<28} {r['state']:<11} {r['streams_open']:>8} "
                         f"{r['streams_total']:>7} {_size(r['bytes_in']):>10} "
                         f"{_size(r['bytes_out']):>10} {rtt:>8}")
            if r["error"] and r["state"] != "online":
                lines.append(f"  ! {r['error'][:100]}")
        if self._lines:
            self.out.write(f"\x1b[{self._lines}F\x1b[J")
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._lines = len(lines)


def socks_dial(address: str):
    """A dial(host, port, isolation_key, timeout) through the SOCKS5 server at ``address``:
    the proxy's name goes to the SOCKS server unresolved, and each isolation key becomes its own
    credentials (a tor isolates circuits by them, IsolateSOCKSAuth)."""
    import socket

    import socks

    from lib.client.tor import socks_credentials

    from lib.hostport import AddressError, parse_hostport
    from lib.net.sockets import set_nodelay

    try:
        host, port = parse_hostport(address, what="--socks")
    except AddressError as e:
        raise SystemExit(f"shroud: {e}") from None

    def dial(target_host: str, target_port: int, isolation_key: str, timeout: float):
        user, password = socks_credentials(isolation_key)
        s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
        s.set_proxy(socks.SOCKS5, host, port, rdns=True, username=user, password=password)
        s.settimeout(timeout)
        try:
            s.connect((target_host, int(target_port)))
        except OSError as e:  # socks.ProxyError is an OSError too
            s.close()
            raise ConnectionError(f"through SOCKS {address}: {e}") from None
        s.settimeout(None)
        set_nodelay(s)
        return socket.socket(s.family, s.type, s.proto, fileno=s.detach())

    return dial


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import gevent
    from gevent.event import Event

    from lib.certs import normalize_pin
    from lib.client.tunnels import Client, ClientConfig, ProxyAddr, direct_dial
    from lib.identity import Identity
    from lib.logsetup import setup_logging
    from lib.net.muxsession import MuxConfig

    setup_logging(args.log_level, args.log_format)
    try:
        services = parse_services(args.pairs)
        pins = {normalize_pin(p) for p in args.pin}
    except ValueError as e:
        print(f"shroud: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
    identity = Identity.load_or_create(args.data_dir)
    log.info("identity key %s (data dir %s)", identity.fingerprint[:16], args.data_dir)

    if not 0 < args.heartbeat_interval < args.heartbeat_timeout:
        print("shroud: need 0 < --heartbeat-interval < --heartbeat-timeout", file=sys.stderr)
        return 2
    tor = None
    if args.socks:
        if not args.proxy:
            print("shroud: --socks needs --proxy (discovery would bypass it)", file=sys.stderr)
            return 2
        dial = socks_dial(args.socks)
    elif args.tor == "none":
        print("shroud: WARNING: --tor none: the proxies see this machine's address; the origin "
              "is NOT hidden.", file=sys.stderr)
        dial = direct_dial
    else:
        from lib.client import circuits as clienttor
        from lib.client.tor import TorError

        live_bar = args.status == "live" or (args.status == "auto" and sys.stderr.isatty())
        try:
            tor = clienttor.start_tor(args.tor, args.data_dir, args.tor_config,
                                      args.tor_password, args.tor_timeout,
                                      clienttor.BootstrapProgress(live_bar))
        except TorError as e:
            print(f"shroud: {e}", file=sys.stderr)
            return 1
        log.info("tor ready: SOCKS %s:%d", *tor.socks_address)
        dial = tor.open_connection
        if args.distinct_exits:
            if args.tor != "launch":
                # Attaching streams by hand sets __LeaveStreamsUnattached on the whole tor:
                # other programs sharing an attached tor would see their streams hang.
                print("shroud: --distinct-exits needs a tor of our own (--tor launch)",
                      file=sys.stderr)
                tor.close()
                return 2
            dial = clienttor.ExitPlanner(tor).dial

    try:
        proxies = [ProxyAddr.parse(p) for p in args.proxy]
        if not proxies:
            from lib.client.discovery import discover_proxies

            proxies = discover_proxies(args, services, tor)
    except (ValueError, OSError) as e:
        print(f"shroud: cannot find proxies: {e}", file=sys.stderr)
        if tor is not None:
            tor.close()
        return 1

    # The proxy opens a stream per visitor: accept as many as we serve, so a burst of visitors
    # is queued rather than refused (bench/load.py: 1,000 at once overflowed a 256 backlog).
    mux = MuxConfig(heartbeat_interval=args.heartbeat_interval,
                    heartbeat_tolerance=args.heartbeat_timeout - args.heartbeat_interval,
                    max_streams=args.max_streams, accept_backlog=args.max_streams)
    if args.receive_window:
        mux.receive_window = args.receive_window
    config = ClientConfig(services=services, proxies=proxies, identity=identity, pins=pins,
                          proxy_ca=args.proxy_ca, dial=dial, proxy_protocol=args.proxy_protocol,
                          mux=mux, max_streams=args.max_streams)
    live = args.status == "live" or (args.status == "auto" and sys.stderr.isatty())
    client = Client(config)
    display = StatusDisplay(client, live)
    client.on_change = display.changed
    if tor is not None:
        from lib.client.circuits import CircuitWatcher

        CircuitWatcher(tor, client)
    client.start()
    from lib.memtrim import start_memory_trimmer

    start_memory_trimmer()
    for svc in services:
        log.info("exposing %s %s -> %s:%d via %d proxies", svc.protocol, svc.name, *svc.target,
                 len(proxies))

    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    while not stop.wait(1.0 if live else None):
        display.render()
    log.info("stopping")
    client.stop()
    if tor is not None:
        tor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
