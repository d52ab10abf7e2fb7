//! examples/own_tracing.rs: a binary that installs its own `tracing` subscriber keeps it; rip
//! logs through it, and says loudly, once, when its filter throws rip's events away.

use std::time::Duration;

use hyper::StatusCode;

use crate::harness::{example_binary, free_port, runtime, wait_until, Client, Rip, START_TIMEOUT};

const WARNING: &str = "filters out rip's own events";

#[test]
fn a_subscriber_that_filters_rip_out_gets_one_warning_and_rip_still_serves() {
    let port = free_port();
    let rip = Rip::builder()
        .program(example_binary("own_tracing"))
        .args(&["--port", &port.to_string(), "--workers", "2"])
        .spawn();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let served = wait_until(START_TIMEOUT, || {
        runtime().block_on(async {
            matches!(Client::new(addr).get("/").await, Ok(reply) if reply.status == StatusCode::OK)
        })
    });
    assert!(served, "the example never answered on {addr}");
    assert!(
        wait_until(Duration::from_secs(5), || rip
            .logs()
            .iter()
            .filter(|l| l.contains("own_tracing app built"))
            .count()
            == 2),
        "the app's own events (one per worker) did not reach its subscriber"
    );
    let warnings = rip.logs().iter().filter(|l| l.contains(WARNING)).count();
    assert_eq!(warnings, 1, "the parent warns once, workers not at all");
    assert!(!rip.logs().iter().any(|l| l.contains("rip started")), "rip's events were filtered, as asked");
}

#[test]
fn a_subscriber_that_lets_rip_through_gets_rips_log_and_no_warning() {
    let rip = Rip::builder()
        .program(example_binary("own_tracing"))
        .env("APP_LOG", "own_tracing=info,rip=info")
        .args(&["--workers", "1"])
        .start_all_ready();
    let reply = runtime().block_on(async { Client::new(rip.addr()).get("/").await }).expect("GET /");
    assert_eq!(reply.status, StatusCode::OK);
    // Log lines reach stderr a few milliseconds after they are written.
    assert!(
        wait_until(Duration::from_secs(5), || rip.logs().iter().any(|l| l.contains("own_tracing app built"))),
        "the app's own event did not reach its subscriber"
    );
    assert!(!rip.logs().iter().any(|l| l.contains(WARNING)), "warned though rip's events get through");
}
