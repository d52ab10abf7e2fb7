#!/usr/bin/env bash
# rip next to nginx and next to the no-hop ceiling, on this machine, in one run:
#
#     benches/compare.sh            # about 9 minutes with the defaults below
#     DURATION=10 RUNS=5 benches/compare.sh    # steadier numbers, about 15 minutes
#
# Setups, all up at once and measured in turn (interleaved, so that drift hits each alike):
#   rip          `rip serve --workers $WORKERS` (its default shards: one per CPU)
#   rip-shards1, rip-shards2  the same with `--shards 1` or `--shards 2`
#   nginx-1      nginx (worker_processes 1) in front of $WORKERS `rip worker --socket` processes
#   nginx-auto   the same with worker_processes auto (one per core)
#   ceiling      one worker's app on TCP with no hop: benches/direct.rs, which wraps the demo
#                app exactly as `rip worker` does (wrk cannot speak Unix sockets)
#   rip-handoff  `rip serve --workers $WORKERS --upstream handoff`: client connections passed to
#                workers whole, the optional mode without per-request failover
#   rip-recycle  `rip serve --workers $WORKERS --max-requests $MAX_REQUESTS` (get_c100 only)
#   rip-handoff-recycle  the same with `--upstream handoff` (get_c100 only)
#   rip-base     `rip serve --workers $WORKERS` from the binary at $BASE_RIP (another build, e.g.
#                the commit before a change), to measure a change side by side in one run:
#                BASE_RIP=/path/to/old/rip SETUPS="rip-base rip nginx-auto" benches/compare.sh
#   rip-base-recycle  the same with `--max-requests $MAX_REQUESTS` (get_c100 only), to measure a
#                change to recycling side by side with the rip-recycle setup
#   rip-log-stderr  `rip serve --workers $WORKERS` with its default access log, to stderr (a
#                file here); every other rip setup runs with `--access-log off`
#   haproxy      HAProxy (nbthread = cores, balance leastconn, http-reuse always, keep-alive)
#                in front of $WORKERS `rip worker --socket` processes; ×nginx columns compare with
#                the better of nginx and HAProxy
# TLS setups (benches/tls.sh runs these), a self-signed P-256 certificate made by openssl:
#   rip-tls      `rip serve --workers $WORKERS --tls-cert … --tls-key …`
#   rip-base-tls the same from the binary at $BASE_RIP, to measure a change to TLS side by side
#   nginx-tls    nginx (worker_processes auto) with TLS (HTTP/1.1 and HTTP/2) in front of
#                $WORKERS `rip worker` processes
# TLS cases: tls_c100 (wrk, keep-alive HTTP/1.1 over TLS), tls_h2_c100 (h2load, HTTP/2 over
# TLS: 10 connections × 10 streams; h2load reports no percentiles, so latency columns are 0),
# tls_new_c100 (wrk with Connection: close: every request a new TLS handshake, so req/s is
# handshakes per second; session resumption is not used by wrk).
# Static-file setups (benches/static.sh runs these), one directory with a 6-byte file and a
# 100 KiB file:
#   rip-static   `rip serve --workers $WORKERS --root DIR`
#   nginx-static nginx (worker_processes auto, sendfile on) serving DIR itself
# Static cases: static_small_c50 and static_100k_c50 (wrk -t2 -c50, GET of each file).
# Setups with workers that are not rip (benches/any_language.sh runs these):
#   rip-node     `rip serve --workers $WORKERS -- node examples/node/server.js`
#   nginx-node   nginx (worker_processes auto) in front of $WORKERS of the same Node processes,
#                each on a Unix socket of its own
#   node-cluster Node's own `cluster` module with $WORKERS workers (benches/apps/node-cluster.js)
#   rip-bun      `rip serve --workers $WORKERS --app-socket path -- bun examples/bun/worker.ts`
#   seed-bun     the Bun prototype rip grows from, ../shared/seed-bun (`bun manager.ts`: Bun's
#                front-end forwarding round-robin to $WORKERS Bun workers); $SEED_BUN names it
# Cases: GET / at c=1 and c=$CONNS, and at c=$CONNS with a browser's request head; POST /echo of $BODY_BYTES and of $SMALL_BODY_BYTES bytes at
# c=$BODY_CONNS; GET / with `Connection: close` at c=$CONNS. Each run is preceded by a $WARMUP s warm-up of the same case;
# the table shows medians over $RUNS runs. Then `rip serve --workers $STARTUP_WORKERS` is
# started $RUNS times to time startup from outside. With IDLE_CONNS, each front-end's memory
# with that many idle keep-alive clients; with REST_SECS, each setup's CPU and wake-ups at rest.
#
# Writes the markdown report to $REPORT (default target/bench-report.md) and prints it.
# Needs nginx and wrk; installs them with apt-get when absent (as root). Uses only 127.0.0.1
# and Unix sockets in a private temporary directory; stops everything it started on exit.
# Not part of `cargo test`.
set -euo pipefail

DURATION=${DURATION:-3}          # seconds per measured run (wrk takes whole seconds)
WARMUP=${WARMUP:-1}              # seconds of warm-up before each measured run
RUNS=${RUNS:-3}                  # measured runs per setup and case; medians are reported
WORKERS=${WORKERS:-2}            # rip workers behind each front-end
CONNS=${CONNS:-100}              # connections for the loaded cases
BODY_CONNS=${BODY_CONNS:-10}     # connections for the large-body case
BODY_BYTES=${BODY_BYTES:-1048576}    # echo_1m: the large body
SMALL_BODY_BYTES=${SMALL_BODY_BYTES:-65536}   # echo_64k: a body nginx can proxy, see below
MAX_REQUESTS=${MAX_REQUESTS:-1000}
STARTUP_WORKERS=${STARTUP_WORKERS:-8}
NGINX_KEEPALIVE=${NGINX_KEEPALIVE:-256}   # idle upstream connections per nginx worker
OTHER_MAX=${OTHER_MAX:-0.3}      # a run during which other work kept more cores busy is redone
RETRIES=${RETRIES:-2}            # ... at most this many times; the last try is kept regardless
ACCESS_LOG=${ACCESS_LOG:-off}    # off, or on: rip and nginx both log every request to a file
SERVE_ARGS=${SERVE_ARGS:-}       # extra flags for every `rip serve`, e.g. "--upstream http1"
IDLE_CONNS=${IDLE_CONNS:-0}      # idle case: this many keep-alive clients, one GET each, then silent (0: skipped)
IDLE_SETTLE=${IDLE_SETTLE:-6}    # ... held this many seconds before the front-end's RSS is read (rip parks after 1-2 s, trims after)
REST_SECS=${REST_SECS:-0}        # rest case: CPU and wake-ups of each setup over this many seconds at rest, after a burst (0: skipped)
CASES=${CASES:-"get_c1 get_c100 browser_c100 echo_1m echo_64k close_c100"}
SETUPS=${SETUPS:-"rip rip-handoff nginx-1 nginx-auto ceiling rip-recycle rip-handoff-recycle"}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Only flags configure the servers: no RIP_* variables, and no ./rip.toml (they start in $TMP).
while read -r var; do unset "$var"; done < <(compgen -e | grep '^RIP_' || true)
REPORT=${REPORT:-$ROOT/target/bench-report.md}
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[compare %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup

TMP=$(mktemp -d /tmp/rip-compare.XXXXXX)   # private (0700): sockets, configs, logs
chmod 700 "$TMP"
STARTED=()                                  # pids of everything we started

cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${STARTED[@]}"; do
        # Up to 5 s each to exit, then SIGKILL; our own children are reaped by `wait`.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools

install_tools() {
    command -v wrk >/dev/null && { command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; } && return
    [[ $(id -u) == 0 ]] || die "nginx and wrk are needed: apt-get install nginx-light wrk"
    log "installing nginx and wrk"
    # Keep the package from starting a system nginx on port 80: this script starts its own.
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q)
    local ok=
    "${apt[@]}" nginx-light wrk >"$TMP/apt.log" 2>&1 && ok=1
    if [[ -z $ok ]]; then apt-get update -q >>"$TMP/apt.log" 2>&1 || true; fi
    [[ -n $ok ]] || { "${apt[@]}" nginx-light wrk >>"$TMP/apt.log" 2>&1 && ok=1; }
    [[ -n $ok ]] || { "${apt[@]}" nginx wrk >>"$TMP/apt.log" 2>&1 && ok=1; }
    [[ -n $made_policy ]] && rm -f "$policy"
    [[ -n $ok ]] || { tail -20 "$TMP/apt.log" >&2; die "could not install nginx and wrk"; }
}

