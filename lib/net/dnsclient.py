"""A small DNS stub client: TXT, SRV and CNAME lookups over UDP or TCP.

Query building and answer parsing are pure functions over bytes (dnslib does the wire format);
the I/O is one blocking exchange with a resolver, through the ``socket`` module (under gevent
the entry point has monkey-patched it). A caller that must not touch the network directly, the
Tor client, passes ``connect``: a socket factory that dials through Tor's SOCKS port, so the
lookup travels as DNS over TCP through a Tor circuit.

Public API::

    query(name, rtype, resolver=("127.0.0.1", 53), transport="udp", timeout=5.0,
          connect=None) -> DnsAnswer
        rtype: "TXT" | "SRV" | "CNAME" | "A" | "AAAA" (or a dnslib QTYPE number)
        transport "udp" retries over TCP when the answer comes back truncated (TC).
        connect(host, port, timeout) -> socket   used to open the TCP connection (TCP only)
    lookup_txt(name, **query_kwargs) -> list[str]          # one str per TXT record
    lookup_srv(name, **query_kwargs, rng=None) -> list[SrvRecord]   # RFC 2782 order
    lookup_cname(name, **query_kwargs) -> str | None
    order_srv(records, rng=None) -> list[SrvRecord]        # RFC 2782 priority/weight order

    DnsAnswer(name, rtype, rcode, records: list[DnsRecord], truncated)
    DnsRecord(name, rtype, ttl, value)   value: str (TXT, CNAME, A, AAAA) or SrvRecord
    SrvRecord(priority, weight, port, target)

    build_query(name, rtype, query_id) -> bytes                      # sans-I/O
    parse_response(data, query_id, name, rtype) -> DnsAnswer        # sans-I/O, raises DnsError

    DnsError(Exception) .kind: "nxdomain" | "servfail" | "refused" | "rcode" | "timeout" |
                               "network" | "malformed"
      +- DnsNameError     (kind "nxdomain": the name does not exist)
      +- DnsServerError   (kind "servfail", "refused" or "rcode": the resolver failed)
      +- DnsTimeout       (kind "timeout"; also a TimeoutError)

The ``lookup_*`` helpers return ``[]`` (or ``None``) for a name that does not exist (NXDOMAIN)
or has no record of that type; ``query`` raises :class:`DnsNameError` for NXDOMAIN. Names are
returned without the trailing dot. A CNAME chain inside the answer is followed (bounded).
"""
from __future__ import annotations

import os
import random
import socket
import struct
import time
from typing import Callable, NamedTuple

from dnslib import CLASS, DNSError as _DnslibError, DNSHeader, DNSQuestion, DNSRecord, EDNS0, \
    QTYPE, RCODE

from lib.errors import ShroudError

# Bounds. A DNS message over TCP is at most 65535 bytes (16-bit length prefix, RFC 1035 4.2.2);
# we never read more than that, and over UDP we advertise EDNS0 1232 bytes (the DNS Flag Day
# 2020 size that avoids IP fragmentation) but still accept any datagram up to 65535.
MAX_MESSAGE = 65535
EDNS_PAYLOAD = 1232
# No legitimate answer we ask for (a few TXT or SRV records) comes near 256 records; refusing
# bigger sections caps the parsing work a hostile resolver can cause.
MAX_RECORDS = 256
# A CNAME chain longer than 8 inside one answer is a loop or an abuse (resolvers cap ~8-16).
MAX_CNAME_CHAIN = 8
# Stray UDP datagrams (wrong id or question, e.g. a late answer to an earlier query) are
# ignored, but only this many, so a flood cannot keep us spinning until the deadline.
MAX_STRAY_DATAGRAMS = 16

TRANSPORTS = ("udp", "tcp")


class DnsError(ShroudError):
    """A lookup failed. ``kind`` says how (see the module docstring); ``name`` is the name."""

    kind = "error"

    def __init__(self, message: str, *, name: str = "", kind: str | None = None):
        super().__init__(message)
        self.name = name
        if kind is not None:
            self.kind = kind


class DnsNameError(DnsError):
    """NXDOMAIN: the resolver says the name does not exist."""

    kind = "nxdomain"


