//! `rip forkserver`: one process that has paid, once, what every exec of this binary costs,
//! and forks each new worker from that image instead of the front-end executing the binary
//! again. An exec costs the dynamic loader's relocations, the page faults of a fresh address
//! space, and glibc's, libgcc's and Rust's CPU-feature probing, whose `cpuid` instructions
//! each trap to the hypervisor on a virtual machine: 1.0–1.2 ms of CPU for `rip --version`
//! on a 2-core VM where a fork and exit of a process this size costs 0.1–0.2 ms
//! (`benches/support/fork_cost.c`). Under
//! `--max-requests` at full load a worker is replaced every few dozen milliseconds, on the
//! same cores that serve the requests.
//!
//! The server runs no runtime and no thread, and does nothing but wait on its socket: a fork
//! of it is as clean as an exec. Each worker is forked with `CLONE_PARENT`, so it is the
//! supervisor's child, as an executed worker is: the supervisor reaps it, its parent-death
//! signal is tied to the supervisor's spawner thread, and the server dying (or being killed)
//! takes no worker with it. A worker forked from it shares its memory layout with the other
//! workers forked from the same server, as gunicorn's and unicorn's preloaded workers do, and
//! inherits whatever a user's `main` did before `Rip::run` (run once, here): descriptors it
//! opened are shared. A server with a second thread (started by such a `main`) never forks:
//! the child could inherit a lock that thread held; rip executes every worker then.
//!
//! The protocol, over a `SOCK_SEQPACKET` pair: the supervisor sends one message per worker,
//! the worker's arguments (from `worker` on) separated by NULs, with its stderr pipe and, if
//! it has one, its heartbeat page as `SCM_RIGHTS`; the server answers the new pid as four
//! bytes (little-endian), or a negative errno. The server exits when the supervisor closes
//! its end. A message that is not a worker's command line forks nothing.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::sys::time::TimeVal;
use nix::unistd::Pid;

use crate::cli::{ForkServerArgs, WorkerArgs};

/// Largest message: a worker's command line is a few hundred bytes; a path of PATH_MAX twice
/// (socket and root) fits many times over.
const MAX_MESSAGE: usize = 64 * 1024;

/// Runs the server; returns in a forked child with the arguments it is to serve as a worker
/// with, and in the server itself with `None` once the supervisor has closed the socket.
pub(crate) fn serve(args: ForkServerArgs) -> Result<Option<WorkerArgs>> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // The parent may have died before the line above took effect.
    if nix::unistd::getppid().as_raw() != args.parent {
        bail!("parent process {} is gone", args.parent);
    }
    nix::fcntl::fcntl(args.socket_fd, nix::fcntl::FcntlArg::F_GETFD)
        .with_context(|| format!("--socket-fd {} is not an open file descriptor", args.socket_fd))?;
    // SAFETY: the fd is open (checked above) and was passed to this process for it alone.
    let socket = unsafe { OwnedFd::from_raw_fd(args.socket_fd) };
    // The standard library probes the CPU's features (with cpuid) the first time any code
    // asks; asked here, every worker inherits the answers.
    #[cfg(target_arch = "x86_64")]
    let _ = std::arch::is_x86_feature_detected!("avx2");
    // Built once here rather than in each child: clap's definition of every subcommand and
    // flag cost each forked worker about 70 us, a fifteenth of what a recycle costs.
    let cli = built_cli();
    // Once, not per fork: the reads of /proc these take were 0.09 ms of a recycle's 2.2 ms
    // (`benches/recycle_phases.sh`), half in the server and half in each child. After
    // `Rip::run` this process runs nothing but the loop below, which starts no thread, so the
    // count it starts with is its count at every fork; its children inherit its argument
    // area where it is now.
    let single = threads() == Some(1);
    let title = Title::here();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, fds) = receive(&socket, &mut buf)?;
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        let argv = decode_args(&buf[..len]);
        if argv.first().map(|a| a.as_bytes()) != Some(b"worker") || fds.is_empty() {
            reply(&socket, -(Errno::EINVAL as i32))?;
            continue;
        }
        // A binary whose main starts a thread before `Rip::run` (a tracing or metrics agent,
        // a runtime) would hand the child locks that thread may hold: no fork, ever.
        if !single {
            reply(&socket, -(Errno::ENOTSUP as i32))?;
            return Ok(None);
        }
        // SAFETY: this process has one thread and holds no lock: the child may run anything.
        match unsafe { fork_as_sibling() } {
            Ok(0) => return become_worker(socket, argv, fds, cli, &title).map(Some),
            Ok(pid) => reply(&socket, pid)?,
            Err(errno) => reply(&socket, -(errno as i32))?,
        }
        // The child has its own copies.
        drop(fds);
    }
}

