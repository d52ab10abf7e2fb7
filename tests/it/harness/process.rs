//! Processes: signals, liveness, memory, waiting on a condition with a deadline, and
//! [`Process`], the guard every child of a test runs under (a [`Rip`](super::Rip) holds one);
//! [`Orphan`] is that guard for a serve the test did not start itself.
//! Every child gets the same surroundings ([`isolate`]), so only what the test says
//! configures it.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::logs::{spawned_pids, Logs};
use super::workers::worker_processes;
use super::{POLL, WAIT};

/// Sends `signal` to one process (a worker, say), not to its group.
pub fn send_signal(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap_or_else(|e| panic!("sending {signal} to {pid}: {e}"));
}

/// True while `pid` names a process that has not exited. A zombie (exited, not yet reaped)
/// counts as gone.
pub fn is_running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X') | Some('x'))
}

/// Waits until none of `pids` is running; returns those still running at the deadline.
pub fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|p| is_running(*p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `cond` holds; false at the deadline.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// A process's memory, from /proc/<pid>/status, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Peak resident set size (VmHWM).
    pub peak: u64,
    /// Resident set size now (VmRSS).
    pub resident: u64,
}

pub fn memory(pid: i32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let value = line[key.len()..].trim().trim_end_matches("kB").trim();
        value.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some(Memory { peak: kib("VmHWM:")?, resident: kib("VmRSS:")? })
}

/// Gives `cmd` what every process under test gets: no stdin or stdout, stderr piped for the
/// guard to capture, `RUST_LOG=info`, and none of the caller's `RIP_*` variables. Variables the
/// test sets on `cmd` afterwards win.
pub(super) fn isolate(cmd: &mut Command) {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RIP_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info");
}

/// A child of the test: stderr captured, killed on drop, stderr printed if the test failed.
/// Unlike a [`Rip`](super::Rip) it learns no address and waits for nothing; the test does. For
/// a child the harness cannot start as a `Rip` (it needs a `pre_exec`, or runs a binary in a
/// way of its own).
#[derive(Debug)]
pub struct Process {
    pub(super) child: Child,
    pub(super) logs: Arc<Logs>,
    status: Option<ExitStatus>,
    command: String,
}

impl Process {
    /// Starts `cmd` [`isolate`]d; isolation comes last, so it overrides a `RUST_LOG` on `cmd`.
    pub fn spawn(mut cmd: Command) -> Process {
        let command = format!("{cmd:?}");
        isolate(&mut cmd);
        Process::spawn_isolated(cmd, command)
    }

    /// Starts `cmd`, which the caller [`isolate`]d, naming it `command` in messages.
    pub(super) fn spawn_isolated(mut cmd: Command, command: String) -> Process {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {command}: {e}"));
        let logs = Logs::capture(child.stderr.take().expect("stderr is piped"));
        Process { child, logs, status: None, command }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lines()
    }

    /// The first line containing `needle`, waiting up to `timeout`. `None` at the deadline, or
    /// once the process exited without such a line.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.logs().into_iter().find(|l| l.contains(needle));
            found.is_some() || matches!(self.child.try_wait(), Ok(Some(_)))
        });
        found
    }

    /// Pids of every worker it logged as spawned, in order.
    pub fn worker_pids(&self) -> Vec<i32> {
        spawned_pids(&self.logs())
    }

    /// Its exit status, waiting up to `timeout`; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || {
            self.status =
                self.child.try_wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.command));
            self.status.is_some()
        });
        self.status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            self.logs.print(&self.command);
        }
    }
}

/// A `rip serve` that is not the test's child (the new one after an upgrade): killed on drop.
#[derive(Debug)]
pub struct Orphan(pub i32);

impl Orphan {
    /// SIGTERM, and wait until it and its workers are gone.
    pub fn stop(&self) {
        let workers: Vec<i32> = worker_processes(self.0).into_iter().collect();
        let _ = kill(Pid::from_raw(self.0), Signal::SIGTERM);
        assert!(wait_gone(&[self.0], WAIT).is_empty(), "rip serve {} did not stop", self.0);
        assert!(wait_gone(&workers, WAIT).is_empty(), "workers of {} did not stop", self.0);
    }
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if is_running(self.0) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
            wait_gone(&[self.0], WAIT);
        }
    }
}
