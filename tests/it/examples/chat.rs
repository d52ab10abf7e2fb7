//! examples/chat.rs: a WebSocket room per worker, through rip's front-end, that closes each
//! socket with 1001 ("going away") when its worker drains, rather than dropping it.

use nix::sys::signal::Signal;

use crate::harness::{example, Frame, Rip, WebSocket, WAIT};

/// How long rip waits for connections and workers when it stops: short, so that a test
/// that fails by waiting it out does so soon. The front-end may hold a tunnel open for up
/// to this long before the worker hears that it should drain.
const GRACE: &str = "2s";

fn start() -> Rip {
    example("chat").args(&["--workers", "1", "--graceful-timeout", GRACE]).start_all_ready()
}

/// Every client hears `text`, its sender included.
#[track_caller]
fn all_hear(clients: &mut [&mut WebSocket], text: &str) {
    for client in clients {
        assert_eq!(client.read_text(WAIT), text);
    }
}

/// The next frame is a Close with 1001 and a reason; the client answers it, as the closing
/// handshake asks.
#[track_caller]
fn assert_going_away(client: &mut WebSocket) {
    match client.read_frame(WAIT) {
        Ok(Frame::Close(Some(1001), reason)) => assert!(!reason.is_empty(), "a Close without a reason"),
        other => panic!("expected a Close with 1001 (going away), got {other:?}"),
    }
    client.send_close(1000);
}

/// Two clients in the room, each heard by both, so that both sockets are served by the
/// worker.
fn alice_and_bob(chat: &Rip) -> (WebSocket, WebSocket) {
    let mut alice = WebSocket::connect(chat.addr(), "/ws");
    let mut bob = WebSocket::connect(chat.addr(), "/ws");
    alice.send_text("hello from alice");
    all_hear(&mut [&mut alice, &mut bob], "hello from alice");
    bob.send_text("hi alice, bob here");
    all_hear(&mut [&mut alice, &mut bob], "hi alice, bob here");
    (alice, bob)
}

#[test]
fn two_chat_clients_hear_each_other_through_the_front_end() {
    let chat = start();
    let (mut alice, mut bob) = alice_and_bob(&chat);
    // Longer than one small frame, so the 16-bit length form is crossed both ways.
    let long = "x".repeat(1000);
    alice.send_text(&long);
    all_hear(&mut [&mut alice, &mut bob], &long);
}

// On SIGTERM the worker fires `draining` and waits for the socket tasks' `track` guards, so
// each socket's Close goes out (through the front-end's tunnel) before the worker exits.
#[test]
fn chat_sockets_get_a_going_away_close_before_rip_exits_0_on_sigterm() {
    let mut chat = start();
    let (mut alice, mut bob) = alice_and_bob(&chat);
    chat.signal(Signal::SIGTERM);
    assert_going_away(&mut alice);
    assert_going_away(&mut bob);
    let status = chat.wait_exit(WAIT);
    assert!(status.success(), "exit status {status}");
    let killed: Vec<String> =
        chat.logs().into_iter().filter(|l| l.contains("did not stop in time")).collect();
    assert!(killed.is_empty(), "the worker was killed rather than drained: {killed:?}");
}

// A reload takes the old worker out of the rotation and sends it the drain notice at once,
// so the app closes its sockets while the front-end waits for their tunnels, not after the
// graceful timeout.
#[test]
fn a_chat_socket_gets_a_going_away_close_when_a_reload_replaces_its_worker_and_can_rejoin() {
    let chat = start();
    let mut alice = WebSocket::connect(chat.addr(), "/ws");
    alice.send_text("before the reload");
    all_hear(&mut [&mut alice], "before the reload");
    let mark = chat.log_mark();
    chat.signal(Signal::SIGHUP);
    assert_going_away(&mut alice);
    chat.wait_for_log_from(mark, |l| l.contains(" reload finished "), WAIT).expect("the reload finished");
    let mut again = WebSocket::connect(chat.addr(), "/ws");
    again.send_text("after the reload");
    all_hear(&mut [&mut again], "after the reload");
}
