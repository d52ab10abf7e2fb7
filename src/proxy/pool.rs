//! The set of workers in rotation, changed only by discovery messages from the supervisor.
//! Invariant: a worker is out of the rotation before its drain is awaited, so nothing new is
//! sent to a worker that is about to be stopped.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::debug;

use super::endpoint::{Endpoint, Upstream};
use super::strategy::{choose, Candidate, Strategy};
use crate::discovery::{Change, WorkerId};

#[derive(Debug)]
pub struct Pool {
    /// Read on every request, replaced only when a worker joins or leaves (by the single
    /// discovery task, so updates never race each other).
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    capacity: Arc<Capacity>,
    next: AtomicUsize,
    strategy: Strategy,
    /// Requests in flight per worker before it counts as full; 0 = no limit.
    max_in_flight: AtomicUsize,
    /// Each new worker's request budget is extended by a random amount up to this.
    jitter: AtomicU64,
    upstream: Upstream,
}

/// Wakes requests waiting for a worker: on every change of the rotation, and when a request
/// ends while someone waits (only then, so the common path costs one atomic load).
#[derive(Debug)]
pub struct Capacity {
    version: watch::Sender<u64>,
    waiting: AtomicUsize,
    /// Tunnels open through every worker, those that left the rotation included.
    pub(super) tunnels: AtomicUsize,
    /// The heartbeat watcher sleeps while no worker has anything to judge (`watch.rs`); the
    /// first request in flight on a worker wakes it.
    watcher_resting: AtomicBool,
    watcher: Notify,
}

impl Capacity {
    pub fn touch(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn released(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.touch();
        }
    }

    /// A worker had nothing in flight and now has a request (after its in-flight count was
    /// raised, SeqCst): wakes the heartbeat watcher if it rests. One load on that path.
    pub(super) fn first_in_flight(&self) {
        if self.watcher_resting.load(Ordering::SeqCst) {
            self.watcher.notify_one();
        }
    }

    #[cfg(test)]
    pub(super) fn watcher_rests(&self) -> bool {
        self.watcher_resting.load(Ordering::SeqCst)
    }

    /// Sleeps until [`first_in_flight`](Self::first_in_flight), unless `idle` (checked
    /// after this is seen resting, SeqCst) says a request is in flight already.
    pub(super) async fn rest_watcher(&self, idle: impl Fn() -> bool) {
        let woken = self.watcher.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        self.watcher_resting.store(true, Ordering::SeqCst);
        if idle() {
            woken.await;
        }
        self.watcher_resting.store(false, Ordering::SeqCst);
    }
}

