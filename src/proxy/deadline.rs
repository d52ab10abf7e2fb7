//! `--timeout` on each attempt: the worker must send response headers within it, counted
//! from the moment it has the whole request (a client that uploads slowly is the client's
//! problem, bounded by the body's own idle timeout, not a hung worker). A worker that
//! outlives it is reported hung, once, for the supervisor to kill and replace, and the
//! request gets its 504. `--request-timeout`, when set and shorter, is the same clock for
//! the one request only: its 504, the request cancelled on the worker (its stream reset, or
//! its connection closed), and the worker left alone.
//!
//! The layer sits below the balancer, per attempt, because the timer starts only once a
//! worker holds the request and the report must name that worker.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use tokio::time::Instant;
use tower::Service;
use tracing::warn;

use super::{Cause, Dispatch, Failed, LiveSettings, ResponseBody};
use crate::discovery::{Report, ReportSender};

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    settings: LiveSettings,
    reports: ReportSender,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, settings: LiveSettings, reports: ReportSender) -> Self {
        Deadline { inner, settings, reports }
    }
}

impl<S> Service<Dispatch> for Deadline<S>
where
    S: Service<Dispatch, Response = Response<ResponseBody>, Error = Failed>,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Failed;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Failed>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let settings = self.settings.load();
        let timeout = settings.timeout;
        let request_timeout = settings.request_timeout;
        let request = &dispatch.forward.request;
        let progress = request.body().progress();
        // For the warning only; both are reference-counted, not copied.
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let endpoint = dispatch.endpoint().clone();
        let reports = self.reports.clone();
        let answer = self.inner.call(dispatch);
        Box::pin(async move {
            let started = Instant::now();
            let sent = async {
                if let Some(progress) = &progress {
                    progress.ended().await;
                }
            };
            let expired = async {
                sent.await;
                let request_only = !request_timeout.is_zero() && request_timeout < timeout;
                tokio::time::sleep(if request_only { request_timeout } else { timeout }).await;
                request_only
            };
            let request_only = tokio::select! {
                answered = answer => return answered,
                request_only = expired => request_only,
            };
            let elapsed = started.elapsed();
            let outcome = if request_only {
                "request timed out, cancelled on its worker"
            } else {
                "request timed out, worker will be replaced"
            };
            warn!(
                worker = %endpoint.id,
                method = %method,
                path = uri.path(),
                elapsed_ms = elapsed.as_millis() as u64,
                "{outcome}"
            );
            if !request_only && endpoint.mark_hung() {
                let _ = reports.send(Report::Hung(endpoint.id));
            }
            Err(Failed::new(Cause::Timeout(elapsed), Some(endpoint.id)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Change, WorkerId};
    use crate::proxy::{Forward, Pool, RequestBody, Settings, Strategy, Upstream};
    use arc_swap::ArcSwap;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tower::{service_fn, ServiceExt};

    fn dispatch(pool: &Pool) -> Dispatch {
        let endpoint = pool.pick(None).unwrap();
        Dispatch { forward: Forward::new(http::Request::new(RequestBody::empty())), lease: endpoint.lease() }
    }

    fn settings(timeout: Duration) -> LiveSettings {
        let config = crate::config::Config { timeout, ..Default::default() };
        Arc::new(ArcSwap::from_pointee(Settings::from(&config)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_outlives_the_timeout_is_reported_hung_once_and_the_request_gets_504() {
        let pool = Pool::new(Strategy::RoundRobin, 0, Upstream::Http1);
        let id = WorkerId { slot: 0, generation: 0 };
        pool.apply(Change::Ready { id, socket: "/nonexistent".into() });
        let (reports, mut rx) = mpsc::unbounded_channel();
        let never =
            service_fn(|_d: Dispatch| std::future::pending::<Result<Response<ResponseBody>, Failed>>());
        let svc = Deadline::new(never, settings(Duration::from_secs(2)), reports);
        for _ in 0..2 {
            let failed = svc.clone().oneshot(dispatch(&pool)).await.unwrap_err();
            assert!(matches!(failed.cause, Cause::Timeout(t) if t >= Duration::from_secs(2)));
            assert_eq!(failed.into_proxy_error().status().as_u16(), 504);
        }
        assert_eq!(rx.try_recv().unwrap(), Report::Hung(id));
        assert!(rx.try_recv().is_err(), "reported twice");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_request_timeout_gets_504_and_its_worker_is_not_reported() {
        let pool = Pool::new(Strategy::RoundRobin, 0, Upstream::Http1);
        pool.apply(Change::Ready { id: WorkerId { slot: 0, generation: 0 }, socket: "/nonexistent".into() });
        let (reports, mut rx) = mpsc::unbounded_channel();
        let config = crate::config::Config {
            timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let settings = Arc::new(ArcSwap::from_pointee(Settings::from(&config)));
        let never =
            service_fn(|_d: Dispatch| std::future::pending::<Result<Response<ResponseBody>, Failed>>());
        let started = tokio::time::Instant::now();
        let failed = Deadline::new(never, settings, reports).oneshot(dispatch(&pool)).await.unwrap_err();
        assert_eq!(failed.into_proxy_error().status().as_u16(), 504);
        assert!(started.elapsed() < Duration::from_secs(2), "waited for --timeout instead");
        assert!(rx.try_recv().is_err(), "a worker was reported hung for one slow request");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes_through_untouched() {
        let pool = Pool::new(Strategy::RoundRobin, 0, Upstream::Http1);
        pool.apply(Change::Ready { id: WorkerId { slot: 0, generation: 0 }, socket: "/nonexistent".into() });
        let (reports, mut rx) = mpsc::unbounded_channel();
        let slow = service_fn(|_d: Dispatch| async {
            tokio::time::sleep(Duration::from_millis(1900)).await;
            Ok::<_, Failed>(Response::new(ResponseBody::full("late but in time")))
        });
        let svc = Deadline::new(slow, settings(Duration::from_secs(2)), reports);
        assert!(svc.oneshot(dispatch(&pool)).await.is_ok());
        assert!(rx.try_recv().is_err());
    }
}
