//! Readiness: a worker counts as ready only once its socket answers `GET /healthz` with 200.
//! The probe speaks the few bytes of HTTP/1.1 it needs by hand, so the supervisor carries no
//! HTTP client of its own.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest a single probe may take on a worker that accepted the connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest pause between probes: short at first because a worker binds in a few
/// milliseconds, longer later so a slow-starting app is not hammered.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const LONGEST_PAUSE: Duration = Duration::from_millis(100);

const REQUEST: &[u8] =
    b"GET /healthz HTTP/1.1\r\nHost: rip\r\nUser-Agent: rip-probe\r\nConnection: close\r\n\r\n";

/// Probes until the worker answers 200, `within` has passed, or `cancel` fires.
pub async fn wait_ready(socket: &Path, within: Duration, cancel: &CancellationToken) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        let last_error = match check(socket).await {
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
pub async fn check(socket: &Path) -> Result<(), String> {
    check_within(socket, PROBE_TIMEOUT).await
}

/// One probe that fails if the worker has not answered within `within`.
pub async fn check_within(socket: &Path, within: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
        stream.write_all(REQUEST).await.map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        if head.starts_with(b"HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!("health check answered {:?}", String::from_utf8_lossy(&head)))
        }
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no answer to a health check within {} ms", within.as_millis()))?
}
