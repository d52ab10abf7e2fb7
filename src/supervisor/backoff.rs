//! Restart delays for a slot whose workers keep failing to start. Invariant: a worker that
//! fails at start (exits or fails its probe before it is ready) is never restarted in a hot
//! loop, and one that was ready is replaced at once.

use std::time::Duration;

/// Delay before the first restart of a failing slot.
const FIRST: Duration = Duration::from_millis(100);
/// Ceiling of the delay: a broken deploy is retried every 10 s, soon enough to recover by
/// itself once fixed, rare enough to cost nothing.
const CEILING: Duration = Duration::from_secs(10);

/// The delay before restarting after `failures` consecutive failures (0 = none: at once).
pub fn delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (failures - 1).min(16);
    FIRST.saturating_mul(factor).min(CEILING)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_ceiling() {
        let ms: Vec<u128> = (0..10).map(|f| delay(f).as_millis()).collect();
        assert_eq!(ms, [0, 100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(delay(u32::MAX), CEILING);
    }
}
