//! Starting and signalling one worker process. Invariant: every worker runs in a process
//! group of its own, so a Ctrl-C or a systemd signal meant for `rip serve` never reaches it
//! directly; the supervisor decides when a worker drains and signals its whole group.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use super::spawner::{Process, Spawner};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use std::os::fd::{AsRawFd, OwnedFd};

use crate::discovery::WorkerId;

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
    /// What the readiness and liveness probes ask for.
    pub health_path: String,
    /// Workers that run a command of the user's instead of `rip worker`.
    pub app: Option<App>,
    /// Replacement workers are forked from the fork server.
    pub fork: bool,
}

/// A command's workers (`rip serve -- CMD`).
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub command: Vec<String>,
    pub socket: crate::config::AppSocket,
    pub stop_signal: Signal,
}

/// The fd a command's worker finds its listening socket on (`SD_LISTEN_FDS_START`).
pub const LISTEN_FD: i32 = 3;

/// The command for a worker of `app` at `address`, started through `rip launch` (which
/// sets `LISTEN_PID` to the worker's own pid, as the socket-activation protocol wants, and
/// ties the worker's life to ours). `listener`, with `--app-socket fd`, is the bound socket
/// (an fd the caller keeps open until the process has started), passed as [`LISTEN_FD`].
pub fn app_command(
    exe: &Path,
    app: &App,
    id: WorkerId,
    address: &crate::discovery::Address,
    listener: Option<&OwnedFd>,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("launch").arg("--parent").arg(std::process::id().to_string());
    if let Some(fd) = listener {
        // Inherited under its own number (see `Spawner`); `rip launch` moves it to LISTEN_FD.
        cmd.arg("--listen-fd").arg(fd.as_raw_fd().to_string());
    }
    cmd.arg("--").args(&app.command);
    // What this process was handed is not the worker's: an app that saw NOTIFY_SOCKET would
    // tell systemd it is the service, and the LISTEN_* variables would name our fds.
    for name in ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "PORT", "RIP_SOCKET"] {
        cmd.env_remove(name);
    }
    cmd.env("RIP_WORKER_ID", id.slot.to_string()).env("RIP_WORKER_GENERATION", id.generation.to_string());
    match address {
        crate::discovery::Address::Unix(path) => {
            cmd.env("RIP_SOCKET", path);
        }
        crate::discovery::Address::Tcp(addr) => {
            cmd.env("PORT", addr.port().to_string());
        }
    }
    if listener.is_some() {
        cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "rip");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    cmd
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
/// open until the process has started, and passes to [`Spawner::spawn_worker`] to be inherited).
pub fn command(spec: &Spec, id: WorkerId, socket: &Path, heartbeat: Option<&OwnedFd>) -> Command {
    let mut cmd = Command::new(&spec.exe);
    cmd.args(worker_args(spec, id, socket));
    if let Some(fd) = heartbeat {
        cmd.arg("--heartbeat-fd").arg(fd.as_raw_fd().to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    cmd
}

/// The arguments of `rip worker` for `id` on `socket`, from `worker` on, without the
/// heartbeat's fd (whose number differs between an executed and a forked worker).
pub fn worker_args(spec: &Spec, id: WorkerId, socket: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["worker".into()];
    let mut flag = |name: &str, value: std::ffi::OsString| {
        args.push(name.into());
        args.push(value);
    };
    flag("--socket", socket.into());
    flag("--id", id.slot.to_string().into());
    flag("--generation", id.generation.to_string().into());
    flag("--parent", std::process::id().to_string().into());
    flag("--threads", spec.threads.to_string().into());
    flag("--graceful-ms", spec.graceful_ms.to_string().into());
    flag("--log-format", spec.log_format.as_str().into());
    if let Some(root) = &spec.root {
        flag("--root", root.into());
    }
    if let Some(value) = &spec.cache_control {
        flag("--cache-control", value.into());
    }
    if let Some(limits) = &spec.handoff {
        flag("--header-timeout-ms", limits.header_timeout.as_millis().to_string().into());
        flag("--max-body", limits.max_body.to_string().into());
        flag("--max-connections", limits.max_connections.to_string().into());
        if !limits.trusted_proxies.is_empty() {
            let list: Vec<String> = limits.trusted_proxies.iter().map(ToString::to_string).collect();
            flag("--trusted-proxies", list.join(",").into());
        }
        args.push("--handoff".into());
    }
    args
}

/// Logs each line a command's worker writes, tagged with the worker and the stream, through
/// rip's own log (and so its format and non-blocking writer); stderr's last lines are also
/// kept in `tail`. The returned task ends when both streams have closed.
pub fn log_output(child: &mut Child, id: WorkerId, tail: Tail) -> JoinHandle<()> {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let out = async {
            let Some(stdout) = stdout else { return };
            let (mut reader, mut buf) = (BufReader::new(stdout), Vec::new());
            while let Some(line) = next_line(&mut reader, &mut buf).await {
                tracing::info!(worker = %id, stream = "stdout", "{line}");
            }
        };
        let err = async {
            let Some(stderr) = stderr else { return };
            let (mut reader, mut buf) = (BufReader::new(stderr), Vec::new());
            while let Some(line) = next_line(&mut reader, &mut buf).await {
                tracing::info!(worker = %id, stream = "stderr", "{line}");
                tail.push(line);
            }
        };
        tokio::join!(out, err);
    })
}

