//! Liveness probes, with `--upstream handoff`. Every worker's heartbeat (`proxy::watch`)
//! finds a stuck event loop in either mode; with hand-off the supervisor also asks the worker
//! directly, since its hand-off channel and socket are all the front-end uses of it: every
//! ready worker's socket is probed each second, and one that does not answer within
//! `--timeout` is killed and replaced. The probe is answered by rip in the worker, ahead of the
//! app, so only a worker whose thread is stuck fails it. Invariant: at most one liveness probe
//! per worker is in flight.

use nix::unistd::Pid;
use tracing::warn;

use super::machine::{Action, Machine};
use super::table::WorkerState;
use crate::discovery::WorkerId;

impl Machine {
    /// Asks for a probe of each ready worker that has none in flight.
    pub(super) fn probe_liveness(&mut self) {
        let Some(within) = self.settings.liveness else { return };
        if self.is_stopping() {
            return;
        }
        let mut due = Vec::new();
        for (&id, worker) in &mut self.workers {
            if worker.state == WorkerState::Ready && !worker.liveness_probing {
                worker.liveness_probing = true;
                due.push(id);
            }
        }
        for id in due {
            self.act(Action::ProbeLiveness { id, within });
        }
    }

    pub(super) fn on_alive(&mut self, id: WorkerId, result: Result<(), String>) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        worker.liveness_probing = false;
        let Err(reason) = result else { return };
        let (state, pid) = (worker.state, worker.pid.map(Pid::as_raw));
        if self.is_stopping() || state != WorkerState::Ready {
            return;
        }
        warn!(worker = %id, pid, reason, "worker failed its liveness probe");
        self.kill_hung(id);
    }
}
