//! Failure-aware routing: outlier detection, as Envoy does it.
//!
//! Least outstanding sends the most traffic to a target that fails fast: a worker whose
//! model broke answers `internal` at once and always looks idle (Linkerd documents this
//! trap). So every answer a target gives is also fed to its [`Detector`]:
//! - `internal` or `unavailable` `--eject-consecutive` times in a row, or an error share
//!   far above the pool's over the last [`WINDOW`] (at least [`MIN_VOLUME`] answers), and
//!   the target is *ejected*: routing passes over it for `--eject-base` times the number of
//!   its ejections, up to `--eject-max`.
//! - When the ejection ends it is back *on probation*: one failure before it has answered
//!   `--eject-consecutive` requests well ejects it again at once, for longer. Each
//!   `--eject-base` it stays in without an ejection takes one off the count.
//! - `overloaded` with a `retry_after_ms` is not a failure: the target is set aside for
//!   that long (at most [`MAX_COOL_OFF`]) without counting as an ejection.
//! - A connection lost with requests on it counts one failure per request, as Envoy counts
//!   a reset as a gateway failure (`upstream`'s reader): a worker that dies with work in
//!   hand, or keeps doing so in a crash loop, is ejected rather than handed more to lose
//!   (its requests are retried elsewhere as retries allow). One lost with nothing on it
//!   (an idle timeout, a drained worker) counts nothing.
//! - Never more than `--max-ejection-percent` of the pool is ejected at once, and never
//!   the last target; and routing still picks a set-aside target when every eligible
//!   target is set aside, so outlier detection alone never turns a request away.
//!
//! [`Detector`] is the pure logic (time is a parameter); [`OutlierCell`] is what each
//! target holds (the detector, and a lock-free view of it for routing); [`Outliers`] is
//! the pool's side: the settings, the pool's error share, the cap, the counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// The window over which error shares are compared.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// Answers a target must give in the window before its error share counts.
pub(crate) const MIN_VOLUME: u64 = 20;
/// A target's error share must be at least this...
const RATE_FLOOR: f64 = 0.5;
/// ...and this far above the pool's, to eject it.
const RATE_MARGIN: f64 = 0.3;
/// The longest an `overloaded` answer sets a target aside.
pub(crate) const MAX_COOL_OFF: Duration = Duration::from_secs(1);

/// Why a target was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EjectionReason {
    /// `--eject-consecutive` `internal`/`unavailable` answers in a row (or one while on
    /// probation).
    ConsecutiveErrors,
    /// An error share far above the pool's.
    ErrorRate,
}

impl EjectionReason {
    /// The snake-case name used by the admin API and the metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            EjectionReason::ConsecutiveErrors => "consecutive_errors",
            EjectionReason::ErrorRate => "error_rate",
        }
    }

    const ALL: [EjectionReason; 2] = [EjectionReason::ConsecutiveErrors, EjectionReason::ErrorRate];
}

/// How outliers are detected: `--eject-consecutive`, `--eject-base`, `--eject-max`,
/// `--max-ejection-percent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OutlierSettings {
    /// Failures in a row that eject a target; 0 turns ejection off.
    pub(crate) consecutive: u32,
    /// A first ejection's length; the n-th lasts n times this.
    pub(crate) base: Duration,
    /// The longest ejection.
    pub(crate) max: Duration,
    /// The most targets ejected at once, in percent of the pool.
    pub(crate) max_percent: u8,
}

impl OutlierSettings {
    /// No ejections: what the tests of other modules run with.
    pub(crate) const OFF: OutlierSettings = OutlierSettings {
        consecutive: 0,
        base: Duration::from_secs(30),
        max: Duration::from_secs(300),
        max_percent: 0,
    };
}

/// What one answer from a target says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A `result`.
    Success,
    /// `internal` or `unavailable`: the target could not do what a healthy one does.
    Failure,
    /// `overloaded`, with the target's hint of when to come back.
    Overloaded(Option<Duration>),
    /// Anything that says nothing about the target (`bad_request`, `cancelled`,
    /// `deadline_exceeded`).
    Neutral,
}

/// Answers and failures in the current window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) answers: u64,
    pub(crate) failures: u64,
}

impl Tally {
    fn share(self) -> f64 {
        if self.answers == 0 {
            0.0
        } else {
            self.failures as f64 / self.answers as f64
        }
    }
}

