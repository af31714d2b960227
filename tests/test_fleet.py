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
