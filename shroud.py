#!/usr/bin/env python3
"""Shroud client: expose local services at public names through public proxies, over Tor.

    python shroud.py example.com 127.0.0.1:443
    python shroud.py a.example 127.0.0.1:443 http:b.example 127.0.0.1:8080 tcp:20001 127.0.0.1:22
    python shroud.py --tor none --proxy proxy.example.net:4443 --pin SHA256 example.com 127.0.0.1:443

NAME forms: ``example.com`` or ``tls:example.com`` (TLS routed by SNI and passed through
undecrypted to a TLS target), ``https:example.com`` (TLS routed the same way, ended in this
client with a certificate it gets by ACME; the target speaks plain HTTP),
``http:example.com`` (HTTP routed by Host), ``*.example.com``
(wildcard), ``tcp:PORT`` (a raw TCP port on each proxy).
"""
from __future__ import annotations

if __name__ == "__main__":
    # Entry point: on jemalloc when installed (lib/allocator.py: memory goes back to the OS
    # after a load peak); this may re-execute the process, so it comes first.
    from lib.allocator import reexec_with_jemalloc

    reexec_with_jemalloc()
    # Patch before anything else imports socket or threading.
    try:
        from gevent import monkey
    except ImportError:
        import sys

        sys.exit("shroud: gevent is not installed for this Python: run the client with the "
                 "project's virtual environment, .venv/bin/python shroud.py ... "
                 "(./scripts/setup.sh creates it)")
    monkey.patch_all()

import argparse
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass

log = logging.getLogger("shroud.client")

DEFAULT_PROXY_COUNT = 3  # the seed's default: one tunnel to each of three proxies


