"""lib.admin.auth alone: what a dashboard user, an API client and a password guesser meet.

A small Flask app wires auth's public API (``page``, ``api``, ``check_login``, ``start_session``,
``end_session``, ``login_client``, ``csrf_token``) into a few routes; the login throttle and the
session table are driven with a settable clock. Fast on purpose (a cheap password hash, no
ProxyServer): ``./scripts/mutation.sh auth`` runs these per mutant (docs/MUTATION.md).
tests/test_admin.py covers the same through the real dashboard.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from email.utils import parsedate_to_datetime

import pytest
from flask import Blueprint, Flask, g, jsonify, request
from werkzeug.security import generate_password_hash

from lib.admin import auth
from lib.admin.auth import (LOGIN_FAILURES_PER_MINUTE, OVERALL_FACTOR, SESSION_HOURS,
                            AuthSettings, LoginThrottle, SessionTable)

PASSWORD = "correct horse battery"
TOKEN = "test-token-0123456789"
# Cheap: the throttle tests fail many logins.
FAST_HASH = generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_000_000.0


def make_app(config: dict) -> Flask:
    app = Flask(__name__, template_folder=os.path.join(ROOT, "templates"),
                static_folder=os.path.join(ROOT, "lib", "admin", "static"))
    app.secret_key = b"s" * 32
    app.extensions[auth.EXTENSION] = AuthSettings.from_config(config)
    app.jinja_env.globals["csrf_token"] = auth.csrf_token
    bp = Blueprint("admin", __name__)

    @bp.route("/login", methods=["GET", "POST"])
    def login():
        if request.method == "GET":
            return auth.csrf_token()
        verdict = auth.check_login(request.form)
        if verdict == "ok":
            auth.start_session()
        return verdict

    @bp.post("/logout")
    def logout():
        auth.end_session()
        return "bye"

    @bp.route("/page")
    @auth.page
    def a_page():
        return "page for %s" % g.actor

    @bp.route("/api", methods=["GET", "POST"])
    @auth.api
    def an_api():
        return jsonify(actor=g.actor, via=g.via)

    @bp.route("/who")
    def who():
        return jsonify(actor=auth.current_actor(), client=auth.login_client())

    app.register_blueprint(bp)
    return app


@pytest.fixture
def config(tmp_path):
    return {"ADMIN_PASSWORD_HASH": FAST_HASH, "ADMIN_TOKEN": TOKEN,
            "DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def app(config):
    return make_app(config)


def settings_of(app) -> AuthSettings:
    return app.extensions[auth.EXTENSION]


def post_login(c, password=PASSWORD, user="admin", addr="10.0.0.1", csrf=True, headers=None):
    env = {"REMOTE_ADDR": addr}
    token = c.get("/login", environ_base=env).get_data(as_text=True)
    form = {"username": user, "password": password}
    if csrf:
        form["csrf_token"] = token
    return c.post("/login", data=form, environ_base=env, headers=headers or {}) \
        .get_data(as_text=True)


def logged_in(app):
    c = app.test_client()
    assert post_login(c) == "ok"
    return c


def bearer(token=TOKEN):
    return {"Authorization": "Bearer " + token}


# --- the session-signing secret --------------------------------------------------------------
def test_secret_without_a_data_dir_is_new_each_time():
    a, b = auth.load_secret(None), auth.load_secret("")
    assert len(a) == 32 and len(b) == 32 and a != b


def test_secret_is_created_once_private_and_reused(tmp_path):
    where = tmp_path / "data"
    key = auth.load_secret(str(where))
    secret = where / "admin-secret"
    assert len(key) == 32 and secret.read_text() == key.hex() + "\n"
    assert secret.stat().st_mode & 0o777 == 0o600 and where.stat().st_mode & 0o777 == 0o700
    assert os.listdir(where) == ["admin-secret"]  # no temporary file left behind
    assert auth.load_secret(str(where)) == key


@pytest.mark.parametrize("content, why", [
    (b"ab" * 31 + b"\n", "too short"), (b"zz" * 32 + b"\n", "not hex"),
    (b"\xff" * 64, "not hex")])
def test_a_bad_secret_is_replaced_and_said_so(tmp_path, caplog, content, why):
    secret = tmp_path / "admin-secret"
    secret.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="shroud.admin")
    key = auth.load_secret(str(tmp_path))
    assert len(key) == 32 and secret.read_text() == key.hex() + "\n"
    assert [r.getMessage() for r in caplog.records] == [
        "%s is %s; writing a new admin secret" % (secret, why)]


def test_a_secret_of_32_bytes_or_more_is_kept(tmp_path):
    secret = tmp_path / "admin-secret"
    for key in (b"\xcd" * 32, b"\xef" * 48):
        secret.write_text(key.hex() + "\n")
        assert auth.load_secret(str(tmp_path)) == key


# --- settings --------------------------------------------------------------------------------
def test_settings_from_config(tmp_path):
    s = AuthSettings.from_config({"ADMIN_PASSWORD_HASH": FAST_HASH, "ADMIN_TOKEN": "t0k",
                                  "ADMIN_USER": "ops", "TRUST_FORWARDED_FOR": 1,
                                  "DATA_DIR": str(tmp_path)})
    assert (s.password_hash, s.token, s.user, s.problem, s.trust_forwarded_for) == \
        (FAST_HASH, "t0k", "ops", None, True)
    assert s.sessions.path == str(tmp_path / "admin-sessions")
    assert s.throttle.file.path == str(tmp_path / "admin-throttle")
    blank = AuthSettings.from_config({"ADMIN_PASSWORD_HASH": "", "ADMIN_TOKEN": "",
                                      "ADMIN_USER": ""})
    assert (blank.password_hash, blank.token, blank.user, blank.problem,
            blank.trust_forwarded_for) == (None, None, "admin", None, False)
    assert blank.sessions.path is None and blank.throttle.file is None


def test_no_hash_or_a_bad_hash_turns_logins_off_and_says_how(caplog):
    caplog.set_level(logging.WARNING, logger="shroud.admin")
    assert AuthSettings.from_config({}).password_hash is None
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.records[-1].getMessage() == (
        "dashboard login disabled: no admin password hash; create one with `python -m "
        "lib.admin hash-password` and pass it as --admin-password-hash or "
        "SHROUD_ADMIN_PASSWORD_HASH")
    problem = "the configured admin password hash is not a werkzeug hash (method$salt$hash)"
    for bad in ("plaintext", "m$only-two", "m$s$h$extra"):
        s = AuthSettings.from_config({"ADMIN_PASSWORD_HASH": bad})
        assert (s.password_hash, s.problem) == (None, problem)
        assert caplog.records[-1].levelno == logging.ERROR
        assert caplog.records[-1].getMessage() == "dashboard login disabled: " + problem
    assert auth.valid_hash("m$s$h") and not auth.valid_hash("") and not auth.valid_hash(None)


# --- the login throttle ----------------------------------------------------------------------
def test_a_client_has_limit_failures_in_a_rolling_minute():
    now = [T0]
    t = LoginThrottle(limit=3, clock=lambda: now[0])
    for step in range(3):
        assert t.allowed("a")
        now[0] = T0 + 10 * step
        t.failed("a")
    assert not t.allowed("a") and t.allowed("b")
    now[0] = T0 + 59.9
    assert not t.allowed("a")
    now[0] = T0 + 60.0  # the first failure is a minute old
    assert t.allowed("a")
    t.failed("a")
    assert not t.allowed("a")


def test_the_default_client_is_one_client():
    t = LoginThrottle(limit=2, clock=lambda: T0)
    t.failed()
    t.failed()
    assert not t.allowed() and t.allowed("other")


def test_default_limits_per_client_and_overall():
    t = LoginThrottle(clock=lambda: T0)
    assert (LOGIN_FAILURES_PER_MINUTE, OVERALL_FACTOR) == (20, 10)
    for n in range(10):
        for _ in range(19):
            t.failed("10.0.0.%d" % n)
        assert t.allowed("10.0.0.%d" % n)
        t.failed("10.0.0.%d" % n)
        assert not t.allowed("10.0.0.%d" % n)
    assert not t.allowed("192.0.2.1")  # 200 failures in all: everyone waits


def test_overall_cap_counts_every_client_and_rolls_too():
    now = [T0]
    t = LoginThrottle(limit=2, clock=lambda: now[0])
    for n in range(19):
        t.failed("client-%d" % n)  # one failure each: no client is at its own limit
    assert t.allowed("fresh")
    t.failed("client-19")
    assert not t.allowed("fresh") and not t.allowed("client-0")
    now[0] += 60.0
    assert t.allowed("fresh")


def test_windows_remember_at_most_their_limit():
    """A guesser cannot grow the throttle's memory: each window keeps its newest ``limit``."""
    now = [T0]
    t = LoginThrottle(limit=3, clock=lambda: now[0])
    for n in range(50):
        now[0] = T0 + n * 0.01
        t.failed("a")
    assert t.clients["a"].times == [T0 + 0.47, T0 + 0.48, T0 + 0.49]
    assert len(t.overall.times) == 30 and t.overall.times[-1] == T0 + 0.49


