//! A worker for the benches, in-process: the demo app wrapped and served exactly as `rip
//! worker` does it, through rip's own `WorkerService` and `serve_connection`.

use hyper::rt::{Read, Write};
use rip::frontend::connections::Connections;
use rip::worker::WorkerService;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct WorkerLike {
    service: WorkerService,
    ctx: rip::WorkerContext,
}

impl WorkerLike {
    /// The demo app of worker slot 0, as the stock binary serves it.
    pub fn demo() -> WorkerLike {
        let ctx = rip::WorkerContext::new(0, 0, None);
        WorkerLike { service: WorkerService::new(rip::app::demo(&ctx), &ctx), ctx }
    }

    /// Requests served so far, health probes excluded.
    #[allow(dead_code)] // used by one of the two bench targets that include this file
    pub fn served(&self) -> u64 {
        self.ctx.served()
    }

    /// Serves one accepted connection the way a worker does.
    pub fn serve<I>(&self, io: I, connections: &Connections)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        rip::worker::serve_connection(&self.service, io, connections);
    }
}

/// The connection set a worker keeps.
pub fn connections(stop: CancellationToken) -> Connections {
    rip::worker::connections(stop)
}
