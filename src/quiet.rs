//! Unix stream sockets between the front-end and its workers, watched for write space only
//! while a write waits for it. Invariant: a connection's descriptor is registered with the
//! runtime for reading alone; a duplicate of it is registered for writing from the moment a
//! write finds the socket full until a write goes through again.
//!
//! Why: Linux wakes whatever watches a Unix stream socket for EPOLLOUT each time its peer
//! reads from it — `unix_write_space` does not ask whether the socket had been full, as TCP's
//! and a pipe's wake-ups do — and tokio registers every socket for both directions. So each
//! response the front-end read woke its worker's thread for nothing, and each request a worker
//! read could wake the front-end's: at one client a worker switched 1.85 times per request
//! where once is enough, and on a VM a wake-up is tens of microseconds of CPU.
//!
//! How: epoll keys a registration by descriptor, so a `dup` of the socket can be registered
//! with another mask (epoll(7)). A full socket is rare between rip's two ends, whose readers
//! always read, and a full Unix socket is reported writable only once three quarters of its
//! buffer were read, so the two extra registrations of a wait cost nothing beside the bytes
//! that filled it.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream socket, registered for reading, for write space only when needed.
#[derive(Debug)]
pub struct QuietUnix {
    socket: AsyncFd<UnixStream>,
    /// The socket's duplicate, registered for writing while a write waits for room.
    waiting: Option<AsyncFd<OwnedFd>>,
}

impl QuietUnix {
    pub async fn connect(path: &Path) -> io::Result<QuietUnix> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        QuietUnix::new(stream.into_std()?)
    }

    /// Takes over a connected socket; it is made non-blocking.
    pub fn new(stream: UnixStream) -> io::Result<QuietUnix> {
        stream.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the stream, which owns its descriptor, until it is dropped;
        // nothing else closes or replaces that descriptor.
        let socket = unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(QuietUnix { socket, waiting: None })
    }

    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl Fn(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(waiting) = &self.waiting {
                let written = {
                    let mut room = ready!(waiting.poll_write_ready(cx))?;
                    room.try_io(|_| write(self.socket.get_ref())).ok()
                };
                match written {
                    Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Some(written) => {
                        self.waiting = None;
                        return Poll::Ready(written);
                    }
                    // Full again: wait for the next report of room.
                    None => continue,
                }
            }
            match write(self.socket.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Registered now, the duplicate is reported writable at once if room was
                    // made since the write failed, so no wake-up is missed.
                    let duplicate = self.socket.get_ref().as_fd().try_clone_to_owned()?;
                    // SAFETY: as for the socket: the AsyncFd owns the duplicate descriptor.
                    let waiting = unsafe { AsyncFd::register_with_interest(duplicate, Interest::WRITABLE) }
                        .map_err(io::Error::from)?;
                    self.waiting = Some(waiting);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                written => return Poll::Ready(written),
            }
        }
    }
}

impl AsyncRead for QuietUnix {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut ready = ready!(this.socket.poll_read_ready(cx))?;
            // SAFETY: read(2) writes at most `len` bytes into the unfilled part, and only the
            // bytes it reports written are marked initialised.
            let unfilled = unsafe { buf.unfilled_mut() };
            let len = unfilled.len();
            let fd = ready.get_inner().as_raw_fd();
            let n = unsafe { libc::read(fd, unfilled.as_mut_ptr().cast(), len) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => ready.clear_ready(),
                    io::ErrorKind::Interrupted => {}
                    _ => return Poll::Ready(Err(e)),
                }
                continue;
            }
            let n = n as usize;
            // SAFETY: read(2) initialised these `n` bytes.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            // As tokio's own sockets do: a read that left room in the buffer emptied the
            // socket, so the next one waits for the next edge rather than finding EAGAIN (an
            // end of stream, once reported, is never cleared).
            if n > 0 && n < len {
                ready.clear_ready();
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for QuietUnix {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A write that finds the socket full waits, goes through once the peer reads, and the
    /// socket is watched for writing only while it waits; bytes arrive whole and in order.
    #[tokio::test]
    async fn a_full_socket_waits_for_room_then_is_watched_for_reading_only() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (QuietUnix::new(a).unwrap(), QuietUnix::new(b).unwrap());
        let block: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = block.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&block).await.unwrap();
            assert!(a.waiting.is_none(), "still watched for writing after the write went through");
            a.shutdown().await.unwrap();
            a
        });
        let mut received = Vec::new();
        b.read_to_end(&mut received).await.unwrap();
        assert!(received == expected, "{} bytes received of {}", received.len(), expected.len());
        let _a = writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_peer_reads_as_the_end_and_fails_a_write() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (QuietUnix::new(a).unwrap(), QuietUnix::new(b).unwrap());
        a.write_all(b"last words").await.unwrap();
        drop(a);
        let mut received = Vec::new();
        b.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last words");
        assert!(b.write_all(b"anyone?").await.is_err());
    }
}
