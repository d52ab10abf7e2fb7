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
use tokio::task::JoinHandle;

use crate::discovery::WorkerId;

/// Lines of a worker's stderr kept to explain why it died.
const TAIL_LINES: usize = 8;

/// Everything `rip worker` is started with.
#[derive(Debug, Clone)]
pub struct Spec {
    pub exe: PathBuf,
    pub root: Option<PathBuf>,
    pub threads: usize,
    pub graceful_ms: u64,
    pub log_format: &'static str,
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

/// Starts `rip worker` for `id` on `socket`. The worker's stderr is copied to ours line by
/// line, keeping a tail; the returned task ends when the worker's stderr closes.
pub fn spawn(spec: &Spec, id: WorkerId, socket: &Path) -> io::Result<(Child, Tail, Option<JoinHandle<()>>)> {
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
        .arg(spec.log_format);
    if let Some(root) = &spec.root {
        cmd.arg("--root").arg(root);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn()?;
    let tail = Tail::default();
    let copier = child.stderr.take().map(|stderr| {
        let tail = tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // One short write per line to our own stderr: lines from several workers and
                // the parent never interleave mid-line.
                let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
                tail.push(line);
            }
        })
    });
    Ok((child, tail, copier))
}

/// Signals the worker's whole process group; a group that is already gone is not an error.
pub fn signal(pid: Pid, signal: Signal) {
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
