//! Readiness: a worker counts as ready only once its socket answers `GET --health-path`
//! (`/healthz`, which rip's own workers answer ahead of the app) with any status below 500:
//! an app that has no such route and answers 404 is up, one that answers 503 is not yet.
//! The probe speaks the few bytes of HTTP/1.1 it needs by hand, so the supervisor carries no
//! HTTP client of its own.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::discovery::Address;

/// Longest a single probe may take on a worker that accepted the connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest pause between probes: short at first because a worker binds in a few
/// milliseconds, longer later so a slow-starting app is not hammered.
/// Most of a probe's answer read before closing; a health route is a few bytes.
const MAX_ANSWER: usize = 64 * 1024;
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const LONGEST_PAUSE: Duration = Duration::from_millis(100);

/// Probes until the worker answers, `within` has passed, or `cancel` fires.
pub async fn wait_ready(
    address: &Address,
    path: &str,
    within: Duration,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        let last_error = match check(address, path).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() + pause >= deadline {
            return Err(format!("not ready after {} ms: {last_error}", within.as_millis()));
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => return Err("cancelled".into()),
        }
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

/// One probe.
pub async fn check(address: &Address, path: &str) -> Result<(), String> {
    check_within(address, path, PROBE_TIMEOUT).await
}

/// One probe that fails if the worker has not answered within `within`.
pub async fn check_within(address: &Address, path: &str, within: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = address.connect().await.map_err(|e| e.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: rip-probe\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        // Read the rest before closing: an app still writing its answer would see a broken
        // pipe, and some (Python's http.server) print a traceback for each.
        let mut rest = [0u8; 4096];
        let mut left = MAX_ANSWER;
        while left > 0 {
            match stream.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
        match status(&head) {
            Some(code) if code < 500 => Ok(()),
            _ => Err(format!("health check answered {:?}", String::from_utf8_lossy(&head))),
        }
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no answer to a health check within {} ms", within.as_millis()))?
}

/// The status code of a response that begins with `head` (`HTTP/1.1 200`, `HTTP/1.0 404`).
fn status(head: &[u8; 12]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    if !matches!(rest.first(), Some(b'0' | b'1')) || rest.get(1) != Some(&b' ') {
        return None;
    }
    std::str::from_utf8(&rest[2..5]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::status;

    #[test]
    fn reads_the_status_of_either_http1_version() {
        assert_eq!(status(b"HTTP/1.1 200"), Some(200));
        assert_eq!(status(b"HTTP/1.0 404"), Some(404));
        assert_eq!(status(b"HTTP/1.1 503"), Some(503));
        assert_eq!(status(b"HTTP/2.0 200"), None);
        assert_eq!(status(b"SSH-2.0-Open"), None);
        assert_eq!(status(b"HTTP/1.1 2x0"), None);
    }
}