build() {
    log "building rip and the ceiling server (cargo build --release)"
    local json
    json=$(cd "$ROOT" && cargo build --release --bin rip --bench direct \
        --message-format=json-render-diagnostics) || die "cargo build failed"
    RIP=$(grep -o '"executable":"[^"]*/rip"' <<<"$json" | head -1 | cut -d'"' -f4)
    DIRECT=$(grep -o '"executable":"[^"]*/direct-[^"]*"' <<<"$json" | head -1 | cut -d'"' -f4)
    [[ -x $RIP && -x $DIRECT ]] || die "cargo did not report the rip and direct executables"
}

NGINX=$(command -v nginx || echo /usr/sbin/nginx)
SEED_BUN=${SEED_BUN:-$ROOT/../shared/seed-bun}

# Bun, from PATH or else from the npm registry into target/bun (the setups with bun need it).
find_bun() {
    BUN=$(command -v bun || true)
    [[ -n $BUN ]] && return
    BUN=$ROOT/target/bun/node_modules/.bin/bun
    [[ -x $BUN ]] && return
    command -v npm >/dev/null || die "bun is needed, and npm to install it: apt-get install npm"
    log "installing bun from the npm registry into target/bun"
    npm install --silent --no-audit --no-fund --prefix "$ROOT/target/bun" bun@1 >"$TMP/npm.log" 2>&1 ||
        die "could not install bun: $(tail -3 "$TMP/npm.log")"
    [[ -x $BUN ]] || die "npm installed no bun executable"
}

# ---------------------------------------------------------------- processes

# A free port on 127.0.0.1: nothing answers a connect to it. Racy, but each setup listens
# before the next port is picked, and the range is outside the kernel's ephemeral ports.
free_port() {
    local p
    for p in $(shuf -i 20000-29999 -n 100); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    die "no free port"
}

# Stops one process we started and forgets it, so that cleanup never signals a reused pid.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!STARTED[@]}"; do [[ ${STARTED[$i]} == "$pid" ]] && unset 'STARTED[i]'; done
    return 0
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# wait_until DEADLINE_S CMD...: retries CMD every 10 ms until it succeeds or time runs out.
wait_until() {
    local deadline=$(($(now_ms) + $1 * 1000))
    shift
    until "$@" >/dev/null 2>&1; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.01
    done
}

healthy() { curl -fsS -k -m 1 -o /dev/null "${2:-http}://127.0.0.1:$1/healthz"; }
socket_healthy() { curl -fsS -m 1 -o /dev/null --unix-socket "$1" http://worker/healthz; }

declare -A PORT FRONT_ROOT WORKER_PIDS KIND LOGFILE SCHEME

# The directory the static setups serve, once.
static_dir() {
    [[ -d $TMP/static ]] && return
    mkdir -p "$TMP/static"
    printf 'hello\n' >"$TMP/static/small.txt"
    head -c 102400 /dev/urandom >"$TMP/static/big.bin"
}

# nginx serving the static directory itself, as a site would.
start_nginx_static() {
    local name=$1 port dir=$TMP/$1
    port=$(free_port)
    mkdir -p "$dir/temp"
    cat >"$dir/nginx.conf" <<CONF
user root;
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path $dir/temp/body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    server {
        listen 127.0.0.1:$port;
        root $TMP/static;
    }
}
CONF
    "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >>"$dir/stdout.log" 2>&1 &
    STARTED+=($!)
    PORT[$name]=$port FRONT_ROOT[$name]=$! KIND[$name]=nginx WORKER_PIDS[$name]=
    wait_until 30 curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$port/small.txt" ||
        die "$name: nginx did not start: $(tail -3 "$dir/error.log")"
}

# $WORKERS worker processes on Unix sockets in DIR, for a proxy set up by this script:
# `rip worker`, or with APP=node the Node example. Sets SOCKETS and SOCKET_PIDS.
start_workers() {
    local name=$1 dir=$2 i sock
    SOCKETS=() SOCKET_PIDS=()
    for ((i = 0; i < WORKERS; i++)); do
        sock=$dir/w$i.sock
        if [[ ${APP:-rip} == node ]]; then
            (cd "$TMP" && RIP_SOCKET=$sock RIP_WORKER_ID=$i exec node "$ROOT/examples/node/server.js" \
                >>"$dir/workers.log" 2>&1) &
        else
            # --parent: the worker dies with this script even if it is killed without cleanup.
            (cd "$TMP" && exec "$RIP" worker --socket "$sock" --id "$i" --parent $$ >>"$dir/workers.log" 2>&1) &
        fi
        STARTED+=($!)
        SOCKET_PIDS+=($!)
        SOCKETS+=("$sock")
        wait_until 30 socket_healthy "$sock" || die "$name: worker $i did not start"
    done
}

# HAProxy in front of its own `rip worker` processes, configured as a tuned deployment would
# be: a thread per core, connections to the workers kept and shared, least connections.
start_haproxy() {
    local name=$1 port i sock servers= dir=$TMP/$1 pids=()
    command -v haproxy >/dev/null || die "haproxy is needed: apt-get install haproxy"
    port=$(free_port)
    mkdir -p "$dir"
    start_workers "$name" "$dir"
    pids=("${SOCKET_PIDS[@]}")
    for i in "${!SOCKETS[@]}"; do servers+="    server w$i ${SOCKETS[$i]}"$'\n'; done
    cat >"$dir/haproxy.cfg" <<CONF
global
    nbthread $(nproc)
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend front
    bind 127.0.0.1:$port
    default_backend workers
backend workers
    balance leastconn
$servers
CONF
    haproxy -f "$dir/haproxy.cfg" -db >>"$dir/haproxy.log" 2>&1 &
    STARTED+=($!)
    PORT[$name]=$port FRONT_ROOT[$name]=$! KIND[$name]=nginx WORKER_PIDS[$name]="${pids[*]}"
    wait_until 30 healthy "$port" || die "$name: haproxy did not start: $(tail -3 "$dir/haproxy.log")"
}

# A self-signed certificate for 127.0.0.1, once, for the TLS setups.
tls_cert() {
    [[ -f $TMP/tls/cert.pem ]] && return
    mkdir -p "$TMP/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1 -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" \
        >"$TMP/tls/openssl.log" 2>&1 || die "openssl could not make a certificate: $(cat "$TMP/tls/openssl.log")"
}

