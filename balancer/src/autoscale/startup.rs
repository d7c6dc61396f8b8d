//! [`StartupClock`]: how long a worker takes from the scale-out that asked for it to ready.
//!
//! Capacity asked for now arrives one start-up time later (process start, model load,
//! warm-up, health checks), so the policy looks that far ahead. The clock measures it from
//! the pool itself: each scale-out starts a timer per worker asked for, and each rise in
//! the count of ready workers stops the oldest timers. Until a worker has been measured,
//! the configured estimate (`--worker-startup`) stands in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many recent start-ups the estimate remembers.
const REMEMBERED: usize = 8;

/// Measures workers' start-up times; owned by the control loop.
#[derive(Clone, Debug)]
pub struct StartupClock {
    /// The estimate until a start-up is measured.
    initial: Duration,
    /// When each worker asked for and not yet ready was asked for, oldest first.
    waiting: VecDeque<Instant>,
    /// The most recent measured start-ups, oldest first.
    measured: VecDeque<Duration>,
    /// Ready workers at the last observation.
    last_ready: usize,
}

impl StartupClock {
    /// A clock that assumes `initial` until it has measured a start-up.
    pub fn new(initial: Duration) -> Self {
        StartupClock {
            initial,
            waiting: VecDeque::new(),
            measured: VecDeque::new(),
            last_ready: 0,
        }
    }

    /// The pool was asked, at `at`, for `added` more workers.
    pub fn asked(&mut self, added: usize, at: Instant) {
        self.waiting.extend(std::iter::repeat_n(at, added));
    }

    /// The pool now has `ready` workers ready and `coming` on their way.
    pub fn observe(&mut self, ready: usize, coming: usize, at: Instant) {
        let risen = ready.saturating_sub(self.last_ready);
        self.last_ready = ready;
        for _ in 0..risen {
            let Some(asked) = self.waiting.pop_front() else {
                break;
            };
            if self.measured.len() == REMEMBERED {
                self.measured.pop_front();
            }
            self.measured.push_back(at.saturating_duration_since(asked));
        }
        // Workers that never came (failed, timed out, asked for by a command that did
        // nothing) must not be timed when some later worker turns up.
        while self.waiting.len() > coming {
            self.waiting.pop_back();
        }
    }

    /// The start-up time to plan with: the slowest of the recent ones (capacity that
    /// arrives late costs the objective; arriving early costs a few worker-seconds), or
    /// the initial estimate before any was measured.
    pub fn estimate(&self) -> Duration {
        self.measured.iter().copied().max().unwrap_or(self.initial)
    }

    /// Whether [`StartupClock::estimate`] is measured rather than assumed.
    pub fn is_measured(&self) -> bool {
        !self.measured.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn assumes_the_estimate_until_it_measures() {
        let t0 = Instant::now();
        let mut c = StartupClock::new(s(10));
        c.observe(1, 0, t0);
        assert_eq!((c.estimate(), c.is_measured()), (s(10), false));
        c.asked(2, t0);
        c.observe(1, 2, t0 + s(1));
        c.observe(2, 1, t0 + s(4));
        c.observe(3, 0, t0 + s(7));
        assert_eq!((c.estimate(), c.is_measured()), (s(7), true));
    }

    #[test]
    fn remembers_the_slowest_of_the_recent_ones() {
        let t0 = Instant::now();
        let mut c = StartupClock::new(s(10));
        c.observe(1, 0, t0);
        let mut ready = 1;
        for (i, took) in [30u64, 5, 5, 5, 5, 5, 5, 5, 5].into_iter().enumerate() {
            let at = t0 + s(100 * i as u64);
            c.asked(1, at);
            ready += 1;
            c.observe(ready, 0, at + s(took));
        }
        assert_eq!(c.estimate(), s(5), "the 30 s start-up was forgotten");
    }

    #[test]
    fn workers_that_never_came_are_not_timed() {
        let t0 = Instant::now();
        let mut c = StartupClock::new(s(10));
        c.observe(1, 0, t0);
        c.asked(1, t0);
        // The start failed: nothing is coming any more.
        c.observe(1, 0, t0 + s(300));
        // A worker registered by hand much later is not a start-up.
        c.observe(2, 0, t0 + s(900));
        assert!(!c.is_measured());
    }
}
