//! Reading what rip logs on stderr: the capture every guard shares, fields of a text log line
//! (and the message of a JSON one), the supervisor's worker events and restart backoffs, and
//! the lines logged after a mark. The capture keeps every line from the first, so a
//! test can wait for a line logged after a mark without missing one logged before it looked.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Rip;

/// A process's stderr, line by line, filled by a thread of its own.
#[derive(Debug, Default)]
pub(super) struct Logs {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

impl Logs {
    pub(super) fn capture(stderr: impl Read + Send + 'static) -> Arc<Logs> {
        let logs = Arc::new(Logs::default());
        let writer = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                writer.lock().lines.push(line);
                writer.changed.notify_all();
            }
            writer.lock().closed = true;
            writer.changed.notify_all();
        });
        logs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    pub(super) fn len(&self) -> usize {
        self.lock().lines.len()
    }

    pub(super) fn wait_for(
        &self,
        mut from: usize,
        pred: &dyn Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(line) = state.lines.iter().skip(from).find(|l| pred(l)) {
                return Some(line.clone());
            }
            from = from.max(state.lines.len());
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    pub(super) fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Prints every line, for a test that failed: first it lets the reader catch up with what
    /// the process wrote before it was killed.
    pub(super) fn print(&self, command: &str) {
        self.wait_closed(Duration::from_secs(2));
        eprintln!("---- stderr of `{command}` ----");
        for line in self.lines() {
            eprintln!("{line}");
        }
        eprintln!("---- end of its stderr ----");
    }
}

/// The value of `key=value` in a text log line, without quotes.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split(' ').next()
    }
}

/// A supervisor line about one worker: `worker spawned`, `worker ready`, `worker exited`,
/// `worker exited unexpectedly`, `worker recycled`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEvent {
    /// The message, e.g. "worker ready".
    pub event: String,
    /// `slot/generation`.
    pub worker: String,
    pub pid: i32,
}

impl WorkerEvent {
    pub fn parse(line: &str) -> Option<WorkerEvent> {
        // "<time>  INFO worker ready worker=1/0 pid=4127 startup_ms=3"
        let after_level = line
            .split_once(" INFO ")
            .or_else(|| line.split_once(" WARN "))
            .or_else(|| line.split_once(" ERROR "))?
            .1;
        let event = after_level.split(" worker=").next()?.trim();
        if !event.starts_with("worker") {
            return None;
        }
        Some(WorkerEvent {
            event: event.to_string(),
            worker: log_field(line, "worker")?.to_string(),
            pid: log_field(line, "pid")?.parse().ok()?,
        })
    }

    /// This line is `event` (exactly), e.g. `is("worker ready")`.
    pub fn is(&self, event: &str) -> bool {
        self.event == event
    }

    /// The slot of `slot/generation`.
    pub fn slot(&self) -> usize {
        self.worker.split('/').next().and_then(|s| s.parse().ok()).expect("worker=<slot>/<generation>")
    }
}

/// The `addr=` of a text log line (`rip started`, `admin listener started`) as an address.
pub fn log_addr(line: &str) -> Option<SocketAddr> {
    log_field(line, "addr")?.parse().ok()
}

/// Pids of every worker logged as spawned in `lines`, in order, each once.
pub(super) fn spawned_pids(lines: &[String]) -> Vec<i32> {
    let mut pids = Vec::new();
    for line in lines {
        if let Some(event) = WorkerEvent::parse(line) {
            if event.event == "worker spawned" && !pids.contains(&event.pid) {
                pids.push(event.pid);
            }
        }
    }
    pids
}

/// Per slot, the `delay_ms` of each `worker restart backed off` line logged from `mark` on.
pub fn backoff_delays(rip: &Rip, mark: usize) -> BTreeMap<String, Vec<u64>> {
    let mut delays: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in &rip.logs()[mark..] {
        if !line.contains(" worker restart backed off ") {
            continue;
        }
        let slot = log_field(line, "slot").unwrap_or("?").to_string();
        let delay = log_field(line, "delay_ms").and_then(|d| d.parse().ok()).unwrap_or(0);
        delays.entry(slot).or_default().push(delay);
    }
    delays
}

/// Lines logged from `mark` on that contain `needle`.
pub fn lines_after(rip: &Rip, mark: usize, needle: &str) -> Vec<String> {
    rip.logs().into_iter().skip(mark).filter(|l| l.contains(needle)).collect()
}

/// The `message` of a JSON log line.
pub fn json_message(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["message"].as_str().map(str::to_string)
}
