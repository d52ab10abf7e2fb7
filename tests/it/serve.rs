//! rip serve end to end: spread, replacement, recycling, shutdown, streaming, bad config.
