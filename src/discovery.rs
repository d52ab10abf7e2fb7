//! The only messages that cross between the supervisor (processes) and the proxy (HTTP):
//! the supervisor announces workers joining and leaving the rotation; the proxy reports
//! workers that need the supervisor's attention. Neither side sees the other's internals.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::quiet::QuietUnix;
use tokio::sync::{mpsc, oneshot};

use crate::heartbeat::Heartbeat;

/// A worker's identity: its slot in the pool and how many workers held that slot before it.
/// Shown as `slot/generation`; pids are reused by the kernel, these never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    pub slot: usize,
    pub generation: u64,
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.slot, self.generation)
    }
}

/// Supervisor to proxy.
#[derive(Debug)]
pub enum Change {
    /// The worker answered its health probe: start sending it requests. Its heartbeat page
    /// tells the proxy whether its event loop is turning.
    Ready { id: WorkerId, socket: Address, heartbeat: Option<Arc<Heartbeat>> },
    /// Stop sending the worker requests. When `drained` is given, it is completed once the
    /// worker has no request in flight (every response body ended), so it may then be stopped.
    Leave { id: WorkerId, drained: Option<oneshot::Sender<()>> },
}

/// Proxy to supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The worker was sent its `--max-requests`: start its replacement.
    Exhausted(WorkerId),
    /// The worker's event loop has been silent for `--timeout`: kill and replace it.
    Hung(WorkerId),
    /// The worker was sent twice its `--max-requests` and its replacement is not ready yet:
    /// recycling is not keeping up with the request rate, and requests now wait for a fresh
    /// worker rather than go to this one.
    Overdue(WorkerId),
}

pub type ChangeSender = mpsc::UnboundedSender<Change>;
pub type ChangeReceiver = mpsc::UnboundedReceiver<Change>;
pub type ReportSender = mpsc::UnboundedSender<Report>;
pub type ReportReceiver = mpsc::UnboundedReceiver<Report>;

/// Where a worker listens: its Unix socket, or (a command's worker with `--app-socket port`)
/// a port on the loopback interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

impl From<PathBuf> for Address {
    fn from(path: PathBuf) -> Address {
        Address::Unix(path)
    }
}

impl From<&str> for Address {
    fn from(path: &str) -> Address {
        Address::Unix(path.into())
    }
}

impl From<String> for Address {
    fn from(path: String) -> Address {
        Address::Unix(path.into())
    }
}

impl Address {
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Address::Unix(path) => QuietUnix::connect(path).await.map(Stream::Unix),
            Address::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                // Requests and responses are written whole; Nagle would only hold them back.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
        }
    }

    /// The Unix socket's path; `None` for a port.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Address::Unix(path) => Some(path),
            Address::Tcp(_) => None,
        }
    }
}

/// A connection to a worker.
#[derive(Debug)]
pub enum Stream {
    Unix(QuietUnix),
    Tcp(TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tcp(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
