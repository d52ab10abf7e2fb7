//! One worker as the proxy sees it: its socket, its counters and its pool of keep-alive
//! connections (or, with `--upstream handoff`, its hand-off channel). Invariant: a connection
//! goes back to the idle pool only after its response body ended, so an idle connection is
//! always free for the next request.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tokio::sync::{Notify, OnceCell};

use super::body::RequestBody;
use super::pool::Capacity;
use crate::discovery::{Address, WorkerId};
use crate::heartbeat::Heartbeat;

/// Idle connections kept per worker; beyond this a finished connection is closed. Enough for
/// the front-end's concurrency to reuse connections, small enough to bound file descriptors.
const MAX_IDLE_PER_WORKER: usize = 512;
/// An idle connection older than this is closed rather than reused. Apps close idle
/// keep-alive connections on timers of their own (Node after 5 s, gunicorn after 2 s); a
/// request written just as the app closes is lost with the connection, and one that is not
/// idempotent cannot be sent again. A fresh Unix-socket connection costs tens of microseconds.
const IDLE_REUSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A connection to a worker, ready for one request (HTTP/1) or shared (HTTP/2).
#[derive(Debug)]
pub enum Sender {
    H1(SendRequest<RequestBody>),
    H2(H2Sender),
}

type H2Sender = hyper::client::conn::http2::SendRequest<RequestBody>;

type Sent = Result<
    http::Response<hyper::body::Incoming>,
    hyper::client::conn::TrySendError<http::Request<RequestBody>>,
>;

