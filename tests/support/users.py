"""Running a command as a regular user (nobody), for tests of what a non-root user meets.

    unprivileged() -> argv prefix (setpriv ...)
"""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = os.path.join(ROOT, ".venv", "bin", "python")


def unprivileged() -> list[str]:
    """argv prefix running a command as nobody. This machine's Python may live under a
    directory nobody cannot search (a pyenv in /root): then nobody may read past directory
    permissions (CAP_DAC_READ_SEARCH) and nothing more: it still cannot write a root file."""
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    python = os.path.realpath(PY)
    if subprocess.run([*prefix, "test", "-x", python]).returncode != 0:
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return prefix
