//! The public listener: accepts client connections and serves each with hyper's HTTP/1 server
//! (or, when it opens with the HTTP/2 preface, its HTTP/2 server: `http2c`) through the
//! front-end's axum router — the user's edge routes and layers, falling back to
//! the proxy stack — or with `--upstream handoff` passes each to a worker. Invariant: at most
//! `max_connections` client connections are open (or on their way to a worker); past that,
//! new ones wait in the kernel's accept queue instead of exhausting file descriptors.

/// The HTTP connections a listener accepted, stopped together with grace.
pub mod connections;
/// Strict request framing: ambiguous request heads are made unparseable before hyper reads them.
pub mod framing;
/// HTTP/2 with prior knowledge from clients, and its limits.
mod http2c;
/// A shard's parked client connections, held without a task each.
mod lot;
/// Idle HTTP/1 connections held as their socket alone.
mod park;

pub use park::parked;
/// The public listening socket: inherited, passed by systemd, or bound.
pub mod listener;
/// The plain listener that sends clients to https.
pub mod redirect;
/// HTTPS on the listener: certificates, SNI, reloads.
pub mod session;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::routing::future::RouteFuture;
use axum::Router;
use futures_util::future::{Either, FutureExt, Map};
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::warn;

use crate::frontend::connections::Connections;
use crate::frontend::framing::{Judged, StrictFraming};
use crate::proxy::{ClientBody, Peer, Proxy, ProxyError, ResponseBody, Stack, Upstream};

/// What a user's binary adds at the edge: it gets the router whose fallback is the proxy to
/// the workers and returns it with routes the parent answers itself and tower layers that
/// wrap every request, the workers' included.
pub type Edge = Arc<dyn Fn(Router) -> Router + Send + Sync>;

/// How the front-end answers its client connections, chosen once at start.
#[derive(Clone)]
pub enum Door {
    /// The user's edge routes and layers, falling back to the proxy stack.
    Edge(Router),
    /// The proxy stack alone. With no edge, the router would be nothing but its fallback,
    /// and going through it costs a handful of allocations per request (the original URI,
    /// the fallback's path parameters, the route's boxed service and future, the response
    /// body's box) for no effect, so the stack is served as the router would serve it.
    Proxy(Stack),
    /// `--upstream handoff`: each connection is passed whole to a worker.
    Handoff(Proxy),
}

impl Door {
    /// The door for `proxy` with the user's `edge`, if any.
    pub fn new(proxy: &Proxy, edge: Option<&Edge>) -> Door {
        if proxy.upstream() == Upstream::Handoff {
            return Door::Handoff(proxy.clone());
        }
        match edge {
            Some(edge) => Door::Edge(edge(Router::new().fallback_service(proxy.stack()))),
            None => Door::Proxy(proxy.stack()),
        }
    }
}

/// A response body as a client connection sends it: the proxy's own, or whatever the edge
/// router made of it.
pub type FrontBody = http_body_util::Either<ResponseBody, axum::body::Body>;

type Answered<B> = Result<http::Response<B>, Infallible>;
type EdgeFuture = Map<RouteFuture<Infallible>, fn(Answered<axum::body::Body>) -> Answered<FrontBody>>;
type ProxyFuture =
    Map<<Stack as Service<Request<ClientBody>>>::Future, fn(Answered<ResponseBody>) -> Answered<FrontBody>>;

/// One client connection's service. The proxy knows the peer the listener saw: the stack is
/// made for this connection, or (behind an edge router) each request carries it, as a
/// [`Peer`] and, for edge handlers, as axum's `ConnectInfo`.
#[derive(Clone)]
struct Connection {
    front: Front,
    peer: Arc<Peer>,
}

