"""The proxy's admin web app (WSGI): dashboard pages, JSON API, Prometheus metrics.

    create_admin_app(proxy, config=None) -> flask.Flask
    python -m lib.admin hash-password        # prompts; prints a hash for --admin-password-hash

``config`` keys: ``ADMIN_PASSWORD_HASH`` (werkzeug hash: the login password), ``ADMIN_TOKEN``
(bearer token for the JSON API and /metrics), ``DATA_DIR`` (where the session secret is kept),
``ADMIN_USER`` (the name the audit log shows for dashboard actions, default "admin").

Access:
- ``/healthz`` is open. Everything else needs a login session (form at ``/login``, a signed
  cookie valid SESSION_HOURS) or ``Authorization: Bearer <ADMIN_TOKEN>`` (API and /metrics).
- With no password hash configured the pages refuse to serve and say how to set one (a
  generated password would change on each restart and end up in logs); the bearer token still
  works for the API when set.
- Every state-changing request from a session carries the session's CSRF token (form field
  ``csrf_token`` or header ``X-CSRF-Token``); bearer requests carry no cookie, so need none.
- The session secret is created once in the data dir (``admin-secret``, mode 0600), so logins
  survive restarts; delete the file to log everyone out.

Pages: ``/`` (overview), ``/h/<protocol>/<name>`` (one bound name), ``/tunnels``, ``/blocks``
(blocks and audit log). They render a shell and poll the JSON API every 2 s.

JSON API (all GET unless marked)::

    /api/status                        full registry snapshot (legacy; tests and scripts)
    /api/overview                      proxy-wide state and throughput chart
    /api/hostnames?q=&protocol=&sort=&order=&page=&per_page=
    /api/hostnames/<protocol>/<name>   one name: tunnels, chart, blocked
    /api/tunnels?q=&sort=&order=&page=&per_page=
    /api/blocks                        blocked hostnames and keys
    /api/audit?limit=
    POST /api/tunnels/<id>/disconnect
    POST /api/block     {"kind": "hostname"|"key", "target": ..., "detail": ...}
    POST /api/unblock   {"kind": "hostname"|"key", "target": ..., "detail": ...}
    /metrics                           Prometheus text format (lib.admin.metrics)
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import sys
import time
from collections import OrderedDict
from datetime import timedelta
from functools import wraps
from urllib.parse import urlparse

from flask import (Flask, abort, g, jsonify, redirect, render_template, request, session,
                   url_for)
from werkzeug.security import check_password_hash, generate_password_hash

from lib.admin import dashboard
from lib.admin.metrics import metrics_registry, render as render_metrics

log = logging.getLogger("shroud.admin")

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET_FILE = "admin-secret"
# An operator's working day; after it the login form asks again.
SESSION_HOURS = 12
# Failed logins allowed per minute and client: a person mistyping never meets it, a guesser
# is held to ~30k guesses a day on top of the hash's own cost; all clients together get ten
# times that, so a crowd cannot brute-force quickly and one guesser cannot lock the operator out.
LOGIN_FAILURES_PER_MINUTE = 20
MAX_THROTTLED_CLIENTS = 4096  # LRU of clients with recent failures: bounded memory
# The audit text an operator may attach to an action: a sentence, not a document.
MAX_DETAIL = 500
# The largest JSON body an action takes: target + detail fit easily.
MAX_ACTION_BODY = 4096


def _load_secret(data_dir: str | None) -> bytes:
    """The session-signing key, created once in the data dir so sessions survive restarts."""
    if not data_dir:
        return secrets.token_bytes(32)
    path = os.path.join(data_dir, SECRET_FILE)
    try:
        with open(path, "rb") as f:
            key = bytes.fromhex(f.read().decode("ascii").strip())
        if len(key) >= 32:
            return key
        log.warning("%s is too short; writing a new admin secret", path)
    except FileNotFoundError:
        pass
    except (ValueError, UnicodeDecodeError):
        log.warning("%s is not hex; writing a new admin secret", path)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(path + ".tmp", path)
    return key


def _valid_hash(value: str | None) -> bool:
    # werkzeug's format: "method$salt$hash", e.g. "scrypt:32768:8:1$...$..."
    return bool(value) and value.count("$") == 2


class _Window:
    """Failures in a rolling minute, at most ``limit`` remembered."""

    __slots__ = ("limit", "times")

    def __init__(self, limit: int):
        self.limit = limit
        self.times: list[float] = []

    def full(self, now: float) -> bool:
        self.times = [t for t in self.times if now - t < 60.0]
        return len(self.times) >= self.limit

    def add(self, now: float) -> None:
        self.times.append(now)
        del self.times[:-self.limit]


class _LoginThrottle:
    """Failed logins limited per client (LOGIN_FAILURES_PER_MINUTE each) and in all (ten times
    that): one guesser cannot lock the operator out, many cannot brute-force quickly.
    Clients are remembered in a bounded LRU (MAX_THROTTLED_CLIENTS)."""

    def __init__(self, limit: int = LOGIN_FAILURES_PER_MINUTE, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self.clients: OrderedDict[str, _Window] = OrderedDict()
        self.overall = _Window(limit * 10)

    def allowed(self, client: str = "") -> bool:
        now = self.clock()
        window = self.clients.get(client)
        return not self.overall.full(now) and not (window is not None and window.full(now))

    def failed(self, client: str = "") -> None:
        now = self.clock()
        window = self.clients.pop(client, None) or _Window(self.limit)
        window.add(now)
        self.clients[client] = window
        while len(self.clients) > MAX_THROTTLED_CLIENTS:
            self.clients.popitem(last=False)
        self.overall.add(now)


def create_admin_app(proxy, config: dict | None = None) -> Flask:
    config = dict(config or {})
    app = Flask("shroud_proxy", template_folder=os.path.join(HERE, "..", "..", "templates"),
                static_folder=os.path.join(HERE, "static"), static_url_path="/static")
    password_hash = config.get("ADMIN_PASSWORD_HASH") or None
    token = config.get("ADMIN_TOKEN") or None
    user = config.get("ADMIN_USER") or "admin"
    hash_problem = None
    if password_hash and not _valid_hash(password_hash):
        hash_problem = ("the configured admin password hash is not a werkzeug hash "
                        "(method$salt$hash)")
        log.error("dashboard login disabled: %s", hash_problem)
        password_hash = None
    elif not password_hash:
        log.warning("dashboard login disabled: no admin password hash; create one with "
                    "`python -m lib.admin hash-password` and pass it as "
                    "--admin-password-hash or SHROUD_ADMIN_PASSWORD_HASH")
    app.config.update(
        SECRET_KEY=_load_secret(config.get("DATA_DIR")),
        SESSION_COOKIE_NAME="shroud_admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=bool(config.get("SESSION_COOKIE_SECURE", False)),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        MAX_CONTENT_LENGTH=64 * 1024,  # login form and action bodies are tiny
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.config.update({k: v for k, v in config.items() if k.isupper()})
    throttle = _LoginThrottle()
    prom = metrics_registry(proxy)

    # --- authentication -------------------------------------------------------------------

    def current_actor() -> str | None:
        """Who is asking: the session's user, "api-token", or None."""
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
            if token and hmac.compare_digest(given.encode(), token.encode()):
                g.via = "token"
                return "api-token"
            return None
        if password_hash and session.get("user") and \
                time.time() - session.get("login_at", 0) < SESSION_HOURS * 3600:
            g.via = "session"
            return session["user"]
        return None

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return session["csrf"]

    def csrf_ok() -> bool:
        given = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
        want = session.get("csrf") or ""
        return bool(want) and hmac.compare_digest(given.encode(), want.encode())

    app.jinja_env.globals["csrf_token"] = csrf_token

    def page(view):
        """A dashboard page: a login session, else the login form (or the setup page)."""
        @wraps(view)
        def wrapper(*a, **kw):
            if password_hash is None:
                return render_template("setup.html", problem=hash_problem), 503
            g.actor = current_actor()
            if g.actor is None or g.get("via") != "session":
                return redirect(url_for("login", next=request.full_path.rstrip("?")))
            return view(*a, **kw)
        return wrapper

    def api(view):
        """A JSON endpoint: session or bearer token; CSRF checked on session writes."""
        @wraps(view)
        def wrapper(*a, **kw):
            g.actor = current_actor()
            if g.actor is None:
                how = ("log in at /login or send Authorization: Bearer <token>"
                       if password_hash or token else
                       "no admin password hash or token is configured on this proxy")
                r = jsonify(error=f"authentication required: {how}")
                r.status_code = 401
                r.headers["WWW-Authenticate"] = 'Bearer realm="shroud"'
                return r
            if request.method == "POST" and g.get("via") == "session" and not csrf_ok():
                return jsonify(error="CSRF token missing or wrong: reload the page"), 403
            try:
                return view(*a, **kw)
            except dashboard.QueryError as e:
                return jsonify(error=str(e)), 400
        return wrapper

    @app.after_request
    def headers(resp):
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        # Everything is served by the proxy itself; nothing inline but the chart's styles.
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
            "form-action 'self'; base-uri 'none'")
        return resp

    # --- open -----------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    def login_client() -> str:
        # Behind a platform's router (one-port mode) every request comes from the router: the
        # router's X-Forwarded-For names the client. Forging it only buys a fresh per-client
        # window; the overall cap still holds.
        fwd = request.headers.get("X-Forwarded-For", "")
        return (fwd.rsplit(",", 1)[-1].strip() if fwd else "") or (request.remote_addr or "")

    @app.route("/login", methods=["GET", "POST"])
    def login():
        if password_hash is None:
            return render_template("setup.html", problem=hash_problem), 503
        nxt = request.values.get("next") or "/"
        target = urlparse(nxt)
        if target.scheme or target.netloc or not nxt.startswith("/"):
            nxt = "/"  # never redirect off this site after login
        error = None
        status = 200
        if request.method == "POST":
            if not csrf_ok():
                error, status = "The form expired; please try again.", 400
            elif not throttle.allowed(login_client()):
                error, status = "Too many failed logins; wait a minute.", 429
            elif (check_password_hash(password_hash, request.form.get("password", ""))
                  and hmac.compare_digest(request.form.get("username", ""), user)):
                # (the hash is checked first, always: timing does not reveal the user name)
                session.clear()
                session.permanent = True
                session["user"] = user
                session["login_at"] = time.time()
                session["csrf"] = secrets.token_urlsafe(32)
                log.info("dashboard login by %s from %s", user, request.remote_addr)
                return redirect(nxt)
            else:
                throttle.failed(login_client())
                log.warning("failed dashboard login from %s", request.remote_addr)
                error, status = "Wrong user name or password.", 401
        return render_template("login.html", error=error, next=nxt, user=user), status

    @app.post("/logout")
    def logout():
        if session.get("user") and not csrf_ok():
            abort(403)
        session.clear()
        return redirect(url_for("login"))

    # --- pages ----------------------------------------------------------------------------

    @app.get("/")
    @page
    def overview_page():
        return render_template("overview.html", page="overview", proxy_name=proxy.config.hostname)

    @app.get("/h/<protocol>/<path:name>")
    @page
    def hostname_page(protocol, name):
        return render_template("hostname.html", page="hostname", protocol=protocol, name=name,
                               proxy_name=proxy.config.hostname)

    @app.get("/tunnels")
    @page
    def tunnels_page():
        return render_template("tunnels.html", page="tunnels", proxy_name=proxy.config.hostname)

    @app.get("/blocks")
    @page
    def blocks_page():
        return render_template("blocks.html", page="blocks", proxy_name=proxy.config.hostname)

    # --- JSON API -------------------------------------------------------------------------

    @app.get("/api/status")
    @api
    def status():
        snap = proxy.registry.snapshot()
        snap["fingerprint"] = proxy.fingerprint
        return jsonify(snap)

    @app.get("/api/overview")
    @api
    def api_overview():
        return jsonify(dashboard.overview(proxy))

    @app.get("/api/hostnames")
    @api
    def api_hostnames():
        a = request.args
        return jsonify(dashboard.query_bindings(
            proxy.registry, q=a.get("q", ""), protocol=a.get("protocol", ""),
            sort=a.get("sort", "name"), order=a.get("order", "asc"), page=a.get("page"),
            per_page=a.get("per_page")))

    @app.get("/api/hostnames/<protocol>/<path:name>")
    @api
    def api_hostname(protocol, name):
        d = dashboard.binding_detail(proxy, protocol, name)
        blocked = dashboard.blocked_state(proxy.store, name=name)
        if d is None:
            return jsonify(name=name, protocol=protocol, bound=False, blocked=blocked,
                           error=f"{name} is not bound now"), 404
        d["bound"] = True
        d["blocked"] = blocked
        d["owner_blocked"] = bool(d["owner"]) and dashboard.blocked_state(proxy.store,
                                                                          key=d["owner"])
        return jsonify(d)

    @app.get("/api/tunnels")
    @api
    def api_tunnels():
        a = request.args
        return jsonify(dashboard.query_tunnels(
            proxy.registry, q=a.get("q", ""), sort=a.get("sort", "connected_at"),
            order=a.get("order", "desc"), page=a.get("page"), per_page=a.get("per_page")))

    @app.get("/api/blocks")
    @api
    def api_blocks():
        return jsonify(dashboard.blocks(proxy.store))

    @app.get("/api/audit")
    @api
    def api_audit():
        try:
            limit = int(request.args.get("limit", 200))
        except ValueError:
            raise dashboard.QueryError("limit must be an integer") from None
        return jsonify(items=dashboard.audit(proxy.store, limit))

    def action_args() -> dict:
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

    @app.post("/api/tunnels/<int:tunnel_id>/disconnect")
    @api
    def api_disconnect(tunnel_id):
        detail = action_args()["detail"]
        if not proxy.disconnect_tunnel(tunnel_id, g.actor, detail):
            return jsonify(error=f"no live tunnel {tunnel_id}"), 404
        return jsonify(ok=True, tunnel=tunnel_id)

    @app.post("/api/block")
    @api
    def api_block():
        a = action_args()
        try:
            if a["kind"] == "hostname":
                dropped = proxy.block_hostname(a["target"], g.actor, a["detail"])
                return jsonify(ok=True, kind="hostname", target=a["target"],
                               bindings_dropped=dropped)
            if a["kind"] == "key":
                cut = proxy.block_key(a["target"], g.actor, a["detail"])
                return jsonify(ok=True, kind="key", target=a["target"],
                               tunnels_disconnected=cut)
        except ValueError as e:
            return jsonify(error=f"cannot block {a['target']!r}: {e}"), 400
        return jsonify(error="kind must be hostname or key"), 400

    @app.post("/api/unblock")
    @api
    def api_unblock():
        a = action_args()
        try:
            if a["kind"] == "hostname":
                changed = proxy.unblock_hostname(a["target"], g.actor, a["detail"])
            elif a["kind"] == "key":
                changed = proxy.unblock_key(a["target"], g.actor, a["detail"])
            else:
                return jsonify(error="kind must be hostname or key"), 400
        except ValueError as e:
            return jsonify(error=f"cannot unblock {a['target']!r}: {e}"), 400
        return jsonify(ok=True, kind=a["kind"], target=a["target"], was_blocked=changed)

    @app.get("/metrics")
    @api
    def metrics():
        body, ctype = render_metrics(prom)
        return body, 200, {"Content-Type": ctype}

    return app


def main(argv: list[str]) -> int:
    if argv[:1] != ["hash-password"]:
        print("usage: python -m lib.admin hash-password   (reads the password, prints a hash "
              "for --admin-password-hash / SHROUD_ADMIN_PASSWORD_HASH)", file=sys.stderr)
        return 2
    import getpass

    if sys.stdin.isatty():
        pw = getpass.getpass("dashboard password: ")
        if pw != getpass.getpass("again: "):
            print("the two passwords differ", file=sys.stderr)
            return 1
    else:
        pw = sys.stdin.readline().rstrip("\n")
    if len(pw) < 8:
        print("use at least 8 characters", file=sys.stderr)
        return 1
    print(generate_password_hash(pw))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