/// One target's outlier state: the pure logic, time given by the caller.
#[derive(Debug)]
pub(crate) struct Detector {
    /// Failures since the last success.
    consecutive: u32,
    /// Ejections counted towards the next one's length (decays while it stays in).
    ejections: u32,
    /// The current ejection, if any: until when, and why.
    ejected: Option<(Instant, EjectionReason)>,
    /// When it last came back (or was created): the ejection count decays from here.
    back_since: Instant,
    /// Successes still owed since it came back; a failure meanwhile ejects it again.
    probation: u32,
    /// This window's answers, and when the window began.
    tally: Tally,
    window_start: Instant,
}

impl Detector {
    /// A detector for a target registered at `now`.
    pub(crate) fn new(now: Instant) -> Detector {
        Detector {
            consecutive: 0,
            ejections: 0,
            ejected: None,
            back_since: now,
            probation: 0,
            tally: Tally::default(),
            window_start: now,
        }
    }

    /// The current ejection, if it has not ended by `now`.
    #[cfg(test)]
    pub(crate) fn ejected(&self, now: Instant) -> Option<(Instant, EjectionReason)> {
        self.ejected.filter(|(until, _)| *until > now)
    }

    /// Records one answer given at `now`; returns why the target should be ejected, if it
    /// should (the caller decides whether the pool can spare it, then calls
    /// [`eject`](Detector::eject)). `pool` is the pool's tally over the window.
    pub(crate) fn record(
        &mut self,
        outcome: Outcome,
        now: Instant,
        settings: &OutlierSettings,
        pool: Tally,
    ) -> Option<EjectionReason> {
        if !self.admit(now, settings) {
            return None;
        }
        match outcome {
            Outcome::Success => {
                self.succeeded(1);
                None
            }
            Outcome::Failure => {
                self.consecutive += 1;
                self.tally.answers += 1;
                self.tally.failures += 1;
                if self.probation > 0 || self.consecutive >= settings.consecutive {
                    return Some(EjectionReason::ConsecutiveErrors);
                }
                let share = self.tally.share();
                (self.tally.answers >= MIN_VOLUME
                    && share >= RATE_FLOOR
                    && share >= pool.share() + RATE_MARGIN)
                    .then_some(EjectionReason::ErrorRate)
            }
            Outcome::Overloaded(_) | Outcome::Neutral => None,
        }
    }

    /// Records `n` successes given by `now`, as `n` calls of [`record`](Detector::record)
    /// would: a success never ejects.
    pub(crate) fn record_successes(&mut self, n: u32, now: Instant, settings: &OutlierSettings) {
        if self.admit(now, settings) {
            self.succeeded(n);
        }
    }

    /// Brings the detector to `now` (an ejection that has ended puts it on probation; an
    /// old window is emptied); false when the answer is not to be judged: detection is
    /// off, or the target is still ejected (answers to requests sent before it was).
    fn admit(&mut self, now: Instant, settings: &OutlierSettings) -> bool {
        if settings.consecutive == 0 {
            return false;
        }
        if let Some((until, _)) = self.ejected {
            if until > now {
                return false;
            }
            self.ejected = None;
            self.back_since = until;
            self.probation = settings.consecutive;
        }
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.tally = Tally::default();
            self.window_start = now;
        }
        true
    }

    fn succeeded(&mut self, n: u32) {
        self.consecutive = 0;
        self.probation = self.probation.saturating_sub(n);
        self.tally.answers += u64::from(n);
    }

    /// Ejects the target at `now` for `reason`; returns until when.
    pub(crate) fn eject(
        &mut self,
        now: Instant,
        reason: EjectionReason,
        settings: &OutlierSettings,
    ) -> Instant {
        // One ejection forgiven per base interval spent in without one.
        let base = settings.base.max(Duration::from_millis(1));
        let quiet = now.saturating_duration_since(self.back_since);
        let forgiven = u32::try_from(quiet.as_nanos() / base.as_nanos()).unwrap_or(u32::MAX);
        self.ejections = self.ejections.saturating_sub(forgiven) + 1;
        let length = base.saturating_mul(self.ejections).min(settings.max);
        let until = now + length;
        self.ejected = Some((until, reason));
        self.consecutive = 0;
        self.probation = 0;
        self.tally = Tally::default();
        self.window_start = now;
        until
    }
}

