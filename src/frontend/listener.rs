//! The public listening socket: inherited from a previous `rip serve` during an upgrade,
//! passed by systemd socket activation, or bound here. Invariant: during an upgrade the
//! socket is never closed, so no connection attempt is refused while processes change.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{FromRawFd, RawFd};

use anyhow::{bail, Context, Result};
use tokio::net::{TcpListener, TcpSocket};

/// Environment variable naming the listener fd a previous `rip serve` handed over.
pub const INHERITED_FD_ENV: &str = "RIP_LISTEN_FD";

/// Where the listener came from, for the startup log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Bound,
    Inherited,
    Systemd,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Bound => "bound",
            Origin::Inherited => "inherited",
            Origin::Systemd => "systemd",
        }
    }
}

/// Takes over an inherited listener if there is one, else binds `addr`.
pub fn acquire(addr: SocketAddr) -> Result<(TcpListener, Origin)> {
    if let Some(fd) = take_env_fd(INHERITED_FD_ENV)? {
        return Ok((adopt(fd).context("taking over the listener from the previous rip")?, Origin::Inherited));
    }
    let fds: Vec<RawFd> = sd_notify::listen_fds().map(|fds| fds.collect()).unwrap_or_default();
    // Later children (workers, an upgraded rip) must not believe the fds are theirs.
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDNAMES");
    if let Some(fd) = fds.first() {
        return Ok((adopt(*fd).context("using the socket passed by systemd")?, Origin::Systemd));
    }
    Ok((bind(addr).with_context(|| format!("binding {addr}"))?, Origin::Bound))
}

/// Connections the kernel queues before rip accepts them (capped by net.core.somaxconn).
/// std's default of 128 drops SYNs in a burst, costing those clients a 1 s retransmit, while
/// rip is still accepting fast or is at --max-connections.
const BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn take_env_fd(name: &str) -> Result<Option<RawFd>> {
    let Some(value) = std::env::var_os(name) else { return Ok(None) };
    std::env::remove_var(name);
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd >= 3)
        .with_context(|| format!("invalid {name}={}", value.to_string_lossy()))?;
    Ok(Some(fd))
}

fn adopt(fd: RawFd) -> Result<TcpListener> {
    let kind = nix::sys::socket::getsockopt(
        // SAFETY: the fd is only borrowed for this call; it was handed to us as open.
        &unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::sys::socket::sockopt::SockType,
    )
    .with_context(|| format!("fd {fd} is not a socket"))?;
    if kind != nix::sys::socket::SockType::Stream {
        bail!("fd {fd} is not a stream socket");
    }
    // Inherited without close-on-exec; workers must not hold the listening socket.
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .with_context(|| format!("setting close-on-exec on fd {fd}"))?;
    // SAFETY: the fd was handed to this process to own (LISTEN_FDS or RIP_LISTEN_FD), it is
    // open, it is a stream socket (checked above), and nothing else in the process uses it.
    let std = unsafe { StdListener::from_raw_fd(fd) };
    into_tokio(std)
}

fn into_tokio(std: StdListener) -> Result<TcpListener> {
    std.set_nonblocking(true).context("setting the listener non-blocking")?;
    TcpListener::from_std(std).context("registering the listener")
}
