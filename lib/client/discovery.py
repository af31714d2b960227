"""Finding proxies when no ``--proxy`` is given: a discovery service, or DNS SRV, through Tor.

Public API::

    discover_proxies(args, services, tor) -> list[ProxyAddr]
        # shroud.py's entry: --discovery URL (then --srv if both are given and discovery fails),
        # or --srv; the first --count proxies. tor: a lib.client.tor.TorAccess, or None (--tor none).
    fetch_proxies(url, domain, dial, cafile=None, pin=None, timeout=60.0) -> list[ProxyAddr]
        # HTTPS GET <url>?q=<domain>; dial(host, port, isolation_key, timeout) -> socket
    srv_proxies(domain, resolver, connect=None, timeout=30.0, rng=None) -> list[ProxyAddr]
        # SRV _shroud._tls.<domain> over TCP (connect(host, port, timeout) -> socket), RFC 2782
    discovery_domain(services) -> str          # the name discovery asks about
    discovery_target(url, domain) -> (host, port, target)      # sans-I/O
    build_request(host, port, target) -> h11.Request           # sans-I/O
    parse_proxy_list(body, content_type) -> list[ProxyAddr]    # sans-I/O, both answer forms

    DiscoveryError(ValueError)   every failure, saying what was asked of whom and what came back

The discovery service speaks the original shroud's API (``GET /proxies?q=<domain>``, answered
``text/plain`` with one ``host:port`` per line) and a JSON form we ask for with ``Accept:
application/json``: ``{"proxies": [{"addr": "host:port", "fingerprint": "<sha256 hex>"}]}``. A
fingerprint becomes the ProxyAddr's ``pin``: the client then verifies that proxy's certificate by
what discovery vouched for. The discovery server's own certificate is verified by the system's
CAs, ``--discovery-ca FILE`` or ``--discovery-pin SHA256``. The request goes through Tor on its own
circuit (isolation key "discovery"), the URL's host resolved by Tor.

SRV caveat: the lookup is DNS over TCP through a Tor exit to ``--dns-resolver``, unauthenticated
(no DNSSEC). The exit or the resolver can read the name and change the answer. A changed answer
cannot hand our tunnel to an impostor when the proxies are verified by ``--pin`` or
``--proxy-ca``; with the system CAs alone it can send the tunnel to any host holding a valid
certificate for its own name. Use pins (or a discovery service) where that matters.
"""
from __future__ import annotations

import json
import logging
import random
import ssl
import time
from urllib.parse import urlencode, urlsplit

import h11

from lib.errors import ShroudError
from lib.net import dnsclient
from lib.certs import PinMismatch, check_pin, client_tls_context, normalize_pin
from lib.client.tunnels import ProxyAddr, direct_dial
from lib.hostport import AddressError, parse_hostport

log = logging.getLogger("shroud.discovery")

# A proxy list is small: 64 KiB holds ~700 JSON entries, far more than any fleet, and caps what
# a hostile or broken server can make us buffer.
MAX_BODY_BYTES = 64 * 1024
# Status line plus headers; a discovery answer carries a handful of headers.
MAX_HEAD_BYTES = 16 * 1024
# More entries than this is not a fleet but an abuse; refused rather than truncated silently.
MAX_PROXIES = 256
# One whole discovery exchange (circuit build, TLS, request, answer): a cold Tor circuit on a
# slow network takes tens of seconds; past a minute something is wrong.
FETCH_TIMEOUT = 60.0
# One SRV lookup over TCP through Tor, the connection included.
SRV_TIMEOUT = 30.0
READ_CHUNK = 16 * 1024
ISOLATION_KEY = "discovery"  # discovery gets a circuit of its own, apart from every tunnel
SRV_PREFIX = "_shroud._tls."
JSON_TYPE = "application/json"


class DiscoveryError(ShroudError, ValueError):
    """No proxies could be found; the message says where we looked and what went wrong."""


# --- sans-I/O -----------------------------------------------------------------------------------

