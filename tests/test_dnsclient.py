"""lib.net.dnsclient: sans-I/O query/response checks, and real lookups against the loopback server."""
import random
import socket
import struct
import time

import pytest
from dnslib import A, CNAME, QTYPE, RR, TXT, DNSRecord

from lib.net import dnsclient
from lib.net.dnsclient import (DnsError, DnsNameError, DnsServerError, DnsTimeout, SrvRecord,
                           build_query, lookup_cname, lookup_srv, lookup_txt, order_srv,
                           parse_response, query)
from tests.fixtures.dns import RawBytes

FP = "ab" * 32

pytestmark = pytest.mark.timeout(30)


# --- sans-I/O -------------------------------------------------------------------------------
def _reply(qid=0x1234, name="_shroud.example.com", qtype="TXT", records=(), rcode=0):
    request = DNSRecord.parse(build_query(name, qtype, qid))
    reply = request.reply()
    reply.header.rcode = rcode
    for rr in records:
        reply.add_answer(rr)
    return reply.pack()


def test_build_query_is_a_recursive_question_with_our_id():
    packet = build_query("_shroud.Example.com.", "TXT", 0xBEEF)
    record = DNSRecord.parse(packet)
    assert record.header.id == 0xBEEF and record.header.rd == 1 and record.header.qr == 0
    assert str(record.q.qname) == "_shroud.Example.com." and record.q.qtype == QTYPE.TXT
    with pytest.raises(ValueError):
        build_query("x" * 254, "TXT", 1)
    with pytest.raises(ValueError):
        build_query("example.com", "NOPE", 1)


def test_parse_response_joins_txt_strings_and_checks_id_and_question():
    data = _reply(records=[RR("_shroud.example.com", QTYPE.TXT,
                              rdata=TXT([b"shroud-key=", FP.encode()]), ttl=30)])
    answer = parse_response(data, 0x1234, "_SHROUD.example.com.", "TXT")
    assert [r.value for r in answer.records] == ["shroud-key=" + FP]
    assert answer.records[0].ttl == 30
    with pytest.raises(DnsError) as exc:
        parse_response(data, 0x1235, "_shroud.example.com", "TXT")
    assert exc.value.kind == "malformed" and "id" in str(exc.value)
    with pytest.raises(DnsError, match="not other.example.com"):
        parse_response(data, 0x1234, "other.example.com", "TXT")
    with pytest.raises(DnsError, match="not _shroud.example.com SRV"):
        parse_response(data, 0x1234, "_shroud.example.com", "SRV")


def test_parse_response_rcodes_are_distinguished():
    with pytest.raises(DnsNameError) as exc:
        parse_response(_reply(rcode=3), 0x1234, "_shroud.example.com", "TXT")
    assert exc.value.kind == "nxdomain"
    with pytest.raises(DnsServerError) as exc:
        parse_response(_reply(rcode=2), 0x1234, "_shroud.example.com", "TXT")
    assert exc.value.kind == "servfail" and exc.value.rcode == 2
    with pytest.raises(DnsServerError) as exc:
        parse_response(_reply(rcode=5), 0x1234, "_shroud.example.com", "TXT")
    assert exc.value.kind == "refused"


def test_parse_response_refuses_queries_garbage_and_oversized_sections():
    query_packet = build_query("_shroud.example.com", "TXT", 0x1234)
    with pytest.raises(DnsError, match="not a response"):
        parse_response(query_packet, 0x1234, "_shroud.example.com", "TXT")
    with pytest.raises(DnsError, match="shorter"):
        parse_response(b"\x12\x34", 0x1234, "_shroud.example.com", "TXT")
    data = bytearray(_reply())
    data[6:8] = struct.pack("!H", dnsclient.MAX_RECORDS + 1)  # claimed answer count
    with pytest.raises(DnsError, match="records"):
        parse_response(bytes(data), 0x1234, "_shroud.example.com", "TXT")
    data = _reply(records=[RR("_shroud.example.com", QTYPE.TXT, rdata=TXT("x"))])
    for cut in range(13, len(data)):
        with pytest.raises(DnsError):
            parse_response(data[:cut], 0x1234, "_shroud.example.com", "TXT")


