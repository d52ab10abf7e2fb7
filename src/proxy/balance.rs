//! The load-balancing layer: picks the worker for each attempt from the pool that the
//! supervisor's discovery messages keep (`pool.rs`, by the pure rule in `strategy.rs`), waits
//! for one up to `--queue-timeout` when none is usable, takes a lease that counts the request
//! in flight on it until its response body ends, and counts it against the worker's
//! `--max-requests`, reporting the worker exhausted exactly once.
//!
//! tower's `balance::p2c` does not fit: it picks two workers at random and compares their
//! load, where rip scans all of its few workers (fresh before exhausted before the one that
//! just failed), and it has no notion of a worker kept only as a fallback while its
//! replacement starts, of waiting for a worker with a deadline, or of a lease that outlives
//! the service call until the body ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use tokio::time::Instant;
use tower::Service;

use super::endpoint::Counted;
use super::{Cause, Dispatch, Endpoint, Failed, Forward, LiveSettings, Pool, ResponseBody};
use crate::discovery::{Report, ReportSender};

#[derive(Debug, Clone)]
pub struct Balance<S> {
    inner: S,
    pool: Arc<Pool>,
    settings: LiveSettings,
    reports: ReportSender,
}

impl<S> Balance<S> {
    pub fn new(inner: S, pool: Arc<Pool>, settings: LiveSettings, reports: ReportSender) -> Self {
        Balance { inner, pool, settings, reports }
    }
}

impl<S> Service<Forward> for Balance<S>
where
    S: Service<Dispatch, Response = Response<ResponseBody>, Error = Failed> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<ResponseBody>;
    type Error = Failed;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Failed>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, forward: Forward) -> Self::Future {
        let mut inner = self.inner.clone();
        let pool = self.pool.clone();
        let reports = self.reports.clone();
        let settings = self.settings.load();
        let (queue_timeout, max_requests) = (settings.queue_timeout, settings.max_requests);
        let max_in_flight = settings.max_in_flight;
        Box::pin(async move {
            let deadline = Instant::now() + queue_timeout;
            // A claim fails only when another shard took the worker's last place between the
            // pick and the claim; the next pick sees it full or spent.
            let (endpoint, lease, counted) = loop {
                let Some(endpoint) = pool.pick_until(forward.avoid, deadline).await else {
                    return Err(Failed::new(Cause::NoWorker, None));
                };
                match endpoint.claim(max_in_flight, max_requests) {
                    Ok((lease, counted)) => break (endpoint, lease, counted),
                    Err(news) => {
                        report(&reports, &endpoint, news);
                        // Let the shard that took the place get on with it.
                        tokio::task::yield_now().await;
                    }
                }
            };
            report(&reports, &endpoint, Some(counted));
            inner.call(Dispatch { forward, lease }).await
        })
    }
}

/// Tells the supervisor what a claim found: the worker exhausted its budget (recycle it), or
/// served twice it (recycling cannot keep up).
fn report(reports: &ReportSender, endpoint: &Endpoint, counted: Option<Counted>) {
    match counted {
        Some(Counted::Exhausted) => {
            let _ = reports.send(Report::Exhausted(endpoint.id));
        }
        Some(Counted::Spent) => {
            let _ = reports.send(Report::Overdue(endpoint.id));
        }
        Some(Counted::Within) | None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Change, WorkerId};
    use crate::proxy::{RequestBody, Settings, Strategy, Upstream};
    use arc_swap::ArcSwap;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tower::{service_fn, ServiceExt};

    fn id(slot: usize) -> WorkerId {
        WorkerId { slot, generation: 0 }
    }

    fn setup(
        workers: usize,
        max_requests: u64,
    ) -> (
        impl Service<Forward, Response = Response<ResponseBody>, Error = Failed> + Clone,
        mpsc::UnboundedReceiver<Report>,
    ) {
        let pool = Arc::new(Pool::new(Strategy::LeastPending, 0, Upstream::Http1));
        for slot in 0..workers {
            pool.apply(Change::Ready {
                id: id(slot),
                socket: format!("/nonexistent/{slot}").into(),
                heartbeat: None,
            });
        }
        let config = crate::config::Config {
            max_requests,
            queue_timeout: Duration::from_millis(20),
            ..Default::default()
        };
        let settings = Arc::new(ArcSwap::from_pointee(Settings::from(&config)));
        let (reports, rx) = mpsc::unbounded_channel();
        // The worker that answered, as the response's body says.
        let inner = service_fn(|dispatch: Dispatch| async move {
            Ok(Response::new(ResponseBody::empty().from_worker(dispatch.endpoint().id)))
        });
        (Balance::new(inner, pool, settings, reports), rx)
    }

    fn forward(avoid: Option<WorkerId>) -> Forward {
        let mut forward = Forward::new(http::Request::new(RequestBody::empty()));
        forward.avoid = avoid;
        forward
    }

    #[tokio::test]
    async fn requests_spread_over_idle_workers_and_avoid_the_one_that_failed() {
        let (svc, _) = setup(3, 0);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(svc.clone().oneshot(forward(None)).await.unwrap().body().worker().unwrap().slot);
        }
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
        for _ in 0..5 {
            let picked = svc.clone().oneshot(forward(Some(id(1)))).await.unwrap().body().worker();
            assert_ne!(picked, Some(id(1)));
        }
    }

    #[tokio::test]
    async fn with_no_worker_the_request_waits_for_the_queue_deadline_then_fails() {
        let (svc, _) = setup(0, 0);
        let started = Instant::now();
        let failed = svc.oneshot(forward(None)).await.unwrap_err();
        assert!(matches!(failed.cause, Cause::NoWorker));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn a_worker_is_reported_exhausted_once_at_its_budget() {
        let (svc, mut reports) = setup(1, 3);
        for _ in 0..5 {
            svc.clone().oneshot(forward(None)).await.unwrap();
        }
        assert_eq!(reports.try_recv().unwrap(), Report::Exhausted(id(0)));
        assert!(reports.try_recv().is_err());
    }
}
