//! When a worker's heartbeat beats: every [`BEAT_EVERY`] while it has work (a request the
//! front-end sent it, from the call of the app to the end of the response body, or one
//! started since the last beat), and every [`RESTING_BEAT_EVERY`] once it has had none for
//! [`REST_AFTER`]. The front-end judges a worker's silence only while it has requests in
//! flight on it (`proxy::watch`), so beats at rest answered no question: they were a
//! hundred wake-ups a second of every idle worker, each a few tens of microseconds of a core
//! that a machine running many rips, or a laptop, pays for nothing.
//!
//! Invariant: a worker that has been sent a request beats every [`BEAT_EVERY`] from the
//! moment its app is called with it until its response ends. The first request after a rest
//! wakes the beat at once; the resting beats are what bring back a worker that stalled with
//! nothing left in flight (its waiting requests moved elsewhere), within a quarter second.
//! With `--upstream handoff` the front-end cannot see a worker's clients, so it beats always.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;

use crate::heartbeat::{Heartbeat, BEAT_EVERY};

/// Beats while at rest: often enough that a worker which stalled and came back with nothing
/// in flight is back in the rotation within a quarter of a second, rare enough that an idle
/// worker costs a few wake-ups a second.
pub const RESTING_BEAT_EVERY: Duration = Duration::from_millis(250);

/// Time without work after which the beat rests: long enough that a steady trickle of
/// requests (one client, think time between requests) never pays the wake-up from rest on
/// each one, short enough that a finished burst is quiet a tenth of a second later.
pub const REST_AFTER: Duration = Duration::from_millis(100);

/// The worker's side of its heartbeat.
#[derive(Debug)]
pub struct Pulse {
    heartbeat: Arc<Heartbeat>,
    /// Requests between the app's call and the end of their response.
    busy: AtomicUsize,
    /// Requests begun so far: one that starts and ends between two beats is work too.
    begun: AtomicU64,
    resting: AtomicBool,
    wake: Notify,
    always: bool,
}

impl Pulse {
    /// `always`: beat at [`BEAT_EVERY`] whatever the worker is doing (`--upstream handoff`).
    pub fn new(heartbeat: Arc<Heartbeat>, always: bool) -> Arc<Pulse> {
        Arc::new(Pulse {
            heartbeat,
            busy: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            resting: AtomicBool::new(false),
            wake: Notify::new(),
            always,
        })
    }

    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// A request is given to the app; the worker is busy until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.begun.fetch_add(1, Ordering::Relaxed);
        // SeqCst on both sides, with `rest`'s store and load: either the beat sees this
        // request before it sleeps, or this sees it resting and wakes it.
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.resting.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
        Busy(self.clone())
    }

    fn is_idle(&self, begun: u64) -> bool {
        self.busy.load(Ordering::SeqCst) == 0 && self.begun.load(Ordering::Relaxed) == begun
    }

    /// Beats for as long as the worker's runtime turns (from a task on it, so that the beats
    /// stop exactly when its event loop does).
    pub async fn run(self: Arc<Self>) {
        let mut every = tokio::time::interval(BEAT_EVERY);
        every.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let quiet_ticks = (REST_AFTER.as_millis() / BEAT_EVERY.as_millis()).max(1) as u32;
        let mut begun = self.begun.load(Ordering::Relaxed);
        let mut quiet = 0;
        loop {
            every.tick().await;
            self.heartbeat.beat();
            if self.always {
                continue;
            }
            if !self.is_idle(begun) {
                begun = self.begun.load(Ordering::Relaxed);
                quiet = 0;
                continue;
            }
            quiet += 1;
            if quiet < quiet_ticks {
                continue;
            }
            self.rest(begun).await;
            self.heartbeat.beat();
            every.reset();
            begun = self.begun.load(Ordering::Relaxed);
            quiet = 0;
        }
    }

    /// Beats every [`RESTING_BEAT_EVERY`] until a request begins.
    async fn rest(&self, begun: u64) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            self.resting.store(true, Ordering::SeqCst);
            if !self.is_idle(begun) {
                break;
            }
            if tokio::time::timeout(RESTING_BEAT_EVERY, woken).await.is_ok() {
                break;
            }
            self.heartbeat.beat();
        }
        self.resting.store(false, Ordering::SeqCst);
    }
}

