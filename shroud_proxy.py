#!/usr/bin/env python3
"""Shroud public proxy.

    python shroud_proxy.py --data-dir DIR --tunnel-addr :4443 --https-addr :443 --http-addr :80
    python shroud_proxy.py --data-dir DIR --print-fingerprint
    python shroud_proxy.py migrate-store --data-dir DIR --database-url URL   # SQLite -> PostgreSQL
    gunicorn -c gunicorn.conf.py shroud_proxy:app      # same proxy under gunicorn's gevent worker

Every option also comes from a SHROUD_* environment variable (``--tunnel-addr`` is
SHROUD_TUNNEL_ADDR); the command line wins.
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

        sys.exit("shroud_proxy: gevent is not installed for this Python: run the proxy with "
                 "the project's virtual environment, .venv/bin/python shroud_proxy.py ... "
                 "(./scripts/setup.sh creates it)")
    monkey.patch_all()

import argparse
import gc
import logging
import os
import signal
import sys

log = logging.getLogger("shroud.proxy")

# (flag, env suffix, default, help); every one is also SHROUD_<SUFFIX>.
OPTIONS = [
    ("--data-dir", "DATA_DIR", "./proxy-data", "directory for the tunnel certificate and ownership store"),
    ("--tunnel-addr", "TUNNEL_ADDR", "0.0.0.0:4443", "TLS listener for Shroud clients ('' to disable)"),
    ("--https-addr", "HTTPS_ADDR", "", "public TLS listener, routed by SNI, never decrypted"),
    ("--http-addr", "HTTP_ADDR", "", "public HTTP/1.x listener, routed by Host"),
    ("--admin-addr", "ADMIN_ADDR", "127.0.0.1:8080", "admin dashboard and JSON API ('' to disable)"),
    ("--cert", "CERT", None, "tunnel certificate (PEM); generated in the data dir if not given"),
    ("--key", "KEY", None, "tunnel certificate's private key (PEM)"),
    ("--hostname", "HOSTNAME", "shroud-proxy", "this proxy's own name (certificate, dashboard)"),
    ("--public-host", "PUBLIC_HOST", "127.0.0.1", "host name reported for raw TCP binds"),
    ("--tcp-ports", "TCP_PORTS", "", "ports clients may bind for raw TCP, e.g. 20000-20100 (off by default)"),
    ("--allowlist", "ALLOWLIST", None, "ownership allow-list file"),
    ("--dns-resolver", "DNS_RESOLVER", None, "HOST:PORT of the resolver for DNS TXT ownership proofs"),
    ("--allow-unsigned", "ALLOW_UNSIGNED", "", "comma-separated name patterns unsigned (original Go) clients may bind"),
    ("--max-public-connections", "MAX_PUBLIC_CONNECTIONS", "20000", "public connections at once"),
    ("--max-tunnels-per-key", "MAX_TUNNELS_PER_KEY", "8", "tunnels one client key may hold"),
    ("--max-streams-per-tunnel", "MAX_STREAMS_PER_TUNNEL", "4096", "public connections carried by one tunnel at once"),
    ("--bind-burst", "BIND_BURST", "256", "bind requests a tunnel may make at once"),
    ("--bind-rate", "BIND_RATE", "5", "bind requests per second per tunnel after the burst"),
    ("--heartbeat-interval", "HEARTBEAT_INTERVAL", "3", "seconds between muxado heartbeats on a tunnel (Go's 3)"),
    ("--heartbeat-timeout", "HEARTBEAT_TIMEOUT", "13", "seconds without an echo before a tunnel is dropped (Go's 13)"),
    ("--peek-timeout", "PEEK_TIMEOUT", "10", "seconds a public connection has to send its SNI or Host"),
    ("--idle-timeout", "IDLE_TIMEOUT", "3600", "seconds a public connection may stay silent both ways"),
    ("--admin-password-hash", "ADMIN_PASSWORD_HASH", None, "werkzeug password hash for the dashboard login"),
    ("--admin-token", "ADMIN_TOKEN", None, "bearer token for the JSON API"),
    ("--admin-hosts", "ADMIN_HOSTS", "", "one-port mode: more names (comma-separated) that reach the dashboard and tunnel endpoint, besides --hostname"),
    ("--trust-forwarded-for", "TRUST_FORWARDED_FOR", "", "one-port mode: take the public peer's address from X-Forwarded-For's last entry (default yes in one-port mode; 0 to disable)"),
    ("--discovery-addr", "DISCOVERY_ADDR", "", "discovery role: HTTPS listener for GET /proxies?q=<domain> (off by default)"),
    ("--discovery-cert", "DISCOVERY_CERT", None, "discovery certificate (PEM); the tunnel certificate if not given"),
    ("--discovery-key", "DISCOVERY_KEY", None, "discovery certificate's private key (PEM)"),
    ("--fleet", "FLEET", "", "discovery: the fleet's tunnel addresses, host:port[=sha256 fingerprint],..."),
    ("--proxy-domain", "PROXY_DOMAIN", "", "discovery: a domain must CNAME to <domain>.<this>; without --fleet, proxies come from its SRV records"),
    ("--database-url", "DATABASE_URL", os.environ.get("DATABASE_URL"), "PostgreSQL URL of the fleet's shared store (postgresql://USER@HOST/DB; sslmode=... honoured); without it, SQLite in the data dir. Prefer the environment (also DATABASE_URL): a command line is visible to local users"),
    ("--fleet-addr", "FLEET_ADDR", "", "TLS listener for links from the fleet's other proxies (a visitor for a name held elsewhere in the fleet is carried there); off by default"),
    ("--fleet-advertise", "FLEET_ADVERTISE", "", "HOST:PORT the other proxies use to reach --fleet-addr (required when it listens on 0.0.0.0 or ::)"),
    ("--fleet-max-links", "FLEET_MAX_LINKS", "1024", "links to and from the fleet's other proxies in flight at once, each way (past it: 503, or the next holder)"),
    ("--fleet-link-idle", "FLEET_LINK_IDLE", "300", "seconds a link to another proxy of the fleet may go without a visitor before this proxy closes it (the next visitor dials anew; 0: never)"),
    ("--fleet-heartbeat", "FLEET_HEARTBEAT", "5", "seconds between this instance's heartbeats in the fleet's registry (rows expire after 3 missed)"),
    ("--max-names-per-key", "MAX_NAMES_PER_KEY", "100", "names one key may own by first use (0: no limit)"),
    ("--claim-burst", "CLAIM_BURST", "64", "new first-use names one address may claim at once (0: no rate limit)"),
    ("--claims-per-hour", "CLAIMS_PER_HOUR", "60", "new first-use names per address and hour after the burst"),
    ("--claim-expiry-days", "CLAIM_EXPIRY_DAYS", "90", "a first-use name nobody bound for this many days may be claimed anew (0: never)"),
    ("--max-first-use-names", "MAX_FIRST_USE_NAMES", "300000", "first-use names the whole store may hold (0: no limit; SQLite's file is capped at 64 MiB anyway)"),
    ("--log-level", "LOG_LEVEL", "info", "debug, info, warning, error"),
    ("--log-format", "LOG_FORMAT", "text", "text or json"),
]


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (the environment's value when set) after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, "", False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from lib.protocol.messages import SHROUD_VERSION
    from lib.version import __version__

    p = argparse.ArgumentParser(
        prog="shroud_proxy.py", formatter_class=HelpFormatter,
        description="Shroud public proxy: routes public TLS (by SNI) and "
        "HTTP (by Host) connections to clients' tunnels. Options also come from SHROUD_* "
        "environment variables.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} "
                   f"(Shroud protocol {SHROUD_VERSION}; muxado v1)")
    for flag, env, default, help_ in OPTIONS:
        p.add_argument(flag, default=os.environ.get("SHROUD_" + env, default),
                       help=f"{help_} [env SHROUD_{env}]")
    p.add_argument("--no-tofu", action="store_true",
                   default=os.environ.get("SHROUD_NO_TOFU", "") not in ("", "0"),
                   help="disable trust-on-first-use ownership [env SHROUD_NO_TOFU]")
    p.add_argument("--one-port", action="store_true",
                   default=os.environ.get("SHROUD_ONE_PORT", "") not in ("", "0"),
                   help="under gunicorn: serve the dashboard, WebSocket tunnels at "
                        "/_shroud/tunnel and public HTTP by Host all on gunicorn's port (on "
                        "by itself when only $PORT is set) [env SHROUD_ONE_PORT]")
    p.add_argument("--allow-loopback-names", action="store_true",
                   default=os.environ.get("SHROUD_ALLOW_LOOPBACK_NAMES", "") not in ("", "0"),
                   help="let tunnels bind names under .localhost, which browsers send only to "
                        "this machine (a demo on one machine; never on a public proxy) "
                        "[env SHROUD_ALLOW_LOOPBACK_NAMES]")
    p.add_argument("--print-fingerprint", action="store_true",
                   help="print the tunnel certificate's SHA-256 fingerprint and exit")
    return p


def config_from_args(args):
    from lib.proxy.server import ProxyConfig, parse_port_ranges, proxy_mux_config
    from lib.proxy.store import ClaimLimits

    interval, timeout = _number(args, "--heartbeat-interval"), _number(args, "--heartbeat-timeout")
    if not 0 < interval < timeout:  # ValueError: start_proxy's one line (gunicorn halts)
        raise ValueError(f"--heartbeat-interval ({interval:g}) must be above 0 and below "
                         f"--heartbeat-timeout ({timeout:g})")
    mux = proxy_mux_config(heartbeat_interval=interval, heartbeat_tolerance=timeout - interval)
    # (critical too: SHROUD_LOG_LEVEL is also gunicorn's loglevel, gunicorn.conf.py)
    if args.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError(f"--log-level {args.log_level!r} is not one of debug, info, warning, "
                         f"error")
    if args.log_format not in ("text", "json"):
        raise ValueError(f"--log-format {args.log_format!r} is not one of text, json")
    if bool(args.cert) != bool(args.key):  # one alone was ignored: a certificate generated
        raise ValueError("--cert and --key go together (the tunnel certificate and its "
                         "private key); give both, or neither to use the data dir's")
    fleet_max_links = _number(args, "--fleet-max-links", int)
    if fleet_max_links < 1:  # 0 would refuse every link: leave --fleet-addr unset instead
        raise ValueError(f"--fleet-max-links must be at least 1, got {fleet_max_links}; to "
                         f"forward nothing between proxies, leave --fleet-addr unset")
    fleet_link_idle = _number(args, "--fleet-link-idle")
    if not fleet_link_idle >= 0:
        raise ValueError(f"--fleet-link-idle must be 0 (never close an unused link) or more "
                         f"seconds, got {fleet_link_idle:g}")
    fleet_heartbeat = _number(args, "--fleet-heartbeat")
    if not fleet_heartbeat > 0:  # 0: a busy loop that expires this very instance each beat
        raise ValueError(f"--fleet-heartbeat must be above 0 seconds, got {fleet_heartbeat:g}")
    try:
        tcp_ports = parse_port_ranges(args.tcp_ports)
    except ValueError as e:
        raise ValueError(f"--tcp-ports: {e}; write ports and ranges, e.g. 20000-20100,22022"
                         ) from None
    return ProxyConfig(
        data_dir=args.data_dir, tunnel_addr=args.tunnel_addr or None,
        https_addr=args.https_addr or None, http_addr=args.http_addr or None,
        admin_addr=args.admin_addr or None, cert=args.cert, key=args.key,
        hostname=args.hostname, public_host=args.public_host, own_names=own_names(args),
        allow_loopback_names=args.allow_loopback_names,
        tcp_ports=tcp_ports, allowlist=args.allowlist,
        dns_resolver=args.dns_resolver, tofu=not args.no_tofu,
        allow_unsigned=tuple(x.strip() for x in (args.allow_unsigned or "").split(",") if x.strip()),
        max_public_connections=_number(args, "--max-public-connections", int),
        max_tunnels_per_key=_number(args, "--max-tunnels-per-key", int), mux=mux,
        max_streams_per_tunnel=_number(args, "--max-streams-per-tunnel", int),
        bind_burst=_number(args, "--bind-burst", int), bind_rate=_number(args, "--bind-rate"),
        peek_timeout=_number(args, "--peek-timeout"),
        idle_timeout=_number(args, "--idle-timeout") or None,
        database_url=args.database_url or None,
        fleet_heartbeat=fleet_heartbeat,
        fleet_addr=args.fleet_addr or None, fleet_advertise=fleet_advertise(args),
        fleet_max_links=fleet_max_links, fleet_link_idle=fleet_link_idle,
        claim_limits=ClaimLimits(max_names_per_key=_number(args, "--max-names-per-key", int),
                                 claim_burst=_number(args, "--claim-burst", int),
                                 claims_per_hour=_number(args, "--claims-per-hour"),
                                 expiry_days=_number(args, "--claim-expiry-days"),
                                 max_first_use_names=_number(args, "--max-first-use-names",
                                                             int)))


def _number(args, flag: str, kind=float):
    """``flag``'s value (from the command line or SHROUD_*) as ``kind``; a ValueError naming
    the flag, its environment variable and the value otherwise (start_proxy: one line)."""
    value = getattr(args, flag[2:].replace("-", "_"))
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        env = "SHROUD_" + flag[2:].upper().replace("-", "_")
        raise ValueError(f"{flag} (or {env}) must be {what}, got {value!r}") from None


def fleet_advertise(args) -> str | None:
    """--fleet-advertise, checked; the other proxies cannot dial a wildcard address.
    :raises ValueError: naming the flag (start_proxy: one line)."""
    from lib.hostport import format_hostport, parse_hostport

    bind = (parse_hostport(args.fleet_addr, what="--fleet-addr", default_host="0.0.0.0",
                           port_zero=True) if args.fleet_addr else None)
    if args.fleet_advertise:
        return format_hostport(*parse_hostport(args.fleet_advertise, what="--fleet-advertise"))
    if bind is not None and bind[0] in ("", "0.0.0.0", "::"):
        raise ValueError("--fleet-addr listens on every address: give --fleet-advertise "
                         "HOST:PORT, the address the other proxies dial")
    return None


def own_names(args, environ=os.environ) -> tuple[str, ...]:
    """The proxy's names besides --hostname: --admin-hosts and the platform's app name (the
    one-port router serves the dashboard on them; no tunnel may bind them)."""
    hosts = [h.strip() for h in args.admin_hosts.split(",")]
    hosts.append(environ.get("HEROKU_APP_DEFAULT_DOMAIN_NAME", ""))
    return tuple(h for h in hosts if h)


def admin_settings(args) -> dict:
    return {"ADMIN_PASSWORD_HASH": args.admin_password_hash, "ADMIN_TOKEN": args.admin_token,
            "DATA_DIR": args.data_dir}


# --- gunicorn: `gunicorn -c gunicorn.conf.py shroud_proxy:app` ----------------------------

_state: dict = {}


_LISTENER_FLAGS = {"--tunnel-addr": "TUNNEL_ADDR", "--https-addr": "HTTPS_ADDR",
                   "--http-addr": "HTTP_ADDR"}


def one_port_mode(args, argv: list[str], environ=os.environ) -> bool:
    """--one-port, or a platform's $PORT with no listener address given (docs/DEPLOY.md)."""
    if args.one_port:
        return True
    given = any(a.split("=", 1)[0] in _LISTENER_FLAGS for a in argv) or any(
        environ.get("SHROUD_" + env) is not None for env in _LISTENER_FLAGS.values())
    return bool(environ.get("PORT")) and not given


