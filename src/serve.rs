//! `rip serve`, the parent's script: take the listener, start the supervisor and the proxy,
//! serve until told to stop, then shut down in order — stop accepting, let front-end requests
//! finish, stop the workers (SIGTERM, grace, SIGKILL), remove the sockets, exit 0.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::control::signals::{self, Intent, IntentReceiver, Scale, Stop};
use crate::control::{self, Controls};
use crate::control::{notify, upgrade};
use crate::frontend::listener;
use crate::frontend::{self, Edge, Limits};
use crate::proxy::{self, Proxy};
use crate::runtime_dir::RuntimeDir;
use crate::supervisor::{self, ReloadResult, SupervisorHandle};
use crate::tasks::Tasks;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;

pub fn run(args: ServeArgs, edge: Option<Edge>) -> Result<()> {
    let config = crate::config::load(&args)?;
    crate::telemetry::logging::warn_if_filtered(crate::telemetry::logging::init(config.log_format));
    let root = config.root.as_deref().map(check_root).transpose()?;
    check_command(&config.command)?;
    let tls =
        if config.tls_cert.is_empty() { None } else { Some(frontend::tls::Tls::load(&config.tls_pairs())?) };
    let exe = std::env::current_exe().context("locating the rip executable")?;
    // One thread by default: every client connection, worker connection and the supervisor
    // share it, so handing a request from one task to the next is a local wake-up rather
    // than a cross-thread one. Measured faster than a thread per core on 2 cores (README,
    // Performance); larger machines may want more.
    let runtime = crate::runtime(config.frontend_threads).context("starting the runtime")?;
    runtime.block_on(serve(Parent { args, exe, config, root, edge, tls }))
}

/// What `rip serve` was started with; reloads re-read the config from the same sources.
struct Parent {
    args: ServeArgs,
    exe: PathBuf,
    config: Config,
    root: Option<PathBuf>,
    /// The user's edge routes and layers, if their binary has any.
    edge: Option<Edge>,
    /// HTTPS on the listener, when certificates are configured.
    tls: Option<frontend::tls::Tls>,
}

/// The root must be a readable directory; workers would otherwise answer 404 to everything.
pub(crate) fn check_root(root: &Path) -> Result<PathBuf> {
    let real = root.canonicalize().with_context(|| format!("reading root {}", root.display()))?;
    if !real.is_dir() {
        bail!("reading root {}: not a directory", root.display());
    }
    std::fs::read_dir(&real).with_context(|| format!("reading root {}", root.display()))?;
    Ok(real)
}

/// A command that cannot be found would only crash-loop its workers: say so at once.
pub(crate) fn check_command(command: &[String]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(program) = command.first() else { return Ok(()) };
    let executable =
        |path: &Path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        if !executable(Path::new(program)) {
            bail!("command {program}: no such executable file");
        }
        return Ok(());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|dir| executable(&dir.join(program))) {
        bail!("command {program}: not found in PATH");
    }
    Ok(())
}

fn supervisor_settings(config: &Config) -> supervisor::Settings {
    supervisor::Settings {
        workers: config.workers,
        start_timeout: config.start_timeout,
        grace: config.graceful_timeout,
        surge: config.max_surge,
        max_memory: (config.max_memory > 0).then_some(config.max_memory),
        max_age: (!config.max_age.is_zero()).then_some(config.max_age),
        // With hand-off, the heartbeat is all the front-end sees of a worker; a command's
        // worker has no heartbeat at all. Both are asked directly.
        liveness: (config.upstream == proxy::Upstream::Handoff || !config.command.is_empty())
            .then_some(config.timeout),
    }
}

/// The front-end's shards. With `--upstream handoff` the front-end only accepts and passes
/// connections on, and its workers' channels belong to one runtime: one shard.
fn shards(config: &Config) -> usize {
    if config.upstream == proxy::Upstream::Handoff {
        1
    } else {
        config.shards
    }
}

/// The files the front-end serves itself: the root (checked), unless each connection is
/// handed to a worker whole.
fn front_root(config: &Config, root: Option<&Path>) -> Result<Option<Arc<crate::app::Files>>> {
    match root {
        Some(root) if config.upstream != proxy::Upstream::Handoff => {
            let files = crate::app::Files::open(root, config.cache_control.as_deref())
                .with_context(|| format!("reading root {}", root.display()))?;
            Ok(Some(Arc::new(files)))
        }
        _ => Ok(None),
    }
}

