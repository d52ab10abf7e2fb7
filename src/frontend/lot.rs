//! A shard's parked client connections, held without a task each. Invariant: a connection in
//! the lot is its socket (and over TLS its session), its client's address, its place
//! (`--max-connections` permit and shard count) and its idle deadline, kept in one table; the
//! first byte or close from its client gives it back to the shard as a new connection task,
//! its deadline closes it, and a stop closes every one at once — over TLS with a close_notify,
//! as in a task.
//!
//! Why: a parked connection that keeps its task keeps what was allocated for it when it was
//! accepted (the task, its service, the socket's registration), scattered over heap pages
//! that the buffers freed around them cannot give back; with thousands of idle clients
//! those pages, not the few hundred bytes in them, are what an idle connection costs. Here
//! every parked connection is one entry of one table, and a woken one is allocated anew.
//!
//! How: the sockets are watched by an epoll instance of the lot's own, itself watched by
//! the shard's runtime, so that however many connections are parked the runtime holds one
//! registration for them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::park::{ParkedNow, Session};
use super::Slot;

/// Where a shard's connections are parked: cheap to clone, one per connection being served.
#[derive(Clone)]
pub struct Lot {
    parking: mpsc::UnboundedSender<Held>,
}

/// What a connection needs to be parked in its shard's lot: the lot, and what the
/// connection is held with there.
pub struct Holder {
    pub lot: Lot,
    pub peer: SocketAddr,
    pub slot: Slot,
}

impl Holder {
    /// Parks `stream` (with its TLS `session`, if any) until its client sends or closes, or
    /// until `until`.
    pub fn hold(self, stream: std::net::TcpStream, session: Option<Box<Session>>, until: Instant) {
        let Holder { lot, peer, slot } = self;
        // A lot that is gone was stopped: the connection closes, as parked ones do on a stop.
        if let Err(unsent) = lot.parking.send(Held { stream, session, peer, slot, until }) {
            unsent.0.close();
        }
    }
}

/// A parked connection.
pub struct Held {
    pub stream: std::net::TcpStream,
    /// The TLS session over `stream`, its socket taken out.
    pub session: Option<Box<Session>>,
    pub peer: SocketAddr,
    pub slot: Slot,
    until: Instant,
}

impl Held {
    /// Ends a connection its client left idle, as its task would: over TLS a close_notify
    /// first, written at once and not waited on (an idle socket's send buffer has room for it).
    fn close(self) {
        if let Some(mut session) = self.session {
            let _ = (&self.stream).write(&session.close_notify());
        }
    }
}

/// The lot's table and its epoll instance, run by one task of the shard.
pub struct Attendant {
    parked: mpsc::UnboundedReceiver<Held>,
    epoll: AsyncFd<Watch>,
}

struct Watch(Epoll);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// Most readiness events taken from the lot's epoll instance in one call.
const EVENTS: usize = 64;

/// The deadlines heap holds enough left behind by woken connections to be rebuilt from the
/// `parked` ones: amortised, each rebuild costs less than the pushes since the last.
fn stale(deadlines: usize, parked: usize) -> bool {
    deadlines > 2 * parked + EVENTS
}

