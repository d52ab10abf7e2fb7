//! The library example (examples/json_api.rs) served through rip workers: a user's own binary
//! built on `rip::main_with` gets `serve`, the worker pool and graceful shutdown.
//!
//! The example gets a small guard of its own here ([`Example`]) on the harness's [`Process`]
//! rather than a [`harness::Rip`]: no `/healthz` from the harness goes through the front-end
//! before the test's own requests, and the test is ready once every worker is. Like `Rip` it uses port 0 and a private
//! runtime dir, learns the address from the `rip started` line, kills on drop and shows
//! stderr on failure.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use hyper::header::LOCATION;
use hyper::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{
    self, example_binary, log_addr, served_by, Client, Process, TempDir, START_TIMEOUT, WAIT,
};

/// A running `json_api serve`, killed on drop.
struct Example {
    process: Process,
    addr: SocketAddr,
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
            .current_dir(dir.path());
        let mut process = Process::spawn(cmd);
        let started =
            process.wait_for_log(" rip started ", START_TIMEOUT).expect("the example logs `rip started`");
        let addr = log_addr(&started).unwrap_or_else(|| panic!("no addr in {started:?}"));
        process
            .wait_for_log(" all workers ready ", START_TIMEOUT)
            .expect("every worker of the example becomes ready");
        Example { process, addr, _dir: dir }
    }

    fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Pids of the workers the example logged as spawned.
    fn worker_pids(&self) -> BTreeSet<i32> {
        self.process.worker_pids().into_iter().collect()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }
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

        let created = client.post_json("/api/items", r#"{"text":"buy milk"}"#).await.expect("a POST reply");
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

        let empty = client.post_json("/api/items", r#"{"text":"  "}"#).await.expect("a POST reply");
        assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
        let broken = client.post_json("/api/items", "{not json").await.expect("a POST reply");
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
