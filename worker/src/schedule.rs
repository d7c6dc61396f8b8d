//! When the model threads are next free, predicted: the list schedule that admission reads.
//!
//! With `--instances N` the batcher hands each batch to whichever model thread is free first
//! (the batches in order, one formed ahead). So the batch an arriving item joins starts when
//! the first thread comes free after every batch ahead of it has been given a thread: the
//! greedy list schedule of those batches over the threads' free times. [`Schedule`] computes
//! that exactly from the profiled run times, so that admission errs neither way; the learned
//! [`crate::margin::Margin`] then covers what the profile cannot see (a slower machine, the
//! wait for a partial batch to close).
//!
//! An average of the work in hand over the threads (what admission read before) is never
//! below this start and can be above it by most of a batch when the threads end unevenly: a
//! tight item that the earliest free thread would finish in time was refused.

use std::time::Duration;

/// Each model thread's predicted time until it is free, from now, after the batches already
/// handed over are run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Ascending; one per model thread.
    free: Vec<Duration>,
}

impl Schedule {
    /// `instances` model threads (at least one), running batches with `running` left of
    /// them (at most one per thread; the others are idle), and the batches handed over but
    /// not started, `queued` (their run times, in order), each given to the first thread
    /// free.
    pub fn new(
        instances: usize,
        running: impl IntoIterator<Item = Duration>,
        queued: impl IntoIterator<Item = Duration>,
    ) -> Schedule {
        let mut free: Vec<Duration> = running.into_iter().collect();
        free.resize(instances.max(free.len()).max(1), Duration::ZERO);
        free.sort_unstable();
        let mut schedule = Schedule { free };
        for run in queued {
            schedule.assign(run);
        }
        schedule
    }

    /// When the first model thread is free: the earliest a batch formed now could start.
    pub fn earliest(&self) -> Duration {
        self.free[0]
    }

    /// When a batch starts that waits behind `batches` more batches of `each`, given in
    /// order to the first thread free: the `batches`-th smallest (from 0) of the times
    /// `free + k × each` over every thread and every `k ≥ 0`, since a thread free at `t`
    /// takes a batch at `t`, `t + each`, `t + 2 × each` and so on.
    pub fn start_after(&self, batches: u32, each: Duration) -> Duration {
        let first = self.earliest();
        if batches == 0 || each.is_zero() {
            return first;
        }
        if let [only] = self.free[..] {
            return only.saturating_add(each.saturating_mul(batches));
        }
        // The smallest `t` at which `batches + 1` starts have come: found by bisection over
        // nanoseconds between the first thread alone taking every batch (an upper bound)
        // and its first start.
        let each = each.as_nanos();
        let starts_by = |t: u128| -> u128 {
            self.free
                .iter()
                .map(Duration::as_nanos)
                .filter(|&f| f <= t)
                .map(|f| (t - f) / each + 1)
                .sum()
        };
        let wanted = u128::from(batches) + 1;
        let first = first.as_nanos();
        let (mut low, mut high) = (first, first + each * u128::from(batches));
        while low < high {
            let mid = low + (high - low) / 2;
            if starts_by(mid) >= wanted {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        nanos(low)
    }

    /// Gives a batch of `run` to the first thread free.
    fn assign(&mut self, run: Duration) {
        self.free[0] = self.free[0].saturating_add(run);
        // Back into order: only the first moved, and only later.
        let mut i = 0;
        while i + 1 < self.free.len() && self.free[i] > self.free[i + 1] {
            self.free.swap(i, i + 1);
            i += 1;
        }
    }
}

fn nanos(n: u128) -> Duration {
    let secs = u64::try_from(n / 1_000_000_000).unwrap_or(u64::MAX);
    // Below 10^9: fits.
    let sub = u32::try_from(n % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The batch's start by handing `batches` batches of `each` out one at a time.
    fn by_hand(schedule: &Schedule, batches: u32, each: Duration) -> Duration {
        let mut s = schedule.clone();
        for _ in 0..batches {
            s.assign(each);
        }
        s.earliest()
    }

    #[test]
    fn one_thread_runs_everything_in_turn() {
        let s = Schedule::new(1, [ms(7)], [ms(18)]);
        assert_eq!(s, Schedule::new(1, [ms(25)], []));
        assert_eq!(s.earliest(), ms(25));
        assert_eq!(s.start_after(2, ms(18)), ms(25 + 36));
    }

    #[test]
    fn an_idle_thread_starts_a_batch_at_once() {
        let s = Schedule::new(2, [ms(10)], []);
        assert_eq!(s.earliest(), Duration::ZERO);
        assert_eq!(
            s.start_after(1, ms(3)),
            ms(3),
            "the idle thread's second batch"
        );
        assert_eq!(s.start_after(3, ms(3)), ms(9));
        assert_eq!(
            s.start_after(4, ms(3)),
            ms(10),
            "the busy thread comes free first"
        );
    }

    #[test]
    fn the_batch_handed_over_goes_to_the_thread_free_first() {
        // 100 and 10 left, 100 handed over: it runs from 10 on the second thread, so a
        // new batch starts at 100 on the first (the average of the work, 105, is later).
        let s = Schedule::new(2, [ms(100), ms(10)], [ms(100)]);
        assert_eq!(s.earliest(), ms(100));
        assert_eq!(s.start_after(1, ms(100)), ms(110));
    }

    #[test]
    fn the_start_is_the_one_handing_out_batches_one_by_one_finds() {
        // A fixed pseudo-random walk over thread counts, free times and batch sizes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..2_000 {
            let instances = 1 + next(6) as usize;
            let running: Vec<_> = (0..next(instances as u64 + 1))
                .map(|_| Duration::from_micros(next(20_000)))
                .collect();
            let queued: Vec<_> = (0..next(3))
                .map(|_| Duration::from_micros(1 + next(9_000)))
                .collect();
            let s = Schedule::new(instances, running, queued);
            let batches = next(40) as u32;
            let each = Duration::from_micros(next(7_000));
            assert_eq!(
                s.start_after(batches, each),
                by_hand(&s, batches, each),
                "{s:?}, {batches} × {each:?}"
            );
        }
    }

    #[test]
    fn never_later_than_the_average_of_the_work() {
        let s = Schedule::new(3, [ms(30), ms(5)], [ms(12), ms(12)]);
        let work = ms(30 + 5 + 12 + 12 + 4 * 9);
        assert!(s.start_after(4, ms(9)) <= work / 3);
    }
}
