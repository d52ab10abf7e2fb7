//! Operating a running rip from outside, as an operator or systemd would: rolling reloads,
//! upgrades, scaling, recycling limits, sd_notify, socket activation, the admin listener,
//! the access log and the control commands (`rip status`, `reload`, `scale`, `upgrade`,
//! `stop`, run from the real binary against the server's runtime dir).
//!
//! Each test starts its own rip on port 0 with a private runtime dir, keeps its load bounded
//! and on loopback, and waits on conditions with deadlines.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper::header::CONTENT_TYPE;
use hyper::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::harness::{
    example_binary, is_running, log_addr, log_field, memory, runtime, served_by, wait_gone, wait_until,
    Client, Load, LoadReport, Process, Rip, TempDir, WhoAmI, START_TIMEOUT, WAIT,
};

/// Longest a rolling reload, a scale or an upgrade may take to settle: every worker of a
/// debug build starting and being probed, on two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(60);
/// Longest a `rip <command>` client may run; above the `--timeout` given to the waiting ones.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
/// Requests that must succeed after an operation finished, to show traffic still flows.
const AFTERWARDS: usize = 50;

// ---------------------------------------------------------------------------------------
// Rolling reload
// ---------------------------------------------------------------------------------------

#[test]
fn sighup_replaces_every_worker_under_load_without_a_failed_request() {
    sighup_under_load(&[]);
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

/// rip started from a copy of its binary, which the test may replace as a deploy does.
struct Deployed {
    rip: Rip,
    control: Control,
    exe: PathBuf,
    // Removed after rip is gone.
    _bin: TempDir,
}

impl Deployed {
    fn start(workers: usize) -> Deployed {
        let bin = TempDir::new();
        let exe = bin.path().join("rip");
        place_binary(Path::new(env!("CARGO_BIN_EXE_rip")), &exe);
        let rip = Rip::builder().program(&exe).args(&["--workers", &workers.to_string()]).start();
        rip.wait_all_ready();
        let control = Control::of(&rip);
        Deployed { rip, control, exe, _bin: bin }
    }

    /// Deploys a broken build: a new file written beside the binary and renamed over it, as
    /// installers do, so that running processes keep their (old) executable.
    fn break_binary(&self) {
        let broken = self.exe.with_extension("new");
        std::fs::write(&broken, "#!/bin/sh\necho 'rip-test: simulated broken build' >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&broken, &self.exe).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Upgrade
// ---------------------------------------------------------------------------------------

#[test]
fn upgrade_under_load_hands_over_to_a_new_serve_and_the_old_one_exits_0() {
    let rt = runtime();
    let mut run = upgrade_under_load(&rt, &[]);
    let (rip, new) = (&run.rip, run.new_serve.0);

    let new_control = Control::at(rip.runtime_dir(), new);
    assert_eq!(new_control.status().pid, new);
    let new_workers = settle(&new_control, new, 2);
    assert!(run.old_workers.is_disjoint(&new_workers), "old {:?}, new {new_workers:?}", run.old_workers);
    let alive = wait_gone(&run.old_workers.iter().copied().collect::<Vec<_>>(), WAIT);
    assert!(alive.is_empty(), "the old serve's workers still run: {alive:?}");
    let who = rt.block_on(async { Client::new(rip.addr()).get("/whoami").await.expect("GET /whoami") });
    let pid = WhoAmI::parse(&who.body).expect("a /whoami answer").pid;
    assert!(new_workers.contains(&pid), "answered by {pid}, new workers {new_workers:?}");
    assert_eq!(Control::of(rip).status().pid, new, "the runtime dir still lists the old serve");
    assert!(
        rip.logs()
            .iter()
            .any(|l| l.contains(" rip started ") && log_field(l, "listener") == Some("inherited")),
        "the new serve did not log an inherited listener"
    );
    no_failures(&run.report);

    // systemd learns the new main pid from the old serve (the deploy unit has
    // NotifyAccess=main, so the new one's own messages count only from then on).
    let messages = run.notify.drain();
    let mainpid = format!("MAINPID={new}");
    assert!(messages.iter().any(|m| has_state(m, &mainpid)), "no {mainpid} in {messages:?}");

    // Stop the new serve first: it holds the stderr pipe the harness reads, which closes only
    // when both processes are gone. Then the old one's exit status can be collected.
    run.new_serve.stop();
    let status = run.rip.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "the old rip serve exited with {status}");
}

// Regression: closing idle keep-alive connections at once when the old serve drains races
// with a request the client may be sending on one; the old serve must instead answer with
// `Connection: close` for a while, so that busy clients reconnect (to the new serve) first.
#[test]
fn upgrade_under_load_loses_no_request() {
    let rt = runtime();
    let run = upgrade_under_load(&rt, &[]);
    no_failures(&run.report);
}

#[test]
fn upgrade_with_connections_handed_to_workers_loses_no_request() {
    let rt = runtime();
    let run = upgrade_under_load(&rt, &["--upstream", "handoff"]);
    no_failures(&run.report);
    assert!(!run.report.pids().is_disjoint(&run.old_workers), "the old workers answered nothing");
}

// Regression: after the handover the new process is the main pid; the old one must not
// tell systemd that the service is stopping.
#[test]
fn after_an_upgrade_the_old_serve_tells_systemd_nothing_more() {
    let rt = runtime();
    let mut run = upgrade_under_load(&rt, &[]);
    let messages = run.notify.drain();
    let mainpid = format!("MAINPID={}", run.new_serve.0);
    let handover = messages.iter().position(|m| has_state(m, &mainpid));
    let handover = handover.unwrap_or_else(|| panic!("no {mainpid} in {messages:?}"));
    // The new serve is still running, so anything after the handover is the old one's.
    assert!(is_running(run.new_serve.0));
    assert_eq!(messages[handover + 1..], [] as [String; 0], "after {mainpid}; all: {messages:?}");
}

/// Load clients in the upgrade tests.
const CLIENTS: usize = 4;

/// What [`upgrade_under_load`] leaves to check.
struct Upgraded {
    // First, so that on a failure the new serve is gone before the harness prints the stderr
    // it shares with the old one.
    new_serve: Orphan,
    /// The old serve, exited (a zombie until `wait_exit`); its stderr carries the new one's.
    rip: Rip,
    old_workers: BTreeSet<i32>,
    report: LoadReport,
    /// systemd's side: every sd_notify message, from both serves.
    notify: NotifySocket,
}

/// Starts rip with two workers, runs `rip upgrade` under load, and waits until the old serve
/// has exited and requests flowed through the new one. `extra`: more flags for `rip serve`.
fn upgrade_under_load(rt: &tokio::runtime::Runtime, extra: &[&str]) -> Upgraded {
    let notify = NotifySocket::bind();
    let rip = Rip::builder()
        .env("NOTIFY_SOCKET", notify.path())
        .args(&["--workers", "2", "--access-log", "off"])
        .args(extra)
        .start();
    rip.wait_all_ready();
    let old = rip.pid();
    let control = Control::of(&rip);
    let old_workers = settle(&control, old, 2);

    let load = Load::get("/whoami").clients(CLIENTS).total(usize::MAX).deadline(Duration::from_secs(90));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= AFTERWARDS), "load did not get going");

    let upgraded = control.run(&["upgrade", "--timeout", "60s"]);
    assert!(upgraded.status.success(), "rip upgrade failed: {upgraded:?}");
    let new: i32 = upgraded
        .stdout
        .trim()
        .strip_prefix("upgraded: new rip serve pid ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {upgraded:?}"));
    // Not the harness's child: it must not outlive the test, whatever happens below.
    let new_serve = Orphan(new);
    assert_ne!(new, old);

    assert!(wait_until(SETTLE, || !is_running(old)), "the old rip serve did not exit");
    let handed_over = traffic.done();
    assert!(
        wait_until(WAIT, || traffic.done() >= handed_over + AFTERWARDS),
        "load stalled after the upgrade"
    );
    traffic.stop();
    let report = rt.block_on(running).unwrap();
    Upgraded { new_serve, rip, old_workers, report, notify }
}