/// Each argument followed by a NUL, so that an empty one survives the trip.
fn encode_args(args: &[OsString]) -> Vec<u8> {
    let mut message = Vec::new();
    for arg in args {
        message.extend_from_slice(arg.as_bytes());
        message.push(0);
    }
    message
}

fn decode_args(message: &[u8]) -> Vec<OsString> {
    let Some(body) = message.strip_suffix(&[0]) else { return Vec::new() };
    body.split(|&b| b == 0).map(|a| OsString::from_vec(a.to_vec())).collect()
}

/// Fields of /proc/self/stat, numbered as proc(5) numbers them, from `first` on.
fn stat_fields(first: usize) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses; the fields after its last ')' do not,
    // and start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().skip(first.checked_sub(3)?).map(|f| f.parse().ok()).collect()
}

/// How many threads this process has (field 20, num_threads).
fn threads() -> Option<u64> {
    stat_fields(20)?.first().copied()
}

/// A child of our own parent, sharing nothing with us after the call: `fork` with
/// `CLONE_PARENT`, which glibc's `fork` cannot be asked for.
///
/// # Safety
/// The caller must have one thread and hold no lock. Without glibc's `fork` its at-fork
/// handlers do not run (they reset locks another thread might hold: there is none), and the
/// child's thread keeps our thread id in glibc's thread descriptor. glibc reads it as the
/// owner of a recursive or error-checking mutex (the same wrong value throughout the child,
/// so still consistent) and to signal a thread: `raise` and `abort` in the child aim
/// `tgkill` at our id within the child's process, where there is no such thread, so no
/// other process is signalled, and `abort` still ends the child by its fallbacks. Rust's
/// standard library and tokio name threads by ids of their own.
unsafe fn fork_as_sibling() -> Result<libc::pid_t, Errno> {
    // clone(flags, stack, parent_tid, child_tid, tls): no new stack, so the child returns
    // here on a copy of ours, as from fork.
    let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    let ret = libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize);
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret as libc::pid_t)
    }
}

/// In the child: its own process group (as `process_group(0)` gives an executed worker), its
/// stderr pipe, none of the server's descriptors, and its arguments as the worker parses them.
fn become_worker(
    socket: OwnedFd,
    mut argv: Vec<OsString>,
    fds: Vec<OwnedFd>,
    mut cli: clap::Command,
    title: &Title,
) -> Result<WorkerArgs> {
    drop(socket);
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).context("setting the process group")?;
    let mut fds = fds.into_iter();
    if let Some(stderr) = fds.next() {
        nix::unistd::dup2(stderr.as_raw_fd(), libc::STDERR_FILENO).context("taking the stderr pipe")?;
    }
    if let Some(heartbeat) = fds.next() {
        // The worker maps the page and owns the descriptor from then on.
        let heartbeat: RawFd = std::os::fd::IntoRawFd::into_raw_fd(heartbeat);
        argv.push("--heartbeat-fd".into());
        argv.push(heartbeat.to_string().into());
    }
    title.set(&argv);
    let args = parse_worker(&mut cli, argv);
    // Its memory is the server's, shared until written: freeing it would copy those pages.
    std::mem::forget(cli);
    args
}

