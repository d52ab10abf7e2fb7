//! An idle rip rests: with nothing in flight, its workers' heartbeats slow to a few beats a
//! second and the front-end's heartbeat watcher sleeps, so a server with no traffic wakes a
//! few times a second, not a hundred times per process. And rest costs no watchfulness: a
//! worker that blocks its thread on the first request after a rest is out of the rotation
//! within about 100 ms, as under load.

use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::harness::{log_field, runtime, summary, wait_until, Client, Load, Rip, WAIT};

/// Most wake-ups in one second that count as resting, for one process (all its threads): an
/// idle worker beats four times a second and its timer wheel adds about as many; the
/// front-end trims its heap once a second. Before rest, each woke over a hundred times.
const RESTING_WAKEUPS: u64 = 25;

/// Times the process `pid` has been scheduled in so far, all its threads together.
fn wakeups(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

/// Waits until a whole second passes in which no process of `pids` wakes more than
/// [`RESTING_WAKEUPS`] times; the last second's wake-ups of each, or `None` at [`WAIT`].
fn until_resting(pids: &[i32]) -> Option<Vec<u64>> {
    let mut last = Vec::new();
    let rested = wait_until(WAIT, || {
        let before: Vec<u64> = pids.iter().map(|&p| wakeups(p)).collect();
        // A window to count wake-ups over, not a wait for readiness.
        std::thread::sleep(Duration::from_secs(1));
        last = pids.iter().zip(&before).map(|(&p, b)| wakeups(p) - b).collect();
        last.iter().all(|&n| n <= RESTING_WAKEUPS)
    });
    if !rested {
        eprintln!("wake-ups in the last second, front-end first: {last:?}");
    }
    rested.then_some(last)
}

fn processes(rip: &Rip) -> Vec<i32> {
    let mut pids = vec![rip.pid()];
    pids.extend(rip.worker_pids());
    pids
}

/// Concurrent traffic first, so that every shard has opened its connections to every worker.
fn some_traffic(rip: &Rip) {
    let report = runtime().block_on(Load::get("/").clients(16).total(400).deadline(WAIT).run(rip.addr()));
    assert_eq!(report.failed, 0, "{}", summary(&report));
}

#[test]
fn an_idle_rip_wakes_only_a_few_times_a_second() {
    let rip = Rip::start(&["--workers", "2", "--access-log", "off"]);
    rip.wait_all_ready();
    some_traffic(&rip);
    let pids = processes(&rip);
    assert_eq!(pids.len(), 3);
    let last = until_resting(&pids).expect("rip did not come to rest after its traffic");
    println!("resting: wakeups_per_s front_end={} workers={:?}", last[0], &last[1..]);

    // And it wakes for traffic: requests are served after the rest as before.
    some_traffic(&rip);
    assert!(until_resting(&pids).is_some(), "rip did not rest again after a second burst");
}

#[test]
fn a_worker_that_blocks_on_the_first_request_after_a_rest_leaves_the_rotation_within_100_ms() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--timeout", "2s", "--access-log", "off"]);
    rip.wait_all_ready();
    some_traffic(&rip);
    until_resting(&processes(&rip)).expect("rip did not come to rest");

    let addr = rip.addr();
    let mark = rip.log_mark();
    let started = Instant::now();
    let blocked = rt.spawn(async move { Client::new(addr).get("/block/4000").await });
    // Clients arrive just behind it, some of them queueing on the worker it blocks.
    let load = Load::get("/whoami").clients(16).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(addr));

    let stalled =
        rip.wait_for_log_from(mark, |l| l.contains("worker stalled"), WAIT).expect("the stall was logged");
    let silent_ms: u64 = log_field(&stalled, "silent_ms").and_then(|v| v.parse().ok()).expect(&stalled);
    assert!((100..400).contains(&silent_ms), "out of the rotation after {silent_ms} ms: {stalled}");
    assert_eq!(log_field(&stalled, "stuck_in_a_request"), Some("true"), "{stalled}");

    let blocked = rt.block_on(blocked).unwrap().expect("GET /block/4000");
    let elapsed = started.elapsed();
    assert_eq!(blocked.status, StatusCode::GATEWAY_TIMEOUT, "{}", blocked.text());
    assert!(elapsed < Duration::from_secs(4), "504 after {elapsed:?}, want about the 2 s timeout");
    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 200), "load stalled after the hung worker");
    traffic.stop();
    let report = rt.block_on(running).unwrap();
    println!(
        "resting: blocked_after_rest out_of_rotation_after_ms={silent_ms} blocked_504_after_ms={} others_sent={} \
         others_failed={} others_slowest_ms={}",
        elapsed.as_millis(),
        report.sent,
        report.failed,
        report.slowest().as_millis()
    );
    assert_eq!(report.failed, 0, "{}", summary(&report));
    assert!(report.slower_than(Duration::from_secs(1)) <= 1, "slowest {:?}", report.slowest());
}
