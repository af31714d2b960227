"""Links between the hosts of a fleet: a public connection for a name that no tunnel of this
instance (nor a sibling worker) holds live, but another instance of the fleet does, goes to that
instance over a mutually authenticated TLS link (docs/DESIGN.md, "Workers"; docs/SECURITY.md,
"Links between proxies").

Public API::

    links = FleetLinks(store, registry, take, cert_path, key_path, fingerprint,
                       listen_addr=("0.0.0.0", 7443), refresh=1.0, max_age=15.0,
                       max_links=MAX_LINKS, idle_timeout=None)   # --idle-timeout
        take(header, peeked) -> run(sock) | lib.proxy.workers.Refused   (router.take_linked)
    links.start(); links.stop()
    links.address                      # the fleet listener as bound: (host, port)
    links.self_id = "instance id"      # set once this instance is in the registry
    links.send(sock, header, peeked, protocols) -> TAKEN | LIMIT | UNREACHABLE | None
        # the sender's side: LIMIT (503) when its links or every holder's are all busy,
        # UNREACHABLE (502) when a holder was tried and none answered, None when every holder
        # refused or none is known (the caller refuses as without the fleet)

The registry counts what crosses hosts: ``forwarded_out`` (sender: carried to a holder) and
``forwarded_in`` (holder: served from a link), and ``links_out``/``links_in``, the links open
now (at most ``max_links`` each way; ``--fleet-max-links``).

The store is the trust anchor: an instance row carries the advertised link address, its
tunnel certificate and that certificate's SHA-256; only rows whose heartbeat is younger than
``max_age`` count. A background greenlet reads the rows (and the live bindings) every
``refresh`` seconds, so no connection waits on the store.

The link is TLS 1.3 with a certificate on both sides (mutual authentication by TLS itself):

- the sender presents its tunnel certificate as its client certificate and pins the holder's
  to the holder's row (check_pin, right after the handshake);
- the holder requires a client certificate and trusts exactly the live instances' registered
  certificates: its server context is rebuilt whenever that set changes, with those
  certificates as its only trust anchors (``load_verify_locations(cadata=...)``) and
  VERIFY_X509_PARTIAL_CHAIN, so a certificate that is itself in the store is a whole chain.
  Without that flag OpenSSL looks for a self-signed certificate's issuer by subject name, and
  our certificates share one (CN=shroud-proxy, no key identifiers): it found another
  instance's and refused the link. When the head arrives the holder checks again that the
  certificate is a live instance's (a spare link may wait LINK_IDLE; its sender's row may have
  expired since).

TLS's own CertificateVerify signs the handshake with the sender's key over both sides' fresh
randoms, so the link needs no nonce or signature of its own (docs/DESIGN.md, "Workers").
Then::

    sender -> holder   u32 length, JSON head {"v": 2, "kind", "name", "client": [ip, port],
                       "public": the listener the visitor reached ("host:port"),
                       "forwarded": true, "peeked": n}; then the n peeked bytes
    holder -> sender   one byte: OK (a splice of the visitor's bytes follows), REFUSED, BUSY

A link carries one visitor. The sender opens up to SPARE_LINKS per holder ahead of need (TCP and
TLS done), so a visitor's path holds only the head and the answer (one round trip); the holder
waits LINK_IDLE for the head of such a link, and the sender closes a spare unused after
SPARE_AGE, before that.

    the holder sees                                   it answers            counter
    no client certificate, or one of no live          TLS alert, closes     fleet_link_refused
      instance (a stranger's, an expired row's)
    MAX_HANDSHAKES connections in their handshake     closes the oldest     fleet_link_refused
    a head whose certificate's row expired since      closes the link       fleet_link_refused
    a head without "forwarded" or an unknown kind     closes the link       fleet_link_refused
    a name it holds no live tunnel for                REFUSED               (its refusal)
    max_links links already served here               BUSY                  fleet_link_busy
    a link closed before its first head byte (a       closes it             -
      spare the sender retired)
    no head within LINK_IDLE of the handshake         closes the link       fleet_link_refused

    the sender meets                                  the visitor gets      counter (sender)
    its own max_links links in flight                 503 / internal_error  fleet_link_limit
    every holder it tried answered BUSY               503 / internal_error  fleet_link_limit
    a holder silent for ATTEMPT_TIMEOUT, or dead      the next holder; if   fleet_link_failed
      (connection refused, TLS or pin failure)          none: 502 / alert
    every holder answered REFUSED                     as without the fleet  (404: unknown_name)

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
from collections import Counter
from typing import NamedTuple

import gevent
import gevent.lock
import gevent.pool
import gevent.server
import gevent.socket
from lib.certs import (PinMismatch, cert_fingerprint, check_pin, client_tls_context, leaf_pem,
                       server_tls_context)
from lib.errors import ShroudError
from lib.hostport import parse_hostport
from lib.net.sockets import set_nodelay
from lib.net.splice import splice
from lib.proxy.store.base import OwnershipError, candidates
from lib.proxy.workers import LIMIT, TAKEN, UNREACHABLE, Refused

log = logging.getLogger("shroud.fleet")

VERSION = 2  # of the head (1: a nonce and a signature of its own, before TLS client auth)
OK, REFUSED, BUSY = b"\x00", b"\x01", b"\x02"
FAILED = b""  # not an answer: no link, or none in time (the sender's own mark)
# A visitor waits at most this long for the links (connect, TLS, the holder's answer) before
# a clear error; on a LAN a link takes a millisecond. One holder gets at most ATTEMPT_TIMEOUT
# of it: a hung holder (its row not expired yet) costs a visitor one second, not the whole
# deadline, and is tried last for SUSPECT_SECONDS.
LINK_TIMEOUT = 3.0
ATTEMPT_TIMEOUT = 1.0
SUSPECT_SECONDS = 10.0
# Links in flight, each way (the default of --fleet-max-links): each is a greenlet and a TLS
# socket (~60 KiB), so 1,024 is ~60 MiB. Past it the visitor gets 503 here (sender) or the
# sender tries the next holder (BUSY).
MAX_LINKS = 1024
# Links past max_links still get their BUSY answered (a greenlet each, for the handshake);
# past this many more, the kernel's backlog holds them until a slot frees or the sender gives up.
BUSY_ANSWERS = 64
# Connections still in their TLS handshake (no certificate checked yet: anyone on the network
# can open one), at most this many at once, in slots of their own: past it the oldest is closed
# (counted fleet_link_refused). They shared the links' pool, so a stranger holding
# max_links + BUSY_ANSWERS idle TCP connections (renewed every LINK_TIMEOUT) stopped the
# holder accepting links at all. Evicting the oldest, a stranger must open this many
# connections within one fleet handshake (milliseconds) to cut a real one short.
MAX_HANDSHAKES = 128
# What a link carries: names by SNI or Host. Not tcp:PORT, a port of the sender's host (the
# sender never sends one: lib/proxy/routing.py).
LINK_KINDS = ("http", "tls")
# A head carries a name and two addresses; peeked bytes are bounded by the sniffers (a
# ClientHello or a request head), well under this.
MAX_HEAD = 16 * 1024
MAX_PEEKED = 256 * 1024
# One line per this many seconds for refused links: a scanner must not flood the log.
REFUSED_LOG_INTERVAL = 30.0
# Spare links: a sender keeps up to SPARE_LINKS links per holder open ahead (TCP and TLS
# done), so a visitor's path holds only its head and the holder's answer: a fresh link's
# handshakes cost milliseconds of CPU and round trips (bench/README.md, "Forwarding between
# workers and between hosts"). A spare is opened when a visitor was just sent to that holder
# (the next is likely to go there too), used once, and closed unused after SPARE_AGE. The
# holder waits LINK_IDLE for a head after the handshake (LINK_TIMEOUT for the rest): longer
# than SPARE_AGE, so a sender never sends on a link the holder is closing.
SPARE_LINKS = 2
SPARE_AGE = 5.0
# A spare is opened this long after the visitor that called for it: its handshake costs both
# hosts milliseconds of CPU, which on a busy host would otherwise compete with that very
# visitor's first bytes (the holder handles the new link's handshake and the visitor's head
# in the same loop).
SPARE_DELAY = 0.05
LINK_IDLE = 10.0


class _Spare(NamedTuple):
    """A link opened ahead: TLS, both sides authenticated, pinned to ``fingerprint`` at
    ``addr``."""
    tls: object
    fingerprint: str
    addr: str
    at: float  # time.monotonic() when opened


_DEAD = object()  # a spare link that failed before the holder's answer


class LinkRefused(ShroudError):
    """A link the holder will not serve (the reason is logged, rate-limited, and counted)."""


class FleetLinks:
    def __init__(self, store, registry, take, cert_path: str, key_path: str, fingerprint: str,
                 listen_addr: tuple, refresh: float = 1.0, max_age: float = 15.0,
                 max_links: int = MAX_LINKS, idle_timeout: float | None = None):
        if max_links < 1:
            raise ValueError(f"--fleet-max-links must be at least 1, got {max_links}")
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
        self._spares: dict = {}      # instance id -> [_Spare], at most SPARE_LINKS each
        self._warming: Counter = Counter()  # instance id -> spares being opened
        self._stopped = False
        self._server = None
        self._refresher = None
        self._logged_at = float("-inf")
        self._handshaking: dict = {}  # greenlet -> its raw socket, oldest first (MAX_HANDSHAKES)
        self.address = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, listener=None) -> None:
        """Listen (on ``listener``, a socket, when given) and start following the store."""
        self._server = gevent.server.StreamServer(
            listener if listener is not None else self.listen_addr, self._serve,
            spawn=gevent.pool.Pool(self.max_links + BUSY_ANSWERS + MAX_HANDSHAKES))
        self._server.start()
        self.address = self._server.address[:2]
        self._refresher = gevent.spawn(self._refresh_loop)

    def stop(self) -> None:
        self._stopped = True
        self._sweep()
        if self._refresher is not None:
            self._refresher.kill()
        if self._server is not None:
            self._server.stop(timeout=1)

    def _refresh_loop(self) -> None:
        while True:
            try:
                self.refresh()
            except OwnershipError as exc:  # the store is away: keep the last view
                log.warning("fleet links: could not read the registry: %s", exc)
            self._sweep()
            gevent.sleep(self.refresh_interval)

    def refresh(self) -> None:
        """Re-read the live instances and their bindings (the background greenlet does)."""
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
                link = self._open(instance, header, peeked, min(left, ATTEMPT_TIMEOUT))
                if isinstance(link, bytes):
                    answers.add(link)
                    continue
                self.registry.forwarded_out += 1
                # Closes both ends when either is done, or both were silent idle_timeout.
                splice(sock, LinkEnd(link), idle_timeout=self.idle_timeout)
                return TAKEN
            return LIMIT if BUSY in answers else UNREACHABLE if answers - {REFUSED} else None
        finally:
            self.registry.links_out -= 1
            self._out.release()

    def _open(self, instance, header: dict, peeked: bytes, timeout: float):
        """A link to ``instance`` whose holder answered OK, else why not: its answer (REFUSED,
        BUSY) or FAILED (no link, or no answer in ``timeout``). A spare link (opened ahead) is
        tried first; one that failed before an answer (the holder restarted) costs a fresh
        one. The holder reads a head once: a link that failed before its answer carried nothing
        to the origin, unless it broke between the holder's OK and our reading it."""
        deadline = time.monotonic() + timeout
        spare = self._take_spare(instance)
        self._warm(instance)
        if spare is not None:
            answer = self._try(spare, instance, header, peeked, deadline)
            if answer is not _DEAD:
                return answer
        return self._try(None, instance, header, peeked, deadline)

    def _try(self, link, instance, header: dict, peeked: bytes, deadline: float):
        """The TLS socket of ``link`` (None: a new one) when the holder answered OK, else its
        answer (REFUSED, BUSY) or FAILED; _DEAD when the spare ``link`` failed unanswered."""
        spare = link is not None
        try:
            with gevent.Timeout(max(0.001, deadline - time.monotonic())):
                link = link or self._connect(instance)
                answer = self._ask(link, instance, header, peeked)
        except (OSError, ValueError, PinMismatch, gevent.Timeout) as exc:
            log.debug("fleet link to %s failed: %s", instance.id, exc)
            if link is not None:
                link.tls.close()
            if spare and not isinstance(exc, gevent.Timeout):
                return _DEAD
            self._suspects[instance.id] = time.monotonic()
            return FAILED
        if answer == OK:
            return link.tls
        log.debug("fleet link to %s: answer %r", instance.id, answer)
        link.tls.close()
        return answer if answer in (REFUSED, BUSY) else FAILED

    def _connect(self, instance) -> _Spare:
        """TCP, TLS with our certificate, the holder's pinned to its registered one."""
        host, port = parse_hostport(instance.fleet_addr)
        raw = gevent.socket.create_connection((host, port))
        set_nodelay(raw)  # the head and the answer are small writes (Nagle: 40 ms)
        tls = None
        try:
            tls = self._client_ctx.wrap_socket(raw, server_hostname=None)
            check_pin(tls, {instance.fingerprint})
        except BaseException:
            (tls or raw).close()
            raise
        return _Spare(tls, instance.fingerprint, instance.fleet_addr, time.monotonic())

    def _ask(self, link: _Spare, instance, header: dict, peeked: bytes) -> bytes:
        """Send the head and the peeked bytes; the holder's answer byte."""
        head = dict(header, v=VERSION, forwarded=True, peeked=len(peeked))
        body = json.dumps(head, separators=(",", ":")).encode()
        link.tls.sendall(struct.pack(">I", len(body)) + body + peeked)
        return _read_exact(link.tls, 1)

    # --- spare links (sender) ------------------------------------------------------------
    def _take_spare(self, instance):
        """A spare link to ``instance``, young enough, to its current address and certificate;
        else None (stale ones are closed)."""
        spares = self._spares.get(instance.id)
        now = time.monotonic()
        while spares:
            link = spares.pop()
            if (now - link.at < SPARE_AGE and link.fingerprint == instance.fingerprint
                    and link.addr == instance.fleet_addr):
                return link
            link.tls.close()
        return None

    def _warm(self, instance) -> None:
        """Open spare links to ``instance`` in the background, up to SPARE_LINKS."""
        have = len(self._spares.get(instance.id, ())) + self._warming[instance.id]
        for _ in range(SPARE_LINKS - have):
            self._warming[instance.id] += 1
            gevent.spawn_later(SPARE_DELAY, self._fill, instance)

    def _fill(self, instance) -> None:
        try:
            with gevent.Timeout(LINK_TIMEOUT):
                link = self._connect(instance)
        except (OSError, ValueError, PinMismatch, gevent.Timeout) as exc:
            log.debug("spare link to %s failed: %s", instance.id, exc)
            return
        finally:
            self._warming[instance.id] -= 1
            if not self._warming[instance.id]:
                del self._warming[instance.id]
        if self._stopped or instance.id not in self._instances:
            link.tls.close()
            return
        self._spares.setdefault(instance.id, []).append(link)

    def _sweep(self) -> None:
        """Close spare links past SPARE_AGE or to instances no longer live (or all, stopped)."""
        now = time.monotonic()
        for instance_id in list(self._spares):
            keep = []
            for link in self._spares[instance_id]:
                if (not self._stopped and now - link.at < SPARE_AGE
                        and instance_id in self._instances):
                    keep.append(link)
                else:
                    link.tls.close()
            if keep:
                self._spares[instance_id] = keep
            else:
                del self._spares[instance_id]

    # --- holder --------------------------------------------------------------------------
    def _serve(self, raw, address) -> None:
        set_nodelay(raw)
        link = self._accept(raw, address)
        if link is None:
            return
        tls, header, peeked = link
        registry = self.registry
        if registry.links_in >= self.max_links:
            registry.count_refusal("fleet_link_busy")
            _answer(tls, BUSY)
            return
        registry.links_in += 1  # before take(), which may yield: the bound holds at once
        try:
            run = self.take(header, peeked)
            if isinstance(run, Refused):
                _answer(tls, REFUSED)
                return
            try:
                tls.sendall(OK)
            except OSError:  # the sender gave up; dropping run closes what it holds
                tls.close()
                return
            registry.forwarded_in += 1
            run(LinkEnd(tls))
        finally:
            registry.links_in -= 1

    def _accept(self, raw, address):
        """(tls, head, peeked) of a link from a live instance, checked; else None (closed,
        counted, logged at most once per REFUSED_LOG_INTERVAL)."""
        try:
            with gevent.Timeout(LINK_TIMEOUT):  # TLS checks the sender's certificate here
                tls = self._handshake(raw)
            with gevent.Timeout(LINK_IDLE):  # a spare link waits here for its visitor
                first = tls.recv(4)
            if not first:  # a spare link closed unused (SPARE_AGE): nothing was asked
                raw.close()
                return None
            with gevent.Timeout(LINK_TIMEOUT):
                header, peeked = self._read_head(tls, first)
            return tls, header, peeked
        except LinkRefused as exc:
            reason = str(exc)
        except (OSError, ValueError, gevent.Timeout) as exc:
            reason = "handshake: %s" % (exc or type(exc).__name__)
        self.registry.count_refusal("fleet_link_refused")
        self._log_refused(address, reason)
        raw.close()
        return None

    def _handshake(self, raw):
        """The TLS socket once the sender's certificate checked out; meanwhile ``raw`` holds one
        of MAX_HANDSHAKES slots, and past them the oldest handshake's connection is shut down
        (its handshake then fails with OSError, as any other). :raises OSError, ValueError:"""
        me = gevent.getcurrent()
        self._handshaking[me] = raw.fileno()  # ssl takes the descriptor from raw: keep the fd
        try:
            if len(self._handshaking) > MAX_HANDSHAKES:
                _shut_down(self._handshaking.pop(next(iter(self._handshaking))))
            return self._server_ctx.wrap_socket(raw, server_side=True)
        finally:
            self._handshaking.pop(me, None)

    def _read_head(self, tls, start: bytes = b"") -> tuple:
        """The sender's head and peeked bytes (``start``: its first bytes, read already),
        checked. :raises LinkRefused:"""
        fingerprint = hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest()
        if fingerprint not in self._anchors:  # its row expired since the handshake
            raise LinkRefused("certificate %s... of no live instance" % fingerprint[:16])
        (n,) = struct.unpack(">I", start + _read_exact(tls, 4 - len(start)))
        if n > MAX_HEAD:
            raise LinkRefused("head of %d bytes" % n)
        body = _read_exact(tls, n)
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
        return head, _read_exact(tls, size)

    def _log_refused(self, address, reason: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= REFUSED_LOG_INTERVAL:
            self._logged_at = now
            log.warning("fleet link from %s refused: %s (counter fleet_link_refused; one "
                        "line per %g s)", address[0], reason, REFUSED_LOG_INTERVAL)


class LinkEnd:
    """A TLS link as one end of a splice (lib/net/splice.py half-closes its ends). Python's ssl
    cannot half-close TLS: SSLSocket.shutdown drops the TLS state, and the next read of the
    other direction raised ValueError (a traceback at the holder after every forwarded HTTP
    exchange). Here SHUT_WR sends the TCP FIN alone, no close_notify (the peer's ssl reads it as
    the end, suppress_ragged_eofs), and reads go on. Everything else is the TLS socket's."""

    def __init__(self, tls):
        self._tls = tls

    def __getattr__(self, name):
        return getattr(self._tls, name)

    def shutdown(self, how: int) -> None:
        gevent.socket.socket.shutdown(self._tls, how)


def _answer(tls, answer: bytes) -> None:
    """Send the holder's one-byte answer and close the link."""
    try:
        tls.sendall(answer)
    except OSError:
        pass
    tls.close()


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
