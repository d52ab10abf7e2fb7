//! The heartbeat watcher: every [`WATCH_EVERY`] it samples each worker's heartbeat page
//! (`crate::heartbeat`) and moves the worker between three states:
//!
//! - turning: its beat count changed since the last sample; in the rotation;
//! - stalled: no beat for [`STALL_AFTER`]; out of the rotation, and the requests waiting on
//!   it that can move are woken to move (`deadline.rs`). Back in at its next beat;
//! - hung: no beat for `--timeout`; reported once for the supervisor to kill and replace,
//!   and the requests still on it are answered 504.
//!
//! Silence is measured between samples that saw the count change, so a watcher that runs
//! late (a busy front-end) sees a worker that kept beating as turning, never as silent.
//! Workers that left the rotation are watched until their last request ends: a worker that
//! hangs while draining costs its requests no more than one in the rotation would.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use super::{Endpoint, LiveSettings, Pool};
use crate::discovery::{Report, ReportSender, WorkerId};
use crate::heartbeat::{STALL_AFTER, WATCH_EVERY};
use crate::telemetry::metrics::Metrics;

/// What the watcher last saw of one worker.
struct Seen {
    endpoint: Arc<Endpoint>,
    beats: u64,
    /// When a sample last found the count changed.
    changed: Instant,
}

pub struct Watcher {
    pool: Arc<Pool>,
    settings: LiveSettings,
    reports: ReportSender,
    metrics: Arc<Metrics>,
    seen: HashMap<WorkerId, Seen>,
}

impl Watcher {
    pub fn new(
        pool: Arc<Pool>,
        settings: LiveSettings,
        reports: ReportSender,
        metrics: Arc<Metrics>,
    ) -> Watcher {
        Watcher { pool, settings, reports, metrics, seen: HashMap::new() }
    }

    /// Samples forever.
    pub async fn run(mut self) {
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.sample(Instant::now());
        }
    }

    /// One round over every worker.
    pub fn sample(&mut self, now: Instant) {
        for endpoint in self.pool.snapshot().iter() {
            if endpoint.heartbeat().is_none() {
                continue;
            }
            self.seen.entry(endpoint.id).or_insert_with(|| Seen {
                endpoint: endpoint.clone(),
                beats: endpoint.heartbeat().map_or(0, |h| h.beats()),
                changed: now,
            });
        }
        self.seen.retain(|_, seen| !(seen.endpoint.is_leaving() && seen.endpoint.in_flight() == 0));
        let timeout = self.settings.load().timeout;
        for seen in self.seen.values_mut() {
            let Some(heartbeat) = seen.endpoint.heartbeat() else { continue };
            let e = &seen.endpoint;
            let beats = heartbeat.beats();
            if beats != seen.beats {
                let silent = now.saturating_duration_since(seen.changed);
                seen.beats = beats;
                seen.changed = now;
                if e.recover() {
                    info!(worker = %e.id, silent_ms = silent.as_millis() as u64, "worker turning again, back in the rotation");
                }
                continue;
            }
            let silent = now.saturating_duration_since(seen.changed);
            if silent >= STALL_AFTER && !e.is_stalled() {
                let stuck_on = heartbeat.current();
                e.stall(stuck_on);
                self.metrics.stall();
                warn!(
                    worker = %e.id,
                    silent_ms = silent.as_millis() as u64,
                    in_flight = e.in_flight(),
                    stuck_in_a_request = stuck_on != 0,
                    "worker stalled (its event loop stopped turning): out of the rotation, its waiting requests move"
                );
            }
            if silent >= timeout && e.mark_hung() {
                warn!(
                    worker = %e.id,
                    silent_ms = silent.as_millis() as u64,
                    "worker silent for --timeout: killed and replaced"
                );
                let _ = self.reports.send(Report::Hung(e.id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Change;
    use crate::heartbeat::Heartbeat;
    use crate::proxy::{Settings, Strategy, Upstream};
    use arc_swap::ArcSwap;
    use std::time::Duration;
    use tokio::sync::mpsc;

    struct Setup {
        watcher: Watcher,
        pool: Arc<Pool>,
        beats: Vec<Heartbeat>,
        reports: mpsc::UnboundedReceiver<Report>,
    }

    fn id(slot: usize) -> WorkerId {
        WorkerId { slot, generation: 0 }
    }

    fn setup(workers: usize, timeout: Duration) -> Setup {
        let pool = Arc::new(Pool::new(Strategy::LeastPending, 0, Upstream::Http2));
        let mut beats = Vec::new();
        for slot in 0..workers {
            let (page, fd) = Heartbeat::create().unwrap();
            beats.push(Heartbeat::open(fd).unwrap());
            let heartbeat = Some(Arc::new(page));
            pool.apply(Change::Ready { id: id(slot), socket: "/nonexistent".into(), heartbeat });
        }
        let config = crate::config::Config { timeout, ..Default::default() };
        let settings = Arc::new(ArcSwap::from_pointee(Settings::from(&config)));
        let (tx, reports) = mpsc::unbounded_channel();
        let watcher = Watcher::new(pool.clone(), settings, tx, Arc::new(Metrics::default()));
        Setup { watcher, pool, beats, reports }
    }

    fn endpoint(pool: &Pool, slot: usize) -> Arc<Endpoint> {
        pool.snapshot().iter().find(|e| e.id == id(slot)).unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_worker_stalls_then_hangs_while_a_beating_one_stays() {
        let mut s = setup(2, Duration::from_secs(1));
        let start = Instant::now();
        s.beats[1].set_current(7);
        let mut at = Duration::ZERO;
        while at <= Duration::from_millis(1200) {
            s.beats[0].beat();
            s.watcher.sample(start + at);
            let stalled = endpoint(&s.pool, 1).is_stalled();
            assert_eq!(stalled, at >= STALL_AFTER, "at {at:?}");
            assert!(!endpoint(&s.pool, 0).is_stalled());
            at += WATCH_EVERY;
        }
        assert_eq!(endpoint(&s.pool, 1).stuck_on(), 7, "the request it was running is named");
        assert_eq!(s.reports.try_recv().unwrap(), Report::Hung(id(1)));
        assert!(s.reports.try_recv().is_err(), "reported once");
        assert_eq!(s.pool.pick(None).unwrap().id, id(0), "only the turning worker is chosen");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_worker_that_beats_again_is_back_in_the_rotation() {
        let mut s = setup(1, Duration::from_secs(30));
        let start = Instant::now();
        s.watcher.sample(start);
        s.watcher.sample(start + Duration::from_millis(150));
        assert!(s.pool.pick(None).is_none(), "stalled");
        s.beats[0].beat();
        s.watcher.sample(start + Duration::from_millis(160));
        assert_eq!(s.pool.pick(None).unwrap().id, id(0));
        assert!(s.reports.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_sample_of_a_worker_that_kept_beating_is_not_silence() {
        let mut s = setup(1, Duration::from_millis(500));
        let start = Instant::now();
        s.watcher.sample(start);
        s.beats[0].beat();
        // The front-end was busy for a second; the worker beat meanwhile.
        s.watcher.sample(start + Duration::from_secs(1));
        assert!(!endpoint(&s.pool, 0).is_stalled());
        assert!(s.reports.try_recv().is_err());
    }
}
