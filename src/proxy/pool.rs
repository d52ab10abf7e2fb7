//! The set of workers in rotation, changed only by discovery messages from the supervisor.
//! Invariant: a worker is out of the rotation before its drain is awaited, so nothing new is
//! sent to a worker that is about to be stopped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::balance::{choose, Balance, Candidate};
use super::endpoint::Endpoint;
use crate::discovery::{Change, WorkerId};

#[derive(Debug)]
pub struct Pool {
    endpoints: RwLock<Arc<[Arc<Endpoint>]>>,
    /// Bumped on every change, so requests waiting for a worker wake up.
    version: watch::Sender<u64>,
    next: AtomicUsize,
    balance: Balance,
}

impl Pool {
    pub fn new(balance: Balance) -> Pool {
        Pool {
            endpoints: RwLock::new(Arc::from(Vec::new())),
            version: watch::Sender::new(0),
            next: AtomicUsize::new(0),
            balance,
        }
    }

    pub fn snapshot(&self) -> Arc<[Arc<Endpoint>]> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The worker for the next request, if any is usable now.
    pub fn pick(&self, avoid: Option<WorkerId>) -> Option<Arc<Endpoint>> {
        let endpoints = self.snapshot();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let avoid = avoid.and_then(|id| endpoints.iter().position(|e| e.id == id));
        let candidate = |i: usize| {
            let e: &Endpoint = &endpoints[i];
            Candidate {
                in_flight: e.in_flight(),
                exhausted: e.is_exhausted(),
                unusable: !e.is_usable(),
            }
        };
        choose(self.balance, endpoints.len(), candidate, start, avoid).map(|i| endpoints[i].clone())
    }

    /// Like [`pick`](Self::pick), waiting until `deadline` for a worker to become usable.
    pub async fn pick_until(
        &self,
        avoid: Option<WorkerId>,
        deadline: Instant,
    ) -> Option<Arc<Endpoint>> {
        let mut changes = self.version.subscribe();
        loop {
            changes.mark_unchanged();
            if let Some(endpoint) = self.pick(avoid) {
                return Some(endpoint);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Wakes requests waiting for a worker, e.g. after one was found unreachable.
    pub fn touch(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Applies one discovery message.
    pub fn apply(&self, change: Change) {
        match change {
            Change::Ready { id, socket } => {
                debug!(worker = %id, "worker joined the rotation");
                let endpoint = Arc::new(Endpoint::new(id, socket));
                self.update(|list| {
                    list.retain(|e| e.id != id);
                    list.push(endpoint);
                });
            }
            Change::Leave { id, drained } => {
                let mut leaving = None;
                self.update(|list| {
                    if let Some(pos) = list.iter().position(|e| e.id == id) {
                        leaving = Some(list.remove(pos));
                    }
                });
                let Some(endpoint) = leaving else {
                    if let Some(tx) = drained {
                        let _ = tx.send(());
                    }
                    return;
                };
                endpoint.leave();
                debug!(worker = %id, in_flight = endpoint.in_flight(), "worker left the rotation");
                if let Some(tx) = drained {
                    tokio::spawn(async move {
                        endpoint.drained().await;
                        let _ = tx.send(());
                    });
                }
            }
        }
    }

    fn update(&self, edit: impl FnOnce(&mut Vec<Arc<Endpoint>>)) {
        {
            let mut guard = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
            let mut list = guard.to_vec();
            edit(&mut list);
            *guard = Arc::from(list);
        }
        self.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn id(slot: usize) -> WorkerId {
        WorkerId {
            slot,
            generation: 0,
        }
    }

    fn ready(pool: &Pool, slot: usize) {
        pool.apply(Change::Ready {
            id: id(slot),
            socket: format!("/nonexistent/{slot}").into(),
        });
    }

    #[tokio::test]
    async fn leave_waits_for_in_flight_requests() {
        let pool = Pool::new(Balance::RoundRobin);
        ready(&pool, 0);
        ready(&pool, 1);
        let endpoint = pool
            .snapshot()
            .iter()
            .find(|e| e.id == id(0))
            .unwrap()
            .clone();
        let lease = endpoint.lease();
        let (tx, mut rx) = oneshot::channel();
        pool.apply(Change::Leave {
            id: id(0),
            drained: Some(tx),
        });
        for _ in 0..10 {
            assert_eq!(
                pool.pick(None).unwrap().id,
                id(1),
                "a leaving worker was picked"
            );
        }
        tokio::task::yield_now().await;
        assert!(
            rx.try_recv().is_err(),
            "drained before the request finished"
        );
        drop(lease);
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn waiting_requests_wake_when_a_worker_joins() {
        let pool = Arc::new(Pool::new(Balance::LeastPending));
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.pick_until(None, Instant::now() + Duration::from_secs(10))
                    .await
            }
        });
        tokio::task::yield_now().await;
        ready(&pool, 3);
        let picked = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(picked.unwrap().id, id(3));
    }

    #[tokio::test]
    async fn waiting_gives_up_at_the_deadline() {
        let pool = Pool::new(Balance::RoundRobin);
        let picked = pool
            .pick_until(None, Instant::now() + Duration::from_millis(20))
            .await;
        assert!(picked.is_none());
    }

    #[tokio::test]
    async fn leave_of_an_unknown_worker_reports_drained_at_once() {
        let pool = Pool::new(Balance::RoundRobin);
        let (tx, rx) = oneshot::channel();
        pool.apply(Change::Leave {
            id: id(9),
            drained: Some(tx),
        });
        rx.await.unwrap();
    }
}
