//! Worker lifecycle: starting a worker process, admitting it to the rotation once probed
//! ready, accounting for its exit, and taking it out (retire, then terminate).
//!
//! Invariant: a worker leaves the rotation before it is signalled, and is signalled only
//! after its in-flight requests ended (or the grace ran out).

use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::table::{Slot, Worker, WorkerState};
use super::{backoff, probe, process, Event, Supervisor};
use crate::discovery::{Change, WorkerId};
use crate::metrics::RecycleReason;

/// After a worker exits, how long to wait for the rest of its stderr (a grandchild may keep
/// the pipe open; the exit is reported regardless after this).
const STDERR_WAIT: Duration = Duration::from_millis(500);

impl Supervisor {
    pub(super) fn spawn(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        let id = WorkerId { slot, generation: s.next_generation };
        s.next_generation += 1;
        let socket = match self.dir.socket_path(slot, id.generation) {
            Ok(path) => path,
            Err(e) => {
                error!(worker = %id, error = %e, "worker not started");
                return;
            }
        };
        let _ = std::fs::remove_file(&socket);
        let cmd = process::command(&self.spec, id, &socket);
        let s = &mut self.slots[slot];
        if s.current.is_none() {
            s.current = Some(id);
        } else {
            s.next = Some(id);
        }
        let tail = process::Tail::default();
        let cancel = CancellationToken::new();
        // The pid is known once the spawner thread has started the process (Event::Spawned).
        self.workers.insert(id, Worker::new(Pid::from_raw(0), tail.clone(), cancel.clone(), self.epoch));

        let spawner = self.spawner.clone();
        let events = self.events_tx.clone();
        let within = self.settings.start_timeout;
        tokio::spawn(async move {
            let mut child = match spawner.spawn(cmd).await {
                Ok(child) => child,
                Err(e) => {
                    let _ = events.send(Event::SpawnFailed { id, error: e.to_string() });
                    return;
                }
            };
            let pid = child.id().map_or(0, |p| p as i32);
            let _ = events.send(Event::Spawned { id, pid });
            let stderr_copier = process::copy_stderr(&mut child, tail);
            tokio::spawn({
                let events = events.clone();
                async move {
                    let result = probe::wait_ready(&socket, within, &cancel).await;
                    if !cancel.is_cancelled() {
                        let _ = events.send(Event::Probed { id, result });
                    }
                }
            });
            let status = child.wait().await;
            // The last lines a dying worker wrote explain its death; let them be read first.
            if let Some(copier) = stderr_copier {
                let _ = tokio::time::timeout(STDERR_WAIT, copier).await;
            }
            let _ = events.send(Event::Exited { id, status });
        });
    }

