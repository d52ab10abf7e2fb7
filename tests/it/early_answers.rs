//! Early answers: an app may answer a request before reading its body — a 404 for a path it
//! does not have, a 401 or a 413 for an upload it will not take — and the client must get
//! that answer, as nginx relays it, never a 502. Each client sends the whole request in one
//! write and then the next on the same connection, or on a new one if rip closed it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::harness::{connect_raw, header_value, status_code, Rip};

/// Clients at once, and requests each.
const CLIENTS: usize = 16;
const ROUNDS: usize = 20;

/// A request whose body the demo app never reads (`/nope` is no route of it).
fn unread_upload(chunked: bool) -> Vec<u8> {
    if chunked {
        let chunk = vec![b'c'; 1024];
        let mut request =
            b"POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n".to_vec();
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n0\r\n\r\n");
        request
    } else {
        let mut request = b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n".to_vec();
        request.resize(request.len() + 65536, b'l');
        request
    }
}

/// One response's status and whether it asked to close; reads its body to the end.
fn read_response(stream: &mut TcpStream) -> std::io::Result<(u16, bool)> {
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_len = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before an answer"));
        }
        received.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&received[..head_len]).into_owned();
    let status = status_code(&head).unwrap_or(0);
    let length: usize = header_value(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while received.len() < head_len + length {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    let close = header_value(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok((status, close))
}

/// Statuses every client got, in order, for `ROUNDS` unread uploads each.
fn run(addr: SocketAddr, chunked: bool) -> Vec<u16> {
    let request = unread_upload(chunked);
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let mut statuses = Vec::new();
                    let mut stream: Option<TcpStream> = None;
                    for _ in 0..ROUNDS {
                        let s = stream.get_or_insert_with(|| {
                            let s = connect_raw(addr);
                            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                            s
                        });
                        let answer = s.write_all(&request).and_then(|()| read_response(s));
                        match answer {
                            Ok((status, close)) => {
                                statuses.push(status);
                                if close {
                                    stream = None;
                                }
                            }
                            Err(_) => {
                                statuses.push(0);
                                stream = None;
                            }
                        }
                    }
                    statuses
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().expect("a client panicked")).collect()
    })
}

fn every_early_answer_reaches_its_client(upstream: &str) {
    let rip = Rip::start(&["--workers", "2", "--upstream", upstream, "--access-log", "off"]);
    rip.wait_all_ready();
    for chunked in [false, true] {
        let statuses = run(rip.addr(), chunked);
        let answered = statuses.iter().filter(|s| **s == 404).count();
        let body = if chunked { "1 KiB chunked" } else { "64 KiB Content-Length" };
        println!(
            "faults: early_answer upstream={upstream} body={body:?} clients={CLIENTS} sent={} got_404={answered}",
            statuses.len()
        );
        assert_eq!(answered, statuses.len(), "{upstream}, {body}: statuses other than 404: {statuses:?}");
    }
}

#[test]
fn every_early_answer_reaches_its_client_over_http2() {
    every_early_answer_reaches_its_client("http2");
}

#[test]
fn every_early_answer_reaches_its_client_over_http1() {
    every_early_answer_reaches_its_client("http1");
}

#[test]
fn every_early_answer_reaches_its_client_with_handoff() {
    every_early_answer_reaches_its_client("handoff");
}
