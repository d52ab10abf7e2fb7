//! The library example (examples/json_api.rs) served through rip workers: a user's own binary
//! built on `rip::main_with` gets `serve`, the worker pool and graceful shutdown.
//!
//! Each test starts the example with [`harness::example`] and waits for every worker rather
//! than for a `/healthz` through the front-end, so the test's own requests are the first.

use std::collections::BTreeSet;

use hyper::header::LOCATION;
use hyper::StatusCode;
use nix::sys::signal::Signal;

use crate::harness::{self, example, served_by, Client, Rip, WAIT};

fn start(workers: usize) -> Rip {
    example("json_api").args(&["--workers", &workers.to_string()]).start_all_ready()
}

#[test]
fn json_api_example_serves_its_routes_through_every_worker() {
    let example = start(2);
    let workers: BTreeSet<i32> = example.worker_pids().into_iter().collect();
    assert_eq!(workers.len(), 2, "two workers spawned: {workers:?}");
    assert!(!workers.contains(&example.pid()));

    harness::runtime().block_on(async {
        let mut client = Client::new(example.addr());

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
    let mut example = start(2);
    let workers = example.worker_pids();
    harness::runtime().block_on(async {
        let reply = Client::new(example.addr()).get("/api/items").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
    });
    example.signal(Signal::SIGTERM);
    let status = example.wait_exit(WAIT);
    assert!(status.success(), "exit status {status}");
    assert_eq!(harness::wait_gone(&workers, WAIT), Vec::<i32>::new());
}

#[test]
fn a_protocol_upgrade_passes_through_front_end_and_worker_end_to_end() {
    use std::io::{Read, Write};
    let example = start(1);
    let mut stream = std::net::TcpStream::connect(example.addr()).expect("connecting");
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
