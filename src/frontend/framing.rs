//! Strict request framing: the client connection as hyper reads it, with every request head
//! whose framing hyper would quietly resolve made unparseable first, so hyper answers 400 and
//! closes. Invariant: a head with a bare LF line ending, with both Content-Length and
//! Transfer-Encoding, or with Content-Length twice never reaches hyper intact, so it is never
//! forwarded to a worker.
//!
//! Why in front of hyper: hyper accepts these heads and resolves them itself (Transfer-Encoding
//! wins and Content-Length is dropped, equal lengths are merged, LF alone ends a line), so the
//! service never sees the ambiguity. A proxy in front of rip that resolved them another way
//! would see other request boundaries than we do: request smuggling.
//!
//! How: a `Scanner` follows the client's bytes message by message (head, body by length or
//! chunked, next head), so it knows where each head starts under keep-alive and pipelining.
//! The byte at which a violation shows becomes `POISON` (0x01) before hyper reads it. httparse
//! fails on that byte as soon as it reaches it, even if the rest of the head never comes, and
//! hyper answers 400 and closes. Input hyper refuses anyway stops the scanning: hyper closes
//! the connection, so nothing after it is served.
//!
//! A request that asks for a protocol switch (`Upgrade`, CONNECT) is followed to its end like
//! any other; then the bytes after it are held back from hyper until the request's answer is
//! known ([`Verdict`], told by the connection's service through [`Judged`]). A 101 makes the
//! rest of the connection a tunnel, passed untouched; anything else means the bytes are the
//! next request, scanned as strictly as the first. So a declined upgrade never switches the
//! guard off.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

/// Replaces the byte at which a violation is noticed: it is neither a token nor a field-value
/// character, so no valid head contains it and httparse stops there with an error.
const POISON: u8 = 0x01;

/// A client connection whose request framing is checked on the way in. Writes pass untouched.
#[derive(Debug)]
pub struct StrictFraming<S> {
    inner: S,
    scanner: Scanner,
    verdict: Arc<Verdict>,
    /// Bytes read past the end of a request that asked for an upgrade, held back from hyper
    /// until its answer says whether they are a tunnel or the next request.
    held: Vec<u8>,
}

impl<S> StrictFraming<S> {
    pub fn new(inner: S) -> StrictFraming<S> {
        StrictFraming { inner, scanner: Scanner::default(), verdict: Arc::default(), held: Vec::new() }
    }

    /// Where the connection's service says how upgrade requests were answered.
    pub fn verdict(&self) -> Arc<Verdict> {
        self.verdict.clone()
    }

