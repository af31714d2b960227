#!/usr/bin/env bash
# The Shroud demo: a private Tor network, three proxies, a sample HTTPS site and a client, all on
# loopback. Installs what it needs (scripts/setup.sh), then runs scripts/demo.py. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh demo
exec .venv/bin/python scripts/demo.py "$@"