    pub(super) fn on_spawned(&mut self, id: WorkerId, pid: i32) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        worker.pid = Pid::from_raw(pid);
        info!(worker = %id, pid, "worker spawned");
        if worker.state == WorkerState::Stopping {
            // Retired, or shutdown began, while it was being started.
            process::signal(worker.pid, Signal::SIGTERM);
        }
    }

    pub(super) fn on_spawn_failed(&mut self, id: WorkerId, error: String) {
        let Some(worker) = self.workers.remove(&id) else { return };
        worker.cancel.cancel();
        error!(worker = %id, exe = %self.spec.exe.display(), error, "worker failed to start");
        let slot = id.slot;
        let s = &mut self.slots[slot];
        s.last_exit = Some(format!("failed to start: {error}"));
        if s.next == Some(id) {
            s.next = None;
            self.replacement_failed(slot, format!("new worker {id} failed to start: {error}"));
        } else if s.current == Some(id) {
            s.current = None;
            s.failures += 1;
            if !self.stopping {
                self.schedule_respawn(slot);
            }
        }
        self.publish_ready();
    }

    pub(super) fn on_probed(&mut self, id: WorkerId, result: Result<(), String>) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if worker.state != WorkerState::Starting {
            return;
        }
        if let Err(reason) = result {
            warn!(worker = %id, pid = worker.pid.as_raw(), reason, "worker failed its health probe, killed");
            process::signal(worker.pid, Signal::SIGKILL);
            worker.state = WorkerState::Stopping;
            worker.failed_probe = Some(reason);
            return;
        }
        worker.state = WorkerState::Ready;
        worker.ready_at = Some(Instant::now());
        let startup_ms = worker.started.elapsed().as_millis() as u64;
        info!(worker = %id, pid = worker.pid.as_raw(), startup_ms, "worker ready");
        let socket = self.dir.socket_path(id.slot, id.generation).expect("checked at spawn");
        let _ = self.changes.send(Change::Ready { id, socket });

        let slot = &mut self.slots[id.slot];
        if slot.next == Some(id) {
            let old = slot.current.replace(id);
            slot.next = None;
            let reason = slot.recycle_reason.take().unwrap_or(RecycleReason::Reload);
            if let Some(old) = old {
                info!(worker = %old, replacement = %id, reason = reason.as_str(), "worker recycled");
                self.metrics.recycle(reason);
                self.retire(old);
            }
        }
        if !slot_is_active(&self.slots, id.slot) {
            // Scaled down while it was starting.
            self.retire(id);
        }
        self.start_replacements();
        self.publish_ready();
        self.finish_reload_if_done();
    }

    pub(super) fn on_exited(&mut self, id: WorkerId, status: std::io::Result<ExitStatus>) {
        let Some(worker) = self.workers.remove(&id) else { return };
        worker.cancel.cancel();
        if let Ok(socket) = self.dir.socket_path(id.slot, id.generation) {
            let _ = std::fs::remove_file(socket);
        }
        let status = match status {
            Ok(s) => process::describe(s),
            Err(e) => format!("unknown ({e})"),
        };
        let pid = worker.pid.as_raw();
        let uptime_ms = worker.started.elapsed().as_millis() as u64;
        let member = self.is_slot_member(id);
        let expected = worker.state == WorkerState::Stopping && !member;
        let stderr = worker.tail.joined();
        if expected || self.stopping {
            info!(worker = %id, pid, status, uptime_ms, "worker exited");
        } else if worker.killed_as_hung {
            warn!(worker = %id, pid, status, uptime_ms, "worker exited after hanging");
        } else {
            let _ = self.changes.send(Change::Leave { id, drained: None });
            warn!(worker = %id, pid, status, uptime_ms, stderr, "worker exited unexpectedly");
        }
        let reason = match &worker.failed_probe {
            Some(probe) => format!("{status} after failing its health probe ({probe})"),
            None => status.clone(),
        };
        self.slots[id.slot].last_exit = Some(reason.clone());
        self.publish_ready();
        if self.stopping {
            return;
        }

        // A hung worker was killed for one request; its replacement is needed at once, and
        // one slow request says nothing about whether the app can start.
        let healthy =
            worker.killed_as_hung || worker.ready_at.is_some_and(|t| t.elapsed() >= backoff::HEALTHY_UPTIME);
        let slot = &mut self.slots[id.slot];
        if slot.current == Some(id) {
            slot.current = slot.next.take();
            slot.failures = if healthy { 0 } else { slot.failures + 1 };
            if !expected {
                self.metrics.restart();
            }
            if slot.current.is_none() && slot.active {
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
        let (tx, rx) = oneshot::channel();
        let _ = self.changes.send(Change::Leave { id, drained: Some(tx) });
        let events = self.events_tx.clone();
        let grace = self.settings.grace;
        tokio::spawn(async move {
            // Past the grace the worker is stopped anyway; its own drain gets the same grace.
            let _ = tokio::time::timeout(grace, rx).await;
            let _ = events.send(Event::Drained { id });
        });
    }

    /// SIGTERM now, SIGKILL if still there after the grace.
    pub(super) fn terminate(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if worker.state == WorkerState::Stopping {
            return;
        }
        worker.state = WorkerState::Stopping;
        worker.cancel.cancel();
        process::signal(worker.pid, Signal::SIGTERM);
        let events = self.events_tx.clone();
        let grace = self.settings.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = events.send(Event::KillTimer { id });
        });
    }
}

fn slot_is_active(slots: &[Slot], slot: usize) -> bool {
    slots.get(slot).is_some_and(|s| s.active)
}
