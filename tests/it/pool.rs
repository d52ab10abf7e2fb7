//! The worker pool changing under load without a failed request: scaled up and down by
//! `rip scale` and SIGTTIN (scaling down starts no new worker), and recycled by its limits,
//! every 5 requests, at `--max-requests` with jitter (never more than `--max-surge`
//! replacements starting at once), and past `--max-memory`, where the replacement serves and
//! the grown worker is gone.
//!
//! Tests print one `faults: ...` line with their figures, shown with `-- --nocapture`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use nix::sys::signal::Signal;

use crate::harness::{
    example_binary, lines_after, log_field, memory, no_failures, runtime, served_by, settle, summary,
    wait_gone, wait_until, worker_processes, Client, Control, Load, Rip, AFTERWARDS, WAIT,
};

#[test]
fn scale_up_and_down_under_load_without_a_failed_request() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--access-log", "off"]);
    rip.wait_all_ready();
    let control = Control::of(&rip);
    settle(&control, rip.pid(), 2);

    let load = Load::get("/whoami").clients(4).total(usize::MAX).deadline(Duration::from_secs(90));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= AFTERWARDS), "load did not get going");

    let up = control.run(&["scale", "4"]);
    assert!(up.status.success() && up.stdout.contains("scaling to 4 workers"), "{up:?}");
    let four = settle(&control, rip.pid(), 4);
    let grown = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= grown + AFTERWARDS), "load stalled after scaling up");

    let down = control.run(&["scale", "1"]);
    assert!(down.status.success(), "{down:?}");
    let one = settle(&control, rip.pid(), 1);
    assert!(one.is_subset(&four), "scaling down started a new worker: {one:?} vs {four:?}");
    let retired: Vec<i32> = four.difference(&one).copied().collect();
    assert_eq!(wait_gone(&retired, WAIT), Vec::<i32>::new());

    rip.signal(Signal::SIGTTIN);
    let two = settle(&control, rip.pid(), 2);
    assert!(one.is_subset(&two), "SIGTTIN replaced the worker instead of adding one: {two:?}");

    let settled = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= settled + AFTERWARDS), "load stalled after scaling");
    traffic.stop();
    let report = rt.block_on(running).unwrap();
    no_failures(&report);
    assert!(report.pids().len() >= 4, "answered by {:?}", report.pids());
    let scaled = rip.logs().iter().filter(|l| l.contains(" workers scaled ")).count();
    assert_eq!(scaled, 3, "`workers scaled` lines");
}

#[test]
fn recycling_every_5_requests_under_load_fails_no_request() {
    recycling_every_5_requests_under_load(&[]);
}

/// The default is a shard per core; one shard keeps every connection on one thread.
#[test]
fn recycling_every_5_requests_under_load_with_1_shard_fails_no_request() {
    recycling_every_5_requests_under_load(&["--shards", "1"]);
}

/// `extra`: more flags for `rip serve`.
fn recycling_every_5_requests_under_load(extra: &[&str]) {
    const REQUESTS: usize = 3000;
    let rt = runtime();
    let mut args = vec!["--workers", "2", "--max-requests", "5", "--access-log", "off"];
    args.extend_from_slice(extra);
    let rip = Rip::start(&args);
    rip.wait_all_ready();

    let started = Instant::now();
    let report = rt.block_on(
        Load::get("/whoami").clients(16).total(REQUESTS).deadline(Duration::from_secs(90)).run(rip.addr()),
    );
    let elapsed = started.elapsed();
    let pids = report.pids();
    let recycled = lines_after(&rip, 0, " worker recycled ").len();

    println!(
        "faults: recycle_every_5 sent={} failed={} distinct_pids={} recycled={recycled} elapsed_ms={}",
        report.sent,
        report.failed,
        pids.len(),
        elapsed.as_millis()
    );
    assert_eq!((report.ok, report.failed), (REQUESTS, 0), "{}", summary(&report));
    // Exhausted workers keep serving while their replacement starts, but never more than
    // twice their budget: 3000 requests need at least 300 workers.
    let most = report.whoami().iter().map(|w| w.served).max().unwrap_or(0);
    assert!(most <= 10, "a worker served {most} requests with --max-requests 5");
    assert!(pids.len() >= REQUESTS / 10, "only {} distinct pids answered", pids.len());
    assert!(recycled >= REQUESTS / 10 - 2, "only {recycled} workers recycled");
    // Recycling cannot keep up with 16 clients here: said once, counted each time.
    let said = lines_after(&rip, 0, "recycling cannot keep up").len();
    assert_eq!(said, 1, "the warning is said once");
}

