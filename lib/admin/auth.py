"""Who may use the dashboard: login sessions, the API's bearer token, CSRF, the login throttle.

Public API::

    settings = AuthSettings.from_config(config)   # put in app.extensions[EXTENSION]
    load_secret(data_dir) -> bytes                # the session-signing key, kept in the data dir
    current_actor() -> str | None                 # the session's user, "api-token", or None
    csrf_token() -> str                           # the session's token (a Jinja global)
    csrf_ok() -> bool                             # the request carries this session's token
    page(view), api(view)                         # decorators: a dashboard page, a JSON endpoint
    check_login(form) -> str                      # "ok", "csrf", "throttled" or "wrong"
    start_session(), end_session()                # end_session revokes the session server-side
    login_client() -> str                         # whom the login throttle counts against
    throttle_key(addr) -> str                     # an IPv4 address or an IPv6 /64
    LoginThrottle(limit, clock, data_dir=None)    # failed logins per client and overall
    SessionTable(data_dir, limit, clock)          # the live sessions, kept server-side

With a data dir, the session table and the throttle are kept in files there and re-read when
another process changed them, under an flock for each change: gunicorn's workers (several per
host, lib/proxy/prefork.py) share one login state, so a cookie issued by one worker is good at
every other and a guesser's failures count wherever they land.

A session cookie is signed (Flask) and names a session id; the id must also be in the
:class:`SessionTable`, so logging out (or the table's bound, or expiry) revokes the cookie:
a copy replayed later is refused. ``X-Forwarded-For`` is believed only with
``TRUST_FORWARDED_FOR`` (one-port mode, where the platform's router is the only peer): anywhere
else it is the client's own claim, and keying the throttle on it would give every guess a fresh
window.

Everything here reads its settings from ``current_app.extensions[EXTENSION]``, so the views
and these helpers are module-level and one process may hold several apps (as the tests do).
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps

from flask import current_app, g, jsonify, redirect, render_template, request, session, url_for
from werkzeug.security import check_password_hash

from lib.hostport import client_network
from lib.protocol.httphead import forwarded_client

log = logging.getLogger("shroud.admin")

EXTENSION = "shroud_auth"
SECRET_FILE = "admin-secret"
SESSIONS_FILE = "admin-sessions"
THROTTLE_FILE = "admin-throttle"
# An operator's working day; after it the login form asks again.
SESSION_HOURS = 12
# Failed logins allowed per minute and client: a person mistyping never meets it, a guesser
# is held to ~30k guesses a day on top of the hash's own cost; all clients together get ten
# times that, so a crowd cannot brute-force quickly and one guesser cannot lock the operator out.
LOGIN_FAILURES_PER_MINUTE = 20
OVERALL_FACTOR = 10
MAX_THROTTLED_CLIENTS = 4096  # LRU of clients with recent failures: bounded memory
# Live login sessions kept server-side: an operator's few browsers fit many times over; a
# login loop (it needs the password) cannot grow the table or its file past this. The oldest
# session is logged out first.
MAX_SESSIONS = 64


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
    key = secrets.token_bytes(32)
    _write_private(path, key.hex() + "\n")
    return key


def _write_private(path: str, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by this user only (0600)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class _SharedFile:
    """A JSON file several processes change under an flock and re-read when it changed."""

    def __init__(self, path: str):
        self.path = path
        self.stamp = None

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        return True

    @contextmanager
    def locked(self):
        """Held while a change is read, made and saved; unlocked when the lock file cannot be
        made (the save then fails too, and says so: memory still serves)."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


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

    def __init__(self, limit: int = LOGIN_FAILURES_PER_MINUTE, clock=time.monotonic,
                 data_dir: str | None = None):
        self.limit = limit
        self.clock = clock  # time.monotonic: one clock for every process of the host
        self.clients: OrderedDict[str, _Window] = OrderedDict()
        self.overall = _Window(limit * OVERALL_FACTOR)
        self.forgotten = 0  # clients dropped from the LRU while their window may be open
        self.file = _SharedFile(os.path.join(data_dir, THROTTLE_FILE)) if data_dir else None

    def _refresh(self) -> None:
        if self.file is None or not self.file.changed():
            return
        try:
            with open(self.file.path) as f:
                saved = json.load(f)
            clients = OrderedDict()
            for client, times in saved["clients"]:
                clients[str(client)] = w = _Window(self.limit)
                w.times = [float(t) for t in times][-self.limit:]
            self.clients = clients
            self.overall.times = [float(t) for t in saved["overall"]][-self.overall.limit:]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("%s unreadable (%s): the login throttle starts afresh", self.file.path,
                        e)

    def _save(self) -> None:
        now = self.clock()
        recent = [[c, [t for t in w.times if now - t < 60.0]] for c, w in self.clients.items()]
        data = {"clients": [[c, times] for c, times in recent if times],
                "overall": self.overall.times}
        try:
            _write_private(self.file.path, json.dumps(data))
        except OSError as e:
            log.warning("cannot save the login throttle to %s: %s", self.file.path, e)

    def allowed(self, client: str = "") -> bool:
        self._refresh()
        now = self.clock()
        window = self.clients.get(client)
        return not self.overall.full(now) and not (window is not None and window.full(now))

    def failed(self, client: str = "") -> None:
        if self.file is None:
            self._failed(client)
            return
        with self.file.locked():
            self._refresh()
            self._failed(client)
            self._save()

    def _failed(self, client: str) -> None:
        now = self.clock()
        window = self.clients.pop(client, None) or _Window(self.limit)
        window.add(now)
        self.clients[client] = window
        while len(self.clients) > MAX_THROTTLED_CLIENTS:
            self.clients.popitem(last=False)
            self.forgotten += 1
        self.overall.add(now)


