#!/usr/bin/env bash
# rip in front of workers that are not rip, next to what their users would run instead, on
# this machine, in one run (benches/compare.sh does the measuring; see its header):
#
#     benches/any_language.sh        # about 3 minutes
#
#   rip-node      rip serve --workers 2 -- node examples/node/server.js
#   nginx-node    nginx (worker_processes auto) in front of the same two Node processes
#   node-cluster  Node's own cluster module, 2 workers running the same app
#   rip-bun       rip serve --workers 2 --app-socket path -- bun examples/bun/worker.ts
#   seed-bun      the Bun prototype rip grows from (../shared/seed-bun: bun manager.ts)
#
# Needs node; installs bun from the npm registry into target/bun when it is not on PATH.
# Report: target/bench-any-language.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v node >/dev/null || { echo "any_language.sh: node is needed (apt-get install nodejs)" >&2; exit 1; }
export SETUPS=${SETUPS:-"rip-node nginx-node node-cluster rip-bun seed-bun"}
export CASES=${CASES:-"get_c1 get_c100"}
export REPORT=${REPORT:-$ROOT/target/bench-any-language.md}
exec "$ROOT/benches/compare.sh" "$@"
