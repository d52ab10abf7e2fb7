//! A minimal WebSocket client (RFC 6455) on a blocking `TcpStream`, for tests of the chat
//! example: the handshake with a fixed key, masked text and close frames out, whole server
//! frames in. Loopback only, every read has a deadline, and a connection that ends without a
//! Close frame is told apart from one that closed politely.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::raw::{connect_raw, header_value, status_code};

/// The key from RFC 6455 §1.3 and the accept value it implies, so that no SHA-1 is needed.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Clients must mask what they send; the key needs no randomness against a server under test.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xa;

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    /// A Close frame: its status code (none when the body is empty) and reason.
    Close(Option<u16>, String),
    /// Any other opcode, with its payload.
    Other(u8, Vec<u8>),
}

/// What a read got instead of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The server closed (or reset) the TCP connection without a Close frame.
    Dropped,
    /// Nothing whole arrived before the deadline.
    TimedOut,
}

/// One client connection after a successful handshake.
#[derive(Debug)]
pub struct WebSocket {
    stream: TcpStream,
    /// Bytes read and not yet part of a returned frame.
    pending: Vec<u8>,
}

impl WebSocket {
    /// Opens `path` on `addr` and completes the handshake; panics unless the server switched
    /// protocols with the accept value the key calls for.
    pub fn connect(addr: SocketAddr, path: &str) -> WebSocket {
        assert!(addr.ip().is_loopback(), "tests talk to loopback only");
        let mut stream = connect_raw(addr);
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        )
        .expect("writing the handshake");
        let mut ws = WebSocket { stream, pending: Vec::new() };
        let deadline = Instant::now() + super::WAIT;
        let head_len = loop {
            if let Some(at) = ws.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            ws.fill(deadline).unwrap_or_else(|e| panic!("no handshake response: {e:?}"));
        };
        let head = String::from_utf8_lossy(&ws.pending[..head_len]).into_owned();
        ws.pending.drain(..head_len);
        assert_eq!(status_code(&head), Some(101), "{head}");
        assert_eq!(header_value(&head, "sec-websocket-accept"), Some(ACCEPT), "{head}");
        ws
    }

    pub fn send_text(&mut self, text: &str) {
        self.send(TEXT, text.as_bytes());
    }

    /// Answers or starts the closing handshake with `code`.
    pub fn send_close(&mut self, code: u16) {
        self.send(CLOSE, &code.to_be_bytes());
    }

    /// The next frame, waiting up to `within`.
    pub fn read_frame(&mut self, within: Duration) -> Result<Frame, Ended> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((frame, len)) = parse(&self.pending) {
                self.pending.drain(..len);
                return Ok(frame);
            }
            self.fill(deadline)?;
        }
    }

    /// The next text message, answering pings on the way; panics on anything else.
    #[track_caller]
    pub fn read_text(&mut self, within: Duration) -> String {
        loop {
            match self.read_frame(within) {
                Ok(Frame::Text(text)) => return text,
                Ok(Frame::Other(PING, payload)) => self.send(PONG, &payload),
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// One unfragmented, masked frame.
    fn send(&mut self, opcode: u8, payload: &[u8]) {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        self.stream.write_all(&frame).expect("writing a frame");
    }

    /// Reads what the socket has into `pending`, waiting until `deadline`.
    fn fill(&mut self, deadline: Instant) -> Result<(), Ended> {
        let mut buf = [0; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Ended::TimedOut);
            }
            self.stream.set_read_timeout(Some(left)).expect("setting a read timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(Ended::Dropped),
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(Ended::Dropped),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading a WebSocket: {e}"),
            }
        }
    }
}

/// The first whole frame in `bytes` and its length on the wire, if it is all there. Server
/// frames are unmasked; a fragmented one is a failure, as the chat sends none.
fn parse(bytes: &[u8]) -> Option<(Frame, usize)> {
    let [first, second] = *bytes.first_chunk::<2>()?;
    let rest = &bytes[2..];
    assert!(first & 0x80 != 0, "a fragmented frame: {bytes:?}");
    assert!(second & 0x80 == 0, "a masked frame from the server: {bytes:?}");
    let (len, header) = match second & 0x7f {
        126 => (u16::from_be_bytes(*rest.first_chunk::<2>()?) as usize, 4),
        127 => (u64::from_be_bytes(*rest.first_chunk::<8>()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = bytes.get(header..header + len)?;
    let frame = match first & 0x0f {
        TEXT => Frame::Text(String::from_utf8(payload.to_vec()).expect("a text frame is UTF-8")),
        CLOSE => {
            let code = payload.first_chunk::<2>().map(|c| u16::from_be_bytes(*c));
            Frame::Close(code, String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned())
        }
        opcode => Frame::Other(opcode, payload.to_vec()),
    };
    Some((frame, header + len))
}