# `rip serve` with $WORKERS workers; extra flags follow the name.
start_rip() {
    local name=$1
    shift
    local port
    port=$(free_port)
    local access=${ACCESS:-off}
    [[ $ACCESS_LOG == on ]] && access=$TMP/$name-access.log
    # rip creates its runtime directory (0700) itself.
    (cd "$TMP" && RUST_LOG=info exec "${BIN:-$RIP}" serve --host 127.0.0.1 --port "$port" --workers "$WORKERS" \
        --runtime-dir "$TMP/$name" --access-log "$access" $SERVE_ARGS "$@" >"$TMP/$name.log" 2>&1) &
    STARTED+=($!)
    PORT[$name]=$port FRONT_ROOT[$name]=$! KIND[$name]=rip LOGFILE[$name]=$TMP/$name.log
    wait_until 60 grep -q "all workers ready" "$TMP/$name.log" ||
        die "$name: workers not ready; log: $(tail -5 "$TMP/$name.log")"
    healthy "$port" "${SCHEME[$name]:-http}" || die "$name: /healthz does not answer"
}

# nginx in front of its own `rip worker` processes, or with APP=node of Node processes running
# examples/node/server.js.
start_nginx() {
    local name=$1 processes=$2 port i sock upstreams=
    port=$(free_port)
    local dir=$TMP/$name
    mkdir -p "$dir/temp"
    start_workers "$name" "$dir"
    local pids=("${SOCKET_PIDS[@]}")
    for sock in "${SOCKETS[@]}"; do upstreams+="        server unix:$sock;"$'\n'; done
    cat >"$dir/nginx.conf" <<EOF
# Run by benches/compare.sh. The socket directory is private to root, hence user root.
user root;
worker_processes $processes;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
    access_log $([[ $ACCESS_LOG == on ]] && echo "$dir/access.log" || echo off);
    # rip's front-end limits neither, so neither does nginx: no forced reconnects.
    keepalive_requests 1000000;
    client_max_body_size 0;
    client_body_temp_path $dir/temp/body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    upstream rip {
        least_conn;    # rip's default balance is least-pending
$upstreams        keepalive $NGINX_KEEPALIVE;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port$([[ -n ${TLS:-} ]] && echo " ssl http2");
$([[ -n ${TLS:-} ]] && printf '        ssl_certificate %s;\n        ssl_certificate_key %s;\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:SSL:10m;\n' "$TMP/tls/cert.pem" "$TMP/tls/key.pem")
        location / {
            proxy_pass http://rip;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            # Stream both ways, as rip does, instead of spooling bodies to temp files.
            proxy_request_buffering off;
            proxy_buffering off;
        }
    }
}
EOF
    "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >>"$dir/stdout.log" 2>&1 &
    STARTED+=($!)
    PORT[$name]=$port FRONT_ROOT[$name]=$! KIND[$name]=nginx WORKER_PIDS[$name]="${pids[*]}"
    wait_until 30 healthy "$port" "${SCHEME[$name]:-http}" || die "$name: nginx did not start: $(tail -3 "$dir/error.log")"
}

# A server that is its own front-end and forks its workers (node-cluster, seed-bun): started
# with the command given, its children counted as its workers.
start_tree() {
    local name=$1 port
    shift
    port=$(free_port)
    (cd "$TMP" && PORT=$port WORKERS=$WORKERS RIP_BENCH_PORT=$port RIP_BENCH_WORKERS=$WORKERS \
        RIP_BENCH_SOCK_PREFIX=$TMP/$name-w exec "$@" >"$TMP/$name.log" 2>&1) &
    STARTED+=($!)
    PORT[$name]=$port FRONT_ROOT[$name]=$! KIND[$name]=tree LOGFILE[$name]=$TMP/$name.log
    wait_until 60 healthy "$port" || die "$name: did not start: $(tail -5 "$TMP/$name.log")"
}

start_ceiling() {
    local name=$1 port
    port=$(free_port)
    "$DIRECT" --listen "127.0.0.1:$port" >"$TMP/$name.log" 2>&1 &
    STARTED+=($!)
    PORT[$name]=$port FRONT_ROOT[$name]= KIND[$name]=ceiling WORKER_PIDS[$name]=$!
    wait_until 30 healthy "$port" || die "$name: did not start: $(cat "$TMP/$name.log")"
}

start_setup() {
    case $1 in
        rip) start_rip rip ;;
        rip-base)
            [[ -x ${BASE_RIP:-} ]] || die "rip-base needs BASE_RIP=<path of a rip binary>"
            BIN=$BASE_RIP start_rip rip-base ;;
        rip-base-recycle)
            [[ -x ${BASE_RIP:-} ]] || die "rip-base-recycle needs BASE_RIP=<path of a rip binary>"
            BIN=$BASE_RIP start_rip rip-base-recycle --max-requests "$MAX_REQUESTS" ;;
        rip-handoff) start_rip rip-handoff --upstream handoff ;;
        rip-shards1) start_rip rip-shards1 --shards 1 ;;
        rip-shards2) start_rip rip-shards2 --shards 2 ;;
        # The default access log, to stderr (here a file, as journald stores it).
        rip-log-stderr) ACCESS=- start_rip rip-log-stderr ;;
        rip-recycle) start_rip rip-recycle --max-requests "$MAX_REQUESTS" ;;
        rip-handoff-recycle) start_rip rip-handoff-recycle --upstream handoff --max-requests "$MAX_REQUESTS" ;;
        nginx-1) start_nginx nginx-1 1 ;;
        nginx-auto) start_nginx nginx-auto auto ;;
        ceiling) start_ceiling ceiling ;;
        haproxy) start_haproxy haproxy ;;
        rip-static) static_dir && start_rip rip-static --root "$TMP/static" ;;
        nginx-static) static_dir && start_nginx_static nginx-static ;;
        rip-tls)
            tls_cert
            SCHEME[rip-tls]=https
            start_rip rip-tls --tls-cert "$TMP/tls/cert.pem" --tls-key "$TMP/tls/key.pem" ;;
        rip-base-tls)
            [[ -x ${BASE_RIP:-} ]] || die "rip-base-tls needs BASE_RIP=<path of a rip binary>"
            tls_cert
            SCHEME[rip-base-tls]=https
            BIN=$BASE_RIP start_rip rip-base-tls --tls-cert "$TMP/tls/cert.pem" --tls-key "$TMP/tls/key.pem" ;;
        nginx-tls)
            tls_cert
            SCHEME[nginx-tls]=https
            TLS=1 start_nginx nginx-tls auto ;;
        rip-node) start_rip rip-node -- node "$ROOT/examples/node/server.js" ;;
        nginx-node) APP=node start_nginx nginx-node auto ;;
        node-cluster) start_tree node-cluster node "$ROOT/benches/apps/node-cluster.js" ;;
        rip-bun) find_bun && start_rip rip-bun --app-socket path -- "$BUN" "$ROOT/examples/bun/worker.ts" ;;
        seed-bun)
            [[ -f $SEED_BUN/manager.ts ]] || die "seed-bun needs the Bun prototype at SEED_BUN=$SEED_BUN"
            find_bun && start_tree seed-bun "$BUN" "$SEED_BUN/manager.ts" ;;
        *) die "unknown setup $1" ;;
    esac
}

children() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }

# The front-end's processes: rip serve, or nginx's master and workers.
front_pids() {
    local root=${FRONT_ROOT[$1]}
    [[ -z $root ]] && return
    echo "$root"
    [[ ${KIND[$1]} == nginx ]] && children "$root"
    return 0
}

