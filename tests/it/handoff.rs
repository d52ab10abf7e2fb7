//! `--upstream handoff`: client connections passed to workers whole. What it keeps of the
//! default mode: spread, checks on hostile input, recycling without failed requests, graceful
//! stop, replacement of a dead worker.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use nix::sys::signal::Signal;

use crate::harness::{
    assert_status, log_field, request, runtime, send_signal, wait_until, Client, Load, Rip, WhoAmI,
    WorkerEvent, WAIT,
};

const HANDOFF: [&str; 2] = ["--upstream", "handoff"];

fn start(extra: &[&str]) -> Rip {
    let mut args = HANDOFF.to_vec();
    args.extend_from_slice(extra);
    let rip = Rip::start(&args);
    rip.wait_all_ready();
    rip
}

#[test]
fn connections_spread_over_every_worker_and_each_stays_with_its_worker() {
    let rt = runtime();
    let rip = start(&["--workers", "2"]);

    // Keep-alive load: six connections, so both workers get some.
    let report = rt.block_on(Load::get("/whoami").clients(6).total(120).run(rip.addr()));
    assert_eq!((report.ok, report.failed), (120, 0), "{report:?}");
    assert_eq!(report.pids().len(), 2, "pids answering: {:?}", report.pids());

    // One connection is one worker: every answer on it comes from the same process.
    let pids: BTreeSet<i32> = rt.block_on(async {
        let mut client = Client::new(rip.addr());
        let mut pids = BTreeSet::new();
        for _ in 0..20 {
            let reply = client.get("/whoami").await.expect("GET /whoami");
            pids.insert(WhoAmI::parse(&reply.body).expect("a /whoami answer").pid);
        }
        pids
    });
    assert_eq!(pids.len(), 1, "one connection was answered by {pids:?}");
    let logs = rip.logs();
    assert!(logs.iter().any(|l| l.contains("upstream handoff:")), "the trade-off was not logged at start");
}

#[test]
fn workers_set_forwarded_headers_from_the_peer_and_ignore_forged_ones() {
    let rt = runtime();
    let rip = start(&["--workers", "1"]);
    let reply = rt.block_on(async {
        let mut req = request(Method::GET, "/headers", crate::harness::empty());
        req.headers_mut().insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        req.headers_mut().insert("x-forwarded-proto", "https".parse().unwrap());
        Client::new(rip.addr()).request(req).await.expect("GET /headers")
    });
    assert_eq!(reply.status, StatusCode::OK);
    let headers = reply.json();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
}

#[test]
fn hostile_requests_are_refused_by_the_worker_as_the_front_end_would() {
    let rip = start(&["--workers", "1", "--max-body", "1k"]);
    let addr = rip.addr();
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n", "h".repeat(66 * 1024));
    let cases: [(&[u8], u16, &str); 6] = [
        (b"GET / HTTP/1.1\nHost: x\n\n", 400, "bare LF line ends"),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "Content-Length with Transfer-Encoding"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "no Host"),
        (b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 405, "CONNECT"),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", 413, "Content-Length past --max-body"),
        (huge.as_bytes(), 431, "a 66 KiB header"),
    ];
    for (raw, want, what) in cases {
        assert_status(addr, raw, want, what);
    }
    // The worker survived all of it.
    let reply = runtime().block_on(Client::new(addr).post("/echo", vec![b'k'; 1024])).unwrap();
    assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 1024));
}

#[test]
fn workers_recycle_at_max_requests_without_a_failed_request() {
    let rt = runtime();
    let rip = start(&["--workers", "2", "--max-requests", "20"]);

    let report = rt.block_on(
        Load::get("/whoami").clients(16).total(1000).deadline(Duration::from_secs(90)).run(rip.addr()),
    );

    assert_eq!((report.ok, report.failed), (1000, 0), "{report:?}");
    // Past its budget a worker closes each connection after the response, so its clients
    // reconnect and are handed to fresh workers.
    let recycled = rip.logs().iter().filter(|l| l.contains(" worker recycled ")).count();
    assert!(recycled >= 8, "only {recycled} workers recycled");
    assert!(report.pids().len() >= 8, "only {} distinct pids answered", report.pids().len());
}

#[test]
fn sigterm_lets_requests_in_flight_on_handed_connections_finish() {
    crate::serve::stops_gracefully_on(Signal::SIGTERM, 4, 1500, &HANDOFF);
}