/// rip's command line, built (see [`serve`]).
pub(crate) fn built_cli() -> clap::Command {
    let mut cli = <crate::cli::Cli as clap::CommandFactory>::command();
    cli.build();
    cli
}

/// A worker's arguments (after `rip`) as `rip worker` parses them, with `cli` from
/// [`built_cli`].
pub(crate) fn parse_worker(cli: &mut clap::Command, argv: Vec<OsString>) -> Result<WorkerArgs> {
    let cli = cli
        .try_get_matches_from_mut(std::iter::once(OsString::from("rip")).chain(argv))
        .and_then(|mut matches| <crate::cli::Cli as clap::FromArgMatches>::from_arg_matches_mut(&mut matches))
        .map_err(|e| {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            anyhow::anyhow!("the fork server was sent a bad worker command line: {first}")
        })?;
    match cli.command {
        crate::cli::Command::Worker(args) => Ok(args),
        _ => bail!("the fork server was sent something other than a worker's command line"),
    }
}

/// Room the fork server's own command line leaves for its workers' (see [`Title::set`]): one
/// argument of this many spaces, which `ps` shows as nothing.
const TITLE_ROOM: usize = 1024;

/// Where the kernel reads this process's command line from, and the executable's path that
/// goes first in it: found in the server, used in each child.
struct Title {
    /// The argument strings' area, `[start, end)`, when /proc said where it is.
    area: Option<(usize, usize)>,
    exe: Vec<u8>,
}

impl Title {
    fn here() -> Title {
        let exe = std::env::current_exe().map(|p| p.into_os_string()).unwrap_or_else(|_| "rip".into());
        Title { area: args_area(), exe: exe.into_vec() }
    }

    /// Makes `ps`, `pgrep -f` and `/proc/<pid>/cmdline` show the worker's command line, as
    /// for an executed worker, rather than the fork server's, which the child's memory still
    /// holds: the kernel reads the command line from the process's own memory, where its
    /// argument strings were laid out at exec. The server's arguments end with
    /// [`TITLE_ROOM`] spaces, so that a worker's arguments fit over them (a longer one is
    /// cut). `std::env::args()` in a forked worker reads the same strings, through pointers
    /// set at the server's start, so it does not list the worker's arguments.
    fn set(&self, argv: &[OsString]) {
        let Some((start, end)) = self.area else { return };
        let mut title = self.exe.clone();
        for arg in argv {
            title.push(0);
            title.extend_from_slice(arg.as_bytes());
        }
        let room = end - start;
        // The last byte stays a NUL, as in any argument list.
        title.truncate(room.saturating_sub(1));
        // SAFETY: [start, end) is this process's argument strings, mapped and writable (the
        // child's copy of the server's, at the same address). What still points into them
        // (the standard library's saved argv, glibc's program name) reads NUL-terminated
        // strings, and the area ends with a NUL.
        unsafe {
            let area = std::slice::from_raw_parts_mut(start as *mut u8, room);
            area[..title.len()].copy_from_slice(&title);
            area[title.len()..].fill(0);
        }
    }
}

/// Where this process's argument strings start and end (fields 48 and 49, arg_start and
/// arg_end).
fn args_area() -> Option<(usize, usize)> {
    let fields = stat_fields(48)?;
    let (&start, &end) = (fields.first()?, fields.get(1)?);
    (start < end).then_some((start as usize, end as usize))
}

fn receive(socket: &OwnedFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            other => break other.context("reading the fork server's socket")?,
        }
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().context("reading the descriptors sent")? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        bail!("a message to the fork server was cut short");
    }
    Ok((msg.bytes, fds))
}

fn reply(socket: &OwnedFd, value: i32) -> Result<()> {
    nix::sys::socket::send(socket.as_raw_fd(), &value.to_le_bytes(), MsgFlags::empty())
        .context("answering on the fork server's socket")?;
    Ok(())
}

