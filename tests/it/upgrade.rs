//! Binary upgrades: `rip upgrade` under load hands the listener to a new `rip serve`, loses
//! no request (with connections handed to workers too), tells systemd the new main pid, and
//! the old serve exits 0 and tells systemd nothing more.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::{
    has_state, is_running, log_field, no_failures, runtime, settle, wait_gone, wait_until, Client, Control,
    Load, LoadReport, NotifySocket, Orphan, Rip, WhoAmI, AFTERWARDS, SETTLE, WAIT,
};

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

/// The default is a shard per core; one shard keeps every connection on one thread.
#[test]
fn upgrade_with_1_shard_loses_no_request() {
    let rt = runtime();
    let run = upgrade_under_load(&rt, &["--shards", "1"]);
    no_failures(&run.report);
}

#[test]
fn upgrade_with_connections_handed_to_workers_loses_no_request() {
    let rt = runtime();
    let run = upgrade_under_load(&rt, &["--upstream", "handoff"]);
    no_failures(&run.report);
    assert!(!run.report.pids().is_disjoint(&run.old_workers), "the old workers answered nothing");
}

#[test]
fn upgrade_with_node_workers_loses_no_request_and_leaves_none_of_the_old_ones() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node/server.js");
    let rt = runtime();
    let mut run = upgrade_under_load(&rt, &["--", "node", script]);
    no_failures(&run.report);
    let new_workers = settle(&Control::at(run.rip.runtime_dir(), run.new_serve.0), run.new_serve.0, 2);
    assert!(run.old_workers.is_disjoint(&new_workers), "old {:?}, new {new_workers:?}", run.old_workers);
    let alive = wait_gone(&run.old_workers.iter().copied().collect::<Vec<_>>(), WAIT);
    assert!(alive.is_empty(), "the old serve's Node workers still run: {alive:?}");
    run.new_serve.stop();
    assert_eq!(run.rip.wait_exit(WAIT).code(), Some(0));
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

/// In a terminal, the `rip serve` the user started exits on an upgrade while the new one,
/// not its child, runs on detached: rip says so on the terminal, with the new pid and how to
/// stop it.
#[test]
fn an_upgrade_from_a_terminal_says_the_new_rip_runs_detached_and_how_to_stop_it() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};

    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors, owned below.
    let opened = unsafe {
        libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
    };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both are fresh descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let dir = crate::harness::TempDir::new();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rip"));
    cmd.args(["serve", "--port", "0", "--workers", "1", "--runtime-dir"]).arg(&run);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(slave)).env("RUST_LOG", "info");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RIP_") {
            cmd.env_remove(key);
        }
    }
    let mut old = cmd.spawn().expect("starting rip serve on a terminal");
    drop(cmd);
    let old_guard = Orphan(old.id() as i32);
    let said = Arc::new(Mutex::new(String::new()));
    let reader = std::thread::spawn({
        let said = said.clone();
        move || {
            let mut terminal = std::fs::File::from(master);
            let mut buf = [0u8; 4096];
            // Ends when every process holding the terminal is gone (EIO).
            while let Ok(n @ 1..) = terminal.read(&mut buf) {
                said.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let seen = |needle: &str| said.lock().unwrap().contains(needle);
    assert!(wait_until(WAIT, || seen("all workers ready")), "rip did not start: {}", said.lock().unwrap());

    let out = Control::under(&run).run(&["upgrade"]);
    assert!(out.status.success(), "{out:?}");
    let new: i32 =
        out.stdout.trim().rsplit(' ').next().and_then(|p| p.parse().ok()).expect("the new pid is printed");
    let new_guard = Orphan(new);
    assert!(
        wait_until(WAIT, || seen("keeps running detached") && seen(&format!("kill {new}"))),
        "no word of the detached rip on the terminal: {}",
        said.lock().unwrap()
    );
    assert!(seen("rip stop"), "{}", said.lock().unwrap());
    assert!(old.wait().expect("waiting for the old serve").success());
    new_guard.stop();
    drop(old_guard);
    reader.join().expect("the terminal reader");
}
