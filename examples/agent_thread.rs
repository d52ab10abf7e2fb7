//! A binary that starts a thread of its own in `main` before handing its app to rip, as a
//! metrics or error-reporting agent does. rip's fork server runs this `main` too, and a
//! process with a second thread cannot be forked safely (the child could inherit a lock that
//! thread held), so rip executes every worker instead and says so once in its log.
//!
//! ```text
//! cargo run --example agent_thread -- serve --max-requests 5
//! ```

use std::process::ExitCode;

use axum::routing::get;
use axum::Router;

fn main() -> ExitCode {
    // Stands for the agent: a thread that lives as long as the process.
    if let Err(e) = std::thread::Builder::new().name("agent".into()).spawn(|| loop {
        std::thread::park();
    }) {
        eprintln!("agent_thread: cannot start the agent: {e}");
        return ExitCode::FAILURE;
    }
    rip::main_with(|_ctx: &rip::WorkerContext| {
        Router::new().route("/", get(|| async { "hello from an app with an agent thread" }))
    })
}
