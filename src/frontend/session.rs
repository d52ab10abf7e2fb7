//! A client's TLS session over its TCP socket, on rustls's unbuffered API. Invariant: every
//! buffer the session reads into, writes from or holds plaintext in is rip's, and a session
//! with nothing in them can give them all back and its socket up — so a parked HTTPS
//! connection is its socket and rustls's state alone (keys, sequence numbers, the state
//! machine), and takes its socket back when its client sends again.
//!
//! Why: rustls's buffered connection keeps a 4 KiB record buffer for as long as the
//! connection lives and has no way to release it, and tokio-rustls cannot take its socket
//! out and put it back. OpenSSL under nginx frees its buffers while a connection is idle;
//! this does the same.
//!
//! How: `advance` runs rustls over the bytes read so far until it needs more, or the
//! handshake is done and nothing more can be decoded, encoding what rustls has to send into
//! `outgoing` on the way. A read then decrypts into the caller's buffer first and keeps only
//! what does not fit; a write encrypts into `outgoing`, which is written out as the socket
//! takes it and bounded, so a client that does not read holds back its writer. Reads go into
//! a buffer the thread lends its sessions in turn, kept by a session only while it holds part
//! of a record.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What a read asks of the socket at first; grown when a record does not fit. Small, because
/// a session left with part of a record keeps the buffer it read into, and such buffers lie on
/// the heap among the blocks rustls keeps for sessions, pinning the pages they share once
/// freed: against 4 KiB, 1 KiB took an idle HTTPS connection from 10.1 to 8.7 KiB of RSS
/// (`benches/idle_heap.sh`, when each session had a buffer of its own), and 512 bytes, two
/// reads for a common hello, gained nothing more.
const READ_SIZE: usize = 1024;
/// The most received bytes held undecoded: one handshake message of rustls's limit (64 KiB)
/// with the records it may span.
const MAX_INCOMING: usize = 0x1_0000 + 18 * 1024;
/// Plaintext one write takes at most: four full records.
const WRITE_CHUNK: usize = 4 * MAX_RECORD;
/// A TLS record's plaintext at most.
const MAX_RECORD: usize = 16 * 1024;
/// Encrypted bytes held unsent before a write waits for the socket.
const MAX_OUTGOING: usize = 2 * WRITE_CHUNK;
/// What a record adds to its plaintext at most, over every cipher suite rustls offers.
const RECORD_OVERHEAD: usize = 64;

