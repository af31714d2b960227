#!/usr/bin/env bash
# Through Tor: Shroud vs a v3 onion service (bench/tor_bench.py), as root:
#   ./bench/run_tor_bench.sh [--conns 10] [--rtts 50] [--bulk-mib 16] [--starts 3] [--no-readme]
# Runs the bench inside a private network namespace holding only loopback (the private network's
# exits accept any address: docs/DESIGN.md, testnet pitfall 1), with delayed ACKs off on lo
# (pitfall 10), exactly as scripts/test.sh runs the Tor tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SHROUD_IN_NETNS:-}" ]; then
    if [ "$(id -u)" = 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi
    exec "${ns[@]}" env SHROUD_IN_NETNS=1 "$0" "$@"
fi
ip link set lo up
ip route change table local local 127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1 quickack 1 2>/dev/null || true
ip route change table local local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 quickack 1 2>/dev/null || true
exec .venv/bin/python bench/tor_bench.py "$@"