def trust_forwarded_for(args) -> bool:
    """One-port mode: whether X-Forwarded-For names the public peer (--trust-forwarded-for)."""
    return args.trust_forwarded_for.lower() not in ("0", "no", "false")


# A listener's name (lib.errors.ListenError.listener) -> the flag that sets its address.
LISTENER_FLAG = {"tunnel": "--tunnel-addr", "https": "--https-addr", "http": "--http-addr",
                 "discovery": "--discovery-addr", "admin": "--admin-addr",
                 "fleet": "--fleet-addr"}


class StartError(Exception):
    """The proxy cannot start; the message is one line naming the problem."""


def start_proxy(args, one_port: bool = False, admin: bool = True, listeners=None,
                run_dir: str | None = None) -> dict:
    """Start a proxy from parsed ``args``: the one start path of both ``python
    shroud_proxy.py`` (:func:`main`) and gunicorn (:func:`start_in_worker`).

    Starts the proxy's listeners, the memory trimmer and the discovery role (if asked), and
    builds the admin WSGI app when ``admin`` (served by the caller: a WSGIServer in main,
    gunicorn itself). Under gunicorn, ``listeners`` are the sockets its master opened before
    the fork ({"https": socket, ...}, adopted instead of bound again) and ``run_dir`` the
    workers' private directory (lib/proxy/workers.py).

    :returns: {"proxy": ProxyServer, "discovery": DiscoveryServer | None,
               "app": the admin WSGI app | None}
    :raises StartError: a user's mistake or the system's refusal (a port in use, a bad
        option, an unusable ownership store), in one line.
    """
    from lib.admin.app import create_admin_app
    from lib.errors import ListenError
    from lib.memtrim import GC_THRESHOLDS, start_memory_trimmer
    from lib.proxy.discovery import start_discovery
    from lib.proxy.ownership import OwnershipError
    from lib.proxy.server import ProxyServer

    try:
        proxy = ProxyServer(config_from_args(args))
        listeners = dict(listeners or {})
        proxy.start(listeners=listeners, run_dir=run_dir)
        start_memory_trimmer()
        gc.set_threshold(*GC_THRESHOLDS)  # after start-up: lib/memtrim.py says why
        discovery = start_discovery(args, proxy, listener=listeners.get("discovery"))
    except ListenError as e:
        raise StartError(f"cannot start: {e.line(LISTENER_FLAG.get(e.listener))}") from None
    except (OSError, ValueError, OwnershipError) as e:
        raise StartError(f"cannot start: {e}") from None
    app = None
    if admin:
        settings = admin_settings(args)
        if one_port:
            settings["SESSION_COOKIE_SECURE"] = True  # the platform serves it over HTTPS
            # The router is the only peer of $PORT: its X-Forwarded-For names the client (the
            # login throttle's key). Never on a listener a client reaches directly.
            settings["TRUST_FORWARDED_FOR"] = trust_forwarded_for(args)
        app = create_admin_app(proxy, settings)
    return {"proxy": proxy, "discovery": discovery, "app": app}


