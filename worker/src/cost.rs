//! [`BatchCost`]: what a batch of `n` items costs against a full batch, measured at warm-up.
//!
//! The busy share alone is no load signal for a batching worker whose batches cost about the
//! same at any size (a model that streams its weights once per batch): at a tenth of its
//! capacity the model thread already runs small batches back to back, and reads nearly 1.
//! What grows in step with the load is the time the model thread *needed*: each batch's run
//! time, weighted by how much of a full batch's work it did, [`BatchCost::weight`]:
//!
//! ```text
//! weight(n) = (n / max_batch) / cost(n)      cost(n) = run time of n items / run time of a full batch
//! ```
//!
//! Summed over a second, `Σ run_time × weight` is `items/s × full-batch time / max_batch`:
//! the arrival rate against the worker's full-batch capacity, linear up to saturation, where
//! batches are full (weight 1) and it equals the busy share. The shape (how a single item's
//! batch compares with a full one) is a property of the model; the absolute times are the
//! machine's, which is why they are read on a [`BatchClock`]: with one intra-op thread the
//! model thread's CPU time, which a neighbour taking the core does not lengthen (see
//! [`crate::clock`]). The shape is measured once after warm-up,
//! batches of one and full batches interleaved (so that contention hits both alike), the
//! median of a few pairs' ratios; `cost(n)` is the straight line between those two points.
//!
//! ## Relearned from traffic: [`CostModel`]
//! The warm-up pairs run back to back; live traffic at a low rate runs small batches
//! between idle gaps, with cold caches and a machine busy with other things, and those
//! ran 1.3–2.5× slower than the warm-up's batch of one on a loaded machine, so a fixed
//! shape read the load share that much too high at night. [`CostModel`] keeps the recent
//! run times of each batch size the worker actually ran (seeded with the warm-up's
//! timings), takes each size's median (one slow batch moves nothing) and fits the line
//! `run time = a + b × items` through them, weighted by how many each size has. The shape
//! is that line's batch of one over its full batch. A size that stops running keeps its
//! last times: at night the full batches are the warm-up's (or the last peak's), and the
//! small ones are tonight's, which is what a load share at night must compare. It errs
//! the other way only when the whole machine slowed down since the full batches were
//! timed (then the night reads a little low, until full batches run again).
//!
//! Timed by the wall clock, the kept full batches were the problem: at the peak of the
//! autoscaling benchmark three workers shared two cores, every full batch ran about twice
//! as long as alone, and after the peak the pool's load shares read 2.0–2.4× the load's
//! need, anchored on those slow batches. Timed by the model thread's CPU time, a full batch
//! costs the same crowded or alone, so the anchor that stays is the model's, not the
//! crowd's. Fading stale sizes out of the fit instead was rejected: at night only sizes
//! 1–8 run, and a line through them extrapolated to a full batch is only as good as the
//! cost is straight; a model that streams its weights runs small batches at nearly the same
//! time (memory-bound) and full ones compute-bound, so the extrapolation would read the full
//! batch short and the load share low, the unsafe side.
//!
//! The model is a pure value, fed with `(items, run time)` and read as a [`BatchCost`] or
//! a run-time profile ([`CostModel::predict`]), so that other parts of the worker (e.g.
//! admission by deadline) can ask what a batch of `n` will take.
//!
//! Until measured the cost is [`BatchCost::linear`] (every item costs the same, weight 1), so
//! the signal is then the plain busy share: what a worker without batching has anyway.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::clock::BatchClock;

/// How many interleaved pairs (one item, full batch) [`measure`] times at most.
pub const PROFILE_PAIRS: usize = 3;

/// Past this much profiling time [`measure`] stops after the pair it is on: a large model's
/// full batch can take seconds, and every second here delays the worker's readiness.
pub const PROFILE_BUDGET: Duration = Duration::from_secs(2);

