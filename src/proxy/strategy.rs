//! Which worker gets the next request. Pure: it sees counters, not connections, so every
//! strategy is tested as a table. Every pick scans all workers in the rotation (a handful),
//! starting from a rotating index so that ties spread evenly. Invariant: a worker that is
//! leaving, unreachable or stalled is never chosen, and an exhausted worker (past
//! `--max-requests`, replacement not ready yet) is chosen only when no fresh worker is usable,
//! so recycling never drops capacity to zero; one sent twice its budget counts as unusable
//! (`endpoint::OVERSHOOT`).

pub use crate::config::Strategy;

/// What the balancer knows of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub in_flight: usize,
    /// Past its request budget; kept only as a fallback.
    pub exhausted: bool,
    /// Leaving the rotation, refused a connection, stalled, or full.
    pub unusable: bool,
}

/// Picks an index below `n`, where `candidate(i)` describes worker `i`, scanning from `start`
/// (a rotating counter) so that ties and round-robin spread evenly. `avoid` is a worker that
/// just failed this request.
pub fn choose(
    strategy: Strategy,
    n: usize,
    candidate: impl Fn(usize) -> Candidate,
    start: usize,
    avoid: Option<usize>,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    // Rank: lower is better. Fresh before exhausted before the worker that just failed.
    let rank = |i: usize| -> Option<(u8, usize)> {
        let c = candidate(i);
        if c.unusable {
            return None;
        }
        let tier = u8::from(c.exhausted) + 2 * u8::from(avoid == Some(i));
        let load = match strategy {
            Strategy::RoundRobin => 0,
            Strategy::LeastPending => c.in_flight,
        };
        Some((tier, load))
    };
    let mut best: Option<(usize, (u8, usize))> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if let Some(r) = rank(i) {
            if best.is_none_or(|(_, b)| r < b) {
                best = Some((i, r));
                if r == (0, 0) {
                    break;
                }
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(strategy: Strategy, cs: &[Candidate], start: usize, avoid: Option<usize>) -> Option<usize> {
        super::choose(strategy, cs.len(), |i| cs[i], start, avoid)
    }

    fn c(in_flight: usize) -> Candidate {
        Candidate { in_flight, exhausted: false, unusable: false }
    }

    #[test]
    fn round_robin_rotates_with_start() {
        let cs = [c(5), c(0), c(9)];
        let picks: Vec<_> = (0..6).map(|s| choose(Strategy::RoundRobin, &cs, s, None).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_pending_avoids_the_busy_worker() {
        let cs = [c(7), c(1), c(3)];
        for start in 0..3 {
            assert_eq!(choose(Strategy::LeastPending, &cs, start, None), Some(1));
        }
    }

    #[test]
    fn least_pending_ties_rotate() {
        let cs = [c(0), c(0), c(0)];
        let picks: Vec<_> = (0..3).map(|s| choose(Strategy::LeastPending, &cs, s, None).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2]);
    }

    #[test]
    fn unusable_workers_are_never_chosen() {
        let dead = Candidate { unusable: true, ..c(0) };
        assert_eq!(choose(Strategy::RoundRobin, &[dead, dead], 0, None), None);
        assert_eq!(choose(Strategy::LeastPending, &[dead, c(50)], 0, None), Some(1));
        assert_eq!(choose(Strategy::RoundRobin, &[], 0, None), None);
    }

    #[test]
    fn exhausted_workers_are_a_fallback_only() {
        let tired = Candidate { exhausted: true, ..c(0) };
        for strategy in [Strategy::RoundRobin, Strategy::LeastPending] {
            assert_eq!(choose(strategy, &[tired, c(10)], 0, None), Some(1));
            assert_eq!(choose(strategy, &[tired, tired], 1, None), Some(1));
        }
    }

    #[test]
    fn the_worker_that_failed_is_tried_last() {
        for strategy in [Strategy::RoundRobin, Strategy::LeastPending] {
            assert_eq!(choose(strategy, &[c(0), c(3)], 0, Some(0)), Some(1));
            assert_eq!(choose(strategy, &[c(0)], 0, Some(0)), Some(0));
        }
    }

    #[test]
    fn strategy_names_parse() {
        assert_eq!("round-robin".parse::<Strategy>().unwrap(), Strategy::RoundRobin);
        assert_eq!("least-pending".parse::<Strategy>().unwrap(), Strategy::LeastPending);
        assert!("random".parse::<Strategy>().is_err());
    }
}