// ---------------------------------------------------------------------------------------
// Scaling and recycling
// ---------------------------------------------------------------------------------------

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
fn a_worker_over_max_memory_is_recycled_and_its_replacement_serves() {
    const NOTE: usize = 1 << 20;
    const NOTES: usize = 40;
    const HEADROOM: u64 = 20 << 20;
    let example = example_binary();

    // The limit is the worker's own size plus headroom, measured on this machine and build.
    let baseline = {
        let probe = Rip::builder().program(example).args(&["--workers", "1"]).start();
        probe.wait_all_ready();
        let reply = runtime().block_on(async { Client::new(probe.addr()).get("/api/items").await.unwrap() });
        memory(served_by(&reply)).expect("reading the worker's memory").resident
    };
    let limit = baseline + HEADROOM;
    let rip = Rip::builder()
        .program(example)
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

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

#[test]
fn sd_notify_says_ready_reloading_ready_stopping_in_order() {
    let mut notify = NotifySocket::bind();
    let mut rip = Rip::builder().env("NOTIFY_SOCKET", notify.path()).args(&["--workers", "2"]).start();
    let ready = notify.expect();
    assert!(has_state(&ready, "READY=1"), "first message: {ready:?}");
    // READY=1 waits for every worker: the count it saw cannot have dropped since.
    assert_eq!(Control::of(&rip).status().workers_ready, 2);

    rip.signal(Signal::SIGHUP);
    let reloading = notify.expect();
    assert!(has_state(&reloading, "RELOADING=1"), "{:?}", notify.seen);
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0);
    let reloaded = notify.expect();
    assert!(has_state(&reloaded, "READY=1"), "{:?}", notify.seen);
    assert!(
        rip.wait_for_log(|l| l.contains(" reload finished"), WAIT).is_some(),
        "READY=1 before the reload ended"
    );

    rip.signal(Signal::SIGTERM);
    let stopping = notify.expect();
    assert!(has_state(&stopping, "STOPPING=1"), "{:?}", notify.seen);
    let status = rip.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "rip exited with {status}");
    let after = notify.drain();
    assert!(after.is_empty(), "messages after STOPPING=1: {after:?}; before: {:?}", notify.seen);
}