    /// The stream again, for a connection taken back from hyper between two requests, when
    /// nothing is held back (nothing is, but after a request that asked for an upgrade).
    pub fn into_inner(self) -> S {
        debug_assert!(self.held.is_empty(), "bytes held back would be lost");
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StrictFraming<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.scanner.state == State::Verdict {
                let switched = ready!(this.verdict.poll_answer(cx));
                this.scanner.state = if switched { State::Off } else { State::Idle };
            }
            let start = buf.filled().len();
            if this.held.is_empty() {
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            } else {
                let n = this.held.len().min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.drain(..n);
            }
            let read = buf.filled().len() - start;
            let scanned = this.scanner.scan(&mut buf.filled_mut()[start..]);
            if let Some(violation) = scanned.violation {
                debug!(%violation, "request head refused before parsing");
            }
            if std::mem::take(&mut this.scanner.asks_upgrade) {
                // Before hyper sees the head, so before anyone can answer it.
                this.verdict.expect();
            }
            if scanned.used < read {
                let rest = buf.filled()[start + scanned.used..].to_vec();
                this.held.splice(0..0, rest);
                buf.set_filled(start + scanned.used);
            }
            // Zero bytes from the inner stream is its end, passed on; zero bytes because all
            // of them are held means waiting for the verdict instead.
            if scanned.used > 0 || read == 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// How the requests of one connection that asked for an upgrade were answered, shared by the
/// connection's [`StrictFraming`] (which waits for it) and its service (which tells it).
#[derive(Debug, Default)]
pub struct Verdict(Mutex<Answer>);

#[derive(Debug, Default)]
enum Answer {
    /// No upgrade request is waiting for its answer.
    #[default]
    None,
    /// One is; the reader waits with this waker.
    Awaited(Option<Waker>),
    Declined,
    Switched,
}

impl Verdict {
    fn lock(&self) -> std::sync::MutexGuard<'_, Answer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The scanner passed an upgrade request's head to hyper: its answer is awaited.
    fn expect(&self) {
        *self.lock() = Answer::Awaited(None);
    }

    /// The upgrade request was answered; `switched` when with 101.
    pub fn answered(&self, switched: bool) {
        let answer = if switched { Answer::Switched } else { Answer::Declined };
        if let Answer::Awaited(Some(waker)) = std::mem::replace(&mut *self.lock(), answer) {
            waker.wake();
        }
    }

    /// Whether the connection switched protocols, once the answer is known.
    fn poll_answer(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut answer = self.lock();
        match &mut *answer {
            Answer::Awaited(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Answer::Switched => Poll::Ready(true),
            Answer::Declined | Answer::None => {
                *answer = Answer::None;
                Poll::Ready(false)
            }
        }
    }
}

/// A connection's service that tells its [`Verdict`] how each upgrade request was answered.
#[derive(Debug, Clone)]
pub struct Judged<S> {
    inner: S,
    verdict: Arc<Verdict>,
}

impl<S> Judged<S> {
    pub fn new(inner: S, verdict: Arc<Verdict>) -> Judged<S> {
        Judged { inner, verdict }
    }
}

impl<S, B, Body> hyper::service::Service<Request<B>> for Judged<S>
where
    S: hyper::service::Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = JudgedFuture<S::Future>;

    fn call(&self, req: Request<B>) -> Self::Future {
        // The scanner's rule exactly: a request with an Upgrade field, or CONNECT.
        let asks = req.method() == Method::CONNECT || req.headers().contains_key(http::header::UPGRADE);
        JudgedFuture { inner: self.inner.call(req), verdict: asks.then(|| self.verdict.clone()) }
    }
}

pin_project_lite::pin_project! {
    pub struct JudgedFuture<F> {
        #[pin]
        inner: F,
        verdict: Option<Arc<Verdict>>,
    }
}

impl<F, Body, E> Future for JudgedFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answered = ready!(this.inner.poll(cx));
        if let Some(verdict) = this.verdict.take() {
            let switched = matches!(&answered, Ok(r) if r.status() == StatusCode::SWITCHING_PROTOCOLS);
            verdict.answered(switched);
        }
        Poll::Ready(answered)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StrictFraming<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Framing hyper accepts and rip refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violation {
    /// A line of a head or trailer section ended with LF alone, which parsers that insist on
    /// CRLF and parsers that do not split differently.
    BareLf,
    /// Content-Length and Transfer-Encoding in one head (RFC 9112 §6.3 lets TE win; a
    /// front proxy may let the length win).
    LengthAndChunked,
    /// Content-Length more than once, even with equal values.
    DuplicateLength,
    /// Whitespace after a chunk size that no extension follows (`0 \r\n`): the grammar allows
    /// it only before `;` (RFC 9112 §7.1).
    ChunkSize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Violation::BareLf => "bare LF line ending",
            Violation::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            Violation::DuplicateLength => "more than one Content-Length",
            Violation::ChunkSize => "whitespace after a chunk size",
        })
    }
}

/// Follows the message boundaries of a client's byte stream and poisons the first violation.
#[derive(Debug, Clone, Default)]
struct Scanner {
    state: State,
    /// The previous byte of a head or trailer line was CR: this one must be LF.
    cr: bool,
    head: Head,
    /// The message being followed asked for an upgrade: its end is where the verdict is
    /// awaited.
    upgrade_pending: bool,
    /// Set when such a head has just ended, for the reader to await its verdict.
    asks_upgrade: bool,
}

