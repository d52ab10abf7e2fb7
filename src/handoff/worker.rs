//! `--upstream handoff` in a worker: client connections arrive whole over the hand-off
//! channel (`crate::handoff`) and are served here, with what the front-end otherwise gives
//! them: strict framing, header limits and timeout, CONNECT and a missing Host refused,
//! `X-Forwarded-For` from the peer, `--max-body`, a connection cap. Invariant: once the worker
//! has served its request budget or is stopping, every response closes its connection, so
//! keep-alive clients move to another worker between requests instead of having an idle
//! connection closed under them.

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tracing::{debug, warn};

use crate::frontend::connections::Connections;
use crate::frontend::framing::{Judged, StrictFraming};
use crate::handoff::{self, Received};
use crate::proxy::headers;
use crate::worker::{WorkerContext, WorkerService};

/// After SIGTERM, how long the hand-off channels are still read for connections the
/// front-end queued before taking this worker out of its rotation. The front-end closes its
/// channel before it signals, so this only bounds a front-end that died.
const CHANNEL_DRAIN: Duration = Duration::from_secs(1);

/// A worker's side of the hand-off: the channel socket, the tasks reading channels, and the
/// client connections they brought.
pub struct Handoff {
    clients: Clients,
    path: PathBuf,
    accepting: JoinHandle<()>,
    receivers: TaskTracker,
}

impl Handoff {
    /// Binds the channel socket next to the worker's `socket` and starts taking channels.
    pub fn start(
        socket: &Path,
        service: WorkerService,
        ctx: WorkerContext,
        limits: ClientLimits,
        stop: CancellationToken,
    ) -> anyhow::Result<Handoff> {
        let path = handoff::channel_path(socket);
        let listener = crate::worker::bind(&path)?;
        let clients = Clients::new(service, ctx, limits, stop);
        let receivers = TaskTracker::new();
        let accepting = tokio::spawn(accept_channels(listener, clients.clone(), receivers.clone()));
        Ok(Handoff { clients, path, accepting, receivers })
    }

    /// Takes no more channels, serves what the front-end had queued, then gives client
    /// connections up to `grace`. Returns how many were still open.
    pub async fn stop(self, grace: Duration) -> usize {
        self.accepting.abort();
        let _ = std::fs::remove_file(&self.path);
        self.receivers.close();
        let _ = tokio::time::timeout(CHANNEL_DRAIN, self.receivers.wait()).await;
        self.clients.drain(grace).await
    }
}

