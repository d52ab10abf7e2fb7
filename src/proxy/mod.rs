//! The request path from the front-end's router to a worker, as a tower stack with one layer
//! per concern, outermost first:
//!
//! | layer | file | what it does |
//! |---|---|---|
//! | [`Observe`] | `observe.rs` | metrics, the access log, `Connection: close` while draining, errors → answers |
//! | [`Files`] | `files.rs` | `--root`: a GET or HEAD that names a file is answered here, with no hop |
//! | [`Rewrite`] | `rewrite.rs` | client checks (CONNECT, Host, `--max-body`), hop-by-hop and forwarded headers |
//! | [`Retry`] | `retry.rs` | sends the request again when that is safe ([`Failed::is_retryable`]) |
//! | [`Balance`] | `balance.rs` | picks a worker, waits for one up to `--queue-timeout`, counts its budget |
//! | [`Deadline`] | `deadline.rs` | `--request-timeout`; moves a request off a worker that stalls, 504 when it hangs |
//! | [`Exchange`] | `exchange.rs` | one request over an HTTP/2 or HTTP/1 connection to the chosen worker |
//!
//! Each layer is a `tower::Service` generic over the one below, so each is tested against an
//! in-memory inner service; only the outermost future is boxed per request by the router.
//! Beside the stack, `watch.rs` reads every worker's heartbeat and takes a stalled worker out
//! of the balancer's choice.

mod balance;
mod body;
mod deadline;
mod endpoint;
mod error;
mod exchange;
mod files;
pub(crate) mod headers;
mod observe;
mod pool;
mod retry;
mod rewrite;
mod strategy;
mod upgrade;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use hyper::upgrade::OnUpgrade;

pub use balance::Balance;
pub use body::{ClientBody, RequestBody, ResponseBody};
pub use deadline::Deadline;
pub use endpoint::{enter_shard, set_shards, Endpoint, Lease, Upstream};
pub use error::{Cause, Failed, ProxyError};
pub use exchange::Exchange;
pub use files::{Files, LiveRoot};
pub use observe::Observe;
pub use pool::Pool;
pub use retry::{Replay, Retry};
pub use rewrite::{refusal, Rewrite};
pub use strategy::Strategy;

use crate::discovery::{ChangeReceiver, ReportSender, WorkerId};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;

/// What the proxy needs from the config. All but `strategy` and `upstream` can change on
/// reload; each layer reads them per request, so a reload applies to the next request.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub strategy: Strategy,
    /// How the front-end talks to workers; fixed at start like `strategy`.
    pub upstream: Upstream,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// Silence after which a worker is reported hung.
    pub timeout: Duration,
    /// Per request, without killing anything; zero = off.
    pub request_timeout: Duration,
    pub queue_timeout: Duration,
    /// 0 means unlimited.
    pub max_body: u64,
    /// Longest pause allowed in the middle of a client's request body.
    pub body_timeout: Duration,
    /// Requests in flight per worker before it counts as full; 0 = no limit.
    pub max_in_flight: usize,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<crate::config::Cidr>,
}

impl Settings {
    /// Whether a connection from `ip` comes from a trusted proxy.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|cidr| cidr.contains(ip))
    }
}

impl From<&crate::config::Config> for Settings {
    fn from(config: &crate::config::Config) -> Settings {
        Settings {
            strategy: config.balance,
            upstream: config.upstream,
            max_requests: config.max_requests,
            max_requests_jitter: config.max_requests_jitter,
            timeout: config.timeout,
            request_timeout: config.request_timeout,
            queue_timeout: config.queue_timeout,
            max_body: config.max_body,
            // The same patience for a client's body as for its headers.
            body_timeout: config.header_timeout,
            max_in_flight: config.max_in_flight,
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }
}

/// Settings as every layer sees them: swapped whole on reload.
pub type LiveSettings = Arc<ArcSwap<Settings>>;

/// The whole stack, as the front-end's router falls back to it.
pub type Stack = Observe<Files<Rewrite<Retry<Balance<Deadline<Exchange>>>>>>;

/// A client request, rewritten and ready for a worker, as the retry layer gets it.
#[derive(Debug)]
pub struct Prepared {
    pub forward: Forward,
    /// How to send it again after a worker failed with it; only idempotent requests without
    /// a body have one.
    pub replay: Option<Replay>,
}

/// One attempt's request, as the balancer gets it.
#[derive(Debug)]
pub struct Forward {
    pub request: Request<RequestBody>,
    /// The client's side of a protocol upgrade, when the request asks for one.
    pub upgrade: Option<OnUpgrade>,
    /// The worker that just failed this request: chosen again only if it is the only one.
    pub avoid: Option<WorkerId>,
    /// The front-end's number for the request (its [`headers::REQUEST`]); 0 for none.
    pub id: u64,
    /// The retry layer can send it again (idempotent, no body): it may move off a stalled
    /// worker.
    pub movable: bool,
    /// Already moved once off a stalled worker; it stays where it goes next.
    pub moved: bool,
}

impl Forward {
    pub fn new(request: Request<RequestBody>) -> Forward {
        Forward { request, upgrade: None, avoid: None, id: 0, movable: false, moved: false }
    }
}

/// The next request number; never 0, which means "none" in a heartbeat page.
pub fn next_request_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One attempt on the worker the balancer chose, holding its place in that worker's
/// in-flight count until the response body ends.
#[derive(Debug)]
pub struct Dispatch {
    pub forward: Forward,
    pub lease: Lease,
}

impl Dispatch {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        self.lease.endpoint()
    }
}

