//! The control commands (`rip status`, `reload`, `scale`, `upgrade`, `stop`) run from the real
//! binary against a server's runtime dir, as an operator would; and [`settle`], which waits
//! until what `rip status` lists is exactly the worker processes the serve has.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::workers::worker_processes;
use super::{Rip, SETTLE};

/// Longest a `rip <command>` client may run; above the `--timeout` given to the waiting ones.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);

/// How `rip <command>` finds the server: `--runtime-dir <base>` or `--control <socket>`.
#[derive(Debug)]
pub struct Control(Vec<OsString>);

/// What a `rip <command>` run printed, and how it exited.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// `rip status --json`, the fields the tests read.
#[derive(Debug, Deserialize)]
pub struct Status {
    pub pid: i32,
    pub workers_ready: usize,
    /// Requests in flight on all workers.
    pub in_flight: usize,
    pub workers: Vec<Row>,
}

#[derive(Debug, Deserialize)]
pub struct Row {
    pub id: String,
    pub pid: i32,
    pub state: String,
}

impl Control {
    /// The binary alone, for commands that talk to no rip (`rip config`, `--help`).
    pub fn cli() -> Control {
        Control(Vec::new())
    }

    /// The rips under `base`, found as the commands find them by default.
    pub fn under(base: &Path) -> Control {
        Control(vec!["--runtime-dir".into(), base.into()])
    }

    /// The one rip in `rip`'s runtime dir, found as the commands find it by default.
    pub fn of(rip: &Rip) -> Control {
        Control(vec!["--runtime-dir".into(), rip.runtime_dir().into()])
    }

    /// The control socket of the serve with `pid` under `base`.
    pub fn at(base: &Path, pid: i32) -> Control {
        Control(vec!["--control".into(), base.join(pid.to_string()).join("control.sock").into()])
    }

    /// Runs the real binary as a client, with none of the caller's RIP_* variables.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_env(args, &[])
    }

    /// Like [`Self::run`], with `env` set.
    pub fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rip"));
        cmd.args(args).args(&self.0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RIP_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("starting the rip client");
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the rip client") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rip {args:?} did not finish within {CLIENT_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The outputs are a few lines, far below a pipe's capacity, so nothing blocked above.
        let mut stdout = String::new();
        let mut stderr = String::new();
        child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        Output { status, stdout, stderr }
    }

    pub fn status(&self) -> Status {
        let out = self.run(&["status", "--json"]);
        assert!(out.status.success(), "rip status --json failed: {out:?}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("rip status --json: {e}: {}", out.stdout))
    }
}

/// Waits until `rip status` lists exactly `n` workers, all ready, and those are exactly the
/// worker processes `serve` has; returns their pids.
pub fn settle(control: &Control, serve: i32, n: usize) -> BTreeSet<i32> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let status = control.status();
        let listed: BTreeSet<i32> = status.workers.iter().map(|w| w.pid).collect();
        let ready = status.workers.iter().all(|w| w.state == "ready");
        let processes = worker_processes(serve);
        if status.workers.len() == n && status.workers_ready == n && ready && listed == processes {
            return listed;
        }
        assert!(
            Instant::now() < deadline,
            "not settled on {n} ready workers within {SETTLE:?}: status {status:?}, processes {processes:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