fn worker_spec(config: &Config, exe: &Path, root: Option<PathBuf>) -> supervisor::Spec {
    supervisor::Spec {
        exe: exe.to_path_buf(),
        root,
        cache_control: config.cache_control.clone(),
        threads: config.worker_threads,
        graceful_ms: config.graceful_timeout.as_millis() as u64,
        log_format: config.log_format,
        handoff: (config.upstream == proxy::Upstream::Handoff).then_some(crate::worker::ClientLimits {
            header_timeout: config.header_timeout,
            max_body: config.max_body,
            max_connections: config.max_connections,
            trusted_proxies: config.trusted_proxies.clone(),
        }),
        health_path: config.health_path.clone(),
        app: (!config.command.is_empty()).then(|| supervisor::App {
            command: config.command.clone(),
            socket: config.app_socket,
            stop_signal: config.stop_signal.0,
        }),
        fork: config.spawn == crate::config::Spawn::Fork,
    }
}

async fn serve(parent: Parent) -> Result<()> {
    let config = &parent.config;
    notify::claim_ready_fd();
    let (listener, origin) = listener::acquire(SocketAddr::new(config.host, config.port))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let listener_fd = listener.as_raw_fd();
    let dir = Arc::new(RuntimeDir::create(config.runtime_dir.as_deref())?);
    // Only a hint for `rip status` and friends when several rips run; serving goes on without.
    let _ = std::fs::write(dir.path().join(control::LISTEN_NAME), format!("{local}\n"));
    let (intents_tx, mut intents) = signals::listen()?;
    let metrics = Arc::new(Metrics::default());
    let access_log = match &config.access_log {
        crate::config::AccessLogTarget::File(path) => AccessLog::start(&config.access_log, config.log_format)
            .with_context(|| format!("opening access log {}", path.display()))?,
        target => AccessLog::start(target, config.log_format).context("starting the access log")?,
    };

    if config.upstream == proxy::Upstream::Handoff {
        warn_about_handoff(config, access_log.is_some());
    }
    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    proxy::set_shards(shards(config));
    let proxy = Proxy::new(proxy::Settings::from(config), reports_tx, metrics.clone(), access_log.clone());
    proxy.serve_root(front_root(config, parent.root.as_deref())?);
    let mut tasks = Tasks::new();
    tasks.essential("discovery", {
        let proxy = proxy.clone();
        async move { proxy.follow(changes_rx).await }
    });
    tasks.essential("heartbeat watcher", {
        let proxy = proxy.clone();
        async move { proxy.watch_heartbeats().await }
    });
    tasks.essential("memory trimmer", crate::memory::trim_when_quiet(proxy.clone()));

    info!(
        addr = %local,
        listener = origin.as_str(),
        workers = config.workers,
        max_requests = config.max_requests,
        balance = config.balance.as_str(),
        timeout_ms = config.timeout.as_millis() as u64,
        runtime_dir = %dir.path().display(),
        config = config.file.as_ref().map(|p| p.display().to_string()),
        command = (!config.command.is_empty()).then(|| crate::config::quote_words(&config.command)),
        tls = (!config.tls_cert.is_empty()).then_some(true),
        "rip started"
    );
    let (supervisor, supervisor_task) = supervisor::start(
        supervisor_settings(config),
        worker_spec(config, &parent.exe, parent.root.clone()),
        dir.clone(),
        metrics.clone(),
        changes_tx,
        reports_rx,
    )
    .context("starting the supervisor")?;
    let supervisor_task = tasks.essential("supervisor", propagate_panic(supervisor_task));
    let controls = Controls {
        supervisor: supervisor.clone(),
        proxy: proxy.clone(),
        intents: intents_tx,
        started: std::time::Instant::now(),
    };
    let control_task = tasks.essential(
        "control socket",
        control::serve(&dir.path().join(control::SOCKET_NAME), controls.clone())?,
    );

    let stop = CancellationToken::new();
    if let Some(addr) = config.admin {
        let (bound, serving) = crate::telemetry::admin::serve(
            addr,
            metrics.clone(),
            proxy.clone(),
            supervisor.clone(),
            controls.clone(),
            stop.clone(),
        )
        .await?;
        tasks.essential("admin listener", serving);
        info!(addr = %bound, "admin listener started");
    }
    if let Some(addr) = config.http_redirect {
        let (bound, serving) = frontend::redirect::serve(addr, local.port(), stop.clone()).await?;
        tasks.essential("http redirect listener", serving);
        info!(addr = %bound, "http redirect listener started");
    }
    let limits = Limits { header_timeout: config.header_timeout, max_connections: config.max_connections };
    let door = frontend::Door::new(&proxy, parent.edge.as_ref());
    let serving = frontend::Serving {
        proxy: proxy.clone(),
        door,
        limits,
        tls: parent.tls.clone(),
        stop: stop.clone(),
        grace: config.graceful_timeout,
    };
    let frontend = tasks.essential("front-end", frontend::serve_shards(listener, shards(config), serving));
    tokio::spawn(announce_ready(supervisor.clone(), config.workers, local));

    let reason = tokio::select! {
        reason = run_until_stopped(&parent, &mut intents, &supervisor, &proxy, access_log.as_ref(), listener_fd) => reason,
        ended = tasks.first_ended() => Stop::Failed(ended.task),
    };
    tasks.shutting_down();
    info!(reason = reason.as_str(), "shutting down");
    // After an upgrade the new process is the service's main pid; systemd must not hear
    // that "the service" is stopping.
    if reason != Stop::Upgraded {
        notify::stopping();
    }
    control_task.abort();
    shutdown(&proxy, stop, frontend, &mut intents, supervisor).await;
    let tunnels = proxy.pool().tunnels();
    if tunnels > 0 {
        warn!(tunnels, "tunnels still open after the workers stopped are closed");
    }
    let _ = supervisor_task.await;
    drop(dir);
    if let Stop::Failed(task) = reason {
        bail!("the {task} task ended unexpectedly (see the log); rip stopped its workers and exits");
    }
    info!("rip stopped");
    Ok(())
}

