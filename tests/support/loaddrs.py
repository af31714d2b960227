"""Extra addresses on the test's own loopback, for attacks from many source addresses.

    with loopback_addresses(["2001:db8:64:1::1", ...]):   # IPv6, /128 each, no DAD wait
        ...  # connect with source_address=(addr, 0)

The tests run in a private network namespace (scripts/test.sh) as its root, so adding and
removing addresses on its lo touches nothing outside it. Documentation prefixes only
(2001:db8::/32, RFC 3849).
"""
from __future__ import annotations

import subprocess
from contextlib import contextmanager


@contextmanager
def loopback_addresses(addresses):
    added = []
    try:
        for addr in addresses:
            subprocess.run(["ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"],
                           check=True)
            added.append(addr)
        yield added
    finally:
        for addr in added:
            subprocess.run(["ip", "-6", "addr", "del", f"{addr}/128", "dev", "lo"], check=False)
