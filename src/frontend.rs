//! The public listener: accepts client connections and serves each with hyper's HTTP/1 server
//! through the front-end's axum router — the user's edge routes and layers, falling back to
//! the proxy stack — or with `--upstream handoff` passes each to a worker. Invariant: at most
//! `max_connections` client connections are open (or on their way to a worker); past that,
//! new ones wait in the kernel's accept queue instead of exhausting file descriptors.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::warn;

use crate::connections::Connections;
use crate::framing::StrictFraming;
use crate::proxy::{Peer, Proxy, ProxyError, Upstream};

/// What a user's binary adds at the edge: it gets the router whose fallback is the proxy to
/// the workers and returns it with routes the parent answers itself and tower layers that
/// wrap every request, the workers' included.
pub type Edge = Arc<dyn Fn(Router) -> Router + Send + Sync>;

/// The front-end's router: the proxy stack as the fallback, under the user's edge.
pub fn router(proxy: &Proxy, edge: Option<&Edge>) -> Router {
    let router = Router::new().fallback_service(proxy.stack());
    match edge {
        Some(edge) => edge(router),
        None => router,
    }
}

/// The router as one client connection serves it: every request carries the peer the
/// listener saw, as axum's `ConnectInfo` for edge handlers and as a [`Peer`] for the proxy.
#[derive(Clone)]
struct Connection {
    router: Router,
    peer: Arc<Peer>,
}

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = axum::routing::future::RouteFuture<Infallible>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let extensions = req.extensions_mut();
        extensions.insert(ConnectInfo(self.peer.addr));
        extensions.insert(self.peer.clone());
        // A router is always ready; it is cloned (an Arc) because `call` takes `&mut`.
        self.router.clone().call(req)
    }
}

/// Pause after an accept error such as EMFILE, so that a full file table is not spun on.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// After the front-end stops accepting, how long open connections keep being served (each
/// response saying `Connection: close`) before idle ones are closed. Long enough for a busy
/// keep-alive client to receive one more response and reconnect elsewhere (after an upgrade:
/// to the new process), short enough not to matter to a shutdown.
pub const DRAIN_LINGER: Duration = Duration::from_millis(500);
/// Largest request head (request line plus headers) read from a client; beyond it, 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in one request; beyond it, 431.
const MAX_HEADERS: usize = 100;

#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// hyper's HTTP/1 server as every client connection gets it, in the front-end or (with
/// `--upstream handoff`) in a worker.
pub fn client_builder(header_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper runs this timer whenever it waits for a request head, so it also closes idle
        // keep-alive connections and connections that never send a byte.
        .header_read_timeout(header_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
}

/// Accepts connections until `stop` is cancelled, then gives open ones up to `grace` to
/// finish. Returns how many were still open when the grace ran out.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    grace: Duration,
) -> usize {
    let connections = Connections::new(stop.clone(), DRAIN_LINGER);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let builder = client_builder(limits.header_timeout);
    let handoff = proxy.upstream() == Upstream::Handoff;
    while let Some((stream, peer, permit)) = accept(&listener, &permits, &stop).await {
        if handoff {
            let (proxy, builder) = (proxy.clone(), builder.clone());
            connections.track(async move {
                if let Err(client) = proxy.hand_off(stream).await {
                    refuse(&builder, client).await;
                }
                drop(permit);
            });
            continue;
        }
        let stream = StrictFraming::new(stream);
        let service = Connection { router: router.clone(), peer: Arc::new(Peer::new(peer)) };
        let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        connections.spawn(conn, permit);
    }
    drop(listener);
    proxy.close_connections_after_responses();
    connections.drain(grace).await
}

/// The next client connection, with its permit; `None` once `stop` is cancelled.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stop.cancelled() => return None,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, permit));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = stop.cancelled() => return None,
        }
    }
}

/// Answers a connection no worker took with 503, reading its request first so that the
/// answer is not lost to a reset.
async fn refuse(builder: &http1::Builder, client: TcpStream) {
    let service = hyper::service::service_fn(|_req| async {
        let mut response = ProxyError::NoWorker.into_response();
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        Ok::<_, std::convert::Infallible>(response)
    });
    let _ = builder.serve_connection(TokioIo::new(StrictFraming::new(client)), service).await;
}
