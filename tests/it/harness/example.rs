//! The library's examples (examples/*.rs), for tests that run a user's own binary built on
//! `rip::Rip`: the binaries, up to date for the build under test, a [`Rip`] builder that runs
//! one, and the worker that answered, which json_api names in every response.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hyper::StatusCode;

use super::http::{Client, Reply};
use super::rip::{Rip, RipBuilder};

/// `rip serve` as example `name` runs it, with the guard's port 0 and private runtime dir;
/// start it with [`RipBuilder::start_all_ready`], so that no `/healthz` of the harness goes
/// through the front-end before the test's own requests.
pub fn example(name: &str) -> RipBuilder {
    Rip::builder().program(example_binary(name))
}

/// The binary of example `name` (`json_api`, `edge`, `todos`, `chat`).
pub fn example_binary(name: &str) -> PathBuf {
    let exe = examples_dir().join(name);
    assert!(exe.is_file(), "cargo built no {}", exe.display());
    exe
}

/// Where every example binary is, built once per test run. `cargo test` builds examples, but
/// `cargo test --test it` does not, and a binary left from an earlier build may be stale; so
/// cargo is asked to bring them up to date (a no-op when they are), for the same profile and
/// target directory as the `rip` binary under test, which sits next to `examples/`. All of
/// them at once: one cargo run per test run instead of one per example.
fn examples_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir =
            Path::new(env!("CARGO_BIN_EXE_rip")).parent().expect("the rip binary is in a directory");
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .args(["build", "--quiet", "--examples", "--target-dir"])
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
        let out = cargo.output().expect("running cargo to build the examples");
        assert!(
            out.status.success(),
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir.join("examples")
    })
}

/// The pid of the worker that answered, from the json_api example's `x-rip-worker-pid` header.
#[track_caller]
pub fn served_by(reply: &Reply) -> i32 {
    reply
        .headers
        .get("x-rip-worker-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-rip-worker-pid in {:?}", reply.headers))
}

/// The pid of the json_api worker that answers `GET path`.
pub async fn served_by_pid(addr: SocketAddr, path: &str) -> i32 {
    let reply = Client::new(addr).get(path).await.expect("GET from the example");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    served_by(&reply)
}