/// What answers one proxied connection's requests.
#[derive(Clone)]
enum Front {
    Edge(Router),
    /// The stack made for this connection's peer.
    Proxy(Stack),
}

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = http::Response<FrontBody>;
    type Error = Infallible;
    type Future = Either<EdgeFuture, ProxyFuture>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // Both are always ready; each is cloned (a few Arcs) because `call` takes `&mut`.
        match &self.front {
            Front::Edge(router) => {
                req.extensions_mut().insert(self.peer.clone());
                req.extensions_mut().insert(ConnectInfo(self.peer.addr));
                let edge: fn(Answered<axum::body::Body>) -> Answered<FrontBody> =
                    |r| r.map(|r| r.map(http_body_util::Either::Right));
                Either::Left(router.clone().call(req).map(edge))
            }
            Front::Proxy(stack) => {
                let proxy: fn(Answered<ResponseBody>) -> Answered<FrontBody> =
                    |r| r.map(|r| r.map(http_body_util::Either::Left));
                Either::Right(stack.clone().call(req.map(ClientBody::new)).map(proxy))
            }
        }
    }
}

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
        // A client may close its sending side once its request is out and still wait for the
        // answer (RFC 9112 §9.6); hyper would otherwise take the EOF for an abort and drop
        // the request. A client that is really gone is found when its answer is written.
        .half_close(true)
        .keep_alive(true);
    builder
}

/// How the front-end's shards serve: the same for each.
#[derive(Clone)]
pub struct Serving {
    pub proxy: Proxy,
    pub door: Door,
    pub limits: Limits,
    pub tls: Option<tls::Tls>,
    pub stop: CancellationToken,
    pub grace: Duration,
}

/// Serves `listener` from `shards` shards: this runtime's thread is shard 0, and each other
/// shard is a thread of its own with a current-thread runtime that keeps its own connections
/// to the workers. Shard 0 accepts every client and gives each to the shard with the fewest
/// open connections, which serves it from then on: one accept per connection and no herd of
/// shards woken for each. One `--max-connections` for all. Returns how many connections were
/// still open when the grace ran out, over every shard.
pub async fn serve_shards(listener: TcpListener, shards: usize, front: Serving) -> usize {
    let permits = Arc::new(Semaphore::new(front.limits.max_connections));
    let spread = Arc::new(Spread::new(shards.max(1)));
    let mut others = Vec::new();
    let mut handing = Vec::new();
    for shard in 1..shards {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (hand, handed) = tokio::sync::mpsc::unbounded_channel();
        let (front, spread) = (front.clone(), spread.clone());
        let spawned = std::thread::Builder::new().name(format!("rip-shard-{shard}")).spawn(move || {
            crate::proxy::enter_shard(shard);
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => return warn!(shard, error = %e, "front-end shard could not start its runtime"),
            };
            runtime.block_on(async move {
                let open = serve(Intake::Handed(handed), front, Shard { spread, me: shard }).await;
                let _ = done_tx.send(open);
                // The runtime outlives the shard's accepting and draining: tunnels (WebSockets)
                // run on it until the workers behind them are stopped, as rip's shutdown goes,
                // and the process's exit ends it.
                std::future::pending::<()>().await
            });
        });
        match spawned {
            Ok(_) => {
                others.push(done_rx);
                handing.push((shard, hand));
            }
            // The shards that started serve; fewer threads is slower, not broken.
            Err(e) => warn!(shard, error = %e, "front-end shard could not start"),
        }
    }
    let watched = listener.into_std().and_then(|listener| {
        // SAFETY: the std listener owns its descriptor, and the AsyncFd owns the listener
        // until it is dropped; nothing else closes or replaces that descriptor.
        unsafe { tokio::io::unix::AsyncFd::register(listener) }.map_err(std::io::Error::from)
    });
    let intake = match watched {
        Ok(listener) => Intake::Listener { listener, permits, handing },
        Err(e) => {
            warn!(error = %e, "the listener could not be watched; not accepting");
            Intake::Handed(tokio::sync::mpsc::unbounded_channel().1)
        }
    };
    let mine = serve(intake, front, Shard { spread, me: 0 }).await;
    let mut open = mine;
    for done in others {
        open += done.await.unwrap_or(0);
    }
    open
}

