//! Counters for the admin listener's `/metrics`, kept as plain atomics so the request path
//! pays a few relaxed increments and no lock. Gauges (in flight, queue depth, RSS, age) are
//! read from their owners at scrape time instead of being mirrored here.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most worker slots counted per worker; `--workers` is capped at this.
pub const MAX_SLOTS: usize = 1024;

/// Upper bounds of the latency histogram, in seconds (Prometheus `le`).
const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Why a worker was replaced while healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleReason {
    Requests,
    Memory,
    Age,
    Reload,
}

impl RecycleReason {
    pub const ALL: [RecycleReason; 4] =
        [RecycleReason::Requests, RecycleReason::Memory, RecycleReason::Age, RecycleReason::Reload];

    pub fn as_str(self) -> &'static str {
        match self {
            RecycleReason::Requests => "requests",
            RecycleReason::Memory => "memory",
            RecycleReason::Age => "age",
            RecycleReason::Reload => "reload",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    by_status: Box<[AtomicU64]>,
    by_slot: Box<[AtomicU64]>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    retries: AtomicU64,
    moved: AtomicU64,
    stalls: AtomicU64,
    recycles: [AtomicU64; 4],
    restarts: AtomicU64,
    overdue: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
            by_slot: (0..MAX_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            latency_buckets: Default::default(),
            latency_sum_us: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            recycles: Default::default(),
            restarts: AtomicU64::new(0),
            overdue: AtomicU64::new(0),
        }
    }
}

/// Per-worker gauges read at scrape time.
#[derive(Debug, Clone)]
pub struct WorkerGauge {
    pub slot: usize,
    pub generation: u64,
    pub pid: i32,
    pub state: &'static str,
    pub rss_bytes: u64,
    pub age: Duration,
}

/// Gauges read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub in_flight: usize,
    /// Idle client connections held as their socket alone.
    pub parked: usize,
    /// Upgraded connections open through workers.
    pub tunnels: usize,
    pub queued: usize,
    pub workers_ready: usize,
    /// Log lines dropped because stderr was not being read.
    pub log_lines_dropped: u64,
    pub workers: Vec<WorkerGauge>,
}