#[test]
fn a_listener_passed_by_systemd_socket_activation_is_served() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a listener");
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let dir = TempDir::new();

    // systemd sets LISTEN_PID to the service's pid, unknown before the fork: the shell learns
    // its own pid and exec keeps it for rip.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" serve "$@""#)
        .arg(env!("CARGO_BIN_EXE_rip"))
        .args(["--port", "0", "--workers", "1"])
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    // SAFETY: between fork and exec the closure calls only dup2 and fcntl, which are
    // async-signal-safe, and allocates nothing. dup2 onto another number leaves the copy
    // without FD_CLOEXEC, so the listener survives the exec as fd 3; if it already is fd 3,
    // its FD_CLOEXEC is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            } else {
                nix::unistd::dup2(fd, 3)?;
            }
            Ok(())
        });
    }
    let mut rip = Process::spawn(cmd);
    drop(listener);

    let started = rip.wait_for_log(" rip started ", START_TIMEOUT).expect("rip logs `rip started`");
    assert_eq!(log_field(&started, "listener"), Some("systemd"), "{started}");
    assert_eq!(log_field(&started, "addr"), Some(addr.to_string().as_str()), "{started}");
    rip.wait_for_log(" all workers ready ", START_TIMEOUT).expect("the worker becomes ready");

    let reply = runtime().block_on(async { Client::new(addr).get("/").await.expect("GET /") });
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.text().starts_with("Hello from rip worker"), "{}", reply.text());

    // Workers must not think the socket is theirs.
    let worker = rip.worker_pids().first().copied().expect("a spawned worker");
    let environ = std::fs::read(format!("/proc/{worker}/environ")).expect("reading the worker's environment");
    for var in environ.split(|b| *b == 0) {
        let var = String::from_utf8_lossy(var);
        assert!(!var.starts_with("LISTEN_"), "the worker inherited {var}");
    }

    kill(Pid::from_raw(rip.pid()), Signal::SIGTERM).unwrap();
    let status = rip.wait_exit(WAIT).expect("rip exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "rip exited with {status}");
}

