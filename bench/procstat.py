"""A process's resident memory, CPU time and open descriptors from /proc (Linux), for the
benchmarks that watch the proxy under load::

    rss_kib(pid) -> int          # VmRSS in KiB (0 when the kernel does not say)
    cpu_seconds(pid) -> float    # user + system CPU time
    fd_count(pid) -> int         # open file descriptors
"""
from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold ')'
    return (int(fields[11]) + int(fields[12])) / TICK


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
