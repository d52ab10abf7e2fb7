//! Worker lifecycle transitions: starting a worker, admitting it to the rotation once probed
//! ready, accounting for its exit, and taking it out (retire, then terminate).
//!
//! Invariant: a worker leaves the rotation before it is signalled, and is signalled only
//! after its in-flight requests ended (or the grace ran out).

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::machine::{Action, Machine};
use super::table::{Fault, Slot, Worker, WorkerState};
use crate::discovery::WorkerId;
use crate::telemetry::metrics::RecycleReason;

impl Machine {
    pub(super) fn spawn(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        let id = WorkerId { slot, generation: s.next_generation };
        s.next_generation += 1;
        if s.current.is_none() {
            s.current = Some(id);
        } else {
            s.next = Some(id);
        }
        self.workers.insert(id, Worker::new(self.now, self.epoch));
        self.act(Action::Spawn { id, within: self.settings.start_timeout });
    }

    pub(super) fn on_spawned(&mut self, id: WorkerId, pid: Pid, forked: bool) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        worker.pid = Some(pid);
        let how = if forked { "forked" } else { "executed" };
        info!(worker = %id, pid = pid.as_raw(), how, "worker spawned");
        if worker.state == WorkerState::Stopping {
            // Retired, or shutdown began, while it was being started.
            self.act(Action::Signal { id, pid, signal: Signal::SIGTERM });
        }
    }

    pub(super) fn on_spawn_failed(&mut self, id: WorkerId, error: String) {
        if self.workers.remove(&id).is_none() {
            return;
        }
        self.act(Action::Forget { id });
        error!(worker = %id, error, "worker failed to start");
        let slot = id.slot;
        let s = &mut self.slots[slot];
        s.last_exit = Some(format!("failed to start: {error}"));
        if s.next == Some(id) {
            s.next = None;
            self.replacement_failed(slot, format!("new worker {id} failed to start: {error}"));
        } else if s.current == Some(id) {
            s.current = None;
            s.failures += 1;
            if !self.is_stopping() {
                self.schedule_respawn(slot);
            }
        }
        self.publish_ready();
        self.finish_stop_if_done();
    }

    pub(super) fn on_probed(&mut self, id: WorkerId, result: Result<(), String>) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if worker.state != WorkerState::Starting {
            return;
        }
        if let Err(reason) = result {
            warn!(worker = %id, pid = worker.pid.map(Pid::as_raw), reason, "worker failed its health probe, killed");
            worker.state = WorkerState::Stopping;
            worker.fault = Some(Fault::FailedProbe(reason));
            self.signal(id, Signal::SIGKILL);
            return;
        }
        worker.state = WorkerState::Ready;
        worker.ready_at = Some(self.now);
        let startup_ms = self.now.saturating_duration_since(worker.started).as_millis() as u64;
        info!(worker = %id, pid = worker.pid.map(Pid::as_raw), startup_ms, "worker ready");
        self.act(Action::Admit { id });

        let slot = &mut self.slots[id.slot];
        if slot.next == Some(id) {
            let old = slot.current.replace(id);
            slot.next = None;
            let reason = slot.recycle_reason.take().unwrap_or(RecycleReason::Reload);
            if let Some(old) = old {
                info!(worker = %old, replacement = %id, reason = reason.as_str(), "worker recycled");
                self.act(Action::Recycled { reason });
                self.retire(old);
            }
        }
        if !self.slots.get(id.slot).is_some_and(Slot::is_active) {
            // Scaled down while it was starting.
            self.retire(id);
        }
        self.start_replacements();
        self.publish_ready();
        self.finish_reload_if_done();
    }

    pub(super) fn on_exited(&mut self, id: WorkerId, status: String, stderr: String) {
        let Some(worker) = self.workers.remove(&id) else { return };
        self.act(Action::Forget { id });
        let pid = worker.pid.map(Pid::as_raw);
        let uptime_ms = self.now.saturating_duration_since(worker.started).as_millis() as u64;
        let member = self.is_slot_member(id);
        let expected = worker.state == WorkerState::Stopping && !member;
        let hung = worker.fault == Some(Fault::Hung);
        if expected || self.is_stopping() {
            info!(worker = %id, pid, status, uptime_ms, "worker exited");
        } else if hung {
            warn!(worker = %id, pid, status, uptime_ms, "worker exited after hanging");
        } else {
            self.act(Action::Leave { id, drain: None });
            warn!(worker = %id, pid, status, uptime_ms, stderr, "worker exited unexpectedly");
        }
        let reason = match &worker.fault {
            Some(Fault::FailedProbe(probe)) => format!("{status} after failing its health probe ({probe})"),
            _ => status.clone(),
        };
        self.slots[id.slot].last_exit = Some(reason.clone());
        self.publish_ready();
        if self.is_stopping() {
            self.finish_stop_if_done();
            return;
        }

        // Only a start that failed counts toward backoff. A worker that became ready showed
        // that the binary starts: however soon it died after (the OOM killer, an operator, a
        // crash on some request), its replacement is needed at once. A hung worker was killed
        // for one request, which says nothing about whether the app can start either.
        let healthy = hung || worker.ready_at.is_some();
        let slot = &mut self.slots[id.slot];
        if slot.current == Some(id) {
            slot.current = slot.next.take();
            // Whatever the old worker was due for, its successor is not.
            slot.recycle_reason = None;
            slot.failures = if healthy { 0 } else { slot.failures + 1 };
            if !expected {
                self.act(Action::Restarted);
            }
            let slot = &self.slots[id.slot];
            if slot.current.is_none() && slot.is_active() {
                self.schedule_respawn(id.slot);
            }
        } else if slot.next == Some(id) {
            slot.next = None;
            let detail = if stderr.is_empty() { String::new() } else { format!("; stderr: {stderr}") };
            self.replacement_failed(
                id.slot,
                format!("new worker {id} exited before ready: {reason}{detail}"),
            );
        }
        self.start_replacements();
        self.finish_reload_if_done();
    }

    /// Takes a worker out of the rotation; it is signalled once drained.
    pub(super) fn retire(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if worker.state == WorkerState::Starting {
            self.terminate(id);
            return;
        }
        worker.state = WorkerState::Draining;
        // Past the grace the worker is stopped anyway; its own drain gets the same grace.
        self.act(Action::Leave { id, drain: Some(self.settings.grace) });
        // Then the drain notice: the app closes its long-lived connections (WebSockets) while
        // requests in flight finish. The drain waits for the requests only; the tunnels are
        // the app's to close, within the worker's own grace after SIGTERM.
        if let Some(pid) = self.workers.get(&id).and_then(|w| w.pid) {
            self.act(Action::DrainNotice { id, pid });
        }
    }

    /// SIGTERM now, SIGKILL if still there after the grace.
    pub(super) fn terminate(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if worker.state == WorkerState::Stopping {
            return;
        }
        worker.state = WorkerState::Stopping;
        self.act(Action::CancelProbes { id });
        self.signal(id, Signal::SIGTERM);
        self.act(Action::KillAfter { id, after: self.settings.grace });
    }

    pub(super) fn on_kill_due(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get(&id) {
            warn!(worker = %id, pid = w.pid.map(Pid::as_raw), "worker did not exit in time, killed");
            self.signal(id, Signal::SIGKILL);
        }
    }

    /// Takes a worker that stopped answering out of the rotation and kills it; its exit is
    /// then handled like a crash, and the slot refilled at once.
    pub(super) fn kill_hung(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if worker.state == WorkerState::Stopping {
            return;
        }
        warn!(worker = %id, pid = worker.pid.map(Pid::as_raw), "worker hung, killed");
        worker.fault = Some(Fault::Hung);
        self.act(Action::Leave { id, drain: None });
        self.signal(id, Signal::SIGKILL);
    }
}
