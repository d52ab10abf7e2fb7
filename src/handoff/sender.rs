//! `--upstream handoff` on the front-end's side: each accepted client connection goes, whole,
//! to a worker chosen by the balancer. Invariant: a connection no worker took is given back
//! to the caller to be answered 503, never dropped unanswered.

use std::io;
use std::sync::Arc;

use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::discovery::Report;
use crate::handoff;
use crate::proxy::{Endpoint, Proxy, MAX_UNSENT};

impl Proxy {
    /// Passes `client` to a worker; gives it back when none took it before the queue timeout.
    pub async fn hand_off(&self, client: TcpStream) -> Result<(), TcpStream> {
        let settings = self.settings_now();
        let deadline = Instant::now() + settings.queue_timeout;
        let mut avoid = None;
        for _ in 0..MAX_UNSENT {
            let Some(endpoint) = self.pool().pick_until(avoid, deadline).await else { break };
            avoid = Some(endpoint.id);
            // In flight until the worker has it, so that a worker is not told to stop while a
            // connection is on its way to it.
            let lease = endpoint.lease();
            // A worker that stopped taking connections (at its connection cap, or stuck) lets
            // its channel fill up; the client then waits no longer than for a worker at all.
            let sent =
                tokio::time::timeout_at(deadline, self.send(&endpoint, &client, settings.max_requests));
            match sent.await {
                Ok(Ok(())) => {
                    endpoint.count_handed_connection();
                    drop(lease);
                    return Ok(());
                }
                Err(_) => {
                    warn!(worker = %endpoint.id, "worker took no connection before the queue timeout");
                    break;
                }
                Ok(Err(e)) => {
                    endpoint.mark_unreachable();
                    self.metrics().retry();
                    warn!(worker = %endpoint.id, error = %e, "worker refused a connection, offered to another");
                }
            }
        }
        Err(client)
    }

    async fn send(&self, endpoint: &Arc<Endpoint>, client: &TcpStream, max_requests: u64) -> io::Result<()> {
        let channel = endpoint.channel(self.open_channel(endpoint, max_requests)).await?;
        handoff::send(channel, client).await
    }

    async fn open_channel(&self, endpoint: &Arc<Endpoint>, max_requests: u64) -> io::Result<Arc<UnixStream>> {
        let budget = endpoint.budget(max_requests);
        let path =
            endpoint.socket().path().ok_or_else(|| io::Error::other("hand-off needs a Unix socket"))?;
        let channel = Arc::new(handoff::connect(path, budget).await?);
        debug!(worker = %endpoint.id, budget, "hand-off channel opened");
        tokio::spawn(self.clone().listen(endpoint.clone(), channel.clone()));
        Ok(channel)
    }

    /// Acts on what the worker says on its channel until it closes it (when it exits).
    async fn listen(self, endpoint: Arc<Endpoint>, channel: Arc<UnixStream>) {
        let mut buf = [0u8; 16];
        loop {
            if channel.readable().await.is_err() {
                break;
            }
            match channel.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if buf[..n].contains(&handoff::EXHAUSTED) && endpoint.mark_exhausted() {
                        let _ = self.reports().send(Report::Exhausted(endpoint.id));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
        // The worker closed its end: it exited, or is about to. Nothing more goes to it.
        endpoint.mark_unreachable();
    }
}