def discovery_domain(services) -> str:
    """The name discovery is asked about: the first TLS or HTTP service's (as the original did,
    one domain per client); a wildcard asks about its base name."""
    for svc in services:
        if svc.protocol != "tcp":
            return svc.name[2:] if svc.name.startswith("*.") else svc.name
    raise DiscoveryError("discovery needs a named service (tcp:PORT services have no domain to "
                         "ask about): give --proxy HOST:PORT")


def discovery_target(url: str, domain: str) -> tuple[str, int, str]:
    """(host, port, request target) of ``<url>?q=<domain>``; only https:// URLs."""
    u = urlsplit(url)
    if u.scheme.lower() != "https" or not u.hostname:
        raise DiscoveryError(f"discovery URL must be https://HOST[:PORT]/PATH, got {url!r}")
    if u.username or u.password or u.fragment:
        raise DiscoveryError(f"discovery URL {url!r}: no credentials or fragment allowed")
    try:
        port = u.port or 443
    except ValueError:
        raise DiscoveryError(f"discovery URL {url!r} has a bad port") from None
    query = urlencode({"q": domain})
    target = (u.path or "/") + "?" + (u.query + "&" + query if u.query else query)
    return u.hostname, port, target


def build_request(host: str, port: int, target: str) -> h11.Request:
    """The GET request. No User-Agent: nothing that identifies this client's version."""
    host_header = f"[{host}]" if ":" in host else host
    if port != 443:
        host_header += f":{port}"
    return h11.Request(method="GET", target=target, headers=[
        ("Host", host_header), ("Accept", f"{JSON_TYPE}, text/plain;q=0.5"),
        ("Connection", "close")])


def _proxy_addr(text: str, where: str, pin: str | None = None) -> ProxyAddr:
    text = text.strip()
    low = text.lower()
    try:
        if low.startswith(("wss://", "ws://")):
            addr = ProxyAddr.parse(text)
        else:
            host, port = parse_hostport(text, what=f"discovery answer {where}")
            host = host.rstrip(".")  # Go's SRV targets end in a dot
            if not host:
                raise ValueError
            addr = ProxyAddr(host, port)
    except ValueError:  # AddressError is one
        raise DiscoveryError(f"discovery answer {where} is not HOST:PORT: {text[:80]!r}") \
            from None
    if pin is not None:
        try:
            pin = normalize_pin(pin)
        except (ValueError, AttributeError):
            raise DiscoveryError(f"discovery answer {where}: fingerprint {str(pin)[:80]!r} is "
                                 f"not a SHA-256 in hex") from None
        addr = ProxyAddr(addr.host, addr.port, pin=pin, scheme=addr.scheme, path=addr.path)
    return addr


def parse_proxy_list(body: bytes, content_type: str = "text/plain") -> list[ProxyAddr]:
    """The proxies of a discovery answer, in the server's order, duplicates dropped.

    ``content_type`` application/json: ``{"proxies": [{"addr": ..., "fingerprint": ...}]}``
    (fingerprint optional); anything else: lines ``host:port`` (blank lines and ``#`` comments
    skipped), the original's form.

    :raises DiscoveryError: malformed answer, more than MAX_PROXIES entries, or none at all.
    """
    if len(body) > MAX_BODY_BYTES:
        raise DiscoveryError(f"discovery answer larger than {MAX_BODY_BYTES} bytes")
    mime = content_type.split(";", 1)[0].strip().lower()
    proxies: list[ProxyAddr] = []
    if mime == JSON_TYPE or mime.endswith("+json"):
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise DiscoveryError(f"discovery answer is not valid JSON: {e}") from None
        entries = doc.get("proxies") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise DiscoveryError('discovery JSON answer has no "proxies" list')
        if len(entries) > MAX_PROXIES:
            raise DiscoveryError(f"discovery answer lists {len(entries)} proxies "
                                 f"(limit {MAX_PROXIES})")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("addr"), str):
                raise DiscoveryError(f'discovery answer entry {i}: expected {{"addr": '
                                     f'"host:port", "fingerprint": "..."}}')
            fp = e.get("fingerprint")
            proxies.append(_proxy_addr(e["addr"], f"entry {i}", fp if fp else None))
    else:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise DiscoveryError("discovery answer is not UTF-8 text") from None
        for number, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if len(proxies) >= MAX_PROXIES:
                raise DiscoveryError(f"discovery answer lists more than {MAX_PROXIES} proxies")
            proxies.append(_proxy_addr(line, f"line {number}"))
    unique = list(dict.fromkeys(proxies))
    if not unique:
        raise DiscoveryError("discovery answer lists no proxies")
    return unique