def test_the_client_table_forgets_the_least_recent_guesser(monkeypatch):
    monkeypatch.setattr(auth, "MAX_THROTTLED_CLIENTS", 3)
    t = LoginThrottle(limit=1, clock=lambda: T0)
    for client in ("a", "b", "c", "a", "d"):  # "a" failed again: it is recent
        t.failed(client)
    assert list(t.clients) == ["c", "a", "d"] and t.forgotten == 1
    assert t.allowed("b") and not t.allowed("a")


def test_workers_share_the_throttle_through_the_data_dir(tmp_path):
    now = [T0]
    one = LoginThrottle(limit=2, clock=lambda: now[0], data_dir=str(tmp_path))
    two = LoginThrottle(limit=2, clock=lambda: now[0], data_dir=str(tmp_path))
    one.failed("a")
    two.failed("a")  # re-reads one's failure before adding its own
    assert not one.allowed("a") and not two.allowed("a")
    saved = tmp_path / "admin-throttle"
    assert json.loads(saved.read_text()) == {"clients": [["a", [T0, T0]]], "overall": [T0, T0]}
    assert saved.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "admin-throttle.lock").stat().st_mode & 0o777 == 0o600
    now[0] += 60
    one.failed("b")  # a's failures are a minute old: not written again
    assert json.loads(saved.read_text())["clients"] == [["b", [T0 + 60]]]
    restarted = LoginThrottle(limit=2, clock=lambda: now[0], data_dir=str(tmp_path))
    restarted.failed("b")
    assert not restarted.allowed("b") and restarted.allowed("a")


