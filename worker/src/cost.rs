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
//! batches are full (weight 1) and it equals the busy share. Each batch's own run time carries
//! the machine's contention at that moment, so only the *shape* of the cost (how a single
//! item's batch compares with a full one) has to be known, not the absolute timings: shape is
//! a property of the model, timings of the machine. The shape is measured once after warm-up,
//! batches of one and full batches interleaved (so that contention hits both alike), the
//! median of a few pairs' ratios; `cost(n)` is the straight line between those two points.
//! Online the two cannot be told apart (a slower batch may be a fuller one or a busier
//! machine), so the shape is not relearned from traffic.
//!
//! Until measured the cost is [`BatchCost::linear`] (every item costs the same, weight 1), so
//! the signal is then the plain busy share: what a worker without batching has anyway.

use std::time::{Duration, Instant};

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
}

impl BatchCost {
    /// Every item costs the same (a batch of one costs `1 / max_batch` of a full one): the
    /// weight is 1 and the signal is the plain busy share.
    pub fn linear(max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        BatchCost {
            max_batch,
            single: 1.0 / max_batch as f64,
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
        let mut ratios: Vec<f64> = pairs
            .iter()
            .filter(|(_, full)| !full.is_zero())
            .map(|(one, full)| one.as_secs_f64() / full.as_secs_f64())
            .collect();
        if ratios.is_empty() {
            return BatchCost::linear(max_batch);
        }
        ratios.sort_by(f64::total_cmp);
        let mid = ratios.len() / 2;
        let median = if ratios.len() % 2 == 1 {
            ratios[mid]
        } else {
            (ratios[mid - 1] + ratios[mid]) / 2.0
        };
        BatchCost::new(max_batch, median)
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

/// Times up to [`PROFILE_PAIRS`] interleaved pairs of `run(1)` and `run(max_batch)` (within
/// [`PROFILE_BUDGET`], at least one pair) and returns their shape. Call it after warm-up, so
/// that no pair pays for lazy initialisation.
pub fn measure<E>(
    max_batch: usize,
    mut run: impl FnMut(usize) -> Result<(), E>,
) -> Result<BatchCost, E> {
    if max_batch <= 1 {
        return Ok(BatchCost::linear(max_batch));
    }
    let started = Instant::now();
    let mut pairs = Vec::with_capacity(PROFILE_PAIRS);
    while pairs.len() < PROFILE_PAIRS && (pairs.is_empty() || started.elapsed() < PROFILE_BUDGET) {
        let t = Instant::now();
        run(1)?;
        let one = t.elapsed();
        let t = Instant::now();
        run(max_batch)?;
        pairs.push((one, t.elapsed()));
    }
    Ok(BatchCost::from_pairs(max_batch, &pairs))
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

    #[test]
    fn measure_interleaves_pairs_within_the_budget() {
        let mut sizes = Vec::new();
        let c = measure::<()>(16, |n| {
            sizes.push(n);
            Ok(())
        })
        .unwrap();
        assert_eq!(sizes, [1, 16].repeat(PROFILE_PAIRS));
        assert_eq!(c.max_batch(), 16);
        assert_eq!(measure::<()>(1, |_| Err(())), Ok(BatchCost::linear(1)));
        assert_eq!(measure(4, |_| Err("failed")), Err("failed"));
    }
}
