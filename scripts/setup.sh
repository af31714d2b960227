#!/usr/bin/env bash
# Installs everything Shroud's tests, benchmarks and demo need, and nothing twice:
#   - as root, Debian packages that are missing (tor, Go, muxado v1, chromium, nginx, wrk, sshd,
#     jemalloc, postgresql);
#   - always, a virtual environment at .venv with requirements.txt (pinned versions).
# A tool still missing afterwards is an error: CI must fail, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have tor         || need_pkgs+=(tor)
have go          || need_pkgs+=(golang-go)
[ -d /usr/share/gocode/src/github.com/inconshreveable/muxado ] || need_pkgs+=(golang-github-inconshreveable-muxado-dev)
have chromium    || need_pkgs+=(chromium)
have nginx       || need_pkgs+=(nginx-light)
have wrk         || need_pkgs+=(wrk)
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
have curl        || need_pkgs+=(curl)
have unshare     || need_pkgs+=(util-linux)
have ip          || need_pkgs+=(iproute2)
have strace      || need_pkgs+=(strace)
# PostgreSQL: the fleet store's tests start a real server (tests/fixtures/postgres.py).
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need_pkgs+=(postgresql)
# jemalloc: the entry points run on it (lib/allocator.py), so memory returns after a load peak.
compgen -G "/usr/lib/*-linux-gnu/libjemalloc.so.2" >/dev/null || need_pkgs+=(libjemalloc2)

if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${need_pkgs[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    else
        echo "setup: missing Debian packages: ${need_pkgs[*]}" >&2
        echo "setup: run as root once, or: sudo apt-get install ${need_pkgs[*]}" >&2
        exit 1
    fi
fi

# One stamp per requirements.txt content that was installed: several checkouts may share one .venv
# (a symlink), each with its own requirements.txt, and none should reinstall after another.
want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp=.venv/.requirements-$want.ok
if [ ! -x .venv/bin/python ] || [ ! -e "$stamp" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "setup: creating .venv" >&2
        python3 -m venv .venv
        .venv/bin/pip install -q --upgrade pip >/dev/null
    fi
    echo "setup: installing requirements.txt into .venv" >&2
    .venv/bin/pip install -q -r requirements.txt
    touch "$stamp"
fi
