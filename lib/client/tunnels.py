"""The Shroud client: one long-lived tunnel per public proxy, streams served to local targets.

Public API::

    services = [Service.parse("example.com", "127.0.0.1:443"), Service.parse("tcp:20001", ...)]
    client = Client(ClientConfig(services=services, proxies=[ProxyAddr("proxy", 4443)],
                                 pins={"ab12..."}, identity=Identity.load_or_create(dir),
                                 dial=direct_dial))
    client.start()           # one TunnelRunner greenlet per proxy; returns at once
    client.status()          # [{proxy, state, streams, bytes_in, bytes_out, error, ...}]
    client.wait_bound(n, timeout)   # until n tunnels have bound every service
    client.stop()
    client.runners[i].serve(session)   # streams the proxy opens on a bound session, until it ends

A tunnel: dial (directly or through Tor: ``dial(host, port, isolation_key, timeout)``), TLS with
the proxy's certificate verified (pin, CA bundle, or the system's CAs), for a ``wss://`` proxy a
WebSocket handshake (lib.net.wstransport, muxado in binary messages), a muxado session as the
dialler, Auth (our Ed25519 public key), one signed Bind per service, then every stream the proxy
opens: read StartProxy, connect to the service's local target, optionally send a PROXY protocol
header, splice. A dead tunnel (read error, GOAWAY, missed heartbeats) is redialled with
exponential backoff and jitter while the other tunnels keep serving.

This module uses gevent's APIs directly and never monkey-patches.
"""
from __future__ import annotations

import ipaddress
import logging
import random
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import gevent
import gevent.socket as gsocket

from lib.protocol import messages as msg
from lib.protocol import sniff
from lib.certs import PinMismatch, check_pin, client_tls_context
from lib.client.terminate import Replay
from lib.net.greenpool import WorkerPool
from lib.net.tlstransport import TLSTransport
from lib.errors import ErrorCode, MuxError, ShroudError
from lib.hostport import AddressError, format_hostport, parse_hostport
from lib.net.muxsession import MuxConfig, Session
from lib.net.sockets import (connect_numeric, finish_connect, nowait_sender, send_all,
                             set_nodelay, start_connect)
from lib.net.splice import UNSENT_LOWAT, splice, splice_detached
from lib.peerlog import PeerLog

log = logging.getLogger("shroud.client")
# Lines a stream the proxy opens can trigger (no StartProxy, an unknown name, a target that
# refused, a PROXY header that failed): one a stream, so a proxy opening streams in a loop, or
# visitors while the target is down, would write the log at their rate. 10 a minute per proxy
# (lib.peerlog); PeerLog.dropped counts the rest.
stream_log = PeerLog(lines=10, per=60.0, logger=log)


PERMANENT_RETRY_BASE = 60.0  # seconds: a permanent failure is asked again after 1-2 minutes,
PERMANENT_RETRY_CAP = 600.0  # doubling up to every 5-10 minutes


def ownership_hint(svc, error: str, identity) -> str:
    """The fix for a name another key owns (lib/proxy/ownership.py, rule 4: a DNS TXT record
    naming our key overrides a first-use owner)."""
    if "belongs to key" not in error:
        return ""
    if svc.protocol == "tcp" or identity is None:
        return ""
    base = svc.name[2:] if svc.name.startswith("*.") else svc.name
    return (f". If {svc.name} is yours, publish the DNS TXT record _shroud.{base} "
            f"\"shroud-key={identity.fingerprint}\" (this client's key): proxies then grant "
            f"it to this key; or run with the identity key that bound it first")


