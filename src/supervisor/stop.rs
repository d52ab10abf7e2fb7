//! Shutdown: stopping every worker with grace and waiting for all of them to exit.
//!
//! Invariant: every worker leaves the rotation before it gets SIGTERM, and SIGKILL comes
//! only after the grace ran out.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::table::WorkerState;
use super::{process, Event, Supervisor};
use crate::discovery::Change;

/// After SIGKILL, how long to wait for the kernel to report the exit before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl Supervisor {
    /// Shutdown: every worker leaves the rotation and gets SIGTERM; stragglers get SIGKILL
    /// after the grace. Returns once all have exited.
    pub(super) async fn stop_all(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        self.stopping = true;
        for waiter in self.reload_waiters.drain(..) {
            let _ = waiter.send(Err("shutting down".into()));
        }
        for id in self.workers.keys() {
            let _ = self.changes.send(Change::Leave { id: *id, drained: None });
        }
        for (id, worker) in &mut self.workers {
            worker.cancel.cancel();
            if worker.state != WorkerState::Stopping {
                worker.state = WorkerState::Stopping;
                info!(worker = %id, pid = worker.pid.as_raw(), "worker stopping");
            }
            process::signal(worker.pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + self.settings.grace;
        self.await_exits(events, deadline).await;
        if self.workers.is_empty() {
            return;
        }
        for (id, worker) in &self.workers {
            warn!(worker = %id, pid = worker.pid.as_raw(), "worker did not stop in time, killed");
            process::signal(worker.pid, Signal::SIGKILL);
        }
        self.await_exits(events, Instant::now() + KILL_WAIT).await;
    }

    async fn await_exits(&mut self, events: &mut mpsc::UnboundedReceiver<Event>, deadline: Instant) {
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => self.on_event(event),
                Ok(None) | Err(_) => return,
            }
        }
    }
}
