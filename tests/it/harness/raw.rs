//! Handwritten HTTP/1.1 on a plain `TcpStream`: for requests no client would send, for reading
//! until the server closes, and for the blocking readiness poll. Loopback only, and every read
//! has a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A new connection to rip with Nagle off, so that each write leaves at once.
pub fn connect_raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connecting to rip");
    stream.set_nodelay(true).expect("setting nodelay");
    stream
}

/// Everything the server sends until it closes the connection (a reset counts as a close:
/// what came before it was read already). Fails if it stays open past `within`.
pub fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = [0; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "rip did not close the connection within {within:?}; got {:?}",
            String::from_utf8_lossy(&received)
        );
        stream.set_read_timeout(Some(left)).expect("setting a read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // A close with unread input in rip's buffer comes as a reset.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return received,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading from rip: {e}"),
        }
    }
}

/// Sends `request` on a new connection and checks the first answer's status, and that the
/// connection is then closed.
#[track_caller]
pub fn assert_status(addr: SocketAddr, request: &[u8], want: u16, what: &str) {
    let mut stream = connect_raw(addr);
    // rip may answer and close before the whole request is written: that is fine.
    let _ = stream.write_all(request);
    let received = read_until_closed(&mut stream, Duration::from_secs(10));
    let head = String::from_utf8_lossy(&received);
    assert_eq!(status_code(&head), Some(want), "{what}: got {head:?}");
}

/// The status code of a response that starts with `HTTP/1.1 `.
pub fn status_code(head: &str) -> Option<u16> {
    head.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok())
}

/// The trimmed value of header `name` (any case) in a response head, the status line first.
pub fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// One blocking `GET` with `Connection: close`, for the readiness poll.
pub(super) fn blocking_get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    // Longer than rip's default queue timeout, which a /healthz may wait out for a worker.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head = String::from_utf8_lossy(&response);
    status_code(&head).ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))
}
