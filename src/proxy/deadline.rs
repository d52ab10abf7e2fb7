//! What bounds one attempt's wait for response headers, other than the worker answering:
//!
//! - `--request-timeout`, counted from the moment the worker has the whole request (a client
//!   that uploads slowly is the client's problem, bounded by the body's own idle timeout):
//!   504, the request cancelled on the worker (its stream reset, or its connection closed),
//!   and the worker left alone. A slow request says nothing about a multiplexed worker.
//! - The worker's heartbeat (`proxy::watch`). When the worker stalls, a request that can be
//!   sent again (idempotent, no body) and is not the one the worker is stuck in gives up its
//!   place: the attempt fails as [`Cause::Stalled`], the retry layer sends it to another
//!   worker, and dropping this attempt cancels it on the stalled one. A request moves once: a
//!   request that stalls every worker it reaches must not walk the whole pool. When the worker
//!   has been silent for `--timeout` and is declared hung, every request still on it gets its
//!   504 now rather than a 502 when the kill cuts its connection.
//!
//! The layer sits below the balancer, per attempt, because its clock starts only once a
//! worker holds the request and its heartbeat is that worker's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use tokio::time::Instant;
use tower::Service;
use tracing::warn;

use super::{Cause, Dispatch, Failed, LiveSettings, ResponseBody};

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    settings: LiveSettings,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, settings: LiveSettings) -> Self {
        Deadline { inner, settings }
    }
}

/// Why an attempt stopped waiting for its worker.
enum Ended {
    Expired,
    Move,
    Hung,
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
        let request_timeout = self.settings.load().request_timeout;
        let forward = &dispatch.forward;
        let (id, movable) = (forward.id, forward.movable && !forward.moved);
        let request = &forward.request;
        let progress = request.body().progress();
        // For the warning only; both are reference-counted, not copied.
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let endpoint = dispatch.endpoint().clone();
        let answer = self.inner.call(dispatch);
        Box::pin(async move {
            let started = Instant::now();
            let expired = async {
                if request_timeout.is_zero() {
                    return std::future::pending().await;
                }
                if let Some(progress) = &progress {
                    progress.ended().await;
                }
                tokio::time::sleep(request_timeout).await;
            };
            let silenced = async {
                if endpoint.heartbeat().is_none() {
                    return std::future::pending().await;
                }
                endpoint
                    .until_silent(|e| {
                        if e.is_hung() {
                            Some(Ended::Hung)
                        } else if movable && e.is_stalled() && e.stuck_on() != id {
                            Some(Ended::Move)
                        } else {
                            None
                        }
                    })
                    .await
            };
            let ended = tokio::select! {
                answered = answer => return match answered {
                    // The kill of a hung worker cut the connection: the request was answered
                    // 504 above, or is now.
                    Err(_) if endpoint.is_hung() => Err(Failed::new(Cause::Timeout(started.elapsed()), Some(endpoint.id))),
                    answered => answered,
                },
                () = expired => Ended::Expired,
                ended = silenced => ended,
            };
            let outcome = match ended {
                Ended::Move => return Err(Failed::new(Cause::Stalled, Some(endpoint.id))),
                Ended::Expired => "request timed out, cancelled on its worker",
                Ended::Hung => "request on a hung worker answered 504",
            };
            let elapsed = started.elapsed();
            warn!(
                worker = %endpoint.id,
                method = %method,
                path = uri.path(),
                elapsed_ms = elapsed.as_millis() as u64,
                "{outcome}"
            );
            Err(Failed::new(Cause::Timeout(elapsed), Some(endpoint.id)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Change, WorkerId};
    use crate::heartbeat::Heartbeat;
    use crate::proxy::{Forward, Pool, RequestBody, Settings, Strategy, Upstream};
    use arc_swap::ArcSwap;
    use std::sync::Arc;
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    fn pool(heartbeat: bool) -> Pool {
        let pool = Pool::new(Strategy::RoundRobin, 0, Upstream::Http1);
        let heartbeat = heartbeat.then(|| Arc::new(Heartbeat::create().unwrap().0));
        pool.apply(Change::Ready {
            id: WorkerId { slot: 0, generation: 0 },
            socket: "/nonexistent".into(),
            heartbeat,
        });
        pool
    }

    fn dispatch(pool: &Pool, id: u64, movable: bool) -> Dispatch {
        let endpoint = pool.snapshot()[0].clone();
        let mut forward = Forward::new(http::Request::new(RequestBody::empty()));
        (forward.id, forward.movable) = (id, movable);
        Dispatch { forward, lease: endpoint.lease() }
    }

    fn settings(request_timeout: Duration) -> LiveSettings {
        let config = crate::config::Config { request_timeout, ..Default::default() };
        Arc::new(ArcSwap::from_pointee(Settings::from(&config)))
    }

    fn never(
    ) -> impl Service<Dispatch, Response = Response<ResponseBody>, Error = Failed, Future: Send> + Clone {
        service_fn(|_d: Dispatch| std::future::pending::<Result<Response<ResponseBody>, Failed>>())
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_request_timeout_gets_504_and_its_worker_is_left_alone() {
        let pool = pool(false);
        let started = tokio::time::Instant::now();
        let svc = Deadline::new(never(), settings(Duration::from_secs(1)));
        let failed = svc.oneshot(dispatch(&pool, 1, true)).await.unwrap_err();
        assert_eq!(failed.into_proxy_error().status().as_u16(), 504);
        assert!(started.elapsed() < Duration::from_secs(2));
        let endpoint = &pool.snapshot()[0];
        assert!(endpoint.is_usable() && !endpoint.is_hung(), "one slow request judged the worker");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes_through_untouched() {
        let pool = pool(true);
        let slow = service_fn(|_d: Dispatch| async {
            tokio::time::sleep(Duration::from_millis(1900)).await;
            Ok::<_, Failed>(Response::new(ResponseBody::full("late but in time")))
        });
        let svc = Deadline::new(slow, settings(Duration::from_secs(2)));
        assert!(svc.oneshot(dispatch(&pool, 1, true)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn on_a_stall_only_requests_that_can_move_and_did_not_cause_it_move_and_on_a_hang_all_get_504() {
        let pool = pool(true);
        let svc = Deadline::new(never(), settings(Duration::ZERO));
        let waiting = |id, movable| tokio::spawn(svc.clone().oneshot(dispatch(&pool, id, movable)));
        let (culprit, queued, post) = (waiting(7, true), waiting(8, true), waiting(9, false));
        tokio::task::yield_now().await;
        let endpoint = pool.snapshot()[0].clone();
        endpoint.stall(7);
        let moved = queued.await.unwrap().unwrap_err();
        assert!(matches!(moved.cause, Cause::Stalled), "{:?}", moved.cause);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!culprit.is_finished(), "the request the worker is stuck in moved");
        assert!(!post.is_finished(), "a request that cannot be replayed moved");
        assert!(endpoint.mark_hung());
        for stuck in [culprit, post] {
            let failed = stuck.await.unwrap().unwrap_err();
            assert_eq!(failed.into_proxy_error().status().as_u16(), 504);
        }
    }
}
