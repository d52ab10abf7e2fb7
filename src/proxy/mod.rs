//! The request path: every client request is rewritten, given to a worker chosen by the
//! balancer over a pooled keep-alive connection, retried on another worker when that is safe,
//! and answered with the worker's streamed response or one mapped error.
//!
//! Retry rule: a request the worker never received (connect refused, connection not ready)
//! is retried whatever its method, since nothing was done. Once written, only an idempotent
//! request with no body is replayed; a POST the worker may have acted on never is. Nothing is
//! retried once response headers came back.

mod balance;
mod body;
mod endpoint;
mod error;
mod handoff;
pub(crate) mod headers;
mod pool;
mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use balance::Balance;
pub use body::{RequestBody, ResponseBody};
pub use endpoint::{Endpoint, Upstream};
pub use error::ProxyError;
pub use pool::Pool;

use arc_swap::ArcSwap;

use crate::access_log::{AccessLog, Record};
use crate::discovery::{ChangeReceiver, Report, ReportSender, WorkerId};
use crate::metrics::Metrics;
use endpoint::Lease;

/// Attempts per request, the first included. Each retry goes to a different worker when one
/// is available; with every worker dying at once, the queue deadline bounds the wait.
const MAX_ATTEMPTS: usize = 4;
/// Requests in flight on a worker (this one included) up to which a request goes over HTTP/1
/// even with `--upstream http2`: measured at one client, HTTP/2 added latency and CPU with
/// nothing to batch.
const ALONE: usize = 1;
/// Tries that never reached a worker, per request: each marks a worker unreachable or finds a
/// pooled connection closed, so a handful covers every worker dying at once.
const MAX_UNSENT: usize = 16;

/// What the proxy needs from the config. All but `balance` can change on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub balance: Balance,
    /// How the front-end talks to workers; fixed at start like `balance`.
    pub upstream: Upstream,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub timeout: Duration,
    pub queue_timeout: Duration,
    /// 0 means unlimited.
    pub max_body: u64,
    /// Longest pause allowed in the middle of a client's request body.
    pub body_timeout: Duration,
    /// Requests in flight per worker before it counts as full; 0 = no limit.
    pub max_in_flight: usize,
}

impl From<&crate::config::Config> for Settings {
    fn from(config: &crate::config::Config) -> Settings {
        Settings {
            balance: config.balance,
            upstream: config.upstream,
            max_requests: config.max_requests,
            max_requests_jitter: config.max_requests_jitter,
            timeout: config.timeout,
            queue_timeout: config.queue_timeout,
            max_body: config.max_body,
            // The same patience for a client's body as for its headers.
            body_timeout: config.header_timeout,
            max_in_flight: config.max_in_flight,
        }
    }
}

/// Cheap to clone; all clones share the pool.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pool: Pool,
    settings: ArcSwap<Settings>,
    reports: ReportSender,
    metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
    /// Set when the front-end stops: every response then closes its connection.
    closing: AtomicBool,
}

impl Proxy {
    pub fn new(
        settings: Settings,
        reports: ReportSender,
        metrics: Arc<Metrics>,
        access_log: Option<AccessLog>,
    ) -> Proxy {
        let pool = Pool::new(settings.balance, settings.max_in_flight, settings.upstream);
        pool.configure(settings.max_in_flight, settings.max_requests_jitter);
        let settings = ArcSwap::from_pointee(settings);
        let closing = AtomicBool::new(false);
        Proxy { shared: Arc::new(Shared { pool, settings, reports, metrics, access_log, closing }) }
    }

    /// How requests reach workers; fixed at start.
    pub fn upstream(&self) -> Upstream {
        self.shared.pool.upstream()
    }

    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// From now on every response tells its client to close the connection.
    pub fn close_connections_after_responses(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
    }

    /// Applies settings re-read on reload (the balance strategy stays as started).
    pub fn reconfigure(&self, settings: Settings) {
        self.shared.pool.configure(settings.max_in_flight, settings.max_requests_jitter);
        self.shared.settings.store(Arc::new(settings));
    }

    /// Per-worker request counts: (worker, requests sent to it, requests in flight).
    pub fn worker_counts(&self) -> Vec<(WorkerId, u64, usize)> {
        self.shared.pool.snapshot().iter().map(|e| (e.id, e.sent(), e.in_flight())).collect()
    }

    /// Applies the supervisor's discovery messages until it hangs up.
    pub async fn follow(&self, mut changes: ChangeReceiver) {
        while let Some(change) = changes.recv().await {
            self.shared.pool.apply(change);
        }
    }

