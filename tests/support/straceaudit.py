"""The connection audit of a Tor-mode client run under strace: the one copy, used by
tests/test_security.py (tunnel and redial) and tests/test_acme_tor.py (ACME through Tor).

    strace_argv(trace, argv, calls=CONNECT_CALLS) -> the command line running ``argv`` traced
    ClientTrace.read(trace)                         -> the client's calls, its tor's left out
    ClientTrace.audit(allowed, forbidden={})        -> {label: connects}; fails on anything else
    ClientTrace.connects_to(port)                   -> the client's connect() lines to ``port``
    socket_calls(lines)                             -> (family, address, port, path, line) each

An audit that skips what it cannot read would pass the very connection it exists to catch, so a
call naming an address this module cannot parse fails the test ("teach the audit to read it").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CONNECT_CALLS = "connect,sendto,sendmsg,execve"
# Name-service files: a client that opens one is resolving a name itself (outside Tor).
NAME_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf",
              "/etc/host.conf", "/var/run/nscd", "/run/nscd")

_SOCKADDR = re.compile(r"sa_family=AF_(\w+)(?:, sin6?_port=htons\((\d+)\), "
                       r"(?:sin_addr=inet_addr\(\"([\d.]+)\"\)|[^}]*))?(?:, sun_path=\"([^\"]*)\")?")
# A send with no address of its own (a connected socket), and the second half of a call strace
# split across threads (its address, if any, was on the "<unfinished ...>" half).
_NO_ADDRESS = re.compile(r"^\d+\s+(?:sendto\(.*, NULL, 0(?:\)| <unfinished)"
                         r"|sendmsg\(\d+, \{msg_name=NULL,)|<\.\.\. \w+ resumed>")
_TOR_EXEC = re.compile(r'execve\("[^"]*/tor"')


def strace_argv(trace: str, argv: list[str], calls: str = CONNECT_CALLS) -> list[str]:
    """``argv`` run under strace, following forks, writing ``calls`` to ``trace``; 64 bytes of
    each buffer are kept (enough for a SOCKS user name), signals are not traced."""
    return ["strace", "-f", "-qq", "-s", "64", "-o", trace, "-e", f"trace={calls}",
            "-e", "signal=none", *argv]


def socket_calls(lines: list[str]) -> list[tuple[str, str | None, int | None, str | None, str]]:
    """(family, address, port, unix path, line) of every connect/sendto/sendmsg that names an
    address.

    :raises AssertionError: a call names an address this parser cannot read.
    """
    out = []
    for ln in lines:
        call = re.match(r"\d+\s+(?:<\.\.\. )?(\w+)[( ]", ln)
        if call is None or call.group(1) not in ("connect", "sendto", "sendmsg"):
            continue
        if _NO_ADDRESS.search(ln):
            continue
        m = _SOCKADDR.search(ln)
        assert m is not None, f"strace line not understood (teach the audit to read it): {ln}"
        family, port, addr, path = m.groups()
        out.append((family, addr, int(port) if port else None, path, ln))
    return out


@dataclass
class ClientTrace:
    """The traced calls of the client itself: those of the tor it launched (every pid that
    exec'd a ``tor`` binary) are left out, since tor's own connections are tor's business."""
    mine: list[str]
    tor_pids: set[str]

    @classmethod
    def read(cls, trace: str) -> "ClientTrace":
        """:raises AssertionError: the client never launched tor (nothing to tell apart)."""
        with open(trace, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        tor_pids = {ln.split()[0] for ln in lines if _TOR_EXEC.search(ln)}
        assert tor_pids, "the client did not launch tor"
        return cls([ln for ln in lines if ln.split()[0] not in tor_pids], tor_pids)

    def audit(self, allowed: dict[int, str], forbidden: dict[int, str] | None = None
              ) -> dict[str, int]:
        """Every address the client names is 127.0.0.1 on a port of ``allowed`` ({port: label});
        no unix socket, no netlink send. Returns {label: calls}; every label must be seen.

        :param forbidden: {port: what} named in the failure when the client reaches one of them.
        :raises AssertionError: naming the offending strace line.
        """
        seen: dict[str, int] = {}
        for family, addr, port, path, ln in socket_calls(self.mine):
            assert family != "UNIX" or path in ("", None), f"unix socket connect: {ln}"
            if family in ("INET", "INET6"):
                assert port not in (forbidden or {}), \
                    f"the client reached {forbidden[port]} directly: {ln}"
                assert addr == "127.0.0.1" and port in allowed, \
                    f"the client connected somewhere else: {ln}"
                seen[allowed[port]] = seen.get(allowed[port], 0) + 1
            else:
                assert family != "NETLINK" or "sendto" not in ln, ln
        assert set(seen) == set(allowed.values()), seen
        return seen

    def connects_to(self, port: int) -> list[str]:
        """The client's connect() lines to 127.0.0.1:``port``."""
        return [ln for _, _, p, _, ln in socket_calls(self.mine) if p == port and " connect(" in ln]

    def name_lookups(self) -> list[str]:
        """The client's opens of a name-service file (needs ``open,openat`` traced)."""
        return [ln for ln in self.mine if "open" in ln.split("(")[0]
                and any(f'"{p}' in ln for p in NAME_FILES)]