impl Sender {
    pub fn try_send_request(
        &mut self,
        req: http::Request<RequestBody>,
    ) -> futures_util::future::Either<
        impl std::future::Future<Output = Sent>,
        impl std::future::Future<Output = Sent>,
    > {
        match self {
            Sender::H1(s) => futures_util::future::Either::Left(s.try_send_request(req)),
            Sender::H2(s) => futures_util::future::Either::Right(s.try_send_request(req)),
        }
    }

    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

pub use crate::config::Upstream;

/// Front-end shards in this process: each a thread with its own runtime and its own
/// connections to every worker ([`Endpoint`] keeps one pool per shard), so a request never
/// wakes another thread to reach its worker. Set once at start, before any endpoint exists.
static SHARDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

thread_local! {
    /// The shard this thread serves; 0 for the main runtime's threads.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many shards the front-end runs; call before the first endpoint is made.
pub fn set_shards(shards: usize) {
    SHARDS.store(shards.max(1), Ordering::Relaxed);
}

/// Marks the calling thread as serving `shard`.
pub fn enter_shard(shard: usize) {
    SHARD.with(|s| s.set(shard));
}

/// One shard's connections to a worker.
#[derive(Debug, Default)]
struct Conns {
    /// Each with when it went idle; the newest last.
    idle: Mutex<Vec<(Sender, std::time::Instant)>>,
    h2: Mutex<Option<H2Sender>>,
    /// Held while the HTTP/2 connection is being opened, so that requests arriving meanwhile
    /// wait for it instead of each opening one of their own (a new worker meets a crowd).
    h2_opening: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub id: WorkerId,
    socket: Address,
    in_flight: AtomicUsize,
    /// Upgraded connections (WebSockets) open through this worker: counted apart from
    /// requests, since they last as long as the client wants and say nothing of its load.
    tunnels: AtomicUsize,
    sent: AtomicU64,
    exhausted: AtomicBool,
    /// Sent [`OVERSHOOT`] times its budget.
    spent: AtomicBool,
    /// Left the rotation; kept alive only by requests still in flight.
    leaving: AtomicBool,
    /// Refused a connection: the process is gone even if the supervisor has not said so yet.
    unreachable: AtomicBool,
    hung_reported: AtomicBool,
    /// Shared with the worker's runtime; `None` for a worker that has none.
    heartbeat: Option<Arc<Heartbeat>>,
    /// Its heartbeat stopped: out of the rotation until it beats again.
    stalled: AtomicBool,
    /// The request the worker was running when it stalled; 0 when none is known.
    stuck_on: AtomicU64,
    /// Wakes the requests on this worker when it stalls or is declared hung.
    silence: Notify,
    /// Connections, one set per front-end shard.
    conns: Box<[Conns]>,
    /// `--upstream handoff`: where client connections go, opened on first use. Shared with
    /// the task that listens for the worker's answers on it.
    channel: OnceCell<Arc<UnixStream>>,
    upstream: Upstream,
    drained: Notify,
    capacity: Arc<Capacity>,
    /// Extra requests this worker may serve past `--max-requests` (`--max-requests-jitter`).
    jitter: u64,
}

impl Endpoint {
    pub fn new(
        id: WorkerId,
        socket: Address,
        capacity: Arc<Capacity>,
        jitter: u64,
        upstream: Upstream,
        heartbeat: Option<Arc<Heartbeat>>,
    ) -> Endpoint {
        Endpoint {
            id,
            socket,
            in_flight: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
            spent: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
            hung_reported: AtomicBool::new(false),
            heartbeat,
            stalled: AtomicBool::new(false),
            stuck_on: AtomicU64::new(0),
            silence: Notify::new(),
            conns: (0..SHARDS.load(Ordering::Relaxed)).map(|_| Conns::default()).collect(),
            channel: OnceCell::new(),
            upstream,
            drained: Notify::new(),
            capacity,
            jitter,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the heartbeat watcher judges this worker's silence now: while it has requests in
    /// flight (a worker with none rests its beat, `worker::pulse`), while it is stalled
    /// (until it beats again or hangs), and always with `--upstream handoff`, whose clients
    /// the front-end does not see.
    pub fn is_watched(&self) -> bool {
        self.upstream == Upstream::Handoff
            || self.in_flight.load(Ordering::SeqCst) > 0
            || self.stalled.load(Ordering::Relaxed)
    }

    /// Upgraded connections open through this worker.
    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Requests sent to this worker so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn is_exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }

    pub fn is_usable(&self) -> bool {
        !self.leaving.load(Ordering::Relaxed)
            && !self.unreachable.load(Ordering::Relaxed)
            && !self.stalled.load(Ordering::Relaxed)
    }

    /// Out of the rotation for good (not merely stalled).
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    pub fn heartbeat(&self) -> Option<&Heartbeat> {
        self.heartbeat.as_deref()
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// The request the worker was running when it stalled, 0 for none known.
    pub fn stuck_on(&self) -> u64 {
        self.stuck_on.load(Ordering::Relaxed)
    }

    /// Takes the worker out of the rotation because its heartbeat stopped, and wakes the
    /// requests on it so that those that can move do.
    pub fn stall(&self, stuck_on: u64) {
        self.stuck_on.store(stuck_on, Ordering::Relaxed);
        self.stalled.store(true, Ordering::Relaxed);
        self.silence.notify_waiters();
    }

    /// Puts a stalled worker back in the rotation when it beats again; false if it was
    /// declared hung meanwhile (it is being killed) or was not stalled.
    pub fn recover(&self) -> bool {
        if self.is_hung() || !self.stalled.swap(false, Ordering::Relaxed) {
            return false;
        }
        self.stuck_on.store(0, Ordering::Relaxed);
        self.capacity.touch();
        true
    }

    pub fn is_hung(&self) -> bool {
        self.hung_reported.load(Ordering::Relaxed)
    }

    /// Waits until `check` says something of the worker's silence (a stall, a hang) matters
    /// to the caller. `check` runs now and after each change.
    pub async fn until_silent<T>(&self, check: impl Fn(&Endpoint) -> Option<T>) -> T {
        loop {
            let notified = self.silence.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = check(self) {
                return found;
            }
            notified.await;
        }
    }

    pub fn socket(&self) -> &Address {
        &self.socket
    }

    /// Requests this worker may serve before it is recycled; 0 = no limit.
    pub fn budget(&self, max_requests: u64) -> u64 {
        if max_requests == 0 {
            return 0;
        }
        max_requests.saturating_add(self.jitter)
    }

    /// Takes a place on this worker for one request: a [`Lease`] and the request counted
    /// against its budget, both at once and atomically, so that front-end shards picking the
    /// same worker together can neither push it past `max_in_flight` (0: no cap) nor past
    /// [`OVERSHOOT`] times its budget; the [`Counted`] says when this request reached the
    /// budget or the overshoot (each once). `Err` when it is full or spent — pick again — with
    /// what to report, if this refusal is the first news of it (a budget lowered by a reload
    /// below what the worker has served).
    pub fn claim(
        self: &Arc<Self>,
        max_in_flight: usize,
        max_requests: u64,
    ) -> Result<(Lease, Counted), Option<Counted>> {
        // SeqCst: the heartbeat watcher's rest checks every count after saying it rests.
        let taken = self.in_flight.fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| {
            (max_in_flight == 0 || n < max_in_flight).then_some(n + 1)
        });
        match taken {
            Err(_) => return Err(None),
            Ok(0) => self.capacity.first_in_flight(),
            Ok(_) => {}
        }
        let lease = Lease(self.clone());
        let budget = self.budget(max_requests);
        let limit = if budget == 0 { u64::MAX } else { budget.saturating_mul(OVERSHOOT) };
        let claimed =
            self.sent.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1));
        let sent = match claimed {
            Ok(before) => before + 1,
            // Dropping the lease gives its place back; marked spent, it is picked no more.
            Err(_) => {
                let first = !self.spent.swap(true, Ordering::Relaxed);
                return Err(if self.mark_exhausted() {
                    Some(Counted::Exhausted)
                } else {
                    first.then_some(Counted::Spent)
                });
            }
        };
        if budget == 0 {
            return Ok((lease, Counted::Within));
        }
        if sent >= limit && !self.spent.swap(true, Ordering::Relaxed) {
            return Ok((lease, Counted::Spent));
        }
        if sent >= budget && self.mark_exhausted() {
            return Ok((lease, Counted::Exhausted));
        }
        Ok((lease, Counted::Within))
    }

    /// Sent its whole overshoot: no more requests until it is replaced.
    pub fn is_spent(&self) -> bool {
        self.spent.load(Ordering::Relaxed)
    }

    /// Counts a client connection handed to this worker (`--upstream handoff`), for `rip
    /// status` only: with hand-off the worker keeps its own request budget.
    pub fn count_handed_connection(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// True the first time only: the worker has served its budget.
    pub fn mark_exhausted(&self) -> bool {
        !self.exhausted.swap(true, Ordering::Relaxed)
    }

    /// The hand-off channel, opened by `open` if it is not open yet.
    pub async fn channel(
        &self,
        open: impl std::future::Future<Output = io::Result<Arc<UnixStream>>>,
    ) -> io::Result<&UnixStream> {
        self.channel.get_or_try_init(|| open).await.map(|c| &**c)
    }

    /// True the first time only, so one hung worker is reported once; wakes the requests on
    /// it, which are then answered rather than left to the kill.
    pub fn mark_hung(&self) -> bool {
        let first = !self.hung_reported.swap(true, Ordering::Relaxed);
        if first {
            self.silence.notify_waiters();
        }
        first
    }

    /// Stops choosing this worker until the supervisor replaces it, and wakes requests
    /// waiting for a worker so that they look elsewhere.
    pub fn mark_unreachable(&self) {
        self.unreachable.store(true, Ordering::Relaxed);
        self.capacity.touch();
    }

    /// Closes the idle connections, after one failed in a way that suggests the worker died.
    pub fn forget_idle(&self) {
        for conns in &self.conns {
            conns.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
            conns.h2.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// The calling shard's connections.
    fn conns(&self) -> &Conns {
        let shard = SHARD.with(|s| s.get());
        &self.conns[shard % self.conns.len()]
    }

    /// Takes the worker out of the rotation and closes its idle connections.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.forget_idle();
        if let Some(channel) = self.channel.get() {
            crate::handoff::close_sending(channel);
        }
        self.drained.notify_waiters();
    }

    /// Registers a request in flight until the returned lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Lease {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.capacity.first_in_flight();
        }
        Lease(self.clone())
    }

    /// Waits until no request is in flight; tunnels are not waited for: the worker's app
    /// closes them when it hears the worker is draining, within the worker's grace.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// A connection ready for a request; `own` asks for an HTTP/1 connection of its own.
    pub async fn connection(&self, own: bool) -> io::Result<Sender> {
        if self.upstream == Upstream::Http2 && !own {
            return self.shared_h2().await.map(Sender::H2);
        }
        while let Some(mut sender) = self.pop_idle() {
            // An idle sender may need one poll to notice its previous response ended; a closed
            // one fails at once.
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        self.connect().await
    }

    /// The worker's HTTP/2 connection, opened on first use and again after it closed.
    async fn shared_h2(&self) -> io::Result<H2Sender> {
        if let Some(sender) = self.open_h2().await {
            return Ok(sender);
        }
        let _opening = self.conns().h2_opening.lock().await;
        if let Some(sender) = self.open_h2().await {
            return Ok(sender);
        }
        let stream = self.socket.connect().await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            // Ends when the worker closes the connection or every sender is dropped.
            let _ = conn.await;
        });
        *self.conns().h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    /// The shared HTTP/2 connection if it is open.
    async fn open_h2(&self) -> Option<H2Sender> {
        let mut sender = self.conns().h2.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        // Waits while the connection is at its stream limit; fails at once if it closed.
        sender.ready().await.ok().map(|()| sender)
    }

    fn pop_idle(&self) -> Option<Sender> {
        let mut idle = self.conns().idle.lock().unwrap_or_else(|e| e.into_inner());
        let (sender, since) = idle.pop()?;
        if since.elapsed() < IDLE_REUSE_LIMIT {
            return Some(sender);
        }
        // The newest is too old, so all are.
        idle.clear();
        None
    }

    async fn connect(&self) -> io::Result<Sender> {
        let stream = self.socket.connect().await?;
        let (sender, conn) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
        tokio::spawn(async move {
            // Ends when the worker closes the connection or the last sender is dropped; the
            // request that was on it, if any, sees the error.
            let _ = conn.with_upgrades().await;
        });
        Ok(Sender::H1(sender))
    }

    /// Returns a connection whose response body ended.
    pub fn give_back(&self, sender: Sender) {
        if matches!(sender, Sender::H2(_)) {
            return;
        }
        if sender.is_closed() || self.leaving.load(Ordering::Relaxed) {
            return;
        }
        let mut idle = self.conns().idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_PER_WORKER {
            idle.push((sender, std::time::Instant::now()));
        }
    }
}

/// An exhausted worker stays a fallback while its replacement starts, so that recycling never
/// takes capacity away; but only up to this many times its budget. Past that, requests wait
/// for a fresh worker (up to `--queue-timeout`): a budget that is overrun without bound, when
/// replacements cannot start as fast as requests arrive, would not bound any leak.
pub const OVERSHOOT: u64 = 2;

/// What counting a request did to a worker's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Within,
    /// The budget was reached just now: start the replacement.
    Exhausted,
    /// [`OVERSHOOT`] times the budget was reached just now: this worker takes no more.
    Spent,
}