/// A client connection accepted by shard 0, on its way to the shard that serves it.
type Handed = (std::net::TcpStream, SocketAddr, Slot);

/// Where a shard's client connections come from.
enum Intake {
    /// The listening socket itself, and the other shards to give connections to.
    Listener {
        listener: tokio::io::unix::AsyncFd<std::net::TcpListener>,
        permits: Arc<Semaphore>,
        handing: Vec<(usize, tokio::sync::mpsc::UnboundedSender<Handed>)>,
    },
    /// Shard 0; closed when it stops accepting.
    Handed(tokio::sync::mpsc::UnboundedReceiver<Handed>),
}

/// Serves the connections of one shard until no more come (a stop), then gives open ones up
/// to `grace` to finish. Returns how many were still open when the grace ran out.
async fn serve(intake: Intake, front: Serving, shard: Shard) -> usize {
    let _serving = shard.serving();
    let (lot, attendant) = match lot::open() {
        Ok((lot, attendant)) => (Some(lot), Some(attendant)),
        Err(e) => {
            warn!(error = %e, "idle connections will be parked in their own tasks");
            (None, None)
        }
    };
    let stop = front.stop.clone();
    let opener = Arc::new(Opener {
        connections: Connections::new(front.stop.clone(), DRAIN_LINGER),
        builder: client_builder(front.limits.header_timeout),
        h2: http2c::builder(),
        front,
        lot,
    });
    if let Some(attendant) = attendant {
        let waker = opener.clone();
        // Ends on the stop, closing what is parked; a woken connection is one of the shard's.
        tokio::spawn(attendant.run(stop, move |held| waker.resume(held)));
    }
    match intake {
        Intake::Listener { listener, permits, handing } => {
            while let Some((stream, peer, permit)) = accept(&listener, &permits, &opener.front.stop).await {
                let to = shard.spread.fewest(shard.me);
                let slot = shard.spread.slot(to, permit);
                let mut handed = Some((stream, peer, slot));
                if let Some((_, hand)) = handing.iter().find(|(shard, _)| *shard == to) {
                    // A shard that is gone leaves its connections to this one.
                    handed = hand.send(handed.take().expect("not sent yet")).err().map(|e| e.0);
                }
                if let Some((stream, peer, slot)) = handed {
                    opener.open(stream, peer, slot);
                }
            }
        }
        Intake::Handed(mut handed) => {
            while let Some((stream, peer, slot)) = handed.recv().await {
                opener.open(stream, peer, slot);
            }
        }
    }
    opener.front.proxy.close_connections_after_responses();
    opener.connections.clone().drain(opener.front.grace).await
}

/// What one shard serves its client connections with.
struct Opener {
    front: Serving,
    connections: Connections,
    builder: http1::Builder,
    h2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    /// Where this shard's idle connections are parked; `None` if it could not open.
    lot: Option<lot::Lot>,
}

