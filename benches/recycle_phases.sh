#!/usr/bin/env bash
# Where a recycle's CPU goes: `rip serve --workers 2 --max-requests $MAX` under
# `wrk -t2 -c$CONNS`, a system-wide perf profile (perf record -a -g) of $SECS s, and every
# sample of a worker process put in the phase of that worker's life it fell in, from rip's
# own log lines (spawned, ready, recycled, drained, exited): starting (from the fork to ready),
# serving, draining (out of the rotation, finishing what it had), and after its drain (the
# runtime's and the process's teardown, the exit). The fork server's samples are a phase of
# their own. Each phase's CPU is given per recycle, and for the phases only a recycle has,
# the frames their samples were in (inclusive: a sample counts for every frame of its stack).
# A build with frame pointers (target/frame-pointers), so that rip's own frames show; RIP=<a
# rip binary> profiles that one instead (another build, for a side-by-side: build it with
# RUSTFLAGS="-C force-frame-pointers=yes" for its frames). Needs perf and wrk. Loopback only;
# bounded ($SECS + 4 s of load).
#
#     benches/recycle_phases.sh            # MAX=1000 CONNS=100 SECS=3
#     RIP=/path/to/old/rip benches/recycle_phases.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MAX=${MAX:-1000}
CONNS=${CONNS:-100}
SECS=${SECS:-3}
for tool in perf wrk python3; do
  command -v $tool >/dev/null || { echo "recycle_phases.sh needs $tool (Debian: apt install linux-perf wrk python3)" >&2; exit 1; }
done
if [[ -z ${RIP:-} ]]; then
  RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target/frame-pointers cargo build --release --quiet --bin rip
  RIP=target/frame-pointers/release/rip
fi
dir=$(mktemp -d); chmod 700 "$dir"
pid=
trap '[[ -n $pid ]] && { kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; }; rm -rf "$dir"' EXIT
"$RIP" serve --port 0 --workers 2 --max-requests "$MAX" --access-log off \
  --runtime-dir "$dir/rt" 2>"$dir/log" &
pid=$!; front=$pid
for _ in $(seq 100); do grep -q "all workers ready" "$dir/log" && break; sleep 0.1; done
grep -q "all workers ready" "$dir/log" || { cat "$dir/log" >&2; exit 1; }
port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
wrk -t2 -c"$CONNS" -d"$((SECS + 4))s" "http://127.0.0.1:$port/" >"$dir/wrk" &
load=$!
sleep 2
# The fork server starts with the first recycle, which 2 s of load has long passed.
forkserver=$(pgrep -f "forkserver --parent $pid" | head -1 || true)
# Realtime stamps, so that samples and log lines share a clock.
perf record -q -a -g -k CLOCK_REALTIME -e cpu-clock -o "$dir/perf.data" -- sleep "$SECS" 2>/dev/null
wait $load
kill $pid; wait $pid 2>/dev/null || true; pid=
perf script -i "$dir/perf.data" -F comm,pid,time,ip,sym 2>/dev/null >"$dir/samples"
if [[ $RIP == target/frame-pointers/release/rip ]]; then
  built="rip $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (src with uncommitted changes)'), frame pointers"
else
  built="$RIP"
