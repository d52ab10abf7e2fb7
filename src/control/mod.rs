//! The control socket: a user-only Unix socket in the instance's runtime directory through
//! which `rip status`, `reload`, `scale`, `upgrade` and `stop` talk to a running `rip serve`.
//! One JSON line in, one JSON line out. Commands become the same intents as signals, so
//! `rip reload` and SIGHUP can never behave differently.

/// `rip status`, `reload`, `scale`, `upgrade`, `stop`: the client side of the control socket.
pub mod commands;
/// Readiness and state messages to systemd and to a previous rip during an upgrade.
pub mod notify;
/// Signals turned into intents; the only place that reads them.
pub mod signals;
/// `rip upgrade`: hand the listener to a new `rip serve` and wait until it is ready.
pub mod upgrade;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::control::signals::{Intent, IntentSender, Scale};
use crate::proxy::Proxy;
use crate::supervisor::SupervisorHandle;

/// The control socket's name inside the instance directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest a command line may be; anything longer is not ours.
const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Status,
    Reload { wait: bool },
    Scale { workers: usize },
    Upgrade,
    Stop,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The new serve pid, after an upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Response {
    fn ok() -> Response {
        Response { ok: true, ..Default::default() }
    }

    fn error(message: impl Into<String>) -> Response {
        Response { ok: false, error: Some(message.into()), ..Default::default() }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// Pid of `rip serve`.
    pub pid: u32,
    pub workers_ready: usize,
    pub workers: Vec<WorkerRow>,
    pub requests: u64,
    pub in_flight: usize,
    /// Upgraded connections (WebSockets) open, apart from requests.
    #[serde(default)]
    pub tunnels: usize,
    pub rss_bytes: u64,
    /// Since `rip serve` started, across every worker that has come and gone.
    #[serde(default)]
    pub lifetime: Lifetime,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lifetime {
    pub uptime_secs: f64,
    /// Requests answered.
    pub requests: u64,
    /// Healthy workers replaced (max requests, memory, age, reload).
    pub recycles: u64,
    /// Workers replaced after exiting unexpectedly (a crash, a kill, a hang).
    pub restarts: u64,
    /// Time to response headers summed over the answered requests, and how many: the status
    /// page's mean latency over a window is the change of one over the change of the other.
    #[serde(default)]
    pub latency_sum_secs: f64,
    #[serde(default)]
    pub latency_count: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerRow {
    /// `slot/generation`.
    pub id: String,
    pub pid: i32,
    pub state: String,
    pub age_secs: f64,
    /// Requests the front-end sent to this worker.
    pub requests: u64,
    pub in_flight: usize,
    #[serde(default)]
    pub tunnels: usize,
    pub rss_bytes: u64,
    pub last_exit: Option<String>,
}

/// What the control socket acts on.
#[derive(Debug, Clone)]
pub struct Controls {
    pub supervisor: SupervisorHandle,
    pub proxy: Proxy,
    pub intents: IntentSender,
    /// When `rip serve` started, for the status's uptime.
    pub started: std::time::Instant,
}

impl Controls {
    pub async fn status(&self) -> Status {
        let counts = self.proxy.worker_counts();
        let (requests, recycles, restarts) = self.proxy.metrics().lifetime();
        let (latency_sum_secs, latency_count) = self.proxy.metrics().latency_totals();
        let lifetime = Lifetime {
            uptime_secs: self.started.elapsed().as_secs_f64(),
            requests,
            recycles,
            restarts,
            latency_sum_secs,
            latency_count,
        };
        let mut status = Status { pid: std::process::id(), lifetime, ..Default::default() };
        for w in self.supervisor.status().await {
            let (requests, in_flight, tunnels) =
                counts.iter().find(|c| c.id == w.id).map_or((0, 0, 0), |c| (c.sent, c.in_flight, c.tunnels));
            if w.state == crate::supervisor::WorkerState::Ready {
                status.workers_ready += 1;
            }
            status.requests += requests;
            status.in_flight += in_flight;
            status.tunnels += tunnels;
            status.rss_bytes += w.rss_bytes;
            status.workers.push(WorkerRow {
                id: w.id.to_string(),
                pid: w.pid,
                state: w.state.as_str().to_string(),
                age_secs: w.age.as_secs_f64(),
                requests,
                in_flight,
                tunnels,
                rss_bytes: w.rss_bytes,
                last_exit: w.last_exit,
            });
        }
        status
    }

    async fn answer(&self, request: Request) -> Response {
        match request {
            Request::Status => Response { status: Some(self.status().await), ..Response::ok() },
            Request::Reload { wait: false } => self.send(Intent::Reload(None)),
            Request::Reload { wait: true } => {
                let (tx, rx) = oneshot::channel();
                self.ask(Intent::Reload(Some(tx)), rx).await.map_or_else(Response::error, |()| Response::ok())
            }
            Request::Scale { workers: 0 } => Response::error("workers must be at least 1"),
            Request::Scale { workers } => self.send(Intent::Scale(Scale::To(workers))),
            Request::Upgrade => {
                let (tx, rx) = oneshot::channel();
                match self.ask(Intent::Upgrade(Some(tx)), rx).await {
                    Ok(pid) => Response { pid: Some(pid), ..Response::ok() },
                    Err(e) => Response::error(e),
                }
            }
            Request::Stop => self.send(Intent::Shutdown(crate::control::signals::Stop::Command)),
        }
    }

    fn send(&self, intent: Intent) -> Response {
        match self.intents.send(intent) {
            Ok(()) => Response::ok(),
            Err(_) => Response::error("shutting down"),
        }
    }

    async fn ask<T>(&self, intent: Intent, rx: oneshot::Receiver<Result<T, String>>) -> Result<T, String> {
        self.intents.send(intent).map_err(|_| "shutting down".to_string())?;
        rx.await.unwrap_or_else(|_| Err("shutting down".into()))
    }
}

/// Binds the control socket (mode 0600); the returned future answers commands until dropped.
pub fn serve(
    path: &Path,
    controls: Controls,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: wait rather than spin on a full file table.
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(crate::frontend::connections::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let controls = controls.clone();
            tokio::spawn(async move {
                if let Err(e) = answer_connection(stream, &controls).await {
                    debug!(error = %e, "control connection failed");
                }
            });
        }
    })
}

async fn answer_connection(stream: UnixStream, controls: &Controls) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = AsyncBufReader::new(read).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => controls.answer(request).await,
        Err(e) => {
            warn!(error = %e, "bad control command");
            Response::error(format!("bad command: {e}"))
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

/// Finds the control socket of the one `rip serve` running for this user under `base`.
/// The file in a rip's runtime directory that names the address it listens on, for the
/// commands' hint when several rips run.
pub const LISTEN_NAME: &str = "listen";

pub fn discover(base: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let socket = entry.path().join(SOCKET_NAME);
            let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            if alive && socket.exists() {
                found.push((pid, socket));
            }
        }
    }
    match found.len() {
        0 => bail!("no running rip found in {} (is rip serve running as this user?)", base.display()),
        1 => Ok(found.remove(0).1),
        n => {
            found.sort();
            let each: Vec<String> = found
                .iter()
                .map(|(pid, socket)| {
                    let listen = socket.parent().map(|dir| dir.join(LISTEN_NAME));
                    let addr = listen.and_then(|path| std::fs::read_to_string(path).ok());
                    let addr = addr.as_deref().map_or("an unknown address", str::trim);
                    format!("pid {pid} on {addr}: --control {}", socket.display())
                })
                .collect();
            bail!("{n} rip instances are running; choose one with --control ({})", each.join("; "))
        }
    }
}