def worker_args(argv: list[str]):
    """Parsed options for a gunicorn worker, and whether it runs in one-port mode (where the
    raw tunnel port stays closed unless asked for: tunnels come as WebSockets on $PORT)."""
    args = build_parser().parse_args(argv)
    one_port = one_port_mode(args, argv)
    given = set(a.split("=", 1)[0] for a in argv)
    if one_port and "--tunnel-addr" not in given and os.environ.get("SHROUD_TUNNEL_ADDR") is None:
        args.tunnel_addr = ""
    return args, one_port


def listener_addrs(argv: list[str]) -> dict:
    """What gunicorn's master does once before it forks: make the tunnel certificate and the
    dashboard's session key (workers making them at once would each make their own), and name the raw listeners it opens for
    them (lib/proxy/prefork.py): {"tunnel": addr, "https": ..., "http": ..., "discovery": ...},
    '' for the ones off."""
    from lib.admin.auth import load_secret
    from lib.certs import ensure_tunnel_cert

    args, _ = worker_args(argv)
    os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
    if not (args.cert and args.key):
        ensure_tunnel_cert(args.data_dir, args.hostname)
    load_secret(args.data_dir)  # the dashboard's session key, one for every worker
    return {"tunnel": args.tunnel_addr, "https": args.https_addr, "http": args.http_addr,
            "discovery": args.discovery_addr}


