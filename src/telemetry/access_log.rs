//! The access log: one line per request, formatted on the request path and written by a
//! thread that is not the server's. Invariant: a slow disk or a reader that stops reading
//! stderr never slows or blocks requests; when the writer falls behind, lines are dropped
//! and counted, and the count is logged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use tracing::warn;

use super::sink::Sink;
use crate::config::{AccessLogTarget, LogFormat};

/// Lines buffered between the request path and a file's writer.
const BACKLOG: usize = 16_384;

/// Cheap handle to the log.
#[derive(Debug, Clone)]
pub struct AccessLog {
    to: Destination,
    format: LogFormat,
}

#[derive(Debug, Clone)]
enum Destination {
    /// The process's stderr sink, shared with the rest of its log.
    Stderr(&'static Sink),
    File {
        lines: SyncSender<String>,
        dropped: Arc<AtomicU64>,
        reopen: Arc<AtomicBool>,
    },
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
        let to = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stderr => Destination::Stderr(Sink::stderr()),
            AccessLogTarget::File(path) => {
                let file = open(path)?;
                let (lines, queue) = sync_channel(BACKLOG);
                let (dropped, reopen) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
                let writer =
                    FileWriter { file, path: path.clone(), dropped: dropped.clone(), reopen: reopen.clone() };
                std::thread::Builder::new().name("rip-access-log".into()).spawn(move || writer.run(queue))?;
                Destination::File { lines, dropped, reopen }
            }
        };
        Ok(Some(AccessLog { to, format }))
    }

    /// Reopens the file (after logrotate moved it) before its next line; SIGUSR1 calls this.
    pub fn reopen(&self) {
        if let Destination::File { reopen, lines, .. } = &self.to {
            reopen.store(true, Ordering::Relaxed);
            // An empty line wakes the writer, so that the reopen does not wait for traffic.
            let _ = lines.try_send(String::new());
        }
    }

    pub fn write(&self, record: &Record, bytes: u64) {
        let line = format_line(record, bytes, record.started.elapsed(), self.format, SystemTime::now());
        match &self.to {
            Destination::Stderr(sink) => sink.write_line(line.into_bytes()),
            Destination::File { lines, dropped, .. } => {
                if lines.try_send(line).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Lines dropped because the file's writer fell behind (stderr's are the sink's).
    pub fn dropped(&self) -> u64 {
        match &self.to {
            Destination::Stderr(_) => 0,
            Destination::File { dropped, .. } => dropped.load(Ordering::Relaxed),
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The file's writer, on a thread of its own: a slow disk holds up nobody but the queue.
struct FileWriter {
    file: File,
    path: PathBuf,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
}

impl FileWriter {
    fn run(mut self, queue: Receiver<String>) {
        let mut batch = Vec::with_capacity(64 * 1024);
        while let Ok(line) = queue.recv() {
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.reopen_file();
            }
            batch.extend_from_slice(line.as_bytes());
            // Take whatever else is queued, so one write(2) carries many lines.
            while batch.len() < 60 * 1024 {
                match queue.try_recv() {
                    Ok(line) => batch.extend_from_slice(line.as_bytes()),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                if let Err(e) = self.file.write_all(&batch) {
                    warn!(error = %e, "access log write failed");
                }
            }
            batch.clear();
            let lost = self.dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                warn!(lines = lost, "access log fell behind, lines dropped");
            }
        }
    }

    fn reopen_file(&mut self) {
        match open(&self.path) {
            Ok(new) => {
                self.file = new;
                tracing::info!(path = %self.path.display(), "access log reopened");
            }
            Err(e) => warn!(path = %self.path.display(), error = %e, "access log reopen failed"),
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