# The app's processes: rip serve's (or a tree's) children, the workers behind nginx, or the
# ceiling.
worker_pids() {
    case ${KIND[$1]} in
        rip | tree) children "${FRONT_ROOT[$1]}" ;;
        *) tr ' ' '\n' <<<"${WORKER_PIDS[$1]}" ;;
    esac
}

# utime+stime of a process; with `all`, plus the reaped children's (cutime+cstime), which
# keeps recycled workers' CPU in rip serve's account.
ticks_of() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    stat=${stat##*) }
    local f
    read -ra f <<<"$stat"
    if [[ ${2:-} == all ]]; then echo $((f[11] + f[12] + f[13] + f[14])); else echo $((f[11] + f[12])); fi
}

# CPU clock ticks used so far by every process of a setup.
setup_ticks() {
    local name=$1 total=0 pid
    for pid in $(front_pids "$name") $(worker_pids "$name"); do
        if [[ $pid == "${FRONT_ROOT[$name]}" ]]; then
            total=$((total + $(ticks_of "$pid" all)))
        else
            total=$((total + $(ticks_of "$pid")))
        fi
    done
    echo "$total"
}

# Context switches (voluntary and not) of every thread of a setup's live processes so far.
setup_switches() {
    local pid files=()
    for pid in $(front_pids "$1") $(worker_pids "$1"); do files+=(/proc/"$pid"/task/*/status); done
    awk '/ctxt_switches/ { s += $2 } END { print s + 0 }' "${files[@]}" 2>/dev/null || echo 0
}

# Busy clock ticks of the whole machine so far (user, nice, system, irq, softirq).
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# ---------------------------------------------------------------- wrk

write_lua() {
    cat >"$TMP/report.lua" <<'EOF'
-- One machine-readable line for compare.sh: latencies in µs.
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "RESULT %d %d %d %d %d %d %d %d %d %d %d\n",
        summary.requests, summary.duration, summary.bytes,
        math.floor(latency:percentile(50)), math.floor(latency:percentile(99)),
        math.floor(latency:percentile(99.9)), latency.max,
        e.connect, e.read, e.write, e.status + e.timeout))
end
EOF
    local bytes
    for bytes in "$BODY_BYTES" "$SMALL_BODY_BYTES"; do
        { echo 'wrk.method = "POST"'
          echo "wrk.body = string.rep(\"x\", $bytes)"
          echo 'wrk.headers["Content-Type"] = "application/octet-stream"'
          cat "$TMP/report.lua"; } >"$TMP/echo-$bytes.lua"
    done
    # A head as a browser sends it (about 600 bytes), where wrk's own is 40: parsing and
    # checking headers is most of a proxy's work per request.
    { cat <<'EOF'
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
wrk.headers["Accept"] = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8"
wrk.headers["Accept-Language"] = "en-US,en;q=0.9,de;q=0.8"
wrk.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
wrk.headers["Cookie"] = "session=8f14e45fceea167a5a36dedd4bea2543; prefs=theme%3Ddark%26lang%3Den; _ga=GA1.1.1234567890.1700000000; csrftoken=Zx9yP2qR7sT4uV1wX8yZ3aB6cD0eF5gH"
wrk.headers["Referer"] = "http://127.0.0.1/some/previous/page?with=query&and=more"
EOF
      cat "$TMP/report.lua"; } >"$TMP/browser.lua"
}

# wrk arguments for a case, without the URL's host.
case_args() {
    case $1 in
        get_c1) echo "-t1 -c1 -s $TMP/report.lua /" ;;
        get_c100) echo "-t2 -c$CONNS -s $TMP/report.lua /" ;;
        browser_c100) echo "-t2 -c$CONNS -s $TMP/browser.lua /" ;;
        echo_1m) echo "-t2 -c$BODY_CONNS -s $TMP/echo-$BODY_BYTES.lua /echo" ;;
        echo_64k) echo "-t2 -c$BODY_CONNS -s $TMP/echo-$SMALL_BODY_BYTES.lua /echo" ;;
        close_c100) echo "-t2 -c$CONNS -s $TMP/report.lua /" ;; # plus the header, in run_wrk
        tls_c100) echo "-t2 -c$CONNS -s $TMP/report.lua /" ;;
        static_small_c50) echo "-t2 -c50 -s $TMP/report.lua /small.txt" ;;
        static_100k_c50) echo "-t2 -c50 -s $TMP/report.lua /big.bin" ;;
        tls_new_c100) echo "-t2 -c$CONNS -s $TMP/report.lua /" ;; # plus the header, in run_wrk
        tls_h2_c100) echo "/" ;; # h2load, in run_wrk

        *) die "unknown case $1" ;;
    esac
}

# run_wrk SETUP CASE SECONDS OUT: wrk's output to OUT, its own CPU time (user+sys, ms) on
# stdout. `times` in a child shell reports exactly wrk's rusage.
run_wrk() {
    local name=$1 case=$2 secs=$3 out=$4 args path
    read -ra args <<<"$(case_args "$case")"
    path=${args[-1]}
    unset 'args[-1]'
    # With the space: wrk drops an -H value without ": " and would keep the connection.
    [[ $case == close_* || $case == tls_new_* ]] && args+=(-H "Connection: close")
    local url="${SCHEME[$name]:-http}://127.0.0.1:${PORT[$name]}$path"
    if [[ $case == tls_h2_* ]]; then
        run_h2load "$url" "$secs" "$out"
        return
    fi
    # wrk's default 2 s timeout: a request that stalls shows up as an error.
    OUT=$out bash -c 'wrk "$@" >"$OUT" 2>&1; times' wrk --latency -d "${secs}s" \
        "${args[@]}" "$url" 2>/dev/null |
        tail -1 | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
                         printf "%d\n", t * 1000 }'
}

# h2load for SECS seconds against URL: its output to OUT with a RESULT line in wrk's format
# (no latency percentiles: zeros), its own CPU time (ms) on stdout.
run_h2load() {
    local url=$1 secs=$2 out=$3
    OUT=$out bash -c 'h2load "$@" >"$OUT" 2>&1; times' h2load -c 10 -m 10 -t 1 -D "$secs" "$url" 2>/dev/null |
        tail -1 | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
                         printf "%d\n", t * 1000 }'
    awk -v secs="$secs" '
        /^requests:/ { done = $8; failed = $10; errored = $12 }
        /^traffic:/ { bytes = $3; sub(/\(/, "", bytes) }
        END { printf "RESULT %d %d %d 0 0 0 0 0 0 0 %d\n", done, secs * 1000000, bytes, failed + errored }' "$out" >>"$out"
}

RESULTS=$TMP/results.tsv
REDONE=0

# One warm-up and one measured run; appends a line to $RESULTS.
measure() {
    local name=$1 case=$2 run=$3 out=$TMP/wrk-$1-$2-$3.txt
    run_wrk "$name" "$case" "$WARMUP" "$TMP/warmup.txt" >/dev/null
    local before recycled_before=0
    [[ ${KIND[$name]} == rip ]] && recycled_before=$(grep -c "worker recycled" "${LOGFILE[$name]}" || true)
    before=$(setup_ticks "$name")
    local machine_before switches_before
    machine_before=$(machine_ticks)
    switches_before=$(setup_switches "$name")
    local wrk_ms
    wrk_ms=$(run_wrk "$name" "$case" "$DURATION" "$out")
    local after
    after=$(setup_ticks "$name")
    local machine=$(($(machine_ticks) - machine_before))
    local switches=$(($(setup_switches "$name") - switches_before))
    local recycled=0
    [[ ${KIND[$name]} == rip ]] &&
        recycled=$(($(grep -c "worker recycled" "${LOGFILE[$name]}" || true) - recycled_before))
    local result
    result=$(grep '^RESULT' "$out") || die "$name $case: wrk failed: $(cat "$out")"
    local front=0 pid workers=()
    for pid in $(front_pids "$name"); do front=$((front + $(rss_kb "$pid"))); done
    for pid in $(worker_pids "$name"); do
        # rip serve's fork server, a child too once a worker was replaced, is marked "f".
        local mark=""
        [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *" forkserver "* ]] && mark=f
        workers+=("$mark$(($(rss_kb "$pid") / 1024))")
    done
    local joined
    joined=$(IFS=/ && echo "${workers[*]}")
    # setup case run | requests duration_us bytes p50 p99 p999 max connect read write
    # status+timeout | ticks wrk_ms front_kb workers_mb recycled machine_ticks switches
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$case" "$run" \
        "$(tr ' ' '\t' <<<"${result#RESULT }")" "$((after - before))" "$wrk_ms" "$front" \
        "$joined" "$recycled" "$machine" "$switches" >>"$RESULTS"
}

# Cores kept busy by everything but the setup and wrk during the last measured run.
last_other() {
    tail -1 "$RESULTS" | awk -F'\t' -v tck="$CLK_TCK" '{ printf "%.2f\n", ($20 - $15 - $16 * tck / 1000) / tck / ($5 / 1e6) }'
}

# measure, redone while something else on the machine (a build, a test suite) was busy enough
# to skew the run, up to $RETRIES times.
measure_clean() {
    local try other
    for ((try = 0; ; try++)); do
        measure "$@"
        other=$(last_other)
        awk -v o="$other" -v max="$OTHER_MAX" 'BEGIN { exit !(o > max) }' || return 0
        ((try < RETRIES)) || { log "  kept despite $other other cores busy"; return 0; }
        log "  $other cores busy with other work; run redone"
        sed -i '$d' "$RESULTS"
        REDONE=$((REDONE + 1))
    done
}

# ---------------------------------------------------------------- startup

# Prefixes each line with the wall clock in µs when it arrives (bash's clock, no fork).
stamp() {
    local line
    while IFS= read -r line; do printf '%s %s\n' "${EPOCHREALTIME/./}" "$line"; done
}

# Starts `rip serve --workers $STARTUP_WORKERS` and times from just before the exec, on our
# clock: the first GET /healthz answered through the front-end (sent as soon as the port
# accepts; rip holds it until a worker is ready), and the arrival of the `all workers ready`
# log line; then checks that every worker socket answers /healthz itself. rip's own
# `startup_ms` is kept next to them.
# The front-end's resident memory in kB: rip serve, or nginx's or HAProxy's processes.
front_rss_kb() {
    local pid total=0 kb
    for pid in $(front_pids "$1"); do
        kb=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || kb=0
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

# measure_idle SETUP RUN: the front-end's RSS before, and with $IDLE_CONNS keep-alive clients
# that each sent one GET / and then stay silent for $IDLE_SETTLE s; appended to idle.tsv.
measure_idle() {
    local name=$1 run=$2 before after line
    before=$(front_rss_kb "$name")
    coproc IDLE { exec python3 "$ROOT/benches/support/idle_clients.py" "${PORT[$name]}" "$IDLE_CONNS" / "${SCHEME[$name]:-http}"; }
    if ! read -r -t 120 line <&"${IDLE[0]}" || [[ $line != "ready $IDLE_CONNS" ]]; then
        die "$name: $IDLE_CONNS idle clients did not all get their answer (${line:-nothing})"
    fi
    sleep "$IDLE_SETTLE"
    after=$(front_rss_kb "$name")
    exec {IDLE[1]}>&-
    wait "$IDLE_PID" 2>/dev/null || true
    printf '%s\t%s\t%s\t%s\n' "$name" "$run" "$before" "$after" >>"$TMP/idle.tsv"
    # Let the closed connections go before the next setup is measured.
    sleep 1
}

# Run time (ns) and times scheduled in, summed over every thread of the given processes.
sched_of() {
    local pid
    for pid in "$@"; do cat /proc/"$pid"/task/*/schedstat 2>/dev/null || true; done |
        awk '{ r += $1; s += $3 } END { printf "%.0f %.0f\n", r, s }'
}

# measure_rest SETUP RUN: 1 s of wrk -c10 (every connection to the workers opened), a 2 s
# pause (rip rests 0.1 s after its last request), then each side's CPU time and wake-ups over
# $REST_SECS s with no traffic; appended to rest.tsv.
measure_rest() {
    local name=$1 run=$2 front workers f0 f1 w0 w1
    wrk -t1 -c10 -d1s "${SCHEME[$name]:-http}://127.0.0.1:${PORT[$name]}/" >/dev/null 2>&1 || true
    sleep 2
    front=$(front_pids "$name")
    workers=$(worker_pids "$name")
    # shellcheck disable=SC2086
    f0=$(sched_of $front) w0=$(sched_of $workers)
    sleep "$REST_SECS"
    # shellcheck disable=SC2086
    f1=$(sched_of $front) w1=$(sched_of $workers)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$run" "$f0" "$f1" "$w0" "$w1" | tr ' ' '\t' >>"$TMP/rest.tsv"
}

measure_startup() {
    local run=$1 port dir=$TMP/startup-$1
    port=$(free_port)
    local t0=${EPOCHREALTIME/./}
    (cd "$TMP" && exec "$RIP" serve --host 127.0.0.1 --port "$port" --workers "$STARTUP_WORKERS" \
        --runtime-dir "$dir" --access-log off) > >(stamp >"$dir.log") 2>&1 &
    local pid=$!
    STARTED+=($pid)
    local deadline=$((t0 + 60000000))
    until curl -fsS -m 30 -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; do
        ((${EPOCHREALTIME/./} < deadline)) || die "startup: /healthz never answered: $(tail -5 "$dir.log")"
    done
    local t_health=${EPOCHREALTIME/./}
    wait_until 60 grep -q "all workers ready" "$dir.log" || die "startup: no 'all workers ready' line"
    local line t_started t_all logged
    t_started=$(grep -m1 "rip started" "$dir.log" | cut -d' ' -f1)
    line=$(grep -m1 "all workers ready" "$dir.log")
    t_all=${line%% *}
    logged=$(grep -o 'startup_ms=[0-9]*' <<<"$line" | cut -d= -f2)
    local sock answered=0
    # The workers' sockets only (w<slot>.<generation>.sock): the control socket speaks no HTTP.
    for sock in "$dir"/*/w*.sock; do socket_healthy "$sock" && answered=$((answered + 1)); done
    ((answered == STARTUP_WORKERS)) || die "startup: $answered of $STARTUP_WORKERS worker sockets answer"
    stop_pid "$pid"
    printf 'startup\t%s\t%s\t%s\t%s\t%s\n' "$run" "$(((t_started - t0) / 1000))" \
        "$(((t_health - t0) / 1000))" "$(((t_all - t0) / 1000))" "$logged" >>"$TMP/startup.tsv"
}

# ---------------------------------------------------------------- report

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Medians per setup and case of the derived metrics, one line each:
# setup case rps p50_ms p99_ms p999_ms errors cpu_us_req wrk_us_req cores front_mb workers_mb recycled mb_s
#   other_cores switches rps_min rps_max cpu_min cpu_max (the last four: the spread over the runs)
summarize() {
    local name case col
    for case in $CASES; do
        for name in $SETUPS; do
            grep -q "^$name	$case	" "$RESULTS" 2>/dev/null || continue
            local rows
            rows=$(grep "^$name	$case	" "$RESULTS")
            metric() { awk -F'\t' -v tck="$CLK_TCK" "{ $1 }" <<<"$rows" | median; }
            lowest() { awk -F'\t' -v tck="$CLK_TCK" "{ $1 }" <<<"$rows" | sort -g | head -1; }
            highest() { awk -F'\t' -v tck="$CLK_TCK" "{ $1 }" <<<"$rows" | sort -g | tail -1; }
            local rps p50 p99 p999 err cpu wrkcpu cores mbs rec
            rps=$(metric 'print $4 / ($5 / 1e6)')
            p50=$(metric 'print $7 / 1000')
            p99=$(metric 'print $8 / 1000')
            p999=$(metric 'print $9 / 1000')
            err=$(metric 'print $11 + $12 + $13 + $14')
            cpu=$(metric 'print ($4 ? $15 * 1e6 / tck / $4 : 0)')
            wrkcpu=$(metric 'print ($4 ? $16 * 1000 / $4 : 0)')
            cores=$(metric 'print $15 / tck / ($5 / 1e6)')
            mbs=$(metric 'print $6 / 1048576 / ($5 / 1e6)')
            rec=$(metric 'print $19')
            # Everything else on the machine: busy ticks less the servers' and wrk's.
            local other switches
            other=$(metric 'o = ($20 - $15 - $16 * tck / 1000) / tck / ($5 / 1e6); print (o < 0 ? 0 : o)')
            switches=$(metric 'print ($4 ? $21 / $4 : 0)')
            col=$(tail -1 <<<"$rows" | awk -F'\t' '{ printf "%.1f\t%s", $17 / 1024, ($18 == "" ? "-" : $18) }')
            local spread
            spread=$(printf '%s\t%s\t%s\t%s' "$(lowest 'print $4 / ($5 / 1e6)')" "$(highest 'print $4 / ($5 / 1e6)')" \
                "$(lowest 'print ($4 ? $15 * 1e6 / tck / $4 : 0)')" "$(highest 'print ($4 ? $15 * 1e6 / tck / $4 : 0)')")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$case" "$rps" "$p50" \
                "$p99" "$p999" "$err" "$cpu" "$wrkcpu" "$cores" "$col" "$rec" "$mbs" "$other" "$switches" "$spread"
        done
    done
}

case_title() {
    case $1 in
        get_c1) echo "GET / — c=1 (wrk -t1 -c1)" ;;
        get_c100) echo "GET / — c=$CONNS (wrk -t2 -c$CONNS)" ;;
        browser_c100) echo "GET / with a browser's request head (about 600 bytes of headers) — c=$CONNS (wrk -t2 -c$CONNS)" ;;
        echo_1m) echo "POST /echo, $BODY_BYTES-byte body streamed back — c=$BODY_CONNS (wrk -t2 -c$BODY_CONNS)" ;;
        echo_64k) echo "POST /echo, $SMALL_BODY_BYTES-byte body streamed back — c=$BODY_CONNS (wrk -t2 -c$BODY_CONNS)" ;;
        close_c100) echo "GET / with Connection: close (a new TCP connection per request) — c=$CONNS" ;;
        tls_c100) echo "HTTPS GET /, keep-alive HTTP/1.1 — c=$CONNS (wrk -t2 -c$CONNS)" ;;
        static_small_c50) echo "a 6-byte static file — c=50 (wrk -t2 -c50)" ;;
        static_100k_c50) echo "a 100 KiB static file — c=50 (wrk -t2 -c50)" ;;
        tls_h2_c100) echo "HTTPS GET /, HTTP/2 — 10 connections × 10 streams (h2load -c10 -m10); no latency percentiles" ;;
        tls_new_c100) echo "HTTPS GET / with Connection: close: a full TLS handshake per request — c=$CONNS" ;;
    esac
}

# The front-end shards `rip serve` runs by default, as `rip config` reports them.
default_shards() {
    (cd "$TMP" && "$RIP" config 2>/dev/null) | sed -n 's/^shards = "\{0,1\}\([0-9]*\).*/\1/p' | head -1
}

setup_title() {
    case $1 in
        rip) echo "rip serve --workers $WORKERS (default: $(default_shards) shard(s))" ;;
        rip-shards1) echo "rip serve --workers $WORKERS --shards 1" ;;
        rip-shards2) echo "rip serve --workers $WORKERS --shards 2" ;;
        rip-base) echo "rip serve --workers $WORKERS, base build ($BASE_RIP)" ;;
        rip-base-recycle) echo "rip serve --workers $WORKERS --max-requests $MAX_REQUESTS, base build ($BASE_RIP)" ;;
        rip-log-stderr) echo "rip serve --workers $WORKERS --access-log - (stderr to a file)" ;;
        rip-handoff) echo "rip serve --workers $WORKERS --upstream handoff" ;;
        rip-recycle) echo "rip serve --workers $WORKERS --max-requests $MAX_REQUESTS" ;;
        rip-handoff-recycle) echo "rip serve --workers $WORKERS --upstream handoff --max-requests $MAX_REQUESTS" ;;
        nginx-1) echo "nginx wp=1 → $WORKERS rip workers" ;;
        nginx-auto) echo "nginx wp=auto ($(nproc)) → $WORKERS rip workers" ;;
        haproxy) echo "HAProxy nbthread=$(nproc) → $WORKERS rip workers" ;;
        ceiling) echo "ceiling: 1 worker's app, no hop" ;;
        rip-static) echo "rip serve --workers $WORKERS --root DIR" ;;
        nginx-static) echo "nginx wp=auto ($(nproc)) serving DIR, sendfile on" ;;
        rip-tls) echo "rip serve --workers $WORKERS with TLS (rustls, ring)" ;;
        rip-base-tls) echo "rip serve --workers $WORKERS with TLS, base build ($BASE_RIP)" ;;
        nginx-tls) echo "nginx wp=auto ($(nproc)) with TLS → $WORKERS rip workers" ;;
        rip-node) echo "rip serve --workers $WORKERS -- node examples/node/server.js" ;;
        nginx-node) echo "nginx wp=auto ($(nproc)) → $WORKERS node examples/node/server.js" ;;
        node-cluster) echo "node cluster, $WORKERS workers (benches/apps/node-cluster.js)" ;;
        rip-bun) echo "rip serve --workers $WORKERS --app-socket path -- bun examples/bun/worker.ts" ;;
        seed-bun) echo "seed: bun manager.ts, $WORKERS Bun workers (the prototype)" ;;
    esac
}

