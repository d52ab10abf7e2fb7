//! The library example (examples/json_api.rs), for tests that run a user's own binary built on
//! `rip::main_with`: the binary, up to date for the build under test, and the worker that
//! answered, which the example names in every response.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hyper::StatusCode;

use super::http::{Client, Reply};

/// The json_api example binary, built once per test run. `cargo test` builds examples, but
/// `cargo test --test it` does not, and a binary left from an earlier build may be stale; so
/// cargo is asked to bring it up to date (a no-op when it is), for the same profile and
/// target directory as the `rip` binary under test, which sits next to `examples/`.
pub fn example_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir =
            Path::new(env!("CARGO_BIN_EXE_rip")).parent().expect("the rip binary is in a directory");
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .args(["build", "--quiet", "--example", "json_api", "--target-dir"])
            .arg(profile_dir.parent().expect("the profile directory has a parent"))
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(profile) => {
                cargo.args(["--profile", profile]);
            }
        }
        let out = cargo.output().expect("running cargo to build the example");
        assert!(
            out.status.success(),
            "building the json_api example failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exe = profile_dir.join("examples/json_api");
        assert!(exe.is_file(), "cargo built no {}", exe.display());
        exe
    })
}

/// The pid of the worker that answered, from the example's `x-rip-worker-pid` header.
#[track_caller]
pub fn served_by(reply: &Reply) -> i32 {
    reply
        .headers
        .get("x-rip-worker-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-rip-worker-pid in {:?}", reply.headers))
}

/// The pid of the example's worker that answers `GET path`.
pub async fn served_by_pid(addr: SocketAddr, path: &str) -> i32 {
    let reply = Client::new(addr).get(path).await.expect("GET from the example");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    served_by(&reply)
}
