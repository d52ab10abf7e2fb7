//! The optional admin listener (`--admin ADDR`): Prometheus text at /metrics, liveness at
//! /live (the front-end is up), readiness at /ready (at least one worker is in the rotation),
//! and a status page at / for a browser, which polls /status.json (what `rip status --json`
//! prints). Kept off the public port so that probes and scrapes never compete with, or are
//! exposed to, client traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Controls;
use crate::proxy::Proxy;
use crate::supervisor::SupervisorHandle;
use crate::telemetry::metrics::{Gauges, Metrics, WorkerGauge};

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    proxy: Proxy,
    supervisor: SupervisorHandle,
    controls: Controls,
}

/// The status page: one file, no external assets, so it works offline and behind any proxy.
const STATUS_PAGE: &str = include_str!("status.html");

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    proxy: Proxy,
    supervisor: SupervisorHandle,
    controls: Controls,
    stop: CancellationToken,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()> + Send + 'static)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding admin listener {addr}"))?;
    let local = listener.local_addr().context("reading the admin address")?;
    let app = Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics_text))
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .with_state(Admin { metrics, proxy, supervisor, controls });
    let serving = async move {
        let _ =
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    };
    Ok((local, serving))
}

async fn metrics_text(State(admin): State<Admin>) -> impl IntoResponse {
    let workers = admin.supervisor.status().await;
    let counts = admin.proxy.worker_counts();
    let gauges = Gauges {
        in_flight: counts.iter().map(|c| c.in_flight).sum(),
        tunnels: counts.iter().map(|c| c.tunnels).sum(),
        queued: admin.proxy.pool().waiting(),
        parked: crate::frontend::parked(),
        workers_ready: admin.supervisor.ready_count(),
        log_lines_dropped: super::sink::Sink::stderr().dropped(),
        workers: workers
            .iter()
            .map(|w| WorkerGauge {
                slot: w.id.slot,
                generation: w.id.generation,
                pid: w.pid,
                state: w.state.as_str(),
                rss_bytes: w.rss_bytes,
                age: w.age,
            })
            .collect(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], admin.metrics.render(&gauges))
}

async fn status_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], STATUS_PAGE)
}

async fn status_json(State(admin): State<Admin>) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(admin.controls.status().await))
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    match admin.supervisor.ready_count() {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "no worker ready\n".to_string()),
        n => (StatusCode::OK, format!("{n} workers ready\n")),
    }
}