class TunnelError(ShroudError):
    """A tunnel could not be set up; ``permanent`` errors are not worth retrying soon."""

    def __init__(self, message: str, permanent: bool = False, reason: str | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.reason = reason  # the proxy's refusal code (lib.protocol.messages REASON_*)


# Refusals that time fixes (the proxy's store is full or away, a rate limit): retried at the
# normal pace. Every other refusal (another key owns the name, no rule allows it, a bad
# signature) needs someone to act, and is retried slowly (PERMANENT_RETRY_*).
TRANSIENT_REFUSALS = frozenset({msg.REASON_INTERNAL, msg.REASON_STORE_UNAVAILABLE,
                                msg.REASON_LIMIT})


# A scheme and its slashes, as a URL starts: what a user may write before a name by mistake.
_URL_PREFIX = re.compile(r"(?i)(tls|https|http|tcp)?[:/]+")


def _no_slashes(name: str) -> str:
    """The one line for a URL written where a service name goes, naming the name to write."""
    rest, proto = name, ""
    while (m := _URL_PREFIX.match(rest)) is not None:
        proto = proto or (m.group(1) or "").lower()
        rest = rest[m.end():]
    host, _, path = rest.partition("/")
    fix = {"https": f"https:{host} (a certificate obtained here, TLS ended by this client) or "
                    f"{host} (TLS passed through)",
           "http": f"http:{host}", "tcp": f"tcp:{host}"}.get(proto, host)
    if path:
        fix += " (a path is not part of it: the whole host is served)"
    return f"{name}: a service name has no slashes; write {fix}"


@dataclass
class Service:
    """One NAME TARGET pair: what the proxy routes to us, and where we send it locally."""

    protocol: str  # tls | http | tcp
    name: str  # hostname (or wildcard) for tls/http, "tcp:PORT" for tcp
    target: tuple[str, int]
    remote_port: int | None = None
    # https:NAME: bound as a TLS name, but TLS ends here with a certificate obtained by ACME
    # (lib.client.terminate, lib.client.acme) and the target gets plain bytes.
    terminate: bool = False
    # The target's address family when its host is a numeric address (connected without the
    # resolver, from the session's reader: TunnelRunner._take_stream), else None.
    family: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.family = numeric_family(self.target[0])

    @classmethod
    def parse(cls, name: str, target: str) -> "Service":
        tgt = parse_hostport(target, what=f"the target of {name}")
        low = name.lower()
        for prefix in ("tls://", "https://", "http://", "tcp://", "tls:", "https:", "http:",
                       "tcp:"):
            if low.startswith(prefix):
                proto = prefix.rstrip(":/")
                rest = name[len(prefix):]
                break
        else:
            proto, rest = "tls", name
        if "/" in rest:
            raise ValueError(_no_slashes(name))
        terminate = low.startswith("https:") and not low.startswith("https://")
        if proto == "https":
            proto = "tls"
        if terminate:
            if rest.startswith("*"):
                raise ValueError(f"{name}: a wildcard certificate needs ACME's DNS-01 challenge, "
                                 f"which Shroud does not do; name each host (https:a.{rest[2:]})")
            return cls("tls", sniff.normalize_hostname(rest), tgt, terminate=True)
        if proto == "tcp":
            if not rest.isdigit() or len(rest) > 5 or not 0 < int(rest) < 65536:
                raise ValueError(f"{name}: a raw TCP service is tcp:PORT, PORT (1-65535) the "
                                 f"port to open on each proxy, e.g. tcp:20001")
            return cls("tcp", f"tcp:{int(rest)}", tgt, int(rest))
        return cls(proto, sniff.normalize_hostname(rest, allow_wildcard=True), tgt)

    @staticmethod
    def spelling_note(name: str, target: str) -> str | None:
        """One line for a valid spelling that is easily a mistake: ``https://NAME``, the older
        spelling of a passed-through TLS name (README), written for ``https:NAME``."""
        if not name.lower().startswith("https://"):
            return None
        return (f"{name} passes TLS through to {target}, which must end TLS itself; for a "
                f"certificate obtained here (TLS ended by this client), write "
                f"https:{name[len('https://'):]}")

    def answers_bind(self, url: str) -> bool:
        """Whether ``url`` (a proxy's BindResp.Url) names what this service asked for: its
        protocol and name (``tls://NAME``, ``http://NAME``, a port allowed), or for
        ``tcp:PORT`` a ``tcp://HOST:PORT`` on any host (the proxy's public name)."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or not rest:
            return False
        if self.protocol == "tcp":
            try:
                _, port = parse_hostport(rest, what="BindResp.Url")
            except AddressError:
                return False
            return scheme == "tcp" and port == self.remote_port
        if scheme not in (("tls", "https") if self.protocol == "tls" else ("http",)):
            return False
        try:
            return sniff.normalize_hostname(rest, allow_wildcard=True) == self.name
        except ValueError:
            return False

    def bind_message(self, nonce: bytes | None, identity, proxy_id: str | None = None) -> msg.Bind:
        """The Bind for this service: signed over the proxy's nonce and ``proxy_id`` (the
        proxy this client verified, lib.protocol.messages.proxy_id_for_*) when both are known, else
        unsigned (an original go-tunnel proxy sends no nonce)."""
        if self.protocol == "tcp":
            b = msg.Bind(protocol="tcp", remote_port=self.remote_port)
        else:
            b = msg.Bind(protocol=self.protocol, hostname=self.name)
        if identity is not None and nonce is not None:
            if proxy_id is None:
                raise ValueError("a signed bind needs the proxy id it is meant for")
            payload = msg.bind_signature_payload(nonce, proxy_id, b.protocol, b.signed_name)
            b = msg.Bind(protocol=b.protocol, hostname=b.hostname, remote_port=b.remote_port,
                         extra=msg.bind_extra(identity.sign(payload), proxy_id))
        return b


@dataclass(frozen=True)
class ProxyAddr:
    host: str
    port: int
    pin: str | None = None  # a fingerprint vouched for by discovery
    # "tls": the proxy's raw tunnel port; "wss"/"ws": a WebSocket at `path` (a proxy behind a
    # platform's HTTP router, docs/DEPLOY.md). "ws" has no TLS at all: for local tests only.
    scheme: str = "tls"
    path: str = ""

    @classmethod
    def parse(cls, text: str, default_port: int = 4443) -> "ProxyAddr":
        """'HOST:PORT', 'HOST', or 'wss://HOST[:PORT]/PATH' (also 'ws://')."""
        low = text.lower()
        if low.startswith(("wss://", "ws://")):
            from urllib.parse import urlsplit

            u = urlsplit(text)
            if not u.hostname or u.query or u.fragment or u.username:
                raise ValueError(f"bad WebSocket proxy URL {text!r} (wss://HOST[:PORT]/PATH)")
            scheme = u.scheme.lower()
            return cls(u.hostname, u.port or (443 if scheme == "wss" else 80), scheme=scheme,
                       path=u.path or "/")
        return cls(*parse_hostport(text, what="--proxy", default_port=default_port))

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "wss" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        if self.websocket:
            return f"{self.scheme}://{self.host_header}{self.path}"
        return format_hostport(self.host, self.port)


def direct_dial(host: str, port: int, isolation_key: str, timeout: float):
    """Connect without Tor (``--tor none``): the proxy sees our address."""
    sock = gsocket.create_connection((host, port), timeout=timeout)
    set_nodelay(sock)
    return sock


@dataclass
class Backoff:
    """Exponential backoff with full jitter; injectable random source for tests."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rand: Callable[[], float] = random.random

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt += 1
        # Half fixed, half jitter: never a thundering herd, never an immediate hammer.
        return ceiling / 2 + self.rand() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class ClientConfig:
    services: list[Service]
    proxies: list[ProxyAddr]
    identity: object | None = None  # lib.identity.Identity; None sends unsigned binds
    pins: set[str] = field(default_factory=set)
    proxy_ca: str | None = None
    dial: Callable = direct_dial
    proxy_protocol: str | None = None  # None | "v1" | "v2"
    # For https: services: (stream, service) -> a plain-bytes stream, or None when the stream
    # is finished (lib.client.terminate.terminate through lib.client.acme).
    terminate: Callable | None = None
    # The proxy opens a stream per visitor: accept as many as we serve, so a burst of visitors
    # is queued rather than refused (bench/load.py: 1,000 at once overflowed a 256 backlog).
    mux: MuxConfig = field(default_factory=lambda: MuxConfig(max_streams=4096,
                                                            accept_backlog=4096))
    connect_timeout: float = 60.0  # dialling through Tor can take a while on a cold circuit
    handshake_timeout: float = 30.0
    local_connect_timeout: float = 5.0
    start_proxy_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # Streams served at once per tunnel; beyond it new streams are refused (RST 6). Matches
    # the proxy's --max-streams-per-tunnel: streams linger ~1 s while closing under churn.
    max_streams: int = 4096