/// What a target holds: its detector, and what routing reads without a lock.
#[derive(Debug)]
pub(crate) struct OutlierCell {
    /// A std mutex: held to update a few numbers per answer, never across an await.
    detector: Mutex<Detector>,
    /// The reference for the times below, so that they fit an atomic.
    origin: Instant,
    /// Milliseconds after `origin` until which routing passes over the target (ejected or
    /// cooling off after `overloaded`).
    aside_until_ms: AtomicU64,
    /// Milliseconds after `origin` until which it is ejected, and why (0: never).
    ejected_until_ms: AtomicU64,
    reason: AtomicU8,
}

impl Default for OutlierCell {
    fn default() -> Self {
        let now = Instant::now();
        OutlierCell {
            detector: Mutex::new(Detector::new(now)),
            origin: now,
            aside_until_ms: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            reason: AtomicU8::new(0),
        }
    }
}

impl OutlierCell {
    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// True when routing should pass over the target at `now`.
    pub(crate) fn set_aside(&self, now: Instant) -> bool {
        // Routing asks for every target on every request: a target never set aside (0)
        // needs no clock arithmetic.
        let until = self.aside_until_ms.load(Ordering::Relaxed);
        until != 0 && until > self.ms(now)
    }

    /// Why the target is ejected now, if it is.
    pub(crate) fn ejection(&self) -> Option<EjectionReason> {
        if self.ejected_until_ms.load(Ordering::Relaxed) <= self.ms(Instant::now()) {
            return None;
        }
        EjectionReason::ALL
            .get(usize::from(self.reason.load(Ordering::Relaxed)))
            .copied()
    }

    fn set_aside_until(&self, until: Instant) {
        self.aside_until_ms
            .fetch_max(self.ms(until), Ordering::Relaxed);
    }

    fn detector(&self) -> std::sync::MutexGuard<'_, Detector> {
        self.detector.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pool's side of outlier detection; cheap to clone. Upstream connections report each
/// answer ([`Outliers::observe`]); the router tells it the pool's size.
#[derive(Clone, Debug)]
pub(crate) struct Outliers {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: OutlierSettings,
    /// Targets the router routes over: what `--max-ejection-percent` is a share of.
    pool: AtomicUsize,
    /// The pool's answers and failures: this window and the last, so that the pool's
    /// share never starts from nothing.
    window: Mutex<PoolWindow>,
    /// The targets ejected now and until when; pruned when one more is considered.
    ejected: Mutex<Vec<(SocketAddr, Instant)>>,
    /// Ejections, ever, by reason (in [`EjectionReason::ALL`]'s order).
    ejections: [AtomicU64; 2],
    /// Ejections refused because `--max-ejection-percent` of the pool was out already.
    capped: AtomicU64,
}

#[derive(Debug)]
struct PoolWindow {
    start: Instant,
    current: Tally,
    previous: Tally,
}

impl Outliers {
    /// Outlier detection with `settings`.
    pub(crate) fn new(settings: OutlierSettings) -> Outliers {
        Outliers {
            shared: Arc::new(Shared {
                settings,
                pool: AtomicUsize::new(0),
                window: Mutex::new(PoolWindow {
                    start: Instant::now(),
                    current: Tally::default(),
                    previous: Tally::default(),
                }),
                ejected: Mutex::new(Vec::new()),
                ejections: Default::default(),
                capped: AtomicU64::new(0),
            }),
        }
    }

    /// Records the number of targets routing chooses among.
    pub(crate) fn set_pool_size(&self, n: usize) {
        if self.shared.pool.load(Ordering::Relaxed) != n {
            self.shared.pool.store(n, Ordering::Relaxed);
        }
    }

