//! Tunnels (upgraded connections, here examples/chat.rs's WebSockets) are counted apart from
//! requests, do not hold up a rolling reload, and when a worker's grace runs out with some
//! still open, they are closed with a warning that says how many. A reload is finished only
//! once every old worker has exited.

use std::net::SocketAddr;

use crate::harness::{
    example, log_addr, log_field, parse_prometheus, runtime, Client, Control, Frame, Rip, WebSocket, WAIT,
};

fn chat(args: &[&str]) -> Rip {
    example("chat").args(args).start_all_ready()
}

/// Waits for the Close with 1001 a draining worker sends, and does not answer it: a client
/// that keeps its side open, as a slow or careless one does.
#[track_caller]
fn told_going_away(client: &mut WebSocket) {
    match client.read_frame(WAIT) {
        Ok(Frame::Close(Some(1001), _)) => {}
        other => panic!("expected a Close with 1001, got {other:?}"),
    }
}

#[test]
fn tunnels_are_counted_apart_from_requests_in_status_and_metrics() {
    let rip = chat(&["--workers", "2", "--admin", "127.0.0.1:0"]);
    let admin: SocketAddr = rip
        .wait_for_log(|l| l.contains(" admin listener started "), WAIT)
        .and_then(|l| log_addr(&l))
        .expect("the admin address is logged");
    let sockets: Vec<WebSocket> = (0..3).map(|_| WebSocket::connect(rip.addr(), "/ws")).collect();

    let out = Control::of(&rip).run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("rip status --json");
    assert_eq!(status["tunnels"], 3, "{status}");
    assert_eq!(status["in_flight"], 0, "a tunnel counted as a request in flight: {status}");
    assert_eq!(status["requests"], 0, "a tunnel counted towards --max-requests: {status}");
    let per_worker: u64 =
        status["workers"].as_array().unwrap().iter().map(|w| w["tunnels"].as_u64().unwrap()).sum();
    assert_eq!(per_worker, 3, "{status}");
    let table = Control::of(&rip).run(&["status"]).stdout;
    assert!(table.contains("3 tunnels"), "{table}");

    let text = runtime().block_on(async { Client::new(admin).get("/metrics").await.unwrap().text() });
    let samples = parse_prometheus(&text);
    let value = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
    assert_eq!(value("rip_tunnels_open"), Some(3.0), "{text}");
    assert_eq!(value("rip_in_flight_requests"), Some(0.0), "{text}");
    drop(sockets);
}

/// The old worker's open WebSockets do not hold its surge slot: the next slot's replacement
/// starts once the old worker's requests are done, not once its sockets are; and the reload
/// is reported finished only after every old worker has exited.
#[test]
fn a_reload_rolls_past_open_tunnels_and_finishes_when_the_old_workers_are_gone() {
    let rip = chat(&["--workers", "2", "--graceful-timeout", "10s"]);
    // Enough sockets that both workers hold some.
    let mut sockets: Vec<WebSocket> = (0..6).map(|_| WebSocket::connect(rip.addr(), "/ws")).collect();
    let mark = rip.log_mark();
    let out = Control::of(&rip).run(&["reload", "--wait"]);
    assert!(out.status.success(), "rip reload --wait: {out:?}");
    for socket in &mut sockets {
        told_going_away(socket);
    }
    // Log lines reach stderr a few milliseconds after the command's answer; the ones before
    // this one are there once it is.
    rip.wait_for_log_from(mark, |l| l.contains(" reload finished "), WAIT).expect("the reload finished");
    let logs: Vec<String> = rip.logs().into_iter().skip(mark).collect();
    let at = |pred: &dyn Fn(&str) -> bool| logs.iter().position(|l| pred(l));
    let event = |name: &'static str, worker: &'static str| {
        move |l: &str| l.contains(name) && log_field(l, "worker") == Some(worker)
    };
    let second_spawned = at(&event(" worker spawned ", "1/1")).expect("the second replacement was spawned");
    let first_old_exited = at(&event(" worker exited ", "0/0")).expect("the first old worker exited");
    let second_old_exited = at(&event(" worker exited ", "1/0")).expect("the second old worker exited");
    let finished = at(&|l: &str| l.contains(" reload finished ")).expect("the reload finished");
    println!(
        "faults: reload_with_tunnels sockets=6 second_replacement_before_first_old_exit={} finished_after_old_exits={}",
        second_spawned < first_old_exited,
        finished > first_old_exited.max(second_old_exited)
    );
    assert!(
        second_spawned < first_old_exited,
        "the second replacement waited for the first old worker's sockets:\n{}",
        logs.join("\n")
    );
    assert!(
        finished > first_old_exited.max(second_old_exited),
        "finished before the old workers exited:\n{}",
        logs.join("\n")
    );
}

/// A worker whose grace runs out with WebSockets still open (here: the app waits for the
/// clients' Close replies longer than the grace) closes them and says how many.
#[test]
fn tunnels_still_open_at_the_end_of_the_grace_are_closed_with_their_count() {
    let rip = chat(&["--workers", "1", "--graceful-timeout", "300ms"]);
    let mut sockets: Vec<WebSocket> = (0..2).map(|_| WebSocket::connect(rip.addr(), "/ws")).collect();
    let mark = rip.log_mark();
    rip.signal(nix::sys::signal::Signal::SIGHUP);
    for socket in &mut sockets {
        told_going_away(socket);
    }
    let warning = rip
        .wait_for_log_from(mark, |l| l.contains("graceful timeout elapsed: closing what is still open"), WAIT)
        .expect("no warning when the grace ran out");
    assert_eq!(log_field(&warning, "tracked_tasks"), Some("2"), "{warning}");
    for socket in &mut sockets {
        assert!(socket.read_frame(WAIT).is_err(), "the socket stayed open past its worker's grace");
    }
}
