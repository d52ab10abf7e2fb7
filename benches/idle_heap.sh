#!/usr/bin/env bash
# What an idle keep-alive connection costs rip's front-end, split into the heap it keeps in use
# and the pages that heap holds: IDLE_CONNS clients (benches/support/idle_clients.py: one GET /
# each, then silent), glibc's own count (`malloc_stats()`, called in the front-end by gdb)
# and VmRSS read before they connect and IDLE_SETTLE s after the last got its answer. RSS per
# connection well above heap in use per connection is fragmentation: a few allocations that
# stay for the connection, scattered over pages the allocator cannot give back.
#
#     benches/idle_heap.sh                                # about 1 minute
#     BASE_RIP=/path/to/old/rip benches/idle_heap.sh      # the same for a base build, interleaved
#
# SCHEME=https (the default) or http; IDLE_CONNS=2000, IDLE_SETTLE=6, RUNS=3; RIP=path skips
# the build. Needs gdb (installed from Debian's packages when absent, as root), openssl and
# python3. Report: target/bench-idle-heap.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCHEME=${SCHEME:-https}
IDLE_CONNS=${IDLE_CONNS:-2000}
IDLE_SETTLE=${IDLE_SETTLE:-6}
RUNS=${RUNS:-3}
REPORT=${REPORT:-$ROOT/target/bench-idle-heap.md}
die() { echo "idle_heap.sh: $*" >&2; exit 1; }
log() { echo "[idle_heap $(date +%T)] $*" >&2; }

for tool in openssl python3 curl; do
    command -v $tool >/dev/null || die "$tool is needed (apt-get install $tool)"
done
if ! command -v gdb >/dev/null; then
    [[ $(id -u) == 0 ]] || die "gdb is needed to read the front-end's heap (apt-get install gdb)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q gdb >/dev/null || die "could not install gdb"
fi
if [[ -z ${RIP:-} ]]; then
    log "building rip (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bin rip -q) || die "the build failed"
    RIP=$ROOT/target/release/rip
fi
[[ -x $RIP ]] || die "no rip binary at $RIP"
RIP=$(realpath "$RIP")
[[ -z ${BASE_RIP:-} ]] || BASE_RIP=$(realpath "$BASE_RIP")
[[ -z ${BASE_RIP:-} || -x $BASE_RIP ]] || die "no rip binary at BASE_RIP=$BASE_RIP"

TMP=$(mktemp -d)
STARTED=()
cleanup() {
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null || die "openssl could not make a certificate"
TLS_ARGS=()
[[ $SCHEME == https ]] && TLS_ARGS=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
# glibc's totals over every arena, in bytes: "system in-use" (the last block malloc_stats prints).
heap() {
    local pid=$1 err=$2 lines
    lines=$(wc -l <"$err")
    gdb -p "$pid" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1 || die "gdb could not call malloc_stats in $pid"
    tail -n +"$((lines + 1))" "$err" | awk '/^Total/ { t = 1 } t && /system bytes/ { s = $NF } t && /in use bytes/ { u = $NF } END { print s, u }'
}

# measure NAME BIN RUN: one row of runs.tsv.
measure() {
    local name=$1 bin=$2 run=$3 port dir pid
    port=$(free_port)
    dir=$TMP/$name-$run
    mkdir -p "$dir"
    (cd "$dir" && exec "$bin" serve --host 127.0.0.1 --port "$port" --workers 2 --runtime-dir "$dir/run" \
        --access-log off "${TLS_ARGS[@]}" >"$dir/out" 2>"$dir/err") &
    pid=$!
    STARTED+=("$pid")
    local i
    for ((i = 0; i < 300; i++)); do
        curl -skf "$SCHEME://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || die "$name exited: $(tail -3 "$dir/err")"
        sleep 0.1
    done
    ((i < 300)) || die "$name: /healthz did not answer in 30 s"
    local rss0 heap0 rss1 heap1 line
    rss0=$(rss_kib "$pid")
    heap0=$(heap "$pid" "$dir/err")
    coproc CLIENTS { exec python3 "$ROOT/benches/support/idle_clients.py" "$port" "$IDLE_CONNS" / "$SCHEME"; }
    if ! read -r -t 120 line <&"${CLIENTS[0]}" || [[ $line != "ready $IDLE_CONNS" ]]; then
        die "$name: $IDLE_CONNS idle clients did not all get their answer (${line:-nothing})"
    fi
    sleep "$IDLE_SETTLE"
    rss1=$(rss_kib "$pid")
    heap1=$(heap "$pid" "$dir/err")
    kill "$CLIENTS_PID" 2>/dev/null || true
    wait "$CLIENTS_PID" 2>/dev/null || true
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$run" "$rss0" "$rss1" $heap0 $heap1 >>"$TMP/runs.tsv"
}

SETUPS=("rip:$RIP")
[[ -n ${BASE_RIP:-} ]] && SETUPS=("rip-base:$BASE_RIP" "${SETUPS[@]}")
for ((run = 1; run <= RUNS; run++)); do
    for s in "${SETUPS[@]}"; do
        log "run $run/$RUNS: ${s%%:*}, $IDLE_CONNS $SCHEME connections"
        measure "${s%%:*}" "${s#*:}" "$run"
    done
done

# stat COLUMN-EXPRESSION NAME: "median (min–max)" in KiB per connection over the runs.
stat() {
    awk -F'\t' -v n="$IDLE_CONNS" -v name="$2" "\$1 == name { print $1 }" "$TMP/runs.tsv" | sort -g |
        awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.1f (%.1f–%.1f)", m, v[1], v[NR] }'
}
{
    echo "# What an idle keep-alive connection costs rip's front-end: heap in use and RSS"
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') by \`benches/idle_heap.sh\`: $IDLE_CONNS $SCHEME clients, one GET / each, then silent for $IDLE_SETTLE s; \`rip serve --workers 2\`; medians of $RUNS runs (lowest–highest), setups interleaved."
    echo
    echo "- machine: $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), Linux $(uname -r)"
    echo "- rip: $("$RIP" --version)${BASE_RIP:+; base: $("$BASE_RIP" --version)}"
    echo
    echo "| setup | KiB of RSS per connection | KiB of heap in use per connection | KiB of heap the allocator holds per connection |"
    echo "|---|--:|--:|--:|"
    for s in "${SETUPS[@]}"; do
        name=${s%%:*}
        echo "| $name ($("${s#*:}" --version)) | $(stat '($4 - $3) / n' "$name") | $(stat '($8 - $6) / 1024 / n' "$name") | $(stat '($7 - $5) / 1024 / n' "$name") |"
    done
    echo
    echo "RSS = the front-end's VmRSS; heap in use and held = glibc's \`malloc_stats()\` totals (in use bytes, system bytes) over every arena, both read before the clients connect and with them connected and idle; per connection = the difference ÷ $IDLE_CONNS. The front-end trims its heap (\`malloc_trim\`) once traffic pauses, so what RSS keeps beyond the heap in use is pages that live allocations pin."
    echo
    echo "Raw runs (setup, run, RSS KiB before, after, heap system bytes before, in use before, system after, in use after):"
    echo
    echo '```'
    cat "$TMP/runs.tsv"
    echo '```'
} >"$REPORT"
log "report written to $REPORT"
cat "$REPORT"
