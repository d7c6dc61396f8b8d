//! Retries on target loss and the budget that bounds them.
//!
//! A request written to a target whose connection is then lost may or may not have run;
//! inference is idempotent, so it is sent once more to another target when its deadline
//! leaves time, rather than answered `unavailable`. The pending entry still owns the
//! answer: the lost connection gave it up before the retry, so the old target's answer
//! cannot arrive and exactly one answer stays the rule.
//!
//! A request still unanswered when its target turns unhealthy (a frozen worker: the
//! connection stays open, nothing comes back) is retried the same way: the health check
//! takes it off the target's connections, tells the target to cancel it and routes it
//! again; a late answer from the old target then finds nothing and is dropped.
//!
//! Retries are bounded by a budget, as Envoy's and Linkerd's are: over a sliding window of
//! [`WINDOW`], a share of the requests seen (`--retry-budget-ratio`) plus a floor per second
//! (`--retry-budget-floor`). A pool that fails as a whole is then not sent twice its load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The window over which the budget counts requests and retries.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// The window is kept in this many buckets, so that it slides a second at a time.
const BUCKETS: usize = 10;

/// How retries are made: `--retries`, `--retry-budget-ratio`, `--retry-budget-floor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RetrySettings {
    /// Whether a request lost with its connection is sent again at all.
    pub(crate) enabled: bool,
    /// Retries allowed as a share of the requests seen in the window.
    pub(crate) ratio: f64,
    /// Retries allowed per second on top of the share, so that a quiet pool can retry too.
    pub(crate) floor_per_second: u32,
}

impl RetrySettings {
    /// No retries: what the tests of other modules run with.
    pub(crate) const OFF: RetrySettings = RetrySettings {
        enabled: false,
        ratio: 0.0,
        floor_per_second: 0,
    };
}

/// The budget's counts: requests and retries per one-second bucket of the window.
///
/// Each bucket is one atomic: the second it counts (plus one, so that 0 is a bucket never
/// used) in the high 32 bits and its count in the low 32. Counting a request is then one
/// compare-and-swap, with no lock: the router counts every request, and a lock per
/// request was a measurable part of the balancer's hot path. Moving a bucket on to a new
/// second and counting in it is the same swap, so the two cannot race.
#[derive(Debug)]
struct Window {
    /// Where the window starts: bucket `k` counts the `k`-th second after it, modulo
    /// [`BUCKETS`].
    origin: Instant,
    requests: [AtomicU64; BUCKETS],
    retries: [AtomicU64; BUCKETS],
}

