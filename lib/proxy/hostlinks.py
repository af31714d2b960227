"""Links between the hosts of a fleet: a public connection for a name that no tunnel of this
instance (nor a sibling worker) holds live, but another instance of the fleet does, goes to that
instance as one stream of a long-lived, mutually authenticated TLS link (docs/DESIGN.md,
"Workers", its "Between hosts"; docs/SECURITY.md, "Links between proxies").

Public API::

    links = FleetLinks(store, registry, take, cert_path, key_path, fingerprint,
                       listen_addr=("0.0.0.0", 7443), refresh=1.0, max_age=15.0,
                       max_links=MAX_LINKS, idle_timeout=None,   # --idle-timeout
                       link_idle=LINK_IDLE)                      # --fleet-link-idle
        take(header, peeked) -> run(sock) | lib.proxy.workers.Refused   (router.take_linked)
    links.start(); links.stop()
    links.address                      # the fleet listener as bound: (host, port)
    links.self_id = "instance id"      # set once this instance is in the registry
    links.send(sock, header, peeked, protocols) -> TAKEN | LIMIT | UNREACHABLE | None
        # the sender's side: LIMIT (503) when its streams or every holder's are all busy,
        # UNREACHABLE (502) when a holder was tried and none answered, None when every holder
        # refused or none is known (the caller refuses as without the fleet)

The registry counts what crosses hosts: ``forwarded_out`` (sender: carried to a holder) and
``forwarded_in`` (holder: served from a link); ``links_out``/``links_in``, the visitors in
flight on links now (at most ``max_links`` each way; ``--fleet-max-links``); and
``link_sessions_out``/``link_sessions_in``, the TLS links open now; ``link_idle_closes``, the
links this sender closed after ``link_idle`` seconds without a visitor.

The store is the trust anchor: an instance row carries the advertised link address, its
tunnel certificate and that certificate's SHA-256; only rows whose heartbeat is younger than
``max_age`` count. A background greenlet reads the rows (and the live bindings) every
``refresh`` seconds, so no connection waits on the store.

A link is TLS 1.3 with a certificate on both sides (mutual authentication by TLS itself):

- the sender presents its tunnel certificate as its client certificate and pins the holder's
  to the holder's row (check_pin, right after the handshake);
- the holder requires a client certificate and trusts exactly the live instances' registered
  certificates: its server context is rebuilt whenever that set changes, with those
  certificates as its only trust anchors (``load_verify_locations(cadata=...)``) and
  VERIFY_X509_PARTIAL_CHAIN, so a certificate that is itself in the store is a whole chain.
  Without that flag OpenSSL looks for a self-signed certificate's issuer by subject name, and
  our certificates share one (CN=shroud-proxy, no key identifiers): it found another
  instance's and refused the link.

TLS's own CertificateVerify signs the handshake with the sender's key over both sides' fresh
randoms, so the link needs no nonce or signature of its own. Over it runs a muxado session
(lib/net/muxsession.py; the sender dials, odd stream ids), kept open: one per (sender worker,
holder worker) pair, dialled at the first visitor and re-dialled when it ends (the peer's
close, a heartbeat past LINK_HEARTBEAT + LINK_TOLERANCE, the peer's row gone or changed, or
``link_idle`` seconds without a visitor: the sender closes it). A visitor costs one stream, no
handshake (bench/README.md, issue 13). Each stream::

    sender -> holder   u32 length, JSON head {"v": 2, "kind", "name", "client": [ip, port],
                       "public": the listener the visitor reached ("host:port"),
                       "forwarded": true, "peeked": n}; then the n peeked bytes
    holder -> sender   one byte: OK (a splice of the visitor's bytes follows), REFUSED, BUSY

    the holder sees                                   it answers            counter
    no client certificate, or one of no live          TLS alert, closes     fleet_link_refused
      instance (a stranger's, an expired row's)
    MAX_HANDSHAKES connections in their handshake     closes the oldest     fleet_link_refused
    a link whose certificate's row expired or         closes the link (all  fleet_link_refused
      changed since (at the refresh, or a head)         its streams)
    a head without "forwarded" or an unknown kind     closes the link       fleet_link_refused
    no head within LINK_TIMEOUT of the stream         resets the stream     fleet_link_refused
    a name it holds no live tunnel for                REFUSED               (its refusal)
    max_links streams already served here             BUSY                  fleet_link_busy
    streams past MuxConfig.max_streams on one link    RST (muxado)          -
    SESSIONS_PER_PEER links with one certificate      closes the oldest     -

    the sender meets                                  the visitor gets      counter (sender)
    its own max_links streams in flight               503 / internal_error  fleet_link_limit
    every holder it tried answered BUSY               503 / internal_error  fleet_link_limit
    a holder silent for ATTEMPT_TIMEOUT, or dead      the next holder; if   fleet_link_failed
      (connection refused, TLS or pin failure)          none: 502 / alert

A link that ended under a visitor before its answer (the holder restarted) costs that visitor
one fresh dial, not an error: the holder reads a head once, so nothing reached the origin.

A forwarded connection is served where it lands, or relayed to the sibling worker there that
holds the name (routing.take_linked), never forwarded to another host (at most one link).
Counting: the sender counts the connection (``connections``) and ``forwarded_out``; the holder
counts ``forwarded_in``, the connection's bytes and its name's count: the fleet's totals hold
each connection once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import ssl
import struct
import time

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.server
import gevent.socket
from lib.certs import (PinMismatch, cert_fingerprint, check_pin, client_tls_context, leaf_pem,
                       server_tls_context)
from lib.errors import MuxError, ShroudError
from lib.hostport import parse_hostport
from lib.net.muxsession import MuxConfig, Session
from lib.net.sockets import set_nodelay
from lib.net.splice import splice
from lib.net.tlstransport import TLSTransport
from lib.peerlog import PeerLog
from lib.proxy.store.base import OwnershipError, candidates
from lib.proxy.workers import LIMIT, TAKEN, UNREACHABLE, Refused

log = logging.getLogger("shroud.fleet")

VERSION = 2  # of the head (1: a nonce and a signature of its own, before TLS client auth)
OK, REFUSED, BUSY = b"\x00", b"\x01", b"\x02"
FAILED = b""  # not an answer: no link, or none in time (the sender's own mark)
# A visitor waits at most this long for the links (dial, TLS, the holder's answer) before
# a clear error; on a LAN a stream's answer takes a fraction of a millisecond. One holder gets
# at most ATTEMPT_TIMEOUT of it: a hung holder (its row not expired yet) costs a visitor one
# second, not the whole deadline, and is tried last for SUSPECT_SECONDS.
LINK_TIMEOUT = 3.0
ATTEMPT_TIMEOUT = 1.0
SUSPECT_SECONDS = 10.0
# Visitors in flight on links, each way (the default of --fleet-max-links): each is a greenlet
# and a stream (its buffers bounded by the mux windows), ~20 KiB idle. Past it the visitor gets
# 503 here (sender) or the sender tries the next holder (BUSY).
MAX_LINKS = 1024
# Streams a link may have open at the holder (MuxConfig.max_streams): max_links, plus some
# that get their BUSY answered; past it muxado refuses the stream (RST) and the sender tries
# the next holder.
BUSY_ANSWERS = 64
# Connections still in their TLS handshake (no certificate checked yet: anyone on the network
# can open one), at most this many at once: past it the oldest is closed (counted
# fleet_link_refused). A stranger must open this many connections within one fleet handshake
# (milliseconds) to cut a real one short.
MAX_HANDSHAKES = 128
# What a link carries: names by SNI or Host. Not tcp:PORT, a port of the sender's host (the
# sender never sends one: lib/proxy/routing.py).
LINK_KINDS = ("http", "tls")
# Links the holder keeps per sender certificate: one per worker of the sender's host (its
# workers share the certificate), so the cores of the biggest host. Past it the oldest is
# closed: a fleet member re-dialling in a loop holds at most this many sessions.
SESSIONS_PER_PEER = 64
# A head carries a name and two addresses; peeked bytes are bounded by the sniffers (a
# ClientHello or a request head), well under this.
MAX_HEAD = 16 * 1024
MAX_PEEKED = 256 * 1024
# One line per this many seconds for refused links: a scanner must not flood the log.
REFUSED_LOG_INTERVAL = 30.0
# The links' heartbeat: a ping every LINK_HEARTBEAT seconds, the link dead (closed, re-dialled
# at the next visitor) after LINK_HEARTBEAT + LINK_TOLERANCE without a byte from the peer.
# Shorter than a tunnel's 13 s (MuxConfig's default): hosts of a fleet share a LAN, and a dead
# link's holder is tried last meanwhile. Longer than a refresh plus a row's expiry (a row that
# expires closes its links first, counted).
LINK_HEARTBEAT = 1.0
LINK_TOLERANCE = 5.0
# A link no visitor used for this long is closed by its sender (the default of
# --fleet-link-idle; 0: never). Idle, it still costs both hosts a TLS session, two greenlets
# and a heartbeat a second each way, and every worker holds one per worker of each other host
# it forwarded to. Five minutes keeps the link of any holder visited more often than that; a
# rarer visitor pays one dial (TCP and TLS 1.3 on the LAN, ~2.5 ms of CPU: bench/README.md).
LINK_IDLE = 300.0


class LinkRefused(ShroudError):
    """A link the holder will not serve (the reason is logged, rate-limited, and counted)."""


class _Out:
    """A link this sender dialled: its session, to ``addr``, pinned to ``fingerprint``; ``used``
    is when a visitor last took or gave back a stream of it (monotonic)."""

    __slots__ = ("session", "fingerprint", "addr", "used")

    def __init__(self, session: Session, fingerprint: str, addr: str):
        self.session, self.fingerprint, self.addr = session, fingerprint, addr
        self.used = time.monotonic()


class FleetLinks:
    def __init__(self, store, registry, take, cert_path: str, key_path: str, fingerprint: str,
                 listen_addr: tuple, refresh: float = 1.0, max_age: float = 15.0,
                 max_links: int = MAX_LINKS, idle_timeout: float | None = None,
                 link_idle: float = LINK_IDLE):
        if max_links < 1:
            raise ValueError(f"--fleet-max-links must be at least 1, got {max_links}")
        if not link_idle >= 0:
            raise ValueError(f"--fleet-link-idle must be 0 (never) or more seconds, got "
                             f"{link_idle}")
        self.link_idle = link_idle
        self.store = store
        self.registry = registry
        self.take = take
        self.fingerprint = fingerprint
        self.listen_addr = listen_addr
        self.refresh_interval = refresh
        self.max_age = max_age
        self.self_id = None
        self.cert_pem = leaf_pem(cert_path)  # registered: the others' anchor for our links
        self._cert_path, self._key_path = cert_path, key_path
        self._anchors: dict = {}     # fingerprint -> PEM: whom the holder's context trusts
        self._pem_fingerprints: dict = {}  # registered PEM -> its SHA-256 (None: unreadable)
        self._mismatched: set = set()      # ids of rows whose PEM is not their fingerprint's
        self._server_ctx = self._holder_context({})  # nobody until the first refresh
        self._client_ctx = client_tls_context(pinned=True)
        self._client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self._client_ctx.load_cert_chain(cert_path, key_path)  # our side of the mutual auth
        self._instances: dict = {}   # id -> Instance, live ones only
        self._holders: dict = {}     # (protocol, name) -> [instance id]
        self.max_links = max_links
        # --idle-timeout, as for every public connection: a visitor silent after the holder's
        # FIN (its answer's end) waited on for good held a link slot for good.
        self.idle_timeout = idle_timeout
        self._out = gevent.lock.BoundedSemaphore(max_links)
        self._suspects: dict = {}    # instance id -> when a link to it last failed (monotonic)
        self._links: dict = {}       # instance id -> _Out (at most one per live instance)
        self._dialling: dict = {}    # instance id -> AsyncResult of the dial under way
        self._served: dict = {}      # peer fingerprint -> [Session], oldest first
        self._mux = MuxConfig(max_streams=max_links + BUSY_ANSWERS,
                              heartbeat_interval=LINK_HEARTBEAT,
                              heartbeat_tolerance=LINK_TOLERANCE)
        self._peer_log = PeerLog(logger=log)
        self._stopped = False
        self._server = None
        self._refresher = None
        self._logged_at = float("-inf")
        self._handshaking: dict = {}  # greenlet -> its raw socket, oldest first (MAX_HANDSHAKES)
        self.address = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, listener=None) -> None:
        """Listen (on ``listener``, a socket, when given) and start following the store."""
        # Unbounded pool: handshakes are bounded by MAX_HANDSHAKES (the oldest closed), links
        # by SESSIONS_PER_PEER per live certificate.
        self._server = gevent.server.StreamServer(
            listener if listener is not None else self.listen_addr, self._serve,
            spawn=gevent.pool.Pool())
        self._server.start()
        self.address = self._server.address[:2]
        self._refresher = gevent.spawn(self._refresh_loop)

    def stop(self) -> None:
        """Close every link (their visitors end with them) and the listener."""
        self._stopped = True
        if self._refresher is not None:
            self._refresher.kill()
        for link in list(self._links.values()):
            link.session.close()
        for sessions in list(self._served.values()):
            for session in list(sessions):
                session.close()  # first: the server's stop waits for its handlers
        if self._server is not None:
            self._server.stop(timeout=1)

    def _refresh_loop(self) -> None:
        while True:
            try:
                self.refresh()
            except OwnershipError as exc:  # the store is away: keep the last view
                log.warning("fleet links: could not read the registry: %s", exc)
            self.close_idle()
            gevent.sleep(self.refresh_interval)

    def refresh(self) -> None:
        """Re-read the live instances and their bindings (the background greenlet does);
        close the links of instances no longer live, or whose row changed."""
        now = time.time()
        live = {i.id: i for i in self._consistent(self.store.instances())
                if now - i.heartbeat <= self.max_age and i.fleet_addr}
        holders: dict = {}
        for b in self.store.live_bindings():
            if b.instance in live and b.instance != self.self_id:
                holders.setdefault((b.protocol, b.name), []).append(b.instance)
        self._instances, self._holders = live, holders
        anchors = {i.fingerprint: i.cert for i in live.values()}
        if anchors != self._anchors:
            self._server_ctx = self._holder_context(anchors)
            self._anchors = anchors
        self._close_stale()

    def _close_stale(self) -> None:
        """Close the links dialled to rows gone or changed, and the links served to
        certificates no live row registers (counted: the peer is no longer of the fleet)."""
        for instance_id, link in list(self._links.items()):
            row = self._instances.get(instance_id)
            if (row is None or row.fingerprint != link.fingerprint
                    or row.fleet_addr != link.addr or link.session.closed):
                del self._links[instance_id]
                link.session.close()
        for fingerprint in [f for f in self._served if f not in self._anchors]:
            for session in self._served.pop(fingerprint):
                if not session.closed:
                    self.registry.count_refusal("fleet_link_refused")
                    self._log_refused(("a fleet member",), "certificate %s... of no live instance "
                                      "any more: its link closed" % fingerprint[:16])
                    session.close()


    def close_idle(self, now: float | None = None) -> int:
        """Close the links dialled here that carry no stream and had no visitor for
        ``link_idle`` seconds (the background greenlet does, each refresh); how many. The next
        visitor for that holder dials a new one."""
        if not self.link_idle:
            return 0
        now = time.monotonic() if now is None else now
        closed = 0
        for instance_id, link in list(self._links.items()):
            if link.session.open_streams or now - link.used < self.link_idle:
                continue
            del self._links[instance_id]
            link.session.close(reason="idle")
            self.registry.link_idle_closes += 1
            closed += 1
            log.debug("fleet link to %s closed: no visitor for %g s", instance_id,
                      self.link_idle)
        return closed

    def _consistent(self, rows) -> list:
        """The rows whose certificate is the one their fingerprint names; the others (no
        certificate: an instance of an older version; a mismatch) are left out, each mismatch
        logged once. Fingerprints are computed once per certificate."""
        known, fingerprints, kept = self._pem_fingerprints, {}, []
        for row in rows:
            if not row.cert:
                continue
            if row.cert not in known:
                try:
                    known[row.cert] = cert_fingerprint(row.cert.encode())
                except ValueError:
                    known[row.cert] = None
            fingerprints[row.cert] = known[row.cert]
            if known[row.cert] == row.fingerprint:
                kept.append(row)
            elif row.id not in self._mismatched:
                log.warning("fleet links: instance %s registered a certificate that is not "
                            "the one its fingerprint %s... names: no links to or from it",
                            row.id, row.fingerprint[:16])
        self._pem_fingerprints = fingerprints  # only the certificates still registered
        self._mismatched = {r.id for r in rows if r.cert and fingerprints[r.cert] != r.fingerprint}
        return kept

    def _holder_context(self, anchors: dict):
        """The holder's TLS context: a client certificate required, trusted only when it is one
        of ``anchors`` (fingerprint -> PEM) itself (the module docstring says why
        PARTIAL_CHAIN)."""
        ctx = server_tls_context(self._cert_path, self._key_path)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        for fingerprint, pem in anchors.items():
            try:
                ctx.load_verify_locations(cadata=pem)
            except ssl.SSLError as exc:  # hashed right, yet not a certificate OpenSSL reads
                log.warning("fleet links: the registered certificate %s... is left out: %s",
                            fingerprint[:16], exc)
        return ctx

    # --- sender --------------------------------------------------------------------------
    def holders(self, protocols, name: str) -> list:
        """Live instances holding ``name`` (exact, then the nearest wildcard), shuffled; those
        a link recently failed to are tried last."""
        now = time.monotonic()
        for candidate in candidates(name):
            found = []
            for protocol in protocols:
                found += self._holders.get((protocol, candidate), [])
            found = [i for i in dict.fromkeys(found) if i in self._instances]
            if found:
                return sorted(found, key=lambda i: (
                    now - self._suspects.get(i, -SUSPECT_SECONDS) < SUSPECT_SECONDS,
                    os.urandom(4)))
        return []

    def send(self, sock, header: dict, peeked: bytes, protocols):
        """Carry a visitor's connection to a live holder of ``header["name"]`` and splice
        (returns when it ends): TAKEN, LIMIT, UNREACHABLE or None (the module docstring)."""
        holders = self.holders(protocols, header["name"])
        if not holders:
            return None
        if not self._out.acquire(blocking=False):
            return LIMIT
        self.registry.links_out += 1
        try:
            deadline = time.monotonic() + LINK_TIMEOUT
            answers = set()
            for instance_id in holders:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                instance = self._instances.get(instance_id)
                if instance is None:  # its row expired while an earlier holder was tried
                    continue
                stream = self._open(instance, header, peeked, min(left, ATTEMPT_TIMEOUT))
                if isinstance(stream, bytes):
                    answers.add(stream)
                    continue
                self.registry.forwarded_out += 1
                # Closes both ends when either is done, or both were silent idle_timeout.
                splice(sock, stream, idle_timeout=self.idle_timeout)
                self._used(instance_id)  # link_idle counts from the visitor's end
                return TAKEN
            return LIMIT if BUSY in answers else UNREACHABLE if answers - {REFUSED} else None
        finally:
            self.registry.links_out -= 1
            self._out.release()

    def _open(self, instance, header: dict, peeked: bytes, timeout: float):
        """A stream to ``instance`` whose holder answered OK, else why not: its answer
        (REFUSED, BUSY) or FAILED (no link, or no answer in ``timeout``). A link that was
        open already and failed before the answer (the holder restarted: its close not seen
        yet) costs one fresh dial: the holder reads a head once, so nothing reached the
        origin unless the link broke between the holder's OK and our reading it."""
        deadline = time.monotonic() + timeout
        head = dict(header, v=VERSION, forwarded=True, peeked=len(peeked))
        body = json.dumps(head, separators=(",", ":")).encode()
        message = struct.pack(">I", len(body)) + body + peeked
        for attempt in (1, 2):
            stream, session, fresh = None, None, True
            try:
                with gevent.Timeout(max(0.001, deadline - time.monotonic())):
                    session, fresh = self._session(instance)
                    stream = session.open()
                    stream.sendall(message)
                    answer = _read_exact(stream, 1)
            except gevent.Timeout:
                log.debug("fleet link to %s: no answer in time", instance.id)
                if stream is not None:
                    stream.reset()
                break
            except (OSError, ValueError, PinMismatch) as exc:  # MuxError is an OSError
                log.debug("fleet link to %s failed: %s", instance.id, exc)
                if stream is not None:
                    stream.close()
                if attempt == 1 and isinstance(exc, MuxError) and not fresh:
                    self._drop(instance.id, session)
                    continue
                break
            if answer == OK:
                return stream
            log.debug("fleet link to %s: answer %r", instance.id, answer)
            stream.close()
            return answer if answer in (REFUSED, BUSY) else FAILED
        self._suspects[instance.id] = time.monotonic()
        return FAILED

    def _session(self, instance) -> tuple:
        """(session, fresh): the open link to ``instance``, else one dialled now (one dial at
        a time per instance: visitors arriving meanwhile wait for it).
        :raises OSError, ValueError, PinMismatch, gevent.Timeout:"""
        fresh = False
        link = self._links.get(instance.id)
        if link is not None and (link.session.closed or link.fingerprint != instance.fingerprint
                                 or link.addr != instance.fleet_addr):
            self._drop(instance.id, link.session)
            link = None
        if link is None:
            pending = self._dialling.get(instance.id)
            if pending is None:
                pending = self._dialling[instance.id] = gevent.event.AsyncResult()
                gevent.spawn(self._dial, instance, pending)
            link, fresh = pending.get(), True
        link.used = time.monotonic()
        return link.session, fresh

    def _dial(self, instance, pending) -> None:
        """TCP, TLS with our certificate, the holder's pinned to its registered one, a mux
        session over it: the result of ``pending`` (an exception when it failed). A dial runs
        in its own greenlet: a visitor giving up does not abort it for the others."""
        raw = tls = None
        try:
            with gevent.Timeout(LINK_TIMEOUT):
                host, port = parse_hostport(instance.fleet_addr)
                raw = gevent.socket.create_connection((host, port))
                set_nodelay(raw)  # heads and answers are small writes (Nagle: 40 ms)
                tls = TLSTransport.client(raw, self._client_ctx, timeout=None)
                check_pin(tls, {instance.fingerprint})
        except (OSError, ValueError, PinMismatch, gevent.Timeout) as exc:
            if tls is not None or raw is not None:
                (tls or raw).close()
            if isinstance(exc, gevent.Timeout):
                exc = TimeoutError("fleet link: dial timed out")
            pending.set_exception(exc)
            return
        finally:
            self._dialling.pop(instance.id, None)
        session = Session(tls, client=True, config=self._mux, name=f"fleet link to {instance.id}",
                          log_limiter=self._peer_log, log_key=instance.id)
        link = _Out(session, instance.fingerprint, instance.fleet_addr)
        if self._stopped:
            session.close()
        else:
            self._links[instance.id] = link
            self.registry.link_sessions_out += 1
            gevent.spawn(self._count_end, session, "link_sessions_out")
        pending.set(link)

    def _used(self, instance_id) -> None:
        link = self._links.get(instance_id)
        if link is not None:
            link.used = time.monotonic()

    def _drop(self, instance_id, session) -> None:
        """Close ``session`` and forget it as the link to ``instance_id``."""
        link = self._links.get(instance_id)
        if link is not None and link.session is session:
            del self._links[instance_id]
        session.close()

    def _count_end(self, session, gauge: str) -> None:
        """Take ``session`` off the ``gauge`` of the registry once it ends."""
        session.wait()
        setattr(self.registry, gauge, getattr(self.registry, gauge) - 1)

    # --- holder --------------------------------------------------------------------------
    def _serve(self, raw, address) -> None:
        """A link from a live instance: its streams, each a visitor, until it ends."""
        set_nodelay(raw)
        try:
            with gevent.Timeout(LINK_TIMEOUT):  # TLS checks the sender's certificate here
                tls = self._handshake(raw)
        except (OSError, ValueError, gevent.Timeout) as exc:
            self._refused(address, "handshake: %s" % (exc or type(exc).__name__))
            raw.close()
            return
        fingerprint = hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest()
        session = Session(tls, client=False, config=self._mux,
                          name=f"fleet link from {address[0]}", log_limiter=self._peer_log,
                          log_key=address[0])
        self._admit(fingerprint, session)
        self.registry.link_sessions_in += 1
        try:
            while True:
                stream = session.accept()  # bounded: MuxConfig.max_streams, accept_backlog
                gevent.spawn(self._serve_stream, session, fingerprint, stream, address)
        except MuxError:  # the link ended (the sender's close, heartbeat, _close_stale)
            pass
        finally:
            self.registry.link_sessions_in -= 1
            session.close()
            sessions = self._served.get(fingerprint)
            if sessions is not None and session in sessions:
                sessions.remove(session)
                if not sessions:
                    del self._served[fingerprint]

    def _admit(self, fingerprint: str, session) -> None:
        """Keep ``session`` among its certificate's links; past SESSIONS_PER_PEER the oldest
        is closed."""
        sessions = self._served.setdefault(fingerprint, [])
        sessions.append(session)
        while len(sessions) > SESSIONS_PER_PEER:
            sessions.pop(0).close()

    def _serve_stream(self, session, fingerprint: str, stream, address) -> None:
        """One visitor: the head checked, the answer, then take()'s run on the stream."""
        try:
            with gevent.Timeout(LINK_TIMEOUT):
                header, peeked = self._read_head(stream, fingerprint)
        except LinkRefused as exc:  # a fleet member's certificate no longer live, or junk
            self._refused(address, str(exc))
            session.close()
            return
        except (OSError, ValueError, gevent.Timeout) as exc:
            self._refused(address, "head: %s" % (exc or type(exc).__name__))
            stream.reset()
            return
        registry = self.registry
        if registry.links_in >= self.max_links:
            registry.count_refusal("fleet_link_busy")
            _answer(stream, BUSY)
            return
        registry.links_in += 1  # before take(), which may yield: the bound holds at once
        try:
            run = self.take(header, peeked)
            if isinstance(run, Refused):
                _answer(stream, REFUSED)
                return
            try:
                stream.sendall(OK)
            except OSError:  # the sender gave up; dropping run closes what it holds
                stream.close()
                return
            registry.forwarded_in += 1
            run(stream)
        finally:
            registry.links_in -= 1

    def _handshake(self, raw):
        """The TLS transport once the sender's certificate checked out; meanwhile ``raw`` holds
        one of MAX_HANDSHAKES slots, and past them the oldest handshake's connection is shut
        down (its handshake then fails with OSError, as any other). :raises OSError,
        ValueError:"""
        me = gevent.getcurrent()
        self._handshaking[me] = raw.fileno()
        try:
            if len(self._handshaking) > MAX_HANDSHAKES:
                _shut_down(self._handshaking.pop(next(iter(self._handshaking))))
            return TLSTransport.server(raw, self._server_ctx, timeout=None)
        finally:
            self._handshaking.pop(me, None)

    def _read_head(self, stream, fingerprint: str) -> tuple:
        """The sender's head and peeked bytes, checked. :raises LinkRefused:"""
        if fingerprint not in self._anchors:  # its row expired since the handshake
            raise LinkRefused("certificate %s... of no live instance" % fingerprint[:16])
        (n,) = struct.unpack(">I", _read_exact(stream, 4))
        if n > MAX_HEAD:
            raise LinkRefused("head of %d bytes" % n)
        body = _read_exact(stream, n)
        try:
            head = json.loads(body)
            size = int(head["peeked"])
        except (ValueError, KeyError, TypeError):
            raise LinkRefused("a head that does not parse") from None
        if not isinstance(head, dict) or head.get("forwarded") is not True or not (
                0 <= size <= MAX_PEEKED):
            raise LinkRefused("not a forwarded connection")
        if head.get("kind") not in LINK_KINDS:
            raise LinkRefused("a head of kind %.40r" % (head.get("kind"),))
        return head, _read_exact(stream, size)

    def _refused(self, address, reason: str) -> None:
        """Count a refused link (or stream) and log it, at most once per
        REFUSED_LOG_INTERVAL."""
        self.registry.count_refusal("fleet_link_refused")
        self._log_refused(address, reason)

    def _log_refused(self, address, reason: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= REFUSED_LOG_INTERVAL:
            self._logged_at = now
            log.warning("fleet link from %s refused: %s (counter fleet_link_refused; one "
                        "line per %g s)", address[0], reason, REFUSED_LOG_INTERVAL)


def _answer(stream, answer: bytes) -> None:
    """Send the holder's one-byte answer and close the stream."""
    try:
        stream.sendall(answer)
    except OSError:
        pass
    stream.close()


def _shut_down(fd: int) -> None:
    """Shut a connection down both ways by its descriptor (its socket object stays its owner's,
    whose next wait on it then ends)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def _read_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ValueError("the link closed early")
        buf += data
    return bytes(buf)
