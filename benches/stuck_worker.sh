#!/usr/bin/env bash
# How each balancing strategy behaves when one worker is stuck: 2 workers, one blocked for
# 3 s by GET /block/3000, then 10 sequential GET / timed from the client. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
rip=target/release/rip
for balance in least-pending round-robin; do
  dir=$(mktemp -d); chmod 700 "$dir"; log="$dir/log"
  "$rip" serve --port 0 --workers 2 --balance "$balance" --runtime-dir "$dir/run" --access-log off 2>"$log" &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 100); do grep -q "all workers ready" "$log" && break; sleep 0.05; done
  port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$log" | head -1 | cut -d: -f2)
  curl -s -o /dev/null "http://127.0.0.1:$port/block/3000" &
  blocker=$!
  # The blocking request needs a moment to reach its worker; this is a demo, not a test.
  sleep 0.2
  start=$(date +%s%N); slow=0
  for _ in $(seq 10); do
    t0=$(date +%s%N); curl -s -o /dev/null "http://127.0.0.1:$port/"; t1=$(date +%s%N)
    [ $(( (t1 - t0) / 1000000 )) -gt 100 ] && slow=$((slow + 1))
  done
  end=$(date +%s%N)
  echo "$balance: 10 GETs while one worker is blocked: total $(( (end - start) / 1000000 )) ms, slow(>100ms)=$slow"
  wait "$blocker" || true
  kill "$pid"; wait "$pid" || true
  rm -rf "$dir"
done
