"""One exception base: every error class under lib/ sits under lib.errors.ShroudError."""
import importlib
import inspect
import pkgutil

import pytest

import lib
from lib.errors import ShroudError

# gworker subclasses gunicorn's gevent worker, whose import wants a patched process.
SKIP = {"lib.proxy.gworker", "lib.admin.__main__"}


def lib_modules():
    for info in pkgutil.walk_packages(lib.__path__, "lib."):
        if info.name not in SKIP:
            yield importlib.import_module(info.name)


def test_every_error_class_is_a_shroud_error():
    found = {}
    for module in lib_modules():
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = cls
    assert len(found) >= 25, sorted(found)
    strays = sorted(n for n, cls in found.items() if not issubclass(cls, ShroudError))
    assert strays == [], "errors outside the tree (lib/errors.py draws it): " + ", ".join(strays)


@pytest.mark.parametrize("factory,attr,builtin", [
    (lambda: __import__("lib.errors").errors.StreamReset("x", 8), "code", OSError),
    (lambda: __import__("lib.protocol.sniff").protocol.sniff.SniffError("x", alert=112), "alert",
     ValueError),
    (lambda: __import__("lib.protocol.httphead").protocol.httphead.HeadError("x", 431),
     "http_status", ValueError),
    (lambda: __import__("lib.protocol.websocket").protocol.websocket.WebSocketError("x", 1009),
     "close_code", ValueError),
    (lambda: __import__("lib.client.tor").client.tor.TorConnectError("x"), None, ConnectionError),
])
def test_errors_keep_their_wire_meaning_and_builtin_base(factory, attr, builtin):
    e = factory()
    assert isinstance(e, ShroudError) and isinstance(e, builtin)
    if attr:
        assert getattr(e, attr) not in (None, "")
