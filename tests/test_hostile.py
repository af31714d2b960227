"""Hostile input against a real proxy process: each attack is cut off by a bound with a counter
(read back through the status API) while a legitimate name keeps being served.

The hostile tunnel client is written here with lib.net.muxsession and lib.protocol.messages directly (it speaks the
protocol, then abuses it): SYN floods, huge declared message lengths, binds for names it does
not own, bind storms. Hostile public clients: slow senders, oversized heads, and 10,000 idle
half-open connections (plus a full public pool, which must not stall the tunnel listener).

The multiplexer's own bounds (docs/SECURITY.md, "Tunnel sessions") are attacked with a raw
muxado peer (tests/support/rawmux.py): RST-bait floods before and after Auth, tunnels that never
read what they provoke, GOAWAY floods; then visitors that never read (memory per visitor), and
a client frozen with SIGSTOP that the proxy's own heartbeat must drop.
"""
from __future__ import annotations

import http.client
import os
import signal
import resource
import socket
import struct
import time

import gevent
import pytest

from lib.protocol import messages as msg
from lib.errors import ErrorCode, MuxError
from lib.identity import Identity
from lib.protocol import muxframe as fr
from lib.protocol import muxstate as mp
from tests.support.loaddrs import loopback_addresses
from tests.support.procs import ClientProc, OriginProc, ProxyProc, free_port
from tests.support.rawtunnel import RawTunnel
from tests.support.wait import wait_for
from tests.support.rawmux import RawPeer

pytestmark = pytest.mark.timeout(120)

GOOD = "good.test"  # the legitimate name, served throughout
# The attacks' own bounds, small so the test is quick (the defaults are in docs/OPERATIONS.md).
PEEK_TIMEOUT = 2.0
BIND_BURST = 20
BIND_RATE = 5.0
IDLE_CONNECTIONS = 10_000


