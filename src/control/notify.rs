//! Messages to systemd's notify socket (Type=notify / notify-reload), and to a previous
//! `rip serve` waiting for its upgrade to become ready. Both are no-ops when nobody listens.

use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};

use sd_notify::NotifyState;
use tracing::debug;

/// Environment variable naming the pipe on which a new `rip serve` reports readiness to the
/// one that started it for an upgrade.
pub const READY_FD_ENV: &str = "RIP_READY_FD";

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// Keeps the upgrade's ready pipe out of the workers this process starts.
pub fn claim_ready_fd() {
    if let Some(fd) = std::env::var_os(READY_FD_ENV).and_then(|v| v.to_str()?.parse::<RawFd>().ok()) {
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
}

/// All workers are ready: tell systemd and, during an upgrade, the previous rip.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    if let Some(fd) = std::env::var_os(READY_FD_ENV).and_then(|v| v.to_str()?.parse::<RawFd>().ok()) {
        std::env::remove_var(READY_FD_ENV);
        // SAFETY: the previous rip passed this pipe's write end for us alone to own.
        let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
        let _ = pipe.write_all(b"ready\n");
    }
}

pub fn reloading() {
    let now = NotifyState::monotonic_usec_now();
    match now {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The service's main process is now `pid` (after an upgrade).
pub fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}
