#!/usr/bin/env bash
# rip serving static files (`--root`) next to nginx serving the same directory, in one run
# (benches/compare.sh does the measuring; see its header):
#
#     benches/static.sh        # about 1 minute
#
# Report: target/bench-static.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SETUPS=${SETUPS:-"rip-static nginx-static"}
export CASES=${CASES:-"static_small_c50 static_100k_c50"}
export REPORT=${REPORT:-$ROOT/target/bench-static.md}
exec "$ROOT/benches/compare.sh" "$@"
