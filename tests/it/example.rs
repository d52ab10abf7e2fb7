//! The library example (examples/json_api.rs) served through rip workers: a user's own binary
//! built on `rip::main_with` gets `serve`, the worker pool and graceful shutdown.
//!
//! [`harness::Rip`] runs the `rip` binary only, so the example gets a small guard of its own
//! here ([`Example`]) built from the harness's parts: port 0, a private runtime dir, the
//! address from the `rip started` line, `/healthz`, kill on drop, stderr shown on failure.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper::header::{CONTENT_TYPE, LOCATION};
use hyper::{Method, StatusCode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{
    self, full, log_field, request, wait_until, Client, Reply, TempDir, WorkerEvent, START_TIMEOUT, WAIT,
};

/// The example binary, built once per test run. `cargo test` builds examples, but
/// `cargo test --test it` does not, and a binary left from an earlier build may be stale; so
/// cargo is asked to bring it up to date (a no-op when it is), for the same profile and
/// target directory as the `rip` binary under test, which sits next to `examples/`.
fn example_binary() -> &'static Path {
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
            Some("debug") => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(profile) => {
                cargo.args(["--profile", profile]);
            }
            None => {}
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

/// A running `json_api serve`, killed on drop.
struct Example {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    status: Option<ExitStatus>,
    // Removed after the process is gone.
    _dir: TempDir,
}

impl Example {
    fn start(workers: usize) -> Example {
        let dir = TempDir::new();
        let mut cmd = Command::new(example_binary());
        cmd.args(["serve", "--port", "0", "--workers", &workers.to_string()])
            .arg("--runtime-dir")
            .arg(dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RIP_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd.spawn().expect("starting the json_api example");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        std::thread::spawn({
            let logs = logs.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            }
        });
        let mut example = Example { child, logs, addr: ([127, 0, 0, 1], 0).into(), status: None, _dir: dir };
        let started =
            example.wait_for_log(" rip started ", START_TIMEOUT).expect("the example logs `rip started`");
        example.addr = log_field(&started, "addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {started:?}"));
        example
            .wait_for_log(" all workers ready ", START_TIMEOUT)
            .expect("every worker of the example becomes ready");
        example
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.logs().into_iter().find(|l| l.contains(needle));
            found.is_some() || matches!(self.child.try_wait(), Ok(Some(_)))
        });
        found
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Pids of the workers the example logged as spawned.
    fn worker_pids(&self) -> BTreeSet<i32> {
        self.logs()
            .iter()
            .filter_map(|l| WorkerEvent::parse(l))
            .filter(|e| e.is("worker spawned"))
            .map(|e| e.pid)
            .collect()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || {
            self.status = self.child.try_wait().expect("waiting for the example");
            self.status.is_some()
        });
        self.status
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- stderr of json_api ----");
            for line in self.logs() {
                eprintln!("{line}");
            }
            eprintln!("---- end of json_api's stderr ----");
        }
    }
}

/// The pid of the worker that answered, from the example's own header.
fn served_by(reply: &Reply) -> i32 {
    reply.headers["x-rip-worker-pid"]
        .to_str()
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no worker pid in {:?}", reply.headers))
}

async fn post_json(client: &mut Client, path: &str, body: &str) -> Reply {
    let mut req = request(Method::POST, path, full(body.to_owned()));
    req.headers_mut().insert(CONTENT_TYPE, "application/json".parse().unwrap());
    client.request(req).await.expect("a POST reply")
}

#[test]
fn json_api_example_serves_its_routes_through_every_worker() {
    let example = Example::start(2);
    let workers = example.worker_pids();
    assert_eq!(workers.len(), 2, "two workers spawned: {workers:?}");
    assert!(!workers.contains(&example.pid()));

    harness::runtime().block_on(async {
        let mut client = Client::new(example.addr);

        let about = client.get("/").await.unwrap();
        assert_eq!(about.status, StatusCode::OK);
        assert!(about.text().contains("/api/items"), "{}", about.text());

        let created = post_json(&mut client, "/api/items", r#"{"text":"buy milk"}"#).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
        let note = created.json();
        assert_eq!(note["text"], "buy milk");
        assert_eq!(note["done"], false);
        let id = note["id"].as_u64().expect("a numeric id");
        let location = format!("/api/items/{id}");
        assert_eq!(created.headers[LOCATION], location.as_str());
        let owner = served_by(&created);
        assert!(workers.contains(&owner), "{owner} is not a worker");

        // Each worker keeps its own notes: the note is found through the worker that made
        // it and nowhere else. Ties in the balancer rotate, so both are reached soon.
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let reply = client.get(&location).await.unwrap();
            let pid = served_by(&reply);
            assert!(workers.contains(&pid), "{pid} is not a worker");
            if pid == owner {
                assert_eq!(reply.status, StatusCode::OK);
                assert_eq!(reply.json(), note);
            } else {
                assert_eq!(reply.status, StatusCode::NOT_FOUND);
                assert!(reply.json()["error"].is_string());
            }
            seen.insert(pid);
            if seen == workers {
                break;
            }
        }
        assert_eq!(seen, workers, "both workers answer");

        let listed = client.get("/api/items").await.unwrap();
        assert_eq!(listed.status, StatusCode::OK);
        assert!(listed.json().is_array());

        let missing = client.get("/api/items/987654321").await.unwrap();
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert!(missing.json()["error"].is_string());

        let empty = post_json(&mut client, "/api/items", r#"{"text":"  "}"#).await;
        assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
        let broken = post_json(&mut client, "/api/items", "{not json").await;
        assert!(broken.status.is_client_error(), "{}", broken.status);
    });
}

#[test]
fn json_api_example_exits_0_on_sigterm_and_takes_its_workers_along() {
    let mut example = Example::start(2);
    let workers: Vec<i32> = example.worker_pids().into_iter().collect();
    harness::runtime().block_on(async {
        let reply = Client::new(example.addr).get("/api/items").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
    });
    kill(Pid::from_raw(example.pid()), Signal::SIGTERM).expect("signalling the example");
    let status = example.wait_exit(WAIT).expect("the example exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert_eq!(harness::wait_gone(&workers, WAIT), Vec::<i32>::new());
}

#[test]
fn a_protocol_upgrade_passes_through_front_end_and_worker_end_to_end() {
    use std::io::{Read, Write};
    let example = Example::start(1);
    let mut stream = std::net::TcpStream::connect(example.addr).expect("connecting");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(b"GET /api/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("reading the 101"), 1, "closed in the head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    // Several exchanges, so the tunnel is shown to stay open both ways.
    for message in [&b"ping"[..], b"a longer message \x00\xff with any bytes", b"last"] {
        stream.write_all(message).unwrap();
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).expect("reading the echo");
        assert_eq!(echoed, message);
    }
}
