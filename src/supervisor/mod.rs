//! The supervisor owns the worker processes: it starts them, admits them to the rotation once
//! probed ready, replaces any that exit, recycles them (requests, memory, age, reload) within
//! one surge budget, scales the pool, and stops them all with grace at shutdown.
//!
//! Invariants: a worker leaves the rotation before it is signalled, and is signalled only
//! after its in-flight requests ended (or the grace ran out). A replacement is probed ready
//! before the worker it replaces leaves, and at most `surge` replacements run at once, so
//! capacity never dips below the configured number of workers and memory never doubles.
//!
//! Every decision is made by the state machine in `machine.rs` (tested as a table, with no
//! process); this file is its executor: it turns what happens to processes, probes and timers
//! into [`Event`]s and performs the [`Action`]s the machine answers with.

mod backoff;
mod lifecycle;
mod liveness;
mod machine;
mod probe;
pub(crate) mod process;
mod recycle;
pub(crate) mod spawner;
mod stop;
mod table;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::OwnedFd;

use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use process::{describe as describe_status, App, Spec};
pub use table::{WorkerState, WorkerStatus};

use crate::discovery::{Address, Change, ChangeSender, Report, ReportReceiver, WorkerId};
use crate::heartbeat::Heartbeat;
use crate::runtime_dir::RuntimeDir;
use crate::telemetry::metrics::Metrics;
use machine::{Action, Event, Machine};

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
    let spawner = spawner::Spawner::start()?;
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (ready_tx, ready) = watch::channel(0);
    let supervisor = Supervisor {
        machine: Machine::new(settings, Instant::now()),
        spec,
        spawner,
        dir,
        metrics,
        changes,
        events_tx,
        ready_tx,
        probes: HashMap::new(),
        heartbeats: HashMap::new(),
        workers: HashMap::new(),
        guard: Arc::new(tokio::sync::OnceCell::new()),
        said_overdue: false,
        reload_waiters: Vec::new(),
        stop_waiters: Vec::new(),
    };
    let task = tokio::spawn(supervisor.run(commands, events, reports));
    Ok((SupervisorHandle { commands: commands_tx, ready }, task))
}

