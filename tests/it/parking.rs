//! Idle keep-alive connections are parked: after a second with nothing to do, a client
//! connection is held as its socket alone, and its next request is served on the same
//! connection as if nothing happened — for many clients at once, for a request split across
//! the wake-up, and with the idle limit and a stop still applying.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::{log_addr, parse_prometheus, runtime, wait_until, Client, Rip, WAIT};

/// `rip serve` with an admin listener; returns it and the admin address.
fn start(extra: &[&str]) -> (Rip, SocketAddr) {
    let mut args = vec!["--workers", "2", "--admin", "127.0.0.1:0", "--access-log", "off"];
    args.extend_from_slice(extra);
    let rip = Rip::start(&args);
    rip.wait_all_ready();
    let admin = rip
        .wait_for_log(|l| l.contains(" admin listener started "), WAIT)
        .and_then(|l| log_addr(&l))
        .expect("the admin address is logged");
    (rip, admin)
}

/// `rip_client_connections_parked` now.
pub(crate) fn parked(admin: SocketAddr) -> usize {
    let text = runtime().block_on(async { Client::new(admin).get("/metrics").await.unwrap().text() });
    parse_prometheus(&text)
        .iter()
        .find(|s| s.name == "rip_client_connections_parked")
        .map(|s| s.value as usize)
        .expect("rip_client_connections_parked is exported")
}

/// Sends `GET path` on `stream` (keep-alive) and reads one whole answer; its status and body.
fn get(stream: &mut TcpStream, path: &str) -> (u16, String) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: rip.test\r\n\r\n").unwrap();
    read_answer(stream)
}

fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_answer_from(stream)
}

/// One whole keep-alive answer from `stream`, whose reads time out: its status and body.
pub(crate) fn read_answer_from(stream: &mut impl Read) -> (u16, String) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("reading an answer");
        assert!(n > 0, "the connection closed before its answer: {:?}", String::from_utf8_lossy(&bytes));
        bytes.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if body.len() >= length {
                let status = head[9..12].parse().unwrap();
                assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
                return (status, body[..length].to_string());
            }
        }
    }
}

/// `n` keep-alive connections that each got one answer and are now parked.
fn parked_clients(rip: &Rip, admin: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut streams: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(rip.addr()).unwrap()).collect();
    for stream in &mut streams {
        assert_eq!(get(stream, "/").0, 200);
    }
    assert!(
        wait_until(Duration::from_secs(10), || parked(admin) >= n),
        "{} of {n} idle connections parked",
        parked(admin)
    );
    streams
}

#[test]
fn idle_connections_are_parked_and_their_next_requests_served_on_the_same_connection() {
    const CLIENTS: usize = 100;
    let (rip, admin) = start(&[]);
    let mut streams = parked_clients(&rip, admin, CLIENTS);
    // Each wakes its connection with a request: half whole, half split across the wake-up,
    // so that the parked read takes only the first bytes of it.
    for (i, stream) in streams.iter_mut().enumerate() {
        if i % 2 == 0 {
            assert_eq!(get(stream, "/whoami").0, 200);
        } else {
            stream.write_all(b"GET /who").unwrap();
            std::thread::sleep(Duration::from_millis(5));
            write!(stream, "ami HTTP/1.1\r\nHost: rip.test\r\n\r\n").unwrap();
            let (status, body) = read_answer(stream);
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"pid\""), "{body}");
        }
    }
    assert!(parked(admin) < CLIENTS, "woken connections are not counted as parked");
    // And again: parked a second time, served a second time.
    assert!(wait_until(Duration::from_secs(10), || parked(admin) >= CLIENTS), "not parked again");
    for stream in &mut streams {
        assert_eq!(get(stream, "/").0, 200);
    }
}

#[test]
fn a_parked_connection_is_closed_at_the_idle_limit_and_at_once_on_a_stop() {
    let (mut rip, admin) = start(&["--header-timeout", "3s"]);
    let mut idle = TcpStream::connect(rip.addr()).unwrap();
    assert_eq!(get(&mut idle, "/").0, 200);
    assert!(wait_until(Duration::from_secs(5), || parked(admin) >= 1), "never parked");
    // Closed about --header-timeout after its last request, as hyper closes idle ones.
    let since = Instant::now();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(idle.read(&mut byte).expect("a close, not a timeout"), 0);
    assert!(since.elapsed() < Duration::from_secs(4), "closed after {:?}", since.elapsed());

    let mut waiting = TcpStream::connect(rip.addr()).unwrap();
    assert_eq!(get(&mut waiting, "/").0, 200);
    assert!(wait_until(Duration::from_secs(5), || parked(admin) >= 1), "never parked");
    let stopped = Instant::now();
    rip.signal(Signal::SIGTERM);
    waiting.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(waiting.read(&mut byte).expect("a close on the stop"), 0);
    assert!(rip.wait_exit(Duration::from_secs(10)).success());
    assert!(stopped.elapsed() < Duration::from_secs(5), "the stop took {:?}", stopped.elapsed());
}

/// A parked connection keeps its place under `--max-connections`: with the limit reached by
/// parked clients, a new one waits until one of them closes; and parked clients that all wake
/// at once, from threads of their own, are all served.
#[test]
fn parked_connections_keep_their_place_and_wake_together() {
    const CLIENTS: usize = 40;
    let max = CLIENTS.to_string();
    let (rip, admin) = start(&["--max-connections", &max]);
    let mut streams = parked_clients(&rip, admin, CLIENTS);
    let mut over = TcpStream::connect(rip.addr()).unwrap();
    write!(over, "GET / HTTP/1.1\r\nHost: rip.test\r\n\r\n").unwrap();
    over.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        over.read(&mut byte).is_err(),
        "a connection past --max-connections was served while the rest were parked"
    );

    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS - 1));
    let last = streams.pop().unwrap();
    let woken: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                get(&mut stream, "/whoami")
            })
        })
        .collect();
    for thread in woken {
        let (status, body) = thread.join().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    drop(last);
    let (status, _) = read_answer(&mut over);
    assert_eq!(status, 200, "the waiting connection is served once a parked one closes");
}
