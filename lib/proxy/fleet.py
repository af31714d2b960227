"""This proxy instance's part in its fleet: its row in the live registry, its bindings there,
and the blocks other instances make.

Public API::

    member = FleetMember(store, registry, identity, apply_blocks, heartbeat_interval=5.0)
        identity: InstanceIdentity(hostname, addresses, fingerprint, fleet_addr="")
        apply_blocks(names: set, keys: set): drop what newly blocked names/keys cover here
    member.start()        # two greenlets (below); returns at once
    member.stop()         # ends them and removes this instance's rows (a clean shutdown)
    member.id             # this instance's id in the registry
    member.status() -> dict   # {"id", "store", "reachable", "last_heartbeat", "last_error"}

Two greenlets (docs/DESIGN.md, "Process model": routing never waits on the store):

- **heartbeat**, every ``heartbeat_interval`` s: registers the instance (again, when another
  instance expired it), writes its stats and the changes to its bindings since the last beat,
  and removes instances silent for EXPIRE_BEATS beats (any instance may: the fleet needs no
  leader). Now and then it also touches the names bound here (a name served for months must
  not lapse, lib/proxy/store/base.py ClaimLimits) and sweeps lapsed claims.
- **watcher**: waits for a change of blocks (PostgreSQL NOTIFY; SQLite's data_version, polled),
  reloads the block cache and hands what is newly blocked to ``apply_blocks``. A full reload
  every RELOAD_INTERVAL s covers a notification lost while the database was away.

The store unreachable: both loops log (rate-limited), mark ``reachable`` False and retry; the
bindings and blocks in memory keep serving. Nothing here runs on a connection's path.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import Callable, NamedTuple

import gevent

from lib.proxy.store.base import Instance, LiveBinding, OwnershipError

log = logging.getLogger("shroud.fleet")

# A beat every 5 s and expiry after 3 missed ones: a dead instance leaves the fleet's view in
# 15-20 s, and a fleet of 100 instances writes 20 small transactions a second.
HEARTBEAT_INTERVAL = 5.0
EXPIRE_BEATS = 3
# Binding rows written per beat at most: a proxy with 2,000 tunnels of 256 names each catches up
# over a few beats instead of one transaction of 500k rows.
MAX_ROWS_PER_BEAT = 5000
# How long the watcher waits for one notification before it looks again (and how soon it
# notices stop()); and the full reload that covers a lost notification.
WATCH_TIMEOUT = 1.0
RELOAD_INTERVAL = 30.0
# Names bound here are touched (last_bound) once an hour, lapsed claims swept as often.
HOUSEKEEPING_INTERVAL = 3600.0
# One line per this many seconds for a store that stays unreachable.
ERROR_LOG_INTERVAL = 30.0


class InstanceIdentity(NamedTuple):
    hostname: str
    addresses: dict
    fingerprint: str
    fleet_addr: str = ""
    cert: str = ""  # the tunnel certificate, PEM (registered when fleet_addr is)


def new_instance_id(hostname: str) -> str:
    """``host-pid-random``: unique per process start, readable on the dashboard."""
    return "%s-%d-%s" % (socket.gethostname() or hostname, os.getpid(), secrets.token_hex(3))


class FleetMember:
    def __init__(self, store, registry, identity: InstanceIdentity,
                 apply_blocks: Callable[[set, set], None],
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.registry = registry
        self.identity = identity
        self.apply_blocks = apply_blocks
        self.interval = heartbeat_interval
        self.clock = clock
        self.id = new_instance_id(identity.hostname)
        self.started = clock()
        self.reachable = True
        self.last_heartbeat = 0.0
        self.last_error = ""
        self._published: dict = {}  # (protocol, name, tunnel id) -> LiveBinding
        self._registered: dict | None = None  # the addresses last written, once registered
        self._greenlets: list = []
        self._error_logged_at = float("-inf")
        self._housekept_at = float("-inf")

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.store.watched = True
        self._greenlets = [gevent.spawn(self._heartbeat_loop), gevent.spawn(self._watch_loop)]

    def stop(self) -> None:
        gevent.killall(self._greenlets, timeout=2)
        self._greenlets = []
        try:
            self.store.deregister(self.id)
        except OwnershipError as exc:
            log.warning("could not remove instance %s from the fleet: %s (it expires in "
                        "%.0f s)", self.id, exc, self.interval * EXPIRE_BEATS)

    def status(self) -> dict:
        return {"id": self.id, "store": self.store.describe(), "reachable": self.reachable,
                "last_heartbeat": self.last_heartbeat, "last_error": self.last_error,
                "heartbeat_interval": self.interval}

    # --- heartbeat -----------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while True:
            try:
                self.beat()
                self._ok()
            except OwnershipError as exc:
                self._failed("heartbeat", exc)
            gevent.sleep(self.interval)

    def beat(self) -> None:
        """One heartbeat: register if needed, write stats and binding changes, expire the
        silent. :raises OwnershipError:"""
        # The addresses as this beat writes them: a listener opening while the write waits
        # (in the store's thread pool) is seen by the next beat, not taken as written.
        addresses = dict(self.identity.addresses)
        if self._registered is None:
            self.store.register_instance(self._instance_row(addresses))
            self._published = {}
            self._registered = addresses
            log.info("instance %s joined the fleet in %s", self.id, self.store.describe())
        elif self._registered != addresses:
            # A listener started after us (the admin app, one-port mode): show it too.
            self.store.register_instance(self._instance_row(addresses))
            self._registered = addresses
        add, remove = self._binding_changes()
        if not self.store.heartbeat(self.id, self._stats(), add=add, remove=remove):
            log.warning("instance %s had expired from the fleet's registry: registering again",
                        self.id)
            self.store.register_instance(self._instance_row(addresses))
            self._registered = addresses
            self._published = {}  # every binding is written again from the next beat
            return
        for b in add:
            self._published[(b.protocol, b.name, b.tunnel)] = b
        for k in remove:
            self._published.pop(k, None)
        self.last_heartbeat = self.clock()
        gone = self.store.expire_instances(self.interval * EXPIRE_BEATS)
        if gone:
            log.info("instances gone silent, removed from the fleet: %s", ", ".join(gone))
        self._housekeeping()

    def _instance_row(self, addresses: dict) -> Instance:
        now = self.clock()
        i = self.identity
        return Instance(self.id, i.hostname, addresses, i.fleet_addr, i.fingerprint,
                        self.started, now, self._stats(), i.cert)

    def _stats(self) -> dict:
        r = self.registry
        rate_in, rate_out = r.history.rate()
        return {"tunnels": len(r.tunnels), "bindings": len(r.bindings),
                "connections": r.connections, "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out, "rate_in": rate_in, "rate_out": rate_out,
                "streams_open": sum(t.streams_open for t in r.tunnels.values()),
                "forwarded_in": r.forwarded_in, "forwarded_out": r.forwarded_out,
                "links_in": r.links_in, "links_out": r.links_out}

    def _binding_changes(self) -> tuple:
        current = {}
        for binding in list(self.registry.bindings.values()):
            for tunnel in list(binding.tunnels):
                k = (binding.protocol, binding.name, tunnel.id)
                current[k] = LiveBinding(self.id, binding.protocol, binding.name, tunnel.id,
                                         tunnel.key or "", binding.bound_at)
        add = [b for k, b in current.items() if k not in self._published]
        remove = [k for k in self._published if k not in current]
        return add[:MAX_ROWS_PER_BEAT], remove[:MAX_ROWS_PER_BEAT]

    def _housekeeping(self) -> None:
        now = self.clock()
        if now - self._housekept_at < HOUSEKEEPING_INTERVAL:
            return
        self._housekept_at = now
        names = {k[1] for k in self._published}
        self.store.touch_names(names, older_than=now - HOUSEKEEPING_INTERVAL)
        freed = self.store.expire_claims()
        if freed:
            log.info("%d first-use claims lapsed (unbound for %g days)", freed,
                     self.store.limits.expiry_days)

    # --- watcher -------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        reloaded_at = float("-inf")
        while True:
            try:
                changed = self.store.wait_for_change(WATCH_TIMEOUT, sleep=gevent.sleep)
                if changed or time.monotonic() - reloaded_at >= RELOAD_INTERVAL:
                    self.refresh_blocks()
                    reloaded_at = time.monotonic()
            except OwnershipError as exc:
                self._failed("block watch", exc)
                gevent.sleep(WATCH_TIMEOUT)

    def refresh_blocks(self) -> None:
        """Reload blocks; drop here what another instance newly blocked.
        :raises OwnershipError:"""
        names, keys = self.store.reload_blocks()
        if names or keys:
            log.warning("blocked elsewhere in the fleet: %s", ", ".join(
                sorted(names) + ["key " + k[:16] for k in sorted(keys)]))
            self.apply_blocks(set(names), set(keys))

    # --- health --------------------------------------------------------------------------
    def _ok(self) -> None:
        if not self.reachable:
            log.warning("the store %s is reachable again", self.store.describe())
        self.reachable = True

    def _failed(self, what: str, exc: Exception) -> None:
        self.reachable = False
        self.last_error = str(exc)
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_INTERVAL:
            self._error_logged_at = now
            log.error("fleet %s failed: %s (live bindings keep serving; retrying)", what, exc)