/// Copies the worker's stderr to ours line by line, keeping a tail in `tail`; the returned
/// task ends when the worker's stderr closes.
pub fn copy_stderr(process: &mut Process, tail: Tail) -> Option<JoinHandle<()>> {
    let stderr = process.take_stderr()?;
    Some(tokio::spawn(async move {
        let (mut reader, mut buf) = (BufReader::new(stderr), Vec::new());
        while let Some(line) = next_line(&mut reader, &mut buf).await {
            // Whole lines through the parent's stderr sink: lines from several workers and the
            // parent never interleave mid-line, and a reader that stops never stops this task.
            crate::telemetry::sink::Sink::stderr().write_line(format!("{line}\n").into_bytes());
            tail.push(line);
        }
    }))
}

/// Longest line logged as one; a longer one is cut into pieces of this size, so that a
/// worker writing without newlines costs bounded memory.
const MAX_LINE: usize = 16 * 1024;

/// The next line of `reader` without its line ending, cut at [`MAX_LINE`] bytes; `None` at
/// the end. Bytes that are not UTF-8 are replaced rather than ending the copy: a reader that
/// stopped would leave the worker blocked on a full pipe.
async fn next_line<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> Option<String> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await.ok()?;
        if available.is_empty() {
            return (!buf.is_empty()).then(|| decode(buf));
        }
        let room = MAX_LINE - buf.len();
        if let Some(end) = available.iter().take(room).position(|&b| b == b'\n') {
            buf.extend_from_slice(&available[..end]);
            reader.consume(end + 1);
            return Some(decode(buf));
        }
        let taken = available.len().min(room);
        buf.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if buf.len() >= MAX_LINE {
            return Some(decode(buf));
        }
    }
}

fn decode(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(line).into_owned()
}

/// A listening Unix socket at `path` (mode 0600, as rip's own workers bind theirs) for a
/// command's worker, numbered where `rip launch`'s dup2 onto [`LISTEN_FD`] cannot clobber it.
pub fn listen_on(path: &Path) -> anyhow::Result<OwnedFd> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    // The standard library listens with a backlog of 128; a burst at a worker that has just
    // started, before its app accepts, deserves the system's limit.
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXCONN)
        .with_context(|| format!("listening on {}", path.display()))?;
    let high = crate::control::upgrade::dup_high(listener.as_raw_fd())?;
    Ok(high)
}

/// A port on 127.0.0.1 that nothing listens on now, for a worker that listens on `$PORT`.
/// The port is free when chosen, not reserved: the kernel hands out ephemeral ports in turn,
/// so another process taking it before the worker binds would have to be quick and unlucky.
pub fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    let probe = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(probe.local_addr()?)
}

/// The `rip guard` process (see `crate::launch`), told of each command worker's process
/// group so that none outlives us.
#[derive(Debug)]
pub struct Guard {
    /// Non-blocking: a guard that stopped reading must not stall the supervisor.
    pipe: Mutex<std::fs::File>,
    _process: Child,
}

