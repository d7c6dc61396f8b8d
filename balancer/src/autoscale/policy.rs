//! The scaling policy: target tracking, as ECS Service Auto Scaling and Ray Serve do it.
//!
//! A pure function of the recent history of the load signal and the clock: no I/O, no
//! state of its own, so it is tested exhaustively with paused time and property tests.
//!
//! - `desired = ceil(ready × load_per_worker / target)`, clamped to `[min, max]`, where
//!   `load_per_worker` is `(outstanding + queued) / ready` averaged over `window`.
//! - **Out fast**: every sample over the last `scale_out_delay` must want more workers than
//!   there are now (ready *and coming*: a worker still loading its model counts, so a slow
//!   load does not trigger a second scale-out). The pool grows to the *smallest* of those
//!   wishes, the level the need held at throughout.
//! - **In slowly**: every sample over the last `scale_in_delay` must want fewer, no worker
//!   may be overloaded now, and the pool shrinks only to the *largest* of those wishes,
//!   and only as far as keeps the load per worker under `target × (1 - in_margin)` (a
//!   dead band, so a noisy constant load does not flap), judged on the period's peak.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The policy's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// Never fewer workers than this.
    pub min_workers: usize,
    /// Never more workers than this.
    pub max_workers: usize,
    /// The load per worker (outstanding + queued requests) the pool is sized for.
    pub target_load: f64,
    /// How long the need for more workers must hold before scaling out.
    pub scale_out_delay: Duration,
    /// How long the room for fewer workers must hold before scaling in.
    pub scale_in_delay: Duration,
    /// The averaging window of the load signal.
    pub window: Duration,
    /// Scale in only while the load per worker after it stays below
    /// `target × (1 - in_margin)`.
    pub in_margin: f64,
    /// A worker with more outstanding requests than `target × overload_factor` is
    /// overloaded: no scale-in happens while one is.
    pub overload_factor: f64,
}

impl PolicyConfig {
    /// The defaults: the one source of the policy's settings, for [`Default`] and for the
    /// defaults of the `--min-workers` … `--scaling-window` flags.
    pub const DEFAULT: PolicyConfig = PolicyConfig {
        min_workers: 1,
        max_workers: 8,
        target_load: 32.0,
        scale_out_delay: Duration::from_secs(10),
        scale_in_delay: Duration::from_secs(300),
        window: Duration::from_secs(5),
        in_margin: 0.2,
        overload_factor: 2.0,
    };
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig::DEFAULT
    }
}

/// One reading of the pool, taken every second.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken.
    #[serde(skip)]
    pub at: Instant,
    /// Workers healthy and taking requests.
    pub ready: usize,
    /// Workers started but not ready yet (loading, warming up, passing health checks).
    pub coming: usize,
    /// Workers deregistered by a scale-in and still finishing their requests: they count
    /// until they are gone, so a second scale-in waits for the first.
    pub leaving: usize,
    /// Requests outstanding at the workers plus waiting in the balancer's queue.
    pub load: f64,
    /// The most outstanding requests at any one worker.
    pub max_worker_load: f64,
}

