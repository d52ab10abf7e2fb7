//! Bounded load on loopback: [`Load`] runs keep-alive clients until a count, a deadline or a
//! stop, and reports what every request got. The count and the deadline are never optional,
//! so no load loop runs unbounded. [`no_failures`] and [`summary`] hold a report to account.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::http::{Client, WhoAmI};

/// A bounded load: `clients` keep-alive connections sending `GET path` until `total` requests
/// were sent, the deadline passed, or [`LoadHandle::stop`] was called.
#[derive(Debug, Clone)]
pub struct Load {
    path: String,
    clients: usize,
    total: usize,
    deadline: Duration,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    tickets: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
}

/// Watches and stops a running [`Load`] from another thread.
#[derive(Debug, Clone)]
pub struct LoadHandle(Arc<Counters>);

impl LoadHandle {
    /// Requests answered or failed so far.
    pub fn done(&self) -> usize {
        self.0.done.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> usize {
        self.0.failed.load(Ordering::Relaxed)
    }

    /// Asks every client to stop after its current request.
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// What a [`Load`] saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: usize,
    /// Answered with a 2xx status.
    pub ok: usize,
    /// Answered with another status, or not answered.
    pub failed: usize,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, usize>,
    /// Transport errors, the first few only.
    pub errors: Vec<String>,
    /// The bodies of 2xx answers.
    pub bodies: Vec<Bytes>,
    /// The deadline passed before `total` requests were sent.
    pub timed_out: bool,
    /// How long each answered request took, in the order each client sent them.
    pub latencies: Vec<Duration>,
}

/// Requests that must succeed after an operation finished, to show traffic still flows.
pub const AFTERWARDS: usize = 50;

/// Transport errors kept in a report; the count is in `failed`.
const KEPT_ERRORS: usize = 20;

impl LoadReport {
    /// The workers that answered, from `/whoami` bodies.
    pub fn whoami(&self) -> Vec<WhoAmI> {
        self.bodies.iter().filter_map(|b| WhoAmI::parse(b)).collect()
    }

    /// Distinct worker pids among `/whoami` answers.
    pub fn pids(&self) -> std::collections::BTreeSet<i32> {
        self.whoami().iter().map(|w| w.pid).collect()
    }

    /// Answered requests that took longer than `limit`.
    pub fn slower_than(&self, limit: Duration) -> usize {
        self.latencies.iter().filter(|l| **l > limit).count()
    }

    /// The slowest answered request.
    pub fn slowest(&self) -> Duration {
        self.latencies.iter().copied().max().unwrap_or_default()
    }

    fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.failed += other.failed;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        let room = KEPT_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(other.errors.into_iter().take(room));
        self.bodies.extend(other.bodies);
        self.timed_out |= other.timed_out;
        self.latencies.extend(other.latencies);
    }
}

impl Load {
    pub fn get(path: &str) -> Load {
        Load {
            path: path.to_string(),
            clients: 4,
            total: 100,
            deadline: Duration::from_secs(30),
            counters: Arc::default(),
        }
    }

    pub fn clients(mut self, clients: usize) -> Load {
        self.clients = clients;
        self
    }

    pub fn total(mut self, total: usize) -> Load {
        self.total = total;
        self
    }

    pub fn deadline(mut self, deadline: Duration) -> Load {
        self.deadline = deadline;
        self
    }

    pub fn handle(&self) -> LoadHandle {
        LoadHandle(self.counters.clone())
    }

    pub async fn run(self, addr: SocketAddr) -> LoadReport {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let tasks: Vec<_> =
            (0..self.clients).map(|_| tokio::spawn(self.clone().client(addr, deadline))).collect();
        let mut report = LoadReport::default();
        for task in tasks {
            report.merge(task.await.expect("a load client panicked"));
        }
        report
    }

    async fn client(self, addr: SocketAddr, deadline: tokio::time::Instant) -> LoadReport {
        let mut client = Client::new(addr);
        let mut report = LoadReport::default();
        let c = &self.counters;
        while !c.stop.load(Ordering::Relaxed) {
            if c.tickets.fetch_add(1, Ordering::Relaxed) >= self.total {
                break;
            }
            report.sent += 1;
            let started = tokio::time::Instant::now();
            let result = tokio::time::timeout_at(deadline, client.get(&self.path)).await;
            match result {
                Ok(Ok(reply)) => {
                    report.latencies.push(started.elapsed());
                    *report.statuses.entry(reply.status.as_u16()).or_default() += 1;
                    if reply.status.is_success() {
                        report.ok += 1;
                        report.bodies.push(reply.body);
                    } else {
                        report.failed += 1;
                        c.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Err(e)) => {
                    report.failed += 1;
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    if report.errors.len() < KEPT_ERRORS {
                        report.errors.push(error_chain(&*e));
                    }
                    // The connection may be broken; start the next request on a new one.
                    client = Client::new(addr);
                }
                Err(_) => {
                    report.failed += 1;
                    report.timed_out = true;
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    c.done.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            c.done.fetch_add(1, Ordering::Relaxed);
        }
        report
    }
}

/// Asserts that every request of `report` succeeded and the load ended before its deadline.
pub fn no_failures(report: &LoadReport) {
    assert_eq!(
        report.failed, 0,
        "{} of {} requests failed: {:?} {:?}",
        report.failed, report.sent, report.statuses, report.errors
    );
    assert!(!report.timed_out, "the load hit its deadline");
}

/// A load report in a few lines, for assertion messages.
pub fn summary(report: &LoadReport) -> String {
    format!(
        "sent={} ok={} failed={} statuses={:?} timed_out={} errors={:?}",
        report.sent, report.ok, report.failed, report.statuses, report.timed_out, report.errors
    )
}

/// An error and its causes on one line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}
