//! The library example (examples/json_api.rs) served through rip workers.