# --- I/O ----------------------------------------------------------------------------------------

def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DiscoveryError(f"{what}: no complete answer in time")
    return left


def fetch_proxies(url: str, domain: str, dial=direct_dial, cafile: str | None = None,
                  pin: str | None = None, timeout: float = FETCH_TIMEOUT) -> list[ProxyAddr]:
    """Ask the discovery service at ``url`` for the proxies serving ``domain``.

    ``dial(host, port, isolation_key, timeout)`` opens the TCP connection: ``tor.open_connection``
    (the URL's host resolved by Tor) or ``direct_dial``. The server's certificate is checked
    against ``cafile`` (or the system's CAs) and the URL's host, or against ``pin`` alone.
    ``timeout`` bounds the whole exchange; the answer is bounded by MAX_HEAD_BYTES and
    MAX_BODY_BYTES.

    :raises DiscoveryError: unreachable, certificate refused, non-200 answer (with the server's
        reason), malformed or empty answer, too big, or too slow.
    """
    host, port, target = discovery_target(url, domain)
    if pin:
        try:
            pin = normalize_pin(pin)
        except ValueError as e:
            raise DiscoveryError(f"--discovery-pin: {e}") from None
    what = f"discovery service {host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = dial(host, port, ISOLATION_KEY, _remaining(deadline, what))
    except OSError as e:
        raise DiscoveryError(f"cannot reach {what}: {e}") from None
    try:
        sock.settimeout(_remaining(deadline, what))
        try:
            tls = client_tls_context(cafile, pinned=bool(pin)).wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            raise DiscoveryError(f"{what}: certificate refused ({e.verify_message}); something "
                                 f"between us and it, such as a Tor exit, may be intercepting "
                                 f"TLS") from None
        except (ssl.SSLError, OSError) as e:
            raise DiscoveryError(f"{what}: TLS handshake failed: {e}") from None
        sock = tls
        if pin:
            try:
                check_pin(tls, {pin})
            except PinMismatch as e:
                raise DiscoveryError(
                    f"{what} presented certificate {e.fingerprint[:16]}..., not the pinned "
                    f"{pin[:16]}...: refusing it (something between us and it, such as a Tor "
                    f"exit, may be intercepting TLS)") from None
        status, content_type, body = _exchange(tls, build_request(host, port, target),
                                               deadline, what)
    except (OSError, TimeoutError) as e:
        raise DiscoveryError(f"{what}: {e or type(e).__name__}") from None
    finally:
        sock.close()
    if status != 200:
        reason = body[:200].decode("utf-8", "replace").strip()
        if content_type.startswith(JSON_TYPE):
            try:
                reason = str(json.loads(body).get("error", reason))
            except (ValueError, AttributeError, RecursionError):
                pass
        raise DiscoveryError(f"{what} answered {status} for {domain}: {reason or '(no reason)'}")
    return parse_proxy_list(body, content_type)