ENV_PREFIX = "SHROUD_"
# Every option also comes from SHROUD_<FLAG> (the command line wins), as the proxy's do. The data
# directory is SHROUD_CLIENT_DATA_DIR: SHROUD_DATA_DIR is the proxy's, a different directory.
_ENV_NAMES = {"--data-dir": "SHROUD_CLIENT_DATA_DIR"}
_TRUE = ("1", "yes", "true", "on")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (the environment's value when set) after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


class UsageError(Exception):
    """Bad input: one line naming the flag or file and the fix; nothing was started."""


def env_name(flag: str) -> str:
    return _ENV_NAMES.get(flag, ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper())


def _option(p, flag: str, help: str, default=None, **kw) -> None:
    """An option whose default comes from its environment variable when that is set."""
    name = env_name(flag)
    value = os.environ.get(name)
    action = kw.get("action")
    if value is not None:
        if action == "store_true":
            default = value.strip().lower() in _TRUE
        elif action == "append":
            default = [v.strip() for v in value.split(",") if v.strip()]
        elif "type" in kw:
            try:
                default = kw["type"](value)
            except ValueError:
                p.env_errors.append(f"{name}={value!r} is not a valid {kw['type'].__name__} "
                                    f"for {flag}")
        else:
            default = value
    if action == "append":
        # The command line replaces the environment's list rather than adding to it.
        kw["action"] = ReplaceAppend
    p.add_argument(flag, default=default, help=f"{help} [env {name}]", **kw)


class ReplaceAppend(argparse.Action):
    """Repeatable option: the first use on the command line drops the default list."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_replaced", set())
        items = [] if self.dest not in seen else list(getattr(namespace, self.dest))
        seen.add(self.dest)
        namespace._replaced = seen
        setattr(namespace, self.dest, items + [values])


def version_text() -> str:
    from lib.protocol.messages import SHROUD_VERSION
    from lib.version import __version__

    return f"%(prog)s {__version__} (Shroud protocol {SHROUD_VERSION}; muxado v1)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shroud.py", formatter_class=HelpFormatter,
        description="Expose local services at public names through Shroud public proxies, "
                    "reaching the proxies only through Tor. Every option also comes from the "
                    "environment variable in its help (the command line wins).",
        epilog="NAME TARGET pairs: example.com 127.0.0.1:443 | http:example.com 127.0.0.1:80 "
               "| tcp:20001 127.0.0.1:22 (also SHROUD_SERVICES, space-separated)")
    p.env_errors = []  # environment values that do not parse; check_inputs reports them
    p.add_argument("pairs", nargs="*", metavar="NAME TARGET",
                   help="service name and local HOST:PORT, repeated")
    p.add_argument("--version", action="version", version=version_text())
    _add_proxy_options(p)
    _add_tor_options(p)
    _add_discovery_options(p)
    _add_tuning_options(p)
    _add_acme_options(p)
    return p


def _add_proxy_options(p) -> None:
    _option(p, "--proxy", "public proxy's tunnel address HOST:PORT, or the WebSocket URL "
            "wss://HOST/PATH of a proxy behind a platform's router (repeatable; one tunnel "
            "each; comma-separated in the environment)", action="append",
            metavar="HOST:PORT|URL")
    _option(p, "--pin", "accepted proxy certificate fingerprint, from `shroud_proxy.py "
            "--print-fingerprint` on the proxy (repeatable)", action="append", metavar="SHA256")
    _option(p, "--proxy-ca", "CA bundle that signs the proxies' certificates", metavar="FILE")
    _option(p, "--data-dir", "identity key and tor state", os.path.expanduser("~/.shroud"))
    _option(p, "--proxy-protocol", "send the public peer's address to the local service (PROXY "
            "protocol; v2 also names the proxy)", choices=["v1", "v2"])
    _option(p, "--socks", "advanced: dial the proxies through this SOCKS5 server (e.g. a tor's "
            "SocksPort whose control port we cannot use) instead of --tor; names are resolved "
            "by it; no circuit watching; needs --proxy", metavar="HOST:PORT")


def _add_tor_options(p) -> None:
    _option(p, "--tor", "launch our own tor, attach to a running tor's control port, or none "
            "(no anonymity: the proxy sees this machine's address)", "launch",
            metavar="launch|none|HOST:PORT")
    _option(p, "--tor-config", "extra torrc lines (bridges, private network)", metavar="FILE")
    _option(p, "--tor-password", "control port password for --tor HOST:PORT")
    _option(p, "--tor-timeout", "seconds to wait for tor to bootstrap", "120", type=float)
    _option(p, "--distinct-exits", "build each tunnel's circuit with stem so every proxy is "
            "reached through a different exit; a tunnel that cannot get its own exit waits and "
            "retries, never falls back to tor's choice", False, action="store_true")


def _add_discovery_options(p) -> None:
    _option(p, "--discovery", "discovery service URL, e.g. https://discovery.example/proxies "
            "(asked through Tor; its JSON answer's fingerprints pin the proxies)", metavar="URL")
    _option(p, "--discovery-ca", "CA bundle for the discovery service's certificate (default: "
            "system CAs)", metavar="FILE")
    _option(p, "--discovery-pin", "the discovery service's certificate fingerprint, instead "
            "of a CA", metavar="SHA256")
    _option(p, "--srv", "find proxies by SRV _shroud._tls.<domain>, asked over TCP through Tor "
            "(an exit can alter the answer: verify proxies with --pin or --proxy-ca)",
            False, action="store_true")
    _option(p, "--dns-resolver", "resolver for --srv, reached over TCP through Tor",
            "9.9.9.9:53", metavar="HOST:PORT")
    _option(p, "--count", "number of proxies to use from discovery",
            str(DEFAULT_PROXY_COUNT), type=int)


def _add_acme_options(p) -> None:
    _option(p, "--acme-directory", "ACME directory that issues the certificates of https:NAME "
            "services (the default is Let's Encrypt's production directory)",
            "https://acme-v02.api.letsencrypt.org/directory", metavar="URL")
    _option(p, "--acme-email", "contact address of the ACME account (expiry notices); "
            "optional", metavar="ADDRESS")
    _option(p, "--acme-ca", "CA bundle that verifies the ACME server's HTTPS (a private CA "
            "such as step-ca, or a test CA; default: the system's CAs)", metavar="FILE")


def _add_tuning_options(p) -> None:
    _option(p, "--heartbeat-interval", "seconds between heartbeats on each tunnel (Go "
            "muxado's)", "3", type=float, metavar="SECONDS")
    _option(p, "--heartbeat-timeout", "seconds without a heartbeat echo before a tunnel is "
            "declared dead and redialled (Go muxado's 3 + 10: under load a Tor circuit's "
            "queues can hold an echo for several seconds)", "13", type=float, metavar="SECONDS")
    _option(p, "--max-streams", "visitor connections served at once per tunnel", "4096",
            type=int)
    _option(p, "--receive-window", "per-stream receive window in bytes (larger helps over "
            "Tor; default: muxado's)", type=int)
    _option(p, "--status", "live terminal console, or plain log lines (auto: live on a "
            "terminal)", "auto", choices=["auto", "live", "plain"])
    _option(p, "--log-level", "debug, info, warning or error", "info", type=str.lower,
            choices=["debug", "info", "warning", "error"])
    _option(p, "--log-format", "text or json (one object per line)", "text",
            choices=["text", "json"])


def parse_services(pairs: list[str]):
    from lib.client.tunnels import Service

    if not pairs:
        pairs = os.environ.get("SHROUD_SERVICES", "").split()
    if not pairs:
        raise ValueError("no services: give NAME TARGET pairs, e.g. example.com 127.0.0.1:443 "
                         "(or SHROUD_SERVICES)")
    if len(pairs) % 2:
        raise ValueError(f"services come in NAME TARGET pairs, e.g. example.com 127.0.0.1:443; "
                         f"{pairs[-1]!r} has no target")
    services = [Service.parse(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    for i in range(0, len(pairs), 2):
        note = Service.spelling_note(pairs[i], pairs[i + 1])
        if note is not None:
            log.warning("%s", note)
    return services


@dataclass
class Inputs:
    """Everything the command line and environment asked for, checked before anything starts."""

    services: list
    pins: set
    proxies: list  # ProxyAddr; empty: discovery finds them (after Tor is up)
    identity: object  # lib.identity.Identity


def check_inputs(parser, args) -> Inputs:
    """Validate every input; the first mistake raises UsageError naming the flag and the fix.

    Nothing is started here (no tor, no connection); the data directory and identity key are
    created when missing, as the first run must.
    """
    from lib.certs import normalize_pin
    from lib.client.tunnels import ProxyAddr

    if parser.env_errors:
        raise UsageError(parser.env_errors[0])
    _check_choices(parser, args)
    try:
        services = parse_services(args.pairs)
        pins = {normalize_pin(p) for p in args.pin or []}
        proxies = [ProxyAddr.parse(p) for p in args.proxy or []]
    except ValueError as e:  # lib.hostport.AddressError names the flag already
        raise UsageError(_with_flag(str(e), args)) from None
    if args.discovery_pin:
        try:
            args.discovery_pin = normalize_pin(args.discovery_pin)
        except ValueError as e:
            raise UsageError(f"--discovery-pin: {e}") from None
    _check_tor_and_discovery(args, proxies)
    _check_numbers(args)
    for flag in ("--proxy-ca", "--discovery-ca", "--tor-config", "--acme-ca"):
        _check_readable(flag, getattr(args, flag[2:].replace("-", "_")))
    _check_ca(args.proxy_ca, "--proxy-ca")
    _check_ca(args.discovery_ca, "--discovery-ca")
    _check_ca(args.acme_ca, "--acme-ca")
    if not args.acme_directory.lower().startswith("https://"):
        raise UsageError(f"--acme-directory {args.acme_directory}: an ACME directory is an "
                         f"https:// URL, e.g. https://acme-v02.api.letsencrypt.org/directory")
    return Inputs(services, pins, proxies, load_identity(args.data_dir))


def _with_flag(message: str, args) -> str:
    if message.startswith("not a SHA-256 fingerprint"):
        return (f"--pin: {message}; take it from `shroud_proxy.py --print-fingerprint` on the "
                f"proxy (64 hex digits)")
    return message


def _check_choices(parser, args) -> None:
    """argparse checks choices on the command line only: check the environment's too."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices and value is not None and value not in action.choices:
            raise UsageError(f"{env_name(action.option_strings[0])}={value!r} is not one of "
                             f"{', '.join(action.choices)}")


def _check_tor_and_discovery(args, proxies) -> None:
    from lib.hostport import AddressError, parse_hostport

    try:
        if args.socks:
            parse_hostport(args.socks, what="--socks")
        elif args.tor not in ("launch", "none") and "/" not in args.tor:
            parse_hostport(args.tor, what="--tor (launch, none or a control port HOST:PORT)")
        if args.srv and not proxies:
            parse_hostport(args.dns_resolver, what="--dns-resolver")
    except AddressError as e:
        raise UsageError(str(e)) from None
    if args.socks and not proxies:
        raise UsageError("--socks needs --proxy (discovery would bypass the SOCKS server)")
    if not proxies and not args.discovery and not args.srv:
        raise UsageError("no proxies: give --proxy HOST:PORT (repeatable, with --pin SHA256), "
                         "--discovery URL or --srv")
    if args.distinct_exits and (args.socks or args.tor != "launch"):
        # Attaching streams by hand sets __LeaveStreamsUnattached on the whole tor: other
        # programs sharing an attached tor would see their streams hang.
        raise UsageError("--distinct-exits needs a tor of our own (--tor launch)")
    if args.tor_config and args.tor != "launch":
        raise UsageError("--tor-config only applies to a tor we launch (--tor launch)")


def _check_numbers(args) -> None:
    if not 0 < args.heartbeat_interval < args.heartbeat_timeout:
        raise UsageError(f"--heartbeat-interval ({args.heartbeat_interval:g}) must be above 0 "
                         f"and below --heartbeat-timeout ({args.heartbeat_timeout:g})")
    for flag, value, low in (("--count", args.count, 1), ("--max-streams", args.max_streams, 1),
                             ("--tor-timeout", args.tor_timeout, 1),
                             ("--receive-window", args.receive_window, 1024)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value:g}")


def _check_readable(flag: str, path: str | None) -> None:
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read it ({e.strerror}); give a readable "
                         f"file") from None