@dataclass
class StreamRecord:
    """One visitor connection as this client served it (the console's connection log)."""

    started: float  # epoch seconds
    proxy: str  # which tunnel carried it
    visitor: str = "?"  # the public peer's address, as the proxy reported it
    name: str = "?"  # the service it was for
    bytes_in: int = 0  # visitor -> service
    bytes_out: int = 0  # service -> visitor
    duration: float = 0.0  # seconds
    result: str = "ok"  # or why it was refused


class TunnelRunner:
    """Keeps one proxy's tunnel up: dial, verify, auth, bind, serve; redial on failure."""

    def __init__(self, client: "Client", proxy: ProxyAddr, index: int):
        self.client = client
        self.proxy = proxy
        self.proxy_name = str(proxy)  # each stream's record names it
        self.index = index
        self.state = "starting"
        self.error: str | None = None
        self.session: Session | None = None
        self.bound: dict[str, str] = {}  # url -> service name
        # url -> service, for this connection's streams only: what one proxy answers must not
        # route another proxy's streams (docs/SECURITY.md, "A proxy operator").
        self.urls: dict[str, Service] = {}
        self.refused: dict[str, str] = {}  # service name -> the proxy's reason
        self.refused_reasons: dict[str, str | None] = {}  # service name -> its REASON_* code
        self.retry_soon: set[str] = set()  # refused only because the proxy's store was down
        self.streams_open = 0
        self.streams_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connects = 0
        self.connected_at: float | None = None
        self.client_id = ""
        self.generation = 0  # bumped per connection: a fresh Tor circuit each time
        self.proxy_id: str | None = None  # what this connection's binds are signed for
        self.backoff = Backoff(client.config.backoff_base, client.config.backoff_cap)
        # Permanent failures (a wrong pin, a name owned by another key, a protocol mismatch)
        # will not fix themselves in seconds: ask again every few minutes, not every 30 s.
        self.slow_backoff = Backoff(PERMANENT_RETRY_BASE, PERMANENT_RETRY_CAP)
        self.retry_at: float | None = None  # when the next attempt is due (epoch seconds)
        self._reported: str | None = None  # the last failure logged
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False
        self.sock = None
        self.circuit = None  # lib.client.tor.CircuitInfo when tunnelled through Tor

    @property
    def isolation_key(self) -> str:
        return f"shroud-tunnel-{self.index}-{self.generation}"

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        self._stopping = True
        if self.session is not None:
            self.session.close(ErrorCode.NO_ERROR, "client stopping")
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=2)

    def reconnect(self, why: str) -> None:
        """Drop the current tunnel (e.g. its Tor circuit failed); the loop redials."""
        if self.session is not None and not self.session.closed:
            log.warning("tunnel %s: reconnecting: %s", self.proxy, why)
            self.session.close(ErrorCode.NO_ERROR, why)

    def _set(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.client._changed(self)

    def _run(self) -> None:
        while not self._stopping:
            permanent = False
            try:
                self._connect_and_serve()
                error = "the tunnel closed"
            except TunnelError as e:
                error, permanent = str(e), e.permanent
            except (OSError, ShroudError, EOFError) as e:  # MuxError, MessageError, TorError...
                error = f"{type(e).__name__}: {e}"
            except gevent.GreenletExit:
                raise
            except Exception as e:  # a bug: it costs a retry (logged with its traceback), never
                # the tunnel; every error we expect is above
                error = f"{type(e).__name__}: {e}"
                log.exception("tunnel %s: unexpected error", self.proxy)
            if self._stopping:
                break
            # Back off from where we are, unless the tunnel served for a minute: a proxy that
            # accepts and drops at once must not be redialled (over a fresh circuit) 2 times a
            # second forever.
            if self.connected_at and time.time() - self.connected_at > 60:
                self.backoff.reset()
                self.slow_backoff.reset()
            delay = (self.slow_backoff if permanent else self.backoff).next_delay()
            self.connected_at = None
            self.retry_at = time.time() + delay
            self._report(error, permanent, delay)
            self._set("backoff", error)
            gevent.sleep(delay)
        self.retry_at = None

    def _report(self, error: str, permanent: bool, delay: float) -> None:
        """One log line per failed attempt, with its fix and when the next one is; a permanent
        failure is reported once (it would repeat its whole fix every few minutes) and then
        only at debug level until the tunnel comes online."""
        if not permanent:
            self._reported = None
            log.warning("tunnel %s failed: %s; retrying in %.1f s", self.proxy, error, delay)
        elif error != self._reported:
            self._reported = error
            log.error("tunnel %s: %s. Retrying every few minutes in case it is fixed "
                      "meanwhile (next in %.0f s)", self.proxy, error, delay)
        else:
            log.debug("tunnel %s: %s (again; retrying in %.0f s)", self.proxy, error, delay)

    def _connect_and_serve(self) -> None:
        cfg = self.client.config
        self.generation += 1
        self._set("connecting")
        t0 = time.monotonic()
        try:
            raw = cfg.dial(self.proxy.host, self.proxy.port, self.isolation_key,
                           cfg.connect_timeout)
        except OSError as e:
            raise TunnelError(f"cannot reach proxy {self.proxy}: {e}") from None
        self.sock = raw
        try:
            transport = self._secure(raw, cfg.handshake_timeout)
        except ssl.SSLError as e:
            raw.close()
            raise TunnelError(f"TLS with proxy {self.proxy} failed: {e}. If the certificate "
                              f"does not verify, a Tor exit may be intercepting TLS; the tunnel "
                              f"is refused") from None
        except (TunnelError, OSError):
            raw.close()
            raise
        session = Session(transport, client=True, config=cfg.mux, name=f"proxy {self.proxy}")
        self.session = session
        try:
            self._bind_and_serve(session, t0)
        finally:
            session.close()
            self.bound.clear()
            self.urls.clear()
            self.session = None

    def _secure(self, raw, timeout: float):
        """TLS to the proxy, verified (then the WebSocket handshake for ws/wss proxies); sets
        ``proxy_id``, the proxy our binds will name (docs/PROTOCOL.md, "Proxy id")."""
        raw.settimeout(timeout)
        if self.proxy.scheme == "ws":
            tls = raw  # plain WebSocket: local tests only
        else:
            # A platform's router picks its certificate by SNI: always send it for wss.
            sni = (self.proxy.host if self.proxy.scheme == "wss"
                   or not self.client.pinned(self.proxy) else None)
            tls = TLSTransport.client(raw, self.client.tls_context(self.proxy), sni, timeout)
            self.sock = tls  # CircuitWatcher finds the circuit by its local port
            self.client.verify_proxy(self.proxy, tls)
        if self.proxy.websocket:
            tls = self._websocket_handshake(tls, timeout)
        else:
            der = tls.getpeercert(binary_form=True)
            if not der:
                raise TunnelError(f"proxy {self.proxy} presented no certificate")
            self.proxy_id = msg.proxy_id_for_cert(der)
        tls.settimeout(None)
        return tls

    def _websocket_handshake(self, tls, timeout: float):
        from lib.net.wstransport import client_handshake
        from lib.protocol.websocket import HandshakeError

        try:
            transport = client_handshake(tls, self.proxy.host_header, self.proxy.path, timeout)
        except HandshakeError as e:
            raise TunnelError(f"WebSocket handshake with {self.proxy} failed: {e}") from None
        # A platform's router terminates TLS: the proxy knows the names it is reached by, not
        # the router's certificate.
        try:
            self.proxy_id = msg.proxy_id_for_host(self.proxy.host_header)
        except ValueError as e:
            raise TunnelError(f"proxy {self.proxy}: bad host name: {e}", permanent=True) from None
        return transport

    def _bind_and_serve(self, session: Session, t0: float) -> None:
        services = self.client.config.services
        nonce = self._auth(session)
        refused = self._bind_all(session, services, nonce)
        if len(refused) == len(services):
            transient = all(r in TRANSIENT_REFUSALS for r in self.refused_reasons.values())
            raise TunnelError("; ".join(refused.values()), permanent=not transient)
        if refused:
            # Serve what was granted; ask again for the rest now and then (an operator may fix
            # an allow-list, a DNS record may appear).
            gevent.spawn(self._rebind_loop, session, refused, nonce)
        self._went_online(t0)
        self.serve(session)

    def _went_online(self, t0: float) -> None:
        self.connects += 1
        self.connected_at = time.time()
        self._reported = None  # a failure after this is news again
        self.retry_at = None
        self.slow_backoff.reset()
        self._set("online")
        if self.client.on_connected is not None:
            self.client.on_connected(self)
        log.info("tunnel %s online in %.2f s (%d services)", self.proxy,
                 time.monotonic() - t0, len(self.bound))

    def _auth(self, session: Session) -> bytes | None:
        cfg = self.client.config
        stream = session.open()
        with stream:
            stream.settimeout(cfg.handshake_timeout)
            extra = (msg.auth_extra(cfg.identity.public_key) if cfg.identity is not None
                     else None)
            msg.write_message(stream, msg.Auth(client_id=self.client_id, extra=extra))
            resp = msg.read_message(stream)
        if not isinstance(resp, msg.AuthResp):
            raise TunnelError(f"proxy {self.proxy} answered Auth with {type(resp).__name__}")
        if resp.error:
            raise TunnelError(f"proxy {self.proxy} refused us: {resp.error}", permanent=True)
        self.client_id = resp.client_id
        nonce = resp.nonce
        version = msg.shroud_version(resp.extra)
        if nonce is not None and version != msg.SHROUD_VERSION:
            raise TunnelError(f"proxy {self.proxy} speaks Shroud protocol {version}, this "
                              f"client {msg.SHROUD_VERSION} (binds name the proxy they are "
                              f"meant for): upgrade the older side", permanent=True)
        if cfg.identity is not None and nonce is None:
            log.info("proxy %s sent no nonce (an original go-tunnel proxy?): binding unsigned",
                     self.proxy)
        return nonce

    def _bind_all(self, session: Session, services, nonce) -> dict:
        """Bind every service; returns {service name: refusal} for those refused. Each refusal
        is logged when it is news (not on every periodic re-bind), unless every service was
        refused: _run reports that, once."""
        refused, reasons = {}, {}
        for svc in services:
            try:
                self._bind(session, svc, nonce)
                self.retry_soon.discard(svc.name)
            except TunnelError as e:
                if not e.permanent:
                    raise
                refused[svc.name] = str(e)
                reasons[svc.name] = e.reason
                news = self.refused.get(svc.name) != str(e) and len(refused) < len(services)
                if e.reason == msg.REASON_STORE_UNAVAILABLE:
                    self.retry_soon.add(svc.name)
                    if news:
                        log.warning("tunnel %s: %s (asking again shortly)", self.proxy, e)
                else:
                    self.retry_soon.discard(svc.name)
                    if news:
                        log.error("tunnel %s: %s", self.proxy, e)
        self.refused = dict(refused)
        self.refused_reasons = reasons
        return refused

    def _rebind_loop(self, session: Session, refused: dict, nonce) -> None:
        backoff = Backoff(base=5.0, cap=300.0)
        # The proxy's store is down for a moment (store-unavailable): ask again within seconds
        # rather than minutes; the proxy answers at once when it is back.
        soon = Backoff(base=1.0, cap=10.0)
        pending = [s for s in self.client.config.services if s.name in refused]
        while pending and not session.closed:
            transient = all(s.name in self.retry_soon for s in pending)
            gevent.sleep(soon.next_delay() if transient else backoff.next_delay())
            if session.closed:
                return
            try:
                left = self._bind_all(session, pending, nonce)
            except (TunnelError, OSError, MuxError, msg.MessageError, EOFError):
                return
            pending = [s for s in pending if s.name in left]
            self.client._changed(self)

    def _bind(self, session: Session, svc: Service, nonce: bytes | None) -> None:
        cfg = self.client.config
        stream = session.open()
        with stream:
            stream.settimeout(cfg.handshake_timeout)
            msg.write_message(stream, svc.bind_message(nonce, cfg.identity, self.proxy_id))
            resp = msg.read_message(stream)
        if not isinstance(resp, msg.BindResp):
            raise TunnelError(f"proxy {self.proxy} answered Bind with {type(resp).__name__}")
        if resp.error:
            raise TunnelError(f"proxy {self.proxy} refused {svc.name}: {resp.error}"
                              f"{ownership_hint(svc, resp.error, cfg.identity)}", permanent=True,
                              reason=resp.reason)
        if not svc.answers_bind(resp.url):
            raise TunnelError(f"proxy {self.proxy} answered the bind for {svc.name} with "
                              f"{resp.url[:200]!r}, which is not what was asked: not used",
                              permanent=True)
        if self.urls.get(resp.url, svc) is not svc:
            raise TunnelError(f"proxy {self.proxy} answered the bind for {svc.name} with "
                              f"{resp.url[:200]!r}, already bound for "
                              f"{self.urls[resp.url].name}: not used", permanent=True)
        self.bound[resp.url] = svc.name
        self.urls[resp.url] = svc
        log.info("tunnel %s bound %s -> %s:%d", self.proxy, resp.url, *svc.target)

    def serve(self, session: Session) -> None:
        """Serve every stream the proxy opens on ``session`` (its services bound: see
        ``urls``) until the session ends; the runner's own loop calls it after binding, a test
        with a session pair of its own."""
        session.serve(self._take_stream)

    def _take_stream(self, stream) -> None:
        """A stream the proxy opened, from the session's reader (Session.serve): refused past
        the limit; else opened as far as it can be without waiting (``_open_now``: StartProxy
        read, the local target connected and sent its first bytes, before any other greenlet
        runs) and handed to a kept greenlet for the rest and the splice."""
        if self.streams_open >= self.client.config.max_streams:
            stream.reset(ErrorCode.REFUSED_STREAM)
            return
        # Counted here, not in the handler: a burst must not pass the limit before the
        # handlers run.
        self.streams_open += 1
        self.streams_total += 1
        # No on_change per stream: the console reads the counters when it draws (a state
        # change is what on_change reports).
        record = StreamRecord(started=time.time(), proxy=self.proxy_name)
        t0 = time.monotonic()
        opening = _Opening(stream)
        if stream.buffered:
            try:
                opened = self._open_now(stream, record, opening)
            except Exception as e:  # a bug a stream's bytes reached: this stream's, not the
                opened = self._open_failed(stream, record, opening, e)  # tunnel's
            if not opened:
                stream.close()  # reset already, record.result says why
                self._stream_over(record, t0)
                return
            # Opened whole, its request sent: spliced with no greenlet (lib.net.splice,
            # "Detached"; bench/README.md, "Fresh connections: no greenlet in the client").
            if (opening.unsent == b"" and record.bytes_in and splice_detached(
                    stream, opening.local, partial(self._detached_over, record, t0),
                    on_a_to_b=self._count_in, on_b_to_a=self._count_out)):
                return
        self.client.stream_workers.spawn(self._handle_stream, stream, record, t0, opening)

    def _detached_over(self, record: "StreamRecord", t0: float, n_in: int, n_out: int) -> None:
        """A detached splice's end (``_take_stream``): both ends closed, as _handle_stream's."""
        record.bytes_in += n_in
        record.bytes_out = n_out
        self._stream_over(record, t0)

    def _handle_stream(self, stream, record: "StreamRecord", t0: float,
                       opening: "_Opening") -> None:
        opened = None
        try:
            opened = self._open_local(stream, record, opening)
            if opened is not None:
                peer, local = opened
                n_in, record.bytes_out = splice(
                    peer, local, on_a_to_b=self._count_in, on_b_to_a=self._count_out,
                    b_answers=record.bytes_in > 0)
                record.bytes_in += n_in
        finally:
            # splice closed both its ends, whatever happened; the stream is left to close when
            # it never began, or carries an https: service's TLS (the visitor's side).
            if opened is None or opened[0] is not stream:
                stream.close()
            self._stream_over(record, t0)

    def _stream_over(self, record: "StreamRecord", t0: float) -> None:
        self.streams_open -= 1
        record.duration = time.monotonic() - t0
        self.client._stream_done(record)

    def _open_failed(self, stream, record: "StreamRecord", op: "_Opening", e: Exception) -> bool:
        """``_open_now`` raised: this stream ends (reset), not the tunnel. Raised into
        Session.serve's reader, it ended the tunnel (INTERNAL_ERROR) and left the stream counted
        open for good (``streams_open``, the limit of every later session of this runner)."""
        stream_log.log(self.proxy_name, logging.ERROR, "stream %d from %s: opening failed: %r",
                       stream.id, self.proxy, e)
        stream.reset(ErrorCode.INTERNAL_ERROR)
        if op.local is not None:
            op.local.close()
        record.result = "opening failed"
        return False

    def _open_now(self, stream, record: "StreamRecord", op: "_Opening") -> bool:
        """The opening's steps that need no wait, from the session's reader with StartProxy's
        bytes in (``stream.buffered``): parse it, connect a numeric target when the handshake
        completes at once (a listener on this host), send it the PROXY header and the visitor's
        bytes when it takes them at once. ``op`` records how far it got (the handler goes on
        from there); False when the stream failed here (reset, ``record.result`` says why).
        The request leaves for the target before any greenlet runs: no hand-off, and no
        teardown of an older stream whose FIN came in the same read, ahead of it
        (bench/README.md, "Fresh connections, the client's side, second session")."""
        data = stream.recv_nowait(msg.READ_AHEAD)  # buffered: no deadline to set up
        try:
            whole = msg.split_message(data)
        except msg.MessageError as e:
            self._no_start(stream, record, e)
            return False
        if whole is None:  # cut: the handler reads the rest, waiting
            op.src = Replay(stream, data)
            return True
        op.start, op.ahead = whole
        svc = op.svc = self._service_for(stream, op.start, record)
        if svc is None:
            return False
        if svc.terminate or svc.family is None:
            return True  # TLS ended here, or a name to resolve: the handler's
        # With no PROXY header to make, the visitor's bytes leave as the connection completes,
        # before the socket's set-up (lib.net.sockets.start_connect's ``first``).
        version = self.client.config.proxy_protocol
        try:
            op.local, connected, n = start_connect(svc.family, svc.target, UNSENT_LOWAT,
                                                   b"" if version else op.ahead)
        except OSError as e:
            self._refused(stream, svc, op.start, record, e)
            return False
        if not connected:
            op.connecting = True
            return True
        if not version:
            op.unsent = op.ahead[n:]  # the rest (the send's error too): the handler's send_all
            if not op.unsent:
                self._counted_ahead(op, record)
            return True
        first = self._first_bytes(op, record)
        if first is None:
            return self._target_failed(stream, op)
        try:
            n = nowait_sender(op.local)(first) if first else 0
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._first_failed(record, svc, e)
            return self._target_failed(stream, op)
        op.unsent = first[n:]
        if not op.unsent:
            self._counted_ahead(op, record)
        return True

    def _open_local(self, stream, record: "StreamRecord", op: "_Opening"):
        """The rest of the stream's opening after ``_open_now`` (all of it when StartProxy was
        not in yet), waiting where it must: read StartProxy, connect its service's local
        target, send it a PROXY header when asked and the visitor's bytes that came with
        StartProxy (counted in ``record.bytes_in``): (the visitor's side, the local
        connection); None, with the stream reset and ``record.result`` saying why, when that
        fails. The visitor's side is the stream, or for an https: service the TLS ended on it
        (``ClientConfig.terminate``).

        The visitor's first bytes (a routed request's head comes in StartProxy's frame: lib/proxy/
        routing.py) leave for the target as soon as it is connected, before the splice is set
        up: one read of the stream takes both (msg.read_message_ahead)."""
        cfg = self.client.config
        if op.start is None:
            stream.settimeout(cfg.start_proxy_timeout)
            try:
                op.start, op.ahead = msg.read_message_ahead(op.src)
            except (MuxError, EOFError, msg.MessageError) as e:
                self._no_start(stream, record, e)
                return None
            stream.settimeout(None)
            op.svc = self._service_for(stream, op.start, record)
            if op.svc is None:
                return None
        svc = op.svc
        peer = stream
        if svc.terminate:
            peer = (cfg.terminate(Replay(stream, op.ahead) if op.ahead else stream, svc)
                    if cfg.terminate is not None else None)
            op.ahead = b""  # the TLS layer took it
            if peer is None:
                record.result = "TLS ended here (validation, alert or handshake failure)"
                return None
        try:
            if op.local is None:
                op.local = connect_local(svc.target, cfg.local_connect_timeout)
            elif op.connecting:
                finish_connect(op.local, svc.target, cfg.local_connect_timeout, UNSENT_LOWAT)
        except OSError as e:
            self._refused(stream, svc, op.start, record, e)
            return None
        if op.unsent is None:
            op.unsent = self._first_bytes(op, record)
            if op.unsent is None:
                self._target_failed(stream, op)
                return None
        if op.unsent:
            try:
                send_all(op.local, op.unsent)
            except OSError as e:
                self._first_failed(record, svc, e)
                self._target_failed(stream, op)
                return None
            self._counted_ahead(op, record)
        return peer, op.local

    def _no_start(self, stream, record: "StreamRecord", e: Exception) -> None:
        stream_log.log(self.proxy_name, logging.INFO, "stream %d from %s: no StartProxy: %s",
                       stream.id, self.proxy, e)
        stream.reset(ErrorCode.PROTOCOL_ERROR)
        record.result = "no StartProxy"

    def _service_for(self, stream, start, record: "StreamRecord") -> "Service | None":
        """The bound service StartProxy names; None (the stream refused) for another message
        or a name this tunnel did not bind."""
        svc = self.urls.get(start.url) if isinstance(start, msg.StartProxy) else None
        record.visitor = getattr(start, "client_addr", None) or "?"  # as the proxy sent them:
        record.name = getattr(start, "url", None) or "?"  # lib.client.console escapes them
        if svc is None:
            stream_log.log(self.proxy_name, logging.WARNING, "stream for unknown url %r from %s",
                           getattr(start, "url", None), self.proxy)
            stream.reset(ErrorCode.REFUSED_STREAM)
            record.result = "unknown name"
            return None
        record.name = svc.name
        return svc

    def _refused(self, stream, svc: "Service", start, record: "StreamRecord",
                 e: OSError) -> None:
        stream_log.log(self.proxy_name, logging.WARNING, "local target %s:%d refused %s: %s",
                       *svc.target, start.url, e)
        stream.reset(ErrorCode.REFUSED_STREAM)
        record.result = f"local target: {e.strerror or e}"

    def _first_bytes(self, op: "_Opening", record: "StreamRecord") -> bytes | None:
        """The PROXY header when asked, then the visitor's bytes that came with StartProxy: one
        send. None, with ``record.result`` saying why, when the header cannot be made."""
        version = self.client.config.proxy_protocol
        if not version:
            return op.ahead
        try:
            header = proxy_protocol_header(version, op.start.client_addr,
                                           _destination(op.start, op.local), self.proxy_name)
        except (OSError, struct.error) as e:
            self._first_failed(record, op.svc, e)
            return None
        return header + op.ahead

    def _first_failed(self, record: "StreamRecord", svc: "Service", e: Exception) -> None:
        version = self.client.config.proxy_protocol
        if version:  # else the target reset a visitor's connection: splice's silence
            stream_log.log(self.proxy_name, logging.WARNING, "PROXY header to %s:%d failed: %s",
                           *svc.target, e)
        record.result = "PROXY header failed" if version else "the visitor's first bytes failed"

    @staticmethod
    def _target_failed(stream, op: "_Opening") -> bool:
        stream.reset(ErrorCode.CANCEL)
        op.local.close()
        return False

    def _counted_ahead(self, op: "_Opening", record: "StreamRecord") -> None:
        if op.ahead:
            record.bytes_in = len(op.ahead)
            self._count_in(len(op.ahead))

    def _count_in(self, n: int) -> None:
        self.bytes_in += n

    def _count_out(self, n: int) -> None:
        self.bytes_out += n

    def status(self) -> dict:
        s = self.session
        return {
            "proxy": self.proxy_name, "state": self.state, "error": self.error,
            "streams_open": self.streams_open, "streams_total": self.streams_total,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "connects": self.connects,
            "bound": sorted(self.bound), "refused": dict(self.refused),
            "isolation_key": self.isolation_key,
            "circuit": (None if self.circuit is None else
                        {"id": self.circuit.id, "path": [n for _, n in self.circuit.path],
                         "exit": self.circuit.exit_nickname}),
            "retry_at": self.retry_at,
            # what each bound URL forwards to (the console's Forwarding lines)
            "targets": {url: format_hostport(*svc.target)
                        + (" (https: TLS ends in this client)" if svc.terminate else "")
                        for url, svc in self.urls.items()},
            "heartbeat_rtt_ms": (round(s.heartbeat_rtt * 1000, 1)
                                 if s is not None and s.heartbeat_rtt is not None else None),
        }


def connect_local(target: tuple[str, int], timeout: float):
    """Connect to the local target; a numeric address skips the resolver (gevent's resolver
    costs a thread-pool round trip per connection, a quarter of a fresh stream's CPU) and, when
    the connection completes at once, the hub turn of gevent's connect; its socket options are
    set as it is made, for the splice (lib.net.sockets.connect_numeric)."""
    family = numeric_family(target[0])
    if family is None:
        sock = gsocket.create_connection(target, timeout=timeout)
        sock.settimeout(None)
        set_nodelay(sock)
        return sock
    return connect_numeric(family, target, timeout, UNSENT_LOWAT)


def numeric_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for a numeric address, None for a name (the resolver's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        return None
    return family


class _Opening:
    """How far a stream's opening got without waiting (TunnelRunner._open_now); the handler
    goes on from there (TunnelRunner._open_local)."""

    __slots__ = ("src", "start", "ahead", "svc", "local", "connecting", "unsent")

    def __init__(self, stream) -> None:
        self.src = stream  # StartProxy's bytes: the stream, or a Replay of those read already
        self.start = None  # StartProxy, once read
        self.ahead = b""  # the visitor's bytes read with it
        self.svc: Service | None = None
        self.local = None  # the target's socket, once made
        self.connecting = False  # its handshake still in progress (sockets.finish_connect)
        self.unsent: bytes | None = None  # of the PROXY header and ahead, what the target
        # has not taken yet (None: not made yet)


# PROXY protocol v2 TLV naming the public proxy that carried the visitor (its tunnel address as
# the client knows it). 0xE0-0xEF are the spec's application-specific types (section 2.2.7):
# receivers that do not know it skip it by its length.
PP2_TYPE_SHROUD_PROXY = 0xE0
_PP2_MAX_TLV = 255  # a host:port or wss:// URL; a longer one is cut, the header stays small


def _destination(start: msg.StartProxy, local) -> tuple:
    """The PROXY header's destination: the proxy's public listener the visitor connected to
    (StartProxy.PublicAddr); a proxy that does not say (go-tunnel) leaves only our own end of
    the connection to the origin."""
    if start.public_addr:
        try:
            return parse_hostport(start.public_addr, what="StartProxy.PublicAddr")
        except ValueError:
            pass
    return local.getsockname()


def _unscoped(ip):
    """``ip`` without an IPv6 scope id ("fe80::1%eth0"): it means nothing to the target, and a
    proxy's text after the '%' (any characters: CRLF, non-ASCII) went into a v1 header as it
    was, or raised from the session's reader."""
    if ip.version == 6 and ip.scope_id is not None:
        return ipaddress.IPv6Address(ip.packed)
    return ip


def proxy_protocol_header(version: str, client_addr: str, local_addr,
                          proxy: str | None = None) -> bytes:
    """HAProxy PROXY protocol v1 (text) or v2 (binary) header for the public peer; v2 also
    carries ``proxy`` (which public proxy the visitor came through) in a Shroud TLV."""
    dst_host, dst_port = local_addr[0], local_addr[1]
    try:
        # Port 0: the proxy knows the visitor's address but not its port (X-Forwarded-For).
        src_host, src_port_i = parse_hostport(client_addr, what="StartProxy.ClientAddr",
                                              port_zero=True)
        src_ip = _unscoped(ipaddress.ip_address(src_host))
        dst_ip = _unscoped(ipaddress.ip_address(dst_host))
    except ValueError:  # AddressError is one; an unknown source is "UNKNOWN", not an error
        src_ip = dst_ip = None
        src_port_i = 0
    if version == "v1":
        if src_ip is None or src_ip.version != dst_ip.version:
            return b"PROXY UNKNOWN\r\n"
        fam = "TCP4" if src_ip.version == 4 else "TCP6"
        return f"PROXY {fam} {src_ip} {dst_ip} {src_port_i} {dst_port}\r\n".encode("ascii")
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    if src_ip is None or src_ip.version != dst_ip.version:
        return sig + b"\x20\x00\x00\x00"  # LOCAL command, no address
    body = src_ip.packed + dst_ip.packed + struct.pack(">HH", src_port_i, dst_port)
    if proxy:
        value = proxy.encode("utf-8")[:_PP2_MAX_TLV]
        body += struct.pack(">BH", PP2_TYPE_SHROUD_PROXY, len(value)) + value
    family = b"\x21\x11" if src_ip.version == 4 else b"\x21\x21"
    return sig + family + struct.pack(">H", len(body)) + body


class Client:
    def __init__(self, config: ClientConfig, on_change: Callable | None = None):
        if not config.services:
            raise ValueError("no services to expose")
        if not config.proxies:
            raise ValueError("no proxies to connect to")
        self.config = config
        self.runners = [TunnelRunner(self, p, i) for i, p in enumerate(config.proxies)]
        self.on_change = on_change
        self.on_connected: Callable | None = None  # (runner) once a tunnel is online
        self.on_stream: Callable | None = None  # (StreamRecord) once a visitor's stream ends
        self._contexts: dict[ProxyAddr, ssl.SSLContext] = {}
        # Every tunnel's streams are served in kept greenlets (lib/net/greenpool.py): no new
        # greenlet per visitor. No size: spawn never waits, as a session's reader calling it
        # must not (Session.serve); max_streams bounds the streams of each tunnel.
        self.stream_workers = WorkerPool()

    def start(self) -> None:
        for r in self.runners:
            r.start()

    def stop(self) -> None:
        for r in self.runners:
            r.stop()
        self.stream_workers.close_idle()

    def status(self) -> list[dict]:
        return [r.status() for r in self.runners]

    def online(self) -> int:
        return sum(1 for r in self.runners if r.state == "online")

    def wait_bound(self, n: int | None = None, timeout: float = 30.0) -> bool:
        n = len(self.runners) if n is None else n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online() >= n:
                return True
            gevent.sleep(0.05)
        return False

    def _changed(self, runner: TunnelRunner) -> None:
        if self.on_change is not None:
            self.on_change(runner)

    def _stream_done(self, record: StreamRecord) -> None:
        if self.on_stream is not None:
            self.on_stream(record)

    # --- verifying the proxy --------------------------------------------------------------

    def pinned(self, proxy: ProxyAddr) -> bool:
        return bool(self.config.pins or proxy.pin)

    def tls_context(self, proxy: ProxyAddr) -> ssl.SSLContext:
        ctx = self._contexts.get(proxy)
        if ctx is None:
            ctx = client_tls_context(self.config.proxy_ca, pinned=self.pinned(proxy))
            self._contexts[proxy] = ctx
        return ctx

    def verify_proxy(self, proxy: ProxyAddr, tls) -> None:
        pins = set(self.config.pins)
        if proxy.pin:
            pins.add(proxy.pin)
        if not pins:
            return  # verified by CA and hostname during the handshake
        try:
            check_pin(tls, pins)
        except PinMismatch as e:
            raise TunnelError(
                f"proxy {proxy} presented certificate {e.fingerprint}, which matches no pinned "
                f"fingerprint: refusing the tunnel (something between us and the proxy, such as "
                f"a Tor exit, may be intercepting TLS). If the proxy's certificate changed "
                f"instead, ask its operator for the output of `shroud_proxy.py "
                f"--print-fingerprint` and give it to --pin",
                permanent=True) from None