def _exchange(sock, request: h11.Request, deadline: float,
              what: str) -> tuple[int, str, bytes]:
    """Send the request, read one bounded response: (status, content type, body)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    data = conn.send(request) + conn.send(h11.EndOfMessage())
    sock.settimeout(_remaining(deadline, what))
    sock.sendall(data)
    status, content_type, body = 0, "", bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise DiscoveryError(f"{what}: malformed HTTP answer: {e}") from None
        if event is h11.NEED_DATA:
            sock.settimeout(_remaining(deadline, what))
            try:
                chunk = sock.recv(READ_CHUNK)
            except TimeoutError:  # socket.timeout is TimeoutError
                raise DiscoveryError(f"{what}: no complete answer in time") from None
            conn.receive_data(chunk)
        elif isinstance(event, h11.Response):
            status = event.status_code
            for name, value in event.headers:
                if name == b"content-type":
                    content_type = value.decode("latin-1").lower()
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise DiscoveryError(f"{what}: answer larger than {MAX_BODY_BYTES} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            if not status:
                raise DiscoveryError(f"{what} closed the connection without an answer")
            return status, content_type, bytes(body)
        # InformationalResponse (1xx): keep reading


def srv_proxies(domain: str, resolver: tuple[str, int], connect=None,
                timeout: float = SRV_TIMEOUT, rng: random.Random | None = None) -> list[ProxyAddr]:
    """Proxies named by the SRV records of ``_shroud._tls.<domain>``, in RFC 2782 order.

    The query goes over TCP to ``resolver``; ``connect(host, port, timeout) -> socket`` opens
    that connection (through Tor in the client). See the module docstring's caveat.

    :raises DiscoveryError: no records, or the lookup failed.
    """
    name = SRV_PREFIX + domain
    where = f"{name} (resolver {resolver[0]}:{resolver[1]}, DNS over TCP)"
    try:
        records = dnsclient.lookup_srv(name, rng=rng, resolver=resolver, transport="tcp",
                                       timeout=timeout, connect=connect)
    except dnsclient.DnsError as e:
        raise DiscoveryError(f"SRV lookup of {where} failed: {e}") from None
    if not records:
        raise DiscoveryError(f"no SRV records at {where}: publish e.g. "
                             f"'{name}. SRV 10 10 4443 proxy.example.net.'")
    if len(records) > MAX_PROXIES:
        records = records[:MAX_PROXIES]
    return list(dict.fromkeys(ProxyAddr(r.target, r.port) for r in records))


def parse_resolver(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text, what="--dns-resolver")
    except AddressError as e:
        raise DiscoveryError(str(e)) from None


def discover_proxies(args, services, tor) -> list[ProxyAddr]:
    """The proxies to use when no --proxy is given (see the module docstring).

    Reads ``args.discovery``, ``discovery_ca``, ``discovery_pin``, ``srv``, ``dns_resolver`` and
    ``count``. Through ``tor`` when given, else directly.
    """
    count = getattr(args, "count", 3)
    if count < 1:
        raise DiscoveryError(f"--count must be at least 1, got {count}")
    url = getattr(args, "discovery", None)
    use_srv = getattr(args, "srv", False)
    if not url and not use_srv:
        raise DiscoveryError("no proxies: give --proxy HOST:PORT (repeatable), --discovery URL "
                             "or --srv")
    domain = discovery_domain(services)
    proxies = None
    if url:
        dial = tor.open_connection if tor is not None else direct_dial
        try:
            proxies = fetch_proxies(url, domain, dial, cafile=getattr(args, "discovery_ca", None),
                                    pin=getattr(args, "discovery_pin", None))
            source = url
        except DiscoveryError as e:
            if not use_srv:
                raise
            log.warning("%s; trying SRV records", e)
    if proxies is None:
        resolver = parse_resolver(getattr(args, "dns_resolver", None) or "")
        def through_tor(host, port, timeout):
            return tor.open_connection(host, port, ISOLATION_KEY, timeout)
        connect = through_tor if tor is not None else None
        proxies = srv_proxies(domain, resolver, connect=connect)
        source = f"SRV {SRV_PREFIX}{domain}"
    chosen = proxies[:count]
    log.info("discovery (%s) for %s: %d proxies, using %s", source, domain, len(proxies),
             ", ".join(str(p) + (" (pinned)" if p.pin else "") for p in chosen))
    return chosen
