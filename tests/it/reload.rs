//! Rolling reloads: SIGHUP and `rip reload` replace every worker under load without a failed
//! request, overlapping reloads settle on exactly the configured workers, and `reload --wait`
//! reports success, or a broken binary's exit status and stderr while the old workers keep
//! serving and the roll stops.

use std::collections::BTreeSet;
use std::time::Duration;

use hyper::StatusCode;
use nix::sys::signal::Signal;

use crate::harness::{
    is_running, lines_after, log_field, no_failures, runtime, settle, wait_gone, wait_until,
    worker_processes, Client, Control, Deployed, Load, Rip, WhoAmI, AFTERWARDS, SETTLE, WAIT,
};

#[test]
fn sighup_replaces_every_worker_under_load_without_a_failed_request() {
    sighup_under_load(&[]);
}

/// The default is a shard per core; one shard keeps every connection on one thread.
#[test]
fn sighup_with_1_shard_replaces_every_worker_under_load_without_a_failed_request() {
    sighup_under_load(&["--shards", "1"]);
}

#[test]
fn sighup_with_connections_handed_to_workers_fails_no_request_either() {
    sighup_under_load(&["--upstream", "handoff"]);
}

/// `extra`: more flags for `rip serve`.
fn sighup_under_load(extra: &[&str]) {
    let rt = runtime();
    let mut args = vec!["--workers", "2", "--access-log", "off"];
    args.extend_from_slice(extra);
    let rip = Rip::start(&args);
    rip.wait_all_ready();
    let control = Control::of(&rip);
    let before = settle(&control, rip.pid(), 2);

    let load = Load::get("/whoami").clients(4).total(usize::MAX).deadline(Duration::from_secs(90));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= AFTERWARDS), "load did not get going");

    let mark = rip.log_mark();
    rip.signal(Signal::SIGHUP);
    rip.wait_for_log_from(mark, |l| l.contains(" reload finished"), SETTLE)
        .unwrap_or_else(|| panic!("no `reload finished` within {SETTLE:?}"));
    let reloaded = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= reloaded + AFTERWARDS), "load stalled after the reload");
    traffic.stop();
    let report = rt.block_on(running).unwrap();

    no_failures(&report);
    let after = settle(&control, rip.pid(), 2);
    assert!(before.is_disjoint(&after), "workers before {before:?}, after {after:?}");
    let recycled = lines_after(&rip, mark, " worker recycled ");
    assert_eq!(recycled.len(), 2, "{recycled:#?}");
    assert!(recycled.iter().all(|l| log_field(l, "reason") == Some("reload")), "{recycled:#?}");
    let old = wait_gone(&before.iter().copied().collect::<Vec<_>>(), WAIT);
    assert!(old.is_empty(), "replaced workers still running: {old:?}");
    assert!(is_running(rip.pid()));
    assert_eq!(control.status().pid, rip.pid(), "rip serve's pid changed");
    assert!(after.is_subset(&report.pids()), "new workers {after:?} vs pids answering {:?}", report.pids());
}

#[test]
fn two_reloads_100_ms_apart_settle_on_exactly_the_configured_workers() {
    let rip = Rip::start(&["--workers", "3"]);
    rip.wait_all_ready();
    let control = Control::of(&rip);
    let first = settle(&control, rip.pid(), 3);

    rip.signal(Signal::SIGHUP);
    // The spacing under test. A roll of three workers takes tens of milliseconds here, so the
    // second reload may find the first finished; the next test overlaps them for sure.
    std::thread::sleep(Duration::from_millis(100));
    rip.signal(Signal::SIGHUP);

    settles_after_reloads(&rip, &control, &first, 2);
}

#[test]
fn a_reload_during_a_reload_settles_on_exactly_the_configured_workers() {
    let rip = Rip::start(&["--workers", "3"]);
    rip.wait_all_ready();
    let control = Control::of(&rip);
    let first = settle(&control, rip.pid(), 3);

    // Two separate intents (two SIGHUPs this close could merge into one pending signal): the
    // command lands while the first roll is starting its replacements.
    rip.signal(Signal::SIGHUP);
    let again = control.run(&["reload"]);
    assert!(again.status.success() && again.stdout.contains("reload started"), "{again:?}");

    settles_after_reloads(&rip, &control, &first, 2);
}