impl Window {
    fn new(origin: Instant) -> Window {
        Window {
            origin,
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    /// The tag of the second holding `at`: seconds since `origin`, plus one. (The window
    /// would need 136 years to run out of tags; it saturates rather than wrap.)
    fn tag(&self, at: Instant) -> u64 {
        let second = at.saturating_duration_since(self.origin).as_secs();
        second.saturating_add(1).min(u64::from(u32::MAX))
    }

    /// Adds one to the bucket of `at` in `buckets`, emptied first when it held an older
    /// second. A count saturates at `u32::MAX` a second, far beyond any request rate.
    fn count(&self, buckets: &[AtomicU64; BUCKETS], at: Instant) {
        let tag = self.tag(at);
        let bucket = &buckets[(tag % BUCKETS as u64) as usize];
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let next = if current >> 32 == tag {
                if current & u64::from(u32::MAX) == u64::from(u32::MAX) {
                    return;
                }
                current + 1
            } else {
                (tag << 32) | 1
            };
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// What `buckets` counted in the window ending at `now`.
    fn total(&self, buckets: &[AtomicU64; BUCKETS], now: Instant) -> u64 {
        let tag = self.tag(now);
        let oldest = tag.saturating_sub(BUCKETS as u64 - 1).max(1);
        buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|v| (oldest..=tag).contains(&(v >> 32)))
            .map(|v| v & u64::from(u32::MAX))
            .sum()
    }
}

/// The retry policy and its budget; cheap to clone. The router counts each new request
/// ([`Retries::note_request`]); upstream connections ask before retrying
/// ([`Retries::try_spend`]).
#[derive(Clone, Debug)]
pub(crate) struct Retries {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: RetrySettings,
    window: Window,
    /// Held by a retry from checking the budget to spending it, so that two retries at
    /// once cannot both take its last one. A std mutex, never held across an await;
    /// counting requests never takes it.
    spending: Mutex<()>,
    /// Requests sent again after their connection was lost.
    retried: AtomicU64,
    /// Requests answered `unavailable` because the budget had run out.
    exhausted: AtomicU64,
    /// Of `retried`, those taken off a target that turned unhealthy.
    unhealthy: AtomicU64,
}

impl Retries {
    /// A policy with `settings`, its window starting now.
    pub(crate) fn new(settings: RetrySettings) -> Retries {
        Retries {
            shared: Arc::new(Shared {
                settings,
                window: Window::new(Instant::now()),
                spending: Mutex::new(()),
                retried: AtomicU64::new(0),
                exhausted: AtomicU64::new(0),
                unhealthy: AtomicU64::new(0),
            }),
        }
    }

    /// True when lost requests are retried at all (`--retries on`).
    pub(crate) fn enabled(&self) -> bool {
        self.shared.settings.enabled
    }

    /// Counts one new request, read at `received`, towards the budget's share. (The
    /// time the request was read, rather than a clock read of its own: this runs for every
    /// request.)
    pub(crate) fn note_request(&self, received: Instant) {
        if !self.enabled() {
            return;
        }
        let window = &self.shared.window;
        window.count(&window.requests, received);
    }

    /// Takes one retry from the budget; false (and counted) when it has run out.
    pub(crate) fn try_spend(&self) -> bool {
        let settings = self.shared.settings;
        let now = Instant::now();
        let allowed = {
            let _spending = self
                .shared
                .spending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let window = &self.shared.window;
            let requests = window.total(&window.requests, now);
            let retries = window.total(&window.retries, now);
            let floor = u64::from(settings.floor_per_second) * WINDOW.as_secs();
            // Truncation is the budget's rounding: a share below one retry allows none.
            let share = (requests as f64 * settings.ratio) as u64;
            let allowed = retries < floor + share;
            if allowed {
                window.count(&window.retries, now);
            }
            allowed
        };
        let counter = if allowed {
            &self.shared.retried
        } else {
            &self.shared.exhausted
        };
        counter.fetch_add(1, Ordering::Relaxed);
        allowed
    }

    /// Requests retried, ever.
    pub(crate) fn retried(&self) -> u64 {
        self.shared.retried.load(Ordering::Relaxed)
    }

    /// Retries refused because the budget had run out, ever.
    pub(crate) fn exhausted(&self) -> u64 {
        self.shared.exhausted.load(Ordering::Relaxed)
    }

    /// Counts a retry (already spent) of a request taken off a target that turned
    /// unhealthy.
    pub(crate) fn note_unhealthy(&self) {
        self.shared.unhealthy.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests retried because their target turned unhealthy, ever.
    pub(crate) fn unhealthy(&self) -> u64 {
        self.shared.unhealthy.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, floor_per_second: u32) -> Retries {
        Retries::new(RetrySettings {
            enabled: true,
            ratio,
            floor_per_second,
        })
    }

    fn spend_all(r: &Retries) -> u64 {
        let mut n = 0;
        while r.try_spend() {
            n += 1;
            assert!(n < 100_000, "the budget never ran out");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_retries_without_traffic() {
        let r = budget(0.2, 10);
        assert_eq!(spend_all(&r), 100, "10 per second over a 10 s window");
        assert_eq!(r.retried(), 100);
        assert_eq!(r.exhausted(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_share_grows_with_the_requests_seen() {
        let r = budget(0.2, 0);
        for _ in 0..1000 {
            r.note_request(Instant::now());
        }
        assert_eq!(spend_all(&r), 200);
        assert!(!r.try_spend());
        assert_eq!(r.exhausted(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_and_old_counts_expire() {
        let r = budget(0.5, 0);
        for _ in 0..10 {
            r.note_request(Instant::now());
        }
        assert_eq!(spend_all(&r), 5);
        // Nine seconds later the requests and retries are still in the window.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!r.try_spend());
        // A second more and they have left it: no requests, no share.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!r.try_spend(), "no requests in the window, no floor");
        for _ in 0..4 {
            r.note_request(Instant::now());
        }
        assert_eq!(spend_all(&r), 2, "half of the 4 new requests");
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_policy_counts_nothing() {
        let r = Retries::new(RetrySettings::OFF);
        assert!(!r.enabled());
        r.note_request(Instant::now());
        assert!(!r.try_spend());
    }
}