// ---------------------------------------------------------------------------------------
// Admin listener, access log, control commands
// ---------------------------------------------------------------------------------------

#[test]
fn metrics_parse_as_prometheus_text_and_count_the_requests_sent() {
    const SENT: usize = 37;
    let rip = Rip::start(&["--workers", "2", "--admin", "127.0.0.1:0"]);
    rip.wait_all_ready();
    let admin: SocketAddr = rip
        .wait_for_log(|l| l.contains(" admin listener started "), WAIT)
        .and_then(|l| log_addr(&l))
        .expect("the admin address is logged");

    let (text, ready, live) = runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        for _ in 0..SENT {
            assert_eq!(client.get("/").await.unwrap().status, StatusCode::OK);
        }
        let mut admin = Client::new(admin);
        let metrics = admin.get("/metrics").await.unwrap();
        assert_eq!(metrics.status, StatusCode::OK);
        let kind = metrics.headers[CONTENT_TYPE].to_str().unwrap().to_string();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
        (metrics.text(), admin.get("/ready").await.unwrap(), admin.get("/live").await.unwrap())
    });

    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(live.status, StatusCode::OK, "{}", live.text());
    let samples = parse_prometheus(&text);
    let sum = |name: &str| samples.iter().filter(|s| s.name == name).map(|s| s.value).sum::<f64>();
    let one = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|s| {
                s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
            .value
    };

    let ok = one("rip_requests_total", &[("status", "200")]);
    assert!(ok >= SENT as f64, "rip_requests_total{{status=\"200\"}} {ok} < {SENT}\n{text}");
    let answered = sum("rip_requests_total");
    // Every request here was answered by a worker, so the per-worker counters add up.
    assert_eq!(sum("rip_worker_requests_total"), answered, "{text}");
    assert_eq!(one("rip_request_duration_seconds_count", &[]), answered, "{text}");
    assert_eq!(one("rip_request_duration_seconds_bucket", &[("le", "+Inf")]), answered, "{text}");
    let buckets: Vec<f64> =
        samples.iter().filter(|s| s.name == "rip_request_duration_seconds_bucket").map(|s| s.value).collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "histogram buckets not cumulative: {buckets:?}");
    assert_eq!(one("rip_workers_ready", &[]), 2.0, "{text}");
    let rss: Vec<&Sample> = samples.iter().filter(|s| s.name == "rip_worker_rss_bytes").collect();
    assert_eq!(rss.len(), 2, "{text}");
    assert!(rss.iter().all(|s| s.value > 0.0), "{text}");
}

