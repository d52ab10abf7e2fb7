//! The supervisor's records: one per slot in the pool and one per worker process, and the
//! status rows built from them for `rip status`.

use std::time::Duration;

use nix::unistd::Pid;
use serde::Serialize;
use tokio::time::Instant;

use crate::discovery::WorkerId;
use crate::telemetry::metrics::RecycleReason;

/// A place in the pool. Slots are never removed, only deactivated, so that worker ids
/// (`slot/generation`) are never reused.
/// Whether a slot wants a worker, and whether it may start one now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SlotState {
    /// Scaled away: no worker is wanted here.
    #[default]
    Inactive,
    /// Wanted; a worker may be started whenever one is needed.
    Active,
    /// Wanted, but the last start failed: nothing starts here until the backoff is over.
    BackingOff,
}

#[derive(Debug, Default)]
pub struct Slot {
    pub state: SlotState,
    pub next_generation: u64,
    /// Consecutive failures, for backoff.
    pub failures: u32,
    /// The worker serving this slot (or starting to).
    pub current: Option<WorkerId>,
    /// A replacement being started for `current`.
    pub next: Option<WorkerId>,
    /// Why `current` is due for replacement, if it is.
    pub recycle_reason: Option<RecycleReason>,
    /// How the last worker of this slot ended.
    pub last_exit: Option<String>,
}

impl Slot {
    /// The slot is part of the pool (backing off or not).
    pub fn is_active(&self) -> bool {
        self.state != SlotState::Inactive
    }

    pub fn is_backing_off(&self) -> bool {
        self.state == SlotState::BackingOff
    }
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

/// Why the supervisor killed a worker rather than letting it finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// A request on it outlived `--timeout`, or it failed its liveness probe.
    Hung,
    /// It never answered its readiness probe.
    FailedProbe(String),
}

#[derive(Debug)]
pub struct Worker {
    /// Known once the spawner has started the process.
    pub pid: Option<Pid>,
    pub state: WorkerState,
    pub started: Instant,
    pub ready_at: Option<Instant>,
    /// The reload epoch the worker was started in.
    pub epoch: u64,
    pub fault: Option<Fault>,
    /// A liveness probe is in flight.
    pub liveness_probing: bool,
}

impl Worker {
    pub fn new(now: Instant, epoch: u64) -> Worker {
        Worker {
            pid: None,
            state: WorkerState::Starting,
            started: now,
            ready_at: None,
            epoch,
            fault: None,
            liveness_probing: false,
        }
    }

    /// The status row, without the memory figure (which takes a read of /proc).
    pub fn status(&self, id: WorkerId, slot: &Slot, now: Instant) -> WorkerStatus {
        WorkerStatus {
            id,
            pid: self.pid.map_or(0, Pid::as_raw),
            state: self.state,
            age: now.saturating_duration_since(self.started),
            rss_bytes: 0,
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

/// The resident memory of each of `groups` (process group ids), every process in it summed:
/// a command's worker may be a shell, a launcher or a pre-fork master with children of its
/// own, and what it costs is all of them. One pass over /proc for every group.
pub fn group_rss_bytes(groups: &[Pid]) -> std::collections::HashMap<Pid, u64> {
    let mut totals: std::collections::HashMap<Pid, u64> = groups.iter().map(|&g| (g, 0)).collect();
    let Ok(entries) = std::fs::read_dir("/proc") else { return totals };
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The command name may hold spaces and parentheses; the fields after its last ')' do not.
        let Some((_, fields)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let (Some(group), Some(rss)) = (fields.get(2), fields.get(21)) else { continue };
        let (Ok(group), Ok(rss)) = (group.parse::<i32>(), rss.parse::<u64>()) else { continue };
        if let Some(total) = totals.get_mut(&Pid::from_raw(group)) {
            *total += rss * page;
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_whole_process_group() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = Pid::from_raw(child.id() as i32);
        // The shell starts its two children right away; wait until all three are counted.
        let started = std::time::Instant::now();
        let (total, one) = loop {
            let total = group_rss_bytes(&[group])[&group];
            let one = rss_bytes(group);
            if total >= 2 * one && one > 0 || started.elapsed() > Duration::from_secs(5) {
                break (total, one);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        assert!(total >= 2 * one && one > 0, "group {total} B, leader alone {one} B");
    }

    #[test]
    fn reads_our_own_rss() {
        let rss = rss_bytes(Pid::this());
        assert!(rss > 100 * 1024, "rss {rss}");
        assert_eq!(rss_bytes(Pid::from_raw(i32::MAX)), 0);
    }
}