/// One request's share of its worker being busy.
#[derive(Debug)]
pub struct Busy(Arc<Pulse>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Release);
    }
}

/// A service whose requests count as the worker's work until their response bodies end.
#[derive(Clone)]
pub struct Pulsed<S> {
    inner: S,
    pulse: Option<Arc<Pulse>>,
}

impl<S> Pulsed<S> {
    pub fn new(inner: S, pulse: Option<Arc<Pulse>>) -> Pulsed<S> {
        Pulsed { inner, pulse }
    }
}

impl<S, Req, B> tower::Service<Req> for Pulsed<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<PulseBody<B>>;
    type Error = S::Error;
    type Future = PulseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let busy = self.pulse.as_ref().map(Pulse::begin);
        PulseFuture { inner: self.inner.call(req), busy }
    }
}

pin_project_lite::pin_project! {
    pub struct PulseFuture<F> {
        #[pin]
        inner: F,
        busy: Option<Busy>,
    }
}

impl<F, B, E> Future for PulseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<PulseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let busy = this.busy.take();
        Poll::Ready(Ok(response.map(|inner| PulseBody { inner, _busy: busy })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its worker counted busy until it is dropped: a stream (server-sent
    /// events, a large file) is work for as long as the front-end waits on it.
    pub struct PulseBody<B> {
        #[pin]
        inner: B,
        _busy: Option<Busy>,
    }
}

impl<B: Body<Data = Bytes>> Body for PulseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pulse(always: bool) -> (Arc<Pulse>, Heartbeat) {
        let (page, fd) = Heartbeat::create().unwrap();
        let worker = Arc::new(Heartbeat::open(fd).unwrap());
        (Pulse::new(worker, always), page)
    }

    /// Beats seen on the page over `span` of paused time.
    async fn beats_over(page: &Heartbeat, span: Duration) -> u64 {
        let before = page.beats();
        tokio::time::sleep(span).await;
        page.beats() - before
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_rests_and_a_request_wakes_its_beat_at_once() {
        let (pulse, page) = pulse(false);
        tokio::spawn(pulse.clone().run());
        tokio::time::sleep(REST_AFTER * 2).await;
        let resting = beats_over(&page, Duration::from_secs(1)).await;
        assert_eq!(resting, 4, "one beat each {RESTING_BEAT_EVERY:?} at rest");

        let before = page.beats();
        let busy = pulse.begin();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(page.beats() > before, "the first request beats without waiting for the resting beat");
        let working = beats_over(&page, Duration::from_secs(1)).await;
        assert!(working >= 99, "a beat each {BEAT_EVERY:?} while a request is open: {working}");
        drop(busy);
        tokio::time::sleep(REST_AFTER * 2).await;
        assert_eq!(beats_over(&page, Duration::from_secs(1)).await, 4, "rests again once it ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_body_keeps_the_worker_beating_until_it_is_dropped() {
        let (pulse, page) = pulse(false);
        tokio::spawn(pulse.clone().run());
        let mut service = Pulsed::new(
            tower::service_fn(|()| async { Ok::<_, std::convert::Infallible>(http::Response::new(())) }),
            Some(pulse),
        );
        let response = tower::Service::call(&mut service, ()).await.unwrap();
        // The handler returned long ago; the body is still being sent.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(beats_over(&page, Duration::from_secs(1)).await >= 99);
        drop(response);
        tokio::time::sleep(REST_AFTER * 2).await;
        assert_eq!(beats_over(&page, Duration::from_secs(1)).await, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_come_and_go_between_beats_keep_it_awake() {
        let (pulse, page) = pulse(false);
        tokio::spawn(pulse.clone().run());
        let mut beats = 0;
        for _ in 0..100 {
            // A short request every 20 ms: each ends before the next beat looks.
            drop(pulse.begin());
            beats += beats_over(&page, Duration::from_millis(20)).await;
        }
        assert!(beats >= 195, "no rest between requests 20 ms apart: {beats} beats in 2 s");
    }

    #[tokio::test(start_paused = true)]
    async fn with_handoff_it_beats_always() {
        let (pulse, page) = pulse(true);
        tokio::spawn(pulse.run());
        tokio::time::sleep(REST_AFTER * 2).await;
        assert!(beats_over(&page, Duration::from_secs(1)).await >= 99);
    }
}