#[test]
fn the_json_access_log_has_a_line_per_request_and_reopens_on_sigusr1() {
    const FIRST: usize = 12;
    const SECOND: usize = 5;
    let builder = Rip::builder();
    let path = builder.dir().join("access.log");
    let rotated = builder.dir().join("access.log.1");
    let rip = builder.args(&["--workers", "2", "--log-format", "json", "--access-log"]).arg(&path).spawn();
    // The harness reads text logs; with --log-format json the address is found here.
    let started = rip
        .wait_for_log(|l| json_message(l).as_deref() == Some("rip started"), START_TIMEOUT)
        .expect("rip logs `rip started`");
    let addr: SocketAddr = serde_json::from_str::<serde_json::Value>(&started).unwrap()["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {started}"));
    // Ready without sending a request, so that the log holds only the test's requests.
    rip.wait_for_log(|l| json_message(l).as_deref() == Some("all workers ready"), START_TIMEOUT)
        .expect("every worker becomes ready");

    let rt = runtime();
    let first = rt.block_on(send_mixed(addr, FIRST));
    assert!(wait_until(WAIT, || read_lines(&path).len() >= FIRST), "lines: {:?}", read_lines(&path));
    check_access_lines(&read_lines(&path), &first);

    std::fs::rename(&path, &rotated).unwrap();
    let mark = rip.log_mark();
    rip.signal(Signal::SIGUSR1);
    rip.wait_for_log_from(mark, |l| json_message(l).as_deref() == Some("access log reopened"), WAIT)
        .expect("rip logs `access log reopened` once the file is reopened");
    let second = rt.block_on(send_mixed(addr, SECOND));
    assert!(wait_until(WAIT, || read_lines(&path).len() >= SECOND), "no new file at {}", path.display());
    check_access_lines(&read_lines(&path), &second);
    check_access_lines(&read_lines(&rotated), &first);
}

