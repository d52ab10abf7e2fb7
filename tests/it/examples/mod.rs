//! The library's examples (examples/*.rs), each run as the real binary a user would build on
//! `rip::Rip`, through [`crate::harness::example`]: port 0, a private runtime dir, every
//! worker ready before the first request, killed on drop.

mod chat;
mod edge;
mod json_api;
mod own_tracing;
mod todos;
