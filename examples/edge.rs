//! Tower layers and routes at the edge: the parent tags every request with a request id on
//! its way to a worker, marks every response, and answers a status route without a worker.
//!
//! ```text
//! cargo run --example edge -- serve --port 3000 --workers 2
//! curl -i localhost:3000/headers          # a worker: it saw x-request-id; the reply has x-edge
//! curl -i localhost:3000/edge/status      # the parent itself, named by its pid
//! ```
//!
//! What [`rip::Rip::edge`] adds runs in the `rip serve` process, in front of the proxy to the
//! workers, so it applies once per request whichever worker serves it: a request id is
//! unique across workers because one counter issues them all, which a layer in each worker's
//! own router could not promise. Edge routes are for what needs no app state — status,
//! redirects, a maintenance page — since the parent has no worker's memory to read.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tower_http::set_header::{SetRequestHeaderLayer, SetResponseHeaderLayer};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_EDGE: HeaderName = HeaderName::from_static("x-edge");

fn main() -> ExitCode {
    rip::Rip::new(app).edge(edge).run()
}

/// The parent's part, applied once to the front-end's router (whose fallback forwards to
/// the workers). Layers wrap what was added before them: the status route as well as the
/// fallback, so edge answers get a request id and `x-edge` too.
fn edge(proxy: Router) -> Router {
    let ids = RequestIds::default();
    proxy
        .route("/edge/status", get(status))
        // A client's own id is kept: a request already traced upstream stays one trace.
        .layer(SetRequestHeaderLayer::if_not_present(X_REQUEST_ID.clone(), move |_: &Request| {
            Some(ids.issue())
        }))
        .layer(SetResponseHeaderLayer::overriding(X_EDGE.clone(), HeaderValue::from_static("rip")))
}

/// Request ids, `<parent pid>-<count>`: unique among the requests of one `rip serve`, and
/// across restarts as long as pids are not reused. Production edges often want UUIDs
/// (tower-http's `request-id` feature); a counter needs no extra crate.
#[derive(Clone, Default)]
struct RequestIds(Arc<AtomicU64>);

impl RequestIds {
    fn issue(&self) -> HeaderValue {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        HeaderValue::try_from(format!("{}-{n}", std::process::id())).expect("digits and a dash")
    }
}

/// Answered by the parent: its pid shows that no worker was involved.
async fn status(headers: HeaderMap) -> Json<Value> {
    Json(json!({
        "answered_by": "rip serve",
        "pid": std::process::id(),
        "request_id": headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()),
    }))
}

/// Builds the worker's app; rip calls this once in every worker process.
fn app(ctx: &rip::WorkerContext) -> Router {
    let worker = Worker { name: format!("{}/{}", ctx.id, ctx.generation), pid: std::process::id() };
    Router::new().route("/headers", get(echo_headers)).with_state(Arc::new(worker))
}

/// Who this worker is, for its answers.
struct Worker {
    /// `slot/generation`, as rip's logs name workers.
    name: String,
    pid: u32,
}

/// The request headers as this worker received them, after the edge and the proxy.
async fn echo_headers(State(worker): State<Arc<Worker>>, headers: HeaderMap) -> Json<Value> {
    let mut received = Map::new();
    for (name, value) in &headers {
        received.insert(name.to_string(), String::from_utf8_lossy(value.as_bytes()).into());
    }
    Json(json!({ "worker": worker.name, "pid": worker.pid, "headers": received }))
}
