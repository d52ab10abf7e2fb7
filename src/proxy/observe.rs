//! The outermost layer: what is seen of every request, whoever answered it. It counts the
//! request in the metrics, writes its access log line when the response body ends, says
//! `Connection: close` once the front-end is draining, and turns a [`ProxyError`] into the
//! client's answer. Invariant: every request leaves this layer with a response — the error
//! type is `Infallible`, so the router never sees a failure it would have to invent a status
//! for.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderValue, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::Service;
use tracing::{debug, warn};

use super::{ClientBody, Files, Peer, ProxyError, ResponseBody, Rewrite};
use crate::telemetry::access_log::{AccessLog, Record};
use crate::telemetry::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    /// What the response half of `call` needs: one reference per request, not three.
    observing: Arc<Observing>,
    /// The client, when the stack serves one connection; else each request's extension.
    peer: Option<Arc<Peer>>,
}

#[derive(Debug)]
struct Observing {
    metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
    closing: Arc<AtomicBool>,
}

impl<S> Observe<S> {
    pub fn new(
        inner: S,
        metrics: Arc<Metrics>,
        access_log: Option<AccessLog>,
        closing: Arc<AtomicBool>,
    ) -> Self {
        Observe { inner, observing: Arc::new(Observing { metrics, access_log, closing }), peer: None }
    }
}

impl<S> Service<Request<ClientBody>> for Observe<S>
where
    S: Service<Request<ClientBody>, Response = Response<ResponseBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let peer = match &self.peer {
            Some(peer) => Some(peer.addr.ip()),
            None => req.extensions().get::<Arc<Peer>>().map(|p| p.addr.ip()),
        };
        let inner = self.inner.call(req);
        let this = self.observing.clone();
        Box::pin(async move {
            let mut response = match inner.await {
                Ok(response) => response,
                Err(err) => {
                    if err.is_client_error() {
                        debug!(method = %method, path = uri.path(), error = ?err, "request refused");
                    } else {
                        warn!(method = %method, path = uri.path(), status = err.status().as_u16(), error = ?err, "request failed");
                    }
                    err.into_response()
                }
            };
            let worker = response.body().worker();
            this.metrics.request(response.status().as_u16(), worker.map(|w| w.slot), started.elapsed());
            if this.closing.load(Ordering::Relaxed) && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            if let Some(log) = &this.access_log {
                let target =
                    uri.path_and_query().map_or_else(|| uri.to_string(), |pq| pq.as_str().to_owned());
                let record = Record {
                    peer: peer.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
                    method,
                    target,
                    status: response.status(),
                    worker: worker.map(|w| w.to_string()),
                    started,
                };
                response.body_mut().log_to(log.clone(), record);
            }
            Ok(response)
        })
    }
}

impl<S> Observe<Files<Rewrite<S>>> {
    /// The stack for one client connection: the peer is known once, so no request needs to
    /// carry it (an extension costs allocations per request).
    pub fn for_peer(&self, peer: Arc<Peer>) -> Self
    where
        S: Clone,
    {
        let mut stack = self.clone();
        stack.inner.inner.peer = Some(peer.clone());
        stack.peer = Some(peer);
        stack
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{body_text, get};
    use crate::telemetry::metrics::Gauges;
    use tower::util::ServiceFn;
    use tower::{service_fn, ServiceExt};

    fn observe<F>(f: F, closing: bool) -> (Observe<ServiceFn<F>>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let layer = Observe::new(service_fn(f), metrics.clone(), None, Arc::new(AtomicBool::new(closing)));
        (layer, metrics)
    }

    async fn no_worker(_req: Request<ClientBody>) -> Result<Response<ResponseBody>, ProxyError> {
        Err(ProxyError::NoWorker)
    }

    async fn ok(_req: Request<ClientBody>) -> Result<Response<ResponseBody>, ProxyError> {
        Ok(Response::new(ResponseBody::full("hi")))
    }

    async fn switching(_req: Request<ClientBody>) -> Result<Response<ResponseBody>, ProxyError> {
        let mut response = Response::new(ResponseBody::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        Ok(response)
    }

    #[tokio::test]
    async fn an_error_becomes_its_answer_and_is_counted() {
        let (svc, metrics) = observe(no_worker, false);
        let response = svc.oneshot(get("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert!(body_text(response).await.contains("no worker"));
        assert!(metrics.render(&Gauges::default()).contains("rip_requests_total{status=\"503\"} 1"));
    }

    #[tokio::test]
    async fn while_draining_every_answer_but_a_101_closes_its_connection() {
        let (svc, _) = observe(ok, true);
        assert_eq!(svc.oneshot(get("/")).await.unwrap().headers()["connection"], "close");
        let (svc, _) = observe(switching, true);
        assert!(!svc.oneshot(get("/")).await.unwrap().headers().contains_key("connection"));
        let (svc, _) = observe(ok, false);
        assert!(!svc.oneshot(get("/")).await.unwrap().headers().contains_key("connection"));
    }
}
