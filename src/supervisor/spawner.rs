//! Starting processes: the spawner thread, which executes commands and forks replacement
//! workers from the fork server, and the worker process either way gives.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Mutex;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Starts processes on a thread of its own, for two reasons. Starting a process blocks the
/// caller until the child has called exec, which on a front-end shard would stall every
/// request each time a worker is recycled. And the kernel sends a worker its parent-death
/// signal when the *thread* that started it exits, so that thread must live as long as the
/// workers: tokio's blocking pool retires idle threads.
///
/// A child inherits the descriptors it is given (its heartbeat page, a command's listening
/// socket) under their own numbers, passed on its command line, rather than moved to fixed
/// numbers between fork and exec: a command with such a step is started with `fork`, which
/// copies the front-end's page tables and makes every page the front-end writes next fault
/// once (6.5% of the front-end's CPU at full load with `--max-requests 1000`), where without
/// it the standard library uses `posix_spawn`, which shares the memory until the exec.
///
/// A worker that replaces another is forked by the fork server (see `crate::forkserver`),
/// started by this thread with the first such worker, so that a pool that never recycles
/// has no extra process. Whatever goes wrong with the server, the worker is executed
/// instead, and the next one gets a new server.
#[derive(Debug, Clone)]
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

enum Job {
    /// Execute the command; its child inherits the fds (kept open by the caller until the
    /// reply).
    Exec(Command, Vec<RawFd>, oneshot::Sender<io::Result<Child>>),
    /// Start a `rip worker`: forked with these arguments if `fork`, else (or if that fails)
    /// executed as the command.
    Worker {
        cmd: Command,
        args: Vec<std::ffi::OsString>,
        heartbeat: Option<RawFd>,
        fork: bool,
        reply: oneshot::Sender<io::Result<Process>>,
    },
    /// The binary on disk may have changed (a reload): later forks come from a new server.
    Renew,
}

/// Held while a descriptor is inheritable, and by any other start of a process in rip, so
/// that no other child inherits it.
pub static SPAWNING: Mutex<()> = Mutex::new(());

impl Spawner {
    /// Starts the thread; must be called inside the runtime the children are reaped by.
    pub fn start() -> io::Result<Spawner> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new().name("rip-spawner".into()).spawn(move || {
            let _entered = runtime.enter();
            let mut server = ServerState::NotStarted;
            for job in queue {
                match job {
                    Job::Exec(mut cmd, inherit, reply) => {
                        let _ = reply.send(spawn_inheriting(&mut cmd, &inherit));
                    }
                    Job::Worker { mut cmd, args, heartbeat, fork, reply } => {
                        let forked = if fork { server.fork(&cmd, &args, heartbeat) } else { None };
                        let process = forked.map_or_else(
                            || spawn_inheriting(&mut cmd, heartbeat.as_slice()).map(Process::Executed),
                            Ok,
                        );
                        let _ = reply.send(process);
                    }
                    Job::Renew => {
                        if matches!(server, ServerState::Running(_)) {
                            server = ServerState::NotStarted;
                        }
                    }
                }
            }
        })?;
        Ok(Spawner { jobs })
    }

    /// Starts `cmd`, whose child inherits `inherit` (fds the caller keeps open until this
    /// returns).
    pub async fn spawn(&self, cmd: Command, inherit: Vec<RawFd>) -> io::Result<Child> {
        let (reply, child) = oneshot::channel();
        self.send(Job::Exec(cmd, inherit, reply))?;
        child.await.map_err(|_| gone())?
    }

    /// Starts a `rip worker`: forked from the fork server with `args` (see
    /// [`worker_args`](super::process::worker_args))
    /// if `fork`, executed as `cmd` otherwise or if the fork server fails. `heartbeat` is the
    /// fd `cmd` names, kept open by the caller until this returns.
    pub async fn spawn_worker(
        &self,
        cmd: Command,
        args: Vec<std::ffi::OsString>,
        heartbeat: Option<RawFd>,
        fork: bool,
    ) -> io::Result<Process> {
        let (reply, process) = oneshot::channel();
        self.send(Job::Worker { cmd, args, heartbeat, fork, reply })?;
        process.await.map_err(|_| gone())?
    }

    /// Workers forked from now on come from a fork server started anew, from the binary on
    /// disk now.
    pub fn renew_fork_server(&self) {
        let _ = self.send(Job::Renew);
    }

    fn send(&self, job: Job) -> io::Result<()> {
        self.jobs.send(job).map_err(|_| gone())
    }
}

fn gone() -> io::Error {
    io::Error::other("the spawner thread is gone")
}