def start_in_worker(argv: list[str] | None = None, worker=None, listeners=None,
                    run_dir: str | None = None) -> None:
    """Called by gunicorn.conf.py when a (gevent) worker starts: the listeners start with it
    (``listeners`` and ``run_dir``: see :func:`start_proxy`).

    In one-port mode the worker's connections on $PORT go to a lib.proxy.oneport.OnePortRouter
    first (``worker.shroud_router``, read by lib.proxy.gworker.ShroudGeventWorker). When the
    proxy cannot start, the worker logs one line and exits with gunicorn's boot-error status,
    which stops gunicorn (a worker restarted in a loop would fail the same way).
    """
    from lib.logsetup import setup_logging

    argv = list(argv or [])
    args, one_port = worker_args(argv)
    setup_logging(args.log_level, args.log_format)
    if one_port and (worker is None or not hasattr(worker, "shroud_router")):
        log.error("shroud_proxy: one-port mode needs gunicorn's worker_class "
                  "lib.proxy.gworker.ShroudGeventWorker (see gunicorn.conf.py)")
        sys.exit(WORKER_BOOT_ERROR)
    try:
        _state.update(start_proxy(args, one_port, listeners=listeners, run_dir=run_dir))
    except StartError as e:
        log.error("shroud_proxy: %s", e)
        sys.exit(WORKER_BOOT_ERROR)
    if one_port:
        _start_one_port(args, _state["proxy"], worker)
    log.info("proxy started in gunicorn worker pid %d", os.getpid())


