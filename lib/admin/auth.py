"""Who may use the dashboard: login sessions, the API's bearer token, CSRF, the login throttle.

Public API::

    settings = AuthSettings.from_config(config)   # put in app.extensions[EXTENSION]
    load_secret(data_dir) -> bytes                # the session-signing key, kept in the data dir
    current_actor() -> str | None                 # the session's user, "api-token", or None
    csrf_token() -> str                           # the session's token (a Jinja global)
    csrf_ok() -> bool                             # the request carries this session's token
    page(view), api(view)                         # decorators: a dashboard page, a JSON endpoint
    check_login(form) -> str                      # "ok", "csrf", "throttled" or "wrong"
    start_session(), end_session()
    login_client() -> str                         # whom the login throttle counts against
    LoginThrottle(limit, clock)                   # failed logins per client and overall

Everything here reads its settings from ``current_app.extensions[EXTENSION]``, so the views
and these helpers are module-level and one process may hold several apps (as the tests do).
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import wraps

from flask import current_app, g, jsonify, redirect, render_template, request, session, url_for
from werkzeug.security import check_password_hash

log = logging.getLogger("shroud.admin")

EXTENSION = "shroud_auth"
SECRET_FILE = "admin-secret"
# An operator's working day; after it the login form asks again.
SESSION_HOURS = 12
# Failed logins allowed per minute and client: a person mistyping never meets it, a guesser
# is held to ~30k guesses a day on top of the hash's own cost; all clients together get ten
# times that, so a crowd cannot brute-force quickly and one guesser cannot lock the operator out.
LOGIN_FAILURES_PER_MINUTE = 20
OVERALL_FACTOR = 10
MAX_THROTTLED_CLIENTS = 4096  # LRU of clients with recent failures: bounded memory


def load_secret(data_dir: str | None) -> bytes:
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


def valid_hash(value: str | None) -> bool:
    # werkzeug's format: "method$salt$hash", e.g. "scrypt:32768:8:1$...$..."
    return bool(value) and value.count("$") == 2


# --- the login throttle ----------------------------------------------------------------------

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


class LoginThrottle:
    """Failed logins limited per client (``limit`` a minute each) and in all (OVERALL_FACTOR
    times that): one guesser cannot lock the operator out, many cannot brute-force quickly.
    Clients are remembered in a bounded LRU (MAX_THROTTLED_CLIENTS)."""

    def __init__(self, limit: int = LOGIN_FAILURES_PER_MINUTE, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self.clients: OrderedDict[str, _Window] = OrderedDict()
        self.overall = _Window(limit * OVERALL_FACTOR)

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


# --- settings --------------------------------------------------------------------------------

@dataclass
class AuthSettings:
    """The app's credentials and throttle; ``password_hash`` None means logins are off and
    ``problem`` says why (shown on the setup page)."""

    password_hash: str | None
    token: str | None
    user: str = "admin"
    problem: str | None = None
    throttle: LoginThrottle = field(default_factory=LoginThrottle)

    @classmethod
    def from_config(cls, config: dict) -> "AuthSettings":
        password_hash = config.get("ADMIN_PASSWORD_HASH") or None
        problem = None
        if password_hash and not valid_hash(password_hash):
            problem = ("the configured admin password hash is not a werkzeug hash "
                       "(method$salt$hash)")
            log.error("dashboard login disabled: %s", problem)
            password_hash = None
        elif not password_hash:
            log.warning("dashboard login disabled: no admin password hash; create one with "
                        "`python -m lib.admin hash-password` and pass it as "
                        "--admin-password-hash or SHROUD_ADMIN_PASSWORD_HASH")
        return cls(password_hash=password_hash, token=config.get("ADMIN_TOKEN") or None,
                   user=config.get("ADMIN_USER") or "admin", problem=problem)


def settings() -> AuthSettings:
    return current_app.extensions[EXTENSION]


# --- who is asking ---------------------------------------------------------------------------

def current_actor() -> str | None:
    """Who is asking: the session's user, "api-token", or None."""
    s = settings()
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = auth[7:].strip()
        if s.token and hmac.compare_digest(given.encode(), s.token.encode()):
            g.via = "token"
            return "api-token"
        return None
    if s.password_hash and session.get("user") and \
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


def setup_page():
    """What every page answers while logins are off: how to turn them on."""
    return render_template("setup.html", problem=settings().problem), 503


def page(view):
    """A dashboard page: a login session, else the login form (or the setup page)."""
    @wraps(view)
    def wrapper(*a, **kw):
        if settings().password_hash is None:
            return setup_page()
        g.actor = current_actor()
        if g.actor is None or g.get("via") != "session":
            return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
        return view(*a, **kw)
    return wrapper


def api(view):
    """A JSON endpoint: session or bearer token; CSRF checked on session writes."""
    @wraps(view)
    def wrapper(*a, **kw):
        g.actor = current_actor()
        if g.actor is None:
            s = settings()
            how = ("log in at /login or send Authorization: Bearer <token>"
                   if s.password_hash or s.token else
                   "no admin password hash or token is configured on this proxy")
            r = jsonify(error=f"authentication required: {how}")
            r.status_code = 401
            r.headers["WWW-Authenticate"] = 'Bearer realm="shroud"'
            return r
        if request.method == "POST" and g.get("via") == "session" and not csrf_ok():
            return jsonify(error="CSRF token missing or wrong: reload the page"), 403
        return view(*a, **kw)
    return wrapper


# --- logging in and out ----------------------------------------------------------------------

def login_client() -> str:
    # Behind a platform's router (one-port mode) every request comes from the router: the
    # router's X-Forwarded-For names the client. Forging it only buys a fresh per-client
    # window; the overall cap still holds.
    fwd = request.headers.get("X-Forwarded-For", "")
    return (fwd.rsplit(",", 1)[-1].strip() if fwd else "") or (request.remote_addr or "")


def check_login(form) -> str:
    """Judge a posted login form: "ok", "csrf" (form expired), "throttled" or "wrong"."""
    s = settings()
    if not csrf_ok():
        return "csrf"
    client = login_client()
    if not s.throttle.allowed(client):
        return "throttled"
    # The hash is checked first, always: timing does not reveal the user name.
    if (check_password_hash(s.password_hash, form.get("password", ""))
            and hmac.compare_digest(form.get("username", ""), s.user)):
        return "ok"
    s.throttle.failed(client)
    log.warning("failed dashboard login from %s", request.remote_addr)
    return "wrong"


def start_session() -> None:
    """A fresh session for the configured user (a new CSRF token, nothing of the old one)."""
    user = settings().user
    session.clear()
    session.permanent = True
    session["user"] = user
    session["login_at"] = time.time()
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("dashboard login by %s from %s", user, request.remote_addr)


def end_session() -> None:
    session.clear()