def _raise_fd_limit(n: int) -> None:
    """10,000 sockets on each side: the test, and the proxy it starts (rlimits are inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        pytest.fail(f"needs {n} file descriptors per process (limits {soft}/{hard}; "
                    f"raise the hard limit, e.g. ulimit -Hn {n}, or run as root)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    _raise_fd_limit(IDLE_CONNECTIONS + 2000)
    d = tmp_path_factory.mktemp("hostile")
    procs = []
    try:
        origin = OriginProc(str(d), name="origin")
        procs.append(origin)
        proxy = ProxyProc(str(d), str(d / "proxy-data"), extra=[
            "--peek-timeout", str(PEEK_TIMEOUT), "--bind-burst", str(BIND_BURST),
            "--bind-rate", str(BIND_RATE)])
        procs.append(proxy)
        client = ClientProc(str(d), str(d / "client"), [f"http:{GOOD}", f"127.0.0.1:{origin.port}"],
                            [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
        procs.append(client)
        proxy.wait_bound(GOOD)
        yield dict(dir=d, proxy=proxy, origin=origin, client=client)
    finally:
        for p in reversed(procs):
            p.stop()


def good_get(proxy, timeout=10.0) -> tuple[int, float]:
    """One request for the legitimate name: (status, seconds)."""
    t0 = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", proxy.ports["http"], timeout=timeout)
    try:
        c.request("GET", "/hello", headers={"Host": GOOD})
        r = c.getresponse()
        body = r.read()
        assert r.status != 200 or body == b"hello from origin\n"
        return r.status, time.monotonic() - t0
    finally:
        c.close()


def refusals(proxy) -> dict:
    return proxy.status()["refusals"]


def delta(before: dict, after: dict, key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


# --- a hostile tunnel client: tests/support/rawtunnel.py ---------------------------------------
Attacker = RawTunnel


def test_syn_flood_ends_in_goaway_and_is_counted(world):
    proxy = world["proxy"]
    before = refusals(proxy)
    a = Attacker(proxy, Identity.load_or_create(str(world["dir"] / "attacker-syn")))
    a.auth()
    # Streams opened and never written: the proxy's bind loop waits on the first; 256 wait in
    # the accept backlog; every further SYN is refused, and past 1,024 refusals in a row the
    # session is a SYN flood.
    t0 = time.monotonic()
    opened = 0
    for _ in range(3000):
        if a.session.closed:
            break
        try:
            a.session.open()
        except MuxError:
            break
        opened += 1
        if opened % 200 == 0:
            gevent.sleep(0.01)  # let the refusals come back
    end = a.session.wait(timeout=10)
    took = time.monotonic() - t0
    assert end is not None, "the proxy never cut the SYN flood off"
    assert end.remote and end.code == ErrorCode.PROTOCOL_ERROR, end
    assert good_get(proxy)[0] == 200
    after = refusals(proxy)
    assert delta(before, after, "tunnel_protocol_error") == 1
    assert delta(before, after, "streams_refused") > 1024
    print(f"SYN flood: {opened} SYNs sent, GOAWAY PROTOCOL_ERROR after {took:.2f} s, "
          f"{delta(before, after, 'streams_refused')} streams refused")


@pytest.mark.parametrize("length", [2 ** 40, 2 ** 62, -1, msg.MAX_MESSAGE + 1])
def test_huge_declared_message_length_drops_the_tunnel(world, length):
    proxy = world["proxy"]
    before = refusals(proxy)
    a = Attacker(proxy, Identity.load_or_create(str(world["dir"] / "attacker-len")))
    a.auth()
    st = a.session.open()
    st.sendall(struct.pack("<q", length) + b"{" * 100)  # then nothing: never 2^40 bytes
    end = a.session.wait(timeout=5)
    # Refused on the length alone: a proxy waiting for the body would meet the bind stream's
    # timeout instead, which ends that stream (MuxError: "no control message") and keeps the
    # tunnel, so no PROTOCOL_ERROR would come (not a timed assertion: an outcome).
    assert end is not None and end.code == ErrorCode.PROTOCOL_ERROR, end
    after = refusals(proxy)
    assert delta(before, after, "bad_bind") == 1
    assert delta(before, after, "tunnel_protocol_error") == 1
    assert good_get(proxy)[0] == 200


def test_huge_auth_length_is_refused(world):
    proxy = world["proxy"]
    before = refusals(proxy)
    a = Attacker(proxy, None)
    st = a.session.open()
    st.sendall(struct.pack("<q", 2 ** 62))
    end = a.session.wait(timeout=5)
    assert end is not None, "the session with a 2^62-byte Auth was kept"
    assert delta(before, refusals(proxy), "tunnel_auth") == 1
    assert good_get(proxy)[0] == 200


def test_binds_for_names_not_owned_are_refused_and_counted(world):
    proxy = world["proxy"]
    before = refusals(proxy)
    a = Attacker(proxy, Identity.load_or_create(str(world["dir"] / "attacker-own")))
    a.auth()
    r = a.bind(GOOD)  # live, bound by the legitimate client's key
    assert r.error and r.reason == msg.REASON_NOT_OWNER, r
    r = a.bind("mine-by-theft.test", bad_signature=True)  # a signature over someone else's key
    assert r.error and r.reason == msg.REASON_BAD_SIGNATURE, r
    r = a.bind("unsigned.test", sign=False)
    assert r.error and r.reason == msg.REASON_BAD_SIGNATURE, r
    a.close()
    u = Attacker(proxy, None)  # the original Go client's way: no key at all
    u.auth()
    r = u.bind(GOOD, sign=False)
    assert r.error, r
    u.close()
    after = refusals(proxy)
    assert delta(before, after, "ownership") == 4
    status = proxy.status()
    good = [b for b in status["bindings"] if b["name"] == GOOD]
    assert good and good[0]["tunnels"] == 1  # still the legitimate client's, alone
    assert good_get(proxy)[0] == 200


def test_bind_storm_is_rate_limited_per_tunnel(world):
    proxy = world["proxy"]
    before = refusals(proxy)
    a = Attacker(proxy, Identity.load_or_create(str(world["dir"] / "attacker-storm")))
    a.auth()
    n = 120
    decided = limited = 0
    t0 = time.monotonic()
    for i in range(n):
        r = a.bind(GOOD if i % 2 else f"bad name {i}")  # never granted: refusals are cheap
        assert r.error
        if r.reason == msg.REASON_LIMIT:
            limited += 1
        else:
            decided += 1
        if i % 10 == 0:
            assert good_get(proxy)[0] == 200  # other names are served during the storm
    took = time.monotonic() - t0
    assert not a.session.closed  # refused, not disconnected: a limit, not a protocol error
    # The bucket: BIND_BURST at once, then BIND_RATE a second.
    assert decided <= BIND_BURST + BIND_RATE * took + 1, (decided, took)
    assert limited >= n - (BIND_BURST + BIND_RATE * took + 1)
    assert delta(before, refusals(proxy), "limit_bind_rate") == limited
    a.close()
    print(f"bind storm: {n} binds in {took:.2f} s, {decided} decided, {limited} rate-limited")


# --- hostile public clients -------------------------------------------------------------------

def test_slow_sender_cut_at_peek_deadline_while_others_served(world):
    proxy = world["proxy"]
    before = refusals(proxy)
    s = socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=10)
    t0 = time.monotonic()
    answer = b""
    served = 0
    for b in b"GET / HTTP/1.1\r\nHost: good.te":  # one byte every 0.25 s, never a whole head
        try:
            s.sendall(bytes([b]))
        except OSError:
            break
        status, _ = good_get(proxy)
        served += status == 200
        s.settimeout(0.25)
        try:
            answer = s.recv(4096)
            break
        except socket.timeout:
            pass
    cut_after = time.monotonic() - t0
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") or answer.startswith(b"HTTP/1.0 408"), answer
    assert PEEK_TIMEOUT - 0.1 <= cut_after < PEEK_TIMEOUT + 1.5, cut_after
    assert served >= 3
    assert delta(before, refusals(proxy), "peek_timeout") == 1


def test_oversized_head_gets_431(world):
    proxy = world["proxy"]
    before = refusals(proxy)
    s = socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=10)
    t0 = time.monotonic()
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: good.test\r\nX-Filler: " + b"a" * 70_000)
    except OSError:
        pass  # the proxy may close before taking all of it
    answer = b""
    try:
        while chunk := s.recv(4096):
            answer += chunk
    except OSError:
        pass
    s.close()
    assert b" 431 " in answer.split(b"\r\n", 1)[0], answer[:100]
    assert time.monotonic() - t0 < 2
    assert delta(before, refusals(proxy), "bad_request") == 1
    assert good_get(proxy)[0] == 200


def _open_idle(port: int, n: int, batch: int = 500, accepted=None) -> list[socket.socket]:
    """n connections that never send a byte. With ``accepted`` (the proxy's count of accepted
    connections, a callable), each batch after the first waits until the proxy accepted all but
    one batch of those before it: the accept backlog (1024) never holds more than two batches,
    so no SYN is dropped to wait for a retransmit (a fixed pause between batches did not know
    how far behind a loaded proxy was)."""
    socks = []
    base = accepted() if accepted is not None else 0
    for i in range(n):
        if accepted is not None and i % batch == 0 and i:
            wait_for(lambda: accepted() - base >= i - batch,
                     f"the proxy to accept {i - batch} of the {i} idle connections opened")
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_ten_thousand_idle_connections_are_bounded_by_the_peek_deadline(world):
    proxy = world["proxy"]
    st0 = proxy.status()
    fds0 = _fd_count(proxy.pid)
    t0 = time.monotonic()
    idle = _open_idle(proxy.ports["https"], IDLE_CONNECTIONS,
                      accepted=lambda: proxy.status()["connections"])
    try:
        # Meanwhile the legitimate name is served, promptly.
        worst = 0.0
        accepted = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, took = good_get(proxy)
            assert status == 200
            worst = max(worst, took)
            accepted = proxy.status()["connections"] - st0["connections"]
            if accepted >= IDLE_CONNECTIONS:
                break
            time.sleep(0.2)
        assert accepted >= IDLE_CONNECTIONS, f"only {accepted} idle connections accepted"
        peak_fds = _fd_count(proxy.pid)
        # Then the peek deadline cuts every one of them (TLS alert, close).
        wait_for(lambda: delta(st0["refusals"], proxy.status()["refusals"], "peek_timeout")
                 >= IDLE_CONNECTIONS, f"all {IDLE_CONNECTIONS} cut by the peek deadline",
                 timeout=PEEK_TIMEOUT + 20, interval=0.25)
        all_cut = time.monotonic() - t0
        assert good_get(proxy)[0] == 200
    finally:
        for s in idle:
            s.close()
    fds_after = wait_for(lambda: (n := _fd_count(proxy.pid)) <= fds0 + 20 and n,
                         f"proxy back to about {fds0} fds after the idle connections closed")
    print(f"{IDLE_CONNECTIONS} idle connections: proxy fds {fds0} -> {peak_fds} -> {fds_after}, "
          f"legitimate request worst {worst * 1000:.0f} ms, all cut {all_cut:.1f} s after start")


def test_full_public_pool_does_not_stall_tunnels(world, tmp_path):
    # A proxy whose public pool holds 200: 1,000 idle connections fill it and the kernel's
    # backlog. A client still connects its tunnel and binds at once (tunnels have their own
    # pool), and a visitor is served once the peek deadline frees slots.
    d = tmp_path
    # 1,000 idle connections, 200 at a time, each slot freed after `peek` seconds: the pool
    # stays full for 10 s, long enough to see the tunnel bind while it is full.
    peek = 2.0
    proxy = ProxyProc(str(d), str(d / "proxy-data"), name="small-proxy",
                      extra=["--peek-timeout", str(peek), "--max-public-connections", "200"])
    client = None
    idle = []
    try:
        idle = _open_idle(proxy.ports["http"], 1000)
        wait_for(lambda: proxy.status()["refusals"].get("limit_public_connections", 0) >= 1,
                 "the public pool full")
        t0 = time.monotonic()
        client = ClientProc(str(d), str(d / "client"),
                            [f"http:{GOOD}", f"127.0.0.1:{world['origin'].port}"],
                            [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
        proxy.wait_bound(GOOD, timeout=30)
        bound_in = time.monotonic() - t0
        # Ordering, not speed: bound while idle connections still waited for the public pool.
        cut = proxy.status()["refusals"].get("peek_timeout", 0)
        assert cut < len(idle), f"the tunnel bound only after all {cut} idle connections were cut"
        status, took = good_get(proxy, timeout=60)
        assert status == 200
        print(f"full pool: tunnel bound in {bound_in:.2f} s ({cut} idle cut by then), "
              f"visitor served in {took:.2f} s")
    finally:
        for s in idle:
            s.close()
        if client is not None:
            client.stop()
        proxy.stop()


class _PublicKeyOnly:
    """Claims another client's public key without holding its private key."""

    def __init__(self, victim: Identity):
        self.public_key = victim.public_key

    def sign(self, payload: bytes) -> bytes:
        return bytes(64)  # cannot sign for a key it does not hold


