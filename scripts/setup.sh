#!/usr/bin/env bash
# Installs what Shroud needs, and nothing twice:
#   ./scripts/setup.sh         everything the tests and benchmarks need (CI runs this)
#   ./scripts/setup.sh demo    only what ./scripts/demo.sh uses (tor and a Python venv)
# - as root, the Debian packages that are missing;
# - always, a virtual environment at .venv with requirements.txt (pinned versions).
# Packages are found with dpkg-query, never on PATH: a regular user's PATH has no /usr/sbin, so
# an installed nginx or sshd would look missing. A package still missing afterwards is an error:
# CI must fail, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-all}
case "$mode" in
    all|demo) ;;
    *) echo "usage: $0 [demo]" >&2; exit 2 ;;
esac

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q ' installed$'; }
need_pkgs=()
want() { installed "$1" || need_pkgs+=("$1"); }

# The demo: tor (the private network's relays and the client's own tor), and python3-venv to
# create .venv (its Python packages come from requirements.txt).
want tor
[ -x .venv/bin/python ] || want python3-venv
if [ "$mode" = all ]; then
    want golang-go
    want golang-github-inconshreveable-muxado-dev  # the Go muxado the interop tests run
    want chromium                                  # dashboard and visitor browser tests
    want nginx-light                               # bench: nginx as the origin
    want wrk                                       # bench: load generator
    want openssh-server                            # bench: ssh -R as the baseline
    want curl
    want util-linux                                # unshare: tests run in a network namespace
    want iproute2
    want strace                                    # the Tor-mode connection audit
    want tmux                                      # the client console tests drive a terminal
    want systemd                                   # systemd-analyze verify: docs/DEPLOY.md's unit
    # PostgreSQL: the fleet store's tests start a real server (tests/fixtures/postgres.py).
    compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need_pkgs+=(postgresql)
    # jemalloc: the entry points run on it (lib/allocator.py), so memory returns after a load
    # peak. The demo runs without it (the allocator falls back to the system's).
    want libjemalloc2
    want pebble                                    # ACME test CA + pebble-challtestsrv (https: names)
    want libnss3-tools                             # certutil: Chromium trusts pebble's root
fi

if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${need_pkgs[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    else
        echo "setup: missing Debian packages: ${need_pkgs[*]}" >&2
        echo "setup: run this script as root once, or: sudo apt-get install ${need_pkgs[*]}" >&2
        exit 1
    fi
fi

# One stamp per requirements.txt content that was installed: several checkouts may share one .venv
# (a symlink), each with its own requirements.txt, and none should reinstall after another.
want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp=.venv/.requirements-$want.ok
if [ ! -x .venv/bin/python ] || [ ! -e "$stamp" ]; then
    if [ ! -w . ] || { [ -e .venv ] && [ ! -w .venv/ ]; }; then
        echo "setup: .venv needs installing or updating but $(pwd)/.venv is not writable by" \
             "$(id -un): run ./scripts/setup.sh once as its owner" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "setup: creating .venv" >&2
        python3 -m venv .venv
        .venv/bin/pip install -q --upgrade pip >/dev/null
    fi
    echo "setup: installing requirements.txt into .venv" >&2
    .venv/bin/pip install -q -r requirements.txt
    touch "$stamp"
fi
