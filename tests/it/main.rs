//! Integration tests: each drives the real `rip` binary over real sockets through
//! [`harness::Rip`], which picks port 0, waits for `/healthz`, and kills on drop.

mod harness;

mod any_language;
mod backoff;
mod chaos;
mod conformance;
mod early_answers;
mod examples;
mod forkserver;
mod forwarding;
mod framing;
mod handlers;
mod handoff;
mod http2;
mod limits;
mod log_sink;
mod observability;
mod operator;
mod parking;
mod pool;
mod refusals;
mod reload;
mod resting;
mod serve;
mod shards;
mod slow_clients;
mod stalls;
mod static_files;
mod status_page;
mod systemd;
mod tls;
mod tunnels;
mod upgrade;
