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
