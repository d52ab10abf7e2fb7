//! The supervisor owns the worker processes: it starts them, admits them to the rotation once
//! probed ready, replaces any that exit, recycles them (requests, memory, age, reload) within
//! one surge budget, scales the pool, and stops them all with grace at shutdown.
//!
//! Invariants: a worker leaves the rotation before it is signalled, and is signalled only
//! after its in-flight requests ended (or the grace ran out). A replacement is probed ready
//! before the worker it replaces leaves, and at most `surge` replacements run at once, so
//! capacity never dips below the configured number of workers and memory never doubles.

mod backoff;
mod probe;
mod process;
mod table;

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use process::{describe as describe_status, Spec};
pub use table::{WorkerState, WorkerStatus};

use crate::discovery::{Change, ChangeSender, Report, ReportReceiver, WorkerId};
use crate::metrics::{Metrics, RecycleReason};
use crate::runtime_dir::RuntimeDir;
use table::{Slot, Worker};

/// After SIGKILL, how long to wait for the kernel to report the exit before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// After a worker exits, how long to wait for the rest of its stderr (a grandchild may keep
/// the pipe open; the exit is reported regardless after this).
const STDERR_WAIT: Duration = Duration::from_millis(500);
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
    Reload { settings: Option<(Settings, Spec)>, done: Option<oneshot::Sender<ReloadResult>> },
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
        let _ = self.commands.send(Command::Reload { settings, done: Some(tx) });
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
                _ = checks.tick() => self.check_limits(),
                command = commands.recv() => match command {
                    Some(Command::Reload { settings, done }) => self.reload(settings, done),
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

    fn spawn(&mut self, slot: usize) {
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

    fn on_spawned(&mut self, id: WorkerId, pid: i32) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        worker.pid = Pid::from_raw(pid);
        info!(worker = %id, pid, "worker spawned");
        if worker.state == WorkerState::Stopping {
            // Retired, or shutdown began, while it was being started.
            process::signal(worker.pid, Signal::SIGTERM);
        }
    }

    fn on_spawn_failed(&mut self, id: WorkerId, error: String) {
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

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Spawned { id, pid } => self.on_spawned(id, pid),
            Event::SpawnFailed { id, error } => self.on_spawn_failed(id, error),
            Event::Probed { id, result } => self.on_probed(id, result),
            Event::Exited { id, status } => self.on_exited(id, status),
            Event::Drained { id } => self.terminate(id),
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

    fn on_probed(&mut self, id: WorkerId, result: Result<(), String>) {
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

    fn on_exited(&mut self, id: WorkerId, status: std::io::Result<ExitStatus>) {
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
            Report::Hung(id) => {
                if let Some(worker) = self.workers.get_mut(&id) {
                    if worker.state != WorkerState::Stopping {
                        warn!(worker = %id, pid = worker.pid.as_raw(), "worker hung, killed");
                        worker.killed_as_hung = true;
                        let _ = self.changes.send(Change::Leave { id, drained: None });
                        process::signal(worker.pid, Signal::SIGKILL);
                    }
                }
            }
        }
    }

    fn want_recycle(&mut self, id: WorkerId, reason: RecycleReason) {
        let slot = &mut self.slots[id.slot];
        if slot.current == Some(id) && slot.next.is_none() && slot.recycle_reason.is_none() {
            slot.recycle_reason = Some(reason);
            self.start_replacements();
        }
    }

    /// Memory and age limits, checked every [`CHECK_INTERVAL`].
    fn check_limits(&mut self) {
        if self.stopping || (self.settings.max_memory.is_none() && self.settings.max_age.is_none()) {
            return;
        }
        let mut due = Vec::new();
        for (id, w) in &self.workers {
            if w.state != WorkerState::Ready {
                continue;
            }
            if let Some(limit) = self.settings.max_memory {
                let rss = table::rss_bytes(w.pid);
                if rss > limit {
                    info!(worker = %id, rss, limit, "worker over its memory limit");
                    due.push((*id, RecycleReason::Memory));
                    continue;
                }
            }
            if self.settings.max_age.is_some_and(|max| w.started.elapsed() > max) {
                due.push((*id, RecycleReason::Age));
            }
        }
        for (id, reason) in due {
            self.want_recycle(id, reason);
        }
    }

    fn reload(&mut self, settings: Option<(Settings, Spec)>, done: Option<oneshot::Sender<ReloadResult>>) {
        if self.stopping {
            if let Some(done) = done {
                let _ = done.send(Err("shutting down".into()));
            }
            return;
        }
        if let Some((settings, spec)) = settings {
            let workers = settings.workers;
            self.settings = settings;
            self.spec = spec;
            self.scale(workers);
        }
        self.epoch += 1;
        info!(epoch = self.epoch, workers = self.active_slots(), "reload started");
        self.reload_waiters.extend(done);
        self.start_replacements();
        self.finish_reload_if_done();
    }

    /// A replacement never became ready. For a recycle, the old worker keeps serving and the
    /// replacement is retried with backoff. For a reload, the roll stops: workers not yet
    /// replaced keep serving (an old worker leaves only after its replacement is ready), and
    /// a broken deploy is not retried in a loop.
    fn replacement_failed(&mut self, slot: usize, reason: String) {
        let s = &mut self.slots[slot];
        s.failures += 1;
        if s.recycle_reason != Some(RecycleReason::Reload) {
            self.schedule_respawn(slot);
            return;
        }
        warn!(reason, "reload failed, workers not yet replaced keep serving");
        let epoch = self.epoch;
        for w in self.workers.values_mut() {
            w.epoch = epoch;
        }
        for s in &mut self.slots {
            if s.recycle_reason == Some(RecycleReason::Reload) {
                s.recycle_reason = None;
            }
        }
        for waiter in self.reload_waiters.drain(..) {
            let _ = waiter.send(Err(reason.clone()));
        }
    }

    fn finish_reload_if_done(&mut self) {
        if self.reload_waiters.is_empty() {
            return;
        }
        let done = self.slots.iter().filter(|s| s.active).all(|s| {
            s.next.is_none()
                && s.current
                    .and_then(|id| self.workers.get(&id))
                    .is_some_and(|w| w.epoch >= self.epoch && w.state == WorkerState::Ready)
        });
        if done {
            info!(epoch = self.epoch, "reload finished");
            for waiter in self.reload_waiters.drain(..) {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.active).count()
    }

    /// Grows or shrinks the pool to `n` workers. New slots start at once; removed slots'
    /// workers leave the rotation and drain.
    fn scale(&mut self, n: usize) {
        let n = n.clamp(1, crate::metrics::MAX_SLOTS);
        let before = self.active_slots();
        for slot in 0..n.max(self.slots.len()) {
            if slot >= self.slots.len() {
                self.slots.push(Slot::default());
            }
            let want = slot < n;
            if want == self.slots[slot].active {
                continue;
            }
            self.slots[slot].active = want;
            if want {
                self.slots[slot].failures = 0;
                if self.slots[slot].current.is_none() && !self.slots[slot].respawn_scheduled {
                    self.spawn(slot);
                }
            } else {
                let s = &mut self.slots[slot];
                let leaving: Vec<WorkerId> = s.current.take().into_iter().chain(s.next.take()).collect();
                s.recycle_reason = None;
                for id in leaving {
                    self.retire(id);
                }
            }
        }
        if before != 0 && before != n {
            info!(from = before, to = n, "workers scaled");
        }
        self.settings.workers = n;
        self.publish_ready();
        self.finish_reload_if_done();
    }

    /// Starts replacements for slots that want one, within the surge budget.
    fn start_replacements(&mut self) {
        if self.stopping {
            return;
        }
        for slot in 0..self.slots.len() {
            if self.replacements_in_progress() >= self.settings.surge {
                return;
            }
            let s = &self.slots[slot];
            if !s.active || s.next.is_some() || s.respawn_scheduled {
                continue;
            }
            let Some(current) = s.current.and_then(|id| self.workers.get(&id)) else { continue };
            if current.state != WorkerState::Ready {
                continue;
            }
            let outdated = current.epoch < self.epoch;
            if outdated && self.slots[slot].recycle_reason.is_none() {
                self.slots[slot].recycle_reason = Some(RecycleReason::Reload);
            }
            if outdated || self.slots[slot].recycle_reason.is_some() {
                self.spawn(slot);
            }
        }
    }

    /// Replacements starting, plus replaced workers still draining or exiting: while either
    /// exists, it is one process above the configured number.
    fn replacements_in_progress(&self) -> usize {
        let starting = self.slots.iter().filter(|s| s.next.is_some()).count();
        let leaving = self
            .workers
            .iter()
            .filter(|(id, w)| {
                matches!(w.state, WorkerState::Draining | WorkerState::Stopping) && !self.is_slot_member(**id)
            })
            .count();
        starting + leaving
    }

    fn schedule_respawn(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.respawn_scheduled || !s.active {
            return;
        }
        let delay = backoff::delay(s.failures);
        if delay.is_zero() {
            if s.current.is_none() {
                self.spawn(slot);
            }
            return;
        }
        s.respawn_scheduled = true;
        warn!(slot, failures = s.failures, delay_ms = delay.as_millis() as u64, "worker restart backed off");
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Respawn { slot });
        });
    }

    /// Takes a worker out of the rotation; it is signalled once drained.
    fn retire(&mut self, id: WorkerId) {
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
    fn terminate(&mut self, id: WorkerId) {
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

    /// Shutdown: every worker leaves the rotation and gets SIGTERM; stragglers get SIGKILL
    /// after the grace. Returns once all have exited.
    async fn stop_all(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
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

fn slot_is_active(slots: &[Slot], slot: usize) -> bool {
    slots.get(slot).is_some_and(|s| s.active)
}