/// A spawned task's panic as a panic of the future awaiting it, so that its owner sees it.
async fn propagate_panic(task: tokio::task::JoinHandle<()>) {
    if let Err(e) = task.await {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// What `--upstream handoff` gives up, said once at start so nobody relies on it unawares.
fn warn_about_handoff(config: &Config, access_log: bool) {
    info!("upstream handoff: each client connection is served by one worker; requests are not retried on another worker or moved off a stalled one, and neither --max-in-flight nor --request-timeout applies");
    if access_log {
        warn!("the access log stays empty with upstream handoff: workers answer clients directly");
    }
    if config.max_in_flight > 0 {
        warn!("max_in_flight does not apply with upstream handoff");
    }
}

/// READY=1 for systemd (and the previous rip, during an upgrade) once every worker is ready.
async fn announce_ready(supervisor: SupervisorHandle, workers: usize, addr: SocketAddr) {
    supervisor.wait_ready(workers).await;
    notify::ready(&format!("serving on {addr} with {workers} workers"));
}

/// Acts on intents until one of them stops this process; returns why.
async fn run_until_stopped(
    parent: &Parent,
    intents: &mut IntentReceiver,
    supervisor: &SupervisorHandle,
    proxy: &Proxy,
    access_log: Option<&AccessLog>,
    listener_fd: std::os::fd::RawFd,
) -> Stop {
    let mut workers = parent.config.workers;
    // A runtime `rip scale` survives reloads unless the config's own number changes.
    let mut configured = parent.config.workers;
    loop {
        let Some(intent) = intents.recv().await else { return Stop::Closed };
        match intent {
            Intent::Shutdown(reason) => return reason,
            Intent::Reload(reply) => {
                notify::reloading();
                let outcome = reload(parent, supervisor, proxy, workers, configured).map(|(n, roll)| {
                    if n != configured {
                        configured = n;
                        workers = n;
                    }
                    roll
                });
                tokio::spawn(finish_reload(outcome, reply));
            }
            Intent::Scale(scale) => {
                workers = match scale {
                    Scale::To(n) => n,
                    Scale::Up => workers + 1,
                    Scale::Down => workers.saturating_sub(1).max(1),
                };
                supervisor.scale(workers);
            }
            Intent::ReopenLogs => {
                if let Some(log) = access_log {
                    log.reopen();
                }
            }
            Intent::Upgrade(reply) => {
                let args: Vec<OsString> = std::env::args_os().skip(1).collect();
                let within = parent.config.start_timeout + std::time::Duration::from_secs(5);
                match upgrade::start(&parent.exe, args, listener_fd, within).await {
                    Ok(pid) => {
                        info!(new_pid = pid, "upgrade ready, handing over");
                        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                            // This process is the one the terminal waits for; the new one is
                            // not its child and outlives it, still writing here.
                            warn!(
                                new_pid = pid,
                                "this terminal's rip exits now; the new rip (pid {pid}) keeps running detached, \
                                 and Ctrl-C no longer reaches it: stop it with `rip stop` or `kill {pid}`"
                            );
                        }
                        notify::main_pid(pid);
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(pid));
                        }
                        return Stop::Upgraded;
                    }
                    Err(e) => {
                        let message = crate::error_chain(&e);
                        error!(error = message, "upgrade failed, still serving");
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(message));
                        }
                    }
                }
            }
        }
    }
}

