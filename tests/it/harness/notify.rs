//! A stand-in for systemd's notify socket: what a serve (or two, across an upgrade) told
//! systemd through `$NOTIFY_SOCKET`, one datagram per message, in the order they were sent.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use super::{TempDir, SETTLE};

/// A stand-in for systemd's notify socket ($NOTIFY_SOCKET, a Unix datagram socket).
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    /// Every message received so far, for failure messages.
    pub seen: Vec<String>,
    dir: TempDir,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = TempDir::new();
        let socket = UnixDatagram::bind(dir.path().join("notify.sock")).expect("binding the notify socket");
        NotifySocket { socket, seen: Vec::new(), dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("notify.sock")
    }

    /// The next message, waiting up to `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.seen.push(message.clone());
        Some(message)
    }

    /// The next message, which must come within [`SETTLE`].
    pub fn expect(&mut self) -> String {
        self.next(SETTLE)
            .unwrap_or_else(|| panic!("no sd_notify message within {SETTLE:?}; so far: {:?}", self.seen))
    }

    /// Every message already queued.
    pub fn drain(&mut self) -> Vec<String> {
        let mut messages = Vec::new();
        while let Some(message) = self.next(Duration::from_millis(1)) {
            messages.push(message);
        }
        messages
    }
}

/// `message` (lines of `KEY=VALUE`) has `state` as one of its lines.
pub fn has_state(message: &str, state: &str) -> bool {
    message.lines().any(|l| l == state)
}
