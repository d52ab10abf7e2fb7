//! Signals to `rip serve`, turned into intents. The only place that installs handlers in the
//! parent; workers handle their own SIGTERM.

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// SIGTERM, SIGINT or SIGQUIT: stop gracefully. A second one cuts the grace short.
    Shutdown(&'static str),
    /// SIGHUP: replace every worker, one at a time, without dropping a request.
    Reload,
}

/// Installs the handlers and returns the intents they produce, in arrival order.
pub fn listen() -> Result<mpsc::UnboundedReceiver<Intent>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let table = [
        (SignalKind::terminate(), Intent::Shutdown("SIGTERM")),
        (SignalKind::interrupt(), Intent::Shutdown("SIGINT")),
        (SignalKind::quit(), Intent::Shutdown("SIGQUIT")),
        (SignalKind::hangup(), Intent::Reload),
    ];
    for (kind, intent) in table {
        let mut stream = signal(kind).with_context(|| format!("installing a handler for {intent:?}"))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(intent).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}
