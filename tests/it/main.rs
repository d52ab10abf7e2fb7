//! Integration tests: each drives the real `rip` binary over real sockets through
//! [`harness::Rip`], which picks port 0, waits for `/healthz`, and kills on drop.

mod harness;

mod example;
mod faults;
mod framing;
mod handoff;
mod operations;
mod serve;
mod static_files;
