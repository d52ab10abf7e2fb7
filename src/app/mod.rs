//! The apps the stock `rip` binary serves: the demo routes, or static files with `--root`.
//! Tests and benchmarks rely on the demo routes exactly as they are.

mod static_files;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub use static_files::{static_files, static_files_with};
pub(crate) use static_files::{Answer, Content, Files};

use crate::WorkerContext;

/// The stock binary's app: static files from `--root` if given, else the demo.
pub fn stock(ctx: &WorkerContext) -> Router {
    match &ctx.root {
        Some(root) => static_files_with(root, ctx.cache_control.as_deref()),
        None => demo(ctx),
    }
}

/// The demo routes. `/healthz` is answered by rip itself in every worker.
pub fn demo(ctx: &WorkerContext) -> Router {
    Router::new()
        .route("/", get(hello))
        .route("/whoami", get(whoami))
        .route("/headers", get(headers))
        .route("/echo", post(echo))
        .route("/sleep/{ms}", get(sleep))
        .route("/block/{ms}", get(block))
        .with_state(ctx.clone())
}

async fn hello(State(ctx): State<WorkerContext>) -> String {
    format!("Hello from rip worker {} (pid {})", ctx.id, std::process::id())
}

/// The worker, and the client as the front-end saw it (axum's `ConnectInfo`).
async fn whoami(
    State(ctx): State<WorkerContext>,
    ConnectInfo(client): ConnectInfo<std::net::SocketAddr>,
) -> Json<Value> {
    Json(json!({
        "worker": ctx.id,
        "pid": std::process::id(),
        "served": ctx.served(),
        "client": client.to_string(),
    }))
}

/// The request headers as this worker received them; repeated names joined with ", ".
async fn headers(headers: HeaderMap) -> Json<BTreeMap<String, String>> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    Json(map)
}

/// Streams the request body back as it arrives.
async fn echo(req: Request) -> Body {
    Body::from_stream(req.into_body().into_data_stream())
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms")
}

/// Blocks the worker's thread, as a stuck handler would.
async fn block(Path(ms): Path<u64>) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    format!("blocked {ms} ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(router: Router, req: Request<Body>) -> (StatusCode, String) {
        let resp = router.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn app() -> Router {
        demo(&WorkerContext::new(3, 0, None))
    }

    #[tokio::test]
    async fn hello_names_the_worker_and_pid() {
        let (status, body) = call(app(), Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("Hello from rip worker 3 (pid {})", std::process::id()));
    }

    #[tokio::test]
    async fn whoami_is_json() {
        let mut req = Request::get("/whoami").body(Body::empty()).unwrap();
        let client: std::net::SocketAddr = "10.0.0.7:4321".parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(client));
        let (_, body) = call(app(), req).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["client"], "10.0.0.7:4321");
        assert_eq!(v["worker"], 3);
        assert_eq!(v["pid"], std::process::id());
        assert_eq!(v["served"], 0);
    }

    #[tokio::test]
    async fn headers_are_reported_and_repeats_joined() {
        let req = Request::get("/headers").header("x-a", "1").header("x-a", "2").body(Body::empty()).unwrap();
        let (_, body) = call(app(), req).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["x-a"], "1, 2");
    }

    #[tokio::test]
    async fn echo_returns_the_body() {
        let req = Request::post("/echo").body(Body::from("ping")).unwrap();
        assert_eq!(call(app(), req).await, (StatusCode::OK, "ping".into()));
    }

    #[tokio::test]
    async fn sleep_rejects_a_bad_duration() {
        let (status, _) = call(app(), Request::get("/sleep/soon").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, body) = call(app(), Request::get("/sleep/1").body(Body::empty()).unwrap()).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "slept 1 ms"));
    }
}
