//! The heartbeat watcher: every [`WATCH_EVERY`] it samples the heartbeat page
//! (`crate::heartbeat`) of each worker it watches (one with requests in flight, a stalled
//! one, any with `--upstream handoff`: `Endpoint::is_watched`) and moves it between three
//! states:
//!
//! - turning: its beat count changed since the last sample; in the rotation;
//! - stalled: no beat for [`STALL_AFTER`]; out of the rotation, and the requests waiting on
//!   it that can move are woken to move (`deadline.rs`). Back in at its next beat;
//! - hung: no beat for `--timeout`; reported once for the supervisor to kill and replace,
//!   and the requests still on it are answered 504.
//!
//! Silence is measured between samples that saw the count change, so a watcher that runs
//! late (a busy front-end) sees a worker that kept beating as turning, never as silent; and
//! from the first sample that found a worker watched, so a worker is judged only on time in
//! which it had a request to beat for (an idle worker rests its beat: `worker::pulse`).
//! When no worker has been watched for [`REST_AFTER`], the watcher itself sleeps until a
//! request is in flight again: an idle rip wakes for neither. Workers that left the rotation
//! are watched until their last request ends: a worker that hangs while draining costs its
//! requests no more than one in the rotation would.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use super::{Endpoint, LiveSettings, Pool};
use crate::discovery::{Report, ReportSender, WorkerId};
use crate::heartbeat::{STALL_AFTER, WATCH_EVERY};
use crate::telemetry::metrics::Metrics;
use crate::worker::pulse::{RESTING_BEAT_EVERY, REST_AFTER};

/// What the watcher last saw of one worker.
struct Seen {
    endpoint: Arc<Endpoint>,
    beats: u64,
    /// When a sample last found the count changed, or first found the worker watched.
    changed: Instant,
    watched: bool,
}

/// Silence after which a stalled worker with nothing in flight counts as hung, at the
/// least: such a worker beats only at its resting pace when it comes back, and one that does
/// should not be killed for the pace.
const IDLE_HUNG_AT_LEAST: Duration = RESTING_BEAT_EVERY.saturating_mul(4);

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

    /// Samples for as long as rip runs, resting while nothing is watched.
    pub async fn run(mut self) {
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let rest_after = (REST_AFTER.as_millis() / WATCH_EVERY.as_millis()).max(1) as u32;
        let mut unwatched = 0;
        loop {
            every.tick().await;
            if self.sample(Instant::now()) {
                unwatched = 0;
                continue;
            }
            unwatched += 1;
            if unwatched >= rest_after {
                let pool = self.pool.clone();
                pool.capacity().rest_watcher(|| !pool.snapshot().iter().any(|e| e.is_watched())).await;
                unwatched = 0;
                every.reset_immediately();
            }
        }
    }

    /// One round over every worker; whether any was watched.
    pub fn sample(&mut self, now: Instant) -> bool {
        for endpoint in self.pool.snapshot().iter() {
            if endpoint.heartbeat().is_none() {
                continue;
            }
            self.seen.entry(endpoint.id).or_insert_with(|| Seen {
                endpoint: endpoint.clone(),
                beats: endpoint.heartbeat().map_or(0, |h| h.beats()),
                changed: now,
                watched: false,
            });
        }
        self.seen.retain(|_, seen| !(seen.endpoint.is_leaving() && seen.endpoint.in_flight() == 0));
        let timeout = self.settings.load().timeout;
        let mut any = false;
        for seen in self.seen.values_mut() {
            let Some(heartbeat) = seen.endpoint.heartbeat() else { continue };
            let e = &seen.endpoint;
            let beats = heartbeat.beats();
            let watched = e.is_watched();
            any |= watched;
            if !std::mem::replace(&mut seen.watched, watched) || !watched {
                // Silence counts from here: before, the worker had nothing to beat for.
                seen.beats = beats;
                seen.changed = now;
                continue;
            }
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
            let hung_after = if e.in_flight() == 0 { timeout.max(IDLE_HUNG_AT_LEAST) } else { timeout };
            if silent >= hung_after && e.mark_hung() {
                warn!(
                    worker = %e.id,
                    silent_ms = silent.as_millis() as u64,
                    "worker silent for --timeout: killed and replaced"
                );
                let _ = self.reports.send(Report::Hung(e.id));
            }
        }
        any
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
        let _requests = [endpoint(&s.pool, 0).lease(), endpoint(&s.pool, 1).lease()];
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
        let _request = endpoint(&s.pool, 0).lease();
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
        let _request = endpoint(&s.pool, 0).lease();
        let start = Instant::now();
        s.watcher.sample(start);
        s.beats[0].beat();
        // The front-end was busy for a second; the worker beat meanwhile.
        s.watcher.sample(start + Duration::from_secs(1));
        assert!(!endpoint(&s.pool, 0).is_stalled());
        assert!(s.reports.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_is_not_judged_and_its_silence_counts_from_its_first_request() {
        let mut s = setup(1, Duration::from_secs(1));
        let start = Instant::now();
        let mut at = Duration::ZERO;
        while at <= Duration::from_secs(2) {
            assert!(!s.watcher.sample(start + at), "nothing watched");
            at += WATCH_EVERY;
        }
        assert!(!endpoint(&s.pool, 0).is_stalled(), "two silent seconds at rest are no stall");
        assert!(s.reports.try_recv().is_err());

        let _request = endpoint(&s.pool, 0).lease();
        let busy = start + at;
        assert!(s.watcher.sample(busy));
        s.watcher.sample(busy + STALL_AFTER - WATCH_EVERY);
        assert!(!endpoint(&s.pool, 0).is_stalled(), "silence counts from the first request");
        s.watcher.sample(busy + STALL_AFTER);
        assert!(endpoint(&s.pool, 0).is_stalled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_worker_whose_requests_moved_is_watched_until_it_beats_or_hangs() {
        let mut s = setup(2, Duration::from_millis(300));
        let start = Instant::now();
        for slot in 0..2 {
            let request = endpoint(&s.pool, slot).lease();
            s.watcher.sample(start);
            s.watcher.sample(start + Duration::from_millis(150));
            assert!(endpoint(&s.pool, slot).is_stalled());
            drop(request);
        }
        // Worker 0 comes back at its resting pace; worker 1 never does.
        s.watcher.sample(start + Duration::from_millis(400));
        assert!(s.reports.try_recv().is_err(), "past --timeout, but idle ones get their resting beat's time");
        s.beats[0].beat();
        s.watcher.sample(start + Duration::from_millis(450));
        assert!(!endpoint(&s.pool, 0).is_stalled(), "back in the rotation");
        s.watcher.sample(start + IDLE_HUNG_AT_LEAST + Duration::from_millis(150));
        assert_eq!(s.reports.try_recv().unwrap(), Report::Hung(id(1)));
        assert!(s.reports.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_rests_while_nothing_is_in_flight_and_a_request_wakes_it() {
        let s = setup(1, Duration::from_secs(30));
        let capacity = s.pool.capacity();
        tokio::spawn(s.watcher.run());
        tokio::time::sleep(REST_AFTER * 3).await;
        assert!(capacity.watcher_rests(), "resting after {REST_AFTER:?} with nothing in flight");

        let e = endpoint(&s.pool, 0);
        let (_request, _) = e.claim(0, 0).unwrap();
        tokio::time::sleep(STALL_AFTER / 2).await;
        assert!(!capacity.watcher_rests() && !e.is_stalled());
        tokio::time::sleep(STALL_AFTER).await;
        assert!(e.is_stalled(), "woken by the request, the watcher judged the silent worker");
    }
}
