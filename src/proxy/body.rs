//! Bodies on the proxy path. Both directions stream frame by frame, never buffered whole.
//! Invariant: a worker connection returns to its pool, and its request stops counting as in
//! flight, exactly when the response body has been read to its end (or dropped).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::endpoint::{Lease, Sender};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to a worker.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, cut off with an error past `remaining` bytes (`--max-body`).
    Client { body: Incoming, remaining: u64 },
    /// No body: a replayed request.
    Empty,
}

/// A request body exceeded `--max-body` while streaming.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body exceeds the configured maximum")
    }
}

impl std::error::Error for BodyTooLarge {}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Client { body, remaining } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let len = data.len() as u64;
                        if len > *remaining {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                        }
                        *remaining -= len;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client { body, .. } => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client { body, .. } => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body on its way to the client.
#[derive(Debug)]
pub struct ResponseBody(Inner);

#[derive(Debug)]
enum Inner {
    Upstream {
        body: Incoming,
        done: Option<(Lease, Sender)>,
    },
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// A worker's response body; `lease` and `sender` are released when it ends.
    pub fn upstream(body: Incoming, lease: Lease, sender: Sender) -> ResponseBody {
        let mut this = ResponseBody(Inner::Upstream {
            body,
            done: Some((lease, sender)),
        });
        this.release_if_ended();
        this
    }

    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes = bytes.into();
        ResponseBody(Inner::Full((!bytes.is_empty()).then_some(bytes)))
    }

    pub fn empty() -> ResponseBody {
        ResponseBody(Inner::Full(None))
    }

    fn release_if_ended(&mut self) {
        if let Inner::Upstream { body, done } = &mut self.0 {
            if body.is_end_stream() {
                if let Some((lease, sender)) = done.take() {
                    lease.endpoint().give_back(sender);
                }
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
        let this = &mut self.0;
        match this {
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

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Upstream { body, .. } => body.size_hint(),
        }
    }
}