    /// The tower service for one client connection.
    pub fn service(&self, peer: SocketAddr) -> ProxyService {
        let peer = Peer { ip: peer.ip(), forwarded_for: headers::forwarded_for(peer.ip()) };
        ProxyService { proxy: self.clone(), peer: Arc::new(peer) }
    }

    /// Serves one client request through a worker.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<ResponseBody> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let target = self.shared.access_log.as_ref().map(|_| {
            parts.uri.path_and_query().map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned())
        });
        let (mut response, worker) = match self.forward(&mut parts, body, peer).await {
            Ok((response, worker)) => (response, Some(worker)),
            Err(err) => {
                if err.is_client_error() {
                    debug!(method = %parts.method, path = parts.uri.path(), error = ?err, "request refused");
                } else {
                    warn!(method = %parts.method, path = parts.uri.path(), status = err.status().as_u16(), error = ?err, "request failed");
                }
                (err.into_response(), None)
            }
        };
        self.shared.metrics.request(response.status().as_u16(), worker.map(|w| w.slot), started.elapsed());
        if self.shared.closing.load(Ordering::Relaxed) && response.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            response.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        if let (Some(log), Some(target)) = (&self.shared.access_log, target) {
            let record = Record {
                peer: peer.ip,
                method: parts.method,
                target,
                status: response.status(),
                worker: worker.map(|w| w.to_string()),
                started,
            };
            response.body_mut().log_to(log.clone(), record);
        }
        response
    }

    /// Sends the request to workers until one answers or it is not safe to try again.
    /// `parts` is left as sent (minus what the request moved), for the caller's log line.
    async fn forward(
        &self,
        parts: &mut http::request::Parts,
        body: Incoming,
        peer: &Peer,
    ) -> Result<(Response<ResponseBody>, WorkerId), ProxyError> {
        let settings = self.shared.settings.load();
        if parts.method == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }
        headers::check_request(parts).map_err(ProxyError::BadRequest)?;
        let max_body = if settings.max_body == 0 { u64::MAX } else { settings.max_body };
        if declared_length(&parts.headers).is_some_and(|len| len > max_body) {
            return Err(ProxyError::BodyTooLarge);
        }
        let upgrade = headers::prepare_request(parts, &peer.forwarded_for);
        let replay = Replay::capture(parts, &body, upgrade);
        let (body, mut watch) = RequestBody::client(body, max_body, settings.body_timeout);
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = std::mem::take(&mut parts.headers);
        *req.extensions_mut() = std::mem::take(&mut parts.extensions);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let deadline = Instant::now() + settings.queue_timeout;
        let mut avoid: Option<WorkerId> = None;
        // Attempts whose request reached a worker (replays), bounded by MAX_ATTEMPTS. Attempts
        // that never reached one cost nothing but time, bounded by the queue deadline (and by
        // MAX_UNSENT against a worker that accepts connections it cannot serve).
        let mut attempt = 1;
        let mut unsent = 0;
        loop {
            let Some(endpoint) = self.shared.pool.pick_until(avoid, deadline).await else {
                return Err(ProxyError::NoWorker);
            };
            avoid = Some(endpoint.id);
            let lease = endpoint.lease();
            if endpoint.count_request(settings.max_requests) {
                let _ = self.shared.reports.send(Report::Exhausted(endpoint.id));
            }
            // Bodies and tunnels get a connection of their own (see `Upstream::Http2`), and so
            // does a request alone on its worker: with nothing to batch, HTTP/1 answers sooner.
            let own = upgrade || watch.is_some() || endpoint.in_flight() <= ALONE;
            let mut sender = match endpoint.connection(own).await {
                Ok(sender) => sender,
                Err(e) => {
                    // The socket refuses connections: the worker is gone. Stop choosing it
                    // until the supervisor replaces it; the request was never sent.
                    endpoint.mark_unreachable();
                    self.shared.pool.touch();
                    warn!(worker = %endpoint.id, attempt, error = %e, "worker unreachable, request retried");
                    self.shared.metrics.retry();
                    unsent += 1;
                    if unsent > MAX_UNSENT {
                        return Err(ProxyError::Upstream);
                    }
                    continue;
                }
            };
            let started = Instant::now();
            // The worker is timed from the end of the request body: a client that uploads
            // slowly is the client's problem (the body idle timeout), not a hung worker.
            let answer_deadline = async {
                if let Some(watch) = watch.as_mut() {
                    watch.sent().await;
                }
                tokio::time::sleep(settings.timeout).await;
            };
            let sent = tokio::select! {
                sent = sender.try_send_request(req) => sent,
                () = answer_deadline => return Err(self.timed_out(&endpoint, parts, started)),
            };
            match sent {
                Ok(response) => {
                    return Ok((self.respond(response, lease, sender, client_upgrade), endpoint.id));
                }
                Err(mut err) => {
                    if let Some(back) = err.take_message() {
                        debug!(worker = %endpoint.id, attempt, "connection not ready, request retried");
                        req = back;
                        unsent += 1;
                        if unsent > MAX_UNSENT {
                            return Err(ProxyError::Upstream);
                        }
                        continue;
                    }
                    let err = err.into_error();
                    let body_error = watch
                        .as_ref()
                        .and_then(body::BodyWatch::failure)
                        .or_else(|| cause::<body::BodyError>(&err));
                    if let Some(body_error) = body_error {
                        return Err(match body_error {
                            body::BodyError::TooLarge => ProxyError::BodyTooLarge,
                            body::BodyError::Timeout => ProxyError::BodyTimeout,
                            body::BodyError::Client => ProxyError::BadBody,
                        });
                    }
                    // The worker may be dead with more pooled connections to it that still look
                    // open; the next attempt to it must find out by connecting afresh.
                    endpoint.forget_idle();
                    match &replay {
                        Some(replay) if attempt < MAX_ATTEMPTS => {
                            warn!(worker = %endpoint.id, attempt, error = %err, "worker failed before responding, request retried");
                            self.shared.metrics.retry();
                            req = replay.rebuild();
                            attempt += 1;
                        }
                        _ => {
                            warn!(worker = %endpoint.id, error = %err, "worker failed before responding");
                            return Err(ProxyError::Upstream);
                        }
                    }
                }
            }
        }
    }

    fn respond(
        &self,
        response: Response<Incoming>,
        lease: Lease,
        sender: endpoint::Sender,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = response.into_parts();
        headers::prepare_response(parts.status, &mut parts.headers);
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let mut upstream = Response::from_parts(parts, body);
                let upstream_upgrade = hyper::upgrade::on(&mut upstream);
                upgrade::tunnel(client, upstream_upgrade, lease);
                drop(sender);
                let (parts, _) = upstream.into_parts();
                return Response::from_parts(parts, ResponseBody::empty());
            }
        }
        if client_upgrade.is_some() {
            // A declined upgrade: the client may already be sending the other protocol, and
            // the framing guard stopped watching this connection. It must not carry more.
            parts.headers.insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        Response::from_parts(parts, ResponseBody::upstream(body, lease, sender))
    }

    fn timed_out(&self, endpoint: &Endpoint, request: &http::request::Parts, started: Instant) -> ProxyError {
        let elapsed = started.elapsed();
        warn!(
            worker = %endpoint.id,
            method = %request.method,
            path = request.uri.path(),
            elapsed_ms = elapsed.as_millis() as u64,
            "request timed out, worker will be replaced"
        );
        if endpoint.mark_hung() {
            let _ = self.shared.reports.send(Report::Hung(endpoint.id));
        }
        ProxyError::Timeout(elapsed)
    }
}

pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The first error of type `E` in `err`'s chain of causes.
fn cause<E: std::error::Error + Copy + 'static>(err: &(dyn std::error::Error + 'static)) -> Option<E> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(*found);
        }
        next = e.source();
    }
    None
}

/// What it takes to send a request again: only kept for idempotent requests without a body.
#[derive(Debug)]
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn capture(parts: &http::request::Parts, body: &Incoming, upgrade: bool) -> Option<Replay> {
        use http_body::Body;
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        (idempotent && body.is_end_stream() && !upgrade).then(|| Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        })
    }

    fn rebuild(&self) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::empty());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// The client at the other end of a connection.
#[derive(Debug)]
pub struct Peer {
    pub ip: IpAddr,
    /// Made once per connection rather than once per request.
    forwarded_for: http::HeaderValue,
}

/// The proxy as a tower service for one client connection.
#[derive(Debug, Clone)]
pub struct ProxyService {
    proxy: Proxy,
    peer: Arc<Peer>,
}

impl tower::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let proxy = self.proxy.clone();
        let peer = self.peer.clone();
        Box::pin(async move { Ok(proxy.handle(req, &peer).await) })
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let proxy = self.proxy.clone();
        let peer = self.peer.clone();
        Box::pin(async move { Ok(proxy.handle(req, &peer).await) })
    }
}
