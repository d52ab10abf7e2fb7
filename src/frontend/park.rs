//! Idle HTTP/1 keep-alive connections put away without their HTTP state. Invariant: a client
//! connection that has sent nothing and has no request in flight for [`PARK_AFTER`] is held
//! as its socket alone — hyper's read and write buffers and connection state are freed — and
//! the first bytes it sends next start a fresh hyper connection over the same socket, with
//! those bytes first. The client sees one keep-alive connection throughout.
//!
//! Why: hyper keeps an 8 KiB read buffer, its write buffer and its state for as long as a
//! connection is open, and has no way to release them while it waits; with thousands of
//! mostly silent clients (phones, browsers keeping connections for later) that is most of
//! the front-end's memory. nginx frees its buffers the same way between requests.
//!
//! How: after [`PARK_AFTER`] with no byte read and nothing in flight, hyper is asked to shut
//! down gracefully, which closes an idle connection at once; the stream under it keeps the
//! socket open through that shutdown, and the socket is taken back from hyper whole, with
//! anything hyper had read and not used. Should a request slip in just then, hyper answers
//! it with `Connection: close` and the connection ends as a closed keep-alive one does.
//! A parked connection keeps hyper's idle limit (`--header-timeout` from its last activity)
//! and is closed at once on a stop. It then leaves its task for its shard's lot (`lot.rs`),
//! which holds it as a table entry — a TLS one with its session, its buffers freed and the
//! socket taken out — and gives it a new task when its client sends. Without a lot, or when its
//! session already holds what its client sent next, it waits here, in its task.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connections::Graceful;
use super::framing::{Judged, StrictFraming};
use super::lot::Holder;

/// What a parked connection is held as in its shard's lot: its socket, out of the runtime,
/// and for TLS the session that was over it.
pub type Detached = (std::net::TcpStream, Option<Box<Session>>);

/// A client stream that can be parked in its shard's lot.
pub trait Detach: Sized {
    /// The connection as the lot holds it (`Ok(None)` if its socket could not be taken from
    /// the runtime, and it is closed), or the stream back if it must stay in its task.
    fn detach(self) -> Result<Option<Detached>, Self>;
}

impl Detach for tokio::net::TcpStream {
    fn detach(self) -> Result<Option<Detached>, Self> {
        Ok(self.into_std().ok().map(|socket| (socket, None)))
    }
}

pub use super::session::Session;

impl Detach for Session {
    fn detach(mut self) -> Result<Option<Detached>, Self> {
        // What the session holds undecoded or unread, or still has to send, would never show
        // as the socket's readiness: waited for in the task.
        let Some(socket) = self.unplug() else { return Err(self) };
        Ok(socket.into_std().ok().map(|socket| (socket, Some(Box::new(self)))))
    }
}

/// How long a connection stays silent, with nothing in flight, before it is parked. Long
/// enough that a client between two requests of a page keeps its hyper connection; short
/// enough that idle clients cost little soon.
pub const PARK_AFTER: Duration = Duration::from_secs(1);
/// What a parked connection reads when its client wakes it: the start of the next request,
/// handed to the new hyper connection first. Small, since it is held while parked.
const WAKE_READ: usize = 64;

/// Connections parked now, in this process.
static PARKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many client connections are parked now.
pub fn parked() -> usize {
    PARKED.load(Ordering::Relaxed)
}

/// Counts a connection as parked while it lives.
pub(super) struct ParkedNow;

impl ParkedNow {
    pub(super) fn new() -> ParkedNow {
        PARKED.fetch_add(1, Ordering::Relaxed);
        ParkedNow
    }
}

impl Drop for ParkedNow {
    fn drop(&mut self) {
        PARKED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a connection has done, for telling idle from busy.
#[derive(Debug, Default)]
struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
    read: AtomicU64,
    /// hyper is being asked to let the connection go: its shutdown must not close the socket.
    parking: AtomicBool,
}

impl Activity {
    fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.finished.load(Ordering::Relaxed),
            self.read.load(Ordering::Relaxed),
        )
    }
}

/// The client's stream as hyper gets it: bytes read while parked come first, what is read is
/// counted, and a shutdown while parking leaves the socket open.
struct Parkable<I> {
    inner: I,
    prefix: Bytes,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Parkable<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.activity.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Parkable<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.parking.load(Ordering::Relaxed) {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The connection's service, counting requests in and responses out (a response is out when
/// its body is done or dropped).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.activity.started.fetch_add(1, Ordering::Relaxed);
        TrackedFuture { inner: self.inner.call(req), done: Some(Done(self.activity.clone())) }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way; dropped unanswered, it counts as out.
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        done: Option<Done>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answered = std::task::ready!(this.inner.poll(cx));
        let done = this.done.take().expect("polled after completion");
        Poll::Ready(answered.map(|response| response.map(|body| TrackedBody { body, _done: done })))
    }
}

