"""lib.proxy.fleet.FleetMember in process, on a real SQLite store: what its beats write."""
from lib.proxy.fleet import FleetMember, InstanceIdentity
from lib.proxy.registry import Registry
from lib.proxy.store.sqlite import SqliteStore


def test_a_listener_opened_while_the_row_is_written_reaches_the_row_at_the_next_beat(
        tmp_path, monkeypatch):
    # The proxy's store writes in gevent's thread pool and the beat waits there: the admin
    # listener can open meanwhile (shroud_proxy.py opens it after the fleet started). The beat
    # remembered the addresses as they were when the write was done, not as written, and no
    # later beat wrote the admin listener: the Fleet page's row lacked it until another
    # listener changed (tests/test_dashboard_browser.py's fleet page waited for it).
    store = SqliteStore(str(tmp_path / "ownership.sqlite3"))
    listeners = {"tunnel": "127.0.0.1:4443"}
    member = FleetMember(store, Registry(), InstanceIdentity("p1", listeners, "ab" * 32),
                         lambda names, keys: None)
    real = store.register_instance

    def admin_opens_during_the_write(instance):
        real(instance)
        listeners["admin"] = "127.0.0.1:8080"

    monkeypatch.setattr(store, "register_instance", admin_opens_during_the_write)
    member.beat()
    monkeypatch.setattr(store, "register_instance", real)
    assert store.instances()[0].addresses == {"tunnel": "127.0.0.1:4443"}
    member.beat()
    assert store.instances()[0].addresses == listeners
    store.close()