/// The recent samples, oldest first, bounded to what the policy can look at.
#[derive(Clone, Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        History::default()
    }

    /// Adds a sample, forgetting what is older than `keep` before it.
    pub fn push(&mut self, sample: Sample, keep: Duration) {
        self.samples.push_back(sample);
        while let Some(first) = self.samples.front() {
            if sample.at.saturating_duration_since(first.at) > keep {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl DoubleEndedIterator<Item = &Sample> + ExactSizeIterator {
        self.samples.iter()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// How much history `config` needs kept: the longer delay and the window before it,
    /// plus a few samples so that a tick arriving a little late still sees a full span.
    pub fn keep_for(config: &PolicyConfig) -> Duration {
        config.scale_in_delay.max(config.scale_out_delay) + config.window + Duration::from_secs(3)
    }
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "to")]
pub enum Action {
    /// Keep the pool as it is.
    Hold,
    /// Grow the pool to this many workers.
    ScaleOut(usize),
    /// Shrink the pool to this many workers.
    ScaleIn(usize),
}

/// A decision with the figures behind it, as `GET /scaling` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// Workers ready plus coming.
    pub current: usize,
    /// Workers ready.
    pub ready: usize,
    /// Workers coming.
    pub coming: usize,
    /// Workers leaving (draining after a scale-in).
    pub leaving: usize,
    /// Outstanding plus queued requests, averaged over the window.
    pub total_load: f64,
    /// `total_load / ready`, averaged over the window (0 with no ready worker).
    pub load_per_worker: f64,
    /// What the formula asks for now, clamped to `[min, max]`.
    pub desired: usize,
    /// What to do.
    pub action: Action,
    /// Why, for a person.
    pub reason: String,
}

/// The policy: `(history, now) → decision`.
pub fn decide(config: &PolicyConfig, history: &History, now: Instant) -> Decision {
    let clamp = |n: usize| {
        n.clamp(
            config.min_workers,
            config.max_workers.max(config.min_workers),
        )
    };
    let Some(latest) = history.latest().copied() else {
        return Decision {
            current: 0,
            ready: 0,
            coming: 0,
            leaving: 0,
            total_load: 0.0,
            load_per_worker: 0.0,
            desired: clamp(0),
            action: Action::Hold,
            reason: "no data yet".to_owned(),
        };
    };
    let current = latest.ready + latest.coming;
    let (total_load, load_per_worker) = averaged(history, now, config.window);
    let desired_now = clamp(wanted(config, latest.ready, load_per_worker));
    let decision = |action: Action, reason: String| Decision {
        current,
        ready: latest.ready,
        coming: latest.coming,
        leaving: latest.leaving,
        total_load,
        load_per_worker,
        desired: desired_now,
        action,
        reason,
    };

    // Below the floor or above the ceiling: correct at once, whatever the load.
    if current < config.min_workers {
        return decision(
            Action::ScaleOut(clamp(current)),
            format!(
                "{current} workers is below --min-workers {}",
                config.min_workers
            ),
        );
    }
    if current > config.max_workers.max(config.min_workers) {
        return decision(
            Action::ScaleIn(clamp(current)),
            format!(
                "{current} workers is above --max-workers {}",
                config.max_workers
            ),
        );
    }
    let span = match history.samples().next() {
        Some(first) => now.saturating_duration_since(first.at),
        None => Duration::ZERO,
    };
    if span < config.window {
        return decision(
            Action::Hold,
            format!(
                "collecting data: {:.0?} of {:.0?} window",
                span, config.window
            ),
        );
    }

    // Over a period: the smallest and largest wish of its samples (each from its own
    // windowed average) and the peak windowed load.
    let wishes = |period: Duration| -> Option<(usize, usize, f64)> {
        if span < period + config.window {
            return None;
        }
        let (mut lo, mut hi, mut peak) = (usize::MAX, 0, 0.0f64);
        for s in history.samples().rev() {
            if now.saturating_duration_since(s.at) > period {
                break;
            }
            let (total, lpw) = averaged(history, s.at, config.window);
            let w = clamp(wanted(config, s.ready, lpw));
            lo = lo.min(w);
            hi = hi.max(w);
            peak = peak.max(total);
        }
        (lo != usize::MAX).then_some((lo, hi, peak))
    };

    if desired_now > current {
        return match wishes(config.scale_out_delay) {
            Some((lo, _, _)) if lo > current => decision(
                Action::ScaleOut(lo),
                format!(
                    "load per worker {load_per_worker:.1} above target {:.1} for {:.0?}: {current} -> {lo}",
                    config.target_load, config.scale_out_delay
                ),
            ),
            _ => decision(
                Action::Hold,
                format!(
                    "load per worker {load_per_worker:.1} above target {:.1}; waiting for it to hold {:.0?}",
                    config.target_load, config.scale_out_delay
                ),
            ),
        };
    }

    if desired_now < current && latest.leaving > 0 {
        return decision(
            Action::Hold,
            format!(
                "{} worker(s) still draining from the last scale-in",
                latest.leaving
            ),
        );
    }
    if desired_now < current && latest.coming == 0 {
        if latest.max_worker_load > config.target_load * config.overload_factor {
            return decision(
                Action::Hold,
                format!(
                    "a worker has {:.0} outstanding (over {:.0}); no scale-in while one is overloaded",
                    latest.max_worker_load,
                    config.target_load * config.overload_factor
                ),
            );
        }
        if let Some((_, hi, peak)) = wishes(config.scale_in_delay) {
            // Shrink no further than keeps the period's peak load under the dead band.
            let ceiling = config.target_load * (1.0 - config.in_margin);
            let mut to = hi.max(config.min_workers);
            while to < current && peak / to as f64 > ceiling {
                to += 1;
            }
            if to < current {
                return decision(
                    Action::ScaleIn(to),
                    format!(
                        "load per worker {load_per_worker:.1} below target {:.1} for {:.0?}: {current} -> {to}",
                        config.target_load, config.scale_in_delay
                    ),
                );
            }
        }
        return decision(
            Action::Hold,
            format!(
                "load per worker {load_per_worker:.1} below target {:.1}; waiting {:.0?} of steady room before scaling in",
                config.target_load, config.scale_in_delay
            ),
        );
    }

    decision(
        Action::Hold,
        format!(
            "load per worker {load_per_worker:.1} for target {:.1}: {current} workers fit",
            config.target_load
        ),
    )
}

/// Workers needed to bring `load_per_worker` over `ready` workers to the target.
fn wanted(config: &PolicyConfig, ready: usize, load_per_worker: f64) -> usize {
    if ready == 0 {
        // Nothing measured per worker: keep at least one coming.
        return 1;
    }
    let raw = (ready as f64 * load_per_worker / config.target_load).ceil();
    if raw.is_finite() && raw >= 0.0 {
        raw as usize
    } else {
        usize::MAX
    }
}

/// (total load, load per ready worker), averaged over the `window` before `at`.
fn averaged(history: &History, at: Instant, window: Duration) -> (f64, f64) {
    let (mut total, mut per, mut n) = (0.0, 0.0, 0usize);
    for s in history.samples().rev() {
        if s.at > at {
            continue;
        }
        if at.saturating_duration_since(s.at) > window {
            break;
        }
        total += s.load;
        per += if s.ready > 0 {
            s.load / s.ready as f64
        } else {
            0.0
        };
        n += 1;
    }
    if n == 0 {
        (0.0, 0.0)
    } else {
        (total / n as f64, per / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> PolicyConfig {
        PolicyConfig {
            min_workers: 1,
            max_workers: 10,
            target_load: 10.0,
            scale_out_delay: Duration::from_secs(10),
            scale_in_delay: Duration::from_secs(60),
            window: Duration::from_secs(5),
            ..PolicyConfig::default()
        }
    }

    /// Feeds one sample a second and returns every decision.
    fn run(
        config: &PolicyConfig,
        seconds: u64,
        mut pool: usize,
        load_at: impl Fn(u64) -> f64,
    ) -> Vec<(u64, usize, Action)> {
        let start = Instant::now();
        let mut history = History::new();
        let mut out = Vec::new();
        for t in 0..seconds {
            let at = start + Duration::from_secs(t);
            let load = load_at(t);
            history.push(
                Sample {
                    at,
                    ready: pool,
                    coming: 0,
                    leaving: 0,
                    load,
                    max_worker_load: load / pool as f64,
                },
                History::keep_for(config),
            );
            let d = decide(config, &history, at);
            match d.action {
                Action::ScaleOut(n) | Action::ScaleIn(n) => pool = n,
                Action::Hold => {}
            }
            out.push((t, pool, d.action));
        }
        out
    }

    #[test]
    fn no_decision_without_enough_data() {
        let c = config();
        let decisions = run(&c, 4, 1, |_| 1000.0);
        assert!(decisions.iter().all(|(_, _, a)| *a == Action::Hold));
    }

    #[test]
    fn scales_out_only_after_the_need_holds() {
        let c = config();
        // 40 outstanding on 1 worker with target 10: 4 workers wanted.
        let decisions = run(&c, 30, 1, |_| 40.0);
        let first = decisions
            .iter()
            .find(|(_, _, a)| *a != Action::Hold)
            .unwrap();
        assert_eq!(first.2, Action::ScaleOut(4));
        assert!(
            first.0 >= 15,
            "scaled out at {}s, before window + delay",
            first.0
        );
        // And only once: the pool now fits.
        assert_eq!(
            decisions
                .iter()
                .filter(|(_, _, a)| *a != Action::Hold)
                .count(),
            1
        );
    }

    #[test]
    fn scales_in_slowly_and_by_what_the_load_allows() {
        let c = config();
        let decisions = run(&c, 200, 8, |_| 20.0);
        let changes: Vec<_> = decisions
            .iter()
            .filter(|(_, _, a)| *a != Action::Hold)
            .collect();
        assert_eq!(changes.len(), 1, "{changes:?}");
        // Not before the window and the whole scale-in delay.
        assert!(changes[0].0 >= 65);
        // 20 outstanding with target 10 and a 20% margin: 3 workers (6.7 each), not 2.
        assert_eq!(changes[0].2, Action::ScaleIn(3));
    }

    #[test]
    fn coming_workers_count() {
        let c = config();
        let start = Instant::now();
        let mut h = History::new();
        for t in 0..30 {
            h.push(
                Sample {
                    at: start + Duration::from_secs(t),
                    ready: 1,
                    coming: 3,
                    leaving: 0,
                    load: 40.0,
                    max_worker_load: 40.0,
                },
                History::keep_for(&c),
            );
        }
        let d = decide(&c, &h, start + Duration::from_secs(29));
        assert_eq!(d.current, 4);
        assert_eq!(d.action, Action::Hold);
    }

    #[test]
    fn floor_and_ceiling_apply_at_once() {
        let c = PolicyConfig {
            min_workers: 2,
            ..config()
        };
        let start = Instant::now();
        let mut h = History::new();
        h.push(
            Sample {
                at: start,
                ready: 0,
                coming: 0,
                leaving: 0,
                load: 0.0,
                max_worker_load: 0.0,
            },
            Duration::from_secs(100),
        );
        assert_eq!(decide(&c, &h, start).action, Action::ScaleOut(2));
        let mut h = History::new();
        h.push(
            Sample {
                at: start,
                ready: 12,
                coming: 0,
                leaving: 0,
                load: 0.0,
                max_worker_load: 0.0,
            },
            Duration::from_secs(100),
        );
        assert_eq!(decide(&c, &h, start).action, Action::ScaleIn(10));
    }

    #[tokio::test(start_paused = true)]
    async fn follows_a_step_with_paused_time() {
        let c = config();
        let mut h = History::new();
        let mut pool = 2usize;
        let mut out_at = None;
        let start = tokio::time::Instant::now();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = tokio::time::Instant::now().into_std();
            let load = if start.elapsed() > Duration::from_secs(10) {
                60.0
            } else {
                10.0
            };
            h.push(
                Sample {
                    at: now,
                    ready: pool,
                    coming: 0,
                    leaving: 0,
                    load,
                    max_worker_load: load / pool as f64,
                },
                History::keep_for(&c),
            );
            if let Action::ScaleOut(n) = decide(&c, &h, now).action {
                pool = n;
                out_at.get_or_insert(start.elapsed());
            }
        }
        assert_eq!(pool, 6);
        let at = out_at.unwrap();
        assert!(
            at >= Duration::from_secs(20) && at <= Duration::from_secs(27),
            "{at:?}"
        );
    }

    proptest! {
        /// Whatever the load, the pool stays within [min, max] and never shrinks while a
        /// worker is overloaded.
        #[test]
        fn bounds_and_no_scale_in_under_overload(
            loads in proptest::collection::vec(0.0f64..500.0, 1..120),
            min in 1usize..4, extra in 0usize..8, start_pool in 1usize..12,
        ) {
            let c = PolicyConfig { min_workers: min, max_workers: min + extra, ..config() };
            let start = Instant::now();
            let mut h = History::new();
            let mut pool = start_pool;
            for (t, load) in loads.iter().enumerate() {
                let at = start + Duration::from_secs(t as u64);
                let sample = Sample { at, ready: pool, coming: 0, leaving: 0, load: *load, max_worker_load: *load / pool as f64 };
                h.push(sample, History::keep_for(&c));
                let d = decide(&c, &h, at);
                match d.action {
                    Action::ScaleOut(n) => { prop_assert!(n > pool && n <= c.max_workers.max(min)); pool = n; }
                    Action::ScaleIn(n) => {
                        prop_assert!(n < pool && n >= min);
                        if pool <= c.max_workers {
                            prop_assert!(sample.max_worker_load <= c.target_load * c.overload_factor);
                        }
                        pool = n;
                    }
                    Action::Hold => {}
                }
                prop_assert!(d.desired >= min && d.desired <= c.max_workers.max(min));
            }
        }

        /// A noisy constant load settles once and then stays: no oscillation.
        #[test]
        fn no_oscillation_on_noisy_constant_load(
            level in 5.0f64..80.0, noise in 0.0f64..0.3, seed in any::<u64>(), start_pool in 1usize..8,
        ) {
            let c = config();
            let mut state = seed | 1;
            let mut rng = move || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state % 10_000) as f64 / 10_000.0 };
            let noisy: Vec<f64> = (0..1200).map(|_| level * (1.0 + noise * (2.0 * rng() - 1.0))).collect();
            let decisions = run(&c, 1200, start_pool, |t| noisy[t as usize]);
            let moves: Vec<_> = decisions.iter().filter(|(_, _, a)| *a != Action::Hold).map(|(t, _, a)| (*t, *a)).collect();
            let reversals = moves.windows(2).filter(|w| matches!(w, [(_, Action::ScaleOut(_)), (_, Action::ScaleIn(_))] | [(_, Action::ScaleIn(_)), (_, Action::ScaleOut(_))])).count();
            prop_assert!(reversals == 0, "moves {:?}", moves);
            // A few steps in one direction while it finds the level, never back and forth.
            prop_assert!(moves.len() <= 4, "moves {:?}", moves);
        }
    }
}
