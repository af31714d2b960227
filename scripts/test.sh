#!/usr/bin/env bash
# The whole test suite, as CI runs it: ./scripts/test.sh [pytest args]
# Installs what it needs (scripts/setup.sh), then runs pytest inside a private network namespace
# holding only loopback, so the private Tor network's exits can reach nothing else.
# The codec modules run compiled (lib/native.py); SHROUD_PURE=1 runs the pure-Python sources.
# Without arguments (CI) the protocol codec tests run twice: on the sources, then with the
# whole suite on the compiled build. Either pass fails if it did not run the build it names.
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
if [ "${SHROUD_PURE:-0}" = 0 ]; then build=compiled; else build=pure; fi
if [ $# = 0 ]; then
    # The compiled modules' own tests, the byte-level properties and Go interop, on the sources
    # (lib.protocol.messages is not compiled: its tests run once, below). Not the 35 s idle
    # heartbeat test: the whole run keeps within its 20-minute budget.
    SHROUD_PURE=1 SHROUD_EXPECT_BUILD=pure .venv/bin/python -m pytest -q \
        tests/test_native.py tests/test_frame.py tests/test_muxproto.py tests/test_sniff.py \
        tests/test_sniff_wire.py tests/test_httphead.py tests/test_fuzz.py tests/test_routing_unit.py \
        tests/test_mux_go_interop.py --deselect \
        tests/test_mux_go_interop.py::test_heartbeats_keep_idle_sessions_alive
fi
# The 40 slowest tests (of 0.5 s or more) close every log, so a run that grows toward the 20-minute budget shows where
# (a later --durations=N on the command line wins).
SHROUD_EXPECT_BUILD=$build exec .venv/bin/python -m pytest --durations=40 --durations-min=0.5 "$@"
