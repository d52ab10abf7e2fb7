//! Bodies on the proxy path. Both directions stream frame by frame, never buffered whole.
//! Invariant: a worker connection returns to its pool, and its request stops counting as in
//! flight, exactly when the response body has been read to its end (or dropped).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::endpoint::{Lease, Sender};
use crate::discovery::WorkerId;
use crate::telemetry::access_log::{AccessLog, Record};

/// A client's request body as the front-end's router hands it over.
pub type ClientBody = axum::body::Body;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the client's request body could not be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// More than `--max-body` bytes.
    TooLarge,
    /// The client sent nothing for `--header-timeout` in the middle of its body.
    Timeout,
    /// The client's framing was invalid (a bad chunk) or its connection broke.
    Client,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyError::TooLarge => "request body exceeds the configured maximum",
            BodyError::Timeout => "client stopped sending its request body",
            BodyError::Client => "invalid or interrupted request body",
        })
    }
}

impl std::error::Error for BodyError {}

/// A request body on its way to a worker.
#[derive(Debug)]
pub struct RequestBody(Kind);

#[derive(Debug)]
enum Kind {
    Client(Box<Passing>),
    /// No body: a replayed request, or a client request without one.
    Empty,
}

#[derive(Debug)]
struct Passing {
    body: ClientBody,
    /// Bytes still allowed by `--max-body`.
    remaining: u64,
    /// Longest pause between two pieces of the body.
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    progress: Arc<Progress>,
}

/// How far a client body on its way to a worker has got, shared with the layers above the
/// connection that reads it: the deadline times the worker from the body's end, and the
/// retry layer answers with the body's own failure — over HTTP/2 the error that reaches the
/// proxy is the stream's reset, not this body's error.
#[derive(Debug, Default)]
pub struct Progress {
    ended: std::sync::atomic::AtomicBool,
    ended_notify: Notify,
    failure: OnceLock<BodyError>,
}

impl Progress {
    /// Waits until the body has been read to its end (or failed); at once after that.
    pub async fn ended(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let notified = self.ended_notify.notified();
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Why the body failed, if it did.
    pub fn failure(&self) -> Option<BodyError> {
        self.failure.get().copied()
    }

    fn end(&self) {
        if !self.ended.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.ended_notify.notify_waiters();
        }
    }
}

impl RequestBody {
    /// Wraps a client body, holding it to `max` bytes and to pauses no longer than `idle`.
    pub fn client(body: ClientBody, max: u64, idle: Duration) -> RequestBody {
        if body.is_end_stream() {
            return RequestBody(Kind::Empty);
        }
        let passing = Passing {
            body,
            remaining: max,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            progress: Arc::default(),
        };
        RequestBody(Kind::Client(Box::new(passing)))
    }

    pub fn empty() -> RequestBody {
        RequestBody(Kind::Empty)
    }

    /// The body's progress; `None` when there is no body to wait for.
    pub fn progress(&self) -> Option<Arc<Progress>> {
        match &self.0 {
            Kind::Client(passing) => Some(passing.progress.clone()),
            Kind::Empty => None,
        }
    }
}

impl Passing {
    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let _ = self.progress.failure.set(error);
        self.progress.end();
        Poll::Ready(Some(Err(Box::new(error))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let client = match &mut self.get_mut().0 {
            Kind::Empty => return Poll::Ready(None),
            Kind::Client(client) => client,
        };
        match Pin::new(&mut client.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > client.remaining {
                        return client.fail(BodyError::TooLarge);
                    }
                    client.remaining -= len;
                }
                let deadline = Instant::now() + client.idle;
                client.idle_timer.as_mut().reset(deadline);
                if client.body.is_end_stream() {
                    client.progress.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => client.fail(BodyError::Client),
            Poll::Ready(None) => {
                client.progress.end();
                Poll::Ready(None)
            }
            Poll::Pending => match client.idle_timer.as_mut().poll(cx) {
                Poll::Ready(()) => client.fail(BodyError::Timeout),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Client(client) => client.body.is_end_stream(),
            Kind::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Client(client) => client.body.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body on its way to the client. When it is dropped (after its last byte was
/// written, or with the connection), its access log line is written.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    logged: Option<Box<Logged>>,
    /// The worker that answered; none for rip's own answers.
    worker: Option<WorkerId>,
}

#[derive(Debug)]
enum Inner {
    Upstream {
        body: Incoming,
        done: Option<(Lease, Sender)>,
    },
    Full(Option<Bytes>),
    /// A file the front-end streams itself (`--root`).
    Local(axum::body::Body),
}

#[derive(Debug)]
struct Logged {
    log: AccessLog,
    record: Record,
    bytes: u64,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(logged) = self.logged.take() {
            logged.log.write(&logged.record, logged.bytes);
        }
    }
}

impl ResponseBody {
    /// A worker's response body; `lease` and `sender` are released when it ends.
    pub fn upstream(body: Incoming, lease: Lease, sender: Sender) -> ResponseBody {
        let worker = Some(lease.endpoint().id);
        let mut this = ResponseBody {
            inner: Inner::Upstream { body, done: Some((lease, sender)) },
            logged: None,
            worker,
        };
        this.release_if_ended();
        this
    }

    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes = bytes.into();
        ResponseBody { inner: Inner::Full((!bytes.is_empty()).then_some(bytes)), logged: None, worker: None }
    }

    pub fn empty() -> ResponseBody {
        ResponseBody { inner: Inner::Full(None), logged: None, worker: None }
    }

    /// A body the front-end answers with itself.
    pub fn local(body: axum::body::Body) -> ResponseBody {
        ResponseBody { inner: Inner::Local(body), logged: None, worker: None }
    }

    /// The same body, marked as answered by `worker` (a tunnel's 101, which has no body).
    pub fn from_worker(mut self, worker: WorkerId) -> ResponseBody {
        self.worker = Some(worker);
        self
    }

    /// The worker that answered, if one did.
    pub fn worker(&self) -> Option<WorkerId> {
        self.worker
    }

    /// Writes `record` to `log` once the body is done.
    pub fn log_to(&mut self, log: AccessLog, record: Record) {
        self.logged = Some(Box::new(Logged { log, record, bytes: 0 }));
    }

    fn release_if_ended(&mut self) {
        if let Inner::Upstream { body, done } = &mut self.inner {
            if body.is_end_stream() {
                if let Some((lease, sender)) = done.take() {
                    lease.endpoint().give_back(sender);
                }
            }
        }
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Local(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Upstream { body, done } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some((lease, sender)) = done.take() {
                            lease.endpoint().give_back(sender);
                        }
                    }
                    // A broken body: the connection is not reused, the lease ends.
                    Poll::Ready(Some(Err(_))) => drop(done.take()),
                    Poll::Ready(Some(Ok(_))) => self.release_if_ended(),
                    Poll::Pending => {}
                }
                polled.map_err(Into::into)
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.poll_inner(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(logged)) = (&polled, self.logged.as_mut()) {
            logged.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream { body, .. } => body.is_end_stream(),
            Inner::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream { body, .. } => body.size_hint(),
            Inner::Local(body) => body.size_hint(),
        }
    }
}
