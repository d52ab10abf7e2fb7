//! The supervisor's decisions, as data: [`Machine`] holds every slot and worker record, and
//! [`Machine::step`] moves it by one [`Event`] and says what must be done as a list of
//! [`Action`]s — spawn, signal, tell the proxy, arm a timer. Nothing here touches a process,
//! a socket or a clock of its own (time comes in with each event), so every transition is a
//! row in the table tests at the bottom; the executor in `mod.rs` performs the actions.
//!
//! The transitions live by topic in `lifecycle.rs` (spawn, ready, exit, retire), `recycle.rs`
//! (recycles, reloads, scaling, backoff within the surge budget), `liveness.rs` and `stop.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::time::Instant;

use super::table::{Slot, Worker, WorkerState, WorkerStatus};
use super::Settings;
use crate::discovery::WorkerId;
use crate::telemetry::metrics::RecycleReason;

/// Something that happened, as the executor reports it.
#[derive(Debug)]
pub enum Event {
    /// The spawner started the worker's process: forked by the fork server, or executed.
    Spawned {
        id: WorkerId,
        pid: Pid,
        forked: bool,
    },
    SpawnFailed {
        id: WorkerId,
        error: String,
    },
    /// The process exited; `status` as `describe` words it, `stderr` its last lines.
    Exited {
        id: WorkerId,
        status: String,
        stderr: String,
    },
    /// The readiness probe answered, or gave up.
    Probed {
        id: WorkerId,
        result: Result<(), String>,
    },
    /// A retired worker has no request in flight any more (or its grace ran out).
    Drained {
        id: WorkerId,
    },
    /// A liveness probe answered, or failed.
    Alive {
        id: WorkerId,
        result: Result<(), String>,
    },
    /// A backed-off slot may start a worker again.
    RespawnDue {
        slot: usize,
    },
    /// A signalled worker's grace is over.
    KillDue {
        id: WorkerId,
    },
    /// The proxy sent the worker its `--max-requests`.
    Exhausted {
        id: WorkerId,
    },
    /// A request on the worker outlived `--timeout`.
    Hung {
        id: WorkerId,
    },
    /// The periodic check, with the resident memory of each ready worker (read only when a
    /// memory limit is set).
    Tick {
        rss: Vec<(WorkerId, u64)>,
    },
    /// Replace every worker, with new settings if given.
    Reload {
        settings: Option<Settings>,
    },
    Scale {
        workers: usize,
    },
    /// Stop every worker with grace.
    Stop,
    /// The stop's grace (then its wait after SIGKILL) is over.
    StopDue,
}

/// What the executor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start worker `id`'s process and probe it until ready, for at most `within`.
    Spawn {
        id: WorkerId,
        within: Duration,
    },
    /// Signal a worker's process group.
    Signal {
        id: WorkerId,
        pid: Pid,
        signal: Signal,
    },
    /// Tell the worker process itself (SIGUSR1, not its group: an app's own children must not
    /// hear it) that it left the rotation, so that the app starts its drain.
    DrainNotice {
        id: WorkerId,
        pid: Pid,
    },
    /// Stop probing the worker: it is on its way out.
    CancelProbes {
        id: WorkerId,
    },
    /// Tell the proxy to send the worker requests.
    Admit {
        id: WorkerId,
    },
    /// Tell the proxy to send the worker nothing more; with `drain`, report
    /// [`Event::Drained`] once its requests ended or `drain` has passed.
    Leave {
        id: WorkerId,
        drain: Option<Duration>,
    },
    /// Report [`Event::KillDue`] after `after`.
    KillAfter {
        id: WorkerId,
        after: Duration,
    },
    /// Report [`Event::RespawnDue`] after `after`.
    RespawnAfter {
        slot: usize,
        after: Duration,
    },
    /// Probe the ready worker's liveness within `within`; report [`Event::Alive`].
    ProbeLiveness {
        id: WorkerId,
        within: Duration,
    },
    /// Report [`Event::StopDue`] after `after`.
    StopAfter {
        after: Duration,
    },
    /// The worker's record is gone; anything the executor keeps for it can go too.
    Forget {
        id: WorkerId,
    },
    /// Workers in the rotation now.
    PublishReady {
        ready: usize,
    },
    Recycled {
        reason: RecycleReason,
    },
    Restarted,
    /// The rolling reload finished, or failed.
    ReloadFinished {
        result: Result<(), String>,
    },
    /// Every worker has exited (or the wait for them is over): the supervisor is done.
    Stopped,
}