#[test]
fn status_lists_every_worker_and_stop_ends_rip_gracefully() {
    let mut rip = Rip::start(&["--workers", "2"]);
    rip.wait_all_ready();
    let control = Control::of(&rip);
    let workers = settle(&control, rip.pid(), 2);

    let table = control.run(&["status"]);
    assert!(table.status.success(), "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "header, a row per worker, totals:\n{}", table.stdout);
    assert!(lines[0].starts_with("WORKER") && lines[0].contains("PID") && lines[0].contains("STATE"));
    let mut rows = BTreeMap::new();
    for row in &lines[1..3] {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(cols.len() >= 4 && cols[2] == "ready", "{row}");
        let pid = cols[1].parse::<i32>().unwrap_or_else(|_| panic!("no pid in {row}"));
        rows.insert(pid, cols[0].to_string());
    }
    assert_eq!(rows.keys().copied().collect::<BTreeSet<_>>(), workers);
    let totals = format!("rip pid {}: 2 of 2 workers ready", rip.pid());
    assert!(lines[3].starts_with(&totals), "{:?} vs {totals:?}", lines[3]);

    let json = control.run(&["status", "--json"]);
    assert!(json.status.success(), "{json:?}");
    let status: Status =
        serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {}", json.stdout));
    assert_eq!(status.pid, rip.pid());
    assert_eq!(status.workers_ready, 2);
    let ids: BTreeMap<i32, String> = status.workers.iter().map(|w| (w.pid, w.id.clone())).collect();
    assert_eq!(ids, rows, "the table and the JSON name the same workers");

    let stop = control.run(&["stop"]);
    assert!(stop.status.success(), "{stop:?}");
    let exit = rip.wait_exit(WAIT);
    assert_eq!(exit.code(), Some(0), "rip exited with {exit}");
    assert!(rip.wait_for_log(|l| l.contains(" rip stopped"), Duration::ZERO).is_some());
    assert_eq!(wait_gone(&workers.into_iter().collect::<Vec<_>>(), WAIT), Vec::<i32>::new());
    let after = control.run(&["status"]);
    assert!(!after.status.success(), "status after stop: {after:?}");
}

// ---------------------------------------------------------------------------------------
// The control commands
// ---------------------------------------------------------------------------------------

/// How `rip <command>` finds the server: `--runtime-dir <base>` or `--control <socket>`.
struct Control(Vec<OsString>);

/// What a `rip <command>` run printed, and how it exited.
#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// `rip status --json`, the fields the tests read.
#[derive(Debug, Deserialize)]
struct Status {
    pid: i32,
    workers_ready: usize,
    workers: Vec<Row>,
}

#[derive(Debug, Deserialize)]
struct Row {
    id: String,
    pid: i32,
    state: String,
}

impl Control {
    /// The one rip in `rip`'s runtime dir, found as the commands find it by default.
    fn of(rip: &Rip) -> Control {
        Control(vec!["--runtime-dir".into(), rip.runtime_dir().into()])
    }

    /// The control socket of the serve with `pid` under `base`.
    fn at(base: &Path, pid: i32) -> Control {
        Control(vec!["--control".into(), base.join(pid.to_string()).join("control.sock").into()])
    }

    /// Runs the real binary as a client, with none of the caller's RIP_* variables.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rip"));
        cmd.args(args).args(&self.0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RIP_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd.spawn().expect("starting the rip client");
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the rip client") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rip {args:?} did not finish within {CLIENT_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The outputs are a few lines, far below a pipe's capacity, so nothing blocked above.
        let mut stdout = String::new();
        let mut stderr = String::new();
        child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        Output { status, stdout, stderr }
    }

    fn status(&self) -> Status {
        let out = self.run(&["status", "--json"]);
        assert!(out.status.success(), "rip status --json failed: {out:?}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("rip status --json: {e}: {}", out.stdout))
    }
}

/// Waits until `rip status` lists exactly `n` workers, all ready, and those are exactly the
/// worker processes `serve` has; returns their pids.
fn settle(control: &Control, serve: i32, n: usize) -> BTreeSet<i32> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let status = control.status();
        let listed: BTreeSet<i32> = status.workers.iter().map(|w| w.pid).collect();
        let ready = status.workers.iter().all(|w| w.state == "ready");
        let processes = worker_processes(serve);
        if status.workers.len() == n && status.workers_ready == n && ready && listed == processes {
            return listed;
        }
        assert!(
            Instant::now() < deadline,
            "not settled on {n} ready workers within {SETTLE:?}: status {status:?}, processes {processes:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Processes and logs
// ---------------------------------------------------------------------------------------

/// The running (not zombie) children of `parent`: a serve's workers.
fn worker_processes(parent: i32) -> BTreeSet<i32> {
    let mut children = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if parent_of(pid) == Some(parent) && is_running(pid) {
            children.insert(pid);
        }
    }
    children
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces; the fields follow the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// A `rip serve` that is not the test's child (the new one after an upgrade): killed on drop.
struct Orphan(i32);

impl Orphan {
    /// SIGTERM, and wait until it and its workers are gone.
    fn stop(&self) {
        let workers: Vec<i32> = worker_processes(self.0).into_iter().collect();
        let _ = kill(Pid::from_raw(self.0), Signal::SIGTERM);
        assert!(wait_gone(&[self.0], WAIT).is_empty(), "rip serve {} did not stop", self.0);
        assert!(wait_gone(&workers, WAIT).is_empty(), "workers of {} did not stop", self.0);
    }
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if is_running(self.0) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
            wait_gone(&[self.0], WAIT);
        }
    }
}

/// Lines logged from `mark` on that contain `needle`.
fn lines_after(rip: &Rip, mark: usize, needle: &str) -> Vec<String> {
    rip.logs().into_iter().skip(mark).filter(|l| l.contains(needle)).collect()
}

fn no_failures(report: &LoadReport) {
    assert_eq!(
        report.failed, 0,
        "{} of {} requests failed: {:?} {:?}",
        report.failed, report.sent, report.statuses, report.errors
    );
    assert!(!report.timed_out, "the load hit its deadline");
}

/// Puts a copy of `from` at `to`: a hard link when possible (cheap, and replacing `to` by
/// rename leaves `from` alone), else a copy.
fn place_binary(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    }
}

// ---------------------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------------------

/// A stand-in for systemd's notify socket ($NOTIFY_SOCKET, a Unix datagram socket).
struct NotifySocket {
    socket: UnixDatagram,
    /// Every message received so far, for failure messages.
    seen: Vec<String>,
    dir: TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = TempDir::new();
        let socket = UnixDatagram::bind(dir.path().join("notify.sock")).expect("binding the notify socket");
        NotifySocket { socket, seen: Vec::new(), dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("notify.sock")
    }

