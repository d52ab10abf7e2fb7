//! What `rip worker` wraps around the app, rebuilt for the benches because rip's
//! `worker::service::WorkerService` is private: `/healthz` answered before the router, a
//! served-requests counter, panic isolation. Keep it in step with src/worker/service.rs; the
//! benches are only as faithful as this copy.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper_util::service::TowerToHyperService;
use rip::connections::Connections;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};
use tower_http::catch_panic::{CatchPanic, CatchPanicLayer, DefaultResponseForPanic};

#[derive(Clone)]
pub struct WorkerLike {
    app: CatchPanic<Router, DefaultResponseForPanic>,
    served: Arc<AtomicU64>,
}

impl WorkerLike {
    /// The demo app of worker slot 0, as the stock binary serves it.
    pub fn demo() -> WorkerLike {
        let ctx = rip::WorkerContext::new(0, 0, None);
        WorkerLike { app: CatchPanicLayer::new().layer(rip::app::demo(&ctx)), served: Arc::default() }
    }

    /// Requests served so far, health probes excluded.
    #[allow(dead_code)] // used by one of the two bench targets that include this file
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Serves one accepted connection the way a worker does: HTTP/1 with keep-alive and
    /// upgrades, no header timeout, in a task owned by `connections`.
    pub fn serve<I>(&self, io: I, connections: &Connections)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let mut builder = http1::Builder::new();
        builder.keep_alive(true);
        let conn = builder.serve_connection(io, TowerToHyperService::new(self.clone())).with_upgrades();
        connections.spawn(conn, ());
    }
}

/// The connection set a worker keeps: no linger after `stop`, as in src/worker/mod.rs.
pub fn connections(stop: CancellationToken) -> Connections {
    Connections::new(stop, Duration::ZERO)
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for WorkerLike {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> BoxFuture {
        if req.method() == Method::GET && req.uri().path() == "/healthz" {
            return Box::pin(async {
                let mut response = Response::new(Body::from("ok"));
                *response.status_mut() = StatusCode::OK;
                Ok(response)
            });
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        let future = self.app.call(req);
        Box::pin(async move {
            match future.await {
                Ok(response) => Ok(response.map(Body::new)),
                Err(never) => match never {},
            }
        })
    }
}
