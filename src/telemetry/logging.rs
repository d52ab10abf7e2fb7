//! Log setup: tracing to stderr, text or JSON, filtered by `RUST_LOG` (default `info`).
//! Workers log through the same setup, so their lines interleave cleanly with the parent's.
//! A user's binary that installed a subscriber of its own keeps it: rip's events go there.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// What became of rip's logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logging {
    /// rip installed its own subscriber.
    Installed,
    /// The binary had installed one already, and it lets rip's events through.
    Foreign,
    /// The binary's own subscriber drops rip's events: nothing rip says would be seen.
    Filtered,
}

/// Installs the global subscriber unless one is installed already.
pub fn init(format: LogFormat) -> Logging {
    if tracing::dispatcher::has_been_set() {
        return if tracing::enabled!(target: "rip", tracing::Level::INFO) {
            Logging::Foreign
        } else {
            Logging::Filtered
        };
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(super::sink::StderrWriter)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Logging::Installed
}

/// Says, once and on stderr itself, that rip's logs are being thrown away, and how to keep
/// them: a silent server is worse than a noisy line at start.
pub fn warn_if_filtered(logging: Logging) {
    if logging == Logging::Filtered {
        eprintln!(
            "rip: the tracing subscriber this program installed filters out rip's own events (target \"rip\"), \
             so rip's log — the address it serves on, workers starting and exiting, failed requests — is lost; \
             add \"rip=info\" to its filter (e.g. RUST_LOG or EnvFilter::new(\"rip=info,...\")), \
             or install no subscriber and let rip set one up"
        );
    }
}
