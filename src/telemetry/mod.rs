//! What rip tells about itself: logs, the access log, metrics and the admin listener.

/// One line per request, written off the request path.
pub mod access_log;
/// The optional admin listener: /metrics, /live, /ready.
pub mod admin;
/// Log setup shared by the parent and the workers.
pub mod logging;
/// Counters and the Prometheus text for the admin listener.
pub mod metrics;
/// stderr through a bounded queue and a thread of its own: never waited on.
pub mod sink;
