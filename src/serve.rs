//! `rip serve`, the parent's script: bind, start the supervisor and the proxy, serve until a
//! signal, then shut down in order — stop accepting, let front-end requests finish, stop the
//! workers (SIGTERM, grace, SIGKILL), remove the sockets, exit 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::frontend::{self, Limits};
use crate::proxy::{self, Proxy};
use crate::runtime_dir::RuntimeDir;
use crate::signals::{self, Intent};
use crate::supervisor::{self, SupervisorHandle};

/// Extra workers started at once while replacing workers (recycle, reload), so that memory
/// never holds more than `workers + SURGE` processes.
const SURGE: usize = 1;

pub fn run(args: ServeArgs) -> Result<()> {
    let config = crate::config::load(&args)?;
    crate::logging::init(config.log_format);
    let root = config.root.as_deref().map(check_root).transpose()?;
    let exe = std::env::current_exe().context("locating the rip executable")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(serve(config, exe, root))
}

/// The root must be a readable directory; workers would otherwise answer 404 to everything.
fn check_root(root: &Path) -> Result<PathBuf> {
    let real = root.canonicalize().with_context(|| format!("reading root {}", root.display()))?;
    if !real.is_dir() {
        bail!("reading root {}: not a directory", root.display());
    }
    std::fs::read_dir(&real).with_context(|| format!("reading root {}", root.display()))?;
    Ok(real)
}

async fn serve(config: Config, exe: PathBuf, root: Option<PathBuf>) -> Result<()> {
    let addr = SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let dir = RuntimeDir::create(config.runtime_dir.as_deref())?;
    let mut intents = signals::listen()?;

    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let proxy = Proxy::new(
        proxy::Settings {
            balance: config.balance,
            max_requests: config.max_requests,
            timeout: config.timeout,
            queue_timeout: config.queue_timeout,
            max_body: config.max_body,
            body_timeout: config.header_timeout,
            max_in_flight: config.max_in_flight,
        },
        reports_tx,
    );
    tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.follow(changes_rx).await }
    });

    info!(
        addr = %local,
        workers = config.workers,
        max_requests = config.max_requests,
        balance = config.balance.as_str(),
        timeout_ms = config.timeout.as_millis() as u64,
        runtime_dir = %dir.path().display(),
        config = config.file.as_ref().map(|p| p.display().to_string()),
        "rip started"
    );
    let (supervisor, supervisor_task) = supervisor::start(
        supervisor::Settings {
            workers: config.workers,
            start_timeout: config.start_timeout,
            grace: config.graceful_timeout,
            surge: SURGE,
        },
        supervisor::Spec {
            exe,
            root,
            threads: config.worker_threads,
            graceful_ms: config.graceful_timeout.as_millis() as u64,
            log_format: config.log_format.as_str(),
        },
        dir,
        changes_tx,
        reports_rx,
    );

    let stop = CancellationToken::new();
    let limits = Limits { header_timeout: config.header_timeout, max_connections: config.max_connections };
    let frontend =
        tokio::spawn(frontend::serve(listener, proxy, limits, stop.clone(), config.graceful_timeout));

    let reason = wait_for_shutdown(&mut intents, &supervisor).await;
    info!(signal = reason, "shutting down");
    shutdown(stop, frontend, &mut intents, supervisor).await;
    supervisor_task.await.context("waiting for the supervisor")?;
    info!("rip stopped");
    Ok(())
}

async fn wait_for_shutdown(
    intents: &mut mpsc::UnboundedReceiver<Intent>,
    supervisor: &SupervisorHandle,
) -> &'static str {
    loop {
        match intents.recv().await {
            Some(Intent::Shutdown(signal)) => return signal,
            Some(Intent::Reload) => {
                info!("reload requested");
                supervisor.reload();
            }
            None => return "closed",
        }
    }
}

/// Stop accepting and drain the front-end, then stop the workers. A second shutdown signal
/// skips the rest of the front-end's grace.
async fn shutdown(
    stop: CancellationToken,
    frontend: tokio::task::JoinHandle<usize>,
    intents: &mut mpsc::UnboundedReceiver<Intent>,
    supervisor: SupervisorHandle,
) {
    stop.cancel();
    let drain = async {
        loop {
            match intents.recv().await {
                Some(Intent::Shutdown(signal)) => return signal,
                Some(Intent::Reload) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        open = frontend => match open {
            Ok(0) => info!("front-end drained"),
            Ok(open) => warn!(open, "graceful timeout elapsed with client connections open"),
            Err(e) => warn!(error = %e, "front-end task failed"),
        },
        signal = drain => warn!(signal, "second signal, stopping without waiting for requests"),
    }
    supervisor.stop().await;
}
