//! rip: an HTTP server that is its own process manager.
//!
//! A user's binary hands rip an axum [`Router`](axum::Router) factory and gets the same
//! `serve` and `worker` subcommands as the stock `rip` binary:
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! fn app(_ctx: &rip::WorkerContext) -> Router {
//!     Router::new().route("/", get(|| async { "hello" }))
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     rip::main_with(app)
//! }
//! ```
//!
//! [`Rip`] is the same with more to say: a factory that is a closure or `async` (a database
//! pool opened before the worker reports ready), and edge routes and tower layers that the
//! parent applies in front of every worker:
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! fn main() -> std::process::ExitCode {
//!     let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".into());
//!     rip::Rip::new_async(move |_ctx| {
//!         let greeting = greeting.clone();
//!         async move { Ok(Router::new().route("/", get(move || async move { greeting }))) }
//!     })
//!     .edge(|proxy| proxy.route("/edge", get(|| async { "answered by the parent" })))
//!     .run()
//! }
//! ```

// What a user's binary calls is `Rip`, `main_with`, `WorkerContext` and `app`; the rest is
// the server itself. Modules the benchmarks drive directly (benches/) are public but hidden
// from the docs: they are not an API and change without notice.

/// The demo routes and the static file server.
pub mod app;
/// Command-line definition: `serve`, the control commands and the hidden `worker`.
pub(crate) mod cli;
/// Flags, `RIP_*` environment, rip.toml and defaults merged into one validated [`config::Config`].
#[doc(hidden)]
pub mod config;
/// The control socket, signals, `rip status`/`reload`/…, upgrades and sd_notify.
pub(crate) mod control;
/// The messages between supervisor and proxy: workers joining and leaving, workers in trouble.
#[doc(hidden)]
pub mod discovery;
/// `rip forkserver`: workers forked from one started image instead of executed each.
pub(crate) mod forkserver;
/// The parent's public listener: accepts connections, strict framing, limits, drain.
#[doc(hidden)]
pub mod frontend;
/// `--upstream handoff`: client sockets passed to workers over SCM_RIGHTS, both sides.
pub(crate) mod handoff;
/// Worker liveness through shared memory.
pub(crate) mod heartbeat;
/// The processes behind a command's workers: the exec shim and the group guard.
pub(crate) mod launch;
/// Giving memory back to the system after a burst.
pub(crate) mod memory;
/// The request path from the front-end to a worker, as a tower stack.
#[doc(hidden)]
pub mod proxy;
/// The private directory that holds the workers' sockets.
/// Unix sockets between the front-end and workers, watched for write space only when needed.
pub(crate) mod quiet;
pub(crate) mod runtime_dir;
/// The parent's script: bind, start the supervisor, serve, shut down in order.
pub(crate) mod serve;
/// Worker processes as a state machine and its executor.
pub(crate) mod supervisor;
/// The owner of `rip serve`'s long-lived tasks: none ends unnoticed.
pub(crate) mod tasks;
/// Logs, the access log, metrics and the admin listener.
#[doc(hidden)]
pub mod telemetry;
/// `rip worker`: serve the app on a Unix socket and drain when told to.
#[doc(hidden)]
pub mod worker;

use std::future::Future;

use control::commands;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

pub use worker::WorkerContext;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a worker gets its app; called once in each worker process.
#[derive(Clone)]
pub(crate) enum AppFactory {
    /// Called on the worker's main thread inside its runtime's context (so `tokio::spawn`
    /// works) but outside `block_on` (so a factory that blocks on a runtime of its own does
    /// not panic).
    Sync(Arc<dyn Fn(&WorkerContext) -> axum::Router + Send + Sync>),
    /// Awaited on the worker's runtime before its socket is bound, so the worker is ready
    /// only once it resolves; an error is a start failure.
    Async(Arc<dyn Fn(WorkerContext) -> BoxFuture<anyhow::Result<axum::Router>> + Send + Sync>),
}

/// rip with your app: `Rip::new(app).run()` in `main` gives your binary `serve`, `status`,
/// `reload` and the rest, with `app` served by every worker.
///
/// State in the app lives in each worker process: with several workers, what one worker
/// keeps in memory the others do not see. Keep shared state in a store outside the workers
/// (a database, Redis, files), or serve with `--workers 1`.
#[must_use = "a Rip does nothing until `run` is called"]
pub struct Rip {
    app: AppFactory,
    edge: Option<frontend::Edge>,
}

impl Rip {
    /// Every worker serves the router `app` builds for it.
    pub fn new<F>(app: F) -> Rip
    where
        F: Fn(&WorkerContext) -> axum::Router + Send + Sync + 'static,
    {
        Rip { app: AppFactory::Sync(Arc::new(app)), edge: None }
    }

    /// Every worker serves the router `app` resolves to; the worker is not ready (and gets
    /// no request) before it does. An error stops that worker as a failed start, its message
    /// in the log, and a failing deploy backs off as any other start failure.
    pub fn new_async<F, Fut>(app: F) -> Rip
    where
        F: Fn(WorkerContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<axum::Router>> + Send + 'static,
    {
        let app = move |ctx: WorkerContext| -> BoxFuture<anyhow::Result<axum::Router>> { Box::pin(app(ctx)) };
        Rip { app: AppFactory::Async(Arc::new(app)), edge: None }
    }

    /// Routes and tower layers at the edge, in the parent: `edge` gets the front-end's
    /// router, whose fallback forwards to the workers, and returns it with what it adds —
    /// `.layer(...)` wraps every request, workers' included; `.route(...)` is answered by
    /// the parent without a worker. As everywhere in axum, a layer wraps what the router
    /// holds when it is added: add routes first, then the layers meant to cover them.
    pub fn edge<F>(mut self, edge: F) -> Rip
    where
        F: Fn(axum::Router) -> axum::Router + Send + Sync + 'static,
    {
        self.edge = Some(Arc::new(edge));
        self
    }

    /// Parses the command line and runs the subcommand. Errors are printed once as
    /// `rip: <chain>`, with a non-zero exit code.
    pub fn run(self) -> ExitCode {
        let cli = match cli::Cli::parse_args() {
            Ok(cli) => cli,
            Err(code) => return code,
        };
        let result = match cli.command {
            cli::Command::Serve(args) => serve::run(*args, self.edge),
            cli::Command::Worker(args) => worker::run(args, self.app),
            cli::Command::Launch(args) => launch::launch(args),
            cli::Command::Guard(args) => launch::guard(args),
            // Returns in each forked child as that worker.
            cli::Command::ForkServer(args) => match forkserver::serve(args) {
                Ok(Some(worker)) => worker::run(worker, self.app),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            cli::Command::Status(args) => commands::status(&args),
            cli::Command::Reload(args) => commands::reload(&args),
            cli::Command::Scale(args) => commands::scale(&args),
            cli::Command::Upgrade(args) => commands::upgrade(&args),
            cli::Command::Stop(args) => commands::stop(&args),
            cli::Command::Config(args) => commands::config(&args),
            cli::Command::Completions(args) => cli::print_completions(&args).map_err(Into::into),
            cli::Command::Man => cli::print_man().map_err(Into::into),
        };
        // The log's last lines are on their way to stderr through its writer thread.
        telemetry::sink::Sink::stderr().flush();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("rip: {}", error_chain(&err));
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs rip with `app` as the application: `Rip::new(app).run()`.
pub fn main_with<F>(app: F) -> ExitCode
where
    F: Fn(&WorkerContext) -> axum::Router + Send + Sync + 'static,
{
    Rip::new(app).run()
}

/// The runtime of `rip serve` and of each worker: one thread is a current-thread runtime,
/// where handing work from one task to the next is a local wake-up; more is a work-stealing
/// one with that many threads.
pub(crate) fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

/// Formats an error and its causes on one line, outermost first.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for (i, cause) in err.chain().enumerate() {
        if i > 0 {
            line.push_str(": ");
        }
        line.push_str(&cause.to_string());
    }
    line
}