def test_claimed_key_without_proof_neither_locks_out_nor_evicts(world):
    """Auth's key is a claim; only a signed bind proves it. Eight tunnels claiming the
    victim's key (the per-key limit, which counts proven tunnels) must not lock the victim out
    nor close its tunnel; and a claim with the victim's client id must not kick its live
    tunnel."""
    proxy = world["proxy"]
    victim = Identity.load_or_create(str(world["dir"] / "client"))
    squatters = []
    try:
        for _ in range(8):
            a = Attacker(proxy, _PublicKeyOnly(victim))
            a.auth()
            squatters.append(a)
        assert squatters[-1].bind("squat.test").error  # the forged signature is refused
        claiming = [t for t in proxy.status()["tunnels"] if t["key"] == victim.fingerprint]
        assert len([t for t in claiming if t["key_proven"]]) <= 8  # the cap holds at proof
        # The victim's tunnel is still there, still serving; its client id cannot be stolen
        # by a claim either.
        victim_tunnels = [t for t in proxy.status()["tunnels"] if t["key"] == victim.fingerprint]
        assert victim_tunnels
        kicker = Attacker(proxy, _PublicKeyOnly(victim))
        with kicker.session.open() as st:
            st.settimeout(10)
            msg.write_message(st, msg.Auth(client_id=victim_tunnels[0]["client_id"],
                                           extra=msg.auth_extra(victim.public_key)))
            assert not msg.read_message(st).error
        squatters.append(kicker)
        assert good_get(proxy)[0] == 200
        # And a fresh connection of the real key gets in despite the eight claims.
        real = Attacker(proxy, victim)
        squatters.append(real)
        real.auth()
        assert not real.bind(GOOD).error
        ids = {t["id"] for t in proxy.status()["tunnels"] if t["key"] == victim.fingerprint}
        assert victim_tunnels[0]["id"] in ids  # a different client id: nothing replaced
    finally:
        for a in squatters:
            a.close()