    /// The next message, waiting up to `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.seen.push(message.clone());
        Some(message)
    }

    /// The next message, which must come within [`SETTLE`].
    fn expect(&mut self) -> String {
        self.next(SETTLE)
            .unwrap_or_else(|| panic!("no sd_notify message within {SETTLE:?}; so far: {:?}", self.seen))
    }

    /// Every message already queued.
    fn drain(&mut self) -> Vec<String> {
        let mut messages = Vec::new();
        while let Some(message) = self.next(Duration::from_millis(1)) {
            messages.push(message);
        }
        messages
    }
}

fn has_state(message: &str, state: &str) -> bool {
    message.lines().any(|l| l == state)
}

// ---------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format strictly enough to catch a malformed line: HELP and TYPE
/// comments naming a valid metric (TYPE once per family, before its samples), and samples
/// `name{label="value",...} <float>`, each of a family with a TYPE.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (keyword, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.filter(|n| is_metric_name(n)).unwrap_or_else(|| panic!("bad comment {line:?}"));
            match keyword {
                Some("HELP") => assert!(rest.is_some_and(|h| !h.trim().is_empty()), "empty HELP {line:?}"),
                Some("TYPE") => {
                    let kind = rest.unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad TYPE {line:?}"
                    );
                    let before = types.insert(name.to_string(), kind.to_string());
                    assert!(before.is_none(), "second TYPE for {name}");
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.trim().is_empty(), "blank line in the exposition");
        let sample = parse_sample(line).unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                sample.name.strip_suffix(suffix).filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&sample.name);
        assert!(types.contains_key(family), "{line:?} has no TYPE before it");
        if types[family] == "counter" {
            assert!(sample.value >= 0.0, "negative counter {line:?}");
        }
        samples.push(sample);
    }
    samples
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (series, BTreeMap::new()),
    };
    is_metric_name(name).then(|| Sample { name: name.to_string(), labels, value })
}

/// `a="1",b="2"`; values here never hold quotes or commas, so no escapes are handled.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=')?;
        let value = value.strip_prefix('"')?.strip_suffix('"')?;
        let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || labels.insert(key.to_string(), value.to_string()).is_some() {
            return None;
        }
    }
    Some(labels)
}

fn is_metric_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

// ---------------------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------------------

/// What the test sent and got, to hold the log lines against.
#[derive(Debug)]
struct Sent {
    path: String,
    status: u16,
    bytes: usize,
}

/// `n` requests, one at a time so that the log lines come in the same order: every third to
/// a route that does not exist (404), the others to `/` (200).
async fn send_mixed(addr: SocketAddr, n: usize) -> Vec<Sent> {
    let mut client = Client::new(addr);
    let mut sent = Vec::new();
    for i in 0..n {
        let path = if i % 3 == 2 { format!("/no-such-route/{i}") } else { "/".to_string() };
        let reply = client.get(&path).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let want = if i % 3 == 2 { StatusCode::NOT_FOUND } else { StatusCode::OK };
        assert_eq!(reply.status, want, "GET {path}");
        sent.push(Sent { path, status: reply.status.as_u16(), bytes: reply.body.len() });
    }
    sent
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|t| t.lines().map(str::to_string).collect()).unwrap_or_default()
}

/// Exactly one valid JSON line per request sent, in order, with its fields.
fn check_access_lines(lines: &[String], sent: &[Sent]) {
    assert_eq!(lines.len(), sent.len(), "{lines:#?}");
    for (line, sent) in lines.iter().zip(sent) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["method"], "GET", "{line}");
        assert_eq!(v["path"], sent.path.as_str(), "{line}");
        assert_eq!(v["status"], sent.status, "{line}");
        assert_eq!(v["bytes"], sent.bytes as u64, "{line}");
        assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
        let worker = v["worker"].as_str().unwrap_or_else(|| panic!("no worker in {line}"));
        assert!(
            worker.split_once('/').is_some_and(|(s, g)| s.parse::<u32>().is_ok() && g.parse::<u64>().is_ok()),
            "{line}"
        );
    }
}

/// The `message` of a JSON log line.
fn json_message(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["message"].as_str().map(str::to_string)
}