/// Sends one command and waits up to `timeout` for the answer.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Response> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout)).context("setting a timeout")?;
    let mut line = serde_json::to_vec(request).context("encoding the command")?;
    line.push(b'\n');
    stream.write_all(&line).with_context(|| format!("writing to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).with_context(|| {
        format!("waiting for an answer from {} (no answer within {} s)", socket.display(), timeout.as_secs())
    })?;
    if answer.is_empty() {
        return Err(anyhow!("rip closed the control connection without answering"));
    }
    serde_json::from_str(&answer).context("decoding the answer")
}

/// `rip status` as a table, readable like `pm2 ls`.
pub fn format_status(status: &Status) -> String {
    let mut out = format!(
        "{:<8} {:>8}  {:<9} {:>8} {:>9} {:>9} {:>7} {:>10}  {}\n",
        "WORKER", "PID", "STATE", "AGE", "REQUESTS", "IN FLIGHT", "TUNNELS", "RSS", "LAST EXIT"
    );
    for w in &status.workers {
        out.push_str(&format!(
            "{:<8} {:>8}  {:<9} {:>8} {:>9} {:>9} {:>7} {:>10}  {}\n",
            w.id,
            w.pid,
            w.state,
            age(w.age_secs),
            w.requests,
            w.in_flight,
            w.tunnels,
            mib(w.rss_bytes),
            w.last_exit.as_deref().unwrap_or("-")
        ));
    }
    out.push_str(&format!(
        "rip pid {}: {} of {} workers ready, {} requests sent to them, {} in flight, {} tunnels, {} in workers\n",
        status.pid,
        status.workers_ready,
        status.workers.len(),
        status.requests,
        status.in_flight,
        status.tunnels,
        mib(status.rss_bytes)
    ));
    let life = &status.lifetime;
    out.push_str(&format!(
        "since start ({} ago): {} requests, {} workers recycled, {} restarted\n",
        age(life.uptime_secs),
        life.requests,
        life.recycles,
        life.restarts
    ));
    out
}

