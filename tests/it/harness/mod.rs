//! Starting rip for a test, and talking HTTP to it.
//!
//! [`Rip`] runs the real binary (`rip serve --port 0 --runtime-dir <private temp dir>`),
//! captures its stderr, learns the address from the `rip started` line, waits for `/healthz`,
//! and on drop kills it (workers die with it) and prints the captured stderr if the test
//! failed. [`Process`] is that guard without the address and the `/healthz` wait, for a child
//! the harness cannot start as a [`Rip`].
//! [`Client`] and [`Load`] speak HTTP/1.1 to it on loopback only, and the `raw` helpers write
//! by hand what no client would send.
//!
//! Tests are plain `#[test]` functions: processes are driven from the test thread, and the
//! HTTP side runs on a [`runtime`] the test builds, so no blocking wait ever sits on an async
//! worker thread.
//!
//! Every wait here is a loop on a condition with a deadline; none is a bare sleep.
//!
//! By topic: `rip` (the guard), `process` (other processes, signals, waiting), `workers` (a
//! serve's workers and what they are doing), `logs` (reading rip's stderr), `control` (the
//! `rip <command>` clients), `deploy` (replacing a binary under a running rip), `notify`
//! (systemd's notify socket), `http` (the client), `raw` (bytes on a socket), `pattern`
//! (checkable bodies), `load` (bounded load), `prometheus` (reading `/metrics`), `example`
//! (the library's example binaries), `websocket` (a minimal WebSocket client), `temp_dir`.
//! Everything is re-exported here, so tests `use crate::harness::...` without knowing the
//! split.

// Helpers for every test module; not each is used by each.
#![allow(dead_code)]

use std::time::Duration;

pub mod chromium;
mod control;
mod deploy;
mod example;
pub mod h2raw;
mod http;
mod load;
mod logs;
mod notify;
mod pattern;
mod process;
mod prometheus;
mod raw;
mod rip;
mod temp_dir;
mod websocket;
mod workers;

// Whole modules, so that an item no test uses yet is no unused import.
pub use control::*;
pub use deploy::*;
pub use example::*;
pub use http::*;
pub use load::*;
pub use logs::*;
pub use notify::*;
pub use pattern::*;
pub use process::*;
pub use prometheus::*;
pub use raw::*;
pub use rip::*;
pub use temp_dir::*;
pub use websocket::*;
pub use workers::*;

/// Longest wait for rip to log its address and answer `/healthz`: generous because the
/// machine is small and shared with compilers.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a log line or a process state in the common case.
pub const WAIT: Duration = Duration::from_secs(20);
/// Longest a rolling reload, a scale or an upgrade may take to settle: every worker of a
/// debug build starting and being probed, on two cores shared with compilers.
pub const SETTLE: Duration = Duration::from_secs(60);
/// Longest a single client request may take before the test fails instead of hanging.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between polls inside a deadline loop.
const POLL: Duration = Duration::from_millis(5);

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The runtime the HTTP side of a test runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the test runtime")
}

/// A port nothing listens on now, for a server started where its log cannot tell the test
/// which port it bound. Racy in principle; the kernel does not hand the same ephemeral port
/// out again at once.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