#[test]
fn a_worker_over_max_memory_is_recycled_and_its_replacement_serves() {
    const NOTE: usize = 1 << 20;
    const NOTES: usize = 40;
    const HEADROOM: u64 = 20 << 20;
    let example = example_binary("json_api");

    // The limit is the worker's own size plus headroom, measured on this machine and build.
    let baseline = {
        let probe = Rip::builder().program(&example).args(&["--workers", "1"]).start();
        probe.wait_all_ready();
        let reply = runtime().block_on(async { Client::new(probe.addr()).get("/api/items").await.unwrap() });
        memory(served_by(&reply)).expect("reading the worker's memory").resident
    };
    let limit = baseline + HEADROOM;
    let rip = Rip::builder()
        .program(&example)
        .args(&["--workers", "1", "--access-log", "off", "--max-memory", &limit.to_string()])
        .start();
    rip.wait_all_ready();

    let text = "n".repeat(NOTE);
    // Notes stored per worker pid: the grown worker's, and any the replacement took.
    let mut stored: BTreeMap<i32, usize> = BTreeMap::new();
    let grown = runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        let mut owner = None;
        for _ in 0..NOTES {
            let reply = client
                .post_json("/api/items", format!(r#"{{"text":"{text}"}}"#))
                .await
                .expect("POST /api/items");
            assert_eq!(reply.status, StatusCode::CREATED);
            let pid = served_by(&reply);
            *stored.entry(pid).or_default() += 1;
            if owner.is_some_and(|o| o != pid) {
                break; // recycled already
            }
            owner = Some(pid);
        }
        owner.expect("a note was stored")
    });
    let recycled = rip
        .wait_for_log(|l| l.contains(" worker recycled ") && log_field(l, "reason") == Some("memory"), WAIT)
        .unwrap_or_else(|| panic!("no memory recycle after {stored:?} notes (limit {} MiB)", limit >> 20));

    let over = rip
        .wait_for_log(|l| l.contains(" worker over its memory limit "), Duration::ZERO)
        .expect("the limit was logged");
    let rss: u64 = log_field(&over, "rss").and_then(|r| r.parse().ok()).expect("rss=");
    assert!(rss > limit, "{over}");
    let replacement = log_field(&recycled, "replacement").expect("replacement=").to_string();
    assert!(wait_gone(&[grown], WAIT).is_empty(), "the grown worker {grown} still runs");
    runtime().block_on(async {
        let reply = Client::new(rip.addr()).get("/api/items").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        let pid = served_by(&reply);
        assert_ne!(pid, grown, "still served by the grown worker");
        assert_eq!(reply.headers["x-rip-worker"], replacement.as_str());
        // The grown worker's notes went with it; the replacement has only those sent to it.
        let notes = reply.json().as_array().map(Vec::len).expect("a list of notes");
        assert_eq!(notes, stored.get(&pid).copied().unwrap_or(0), "notes per worker sent: {stored:?}");
    });
}

#[test]
fn jittered_request_recycling_keeps_within_one_surge_and_loses_no_request() {
    let rt = runtime();
    let rip = Rip::start(&[
        "--workers",
        "4",
        "--max-requests",
        "20",
        "--max-requests-jitter",
        "10",
        "--max-surge",
        "1",
        "--access-log",
        "off",
    ]);
    rip.wait_all_ready();

    let report = rt.block_on(
        Load::get("/whoami").clients(8).total(800).deadline(Duration::from_secs(90)).run(rip.addr()),
    );

    no_failures(&report);
    assert_eq!(report.ok, 800);
    let recycles = rip
        .logs()
        .iter()
        .filter(|l| l.contains(" worker recycled ") && log_field(l, "reason") == Some("requests"))
        .count();
    assert!(recycles >= 4, "only {recycles} request recycles");

    // Between a replacement's `worker spawned` and the `worker recycled` naming it, no other
    // replacement may start. Generation 0 workers are the initial pool, not replacements.
    let mut replacing: Option<String> = None;
    for line in rip.logs() {
        if line.contains(" worker spawned ") {
            let id = log_field(&line, "worker").expect("worker=").to_string();
            if id.ends_with("/0") {
                continue;
            }
            assert!(replacing.is_none(), "{id} spawned while {replacing:?} was still starting");
            replacing = Some(id);
        } else if line.contains(" worker recycled ") {
            let id = log_field(&line, "replacement").expect("replacement=");
            assert_eq!(replacing.as_deref(), Some(id), "{line}");
            replacing = None;
        }
    }
}

/// What each open descriptor of `pid` is (the targets of /proc/PID/fd's links).
fn open_files(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .map(|target| target.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Each worker inherits its own heartbeat page and nothing of another's, though the
/// descriptors are handed over under their own numbers: four started together at start, and
/// their replacements on a reload, started while the others serve, each map exactly one and hold no
/// other open.
#[test]
fn each_worker_inherits_its_own_heartbeat_page_and_no_other() {
    let rip = Rip::start(&["--workers", "4", "--access-log", "off"]);
    rip.wait_all_ready();
    let check = |when: &str| {
        let pids = worker_processes(rip.pid());
        assert_eq!(pids.len(), 4, "{when}: {pids:?}");
        for pid in pids {
            // Mapped (its descriptor closed once mapped), or still open if inherited by mistake.
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            let mapped = maps.lines().filter(|l| l.contains("rip-heartbeat")).count();
            let open = open_files(pid).into_iter().filter(|f| f.contains("rip-heartbeat")).count();
            assert_eq!((mapped, open), (1, 0), "{when}: worker {pid}: {maps}");
        }
    };
    check("at start");
    let before = worker_processes(rip.pid());
    rip.signal(Signal::SIGHUP);
    assert!(
        wait_until(WAIT, || {
            let now = worker_processes(rip.pid());
            now.len() == 4 && now.iter().all(|p| !before.contains(p))
        }),
        "the workers were not all replaced: {before:?} -> {:?}",
        worker_processes(rip.pid())
    );
    rip.wait_all_ready();
    check("after replacements");
}
