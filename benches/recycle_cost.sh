#!/usr/bin/env bash
# CPU that one recycle costs: `rip serve --workers 2` under `wrk -t1 -c$CONNS -d${SECS}s`
# with `--max-requests $MAX` and without, counted by `perf stat -e task-clock` over rip serve
# and every process it starts (workers, the fork server), from exec to exit. Per recycle =
# (CPU with recycling - its requests x the CPU per request without) / the recycles its log
# reports. Runs interleaved; with BASE_RIP=<another rip binary> that build runs beside this
# tree's, for a side-by-side figure. Loopback only; bounded in time.
#
#     benches/recycle_cost.sh [RUNS]      # default 5; prints a markdown table
#     BASE_RIP=/path/to/old/rip benches/recycle_cost.sh 7
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
MAX=${MAX:-1000}
CONNS=${CONNS:-50}
SECS=${SECS:-3}
for tool in wrk perf; do
  command -v $tool >/dev/null || { echo "recycle_cost.sh needs $tool (Debian: apt install wrk linux-perf)" >&2; exit 1; }
done
cargo build --release --quiet
builds=("this=target/release/rip")
[[ -n ${BASE_RIP:-} ]] && builds=("base=$BASE_RIP" "${builds[@]}")
dir=$(mktemp -d); chmod 700 "$dir"
pid=
trap '[[ -n $pid ]] && { kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; }; rm -rf "$dir"' EXIT

# One run: prints "requests cpu_ns recycles".
one() {
  local rip=$1 max=$2 log=$dir/log stat=$dir/stat port
  : >"$log"
  perf stat -x, -e task-clock -o "$stat" -- "$rip" serve --port 0 --workers 2 --max-requests "$max" \
    --runtime-dir "$dir/rt" --access-log off 2>"$log" &
  pid=$!
  for _ in $(seq 100); do grep -q "all workers ready" "$log" && break; sleep 0.1; done
  grep -q "all workers ready" "$log" || { cat "$log" >&2; exit 1; }
  port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$log" | head -1 | cut -d: -f2)
  local requests
  requests=$(wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:$port/" | awk '/requests in/ { print $1 }')
  pkill -TERM -P "$pid"
  wait "$pid" 2>/dev/null || true; pid=
  local ns recycles
  ns=$(awk -F, '/task-clock/ { printf "%d", $1 * 1e6 }' "$stat")
  recycles=$(grep -c " worker recycled " "$log" || true)
  echo "$requests $ns $recycles"
}

results=$dir/results
for run in $(seq "$runs"); do
  for build in "${builds[@]}"; do
    name=${build%%=*} rip=${build#*=}
    echo "$name none $(one "$rip" 0)" >>"$results"
    echo "$name max $(one "$rip" "$MAX")" >>"$results"
  done
done

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
echo "rip $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (src with uncommitted changes)'), $runs runs interleaved, wrk -t1 -c$CONNS -d${SECS}s, --workers 2 --max-requests $MAX"
echo
echo "| build | CPU µs/request without | with | recycles per run | CPU ms per recycle (min–max) |"
echo "|---|--:|--:|--:|--:|"
for build in "${builds[@]}"; do
  name=${build%%=*}
  # Pair each run's recycling figure with the same run's figure without.
  paste -d' ' <(grep "^$name none " "$results") <(grep "^$name max " "$results") |
    awk '{ base = $4 / $3; print base / 1000, $9 / $8 / 1000, $10, ($10 ? ($9 - $8 * base) / $10 / 1e6 : "nan") }' >"$dir/$name"
  without=$(awk '{ print $1 }' "$dir/$name" | median)
  with=$(awk '{ print $2 }' "$dir/$name" | median)
  recycles=$(awk '{ print $3 }' "$dir/$name" | median)
  per=$(awk '{ print $4 }' "$dir/$name" | median)
  lo=$(awk '{ print $4 }' "$dir/$name" | sort -g | head -1)
  hi=$(awk '{ print $4 }' "$dir/$name" | sort -g | tail -1)
  printf "| %s (%s) | %.1f | %.1f | %d | %.2f (%.2f–%.2f) |\n" "$name" "${build#*=}" "$without" "$with" "$recycles" "$per" "$lo" "$hi"
done
