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
//! hyper answers 400 and closes. Anything the scanner does not follow (input hyper refuses
//! anyway, a protocol upgrade) stops the scanning: the rest of the connection passes
//! untouched and hyper's parser stays the judge, so valid traffic is never rewritten.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

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
}

impl<S> StrictFraming<S> {
    pub fn new(inner: S) -> StrictFraming<S> {
        StrictFraming { inner, scanner: Scanner::default() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StrictFraming<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(violation) = this.scanner.scan(&mut buf.filled_mut()[start..]) {
            debug!(%violation, "request head refused before parsing");
        }
        Poll::Ready(Ok(()))
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
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Violation::BareLf => "bare LF line ending",
            Violation::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            Violation::DuplicateLength => "more than one Content-Length",
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
    /// Not scanning any more: a violation was poisoned (hyper closes after its 400), or the
    /// stream is something this scanner does not follow.
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
    fn scan(&mut self, bytes: &mut [u8]) -> Option<Violation> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Off => return None,
                State::Body(left) | State::ChunkData(left) => {
                    let skipped = left.min((bytes.len() - i) as u64);
                    i += skipped as usize;
                    self.state = match (self.state, left - skipped) {
                        (State::Body(_), 0) => State::Idle,
                        (State::Body(_), left) => State::Body(left),
                        (_, 0) => State::ChunkDataCr,
                        (_, left) => State::ChunkData(left),
                    };
                }
                _ => {
                    match self.next_relevant(&bytes[i..]) {
                        Some(Some(at)) => i += at,
                        Some(None) => return None,
                        None => {}
                    }
                    if let Err(violation) = self.step(bytes[i]) {
                        bytes[i] = POISON;
                        self.state = State::Off;
                        return Some(violation);
                    }
                    i += 1;
                }
            }
        }
        None
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
            (ChunkSize(n) | ChunkSpace(n) | ChunkExtension(n), b'\r') => ChunkSizeLf(n),
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
            TrailerStart => Idle,
            // A request line that is only a method, a field line without a colon, an empty
            // Content-Length: hyper refuses them.
            _ => Off,
        }
    }

    /// The state after the head: its body, the next message, or off for a tunnel.
    fn body(&mut self) -> State {
        let head = std::mem::take(&mut self.head);
        if head.tunnel {
            // Whether the upgrade happens is decided by the response: from here on the bytes
            // may be WebSocket frames, which must not be rewritten. If the worker declines,
            // hyper keeps the connection and the rest of it goes unchecked, unless the proxy
            // closes connections after a declined upgrade.
            State::Off
        } else if head.chunked {
            State::ChunkStart
        } else if head.length > 0 {
            State::Body(head.length)
        } else {
            State::Idle
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
    }

    /// Scans `input` as reads that end at each of `cuts`.
    fn scan_split(input: &[u8], cuts: &[usize]) -> Outcome {
        let mut scanner = Scanner::default();
        let mut bytes = input.to_vec();
        let mut violation = None;
        let mut start = 0;
        for &cut in cuts.iter().chain([input.len()].iter()) {
            if let Some(v) = scanner.scan(&mut bytes[start..cut]) {
                assert_eq!(violation, None, "a second violation was reported");
                violation = Some(v);
            }
            start = cut;
        }
        Outcome { bytes, violation, state: scanner.state }
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

    #[test]
    fn nothing_after_an_upgrade_or_connect_head_is_touched() {
        assert_left_to_hyper(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\n\n",
        );
        assert_left_to_hyper(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n\n\x16\x03");
        // Only the exact method CONNECT opens a tunnel.
        assert_passes(b"CONNECTX / HTTP/1.1\r\nHost: x\r\n\r\nconnect / HTTP/1.1\r\nHost: x\r\n\r\n");
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
