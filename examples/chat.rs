//! A WebSocket chat room that says goodbye properly: when its worker is told to stop, every
//! socket gets a Close frame with 1001 ("going away") instead of a dropped connection.
//!
//! ```text
//! cargo run --example chat -- serve --port 3000 --workers 1 --graceful-timeout 5s
//! websocat ws://localhost:3000/ws    # in two terminals; what one says, both see
//! ```
//!
//! **The room is per worker.** Each rip worker is a process with its own broadcast channel,
//! so with `--workers 2` two clients may land in different rooms and never hear each other.
//! Serve a chat with `--workers 1`, or, to scale out, carry the messages over a shared bus
//! (Redis pub/sub, NATS, Postgres LISTEN/NOTIFY) that every worker subscribes to.
//!
//! A WebSocket outlives any request, so rip cannot finish it for the app the way it finishes
//! requests when a worker stops (a shutdown, a reload, a recycle). The app ends it:
//! [`rip::WorkerContext::draining`] completes when the worker starts to drain (it left the
//! rotation, or is stopping), and each socket then sends its Close frame, so a browser knows
//! to reconnect (to the replacement worker, after a reload) rather than report an error.
//! Each socket task holds a [`rip::WorkerContext::track`] guard, so the worker does not exit
//! before the Close is out.

use std::process::ExitCode;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::sync::broadcast;

/// Messages a slow socket may fall behind the room before it misses some: a client that
/// cannot keep up skips ahead instead of holding everyone else back.
const BACKLOG: usize = 256;
/// How long a socket waits for the client's Close after sending its own, as the closing
/// handshake asks; a client that never answers is not waited for until the graceful timeout.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    rip::main_with(app)
}

/// Builds the worker's app; rip calls this once in every worker process.
fn app(ctx: &rip::WorkerContext) -> Router {
    let room = Room { said: broadcast::channel(BACKLOG).0, ctx: ctx.clone() };
    Router::new().route("/ws", get(join)).with_state(room)
}

/// This worker's room: everything said in it, and the worker's context to learn when to stop.
#[derive(Clone)]
struct Room {
    said: broadcast::Sender<Utf8Bytes>,
    ctx: rip::WorkerContext,
}

async fn join(State(room): State<Room>, upgrade: WebSocketUpgrade) -> Response {
    // Subscribed before the 101 goes out: once a client is connected, it hears everything
    // said after, with no gap while its socket task starts.
    let hears = room.said.subscribe();
    // Taken before the upgrade, so that a worker told to stop right now still waits for it.
    let tracked = room.ctx.track();
    upgrade.on_upgrade(move |socket| async move {
        chat(socket, room, hears).await;
        drop(tracked);
    })
}

/// One client in the room, until it leaves or the worker drains.
async fn chat(mut socket: WebSocket, room: Room, mut hears: broadcast::Receiver<Utf8Bytes>) {
    let draining = room.ctx.draining();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            () = &mut draining => return say_goodbye(socket).await,
            received = socket.recv() => match received {
                Some(Ok(Message::Text(text))) => {
                    // Nobody listening is no error: the sender itself left meanwhile.
                    let _ = room.said.send(text);
                }
                // Pings are answered by axum; binary messages are not part of this chat.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            },
            heard = hears.recv() => match heard {
                Ok(text) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// The closing handshake, server first: Close with 1001, then the client's Close (or not,
/// within [`CLOSE_REPLY_WAIT`]), then the connection ends.
async fn say_goodbye(mut socket: WebSocket) {
    let goodbye = CloseFrame { code: close_code::AWAY, reason: "server restarting, reconnect".into() };
    if socket.send(Message::Close(Some(goodbye))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                return;
            }
        }
    })
    .await;
}