def stop_in_worker() -> None:
    """Called by gunicorn.conf.py when a worker exits: its proxy leaves the fleet and closes
    its listeners, tunnels and store, as `python shroud_proxy.py` does on SIGTERM."""
    proxy = _state.pop("proxy", None)
    if proxy is not None:
        proxy.stop()


# gunicorn's Arbiter.WORKER_BOOT_ERROR: a worker exiting with it halts gunicorn ("Worker failed
# to boot") instead of being restarted.
WORKER_BOOT_ERROR = 3


def _start_one_port(args, proxy, worker) -> None:
    from lib.proxy.oneport import TUNNEL_PATH, OnePortRouter

    worker.shroud_router = OnePortRouter(proxy, [args.hostname, *own_names(args)],
                                         trust_forwarded_for=trust_forwarded_for(args))
    for sock in getattr(worker, "sockets", []):
        try:
            proxy.registry.add_listener("one-port", sock.getsockname())
        except (OSError, TypeError):
            pass  # a unix socket: nothing to show
    log.info("one-port mode: dashboard on %s, WebSocket tunnels at %s, public HTTP by Host",
             ", ".join(sorted(worker.shroud_router.admin_hosts)), TUNNEL_PATH)


def app(environ, start_response):
    """WSGI entry for gunicorn: the admin app of the proxy started in this worker."""
    wsgi = _state.get("app")
    if wsgi is None:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"shroud proxy is starting\n"]
    return wsgi(environ, start_response)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["migrate-store"]:
        from lib.proxy.store.migrate import main as migrate_store

        return migrate_store(argv[1:])
    args = build_parser().parse_args(argv)
    if args.print_fingerprint:
        from lib.certs import cert_fingerprint, ensure_tunnel_cert

        cert = args.cert or ensure_tunnel_cert(args.data_dir, args.hostname)[0]
        print(cert_fingerprint(cert))
        return 0
    from lib.logsetup import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        started = start_proxy(args, admin=bool(args.admin_addr))
        admin = _serve_admin(args, started)
    except StartError as e:
        print(f"shroud_proxy: {e}", file=sys.stderr)
        return 1
    proxy, discovery = started["proxy"], started["discovery"]
    print(f"shroud_proxy: tunnel certificate fingerprint {proxy.fingerprint}", file=sys.stderr)
    for name, addr in proxy.registry.listeners.items():
        print(f"shroud_proxy: {name} listening on {addr}", file=sys.stderr, flush=True)
    _wait_for_signal()
    log.info("shutting down")
    for server in (admin, discovery):
        if server is not None:
            server.stop(timeout=1)
    proxy.stop()
    return 0


def _serve_admin(args, started):
    """The admin app on --admin-addr (None when it is off). :raises StartError:"""
    if not args.admin_addr:
        return None
    from gevent.pywsgi import WSGIServer

    from lib.errors import ListenError
    from lib.proxy.server import parse_addr

    try:
        admin = WSGIServer(parse_addr(args.admin_addr, "127.0.0.1"), started["app"], log=None)
        admin.start()
    except OSError as e:
        line = ListenError("admin", args.admin_addr, e).line("--admin-addr")
        raise StartError(f"cannot start: {line}") from None
    except ValueError as e:
        raise StartError(f"cannot start the admin listener on {args.admin_addr}: {e}") from None
    started["proxy"].add_listener("admin", admin)
    log.info("admin on http://%s:%d/", *admin.address[:2])
    return admin


def _wait_for_signal() -> None:
    import gevent
    from gevent.event import Event

    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()


if __name__ == "__main__":
    sys.exit(main())