/// Re-reads and validates the config; a bad one is refused and the old workers keep serving.
/// Returns the configured number of workers and the roll's outcome to come.
fn reload(
    parent: &Parent,
    supervisor: &SupervisorHandle,
    proxy: &Proxy,
    current_workers: usize,
    configured_workers: usize,
) -> Result<(usize, oneshot::Receiver<ReloadResult>), String> {
    let checked = crate::config::load(&parent.args).and_then(|config| {
        check_command(&config.command)?;
        Ok((config.root.as_deref().map(check_root).transpose()?, config))
    });
    let (root, config) = checked.map_err(|e| {
        let message = format!("config rejected: {}", crate::error_chain(&e));
        error!(error = message, "reload refused, workers keep serving");
        message
    })?;
    let old = &parent.config;
    // What only a new process can apply; a reload that changes any of it is refused whole, so
    // that "reloaded" is never said of a config that is only partly in force.
    let restart = [("host", old.host != config.host), ("port", old.port != config.port)];
    let upgrade = [
        ("runtime_dir", old.runtime_dir != config.runtime_dir),
        ("log_format", old.log_format != config.log_format),
        ("access_log", old.access_log != config.access_log),
        ("admin", old.admin != config.admin),
        ("http_redirect", old.http_redirect != config.http_redirect),
        ("balance", old.balance != config.balance),
        ("header_timeout", old.header_timeout != config.header_timeout),
        ("max_connections", old.max_connections != config.max_connections),
        ("shards", old.shards != config.shards),
        ("upstream", old.upstream != config.upstream),
        // Turning TLS on or off changes what the listener speaks; new certificates do not.
        ("tls_cert", old.tls_cert.is_empty() != config.tls_cert.is_empty()),
    ];
    let changed = |keys: &[(&'static str, bool)]| -> Vec<&'static str> {
        keys.iter().filter(|(_, changed)| *changed).map(|(key, _)| *key).collect()
    };
    let (needs_restart, needs_upgrade) = (changed(&restart), changed(&upgrade));
    if !needs_restart.is_empty() || !needs_upgrade.is_empty() {
        let mut why = Vec::new();
        if !needs_restart.is_empty() {
            why.push(format!(
                "{} changed, which only a restart applies (the listening socket stays across `rip upgrade`)",
                needs_restart.join(", ")
            ));
        }
        if !needs_upgrade.is_empty() {
            why.push(format!(
                "{} changed, which `rip upgrade` applies without closing the port",
                needs_upgrade.join(", ")
            ));
        }
        let message = format!("reload refused: {}; nothing was reloaded", why.join("; "));
        error!(error = message, "reload refused, workers keep serving");
        return Err(message);
    }
    if let Some(tls) = &parent.tls {
        tls.reload(&config.tls_pairs()).map_err(|e| {
            let message = format!(
                "reload refused: {}; nothing was reloaded, the old certificates keep serving",
                crate::error_chain(&e)
            );
            error!(error = message, "reload refused, workers keep serving");
            message
        })?;
    }
    let files = front_root(&config, root.as_deref()).map_err(|e| {
        let message = format!("config rejected: {}", crate::error_chain(&e));
        error!(error = message, "reload refused, workers keep serving");
        message
    })?;
    proxy.reconfigure(proxy::Settings::from(&config));
    proxy.serve_root(files);
    let configured = config.workers;
    let mut settings = supervisor_settings(&config);
    if configured == configured_workers {
        settings.workers = current_workers;
    }
    let roll = supervisor.begin_reload(Some((settings, worker_spec(&config, &parent.exe, root))));
    Ok((configured, roll))
}

async fn finish_reload(
    roll: Result<oneshot::Receiver<ReloadResult>, String>,
    reply: Option<oneshot::Sender<Result<(), String>>>,
) {
    let outcome = match roll {
        Ok(roll) => roll.await.unwrap_or_else(|_| Err("shutting down".into())),
        Err(e) => Err(e),
    };
    notify::ready(if outcome.is_ok() { "reloaded" } else { "reload failed, previous workers serving" });
    if let Some(reply) = reply {
        let _ = reply.send(outcome);
    }
}

/// Stop accepting and drain the front-end, then stop the workers. A second shutdown signal
/// skips the rest of the front-end's grace.
async fn shutdown(
    proxy: &Proxy,
    stop: CancellationToken,
    frontend: tokio::task::JoinHandle<Option<usize>>,
    intents: &mut IntentReceiver,
    supervisor: SupervisorHandle,
) {
    stop.cancel();
    let second_signal = async {
        loop {
            match intents.recv().await {
                Some(Intent::Shutdown(reason)) => return reason,
                Some(Intent::Reload(Some(reply))) => {
                    let _ = reply.send(Err("shutting down".into()));
                }
                Some(Intent::Upgrade(Some(reply))) => {
                    let _ = reply.send(Err("shutting down".into()));
                }
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        open = frontend => match open {
            Ok(Some(0)) => info!(tunnels = proxy.pool().tunnels(), "front-end drained"),
            Ok(Some(open)) => warn!(open, "graceful timeout elapsed with client connections open"),
            Ok(None) => warn!("front-end task failed"),
            Err(e) => warn!(error = %e, "front-end task failed"),
        },
        reason = second_signal => warn!(reason = reason.as_str(), "second stop request, not waiting for requests"),
    }
    supervisor.stop().await;
}