class DnsServerError(DnsError):
    """The resolver answered with an error (SERVFAIL, REFUSED, ...). ``rcode`` is its code."""

    kind = "servfail"

    def __init__(self, message: str, *, name: str = "", rcode: int = RCODE.SERVFAIL):
        kind = {RCODE.SERVFAIL: "servfail", RCODE.REFUSED: "refused"}.get(rcode, "rcode")
        super().__init__(message, name=name, kind=kind)
        self.rcode = rcode


class DnsTimeout(DnsError, TimeoutError):
    """No answer from the resolver within the timeout."""

    kind = "timeout"


class SrvRecord(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str


class DnsRecord(NamedTuple):
    name: str
    rtype: str
    ttl: int
    value: object  # str, or SrvRecord for SRV


class DnsAnswer(NamedTuple):
    name: str
    rtype: str
    rcode: int
    records: list  # list[DnsRecord] answering the question (after following CNAMEs)
    truncated: bool


# --- sans-I/O -------------------------------------------------------------------------------
def _qtype(rtype) -> int:
    if isinstance(rtype, int):
        return rtype
    try:
        return getattr(QTYPE, rtype.upper())
    except (AttributeError, _DnslibError):
        raise ValueError("unknown DNS record type %r" % (rtype,)) from None


def _type_name(qtype: int) -> str:
    return str(QTYPE.get(qtype, str(qtype)))


def _canon(name) -> str:
    """Lower-case, no trailing dot: the form names are compared and returned in."""
    return str(name).rstrip(".").lower()


def build_query(name: str, rtype, query_id: int) -> bytes:
    """A recursive query for (name, rtype) with the given 16-bit id, advertising EDNS0."""
    if not 0 <= query_id <= 0xFFFF:
        raise ValueError("query id is 16 bits")
    name = name.rstrip(".")
    if not name or len(name) > 253 or not name.isascii():
        raise ValueError("invalid DNS name %r" % name)
    record = DNSRecord(DNSHeader(id=query_id, rd=1), q=DNSQuestion(name, _qtype(rtype)))
    record.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    return record.pack()


def parse_response(data: bytes, query_id: int, name: str, rtype) -> DnsAnswer:
    """Check that ``data`` answers our query and extract the records for the question.

    :raises DnsError: kind "malformed" when the response is unparsable, too big, has another id
        or question, or is not a response; :class:`DnsNameError` on NXDOMAIN;
        :class:`DnsServerError` on any other non-zero RCODE.
    """
    qtype = _qtype(rtype)
    want = _canon(name)
    if len(data) < 12:
        raise DnsError("DNS response shorter than a header", name=want, kind="malformed")
    if len(data) > MAX_MESSAGE:
        raise DnsError("DNS response larger than %d bytes" % MAX_MESSAGE, name=want,
                       kind="malformed")
    resp_id, _flags, qd, an, ns, ar = struct.unpack("!6H", data[:12])
    if resp_id != query_id:
        raise DnsError("DNS response id %d does not match query id %d" % (resp_id, query_id),
                       name=want, kind="malformed")
    if qd != 1:
        raise DnsError("DNS response carries %d questions, expected 1" % qd, name=want,
                       kind="malformed")
    if an + ns + ar > MAX_RECORDS:
        raise DnsError("DNS response has %d records (limit %d)" % (an + ns + ar, MAX_RECORDS),
                       name=want, kind="malformed")
    try:
        record = DNSRecord.parse(data)
    except (_DnslibError, ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise DnsError("unparsable DNS response: %s" % exc, name=want, kind="malformed") \
            from None
    header = record.header
    if not header.qr:
        raise DnsError("DNS message is a query, not a response", name=want, kind="malformed")
    question = record.questions[0]
    if _canon(question.qname) != want or question.qtype != qtype \
            or question.qclass != CLASS.IN:
        raise DnsError("DNS response is for %s %s, not %s %s" % (
            _canon(question.qname), _type_name(question.qtype), want, _type_name(qtype)),
            name=want, kind="malformed")
    rcode = header.rcode
    if rcode == RCODE.NXDOMAIN:
        raise DnsNameError("%s does not exist (NXDOMAIN)" % want, name=want)
    if rcode != RCODE.NOERROR:
        raise DnsServerError("resolver answered %s for %s %s" % (
            RCODE.get(rcode, rcode), want, _type_name(qtype)), name=want, rcode=rcode)
    return DnsAnswer(want, _type_name(qtype), rcode,
                     _answer_records(record.rr, want, qtype), bool(header.tc))


def _answer_records(rrs, name: str, qtype: int) -> list:
    """Records answering (name, qtype), following CNAMEs found in the same answer section."""
    current = name
    seen = {current}
    for _ in range(MAX_CNAME_CHAIN):
        if qtype == QTYPE.CNAME:
            break
        alias = [rr for rr in rrs if rr.rtype == QTYPE.CNAME and rr.rclass == CLASS.IN
                 and _canon(rr.rname) == current]
        if not alias or any(rr.rtype == qtype and _canon(rr.rname) == current for rr in rrs):
            break
        current = _canon(alias[0].rdata.label)
        if current in seen:
            raise DnsError("CNAME loop at %s" % current, name=name, kind="malformed")
        seen.add(current)
    out = []
    for rr in rrs:
        if rr.rtype != qtype or rr.rclass != CLASS.IN or _canon(rr.rname) != current:
            continue
        out.append(DnsRecord(current, _type_name(qtype), rr.ttl, _rdata_value(rr)))
    return out


def _rdata_value(rr):
    rdata = rr.rdata
    if rr.rtype == QTYPE.TXT:
        # A TXT record is one or more <=255-byte strings; like SPF (RFC 7208 3.3) we read the
        # record as their concatenation.
        return b"".join(rdata.data).decode("utf-8", "replace")
    if rr.rtype == QTYPE.SRV:
        return SrvRecord(rdata.priority, rdata.weight, rdata.port, _canon(rdata.target))
    if rr.rtype == QTYPE.CNAME:
        return _canon(rdata.label)
    return str(rdata)


def order_srv(records, rng: random.Random | None = None) -> list:
    """SRV records in the order to try them (RFC 2782): ascending priority, and within one
    priority a weighted random order (weight-0 records first in the running sum, so they are
    picked rarely but not never). A single record whose target is "." means the service is
    decidedly not available: the result is then empty."""
    records = list(records)
    if len(records) == 1 and records[0].target in ("", "."):
        return []
    rng = rng or random.SystemRandom()
    ordered = []
    for priority in sorted({r.priority for r in records}):
        group = sorted((r for r in records if r.priority == priority),
                       key=lambda r: r.weight != 0)  # weight 0 first (stable)
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total)
            running = 0
            for i, r in enumerate(group):
                running += r.weight
                if running >= pick:
                    ordered.append(group.pop(i))
                    break
    return [r for r in ordered if r.target not in ("", ".")]


# --- I/O ------------------------------------------------------------------------------------
def _default_connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def _remaining(deadline: float, name: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DnsTimeout("no DNS answer for %s in time" % name, name=name)
    return left


def _exchange_udp(packet: bytes, query_id: int, name: str, rtype, resolver, deadline: float):
    family = socket.AF_INET6 if ":" in resolver[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # connect() makes the kernel drop datagrams from any other address.
        sock.connect(resolver)
        sock.send(packet)
        # One resend halfway through the wait covers a single lost datagram.
        resend_at = time.monotonic() + (deadline - time.monotonic()) / 2
        resent = False
        strays = 0
        while True:
            now = time.monotonic()
            wait = _remaining(deadline, name)
            if not resent:
                wait = max(0.001, min(wait, resend_at - now))
            sock.settimeout(wait)
            try:
                data = sock.recv(MAX_MESSAGE)
            except socket.timeout:
                if not resent and time.monotonic() >= resend_at:
                    sock.send(packet)
                    resent = True
                continue
            try:
                return parse_response(data, query_id, name, rtype)
            except DnsError as exc:
                if exc.kind != "malformed":
                    raise
                strays += 1  # a spoofed or late datagram: ignore it, keep waiting
                if strays >= MAX_STRAY_DATAGRAMS:
                    raise
    except DnsError:
        raise
    except ConnectionRefusedError:
        raise DnsError("DNS resolver %s:%d refused the UDP query (port closed)" % resolver,
                       name=name, kind="network") from None
    except OSError as exc:
        raise DnsError("DNS over UDP to %s:%d failed: %s" % (resolver[0], resolver[1], exc),
                       name=name, kind="network") from None
    finally:
        sock.close()


def _recv_exactly(sock, n: int, deadline: float, name: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(_remaining(deadline, name))
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout:
            raise DnsTimeout("no DNS answer for %s in time" % name, name=name) from None
        if not chunk:
            raise DnsError("DNS resolver closed the TCP connection after %d of %d bytes"
                           % (len(buf), n), name=name, kind="network")
        buf += chunk
    return bytes(buf)


def _exchange_tcp(packet: bytes, query_id: int, name: str, rtype, resolver, deadline: float,
                  connect):
    try:
        sock = (connect or _default_connect)(resolver[0], resolver[1],
                                            _remaining(deadline, name))
    except DnsError:
        raise
    except (socket.timeout, TimeoutError):
        raise DnsTimeout("connecting to DNS resolver %s:%d timed out" % tuple(resolver),
                         name=name) from None
    except OSError as exc:
        raise DnsError("cannot connect to DNS resolver %s:%d: %s" % (resolver[0], resolver[1],
                       exc), name=name, kind="network") from None
    try:
        sock.settimeout(_remaining(deadline, name))
        sock.sendall(struct.pack("!H", len(packet)) + packet)
        # The 2-byte prefix bounds the answer at 65535 bytes (MAX_MESSAGE).
        (length,) = struct.unpack("!H", _recv_exactly(sock, 2, deadline, name))
        data = _recv_exactly(sock, length, deadline, name)
    except DnsError:
        raise
    except socket.timeout:
        raise DnsTimeout("no DNS answer for %s in time" % name, name=name) from None
    except OSError as exc:
        raise DnsError("DNS over TCP to %s:%d failed: %s" % (resolver[0], resolver[1], exc),
                       name=name, kind="network") from None
    finally:
        sock.close()
    return parse_response(data, query_id, name, rtype)


def query(name: str, rtype, resolver=("127.0.0.1", 53), transport: str = "udp",
          timeout: float = 5.0,
          connect: Callable[[str, int, float], socket.socket] | None = None) -> DnsAnswer:
    """Ask ``resolver`` for (name, rtype) and return the validated answer.

    ``timeout`` bounds the whole lookup (including a TCP retry after a truncated UDP answer).

    :raises DnsNameError: NXDOMAIN.  :raises DnsServerError: SERVFAIL, REFUSED, other RCODEs.
    :raises DnsTimeout: no answer in time.  :raises DnsError: unreachable resolver ("network")
        or a response that does not answer the query ("malformed").
    :raises ValueError: bad arguments (unknown type or transport, ``connect`` with UDP).
    """
    if transport not in TRANSPORTS:
        raise ValueError("transport must be 'udp' or 'tcp', not %r" % (transport,))
    if connect is not None and transport != "tcp":
        raise ValueError("a connect() socket factory only applies to transport='tcp'")
    if not timeout or timeout <= 0:
        raise ValueError("timeout must be positive")
    resolver = (str(resolver[0]), int(resolver[1]))
    name = _canon(name)
    deadline = time.monotonic() + timeout
    query_id = int.from_bytes(os.urandom(2), "big")  # unpredictable: spoofing needs the id
    packet = build_query(name, rtype, query_id)
    if transport == "udp":
        answer = _exchange_udp(packet, query_id, name, rtype, resolver, deadline)
        if not answer.truncated:
            return answer
        query_id = int.from_bytes(os.urandom(2), "big")
        packet = build_query(name, rtype, query_id)
    return _exchange_tcp(packet, query_id, name, rtype, resolver, deadline, connect)


def lookup_txt(name: str, **kwargs) -> list:
    """The TXT records of ``name`` as strings (each record's strings concatenated).
    Empty when the name does not exist or has none. Other errors raise :class:`DnsError`."""
    try:
        return [r.value for r in query(name, "TXT", **kwargs).records]
    except DnsNameError:
        return []


def lookup_srv(name: str, rng: random.Random | None = None, **kwargs) -> list:
    """The SRV records of ``name`` (e.g. ``_shroud._tcp.example.com``) in RFC 2782 order."""
    try:
        records = [r.value for r in query(name, "SRV", **kwargs).records]
    except DnsNameError:
        return []
    return order_srv(records, rng)


def lookup_cname(name: str, **kwargs) -> str | None:
    """The canonical name ``name`` is an alias of, or None when it is not an alias."""
    try:
        records = query(name, "CNAME", **kwargs).records
    except DnsNameError:
        return None
    return records[0].value if records else None
