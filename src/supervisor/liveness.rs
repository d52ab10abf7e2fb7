//! Liveness, with `--upstream handoff`. In the default mode a hung worker is found by the
//! front-end, when a request on it outlives `--timeout`; with hand-off no request passes the
//! front-end, so the supervisor asks instead: every ready worker's socket is probed each
//! second, and one that does not answer within `--timeout` is killed and replaced. The probe
//! is answered by rip in the worker, ahead of the app, so only a worker whose thread is stuck
//! fails it. Invariant: at most one liveness probe per worker is in flight.

use tracing::warn;

use super::table::WorkerState;
use super::{probe, Event, Supervisor};
use crate::discovery::WorkerId;

impl Supervisor {
    /// Starts a probe of each ready worker that has none in flight.
    pub(super) fn probe_liveness(&mut self) {
        let Some(within) = self.settings.liveness else { return };
        if self.stopping {
            return;
        }
        for (&id, worker) in &mut self.workers {
            if worker.state != WorkerState::Ready || worker.liveness_probing {
                continue;
            }
            let Ok(socket) = self.dir.socket_path(id.slot, id.generation) else { continue };
            worker.liveness_probing = true;
            let (events, cancel) = (self.events_tx.clone(), worker.cancel.clone());
            tokio::spawn(async move {
                let result = tokio::select! {
                    result = probe::check_within(&socket, within) => result,
                    // The worker is gone; its exit is handled on its own.
                    () = cancel.cancelled() => return,
                };
                let _ = events.send(Event::Alive { id, result });
            });
        }
    }

    pub(super) fn on_alive(&mut self, id: WorkerId, result: Result<(), String>) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        worker.liveness_probing = false;
        let Err(reason) = result else { return };
        if self.stopping || worker.state != WorkerState::Ready {
            return;
        }
        warn!(worker = %id, pid = worker.pid.as_raw(), reason, "worker failed its liveness probe");
        self.kill_hung(id);
    }
}