/// After SIGKILL at shutdown, how long to wait for the kernel to report the exits before
/// giving up on them.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Machine {
    pub(super) settings: Settings,
    pub(super) slots: Vec<Slot>,
    pub(super) workers: BTreeMap<WorkerId, Worker>,
    pub(super) stopping: Stopping,
    pub(super) started: Instant,
    pub(super) announced_ready: bool,
    /// Bumped by each reload; a worker from an older epoch is due for replacement.
    pub(super) epoch: u64,
    /// A reload's outcome is awaited.
    pub(super) reloading: bool,
    /// The current event's time.
    pub(super) now: Instant,
    actions: Vec<Action>,
}

/// How far shutdown has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    No,
    /// SIGTERM sent; SIGKILL when the grace is over.
    Graceful,
    /// SIGKILL sent; waiting for the exits.
    Killed,
    Done,
}

impl Machine {
    pub fn new(settings: Settings, now: Instant) -> Machine {
        Machine {
            settings,
            slots: Vec::new(),
            workers: BTreeMap::new(),
            stopping: Stopping::No,
            started: now,
            announced_ready: false,
            epoch: 0,
            reloading: false,
            now,
            actions: Vec::new(),
        }
    }

    /// Starts the configured workers.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        self.now = now;
        self.scale(self.settings.workers);
        std::mem::take(&mut self.actions)
    }

    /// Moves the machine by one event, at `now`; returns what must be done, in order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        self.now = now;
        match event {
            Event::Spawned { id, pid, forked } => self.on_spawned(id, pid, forked),
            Event::SpawnFailed { id, error } => self.on_spawn_failed(id, error),
            Event::Exited { id, status, stderr } => self.on_exited(id, status, stderr),
            Event::Probed { id, result } => self.on_probed(id, result),
            Event::Drained { id } => {
                self.terminate(id);
                // Past its requests, a replaced worker holds no surge slot.
                self.start_replacements();
            }
            Event::Alive { id, result } => self.on_alive(id, result),
            Event::RespawnDue { slot } => self.on_respawn_due(slot),
            Event::KillDue { id } => self.on_kill_due(id),
            Event::Exhausted { id } if !self.is_stopping() => self.want_recycle(id, RecycleReason::Requests),
            Event::Hung { id } if !self.is_stopping() => self.kill_hung(id),
            Event::Exhausted { .. } | Event::Hung { .. } => {}
            Event::Tick { rss } => {
                self.check_limits(&rss);
                self.probe_liveness();
            }
            Event::Reload { settings } => self.reload(settings),
            Event::Scale { workers } => self.scale(workers),
            Event::Stop => self.stop_all(),
            Event::StopDue => self.on_stop_due(),
        }
        std::mem::take(&mut self.actions)
    }

    pub(super) fn act(&mut self, action: Action) {
        self.actions.push(action);
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping != Stopping::No
    }

    /// Signals the worker's process group, once its process exists; one still being started
    /// is signalled when it is (see `on_spawned`).
    pub(super) fn signal(&mut self, id: WorkerId, signal: Signal) {
        if let Some(pid) = self.workers.get(&id).and_then(|w| w.pid) {
            self.act(Action::Signal { id, pid, signal });
        }
    }

    pub(super) fn is_slot_member(&self, id: WorkerId) -> bool {
        let slot = &self.slots[id.slot];
        slot.current == Some(id) || slot.next == Some(id)
    }

    pub(super) fn publish_ready(&mut self) {
        let ready = self.workers.values().filter(|w| w.state == WorkerState::Ready).count();
        self.act(Action::PublishReady { ready });
        if !self.announced_ready && ready >= self.settings.workers {
            self.announced_ready = true;
            let startup_ms = self.now.saturating_duration_since(self.started).as_millis() as u64;
            tracing::info!(workers = ready, startup_ms, "all workers ready");
        }
    }

    /// One row per worker process, without memory figures; sorted by worker id.
    pub fn status(&self, now: Instant) -> Vec<WorkerStatus> {
        self.workers.iter().map(|(id, w)| w.status(*id, &self.slots[id.slot], now)).collect()
    }

    /// Ready workers and their pids, for the executor's memory readings.
    pub fn ready_pids(&self) -> Vec<(WorkerId, Pid)> {
        self.workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Ready)
            .filter_map(|(id, w)| w.pid.map(|pid| (*id, pid)))
            .collect()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