/// The relative cost of a batch by its size: a straight line from a batch of one item
/// (`single` of a full batch's time) to a full batch (1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchCost {
    /// The largest batch the batcher forms (at least 1).
    max_batch: usize,
    /// A batch of one item's run time over a full batch's, within `[1 / max_batch, 1]`.
    single: f64,
    /// A full batch's run time as measured (the median of the timed pairs), when known:
    /// the absolute scale that lets a [`CostModel`] weigh live small batches against it.
    full: Option<Duration>,
    /// The clock the timings were read on; a [`CostModel`] and the busy meter time live
    /// batches by the same one, so that the warm-up's full batch and tonight's small ones
    /// are in one unit.
    clock: BatchClock,
}

impl BatchCost {
    /// Every item costs the same (a batch of one costs `1 / max_batch` of a full one): the
    /// weight is 1 and the signal is the plain busy share.
    pub fn linear(max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        BatchCost {
            max_batch,
            single: 1.0 / max_batch as f64,
            full: None,
            clock: BatchClock::Wall,
        }
    }

    /// A batch of one costs `single` of a full batch, clamped to `[1 / max_batch, 1]`: below,
    /// a full batch would cost more than its items alone; above, less than one item.
    pub fn new(max_batch: usize, single: f64) -> Self {
        let linear = BatchCost::linear(max_batch);
        let single = if single.is_finite() {
            single.clamp(linear.single, 1.0)
        } else {
            linear.single
        };
        BatchCost { single, ..linear }
    }

    /// The shape from timed pairs `(batch of one, full batch)`: the median of their ratios,
    /// robust to one pair that a busy machine slowed on one side. No pairs: [`linear`].
    ///
    /// [`linear`]: BatchCost::linear
    pub fn from_pairs(max_batch: usize, pairs: &[(Duration, Duration)]) -> Self {
        let timed: Vec<_> = pairs.iter().filter(|(_, full)| !full.is_zero()).collect();
        let ratios: Vec<f64> = timed
            .iter()
            .map(|(one, full)| one.as_secs_f64() / full.as_secs_f64())
            .collect();
        let Some(ratio) = median(ratios) else {
            return BatchCost::linear(max_batch);
        };
        let full = median(timed.iter().map(|(_, full)| full.as_secs_f64()).collect());
        BatchCost::new(max_batch, ratio).with_full_batch(full.map(Duration::from_secs_f64))
    }

    /// The same shape with a full batch's measured run time (`None`: unknown).
    pub fn with_full_batch(self, full: Option<Duration>) -> Self {
        BatchCost {
            full: full.filter(|d| !d.is_zero()),
            ..self
        }
    }

    /// A full batch's measured run time, if known.
    pub fn full_batch(&self) -> Option<Duration> {
        self.full
    }

    /// The same shape, its times read on `clock`.
    pub fn timed_by(self, clock: BatchClock) -> Self {
        BatchCost { clock, ..self }
    }

    /// The clock the times were read on (and live batches are to be timed by).
    pub fn clock(&self) -> BatchClock {
        self.clock
    }

    /// The largest batch.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// A batch of one item's run time over a full batch's.
    pub fn single(&self) -> f64 {
        self.single
    }

    /// A batch of `items` run time over a full batch's (`items` past `max_batch` count as a
    /// full batch).
    pub fn cost(&self, items: usize) -> f64 {
        if self.max_batch == 1 {
            return 1.0;
        }
        let n = items.clamp(1, self.max_batch) as f64;
        self.single + (1.0 - self.single) * (n - 1.0) / (self.max_batch as f64 - 1.0)
    }

    /// How much of a batch of `items`'s run time the load needed: the share of a full
    /// batch's work it did over the share of a full batch's time it took (1 for a full batch
    /// and for a model whose items cost the same at any batch size).
    pub fn weight(&self, items: usize) -> f64 {
        let n = items.clamp(1, self.max_batch) as f64;
        (n / self.max_batch as f64 / self.cost(items)).min(1.0)
    }
}

/// The median of `values` (`None` when empty).
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// How many recent run times [`CostModel`] keeps per batch size: the median of nine is
/// moved by no fewer than five outliers, and a size's times turn over within nine batches.
pub const RECENT_PER_SIZE: usize = 9;