report() {
    local summary=$TMP/summary.tsv
    summarize >"$summary"
    {
        echo "# rip vs nginx vs the no-hop ceiling"
        echo
        echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') by \`benches/compare.sh\`."
        echo
        echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME")"
        echo "- rip: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet HEAD -- src 2>/dev/null || echo ' (src with uncommitted changes)'), $(rustc --version), release profile"
        echo "- $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')$([[ " $SETUPS " == *node* ]] && echo ", node $(node --version)")$([[ -n ${BUN:-} ]] && echo ", bun $("$BUN" --version)")"
        echo "- load average (1/5/15 min) at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg) — anything else running on the machine shows up in these numbers"
        echo "- each number is the median of $RUNS runs of ${DURATION}s, each after a ${WARMUP}s warm-up; setups interleaved run by run; wrk shares the $(nproc) cores; $REDONE runs were redone because other work kept more than $OTHER_MAX cores busy (up to $RETRIES retries each)"
        echo
        echo "Columns: latency in ms from wrk's histogram; errors = socket errors (connect, read, write) + non-2xx/3xx + timeouts summed (wrk counts, every 2 s, each request older than 2 s); server CPU = utime+stime of every server process (front-end and workers) from /proc/<pid>/stat over the run ÷ requests; server cores busy = that CPU ÷ wall time; context switches = voluntary + involuntary, all threads of the server processes; wrk CPU = wrk's own user+sys ÷ requests; other cores busy = the machine's busy time (/proc/stat) less the servers' and wrk's, ÷ wall time (other work on the machine, plus kernel time not charged to a process); RSS (VmRSS) after the last run, front-end = rip serve or nginx master+workers, workers = each rip worker (and, marked f, the fork server that replacement workers are forked from). ×nginx = ÷ the better nginx setup of that case (by req/s); ×ceiling = ÷ the ceiling."
        local case
        for case in $CASES; do
            grep -q "	$case	" "$summary" || continue
            echo
            echo "## $(case_title "$case")"
            echo
            awk -F'\t' -v case="$case" -v is_body="$([[ $case == echo_* ]] && echo 1)" \
                -v titles="$(for s in $SETUPS; do printf '%s=%s;' "$s" "$(setup_title "$s")"; done)" '
                BEGIN {
                    n = split(titles, t, ";")
                    for (i = 1; i <= n; i++) { split(t[i], kv, "="); title[kv[1]] = substr(t[i], length(kv[1]) + 2) }
                }
                $2 == case && $1 !~ /-recycle$/ {
                    rows[++k] = $1; for (i = 3; i <= NF; i++) v[$1, i] = $i
                    if ($1 ~ /^(nginx|haproxy)/ && $3 > 0 && (best == "" || $3 > v[best, 3])) best = $1
                }
                function ratio(a, b) { return (b == "" || b + 0 == 0) ? "-" : sprintf("%.2f", a / b) }
                END {
                    # An nginx that completed next to nothing (the large echo) is no yardstick.
                    if (best != "" && v["ceiling", 3] > 0 && v[best, 3] < 0.05 * v["ceiling", 3]) {
                        none = title[best]; best = ""
                    }
                    printf "| setup | req/s (min–max) | req/s ×nginx | req/s ×ceiling |%s p50 ms | p99 ms | p99.9 ms | p99 ×nginx | errors | server CPU µs/req (min–max) | CPU ×nginx | server cores busy | context switches/req | wrk CPU µs/req | other cores busy | RSS front-end MB | RSS workers MB |\n", (is_body ? " MB/s |" : "")
                    printf "|---|--:|--:|--:|%s--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n", (is_body ? "--:|" : "")
                    for (j = 1; j <= k; j++) {
                        s = rows[j]
                        if (v[s, 3] == 0) {
                            printf "| %s | 0 | stalled: no request completed; %d errors (timeouts) |\n", title[s], v[s, 7]
                            continue
                        }
                        bestrps = (best == "" ? "" : v[best, 3]); ceil = v["ceiling", 3]
                        printf "| %s | %.0f (%.0f–%.0f) | %s | %s |%s %.2f | %.2f | %.2f | %s | %d | %.1f (%.1f–%.1f) | %s | %.2f | %.2f | %.1f | %.2f | %s | %s |\n",
                            title[s], v[s, 3], v[s, 17], v[s, 18], ratio(v[s, 3], bestrps), ratio(v[s, 3], ceil),
                            (is_body ? sprintf(" %.0f |", v[s, 14]) : ""),
                            v[s, 4], v[s, 5], v[s, 6], ratio(v[s, 5], (best == "" ? "" : v[best, 5])),
                            v[s, 7], v[s, 8], v[s, 19], v[s, 20], ratio(v[s, 8], (best == "" ? "" : v[best, 8])), v[s, 10], v[s, 16], v[s, 9], v[s, 15],
                            (s == "ceiling" ? "-" : v[s, 11]), v[s, 12]
                    }
                    if (best != "") printf "\nYardstick here (the better of the nginx and HAProxy setups): %s.\n", title[best]
                    else if (none != "") print "\nNo ×nginx ratios: nginx completed next to no requests here (see the notes below)."
                    else print "\nNo nginx setup completed a request here."
                }' "$summary"
        done
        if grep -q "^rip[a-z-]*-recycle	" "$summary"; then
            echo
            echo "## Recycling cost: GET / at c=$CONNS, \`--max-requests $MAX_REQUESTS\` vs none"
            echo
            echo "| setup | req/s | p50 | p99 | p99 ×without | p99.9 | errors | workers recycled per run | server CPU µs/req |"
            echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
            local s
            for s in rip-base rip-base-recycle rip rip-recycle rip-handoff rip-handoff-recycle; do
                awk -F'\t' -v case=get_c100 -v s="$s" -v title="$(setup_title "$s")" '
                    $2 == case { v[$1] = $0 }
                    END {
                        if (!(s in v)) exit
                        split(v[s], r, "\t")
                        base = s; sub(/-recycle$/, "", base)
                        ratio = "-"
                        if (base != s && (base in v)) { split(v[base], b, "\t"); if (b[5] > 0) ratio = sprintf("%.2f", r[5] / b[5]) }
                        printf "| %s | %.0f | %.2f | %.2f | %s | %.2f | %d | %s | %.1f |\n",
                            title, r[3], r[4], r[5], ratio, r[6], r[7], (base == s ? "-" : r[13]), r[8]
                    }' "$summary"
            done
        fi
        if [[ -s $TMP/idle.tsv ]]; then
            echo
            echo "## Idle keep-alive connections: $IDLE_CONNS clients, one GET / each, then silent for ${IDLE_SETTLE} s"
            echo
            echo "| setup | front-end RSS MB before | with the idle clients | KiB per connection (min–max) |"
            echo "|---|--:|--:|--:|"
            local s
            for s in $SETUPS; do
                grep -q "^$s	" "$TMP/idle.tsv" || continue
                local rows before after per lo hi
                rows=$(grep "^$s	" "$TMP/idle.tsv")
                before=$(cut -f3 <<<"$rows" | median)
                after=$(cut -f4 <<<"$rows" | median)
                per=$(awk -F'\t' -v n="$IDLE_CONNS" '{ print ($4 - $3) / n }' <<<"$rows" | median)
                lo=$(awk -F'\t' -v n="$IDLE_CONNS" '{ print ($4 - $3) / n }' <<<"$rows" | sort -g | head -1)
                hi=$(awk -F'\t' -v n="$IDLE_CONNS" '{ print ($4 - $3) / n }' <<<"$rows" | sort -g | tail -1)
                printf '| %s | %.1f | %.1f | %.1f (%.1f–%.1f) |\n' "$(setup_title "$s")" \
                    "$(awk -v k="$before" 'BEGIN { print k / 1024 }')" "$(awk -v k="$after" 'BEGIN { print k / 1024 }')" "$per" "$lo" "$hi"
            done
            echo
            echo "RSS is VmRSS summed over the front-end's processes, read before the clients connect and ${IDLE_SETTLE} s after the last of them got its answer (\`benches/support/idle_clients.py\`); KiB per connection = the difference ÷ $IDLE_CONNS. Medians of $RUNS runs."
        fi
        if [[ -s $TMP/rest.tsv ]]; then
            echo
            echo "## At rest: $REST_SECS s without traffic, from 2 s after 1 s of wrk -c10"
            echo
            echo "| setup | front-end wake-ups/s | front-end CPU µs/s | workers' wake-ups/s | workers' CPU µs/s | all, % of a core (min–max) |"
            echo "|---|--:|--:|--:|--:|--:|"
            local s
            for s in $SETUPS; do
                grep -q "^$s	" "$TMP/rest.tsv" || continue
                local rows
                rows=$(grep "^$s	" "$TMP/rest.tsv")
                # Columns: setup run front(ns slices) front-after workers workers-after.
                col() { awk -F'\t' -v t="$REST_SECS" "{ print $1 }" <<<"$rows"; }
                printf '| %s | %.1f | %.0f | %.1f | %.0f | %.3f (%.3f–%.3f) |\n' "$(setup_title "$s")" \
                    "$(col '($6 - $4) / t' | median)" "$(col '($5 - $3) / t / 1000' | median)" \
                    "$(col '($10 - $8) / t' | median)" "$(col '($9 - $7) / t / 1000' | median)" \
                    "$(col '($5 - $3 + $9 - $7) / t / 1e7' | median)" \
                    "$(col '($5 - $3 + $9 - $7) / t / 1e7' | sort -g | head -1)" \
                    "$(col '($5 - $3 + $9 - $7) / t / 1e7' | sort -g | tail -1)"
            done
            echo
            echo "From /proc/<pid>/task/*/schedstat of every thread of the front-end's processes and of the workers (run time, and times scheduled in: each is a wake-up). Medians of $RUNS runs."
        fi
        if [[ -s $TMP/startup.tsv ]]; then
            echo
            echo "## Startup: \`rip serve --workers $STARTUP_WORKERS\`, medians of $RUNS starts"
            echo
            echo "| from the exec of \`rip serve\` (our clock) to | ms |"
            echo "|---|--:|"
            echo "| log line \`rip started\` read | $(cut -f3 "$TMP/startup.tsv" | median) |"
            echo "| first GET /healthz answered through the front-end | $(cut -f4 "$TMP/startup.tsv" | median) |"
            echo "| log line \`all workers ready\` read ($STARTUP_WORKERS workers probed ready by rip) | $(cut -f5 "$TMP/startup.tsv" | median) |"
            echo "| rip's own \`startup_ms\` in that line (its clock, from the supervisor's start) | $(cut -f6 "$TMP/startup.tsv" | median) |"
            echo
            echo "Each start (started/healthz/all ready/startup_ms): $(awk -F'\t' '{ printf "%s%s/%s/%s/%s", (NR > 1 ? "; " : ""), $3, $4, $5, $6 }' "$TMP/startup.tsv") ms. After each, every worker socket was checked to answer /healthz itself."
        fi
        echo
        echo "## How it was measured"
        echo
        echo "- wrk: \`wrk --latency -d${DURATION}s -s <lua> <threads/connections> http://127.0.0.1:PORT/PATH\` with -t1 -c1 at c=1 and -t2 otherwise; the Lua \`done()\` prints requests, latency percentiles (50, 99, 99.9) and error counts. Large bodies: \`wrk.method = \"POST\"; wrk.body = string.rep(\"x\", N)\`. Keep-alive off: \`-H 'Connection: close'\`."
        echo "- access logs: $ACCESS_LOG for rip (\`--access-log\`; its default is stderr) and nginx alike (\`ACCESS_LOG=on\` writes both to files)."
        echo "- rip workers behind nginx are \`rip worker --socket PATH --id N\` started by the script, the same binary and defaults (1 thread) that \`rip serve\` spawns."
        echo "- ceiling: \`benches/direct.rs\` serves \`rip::app::demo\` on TCP inside the same wrapping as \`rip worker\` (current-thread runtime, /healthz short-circuit, served counter, panic isolation, hyper HTTP/1 keep-alive). wrk cannot speak Unix sockets and a relay would be a hop, so this is one worker's app with no proxy, on one core."
        echo "- nginx config (per setup; \`worker_processes 1\` or \`auto\`):"
        echo
        echo '```nginx'
        cat "$TMP/nginx-auto/nginx.conf" 2>/dev/null || cat "$TMP/nginx-1/nginx.conf" 2>/dev/null ||
            cat "$TMP/nginx-node/nginx.conf" 2>/dev/null || echo "(no nginx setup in this run)"
        echo '```'
        echo
        echo "- nginx and the ${BODY_BYTES}-byte echo: most requests stall (a row reads \"stalled\" when none completed), with any combination of \`proxy_request_buffering\` and \`proxy_buffering\` (checked by hand with curl: 190-520 KB come back, then nothing until nginx's 60 s timeouts). The app streams the body back as it reads it, so once the socket buffers (about 200 KB) fill it reads no more until its response is read; nginx does not pass the response on while it is still sending the request body, so both wait. rip's proxy copies both directions at once. The ${SMALL_BODY_BYTES}-byte echo fits in the buffers, so it is the body case that compares with nginx."
        echo
        echo "Raw runs (setup, case, run, requests, duration µs, bytes, p50/p99/p99.9/max µs, errors connect/read/write/status+timeout, server ticks of 1/$CLK_TCK s, wrk CPU ms, front-end RSS kB, worker RSS MB, recycled, machine busy ticks, server context switches):"
        echo
        echo '```'
        cat "$RESULTS" 2>/dev/null || echo "(no load cases in this run)"
        echo '```'
    } >"$REPORT"
}

