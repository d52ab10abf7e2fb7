//! examples/edge.rs: tower layers and a route in the parent, in front of every worker. The
//! worker app echoes the headers it received, with its pid, so the test sees what crossed
//! the edge; the edge route names the parent's pid.

use std::collections::BTreeSet;

use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};

use crate::harness::{empty, example, request, runtime, Client, Reply};

/// Longest the balancer may take to have sent a request to each of two workers: ties
/// rotate, so two requests normally do.
const TO_REACH_BOTH: usize = 50;

#[test]
fn edge_layers_give_each_request_an_id_and_each_response_a_mark_whichever_worker_serves() {
    let edge = example("edge").args(&["--workers", "2"]).start_all_ready();
    let workers: BTreeSet<i32> = edge.worker_pids().into_iter().collect();
    assert_eq!(workers.len(), 2, "two workers spawned: {workers:?}");
    let issued_by_parent = format!("{}-", edge.pid());

    runtime().block_on(async {
        let mut client = Client::new(edge.addr());
        let (mut reached, mut ids) = (BTreeSet::new(), BTreeSet::new());
        for _ in 0..TO_REACH_BOTH {
            let reply = client.get("/headers").await.expect("GET /headers");
            assert_marked(&reply);
            let echo = reply.json();
            let pid = echo["pid"].as_i64().expect("a pid") as i32;
            assert!(workers.contains(&pid), "{pid} is not a worker: {echo}");
            let id = echo["headers"]["x-request-id"].as_str().expect("the worker got an x-request-id");
            assert!(id.starts_with(&issued_by_parent), "{id} was not issued by the parent");
            assert!(ids.insert(id.to_string()), "request id {id} issued twice");
            reached.insert(pid);
            if reached == workers {
                break;
            }
        }
        assert_eq!(reached, workers, "both workers answer behind the edge");

        // An id the client chose is kept, so a request traced upstream stays one trace.
        let mut own = request(Method::GET, "/headers", empty());
        own.headers_mut().insert("x-request-id", HeaderValue::from_static("client-chosen-7"));
        let reply = client.request(own).await.expect("GET /headers with an id");
        assert_marked(&reply);
        assert_eq!(reply.json()["headers"]["x-request-id"], "client-chosen-7");
    });
}

#[test]
fn an_edge_route_is_answered_by_the_parent_itself() {
    let edge = example("edge").args(&["--workers", "1"]).start_all_ready();
    let workers = edge.worker_pids();
    let status = runtime().block_on(async { Client::new(edge.addr()).get("/edge/status").await });
    let status = status.expect("GET /edge/status");
    assert_marked(&status);
    let body = status.json();
    assert_eq!(body["answered_by"], "rip serve", "{body}");
    assert_eq!(body["pid"].as_i64(), Some(i64::from(edge.pid())), "not the parent's pid: {body}");
    assert!(!workers.contains(&edge.pid()), "{workers:?}");
    let id = body["request_id"].as_str().expect("the edge route got a request id too");
    assert!(id.starts_with(&format!("{}-", edge.pid())), "{id}");
}

/// A 200 that passed the edge on its way out.
#[track_caller]
fn assert_marked(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers.get("x-edge").map(|v| v.as_bytes()), Some(&b"rip"[..]), "{:?}", reply.headers);
}