/// What one [`Scanner::scan`] did.
#[derive(Debug, PartialEq, Eq)]
struct Scanned {
    violation: Option<Violation>,
    /// Bytes followed: all of them, unless an upgrade request ended among them, in which case
    /// the ones after it wait for its verdict.
    used: usize,
}

/// What the current head said so far about the body that follows it.
#[derive(Debug, Clone, Copy, Default)]
struct Head {
    has_length: bool,
    length: u64,
    chunked: bool,
    /// CONNECT or Upgrade: after this head the bytes may be another protocol.
    tunnel: bool,
}

/// Where the scanner is. The chunked states mirror hyper's decoder, so that both agree on
/// where a chunked body ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Between messages, where empty lines may precede the request line.
    #[default]
    Idle,
    /// In the method: `len` bytes so far, `connect` while they spell the start of CONNECT.
    Method {
        len: usize,
        connect: bool,
    },
    /// In the rest of the request line.
    RequestLine,
    /// At the start of a field line, or of the empty line that ends the head.
    LineStart,
    /// In a field name: `len` bytes so far, `fields` the watched names it may still be.
    Name {
        len: usize,
        fields: u8,
    },
    /// In a field value that does not matter for framing.
    Value,
    /// In a Content-Length value: the digits so far, and whether whitespace followed them.
    Length {
        value: Option<u64>,
        ended: bool,
    },
    /// `n` bytes of a Content-Length body left to skip.
    Body(u64),
    ChunkStart,
    ChunkSize(u64),
    ChunkSpace(u64),
    ChunkExtension(u64),
    ChunkSizeLf(u64),
    /// `n` bytes of chunk data left to skip.
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    /// At the start of a trailer line, or of the empty line that ends the message.
    TrailerStart,
    Trailer,
    /// After a request that asked for an upgrade, until its answer says what follows.
    Verdict,
    /// Not scanning any more: a violation was poisoned (hyper closes after its 400), the
    /// stream is something this scanner does not follow, or it became a tunnel.
    Off,
}

const CONTENT_LENGTH: u8 = 1;
const TRANSFER_ENCODING: u8 = 2;
const UPGRADE: u8 = 4;
/// The field names framing depends on, lowercase, with their bits in `State::Name::fields`.
const FIELDS: [(u8, &[u8]); 3] =
    [(CONTENT_LENGTH, b"content-length"), (TRANSFER_ENCODING, b"transfer-encoding"), (UPGRADE, b"upgrade")];