/// How many pseudo-observations each warm-up timing counts for in a [`CostModel`]: as
/// many as the pairs timed, so that a few live batches of a size outvote them.
const PRIOR_COUNT: usize = PROFILE_PAIRS;

/// The recent run times of one batch size.
#[derive(Clone, Debug, Default, PartialEq)]
struct SizeTimes {
    /// Seconds, newest last, at most [`RECENT_PER_SIZE`].
    recent: VecDeque<f64>,
    /// Their median, kept up to date on each change.
    median: f64,
}

impl SizeTimes {
    fn push(&mut self, seconds: f64) {
        if self.recent.len() == RECENT_PER_SIZE {
            self.recent.pop_front();
        }
        self.recent.push_back(seconds);
        self.median = median(self.recent.iter().copied().collect()).unwrap_or(seconds);
    }
}

/// A batch's run time by its size, relearned from the batches the worker runs: each size's
/// median recent time, and the straight line `a + b × items` fitted through them (see the
/// module docs). A pure value: memory is bounded by `max_batch × RECENT_PER_SIZE` times.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// The shape measured at warm-up: what [`CostModel::cost`] answers until live batches
    /// of two sizes have been seen.
    prior: BatchCost,
    /// Index `n - 1`: the recent run times of batches of `n` items.
    sizes: Vec<SizeTimes>,
    /// The fitted line `(a, b)` in seconds, `None` before two sizes have times.
    line: Option<(f64, f64)>,
}

impl CostModel {
    /// A model that starts from `prior`: with the prior's measured full batch, its two
    /// points (a batch of one and a full batch) are seeded as if each had run
    /// [`PROFILE_PAIRS`] times.
    pub fn new(prior: BatchCost) -> Self {
        let mut model = CostModel {
            prior,
            sizes: vec![SizeTimes::default(); prior.max_batch()],
            line: None,
        };
        if let Some(full) = prior.full_batch().map(|d| d.as_secs_f64()) {
            for _ in 0..PRIOR_COUNT {
                model.push(1, full * prior.single());
                model.push(prior.max_batch(), full);
            }
        }
        model.refit();
        model
    }

    fn push(&mut self, items: usize, seconds: f64) {
        let n = items.clamp(1, self.sizes.len());
        self.sizes[n - 1].push(seconds);
    }

    /// A batch of `items` ran in `run`. Batches past the largest count as the largest; a
    /// zero or unmeasurable time is ignored.
    pub fn observe(&mut self, items: usize, run: Duration) {
        let seconds = run.as_secs_f64();
        if seconds > 0.0 && seconds.is_finite() && items > 0 {
            self.push(items, seconds);
            self.refit();
        }
    }

    /// Weighted least squares of each size's median against its size, weighed by how many
    /// times the size has (a size seen once counts for less than one seen nine times).
    fn refit(&mut self) {
        let (mut w, mut sx, mut sy, mut sxx, mut sxy, mut kinds) = (0.0, 0.0, 0.0, 0.0, 0.0, 0);
        for (i, size) in self.sizes.iter().enumerate() {
            let k = size.recent.len() as f64;
            if k == 0.0 {
                continue;
            }
            let (x, y) = ((i + 1) as f64, size.median);
            kinds += 1;
            w += k;
            sx += k * x;
            sy += k * y;
            sxx += k * x * x;
            sxy += k * x * y;
        }
        let spread = w * sxx - sx * sx;
        self.line = (kinds >= 2 && spread > 0.0).then(|| {
            // A run time does not fall with the batch's size: a falling fit is noise
            // between sizes that cost the same, so it is flat at the mean.
            let b = ((w * sxy - sx * sy) / spread).max(0.0);
            let a = (sy - b * sx) / w;
            (a, b)
        });
    }

    /// The largest batch.
    pub fn max_batch(&self) -> usize {
        self.sizes.len()
    }

    /// The expected run time of a batch of `items` (past the largest: the largest), from
    /// the fitted line; `None` until two sizes have times.
    pub fn predict(&self, items: usize) -> Option<Duration> {
        let (a, b) = self.line?;
        let n = items.clamp(1, self.max_batch()) as f64;
        Duration::try_from_secs_f64((a + b * n).max(0.0)).ok()
    }

