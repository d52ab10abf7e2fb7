//! `rip upgrade`: start the `rip serve` now on disk with the same arguments, hand it the
//! listening socket, and wait until it reports all its workers ready. Only then does the old
//! process stop accepting and drain. Invariant: if the new process fails in any way before it
//! is ready, it is stopped and the old one keeps serving as if nothing happened.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tracing::info;

use crate::control::notify::READY_FD_ENV;
use crate::frontend::listener::INHERITED_FD_ENV;

/// Where the listener and the ready pipe land in the new process.
const CHILD_LISTEN_FD: RawFd = 3;
const CHILD_READY_FD: RawFd = 4;

/// Starts the new process; returns its pid once it is ready.
pub async fn start(exe: &Path, args: Vec<OsString>, listener: RawFd, within: Duration) -> Result<u32> {
    let (ready_read, ready_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating the ready pipe")?;
    // Move both fds above the ones the child will use, so the dup2 calls cannot clobber them.
    let listen_high = dup_high(listener)?;
    let ready_high = dup_high(ready_write.as_raw_fd())?;
    drop(ready_write);

    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(INHERITED_FD_ENV, CHILD_LISTEN_FD.to_string())
        .env(READY_FD_ENV, CHILD_READY_FD.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    let (l, r) = (listen_high.as_raw_fd(), ready_high.as_raw_fd());
    // SAFETY: between fork and exec the closure only calls dup2, which is async-signal-safe;
    // dup2 onto a different fd number leaves the copy without FD_CLOEXEC, so exactly these
    // two fds survive the exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::dup2(l, CHILD_LISTEN_FD)?;
            nix::unistd::dup2(r, CHILD_READY_FD)?;
            Ok(())
        });
    }
    let spawned = {
        // No worker's descriptor is inheritable meanwhile (see `Spawner`).
        let _spawning = crate::supervisor::spawner::SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
        cmd.spawn()
    };
    let mut child = spawned.with_context(|| format!("starting {}", exe.display()))?;
    drop(listen_high);
    drop(ready_high);
    let pid = child.id().ok_or_else(|| anyhow!("the new rip exited at once"))?;
    info!(pid, "new rip started, waiting for its workers");

    let wait = tokio::task::spawn_blocking(move || read_ready(ready_read));
    let outcome = tokio::select! {
        ready = wait => ready.unwrap_or(false),
        _ = tokio::time::sleep(within) => false,
    };
    if outcome {
        return Ok(pid);
    }
    // Not ready: the new process must not linger beside the old one.
    let status = match child.try_wait() {
        Ok(Some(status)) => crate::supervisor::describe_status(status),
        _ => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            "not ready in time, stopped".to_string()
        }
    };
    Err(anyhow!("new rip (pid {pid}) did not become ready: {status}"))
}

/// A copy of `fd` numbered 10 or above, so that a child's dup2 onto low numbers cannot
/// clobber it.
pub(crate) fn dup_high(fd: RawFd) -> Result<OwnedFd> {
    let high = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(10)).context("duplicating a descriptor")?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(high) })
}

/// Blocks until the new process writes "ready" or closes the pipe (it exited).
fn read_ready(fd: OwnedFd) -> bool {
    let mut pipe = std::fs::File::from(fd);
    let mut buf = [0u8; 6];
    pipe.read_exact(&mut buf).is_ok() && &buf == b"ready\n"
}
