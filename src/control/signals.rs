//! Intents for `rip serve`: what signals and control commands ask of it. The only place that
//! installs signal handlers in the parent (workers handle their own SIGTERM); the control
//! socket sends the same intents, so a signal and a command always do the same thing.

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

/// A reply to whoever asked, if anyone is waiting.
pub type Reply<T> = Option<oneshot::Sender<Result<T, String>>>;

#[derive(Debug)]
pub enum Intent {
    /// SIGTERM, SIGINT, SIGQUIT or `rip stop`: stop gracefully. A second one cuts the grace short.
    Shutdown(Stop),
    /// SIGHUP or `rip reload`: re-read the config, then replace every worker, a few at a time.
    Reload(Reply<()>),
    /// SIGUSR2 or `rip upgrade`: hand the listener to a new `rip serve` from the binary on disk.
    /// Replies with the new process's pid.
    Upgrade(Reply<u32>),
    /// `rip scale N`, SIGTTIN (+1) and SIGTTOU (-1).
    Scale(Scale),
    /// SIGUSR1: reopen log files.
    ReopenLogs,
}

/// Why `rip serve` stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Signal(&'static str),
    /// `rip stop`.
    Command,
    /// A new `rip serve` took over the listener (`rip upgrade`).
    Upgraded,
    /// Every sender of intents is gone.
    Closed,
    /// An essential task ended before shutdown (see `crate::tasks`).
    Failed(&'static str),
}

impl Stop {
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Signal(name) => name,
            Stop::Command => "rip stop",
            Stop::Upgraded => "upgraded",
            Stop::Closed => "closed",
            Stop::Failed(task) => task,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(usize),
    Up,
    Down,
}

pub type IntentSender = mpsc::UnboundedSender<Intent>;
pub type IntentReceiver = mpsc::UnboundedReceiver<Intent>;

/// Installs the handlers; their intents arrive on the returned channel, whose sender the
/// control socket shares.
pub fn listen() -> Result<(IntentSender, IntentReceiver)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let table: [(SignalKind, fn() -> Intent); 8] = [
        (SignalKind::terminate(), || Intent::Shutdown(Stop::Signal("SIGTERM"))),
        (SignalKind::interrupt(), || Intent::Shutdown(Stop::Signal("SIGINT"))),
        (SignalKind::quit(), || Intent::Shutdown(Stop::Signal("SIGQUIT"))),
        (SignalKind::hangup(), || Intent::Reload(None)),
        (SignalKind::user_defined2(), || Intent::Upgrade(None)),
        (SignalKind::user_defined1(), || Intent::ReopenLogs),
        (SignalKind::from_raw(nix::libc::SIGTTIN), || Intent::Scale(Scale::Up)),
        (SignalKind::from_raw(nix::libc::SIGTTOU), || Intent::Scale(Scale::Down)),
    ];
    for (kind, intent) in table {
        let mut stream = signal(kind)
            .with_context(|| format!("installing a handler for signal {}", kind.as_raw_value()))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(intent()).is_err() {
                    return;
                }
            }
        });
    }
    Ok((tx, rx))
}