/// A heartbeat page and its fd, numbered where a child's dup2 cannot clobber it.
fn new_heartbeat() -> anyhow::Result<(Heartbeat, std::os::fd::OwnedFd)> {
    let (page, fd) = Heartbeat::create()?;
    let high = crate::control::upgrade::dup_high(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    Ok((page, high))
}

/// What the executor remembers of each worker it started.
#[derive(Debug, Clone)]
struct Started {
    address: Address,
    /// The command's stop signal, for a command's worker; rip's own workers drain on SIGTERM
    /// and take a drain notice (SIGUSR1), which an app may not expect.
    stop_signal: Option<nix::sys::signal::Signal>,
}

/// A worker ready to be started.
struct Prepared {
    /// The command to execute.
    cmd: tokio::process::Command,
    /// For `rip worker`: its arguments, for the fork server.
    worker_args: Option<Vec<std::ffi::OsString>>,
    started: Started,
    /// Fds the child inherits, kept open until it has started; a heartbeat page first.
    keep: Vec<OwnedFd>,
}

/// The guard, or a warning that there is none.
async fn start_guard(spawner: &spawner::Spawner, exe: &std::path::Path) -> Option<process::Guard> {
    match process::Guard::start(spawner, exe).await {
        Ok(guard) => Some(guard),
        Err(e) => {
            warn!(error = %e, "no worker guard: if rip is killed, processes its workers started may outlive it");
            None
        }
    }
}

/// After a worker exits, how long to wait for the rest of its stderr (a grandchild may keep
/// the pipe open; the exit is reported regardless after this).
const STDERR_WAIT: Duration = Duration::from_millis(500);

/// The executor: owns the processes, probes and timers the machine's actions ask for.
struct Supervisor {
    machine: Machine,
    spec: Spec,
    spawner: spawner::Spawner,
    dir: Arc<RuntimeDir>,
    metrics: Arc<Metrics>,
    changes: ChangeSender,
    events_tx: mpsc::UnboundedSender<Event>,
    ready_tx: watch::Sender<usize>,
    /// Stops a worker's probes once it is on its way out.
    probes: HashMap<WorkerId, CancellationToken>,
    /// Each worker's heartbeat page, handed to the proxy when the worker joins the rotation.
    heartbeats: HashMap<WorkerId, Arc<Heartbeat>>,
    /// Where each worker listens and what it runs.
    workers: HashMap<WorkerId, Started>,
    /// Started with the first command worker; `None` inside if it could not be.
    guard: Arc<tokio::sync::OnceCell<Option<process::Guard>>>,
    /// The log said once that recycling falls behind.
    said_overdue: bool,
    reload_waiters: Vec<oneshot::Sender<ReloadResult>>,
    stop_waiters: Vec<oneshot::Sender<()>>,
}

impl Supervisor {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut reports: ReportReceiver,
    ) {
        let actions = self.machine.start(Instant::now());
        self.perform(actions);
        let mut checks = tokio::time::interval(CHECK_INTERVAL);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            let event = tokio::select! {
                Some(event) = events.recv() => event,
                Some(report) = reports.recv() => match report {
                    Report::Exhausted(id) => Event::Exhausted { id },
                    Report::Hung(id) => Event::Hung { id },
                    Report::Overdue(id) => {
                        self.overdue(id);
                        continue;
                    }
                },
                _ = checks.tick() => Event::Tick { rss: self.resident_memory() },
                command = commands.recv(), if commands_open => match command {
                    Some(Command::Reload { settings, done }) => {
                        self.reload_waiters.extend(done);
                        // A reload serves the binary on disk, which a fork server started
                        // earlier does not hold.
                        self.spawner.renew_fork_server();
                        let settings = settings.map(|pair| {
                            let (settings, spec) = *pair;
                            self.spec = spec;
                            settings
                        });
                        Event::Reload { settings }
                    }
                    Some(Command::Scale(workers)) => Event::Scale { workers },
                    Some(Command::Status(reply)) => {
                        let _ = reply.send(self.status());
                        continue;
                    }
                    Some(Command::Stop(done)) => {
                        self.stop_waiters.push(done);
                        Event::Stop
                    }
                    None => {
                        commands_open = false;
                        Event::Stop
                    }
                },
            };
            let actions = self.machine.step(event, Instant::now());
            if self.perform(actions) {
                return;
            }
        }
    }

    /// Performs the actions in order; true once the machine says it is stopped.
    fn perform(&mut self, actions: Vec<Action>) -> bool {
        let mut stopped = false;
        for action in actions {
            match action {
                Action::Spawn { id, within } => self.spawn(id, within),
                Action::Signal { id, pid, signal } => {
                    let stop = self.workers.get(&id).and_then(|w| w.stop_signal);
                    let signal = match stop {
                        Some(stop) if signal == nix::sys::signal::Signal::SIGTERM => stop,
                        _ => signal,
                    };
                    process::signal(pid, signal)
                }
                Action::DrainNotice { id, pid } => {
                    if self.workers.get(&id).is_some_and(|w| w.stop_signal.is_none()) {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1);
                    }
                }
                Action::CancelProbes { id } => {
                    if let Some(probes) = self.probes.get(&id) {
                        probes.cancel();
                    }
                }
                Action::Admit { id } => {
                    if let Some(worker) = self.workers.get(&id) {
                        let heartbeat = self.heartbeats.get(&id).cloned();
                        let _ = self.changes.send(Change::Ready {
                            id,
                            socket: worker.address.clone(),
                            heartbeat,
                        });
                    }
                }
                Action::Leave { id, drain: None } => {
                    let _ = self.changes.send(Change::Leave { id, drained: None });
                }
                Action::Leave { id, drain: Some(grace) } => {
                    let (tx, rx) = oneshot::channel();
                    let _ = self.changes.send(Change::Leave { id, drained: Some(tx) });
                    let events = self.events_tx.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(grace, rx).await;
                        let _ = events.send(Event::Drained { id });
                    });
                }
                Action::KillAfter { id, after } => self.after(after, Event::KillDue { id }),
                Action::RespawnAfter { slot, after } => self.after(after, Event::RespawnDue { slot }),
                Action::StopAfter { after } => self.after(after, Event::StopDue),
                Action::ProbeLiveness { id, within } => self.probe_liveness(id, within),
                Action::Forget { id } => {
                    self.heartbeats.remove(&id);
                    if let Some(probes) = self.probes.remove(&id) {
                        probes.cancel();
                    }
                    if let Some(Address::Unix(socket)) = self.workers.remove(&id).map(|w| w.address) {
                        let _ = std::fs::remove_file(socket);
                    }
                }
                Action::PublishReady { ready } => {
                    self.ready_tx.send_replace(ready);
                }
                Action::Recycled { reason } => self.metrics.recycle(reason),
                Action::Restarted => self.metrics.restart(),
                Action::ReloadFinished { result } => {
                    for waiter in self.reload_waiters.drain(..) {
                        let _ = waiter.send(result.clone());
                    }
                }
                Action::Stopped => {
                    for waiter in self.stop_waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                    stopped = true;
                }
            }
        }
        stopped
    }

    /// Recycling fell behind: said once in the log (every time in the metric), since the
    /// remedy is the operator's.
    fn overdue(&mut self, id: WorkerId) {
        self.metrics.recycle_overdue();
        if self.said_overdue {
            tracing::debug!(worker = %id, "worker sent twice its request budget before its replacement was ready");
            return;
        }
        self.said_overdue = true;
        warn!(
            worker = %id,
            "recycling cannot keep up with the request rate: this worker was sent twice its --max-requests before its replacement was ready, so requests wait for a fresh worker (up to --queue-timeout); raise --max-requests or --max-surge (said once; rip_recycles_overdue_total counts each time)"
        );
    }

    /// Reports `event` after `delay`.
    fn after(&self, delay: Duration, event: Event) {
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event);
        });
    }

    /// Starts the worker's process on the spawner thread, probes it until ready, and reports
    /// its exit with the last lines of its stderr.
    fn spawn(&mut self, id: WorkerId, within: Duration) {
        let events = self.events_tx.clone();
        let prepared = match self.spec.app.clone() {
            Some(app) => self.prepare_app(id, &app),
            None => self.prepare_rip(id),
        };
        let fork = self.spec.fork && id.generation > 0;
        let Prepared { cmd, worker_args, started, keep } = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let _ = events.send(Event::SpawnFailed { id, error: format!("{e:#}") });
                return;
            }
        };
        let app = started.stop_signal.is_some();
        let address = started.address.clone();
        self.workers.insert(id, started);
        let cancel = CancellationToken::new();
        self.probes.insert(id, cancel.clone());
        let spawner = self.spawner.clone();
        let exe = self.spec.exe.clone();
        let health_path = self.spec.health_path.clone();
        let guard = app.then(|| self.guard.clone());
        tokio::spawn(async move {
            let guard = match &guard {
                Some(cell) => cell.get_or_init(|| start_guard(&spawner, &exe)).await.as_ref(),
                None => None,
            };
            let inherit: Vec<_> = keep.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            let spawned = match worker_args {
                // A worker that replaces another is forked: the exec is what a recycle costs.
                Some(args) => spawner.spawn_worker(cmd, args, inherit.first().copied(), fork).await,
                None => spawner.spawn(cmd, inherit).await.map(spawner::Process::Executed),
            };
            // The child has its own copies now.
            drop(keep);
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    let error = format!("{}: {e}", exe.display());
                    let _ = events.send(Event::SpawnFailed { id, error });
                    return;
                }
            };
            let pid = child.pid();
            if let Some(guard) = guard {
                guard.watch(pid);
            }
            let forked = matches!(child, spawner::Process::Forked(_));
            let _ = events.send(Event::Spawned { id, pid, forked });
            let tail = process::Tail::default();
            let output = if let (true, Some(child)) = (app, child.child_mut()) {
                Some(process::log_output(child, id, tail.clone()))
            } else {
                process::copy_stderr(&mut child, tail.clone())
            };
            tokio::spawn({
                let events = events.clone();
                async move {
                    let result = probe::wait_ready(&address, &health_path, within, &cancel).await;
                    if !cancel.is_cancelled() {
                        let _ = events.send(Event::Probed { id, result });
                    }
                }
            });
            let status = child.wait().await;
            if app {
                // What the command left behind in its group (a shell's children, a pre-fork
                // server's workers) goes with it: nothing of a worker outlives the worker.
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                if let Some(guard) = guard {
                    guard.forget(pid);
                }
            }
            // The last lines a dying worker wrote explain its death; let them be read first.
            if let Some(output) = output {
                let _ = tokio::time::timeout(STDERR_WAIT, output).await;
            }
            let status = match status {
                Ok(status) => process::describe(status),
                Err(e) => format!("unknown ({e})"),
            };
            let _ = events.send(Event::Exited { id, status, stderr: tail.joined() });
        });
    }

    /// `rip worker` on its Unix socket, with a heartbeat page.
    fn prepare_rip(&mut self, id: WorkerId) -> anyhow::Result<Prepared> {
        let socket = self.dir.socket_path(id.slot, id.generation)?;
        let _ = std::fs::remove_file(&socket);
        let heartbeat = match new_heartbeat() {
            Ok((page, fd)) => {
                self.heartbeats.insert(id, Arc::new(page));
                Some(fd)
            }
            Err(e) => {
                warn!(worker = %id, error = %e, "no heartbeat for this worker: a stall will go unnoticed");
                None
            }
        };
        Ok(Prepared {
            cmd: process::command(&self.spec, id, &socket, heartbeat.as_ref()),
            worker_args: Some(process::worker_args(&self.spec, id, &socket)),
            started: Started { address: Address::Unix(socket), stop_signal: None },
            keep: heartbeat.into_iter().collect(),
        })
    }

    /// The user's command, on a socket as `--app-socket` says.
    fn prepare_app(&mut self, id: WorkerId, app: &App) -> anyhow::Result<Prepared> {
        use crate::config::AppSocket;
        let mut keep = Vec::new();
        let address = match app.socket {
            AppSocket::Fd | AppSocket::Path => {
                let socket = self.dir.socket_path(id.slot, id.generation)?;
                let _ = std::fs::remove_file(&socket);
                if app.socket == AppSocket::Fd {
                    keep.push(process::listen_on(&socket)?);
                }
                Address::Unix(socket)
            }
            AppSocket::Port => Address::Tcp(process::free_port()?),
        };
        let cmd = process::app_command(&self.spec.exe, app, id, &address, keep.first());
        Ok(Prepared {
            cmd,
            worker_args: None,
            started: Started { address, stop_signal: Some(app.stop_signal) },
            keep,
        })
    }

    fn probe_liveness(&self, id: WorkerId, within: Duration) {
        let Some(address) = self.workers.get(&id).map(|w| w.address.clone()) else { return };
        let Some(cancel) = self.probes.get(&id).cloned() else { return };
        let events = self.events_tx.clone();
        let path = self.spec.health_path.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                result = probe::check_within(&address, &path, within) => result,
                // The worker is gone; its exit is handled on its own.
                () = cancel.cancelled() => return,
            };
            let _ = events.send(Event::Alive { id, result });
        });
    }

    /// Ready workers' resident memory, read only when a memory limit is set.
    fn resident_memory(&self) -> Vec<(WorkerId, u64)> {
        if self.machine.settings().max_memory.is_none() {
            return Vec::new();
        }
        self.memory_of(self.machine.ready_pids())
    }

    /// Each worker's resident memory: its process alone for rip's own workers, its whole
    /// process group for a command's.
    fn memory_of(&self, workers: Vec<(WorkerId, Pid)>) -> Vec<(WorkerId, u64)> {
        let is_app = |id: &WorkerId| self.workers.get(id).is_some_and(|w| w.stop_signal.is_some());
        let groups: Vec<Pid> = workers.iter().filter(|(id, _)| is_app(id)).map(|(_, pid)| *pid).collect();
        let group_rss = if groups.is_empty() { HashMap::new() } else { table::group_rss_bytes(&groups) };
        workers
            .into_iter()
            .map(|(id, pid)| {
                let rss = match group_rss.get(&pid) {
                    Some(&rss) if is_app(&id) => rss,
                    _ => table::rss_bytes(pid),
                };
                (id, rss)
            })
            .collect()
    }

    fn status(&self) -> Vec<WorkerStatus> {
        let mut rows = self.machine.status(Instant::now());
        let live: Vec<(WorkerId, Pid)> =
            rows.iter().filter(|r| r.pid > 0).map(|r| (r.id, Pid::from_raw(r.pid))).collect();
        let memory: HashMap<WorkerId, u64> = self.memory_of(live).into_iter().collect();
        for row in &mut rows {
            if let Some(&rss) = memory.get(&row.id) {
                row.rss_bytes = rss;
            }
        }
        rows
    }
}
