//! The two small processes behind a command's workers (`rip serve -- CMD`), both this same
//! binary under a hidden subcommand, neither starting a runtime.
//!
//! `rip launch --parent PID -- CMD…` becomes the worker: it ties its life to `rip serve`'s,
//! sets `LISTEN_PID` to its own pid (the socket-activation protocol wants the pid of the
//! process that uses the fds, which only the process itself knows before exec), and then
//! executes CMD in its place, same pid, same process group.
//!
//! `rip guard` outlives a `rip serve` that was killed: it learns each worker's process group
//! on its stdin, and when that pipe closes (`rip serve` exited, however it exited) it kills
//! the groups still listed. The parent-death signal reaches only a worker itself; an app that
//! forks (`npm start`, a shell, a pre-fork server) would otherwise leave its children
//! running, holding ports and memory, with nobody to stop them.

use std::io::BufRead;
use std::os::unix::process::CommandExt;

use anyhow::{bail, Result};
use nix::sys::signal::{killpg, signal, SigHandler, Signal};
use nix::unistd::Pid;

use crate::cli::{GuardArgs, LaunchArgs};

/// Exit codes of a command that could not be started, as a shell reports them.
const NOT_FOUND: i32 = 127;
const NOT_EXECUTABLE: i32 = 126;

pub fn launch(args: LaunchArgs) -> Result<()> {
    let Some((program, rest)) = args.command.split_first() else { bail!("launch: no command") };
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    // The parent may have died before the line above took effect.
    if nix::unistd::getppid().as_raw() != args.parent {
        bail!("parent process {} is gone", args.parent);
    }
    if let Some(fd) = args.listen_fd.filter(|&fd| fd != crate::supervisor::process::LISTEN_FD) {
        // Where socket activation puts it; the copy has no FD_CLOEXEC, the original goes.
        nix::unistd::dup2(fd, crate::supervisor::process::LISTEN_FD)?;
        nix::unistd::close(fd)?;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    if std::env::var_os("LISTEN_FDS").is_some() {
        cmd.env("LISTEN_PID", std::process::id().to_string());
    }
    // Returns only if the exec failed.
    let error = cmd.exec();
    eprintln!("rip: cannot start {program}: {error}");
    let code = match error.kind() {
        std::io::ErrorKind::NotFound => NOT_FOUND,
        _ => NOT_EXECUTABLE,
    };
    std::process::exit(code);
}

pub fn guard(_args: GuardArgs) -> Result<()> {
    // Stopping is the job of `rip serve`, which signals each group itself; the guard waits for
    // its pipe alone, whatever a terminal or a service manager sends the processes around it.
    for sig in
        [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2]
    {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal(sig, SigHandler::SigIgn) }?;
    }
    let mut groups = std::collections::BTreeSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (sign, pid) = line.split_at(line.len().min(1));
        let Ok(pid) = pid.parse::<i32>() else { continue };
        if pid <= 1 {
            continue;
        }
        match sign {
            "+" => groups.insert(pid),
            "-" => groups.remove(&pid),
            _ => false,
        };
    }
    for pid in groups {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    Ok(())
}