thread_local! {
    /// The buffer sessions on this thread read records into, lent to each for one read and
    /// its decoding, so that a connection between reads, and a handshake waiting for its
    /// client, hold none: a buffer of each connection's would lie on the heap among the
    /// blocks rustls keeps for its session and pin the pages they share once freed. A session
    /// left with part of a record keeps the buffer it read into (the next is made anew).
    static READ_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A TLS session over a client's socket; the socket can be taken out while it is parked.
pub struct Session {
    socket: Option<TcpStream>,
    conn: UnbufferedServerConnection,
    /// Received bytes; `incoming[start..filled]` is not yet decoded. The thread's
    /// `READ_BUFFER`, taken for a read and given back once all of it is decoded.
    incoming: Vec<u8>,
    start: usize,
    filled: usize,
    /// Encrypted bytes; `outgoing[sent..queued]` is not yet written.
    outgoing: Vec<u8>,
    sent: usize,
    queued: usize,
    /// Decrypted bytes the reader had no room for; `plaintext[taken..]` is not yet read.
    plaintext: Vec<u8>,
    taken: usize,
    /// Gathers small slices of a vectored write into one record.
    gathered: Vec<u8>,
    /// The client sent its close_notify, or closed its socket.
    read_closed: bool,
    /// Ours is queued.
    write_closed: bool,
}

/// Where `advance` stopped.
enum Step {
    /// It needs more bytes from the client.
    NeedBytes,
    /// Both sides have closed.
    Closed,
}

/// What `advance` does once the session can carry application data.
enum Then<'a, 'b> {
    /// Decrypt into this buffer (or keep) what is received.
    Read(Option<&'a mut ReadBuf<'b>>),
    /// Encrypt this plaintext; the written count goes to the `usize`.
    Write(&'a [u8], &'a mut usize),
    /// Queue a close_notify.
    CloseNotify,
}

impl Session {
    /// The session of a new client connection, its handshake done.
    pub async fn accept(config: Arc<rustls::ServerConfig>, socket: TcpStream) -> io::Result<Session> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut session = Session {
            socket: Some(socket),
            conn,
            incoming: Vec::new(),
            start: 0,
            filled: 0,
            outgoing: Vec::new(),
            sent: 0,
            queued: 0,
            plaintext: Vec::new(),
            taken: 0,
            gathered: Vec::new(),
            read_closed: false,
            write_closed: false,
        };
        poll_fn(|cx| session.poll_handshake(cx)).await?;
        // The handshake's flight is out; a response is encrypted into a buffer of its size.
        session.outgoing = Vec::new();
        Ok(session)
    }

    /// The protocol the client and rip agreed on by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Takes the socket out and frees every buffer, if nothing is in them: nothing received
    /// and not yet read, nothing to send, neither side closed. Otherwise `None`, and the
    /// session stays as it was.
    pub fn unplug(&mut self) -> Option<TcpStream> {
        let quiet = self.start == self.filled
            && self.sent == self.queued
            && self.taken == self.plaintext.len()
            && !self.read_closed
            && !self.write_closed;
        if !quiet {
            return None;
        }
        self.incoming = Vec::new();
        self.outgoing = Vec::new();
        self.plaintext = Vec::new();
        self.gathered = Vec::new();
        (self.start, self.filled, self.sent, self.queued, self.taken) = (0, 0, 0, 0, 0);
        self.socket.take()
    }

    /// Puts a (woken) connection's socket back under its session.
    pub fn plug(&mut self, socket: TcpStream) {
        self.socket = Some(socket);
    }

    /// The close_notify that ends this session, encrypted, for a caller that writes it to the
    /// socket itself; empty if it cannot be made.
    pub fn close_notify(&mut self) -> Vec<u8> {
        if self.write_closed || self.advance(Then::CloseNotify).is_err() {
            return Vec::new();
        }
        self.outgoing[self.sent..self.queued].to_vec()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let step = self.advance(Then::Read(None))?;
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match step {
                Step::NeedBytes if !self.read_closed => {
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                _ => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    /// Runs rustls over what was received until it needs more bytes, doing `then` once the
    /// session can carry application data.
    fn advance(&mut self, then: Then<'_, '_>) -> io::Result<Step> {
        let step = self.advance_records(then);
        self.lend_back();
        step
    }

    fn advance_records(&mut self, mut then: Then<'_, '_>) -> io::Result<Step> {
        loop {
            let Session { conn, incoming, start, filled, outgoing, queued, plaintext, taken, .. } = self;
            let status = conn.process_tls_records(&mut incoming[*start..*filled]);
            let mut discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    *start += discard;
                    return Err(self.fail(e));
                }
            };
            let mut done = None;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Then::Read(Some(buf)) = &mut then {
                            if *taken == plaintext.len() {
                                let n = payload.len().min(buf.remaining());
                                buf.put_slice(&payload[..n]);
                                payload = &payload[n..];
                            }
                        }
                        plaintext.extend_from_slice(payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    // Into what room there is; rustls says how much it needs when that is short.
                    let mut want = 0;
                    loop {
                        room(outgoing, *queued, want);
                        match encode.encode(&mut outgoing[*queued..]) {
                            Ok(n) => break *queued += n,
                            Err(EncodeError::InsufficientSize(e)) => want = e.required_size,
                            Err(EncodeError::AlreadyEncoded) => break,
                        }
                    }
                }
                // What is encoded is in `outgoing`, which is written out in order.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed => {
                    self.read_closed = true;
                    done = Some(Step::Closed);
                }
                ConnectionState::BlockedHandshake => done = Some(Step::NeedBytes),
                ConnectionState::WriteTraffic(mut traffic) => {
                    match &mut then {
                        Then::Read(_) => {}
                        Then::Write(data, written) => {
                            let data = &data[..data.len().min(WRITE_CHUNK)];
                            let mut want = data.len() + RECORD_OVERHEAD * (data.len() / MAX_RECORD + 1);
                            loop {
                                room(outgoing, *queued, want);
                                match traffic.encrypt(data, &mut outgoing[*queued..]) {
                                    Ok(n) => break *queued += n,
                                    Err(EncryptError::InsufficientSize(e)) => want = e.required_size,
                                    Err(EncryptError::EncryptExhausted) => {
                                        return Err(io::Error::other("TLS keys used up"))
                                    }
                                }
                            }
                            **written = data.len();
                        }
                        Then::CloseNotify => {
                            let mut want = RECORD_OVERHEAD;
                            loop {
                                room(outgoing, *queued, want);
                                match traffic.queue_close_notify(&mut outgoing[*queued..]) {
                                    Ok(n) => break *queued += n,
                                    Err(EncryptError::InsufficientSize(e)) => want = e.required_size,
                                    Err(EncryptError::EncryptExhausted) => break,
                                }
                            }
                            self.write_closed = true;
                        }
                    }
                    done = Some(Step::NeedBytes);
                }
                // Early data is not offered; anything else is a state this code does not know.
                _ => {
                    self.start += discard;
                    return Err(invalid("unexpected TLS state"));
                }
            }
            self.start += discard;
            if let Some(step) = done {
                return Ok(step);
            }
        }
    }

    /// A TLS error: the alert rustls queued for it goes out if the socket takes it now.
    fn fail(&mut self, error: rustls::Error) -> io::Error {
        for _ in 0..4 {
            let Session { conn, outgoing, queued, .. } = self;
            match conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    room(outgoing, *queued, READ_SIZE);
                    if let Ok(n) = encode.encode(&mut outgoing[*queued..]) {
                        *queued += n;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => break,
            }
        }
        if let Some(socket) = &self.socket {
            let _ = socket.try_write(&self.outgoing[self.sent..self.queued]);
        }
        (self.sent, self.queued) = (0, 0);
        invalid(error)
    }

    /// Reads what the socket has into `incoming`; `Ok(0)` at its end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Before the buffer is taken: a session with no socket must not keep the thread's.
        let socket = live(&mut self.socket)?;
        if self.start > 0 {
            self.incoming.copy_within(self.start..self.filled, 0);
            (self.start, self.filled) = (0, self.filled - self.start);
        }
        if self.incoming.is_empty() {
            self.incoming = READ_BUFFER.take();
        }
        if self.filled == self.incoming.len() {
            if self.filled >= MAX_INCOMING {
                return Poll::Ready(Err(invalid("TLS message too large")));
            }
            let grown = (self.incoming.len() * 2).clamp(READ_SIZE, MAX_INCOMING);
            self.incoming.resize(grown, 0);
        }
        let mut buf = ReadBuf::new(&mut self.incoming[self.filled..]);
        let polled = Pin::new(socket).poll_read(cx, &mut buf);
        let n = buf.filled().len();
        self.filled += n;
        if n == 0 {
            self.lend_back();
        }
        ready!(polled)?;
        Poll::Ready(Ok(n))
    }

    /// Gives the read buffer back to the thread once every byte in it is decoded: a session
    /// holds one only while it waits for the rest of a record.
    fn lend_back(&mut self) {
        if self.start == self.filled && !self.incoming.is_empty() {
            (self.start, self.filled) = (0, 0);
            READ_BUFFER.set(std::mem::take(&mut self.incoming));
        }
    }

    /// Writes `outgoing` out, all of it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.queued {
            let socket = live(&mut self.socket)?;
            let n = ready!(Pin::new(socket).poll_write(cx, &self.outgoing[self.sent..self.queued]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        (self.sent, self.queued) = (0, 0);
        Poll::Ready(Ok(()))
    }

    fn write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.queued - self.sent >= MAX_OUTGOING {
            ready!(self.poll_send(cx))?;
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        reclaim_sent(&mut self.outgoing, &mut self.sent, &mut self.queued);
        let mut written = 0;
        self.advance(Then::Write(data, &mut written))?;
        // Out now if the socket takes it; if not, its waker is registered and a flush waits.
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(written))
    }
}