impl Opener {
    /// Starts serving one client connection on this shard.
    fn open(&self, stream: std::net::TcpStream, peer: SocketAddr, slot: Slot) {
        let Serving { door, limits, tls, .. } = &self.front;
        let connections = &self.connections;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => return warn!(error = %e, "a client connection could not be registered"),
        };
        if let Door::Handoff(proxy) = door {
            let (proxy, builder) = (proxy.clone(), self.builder.clone());
            connections.track(async move {
                if let Err(client) = proxy.hand_off(stream).await {
                    refuse(&builder, client).await;
                }
                drop(slot);
            });
            return;
        }
        let Some(service) = self.service(peer) else { return };
        let (builder, h2) = (self.builder.clone(), self.h2.clone());
        let header_timeout = limits.header_timeout;
        let (holder, slot) = self.holder(peer, slot);
        if let Some(tls) = tls {
            let config = tls.config().clone();
            let opened = async move {
                // The handshake must finish within the header timeout, or it holds a slot.
                let accepting = session::Session::accept(config, stream);
                let stream = match tokio::time::timeout(header_timeout, accepting).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return None;
                    }
                    Err(_) => return None,
                };
                let opening =
                    if stream.alpn_protocol() == Some(b"h2") { Opening::Http2 } else { Opening::Http1 };
                Some(serve_as(opening, stream, service, &builder, &h2, header_timeout, holder))
            };
            connections.spawn_after(opened, slot);
            return;
        }
        let opened = async move {
            match tokio::time::timeout(header_timeout, opening(&stream)).await {
                Ok(Some(opening)) => {
                    Some(serve_as(opening, stream, service, &builder, &h2, header_timeout, holder))
                }
                // Closed, or silent for the header timeout: what hyper does to such a client.
                Ok(None) | Err(_) => None,
            }
        };
        connections.spawn_after(opened, slot);
    }

    /// Serves again a parked connection whose client sent (or closed): HTTP/1, as it was.
    fn resume(&self, held: lot::Held) {
        let lot::Held { stream, session, peer, slot, .. } = held;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => return warn!(error = %e, "a client connection could not be registered"),
        };
        // Made anew, so that what a connection is served with follows a reload while it waited.
        let Some(service) = self.service(peer) else { return };
        let (holder, slot) = self.holder(peer, slot);
        let (builder, h2, idle) = (&self.builder, &self.h2, self.front.limits.header_timeout);
        match session {
            None => {
                let served = serve_as(Opening::Http1, stream, service, builder, h2, idle, holder);
                self.connections.spawn(served, slot);
            }
            Some(mut session) => {
                session.plug(stream);
                let served = serve_as(Opening::Http1, *session, service, builder, h2, idle, holder);
                self.connections.spawn(served, slot);
            }
        }
    }

    /// What serves a client connection from `peer`; `None` in hand-off mode, where nothing does.
    fn service(&self, peer: SocketAddr) -> Option<Connection> {
        let Serving { proxy, door, tls, .. } = &self.front;
        let trusted = proxy.settings_now().trusts(peer.ip());
        let peer = Arc::new(Peer::new(peer, trusted, tls.is_some()));
        let front = match door {
            Door::Edge(router) => Front::Edge(router.clone()),
            Door::Proxy(stack) => Front::Proxy(stack.for_peer(peer.clone())),
            Door::Handoff(_) => return None,
        };
        Some(Connection { front, peer })
    }

    /// A connection's place goes with it into the lot when it parks, so it is held by the
    /// connection rather than by its task; without a lot the task holds it.
    fn holder(&self, peer: SocketAddr, slot: Slot) -> (Option<lot::Holder>, Option<Slot>) {
        match &self.lot {
            Some(lot) => (Some(lot::Holder { lot: lot.clone(), peer, slot }), None),
            None => (None, Some(slot)),
        }
    }
}

/// A client connection being served, over HTTP/1 or HTTP/2 (with its place in the lot's
/// keeping, which an HTTP/2 connection never parks but must hold while it is open).
type Served<I> =
    Either<park::Parking, Pin<Box<connections::Keeping<http2c::Served<I>, Option<lot::Holder>>>>>;

/// Serves a client connection as it opened: HTTP/2 as it is, HTTP/1 behind the strict
/// framing guard and parked while idle; `idle` is how long a connection may go without a new
/// request (for HTTP/1 hyper's header timeout says the same).
fn serve_as<I>(
    opening: Opening,
    stream: I,
    service: Connection,
    builder: &http1::Builder,
    h2: &hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    idle: Duration,
    holder: Option<lot::Holder>,
) -> Served<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + park::Detach + Unpin + Send + 'static,
{
    match opening {
        // Boxed: an HTTP/2 connection's state is large, and the task of every connection would
        // otherwise reserve room for it.
        Opening::Http2 => Either::Right(Box::pin(connections::Keeping::new(
            http2c::serve(h2, stream, service, idle),
            holder,
        ))),
        Opening::Http1 => Either::Left(park::serve(stream, service, builder.clone(), idle, holder)),
    }
}