/// One request in flight on a worker.
#[derive(Debug)]
pub struct Lease(Arc<Endpoint>);

impl Lease {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }

    /// The request became a tunnel (a 101): it stops counting as a request, in flight and
    /// towards `--max-requests` (a WebSocket says nothing of how much a worker has served).
    pub fn into_tunnel(self) -> Tunnel {
        let endpoint = self.0.clone();
        endpoint.sent.fetch_sub(1, Ordering::Relaxed);
        endpoint.tunnels.fetch_add(1, Ordering::Relaxed);
        endpoint.capacity.tunnels.fetch_add(1, Ordering::Relaxed);
        drop(self);
        Tunnel(endpoint)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.leaving.load(Ordering::Relaxed) {
            self.0.drained.notify_waiters();
        }
        self.0.capacity.released();
    }
}

/// One upgraded connection open through a worker.
#[derive(Debug)]
pub struct Tunnel(Arc<Endpoint>);

impl Tunnel {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
        self.0.capacity.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<Endpoint> {
        let pool = crate::proxy::Pool::new(crate::proxy::Strategy::RoundRobin, 0, Upstream::Http1);
        Arc::new(Endpoint::new(
            WorkerId { slot: 0, generation: 0 },
            "/nonexistent".into(),
            pool.capacity(),
            0,
            Upstream::Http1,
            None,
        ))
    }

