//! rip refusing to start: a bad config file, flag or variable, a port in use, a missing root,
//! an unsafe runtime directory. Each refusal is one `rip: ...` line on stderr naming the
//! culprit, a non-zero exit, no panic, and no worker left running.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::{Rip, WAIT};

#[test]
fn an_unknown_key_in_the_config_file_is_named() {
    let rip = Rip::builder();
    let file = rip.dir().join("rip.toml");
    std::fs::write(&file, "wrokers = 2\n").unwrap();
    let names = ["wrokers", file.to_str().unwrap()];
    refuses(rip.arg("--config").arg(&file), &names);
}

#[test]
fn a_bad_value_in_the_config_file_is_named() {
    let rip = Rip::builder();
    let file = rip.dir().join("rip.toml");
    std::fs::write(&file, "workers = \"many\"\n").unwrap();
    let names = ["workers", "many", file.to_str().unwrap()];
    refuses(rip.arg("--config").arg(&file), &names);
}

#[test]
fn zero_workers_is_refused() {
    refuses(Rip::builder().args(&["--workers", "0"]), &["--workers"]);
}

#[test]
fn an_unknown_flag_is_refused() {
    refuses(Rip::builder().arg("--no-such-flag"), &["--no-such-flag"]);
}

#[test]
fn a_port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let rip = Rip::builder().args(&["--port", &port.to_string()]);
    refuses(rip, &[&format!("127.0.0.1:{port}")]);
}

#[test]
fn a_missing_root_is_named() {
    let rip = Rip::builder();
    let root = rip.dir().join("no-such-root");
    let names = [root.to_str().unwrap()];
    refuses(rip.arg("--root").arg(&root), &names);
}

#[test]
fn a_bad_workers_variable_is_named() {
    refuses(Rip::builder().env("RIP_WORKERS", "abc"), &["RIP_WORKERS", "abc"]);
}

/// Runs rip expecting it to refuse to start: exactly one stderr line, `rip: ...`, mentioning
/// each of `names`, a non-zero exit code, no panic, no worker.
fn refuses(rip: crate::harness::RipBuilder, names: &[&str]) {
    // A backtrace, if anything printed one, would show.
    let mut rip = rip.env("RUST_BACKTRACE", "1").spawn();
    let status = rip.wait_exit(WAIT);
    let logs = rip.logs();

    assert!(status.code().is_some_and(|c| c != 0), "rip exited with {status}; stderr: {logs:#?}");
    assert_eq!(logs.len(), 1, "want exactly one line on stderr: {logs:#?}");
    let line = &logs[0];
    assert!(line.starts_with("rip: "), "{line:?}");
    for name in names {
        assert!(line.contains(name), "{line:?} does not name {name:?}");
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!line.contains(bad), "{line:?}");
    }
    assert!(rip.worker_pids().is_empty());
}

#[test]
fn a_runtime_directory_owned_by_someone_else_or_open_to_others_is_refused() {
    let scratch = crate::harness::TempDir::new();

    let open = scratch.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused_runtime_dir(&open, "lets other users in");

    let target = scratch.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = scratch.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused_runtime_dir(&link, "symbolic link");

    // Another user's directory: only root can make one.
    if nix::unistd::geteuid().is_root() {
        let theirs = scratch.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        refused_runtime_dir(&theirs, "owned by uid 65534");
    } else {
        println!("faults: runtime_dir owned-by-another-user case skipped: not root");
    }
}

/// rip refuses to start with `dir` as its runtime directory: a non-zero exit and exactly one
/// stderr line, `rip: ...`, naming the directory and `why`.
#[track_caller]
fn refused_runtime_dir(dir: &Path, why: &str) {
    let mut rip = Rip::builder().runtime_dir(dir).env("RUST_BACKTRACE", "1").spawn();
    let status = rip.wait_exit(WAIT);
    let logs = rip.logs();
    assert!(status.code().is_some_and(|c| c != 0), "rip exited with {status}; stderr: {logs:#?}");
    assert_eq!(logs.len(), 1, "want one line on stderr: {logs:#?}");
    let line = &logs[0];
    assert!(line.starts_with("rip: "), "{line:?}");
    assert!(line.contains(dir.to_str().unwrap()), "{line:?} does not name {}", dir.display());
    assert!(line.contains(why), "{line:?} does not say {why:?}");
    assert!(!line.contains("panicked"), "{line:?}");
    assert!(rip.worker_pids().is_empty());
}
