"""HOST:PORT text, parsed and written by one rule set for every flag, file and peer answer.

::

    parse_hostport(text, *, what="address", default_host=None, default_port=None,
                   port_zero=False) -> (host, port)               # raises AddressError
    format_hostport(host, port) -> "host:port" | "[v6]:port"
    client_network(host) -> "1.2.3.4" | "2001:db8::/64"         # whom a per-client limit counts
    AddressError (ValueError)                                     # names the input and the fix

The rules, the same everywhere (a flag, a --fleet entry, a discovery answer, a control port):

=====================================  =====================================================
text                                   answer
=====================================  =====================================================
``host:port``                          ``(host, port)``
``[2001:db8::1]:port``                 ``("2001:db8::1", port)``: IPv6 only in brackets
``:port`` or ``port``                  ``(default_host, port)`` where the caller has one (a
                                       listener's "all interfaces"); else an error
``host`` or ``[v6]`` or a bare IPv6    ``(host, default_port)`` where the caller has one;
                                       else an error
port outside 1-65535, not decimal      error (``port_zero=True`` also allows 0: a listener's
                                       "any free port", a visitor's unknown source port)
``2001:db8::1:443`` (unbracketed)      error: the port cannot be told from the address
host with spaces, ``/?#@[]``, > 253    error (253: the longest DNS name, RFC 1035)
=====================================  =====================================================

No I/O and no name resolution: a host is checked for shape only. A shared leaf below every floor
(docs/DESIGN.md, "Floors").
"""
from __future__ import annotations

import ipaddress

from lib.errors import ShroudError

MAX_HOST = 253  # the longest DNS name (RFC 1035 2.3.4); an IP literal is shorter
_MAX_PORT_DIGITS = 5  # "65535": refuse a 10 kB run of digits before int() reads it
_FORBIDDEN = frozenset(" \t\r\n/?#@[]")


class AddressError(ShroudError, ValueError):
    """A text that is not HOST:PORT by the rules above; the message names the input."""


def parse_hostport(text: str, *, what: str = "address", default_host: str | None = None,
                   default_port: int | None = None, port_zero: bool = False) -> tuple[str, int]:
    """``text`` -> ``(host, port)`` by the module's rules; IPv6 hosts come back unbracketed.

    :param what: how the message names the input, e.g. ``"--dns-resolver"``.
    :param default_host: the host for ``:PORT`` and ``PORT`` (None: a host is required).
    :param default_port: the port when none is written (None: a port is required).
    :param port_zero: port 0 is allowed (a listener's "any free port"; a peer's unknown port).
    :raises AddressError: naming ``what`` and ``text``.
    """
    if not isinstance(text, str):
        raise AddressError(f"{what} must be HOST:PORT, got {text!r}")
    host, port_text = _split(text, what)
    if port_text is None:
        if default_port is None:
            raise _error(what, text, "no port" if ":" not in host else
                         "no port; write an IPv6 address in brackets: [ADDR]:PORT")
        port = default_port
    else:
        port = _port(port_text, what, text, port_zero)
    if not host:
        if default_host is None:
            raise _error(what, text, "no host")
        host = default_host
    return host, port


def format_hostport(host: str, port: int) -> str:
    """The inverse of parse_hostport: an IPv6 host goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# One host is routinely given a whole IPv6 /64 (RFC 6177), so a limit kept per client address
# keys IPv6 by its /64: keyed by the full address, one host had 2^64 fresh windows.
IPV6_CLIENT_PREFIX = 64


def client_network(host: str) -> str:
    """The client a per-address limit (login throttle, claim rate) counts ``host`` as: an IPv4
    address (also IPv4-mapped, as a dual-stack socket shows it), the /64 of an IPv6 address,
    or ``host`` itself when it is no IP address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


def _split(text: str, what: str) -> tuple[str, str | None]:
    """``text`` -> (host, port text or None); the host is checked, the port not yet."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _error(what, text, "unterminated [IPv6] literal")
        host, rest = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _error(what, text, f"{host!r} in brackets is not an IPv6 address") from None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise _error(what, text, "text after the [IPv6] literal")
        return host, rest[1:]
    if text.isascii() and text.isdigit():
        return "", text
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)  # a bare IPv6 address, no port written
        except ValueError:
            raise _error(what, text, "write an IPv6 address in brackets: [ADDR]:PORT") from None
        return text, None
    host, sep, port = text.partition(":")
    if len(host) > MAX_HOST or any(c in _FORBIDDEN for c in host):
        raise _error(what, text, "bad host")
    return host, (port if sep else None)


def _port(port_text: str, what: str, text: str, port_zero: bool) -> int:
    # isdecimal() also accepts other scripts' digits; only ASCII 0-9 make a port.
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > _MAX_PORT_DIGITS:
        raise _error(what, text, "the port is not a number")
    port = int(port_text)
    low = 0 if port_zero else 1
    if not low <= port <= 65535:
        raise _error(what, text, f"port {port} is outside {low}-65535")
    return port


def _error(what: str, text: str, reason: str) -> AddressError:
    return AddressError(f"{what} must be HOST:PORT, got {text[:300]!r} ({reason})")