def test_parse_response_follows_cname_chain_and_detects_loops():
    data = _reply(name="www.example.com", qtype="A", records=[
        RR("www.example.com", QTYPE.CNAME, rdata=CNAME("edge.example.net")),
        RR("edge.example.net", QTYPE.A, rdata=A("127.0.0.9")),
        RR("unrelated.example.org", QTYPE.A, rdata=A("127.0.0.10")),
    ])
    answer = parse_response(data, 0x1234, "www.example.com", "A")
    assert [(r.name, r.value) for r in answer.records] == [("edge.example.net", "127.0.0.9")]
    loop = _reply(name="a.example.com", qtype="A", records=[
        RR("a.example.com", QTYPE.CNAME, rdata=CNAME("b.example.com")),
        RR("b.example.com", QTYPE.CNAME, rdata=CNAME("a.example.com")),
    ])
    with pytest.raises(DnsError, match="loop"):
        parse_response(loop, 0x1234, "a.example.com", "A")


def test_order_srv_priority_then_weight():
    records = [SrvRecord(20, 0, 1, "c"), SrvRecord(10, 1, 2, "a"), SrvRecord(10, 99, 3, "b")]
    first = {"a": 0, "b": 0}
    rng = random.Random(7)
    for _ in range(1000):
        ordered = order_srv(records, rng)
        assert ordered[-1].target == "c"  # higher priority number always last
        first[ordered[0].target] += 1
    # Weight 99 vs 1: b first ~99% of the time, a first sometimes (never starved).
    assert first["b"] > 900 and first["a"] > 0
    # Zero weights are still all returned.
    zero = [SrvRecord(1, 0, p, "t%d" % p) for p in range(5)]
    assert sorted(r.port for r in order_srv(zero, rng)) == list(range(5))
    # A lone "." target: the service is decidedly not available.
    assert order_srv([SrvRecord(0, 0, 0, ".")]) == []


# --- against the loopback server ------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_txt_srv_cname_lookups(dns_server, transport):
    dns = dns_server
    dns.add("_shroud.example.com", "TXT", "shroud-key=" + FP)
    dns.add("_shroud.example.com", "TXT", ["v=1 ", "other"])
    dns.add("_shroud._tcp.example.com", "SRV", (10, 0, 4443, "p1.example.com."))
    dns.add("_shroud._tcp.example.com", "SRV", (5, 0, 443, "p0.example.com"))
    dns.add("www.example.com", "CNAME", "example.com")
    dns.add("example.com", "A", "127.0.0.2")
    kw = dict(resolver=dns.address, transport=transport, timeout=5)
    assert sorted(lookup_txt("_shroud.example.com", **kw)) == sorted(
        ["shroud-key=" + FP, "v=1 other"])
    assert lookup_srv("_shroud._tcp.example.com", **kw) == [
        SrvRecord(5, 0, 443, "p0.example.com"), SrvRecord(10, 0, 4443, "p1.example.com")]
    assert lookup_cname("www.example.com", **kw) == "example.com"
    assert lookup_cname("example.com", **kw) is None  # exists, not an alias
    assert [r.value for r in query("www.example.com", "A", **kw).records] == ["127.0.0.2"]
    assert lookup_txt("missing.example.com", **kw) == []
    with pytest.raises(DnsNameError):
        query("missing.example.com", "TXT", **kw)
    assert {t for t, _, _ in dns.queries} == {transport}


def test_servfail_and_timeout_are_distinct_errors(dns_server):
    dns_server.fail("broken.example.com", "SERVFAIL")
    dns_server.drop("slow.example.com")
    with pytest.raises(DnsServerError) as exc:
        lookup_txt("broken.example.com", resolver=dns_server.address)
    assert exc.value.kind == "servfail" and "SERVFAIL" in str(exc.value)
    for transport in ("udp", "tcp"):
        started = time.monotonic()
        with pytest.raises(DnsTimeout) as exc:
            lookup_txt("slow.example.com", resolver=dns_server.address, transport=transport,
                       timeout=0.6)
        elapsed = time.monotonic() - started
        assert exc.value.kind == "timeout" and 0.5 < elapsed < 2.0
    # UDP resent once halfway through the wait.
    assert dns_server.count("slow.example.com") == 3


def test_unreachable_resolver_is_a_network_error():
    # A port with nothing bound: UDP gets ICMP port unreachable, TCP a refused connection.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    for transport in ("udp", "tcp"):
        with pytest.raises(DnsError) as exc:
            lookup_txt("x.example.com", resolver=("127.0.0.1", port), transport=transport,
                       timeout=2)
        assert exc.value.kind == "network", exc.value