def test_idle_connections_from_one_address_do_not_hold_every_tunnel_slot(world):
    """2,050 TCP connections from one address that never say a word (no key, no TLS) held
    all 2,000 tunnel slots for the handshake deadline: a new client's TLS handshake timed
    out, and ~133 connects a second kept it so. Past 64 not yet bound per address, they are
    closed at once."""
    proxy = world["proxy"]
    before = refusals(proxy)
    idle = []
    try:
        for _ in range(2050):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", proxy.ports["tunnel"]))
            except OSError:
                s.close()
                continue
            idle.append(s)
        honest = Attacker(proxy, Identity.load_or_create(str(world["dir"] / "newcomer")))
        try:
            honest.auth()
            assert not honest.bind("newcomer.test").error
        finally:
            honest.close()
        assert delta(before, refusals(proxy), "limit_pending_tunnels") >= 2000 - 64
    finally:
        for s in idle:
            s.close()


def test_claims_sent_between_auth_and_first_bind_do_not_evict_the_key_holder(world):
    """Whoever learned a client's public key (any proxy it uses) used to close the client's
    fresh tunnel, every time, with the per-key limit's worth of claims sent between its Auth
    and its first signed bind (0.1 s here; a Tor round trip is longer): at the limit the
    oldest unproven claim was closed to make room."""
    proxy = world["proxy"]
    holder = Identity.load_or_create(str(world["dir"] / "holder"))
    tunnels = []
    try:
        fresh = Attacker(proxy, holder)
        tunnels.append(fresh)
        fresh.auth()
        for _ in range(2 * 8):  # twice --max-tunnels-per-key's default
            claim = Attacker(proxy, _PublicKeyOnly(holder))
            tunnels.append(claim)
            claim.auth()
        resp = fresh.bind("holder.test")
        assert not resp.error, resp
        assert not fresh.session.closed
        assert any(t["key"] == holder.fingerprint and t["key_proven"]
                   for t in proxy.status()["tunnels"])
    finally:
        for t in tunnels:
            t.close()