    /// Feeds one answer from the target at `addr` (whose cell is `cell`) to detection;
    /// ejects it when it should be and the pool can spare it.
    pub(crate) fn observe(&self, addr: SocketAddr, cell: &OutlierCell, outcome: Outcome) {
        let settings = &self.shared.settings;
        let now = Instant::now();
        if let Outcome::Overloaded(Some(hint)) = outcome {
            cell.set_aside_until(now + hint.min(MAX_COOL_OFF));
        }
        if settings.consecutive == 0 || outcome == Outcome::Neutral {
            return;
        }
        let pool = self.tally(outcome, now);
        let mut detector = cell.detector();
        let Some(reason) = detector.record(outcome, now, settings, pool) else {
            return;
        };
        if !self.make_room(addr, now) {
            self.shared.capped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let until = detector.eject(now, reason, settings);
        drop(detector);
        self.shared.ejected_list().push((addr, until));
        cell.reason.store(reason as u8, Ordering::Relaxed);
        cell.ejected_until_ms
            .store(cell.ms(until), Ordering::Relaxed);
        cell.set_aside_until(until);
        self.shared.ejections[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target = %addr,
            reason = reason.as_str(),
            for_ = %humantime::format_duration(until - now),
            "target ejected: routing passes over it until the ejection ends"
        );
    }

    /// Feeds `n` successes from the target whose cell is `cell`, answered by `now`: what
    /// `n` calls of [`observe`](Outliers::observe) would do, with one lock of each kind
    /// rather than `n` of each and the caller's clock. Upstream readers gather the
    /// successes of one read burst (see [`Successes`]).
    pub(crate) fn observe_successes(&self, cell: &OutlierCell, n: u32, now: Instant) {
        if self.shared.settings.consecutive == 0 || n == 0 {
            return;
        }
        self.add(u64::from(n), 0, now);
        cell.detector()
            .record_successes(n, now, &self.shared.settings);
    }

    /// Adds an answer to the pool's tally; returns the tally over this window and the last.
    fn tally(&self, outcome: Outcome, now: Instant) -> Tally {
        self.add(1, u64::from(outcome == Outcome::Failure), now)
    }

    /// Adds `answers` of which `failures` failed to the pool's tally; returns the tally
    /// over this window and the last.
    fn add(&self, answers: u64, failures: u64, now: Instant) -> Tally {
        let mut w = self.shared.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(w.start) >= WINDOW {
            w.previous = w.current;
            w.current = Tally::default();
            w.start = now;
        }
        w.current.answers += answers;
        w.current.failures += failures;
        Tally {
            answers: w.current.answers + w.previous.answers,
            failures: w.current.failures + w.previous.failures,
        }
    }

    /// True when one more target may be ejected: fewer than `--max-ejection-percent` of the
    /// pool is out, and at least one target stays in.
    fn make_room(&self, addr: SocketAddr, now: Instant) -> bool {
        let pool = self.shared.pool.load(Ordering::Relaxed);
        let cap = (pool * usize::from(self.shared.settings.max_percent) / 100)
            .min(pool.saturating_sub(1));
        let mut ejected = self.shared.ejected_list();
        ejected.retain(|(a, until)| *until > now && *a != addr);
        ejected.len() < cap
    }

    /// Ejections, ever, by reason.
    pub(crate) fn ejections(&self) -> impl Iterator<Item = (EjectionReason, u64)> + '_ {
        EjectionReason::ALL
            .into_iter()
            .map(|r| (r, self.shared.ejections[r as usize].load(Ordering::Relaxed)))
    }

    /// Ejections refused by `--max-ejection-percent`, ever.
    pub(crate) fn capped(&self) -> u64 {
        self.shared.capped.load(Ordering::Relaxed)
    }
}

/// The successes an upstream reader has seen in its current read burst (the answers it
/// found waiting without waiting for the socket), fed to detection as one
/// ([`Outliers::observe_successes`]): one lock of each kind and one clock read per burst
/// rather than per answer. The reader flushes them before it waits for the socket again,
/// and before any other outcome, so that detection sees every answer in its order (a
/// failure after successes still counts as the first in a row).
#[derive(Debug, Default)]
pub(crate) struct Successes {
    n: u32,
}

impl Successes {
    /// One more success in this burst.
    pub(crate) fn add(&mut self) {
        self.n = self.n.saturating_add(1);
    }

