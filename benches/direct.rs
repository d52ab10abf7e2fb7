//! The ceiling for `benches/compare.sh`: one worker's app served straight on TCP, with no
//! proxy hop. wrk cannot speak Unix sockets, and a TCP-to-Unix relay would itself be a hop, so
//! this binary runs what `rip worker` runs around the app (`rip::worker::serve_connection`):
//! a current-thread runtime, `/healthz` answered before the router, a served-requests counter,
//! panic isolation, hyper's HTTP/1 server with keep-alive, one task per connection through
//! `rip::frontend::connections::Connections`. The only difference from a worker is the listener: TCP
//! with `TCP_NODELAY` (as the front-end sets it) instead of a Unix socket.
//!
//! `cargo bench` runs every bench target, this one included, with `--bench`: without
//! `--listen` it says what it is for and exits, so it never blocks a plain `cargo bench`.
//!
//! Usage (by compare.sh): `direct --listen 127.0.0.1:PORT`. Stops on SIGTERM or SIGINT.

#[path = "support/worker_like.rs"]
mod worker_like;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use worker_like::WorkerLike;

/// Time open connections get to finish once told to stop; wrk is gone by then anyway.
const GRACE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut listen = None;
    while let Some(arg) = args.next() {
        if arg == "--listen" {
            listen = args.next();
        }
    }
    let Some(listen) = listen else {
        eprintln!("direct: the no-hop ceiling server of benches/compare.sh; run that script");
        return ExitCode::SUCCESS;
    };
    let addr: SocketAddr = match listen.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("direct: parsing --listen {listen}: {e}");
            return ExitCode::from(2);
        }
    };
    rip::telemetry::logging::init(rip::config::LogFormat::Text);
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("starting the runtime");
    match runtime.block_on(serve(addr)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("direct: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let service = WorkerLike::demo();
    let listener = TcpListener::bind(addr).await?;
    eprintln!("direct: listening on {}", listener.local_addr()?);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let stop = CancellationToken::new();
    let connections = worker_like::connections(stop.clone());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    service.serve(TokioIo::new(stream), &connections);
                }
                Err(e) => {
                    eprintln!("direct: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    drop(listener);
    stop.cancel();
    connections.drain(GRACE).await;
    eprintln!("direct: stopped, served={}", service.served());
    Ok(())
}