# --- hostile tunnel sessions: the multiplexer's own bounds (docs/SECURITY.md, "Tunnel sessions")

# DATA of one byte on 4,096 stream ids below 99,999 that were never opened: each id used to
# cost a decode and a 12-byte RST (the proxy answers once per id among those answered lately).
RST_BAIT = b"".join(fr.encode_data(3 + 2 * i, b"x") for i in range(4096))
BAIT_SYN = fr.encode(fr.Syn(99999))  # makes every lower odd id "closed" rather than "idle"


def _flood(peers: list[RawPeer], block: bytes, times: int, seconds: float = 30.0) -> int:
    """Send ``block`` up to ``times`` times on each peer, all at once; stops where a peer is
    closed or after ``seconds`` (a peer that is not read blocks its sender). Blocks sent."""
    def one(p):
        n = 0
        while n < times and p.send(block):
            n += 1
            gevent.sleep(0)
        return n
    senders = [gevent.spawn(one, p) for p in peers]
    gevent.joinall(senders, timeout=seconds)
    gevent.killall(senders, block=True, timeout=5)
    return sum(g.value or 0 for g in senders)


def _proxy_rss_kib(proxy) -> int:
    with open(f"/proc/{proxy.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_keyless_rst_bait_flood_is_cut_off_before_auth(world):
    """Item 2: before Auth a peer may provoke 16 answers (2 a second after) and send 256
    frames; past that it is hostile: GOAWAY PROTOCOL_ERROR, closed, counted."""
    proxy = world["proxy"]
    before = refusals(proxy)
    p = RawPeer(proxy.ports["tunnel"])
    try:
        p.start_reading()
        p.send(BAIT_SYN)
        blocks = _flood([p], RST_BAIT, 50)  # 204,800 frames at most
        assert p.wait_closed(20), "the proxy kept answering a keyless flood"
        rsts = p.counts.get(fr.TYPE_RST, 0)
        # (the GOAWAY may be lost: the proxy closes with the flood still arriving)
        assert p.goaway is None or p.goaway[1] == ErrorCode.PROTOCOL_ERROR, p.goaway
        # 256 frames at most before trust, of which 16 answered at once plus 2 a second
        assert rsts <= mp.MuxConfig().untrusted_frames, rsts
    finally:
        p.close()
    assert delta(before, refusals(proxy), "tunnel_hostile") == 1
    assert good_get(proxy)[0] == 200
    print(f"keyless flood: {blocks} blocks of 4,096 frames sent, {rsts} RSTs back, then GOAWAY")


def test_keyed_rst_bait_flood_is_cut_off_by_the_answer_bucket(world):
    """Item 2, after Auth: a free key buys a larger bucket, not an unbounded one."""
    proxy = world["proxy"]
    before = refusals(proxy)
    peers = []
    try:
        for i in range(4):
            p = RawPeer(proxy.ports["tunnel"])
            p.handshake(Identity.load_or_create(str(world["dir"] / f"bait-{i}")), f"bait{i}.test")
            p.start_reading()
            p.send(BAIT_SYN)
            peers.append(p)
        _flood(peers, RST_BAIT, 100)  # 409,600 frames each at most
        for p in peers:
            assert p.wait_closed(20), "the proxy kept answering a keyed flood"
            assert p.goaway is None or p.goaway[1] == ErrorCode.PROTOCOL_ERROR, p.goaway
        rsts = [p.counts.get(fr.TYPE_RST, 0) for p in peers]
    finally:
        for p in peers:
            p.close()
    assert delta(before, refusals(proxy), "tunnel_hostile") == 4
    assert good_get(proxy)[0] == 200
    print(f"keyed flood: RSTs back per tunnel before GOAWAY {rsts}")


def test_goaway_flood_ends_the_session_at_the_second_and_logs_little(world):
    """Item 7: every GOAWAY used to be logged and to scan every stream; Go sends one per
    session, so a second one ends it, and what a peer makes us log is rate-limited."""
    proxy = world["proxy"]
    goaway = fr.encode(fr.GoAway(0, ErrorCode.NO_ERROR))
    log_before = proxy.log().count("peer GOAWAY")
    before = refusals(proxy)
    p = RawPeer(proxy.ports["tunnel"])
    try:
        p.start_reading()
        sent = _flood([p], goaway * 10_000, 5)
        assert p.wait_closed(20)
        assert p.goaway is None or p.goaway[1] == ErrorCode.PROTOCOL_ERROR, p.goaway
    finally:
        p.close()
    assert delta(before, refusals(proxy), "tunnel_protocol_error") == 1
    # And many connections from one address, two GOAWAYs each: the log lines the peer can
    # trigger stay within PeerLog's 10 a minute for its address.
    for _ in range(20):
        p = RawPeer(proxy.ports["tunnel"])
        p.start_reading()
        p.send(goaway * 2)
        assert p.wait_closed(20)
        p.close()
    logged = proxy.log().count("peer GOAWAY") - log_before
    assert logged <= 10, logged
    assert good_get(proxy)[0] == 200
    print(f"GOAWAY flood: {sent} x 10,000 sent, {logged} lines logged for 21 sessions")


def test_failed_tls_handshakes_log_little(world):
    """Anyone can fail a TLS handshake on the tunnel port at will: the lines saying so stay
    within PeerLog's 10 a minute for the address (each was logged)."""
    proxy = world["proxy"]
    log_before = proxy.log().count("TLS handshake failed")
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", proxy.ports["tunnel"]), timeout=20)
        try:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
            while s.recv(4096):  # until the proxy closes, after its log line
                pass
        except OSError:
            pass
        finally:
            s.close()
    logged = proxy.log().count("TLS handshake failed") - log_before
    assert logged <= 10, logged
    assert good_get(proxy)[0] == 200


def test_failed_tls_handshakes_from_one_64_log_little(tmp_path):
    """The same from 25 addresses of one IPv6 /64 (one host's): each address had its own 10
    lines a minute, so every handshake was logged."""
    addrs = [f"2001:db8:66:1::{i:x}" for i in range(1, 26)]
    with loopback_addresses(addrs):
        port = free_port()
        proxy = ProxyProc(str(tmp_path), str(tmp_path / "data"), ports={"tunnel": port},
                          extra=["--tunnel-addr", f"[::]:{port}"])
        try:
            for addr in addrs:
                s = socket.create_connection(("::1", port), timeout=20,
                                             source_address=(addr, 0))
                try:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
                    while s.recv(4096):  # until the proxy closes, after its log line
                        pass
                except OSError:
                    pass
                finally:
                    s.close()
            logged = [line for line in proxy.log().splitlines()
                      if "TLS handshake failed" in line and "[2001:db8:66:1::" in line]
            assert len(logged) <= 10, len(logged)
        finally:
            proxy.stop()


def _heartbeat_bait(sid: int) -> bytes:
    """A peer heartbeat stream with a huge window for our echo, then 16 KiB pings."""
    return (fr.encode(fr.Syn(sid, mp.HEARTBEAT_PRIORITY, mp.HEARTBEAT_TYPE))
            + fr.encode(fr.WndInc(sid, fr.STREAM_ID_MASK - mp.INITIAL_WINDOW)))


def test_tunnels_that_stop_reading_are_closed_and_hold_little(world):
    """Item 3: tunnels that provoke answers (RSTs, heartbeat echoes) and never read them.
    Answers waiting unwritten are bounded in bytes (128 KiB); past that the session is
    hostile and closed, so the proxy's memory stays flat (it grew ~27 MiB per tunnel)."""
    proxy = world["proxy"]
    before = refusals(proxy)
    rss0 = _proxy_rss_kib(proxy)
    peak = [rss0]

    def sample():
        while True:
            peak[0] = max(peak[0], _proxy_rss_kib(proxy))
            gevent.sleep(0.1)

    sampler = gevent.spawn(sample)
    peers = []
    try:
        for i in range(8):
            p = RawPeer(proxy.ports["tunnel"], rcvbuf=4096)  # and never read
            p.handshake(Identity.load_or_create(str(world["dir"] / f"deaf-{i}")), f"deaf{i}.test")
            p.send(BAIT_SYN + (_heartbeat_bait(100001) if i % 2 else b""))
            peers.append(p)
        rst_peers, echo_peers = peers[0::2], peers[1::2]
        ping = fr.encode_data(100001, b"p" * fr.MAX_PAYLOAD)
        g = gevent.spawn(_flood, echo_peers, ping * 64, 200)
        _flood(rst_peers, RST_BAIT, 100)
        g.get(timeout=60)
        for p in peers:
            assert p.wait_closed(30), "a tunnel that never reads was kept"
    finally:
        sampler.kill()
        for p in peers:
            p.close()
    grown = (peak[0] - rss0) / 1024
    assert delta(before, refusals(proxy), "tunnel_hostile") == 8
    assert grown < 48, f"proxy RSS grew {grown:.0f} MiB for 8 tunnels that do not read"
    assert good_get(proxy)[0] == 200
    print(f"8 tunnels that never read: proxy RSS peak +{grown:.1f} MiB")


def _settled_rss_kib(proxy, seconds: float = 30.0) -> int:
    """The proxy's RSS once it stops growing (no 256 KiB of growth in 2 s; at most
    ``seconds``)."""
    deadline = time.monotonic() + seconds
    last, still = _proxy_rss_kib(proxy), 0
    while time.monotonic() < deadline and still < 8:
        time.sleep(0.25)
        now = _proxy_rss_kib(proxy)
        still = still + 1 if now - last < 256 else 0
        last = max(last, now)
    return last


def test_visitors_that_never_read_hold_a_bounded_amount_each(tmp_path):
    """Item 6: a visitor asks for 16 MiB and never reads. Its stream's window starts at
    64 KiB and grows only while it reads (it grew to 1 MiB at once, plus a 256 KiB splice
    buffer: ~1.8 MiB each); the kernel's unsent queue toward it is bounded too."""
    d = tmp_path
    origin = OriginProc(str(d), name="origin")
    proxy = ProxyProc(str(d), str(d / "proxy-data"), name="proxy")
    client = ClientProc(str(d), str(d / "client"), [f"http:{GOOD}", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    visitors = []
    n = 64
    try:
        proxy.wait_bound(GOOD)
        assert good_get(proxy)[0] == 200
        rss0 = _settled_rss_kib(proxy, 5)
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=10)
            s.sendall(f"GET /bytes/{16 << 20} HTTP/1.1\r\nHost: {GOOD}\r\n\r\n".encode())
            visitors.append(s)
        held = _settled_rss_kib(proxy)
        per_visitor = (held - rss0) / n
        # A reader meanwhile gets all of its 4 MiB (the windows grow for it).
        c = http.client.HTTPConnection("127.0.0.1", proxy.ports["http"], timeout=30)
        c.request("GET", f"/bytes/{4 << 20}", headers={"Host": GOOD})
        body = c.getresponse().read()
        c.close()
        assert len(body) == 4 << 20
        assert per_visitor < 1024, f"{per_visitor:.0f} KiB per visitor that never reads"
        print(f"{n} visitors that never read: proxy RSS +{(held - rss0) / 1024:.1f} MiB, "
              f"{per_visitor:.0f} KiB each")
    finally:
        for s in visitors:
            s.close()
        for p in (client, proxy, origin):
            p.stop()


def test_proxy_drops_a_frozen_client_by_its_own_heartbeat(tmp_path):
    """Issue 17: the client process is frozen (SIGSTOP): its kernel keeps the connection and
    ACKs, but nothing comes back. The proxy's own heartbeat must notice (within its
    --heartbeat-timeout) and drop the tunnel and its names; with the proxy's heartbeat off,
    nothing ever would."""
    d = tmp_path
    interval, timeout = 1.0, 3.0
    origin = OriginProc(str(d), name="origin")
    proxy = ProxyProc(str(d), str(d / "proxy-data"), name="proxy", extra=[
        "--heartbeat-interval", str(interval), "--heartbeat-timeout", str(timeout)])
    client = ClientProc(str(d), str(d / "client"), [f"http:{GOOD}", f"127.0.0.1:{origin.port}"],
                        [f"127.0.0.1:{proxy.ports['tunnel']}"], pins=[proxy.fingerprint])
    try:
        proxy.wait_bound(GOOD)
        mark = len(proxy.log())
        client.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not proxy.status()["tunnels"],
                     "the proxy to drop the frozen client's tunnel", timeout=timeout + 30,
                     interval=0.2)
            assert not [b for b in proxy.status()["bindings"] if b["name"] == GOOD
                        and b["tunnels"]]
            assert "no heartbeat echo" in proxy.log()[mark:]
        finally:
            client.signal(signal.SIGCONT)
        proxy.wait_bound(GOOD, timeout=60)  # and the thawed client comes back
        assert good_get(proxy)[0] == 200
    finally:
        for p in (client, proxy, origin):
            p.stop()


def _poll(predicate, what: str, timeout: float = 10.0):
    """wait_for with gevent's sleep: a RawPeer reads in a greenlet of this thread."""
    deadline = time.monotonic() + timeout
    while not (last := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        gevent.sleep(0.05)
    return last


def test_a_grant_and_a_reset_in_one_write_end_the_stream_not_the_tunnel(world):
    """A tunnel client grants window to a stream the proxy is waiting to send an upload on and
    resets it, in one write (an honest client does, when its origin closes mid-upload): that
    stream ends, the tunnel goes on. The proxy's reader queued the waiting bytes for a stream
    it had just forgotten and ended the whole session (lib/net/muxsession.py, _send_pending)."""
    proxy = world["proxy"]
    name = "grant-rst.test"
    p = RawPeer(proxy.ports["tunnel"])
    visitors = []
    try:
        p.handshake(Identity.load_or_create(str(world["dir"] / "grant-rst")), name)
        p.start_reading()
        v = socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=10)
        visitors.append(v)
        v.sendall(f"POST / HTTP/1.1\r\nHost: {name}\r\nContent-Length: {1 << 20}\r\n\r\n"
                  .encode() + bytes(256 << 10))  # 4 windows' worth: the proxy waits for one
        sid = _poll(lambda: next((s for s, n in p.data_in.items() if n >= mp.INITIAL_WINDOW),
                                 None), "the stream's first window filled")
        # The race needs the proxy's sender waiting for window, its bytes left with the reader.
        _poll(lambda: any(t["sends_waiting"] for t in proxy.status()["tunnels"]
                          if name in t["names"]), "the proxy's sender waiting for window")
        p.send(fr.encode_wndinc(sid, 1 << 20) + fr.encode(fr.Rst(sid, ErrorCode.CANCEL)))
        opened = len(p.syns)
        v2 = socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=10)
        visitors.append(v2)
        v2.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        _poll(lambda: len(p.syns) > opened or p.closed.is_set(), "the next visitor's stream")
        assert not p.closed.is_set() and p.goaway is None, p.goaway
    finally:
        for s in visitors:
            s.close()
        p.close()


def test_visitors_aborting_downloads_do_not_drop_the_tunnel(world):
    """A visitor with no key reads part of a large answer and resets its connection, again
    and again: the proxy's grant for that stream and its reset can reach the client in one
    read, where the client's reader queued the waiting answer for a stream it had just
    forgotten and ended the whole tunnel, every other visitor's connection with it
    (lib/net/muxsession.py, _send_pending). 200 visitors, 60 s at most."""
    proxy, client = world["proxy"], world["client"]
    failed = client.log().count(" failed: ")
    head = f"GET /bytes/{16 << 20} HTTP/1.1\r\nHost: {GOOD}\r\n\r\n".encode()
    deadline = time.monotonic() + 60
    for i in range(200):
        with socket.create_connection(("127.0.0.1", proxy.ports["http"]), timeout=10) as s:
            s.sendall(head)
            got, want = 0, (64 << 10) * (1 + i % 8)  # a window's worth to eight
            while got < want and (data := s.recv(65536)):
                got += len(data)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if time.monotonic() > deadline:
            break
    assert good_get(proxy)[0] == 200
    assert client.log().count(" failed: ") == failed, client.log()[-2000:]