def test_truncated_udp_answer_is_retried_over_tcp(dns_server):
    dns_server.add("_shroud.big.example.com", "TXT", "shroud-key=" + FP)
    dns_server.truncate_udp = True
    assert lookup_txt("_shroud.big.example.com", resolver=dns_server.address) == [
        "shroud-key=" + FP]
    assert [t for t, _, _ in dns_server.queries] == ["udp", "tcp"]


def test_udp_ignores_a_spoofed_wrong_id_datagram_then_takes_the_real_one(dns_server):
    def spoof(request, reply, transport):
        forged = DNSRecord.parse(reply.pack())
        forged.header.id ^= 0xFFFF
        forged.rr = [RR("_shroud.x.example.com", QTYPE.TXT, rdata=TXT("shroud-key=" + "cd" * 32))]
        return [forged.pack(), reply.pack()]
    dns_server.add("_shroud.x.example.com", "TXT", "shroud-key=" + FP)
    dns_server.respond_with("_shroud.x.example.com", spoof)
    assert lookup_txt("_shroud.x.example.com", resolver=dns_server.address) == [
        "shroud-key=" + FP]


def test_tcp_wrong_id_and_short_read_are_errors(dns_server):
    def wrong_id(request, reply, transport):
        reply.header.id ^= 1
        return [reply.pack()]

    def short(request, reply, transport):
        return [RawBytes(struct.pack("!H", 500) + reply.pack()[:20])]
    dns_server.add("a.example.com", "TXT", "x")
    dns_server.add("b.example.com", "TXT", "x")
    dns_server.respond_with("a.example.com", wrong_id)
    dns_server.respond_with("b.example.com", short)
    with pytest.raises(DnsError) as exc:
        lookup_txt("a.example.com", resolver=dns_server.address, transport="tcp")
    assert exc.value.kind == "malformed"
    with pytest.raises(DnsError) as exc:
        lookup_txt("b.example.com", resolver=dns_server.address, transport="tcp", timeout=1.5)
    assert exc.value.kind in ("network", "timeout")


def test_connect_factory_is_used_for_tcp(dns_server):
    dns_server.add("_shroud._tcp.example.com", "SRV", (1, 1, 443, "p.example.com"))
    dialled = []

    def connect(host, port, timeout):
        dialled.append((host, port))
        return socket.create_connection(dns_server.address, timeout=timeout)
    records = lookup_srv("_shroud._tcp.example.com", resolver=("dns.invalid", 53),
                         transport="tcp", connect=connect)
    assert records == [SrvRecord(1, 1, 443, "p.example.com")]
    assert dialled == [("dns.invalid", 53)]
    with pytest.raises(ValueError):
        query("x.example.com", "TXT", transport="udp", connect=connect)

    def refuse(host, port, timeout):
        raise ConnectionRefusedError("SOCKS: connection refused")
    with pytest.raises(DnsError) as exc:
        lookup_srv("_shroud._tcp.example.com", resolver=("dns.invalid", 53), transport="tcp",
                   connect=refuse)
    assert exc.value.kind == "network" and "SOCKS" in str(exc.value)


def test_fixture_serves_many_sequential_tcp_clients(dns_server):
    # Each lookup is its own TCP connection, closed after the answer: the bound is on
    # connections open at once, so twice the bound one after another are all answered.
    from tests.fixtures.dns import _MAX_TCP_CLIENTS
    dns_server.add("seq.example.com", "TXT", "v")
    for _ in range(2 * _MAX_TCP_CLIENTS + 1):
        assert lookup_txt("seq.example.com", resolver=dns_server.address, transport="tcp",
                          timeout=5) == ["v"]
    assert dns_server.refused_tcp_clients == 0


def test_fixture_counts_tcp_clients_over_its_bound():
    from tests.fixtures.dns import _MAX_TCP_CLIENTS, FakeDns
    dns = FakeDns()
    held = []
    try:
        for _ in range(_MAX_TCP_CLIENTS + 1):
            held.append(socket.create_connection(dns.address, timeout=5))
        held[-1].settimeout(5)
        assert held[-1].recv(1) == b""  # the one over the bound is closed...
        assert dns.refused_tcp_clients == 1  # ...and counted, which fails its test
    finally:
        for s in held:
            s.close()
        dns.stop()