impl Scanner {
    /// Follows `bytes`, the next bytes from the client, and poisons the first violation in
    /// them. Body bytes are counted past, never looked at.
    fn scan(&mut self, bytes: &mut [u8]) -> Scanned {
        let all = bytes.len();
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Off => break,
                State::Verdict => return Scanned { violation: None, used: i },
                State::Body(left) | State::ChunkData(left) => {
                    let skipped = left.min((bytes.len() - i) as u64);
                    i += skipped as usize;
                    self.state = match (self.state, left - skipped) {
                        (State::Body(_), 0) => self.message_ended(),
                        (State::Body(_), left) => State::Body(left),
                        (_, 0) => State::ChunkDataCr,
                        (_, left) => State::ChunkData(left),
                    };
                }
                _ => {
                    match self.next_relevant(&bytes[i..]) {
                        Some(Some(at)) => i += at,
                        Some(None) => break,
                        None => {}
                    }
                    if let Err(violation) = self.step(bytes[i]) {
                        bytes[i] = POISON;
                        self.state = State::Off;
                        return Scanned { violation: Some(violation), used: all };
                    }
                    i += 1;
                }
            }
        }
        Scanned { violation: None, used: all }
    }

    /// The state after a message's last byte.
    fn message_ended(&mut self) -> State {
        if std::mem::take(&mut self.upgrade_pending) {
            State::Verdict
        } else {
            State::Idle
        }
    }

    /// Where in `rest` the next byte that can change the state is, when the state is one
    /// whose bytes mostly do not matter: `Some(None)` if none is in `rest`, `None` if every
    /// byte matters here. Most of a head is field values and names framing does not watch.
    fn next_relevant(&self, rest: &[u8]) -> Option<Option<usize>> {
        if self.cr {
            return None;
        }
        match self.state {
            State::Value | State::RequestLine | State::Trailer => Some(memchr::memchr2(b'\r', b'\n', rest)),
            // A name that can no longer be a watched one: only its end matters.
            State::Name { fields: 0, .. } => Some(memchr::memchr3(b':', b'\r', b'\n', rest)),
            _ => None,
        }
    }

    fn step(&mut self, b: u8) -> Result<(), Violation> {
        use State::*;
        // Chunk-size lines are CR-driven like hyper's decoder; whatever it refuses (a bare
        // LF among them) ends the scanning, since hyper closes the connection.
        self.state = match (self.state, b) {
            (ChunkStart, _) => hex(b).map_or(Off, ChunkSize),
            (ChunkSize(n), _) if hex(b).is_some() => {
                n.checked_mul(16).and_then(|n| n.checked_add(hex(b)?)).map_or(Off, ChunkSize)
            }
            (ChunkSize(n) | ChunkSpace(n), b' ' | b'\t') => ChunkSpace(n),
            (ChunkSize(n) | ChunkSpace(n), b';') => ChunkExtension(n),
            (ChunkSpace(_), b'\r') => return Err(Violation::ChunkSize),
            (ChunkSize(n) | ChunkExtension(n), b'\r') => ChunkSizeLf(n),
            (ChunkSize(_) | ChunkSpace(_), _) | (ChunkExtension(_), b'\n') => Off,
            (ChunkExtension(n), _) => ChunkExtension(n),
            (ChunkSizeLf(0), b'\n') => TrailerStart,
            (ChunkSizeLf(n), b'\n') => ChunkData(n),
            (ChunkDataCr, b'\r') => ChunkDataLf,
            (ChunkDataLf, b'\n') => ChunkStart,
            (ChunkSizeLf(_) | ChunkDataCr | ChunkDataLf, _) => Off,
            _ => return self.line_step(b),
        };
        Ok(())
    }

    /// A byte of a head or trailer line.
    fn line_step(&mut self, b: u8) -> Result<(), Violation> {
        if std::mem::take(&mut self.cr) {
            // A CR not followed by LF is refused by hyper itself.
            self.state = if b == b'\n' { self.line_ended() } else { State::Off };
            return Ok(());
        }
        match b {
            b'\r' => self.cr = true,
            b'\n' => return Err(Violation::BareLf),
            _ => self.state = self.in_line(b)?,
        }
        Ok(())
    }

    fn in_line(&mut self, b: u8) -> Result<State, Violation> {
        use State::*;
        let state = match self.state {
            Idle => Method { len: 0, connect: true },
            // obs-fold: hyper refuses it.
            LineStart if b == b' ' || b == b'\t' => return Ok(Off),
            LineStart => Name { len: 0, fields: CONTENT_LENGTH | TRANSFER_ENCODING | UPGRADE },
            TrailerStart => Trailer,
            state => state,
        };
        Ok(match state {
            Method { len, connect } if b == b' ' => {
                self.head.tunnel |= connect && len == b"CONNECT".len();
                RequestLine
            }
            Method { len, connect } => {
                Method { len: len + 1, connect: connect && b"CONNECT".get(len) == Some(&b) }
            }
            Name { len, fields } if b == b':' => self.field(len, fields)?,
            Name { len, fields } => Name { len: len + 1, fields: still_matching(fields, len, b) },
            Length { value, ended } => match b {
                b' ' | b'\t' => Length { value, ended: value.is_some() },
                b'0'..=b'9' if !ended => {
                    let next =
                        value.unwrap_or(0).checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0')));
                    next.map_or(Off, |v| Length { value: Some(v), ended })
                }
                // Not a plain decimal number: hyper refuses it.
                _ => Off,
            },
            state => state,
        })
    }

    /// A field name ended (at its colon): the framing rules are checked here.
    fn field(&mut self, len: usize, fields: u8) -> Result<State, Violation> {
        let field = FIELDS.iter().find(|(bit, name)| fields & bit != 0 && name.len() == len).map(|f| f.0);
        let head = &mut self.head;
        match field {
            Some(CONTENT_LENGTH) if head.chunked => Err(Violation::LengthAndChunked),
            Some(CONTENT_LENGTH) if head.has_length => Err(Violation::DuplicateLength),
            Some(CONTENT_LENGTH) => {
                head.has_length = true;
                Ok(State::Length { value: None, ended: false })
            }
            Some(TRANSFER_ENCODING) if head.has_length => Err(Violation::LengthAndChunked),
            Some(TRANSFER_ENCODING) => {
                // Whatever its value: hyper refuses any request TE but one ending in chunked.
                head.chunked = true;
                Ok(State::Value)
            }
            Some(UPGRADE) => {
                head.tunnel = true;
                Ok(State::Value)
            }
            _ => Ok(State::Value),
        }
    }

    /// The state after the CRLF that ends the current line.
    fn line_ended(&mut self) -> State {
        use State::*;
        match self.state {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            Idle => Idle,
            RequestLine | Value => LineStart,
            Length { value: Some(n), .. } => {
                self.head.length = n;
                LineStart
            }
            LineStart => self.body(),
            Trailer => TrailerStart,
            TrailerStart => self.message_ended(),
            // A request line that is only a method, a field line without a colon, an empty
            // Content-Length: hyper refuses them.
            _ => Off,
        }
    }

    /// The state after the head: its body, or the end of the message. After a request that
    /// asked for an upgrade, whether the next bytes are a tunnel or a request is decided by
    /// its answer: the message's end waits for it.
    fn body(&mut self) -> State {
        let head = std::mem::take(&mut self.head);
        if head.tunnel {
            self.upgrade_pending = true;
            self.asks_upgrade = true;
        }
        if head.chunked {
            State::ChunkStart
        } else if head.length > 0 {
            State::Body(head.length)
        } else {
            self.message_ended()
        }
    }
}

