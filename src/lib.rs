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

/// One line per request, written off the request path.
pub mod access_log;
/// The optional admin listener: /metrics, /live, /ready.
pub mod admin;
/// The demo routes and the static file server.
pub mod app;
/// Command-line definition: `serve` and the hidden `worker`.
pub mod cli;
/// `rip status`, `reload`, `scale`, `upgrade`, `stop`: the client side of the control socket.
pub mod commands;
/// Flags, `RIP_*` environment, rip.toml and defaults merged into one validated [`config::Config`].
pub mod config;
/// The HTTP connections a listener accepted, stopped together with grace.
pub mod connections;
/// The control socket behind `rip status`, `reload`, `scale`, `upgrade` and `stop`.
pub mod control;
/// The messages between supervisor and proxy: workers joining and leaving, workers in trouble.
pub mod discovery;
/// Strict request framing: ambiguous request heads are made unparseable before hyper reads them.
pub mod framing;
/// The parent's public listener: accepts connections and serves them through the proxy.
pub mod frontend;
/// `--upstream handoff`: client sockets passed to workers over SCM_RIGHTS.
pub mod handoff;
/// The public listening socket: inherited, passed by systemd, or bound.
pub mod listener;
/// Log setup shared by the parent and the workers.
pub mod logging;
/// Counters and the Prometheus text for the admin listener.
pub mod metrics;
/// Readiness and state messages to systemd and to a previous rip during an upgrade.
pub mod notify;
/// The request path from the front-end to a worker: endpoints, balancing, retries, errors.
pub mod proxy;
/// The private directory that holds the workers' sockets.
pub mod runtime_dir;
/// The parent's script: bind, start the supervisor, serve, shut down in order.
pub mod serve;
/// Signals turned into intents; the only place that reads them.
pub mod signals;
/// Worker processes: spawn, readiness, recycle, replace, stop with grace.
pub mod supervisor;
/// `rip upgrade`: hand the listener to a new `rip serve` and wait until it is ready.
pub mod upgrade;
/// `rip worker`: serve the app on a Unix socket and drain when told to.
pub mod worker;

use std::process::ExitCode;

pub use worker::WorkerContext;

/// Builds the app a worker serves. Called once per worker process.
pub type AppFactory = fn(&WorkerContext) -> axum::Router;

/// Runs rip with `app` as the application: parses the command line, sets up logging and
/// dispatches to `serve` or `worker`. Errors are printed once as `rip: <chain>`.
pub fn main_with(app: AppFactory) -> ExitCode {
    let cli = match cli::Cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        cli::Command::Serve(args) => serve::run(*args),
        cli::Command::Worker(args) => worker::run(args, app),
        cli::Command::Status(args) => commands::status(&args),
        cli::Command::Reload(args) => commands::reload(&args),
        cli::Command::Scale(args) => commands::scale(&args),
        cli::Command::Upgrade(args) => commands::upgrade(&args),
        cli::Command::Stop(args) => commands::stop(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rip: {}", error_chain(&err));
            ExitCode::FAILURE
        }
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