fn age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_as_json() {
        for request in [
            Request::Status,
            Request::Reload { wait: true },
            Request::Scale { workers: 3 },
            Request::Upgrade,
            Request::Stop,
        ] {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request, "{line}");
        }
        assert_eq!(
            serde_json::to_string(&Request::Scale { workers: 3 }).unwrap(),
            r#"{"command":"scale","workers":3}"#
        );
    }

    #[test]
    fn status_table_has_a_row_per_worker_and_totals() {
        let status = Status {
            pid: 42,
            workers_ready: 1,
            workers: vec![WorkerRow {
                id: "0/3".into(),
                pid: 100,
                state: "ready".into(),
                age_secs: 125.0,
                requests: 7,
                in_flight: 1,
                tunnels: 2,
                rss_bytes: 3 * 1024 * 1024,
                last_exit: Some("signal 9 (SIGKILL)".into()),
            }],
            requests: 7,
            in_flight: 1,
            tunnels: 2,
            rss_bytes: 3 * 1024 * 1024,
            lifetime: Lifetime {
                uptime_secs: 3700.0,
                requests: 99_000,
                recycles: 98,
                restarts: 1,
                ..Default::default()
            },
        };
        let table = format_status(&status);
        assert!(table.lines().nth(1).unwrap().starts_with("0/3"), "{table}");
        assert!(table.contains("2m05s") && table.contains("3.0 MiB") && table.contains("SIGKILL"), "{table}");
        assert!(
            table.contains("1 of 1 workers ready, 7 requests sent to them, 1 in flight, 2 tunnels"),
            "{table}"
        );
        assert!(
            table.contains("since start (1h01m ago): 99000 requests, 98 workers recycled, 1 restarted"),
            "{table}"
        );
    }

    #[test]
    fn discovery_explains_when_nothing_runs() {
        let err = discover(Path::new("/nonexistent-rip-dir")).unwrap_err().to_string();
        assert!(err.contains("no running rip"), "{err}");
    }
}
