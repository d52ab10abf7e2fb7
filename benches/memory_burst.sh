#!/usr/bin/env bash
# The front-end's memory around bursts of large uploads: rip serve --workers 2 (release),
# idle, after each of three bursts of 20 concurrent 5 MiB POST /echo, and 3 s after the last.
# Loopback only; bounded (60 requests in all).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
rip=target/release/rip
dir=$(mktemp -d); chmod 700 "$dir"
head -c $((5 * 1024 * 1024)) /dev/urandom >"$dir/body"
"$rip" serve --port 0 --workers 2 --runtime-dir "$dir/run" --access-log off 2>"$dir/log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q "all workers ready" "$dir/log" && break; sleep 0.1; done
port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
rss() { awk '/VmRSS/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$pid/status"; }
echo "idle: $(rss)"
for round in 1 2 3; do
  clients=()
  for _ in $(seq 20); do
    curl -s -o /dev/null -X POST --data-binary @"$dir/body" "http://127.0.0.1:$port/echo" &
    clients+=($!)
  done
  wait "${clients[@]}"
  echo "after burst $round: $(rss)"
done
# Not a readiness wait: the measured behaviour is what a pause of this length does.
sleep 3
echo "3 s after the last: $(rss)"
