//! Handwritten HTTP/2 frames on a plain `TcpStream`, for the streams no client library would
//! send: floods of resets, CONTINUATION, SETTINGS and PING frames, oversized header blocks.
//! Header blocks use HPACK's static table and literals without indexing, never Huffman.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// RST_STREAM error code for a stream the server would not open.
pub const REFUSED_STREAM: u32 = 0x7;

/// One frame: its 9-byte header and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A header field literal without indexing, new name.
pub fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    string(out, name.as_bytes());
    string(out, value);
}

/// The header block of `GET path` to `authority`, with `extra` fields.
pub fn get_block(path: &str, authority: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    // Static table: 2 = :method GET, 6 = :scheme http; 4 = :path, 1 = :authority (names).
    let mut out = vec![0x82, 0x86];
    integer(&mut out, 0, 4, 4);
    string(&mut out, path.as_bytes());
    integer(&mut out, 0, 4, 1);
    string(&mut out, authority.as_bytes());
    for (name, value) in extra {
        field(&mut out, name, value);
    }
    out
}

/// A connection that has sent the preface and an empty SETTINGS frame.
pub struct RawH2 {
    pub stream: TcpStream,
    read: Vec<u8>,
}

/// A frame the server sent.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        Some(u32::from_be_bytes(self.payload.get(at..at + 4)?.try_into().ok()?))
    }
}

impl RawH2 {
    pub fn open(addr: SocketAddr) -> RawH2 {
        let stream = TcpStream::connect(addr).expect("connecting to rip");
        stream.set_nodelay(true).expect("setting nodelay");
        let mut raw = RawH2 { stream, read: Vec::new() };
        raw.send(&[PREFACE.to_vec(), frame(SETTINGS, 0, 0, &[])].concat()).expect("sending the preface");
        raw
    }

    /// Writes `bytes`, failing rather than waiting past 10 s for the server to read them.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        self.stream.write_all(bytes)
    }

    /// The next frame, or `None` once the server closed the connection or sent nothing more
    /// within `within`.
    pub fn next_frame(&mut self, within: Duration) -> Option<Frame> {
        let deadline = Instant::now() + within;
        loop {
            if self.read.len() >= 9 {
                let len = u32::from_be_bytes([0, self.read[0], self.read[1], self.read[2]]) as usize;
                if self.read.len() >= 9 + len {
                    let head: Vec<u8> = self.read.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
                    return Some(Frame {
                        kind: head[3],
                        flags: head[4],
                        stream,
                        payload: head[9..].to_vec(),
                    });
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).ok()?;
            let mut buf = [0u8; 16 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.read.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
                Err(_) => return None,
            }
        }
    }

    /// Frames until `pred` matches one (returned) or the connection ends (`None`), reading for
    /// at most `within`.
    pub fn until(&mut self, within: Duration, pred: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + within;
        while let Some(f) = self.next_frame(deadline.saturating_duration_since(Instant::now())) {
            if pred(&f) {
                return Some(f);
            }
        }
        None
    }
}
