//! A binary that sets up `tracing` itself, as most axum apps do in `main`, before handing its
//! app to rip. rip then logs through that subscriber rather than installing its own; when the
//! subscriber's filter drops rip's events, rip says so on stderr at start, once.
//!
//! ```text
//! cargo run --example own_tracing -- serve                     # rip's log filtered out: one warning
//! APP_LOG=own_tracing=info,rip=info cargo run --example own_tracing -- serve   # both logs
//! ```

use std::io::IsTerminal;
use std::process::ExitCode;

use axum::routing::get;
use axum::Router;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The filter axum's own examples start from: this crate's events only.
    let filter = std::env::var("APP_LOG").unwrap_or_else(|_| "own_tracing=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    rip::main_with(|ctx: &rip::WorkerContext| {
        tracing::info!(worker = ctx.id, "own_tracing app built");
        Router::new().route("/", get(|| async { "hello from an app with its own tracing" }))
    })
}
