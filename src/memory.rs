//! Giving memory back after a burst. A burst of large uploads grows the front-end's heap
//! (connection buffers, body chunks in flight) and glibc's allocator keeps what was freed for
//! reuse: measured, 20 concurrent 5 MiB echoes left rip serve at 41 MiB, from 6.4 MiB idle,
//! for good. The memory is not leaked, but an operator reads RSS, and a front-end that only
//! ever grows looks like one that leaks.
//!
//! So once traffic pauses after any has passed, the idle connections to workers are closed
//! (their buffers are most of what a burst leaves) and the allocator is asked to return its
//! free memory (`malloc_trim`), off the event loop; clients' connections parking (their HTTP
//! buffers freed) count as traffic, so the trim comes once they have. Under steady load nothing is trimmed: what is
//! kept then is what the load uses, and trimming would only hand it back to take it again.
//! glibc's mmap threshold is left to glibc: mapping every block of 4 KiB and more
//! (`glibc.malloc.mmap_threshold=4096`) cost 43% more CPU per 64 KiB echo and did not lower
//! what an idle TLS connection pins, which is small allocations, not buffers.

use std::time::Duration;

use crate::proxy::Proxy;

/// How long traffic must pause before a trim.
const QUIET: Duration = Duration::from_secs(1);
/// Trims the heap each time traffic pauses after a burst; runs for as long as rip does.
pub async fn trim_when_quiet(proxy: Proxy) {
    let mut every = tokio::time::interval(QUIET);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answered = (proxy.metrics().lifetime().0, crate::frontend::parked());
    let mut busy = false;
    loop {
        every.tick().await;
        // Connections parking free their buffers too: a trim is due once that settles.
        let now = (proxy.metrics().lifetime().0, crate::frontend::parked());
        let moved = now != answered || proxy.pool().snapshot().iter().any(|e| e.in_flight() > 0);
        answered = now;
        if moved {
            busy = true;
        } else if std::mem::take(&mut busy) {
            // Idle connections to workers keep the buffers their last request grew (hundreds
            // of KiB after a large body); after a pause, a new connection costs a connect.
            for endpoint in proxy.pool().snapshot().iter() {
                endpoint.forget_idle();
            }
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe; it only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