    #[test]
    fn exhaustion_and_the_end_of_the_overshoot_are_reported_once_each() {
        use Counted::*;
        let counted =
            |e: &Arc<Endpoint>, max_requests| e.claim(0, max_requests).ok().map(|(_, counted)| counted);
        let e = endpoint();
        let reports: Vec<Option<Counted>> = (0..8).map(|_| counted(&e, 3)).collect();
        // Past twice its budget a worker takes nothing more.
        let expected = [Within, Within, Exhausted, Within, Within, Spent].map(Some);
        assert_eq!(reports[..6], expected);
        assert_eq!(reports[6..], [None, None]);
        assert!(e.is_exhausted() && e.is_spent());
        assert_eq!((e.sent(), e.in_flight()), (6, 0), "a refused claim holds no place");
        let one = endpoint();
        assert_eq!(
            [counted(&one, 1), counted(&one, 1), counted(&one, 1)],
            [Some(Exhausted), Some(Spent), None]
        );
        // A budget lowered below what was served: refused, and reported once.
        let lowered = endpoint();
        (0..10).for_each(|_| assert_eq!(counted(&lowered, 100), Some(Within)));
        assert_eq!(lowered.claim(0, 2).err(), Some(Some(Exhausted)));
        assert_eq!(lowered.claim(0, 2).err(), Some(None));
        assert!(lowered.is_spent());
        let unlimited = endpoint();
        assert!((0..100).all(|_| counted(&unlimited, 0) == Some(Within)));
        assert!(!unlimited.is_spent());
    }

    #[test]
    fn claims_from_many_threads_never_pass_the_in_flight_cap_or_the_overshoot() {
        let e = endpoint();
        let held = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        if let Ok((lease, _)) = e.claim(3, 50) {
                            held.lock().unwrap().push(lease);
                        }
                    }
                });
            }
        });
        let held = held.into_inner().unwrap();
        assert_eq!((held.len(), e.in_flight()), (3, 3), "at most 3 in flight");
        drop(held);
        let more: Vec<_> = std::iter::from_fn(|| e.claim(0, 50).ok()).take(1000).collect();
        assert_eq!(e.sent(), 100, "twice the budget of 50, never more");
        assert_eq!(more.len(), 97);
    }

    #[tokio::test]
    async fn drained_waits_for_every_lease() {
        let e = endpoint();
        let a = e.lease();
        let b = e.lease();
        e.leave();
        let waiter = tokio::spawn({
            let e = e.clone();
            async move { e.drained().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(!e.is_usable());
    }
}