/// The client at the other end of a front-end connection, put in each request's extensions
/// (beside axum's `ConnectInfo<SocketAddr>`) by the connection that accepted it.
#[derive(Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Made once per connection rather than once per request.
    forwarded_for: http::HeaderValue,
    /// The address with its port, for a worker's `ConnectInfo`.
    peer_header: http::HeaderValue,
    /// A proxy named by `--trusted-proxies`: what it says about the client is kept.
    trusted: bool,
    /// The connection is HTTPS: workers are told `X-Forwarded-Proto: https`.
    https: bool,
}

impl Peer {
    pub fn new(addr: SocketAddr, trusted: bool, https: bool) -> Peer {
        Peer {
            addr,
            forwarded_for: headers::forwarded_for(addr.ip()),
            peer_header: headers::peer_value(addr),
            trusted,
            https,
        }
    }
}

/// What the proxy counts of one worker.
#[derive(Debug, Clone, Copy)]
pub struct WorkerCounts {
    pub id: WorkerId,
    /// Requests sent to it so far.
    pub sent: u64,
    pub in_flight: usize,
    /// Upgraded connections open through it.
    pub tunnels: usize,
}

/// Cheap to clone; all clones share the pool and the settings.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pool: Arc<Pool>,
    settings: LiveSettings,
    reports: ReportSender,
    metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
    /// Set when the front-end stops: every response then closes its connection.
    closing: Arc<AtomicBool>,
    /// `--root`, when the front-end serves it.
    root: LiveRoot,
}

impl Proxy {
    pub fn new(
        settings: Settings,
        reports: ReportSender,
        metrics: Arc<Metrics>,
        access_log: Option<AccessLog>,
    ) -> Proxy {
        let pool = Arc::new(Pool::new(settings.strategy, settings.max_in_flight, settings.upstream));
        pool.configure(settings.max_in_flight, settings.max_requests_jitter);
        let settings = Arc::new(ArcSwap::from_pointee(settings));
        let closing = Arc::new(AtomicBool::new(false));
        let root = LiveRoot::default();
        Proxy { shared: Arc::new(Shared { pool, settings, reports, metrics, access_log, closing, root }) }
    }

    /// The request path, layer by layer; see the module's table.
    pub fn stack(&self) -> Stack {
        let s = &self.shared;
        let exchange = Exchange::new();
        let deadline = Deadline::new(exchange, s.settings.clone());
        let balance = Balance::new(deadline, s.pool.clone(), s.settings.clone(), s.reports.clone());
        let retry = Retry::new(balance, s.metrics.clone());
        let rewrite = Rewrite::new(retry, s.settings.clone());
        let files = Files::new(rewrite, s.root.clone());
        Observe::new(files, s.metrics.clone(), s.access_log.clone(), s.closing.clone())
    }

    /// From the next request on, the front-end answers GETs and HEADs of files under `root`
    /// itself (or stops, with `None`); what names no file still goes to a worker.
    pub fn serve_root(&self, root: Option<Arc<crate::app::Files>>) {
        self.shared.root.store(root);
    }

    /// How requests reach workers; fixed at start.
    pub fn upstream(&self) -> Upstream {
        self.shared.pool.upstream()
    }

    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// The settings in force now (they change on reload).
    pub(crate) fn settings_now(&self) -> Arc<Settings> {
        self.shared.settings.load_full()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub(crate) fn reports(&self) -> &ReportSender {
        &self.shared.reports
    }

    /// From now on every response tells its client to close the connection.
    pub fn close_connections_after_responses(&self) {
        self.shared.closing.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies settings re-read on reload (the balance strategy stays as started).
    pub fn reconfigure(&self, settings: Settings) {
        self.shared.pool.configure(settings.max_in_flight, settings.max_requests_jitter);
        self.shared.settings.store(Arc::new(settings));
    }

    /// Per-worker counts, for the workers in the rotation.
    pub fn worker_counts(&self) -> Vec<WorkerCounts> {
        let endpoints = self.shared.pool.snapshot();
        endpoints
            .iter()
            .map(|e| WorkerCounts {
                id: e.id,
                sent: e.sent(),
                in_flight: e.in_flight(),
                tunnels: e.tunnels(),
            })
            .collect()
    }

    /// Watches the workers' heartbeats, for as long as rip runs.
    pub async fn watch_heartbeats(&self) {
        let s = &self.shared;
        watch::Watcher::new(s.pool.clone(), s.settings.clone(), s.reports.clone(), s.metrics.clone())
            .run()
            .await
    }

    /// Applies the supervisor's discovery messages until it hangs up.
    pub async fn follow(&self, mut changes: ChangeReceiver) {
        while let Some(change) = changes.recv().await {
            self.shared.pool.apply(change);
        }
    }
}

/// Requests in flight on a worker (this one included) up to which a request goes over HTTP/1
/// even with `--upstream http2`: measured at one client, HTTP/2 added latency and CPU with
/// nothing to batch.
const ALONE: usize = 1;
/// Tries that never reached a worker, per request: each marks a worker unreachable or finds a
/// pooled connection closed, so a handful covers every worker dying at once.
pub(crate) const MAX_UNSENT: usize = 16;

pub(crate) fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
pub(crate) mod testing;
