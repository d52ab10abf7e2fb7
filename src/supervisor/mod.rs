//! The supervisor owns the worker processes: it starts them, admits them to the rotation once
//! probed ready, replaces any that exit, recycles them (requests, memory, age, reload) within
//! one surge budget, scales the pool, and stops them all with grace at shutdown.
//!
//! Invariants: a worker leaves the rotation before it is signalled, and is signalled only
//! after its in-flight requests ended (or the grace ran out). A replacement is probed ready
//! before the worker it replaces leaves, and at most `surge` replacements run at once, so
//! capacity never dips below the configured number of workers and memory never doubles.

mod backoff;
mod lifecycle;
mod liveness;
mod probe;
mod process;
mod recycle;
mod stop;
mod table;

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

pub use process::{describe as describe_status, Spec};
pub use table::{WorkerState, WorkerStatus};

use crate::discovery::{Change, ChangeSender, Report, ReportReceiver, WorkerId};
use crate::metrics::{Metrics, RecycleReason};
use crate::runtime_dir::RuntimeDir;
use table::{Slot, Worker};

/// How often worker memory and age are checked against their limits.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub workers: usize,
    /// How long a worker may take to answer its first probe.
    pub start_timeout: Duration,
    /// How long a leaving worker gets to finish in-flight requests, and then to exit.
    pub grace: Duration,
    /// How many workers may be being replaced at once.
    pub surge: usize,
    /// Recycle a worker whose resident memory exceeds this many bytes.
    pub max_memory: Option<u64>,
    /// Recycle a worker older than this.
    pub max_age: Option<Duration>,
    /// Kill and replace a ready worker that does not answer a health probe within this; see
    /// `liveness`.
    pub liveness: Option<Duration>,
}

/// The outcome of a rolling reload: Ok once every worker was replaced and is ready.
pub type ReloadResult = Result<(), String>;

/// Cheap handle to the supervisor task.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    commands: mpsc::UnboundedSender<Command>,
    ready: watch::Receiver<usize>,
}

#[derive(Debug)]
enum Command {
    Stop(oneshot::Sender<()>),
    // Boxed: by far the largest command, and rare.
    Reload { settings: Option<Box<(Settings, Spec)>>, done: Option<oneshot::Sender<ReloadResult>> },
    Scale(usize),
    Status(oneshot::Sender<Vec<WorkerStatus>>),
}

impl SupervisorHandle {
    /// Stops every worker (SIGTERM, grace, SIGKILL) and waits until all have exited.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Replaces every worker with one started from the executable now on disk (with new
    /// settings, if given). The receiver resolves when all are replaced and ready, or when a
    /// new worker failed to start; the workers not yet replaced then keep serving.
    pub fn begin_reload(&self, settings: Option<(Settings, Spec)>) -> oneshot::Receiver<ReloadResult> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Reload { settings: settings.map(Box::new), done: Some(tx) });
        rx
    }

    /// Changes the number of workers.
    pub fn scale(&self, workers: usize) {
        let _ = self.commands.send(Command::Scale(workers));
    }

    /// One row per worker process.
    pub async fn status(&self) -> Vec<WorkerStatus> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Status(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Workers in the rotation now.
    pub fn ready_count(&self) -> usize {
        *self.ready.borrow()
    }

    /// Waits until at least `n` workers are ready.
    pub async fn wait_ready(&self, n: usize) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|count| *count >= n).await;
    }
}

/// Starts the supervisor task and its workers.
pub fn start(
    settings: Settings,
    spec: Spec,
    dir: Arc<RuntimeDir>,
    metrics: Arc<Metrics>,
    changes: ChangeSender,
    reports: ReportReceiver,
) -> std::io::Result<(SupervisorHandle, tokio::task::JoinHandle<()>)> {
    let spawner = process::Spawner::start()?;
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (ready_tx, ready) = watch::channel(0);
    let supervisor = Supervisor {
        spawner,
        slots: Vec::new(),
        settings,
        spec,
        dir,
        metrics,
        changes,
        events_tx,
        ready_tx,
        workers: HashMap::new(),
        stopping: false,
        started: Instant::now(),
        announced_ready: false,
        epoch: 0,
        reload_waiters: Vec::new(),
    };
    let task = tokio::spawn(supervisor.run(commands, events, reports));
    Ok((SupervisorHandle { commands: commands_tx, ready }, task))
}

