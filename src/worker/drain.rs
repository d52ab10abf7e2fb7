//! Early answers. An app may answer a request without reading its body — a 404 for a path it
//! does not have, a 401 or 413 for an upload it refuses — and hyper, seeing the body dropped
//! unread, would then stop reading the connection and close it. The sender of that body (the
//! front-end, or the client itself with `--upstream handoff`) is still writing it: its next
//! write fails, and the answer already on its way is lost with the connection — a 502 to the
//! client, or a keep-alive connection that dies under its next request. nginx relays such an
//! answer and keeps reading what follows; so does rip: a body dropped unread is read to its
//! end in the background and thrown away, so that the connection stays in step and carries
//! the answer, and then the next request.
//!
//! The reading is bounded, in bytes and in time: past either, the body is dropped after all,
//! and the connection closes as hyper would have closed it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// Most bytes of an unread body thrown away so that its connection lives on.
const DRAIN_BYTES: usize = 64 << 20;
/// Longest time spent throwing them away.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// A request body that is read to its end in the background if the app drops it unread.
pub struct Drained<B: Body<Data = Bytes> + Send + Unpin + 'static> {
    inner: Option<B>,
    ended: bool,
}

impl<B: Body<Data = Bytes> + Send + Unpin + 'static> Drained<B> {
    pub fn new(inner: B) -> Drained<B> {
        Drained { inner: Some(inner), ended: false }
    }
}

impl<B: Body<Data = Bytes> + Send + Unpin + 'static> Body for Drained<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B: Body<Data = Bytes> + Send + Unpin + 'static> Drop for Drained<B> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else { return };
        if self.ended || inner.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(DRAIN_TIME, throw_away(inner)).await;
            });
        }
    }
}

async fn throw_away<B: Body<Data = Bytes> + Unpin>(mut body: B) {
    let mut left = DRAIN_BYTES;
    while let Some(Ok(frame)) = body.frame().await {
        let Some(data) = frame.data_ref() else { continue };
        match left.checked_sub(data.len()) {
            Some(rest) => left = rest,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A body of `chunks` chunks that counts how many were read.
    struct Counted(usize, Arc<AtomicUsize>);

    impl Body for Counted {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            self.1.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk")))))
        }
    }

    #[tokio::test]
    async fn a_body_dropped_unread_is_read_to_its_end_in_the_background() {
        let read = Arc::new(AtomicUsize::new(0));
        drop(Drained::new(Counted(10, read.clone())));
        for _ in 0..100 {
            if read.load(Ordering::Relaxed) == 10 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("read {} of 10 chunks", read.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_body_read_by_the_app_is_not_read_again() {
        let read = Arc::new(AtomicUsize::new(0));
        let mut body = Drained::new(Counted(3, read.clone()));
        while body.frame().await.is_some() {}
        drop(body);
        tokio::task::yield_now().await;
        assert_eq!(read.load(Ordering::Relaxed), 3);
    }
}
