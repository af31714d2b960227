"""The proxy package's discovery role: tells clients which proxies serve a domain, over TLS.

Public API::

    FleetEntry(addr: str, fingerprint: str | None)
    parse_fleet("host:port[=sha256],...") -> list[FleetEntry]          # sans-I/O
    parse_resolver("host:port" | None) -> (host, port)   # --dns-resolver, else resolv.conf's
    Discovery(fleet=(), proxy_domain=None, dns_resolver=None, dns_timeout=5.0,
              lookup_cname=None, lookup_srv=None)
        .answer(domain) -> Answer(status, entries, reason)             # CNAME check, then
                                                                       # fleet or SRV
    render(answer, want_json) -> (status line, content type, body bytes)   # sans-I/O
    create_discovery_app(discovery) -> WSGI app                  # GET /proxies?q=<domain>
    DiscoveryServer(addr, app, ssl_context)   a gevent WSGIServer doing TLS itself, bounded
    start_discovery(args, proxy) -> DiscoveryServer | None       # from shroud_proxy's options

The API (docs/PROTOCOL.md, "Discovery") is the original shroud's: ``GET /proxies?q=<domain>``
answered ``text/plain``, one ``host:port`` per line; plus a JSON form for ``Accept:
application/json`` (or ``?format=json``): ``{"proxies": [{"addr": "host:port", "fingerprint":
"<sha256 hex>"}]}`` where a fingerprint is known (from ``--fleet host:port=fingerprint``).

Where the answer comes from, as the original's ``shroud-discover`` did, with a configured fleet
first:

1. With a proxy domain D (``--proxy-domain``): ``<domain>`` must be a CNAME for
   ``<domain>.<D>`` (asked of ``--dns-resolver``, else the first nameserver of
   /etc/resolv.conf): no record or another target is 403 with the reason; a DNS error is 500.
2. The configured fleet (``--fleet``), when there is one.
3. Otherwise SRV ``_shroud._tls.<domain>.<D>``, then ``_shroud._tls.<D>``, in RFC 2782 order;
   none is 500.
"""
from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass, field
from typing import Callable, NamedTuple
from urllib.parse import parse_qs

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from lib.net import dnsclient
from lib.peerlog import PeerLog
from lib.certs import normalize_pin
from lib.errors import ListenError
from lib.hostport import parse_hostport
from lib.protocol.sniff import normalize_hostname

log = logging.getLogger("shroud.discovery")

# Clients ask once at start; 256 connections at once is far above that and bounds memory
# (each connection is a greenlet and a TLS buffer) under a flood.
MAX_CONNECTIONS = 256
# Each handshake step and read: a client through Tor answers within seconds, a stalled peer
# must not hold a slot.
IO_TIMEOUT = 20.0
# A whole connection (handshake, request, answer, keep-alive included).
CONNECTION_TIMEOUT = 60.0
# A fleet longer than this is a configuration mistake (and would overflow clients' bounds).
MAX_FLEET = 256
SRV_PREFIX = "_shroud._tls."
JSON_TYPE = "application/json"
PATH = "/proxies"


class FleetEntry(NamedTuple):
    addr: str  # host:port (or a wss:// URL of a one-port proxy)
    fingerprint: str | None = None


class Answer(NamedTuple):
    status: int
    entries: list
    reason: str = ""


def parse_fleet(text: str | None) -> list[FleetEntry]:
    """``host:port[=fingerprint],...`` (commas or whitespace between entries).

    :raises ValueError: an entry that is not HOST:PORT, or a bad fingerprint.
    """
    entries = []
    for item in (text or "").replace(",", " ").split():
        addr, _, fp = item.partition("=")
        if not addr.lower().startswith(("wss://", "ws://")):
            parse_hostport(addr, what=f"--fleet entry {item!r} (host:port[=fingerprint])")
        entries.append(FleetEntry(addr, normalize_pin(fp) if fp else None))
    if len(entries) > MAX_FLEET:
        raise ValueError(f"--fleet lists {len(entries)} proxies (limit {MAX_FLEET})")
    return entries


