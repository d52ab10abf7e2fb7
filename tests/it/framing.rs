//! Request framing: every ambiguous or malformed request is answered 400 and closed.
//!
//! Each test writes raw bytes over a plain TCP socket, since no HTTP client would send these
//! requests, and reads until rip closes the connection. A refused request must get exactly one
//! answer, 400, and then the close: a second answer would mean that bytes hidden in the first
//! request were taken for a request of their own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::{self, connect_raw, header_value, status_code, Rip};

/// Longest wait for an answer and for the close. Far below the header timeout rip gets (see
/// [`start`]), so a connection left waiting for the rest of a head fails the test instead of
/// passing late.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn start() -> Rip {
    Rip::start(&["--workers", "1", "--header-timeout", "60s"])
}

/// One response as read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// Sends `request` in one write, then reads every response until rip closes the connection.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<Answer> {
    let mut stream = connect(addr);
    stream.write_all(request).expect("sending the request");
    read_until_closed(&mut stream)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = connect_raw(addr);
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("setting a read timeout");
    stream
}

/// Every response rip sends until it closes the connection, which it must within
/// [`ANSWER_TIMEOUT`].
fn read_until_closed(stream: &mut TcpStream) -> Vec<Answer> {
    let received = harness::read_until_closed(stream, ANSWER_TIMEOUT);
    let mut answers = Vec::new();
    let mut rest = &received[..];
    while !rest.is_empty() {
        let (answer, used) =
            parse_response(rest).unwrap_or_else(|| panic!("an incomplete response: {:?}", lossy(rest)));
        answers.push(answer);
        rest = &rest[used..];
    }
    answers
}

/// Reads exactly one response from a connection that stays open.
fn read_one(stream: &mut TcpStream) -> Answer {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut received = Vec::new();
    let mut buf = [0; 16 * 1024];
    loop {
        if let Some((answer, used)) = parse_response(&received) {
            assert_eq!(used, received.len(), "more than one response: {:?}", lossy(&received));
            return answer;
        }
        assert!(Instant::now() < deadline, "no whole response within {ANSWER_TIMEOUT:?}");
        match stream.read(&mut buf) {
            Ok(0) => panic!("rip closed the connection; got {:?}", lossy(&received)),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading from rip: {e}; got {:?}", lossy(&received)),
        }
    }
}

/// The first response in `bytes` and its length, or `None` while it is incomplete. Knows just
/// what rip sends: Content-Length or chunked bodies.
fn parse_response(bytes: &[u8]) -> Option<(Answer, usize)> {
    let head_len = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8(bytes[..head_len].to_vec()).expect("a UTF-8 response head");
    let status = status_code(&head).unwrap_or_else(|| panic!("not an HTTP/1.1 response: {head:?}"));
    let header = |name: &str| header_value(&head, name).map(str::to_ascii_lowercase);
    let mut at = head_len;
    let mut body = Vec::new();
    if header("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let line_len = bytes[at..].windows(2).position(|w| w == b"\r\n")?;
            let line = std::str::from_utf8(&bytes[at..at + line_len]).expect("a chunk-size line");
            let size =
                usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).expect("a chunk size");
            at += line_len + 2;
            if size == 0 {
                // rip sends no trailers.
                bytes.get(at..at + 2)?;
                at += 2;
                break;
            }
            body.extend_from_slice(bytes.get(at..at + size)?);
            bytes.get(at + size..at + size + 2)?;
            at += size + 2;
        }
    } else {
        let len: usize = header("content-length").map_or(0, |v| v.parse().expect("a Content-Length"));
        body.extend_from_slice(bytes.get(at..at + len)?);
        at += len;
    }
    Some((Answer { status, head, body }, at))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_refused(answers: &[Answer], request: &[u8]) {
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [400], "answers to {:?}: {answers:#?}", lossy(request));
}

/// A request with `head` (lines after the request line) and `body`, `\r\n` between lines.
fn post(head: &[&str], body: &str) -> Vec<u8> {
    let mut request = String::from("POST /echo HTTP/1.1\r\nHost: x\r\n");
    for line in head {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.push_str(body);
    request.into_bytes()
}

#[test]
fn content_length_with_transfer_encoding_is_refused_and_closed() {
    let rip = start();
    for request in [
        post(&["Content-Length: 9", "Transfer-Encoding: chunked"], "4\r\nping\r\n0\r\n\r\n"),
        post(&["transfer-encoding: chunked", "content-length: 9"], "4\r\nping\r\n0\r\n\r\n"),
        post(&["Transfer-Encoding: chunked", "Content-Length: 0"], "0\r\n\r\n"),
    ] {
        assert_refused(&exchange(rip.addr(), &request), &request);
    }
}

#[test]
fn a_request_hidden_behind_length_and_chunked_is_never_answered() {
    let rip = start();
    let hidden = "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n";
    // CL.TE: a proxy that trusts the length forwards one request; chunked ends after `0`.
    let cl_te = format!("0\r\n\r\n{hidden}");
    // TE.CL: a proxy that trusts chunked forwards one request; the length ends after `2c\r\n`.
    let te_cl = format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len());
    for request in [
        post(&[&format!("Content-Length: {}", cl_te.len()), "Transfer-Encoding: chunked"], &cl_te),
        post(&["Transfer-Encoding: chunked", "Content-Length: 4"], &te_cl),
    ] {
        let answers = exchange(rip.addr(), &request);
        assert_refused(&answers, &request);
        assert!(!lossy(&answers[0].body).contains("pid"), "/whoami answered: {answers:#?}");
    }
}

