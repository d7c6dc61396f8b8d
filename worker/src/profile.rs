//! [`Profile`]: how long the model thread takes to run a batch, by its size and its length
//! bucket, learned online from the batches actually run.
//!
//! This is what serving to a deadline predicts with: the batcher asks it how long the queue
//! ahead of an item and the item's own batch will take ([`crate::admission`]). Unlike
//! [`crate::cost`] (the *shape* of the cost, measured once at warm-up for the autoscaler's
//! signal, and kept apart from the machine's speed on purpose), the profile holds absolute
//! times, so that it carries the machine's speed and contention of the moment: each
//! observation moves a per-size moving average an eighth of the way, so a machine that gets
//! busier is followed within a few batches: a lasting slowdown is within 2% after 15 batches
//! of that size (50 ms on the 64 MiB model, under a second on the 1 GiB one, whose full
//! batches take some 50 ms). Only the sizes that run are followed: under overload every
//! batch is full, and the smaller sizes keep the times of a lighter load, so an item's own
//! batch is forecast a little short; the admission margin ([`crate::margin`]) covers that
//! with the rest of the forecast's error.
//!
//! Sizes never seen are predicted from those that were: between two measured sizes, the
//! straight line between them; beyond the measured ones, the line through the smallest and
//! largest (flat when only one size was measured), never below the nearest measured time.
//! A bucket never seen predicts nothing ([`Profile::predict`] is `None`): the batcher then
//! admits everything, as it did before it knew anything.

use std::time::Duration;

/// Weight of the newest observation in a size's moving average: an eighth, so one slow batch
/// (a page fault, a neighbour's burst) moves a prediction a little and a lasting change moves
/// it most of the way within a dozen batches.
const NEWEST: f64 = 1.0 / 8.0;

/// Batch run times by length bucket and batch size. Owned by the batcher's actor.
#[derive(Clone, Debug)]
pub struct Profile {
    max_batch: usize,
    /// `times[bucket][size - 1]`: the moving average of that batch's run time, in seconds.
    times: Vec<Vec<Option<f64>>>,
}

impl Profile {
    /// An empty profile for batches of 1 to `max_batch` items in `buckets` length buckets
    /// (at least one of each).
    pub fn new(max_batch: usize, buckets: usize) -> Profile {
        let max_batch = max_batch.max(1);
        Profile {
            max_batch,
            times: vec![vec![None; max_batch]; buckets.max(1)],
        }
    }

    /// Records that a batch of `size` items in `bucket` ran for `run`. Sizes above the most
    /// per batch count as the most; an unknown bucket as the last.
    pub fn observe(&mut self, bucket: usize, size: usize, run: Duration) {
        let (bucket, slot) = self.index(bucket, size);
        let cell = &mut self.times[bucket][slot];
        let seconds = run.as_secs_f64();
        *cell = Some(match *cell {
            Some(old) => old + (seconds - old) * NEWEST,
            None => seconds,
        });
    }

    /// The predicted run time of a batch of `size` items in `bucket`; `None` until a batch in
    /// that bucket has run.
    pub fn predict(&self, bucket: usize, size: usize) -> Option<Duration> {
        let (bucket, slot) = self.index(bucket, size);
        let times = &self.times[bucket];
        if let Some(t) = times[slot] {
            return Some(Duration::from_secs_f64(t));
        }
        let below = first_measured(times, (0..slot).rev());
        let above = first_measured(times, slot + 1..self.max_batch);
        let x = slot as f64;
        let line =
            |(x0, t0): (f64, f64), (x1, t1): (f64, f64)| t0 + (t1 - t0) * (x - x0) / (x1 - x0);
        let trend = || {
            let first = first_measured(times, 0..self.max_batch);
            let last = first_measured(times, (0..self.max_batch).rev());
            match (first, last) {
                (Some(f), Some(l)) if f.0 < l.0 => Some(line(f, l)),
                _ => None,
            }
        };
        let seconds = match (below, above) {
            (Some(b), Some(a)) => line(b, a),
            // Larger than any measured: at least the largest measured batch's time.
            (Some(near), None) => trend().map_or(near.1, |t| t.max(near.1)),
            // Smaller than any measured: at most the smallest measured batch's time.
            (None, Some(near)) => trend().map_or(near.1, |t| t.min(near.1)),
            (None, None) => return None,
        };
        Some(Duration::from_secs_f64(seconds.max(0.0)))
    }

