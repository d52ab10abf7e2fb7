//! Handlers that misbehave: one that hangs costs its request a 504 after `--timeout`, and its
//! worker is killed and replaced while the others go on serving; one that panics costs one 500
//! and nothing else, the worker and its state stay.
//!
//! Tests print one `faults: ...` line with their figures, shown with `-- --nocapture`.

use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::harness::{
    example_binary, is_running, lines_after, log_field, runtime, served_by, summary, wait_until, Client,
    Load, Rip, WorkerEvent, WAIT,
};

#[test]
fn a_hung_worker_gets_504_and_is_replaced_while_others_serve() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--timeout", "1s"]);
    rip.wait_all_ready();
    let addr = rip.addr();

    // One client: each of its requests finds the healthy worker with fewer requests in flight
    // than the hung one, so none is parked behind the hang (one that was would get its own
    // 504 if its timeout ran out before the kill it is waiting for).
    let load = Load::get("/").clients(1).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(addr));
    assert!(wait_until(WAIT, || traffic.done() >= 20), "load did not get going");

    let mark = rip.log_mark();
    let started = Instant::now();
    let reply = rt.block_on(async { Client::new(addr).get("/block/5000").await }).expect("GET /block/5000");
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "504 after {elapsed:?}, want about the 1 s timeout"
    );

    let timed_out = rip
        .wait_for_log_from(mark, |l| l.contains("request timed out, worker will be replaced"), WAIT)
        .expect("the timeout was logged");
    assert_eq!(log_field(&timed_out, "method"), Some("GET"), "{timed_out}");
    assert_eq!(log_field(&timed_out, "path"), Some("/block/5000"), "{timed_out}");
    let waited: u64 = log_field(&timed_out, "elapsed_ms").and_then(|v| v.parse().ok()).expect(&timed_out);
    assert!(waited >= 1000, "{timed_out}");
    let hung = log_field(&timed_out, "worker").expect("the timeout names the worker").to_string();

    let killed = rip
        .wait_for_log_from(mark, |l| event_of(l, "worker hung, killed", &hung), WAIT)
        .expect("the hung worker was killed");
    let hung_pid = WorkerEvent::parse(&killed).unwrap().pid;
    rip.wait_for_log_from(mark, |l| event_of(l, "worker exited after hanging", &hung), WAIT)
        .expect("the hung worker's exit was logged");
    let slot = WorkerEvent::parse(&killed).unwrap().slot();
    let replacement = rip.wait_for_replacement(mark, slot, WAIT);
    assert_ne!(replacement.worker, hung);
    assert!(!is_running(hung_pid), "the hung worker {hung_pid} still runs");

    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 20), "load stalled after the replacement");
    traffic.stop();
    let report = rt.block_on(running).unwrap();
    println!(
        "faults: hung_worker status=504 after_ms={} others_sent={} others_failed={}",
        elapsed.as_millis(),
        report.sent,
        report.failed
    );
    assert_eq!(report.failed, 0, "{}", summary(&report));
}

#[test]
fn a_panic_in_a_user_handler_costs_one_500_not_the_worker() {
    const PANICS: usize = 5;
    let rip = Rip::builder().program(example_binary("json_api")).args(&["--workers", "1"]).start();
    rip.wait_all_ready();
    let rt = runtime();
    let mark = rip.log_mark();

    let (pid, statuses) = rt.block_on(async {
        let mut client = Client::new(rip.addr());
        let created =
            client.post_json("/api/items", r#"{"text":"survive a panic"}"#).await.expect("POST /api/items");
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
        let note = created.json();
        let location = format!("/api/items/{}", note["id"]);
        let pid = served_by(&created);

        let mut statuses = Vec::new();
        for _ in 0..PANICS {
            let reply = client.get("/api/panic").await.expect("GET /api/panic");
            statuses.push(reply.status.as_u16());
            // The same process still answers, with the note it held before the panic.
            let reply = client.get(&location).await.expect("GET the note");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(served_by(&reply), pid, "another worker answered after a panic");
            assert_eq!(reply.json(), note);
        }
        (pid, statuses)
    });
    println!("faults: handler_panic panics={PANICS} statuses={statuses:?} worker_kept=true");
    assert_eq!(statuses, vec![500; PANICS]);
    assert!(is_running(pid));
    let exits = lines_after(&rip, mark, " worker exited").len();
    assert_eq!(exits, 0, "a worker exited after a handler panic");
}

/// `line` is the worker event `event` about worker `worker` (`slot/generation`).
fn event_of(line: &str, event: &str, worker: &str) -> bool {
    WorkerEvent::parse(line).is_some_and(|e| e.is(event) && e.worker == worker)
}

/// `--request-timeout` answers 504 to the one slow request and cancels it on its worker; the
/// worker lives, and sixteen echoes in flight on it at the same time come back byte for byte.
#[test]
fn a_request_past_the_request_timeout_gets_504_while_its_worker_and_neighbours_live_on() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "1", "--request-timeout", "1s", "--timeout", "30s"]);
    rip.wait_all_ready();
    let addr = rip.addr();
    let before = rt.block_on(async { crate::harness::whoami(addr).await }).pid;
    let echoes: Vec<_> = (0..16)
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
    let after = rt.block_on(async { crate::harness::whoami(addr).await }).pid;
    assert_eq!(after, before, "the worker was replaced for one slow request");
    assert!(lines_after(&rip, 0, "worker hung").is_empty(), "the worker was taken for hung");
    println!(
        "faults: request_timeout status=504 after_ms={} echoes_ok={echoed} worker_kept=true",
        elapsed.as_millis()
    );
}