def first_nameserver(path: str = "/etc/resolv.conf") -> tuple[str, int]:
    """The first ``nameserver`` of resolv.conf (the original's choice), port 53."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    return fields[1], 53
    except OSError:
        pass
    return "127.0.0.1", 53


def parse_resolver(text: str | None) -> tuple[str, int]:
    """--dns-resolver's address; with none, /etc/resolv.conf's first nameserver."""
    if not text:
        return first_nameserver()
    return parse_hostport(text, what="--dns-resolver")


@dataclass
class Discovery:
    """Decides the answer for a domain (see the module docstring). The DNS functions are
    injectable for tests: ``lookup_cname(name) -> str | None``, ``lookup_srv(name) -> list``
    of lib.net.dnsclient.SrvRecord in order, both raising lib.net.dnsclient.DnsError."""

    fleet: list = field(default_factory=list)
    proxy_domain: str | None = None
    dns_resolver: tuple | None = None
    dns_timeout: float = 5.0
    lookup_cname: Callable | None = None
    lookup_srv: Callable | None = None

    def __post_init__(self):
        if self.proxy_domain:
            self.proxy_domain = self.proxy_domain.strip(".").lower()
        if not self.fleet and not self.proxy_domain:
            raise ValueError("the discovery role needs a fleet (--fleet host:port[=fp],...) or "
                             "a proxy domain whose SRV records list the proxies (--proxy-domain)")
        resolver = self.dns_resolver or first_nameserver()
        if self.lookup_cname is None:
            self.lookup_cname = lambda name: dnsclient.lookup_cname(
                name, resolver=resolver, timeout=self.dns_timeout)
        if self.lookup_srv is None:
            self.lookup_srv = lambda name: dnsclient.lookup_srv(
                name, resolver=resolver, timeout=self.dns_timeout)

    def answer(self, domain: str) -> Answer:
        d = self.proxy_domain
        if d:
            expected = f"{domain}.{d}"
            try:
                target = self.lookup_cname(domain)
            except dnsclient.DnsError as e:
                return Answer(500, [], f"DNS lookup of {domain} failed: {e}")
            if target is None:
                return Answer(403, [], f"{domain} has no CNAME record: point it at {expected}")
            if target.rstrip(".").lower() != expected:
                return Answer(403, [], f"{domain} is a CNAME for {target}, not {expected}")
        if self.fleet:
            return Answer(200, list(self.fleet))
        for name in (f"{SRV_PREFIX}{domain}.{d}", f"{SRV_PREFIX}{d}"):
            try:
                records = self.lookup_srv(name)
            except dnsclient.DnsError as e:
                return Answer(500, [], f"SRV lookup of {name} failed: {e}")
            if records:
                return Answer(200, [FleetEntry(f"{r.target}:{r.port}") for r in
                                    records[:MAX_FLEET]])
        return Answer(500, [], f"no proxies: no SRV records at {SRV_PREFIX}{domain}.{d} "
                               f"or {SRV_PREFIX}{d}")


def render(answer: Answer, want_json: bool) -> tuple[str, str, bytes]:
    """(HTTP status line, content type, body) for an answer."""
    status = {200: "200 OK", 400: "400 Bad Request", 403: "403 Forbidden",
              404: "404 Not Found", 405: "405 Method Not Allowed",
              500: "500 Internal Server Error"}.get(answer.status, f"{answer.status} Error")
    if want_json:
        if answer.status == 200:
            doc = {"proxies": [{"addr": e.addr, **({"fingerprint": e.fingerprint}
                                                  if e.fingerprint else {})}
                               for e in answer.entries]}
        else:
            doc = {"error": answer.reason}
        return status, JSON_TYPE, json.dumps(doc).encode() + b"\n"
    if answer.status == 200:
        body = "".join(e.addr + "\n" for e in answer.entries)
    else:
        body = answer.reason + "\n"
    return status, "text/plain; charset=utf-8", body.encode()


def _wants_json(environ, params) -> bool:
    """``?format=json``, or application/json in Accept with a non-zero q."""
    if params.get("format", [""])[0].lower() == "json":
        return True
    for part in environ.get("HTTP_ACCEPT", "").split(",")[:32]:  # a sane Accept has a few
        mime, *attrs = [x.strip().lower() for x in part.split(";")]
        if mime != JSON_TYPE:
            continue
        for a in attrs:
            if a.replace(" ", "").startswith("q="):
                try:
                    return float(a.split("=", 1)[1]) > 0
                except ValueError:
                    return False
        return True
    return False


def create_discovery_app(discovery: Discovery):
    """The WSGI app: ``GET /proxies?q=<domain>`` (HEAD too); every other path is 404."""

    # Anyone may ask: the line per answer is rate-limited per asking address.
    answers_log = PeerLog(logger=log)

    def app(environ, start_response):
        params = parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=8)
        want_json = _wants_json(environ, params)
        if environ.get("PATH_INFO") != PATH:
            answer = Answer(404, [], f"not found: the discovery API is GET {PATH}?q=<domain>")
        elif environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            answer = Answer(405, [], "only GET")
        else:
            q = params.get("q", [""])[0]
            try:
                domain = normalize_hostname(q)
            except ValueError:
                domain = None
            if not q or domain is None:
                answer = Answer(400, [], f"q must be a domain name, got {q[:80]!r}")
            else:
                answer = discovery.answer(domain)
                answers_log.log(environ.get("REMOTE_ADDR") or "?", logging.INFO,
                                "discovery %s: %d %s", domain, answer.status,
                                answer.reason or f"{len(answer.entries)} proxies")
        status, ctype, body = render(answer, want_json)
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   ("Cache-Control", "no-store")]
        if answer.status == 405:
            headers.append(("Allow", "GET, HEAD"))
        start_response(status, headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


class DiscoveryServer(WSGIServer):
    """pywsgi doing the TLS handshake itself, inside a per-connection timeout (gevent's own
    TLS server wraps before any timeout applies), with a bounded pool of connections."""

    def __init__(self, listener, application, ssl_context: ssl.SSLContext):
        super().__init__(listener, application, spawn=Pool(MAX_CONNECTIONS), log=None,
                         error_log=log,
                         # a fixed name: pywsgi would otherwise call getfqdn (a DNS lookup)
                         environ={"SERVER_NAME": "shroud-discovery"})
        self._tls = ssl_context

    def handle(self, sock, address):
        sock.settimeout(IO_TIMEOUT)
        tls = None
        with gevent.Timeout(CONNECTION_TIMEOUT, False):
            try:
                tls = self._tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.debug("discovery: TLS handshake from %s failed: %s", address[0], e)
                return
            try:
                super().handle(tls, address)
            except OSError:
                pass
        if tls is not None:
            tls.close()


def start_discovery(args, proxy=None, listener=None) -> DiscoveryServer | None:
    """Start the discovery role when ``args.discovery_addr`` is set; None otherwise.
    ``listener``: a socket opened before gunicorn forked (lib/proxy/prefork.py), used instead
    of binding ``discovery_addr`` again.

    The certificate is ``--discovery-cert/--discovery-key``, else the proxy's own (so clients
    can pin the proxy's fingerprint for discovery too).

    :raises ValueError: bad options. :raises OSError: cannot listen.
    """
    from lib.certs import server_tls_context
    from lib.proxy.server import parse_addr

    addr = getattr(args, "discovery_addr", None)
    if not addr:
        return None
    cert = getattr(args, "discovery_cert", None) or (proxy.cert_path if proxy else None)
    key = getattr(args, "discovery_key", None) or (proxy.key_path if proxy else None)
    if not cert or not key:
        raise ValueError("the discovery role needs --discovery-cert and --discovery-key")
    discovery = Discovery(fleet=parse_fleet(getattr(args, "fleet", None)),
                          proxy_domain=getattr(args, "proxy_domain", None) or None,
                          dns_resolver=parse_resolver(getattr(args, "dns_resolver", None)))
    from lib.net.sockets import adopt_listener

    bind = adopt_listener(listener) if listener is not None else parse_addr(addr, "0.0.0.0")
    server = DiscoveryServer(bind, create_discovery_app(discovery),
                             server_tls_context(cert, key))
    try:
        server.start()
    except OSError as e:
        raise ListenError("discovery", addr, e) from None
    if proxy is not None:
        proxy.add_listener("discovery", server)
    log.info("discovery on https://%s:%d%s (%s%s)", *server.address[:2], PATH,
             f"fleet of {len(discovery.fleet)}" if discovery.fleet else "SRV records",
             f", CNAME check under {discovery.proxy_domain}" if discovery.proxy_domain else "")
    return server