/// The supervisor's end: a running server and its socket. Used from the spawner thread, so
/// a call may block (for the fork, about a tenth of a millisecond; [`REPLY_TIMEOUT`] at most).
#[derive(Debug)]
pub struct ForkServer {
    socket: OwnedFd,
    /// Reaped by tokio once dropped (the server exits when the socket closes).
    _process: tokio::process::Child,
}

/// How long the supervisor waits for the server's answer before giving up on it.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ForkServer {
    /// Starts `exe forkserver` through `spawn` (which must let the child inherit the fds it
    /// is given), or says why it cannot be used: forked workers are reaped through pidfds,
    /// which Linux has had since 5.3.
    pub fn start(
        exe: &std::path::Path,
        spawn: impl FnOnce(&mut tokio::process::Command, &[RawFd]) -> io::Result<tokio::process::Child>,
    ) -> io::Result<ForkServer> {
        drop(pidfd(Pid::this())?);
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )?;
        nix::sys::socket::setsockopt(
            &ours,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeval(REPLY_TIMEOUT),
        )?;
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::SendTimeout, &timeval(REPLY_TIMEOUT))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("forkserver")
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--socket-fd")
            .arg(theirs.as_raw_fd().to_string())
            .arg(" ".repeat(TITLE_ROOM))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            // Out of our group, so that a Ctrl-C meant for us does not reach it first.
            .process_group(0)
            .kill_on_drop(false);
        let process = spawn(&mut cmd, &[theirs.as_raw_fd()])?;
        Ok(ForkServer { socket: ours, _process: process })
    }

    /// Forks a worker that runs `rip <args>` (`args` from `worker` on, with no
    /// `--heartbeat-fd`: the page goes as a descriptor) with `stderr` as its stderr.
    pub fn fork(
        &self,
        args: &[OsString],
        stderr: BorrowedFd<'_>,
        heartbeat: Option<BorrowedFd<'_>>,
    ) -> io::Result<Pid> {
        let message = encode_args(args);
        if message.len() > MAX_MESSAGE {
            return Err(io::Error::other("a worker command line too long for the fork server"));
        }
        let fds: Vec<RawFd> = std::iter::once(stderr).chain(heartbeat).map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(&message)];
        retry_eintr(|| sendmsg::<()>(self.socket.as_raw_fd(), &iov, &rights, MsgFlags::MSG_NOSIGNAL, None))?;
        let mut answer = [0u8; 4];
        let n =
            retry_eintr(|| nix::sys::socket::recv(self.socket.as_raw_fd(), &mut answer, MsgFlags::empty()))?;
        if n != answer.len() {
            return Err(io::Error::other("the fork server closed its socket"));
        }
        match i32::from_le_bytes(answer) {
            pid if pid > 0 => Ok(Pid::from_raw(pid)),
            errno => Err(io::Error::from_raw_os_error(-errno)),
        }
    }
}

/// The fork server's answer when it has more than one thread: it will never fork.
pub fn is_unusable(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::ENOTSUP)
}

fn retry_eintr<T>(mut call: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the fork server did not answer"))
            }
            other => return other.map_err(io::Error::from),
        }
    }
}

fn timeval(d: std::time::Duration) -> TimeVal {
    TimeVal::new(d.as_secs() as _, d.subsec_micros() as _)
}

/// A descriptor that becomes readable when `pid` exits.
pub fn pidfd(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (close-on-exec).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty argument (`--cache-control ""`) must reach the worker as one: dropped, the
    /// flag would take the next argument for its value.
    #[test]
    fn arguments_cross_the_socket_as_they_were_empty_ones_included() {
        let args: Vec<OsString> = ["worker", "--cache-control", "", "--id", "3"].map(OsString::from).into();
        assert_eq!(decode_args(&encode_args(&args)), args);
        assert!(decode_args(b"").is_empty());
    }

    #[test]
    fn reads_its_own_thread_count_and_argument_area() {
        assert!(threads().is_some_and(|n| n >= 1));
        let (start, end) = args_area().expect("arg_start and arg_end");
        assert!(end > start);
    }
}