/// The watched field names among `fields` whose byte `len` is `b`, case-insensitively.
fn still_matching(fields: u8, len: usize, b: u8) -> u8 {
    if fields == 0 {
        return 0;
    }
    let b = b.to_ascii_lowercase();
    FIELDS
        .iter()
        .filter(|(bit, name)| fields & bit != 0 && name.get(len) == Some(&b))
        .fold(0, |matching, (bit, _)| matching | bit)
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Outcome {
        bytes: Vec<u8>,
        violation: Option<Violation>,
        state: State,
        /// Bytes followed before the scanner stopped to await an upgrade's verdict.
        used: usize,
    }

    /// Scans `input` as reads that end at each of `cuts`.
    fn scan_split(input: &[u8], cuts: &[usize]) -> Outcome {
        let mut scanner = Scanner::default();
        let mut bytes = input.to_vec();
        let mut violation = None;
        let mut used = 0;
        for &cut in cuts.iter().chain([input.len()].iter()) {
            // Bytes the scanner held back come again with the next read, as the reader does.
            let from = used;
            let scanned = scanner.scan(&mut bytes[from..cut]);
            if let Some(v) = scanned.violation {
                assert_eq!(violation, None, "a second violation was reported");
                violation = Some(v);
            }
            used = from + scanned.used;
        }
        Outcome { bytes, violation, state: scanner.state, used }
    }

    /// Scans `input` whole, cut in two at every position, and byte by byte: reads may end
    /// anywhere, so all must agree.
    fn scan(input: &[u8]) -> Outcome {
        let whole = scan_split(input, &[]);
        for cut in 0..=input.len() {
            assert_eq!(scan_split(input, &[cut]), whole, "cut at {cut} of {:?}", show(input));
        }
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(scan_split(input, &every), whole, "byte by byte: {:?}", show(input));
        whole
    }

    fn show(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// Valid traffic: untouched, and the scanner is between messages at the end.
    fn assert_passes(input: &[u8]) {
        let outcome = scan(input);
        assert_eq!(outcome.violation, None, "{:?}", show(input));
        assert_eq!(outcome.bytes, input, "valid bytes were rewritten");
        assert_eq!(outcome.state, State::Idle, "the scanner lost track of {:?}", show(input));
    }

    /// `before` then `rest`: the first byte of `rest` is poisoned, nothing else changes.
    fn assert_poisoned(before: &[u8], rest: &[u8], violation: Violation) {
        let input = [before, rest].concat();
        let outcome = scan(&input);
        let mut expected = input.clone();
        expected[before.len()] = POISON;
        assert_eq!(outcome.violation, Some(violation), "{:?}", show(&input));
        assert_eq!(show(&outcome.bytes), show(&expected));
        assert_eq!(outcome.state, State::Off);
    }

    /// Input hyper refuses by itself, or cannot be followed: untouched, and scanning stopped.
    fn assert_left_to_hyper(input: &[u8]) {
        let outcome = scan(input);
        assert_eq!((outcome.violation, &outcome.bytes[..]), (None, input), "{:?}", show(input));
        assert_eq!(outcome.state, State::Off, "{:?}", show(input));
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    /// A body full of what would be violations in a head: it must not be looked at.
    const POST: &[u8] = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 41\r\n\r\n\
        0\r\n\r\nGET / HTTP/1.1\nContent-Length: 1\r\n\r\n";
    const CHUNKED: &[u8] = b"POST /echo HTTP/1.1\r\nhost: x\r\nTRANSFER-encoding: chunked\r\n\r\n\
        5;name=\"v\"\r\nab\ncd\r\n17 ; ext\r\nContent-Length: 4\r\n\r\n\n\n\r\n\
        0;last\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n";

    #[test]
    fn valid_requests_pass_untouched_one_by_one_and_pipelined() {
        assert_passes(GET);
        assert_passes(POST);
        assert_passes(CHUNKED);
        assert_passes(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_passes(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-LENGTH:0\r\n\r\n");
        assert_passes(b"POST / HTTP/1.0\r\nContent-Length:  \t3 \r\nConnection: keep-alive\r\n\r\nabc");
        assert_passes(&[GET, POST, CHUNKED, b"\r\n\r\n", GET, CHUNKED, POST].concat());
    }

    #[test]
    fn names_that_only_look_like_framing_fields_are_ignored() {
        assert_passes(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length-X: 1\r\nX-Content-Length: 2\r\nContent-Lengt: 3\r\n\
              Transfer-Encodings: gzip\r\nContent-Length: 2\r\nUpgrades: h2c\r\n\r\nok",
        );
    }

    #[test]
    fn bare_lf_in_a_head_is_poisoned_wherever_it_is() {
        assert_poisoned(b"GET / HTTP/1.1", b"\nHost: x\n\n", Violation::BareLf);
        assert_poisoned(b"GET / HTTP/1.1\r\nHost: x", b"\n\r\n", Violation::BareLf);
        assert_poisoned(b"GET / HTTP/1.1\r\nHost: x\r\n", b"\n", Violation::BareLf);
        assert_poisoned(b"", b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", Violation::BareLf);
        assert_poisoned(&[POST, CHUNKED, b"GET / HTTP/1.1\r\nA: b"].concat(), b"\n\r\n", Violation::BareLf);
    }

    #[test]
    fn bare_lf_in_trailers_is_poisoned() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Sum: 1";
        assert_poisoned(head, b"\nX-Other: 2\r\n\r\n", Violation::BareLf);
        assert_poisoned(&head[..head.len() - 8], b"\n", Violation::BareLf);
    }

    #[test]
    fn length_with_chunked_is_poisoned_in_either_order_and_any_case() {
        let start: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\n";
        assert_poisoned(
            &[start, b"Content-Length: 4\r\nTransfer-Encoding"].concat(),
            b": chunked\r\n\r\n0\r\n\r\n",
            Violation::LengthAndChunked,
        );
        assert_poisoned(
            &[start, b"transfer-encoding: chunked\r\nCONTENT-LENGTH"].concat(),
            b": 4\r\n\r\n0\r\n\r\n",
            Violation::LengthAndChunked,
        );
        assert_poisoned(
            &[CHUNKED, POST, start, b"Content-length: 4\r\nTransfer-encoding"].concat(),
            b":chunked\r\n\r\n",
            Violation::LengthAndChunked,
        );
    }

    #[test]
    fn a_second_content_length_is_poisoned_even_with_the_same_value() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\ncontent-length";
        assert_poisoned(head, b": 4\r\n\r\nping", Violation::DuplicateLength);
        assert_poisoned(&[GET, head].concat(), b": 5\r\n\r\nping!", Violation::DuplicateLength);
    }

    #[test]
    fn only_the_first_violation_is_poisoned() {
        assert_poisoned(
            b"GET / HTTP/1.1",
            b"\nHost: x\nContent-Length: 1\ncontent-length: 1\n\n",
            Violation::BareLf,
        );
    }

    /// Input hyper refuses by itself, each followed by a bare LF that must stay as it is.
    const LEFT_TO_HYPER: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4 4\r\n\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n\n",
        b"GET\r\nHost: x\r\n\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\na\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1 1\r\na\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\na\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\rX\r\n\n",
    ];

    #[test]
    fn what_hyper_refuses_by_itself_stops_the_scanning_untouched() {
        for input in LEFT_TO_HYPER {
            assert_left_to_hyper(input);
        }
    }

    /// The other half of the test above: the scanner may only stop where hyper closes the
    /// connection, or later requests on it would go unchecked.
    #[tokio::test]
    async fn hyper_refuses_what_the_scanner_leaves_to_it() {
        for input in LEFT_TO_HYPER {
            let response = hyper_answer(input, false).await;
            assert!(response.starts_with(b"HTTP/1.1 400 "), "{:?} got {:?}", show(input), show(&response));
        }
    }

    /// An upgrade request is followed to its end; what comes after waits for its verdict.
    fn assert_awaits_verdict_after(request: &[u8], after: &[u8]) {
        let outcome = scan(&[request, after].concat());
        assert_eq!(outcome.violation, None, "{:?}", show(request));
        assert_eq!(outcome.state, State::Verdict, "{:?}", show(request));
        assert_eq!(outcome.used, request.len(), "{:?}", show(request));
        assert_eq!(&outcome.bytes[request.len()..], after, "bytes after the upgrade request were touched");
    }

    #[test]
    fn after_an_upgrade_or_connect_request_the_scanner_awaits_the_verdict() {
        assert_awaits_verdict_after(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            b"\x81\n\n",
        );
        assert_awaits_verdict_after(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\n\r\n", b"GET /\n\n");
        assert_awaits_verdict_after(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", b"\n\x16\x03");
        // A body first: the verdict is awaited where the message ends, not the head.
        assert_awaits_verdict_after(
            b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\n\n\n\n",
            b"\n",
        );
        assert_awaits_verdict_after(
            b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\n\r\n0\r\n\r\n",
            b"\n",
        );
        // Only the exact method CONNECT asks for a tunnel.
        assert_passes(b"CONNECTX / HTTP/1.1\r\nHost: x\r\n\r\nconnect / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn whitespace_after_a_chunk_size_is_poisoned_unless_an_extension_follows() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_poisoned(&[head, b"0 "].concat(), b"\r\n\r\n", Violation::ChunkSize);
        assert_poisoned(&[head, b"1\r\na\r\n0\t"].concat(), b"\r\n\r\n", Violation::ChunkSize);
        assert_passes(&[head, b"1 ;a=b\r\na\r\n0\t; last\r\n\r\n"].concat());
    }

    /// Reads that the test hands over one at a time.
    struct Reads(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Reads {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(next) = self.get_mut().0.pop_front() {
                buf.put_slice(&next);
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Reads once from `io`, or `None` if the read would wait.
    fn read_now<S: AsyncRead + Unpin>(io: &mut StrictFraming<S>) -> Option<Vec<u8>> {
        let mut bytes = [0u8; 1024];
        let mut buf = ReadBuf::new(&mut bytes);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(io).poll_read(&mut cx, &mut buf) {
            Poll::Ready(result) => {
                result.unwrap();
                Some(buf.filled().to_vec())
            }
            Poll::Pending => None,
        }
    }

    const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\n\r\n";
    const SMUGGLED: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\na";

    #[test]
    fn after_a_declined_upgrade_the_next_request_is_checked_as_strictly() {
        let mut io = StrictFraming::new(Reads(vec![[UPGRADE, SMUGGLED].concat()].into()));
        let verdict = io.verdict();
        assert_eq!(read_now(&mut io).unwrap(), UPGRADE, "only the upgrade request reaches hyper");
        assert_eq!(read_now(&mut io), None, "the next bytes wait for the verdict");
        verdict.answered(false);
        let next = read_now(&mut io).unwrap();
        assert_eq!(next.len(), SMUGGLED.len());
        assert_ne!(next, SMUGGLED, "the second Content-Length was not poisoned");
    }

    #[test]
    fn after_a_switch_the_tunnel_passes_untouched() {
        let mut io = StrictFraming::new(Reads(vec![[UPGRADE, SMUGGLED].concat()].into()));
        let verdict = io.verdict();
        assert_eq!(read_now(&mut io).unwrap(), UPGRADE);
        verdict.answered(true);
        assert_eq!(read_now(&mut io).unwrap(), SMUGGLED);
    }

    #[tokio::test]
    async fn reads_are_poisoned_before_the_reader_sees_them() {
        use tokio::io::AsyncReadExt;
        let mut io = StrictFraming::new(&b"GET / HTTP/1.1\r\nHost: x\n\r\n"[..]);
        let mut read = Vec::new();
        io.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, b"GET / HTTP/1.1\r\nHost: x\x01\r\n");
    }

    /// The module relies on hyper failing at the poisoned byte rather than waiting for the end
    /// of the head, which may never come.
    #[tokio::test]
    async fn hyper_answers_400_and_closes_before_a_poisoned_head_is_complete() {
        let unfinished = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4";
        let response = hyper_answer(unfinished, true).await;
        assert!(response.starts_with(b"HTTP/1.1 400 "), "{:?}", show(&response));
    }

    /// Trailers come after the head went to the worker: a poisoned one fails the body. hyper
    /// alone takes this LF for part of a trailer line, and the message to end two bytes later
    /// than a parser that ends lines at LF would.
    #[tokio::test]
    async fn a_bare_lf_in_trailers_fails_the_body() {
        let input = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
            1\r\na\r\n0\r\nX-Sum: 1\r\n\n\r\n\r\n";
        let alone = hyper_answer(input, false).await;
        assert!(alone.starts_with(b"HTTP/1.1 200 "), "hyper alone accepts it: {:?}", show(&alone));
        let response = hyper_answer(input, true).await;
        assert!(response.starts_with(b"HTTP/1.1 400 "), "{:?}", show(&response));
    }

    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    /// Everything hyper sends back for `input` until it closes the connection, served through
    /// [`StrictFraming`] when `strict`. The service reads the whole body: 200 if it arrives,
    /// 400 if it fails.
    async fn hyper_answer(input: &[u8], strict: bool) -> Vec<u8> {
        use std::convert::Infallible;
        use std::time::Duration;

        use http_body_util::{BodyExt, Empty};
        use hyper::server::conn::http1;
        use hyper_util::rt::TokioIo;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let io: Box<dyn Io> = if strict { Box::new(StrictFraming::new(server)) } else { Box::new(server) };
        let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let status = if req.into_body().collect().await.is_ok() { 200 } else { 400 };
            Ok::<_, Infallible>(
                hyper::Response::builder().status(status).body(Empty::<bytes::Bytes>::new()).unwrap(),
            )
        });
        let served = tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(io), service));
        client.write_all(input).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut response))
            .await
            .unwrap_or_else(|_| panic!("hyper neither answered nor closed on {:?}", show(input)))
            .unwrap();
        let _ = served.await;
        response
    }
}
