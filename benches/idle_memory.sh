#!/usr/bin/env bash
# What rip serve --workers 2 (release) holds while idle: RSS and PSS of the front-end and of
# each worker, right after every worker is ready, after 20 sequential GET / (each shard's
# connections to the workers opened), and 6 s after 2 s of wrk -c100 (the heap trimmed).
# RSS counts every page a process maps, the binary's and libc's shared ones included; PSS
# divides each shared page between the processes that map it. Loopback only; bounded.
#
#     benches/idle_memory.sh [RUNS]     # default 3; prints a markdown table of medians
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cargo build --release --quiet
rip=target/release/rip
command -v wrk >/dev/null || { echo "idle_memory.sh needs wrk (Debian: apt install wrk)" >&2; exit 1; }
dir=$(mktemp -d); chmod 700 "$dir"
pid=
trap '[[ -n $pid ]] && { kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; }; rm -rf "$dir"' EXIT

# kB of a field of smaps_rollup (Rss, Pss) for the front-end and its workers: "front w1 w2".
measure() {
  local field=$1 line="" p
  for p in $pid $(pgrep -P "$pid" | sort -n); do
    line+="$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/smaps_rollup") "
  done
  echo "$line"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

results=$dir/results
for run in $(seq "$runs"); do
  "$rip" serve --port 0 --workers 2 --runtime-dir "$dir/run$run" --access-log off 2>"$dir/log" &
  pid=$!
  for _ in $(seq 100); do grep -q "all workers ready" "$dir/log" && break; sleep 0.1; done
  grep -q "all workers ready" "$dir/log" || { cat "$dir/log" >&2; exit 1; }
  port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
  # Not readiness waits: what is measured is what the process holds after these pauses.
  sleep 1
  echo "ready $(measure Rss) $(measure Pss)" >>"$results"
  for _ in $(seq 20); do curl -sf -o /dev/null "http://127.0.0.1:$port/"; done
  sleep 2
  echo "requests $(measure Rss) $(measure Pss)" >>"$results"
  wrk -t2 -c100 -d2s "http://127.0.0.1:$port/" >/dev/null
  sleep 6
  echo "load $(measure Rss) $(measure Pss)" >>"$results"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
done

mib() { awk '{ printf "%.1f", $1 / 1024 }'; }
echo "rip $(git rev-parse --short HEAD), $runs runs, medians; MiB"
echo
echo "| when | front-end RSS | each worker RSS | total RSS | total PSS |"
echo "|---|--:|--:|--:|--:|"
for when in ready requests load; do
  rows=$(grep "^$when " "$results")
  front=$(awk '{ print $2 }' <<<"$rows" | median | mib)
  worker=$(awk '{ print $3; print $4 }' <<<"$rows" | median | mib)
  total=$(awk '{ print $2 + $3 + $4 }' <<<"$rows" | median | mib)
  lo=$(awk '{ print $2 + $3 + $4 }' <<<"$rows" | sort -g | head -1 | mib)
  hi=$(awk '{ print $2 + $3 + $4 }' <<<"$rows" | sort -g | tail -1 | mib)
  pss=$(awk '{ print $5 + $6 + $7 }' <<<"$rows" | median | mib)
  case $when in
    ready) label="every worker ready" ;;
    requests) label="after 20 GET /" ;;
    load) label="6 s after 2 s of wrk -c100" ;;
  esac
  echo "| $label | $front | $worker | $total ($lo–$hi) | $pss |"
done
