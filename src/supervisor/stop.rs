//! Shutdown transitions: every worker leaves the rotation and gets SIGTERM; those still there
//! when the grace is over get SIGKILL; the supervisor is done once all have exited, or when
//! the kernel has not reported the last exits [`KILL_WAIT`] after the SIGKILL.
//!
//! Invariant: every worker leaves the rotation before it gets SIGTERM, and SIGKILL comes
//! only after the grace ran out.

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{info, warn};

use super::machine::{Action, Machine, Stopping, KILL_WAIT};
use super::table::WorkerState;
use crate::discovery::WorkerId;

impl Machine {
    pub(super) fn stop_all(&mut self) {
        if self.is_stopping() {
            return;
        }
        self.stopping = Stopping::Graceful;
        if std::mem::take(&mut self.reloading) {
            self.act(Action::ReloadFinished { result: Err("shutting down".into()) });
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for &id in &ids {
            self.act(Action::Leave { id, drain: None });
        }
        for &id in &ids {
            self.act(Action::CancelProbes { id });
            let worker = self.workers.get_mut(&id).expect("listed above");
            if worker.state != WorkerState::Stopping {
                worker.state = WorkerState::Stopping;
                info!(worker = %id, pid = worker.pid.map(Pid::as_raw), "worker stopping");
            }
            self.signal(id, Signal::SIGTERM);
        }
        self.act(Action::StopAfter { after: self.settings.grace });
        self.finish_stop_if_done();
    }

    pub(super) fn on_stop_due(&mut self) {
        match self.stopping {
            Stopping::Graceful => {
                self.stopping = Stopping::Killed;
                let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
                for id in ids {
                    let pid = self.workers[&id].pid.map(Pid::as_raw);
                    warn!(worker = %id, pid, "worker did not stop in time, killed");
                    self.signal(id, Signal::SIGKILL);
                }
                self.act(Action::StopAfter { after: KILL_WAIT });
            }
            Stopping::Killed => self.finish_stop(),
            Stopping::No | Stopping::Done => {}
        }
    }

    pub(super) fn finish_stop_if_done(&mut self) {
        if matches!(self.stopping, Stopping::Graceful | Stopping::Killed) && self.workers.is_empty() {
            self.finish_stop();
        }
    }

    fn finish_stop(&mut self) {
        self.stopping = Stopping::Done;
        self.act(Action::Stopped);
    }
}
