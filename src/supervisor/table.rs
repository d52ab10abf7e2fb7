//! The supervisor's records: one per slot in the pool and one per worker process, and the
//! status rows built from them for `rip status`.

use std::time::Duration;

use nix::unistd::Pid;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::process::Tail;
use crate::discovery::WorkerId;
use crate::metrics::RecycleReason;

/// A place in the pool. Slots are never removed, only deactivated, so that worker ids
/// (`slot/generation`) are never reused.
#[derive(Debug, Default)]
pub struct Slot {
    pub active: bool,
    pub next_generation: u64,
    /// Consecutive failures, for backoff.
    pub failures: u32,
    /// The worker serving this slot (or starting to).
    pub current: Option<WorkerId>,
    /// A replacement being started for `current`.
    pub next: Option<WorkerId>,
    /// Why `current` is due for replacement, if it is.
    pub recycle_reason: Option<RecycleReason>,
    pub respawn_scheduled: bool,
    /// How the last worker of this slot ended.
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Ready,
    /// Out of the rotation, waiting for its in-flight requests.
    Draining,
    /// Sent SIGTERM (or SIGKILL).
    Stopping,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Stopping => "stopping",
        }
    }
}

#[derive(Debug)]
pub struct Worker {
    pub pid: Pid,
    pub state: WorkerState,
    pub started: Instant,
    pub ready_at: Option<Instant>,
    pub tail: Tail,
    /// Stops the probe once the worker is gone.
    pub cancel: CancellationToken,
    /// The reload epoch the worker was started in.
    pub epoch: u64,
    pub failed_probe: Option<String>,
    /// Killed by the supervisor because a request on it timed out, or it failed its liveness
    /// probe.
    pub killed_as_hung: bool,
    /// A liveness probe is in flight.
    pub liveness_probing: bool,
}

impl Worker {
    pub fn new(pid: Pid, tail: Tail, cancel: CancellationToken, epoch: u64) -> Worker {
        Worker {
            pid,
            state: WorkerState::Starting,
            started: Instant::now(),
            ready_at: None,
            tail,
            cancel,
            epoch,
            failed_probe: None,
            killed_as_hung: false,
            liveness_probing: false,
        }
    }

    pub fn status(&self, id: WorkerId, slot: &Slot) -> WorkerStatus {
        WorkerStatus {
            id,
            pid: self.pid.as_raw(),
            state: self.state,
            age: self.started.elapsed(),
            rss_bytes: rss_bytes(self.pid),
            last_exit: slot.last_exit.clone(),
        }
    }
}

/// One worker process as `rip status` shows it (the proxy adds its request counts).
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub id: WorkerId,
    pub pid: i32,
    pub state: WorkerState,
    pub age: Duration,
    pub rss_bytes: u64,
    /// How the previous worker of the same slot ended, if one did.
    pub last_exit: Option<String>,
}

/// Resident memory of a process from /proc, 0 if it cannot be read.
pub fn rss_bytes(pid: Pid) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_rss() {
        let rss = rss_bytes(Pid::this());
        assert!(rss > 100 * 1024, "rss {rss}");
        assert_eq!(rss_bytes(Pid::from_raw(i32::MAX)), 0);
    }
}
