//! Running under systemd: sd_notify says READY=1 (once every worker is), RELOADING=1,
//! READY=1 and STOPPING=1 in order and nothing after; a listener passed by socket activation
//! is served, and the workers never see the LISTEN_* variables meant for rip.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use hyper::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{
    has_state, log_field, runtime, Client, Control, NotifySocket, Process, Rip, TempDir, START_TIMEOUT, WAIT,
};

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

/// `systemd-analyze`, installed from Debian's packages when it is missing.
fn systemd_analyze() -> std::path::PathBuf {
    let found = || {
        ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(path) = found() {
        return path;
    }
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", "systemd"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output();
    found().unwrap_or_else(|| {
        panic!(
            "systemd-analyze is missing and could not be installed (apt-get install systemd: {:?}); \
             install the systemd package to run this test",
            installed.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        )
    })
}

/// The shipped unit, with the binary's path pointing at the one under test.
fn shipped_unit(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name);
    let text = std::fs::read_to_string(&source).expect("reading the shipped unit");
    let unit = dir.join(name);
    std::fs::write(&unit, text.replace("/usr/local/bin/rip", env!("CARGO_BIN_EXE_rip"))).unwrap();
    std::fs::copy(source.with_file_name("rip.socket"), dir.join("rip.socket")).unwrap();
    unit
}

/// rip.service must load cleanly on the systemd of Debian 12 (252), which has no
/// Type=notify-reload: a unit it half-ignores loses readiness and reload without a word.
#[test]
fn the_shipped_unit_verifies_cleanly_with_this_systemd() {
    let dir = TempDir::new();
    let unit = shipped_unit(dir.path(), "rip.service");
    let out =
        Command::new(systemd_analyze()).arg("verify").arg(&unit).output().expect("running systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify rip.service: {said}");
}

/// What `systemctl reload rip` runs (the unit's ExecReload, with $MAINPID and the runtime
/// directory filled in as systemd fills them): it waits for the roll and exits 0, or exits 1
/// with the reason when the reload cannot be done.
#[test]
fn the_units_reload_command_waits_for_the_roll_and_fails_when_it_fails() {
    let dir = TempDir::new();
    let unit = std::fs::read_to_string(shipped_unit(dir.path(), "rip.service")).unwrap();
    let exec_reload =
        unit.lines().find_map(|l| l.strip_prefix("ExecReload=")).expect("the unit has ExecReload");
    let builder = Rip::builder();
    let file = builder.dir().join("rip.toml");
    std::fs::write(&file, "workers = 2\n").unwrap();
    let rip = builder.arg("--config").arg(&file).start_all_ready();
    let command = exec_reload
        .replace("${MAINPID}", &rip.pid().to_string())
        .replace("/run/rip", rip.runtime_dir().to_str().unwrap());
    let run = || {
        let mut words = command.split_whitespace();
        let out = Command::new(words.next().unwrap()).args(words).output().expect("running ExecReload");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let control = Control::of(&rip);
    let before = crate::harness::settle(&control, rip.pid(), 2);
    let (status, said) = run();
    assert!(status.success(), "{command}: {said}");
    // Waited for: the old workers are gone by the time it returns.
    let after: std::collections::BTreeSet<i32> = control.status().workers.iter().map(|w| w.pid).collect();
    assert!(before.is_disjoint(&after), "workers not replaced: {before:?} then {after:?}: {said}");

    std::fs::write(&file, "workers = 2\nhost = \"0.0.0.0\"\n").unwrap();
    let (status, said) = run();
    assert_eq!(status.code(), Some(1), "{command}: {said}");
    assert!(said.contains("host changed"), "{said}");
}