fi
echo "$built; rip serve --workers 2 --max-requests $MAX; wrk -t2 -c$CONNS, profiled ${SECS}s: $(grep -o '[0-9.]* requests in' "$dir/wrk" | cut -d' ' -f1) requests in $((SECS + 4)) s"
python3 - "$dir/log" "$dir/samples" "$front" "${forkserver:-0}" "$SECS" <<'PYEOF'
import collections, datetime, re, sys
log, samples, front, forkserver, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
def stamp(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
life = collections.defaultdict(dict)   # pid -> event -> time
pid_of = {}                            # worker name (slot/generation) -> pid
for line in open(log):
    m = re.match(r"(\S+)\s+INFO (worker \w+) .*?worker=(\S+)(?: .*?pid=(\d+))?", line)
    if not m:
        continue
    t, event, worker, p = stamp(m.group(1)), m.group(2), m.group(3), m.group(4)
    if event == "worker spawned":
        pid_of[worker] = int(p)
    p = int(p) if p else pid_of.get(worker)
    if p:
        life[p].setdefault(event.split()[1], t)
def phase(p, t):
    if p == front:
        return "front-end"
    if p == forkserver:
        return "fork server"
    if p in life:
        e = life[p]
        if t < e.get("ready", 0):
            return "worker starting"
        if t >= e.get("drained", float("inf")):
            return "worker after its drain"
        if t >= e.get("recycled", float("inf")):
            return "worker draining"
        if t < e.get("ready", 0) + 0.005:
            return "worker serving, first 5 ms"
        return "worker serving"
    return None
counts = collections.Counter()
frames = {k: collections.Counter() for k in ("worker starting", "worker after its drain", "fork server")}
first = last = None
def close(p, t, stack):
    global first, last
    first = t if first is None else min(first, t)
    last = t if last is None else max(last, t)
    ph = phase(p, t)
    counts[ph or "other processes (wrk, idle, the kernel's threads)"] += 1
    if ph in frames:
        for f in set(stack):
            frames[ph][f] += 1
current, stack = None, []
for line in open(samples):
    m = re.match(r"\s*\S+\s+(\d+)\s+([\d.]+):", line)
    if m:
        if current:
            close(*current, stack)
        current, stack = (int(m.group(1)), float(m.group(2))), []
    elif line.strip():
        frame = re.match(r"\s*[0-9a-f]+\s+(.*)", line)
        if frame:
            stack.append(frame.group(1).strip())
if current:
    close(*current, stack)
total = sum(counts.values())
ms_per_sample = (last - first) * 1000 * 2 / total  # two CPUs
recycles = sum(1 for e in life.values() if first <= e.get("recycled", 0) <= last)
print(f"\n{recycles} recycles in the profiled {last - first:.2f} s; a sample is {ms_per_sample:.3f} ms of CPU\n")
print("| phase | share of all samples | CPU ms per recycle |")
print("|---|--:|--:|")
for ph, n in sorted(counts.items(), key=lambda kv: -kv[1]):
    print(f"| {ph} | {100 * n / total:.1f}% | {n * ms_per_sample / max(recycles, 1):.3f} |")
# A fresh worker's first 5 ms against the same time of a worker serving steadily: what
# serving cold adds (page faults, first connections), per recycle.
def within(a, b):
    return max(0.0, min(b, last) - max(a, first))
fresh = steady = 0.0
for e in life.values():
    if "ready" not in e:
        continue
    end = min(e.get("recycled", float("inf")), e.get("drained", float("inf")))
    fresh += within(e["ready"], min(e["ready"] + 0.005, end))
    steady += within(e["ready"] + 0.005, end)
if fresh and steady:
    cold = counts["worker serving, first 5 ms"] - counts["worker serving"] * fresh / steady
    print(f"\nServing cold (a fresh worker's first 5 ms, less the same time at the steady rate): "
          f"{cold * ms_per_sample / max(recycles, 1):.3f} ms per recycle")
interesting = [
    ("page faults", ["asm_exc_page_fault"]),
    ("  of which copy-on-write", ["do_wp_page"]),
    ("  of which file pages (the binary's text)", ["filemap_map_pages"]),
    ("the process's exit (do_exit)", ["do_exit"]),
    ("  of which the address space (exit_mmap)", ["exit_mmap"]),
    ("fork (copy_process)", ["copy_process"]),
    ("a thread started (clone3)", ["__do_sys_clone3"]),
    ("munmap", ["__x64_sys_munmap"]),
    ("the command line's parse (clap)", ["clap_builder::parser::parser::Parser::get_matches_with"]),
    ("the worker socket's bind", ["__x64_sys_bind"]),
    ("the tokio runtime's build", ["tokio::runtime::builder::Builder::build"]),
    ("the tokio runtime's drop", ["core::ptr::drop_in_place<tokio::runtime::runtime::Runtime>"]),
    ("logging's set-up", ["rip::telemetry::logging::init"]),
    ("the app's router", ["rip::app::stock"]),
    ("/proc reads", ["rip::forkserver::stat_fields"]),
    ("serving (hyper's connections)", ["<hyper_util::server::conn::auto::UpgradeableConnection<I,S,E> as core::future::future::Future>::poll"]),
]
for ph, c in frames.items():
    n = counts[ph]
    if not n:
        continue
    print(f"\n{ph}: {n} samples, {n * ms_per_sample / max(recycles, 1):.3f} ms per recycle; the frames they were in:\n")
    print("| frame | share of the phase | ms per recycle |")
    print("|---|--:|--:|")
    for name, keys in interesting:
        k = sum(c[key] for key in keys)
        if k:
            print(f"| {name} | {100 * k / n:.0f}% | {k * ms_per_sample / max(recycles, 1):.3f} |")
PYEOF