impl Metrics {
    /// Counts one answered request: its status, the worker slot (if one answered) and the time
    /// to response headers.
    pub fn request(&self, status: u16, slot: Option<usize>, elapsed: Duration) {
        if let Some(c) = self.by_status.get(status as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = slot.and_then(|s| self.by_slot.get(s)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A request moved off a stalled worker to another.
    pub fn moved(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    /// A worker's heartbeat stopped long enough to take it out of the rotation.
    pub fn stall(&self) {
        self.stalls.fetch_add(1, Ordering::Relaxed);
    }

    pub fn recycle(&self, reason: RecycleReason) {
        self.recycles[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// A worker was sent its whole overshoot before its replacement was ready.
    pub fn recycle_overdue(&self) {
        self.overdue.fetch_add(1, Ordering::Relaxed);
    }

    /// Since start: requests answered, healthy workers recycled, workers restarted after an
    /// unexpected exit.
    pub fn lifetime(&self) -> (u64, u64, u64) {
        let sum = |counters: &[AtomicU64]| counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        (sum(&self.by_status), sum(&self.recycles), self.restarts.load(Ordering::Relaxed))
    }

    /// Seconds to response headers summed over every answered request, and their number.
    pub fn latency_totals(&self) -> (f64, u64) {
        (self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6, self.latency_count.load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);

        out.push_str("# HELP rip_requests_total Requests answered, by HTTP status.\n");
        out.push_str("# TYPE rip_requests_total counter\n");
        for (status, c) in self.by_status.iter().enumerate() {
            let n = load(c);
            if n > 0 {
                let _ = writeln!(out, "rip_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        out.push_str("# HELP rip_worker_requests_total Requests answered by each worker slot.\n");
        out.push_str("# TYPE rip_worker_requests_total counter\n");
        for (slot, c) in self.by_slot.iter().enumerate() {
            let n = load(c);
            if n > 0 {
                let _ = writeln!(out, "rip_worker_requests_total{{slot=\"{slot}\"}} {n}");
            }
        }
        out.push_str("# HELP rip_request_duration_seconds Time from request to response headers.\n");
        out.push_str("# TYPE rip_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, c) in BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += load(c);
            let _ = writeln!(out, "rip_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = load(&self.latency_count);
        let _ = writeln!(out, "rip_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = load(&self.latency_sum_us) as f64 / 1e6;
        let _ = writeln!(out, "rip_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "rip_request_duration_seconds_count {count}");

        counter(&mut out, "rip_retries_total", "Requests retried on another worker.", load(&self.retries));
        counter(
            &mut out,
            "rip_requests_moved_total",
            "Requests moved off a stalled worker before it began to answer them.",
            load(&self.moved),
        );
        counter(
            &mut out,
            "rip_worker_stalls_total",
            "Times a worker's heartbeat stopped and it left the rotation.",
            load(&self.stalls),
        );
        out.push_str("# HELP rip_worker_recycles_total Healthy workers replaced, by reason.\n");
        out.push_str("# TYPE rip_worker_recycles_total counter\n");
        for reason in RecycleReason::ALL {
            let n = load(&self.recycles[reason as usize]);
            let _ = writeln!(out, "rip_worker_recycles_total{{reason=\"{}\"}} {n}", reason.as_str());
        }
        counter(
            &mut out,
            "rip_worker_restarts_total",
            "Workers replaced after exiting unexpectedly.",
            load(&self.restarts),
        );
        counter(
            &mut out,
            "rip_recycles_overdue_total",
            "Workers sent twice their --max-requests before a replacement was ready: recycling fell behind the request rate.",
            load(&self.overdue),
        );
        gauge(
            &mut out,
            "rip_in_flight_requests",
            "Requests being served by workers.",
            gauges.in_flight as u64,
        );
        gauge(
            &mut out,
            "rip_tunnels_open",
            "Upgraded connections (WebSockets) open through workers, apart from requests.",
            gauges.tunnels as u64,
        );
        gauge(&mut out, "rip_queued_requests", "Requests waiting for a free worker.", gauges.queued as u64);
        gauge(
            &mut out,
            "rip_client_connections_parked",
            "Idle keep-alive client connections held without their HTTP buffers until the client sends again.",
            gauges.parked as u64,
        );
        gauge(&mut out, "rip_workers_ready", "Workers in the rotation.", gauges.workers_ready as u64);
        out.push_str(
            "# HELP rip_log_lines_dropped_total Log lines dropped because stderr was not being read.\n",
        );
        out.push_str("# TYPE rip_log_lines_dropped_total counter\n");
        let _ = writeln!(out, "rip_log_lines_dropped_total {}", gauges.log_lines_dropped);
        // Per slot, not per process: a recycle replaces the worker, not the series, so
        // dashboards follow a slot across recycles. While a slot's old worker drains beside
        // its replacement, the replacement (the newer generation) is the one shown; every
        // process, with its pid, is in rip_worker_info.
        let mut current: Vec<&WorkerGauge> = Vec::new();
        for w in &gauges.workers {
            match current.iter_mut().find(|c| c.slot == w.slot) {
                Some(c) if c.generation < w.generation => *c = w,
                Some(_) => {}
                None => current.push(w),
            }
        }
        current.sort_by_key(|w| w.slot);
        out.push_str("# HELP rip_worker_rss_bytes Resident memory of each slot's worker.\n");
        out.push_str("# TYPE rip_worker_rss_bytes gauge\n");
        for w in &current {
            let _ = writeln!(out, "rip_worker_rss_bytes{{slot=\"{}\"}} {}", w.slot, w.rss_bytes);
        }
        out.push_str("# HELP rip_worker_age_seconds Time since each slot's worker started.\n");
        out.push_str("# TYPE rip_worker_age_seconds gauge\n");
        for w in &current {
            let _ = writeln!(out, "rip_worker_age_seconds{{slot=\"{}\"}} {:.3}", w.slot, w.age.as_secs_f64());
        }
        out.push_str("# HELP rip_worker_info Each worker process: its slot, generation, pid and state.\n");
        out.push_str("# TYPE rip_worker_info gauge\n");
        for w in &gauges.workers {
            let _ = writeln!(
                out,
                "rip_worker_info{{slot=\"{}\",generation=\"{}\",pid=\"{}\",state=\"{}\"}} 1",
                w.slot, w.generation, w.pid, w.state
            );
        }
        out
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.request(200, Some(1), Duration::from_micros(300));
        m.request(200, Some(0), Duration::from_millis(30));
        m.request(503, None, Duration::from_secs(20));
        m.recycle(RecycleReason::Memory);
        let text = m.render(&Gauges { in_flight: 2, ..Default::default() });
        assert!(text.contains("rip_requests_total{status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("rip_requests_total{status=\"503\"} 1\n"));
        assert!(text.contains("rip_worker_requests_total{slot=\"1\"} 1\n"));
        assert!(text.contains("rip_request_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("rip_request_duration_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("rip_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("rip_worker_recycles_total{reason=\"memory\"} 1\n"));
        assert!(text.contains("rip_in_flight_requests 2\n"));
    }

    #[test]
    fn per_worker_gauges_follow_the_slot_and_the_pid_is_an_info_label() {
        let worker = |slot, generation, pid, state| WorkerGauge {
            slot,
            generation,
            pid,
            state,
            rss_bytes: 1000 + pid as u64,
            age: Duration::from_secs(1),
        };
        // Slot 0 mid-recycle: the old worker drains beside its replacement.
        let workers =
            vec![worker(0, 4, 10, "draining"), worker(0, 5, 11, "ready"), worker(1, 0, 12, "ready")];
        let text = Metrics::default().render(&Gauges { workers, ..Default::default() });
        assert!(text.contains("rip_worker_rss_bytes{slot=\"0\"} 1011\n"), "{text}");
        assert_eq!(text.matches("rip_worker_rss_bytes{").count(), 2, "one series per slot: {text}");
        assert!(
            text.contains("rip_worker_info{slot=\"0\",generation=\"4\",pid=\"10\",state=\"draining\"} 1\n"),
            "{text}"
        );
        assert_eq!(text.matches("rip_worker_info{").count(), 3, "{text}");
    }
}
