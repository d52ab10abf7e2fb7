//! `rip worker`: serves the app on a Unix socket until the supervisor says stop (SIGTERM),
//! then finishes in-flight requests and exits. Invariant: a worker never outlives the
//! `rip serve` that started it: the kernel kills it when the parent dies, and it checks at
//! start that the parent is still the one that spawned it.

mod drain;
pub(crate) mod pulse;
mod service;

pub use crate::handoff::worker::ClientLimits;
use crate::handoff::worker::Handoff;
pub use service::WorkerService;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use nix::sys::signal::Signal;
use nix::sys::stat::{umask, Mode};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};
use tracing::{info, warn};

use crate::cli::WorkerArgs;
use crate::frontend::connections::Connections;
use crate::heartbeat::Heartbeat;
use crate::AppFactory;
use pulse::{Pulse, Pulsed};

/// What a worker's app may know about the worker serving it. Cheap to clone: axum clones an
/// app's state for every request, so what the clones share is behind one reference count.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// The worker's slot in the pool (0-based).
    pub id: usize,
    /// How many workers held this slot before this one.
    pub generation: u64,
    /// Static file root, when `rip serve --root` was given.
    pub root: Option<PathBuf>,
    /// With `root`: the Cache-Control each file is sent with (`--cache-control`).
    pub cache_control: Option<String>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    served: AtomicU64,
    draining: CancellationToken,
    tracker: TaskTracker,
    /// The heartbeat shared with the front-end, when the worker was started by `rip serve`.
    pulse: Option<Arc<Pulse>>,
}

/// Keeps the worker from exiting while it lives (up to `--graceful-timeout` after the worker
/// was told to stop); see [`WorkerContext::track`].
#[derive(Debug)]
pub struct Tracked(#[allow(dead_code)] TaskTrackerToken);

impl WorkerContext {
    pub fn new(id: usize, generation: u64, root: Option<PathBuf>) -> WorkerContext {
        WorkerContext::with_pulse(id, generation, root, None)
    }

    fn with_pulse(
        id: usize,
        generation: u64,
        root: Option<PathBuf>,
        pulse: Option<Arc<Pulse>>,
    ) -> WorkerContext {
        let shared = Shared {
            served: AtomicU64::new(0),
            draining: CancellationToken::new(),
            tracker: TaskTracker::new(),
            pulse,
        };
        WorkerContext { id, generation, root, cache_control: None, shared: Arc::new(shared) }
    }

    /// Requests this worker has served so far, health probes excluded.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Completes when this worker starts to drain: it left the rotation (a recycle, a
    /// reload, scaling down) or was told to stop (a shutdown). Requests in flight still finish; long-lived ones — a WebSocket, a
    /// server-sent event stream — should end now, politely (a WebSocket close with 1001,
    /// "going away"), and background work should wrap up before `--graceful-timeout`.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.shared.draining.clone();
        async move { token.cancelled().await }
    }

    /// A guard for work the worker must not cut off when it stops — a WebSocket that should
    /// get its Close frame, a background job: the worker waits for every guard to be dropped
    /// (up to `--graceful-timeout`) before it exits. Hold one in each long-lived task and end
    /// the task on [`draining`](Self::draining).
    pub fn track(&self) -> Tracked {
        Tracked(self.shared.tracker.token())
    }

    /// Whether this worker has started to drain.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.is_cancelled()
    }

    /// Starts the drain that [`draining`](Self::draining) waits for (rip calls this on
    /// SIGTERM; tests of an app may call it themselves).
    pub fn start_draining(&self) {
        self.shared.draining.cancel();
    }
}

/// The worker's name in its log lines and errors.
fn worker_id(args: &WorkerArgs) -> crate::discovery::WorkerId {
    crate::discovery::WorkerId { slot: args.id, generation: args.generation }
}

pub(crate) fn run(args: WorkerArgs, app: AppFactory) -> Result<()> {
    crate::telemetry::logging::init(args.log_format);
    die_with_parent(args.parent)?;
    // Sockets this process creates are for its own user only.
    umask(Mode::from_bits_truncate(0o077));
    let runtime = crate::runtime(args.threads).context("starting the worker runtime")?;
    let heartbeat = args.heartbeat_fd.map(open_heartbeat).transpose()?;
    let pulse = heartbeat.map(|heartbeat| Pulse::new(Arc::new(heartbeat), args.handoff));
    let mut ctx = WorkerContext::with_pulse(args.id, args.generation, args.root.clone(), pulse);
    ctx.cache_control = args.cache_control.clone();
    let router = match app {
        AppFactory::Sync(app) => {
            let _entered = runtime.enter();
            app(&ctx)
        }
        AppFactory::Async(app) => runtime
            .block_on(app(ctx.clone()))
            .with_context(|| format!("starting the app in worker {}", worker_id(&args)))?,
    };
    runtime.block_on(serve(args, ctx, router))
}

/// The worker is on its way out: the lines it logs from now on (its drain, the app's goodbyes)
/// go straight into rip's pipe rather than start a writer thread for a handful of lines, if it
/// has logged nothing so far. A worker whose app logs as it serves keeps the queue and its
/// batched writes.
fn ends() {
    crate::telemetry::sink::write_straight_to_a_pipe();
}

/// The connection set of a worker. The front-end takes a worker out of its pool before
/// stopping it, so a worker's idle connections carry no more requests and close at once.
pub fn connections(stop: CancellationToken) -> Connections {
    Connections::new(stop, Duration::ZERO)
}