# --- server-side sessions --------------------------------------------------------------------

class SessionTable:
    """The login sessions that are live: what a cookie must name to be accepted.

    Kept as SHA-256 digests of the ids (the cookie holds the id), at most ``limit``, each for
    SESSION_HOURS; persisted in the data dir (SESSIONS_FILE, 0600) so logins survive a restart
    as they did with the signed cookie alone, and a revoked one stays revoked.
    """

    def __init__(self, data_dir: str | None = None, limit: int = MAX_SESSIONS,
                 clock=time.time):
        self.path = os.path.join(data_dir, SESSIONS_FILE) if data_dir else None
        self.limit = limit
        self.clock = clock
        self.live: OrderedDict[str, float] = OrderedDict()  # digest -> login time, oldest first
        self.evicted = 0  # sessions logged out by the bound
        self.file = _SharedFile(self.path) if self.path else None
        self._refresh()

    def _refresh(self) -> None:
        if self.file is not None and self.file.changed():
            self.live.clear()
            self._load()

    @contextmanager
    def _change(self):
        """Re-read, change, save: under the file's lock when there is one."""
        if self.file is None:
            yield
            return
        with self.file.locked():
            self._refresh()
            yield
            self._save()

    @staticmethod
    def _digest(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    def issue(self) -> str:
        """A new session id, now live; the oldest session goes when the table is full."""
        sid = secrets.token_urlsafe(32)
        with self._change():
            self.live[self._digest(sid)] = self.clock()
            while len(self.live) > self.limit:
                self.live.popitem(last=False)
                self.evicted += 1
        return sid

    def valid(self, sid) -> bool:
        if not isinstance(sid, str):
            return False
        self._refresh()
        since = self.live.get(self._digest(sid))
        return since is not None and self.clock() - since < SESSION_HOURS * 3600

    def revoke(self, sid) -> None:
        if not isinstance(sid, str):
            return
        with self._change():
            self.live.pop(self._digest(sid), None)

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path) as f:
                saved = json.load(f)
            now = self.clock()
            items = sorted((float(t), str(d)) for d, t in saved.items())
            self.live.update((d, t) for t, d in items[-self.limit:]
                             if now - t < SESSION_HOURS * 3600)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("%s unreadable (%s): every dashboard session must log in again",
                        self.path, e)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            _write_private(self.path, json.dumps(dict(self.live)))
        except OSError as e:
            # Sessions still work from memory; only a restart would forget (or, for a logout,
            # bring back) what changed since. Said once per change: a login or a logout.
            log.warning("cannot save dashboard sessions to %s: %s", self.path, e)


# --- settings --------------------------------------------------------------------------------

@dataclass
class AuthSettings:
    """The app's credentials and throttle; ``password_hash`` None means logins are off and
    ``problem`` says why (shown on the setup page)."""

    password_hash: str | None
    token: str | None
    user: str = "admin"
    problem: str | None = None
    trust_forwarded_for: bool = False  # one-port mode only: the router appends the client
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    sessions: SessionTable = field(default_factory=SessionTable)

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
                   user=config.get("ADMIN_USER") or "admin", problem=problem,
                   trust_forwarded_for=bool(config.get("TRUST_FORWARDED_FOR")),
                   sessions=SessionTable(config.get("DATA_DIR")),
                   throttle=LoginThrottle(data_dir=config.get("DATA_DIR")))


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
    if s.password_hash and session.get("user") and s.sessions.valid(session.get("sid")):
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
    """Whom a failed login counts against: the socket's peer. Behind the platform's router
    (one-port mode: TRUST_FORWARDED_FOR) every request comes from the router, and the last
    X-Forwarded-For entry, the one the router appended, names the client."""
    peer = throttle_key(request.remote_addr or "")
    if not settings().trust_forwarded_for:
        return peer
    values = request.headers.getlist("X-Forwarded-For")
    forwarded = forwarded_client(values[-1] if values else "")
    return throttle_key(forwarded) if forwarded else peer


def throttle_key(addr: str) -> str:
    """The client a failed login from ``addr`` counts against (lib.hostport.client_network):
    an IPv4 address, or an IPv6 /64. Keyed by the full address, one guesser with one /64 had
    a fresh window per address, and ten of them filled the overall cap: the operator was
    locked out (docs/SECURITY.md, "The dashboard")."""
    return client_network(addr)


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
    log.warning("failed dashboard login from %s", client)
    return "wrong"


def start_session() -> None:
    """A fresh session for the configured user (a new id and CSRF token, nothing of the old)."""
    s = settings()
    session.clear()
    session.permanent = True
    session["user"] = s.user
    session["sid"] = s.sessions.issue()
    session["login_at"] = time.time()
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("dashboard login by %s from %s", s.user, login_client())


def end_session() -> None:
    """Log out: the session id is revoked server-side, so a copy of the cookie is worthless."""
    settings().sessions.revoke(session.get("sid"))
    session.clear()
