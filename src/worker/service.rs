//! What wraps every app in a worker: `GET /healthz` answered by rip itself (the supervisor's
//! readiness probe must not depend on the app's routes), a served-requests counter, panic
//! isolation so that a panicking handler costs one 500, not the worker, and the client's
//! address as axum's `ConnectInfo<SocketAddr>`, from the peer the front-end saw.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::net::SocketAddr;

use super::pulse::Pulse;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http::{Method, Request, Response, StatusCode};
use tower::Layer;
use tower::Service;
use tower_http::catch_panic::{CatchPanic, CatchPanicLayer, DefaultResponseForPanic};

#[derive(Clone)]
pub struct WorkerService {
    app: CatchPanic<Router, DefaultResponseForPanic>,
    shared: Arc<super::Shared>,
}

impl WorkerService {
    /// Wraps the app a worker serves; requests are counted in `ctx`.
    pub fn new(router: Router, ctx: &crate::WorkerContext) -> WorkerService {
        WorkerService { app: CatchPanicLayer::new().layer(router), shared: ctx.shared.clone() }
    }

    /// The worker's heartbeat, which this service's requests keep awake.
    pub(super) fn pulse(&self) -> Option<Arc<Pulse>> {
        self.shared.pulse.clone()
    }
}

pin_project_lite::pin_project! {
    /// A request's future that names the request in the heartbeat page while it is polled:
    /// if the worker's thread blocks inside the poll, the page keeps the name, and the
    /// front-end knows which request not to move elsewhere.
    struct Named<F> {
        #[pin]
        inner: F,
        request: u64,
        pulse: Arc<Pulse>,
    }
}

impl<F: Future> Future for Named<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.pulse.heartbeat().set_current(*this.request);
        let polled = this.inner.poll(cx);
        this.pulse.heartbeat().set_current(0);
        polled
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<B> Service<Request<B>> for WorkerService
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> BoxFuture {
        if req.method() == Method::GET && req.uri().path() == "/healthz" {
            return Box::pin(async { Ok(health()) });
        }
        self.shared.served.fetch_add(1, Ordering::Relaxed);
        set_connect_info(&mut req);
        let request = req.headers_mut().remove(&crate::proxy::headers::REQUEST);
        let future = self.app.call(req.map(super::drain::Drained::new));
        let answer = async move {
            match future.await {
                Ok(response) => Ok(response.map(Body::new)),
                Err(never) => match never {},
            }
        };
        let request = request.and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match (request, &self.shared.pulse) {
            (Some(request), Some(pulse)) => Box::pin(Named { inner: answer, request, pulse: pulse.clone() }),
            _ => Box::pin(answer),
        }
    }
}

/// Puts the client's address where axum's `ConnectInfo<SocketAddr>` extractor looks, unless
/// the connection put it there already (a client handed over whole, with `--upstream
/// handoff`). It comes from the front-end's peer header, which is then removed: the app sees
/// the client's request, not rip's plumbing. A request that did not come through a front-end
/// (a worker run by hand behind another proxy) gets the unspecified address rather than a 500
/// from the extractor.
fn set_connect_info<B>(req: &mut Request<B>) {
    let peer = req.headers_mut().remove(&crate::proxy::headers::PEER);
    if req.extensions().get::<ConnectInfo<SocketAddr>>().is_some() {
        return;
    }
    let addr = peer
        .and_then(|v| v.to_str().ok().and_then(|s| s.parse().ok()))
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    req.extensions_mut().insert(ConnectInfo(addr));
}

fn health() -> Response<Body> {
    let mut response = Response::new(Body::from("ok"));
    *response.status_mut() = StatusCode::OK;
    response
}