async fn accept_channels(listener: UnixListener, clients: Clients, receivers: TaskTracker) {
    loop {
        match listener.accept().await {
            Ok((channel, _)) => {
                receivers.spawn(clients.clone().receive(channel));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(crate::frontend::connections::ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// What the front-end enforces on client connections, enforced here instead.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLimits {
    pub header_timeout: Duration,
    /// 0 = unlimited.
    pub max_body: u64,
    /// Client connections this worker serves at once; past it, hand-offs wait in the channel.
    pub max_connections: usize,
    /// Peers whose forwarding headers are believed (`--trusted-proxies`).
    pub trusted_proxies: Vec<crate::config::Cidr>,
}

/// The client connections of one worker. Cheap to clone.
#[derive(Clone)]
struct Clients {
    shared: Arc<Shared>,
}

struct Shared {
    service: WorkerService,
    ctx: WorkerContext,
    builder: http1::Builder,
    connections: Connections,
    permits: Arc<Semaphore>,
    max_body: u64,
    trusted_proxies: Vec<crate::config::Cidr>,
    /// Requests to serve before asking to be recycled, as the front-end said; 0 = no limit.
    budget: AtomicU64,
    exhausted: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Clients {
    /// `stop`: once cancelled, responses close their connections, and idle ones are closed
    /// after the front-end's drain linger.
    fn new(
        service: WorkerService,
        ctx: WorkerContext,
        limits: ClientLimits,
        stop: CancellationToken,
    ) -> Clients {
        let shared = Shared {
            service,
            ctx,
            builder: crate::frontend::client_builder(limits.header_timeout),
            connections: Connections::new(stop.clone(), crate::frontend::DRAIN_LINGER),
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            max_body: if limits.max_body == 0 { u64::MAX } else { limits.max_body },
            trusted_proxies: limits.trusted_proxies.clone(),
            budget: AtomicU64::new(0),
            exhausted: watch::Sender::new(false),
            stop,
        };
        Clients { shared: Arc::new(shared) }
    }

    /// Serves the connections that come over `channel` until the front-end closes it.
    async fn receive(self, mut channel: UnixStream) {
        match handoff::read_budget(&mut channel).await {
            Ok(budget) => self.shared.budget.store(budget, Ordering::Relaxed),
            Err(e) => return debug!(error = %e, "hand-off channel closed before its budget"),
        }
        let mut exhausted = self.shared.exhausted.subscribe();
        let mut told = false;
        loop {
            tokio::select! {
                (permit, received) = self.next(&channel) => match received {
                    Ok(Received::Client(fd)) => self.serve(fd, permit),
                    Ok(Received::Lost) => warn!("a handed-off connection was lost: out of file descriptors"),
                    Ok(Received::Closed) => break,
                    Err(e) => {
                        warn!(error = %e, "hand-off channel failed");
                        break;
                    }
                },
                exhausted = async { exhausted.wait_for(|e| *e).await.is_ok() }, if !told => {
                    told = true;
                    if !exhausted {
                        continue;
                    }
                    let said = channel.async_io(tokio::io::Interest::WRITABLE, || {
                        channel.try_write(&[handoff::EXHAUSTED]).map(drop)
                    });
                    if let Err(e) = said.await {
                        debug!(error = %e, "could not tell the front-end this worker is exhausted");
                    }
                }
            }
        }
    }

    async fn next(&self, channel: &UnixStream) -> (OwnedSemaphorePermit, std::io::Result<Received>) {
        let permit =
            self.shared.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        (permit, handoff::recv(channel).await)
    }

    fn serve(&self, fd: OwnedFd, permit: OwnedSemaphorePermit) {
        let stream = std::net::TcpStream::from(fd);
        // The client may already be gone; then there is nothing to serve.
        let Ok(peer) = stream.peer_addr() else { return };
        let Ok(stream) = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream)) else {
            return;
        };
        let service = ClientService {
            clients: self.clone(),
            peer,
            forwarded_for: headers::forwarded_for(peer.ip()),
            trusted: self.shared.trusted_proxies.iter().any(|cidr| cidr.contains(peer.ip())),
        };
        let stream = StrictFraming::new(stream);
        let service = Judged::new(service, stream.verdict());
        let conn = self.shared.builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        self.shared.connections.spawn(conn, permit);
    }

    /// Waits up to `grace` for client connections to finish; returns how many are still open.
    async fn drain(self, grace: Duration) -> usize {
        self.shared.connections.clone().drain(grace).await
    }

    /// After a response: whether its connection should close.
    fn closes_after_response(&self) -> bool {
        let budget = self.shared.budget.load(Ordering::Relaxed);
        if budget > 0 && self.shared.ctx.served() >= budget {
            self.shared.exhausted.send_if_modified(|e| !std::mem::replace(e, true));
            return true;
        }
        self.shared.stop.is_cancelled()
    }
}

/// One client connection's service: the front-end's checks, then the app.
struct ClientService {
    clients: Clients,
    peer: std::net::SocketAddr,
    forwarded_for: HeaderValue,
    trusted: bool,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ClientService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, req: Request<Incoming>) -> BoxFuture {
        let (mut parts, body) = req.into_parts();
        let max_body = self.clients.shared.max_body;
        if let Some(err) = crate::proxy::refusal(&parts, max_body) {
            debug!(method = %parts.method, path = parts.uri.path(), error = ?err, "request refused");
            let response = err.into_response().map(Body::new);
            return Box::pin(async move { Ok(response) });
        }
        headers::set_forwarded(&mut parts.headers, &self.forwarded_for, self.trusted, false);
        // The client is right here: its address needs no header, and one it sent is forged.
        parts.headers.remove(&headers::PEER);
        parts.extensions.insert(axum::extract::ConnectInfo(self.peer));
        // A chunked body past the limit fails to read, which axum's extractors answer 413.
        let body = if max_body == u64::MAX {
            Body::new(body)
        } else {
            Body::new(Limited::new(body, max_body as usize))
        };
        let future = self.clients.shared.service.clone().call(Request::from_parts(parts, body));
        let clients = self.clients.clone();
        Box::pin(async move {
            let Ok(mut response) = future.await;
            if clients.closes_after_response() {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}
