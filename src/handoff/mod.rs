//! The hand-off channel of `--upstream handoff`: the front-end passes each accepted client
//! socket to a worker over a Unix socket (SCM_RIGHTS) and the worker serves the client
//! directly, so a request costs one HTTP exchange instead of two. The price is everything the
//! front-end does per request: once handed over, a connection lives and dies with its worker.
//!
//! Wire, on a stream socket next to the worker's HTTP socket (`w<slot>.<gen>.handoff`):
//! the front-end first writes its request budget for the worker (8 bytes, little-endian,
//! 0 = none), then one byte per client connection with the socket attached. The worker writes
//! one byte back when it has served its budget. Invariant: a client socket is either queued in
//! the channel or still the front-end's; a failed send leaves it with the front-end, which
//! gives it to another worker.

/// The front-end's side: each accepted connection to a worker the balancer picks.
pub mod sender;
/// The worker's side: handed connections served with the front-end's checks.
pub mod worker;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Carries one client socket.
const CONNECTION: u8 = b'c';
/// The worker has served its request budget and wants to be recycled.
pub const EXHAUSTED: u8 = b'x';

/// The hand-off socket of the worker whose HTTP socket is `socket`.
pub fn channel_path(socket: &Path) -> PathBuf {
    socket.with_extension("handoff")
}

/// Front-end side: opens the channel and tells the worker its request budget.
pub async fn connect(socket: &Path, budget: u64) -> io::Result<UnixStream> {
    let mut channel = UnixStream::connect(channel_path(socket)).await?;
    channel.write_all(&budget.to_le_bytes()).await?;
    Ok(channel)
}

/// Worker side: the budget the front-end sent when it opened the channel.
pub async fn read_budget(channel: &mut UnixStream) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    channel.read_exact(&mut bytes).await?;
    Ok(u64::from_le_bytes(bytes))
}

/// Queues `client` on the channel. The caller keeps its own copy of the socket and closes
/// it after a successful send; the worker holds the other.
pub async fn send(channel: &UnixStream, client: &impl AsRawFd) -> io::Result<()> {
    let fds = [client.as_raw_fd()];
    channel
        .async_io(Interest::WRITABLE, || {
            let cmsgs = [ControlMessage::ScmRights(&fds)];
            let iov = [IoSlice::new(&[CONNECTION])];
            // MSG_NOSIGNAL: a worker that died is an error to handle, not a SIGPIPE.
            match sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(1) => Ok(()),
                Ok(_) => Err(io::ErrorKind::WriteZero.into()),
                Err(e) => Err(e.into()),
            }
        })
        .await
}

/// What one read of the channel brought.
#[derive(Debug)]
pub enum Received {
    Client(OwnedFd),
    /// A message whose socket could not be received (the worker is out of descriptors); the
    /// kernel closed it, so that client sees a reset.
    Lost,
    /// The front-end closed the channel: nothing more will come.
    Closed,
}

/// Worker side: waits for the next client socket.
pub async fn recv(channel: &UnixStream) -> io::Result<Received> {
    channel.async_io(Interest::READABLE, || receive_one(channel.as_raw_fd())).await
}

fn receive_one(fd: RawFd) -> io::Result<Received> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    if msg.bytes == 0 {
        return Ok(Received::Closed);
    }
    let Ok(cmsgs) = msg.cmsgs() else { return Ok(Received::Lost) };
    let mut client = None;
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel just installed `raw` in this process for this message;
                // nothing else knows of it, so it is owned here (and closed if not kept).
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                client.get_or_insert(owned);
            }
        }
    }
    Ok(client.map_or(Received::Lost, Received::Client))
}

/// Front-end side: no more connections will be sent; the worker reads what is queued, then
/// the end of the channel.
pub fn close_sending(channel: &UnixStream) {
    let _ = nix::sys::socket::shutdown(channel.as_raw_fd(), nix::sys::socket::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn a_socket_sent_arrives_usable_with_the_budget_first() {
        let (mut front, mut worker) = UnixStream::pair().unwrap();
        front.write_all(&1234u64.to_le_bytes()).await.unwrap();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        send(&front, &theirs).await.unwrap();
        drop(theirs);
        close_sending(&front);

        assert_eq!(read_budget(&mut worker).await.unwrap(), 1234);
        let Received::Client(fd) = recv(&worker).await.unwrap() else { panic!("no socket received") };
        let mut received = std::os::unix::net::UnixStream::from(fd);
        received.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        ours.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(matches!(recv(&worker).await.unwrap(), Received::Closed));
    }

    #[tokio::test]
    async fn sending_to_a_closed_worker_fails_and_keeps_the_socket() {
        let (front, worker) = UnixStream::pair().unwrap();
        drop(worker);
        let (_ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(send(&front, &theirs).await.is_err());
        // Still ours to use.
        assert!(theirs.peer_addr().is_ok());
    }

    #[test]
    fn the_channel_sits_next_to_the_http_socket() {
        assert_eq!(channel_path(Path::new("/run/rip/w0.3.sock")), Path::new("/run/rip/w0.3.handoff"));
    }
}