/// Counts its response out when dropped.
struct Done(Arc<Activity>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    pub struct TrackedBody<B> {
        #[pin]
        body: B,
        _done: Done,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

type Served = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// An HTTP/1 client connection served with parking; stopped like hyper's own.
pub struct Parking {
    served: Served,
    stop: CancellationToken,
}

impl Future for Parking {
    type Output = Result<(), hyper::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.served.as_mut().poll(cx)
    }
}

impl Graceful for Parking {
    type Error = hyper::Error;

    fn shut_down(self: Pin<&mut Self>) {
        self.stop.cancel();
    }
}

/// Serves `stream` with `builder` and `service` behind the strict framing guard, parking it
/// whenever it goes idle — in the lot of `holder` if there is one and the stream can be
/// detached, else in its own task; `idle_limit` is how long a silent connection is kept at all.
pub fn serve<I, S, B>(
    stream: I,
    service: S,
    builder: http1::Builder,
    idle_limit: Duration,
    mut holder: Option<Holder>,
) -> Parking
where
    I: AsyncRead + AsyncWrite + Detach + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let served = Box::pin(async move {
        let activity = Arc::new(Activity::default());
        let mut io = Parkable { inner: stream, prefix: Bytes::new(), activity: activity.clone() };
        loop {
            let framing = StrictFraming::new(io);
            let tracked = Tracked {
                inner: Judged::new(service.clone(), framing.verdict()),
                activity: activity.clone(),
            };
            // Boxed, so that a parked connection holds none of it.
            let mut conn = Box::pin(builder.serve_connection(TokioIo::new(framing), tracked).with_upgrades());
            let mut seen = activity.snapshot();
            let mut active_at = Instant::now();
            loop {
                tokio::select! {
                    result = conn.as_mut() => return result,
                    () = stopped.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        return conn.await;
                    }
                    () = tokio::time::sleep(PARK_AFTER) => {
                        let now = activity.snapshot();
                        if now != seen || now.0 != now.1 {
                            seen = now;
                            active_at = Instant::now();
                            continue;
                        }
                        break;
                    }
                }
            }
            activity.parking.store(true, Ordering::Relaxed);
            conn.as_mut().graceful_shutdown();
            let closed = conn.as_mut().await;
            activity.parking.store(false, Ordering::Relaxed);
            closed?;
            let slipped_in = activity.snapshot().0 != seen.0;
            // None: the connection was upgraded, and is the tunnel's now.
            let Some(parts) = Pin::into_inner(conn).into_parts() else { return Ok(()) };
            // The rest of the parts (hyper's copy of the service) is dropped here, not kept.
            let (framed, read_buf) = {
                let parts = parts;
                (parts.io, parts.read_buf)
            };
            io = framed.into_inner().into_inner();
            if slipped_in {
                // Answered with `Connection: close`: the client expects the close.
                let _ = io.inner.shutdown().await;
                return Ok(());
            }
            // What hyper read and did not use, copied: the Bytes it comes as shares hyper's whole
            // read buffer, which would otherwise stay allocated for as long as the connection.
            io.prefix = if read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&read_buf) };
            drop(read_buf);
            if io.prefix.is_empty() {
                if let Some(lot) = holder.take() {
                    match io.inner.detach() {
                        Ok(Some((socket, session))) => {
                            lot.hold(socket, session, active_at + idle_limit);
                            return Ok(());
                        }
                        Ok(None) => return Ok(()),
                        Err(inner) => {
                            io.inner = inner;
                            holder = Some(lot);
                        }
                    }
                }
                let _parked = ParkedNow::new();
                let mut first = [0u8; WAKE_READ];
                tokio::select! {
                    read = io.inner.read(&mut first) => match read {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(n) => {
                            activity.read.fetch_add(n as u64, Ordering::Relaxed);
                            io.prefix = Bytes::copy_from_slice(&first[..n]);
                        }
                    },
                    () = tokio::time::sleep_until(active_at + idle_limit) => {
                        let _ = io.inner.shutdown().await;
                        return Ok(());
                    }
                    () = stopped.cancelled() => {
                        let _ = io.inner.shutdown().await;
                        return Ok(());
                    }
                }
            }
        }
    });
    Parking { served, stop }
}