/// Makes `buf` hold at least `want` bytes past `at`, keeping what it has; its length is its
/// capacity, so it is zeroed once as it grows and not at each write.
/// Exactly, not doubling: what a connection holds past its handshake is what it pins.
fn room(buf: &mut Vec<u8>, at: usize, want: usize) {
    if buf.len() < at + want {
        buf.reserve_exact(at + want - buf.len());
        buf.resize(at + want, 0);
    }
}

/// Drops what was sent from the front of `buf` once it is at least as much as what is still
/// to send. Without it a socket that takes most of each write but never all of it would
/// grow the buffer by every write; with it the buffer stays within twice what is pending
/// (under `MAX_OUTGOING`) and a write, and no byte is moved more than once per byte sent.
fn reclaim_sent(buf: &mut [u8], sent: &mut usize, queued: &mut usize) {
    if *sent > 0 && *sent >= *queued - *sent {
        buf.copy_within(*sent..*queued, 0);
        (*sent, *queued) = (0, *queued - *sent);
    }
}

fn live(socket: &mut Option<TcpStream>) -> io::Result<&mut TcpStream> {
    socket.as_mut().ok_or_else(|| io::ErrorKind::NotConnected.into())
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for Session {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plaintext.len() {
                let n = (this.plaintext.len() - this.taken).min(buf.remaining());
                buf.put_slice(&this.plaintext[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plaintext.len() {
                    this.plaintext.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            this.advance(Then::Read(Some(buf)))?;
            // A key update's answer, or the like, goes out with no write to carry it.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if this.taken < this.plaintext.len() || this.read_closed {
                continue;
            }
            if ready!(this.poll_receive(cx))? == 0 {
                // Closed without a close_notify: an end all the same to HTTP, whose own
                // framing tells a cut-short request.
                this.read_closed = true;
                if this.start < this.filled {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
    }
}

impl AsyncWrite for Session {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write(cx, data)
    }

    /// Slices smaller than a record are gathered into one, so that a response's head and
    /// the start of its body cost one record and not one each.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else { return Poll::Ready(Ok(0)) };
        if bufs[first].len() >= MAX_RECORD || bufs[first..].iter().filter(|b| !b.is_empty()).count() == 1 {
            return this.write(cx, &bufs[first]);
        }
        let mut gathered = std::mem::take(&mut this.gathered);
        gathered.clear();
        for buf in &bufs[first..] {
            let n = buf.len().min(MAX_RECORD - gathered.len());
            gathered.extend_from_slice(&buf[..n]);
            if gathered.len() == MAX_RECORD {
                break;
            }
        }
        let written = this.write(cx, &gathered);
        this.gathered = gathered;
        written
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(live(&mut this.socket)?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            // A session still in its handshake, or already closed both ways, sends none.
            let _ = this.advance(Then::CloseNotify);
            this.write_closed = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(live(&mut this.socket)?).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_stays_bounded_when_the_socket_never_quite_empties_it() {
        let (mut buf, mut sent, mut queued) = (Vec::new(), 0, 0);
        for round in 0..1000u32 {
            reclaim_sent(&mut buf, &mut sent, &mut queued);
            let data = [round as u8; WRITE_CHUNK];
            room(&mut buf, queued, data.len());
            buf[queued..queued + data.len()].copy_from_slice(&data);
            queued += data.len();
            // The socket takes all but the last KiB: what is pending stays small, never none.
            sent = queued - 1024;
            assert!(
                buf[sent..queued].iter().all(|&b| b == round as u8),
                "round {round}: pending bytes moved wrong"
            );
            assert!(buf.len() <= 2 * MAX_OUTGOING + WRITE_CHUNK, "round {round}: {} bytes", buf.len());
        }
    }
}
