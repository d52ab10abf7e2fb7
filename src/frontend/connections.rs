//! The set of HTTP connections one listener has accepted, in the front-end and in workers.
//! The owner stops them together: each finishes the request it is serving and closes, and
//! the owner waits for that up to a deadline.

use std::error::Error as StdError;
use std::time::Duration;

use http_body::Body;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use std::future::Future;
use std::pin::Pin;

use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// A served connection that can be asked to finish its current requests and close:
/// HTTP/1 (the front-end) or HTTP/1 and HTTP/2 (workers).
pub trait Graceful: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display + Send;
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    I: Read + Write + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Error = hyper::Error;
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for auto::UpgradeableConnection<'static, I, S, TokioExecutor>
where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Error = Box<dyn StdError + Send + Sync>;
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A connection kept on the heap: a client connection's task holds a pointer, not the
/// largest of the protocols' states.
impl<C: Graceful + ?Sized> Graceful for Pin<Box<C>> {
    type Error = C::Error;
    fn shut_down(self: Pin<&mut Self>) {
        self.get_mut().as_mut().shut_down();
    }
}

impl<A, B> Graceful for futures_util::future::Either<A, B>
where
    A: Graceful,
    B: Graceful<Error = A::Error>,
{
    type Error = A::Error;
    fn shut_down(self: Pin<&mut Self>) {
        match self.as_pin_mut() {
            futures_util::future::Either::Left(a) => a.shut_down(),
            futures_util::future::Either::Right(b) => b.shut_down(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection with something it keeps for as long as it is served.
    pub struct Keeping<C, K> {
        #[pin]
        conn: C,
        _kept: K,
    }
}

impl<C, K> Keeping<C, K> {
    pub fn new(conn: C, kept: K) -> Keeping<C, K> {
        Keeping { conn, _kept: kept }
    }
}

impl<C: Future, K> Future for Keeping<C, K> {
    type Output = C::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<C::Output> {
        self.project().conn.poll(cx)
    }
}

impl<C: Graceful, K> Graceful for Keeping<C, K> {
    type Error = C::Error;
    fn shut_down(self: Pin<&mut Self>) {
        self.project().conn.shut_down();
    }
}

/// Pause after an accept error such as EMFILE, so that a full file table is not spun on;
/// every accept loop (front-end, worker, hand-off channel) waits the same.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct Connections {
    tracker: TaskTracker,
    stop: CancellationToken,
    linger: Duration,
}

impl Connections {
    /// `linger`: how long after `stop` a connection keeps serving before it is closed when
    /// idle. Closing an idle keep-alive connection races with a request the client may be
    /// sending on it at that moment; for the time of the linger the owner answers with
    /// `Connection: close` instead, so busy clients learn to reconnect without losing a request.
    pub fn new(stop: CancellationToken, linger: Duration) -> Connections {
        Connections { tracker: TaskTracker::new(), stop, linger }
    }

    /// Serves `conn` in a task of its own; `guard` is dropped when the connection ends.
    pub fn spawn<C, G>(&self, conn: C, guard: G)
    where
        C: Graceful + Send + 'static,
        G: Send + 'static,
    {
        self.spawn_after(std::future::ready(Some(conn)), guard);
    }

    /// Like [`spawn`](Self::spawn), for a connection that `prelude` makes first (reading how
    /// the client opens it); `None` from it, or a stop before it is done, ends the task.
    pub fn spawn_after<P, C, G>(&self, prelude: P, guard: G)
    where
        P: Future<Output = Option<C>> + Send + 'static,
        C: Graceful + Send + 'static,
        G: Send + 'static,
    {
        let stop = self.stop.clone();
        let linger = self.linger;
        self.tracker.spawn(async move {
            let stopped_then_lingered = async {
                stop.cancelled().await;
                tokio::time::sleep(linger).await;
            };
            let mut stopped_then_lingered = std::pin::pin!(stopped_then_lingered);
            // A client that has not begun by the time a drain closes idle connections gets
            // the same linger as an idle one, then is closed. The prelude is boxed so that
            // its state (handshakes, the connection's builders) is freed once it is done,
            // instead of staying in the task for as long as the connection.
            let prelude = Box::pin(prelude);
            let conn = tokio::select! {
                conn = prelude => conn,
                () = stopped_then_lingered.as_mut() => None,
            };
            let Some(conn) = conn else { return };
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = stopped_then_lingered.as_mut() => {
                    conn.as_mut().shut_down();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "connection ended with an error");
            }
            drop(guard);
        });
    }

    /// Runs `task`, which is not a connection yet (a hand-off in progress), as one of the set.
    pub fn track(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Waits up to `grace` for every connection to finish; returns how many are still open.
    pub async fn drain(self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            return self.tracker.len();
        }
        0
    }
}
