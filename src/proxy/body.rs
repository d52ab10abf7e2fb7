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
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::endpoint::{Lease, Sender};
use crate::access_log::{AccessLog, Record};

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
    Client(Box<ClientBody>),
    /// No body: a replayed request, or a client request without one.
    Empty,
}

#[derive(Debug)]
struct ClientBody {
    body: Incoming,
    /// Bytes still allowed by `--max-body`.
    remaining: u64,
    /// Longest pause between two pieces of the body.
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    /// Fired when the whole body was read, so the worker's answer may be timed from then.
    finished: Option<oneshot::Sender<()>>,
    /// Why the body failed, for the proxy to answer with: over HTTP/2 the error that reaches
    /// the proxy is the stream's reset, not this body's error.
    failure: Arc<OnceLock<BodyError>>,
}

/// What the proxy keeps of a client body it handed to a worker connection.
#[derive(Debug)]
pub struct BodyWatch {
    /// Completes when the body has been read to its end (or failed); `None` once it did.
    sent: Option<oneshot::Receiver<()>>,
    failure: Arc<OnceLock<BodyError>>,
}

impl BodyWatch {
    /// Waits until the body has been read to its end (or failed); at once after that.
    pub async fn sent(&mut self) {
        if let Some(rx) = self.sent.as_mut() {
            let _ = rx.await;
            self.sent = None;
        }
    }

    /// Why the body failed, if it did.
    pub fn failure(&self) -> Option<BodyError> {
        self.failure.get().copied()
    }
}

impl RequestBody {
    /// Wraps a client body; `None` for the watch when there is no body at all.
    pub fn client(body: Incoming, max: u64, idle: Duration) -> (RequestBody, Option<BodyWatch>) {
        if body.is_end_stream() {
            return (RequestBody(Kind::Empty), None);
        }
        let (tx, rx) = oneshot::channel();
        let failure = Arc::new(OnceLock::new());
        let client = ClientBody {
            body,
            remaining: max,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            finished: Some(tx),
            failure: failure.clone(),
        };
        (RequestBody(Kind::Client(Box::new(client))), Some(BodyWatch { sent: Some(rx), failure }))
    }

    pub fn empty() -> RequestBody {
        RequestBody(Kind::Empty)
    }
}

impl ClientBody {
    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finished.take();
        let _ = self.failure.set(error);
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
                    if let Some(tx) = client.finished.take() {
                        let _ = tx.send(());
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => client.fail(BodyError::Client),
            Poll::Ready(None) => {
                if let Some(tx) = client.finished.take() {
                    let _ = tx.send(());
                }
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
}

#[derive(Debug)]
enum Inner {
    Upstream { body: Incoming, done: Option<(Lease, Sender)> },
    Full(Option<Bytes>),
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
        let mut this =
            ResponseBody { inner: Inner::Upstream { body, done: Some((lease, sender)) }, logged: None };
        this.release_if_ended();
        this
    }

    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes = bytes.into();
        ResponseBody { inner: Inner::Full((!bytes.is_empty()).then_some(bytes)), logged: None }
    }

    pub fn empty() -> ResponseBody {
        ResponseBody { inner: Inner::Full(None), logged: None }
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

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
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
                polled
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream { body, .. } => body.size_hint(),
        }
    }
}