def _check_ca(path: str | None, flag: str) -> None:
    if not path:
        return
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a PEM CA bundle ({e}); give the CA "
                         f"certificate(s) in PEM") from None


def load_identity(data_dir: str):
    """The identity key in ``data_dir``, created on first run; UsageError with the fix."""
    from lib.identity import KEY_FILENAME, Identity, IdentityError

    flag = f"--data-dir (or {env_name('--data-dir')})"
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {data_dir}: cannot create it ({e.strerror}); give a "
                         f"directory you can write") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {data_dir} is not writable by this user (the identity key "
                         f"and tor state live there); give a directory you can write")
    try:
        return Identity.load_or_create(data_dir)
    except IdentityError as e:
        path = os.path.join(data_dir, KEY_FILENAME)
        text = str(e)
        if "not a PEM" in text or "not an Ed25519" in text or "too large" in text:
            text = (f"identity key {path} is damaged ({text.split(': ', 1)[-1]}). Restore it "
                    f"from a backup if you can: a new key loses every name the proxies granted "
                    f"to the old one (they know a name's owner by its key). To start over with "
                    f"a new key: mv {path} {path}.damaged")
        raise UsageError(text) from None


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lib.logsetup import setup_logging

    setup_logging(args.log_level, args.log_format)
    # stem logs each GETINFO at DEBUG (ten a second while tor bootstraps) and tor's notices at
    # INFO: only its warnings are ours to show. stem sets its logger's level when imported, so
    # it is imported first.
    import stem.util.log

    stem.util.log.get_logger().setLevel(logging.WARNING)
    try:
        inputs = check_inputs(parser, args)
    except UsageError as e:
        print(f"shroud: {e}", file=sys.stderr)
        return 2
    log.info("identity key %s (data dir %s)", inputs.identity.fingerprint, args.data_dir)
    return run(args, inputs)