    /// Feeds the successes gathered so far, answered by `now`, to `outliers`.
    pub(crate) fn flush(&mut self, outliers: &Outliers, cell: &OutlierCell, now: Instant) {
        let n = std::mem::take(&mut self.n);
        if n > 0 {
            outliers.observe_successes(cell, n, now);
        }
    }
}

impl Shared {
    fn ejected_list(&self) -> std::sync::MutexGuard<'_, Vec<(SocketAddr, Instant)>> {
        self.ejected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: OutlierSettings = OutlierSettings {
        consecutive: 5,
        base: Duration::from_secs(30),
        max: Duration::from_secs(300),
        max_percent: 50,
    };

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A pool of `n` targets with detection on; the cells of the targets.
    fn pool(n: usize) -> (Outliers, Vec<OutlierCell>) {
        let outliers = Outliers::new(SETTINGS);
        outliers.set_pool_size(n);
        (outliers, (0..n).map(|_| OutlierCell::default()).collect())
    }

    fn fail(outliers: &Outliers, cells: &[OutlierCell], i: usize, times: usize) {
        for _ in 0..times {
            outliers.observe(addr(i as u16 + 1), &cells[i], Outcome::Failure);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let (outliers, cells) = pool(4);
        fail(&outliers, &cells, 0, 4);
        outliers.observe(addr(1), &cells[0], Outcome::Success);
        fail(&outliers, &cells, 0, 4);
        assert!(!cells[0].set_aside(Instant::now()), "never five in a row");
        fail(&outliers, &cells, 0, 1);
        assert!(cells[0].set_aside(Instant::now()));
        assert_eq!(cells[0].ejection(), Some(EjectionReason::ConsecutiveErrors));
        assert_eq!(
            outliers.ejections().next(),
            Some((EjectionReason::ConsecutiveErrors, 1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_grow_with_their_number_and_are_capped() {
        let mut d = Detector::new(Instant::now());
        let mut lengths = Vec::new();
        for _ in 0..12 {
            let now = Instant::now();
            let until = d.eject(now, EjectionReason::ConsecutiveErrors, &SETTINGS);
            lengths.push((until - now).as_secs());
            tokio::time::advance(until - now).await;
            // Back on probation: the first failure ejects it again.
            let again = d.record(
                Outcome::Failure,
                Instant::now(),
                &SETTINGS,
                Tally::default(),
            );
            assert_eq!(again, Some(EjectionReason::ConsecutiveErrors));
        }
        assert_eq!(&lengths[..4], &[30, 60, 90, 120]);
        assert_eq!(lengths[11], 300, "capped at --eject-max");
    }

    #[tokio::test(start_paused = true)]
    async fn probation_ends_after_enough_successes_and_time_forgives() {
        let mut d = Detector::new(Instant::now());
        let until = d.eject(Instant::now(), EjectionReason::ConsecutiveErrors, &SETTINGS);
        assert!(d.ejected(Instant::now()).is_some());
        tokio::time::advance(until - Instant::now()).await;
        assert!(
            d.ejected(Instant::now()).is_none(),
            "back when the ejection ends"
        );
        for _ in 0..5 {
            assert_eq!(
                d.record(
                    Outcome::Success,
                    Instant::now(),
                    &SETTINGS,
                    Tally::default()
                ),
                None
            );
        }
        // Off probation: one failure is only one.
        assert_eq!(
            d.record(
                Outcome::Failure,
                Instant::now(),
                &SETTINGS,
                Tally::default()
            ),
            None
        );
        // Long in without an ejection, the next one is short again.
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        assert_eq!(
            d.eject(now, EjectionReason::ConsecutiveErrors, &SETTINGS) - now,
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_successes_counts_as_that_many_answers() {
        // Two targets fed the same answers, one success at a time and in bursts.
        let (outliers, cells) = pool(4);
        let mut burst = Successes::default();
        for _ in 0..3 {
            outliers.observe(addr(1), &cells[0], Outcome::Success);
            burst.add();
        }
        burst.flush(&outliers, &cells[1], Instant::now());
        burst.flush(&outliers, &cells[1], Instant::now());
        // The pool counted six answers, the share of each target three.
        assert_eq!(outliers.add(0, 0, Instant::now()).answers, 6);
        for cell in &cells[..2] {
            assert_eq!(cell.detector().tally.answers, 3);
        }
        // A burst resets the failures in a row as a single success does.
        fail(&outliers, &cells, 0, 4);
        fail(&outliers, &cells, 1, 4);
        outliers.observe(addr(1), &cells[0], Outcome::Success);
        burst.add();
        burst.flush(&outliers, &cells[1], Instant::now());
        fail(&outliers, &cells, 0, 4);
        fail(&outliers, &cells, 1, 4);
        assert!(!cells[0].set_aside(Instant::now()));
        assert!(!cells[1].set_aside(Instant::now()), "never five in a row");

        // Back from an ejection, a burst pays off that many successes of probation.
        let mut d = Detector::new(Instant::now());
        let until = d.eject(Instant::now(), EjectionReason::ConsecutiveErrors, &SETTINGS);
        tokio::time::advance(until - Instant::now()).await;
        d.record_successes(4, Instant::now(), &SETTINGS);
        let pool = Tally::default();
        assert_eq!(
            d.record(Outcome::Failure, Instant::now(), &SETTINGS, pool),
            Some(EjectionReason::ConsecutiveErrors),
            "one success short of the five that end probation"
        );
        let mut d = Detector::new(Instant::now());
        let until = d.eject(Instant::now(), EjectionReason::ConsecutiveErrors, &SETTINGS);
        // Answers to requests sent before the ejection ended are not judged.
        d.record_successes(9, Instant::now(), &SETTINGS);
        tokio::time::advance(until - Instant::now()).await;
        d.record_successes(5, Instant::now(), &SETTINGS);
        assert_eq!(
            d.record(Outcome::Failure, Instant::now(), &SETTINGS, pool),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_share_far_above_the_pools_ejects() {
        let mut d = Detector::new(Instant::now());
        let healthy_pool = Tally {
            answers: 1000,
            failures: 10,
        };
        let mut verdict = None;
        // Alternating results never make five in a row, but half of them fail.
        for i in 0..40 {
            let outcome = if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            verdict = verdict.or(d.record(outcome, Instant::now(), &SETTINGS, healthy_pool));
        }
        assert_eq!(verdict, Some(EjectionReason::ErrorRate));

        // The same share in a pool that fails as much is no outlier.
        let mut d = Detector::new(Instant::now());
        let failing_pool = Tally {
            answers: 1000,
            failures: 500,
        };
        for i in 0..40 {
            let outcome = if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            assert_eq!(
                d.record(outcome, Instant::now(), &SETTINGS, failing_pool),
                None
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_max_share_of_the_pool_is_ejected() {
        let (outliers, cells) = pool(4);
        for i in 0..4 {
            fail(&outliers, &cells, i, 5);
        }
        let now = Instant::now();
        let out = cells.iter().filter(|c| c.set_aside(now)).count();
        assert_eq!(out, 2, "50% of four");
        assert!(outliers.capped() >= 2);

        // Two targets: one may go, never both; one target: never.
        let (outliers, cells) = pool(2);
        fail(&outliers, &cells, 0, 5);
        fail(&outliers, &cells, 1, 5);
        assert!(cells[0].set_aside(now) && !cells[1].set_aside(now));
        let (outliers, cells) = pool(1);
        fail(&outliers, &cells, 0, 50);
        assert!(!cells[0].set_aside(now));

        // Once an ejection ends, another target may take its place.
        let (outliers, cells) = pool(2);
        fail(&outliers, &cells, 0, 5);
        tokio::time::advance(SETTINGS.base).await;
        fail(&outliers, &cells, 1, 5);
        assert!(cells[1].set_aside(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn overloaded_sets_aside_briefly_without_ejecting() {
        let (outliers, cells) = pool(2);
        outliers.observe(
            addr(1),
            &cells[0],
            Outcome::Overloaded(Some(Duration::from_millis(200))),
        );
        assert!(cells[0].set_aside(Instant::now()));
        assert_eq!(cells[0].ejection(), None);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!cells[0].set_aside(Instant::now()));
        // A long hint is cut to the cool-off's limit.
        outliers.observe(
            addr(1),
            &cells[0],
            Outcome::Overloaded(Some(Duration::from_secs(60))),
        );
        tokio::time::advance(MAX_COOL_OFF).await;
        assert!(!cells[0].set_aside(Instant::now()));
        assert_eq!(outliers.ejections().map(|(_, n)| n).sum::<u64>(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn detection_off_never_ejects() {
        let outliers = Outliers::new(OutlierSettings::OFF);
        outliers.set_pool_size(10);
        let cell = OutlierCell::default();
        for _ in 0..100 {
            outliers.observe(addr(1), &cell, Outcome::Failure);
        }
        assert!(!cell.set_aside(Instant::now()));
    }
}
