"""The dashboard's pages, JSON API and /metrics: one Flask Blueprint of module-level views.

Public API::

    bp                                  # Blueprint "admin"; lib.admin.app registers it
    Live(registry, store, hostname, fingerprint, actions)   # put in app.extensions[EXTENSION]
    live() -> Live                      # the current app's

The views read snapshots of the proxy's live state through ``Live`` (lib.admin.dashboard does
the reading) and change it only through ``Live.actions`` (the proxy's operator actions:
``disconnect_tunnel``, ``block_hostname``, ``unblock_hostname``, ``block_key``,
``unblock_key``). URLs and JSON shapes are listed in lib/admin/app.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from flask import (Blueprint, abort, current_app, g, jsonify, redirect, render_template,
                   request, session, url_for)

from lib.admin import auth, dashboard
from lib.admin.metrics import render as render_metrics
from lib.proxy.actions import NoStore
from lib.proxy.store import OwnershipError

EXTENSION = "shroud_live"
# The audit text an operator may attach to an action: a sentence, not a document.
MAX_DETAIL = 500
# The largest JSON body an action takes: target + detail fit easily.
MAX_ACTION_BODY = 4096

bp = Blueprint("admin", __name__)


@dataclass
class Live:
    """What the dashboard reads (never owns): the proxy's registry and ownership store, its
    name and certificate fingerprint; and the object whose methods are the operator actions."""

    registry: Any
    store: Any
    hostname: str
    fingerprint: str
    actions: Any
    prom: Any = None  # the Prometheus registry over this state (lib.admin.metrics)
    fleet: Any = None  # this instance's lib.proxy.fleet.FleetMember, when it runs one

    @classmethod
    def of_proxy(cls, proxy) -> "Live":
        # With gunicorn workers, the views read and act on every worker's state (a proxy's
        # view_registry and view_actions, lib/proxy/groupview.py).
        return cls(registry=getattr(proxy, "view_registry", proxy.registry), store=proxy.store,
                   hostname=getattr(proxy.config, "hostname", ""), fingerprint=proxy.fingerprint,
                   actions=getattr(proxy, "view_actions", proxy.actions),
                   fleet=getattr(proxy, "fleet", None))


def live() -> Live:
    return current_app.extensions[EXTENSION]


@bp.errorhandler(dashboard.QueryError)
def query_error(e):
    return jsonify(error=str(e)), 400


@bp.errorhandler(OwnershipError)
def store_error(e):
    # The store (the fleet's database) cannot answer: say so; its message never holds a
    # password (lib/proxy/store/postgres.py redact_url).
    return jsonify(error=str(e)), 503


@bp.errorhandler(NoStore)
def no_store(e):
    # Not the operator's request: this proxy was started without a store to keep a block in.
    return jsonify(error=str(e), missing="store"), 503


# --- open ------------------------------------------------------------------------------------

@bp.get("/healthz")
def healthz():
    return {"ok": True}


LOGIN_ERRORS = {  # check_login's verdict -> (message, status)
    "csrf": ("The form expired; please try again.", 400),
    "throttled": ("Too many failed logins; wait a minute.", 429),
    "wrong": ("Wrong user name or password.", 401),
}


@bp.route("/login", methods=["GET", "POST"])
def login():
    if auth.settings().password_hash is None:
        return auth.setup_page()
    nxt = request.values.get("next") or "/"
    target = urlparse(nxt)
    if target.scheme or target.netloc or not nxt.startswith("/"):
        nxt = "/"  # never redirect off this site after login
    error, status = None, 200
    if request.method == "POST":
        verdict = auth.check_login(request.form)
        if verdict == "ok":
            auth.start_session()
            return redirect(nxt)
        error, status = LOGIN_ERRORS[verdict]
    # The user name is never pre-filled: the page would tell anyone who asks half the login.
    return render_template("login.html", error=error, next=nxt), status


@bp.post("/logout")
def logout():
    if session.get("user") and not auth.csrf_ok():
        abort(403)
    auth.end_session()
    return redirect(url_for("admin.login"))


# --- pages -----------------------------------------------------------------------------------

def _page(template: str, which: str, **kw):
    return render_template(template, page=which, proxy_name=live().hostname, **kw)


@bp.get("/")
@auth.page
def overview_page():
    return _page("overview.html", "overview")


@bp.get("/h/<protocol>/<path:name>")
@auth.page
def hostname_page(protocol, name):
    return _page("hostname.html", "hostname", protocol=protocol, name=name)


@bp.get("/tunnels")
@auth.page
def tunnels_page():
    return _page("tunnels.html", "tunnels")


@bp.get("/blocks")
@auth.page
def blocks_page():
    return _page("blocks.html", "blocks")


@bp.get("/fleet")
@auth.page
def fleet_page():
    return _page("fleet.html", "fleet")


# --- JSON API: reading -----------------------------------------------------------------------

@bp.get("/api/status")
@auth.api
def status():
    reg = live().registry
    snap = reg.snapshot()
    workers = getattr(reg, "workers", None)  # gunicorn workers (lib/proxy/groupview.py)
    if workers is not None:
        snap["workers"] = workers
    snap["fingerprint"] = live().fingerprint
    return jsonify(snap)


@bp.get("/api/overview")
@auth.api
def api_overview():
    return jsonify(dashboard.overview(live()))


@bp.get("/api/hostnames")
@auth.api
def api_hostnames():
    a = request.args
    return jsonify(dashboard.query_bindings(
        live().registry, q=a.get("q", ""), protocol=a.get("protocol", ""),
        sort=a.get("sort", "name"), order=a.get("order", "asc"), page=a.get("page"),
        per_page=a.get("per_page")))


@bp.get("/api/hostnames/<protocol>/<path:name>")
@auth.api
def api_hostname(protocol, name):
    state = live()
    d = dashboard.binding_detail(state.registry, protocol, name)
    blocked = dashboard.blocked_state(state.store, name=name)
    if d is None:
        return jsonify(name=name, protocol=protocol, bound=False, blocked=blocked,
                       error=f"{name} is not bound now"), 404
    d["bound"] = True
    d["blocked"] = blocked
    d["owner_blocked"] = bool(d["owner"]) and dashboard.blocked_state(state.store, key=d["owner"])
    return jsonify(d)


@bp.get("/api/tunnels")
@auth.api
def api_tunnels():
    a = request.args
    return jsonify(dashboard.query_tunnels(
        live().registry, q=a.get("q", ""), sort=a.get("sort", "connected_at"),
        order=a.get("order", "desc"), page=a.get("page"), per_page=a.get("per_page")))


@bp.get("/api/blocks")
@auth.api
def api_blocks():
    return jsonify(dashboard.blocks(live().store))


@bp.get("/api/audit")
@auth.api
def api_audit():
    try:
        limit = int(request.args.get("limit", 200))
    except ValueError:
        raise dashboard.QueryError("limit must be an integer") from None
    return jsonify(items=dashboard.audit(live().store, limit))


@bp.get("/api/fleet")
@auth.api
def api_fleet():
    state = live()
    if state.store is None:
        return jsonify(error="this proxy has no store"), 404
    return jsonify(dashboard.fleet(state.store, state.fleet))


@bp.get("/metrics")
@auth.api
def metrics():
    body, ctype = render_metrics(live().prom)
    return body, 200, {"Content-Type": ctype}


# --- JSON API: operator actions --------------------------------------------------------------

def action_args() -> dict:
    """An action's ``kind``, ``target`` and ``detail``, from a JSON object or a form."""
    if request.content_length and request.content_length > MAX_ACTION_BODY:
        abort(413)
    data = request.get_json(silent=True) if request.is_json else request.form.to_dict()
    if not isinstance(data, dict):
        raise dashboard.QueryError("send a JSON object or a form")
    detail = str(data.get("detail") or "")
    if len(detail) > MAX_DETAIL:
        raise dashboard.QueryError(f"detail is longer than {MAX_DETAIL} characters")
    return {"kind": str(data.get("kind") or ""), "target": str(data.get("target") or ""),
            "detail": detail}


