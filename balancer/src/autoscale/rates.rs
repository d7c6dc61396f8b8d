//! [`Rates`]: requests arriving and answered per second, from the targets' counters.
//!
//! The busy share says how much of its capacity each worker uses, and stops at 1: a pool
//! that is 5× short reads the same as one just short. What says "5×" is the arrival rate
//! against what the pool answers: when requests arrive faster than they are answered the
//! queue grows, and `arrived / capacity` is how many workers the load needs (see
//! [`super::policy`]). Both rates come from counters the balancer already keeps: each
//! target's `routed` count and outstanding requests, and the balancer's queue, read once a
//! second by the control loop:
//!
//! ```text
//! answered = Σ Δrouted − Σ Δoutstanding      (what left the targets)
//! arrived  = Σ Δrouted + Δqueued             (what entered the balancer)
//! ```
//!
//! A target seen for the first time counts from zero (its counters started at its
//! registration), and one whose `routed` went back (re-registered) likewise; a target that
//! disappeared between two readings takes its last second with it, a small under-count
//! that never invents load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use crate::target::TargetInfo;

/// The counters of one target at the last reading.
#[derive(Clone, Copy, Debug)]
struct Seen {
    routed: u64,
    outstanding: usize,
}

/// Turns successive readings of the targets' counters into rates; owned by the control loop.
#[derive(Debug, Default)]
pub struct Rates {
    /// Each target's counters at the last reading.
    seen: HashMap<SocketAddr, Seen>,
    /// The balancer's queue length and the time of the last reading.
    last: Option<(usize, Instant)>,
}

/// Requests per second over the interval since the previous reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    /// Requests that entered the balancer, per second.
    pub arrived: f64,
    /// Requests the targets answered, per second.
    pub answered: f64,
}

impl Rates {
    /// A tracker that has seen nothing yet.
    pub fn new() -> Self {
        Rates::default()
    }

    /// Reads `targets` and the queue length at `at`; the rates since the previous reading
    /// (zero at the first, or when no time has passed).
    pub fn observe(&mut self, targets: &[TargetInfo], queued: usize, at: Instant) -> Rate {
        let (mut routed, mut left) = (0u64, 0i64);
        let mut seen = HashMap::with_capacity(targets.len());
        for t in targets {
            let before = self
                .seen
                .get(&t.addr)
                .copied()
                .filter(|b| b.routed <= t.routed);
            let (r0, o0) = before.map_or((0, 0), |b| (b.routed, b.outstanding));
            let delta = t.routed - r0;
            routed += delta;
            // Answered = routed − growth of outstanding; never below zero per target.
            let grew = t.outstanding as i64 - o0 as i64;
            left += (delta as i64 - grew).max(0);
            seen.insert(
                t.addr,
                Seen {
                    routed: t.routed,
                    outstanding: t.outstanding,
                },
            );
        }
        self.seen = seen;
        let rate = match self.last {
            Some((q0, t0)) if at > t0 => {
                let dt = at.duration_since(t0).as_secs_f64();
                let arrived = routed as f64 + queued as f64 - q0 as f64;
                Rate {
                    arrived: arrived.max(0.0) / dt,
                    answered: left as f64 / dt,
                }
            }
            _ => Rate::default(),
        };
        self.last = Some((queued, at));
        rate
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::target::TargetState;

    fn target(port: u16, routed: u64, outstanding: usize) -> TargetInfo {
        TargetInfo {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            state: TargetState::Healthy,
            outstanding,
            weight: 1,
            routed,
            since: SystemTime::UNIX_EPOCH,
            busy: None,
            queue_us: None,
            batches: None,
            ejected: None,
        }
    }

    #[test]
    fn rates_from_counters() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut r = Rates::new();
        assert_eq!(
            r.observe(&[target(1, 100, 4)], 0, t0),
            Rate::default(),
            "nothing to compare the first reading with"
        );
        // 200 routed in 2 s, 6 more outstanding, 10 more queued: 105 arrived/s, 97 answered/s.
        let rate = r.observe(&[target(1, 300, 10)], 10, s(2));
        assert_eq!(
            rate,
            Rate {
                arrived: 105.0,
                answered: 97.0
            }
        );
        // A new target counts from zero; the queue drains into the targets.
        let rate = r.observe(&[target(1, 350, 10), target(2, 40, 0)], 0, s(3));
        assert_eq!(
            rate,
            Rate {
                arrived: 80.0,
                answered: 90.0
            }
        );
        // A re-registered target (its counter went back) counts from zero; one that left
        // takes its last second with it.
        let rate = r.observe(&[target(2, 5, 0)], 0, s(4));
        assert_eq!(
            rate,
            Rate {
                arrived: 5.0,
                answered: 5.0
            }
        );
        assert_eq!(r.observe(&[], 0, s(4)), Rate::default(), "no time passed");
    }
}