    /// The fastest length bucket's predicted run time of a batch of `size`: what the worker
    /// reports in `pong` for a balancer, which cannot see an item's length and so forecasts
    /// optimistically. `None` until a batch has run.
    pub fn fastest(&self, size: usize) -> Option<Duration> {
        (0..self.times.len())
            .filter_map(|bucket| self.predict(bucket, size))
            .min()
    }

    fn index(&self, bucket: usize, size: usize) -> (usize, usize) {
        (
            bucket.min(self.times.len() - 1),
            size.clamp(1, self.max_batch) - 1,
        )
    }
}

/// The first measured `(size index, seconds)` in `indices`.
fn first_measured(
    times: &[Option<f64>],
    mut indices: impl Iterator<Item = usize>,
) -> Option<(f64, f64)> {
    indices.find_map(|i| times[i].map(|t| (i as f64, t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_is_predicted_before_a_batch_ran() {
        let profile = Profile::new(8, 2);
        assert_eq!(profile.predict(0, 1), None);
    }

    #[test]
    fn a_measured_size_predicts_its_moving_average() {
        let mut profile = Profile::new(8, 1);
        profile.observe(0, 4, ms(80));
        assert_eq!(profile.predict(0, 4), Some(ms(80)));
        // An eighth of the way towards the newest.
        profile.observe(0, 4, ms(160));
        assert_eq!(profile.predict(0, 4), Some(ms(90)));
    }

    #[test]
    fn sizes_between_measured_ones_lie_on_the_line_between_them() {
        let mut profile = Profile::new(8, 1);
        profile.observe(0, 1, ms(10));
        profile.observe(0, 8, ms(80));
        assert_eq!(profile.predict(0, 4), Some(ms(40)));
        assert_eq!(profile.predict(0, 100), Some(ms(80)), "capped at max_batch");
    }

    #[test]
    fn sizes_beyond_the_measured_ones_follow_the_line_never_below_the_nearest() {
        let mut profile = Profile::new(16, 1);
        profile.observe(0, 2, ms(20));
        profile.observe(0, 4, ms(30));
        // The line through (2, 20) and (4, 30) reaches 70 at 12.
        assert_eq!(profile.predict(0, 12), Some(ms(70)));
        // Below the smallest: the line, but never above the nearest measured.
        assert_eq!(profile.predict(0, 1), Some(ms(15)));
        let mut flat = Profile::new(16, 1);
        flat.observe(0, 3, ms(25));
        assert_eq!(flat.predict(0, 16), Some(ms(25)), "one size measured: flat");
        assert_eq!(flat.predict(0, 1), Some(ms(25)));
    }

    #[test]
    fn the_report_takes_the_fastest_bucket_per_size() {
        let mut profile = Profile::new(4, 3);
        assert_eq!(profile.fastest(1), None);
        profile.observe(1, 1, ms(30));
        profile.observe(1, 4, ms(60));
        profile.observe(2, 4, ms(50));
        assert_eq!(
            profile.fastest(1),
            Some(ms(30)),
            "bucket 2 predicts flat 50"
        );
        assert_eq!(profile.fastest(4), Some(ms(50)));
    }

    #[test]
    fn a_lasting_slowdown_is_followed_within_a_few_dozen_batches() {
        let mut profile = Profile::new(16, 1);
        for _ in 0..1_000 {
            profile.observe(0, 16, Duration::from_micros(3_100));
        }
        // Under overload the same batches run 16% slower.
        let slow = 3_600.0;
        let mut batches = 0;
        while profile.predict(0, 16).unwrap().as_micros() as f64 <= slow * 0.98 {
            profile.observe(0, 16, Duration::from_micros(slow as u64));
            batches += 1;
        }
        assert!(batches <= 15, "followed after {batches} batches");
    }

    #[test]
    fn buckets_are_learned_apart() {
        let mut profile = Profile::new(4, 2);
        profile.observe(0, 4, ms(10));
        profile.observe(1, 4, ms(90));
        assert_eq!(profile.predict(0, 4), Some(ms(10)));
        assert_eq!(profile.predict(1, 4), Some(ms(90)));
        assert_eq!(
            profile.predict(7, 4),
            Some(ms(90)),
            "past the last: the last"
        );
    }
}