def test_a_saved_throttle_is_read_within_its_bounds(tmp_path):
    (tmp_path / "admin-throttle").write_text(json.dumps(
        {"clients": [["a", [T0 + n for n in range(50)]], [7, [T0]]],
         "overall": [T0 + n for n in range(500)]}))
    t = LoginThrottle(limit=2, clock=lambda: T0 + 50, data_dir=str(tmp_path))
    assert not t.allowed("a") and not t.allowed("7")
    assert t.clients["a"].times == [T0 + 48, T0 + 49]
    assert t.overall.times == [T0 + n for n in range(480, 500)]


@pytest.mark.parametrize("content", ["{", '{"clients": 5, "overall": []}', "{}",
                                     '{"clients": [["a", ["x"]]], "overall": []}'])
def test_a_damaged_throttle_file_starts_afresh(tmp_path, caplog, content):
    saved = tmp_path / "admin-throttle"
    saved.write_text(content)
    caplog.set_level(logging.WARNING, logger="shroud.admin")
    t = LoginThrottle(limit=1, clock=lambda: T0, data_dir=str(tmp_path))
    assert t.allowed("a")
    message = caplog.records[0].getMessage()
    assert message.startswith("%s unreadable (" % saved)
    assert message.endswith("): the login throttle starts afresh")
    assert "(None)" not in message  # the reason is named
    t.failed("a")
    assert not t.allowed("a")


