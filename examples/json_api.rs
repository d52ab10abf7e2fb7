//! A small JSON API served by rip, written the way a user of the library writes one: an axum
//! `Router` factory handed to [`rip::main_with`], which brings rip's `serve` command, worker
//! pool, supervision and graceful shutdown.
//!
//! ```text
//! cargo run --example json_api -- serve --port 3000 --workers 2
//! curl -i localhost:3000/api/items -H 'content-type: application/json' -d '{"text":"milk"}'
//! curl -i localhost:3000/api/items
//! ```
//!
//! The notes live in memory, and every rip worker is a process of its own, so **each worker
//! has its own notes**: a note created through one worker is not seen by the others, and
//! is gone when that worker is recycled. This demonstrates the library API, not shared
//! state; a real app keeps its data in a database or another service that every worker
//! reaches. Every response names the worker that served it in `x-rip-worker`
//! (`slot/generation`) and `x-rip-worker-pid`, which makes the per-process state visible.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

fn main() -> ExitCode {
    rip::main_with(app)
}

/// Builds the app; rip calls this once in every worker process.
fn app(ctx: &rip::WorkerContext) -> Router {
    let served_by = served_by(ctx);
    Router::new()
        .route("/", get(about))
        .route("/api/items", get(list).post(create))
        .route("/api/items/{id}", get(fetch))
        .route("/api/panic", get(panic_on_purpose))
        .route("/api/echo", get(echo_upgrade))
        .with_state(Notes::default())
        .layer(axum::middleware::map_response(move |mut response: Response| {
            let served_by = served_by.clone();
            async move {
                response.headers_mut().extend(served_by);
                response
            }
        }))
}

/// The headers that name this worker, added to every response.
fn served_by(ctx: &rip::WorkerContext) -> [(HeaderName, HeaderValue); 2] {
    let worker = format!("{}/{}", ctx.id, ctx.generation);
    [
        (HeaderName::from_static("x-rip-worker"), HeaderValue::try_from(worker).expect("digits and a slash")),
        (HeaderName::from_static("x-rip-worker-pid"), HeaderValue::from(std::process::id())),
    ]
}

/// This worker's notes. Cloning shares them between the requests this process serves.
#[derive(Clone, Default)]
struct Notes(Arc<Mutex<Store>>);

#[derive(Default)]
struct Store {
    last_id: u64,
    items: BTreeMap<u64, Note>,
}

#[derive(Clone, Serialize)]
struct Note {
    id: u64,
    text: String,
    done: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNote {
    text: String,
    #[serde(default)]
    done: bool,
}

impl Notes {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A handler that panicked while holding the lock cannot leave a note half-written
        // (every change is one insert), so the data is still good to use.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn about() -> &'static str {
    "A notes API served by rip workers; each worker keeps its own notes in memory.\n\
     GET /api/items             list this worker's notes\n\
     POST /api/items            {\"text\": \"...\", \"done\": false} -> 201 and the note\n\
     GET /api/items/{id}        one note, or 404\n\
     GET /api/panic             a handler that panics: 500, and the worker serves on\n"
}

async fn list(State(notes): State<Notes>) -> Json<Vec<Note>> {
    Json(notes.store().items.values().cloned().collect())
}

async fn create(State(notes): State<Notes>, Json(new): Json<NewNote>) -> Response {
    if new.text.trim().is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "text must not be empty");
    }
    let note = {
        let mut store = notes.store();
        store.last_id += 1;
        let note = Note { id: store.last_id, text: new.text, done: new.done };
        store.items.insert(note.id, note.clone());
        note
    };
    let location = format!("/api/items/{}", note.id);
    (StatusCode::CREATED, [(header::LOCATION, location)], Json(note)).into_response()
}

async fn fetch(State(notes): State<Notes>, Path(id): Path<u64>) -> Response {
    match notes.store().items.get(&id) {
        Some(note) => Json(note.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("no item {id} in this worker")),
    }
}

/// A handler bug on purpose, to demonstrate panic isolation: rip catches the panic in the
/// worker and answers 500; the process, and the notes it holds, serve on.
async fn panic_on_purpose() -> Response {
    panic!("a bug in a handler, on purpose")
}

/// A protocol upgrade, as WebSocket does it: `Connection: upgrade` plus `Upgrade: echo`
/// switches the connection to a protocol that echoes every byte. It shows that upgrades pass
/// through rip's front-end and worker end to end.
async fn echo_upgrade(mut req: axum::extract::Request) -> Response {
    if req.headers().get(header::UPGRADE).map(HeaderValue::as_bytes) != Some(b"echo".as_slice()) {
        return error(StatusCode::BAD_REQUEST, "send Connection: upgrade and Upgrade: echo");
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let (mut read, mut write) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    });
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("echo"));
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
