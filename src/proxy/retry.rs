//! Sends a request again when a worker failed it and that is safe, as [`Failed::is_retryable`]
//! decides: a request the worker never received (connection refused, pooled connection
//! closed) goes to another worker whatever its method, since nothing was done; once written,
//! only an idempotent request with no body is replayed — a POST the worker may have acted on
//! never is. Nothing is retried once response headers came back: by then the inner service
//! has answered.
//!
//! tower's own `retry::Retry` does not fit: its policy can only retry a request it cloned
//! beforehand, and a request with a streaming body cannot be cloned — yet it must still go
//! to another worker when the first one refused the connection, which is when the inner
//! service hands it back, unsent, inside [`Failed`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{request, HeaderMap, Method, Request, Response, Uri, Version};
use tower::Service;
use tracing::{debug, warn};

use super::{Cause, Failed, Forward, Prepared, ProxyError, RequestBody, ResponseBody, MAX_UNSENT};
use crate::telemetry::metrics::Metrics;

/// Attempts per request that reached a worker, the first included. Each retry goes to a
/// different worker when one is available; attempts that never reached one are bounded
/// apart, by [`MAX_UNSENT`], and by the queue deadline.
const MAX_ATTEMPTS: usize = 4;

#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Retry<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Retry { inner, metrics }
    }
}

impl<S> Service<Prepared> for Retry<S>
where
    S: Service<Forward, Response = Response<ResponseBody>, Error = Failed> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, prepared: Prepared) -> Self::Future {
        // Every service below is always ready: the balancer waits for a worker inside `call`,
        // where the queue deadline bounds the wait.
        let mut inner = self.inner.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let mut policy = Policy::new(prepared.replay);
            let mut forward = prepared.forward;
            loop {
                match inner.call(forward).await {
                    Ok(response) => return Ok(response),
                    Err(failed) => forward = policy.next(failed, &metrics)?,
                }
            }
        })
    }
}

/// One request's retry budget and the means to replay it.
#[derive(Debug)]
pub struct Policy {
    replay: Option<Replay>,
    /// Attempts that reached a worker so far.
    attempt: usize,
    /// Attempts that never reached one.
    unsent: usize,
    /// The request has moved off a stalled worker once.
    moved: bool,
}

impl Policy {
    pub fn new(replay: Option<Replay>) -> Policy {
        Policy { replay, attempt: 1, unsent: 0, moved: false }
    }

    /// The request to send next after `failed`, or the answer to give the client.
    pub fn next(&mut self, failed: Failed, metrics: &Metrics) -> Result<Forward, ProxyError> {
        let replayable = self.replay.is_some() && self.attempt < MAX_ATTEMPTS;
        if !failed.is_retryable(replayable) {
            if let (Cause::Worker(e), Some(worker)) = (&failed.cause, failed.worker) {
                warn!(worker = %worker, error = %e, "worker failed before responding");
            }
            return Err(failed.into_proxy_error());
        }
        let worker = failed.worker;
        let shown = worker.map(|w| w.to_string()).unwrap_or_default();
        let mut next = match failed.unsent {
            Some(unsent) => {
                self.unsent += 1;
                if self.unsent > MAX_UNSENT {
                    return Err(ProxyError::Upstream);
                }
                match &failed.cause {
                    Cause::Unreachable(e) => {
                        warn!(worker = shown, attempt = self.attempt, error = %e, "worker unreachable, request retried");
                        metrics.retry();
                    }
                    _ => debug!(
                        worker = shown,
                        attempt = self.attempt,
                        "connection not ready, request retried"
                    ),
                }
                *unsent
            }
            None => {
                let replay = self.replay.as_ref().expect("retryable after sending only with a replay");
                let stalled = matches!(failed.cause, Cause::Stalled);
                if stalled {
                    warn!(
                        worker = shown,
                        attempt = self.attempt,
                        path = replay.path(),
                        "request moved off a stalled worker"
                    );
                    metrics.moved();
                } else {
                    warn!(worker = shown, attempt = self.attempt, error = %failed.cause, "worker failed before responding, request retried");
                    metrics.retry();
                }
                self.attempt += 1;
                self.moved |= stalled;
                let mut forward = replay.forward();
                forward.moved = self.moved;
                forward
            }
        };
        next.avoid = worker;
        Ok(next)
    }
}