/// After reloads up to `epoch`: exactly three ready workers, none of `first`, no stale worker
/// process left, and only the new workers answer.
fn settles_after_reloads(rip: &Rip, control: &Control, first: &BTreeSet<i32>, epoch: u64) {
    let epoch = epoch.to_string();
    rip.wait_for_log(|l| l.contains(" reload finished") && log_field(l, "epoch") == Some(&epoch), SETTLE)
        .unwrap_or_else(|| panic!("no `reload finished epoch={epoch}` within {SETTLE:?}"));

    let last = settle(control, rip.pid(), 3);
    assert!(first.is_disjoint(&last), "first {first:?}, last {last:?}");
    let stale: Vec<i32> = rip.worker_pids().into_iter().filter(|p| !last.contains(p)).collect();
    assert!(stale.len() >= 3, "replaced workers: {stale:?}");
    let alive = wait_gone(&stale, WAIT);
    assert!(alive.is_empty(), "stale workers still running: {alive:?}");
    assert_eq!(worker_processes(rip.pid()), last);

    let pids = runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        let mut pids = BTreeSet::new();
        for _ in 0..30 {
            let reply = client.get("/whoami").await.expect("GET /whoami");
            assert_eq!(reply.status, StatusCode::OK);
            pids.insert(WhoAmI::parse(&reply.body).expect("a /whoami answer").pid);
        }
        pids
    });
    assert!(pids.is_subset(&last), "answered by {pids:?}, workers {last:?}");
}

#[test]
fn reload_wait_succeeds_then_fails_on_a_broken_binary_while_old_workers_keep_serving() {
    let deployed = Deployed::start(2);
    let (rip, control) = (&deployed.rip, &deployed.control);
    let first = settle(control, rip.pid(), 2);

    let ok = control.run(&["reload", "--wait", "--timeout", "60s"]);
    assert!(ok.status.success(), "rip reload --wait failed: {ok:?}");
    assert!(ok.stdout.contains("reloaded"), "{ok:?}");
    let serving = settle(control, rip.pid(), 2);
    assert!(first.is_disjoint(&serving), "before {first:?}, after {serving:?}");

    deployed.break_binary();
    let mark = rip.log_mark();
    let failed = control.run(&["reload", "--wait", "--timeout", "60s"]);
    assert!(!failed.status.success(), "rip reload --wait succeeded with a broken binary: {failed:?}");
    assert!(
        failed.stderr.starts_with("rip: ") && failed.stderr.trim_end().lines().count() == 1,
        "want one `rip: ...` line: {failed:?}"
    );
    assert!(failed.stderr.contains("exit code 1"), "the reason does not give the exit status: {failed:?}");
    // That the reason also carries the new worker's stderr is checked, repeatedly and under
    // load, by a_failed_reload_reports_what_the_new_worker_wrote_to_stderr.

    // The old workers keep serving, and the broken deploy is not retried in a loop.
    let pids = runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        let mut pids = BTreeSet::new();
        for _ in 0..20 {
            let reply = client.get("/whoami").await.expect("GET /whoami");
            assert_eq!(reply.status, StatusCode::OK);
            pids.insert(WhoAmI::parse(&reply.body).expect("a /whoami answer").pid);
        }
        pids
    });
    assert_eq!(pids, serving, "workers answering after the failed reload");
    assert_eq!(settle(control, rip.pid(), 2), serving);
    let spawned = lines_after(rip, mark, " worker spawned ");
    assert_eq!(spawned.len(), 1, "one replacement tried, then the roll stopped: {spawned:#?}");
}

// Regression: the reason must include the stderr tail even when the exit is reaped before the
// task copying that stderr has read the last lines (timing-dependent; shows under load).
#[test]
fn a_failed_reload_reports_what_the_new_worker_wrote_to_stderr() {
    let rt = runtime();
    let deployed = Deployed::start(1);
    deployed.break_binary();
    // Traffic keeps serve's threads busy, which is when the race shows.
    let load = Load::get("/whoami").clients(8).total(usize::MAX).deadline(Duration::from_secs(90));
    let traffic = load.handle();
    let running = rt.spawn(load.run(deployed.rip.addr()));
    let mut missing = Vec::new();
    for attempt in 0..20 {
        let failed = deployed.control.run(&["reload", "--wait", "--timeout", "60s"]);
        assert!(!failed.status.success(), "attempt {attempt}: {failed:?}");
        if !failed.stderr.contains("simulated broken build") {
            missing.push(failed.stderr);
        }
    }
    traffic.stop();
    rt.block_on(running).unwrap();
    assert!(missing.is_empty(), "{} of 20 reasons lack the worker's stderr: {missing:?}", missing.len());
}