/// A lot for the current shard, and what runs it. Fails if the epoll instance cannot be made
/// or watched; connections then wait in their own tasks.
pub fn open() -> io::Result<(Lot, Attendant)> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
    // SAFETY: the Watch owns the epoll descriptor, and the AsyncFd owns the Watch until it is
    // dropped; nothing else closes or replaces that descriptor.
    let epoll = unsafe { AsyncFd::register_with_interest(Watch(epoll), tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    let (parking, parked) = mpsc::unbounded_channel();
    Ok((Lot { parking }, Attendant { parked, epoll }))
}

impl Attendant {
    /// Holds parked connections until `stop`, giving each to `wake` when its client sends.
    pub async fn run(mut self, stop: CancellationToken, wake: impl Fn(Held)) {
        // Each entry with the number it was parked under, so that a deadline left behind by a
        // connection woken earlier does not close the next one given the same entry.
        let mut held: Slab<(u64, Held, ParkedNow)> = Slab::new();
        let mut due: BinaryHeap<Reverse<(Instant, usize, u64)>> = BinaryHeap::new();
        let mut number = 0u64;
        let mut events = [EpollEvent::empty(); EVENTS];
        loop {
            let next = due.peek().map(|Reverse((at, ..))| *at);
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                parked = self.parked.recv() => {
                    let Some(parked) = parked else { break };
                    let entry = held.vacant_entry();
                    let key = entry.key();
                    let watched = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, key as u64);
                    if let Err(e) = self.epoll.get_ref().0.add(&parked.stream, watched) {
                        // Unwatched, it would never wake: served in a task of its own instead.
                        tracing::debug!(error = %e, "a parked connection could not be watched");
                        wake(parked);
                        continue;
                    }
                    number += 1;
                    due.push(Reverse((parked.until, key, number)));
                    entry.insert((number, parked, ParkedNow::new()));
                }
                ready = self.epoll.readable() => {
                    let mut ready = match ready {
                        Ok(ready) => ready,
                        Err(e) => {
                            warn!(error = %e, "parked connections can no longer be watched");
                            break;
                        }
                    };
                    let n = match ready.get_inner().0.wait(&mut events, EpollTimeout::ZERO) {
                        Ok(n) => n,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => {
                            warn!(error = %e, "parked connections can no longer be watched");
                            break;
                        }
                    };
                    if n < EVENTS {
                        ready.clear_ready();
                    }
                    for event in &events[..n] {
                        let Some((_, parked, _)) = held.try_remove(event.data() as usize) else { continue };
                        let _ = self.epoll.get_ref().0.delete(&parked.stream);
                        // A client that closed while parked needs no task to be closed.
                        let mut byte = [0u8; 1];
                        match parked.stream.peek(&mut byte) {
                            Ok(0) => {}
                            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {}
                            _ => wake(parked),
                        }
                    }
                    // A woken connection's deadline stays in the heap until it is due; with
                    // clients that park and wake all the time those would pile up for the
                    // idle limit's length, so past twice what is parked the heap is rebuilt.
                    if stale(due.len(), held.len()) {
                        due = held.iter().map(|(key, (number, parked, _))| Reverse((parked.until, key, *number))).collect();
                    }
                }
                () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    let now = Instant::now();
                    while let Some(Reverse((at, key, number))) = due.peek().copied() {
                        if at > now {
                            break;
                        }
                        due.pop();
                        if held.get(key).is_some_and(|(n, ..)| *n == number) {
                            let (_, parked, _) = held.remove(key);
                            let _ = self.epoll.get_ref().0.delete(&parked.stream);
                            parked.close();
                        }
                    }
                }
            }
        }
        // Every parked connection closed, and its place given back.
        for (_, parked, _) in held.drain() {
            parked.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A client connected to a listener of its own, and the server's side of it.
    fn pair() -> (std::net::TcpStream, std::net::TcpStream, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server, peer)
    }

    /// The parked count is the process's: the tests that read it take turns.
    static COUNTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Polls until `done` holds, for up to 5 s; whether it did.
    async fn until(done: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn slot() -> Slot {
        let spread = Arc::new(super::super::Spread::new(1));
        let permit = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap();
        spread.slot(0, permit)
    }

    /// Deadlines left behind by 100 woken clients make the heap be rebuilt, and the parked
    /// connections' own deadlines survive it: one is closed when due, the other stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadlines_survive_the_heap_being_rebuilt() {
        let _turn = COUNTING.lock().await;
        let (lot, attendant) = open().unwrap();
        let stop = CancellationToken::new();
        let woken = Arc::new(Mutex::new(0usize));
        let run = tokio::spawn({
            let (stop, woken) = (stop.clone(), woken.clone());
            attendant.run(stop, move |_held: Held| *woken.lock().unwrap() += 1)
        });
        let far = Instant::now() + Duration::from_secs(60);
        let (mut soon, server, peer) = pair();
        Holder { lot: lot.clone(), peer, slot: slot() }.hold(
            server,
            None,
            Instant::now() + Duration::from_millis(500),
        );
        let (_stays, server, peer) = pair();
        Holder { lot: lot.clone(), peer, slot: slot() }.hold(server, None, far);
        let mut senders = Vec::new();
        for _ in 0..100 {
            let (client, server, peer) = pair();
            Holder { lot: lot.clone(), peer, slot: slot() }.hold(server, None, far);
            senders.push(client);
        }
        assert!(stale(100 + 2, 2), "enough woken to rebuild");
        assert!(until(|| super::super::park::parked() == 102).await, "not all parked");
        for client in &mut senders {
            client.write_all(b"G").unwrap();
        }
        assert!(until(|| *woken.lock().unwrap() == 100).await, "not all woken");
        let mut byte = [0u8; 1];
        soon.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(soon.read(&mut byte).unwrap(), 0, "closed at its deadline after the rebuild");
        assert_eq!(super::super::park::parked(), 1, "the far one is still parked");
        stop.cancel();
        run.await.unwrap();
    }

    // Two threads: the test reads with blocking sockets while the lot runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_sends_is_woken_one_that_closes_or_outstays_is_closed() {
        let _turn = COUNTING.lock().await;
        let (lot, attendant) = open().unwrap();
        let stop = CancellationToken::new();
        let woken = Arc::new(Mutex::new(Vec::new()));
        let run = tokio::spawn({
            let (stop, woken) = (stop.clone(), woken.clone());
            attendant.run(stop, move |held: Held| woken.lock().unwrap().push(held))
        });
        let far = Instant::now() + Duration::from_secs(60);
        let (mut sends, server, peer) = pair();
        Holder { lot: lot.clone(), peer, slot: slot() }.hold(server, None, far);
        let (closes, server, peer) = pair();
        Holder { lot: lot.clone(), peer, slot: slot() }.hold(server, None, far);
        let (mut outstays, server, peer) = pair();
        Holder { lot: lot.clone(), peer, slot: slot() }.hold(
            server,
            None,
            Instant::now() + Duration::from_millis(200),
        );
        let (mut at_stop, server, peer) = pair();
        Holder { lot: lot.clone(), peer, slot: slot() }.hold(server, None, far);
        assert!(until(|| super::super::park::parked() == 4).await, "not all parked");

        sends.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        drop(closes);
        assert!(
            until(|| super::super::park::parked() == 2).await,
            "the sender was not woken, or the closed one kept"
        );
        {
            let woken = woken.lock().unwrap();
            assert_eq!(woken.len(), 1, "only the client that sent is woken");
            let mut first = [0u8; 16];
            assert_eq!(woken[0].stream.peek(&mut first).unwrap(), 16, "its bytes are left to be read");
            assert_eq!(&first, b"GET / HTTP/1.1\r\n");
        }
        let mut byte = [0u8; 1];
        outstays.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(outstays.read(&mut byte).unwrap(), 0, "closed at its deadline");
        assert_eq!(super::super::park::parked(), 1);

        stop.cancel();
        run.await.unwrap();
        at_stop.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(at_stop.read(&mut byte).unwrap(), 0, "closed on the stop");
        woken.lock().unwrap().clear();
        assert_eq!(super::super::park::parked(), 0);
    }
}