/// How a client opens its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    Http1,
    /// With the HTTP/2 connection preface: HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// Reads (without taking) the first bytes the client sends: the HTTP/2 preface, or anything
/// else, which is HTTP/1. `None` if the client closes first.
async fn opening(stream: &TcpStream) -> Option<Opening> {
    let mut first = [0u8; http2c::PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if first[..n] != http2c::PREFACE[..n] {
            return Some(Opening::Http1);
        }
        if n == http2c::PREFACE.len() {
            return Some(Opening::Http2);
        }
        // A preface split across packets: a peek returns what is there at once, so wait a
        // little for the rest (the caller's header timeout bounds it).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The next client connection, with its permit; `None` once `stop` is cancelled.
async fn accept(
    listener: &tokio::io::unix::AsyncFd<std::net::TcpListener>,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<(std::net::TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        () = stop.cancelled() => return None,
    };
    loop {
        let mut ready = tokio::select! {
            ready = listener.readable() => match ready {
                Ok(ready) => ready,
                Err(e) => {
                    warn!(error = %e, "watching the listener failed");
                    tokio::time::sleep(crate::frontend::connections::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = stop.cancelled() => return None,
        };
        match ready.try_io(|listener| listener.get_ref().accept()) {
            Ok(Ok((stream, peer))) => {
                let _ = stream.set_nodelay(true);
                if let Err(e) = stream.set_nonblocking(true) {
                    warn!(error = %e, "a client connection could not be made non-blocking");
                    continue;
                }
                return Some((stream, peer, permit));
            }
            Ok(Err(e)) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(crate::frontend::connections::ACCEPT_ERROR_PAUSE).await;
            }
            // Nothing left to accept: wait for the listener again.
            Err(_would_block) => {}
        }
    }
}

/// The open connections of every shard, for giving each new one to the shard with fewest.
struct Spread {
    open: Box<[std::sync::atomic::AtomicUsize]>,
    /// Shards serving; one that stopped (or never started) is given nothing.
    serving: Box<[std::sync::atomic::AtomicBool]>,
    /// Where the next search for the fewest starts, so that ties go round.
    next: std::sync::atomic::AtomicUsize,
}

impl Spread {
    fn new(shards: usize) -> Spread {
        Spread {
            open: (0..shards).map(|_| Default::default()).collect(),
            serving: (0..shards).map(|_| Default::default()).collect(),
            next: Default::default(),
        }
    }

    /// The serving shard with the fewest open connections; `me` if none is serving.
    fn fewest(&self, me: usize) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.open.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| self.serving[i].load(Relaxed))
            .min_by_key(|&i| self.open[i].load(Relaxed))
            .unwrap_or(me)
    }

    fn slot(self: &Arc<Self>, shard: usize, permit: OwnedSemaphorePermit) -> Slot {
        self.open[shard].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Slot { _permit: permit, spread: self.clone(), shard }
    }
}

/// One shard's place in the [`Spread`].
struct Shard {
    spread: Arc<Spread>,
    me: usize,
}

impl Shard {
    /// Marks this shard serving until the guard is dropped.
    fn serving(&self) -> OnDuty {
        self.spread.serving[self.me].store(true, std::sync::atomic::Ordering::Relaxed);
        OnDuty { spread: self.spread.clone(), shard: self.me }
    }
}

/// A shard's mark as serving, taken off when it stops.
struct OnDuty {
    spread: Arc<Spread>,
    shard: usize,
}

impl Drop for OnDuty {
    fn drop(&mut self) {
        self.spread.serving[self.shard].store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A client connection's place: its `--max-connections` permit and its shard's count, both
/// given back when the connection ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    spread: Arc<Spread>,
    shard: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.spread.open[self.shard].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
    let stream = StrictFraming::new(client);
    let service = Judged::new(service, stream.verdict());
    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
}