def run(args, inputs: Inputs) -> int:
    """Start Tor (or not), find the proxies, serve until SIGINT or SIGTERM."""
    import gevent
    from gevent.event import Event

    from lib.client.console import Console
    from lib.client.tunnels import Client

    live = args.status == "live" or (args.status == "auto" and sys.stderr.isatty()
                                     and args.log_format == "text")
    mode = "socks" if args.socks else args.tor
    # The console shows Tor's bootstrap before the client exists (discovery needs Tor).
    console = Console(_Pending(), inputs.identity.fingerprint, mode, live)
    console.start()
    tor = None
    try:
        dial, tor = open_dialer(args, console)
        proxies = inputs.proxies or find_proxies(args, inputs, tor)
        client = Client(client_config(args, inputs, proxies, dial))
        certs = start_acme(args, inputs.services, client, tor)
    except StartError as e:
        console.stop()
        print(f"shroud: {e}", file=sys.stderr)
        if tor is not None:
            tor.close()
        return 1
    console.client = client
    client.on_change, client.on_stream = console.changed, console.stream_done
    if tor is not None:
        from lib.client.circuits import CircuitWatcher

        CircuitWatcher(tor, client)
    client.start()
    from lib.memtrim import GC_THRESHOLDS, start_memory_trimmer

    start_memory_trimmer()
    gc.set_threshold(*GC_THRESHOLDS)  # after start-up: lib/memtrim.py says why
    for svc in inputs.services:
        log.info("exposing %s %s -> %s:%d via %d proxies", svc.protocol, svc.name, *svc.target,
                 len(proxies))
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    while not stop.wait(1.0 if live else None):
        console.refresh()
    log.info("stopping")
    if certs is not None:
        certs.stop()
    client.stop()
    console.stop()
    if tor is not None:
        tor.close()
    return 0