/// What a stopping worker keeps of its grace to log what it had to cut and exit, before the
/// supervisor's SIGKILL at the grace's end (a tenth of the grace when that is less).
const EXIT_MARGIN: Duration = Duration::from_millis(200);

/// Most concurrent requests on one HTTP/2 connection from the front-end; more wait in the
/// front-end, which counts them against `--max-in-flight` and `--queue-timeout` anyway.
const MAX_STREAMS: u32 = 1024;

/// Serves one accepted connection as a worker does: HTTP/2 (how the front-end sends requests)
/// or HTTP/1.1 (health probes, protocol upgrades, `--upstream http1`), with upgrades and no
/// header timeout, because the only client is rip's front-end, whose pooled connections must
/// not be closed under it while idle.
pub fn serve_connection<I>(service: &WorkerService, io: I, connections: &Connections)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    builder.http2().max_concurrent_streams(MAX_STREAMS).adaptive_window(true);
    let service = TowerToHyperService::new(Pulsed::new(service.clone(), service.pulse()));
    let conn = builder.serve_connection_with_upgrades(io, service).into_owned();
    connections.spawn(conn, ());
}

/// Binds a Unix socket at `path`, replacing a stale one, readable and writable by this user
/// only (0600; connecting needs write permission, and nothing needs more).
pub(crate) fn bind(path: &std::path::Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

fn client_limits(args: &WorkerArgs) -> ClientLimits {
    ClientLimits {
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        max_body: args.max_body,
        max_connections: args.max_connections,
        // Written by the parent from a list it validated.
        trusted_proxies: crate::config::parse_cidrs(&args.trusted_proxies).unwrap_or_default(),
    }
}

fn die_with_parent(parent: Option<i32>) -> Result<()> {
    let Some(parent) = parent else { return Ok(()) };
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    // The parent may have died before the line above took effect.
    if nix::unistd::getppid().as_raw() != parent {
        bail!("parent process {parent} is gone");
    }
    Ok(())
}

/// The page the parent shares on `fd`.
fn open_heartbeat(fd: i32) -> Result<Heartbeat> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .with_context(|| format!("--heartbeat-fd {fd} is not an open file descriptor"))?;
    // SAFETY: the fd is open (checked above) and was passed to this process for it alone.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Heartbeat::open(fd).context("mapping the heartbeat page")
}

async fn serve(args: WorkerArgs, ctx: WorkerContext, router: axum::Router) -> Result<()> {
    if let Some(pulse) = &ctx.shared.pulse {
        tokio::spawn(pulse.clone().run());
    }
    let service = WorkerService::new(router, &ctx);
    let stop = CancellationToken::new();
    // The channel first: once the HTTP socket answers the readiness probe, both must work.
    let handoff = if args.handoff {
        let limits = client_limits(&args);
        Some(Handoff::start(&args.socket, service.clone(), ctx.clone(), limits, stop.clone())?)
    } else {
        None
    };
    // Both handlers before the socket exists: a worker that answers its probe must not die
    // of a drain notice (SIGUSR1's default action is to terminate).
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut drain_notice = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let listener = bind(&args.socket)?;

    let connections = connections(stop.clone());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match stream.into_std().and_then(crate::quiet::QuietUnix::new) {
                    Ok(stream) => serve_connection(&service, TokioIo::new(stream), &connections),
                    Err(e) => warn!(error = %e, "an accepted connection could not be registered"),
                },
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(crate::frontend::connections::ACCEPT_ERROR_PAUSE).await;
                }
            },
            // Out of the rotation (a recycle, a reload): the app hears now, so that its
            // WebSockets close politely and the front-end's wait for them ends early.
            _ = drain_notice.recv() => {
                ends();
                ctx.start_draining();
            }
            _ = terminate.recv() => break,
        }
    }
    ends();
    // The app hears first (if it has not yet), so that long-lived requests can end politely
    // while the connections drain.
    ctx.start_draining();
    drop(listener);
    let _ = std::fs::remove_file(&args.socket);
    stop.cancel();
    // Everything below fits in one grace, less a moment to say what was cut and exit before
    // the supervisor's SIGKILL at the grace's end.
    let grace = Duration::from_millis(args.graceful_ms);
    let deadline = tokio::time::Instant::now() + grace.saturating_sub(EXIT_MARGIN.min(grace / 10));
    let (open, clients_open) = tokio::join!(
        connections.drain(deadline.saturating_duration_since(tokio::time::Instant::now())),
        async {
            match handoff {
                Some(handoff) => {
                    handoff.stop(deadline.saturating_duration_since(tokio::time::Instant::now())).await
                }
                None => 0,
            }
        }
    );
    // Upgraded connections (WebSockets) are the app's tasks, not connections any more; the
    // app holds a `Tracked` for each, and the worker waits for them within the same grace.
    ctx.shared.tracker.close();
    let tasks = ctx.shared.tracker.len();
    let tracked_open = if tokio::time::timeout_at(deadline, ctx.shared.tracker.wait()).await.is_err() {
        ctx.shared.tracker.len()
    } else {
        0
    };
    if tasks > 0 {
        info!(worker = %worker_id(&args), tasks, still_open = tracked_open, "waited for the app's tracked tasks");
    }
    let id = worker_id(&args);
    if open + clients_open + tracked_open > 0 {
        // Closed now, by the exit: each tunnel the app still held loses its connection.
        warn!(
            worker = %id,
            connections = open + clients_open,
            tracked_tasks = tracked_open,
            "graceful timeout elapsed: closing what is still open"
        );
    }
    info!(worker = %id, served = ctx.served(), "worker drained");
    Ok(())
}
