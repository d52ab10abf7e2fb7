//! Workers that stop turning and requests that take too long, under 32 concurrent clients
//! with 2 and with 4 workers:
//!
//! - a handler that blocks its worker's thread: the worker's heartbeat stops, it leaves the
//!   rotation within about 100 ms, the requests waiting on it that can be sent again move to
//!   the others, and it is killed and replaced once silent for `--timeout`; only the blocked
//!   request itself gets an error (its 504);
//! - a slow async request past `--request-timeout`: its 504, the request cancelled on its
//!   worker, and the worker — which was serving others all along — left alone.
//!
//! Tests print one `faults: ...` line with their figures, shown with `-- --nocapture`.

use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::harness::{
    is_running, lines_after, log_field, runtime, summary, wait_until, Client, Load, Rip, WorkerEvent, WAIT,
};

/// Concurrent clients in every test here: the behaviour under test depends on requests
/// queueing on a worker, which one sequential client never shows.
const CLIENTS: usize = 32;

#[test]
fn a_blocked_thread_costs_only_its_own_request_with_2_workers() {
    a_blocked_thread_costs_only_its_own_request(2);
}

#[test]
fn a_blocked_thread_costs_only_its_own_request_with_4_workers() {
    a_blocked_thread_costs_only_its_own_request(4);
}

fn a_blocked_thread_costs_only_its_own_request(workers: usize) {
    let rt = runtime();
    let rip = Rip::start(&["--workers", &workers.to_string(), "--timeout", "2s", "--access-log", "off"]);
    rip.wait_all_ready();
    let addr = rip.addr();

    let load = Load::get("/whoami").clients(CLIENTS).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(addr));
    assert!(wait_until(WAIT, || traffic.done() >= 200), "load did not get going");

    let mark = rip.log_mark();
    let started = Instant::now();
    let blocked = rt.block_on(async { Client::new(addr).get("/block/6000").await }).expect("GET /block/6000");
    let elapsed = started.elapsed();
    // The blocked request is the one that cannot be saved: its worker will never answer it.
    // It gets its 504 when the worker has been silent for --timeout, not the 6 s it blocks.
    assert_eq!(blocked.status, StatusCode::GATEWAY_TIMEOUT, "{}", blocked.text());
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(5),
        "504 after {elapsed:?}, want about the 2 s timeout"
    );

    let stalled =
        rip.wait_for_log_from(mark, |l| l.contains("worker stalled"), WAIT).expect("the stall was logged");
    let silent_ms: u64 = log_field(&stalled, "silent_ms").and_then(|v| v.parse().ok()).expect(&stalled);
    // 100 ms of silence, sampled every 10 ms; the rest is room for a loaded CI machine.
    assert!((100..400).contains(&silent_ms), "out of the rotation after {silent_ms} ms: {stalled}");
    assert_eq!(log_field(&stalled, "stuck_in_a_request"), Some("true"), "{stalled}");
    let worker = log_field(&stalled, "worker").expect("the stall names the worker").to_string();

    let killed = rip
        .wait_for_log_from(mark, |l| event_of(l, "worker hung, killed", &worker), WAIT)
        .expect("the silent worker was killed");
    let hung_pid = WorkerEvent::parse(&killed).unwrap().pid;
    let slot = WorkerEvent::parse(&killed).unwrap().slot();
    let replacement = rip.wait_for_replacement(mark, slot, WAIT);
    assert_ne!(replacement.worker, worker);
    assert!(!is_running(hung_pid), "the hung worker {hung_pid} still runs");

    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 200), "load stalled after the replacement");
    traffic.stop();
    let report = rt.block_on(running).unwrap();
    let moved = lines_after(&rip, mark, "request moved off a stalled worker");
    let slow = report.slower_than(Duration::from_secs(1));
    println!(
        "faults: blocked_thread workers={workers} clients={CLIENTS} blocked_status=504 after_ms={} \
         out_of_rotation_after_ms={silent_ms} moved={} others_sent={} others_failed={} \
         others_slower_than_1s={slow} others_slowest_ms={}",
        elapsed.as_millis(),
        moved.len(),
        report.sent,
        report.failed,
        report.slowest().as_millis(),
    );
    assert_eq!(report.failed, 0, "{}", summary(&report));
    assert!(slow <= 1, "{slow} requests took over 1 s; slowest {:?}", report.slowest());
    // Requests were waiting on the worker when it stalled (32 clients over a few workers), and
    // none was the blocked one.
    assert!(!moved.is_empty(), "no request moved off the stalled worker");
    assert!(moved.iter().all(|l| log_field(l, "path") == Some("/whoami")), "{moved:?}");
}

#[test]
fn a_request_past_the_request_timeout_gets_504_and_its_worker_lives_with_2_workers() {
    a_request_past_the_request_timeout_gets_504_and_its_worker_lives(2);
}

#[test]
fn a_request_past_the_request_timeout_gets_504_and_its_worker_lives_with_4_workers() {
    a_request_past_the_request_timeout_gets_504_and_its_worker_lives(4);
}

/// `--request-timeout` answers 504 to the one slow request and cancels it on its worker; the
/// worker lives, and the echoes in flight on every worker at the same time come back byte for
/// byte.
fn a_request_past_the_request_timeout_gets_504_and_its_worker_lives(workers: usize) {
    let rt = runtime();
    let rip =
        Rip::start(&["--workers", &workers.to_string(), "--request-timeout", "1s", "--access-log", "off"]);
    rip.wait_all_ready();
    let addr = rip.addr();
    let mut before = rip.worker_pids();
    before.sort();
    let echoes: Vec<_> = (0..CLIENTS)
        .map(|client| {
            rt.spawn(async move {
                let mut http = Client::new(addr);
                let body = format!("client {client} says hello; ").repeat(4000);
                let deadline = Instant::now() + Duration::from_millis(1500);
                let mut sent = 0;
                while Instant::now() < deadline && sent < 200 {
                    let reply = http.post("/echo", body.clone()).await.expect("POST /echo");
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                    assert!(reply.body == body.as_bytes(), "echo {client} came back changed");
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let started = Instant::now();
    let slow = rt.block_on(async { Client::new(addr).get("/sleep/5000").await }).expect("GET /sleep/5000");
    let elapsed = started.elapsed();
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "{}", slow.text());
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "504 after {elapsed:?}"
    );
    let echoed: usize = echoes.into_iter().map(|e| rt.block_on(e).expect("an echo client")).sum();
    let mut after = rip.worker_pids();
    after.sort();
    assert_eq!(after, before, "a worker was replaced for one slow request");
    assert!(lines_after(&rip, 0, "worker hung").is_empty(), "a worker was taken for hung");
    assert!(
        lines_after(&rip, 0, "worker stalled").is_empty(),
        "a worker serving others was taken for stalled"
    );
    println!(
        "faults: request_timeout workers={workers} clients={CLIENTS} status=504 after_ms={} \
         echoes_ok={echoed} workers_kept=true",
        elapsed.as_millis()
    );
}

/// `line` is the worker event `event` about worker `worker` (`slot/generation`).
fn event_of(line: &str, event: &str, worker: &str) -> bool {
    WorkerEvent::parse(line).is_some_and(|e| e.is(event) && e.worker == worker)
}