impl Guard {
    pub async fn start(spawner: &Spawner, exe: &Path) -> io::Result<Guard> {
        let mut cmd = Command::new(exe);
        cmd.arg("guard")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Out of our group, so that a Ctrl-C meant for us does not reach it first.
            .process_group(0)
            .kill_on_drop(false);
        let mut process = spawner.spawn(cmd, Vec::new()).await?;
        let pipe = process
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the guard has no stdin"))?
            .into_owned_fd()?;
        let flags = nix::fcntl::fcntl(pipe.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(pipe.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Guard { pipe: Mutex::new(pipe.into()), _process: process })
    }

    /// From now on, the group of `pid` is killed if we die.
    pub fn watch(&self, pid: Pid) {
        self.send(&format!("+{pid}\n"));
    }

    /// The group of `pid` is gone.
    pub fn forget(&self, pid: Pid) {
        self.send(&format!("-{pid}\n"));
    }

    fn send(&self, line: &str) {
        use std::io::Write;
        let mut pipe = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        // A line is a few bytes, far below the pipe's atomic-write size: it goes whole or not.
        if let Err(e) = pipe.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "the worker guard did not take a message: a worker's children may outlive a killed rip");
        }
    }
}

/// Signals the worker's whole process group; a group that is already gone is not an error.
pub fn signal(pid: Pid, signal: Signal) {
    // A worker still being started has no pid yet; killpg(0) would signal our own group.
    if pid.as_raw() <= 0 {
        return;
    }
    // A forked worker makes its group itself, first thing; until then it is alone.
    if killpg(pid, signal) == Err(nix::errno::Errno::ESRCH) {
        let _ = nix::sys::signal::kill(pid, signal);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What the fork server is sent parses to what the executed command says, every setting
    /// included, so that a forked worker runs as an executed one would.
    #[test]
    fn a_forked_workers_arguments_say_what_the_executed_command_says() {
        let spec = Spec {
            exe: "/usr/bin/rip".into(),
            root: Some("/srv/www root".into()),
            cache_control: Some("public, max-age=60".into()),
            threads: 3,
            graceful_ms: 1500,
            log_format: crate::config::LogFormat::Json,
            handoff: Some(crate::worker::ClientLimits {
                header_timeout: std::time::Duration::from_millis(700),
                max_body: 1 << 20,
                max_connections: 9,
                trusted_proxies: crate::config::parse_cidrs("10.0.0.0/8,::1/128").unwrap(),
            }),
            health_path: "/healthz".into(),
            app: None,
            fork: true,
        };
        let id = WorkerId { slot: 2, generation: 7 };
        let socket = Path::new("/run/rip/w2.7.sock");
        let parse =
            |args: Vec<std::ffi::OsString>| match <crate::cli::Cli as clap::Parser>::try_parse_from(args) {
                Ok(crate::cli::Cli { command: crate::cli::Command::Worker(w) }) => format!("{w:?}"),
                other => panic!("not a worker's command line: {other:?}"),
            };
        let executed = command(&spec, id, socket, None);
        let executed: Vec<std::ffi::OsString> = std::iter::once("rip".into())
            .chain(executed.as_std().get_args().map(ToOwned::to_owned))
            .collect();
        let forked: Vec<std::ffi::OsString> =
            std::iter::once("rip".into()).chain(worker_args(&spec, id, socket)).collect();
        assert_eq!(parse(forked.clone()), parse(executed));
        // And so does the fork server's child, which parses them with a command built once.
        let mut cli = crate::forkserver::built_cli();
        let child =
            crate::forkserver::parse_worker(&mut cli, forked[1..].to_vec()).expect("a worker's arguments");
        assert_eq!(format!("{child:?}"), parse(forked.clone()));
        let parsed = parse(forked);
        for expected in
            ["/srv/www root", "public, max-age=60", "threads: 3", "generation: 7", "handoff: true", "::1/128"]
        {
            assert!(parsed.contains(expected), "{expected} not in {parsed}");
        }
    }
}
