//! A log reader that stops reading does not stop rip: with its stderr a pipe that nobody
//! reads (a terminal paused with Ctrl-S, a stuck log shipper), rip keeps serving under load,
//! `rip status` answers, and the lines it had to drop are counted in `/metrics`.

use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::harness::{
    free_port, runtime, summary, wait_until, Client, Control, Load, TempDir, START_TIMEOUT,
};

/// `rip serve`, killed on drop (its workers die with it).
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stderr_nobody_reads_never_stalls_serving_or_status_and_dropped_lines_are_counted() {
    let dir = TempDir::new();
    let (port, admin) = (free_port(), free_port());
    // The read end stays open and unread: writes to the pipe block once its 64 KiB are full.
    let (_unread, stderr): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("a pipe");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rip"));
    cmd.args(["serve", "--workers", "2", "--port", &port.to_string()])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .arg("--runtime-dir")
        .arg(dir.path())
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RIP_") {
            cmd.env_remove(key);
        }
    }
    let serve = Serve(cmd.spawn().expect("starting rip"));
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let rt = runtime();
    let healthy = wait_until(START_TIMEOUT, || {
        rt.block_on(async {
            matches!(Client::new(addr).get("/healthz").await, Ok(r) if r.status == StatusCode::OK)
        })
    });
    assert!(healthy, "rip never answered /healthz");

    // Every request writes an access line to the unread stderr: far more than the pipe and
    // rip's own queue hold.
    let report =
        rt.block_on(Load::get("/").clients(10).total(12_000).deadline(Duration::from_secs(30)).run(addr));
    assert_eq!(report.failed, 0, "{}", summary(&report));
    assert!(!report.timed_out, "the load did not finish: {}", summary(&report));

    let started = Instant::now();
    let status = Control::at(dir.path(), serve.0.id() as i32).status();
    assert_eq!(status.workers_ready, 2, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "rip status took {:?}", started.elapsed());

    let metrics = rt.block_on(async {
        let reply = Client::new(([127, 0, 0, 1], admin).into()).get("/metrics").await.expect("GET /metrics");
        reply.text()
    });
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rip_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rip_log_lines_dropped_total in {metrics}"));
    println!("faults: unread_stderr sent={} failed=0 dropped_lines={dropped}", report.sent);
    assert!(dropped > 0, "nothing was dropped, so stderr was never full: the test proves nothing");
}