@bp.post("/api/tunnels/<int:tunnel_id>/disconnect")
@auth.api
def api_disconnect(tunnel_id):
    detail = action_args()["detail"]
    if not live().actions.disconnect_tunnel(tunnel_id, g.actor, detail):
        return jsonify(error=f"no live tunnel {tunnel_id}"), 404
    return jsonify(ok=True, tunnel=tunnel_id)


@bp.post("/api/block")
@auth.api
def api_block():
    a = action_args()
    actions = live().actions
    try:
        if a["kind"] == "hostname":
            dropped = actions.block_hostname(a["target"], g.actor, a["detail"])
            return jsonify(ok=True, kind="hostname", target=a["target"],
                           bindings_dropped=dropped)
        if a["kind"] == "key":
            cut = actions.block_key(a["target"], g.actor, a["detail"])
            return jsonify(ok=True, kind="key", target=a["target"], tunnels_disconnected=cut)
    except ValueError as e:
        return jsonify(error=f"cannot block {a['target']!r}: {e}"), 400
    return jsonify(error="kind must be hostname or key"), 400


@bp.post("/api/unblock")
@auth.api
def api_unblock():
    a = action_args()
    actions = live().actions
    try:
        if a["kind"] == "hostname":
            changed = actions.unblock_hostname(a["target"], g.actor, a["detail"])
        elif a["kind"] == "key":
            changed = actions.unblock_key(a["target"], g.actor, a["detail"])
        else:
            return jsonify(error="kind must be hostname or key"), 400
    except ValueError as e:
        return jsonify(error=f"cannot unblock {a['target']!r}: {e}"), 400
    return jsonify(ok=True, kind=a["kind"], target=a["target"], was_blocked=changed)
