//! A crash-looping worker binary: the restarts of each slot back off (100 ms doubling to 10 s),
//! each exit is logged with its status and stderr, the front-end answers 503 at once
//! meanwhile, and rip recovers by itself once the binary is fixed.
//!
//! Tests print one `faults: ...` line with their figures, shown with `-- --nocapture`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hyper::header::RETRY_AFTER;
use hyper::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{
    backoff_delays, lines_after, log_field, ready_workers, replace_file, runtime, wait_until, Client, Rip,
    WorkerEvent, WAIT,
};

#[test]
fn crash_looping_workers_back_off_and_recover_when_the_binary_is_fixed() {
    /// What the broken binary says before it exits 3.
    const BROKEN: &str = "rip-faults: this build is broken";
    /// The backoff ceiling (10 s) plus slack: the longest a fixed binary may wait for its turn.
    const RECOVER_WITHIN: Duration = Duration::from_secs(15);
    let real = Path::new(env!("CARGO_BIN_EXE_rip"));
    let builder = Rip::builder();
    let bin_dir = builder.dir().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let exe = bin_dir.join("rip");
    replace_file(&exe, |tmp| std::fs::copy(real, tmp).map(drop));
    // rip starts workers from its own path, so what is at that path now is what they run.
    let rip = builder.program(&exe).args(&["--workers", "2", "--queue-timeout", "200ms"]).start();
    rip.wait_all_ready();
    let rt = runtime();
    let originals = ready_workers(&rip);
    assert_eq!(originals.len(), 2, "{originals:?}");

    replace_file(&exe, |tmp| {
        std::fs::write(tmp, format!("#!/bin/sh\necho '{BROKEN}' >&2\nexit 3\n"))?;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
    });
    let mark = rip.log_mark();
    for pid in &originals {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }

    // Both slots fail to restart, over and over, each time after a longer pause.
    let crashed = rip
        .wait_for_log_from(mark, |l| l.contains(" worker exited unexpectedly ") && l.contains(BROKEN), WAIT)
        .expect("a broken worker's exit was logged with what it wrote to stderr");
    assert_eq!(log_field(&crashed, "status"), Some("exit code 3"), "{crashed}");
    let mut delays: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let backed_off = wait_until(WAIT, || {
        delays = backoff_delays(&rip, mark);
        delays.values().any(|d| d.len() >= 4)
    });
    assert!(backed_off, "fewer than 4 backoffs in a slot: {delays:?}");
    for (slot, d) in &delays {
        assert!(d.windows(2).all(|w| w[1] > w[0] || w[1] == 10_000), "slot {slot} delays not growing: {d:?}");
    }

    // Nobody is ready; the front-end still answers, at once, with 503 and Retry-After.
    let (reply, waited) = rt.block_on(async {
        let started = Instant::now();
        (Client::new(rip.addr()).get("/").await.expect("GET /"), started.elapsed())
    });
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(reply.headers.get(RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(waited < Duration::from_secs(2), "503 after {waited:?}");

    replace_file(&exe, |tmp| std::fs::copy(real, tmp).map(drop));
    let fixed_at = Instant::now();
    let recovered = rt.block_on(async {
        let mut client = Client::new(rip.addr());
        let deadline = fixed_at + RECOVER_WITHIN;
        loop {
            let reply = client.get("/").await.expect("GET /");
            if reply.status == StatusCode::OK {
                return Some(fixed_at.elapsed());
            }
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let delays = backoff_delays(&rip, mark);
    println!(
        "faults: crash_loop exits={} backoffs={delays:?} recovered_after_ms={:?}",
        lines_after(&rip, mark, " worker exited unexpectedly ").len(),
        recovered.map(|d| d.as_millis())
    );
    let recovered = recovered.unwrap_or_else(|| panic!("no 200 within {RECOVER_WITHIN:?} of the fix"));
    assert!(recovered < RECOVER_WITHIN);
    rip.wait_for_log_from(mark, |l| WorkerEvent::parse(l).is_some_and(|e| e.is("worker ready")), WAIT)
        .expect("a worker of the fixed binary became ready");
}
