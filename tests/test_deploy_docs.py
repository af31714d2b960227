"""docs/DEPLOY.md's systemd units are units systemd accepts, as an operator would paste them.

Every ```ini block of the file that starts with ``# /etc/systemd/system/NAME`` is a unit. Each
is checked two ways:

- ``systemd-analyze verify`` (Debian's systemd package; scripts/setup.sh installs it): unknown
  sections and keys, values systemd cannot parse ("Failed to parse sec value, ignoring"), a
  missing ExecStart binary. It runs on a unit file, not through PID 1, so it works inside the
  test's network namespace and in a container whose PID 1 is not systemd. ``--man=no``: a
  Documentation= man page is not looked up (man-db is no dependency). The binary in ExecStart
  is /opt/shroud/.venv/bin/python on a real VM; here it is replaced by this test's own Python
  (verify fails on a missing executable), and nothing else in the unit changes.
- systemd has no comments after a value: ``EnvironmentFile=-/etc/x.env  # secrets`` names a
  file called "/etc/x.env  # secrets", and with ``-`` its absence is silently ignored, so the
  secrets never load. ``verify`` accepts that line without a word, so this test refuses any
  value holding " #" or ";" after whitespace itself.
"""
import os
import re
import subprocess
import sys

import pytest

from tests.support.procs import ROOT

DEPLOY = os.path.join(ROOT, "docs", "DEPLOY.md")
UNIT_HEADER = re.compile(r"^# /etc/systemd/system/(\S+\.(?:service|socket|timer))$")


def units() -> dict[str, str]:
    """The units in docs/DEPLOY.md: file name -> text."""
    found = {}
    for block in re.findall(r"^```ini\n(.*?)^```", open(DEPLOY).read(), re.M | re.S):
        first = block.splitlines()[0]
        m = UNIT_HEADER.match(first)
        if m:
            found[m.group(1)] = block
    return found


def inline_comments(text: str) -> list[str]:
    """Lines where a value is followed by what a reader takes for a comment."""
    return [line for line in text.splitlines()
            if not line.lstrip().startswith(("#", ";")) and re.search(r"\s[#;]", line)]


def test_deploy_md_has_units():
    assert "shroud-proxy.service" in units()


@pytest.mark.parametrize("name", sorted(units()))
def test_unit_has_no_inline_comment(name):
    assert inline_comments(units()[name]) == [], (
        f"docs/DEPLOY.md, {name}: systemd reads these '#' as part of the value")


@pytest.mark.parametrize("name", sorted(units()))
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, name):
    text = re.sub(r"^(ExecStart=)/opt/shroud/\.venv/bin/python\b", r"\1" + sys.executable,
                  units()[name], flags=re.M)
    path = tmp_path / name
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on values it ignores; any line about our file is a mistake in it
    about_unit = [line for line in (done.stdout + done.stderr).splitlines() if name in line]
    assert done.returncode == 0 and about_unit == [], done.stdout + done.stderr