# ---------------------------------------------------------------- main

main() {
    install_tools
    build
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    if awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 1) }'; then
        log "warning: load average is $LOAD_START; other work on the machine will skew the numbers"
    fi
    write_lua
    local setups=0 cases=0 s c
    for s in $SETUPS; do setups=$((setups + 1)); done
    for c in $CASES; do cases=$((cases + 1)); done
    local recycling=0
    for s in $SETUPS; do [[ $s == *-recycle ]] && recycling=$((recycling + 1)); done
    log "measuring: about $(((setups - recycling) * cases + recycling))×$RUNS runs of $((WARMUP + DURATION)) s, then $RUNS startups"
    for s in $SETUPS; do start_setup "$s"; done
    log "all setups up: $(for s in $SETUPS; do printf '%s=127.0.0.1:%s ' "$s" "${PORT[$s]}"; done)"
    # Before any load: "before" is each front-end as it idles after its start.
    if ((IDLE_CONNS > 0)); then
        for ((run = 1; run <= RUNS; run++)); do
            for s in $SETUPS; do
                [[ $s == *-recycle || $s == ceiling ]] && continue
                log "idle run $run/$RUNS: $s, $IDLE_CONNS connections"
                measure_idle "$s" "$run"
            done
        done
    fi
    local run
    if ((REST_SECS > 0)); then
        for ((run = 1; run <= RUNS; run++)); do
            for s in $SETUPS; do
                [[ $s == *-recycle ]] && continue
                log "rest run $run/$RUNS: $s, $REST_SECS s"
                measure_rest "$s" "$run"
            done
        done
    fi
    for c in $CASES; do
        for ((run = 1; run <= RUNS; run++)); do
            for s in $SETUPS; do
                [[ $s == *-recycle && $c != get_c100 ]] && continue
                log "$c run $run/$RUNS: $s"
                measure_clean "$s" "$c" "$run"
            done
        done
    done
    for ((run = 1; run <= RUNS; run++)); do
        log "startup run $run/$RUNS: rip serve --workers $STARTUP_WORKERS"
        measure_startup "$run"
    done
    mkdir -p "$(dirname "$REPORT")"
    report
    cat "$REPORT"
    log "report written to $REPORT"
}

main "$@"
