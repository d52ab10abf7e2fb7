#!/usr/bin/env bash
# rip's HTTPS next to nginx's, in front of the same two `rip worker` processes, in one run
# (benches/compare.sh does the measuring; see its header):
#
#     benches/tls.sh        # about 2 minutes
#
#   tls_c100      keep-alive HTTP/1.1 over TLS, wrk -t2 -c100
#   tls_h2_c100   HTTP/2 over TLS (ALPN), h2load -c10 -m10
#   tls_new_c100  a new connection and a full handshake per request: handshakes per second
#
# Needs openssl and h2load; installs h2load (Debian's nghttp2-client) when absent, as root.
# Report: target/bench-tls.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v openssl >/dev/null || { echo "tls.sh: openssl is needed (apt-get install openssl)" >&2; exit 1; }
if ! command -v h2load >/dev/null; then
    [[ $(id -u) == 0 ]] || { echo "tls.sh: h2load is needed (apt-get install nghttp2-client)" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nghttp2-client >/dev/null ||
        { echo "tls.sh: could not install nghttp2-client" >&2; exit 1; }
fi
export SETUPS=${SETUPS:-"rip-tls nginx-tls"}
export CASES=${CASES:-"tls_c100 tls_h2_c100 tls_new_c100"}
export REPORT=${REPORT:-$ROOT/target/bench-tls.md}
exec "$ROOT/benches/compare.sh" "$@"
