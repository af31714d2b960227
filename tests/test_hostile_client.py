"""A hostile proxy (anyone can run one and hand out its address and pin) against a real client
process: the streams it opens are served from the client's session reader, a hub callback
(lib.client.tunnels, TunnelRunner._open_now), so nothing a stream carries may raise there or
write the client's log at the proxy's rate.

The proxy is tests/support/stream_proxy.py: it answers the client's binds, then opens a flood
of streams for a name the client never bound, one stream whose StartProxy carries a ClientAddr
of its choosing in front of a ``GET /peer`` (the origin answers with the PROXY header it got),
and an ordinary ``GET /hello``.
"""
from __future__ import annotations

import json

import pytest

from lib.certs import cert_fingerprint, ensure_tunnel_cert
from tests.support.procs import PY, ClientProc, OriginProc, Proc, free_port, wait_port

pytestmark = pytest.mark.timeout(120)

NAME = "a.test"
UNKNOWN = 2000  # streams for a name never bound: one log line each before the bound
# What lib.client.tunnels.stream_log lets through per proxy and minute.
LOG_LINES = 10


def _line(proc: Proc, prefix: str) -> str:
    """The text after ``prefix`` on the first line of ``proc``'s log that starts with it."""
    for line in proc.wait_log("done\n", timeout=60).splitlines():
        if line.startswith(prefix):
            return line[len(prefix):]
    raise AssertionError(f"no {prefix!r} line in {proc.name}'s log:\n{proc.log()[-3000:]}")


@pytest.fixture
def hostile(tmp_path):
    """Start the client against a stream_proxy given ``extra`` arguments; its processes."""
    procs = []

    def start(*extra: str) -> dict:
        origin = OriginProc(str(tmp_path), proxy_protocol=True)
        procs.append(origin)
        port = free_port()
        cert, _ = ensure_tunnel_cert(str(tmp_path / "evil-data"))
        evil = Proc("stream-proxy", [PY, "tests/support/stream_proxy.py", "--port", str(port),
                                     "--data-dir", str(tmp_path / "evil-data"), "--binds", "1",
                                     "--name", NAME, *extra], str(tmp_path))
        procs.append(evil)
        wait_port(port)
        client = ClientProc(str(tmp_path), str(tmp_path / "client"),
                            [f"http:{NAME}", f"127.0.0.1:{origin.port}"], [f"127.0.0.1:{port}"],
                            pins=[cert_fingerprint(cert)], extra=["--proxy-protocol", "v1"])
        procs.append(client)
        return dict(evil=evil, client=client, origin=origin)

    yield start
    for p in reversed(procs):
        p.stop()


@pytest.mark.parametrize("client_addr", ["[fe80::1%x\r\nEVIL]:1", "[fe80::1%\u00e9]:1"])
def test_a_scoped_client_addr_makes_a_clean_proxy_header_and_keeps_the_tunnel(hostile,
                                                                              client_addr):
    """An IPv6 scope id is any text after '%': it went into the v1 header as it was (a CRLF
    in it ended the header early and made the rest a request line at the origin), and a
    non-ASCII one raised UnicodeEncodeError from the session's reader, which ended the tunnel
    (INTERNAL_ERROR) and left the stream counted open for good; the CRLF also wrote a line of
    the proxy's making into the client's log (the console's line for the visitor)."""
    w = hostile("--client-addr", client_addr, "--public-addr", "[::1]:80")
    peer = _line(w["evil"], "peer ")
    assert peer != "none", f"no answer to GET /peer:\n{w['client'].log()[-3000:]}"
    assert json.loads(peer)["proxy_header"] == "PROXY TCP6 fe80::1 ::1 1 80\r\n", peer
    assert _line(w["evil"], "hello ") == "HTTP/1.1 200 OK"
    assert "session ended" not in w["evil"].log()
    log = w["client"].log()
    assert "Traceback" not in log
    # The console's line for the visitor shows the proxy's ClientAddr escaped, on one line.
    assert not [line for line in log.splitlines() if line.startswith("EVIL")], log[-2000:]


def test_a_flood_of_streams_for_unknown_names_is_refused_and_logs_little(hostile):
    w = hostile("--unknown", str(UNKNOWN))
    assert _line(w["evil"], "unknown ") == f"{UNKNOWN} reset {UNKNOWN}"
    assert _line(w["evil"], "hello ") == "HTTP/1.1 200 OK"
    logged = w["client"].log().count("stream for unknown url")
    assert 0 < logged <= LOG_LINES, f"{logged} lines for {UNKNOWN} streams"


def test_a_bug_met_by_one_streams_opening_ends_that_stream_not_the_tunnel(monkeypatch):
    """Unit test of lib.client.tunnels (a session pair, the failure injected): whatever raises
    while a stream is opened from the session's reader (TunnelRunner._open_now) resets that
    stream; raised into Session.serve it ended the tunnel (INTERNAL_ERROR) and left
    ``streams_open`` counted up for good."""
    import gevent
    import gevent.socket as gsocket

    from lib.client import tunnels
    from lib.errors import StreamReset
    from lib.protocol import messages as m
    from tests.support.muxpair import session_pair

    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    host, port = listener.getsockname()
    svc = tunnels.Service.parse(f"http:{NAME}", f"{host}:{port}")
    client = tunnels.Client(tunnels.ClientConfig(
        services=[svc], proxies=[tunnels.ProxyAddr("proxy.test", 4443)], proxy_protocol="v1"))
    runner = client.runners[0]
    runner.urls[f"http://{NAME}"] = svc
    ours, proxy_side = session_pair()
    gevent.spawn(runner.serve, ours)

    def opened(url=f"http://{NAME}"):
        st = proxy_side.open()
        st.settimeout(5)
        st.sendall(m.encode(m.StartProxy(url=url, client_addr="192.0.2.7:5"))
                   + b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        return st

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tunnels, "proxy_protocol_header", broken)
    st = opened()
    with pytest.raises(StreamReset):
        st.recv(1)
    assert not ours.closed and runner.streams_open == 0
    conn, _ = listener.accept()  # the target's connection, made before the failure: closed
    conn.settimeout(5)
    assert conn.recv(100) == b""
    conn.close()
    monkeypatch.undo()
    st = opened()
    conn, _ = listener.accept()
    conn.settimeout(5)
    assert conn.recv(100).startswith(b"PROXY TCP4 192.0.2.7 ")
    conn.close()
    st.close()
    proxy_side.close()
    listener.close()