/// Things that happened to workers, reported by the tasks watching them.
#[derive(Debug)]
enum Event {
    Spawned { id: WorkerId, pid: i32 },
    SpawnFailed { id: WorkerId, error: String },
    Exited { id: WorkerId, status: std::io::Result<ExitStatus> },
    Probed { id: WorkerId, result: Result<(), String> },
    Drained { id: WorkerId },
    Alive { id: WorkerId, result: Result<(), String> },
    Respawn { slot: usize },
    KillTimer { id: WorkerId },
}

struct Supervisor {
    settings: Settings,
    spec: Spec,
    spawner: process::Spawner,
    dir: Arc<RuntimeDir>,
    metrics: Arc<Metrics>,
    changes: ChangeSender,
    events_tx: mpsc::UnboundedSender<Event>,
    ready_tx: watch::Sender<usize>,
    slots: Vec<Slot>,
    workers: HashMap<WorkerId, Worker>,
    stopping: bool,
    started: Instant,
    announced_ready: bool,
    /// Bumped by each reload; a worker from an older epoch is due for replacement.
    epoch: u64,
    reload_waiters: Vec<oneshot::Sender<ReloadResult>>,
}

impl Supervisor {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut reports: ReportReceiver,
    ) {
        self.scale(self.settings.workers);
        let mut checks = tokio::time::interval(CHECK_INTERVAL);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(event) = events.recv() => self.on_event(event),
                Some(report) = reports.recv() => self.on_report(report),
                _ = checks.tick() => {
                    self.check_limits();
                    self.probe_liveness();
                }
                command = commands.recv() => match command {
                    Some(Command::Reload { settings, done }) => self.reload(settings.map(|s| *s), done),
                    Some(Command::Scale(n)) => self.scale(n),
                    Some(Command::Status(reply)) => {
                        let _ = reply.send(self.status());
                    }
                    Some(Command::Stop(done)) => {
                        self.stop_all(&mut events).await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.stop_all(&mut events).await;
                        return;
                    }
                },
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Spawned { id, pid } => self.on_spawned(id, pid),
            Event::SpawnFailed { id, error } => self.on_spawn_failed(id, error),
            Event::Probed { id, result } => self.on_probed(id, result),
            Event::Exited { id, status } => self.on_exited(id, status),
            Event::Drained { id } => self.terminate(id),
            Event::Alive { id, result } => self.on_alive(id, result),
            Event::Respawn { slot } => {
                self.slots[slot].respawn_scheduled = false;
                if self.stopping || !self.slots[slot].active {
                    return;
                }
                if self.slots[slot].current.is_none() {
                    self.spawn(slot);
                } else {
                    self.start_replacements();
                }
            }
            Event::KillTimer { id } => {
                if let Some(w) = self.workers.get(&id) {
                    warn!(worker = %id, pid = w.pid.as_raw(), "worker did not exit in time, killed");
                    process::signal(w.pid, Signal::SIGKILL);
                }
            }
        }
    }

    fn is_slot_member(&self, id: WorkerId) -> bool {
        let slot = &self.slots[id.slot];
        slot.current == Some(id) || slot.next == Some(id)
    }

    fn on_report(&mut self, report: Report) {
        if self.stopping {
            return;
        }
        match report {
            Report::Exhausted(id) => self.want_recycle(id, RecycleReason::Requests),
            Report::Hung(id) => self.kill_hung(id),
        }
    }

    /// Takes a worker that stopped answering out of the rotation and kills it; its exit is
    /// then handled like a crash, and the slot refilled at once.
    fn kill_hung(&mut self, id: WorkerId) {
        if let Some(worker) = self.workers.get_mut(&id) {
            if worker.state != WorkerState::Stopping {
                warn!(worker = %id, pid = worker.pid.as_raw(), "worker hung, killed");
                worker.killed_as_hung = true;
                let _ = self.changes.send(Change::Leave { id, drained: None });
                process::signal(worker.pid, Signal::SIGKILL);
            }
        }
    }

    fn publish_ready(&mut self) {
        let ready = self.workers.values().filter(|w| w.state == WorkerState::Ready).count();
        self.ready_tx.send_replace(ready);
        if !self.announced_ready && ready >= self.settings.workers {
            self.announced_ready = true;
            info!(
                workers = ready,
                startup_ms = self.started.elapsed().as_millis() as u64,
                "all workers ready"
            );
        }
    }

    fn status(&self) -> Vec<WorkerStatus> {
        let mut rows: Vec<WorkerStatus> =
            self.workers.iter().map(|(id, w)| w.status(*id, &self.slots[id.slot])).collect();
        rows.sort_by_key(|r| r.id);
        rows
    }
}
