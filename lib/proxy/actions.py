"""The operator's actions on a running proxy (the dashboard's buttons), each audited.

Public API::

    actions = OperatorActions(registry, store)      # store: lib.proxy.ownership.OwnershipStore
    actions.disconnect_tunnel(tunnel_id, actor, detail="") -> bool   # the client will reconnect
    actions.block_hostname(name, actor, detail="") -> int   # live bindings dropped at once
    actions.unblock_hostname(name, actor, detail="") -> bool
    actions.block_key(key, actor, detail="") -> int         # that key's tunnels disconnected
    actions.unblock_key(key, actor, detail="") -> bool
    actions.apply_blocks(names, keys) -> (bindings, tunnels)   # blocks made elsewhere in the
                                                              # fleet (lib/proxy/fleet.py)

Blocks are kept durably by the store (which writes the audit entry); this class applies them
to the live state at once. New binds and public connections check the store's blocks
themselves (lib/proxy/bindpolicy.py, lib/proxy/routing.py).

:raises NoStore: a block or unblock on a proxy without an ownership store (nothing could keep
    it; the dashboard answers 503 naming the store).
"""
from __future__ import annotations

import logging

from lib.errors import ErrorCode, ShroudError
from lib.proxy.ownership import Blocks, canonical_name
from lib.proxy.registry import Registry

log = logging.getLogger("shroud.proxy")


class NoStore(ShroudError):
    """A block needs the ownership store, and this proxy has none (an embedding that passed
    its own ownership policy; the entry points always open one)."""

    def __init__(self):
        super().__init__("this proxy has no ownership store, so blocks cannot be kept: it keeps "
                         "them in its store (SQLite in --data-dir, or PostgreSQL with "
                         "--database-url); start the proxy with one")


class OperatorActions:
    def __init__(self, registry: Registry, store=None):
        self.registry = registry
        self.store = store

    def _require_store(self):
        if self.store is None:
            raise NoStore()
        return self.store

    def disconnect_tunnel(self, tunnel_id: int, actor: str, detail: str = "") -> bool:
        """Close one tunnel now (GOAWAY); its client reconnects with backoff unless blocked."""
        tunnel = self.registry.tunnels.get(int(tunnel_id))
        if tunnel is None:
            return False
        names = ", ".join(sorted(b.name for b in tunnel.bindings)) or "no names"
        self.registry.remove_tunnel(tunnel)
        tunnel.session.close(ErrorCode.NO_ERROR, "disconnected by the operator")
        log.warning("tunnel %d from %s disconnected by %s", tunnel.id, tunnel.peer, actor)
        if self.store is not None:
            self.store.audit(actor, "disconnect-tunnel", f"tunnel {tunnel.id}",
                             f"peer {tunnel.peer}, key {(tunnel.key or 'unsigned')[:16]}"
                             f"{'' if tunnel.proven or tunnel.key is None else ' (unproven)'}, "
                             f"{names}" + (f": {detail}" if detail else ""))
        return True

    def block_hostname(self, name: str, actor: str, detail: str = "") -> int:
        """Block ``name`` (or a wildcard) durably and drop the live bindings it covers, so no
        new public connection is routed to them; returns how many were dropped."""
        store = self._require_store()
        blocked = canonical_name(name)
        store.block_hostname(blocked, actor, detail)
        dropped, _ = self.apply_blocks({blocked}, ())
        log.warning("%s blocked by %s (%d live binding(s) dropped)", blocked, actor, dropped)
        return dropped

    def unblock_hostname(self, name: str, actor: str, detail: str = "") -> bool:
        return self._require_store().unblock_hostname(name, actor, detail)

    def block_key(self, key: str, actor: str, detail: str = "") -> int:
        """Block a client key durably and disconnect its tunnels; returns how many."""
        store = self._require_store()
        store.block_key(key, actor, detail)
        key = key.lower()
        _, cut = self.apply_blocks((), {key})
        log.warning("key %s blocked by %s (%d tunnel(s) disconnected)", key[:16], actor, cut)
        return cut

    def unblock_key(self, key: str, actor: str, detail: str = "") -> bool:
        return self._require_store().unblock_key(key, actor, detail)

    def apply_blocks(self, names, keys) -> tuple:
        """Drop the live bindings that blocked ``names`` cover (by the rule routing uses,
        Blocks.covering) and disconnect the tunnels of blocked ``keys``: blocks made here or by
        another instance of the fleet (already in the store).
        :returns: (bindings dropped, tunnels disconnected)."""
        covering = Blocks(frozenset(names))
        dropped = [b for b in list(self.registry.bindings.values())
                   if covering.covering(b.name) is not None]
        for binding in dropped:
            self.registry.unbind(binding)
        tunnels = [t for t in list(self.registry.tunnels.values()) if t.key in keys]
        for tunnel in tunnels:
            self.registry.remove_tunnel(tunnel)
            tunnel.session.close(ErrorCode.NO_ERROR, "key blocked by the operator")
        return len(dropped), len(tunnels)