def test_an_unwritable_throttle_counts_in_memory_and_says_so(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the data dir should be
    caplog.set_level(logging.WARNING, logger="shroud.admin")
    t = LoginThrottle(limit=1, clock=lambda: T0, data_dir=str(blocker / "data"))
    t.failed("a")
    assert not t.allowed("a")
    assert caplog.records[0].getMessage().startswith(
        "cannot save the login throttle to %s: " % (blocker / "data" / "admin-throttle"))
    assert caplog.records[0].getMessage().endswith("Not a directory: '%s'" % (blocker / "data"))


def test_a_failed_save_keeps_counting_in_memory(tmp_path, caplog):
    """The file is re-read only when another worker changed it: a save that failed does not
    make this worker forget the failure by re-reading the older file."""
    t = LoginThrottle(limit=1, clock=lambda: T0, data_dir=str(tmp_path))
    t.failed("other")  # the file exists now
    (tmp_path / "admin-throttle.tmp").mkdir()  # the next save cannot write
    t.failed("a")
    assert not t.allowed("a")


# --- server-side sessions --------------------------------------------------------------------
def test_a_session_lives_twelve_hours():
    now = [T0]
    table = SessionTable(clock=lambda: now[0])
    sid = table.issue()
    assert len(sid) >= 43 and sid != table.issue()  # 32 random bytes, base64
    now[0] = T0 + SESSION_HOURS * 3600 - 0.5
    assert table.valid(sid)
    now[0] = T0 + SESSION_HOURS * 3600
    assert not table.valid(sid)


def test_only_issued_string_ids_are_valid():
    table = SessionTable()
    sid = table.issue()
    for forged in (None, 7, sid.encode(), "", sid + "x"):
        assert not table.valid(forged)
        table.revoke(forged)  # harmless
    assert table.valid(sid)
    table.revoke(sid)
    assert not table.valid(sid)


def test_the_table_holds_64_sessions_by_default():
    now = [T0]
    table = SessionTable(clock=lambda: now[0])
    sids = []
    for n in range(65):
        now[0] = T0 + n
        sids.append(table.issue())
    assert not table.valid(sids[0]) and table.valid(sids[1]) and table.valid(sids[64])
    assert table.evicted == 1 and len(table.live) == 64


def test_workers_share_logins_and_logouts(tmp_path):
    one, two = SessionTable(str(tmp_path)), SessionTable(str(tmp_path))
    a = one.issue()
    b = two.issue()  # two re-reads before adding: a is not lost
    assert one.valid(a) and one.valid(b) and two.valid(a) and two.valid(b)
    two.revoke(a)
    assert not one.valid(a) and one.valid(b)
    saved = tmp_path / "admin-sessions"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert a not in saved.read_text() and b not in saved.read_text()  # digests, not ids


def test_a_restart_loads_the_newest_live_sessions(tmp_path):
    now = [T0]
    table = SessionTable(str(tmp_path), limit=5, clock=lambda: now[0])
    sids = []
    for n in range(5):
        now[0] = T0 + n * 3600  # one an hour
        sids.append(table.issue())
    now[0] = T0 + SESSION_HOURS * 3600 + 1  # the first has expired
    restarted = SessionTable(str(tmp_path), limit=3, clock=lambda: now[0])
    assert len(restarted.live) == 3
    assert [restarted.valid(s) for s in sids] == [False, False, True, True, True]
    all_live = SessionTable(str(tmp_path), limit=5, clock=lambda: now[0])
    assert len(all_live.live) == 4  # the expired one is not loaded


@pytest.mark.parametrize("content", ["{", "[1, 2]", '{"d": "x"}'])
def test_a_damaged_sessions_file_logs_everyone_out(tmp_path, caplog, content):
    saved = tmp_path / "admin-sessions"
    saved.write_text(content)
    caplog.set_level(logging.WARNING, logger="shroud.admin")
    table = SessionTable(str(tmp_path))
    assert len(table.live) == 0
    message = caplog.records[0].getMessage()
    assert message.startswith("%s unreadable (" % saved)
    assert message.endswith("): every dashboard session must log in again")
    assert "(None)" not in message  # the reason is named
    assert table.valid(table.issue())


def test_an_unwritable_sessions_file_serves_from_memory_and_says_so(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    caplog.set_level(logging.WARNING, logger="shroud.admin")
    table = SessionTable(str(blocker / "data"))
    sid = table.issue()
    assert table.valid(sid)
    assert caplog.records[0].getMessage().startswith(
        "cannot save dashboard sessions to %s: " % (blocker / "data" / "admin-sessions"))
    assert caplog.records[0].getMessage().endswith("Not a directory: '%s'" % (blocker / "data"))


# --- who is asking ---------------------------------------------------------------------------
def test_the_bearer_token_is_the_api_token(app):
    c = app.test_client()
    assert c.get("/api", headers=bearer()).json == {"actor": "api-token", "via": "token"}
    assert c.get("/api", headers={"Authorization": "Bearer  %s  " % TOKEN}).status_code == 200
    for wrong in ("Bearer nope", "Bearer " + TOKEN + "x", "Bearer", "bearer " + TOKEN,
                  "Basic " + TOKEN, TOKEN):
        assert c.get("/api", headers={"Authorization": wrong}).status_code == 401, wrong


def test_without_a_configured_token_no_bearer_is_accepted(config):
    c = make_app(dict(config, ADMIN_TOKEN="")).test_client()
    assert c.get("/api", headers={"Authorization": "Bearer "}).status_code == 401
    assert c.get("/api", headers={"Authorization": "Bearer None"}).status_code == 401


def test_a_wrong_bearer_is_not_rescued_by_a_session(app):
    c = logged_in(app)
    assert c.get("/api").json == {"actor": "admin", "via": "session"}
    assert c.get("/api", headers=bearer("nope")).status_code == 401


def test_a_session_needs_the_user_and_a_live_id(app):
    c = app.test_client()
    sid = settings_of(app).sessions.issue()
    with c.session_transaction() as s:
        s["sid"] = sid  # a signed cookie naming no user
    assert c.get("/who").json["actor"] is None
    with c.session_transaction() as s:
        s["user"], s["sid"] = "admin", "not-issued"
    assert c.get("/who").json["actor"] is None
    with c.session_transaction() as s:
        s["sid"] = sid
    assert c.get("/who").json["actor"] == "admin"


def test_sessions_end_when_the_password_is_removed(config):
    """The same secret and data dir without a password hash: an old cookie is worthless."""
    c = logged_in(make_app(config))
    cookie = c.get_cookie("session").value
    later = make_app(dict(config, ADMIN_PASSWORD_HASH="")).test_client()
    later.set_cookie("session", cookie)
    assert later.get("/who").json["actor"] is None
    assert later.get("/api").status_code == 401


def test_secrets_are_compared_in_constant_time(app, monkeypatch):
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append(b)
        return real(a, b)
    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    c = app.test_client()
    c.get("/api", headers=bearer("nope"))
    assert TOKEN.encode() in compared
    form_token = c.get("/login").get_data(as_text=True)
    assert c.post("/login", data={"username": "admin", "password": PASSWORD,
                                  "csrf_token": form_token}).get_data(as_text=True) == "ok"
    # the form's CSRF token and the user name (werkzeug compares the hash its own way)
    assert form_token.encode() in compared and "admin" in compared
    del compared[:]
    csrf = c.get("/login").get_data(as_text=True)  # the session's new token
    c.post("/api", headers={"X-CSRF-Token": csrf})
    assert csrf.encode() in compared  # (itsdangerous compares the cookie's signature too)


# --- pages and the API -----------------------------------------------------------------------
def test_pages_need_a_session_not_a_token(app):
    c = app.test_client()
    r = c.get("/page?x=1")
    assert r.status_code == 302 and r.headers["Location"] == "/login?next=/page?x%3D1"
    assert c.get("/page").headers["Location"] == "/login?next=/page"
    assert c.get("/page", headers=bearer()).status_code == 302
    c = logged_in(app)
    r = c.get("/page")
    assert r.status_code == 200 and r.get_data(as_text=True) == "page for admin"


def test_without_a_password_hash_pages_show_how_to_set_one(config):
    c = make_app(dict(config, ADMIN_PASSWORD_HASH="")).test_client()
    r = c.get("/page")
    assert r.status_code == 503 and b"lib.admin hash-password" in r.data
    assert b"not a werkzeug hash" not in r.data
    bad = make_app(dict(config, ADMIN_PASSWORD_HASH="plaintext")).test_client().get("/page")
    assert bad.status_code == 503 and b"not a werkzeug hash (method$salt$hash)." in bad.data
    assert c.get("/api", headers=bearer()).status_code == 200  # the token still works


@pytest.mark.parametrize("hash_, token, how", [
    (FAST_HASH, TOKEN, "log in at /login or send Authorization: Bearer <token>"),
    ("", TOKEN, "log in at /login or send Authorization: Bearer <token>"),
    (FAST_HASH, "", "log in at /login or send Authorization: Bearer <token>"),
    ("", "", "no admin password hash or token is configured on this proxy")])
def test_the_api_says_how_to_authenticate(config, hash_, token, how):
    c = make_app(dict(config, ADMIN_PASSWORD_HASH=hash_, ADMIN_TOKEN=token)).test_client()
    r = c.get("/api")
    assert r.status_code == 401 and r.json == {"error": "authentication required: " + how}
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="shroud"'


def test_session_writes_need_the_csrf_token_token_writes_do_not(app):
    c = logged_in(app)
    csrf = c.get("/login").get_data(as_text=True)
    r = c.post("/api")
    assert r.status_code == 403
    assert r.json == {"error": "CSRF token missing or wrong: reload the page"}
    assert c.post("/api", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert c.post("/api", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert c.post("/api", data={"csrf_token": csrf}).status_code == 200
    assert c.get("/api").status_code == 200  # reads need none
    assert app.test_client().post("/api", headers=bearer()).status_code == 200


def test_an_empty_csrf_token_never_matches(app):
    c = app.test_client()
    with c.session_transaction() as s:
        s["user"], s["sid"] = "admin", settings_of(app).sessions.issue()  # no CSRF token yet
    assert c.post("/api", headers={"X-CSRF-Token": ""}).status_code == 403
    assert c.post("/api", data={"csrf_token": ""}).status_code == 403


def test_the_csrf_token_is_one_per_session(app):
    c = app.test_client()
    first = c.get("/login").get_data(as_text=True)
    assert len(first) >= 43 and c.get("/login").get_data(as_text=True) == first
    assert app.test_client().get("/login").get_data(as_text=True) != first


# --- logging in and out ----------------------------------------------------------------------
def test_login_verdicts_and_what_counts_as_a_failure(app, caplog):
    throttle = settings_of(app).throttle
    caplog.set_level(logging.WARNING, logger="shroud.admin")
    c = app.test_client()
    assert post_login(c, csrf=False) == "csrf"
    assert post_login(c, password="nope", csrf=False) == "csrf"
    assert throttle.clients == {}  # a stale form is no guess
    assert post_login(c, password="nope") == "wrong"
    assert post_login(c, user="root") == "wrong"  # the right password for another user
    env = {"REMOTE_ADDR": "10.0.0.1"}
    assert c.post("/login", data={"csrf_token": c.get("/login").get_data(as_text=True)},
                  environ_base=env).get_data(as_text=True) == "wrong"  # nothing filled in
    form = {"password": PASSWORD, "csrf_token": c.get("/login").get_data(as_text=True)}
    assert c.post("/login", data=form, environ_base=env).get_data(as_text=True) == "wrong"
    assert len(throttle.clients["10.0.0.1"].times) == 4
    assert post_login(c) == "ok"
    assert len(throttle.clients["10.0.0.1"].times) == 4  # success is not counted
    assert [r.getMessage() for r in caplog.records] == \
        ["failed dashboard login from 10.0.0.1"] * 4


def test_a_throttled_client_is_refused_even_the_right_password(app):
    c = app.test_client()
    for _ in range(LOGIN_FAILURES_PER_MINUTE):
        assert post_login(c, password="nope") == "wrong"
    assert post_login(c) == "throttled"
    assert post_login(c, csrf=False) == "csrf"  # the form is checked first
    assert post_login(app.test_client(), addr="10.0.0.2") == "ok"  # another client


def test_a_login_starts_a_fresh_session(config, caplog):
    app = make_app(dict(config, ADMIN_USER="ops"))
    c = app.test_client()
    with c.session_transaction() as s:
        s["stale"] = "from before"
    before = c.get("/login").get_data(as_text=True)
    caplog.set_level(logging.INFO, logger="shroud.admin")
    assert post_login(c, user="ops") == "ok"
    with c.session_transaction() as s:
        assert set(s) - {"_permanent"} == {"user", "sid", "login_at", "csrf"}
        assert s.permanent
        assert s["user"] == "ops" and s["csrf"] != before and len(s["csrf"]) >= 43
        assert abs(s["login_at"] - time.time()) < 3600
        sid = s["sid"]
    assert settings_of(app).sessions.valid(sid)
    assert c.get_cookie("session").expires is not None  # permanent: outlives the browser
    assert c.get("/api").json == {"actor": "ops", "via": "session"}
    assert caplog.records[-1].getMessage() == "dashboard login by ops from 10.0.0.1"


def test_logout_revokes_the_id_server_side(app):
    c = logged_in(app)
    stolen = c.get_cookie("session").value
    with c.session_transaction() as s:
        sid = s["sid"]
    assert c.post("/logout").status_code == 200
    with c.session_transaction() as s:
        assert dict(s) == {}
    assert not settings_of(app).sessions.valid(sid)
    replay = app.test_client()
    replay.set_cookie("session", stolen)
    assert replay.get("/api").status_code == 401


# --- whom a failure counts against -----------------------------------------------------------
def who(c, addr, forwarded=()):
    headers = [("X-Forwarded-For", value) for value in forwarded]
    return c.get("/who", environ_base={"REMOTE_ADDR": addr}, headers=headers).json["client"]


def test_a_direct_client_is_its_socket_address(app):
    c = app.test_client()
    assert who(c, "203.0.113.9", ["198.51.100.7"]) == "203.0.113.9"  # its own claim: ignored
    assert who(c, "2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert auth.throttle_key("2001:db8:1:2:ffff::1") == auth.throttle_key("2001:db8:1:2::5")
    assert auth.throttle_key("192.0.2.1") == "192.0.2.1"


def test_behind_the_router_the_last_forwarded_entry_is_the_client(config):
    c = make_app(dict(config, TRUST_FORWARDED_FOR=True)).test_client()
    assert who(c, "10.9.9.9", ["1.2.3.4, 198.51.100.7"]) == "198.51.100.7"
    assert who(c, "10.9.9.9", ["1.2.3.4", "198.51.100.8"]) == "198.51.100.8"  # two headers
    assert who(c, "10.9.9.9", ["2001:db8:1:2::7"]) == "2001:db8:1:2::/64"
    assert who(c, "10.9.9.9", ["1.2.3.4, junk"]) == "10.9.9.9"
    assert who(c, "10.9.9.9") == "10.9.9.9"


def test_the_session_cookie_is_httponly_samesite_and_lasts_a_working_day(tmp_path):
    """The real app's cookie (lib/admin/app.py), as a browser gets it at login."""
    from lib.admin.app import create_admin_app
    from lib.proxy.server import ProxyConfig, ProxyServer

    proxy = ProxyServer(ProxyConfig(data_dir=str(tmp_path / "data"), tunnel_addr=None,
                                    admin_addr=None))
    try:
        for secure in (False, True):
            app = create_admin_app(proxy, {"ADMIN_PASSWORD_HASH": FAST_HASH,
                                           "DATA_DIR": str(tmp_path / "data"),
                                           "SESSION_COOKIE_SECURE": secure})
            c = app.test_client()
            page = c.get("/login").get_data(as_text=True)
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
            r = c.post("/login", data={"username": "admin", "password": PASSWORD,
                                       "csrf_token": csrf, "next": "/"})
            assert r.status_code == 302
            cookie = [v for v in r.headers.getlist("Set-Cookie")
                      if v.startswith("shroud_admin=")][0]
            flags = [f.strip() for f in cookie.split(";")[1:]]
            assert "HttpOnly" in flags and "SameSite=Lax" in flags and "Path=/" in flags
            assert ("Secure" in flags) == secure
            expires = [f for f in flags if f.startswith("Expires=")][0]
            left = parsedate_to_datetime(expires[len("Expires="):]).timestamp() - time.time()
            assert SESSION_HOURS * 3600 - 600 < left <= SESSION_HOURS * 3600 + 5
    finally:
        proxy.store.close()