/// What it takes to send a request again: only kept for idempotent requests without a body.
#[derive(Debug)]
pub struct Replay {
    id: u64,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    /// A replay of the request in `parts` if it is idempotent and, as the caller says,
    /// `bodiless` (no body, no upgrade).
    pub fn capture(parts: &request::Parts, bodiless: bool) -> Option<Replay> {
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        (idempotent && bodiless).then(|| Replay {
            id: 0,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        })
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The same replay, for the request numbered `id`.
    pub fn numbered(self, id: u64) -> Replay {
        Replay { id, ..self }
    }

    /// The request again, as the first attempt had it.
    pub fn forward(&self) -> Forward {
        let mut forward = Forward::new(self.rebuild());
        forward.id = self.id;
        forward.movable = true;
        forward
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::WorkerId;
    use std::sync::Mutex;
    use tower::{service_fn, ServiceExt};

    fn worker(slot: usize) -> Option<WorkerId> {
        Some(WorkerId { slot, generation: 0 })
    }

    fn prepared(method: &str, replayable: bool) -> Prepared {
        let request = Request::builder().method(method).uri("/").body(RequestBody::empty()).unwrap();
        let parts = request.into_parts().0;
        let replay = Replay::capture(&parts, replayable);
        Prepared { forward: Forward::new(Request::from_parts(parts, RequestBody::empty())), replay }
    }

    fn worker_error() -> Cause {
        // A real hyper error without a socket: a response head that is not HTTP.
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        std::thread::spawn(move || {
            rt.block_on(async {
                let (client, mut server) = tokio::io::duplex(1024);
                let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, RequestBody>(
                    hyper_util::rt::TokioIo::new(client),
                )
                .await
                .unwrap();
                tokio::spawn(conn);
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = server.write_all(b"not http\r\n\r\n").await;
                });
                let err = sender.send_request(Request::new(RequestBody::empty())).await.unwrap_err();
                tx.send(err).unwrap();
            })
        });
        Cause::Worker(rx.recv().unwrap())
    }

    /// The workers each call was told to avoid, in order.
    type Avoided = Arc<Mutex<Vec<Option<WorkerId>>>>;

    /// An inner service that fails each call with the next cause of `script` (handing the
    /// request back for unsent ones) and answers 200 once the script is used up.
    fn scripted(script: Vec<(Cause, bool)>) -> (impl BalanceLike, Avoided) {
        let script = Arc::new(Mutex::new(script.into_iter()));
        let avoided = Avoided::default();
        let svc = service_fn({
            let avoided = avoided.clone();
            move |forward: Forward| {
                avoided.lock().unwrap().push(forward.avoid);
                let attempt = avoided.lock().unwrap().len();
                let next = script.lock().unwrap().next();
                async move {
                    match next {
                        None => Ok(Response::new(ResponseBody::empty())),
                        Some((cause, true)) => Err(Failed::unsent(cause, worker(attempt), forward)),
                        Some((cause, false)) => Err(Failed::new(cause, worker(attempt))),
                    }
                }
            }
        });
        (svc, avoided)
    }

    /// What the retry layer needs below it.
    trait BalanceLike:
        Service<Forward, Response = Response<ResponseBody>, Error = Failed, Future: Send>
        + Clone
        + Send
        + 'static
    {
    }
    impl<T> BalanceLike for T where
        T: Service<Forward, Response = Response<ResponseBody>, Error = Failed, Future: Send>
            + Clone
            + Send
            + 'static
    {
    }

    async fn run(script: Vec<(Cause, bool)>, method: &str, replayable: bool) -> (Result<u16, u16>, usize) {
        let (inner, avoided) = scripted(script);
        let retry = Retry::new(inner, Arc::new(Metrics::default()));
        let result = retry.oneshot(prepared(method, replayable)).await;
        let calls = avoided.lock().unwrap().len();
        (result.map(|r| r.status().as_u16()).map_err(|e| e.status().as_u16()), calls)
    }

    fn refused() -> Cause {
        Cause::Unreachable(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[tokio::test]
    async fn a_request_that_never_reached_a_worker_is_retried_whatever_its_method() {
        assert_eq!(run(vec![(refused(), true)], "POST", false).await, (Ok(200), 2));
        assert_eq!(run(vec![(Cause::NotReady, true), (refused(), true)], "GET", true).await, (Ok(200), 3));
    }

    #[tokio::test]
    async fn a_get_whose_worker_failed_is_replayed_but_a_post_never() {
        assert_eq!(run(vec![(worker_error(), false)], "GET", true).await, (Ok(200), 2));
        assert_eq!(run(vec![(worker_error(), false)], "POST", false).await, (Err(502), 1));
    }

    #[tokio::test]
    async fn replays_stop_after_the_attempt_budget_and_unsent_tries_after_theirs() {
        let failing = (0..MAX_ATTEMPTS).map(|_| (worker_error(), false)).collect();
        assert_eq!(run(failing, "GET", true).await, (Err(502), MAX_ATTEMPTS));
        let refusing = (0..=MAX_UNSENT).map(|_| (refused(), true)).collect();
        assert_eq!(run(refusing, "GET", true).await, (Err(502), MAX_UNSENT + 1));
    }

    #[tokio::test]
    async fn timeouts_body_errors_and_no_worker_are_answered_at_once() {
        use crate::proxy::body::BodyError;
        let cases = [
            (Cause::Timeout(std::time::Duration::from_secs(1)), 504),
            (Cause::Body(BodyError::TooLarge), 413),
            (Cause::Body(BodyError::Timeout), 408),
            (Cause::NoWorker, 503),
        ];
        for (cause, status) in cases {
            assert_eq!(run(vec![(cause, false)], "GET", true).await, (Err(status), 1));
        }
    }

    #[tokio::test]
    async fn each_retry_avoids_the_worker_that_just_failed() {
        let (inner, avoided) = scripted(vec![(refused(), true), (worker_error(), false)]);
        let retry = Retry::new(inner, Arc::new(Metrics::default()));
        retry.oneshot(prepared("GET", true)).await.unwrap();
        assert_eq!(*avoided.lock().unwrap(), vec![None, worker(1), worker(2)]);
    }
}
