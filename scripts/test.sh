#!/usr/bin/env bash
# The whole test suite, as CI runs it: ./scripts/test.sh [pytest args]
# Installs what it needs (scripts/setup.sh), then runs pytest inside a private network namespace
# holding only loopback, so the private Tor network's exits can reach nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mkdir -p artifacts
if [ -z "${SHROUD_IN_NETNS:-}" ]; then
    if [ "$(id -u)" = 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi
    exec "${ns[@]}" env SHROUD_IN_NETNS=1 "$0" "$@"
fi
ip link set lo up
# Delayed ACKs on loopback add 40 ms stalls to tor's connections (docs/DESIGN.md, "Loopback").
ip route change table local local 127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1 quickack 1 2>/dev/null || true
ip route change table local local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 quickack 1 2>/dev/null || true
# The floors of lib/ (.importlinter, docs/DESIGN.md): a forbidden import fails the run before any test.
.venv/bin/lint-imports --no-cache --no-logo
# The 40 slowest tests (of 0.5 s or more) close every log, so a run that grows toward the 20-minute budget shows where
# (a later --durations=N on the command line wins).
exec .venv/bin/python -m pytest --durations=40 --durations-min=0.5 "$@"
