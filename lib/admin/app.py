"""The proxy's admin web app (WSGI): dashboard pages, JSON API, Prometheus metrics.

    create_admin_app(proxy, config=None) -> flask.Flask    # the application factory
    python -m lib.admin hash-password        # prompts; prints a hash for --admin-password-hash

The app is assembled here from parts that can be imported and tested alone:
lib/admin/auth.py (sessions, bearer token, CSRF, login throttle), lib/admin/views.py (the
Blueprint: pages, JSON API, /metrics), lib/admin/dashboard.py (read-only queries over the live
state), lib/admin/metrics.py (Prometheus). The factory hands them the proxy's live state in
``app.extensions`` (``views.Live``: registry, store, name, fingerprint, operator actions); the
app reads it and never owns it.

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
(blocks and audit log), ``/fleet`` (every instance sharing the store, and the names bound
anywhere). They render a shell and poll the JSON API every 2 s.

JSON API (all GET unless marked)::

    /api/status                        full registry snapshot (legacy; tests and scripts)
    /api/overview                      proxy-wide state and throughput chart
    /api/hostnames?q=&protocol=&sort=&order=&page=&per_page=
    /api/hostnames/<protocol>/<name>   one name: tunnels, chart, blocked
    /api/tunnels?q=&sort=&order=&page=&per_page=
    /api/blocks                        blocked hostnames and keys
    /api/audit?limit=
    /api/fleet                         every instance of the fleet and the names bound anywhere
    POST /api/tunnels/<id>/disconnect
    POST /api/block     {"kind": "hostname"|"key", "target": ..., "detail": ...}
    POST /api/unblock   {"kind": "hostname"|"key", "target": ..., "detail": ...}
        # both: 503 {"error": ..., "missing": "store"} on a proxy without an ownership store
    /metrics                           Prometheus text format (lib.admin.metrics)
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

from flask import Flask
from werkzeug.security import generate_password_hash

from lib.admin import auth, views
from lib.admin.auth import SECRET_FILE, SESSION_HOURS  # noqa: F401  (re-exported)
from lib.admin.metrics import metrics_registry

HERE = os.path.dirname(os.path.abspath(__file__))

# Everything is served by the proxy itself; nothing inline but the chart's styles.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'")


def create_admin_app(proxy, config: dict | None = None) -> Flask:
    """The admin app over ``proxy``'s live state (see the module overview for ``config``)."""
    config = dict(config or {})
    app = Flask("shroud_proxy", template_folder=os.path.join(HERE, "..", "..", "templates"),
                static_folder=os.path.join(HERE, "static"), static_url_path="/static")
    app.config.update(
        SECRET_KEY=auth.load_secret(config.get("DATA_DIR")),
        SESSION_COOKIE_NAME="shroud_admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=bool(config.get("SESSION_COOKIE_SECURE", False)),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        MAX_CONTENT_LENGTH=64 * 1024,  # login form and action bodies are tiny
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.config.update({k: v for k, v in config.items() if k.isupper()})
    live = views.Live.of_proxy(proxy)
    live.prom = metrics_registry(live)
    app.extensions[views.EXTENSION] = live
    app.extensions[auth.EXTENSION] = auth.AuthSettings.from_config(config)
    app.jinja_env.globals["csrf_token"] = auth.csrf_token
    app.after_request(security_headers)
    app.register_blueprint(views.bp)
    return app


def security_headers(resp):
    resp.headers.setdefault("Cache-Control", "no-store")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return resp


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
