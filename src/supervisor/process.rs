//! Starting and signalling one worker process. Invariant: every worker runs in a process
//! group of its own, so a Ctrl-C or a systemd signal meant for `rip serve` never reaches it
//! directly; the supervisor decides when a worker drains and signals its whole group.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use std::os::fd::{AsRawFd, OwnedFd};

use crate::discovery::WorkerId;
use crate::heartbeat;

/// Lines of a worker's stderr kept to explain why it died.
const TAIL_LINES: usize = 8;

/// Everything `rip worker` is started with.
#[derive(Debug, Clone)]
pub struct Spec {
    pub exe: PathBuf,
    pub root: Option<PathBuf>,
    /// With `root`: the Cache-Control of each file.
    pub cache_control: Option<String>,
    pub threads: usize,
    pub graceful_ms: u64,
    pub log_format: crate::config::LogFormat,
    /// `--upstream handoff`: workers also serve clients directly, within these limits.
    pub handoff: Option<crate::worker::ClientLimits>,
}

/// The last lines a worker wrote to stderr.
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines joined with ` | `, for one log field.
    pub fn joined(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(String::as_str).collect::<Vec<_>>().join(" | ")
    }
}

/// The `rip worker` command for `id` on `socket`, given `heartbeat` (an fd the caller keeps
/// open until the process has started) as [`heartbeat::CHILD_FD`].
pub fn command(spec: &Spec, id: WorkerId, socket: &Path, heartbeat: Option<&OwnedFd>) -> Command {
    let mut cmd = Command::new(&spec.exe);
    cmd.arg("worker")
        .arg("--socket")
        .arg(socket)
        .arg("--id")
        .arg(id.slot.to_string())
        .arg("--generation")
        .arg(id.generation.to_string())
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--threads")
        .arg(spec.threads.to_string())
        .arg("--graceful-ms")
        .arg(spec.graceful_ms.to_string())
        .arg("--log-format")
        .arg(spec.log_format.as_str());
    if let Some(root) = &spec.root {
        cmd.arg("--root").arg(root);
    }
    if let Some(value) = &spec.cache_control {
        cmd.arg("--cache-control").arg(value);
    }
    if let Some(limits) = &spec.handoff {
        cmd.arg("--handoff")
            .arg("--header-timeout-ms")
            .arg(limits.header_timeout.as_millis().to_string())
            .arg("--max-body")
            .arg(limits.max_body.to_string())
            .arg("--max-connections")
            .arg(limits.max_connections.to_string());
        if !limits.trusted_proxies.is_empty() {
            let list: Vec<String> = limits.trusted_proxies.iter().map(ToString::to_string).collect();
            cmd.arg("--trusted-proxies").arg(list.join(","));
        }
    }
    if let Some(fd) = heartbeat {
        let fd = fd.as_raw_fd();
        cmd.arg("--heartbeat-fd").arg(heartbeat::CHILD_FD.to_string());
        // SAFETY: between fork and exec the closure only calls dup2, which is
        // async-signal-safe; the copy it makes has no FD_CLOEXEC, so the page survives the exec
        // in this child alone. `fd` is numbered 10 or above (see `dup_high`), never CHILD_FD.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::dup2(fd, heartbeat::CHILD_FD)?;
                Ok(())
            });
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    cmd
}

/// Copies the worker's stderr to ours line by line, keeping a tail in `tail`; the returned
/// task ends when the worker's stderr closes.
pub fn copy_stderr(child: &mut Child, tail: Tail) -> Option<JoinHandle<()>> {
    let stderr = child.stderr.take()?;
    Some(tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // Whole lines through the parent's stderr sink: lines from several workers and the
            // parent never interleave mid-line, and a reader that stops never stops this task.
            crate::telemetry::sink::Sink::stderr().write_line(format!("{line}\n").into_bytes());
            tail.push(line);
        }
    }))
}

/// Starts processes on a thread of its own, for two reasons. Starting a process blocks the
/// caller until the child has called exec (about a millisecond), which on the front-end's
/// single thread would stall every request each time a worker is recycled. And the kernel
/// sends a worker its parent-death signal when the *thread* that started it exits, so that
/// thread must live as long as the workers: tokio's blocking pool retires idle threads.
#[derive(Debug, Clone)]
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<(Command, oneshot::Sender<io::Result<Child>>)>,
}

impl Spawner {
    /// Starts the thread; must be called inside the runtime the children are reaped by.
    pub fn start() -> io::Result<Spawner> {
        let (jobs, queue) = std::sync::mpsc::channel::<(Command, oneshot::Sender<io::Result<Child>>)>();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new().name("rip-spawner".into()).spawn(move || {
            let _entered = runtime.enter();
            for (mut cmd, reply) in queue {
                let _ = reply.send(cmd.spawn());
            }
        })?;
        Ok(Spawner { jobs })
    }

    pub async fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply, child) = oneshot::channel();
        self.jobs.send((cmd, reply)).map_err(|_| io::Error::other("the spawner thread is gone"))?;
        child.await.map_err(|_| io::Error::other("the spawner thread is gone"))?
    }
}

/// Signals the worker's whole process group; a group that is already gone is not an error.
pub fn signal(pid: Pid, signal: Signal) {
    // A worker still being started has no pid yet; killpg(0) would signal our own group.
    if pid.as_raw() <= 0 {
        return;
    }
    let _ = killpg(pid, signal);
}

/// "exit code 3", "signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(sig) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        },
        None => "unknown status".into(),
    }
}
