//! The access log: one line per request, written by a task of its own so the request path
//! only formats a line and hands it over. Invariant: a slow disk never slows or blocks
//! requests; if the writer falls behind by more than `BACKLOG` lines, lines are dropped and
//! counted, and the count is logged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use tokio::sync::{mpsc, Notify};
use tracing::warn;

use crate::config::{AccessLogTarget, LogFormat};

/// Lines buffered between the request path and the writer.
const BACKLOG: usize = 16_384;

/// Cheap handle to the writer task.
#[derive(Debug, Clone)]
pub struct AccessLog {
    lines: mpsc::Sender<String>,
    format: LogFormat,
    dropped: Arc<AtomicU64>,
    reopen: Arc<Notify>,
}

/// What is known of a request when its response ends.
#[derive(Debug)]
pub struct Record {
    pub peer: IpAddr,
    pub method: Method,
    pub target: String,
    pub status: StatusCode,
    /// The worker that answered, `slot/generation`, or none for rip's own answers.
    pub worker: Option<String>,
    pub started: tokio::time::Instant,
}

impl AccessLog {
    /// Starts the writer; `None` when the log is off.
    pub fn start(target: &AccessLogTarget, format: LogFormat) -> std::io::Result<Option<AccessLog>> {
        let sink = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stderr => Sink::Stderr,
            AccessLogTarget::File(path) => Sink::File { file: open(path)?, path: path.clone() },
        };
        let (lines, rx) = mpsc::channel(BACKLOG);
        let log = AccessLog { lines, format, dropped: Arc::default(), reopen: Arc::default() };
        tokio::spawn(write_lines(rx, sink, log.reopen.clone(), log.dropped.clone()));
        Ok(Some(log))
    }

    /// Reopens the file (after logrotate moved it); SIGUSR1 calls this.
    pub fn reopen(&self) {
        self.reopen.notify_one();
    }

    pub fn write(&self, record: &Record, bytes: u64) {
        let line = format_line(record, bytes, record.started.elapsed(), self.format, SystemTime::now());
        if self.lines.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

enum Sink {
    Stderr,
    File { file: File, path: PathBuf },
}

fn open(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

async fn write_lines(
    mut rx: mpsc::Receiver<String>,
    mut sink: Sink,
    reopen: Arc<Notify>,
    dropped: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            line = rx.recv() => {
                let Some(line) = line else { return };
                batch.extend_from_slice(line.as_bytes());
                // Take whatever else is queued, so one write(2) carries many lines.
                while batch.len() < 60 * 1024 {
                    match rx.try_recv() {
                        Ok(line) => batch.extend_from_slice(line.as_bytes()),
                        Err(_) => break,
                    }
                }
                let result = match &mut sink {
                    Sink::Stderr => std::io::stderr().write_all(&batch),
                    Sink::File { file, .. } => file.write_all(&batch),
                };
                if let Err(e) = result {
                    warn!(error = %e, "access log write failed");
                }
                batch.clear();
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    warn!(lines = lost, "access log fell behind, lines dropped");
                }
            }
            () = reopen.notified() => {
                if let Sink::File { file, path } = &mut sink {
                    match open(path) {
                        Ok(new) => {
                            *file = new;
                            tracing::info!(path = %path.display(), "access log reopened");
                        }
                        Err(e) => warn!(path = %path.display(), error = %e, "access log reopen failed"),
                    }
                }
            }
        }
    }
}

fn format_line(r: &Record, bytes: u64, elapsed: Duration, format: LogFormat, now: SystemTime) -> String {
    let time = rfc3339(now);
    let worker = r.worker.as_deref().unwrap_or("-");
    let ms = elapsed.as_secs_f64() * 1000.0;
    match format {
        LogFormat::Text => format!(
            "{time} {} \"{} {}\" {} {bytes} {ms:.3}ms worker={worker}\n",
            r.peer,
            r.method,
            r.target,
            r.status.as_u16()
        ),
        LogFormat::Json => {
            let line = serde_json::json!({
                "timestamp": time,
                "type": "access",
                "peer": r.peer.to_string(),
                "method": r.method.as_str(),
                "path": r.target,
                "status": r.status.as_u16(),
                "bytes": bytes,
                "duration_ms": (ms * 1000.0).round() / 1000.0,
                "worker": r.worker,
            });
            format!("{line}\n")
        }
    }
}

/// `2026-11-25T20:31:40.972Z`, in UTC.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            peer: "127.0.0.1".parse().unwrap(),
            method: Method::GET,
            target: "/a?b=1".into(),
            status: StatusCode::OK,
            worker: Some("1/2".into()),
            started: tokio::time::Instant::now(),
        }
    }

    #[test]
    fn formats_a_text_line() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_102_700_123);
        let line = format_line(&record(), 42, Duration::from_micros(1500), LogFormat::Text, t);
        assert_eq!(line, "2025-11-25T20:31:40.123Z 127.0.0.1 \"GET /a?b=1\" 200 42 1.500ms worker=1/2\n");
    }

    #[test]
    fn formats_a_json_line() {
        let line = format_line(&record(), 7, Duration::from_millis(3), LogFormat::Json, SystemTime::now());
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 7);
        assert_eq!(v["worker"], "1/2");
        assert_eq!(v["path"], "/a?b=1");
    }

    #[test]
    fn dates_are_civil() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(rfc3339(t).starts_with("2000-02-29T00:00:00"));
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
