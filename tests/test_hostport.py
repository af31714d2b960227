"""lib.hostport: one HOST:PORT rule set, and the callers that used to have their own."""
import re

import pytest

from lib.hostport import AddressError, client_network, format_hostport, parse_hostport


@pytest.mark.parametrize("text,kwargs,want", [
    ("example.com:443", {}, ("example.com", 443)),
    ("127.0.0.1:1", {}, ("127.0.0.1", 1)),
    ("h:65535", {}, ("h", 65535)),
    ("[2001:db8::1]:8443", {}, ("2001:db8::1", 8443)),
    ("[::1]:9050", {}, ("::1", 9050)),
    (":8080", {"default_host": "0.0.0.0"}, ("0.0.0.0", 8080)),
    ("8080", {"default_host": "0.0.0.0"}, ("0.0.0.0", 8080)),
    ("proxy.example", {"default_port": 4443}, ("proxy.example", 4443)),
    ("[2001:db8::2]", {"default_port": 4443}, ("2001:db8::2", 4443)),
    ("2001:db8::2", {"default_port": 4443}, ("2001:db8::2", 4443)),
    ("127.0.0.1:0", {"port_zero": True}, ("127.0.0.1", 0)),
])
def test_accepted(text, kwargs, want):
    assert parse_hostport(text, **kwargs) == want


@pytest.mark.parametrize("text,kwargs,reason", [
    ("example.com", {}, "no port"),
    (":8080", {}, "no host"),
    ("8080", {}, "no host"),
    ("h:0", {}, "outside 1-65535"),
    ("h:65536", {}, "outside 1-65535"),
    ("h:99999", {"port_zero": True}, "outside 0-65535"),
    ("h:", {}, "not a number"),
    ("h:-1", {}, "not a number"),
    ("h:+80", {}, "not a number"),
    ("h: 80", {}, "not a number"),
    ("h:٨٠", {}, "not a number"),  # Arabic-Indic digits: isdigit() says yes, int() reads them
    ("h:" + "9" * 5000, {}, "not a number"),
    ("2001:db8::1:443", {}, "in brackets"),
    ("[2001:db8::1", {}, "unterminated"),
    ("[not-v6]:1", {}, "not an IPv6 address"),
    ("[::1]x:1", {}, "after the [IPv6]"),
    ("a b:1", {}, "bad host"),
    ("user@h:1", {}, "bad host"),
    ("h/x:1", {}, "bad host"),
    ("x" * 254 + ":1", {}, "bad host"),
    ("", {}, "no port"),
])
def test_refused_with_reason_naming_input(text, kwargs, reason):
    with pytest.raises(AddressError, match=re.escape(reason)) as e:
        parse_hostport(text, what="--flag", **kwargs)
    assert str(e.value).startswith("--flag must be HOST:PORT, got ")
    assert repr(text[:300]) in str(e.value)


def test_not_a_string_and_is_a_value_error():
    with pytest.raises(ValueError):
        parse_hostport(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("host,port", [("a.example", 1), ("10.0.0.1", 443), ("2001:db8::1", 80)])
def test_format_round_trips(host, port):
    assert parse_hostport(format_hostport(host, port)) == (host, port)
    assert format_hostport("2001:db8::1", 80) == "[2001:db8::1]:80"


def test_callers_share_the_rules():
    """Every former copy now range-checks the port and understands [IPv6]."""
    from lib.client import discovery as cdisc
    from lib.client.tunnels import ProxyAddr, Service
    from lib.proxy import discovery as pdisc
    from lib.proxy.server import parse_addr

    assert Service.parse("a.example", "[::1]:443").target == ("::1", 443)
    with pytest.raises(ValueError, match="outside 1-65535"):
        Service.parse("a.example", "127.0.0.1:70000")
    assert ProxyAddr.parse("[2001:db8::1]:4443") == ProxyAddr("2001:db8::1", 4443)
    assert str(ProxyAddr("2001:db8::1", 4443)) == "[2001:db8::1]:4443"
    with pytest.raises(ValueError, match="--proxy"):
        ProxyAddr.parse("p.example:0")
    assert parse_addr(":0") == ("0.0.0.0", 0)  # a listener: any free port
    assert parse_addr("[::]:443") == ("::", 443)
    with pytest.raises(ValueError, match="outside"):
        parse_addr("127.0.0.1:65536")
    with pytest.raises(cdisc.DiscoveryError, match="--dns-resolver"):
        cdisc.parse_resolver("1.1.1.1:0")
    with pytest.raises(ValueError, match="--dns-resolver"):
        pdisc.parse_resolver("1.1.1.1:99999")
    with pytest.raises(ValueError, match="--fleet entry"):
        pdisc.parse_fleet("p.example:0")


def test_send_quietly_and_nodelay_are_shared(tmp_path):
    import socket

    from lib.net.sockets import send_quietly, set_nodelay
    a, b = socket.socketpair()
    assert set_nodelay(a) is False  # not TCP: left alone, no error
    send_quietly(a, b"bye")
    assert b.recv(3) == b"bye"
    b.close()
    a.close()
    send_quietly(a, b"to a closed socket")  # no error either
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    assert set_nodelay(c) is True and c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    c.close()
    srv.close()


def test_proxy_peer_host_reads_back_what_the_proxy_writes():
    """Claim rates are kept per peer address: an IPv6 peer must map to its address, not to
    address-and-port (which an unbracketed "2001:db8::1:443" would)."""
    from lib.hostport import format_hostport
    from lib.proxy.tunnels import peer_host
    assert peer_host(format_hostport("2001:db8::1", 443)) == "2001:db8::1"
    assert peer_host(format_hostport("2001:db8::1", 444)) == "2001:db8::1"
    assert peer_host("203.0.113.9:5") == "203.0.113.9"
    assert peer_host("not-an-address") == "not-an-address"


def test_client_network_keys_ipv6_by_its_64_and_mapped_ipv4_by_ipv4():
    assert client_network("203.0.113.9") == "203.0.113.9"
    assert client_network("::ffff:203.0.113.9") == "203.0.113.9"
    assert client_network("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_network("2001:db8:1:2:bbbb::7") == client_network("2001:db8:1:2::1")
    assert client_network("2001:db8:1:3::1") != client_network("2001:db8:1:2::1")
    assert client_network("fe80::1%lo") == "fe80::/64"
    assert client_network("") == "" and client_network("unix") == "unix"