class StartError(Exception):
    """Tor or discovery failed at start: one line, then exit 1."""


class _Pending:
    """Stands in for the Client on the console while Tor starts: no tunnels yet."""

    def status(self) -> list:
        return []


def open_dialer(args, console):
    """(dial, tor): how tunnels reach the proxies, and our tor when there is one."""
    from lib.client.tunnels import direct_dial

    if args.socks:
        console.tor_ready(f"through the SOCKS server {args.socks} (no circuit watching)")
        return socks_dial(args.socks), None
    if args.tor == "none":
        log.warning("--tor none: the proxies see this machine's address; the origin is NOT "
                    "hidden")
        return direct_dial, None
    from lib.client import circuits as clienttor
    from lib.client.tor import TorError

    try:
        tor = clienttor.start_tor(args.tor, args.data_dir, args.tor_config, args.tor_password,
                                  args.tor_timeout, console.tor_progress)
    except TorError as e:
        raise StartError(str(e)) from None
    console.tor_ready(f"{'launched' if args.tor == 'launch' else 'attached'}, SOCKS "
                      f"{tor.socks_address[0]}:{tor.socks_address[1]}")
    log.info("tor ready: SOCKS %s:%d", *tor.socks_address)
    if args.distinct_exits:
        return clienttor.ExitPlanner(tor).dial, tor
    return tor.open_connection, tor


def start_acme(args, services, client, tor):
    """For https: services: TLS ends in this client (lib.client.terminate) with certificates
    ordered by ACME (lib.client.acme) the same way out as the tunnels: tor's SOCKS port,
    --socks, or directly with --tor none. The started CertManager, or None."""
    names = [s.name for s in services if s.terminate]
    if not names:
        return None
    from lib.client.acme import AcmeConfig, CertManager, requests_session
    from lib.client.terminate import CertBook, local_protocols, terminate
    from lib.hostport import parse_hostport

    book = CertBook()
    for svc in services:
        if svc.terminate:
            alpn = local_protocols(svc.target)
            book.set_protocols(svc.name, alpn)
            log.info("%s: offering ALPN %s (what %s:%d answers)", svc.name, ",".join(alpn),
                     *svc.target)
    client.config.terminate = lambda stream, svc: terminate(stream, svc.name, book)
    socks = (tor.socks_address if tor is not None else
             parse_hostport(args.socks, what="--socks") if args.socks else None)
    acme = AcmeConfig(directory=args.acme_directory, data_dir=args.data_dir,
                      session=lambda key: requests_session(socks, key),
                      email=args.acme_email, ca_file=args.acme_ca)
    manager = CertManager(acme, names, book,
                          ready=lambda: client.online() == len(client.runners))
    manager.start()
    return manager


def find_proxies(args, inputs: Inputs, tor) -> list:
    from lib.client.discovery import discover_proxies

    try:
        return discover_proxies(args, inputs.services, tor)
    except (ValueError, OSError) as e:  # DiscoveryError is a ValueError
        raise StartError(f"cannot find proxies: {e}") from None


def client_config(args, inputs: Inputs, proxies: list, dial):
    from lib.client.tunnels import ClientConfig
    from lib.net.muxsession import MuxConfig

    # The proxy opens a stream per visitor: accept as many as we serve, so a burst of visitors
    # is queued rather than refused (bench/load.py: 1,000 at once overflowed a 256 backlog).
    mux = MuxConfig(heartbeat_interval=args.heartbeat_interval,
                    heartbeat_tolerance=args.heartbeat_timeout - args.heartbeat_interval,
                    max_streams=args.max_streams, accept_backlog=args.max_streams)
    if args.receive_window:
        mux.receive_window = args.receive_window
    return ClientConfig(services=inputs.services, proxies=proxies, identity=inputs.identity,
                        pins=inputs.pins, proxy_ca=args.proxy_ca, dial=dial,
                        proxy_protocol=args.proxy_protocol, mux=mux,
                        max_streams=args.max_streams)


if __name__ == "__main__":
    sys.exit(main())