#[test]
fn bare_lf_line_endings_are_refused_and_closed() {
    let rip = start();
    for request in [
        &b"GET / HTTP/1.1\nHost: x\n\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\nAccept: */*\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\n",
        b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        assert_refused(&exchange(rip.addr(), request), request);
    }
}

#[test]
fn a_repeated_content_length_is_refused_even_with_the_same_value() {
    let rip = start();
    for request in [
        post(&["Content-Length: 4", "Content-Length: 4"], "ping"),
        post(&["content-length: 4", "X-Other: 1", "CONTENT-LENGTH: 4"], "ping"),
    ] {
        assert_refused(&exchange(rip.addr(), &request), &request);
    }
}

/// The classes hyper refused before this module existed: they must stay refused.
#[test]
fn malformed_framing_methods_targets_and_versions_are_refused_and_closed() {
    let rip = start();
    let requests: Vec<Vec<u8>> = vec![
        post(&["Content-Length: 4", "Content-Length: 5"], "ping!"),
        post(&["Content-Length: +4"], "ping"),
        post(&["Content-Length: -1"], ""),
        post(&["Content-Length: 4x"], "ping"),
        post(&["Transfer-Encoding: chunked"], "zz\r\nping\r\n0\r\n\r\n"),
        post(&["Transfer-Encoding: gzip"], "ping"),
        post(&["Transfer-Encoding: chunked, gzip"], "ping"),
        post(&["X-Folded: a", " b"], ""),
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /\r\n\r\n".to_vec(),
        b"GET / HTTP/3\r\nHost: x\r\n\r\n".to_vec(),
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".to_vec(),
    ];
    for request in &requests {
        assert_refused(&exchange(rip.addr(), request), request);
    }
}

#[test]
fn a_bad_request_pipelined_behind_a_good_one_is_refused_after_it_is_answered() {
    let rip = start();
    let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
                    GET / HTTP/1.1\r\nHost: x\nContent-Length: 0\r\n\r\n";
    let answers = exchange(rip.addr(), request);
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 400], "{answers:#?}");
    assert_eq!(answers[0].body, b"hello");
}

#[test]
fn a_refused_head_is_answered_before_the_client_finishes_it() {
    let rip = start();
    let mut stream = connect(rip.addr());
    // No empty line: without the poisoned byte, hyper would wait for it until the 60 s header
    // timeout and the read below would time out.
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n")
        .unwrap();
    let answers = read_until_closed(&mut stream);
    assert_refused(&answers, b"(an unfinished head)");
}

#[test]
fn pipelined_requests_with_lf_filled_bodies_pass_byte_exactly() {
    let rip = start();
    // Bodies that hold what would be violations in a head: they must not be rewritten.
    let hidden = "GET /\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n\n\x01";
    let mut request = post(&[&format!("Content-Length: {}", hidden.len())], hidden);
    request.extend_from_slice(&post(
        &["Transfer-Encoding: chunked", "Trailer: X-Sum"],
        "5;name=\"v\"\r\nab\ncd\r\n3 ; last\r\n\n\r\n\r\n0;end\r\nX-Sum: 1\r\n\r\n",
    ));
    request.extend_from_slice(b"\r\nGET /whoami HTTP/1.1\r\nHOST: x\r\n\r\n");
    request.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let answers = exchange(rip.addr(), &request);
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200], "{answers:#?}");
    assert_eq!(lossy(&answers[0].body), hidden);
    assert_eq!(answers[1].body, b"ab\ncd\n\r\n");
    assert!(lossy(&answers[2].body).contains("\"pid\""), "{:?}", answers[2]);
}

#[test]
fn keep_alive_requests_split_across_writes_pass_byte_exactly() {
    let rip = start();
    let mut stream = connect(rip.addr());
    // Large bodies of every byte value, sent in pieces that cut heads, chunk lines and data
    // at odd places, so the scanner has to carry its state from read to read.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in data.chunks(70_001) {
        chunked.extend_from_slice(format!("{:X};n=1\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\nX-Sum: 2\r\n\r\n");
    let mut sized =
        format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", data.len()).into_bytes();
    sized.extend_from_slice(&data);

    for request in [&chunked, &sized, &chunked] {
        // The echo streams back while the body goes out: write from a thread of its own, so
        // that neither side waits on full socket buffers.
        let answer = std::thread::scope(|s| {
            let mut writer = stream.try_clone().expect("cloning the socket");
            s.spawn(move || request.chunks(7_919).for_each(|piece| writer.write_all(piece).unwrap()));
            read_one(&mut stream)
        });
        assert_eq!(answer.status, 200, "{}", answer.head);
        assert!(
            answer.body == data,
            "the echo differs from what was sent ({} bytes back)",
            answer.body.len()
        );
    }
    stream.write_all(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_one(&mut stream).status, 200);
}
