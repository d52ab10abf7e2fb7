//! HTTP/2 from clients on the plain listener, with prior knowledge (h2c: the connection
//! opens with the HTTP/2 preface), into the same front door and proxy path as HTTP/1.
//!
//! The known HTTP/2 attacks are bounded by the limits set here, each enforced by the h2 crate
//! under hyper: rapid reset (CVE-2023-44487: streams a client opens and cancels before they
//! are served count against `MAX_PENDING_RESETS`, then the connection gets GOAWAY),
//! CONTINUATION flood (CVE-2024-27316: a header block is bounded by `MAX_HEADER_LIST` however
//! many frames carry it), too many concurrent streams (`MAX_STREAMS`, the rest refused),
//! oversized header lists, and SETTINGS and PING floods (tested: the flooding client costs
//! the others nothing and the front-end's memory stays put). What h2 does not bound is an idle
//! connection: one that opens no stream for the header timeout is sent GOAWAY here, as an idle
//! HTTP/1 keep-alive connection is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::connections::Graceful;
use super::Connection;

/// The client connection preface of RFC 9113 §3.4.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams a client may have open at once (nginx's `http2_max_concurrent_streams` is 128).
const MAX_STREAMS: u32 = 128;
/// Largest header block, decoded, as for HTTP/1 heads (`MAX_HEADER_BYTES`).
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams reset by the client before they were served, per connection, before GOAWAY.
const MAX_PENDING_RESETS: usize = 20;
/// Streams rip itself reset for the client's errors, per connection, before GOAWAY.
const MAX_ERROR_RESETS: usize = 256;

pub fn builder() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_ERROR_RESETS);
    builder
}

/// Serves `stream` as HTTP/2 with `service`, sending GOAWAY once no stream was opened for
/// `idle`.
pub(super) fn serve<I>(
    builder: &http2::Builder<TokioExecutor>,
    stream: I,
    service: Connection,
    idle: Duration,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let opened = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let service = Stamped { inner: service, opened: opened.clone(), start };
    Served {
        conn: builder.serve_connection(TokioIo::new(stream), service),
        idle,
        start,
        opened,
        timer: Box::pin(tokio::time::sleep(idle)),
        closing: false,
    }
}

/// A service that notes when each stream was opened, in milliseconds since `start`.
#[derive(Debug, Clone)]
pub(super) struct Stamped<S> {
    inner: S,
    opened: Arc<AtomicU64>,
    start: Instant,
}

impl<S, B> hyper::service::Service<B> for Stamped<S>
where
    S: hyper::service::Service<B>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: B) -> Self::Future {
        self.opened.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.inner.call(req)
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 client connection with its idle timer.
    pub(super) struct Served<I> {
        #[pin]
        conn: http2::Connection<TokioIo<I>, Stamped<Connection>, TokioExecutor>,
        idle: Duration,
        start: Instant,
        opened: Arc<AtomicU64>,
        timer: Pin<Box<Sleep>>,
        closing: bool,
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Future for Served<I> {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        while !*this.closing && this.timer.as_mut().poll(cx).is_ready() {
            // The last stream opened this long ago, or none ever was: the client is idle.
            let last = *this.start + Duration::from_millis(this.opened.load(Ordering::Relaxed));
            let due = last + *this.idle;
            if Instant::now() >= due {
                *this.closing = true;
                // Streams still open finish; no new one is accepted.
                this.conn.as_mut().graceful_shutdown();
            } else {
                this.timer.as_mut().reset(due);
            }
        }
        Poll::Ready(ready!(this.conn.poll(cx)))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Graceful for Served<I> {
    type Error = hyper::Error;

    fn shut_down(self: Pin<&mut Self>) {
        let this = self.project();
        *this.closing = true;
        this.conn.graceful_shutdown();
    }
}