/// The spawner thread's fork server.
enum ServerState {
    NotStarted,
    Running(crate::forkserver::ForkServer),
    /// It could not be started, or has a second thread (said once in the log): every worker
    /// is executed.
    Unavailable,
}

impl ServerState {
    /// The worker forked, or `None` if it is to be executed.
    fn fork(
        &mut self,
        cmd: &Command,
        args: &[std::ffi::OsString],
        heartbeat: Option<RawFd>,
    ) -> Option<Process> {
        if matches!(self, ServerState::NotStarted) {
            let exe = Path::new(cmd.as_std().get_program());
            *self = match crate::forkserver::ForkServer::start(exe, spawn_inheriting) {
                Ok(server) => ServerState::Running(server),
                Err(e) => {
                    tracing::warn!(error = %e, "no fork server: each worker is started by executing rip");
                    ServerState::Unavailable
                }
            };
        }
        let ServerState::Running(server) = self else { return None };
        match fork_with(server, args, heartbeat) {
            Ok(process) => Some(process),
            Err(e) if crate::forkserver::is_unusable(&e) => {
                tracing::warn!("the fork server has more than one thread (something in main started one before Rip::run), so it cannot fork safely: every worker is started by executing the binary");
                *self = ServerState::Unavailable;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "the fork server failed; this worker is executed, the next one gets a new server");
                *self = ServerState::NotStarted;
                None
            }
        }
    }
}

fn fork_with(
    server: &crate::forkserver::ForkServer,
    args: &[std::ffi::OsString],
    heartbeat: Option<RawFd>,
) -> io::Result<Process> {
    use std::os::fd::BorrowedFd;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the caller keeps the heartbeat's fd open until the spawn's reply.
    let heartbeat = heartbeat.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
    let pid = server.fork(args, std::os::fd::AsFd::as_fd(&write), heartbeat)?;
    drop(write);
    let exit = crate::forkserver::pidfd(pid).and_then(|fd| {
        // SAFETY: the AsyncFd owns the pidfd until it is dropped; nothing else closes it.
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)
    });
    match exit {
        Ok(exit) => Ok(Process::Forked(Forked { pid, exit, stderr: Some(read) })),
        Err(e) => {
            // Unreapable by the way forked workers are; it goes before it is ever used.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(e)
        }
    }
}

/// A worker's process as started: executed (tokio reaps it) or forked by the fork server
/// (our child as well, reaped here when its pidfd says it exited).
#[derive(Debug)]
pub enum Process {
    Executed(Child),
    Forked(Forked),
}

#[derive(Debug)]
pub struct Forked {
    pid: Pid,
    exit: tokio::io::unix::AsyncFd<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl Process {
    pub fn pid(&self) -> Pid {
        match self {
            Process::Executed(child) => Pid::from_raw(child.id().map_or(0, |p| p as i32)),
            Process::Forked(forked) => forked.pid,
        }
    }

    /// The child, for an executed process (a command's, whose stdout is read too).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        match self {
            Process::Executed(child) => Some(child),
            Process::Forked(_) => None,
        }
    }

    pub fn take_stderr(&mut self) -> Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>> {
        match self {
            Process::Executed(child) => Some(Box::new(child.stderr.take()?)),
            Process::Forked(forked) => {
                let fd = forked.stderr.take()?;
                match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                    Ok(pipe) => Some(Box::new(pipe)),
                    Err(e) => {
                        tracing::warn!(pid = forked.pid.as_raw(), error = %e, "a worker's stderr cannot be read");
                        None
                    }
                }
            }
        }
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        use std::os::unix::process::ExitStatusExt;
        let forked = match self {
            Process::Executed(child) => return child.wait().await,
            Process::Forked(forked) => forked,
        };
        loop {
            let mut ready = forked.exit.readable().await?;
            match waitpid(forked.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw(code << 8)),
                Ok(WaitStatus::Signaled(_, signal, core)) => {
                    return Ok(ExitStatus::from_raw(signal as i32 | if core { 0x80 } else { 0 }))
                }
                Ok(_) => ready.clear_ready(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn spawn_inheriting(cmd: &mut Command, inherit: &[RawFd]) -> io::Result<Child> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let _spawning = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let mut made = Vec::with_capacity(inherit.len());
    let mut result = Ok(());
    for &fd in inherit {
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())) {
            Ok(_) => made.push(fd),
            Err(e) => {
                result = Err(io::Error::from(e));
                break;
            }
        }
    }
    let spawned = result.and_then(|()| cmd.spawn());
    for fd in made {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    spawned
}
