//! The supervisor owns the worker processes: it starts them, admits them to the rotation once
//! probed ready, replaces any that exit, recycles those the proxy reports exhausted or hung,
//! and stops them all with grace at shutdown.
//!
//! Invariants: a worker leaves the rotation before it is signalled, and is signalled only
//! after its in-flight requests ended (or the grace ran out). A replacement is probed ready
//! before the worker it replaces leaves, so recycling never lowers capacity.

mod backoff;
mod probe;
mod process;

use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use process::Spec;

use crate::discovery::{Change, ChangeSender, Report, ReportReceiver, WorkerId};
use crate::runtime_dir::RuntimeDir;

/// After SIGKILL, how long to wait for the kernel to report the exit before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Settings {
    pub workers: usize,
    /// How long a worker may take to answer its first probe.
    pub start_timeout: Duration,
    /// How long a leaving worker gets to finish in-flight requests, and then to exit.
    pub grace: Duration,
    /// How many workers may be being replaced at once.
    pub surge: usize,
}

/// Cheap handle to the supervisor task.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    commands: mpsc::UnboundedSender<Command>,
    ready: watch::Receiver<usize>,
}

#[derive(Debug)]
enum Command {
    Stop(oneshot::Sender<()>),
    Reload,
}

impl SupervisorHandle {
    /// Stops every worker (SIGTERM, grace, SIGKILL) and waits until all have exited.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Replaces every worker with one started from the executable now on disk, within the
    /// surge budget, each new one ready before the old one leaves.
    pub fn reload(&self) {
        let _ = self.commands.send(Command::Reload);
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
    dir: RuntimeDir,
    changes: ChangeSender,
    reports: ReportReceiver,
) -> (SupervisorHandle, tokio::task::JoinHandle<()>) {
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (ready_tx, ready) = watch::channel(0);
    let slots = (0..settings.workers).map(|_| Slot::default()).collect();
    let supervisor = Supervisor {
        settings,
        spec,
        dir,
        changes,
        events_tx,
        ready_tx,
        slots,
        workers: HashMap::new(),
        stopping: false,
        started: Instant::now(),
        announced_ready: false,
    };
    let task = tokio::spawn(supervisor.run(commands, events, reports));
    (SupervisorHandle { commands: commands_tx, ready }, task)
}

/// Things that happened to workers, reported by the tasks watching them.
#[derive(Debug)]
enum Event {
    Exited { id: WorkerId, status: std::io::Result<ExitStatus> },
    Probed { id: WorkerId, result: Result<(), String> },
    Drained { id: WorkerId },
    Respawn { slot: usize },
    KillTimer { id: WorkerId },
}

#[derive(Debug, Default)]
struct Slot {
    next_generation: u64,
    /// Consecutive failures, for backoff.
    failures: u32,
    /// The worker serving this slot (or starting to).
    current: Option<WorkerId>,
    /// A replacement being started for `current`.
    next: Option<WorkerId>,
    /// `current` should be replaced when the surge budget allows.
    replace_wanted: bool,
    respawn_scheduled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    /// Out of the rotation, waiting for its in-flight requests.
    Draining,
    /// Sent SIGTERM (or SIGKILL).
    Stopping,
}

#[derive(Debug)]
struct Worker {
    pid: Pid,
    state: State,
    started: Instant,
    ready_at: Option<Instant>,
    tail: process::Tail,
    /// Stops the probe once the worker is gone.
    cancel: CancellationToken,
}

struct Supervisor {
    settings: Settings,
    spec: Spec,
    dir: RuntimeDir,
    changes: ChangeSender,
    events_tx: mpsc::UnboundedSender<Event>,
    ready_tx: watch::Sender<usize>,
    slots: Vec<Slot>,
    workers: HashMap<WorkerId, Worker>,
    stopping: bool,
    started: Instant,
    announced_ready: bool,
}

impl Supervisor {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut reports: ReportReceiver,
    ) {
        for slot in 0..self.slots.len() {
            self.spawn(slot);
        }
        loop {
            tokio::select! {
                Some(event) = events.recv() => self.on_event(event),
                Some(report) = reports.recv() => self.on_report(report),
                command = commands.recv() => {
                    let done = match command {
                        Some(Command::Reload) => {
                            self.reload();
                            continue;
                        }
                        Some(Command::Stop(done)) => Some(done),
                        None => None,
                    };
                    self.stop_all(&mut events).await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
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
        let (mut child, tail) = match process::spawn(&self.spec, id, &socket) {
            Ok(spawned) => spawned,
            Err(e) => {
                error!(worker = %id, exe = %self.spec.exe.display(), error = %e, "worker failed to start");
                self.slots[slot].failures += 1;
                self.schedule_respawn(slot);
                return;
            }
        };
        let pid = Pid::from_raw(child.id().map_or(0, |p| p as i32));
        info!(worker = %id, pid = pid.as_raw(), "worker spawned");

        let s = &mut self.slots[slot];
        if s.current.is_none() {
            s.current = Some(id);
        } else {
            s.next = Some(id);
        }

        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = events.send(Event::Exited { id, status });
        });

        let cancel = CancellationToken::new();
        let events = self.events_tx.clone();
        let within = self.settings.start_timeout;
        let probe_cancel = cancel.clone();
        tokio::spawn(async move {
            let result = probe::wait_ready(&socket, within, &probe_cancel).await;
            if !probe_cancel.is_cancelled() {
                let _ = events.send(Event::Probed { id, result });
            }
        });

        self.workers.insert(
            id,
            Worker { pid, state: State::Starting, started: Instant::now(), ready_at: None, tail, cancel },
        );
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Probed { id, result } => self.on_probed(id, result),
            Event::Exited { id, status } => self.on_exited(id, status),
            Event::Drained { id } => self.terminate(id),
            Event::Respawn { slot } => {
                self.slots[slot].respawn_scheduled = false;
                if self.stopping {
                    return;
                }
                let s = &self.slots[slot];
                if s.current.is_none() {
                    self.spawn(slot);
                } else if s.replace_wanted && s.next.is_none() {
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
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.state != State::Starting {
            return;
        }
        if let Err(reason) = result {
            warn!(worker = %id, pid = worker.pid.as_raw(), reason, "worker failed its health probe, killed");
            process::signal(worker.pid, Signal::SIGKILL);
            worker.state = State::Stopping;
            return;
        }
        worker.state = State::Ready;
        worker.ready_at = Some(Instant::now());
        let startup_ms = worker.started.elapsed().as_millis() as u64;
        info!(worker = %id, pid = worker.pid.as_raw(), startup_ms, "worker ready");
        let socket = self.dir.socket_path(id.slot, id.generation).expect("checked at spawn");
        let _ = self.changes.send(Change::Ready { id, socket });

        let slot = &mut self.slots[id.slot];
        if slot.next == Some(id) {
            let old = slot.current.replace(id);
            slot.next = None;
            if let Some(old) = old {
                info!(worker = %old, replacement = %id, "worker recycled");
                self.retire(old);
            }
            self.start_replacements();
        }
        self.publish_ready();
    }

    fn on_exited(&mut self, id: WorkerId, status: std::io::Result<ExitStatus>) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        worker.cancel.cancel();
        let _ = std::fs::remove_file(self.dir.socket_path(id.slot, id.generation).unwrap_or_default());
        let status = match status {
            Ok(s) => process::describe(s),
            Err(e) => format!("unknown ({e})"),
        };
        let pid = worker.pid.as_raw();
        let uptime_ms = worker.started.elapsed().as_millis() as u64;
        let expected = worker.state == State::Stopping && !self.is_slot_member(id);
        if expected || self.stopping {
            info!(worker = %id, pid, status, uptime_ms, "worker exited");
        } else {
            let _ = self.changes.send(Change::Leave { id, drained: None });
            warn!(worker = %id, pid, status, uptime_ms, stderr = worker.tail.joined(), "worker exited unexpectedly");
        }
        self.publish_ready();
        if self.stopping {
            return;
        }

        let healthy = worker.ready_at.is_some_and(|t| t.elapsed() >= backoff::HEALTHY_UPTIME);
        let slot = &mut self.slots[id.slot];
        if slot.current == Some(id) {
            slot.current = slot.next.take();
            slot.failures = if healthy { 0 } else { slot.failures + 1 };
            if slot.current.is_none() {
                self.schedule_respawn(id.slot);
            }
        } else if slot.next == Some(id) {
            // The replacement died; the old worker keeps serving until another one is ready.
            slot.next = None;
            slot.replace_wanted = true;
            slot.failures += 1;
            self.schedule_respawn(id.slot);
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
            Report::Exhausted(id) => {
                let slot = &mut self.slots[id.slot];
                if slot.current == Some(id) && slot.next.is_none() {
                    slot.replace_wanted = true;
                    self.start_replacements();
                }
            }
            Report::Hung(id) => {
                if let Some(worker) = self.workers.get_mut(&id) {
                    if worker.state != State::Stopping {
                        warn!(worker = %id, pid = worker.pid.as_raw(), "worker hung, killed");
                        let _ = self.changes.send(Change::Leave { id, drained: None });
                        process::signal(worker.pid, Signal::SIGKILL);
                    }
                }
            }
        }
    }

    fn reload(&mut self) {
        if self.stopping {
            return;
        }
        for slot in &mut self.slots {
            if slot.current.is_some() {
                slot.replace_wanted = true;
            }
        }
        self.start_replacements();
    }

    /// Starts replacements for slots that want one, within the surge budget.
    fn start_replacements(&mut self) {
        for slot in 0..self.slots.len() {
            let replacing = self.slots.iter().filter(|s| s.next.is_some()).count();
            if replacing >= self.settings.surge {
                return;
            }
            let s = &mut self.slots[slot];
            if s.replace_wanted && s.next.is_none() && s.current.is_some() && !s.respawn_scheduled {
                s.replace_wanted = false;
                self.spawn(slot);
            }
        }
    }

    fn schedule_respawn(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.respawn_scheduled {
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
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.state = State::Draining;
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
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.state == State::Stopping {
            return;
        }
        worker.state = State::Stopping;
        process::signal(worker.pid, Signal::SIGTERM);
        let events = self.events_tx.clone();
        let grace = self.settings.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = events.send(Event::KillTimer { id });
        });
    }

    fn publish_ready(&mut self) {
        let ready = self.workers.values().filter(|w| w.state == State::Ready).count();
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

    /// Shutdown: every worker leaves the rotation and gets SIGTERM; stragglers get SIGKILL
    /// after the grace. Returns once all have exited.
    async fn stop_all(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        self.stopping = true;
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in &ids {
            let _ = self.changes.send(Change::Leave { id: *id, drained: None });
        }
        for (id, worker) in &mut self.workers {
            worker.cancel.cancel();
            if worker.state != State::Stopping {
                worker.state = State::Stopping;
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
                Ok(Some(Event::Exited { id, status })) => self.on_exited(id, status),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }
}