#[test]
fn a_killed_worker_is_replaced_and_new_connections_are_served() {
    let rt = runtime();
    let rip = start(&["--workers", "2"]);
    let victim = rt.block_on(Client::new(rip.addr()).get("/whoami")).expect("GET /whoami");
    let victim = WhoAmI::parse(&victim.body).expect("a /whoami answer");

    let mark = rip.log_mark();
    send_signal(victim.pid, Signal::SIGKILL);
    let slot = victim.worker as usize;
    let replacement = rip.wait_for_replacement(mark, slot, WAIT).pid;

    // Every new connection is served, by the survivor or the replacement.
    let report = rt.block_on(async {
        let mut pids = BTreeSet::new();
        for _ in 0..40 {
            let reply =
                Client::new(rip.addr()).get("/whoami").await.expect("GET /whoami on a new connection");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            pids.insert(WhoAmI::parse(&reply.body).expect("a /whoami answer").pid);
        }
        pids
    });
    assert!(!report.contains(&victim.pid), "the killed worker answered: {report:?}");
    assert!(report.contains(&replacement), "the replacement {replacement} never answered: {report:?}");
    assert!(
        wait_until(WAIT, || rip
            .logs()
            .iter()
            .filter_map(|l| WorkerEvent::parse(l))
            .any(|e| e.pid == victim.pid && e.is("worker exited unexpectedly"))),
        "the kill was not logged"
    );
}

/// A worker whose thread is stuck gets no new connection once its heartbeat stops, and is
/// killed and replaced after `--timeout`; the connection it held ends with it (with hand-off
/// nothing can move off a worker: its requests are on connections only it reads).
#[test]
fn a_stuck_worker_gets_no_new_connection_and_is_killed_and_replaced() {
    let rt = runtime();
    // Round-robin, so that only the stall keeps new connections off the stuck worker
    // (least-pending would avoid it for the connection it holds).
    let rip = start(&["--workers", "2", "--timeout", "3s", "--balance", "round-robin"]);
    let addr = rip.addr();

    // Blocks the thread of the worker that gets this connection, far past --timeout.
    let mark = rip.log_mark();
    let stuck = rt.spawn(async move { Client::new(addr).get("/block/30000").await });
    let stalled =
        rip.wait_for_log_from(mark, |l| l.contains("worker stalled"), WAIT).expect("the stall was logged");
    let stalled = log_field(&stalled, "worker").expect("the stall names the worker").to_string();
    // Out of the rotation: new connections, while it is still alive, all go to the other one.
    let (survivor, slowest) = rt.block_on(async {
        let mut pids = BTreeSet::new();
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            let reply = Client::new(addr).get("/whoami").await.expect("GET /whoami on a new connection");
            slowest = slowest.max(started.elapsed());
            pids.insert(WhoAmI::parse(&reply.body).expect("a /whoami answer").pid);
        }
        (pids, slowest)
    });
    assert_eq!(survivor.len(), 1, "new connections went to the stalled worker too: {survivor:?}");
    assert!(slowest < Duration::from_secs(1), "a new connection waited {slowest:?}");

    let killed = rip
        .wait_for_log_from(mark, |l| WorkerEvent::parse(l).is_some_and(|e| e.is("worker hung, killed")), WAIT)
        .expect("the stuck worker was not killed");
    let killed = WorkerEvent::parse(&killed).unwrap();
    assert_eq!(killed.worker, stalled);
    assert!(!survivor.contains(&killed.pid), "the stuck worker answered");
    let replacement = rip.wait_for_replacement(mark, killed.slot(), WAIT).pid;
    assert_ne!(replacement, killed.pid);

    // The stuck request's connection ended with its worker, long before the 30 s.
    let outcome = rt.block_on(stuck).unwrap();
    assert!(outcome.is_err(), "the stuck request was answered: {:?}", outcome.map(|r| r.status));
    // New connections are served, by the survivor and the replacement.
    let pids: BTreeSet<i32> = rt.block_on(async {
        let mut pids = BTreeSet::new();
        for _ in 0..20 {
            let reply = Client::new(addr).get("/whoami").await.expect("GET /whoami on a new connection");
            pids.insert(WhoAmI::parse(&reply.body).expect("a /whoami answer").pid);
        }
        pids
    });
    assert!(pids.contains(&replacement), "the replacement {replacement} never answered: {pids:?}");
    assert!(!pids.contains(&killed.pid), "the stuck worker answered: {pids:?}");
    println!(
        "faults: handoff_stuck_worker new_connections_slowest_ms={} killed_after_timeout=true",
        slowest.as_millis()
    );
}
