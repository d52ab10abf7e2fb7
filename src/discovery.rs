//! The only messages that cross between the supervisor (processes) and the proxy (HTTP):
//! the supervisor announces workers joining and leaving the rotation; the proxy reports
//! workers that need the supervisor's attention. Neither side sees the other's internals.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::heartbeat::Heartbeat;

/// A worker's identity: its slot in the pool and how many workers held that slot before it.
/// Shown as `slot/generation`; pids are reused by the kernel, these never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    pub slot: usize,
    pub generation: u64,
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.slot, self.generation)
    }
}

/// Supervisor to proxy.
#[derive(Debug)]
pub enum Change {
    /// The worker answered its health probe: start sending it requests. Its heartbeat page
    /// tells the proxy whether its event loop is turning.
    Ready { id: WorkerId, socket: PathBuf, heartbeat: Option<Arc<Heartbeat>> },
    /// Stop sending the worker requests. When `drained` is given, it is completed once the
    /// worker has no request in flight (every response body ended), so it may then be stopped.
    Leave { id: WorkerId, drained: Option<oneshot::Sender<()>> },
}

/// Proxy to supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The worker was sent its `--max-requests`: start its replacement.
    Exhausted(WorkerId),
    /// The worker's event loop has been silent for `--timeout`: kill and replace it.
    Hung(WorkerId),
}

pub type ChangeSender = mpsc::UnboundedSender<Change>;
pub type ChangeReceiver = mpsc::UnboundedReceiver<Change>;
pub type ReportSender = mpsc::UnboundedSender<Report>;
pub type ReportReceiver = mpsc::UnboundedReceiver<Report>;
