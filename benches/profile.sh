#!/usr/bin/env bash
# Where the server's CPU goes at GET / c=100: rip serve --workers 2 (release) under wrk, a
# system-wide perf profile (perf record -a -e cpu-clock) of 8 s, and each process's samples
# split by what the code is: the kernel, the h2 crate (HTTP/2 and HPACK, both ends of the
# hop), HTTP/1 (hyper's client side), tokio, the http types, malloc, memcpy, rip itself.
# Needs perf (Debian: apt install linux-perf) and wrk. Loopback only; bounded (14 s of load).
#
#     benches/profile.sh [extra rip serve flags]
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in perf wrk; do
  command -v $tool >/dev/null || { echo "profile.sh needs $tool (Debian: apt install linux-perf wrk)" >&2; exit 1; }
done
cargo build --release --quiet
dir=$(mktemp -d); chmod 700 "$dir"
target/release/rip serve --port 0 --workers 2 --access-log off --runtime-dir "$dir/run" "$@" 2>"$dir/log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q "all workers ready" "$dir/log" && break; sleep 0.1; done
grep -q "all workers ready" "$dir/log" || { cat "$dir/log" >&2; exit 1; }
port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
wrk -t2 -c100 -d14s "http://127.0.0.1:$port/" >"$dir/wrk" &
load=$!
sleep 3
# perf names samples by thread: every thread of the front-end, and of each worker.
threads() { ls "/proc/$1/task" | tr '\n' ',' | sed 's/,$//'; }
front=$(threads "$pid")
workers=$(for w in $(pgrep -P "$pid"); do threads "$w"; echo; done | tr '\n' ',' | sed 's/,,*/,/g; s/,$//')
perf record -q -a -e cpu-clock -o "$dir/perf.data" -- sleep 8 2>/dev/null
wait $load
grep "Requests/sec" "$dir/wrk"
perf report -i "$dir/perf.data" --no-children --sort pid,sym --stdio -g none 2>/dev/null >"$dir/report"
python3 - "$dir/report" "$front" "$workers" <<'PYEOF'
import collections, re, sys
report, front, workers = sys.argv[1], set(sys.argv[2].split(",")), set(sys.argv[3].split(","))
def kind(k, s):
    if k == "k": return "kernel"
    if "h2::" in s or "hpack" in s or "proto::h2" in s or "H2Client" in s: return "h2 (HTTP/2, HPACK)"
    if "proto::h1" in s: return "hyper HTTP/1"
    if "hyper" in s: return "hyper, other"
    if re.search(r"malloc|free|unlink_chunk|realloc", s): return "malloc"
    if s.startswith("__mem"): return "memcpy/memmove"
    if "tokio" in s: return "tokio"
    if "http::" in s: return "http types"
    if "rip::" in s: return "rip"
    return "other"
shares = {"front-end": collections.Counter(), "workers": collections.Counter()}
total = 0.0
for line in open(report):
    m = re.match(r"\s*([\d.]+)%\s+(\d+):\S+\s+\[(.)\]\s+(.*)", line)
    if not m: continue
    pct, pid, k, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
    total += pct
    who = "front-end" if pid in front else "workers" if pid in workers else None
    if who: shares[who][kind(k, sym)] += pct
server = sum(sum(c.values()) for c in shares.values())
print(f"server (front-end and workers): {server:.1f}% of all samples")
for who, c in shares.items():
    own = sum(c.values())
    print(f"\n{who}: {own:.1f}% of all samples")
    for what, pct in c.most_common():
        print(f"  {what:22} {100 * pct / own:5.1f}% of its own")
h2 = sum(c["h2 (HTTP/2, HPACK)"] for c in shares.values())
print(f"\nh2 crate, both ends: {100 * h2 / server:.1f}% of the server's samples")
PYEOF