    /// The shape to weigh batches by: the fitted line's batch of one over its full batch
    /// (clamped as [`BatchCost::new`] does), or the prior until two sizes have times.
    pub fn cost(&self) -> BatchCost {
        let (Some(one), Some(full)) = (self.predict(1), self.predict(self.max_batch())) else {
            return self.prior;
        };
        if full.is_zero() {
            return self.prior;
        }
        BatchCost::new(self.max_batch(), one.as_secs_f64() / full.as_secs_f64())
            .with_full_batch(Some(full))
            .timed_by(self.prior.clock())
    }
}

/// Times up to [`PROFILE_PAIRS`] interleaved pairs of `run(1)` and `run(max_batch)` (within
/// [`PROFILE_BUDGET`], at least one pair) on `clock` and returns their shape. Call it after
/// warm-up, so that no pair pays for lazy initialisation, and on the thread that runs the
/// batches when `clock` is a thread's CPU time.
pub fn measure<E>(
    max_batch: usize,
    clock: BatchClock,
    mut run: impl FnMut(usize) -> Result<(), E>,
) -> Result<BatchCost, E> {
    if max_batch <= 1 {
        return Ok(BatchCost::linear(max_batch).timed_by(clock));
    }
    let started = Instant::now();
    let mut pairs = Vec::with_capacity(PROFILE_PAIRS);
    while pairs.len() < PROFILE_PAIRS && (pairs.is_empty() || started.elapsed() < PROFILE_BUDGET) {
        let (ran, one) = clock.time(|| run(1));
        ran?;
        let (ran, full) = clock.time(|| run(max_batch));
        ran?;
        pairs.push((one, full));
    }
    Ok(BatchCost::from_pairs(max_batch, &pairs).timed_by(clock))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn linear_weighs_every_batch_fully() {
        let c = BatchCost::linear(32);
        for n in [1, 5, 16, 32, 40] {
            assert!((c.weight(n) - 1.0).abs() < 1e-12, "{n}");
        }
        assert!((c.cost(16) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_flat_cost_weighs_by_fill() {
        // A batch of one costs as much as a full one: the weight is the batch's fill.
        let c = BatchCost::new(32, 1.0);
        assert!((c.weight(1) - 1.0 / 32.0).abs() < 1e-12);
        assert!((c.weight(16) - 0.5).abs() < 1e-12);
        assert!((c.weight(32) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_shape_is_the_median_ratio_and_clamped() {
        let c = BatchCost::from_pairs(32, &[(ms(6), ms(30)), (ms(30), ms(31)), (ms(5), ms(25))]);
        assert!((c.single() - 0.2).abs() < 1e-12, "{}", c.single());
        assert_eq!(BatchCost::from_pairs(32, &[]), BatchCost::linear(32));
        assert_eq!(BatchCost::new(8, 0.01).single(), 1.0 / 8.0);
        assert_eq!(BatchCost::new(8, 3.0).single(), 1.0);
        assert_eq!(BatchCost::new(8, f64::NAN), BatchCost::linear(8));
        // A worker that cannot batch: every batch is full.
        assert_eq!(BatchCost::new(1, 0.5).weight(1), 1.0);
    }

    /// A weight-bound model's batch: 6 ms plus 0.75 ms an item (a full 32: 30 ms).
    fn weight_bound(n: usize) -> Duration {
        Duration::from_micros(6_000 + 750 * n as u64)
    }

    fn close(a: Duration, b: Duration, within: f64) -> bool {
        (a.as_secs_f64() / b.as_secs_f64() - 1.0).abs() <= within
    }

    #[test]
    fn the_model_fits_the_line_and_shrugs_off_outliers() {
        let mut m = CostModel::new(BatchCost::linear(32));
        assert_eq!(m.predict(1), None, "nothing run yet");
        assert_eq!(
            m.cost(),
            BatchCost::linear(32),
            "the prior until two sizes ran"
        );
        m.observe(4, weight_bound(4));
        assert_eq!(
            m.cost(),
            BatchCost::linear(32),
            "one size says nothing of the shape"
        );
        // Every size, every fifth batch ten times slower (a page fault, a preemption).
        for i in 0..400usize {
            let n = 1 + i % 32;
            let slow = if i % 5 == 0 { 10 } else { 1 };
            m.observe(n, weight_bound(n) * slow);
        }
        assert!(close(m.predict(1).unwrap(), weight_bound(1), 0.02), "{m:?}");
        assert!(close(m.predict(32).unwrap(), weight_bound(32), 0.02));
        assert!(
            close(m.predict(99).unwrap(), weight_bound(32), 0.02),
            "past the largest"
        );
        let c = m.cost();
        assert!((c.single() - 6.75 / 30.0).abs() < 0.01, "{c:?}");
        // Zero and absurd times are ignored; memory stays bounded.
        m.observe(3, Duration::ZERO);
        m.observe(0, weight_bound(1));
        for _ in 0..10_000 {
            m.observe(7, weight_bound(7));
        }
        assert!(m.sizes.iter().all(|s| s.recent.len() <= RECENT_PER_SIZE));
    }

    #[test]
    fn a_falling_fit_is_flat() {
        let mut m = CostModel::new(BatchCost::linear(8));
        for _ in 0..RECENT_PER_SIZE {
            m.observe(1, ms(10));
            m.observe(8, ms(9));
        }
        let c = m.cost();
        assert_eq!(c.single(), 1.0, "as costly as a full batch: {c:?}");
        assert!(close(
            m.predict(4).unwrap(),
            Duration::from_micros(9_500),
            1e-9
        ));
    }

    #[test]
    fn the_warm_up_seeds_the_model_and_live_batches_relearn_it() {
        let prior = BatchCost::from_pairs(32, &[(weight_bound(1), weight_bound(32)); 3]);
        assert_eq!(prior.full_batch(), Some(weight_bound(32)));
        let mut m = CostModel::new(prior);
        assert!((m.cost().single() - prior.single()).abs() < 1e-9);
        assert!(close(m.predict(32).unwrap(), weight_bound(32), 1e-9));
        // A night of small batches between idle gaps, each half again slower than the
        // warm-up's back-to-back batch of one: the full batch is still the warm-up's, so a
        // batch of one now costs a larger share of it.
        for i in 0..200usize {
            let n = 1 + i % 3;
            m.observe(n, weight_bound(n).mul_f64(1.5));
        }
        let single = m.cost().single();
        let expected = weight_bound(1).as_secs_f64() * 1.5 / weight_bound(32).as_secs_f64();
        assert!((single - expected).abs() < 0.03, "{single} vs {expected}");
        assert!(
            close(m.predict(32).unwrap(), weight_bound(32), 0.1),
            "{m:?}"
        );
        // Full batches at the peak bring the full time up to date.
        for _ in 0..RECENT_PER_SIZE {
            m.observe(32, weight_bound(32).mul_f64(1.2));
        }
        assert!(close(
            m.predict(32).unwrap(),
            weight_bound(32).mul_f64(1.2),
            0.05
        ));
    }

    #[test]
    fn measure_interleaves_pairs_within_the_budget() {
        let mut sizes = Vec::new();
        let c = measure::<()>(16, BatchClock::Wall, |n| {
            sizes.push(n);
            Ok(())
        })
        .unwrap();
        assert_eq!(sizes, [1, 16].repeat(PROFILE_PAIRS));
        assert_eq!(c.max_batch(), 16);
        assert_eq!(
            measure::<()>(1, BatchClock::Wall, |_| Err(())),
            Ok(BatchCost::linear(1))
        );
        assert_eq!(
            measure(4, BatchClock::ThreadCpu, |_| Err("failed")),
            Err("failed")
        );
        let c = measure::<()>(4, BatchClock::ThreadCpu, |_| Ok(())).unwrap();
        assert_eq!(
            c.clock(),
            BatchClock::ThreadCpu,
            "the shape says how it was timed"
        );
    }
}
