//! Protocol upgrades (WebSocket and the like): after a 101 from the worker, the client's
//! connection and the worker's are joined byte for byte until either side closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::endpoint::Lease;

/// Joins the two upgraded connections in a task of their own, counted as a tunnel of the
/// worker's rather than a request in flight: a drain of the worker does not wait for it (the
/// worker's app closes it, politely, when told the worker drains).
pub fn tunnel(client: OnUpgrade, upstream: OnUpgrade, lease: Lease) {
    let lease = lease.into_tunnel();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(worker = %lease.endpoint().id, error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        debug!(worker = %lease.endpoint().id, ?result, "upgraded connection closed");
        drop(lease);
    });
}
