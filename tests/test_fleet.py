"""A fleet: proxy processes sharing one PostgreSQL store (tests/fixtures/postgres.py), and
``shroud_proxy.py migrate-store`` moving a SQLite store into it.

Real processes throughout: proxies (tests/support/procs.ProxyProc), clients, origins, the
PostgreSQL server (killed and restarted for the fault tests)."""
import os
import subprocess

import pytest

from lib.identity import Identity
from lib.proxy.store.postgres import PostgresStore
from lib.proxy.store.sqlite import SqliteStore
from tests.support.procs import PY, ROOT

pytestmark = pytest.mark.timeout(180)

K1, K2 = (Identity.generate().fingerprint for _ in range(2))


def _migrate(data_dir, url, env=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([PY, "shroud_proxy.py", "migrate-store", "--data-dir", str(data_dir),
                           "--database-url", url], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=full_env)


def test_migrate_store_copies_claims_blocks_and_audit_twice_idempotent(tmp_path, pg_url):
    data = tmp_path / "proxy-data"
    data.mkdir()
    old = SqliteStore(str(data / "ownership.sqlite3"))
    old.claim("one.test", K1)
    old.claim("two.test", K2)
    old.assign("*.granted.test", K1, actor="admin", detail="ticket 7")
    old.claim("clash.test", K1)
    old.block_hostname("evil.test", actor="admin", detail="phishing")
    old.block_key(K2, actor="admin")
    old.audit("admin", "disconnect-tunnel", "tunnel 3", "peer 10.0.0.1:5")
    old.close()
    # The fleet's database already knows one name, owned by another key: it keeps it.
    pg = PostgresStore(pg_url)
    pg.claim("clash.test", K2)
    url = pg_url.replace("shroud@", "shroud:s3cret-pw@")  # trust auth ignores it

    first = _migrate(data, url)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "owners: 3 copied, 1 already there" in out, out
    assert "blocks: 2 copied, 0 already there" in out and "audit entries: 4 copied" in out, out
    assert "clash.test" in out and "s3cret-pw" not in out + first.stderr
    assert pg.owner("one.test").key == K1 and pg.owner("*.granted.test").method == "operator"
    assert pg.owner("clash.test").key == K2  # the database's owner wins
    assert pg.reload_blocks() == ({"evil.test"}, {K2})
    actions = [e.action for e in pg.audit_log(limit=20)]
    assert actions[0] == "migrate-store"
    assert {"assign", "block-hostname", "block-key", "disconnect-tunnel"} <= set(actions)

    second = _migrate(data, url)
    assert second.returncode == 0, second.stderr
    assert "owners: 0 copied, 4 already there" in second.stdout, second.stdout
    assert "blocks: 0 copied, 2 already there" in second.stdout
    assert "audit entries: 0 copied, 4 already there" in second.stdout
    assert len(pg.owners()) == 4
    assert len(pg.audit_log(limit=100)) == len(actions) + 1  # only the second run's own line
    pg.close()


def test_migrate_store_mistakes_are_one_clear_line(tmp_path, pg_url):
    missing = _migrate(tmp_path / "nowhere", pg_url)
    assert missing.returncode == 1 and "--data-dir" in missing.stderr
    assert "Traceback" not in missing.stderr
    data = tmp_path / "d"
    data.mkdir()
    SqliteStore(str(data / "ownership.sqlite3")).close()
    down = _migrate(data, "postgresql://u:s3cret-pw@127.0.0.1:1/x")
    assert down.returncode == 1 and "--database-url" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr and "s3cret-pw" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1


# --- proxies sharing one database -----------------------------------------------------------
import http.client  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from lib.protocol import messages as msg  # noqa: E402
from tests.support.procs import ADMIN_TOKEN, ClientProc, OriginProc, ProxyProc  # noqa: E402
from tests.support.rawtunnel import RawTunnel  # noqa: E402
from tests.support.visitor import http_get  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

# Fast beats so the expiry test needs seconds, not tens of seconds.
BEAT = "0.5"
PASSWORD = "s3cret-pw-7f3a"


@pytest.fixture
def fleet(tmp_path, pg_url):
    """start(name) -> a ProxyProc on the shared database; client(key_dir, pairs, proxies)."""
    procs = []
    origin = OriginProc(str(tmp_path))
    procs.append(origin)
    secret_url = pg_url.replace("shroud@", f"shroud:{PASSWORD}@")

    def start(name, extra=(), env=None):
        # The URL carries a password (the test server trusts loopback and ignores it): it must
        # never show in a log, an error or the dashboard.
        env = dict(env or {}, SHROUD_DATABASE_URL=secret_url)
        p = ProxyProc(str(tmp_path), str(tmp_path / f"{name}-data"), name=name,
                      extra=["--fleet-heartbeat", BEAT, *extra], env=env)
        procs.append(p)
        return p

    def client(key_dir, names, proxies, name="client"):
        pairs = []
        for n in names:
            pairs += [f"http:{n}", f"127.0.0.1:{origin.port}"]
        c = ClientProc(str(tmp_path), str(tmp_path / key_dir), pairs,
                       [f"127.0.0.1:{p.ports['tunnel']}" for p in proxies],
                       pins=[p.fingerprint for p in proxies], name=name)
        procs.append(c)
        return c

    yield type("Fleet", (), {"start": staticmethod(start), "client": staticmethod(client),
                             "url": pg_url, "dir": tmp_path, "procs": procs})
    for p in reversed(procs):
        p.stop()
    for p in procs:
        assert PASSWORD not in p.log(), f"the database password is in {p.name}'s log"


def _api(proxy, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", proxy.ports["admin"], timeout=10)
    try:
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                           "Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def _metrics(proxy) -> str:
    c = http.client.HTTPConnection("127.0.0.1", proxy.ports["admin"], timeout=10)
    try:
        c.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        return c.getresponse().read().decode()
    finally:
        c.close()


def _raw_bind(proxy, identity, name):
    t = RawTunnel(proxy, identity)
    try:
        t.auth()
        return t.bind(name)
    finally:
        t.close()


def test_split_brain_other_key_refused_on_every_proxy(fleet):
    """The owner binds on A; another key then tries B first (a proxy the owner has not reached
    yet). B refuses it: the first use on A owns the name fleet-wide. The owner is served on
    both."""
    a, b = fleet.start("proxy-a"), fleet.start("proxy-b")
    fleet.client("owner", ["victim.test"], [a], name="owner-on-a")
    owner = a.wait_bound("victim.test")["owner"]
    thief = _raw_bind(b, Identity.generate(), "victim.test")
    assert thief.error and thief.reason == msg.REASON_NOT_OWNER, thief
    assert owner[:16] in thief.error
    fleet.client("owner", ["victim.test"], [b], name="owner-on-b")
    assert b.wait_bound("victim.test")["owner"] == owner
    for proxy in (a, b):
        assert http_get(proxy.ports["http"], "victim.test") == (200, b"hello from origin\n")


def test_block_on_one_proxy_is_refused_on_the_others(fleet):
    a, b, c = fleet.start("proxy-a"), fleet.start("proxy-b"), fleet.start("proxy-c")
    fleet.client("owner", ["app.test"], [a, b, c])
    for proxy in (a, b, c):
        proxy.wait_bound("app.test")
        assert http_get(proxy.ports["http"], "app.test")[0] == 200
    status, answer = _api(a, "POST", "/api/block", {"kind": "hostname", "target": "app.test",
                                                    "detail": "abuse"})
    assert status == 200, answer
    t0 = time.monotonic()
    # NOTIFY carries it: well inside the watcher's 30 s fallback reload (lib/proxy/fleet.py).
    for other in (b, c):
        wait_for(lambda: http_get(other.ports["http"], "app.test")[0] == 403,
                 f"the block made on A refuses visitors on {other.name}", timeout=10,
                 interval=0.05)
    print(f"block reached B and C in {time.monotonic() - t0:.3f} s")
    for other in (b, c):
        refused = _raw_bind(other, Identity.generate(), "app.test")
        assert refused.error and refused.reason == msg.REASON_NOT_ALLOWED, refused
        assert not any(x["name"] == "app.test" for x in other.status()["bindings"])
    status, _ = _api(b, "POST", "/api/unblock", {"kind": "hostname", "target": "app.test"})
    assert status == 200
    assert _api(a, "GET", "/api/blocks")[1]["hostnames"] == []  # one store


def test_instance_killed_leaves_the_fleet_view(fleet):
    a, b = fleet.start("proxy-a"), fleet.start("proxy-b")
    fleet.client("owner", ["app.test"], [b])
    b.wait_bound("app.test")

    def b_seen():
        view = _api(a, "GET", "/api/fleet")[1]
        ids = {i["id"]: i for i in view["instances"]}
        names = {n["name"]: n for n in view["names"]}
        return len(ids) == 2 and "app.test" in names and view
    view = wait_for(b_seen, "A's fleet view shows B and its name", timeout=20)
    b_id = next(i["id"] for i in view["instances"] if not i["this"])
    assert view["names"][0]["instances"] == [b_id] and view["names"][0]["protocols"] == ["http"]
    assert PASSWORD not in json.dumps(view) and view["store"].startswith("PostgreSQL ")
    assert ":***@" in view["store"]
    b.signal(signal.SIGKILL)
    b.p.wait(5)
    wait_for(lambda: [i["id"] for i in _api(a, "GET", "/api/fleet")[1]["instances"]]
             == [view["this"]], "B's rows expire after three missed heartbeats", timeout=20)
    assert _api(a, "GET", "/api/fleet")[1]["names"] == []


def test_postgres_killed_and_restarted_under_load(fleet, postgres_server):
    a = fleet.start("proxy-a")
    fleet.client("owner", ["app.test"], [a])
    a.wait_bound("app.test")
    failures, served = [], [0]
    stop = threading.Event()

    def load():
        for _ in range(20000):  # bounded; stopped long before
            if stop.is_set():
                return
            try:
                status, body = http_get(a.ports["http"], "app.test", timeout=10)
                if status != 200:
                    failures.append(status)
                served[0] += 1
            except OSError as exc:
                failures.append(repr(exc))
    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: served[0] >= 20, "traffic flows before the crash")
        postgres_server.kill()
        refused = _raw_bind(a, Identity.generate(), "new.test")
        assert refused.error and refused.reason == msg.REASON_STORE_UNAVAILABLE, refused
        late = fleet.client("late", ["late.test"], [a], name="late-client")
        late.wait_log("store is unavailable", timeout=30)
        assert _api(a, "GET", "/api/overview")[0] == 200  # the dashboard reads memory
        status, answer = _api(a, "GET", "/api/fleet")  # the fleet view needs the database
        assert status == 503 and "unavailable" in answer["error"], answer
        wait_for(lambda: "shroud_store_reachable 0.0" in _metrics(a),
                 "the metrics say the store is unreachable", timeout=30)
        during = served[0]
        wait_for(lambda: served[0] >= during + 20, "traffic flows while the database is down")
        postgres_server.start()
        a.wait_bound("late.test", timeout=60)  # the client asked again and got it
        wait_for(lambda: not _raw_bind(a, Identity.generate(), "after.test").error,
                 "binds are accepted again", timeout=30)
    finally:
        stop.set()
        loader.join(30)
        if not postgres_server.running():
            postgres_server.start()
    assert failures == [] and served[0] > 40, (failures[:5], served[0])
    assert http_get(a.ports["http"], "late.test") == (200, b"hello from origin\n")


def test_slow_database_parks_the_bind_not_the_visitors(fleet):
    """A bind waiting on a locked table (a slow database) waits in its own greenlet: visitors
    of bound names are served meanwhile (psycopg is cooperative under the entry point's
    monkey-patching; lib/ patches nothing)."""
    import psycopg

    a = fleet.start("proxy-a")
    fleet.client("owner", ["app.test"], [a])
    a.wait_bound("app.test")
    served = []

    def visit():
        for _ in range(20):
            served.append((http_get(a.ports["http"], "app.test", timeout=30)[0],
                           time.monotonic()))
    with psycopg.connect(fleet.url, autocommit=True) as locker:
        with locker.transaction():
            locker.execute("LOCK TABLE shroud.ownership IN ACCESS EXCLUSIVE MODE")
            visitor = threading.Thread(target=visit)
            tunnel = RawTunnel(a, Identity.generate())
            try:
                tunnel.auth()
                visitor.start()
                answer = tunnel.bind("slow.test")  # waits on the lock (statement timeout)
                answered = time.monotonic()
            finally:
                tunnel.close()
                visitor.join(60)
    assert answer.error and answer.reason == msg.REASON_STORE_UNAVAILABLE, answer
    assert [s for s, _ in served] == [200] * 20
    assert max(t for _, t in served) < answered  # all served while the bind still waited


def test_platform_restart_on_an_ephemeral_disk_keeps_first_use_owners(fleet, tmp_path):
    """The Procfile case: gunicorn with the platform's DATABASE_URL; the dyno restarts with an
    empty disk (a new data dir). The first-use owner is remembered: another key is refused."""
    import shutil

    env = {"DATABASE_URL": fleet.url}
    first = ProxyProc(str(tmp_path), str(tmp_path / "dyno-1"), name="dyno-1", gunicorn=True,
                      env=env)
    fleet.procs.append(first)
    fleet.client("owner", ["app.test"], [first])
    owner = first.wait_bound("app.test")["owner"]
    first.stop()
    shutil.rmtree(tmp_path / "dyno-1")  # the platform's disk is gone with the dyno
    second = ProxyProc(str(tmp_path), str(tmp_path / "dyno-2"), name="dyno-2", gunicorn=True,
                       env=env)
    fleet.procs.append(second)
    refused = _raw_bind(second, Identity.generate(), "app.test")
    assert refused.error and refused.reason == msg.REASON_NOT_OWNER, refused
    assert owner[:16] in refused.error
    assert "PostgreSQL" in _api(second, "GET", "/api/fleet")[1]["store"]


# What a stop must not print: a traceback, "Exception ignored in ..." (a gunicorn worker's
# interpreter teardown under gevent printed it per worker), psycopg_pool's warnings of a pool
# torn down unclosed ("couldn't stop thread", "greenlet is being finalized").
STOP_NOISE = ("Traceback", "Exception ignored", "finalized", "couldn't stop", "Error")


@pytest.mark.parametrize("gunicorn", [False, True], ids=["python", "gunicorn"])
def test_a_stop_is_quiet_and_leaves_the_fleet_at_once(fleet, tmp_path, gunicorn):
    """SIGTERM to a proxy on the PostgreSQL store: it leaves the fleet's registry at once (not
    by expiry: beats of 30 s, 90 s to expire), closes its store, exits 0 within Proc.stop's
    5 s (no SIGKILL), and prints none of STOP_NOISE. Under gunicorn the workers did neither:
    their rows stayed until they expired, and each printed a teardown traceback."""
    env = {"SHROUD_DATABASE_URL": fleet.url, "WEB_CONCURRENCY": "2"}
    proxy = ProxyProc(str(tmp_path), str(tmp_path / "stop-data"), name="stopping",
                      gunicorn=gunicorn, env=env, extra=["--fleet-heartbeat", "30"])
    fleet.procs.append(proxy)
    fleet.client("owner", ["app.test"], [proxy])
    proxy.wait_bound("app.test")
    assert http_get(proxy.ports["http"], "app.test")[0] == 200
    store = PostgresStore(fleet.url)
    try:
        wait_for(lambda: len(store.instances()) == (2 if gunicorn else 1),
                 "every worker registered in the fleet", timeout=20)
        proxy.stop()
        assert proxy.p.returncode == 0, proxy.log()[-3000:]
        assert store.instances() == [], "a stopped proxy's rows wait for expiry"
    finally:
        store.close()
    stopping = proxy.log().split("shutting down" if not gunicorn else "Handling signal: term")
    assert len(stopping) == 2, proxy.log()[-3000:]
    for noise in STOP_NOISE:
        assert noise not in stopping[1], stopping[1]


def test_worker_exit_in_the_master_returns_and_does_not_end_it():
    """gunicorn's master calls worker_exit too, for a worker it finds already gone
    (Arbiter.kill_worker): there the hook must return, not stop a proxy or end the process
    (it ends a worker with os._exit)."""
    code = ("import os, runpy, types\n"
            "conf = runpy.run_path('gunicorn.conf.py')\n"
            "conf['worker_exit'](None, types.SimpleNamespace(pid=os.getpid() + 1))\n"
            "print('the master goes on')\n")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, SHROUD_ALLOCATOR="system"))
    assert (out.returncode, out.stdout) == (0, "the master goes on\n"), out.stderr