/// Counts a request as waiting while alive.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(strategy: Strategy, max_in_flight: usize, upstream: Upstream) -> Pool {
        Pool {
            endpoints: ArcSwap::from_pointee(Vec::new()),
            capacity: Arc::new(Capacity {
                version: watch::Sender::new(0),
                waiting: AtomicUsize::new(0),
                tunnels: AtomicUsize::new(0),
                watcher_resting: AtomicBool::new(false),
                watcher: Notify::new(),
            }),
            next: AtomicUsize::new(0),
            strategy,
            max_in_flight: AtomicUsize::new(max_in_flight),
            jitter: AtomicU64::new(0),
            upstream,
        }
    }

    pub fn upstream(&self) -> Upstream {
        self.upstream
    }

    /// Applies limits that may change on reload.
    pub fn configure(&self, max_in_flight: usize, jitter: u64) {
        self.max_in_flight.store(max_in_flight, Ordering::Relaxed);
        self.jitter.store(jitter, Ordering::Relaxed);
    }

    pub fn capacity(&self) -> Arc<Capacity> {
        self.capacity.clone()
    }

    /// Tunnels open through any worker, in the rotation or not.
    pub fn tunnels(&self) -> usize {
        self.capacity.tunnels.load(Ordering::Relaxed)
    }

    /// Requests now waiting for a worker.
    pub fn waiting(&self) -> usize {
        self.capacity.waiting.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// The worker for the next request, if any is usable now.
    pub fn pick(&self, avoid: Option<WorkerId>) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let avoid = avoid.and_then(|id| endpoints.iter().position(|e| e.id == id));
        let cap = self.max_in_flight.load(Ordering::Relaxed);
        let candidate = |i: usize| {
            let e: &Endpoint = &endpoints[i];
            let in_flight = e.in_flight();
            let full = cap > 0 && in_flight >= cap;
            Candidate {
                in_flight,
                exhausted: e.is_exhausted(),
                unusable: full || !e.is_usable() || e.is_spent(),
            }
        };
        choose(self.strategy, endpoints.len(), candidate, start, avoid).map(|i| endpoints[i].clone())
    }

    /// Like [`pick`](Self::pick), waiting until `deadline` for a worker to become usable.
    pub async fn pick_until(&self, avoid: Option<WorkerId>, deadline: Instant) -> Option<Arc<Endpoint>> {
        if let Some(endpoint) = self.pick(avoid) {
            return Some(endpoint);
        }
        let mut changes = self.capacity.version.subscribe();
        self.capacity.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.capacity.waiting);
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
        self.capacity.touch();
    }

    /// Applies one discovery message.
    pub fn apply(&self, change: Change) {
        match change {
            Change::Ready { id, socket, heartbeat } => {
                debug!(worker = %id, "worker joined the rotation");
                let jitter = random_up_to(self.jitter.load(Ordering::Relaxed));
                let capacity = self.capacity.clone();
                let endpoint =
                    Arc::new(Endpoint::new(id, socket, capacity, jitter, self.upstream, heartbeat));
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
        let mut list = self.endpoints.load().to_vec();
        edit(&mut list);
        self.endpoints.store(Arc::new(list));
        self.touch();
    }
}

/// A random number in `0..=max`. The std hasher's per-instance random keys are plenty for
/// spreading recycles; no crate needed.
fn random_up_to(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(max);
    hasher.finish() % (max + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn id(slot: usize) -> WorkerId {
        WorkerId { slot, generation: 0 }
    }

    fn ready(pool: &Pool, slot: usize) {
        pool.apply(Change::Ready {
            id: id(slot),
            socket: format!("/nonexistent/{slot}").into(),
            heartbeat: None,
        });
    }

    #[tokio::test]
    async fn leave_waits_for_in_flight_requests() {
        let pool = Pool::new(Strategy::RoundRobin, 0, Upstream::Http1);
        ready(&pool, 0);
        ready(&pool, 1);
        let endpoint = pool.snapshot().iter().find(|e| e.id == id(0)).unwrap().clone();
        let lease = endpoint.lease();
        let (tx, mut rx) = oneshot::channel();
        pool.apply(Change::Leave { id: id(0), drained: Some(tx) });
        for _ in 0..10 {
            assert_eq!(pool.pick(None).unwrap().id, id(1), "a leaving worker was picked");
        }
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "drained before the request finished");
        drop(lease);
        tokio::time::timeout(Duration::from_secs(5), rx).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn waiting_requests_wake_when_a_worker_joins() {
        let pool = Arc::new(Pool::new(Strategy::LeastPending, 0, Upstream::Http1));
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.pick_until(None, Instant::now() + Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        ready(&pool, 3);
        let picked = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(picked.unwrap().id, id(3));
    }

    #[tokio::test]
    async fn waiting_gives_up_at_the_deadline() {
        let pool = Pool::new(Strategy::RoundRobin, 0, Upstream::Http1);
        let picked = pool.pick_until(None, Instant::now() + Duration::from_millis(20)).await;
        assert!(picked.is_none());
    }

    #[tokio::test]
    async fn a_full_worker_is_skipped_and_waiters_wake_when_it_frees_up() {
        let pool = Arc::new(Pool::new(Strategy::LeastPending, 1, Upstream::Http1));
        ready(&pool, 0);
        let lease = pool.pick(None).unwrap().lease();
        assert!(pool.pick(None).is_none(), "a full worker was picked");
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.pick_until(None, Instant::now() + Duration::from_secs(10)).await }
        });
        while pool.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(lease);
        let picked = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(picked.unwrap().id, id(0));
        assert_eq!(pool.waiting(), 0);
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let draws: Vec<u64> = (0..200).map(|_| random_up_to(10)).collect();
        assert!(draws.iter().all(|d| *d <= 10));
        assert!(draws.iter().any(|d| *d != draws[0]));
        assert_eq!(random_up_to(0), 0);
    }

    #[tokio::test]
    async fn leave_of_an_unknown_worker_reports_drained_at_once() {
        let pool = Pool::new(Strategy::RoundRobin, 0, Upstream::Http1);
        let (tx, rx) = oneshot::channel();
        pool.apply(Change::Leave { id: id(9), drained: Some(tx) });
        rx.await.unwrap();
    }
}
