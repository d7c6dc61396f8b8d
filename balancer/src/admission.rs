//! Predicted-finish admission at the balancer: a request with a deadline that no eligible
//! target can answer in time is answered at once, under its own id, and never forwarded.
//!
//! A worker serving to deadlines reports in its `pong` (the health check's answer) the batch
//! run times it predicts with ([`BatchTimes`]: a batch of one, a full batch, the most items
//! per batch); the target keeps the last report in a [`ReportedTimes`], read on the routing
//! path without a lock. What the balancer knows better than any report is how many requests
//! it has outstanding on each target: exactly, live.
//!
//! ## The forecast ([`forecast`])
//! For one more request on a target with `n` outstanding, of at most `max_batch` per batch,
//! running `instances` batches side by side (its model instances, 1 unless it says more):
//!
//! ```text
//! finish = ⌊⌊(n − instances × max_batch)⁺ / max_batch⌋ / instances⌋ × full  +  one
//! ```
//!
//! The first `max_batch` outstanding per instance are taken as the batches running now and
//! about to end (the balancer cannot see how far they have run); the rest as full batches
//! ahead, whole ones only (a partial one may be what this request joins), run `instances`
//! at a time, whole rounds only; its own batch as a batch of one.
//! Only the requests it would wait behind count ([`ahead`]): none of a lower priority class,
//! and for a high one none at all (a worker may serve it next), so that a high request is
//! refused only when its budget is shorter than a batch of one.
//! Everything it leaves out makes the real finish later: the rest of the running batch,
//! waiting for a batch to fill, a larger own batch, a machine slower than at the last report,
//! requests that other balancers or clients sent to the same worker. So the forecast is a
//! lower bound of what the worker itself will predict (its `admission` module, which sees
//! its queue and its running batch): the balancer refuses only requests the worker
//! would refuse too, at the most favourable moment, and leaves the exact call to the
//! worker. What it saves is the round trip and the worker's decoding for the requests that
//! arrive faster than the worker can refuse them: a burst, or a flood past capacity, which
//! is where the outstanding count runs ahead of what the worker admitted.
//!
//! (Counting every outstanding request as a full batch still to run, the running one
//! included, reads up to one batch's time later than the worker's own forecast whenever the
//! running batch is part done: at low load it refused requests with tight deadlines that
//! the worker would have answered in time.)
//!
//! ## The decision ([`judge`])
//! - A request whose remaining budget is shorter than a batch of one on an idle target is
//!   [`Refusal::Doomed`]: answered `deadline_exceeded` (only a larger budget helps).
//! - One whose forecast ends after its remaining budget is [`Refusal::Late`]: the router
//!   then looks for the eligible target with the earliest forecast, and only when even that
//!   one is late answers `overloaded`, with a `retry_after_ms` of how late it would be
//!   ([`tidepool_protocol::late_retry_ms`], the worker's rule).
//! - Everything else is [`Verdict::Admit`]: requests without a deadline never get here,
//!   and a target that reports no batch times (an older worker, `--batching fixed`, one
//!   that has not run a batch yet) admits everything.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tidepool_protocol::{BatchTimes, Priority};

/// A target's last reported batch times, readable without a lock.
///
/// Written by the target's health check only; a reader racing a write may see one new time
/// beside one old one: both were that worker's own recent predictions, so the mix is as
/// plausible as either report.
#[derive(Debug, Default)]
pub(crate) struct ReportedTimes {
    one_us: AtomicU64,
    full_us: AtomicU64,
    /// Zero: no report.
    max_batch: AtomicU32,
    instances: AtomicU32,
}

impl ReportedTimes {
    /// Records a report (`None`: the worker reported none).
    pub(crate) fn set(&self, times: Option<BatchTimes>) {
        match times {
            None => self.max_batch.store(0, Ordering::Release),
            Some(t) => {
                self.one_us.store(t.one_us, Ordering::Relaxed);
                self.full_us.store(t.full_us, Ordering::Relaxed);
                self.instances.store(t.instances, Ordering::Relaxed);
                self.max_batch.store(t.max_batch.max(1), Ordering::Release);
            }
        }
    }

    /// The last report, if any.
    pub(crate) fn get(&self) -> Option<BatchTimes> {
        let max_batch = self.max_batch.load(Ordering::Acquire);
        (max_batch > 0).then(|| BatchTimes {
            one_us: self.one_us.load(Ordering::Relaxed),
            full_us: self.full_us.load(Ordering::Relaxed),
            max_batch,
            instances: self.instances.load(Ordering::Relaxed),
        })
    }
}

/// The earliest one more request can be answered by a target that reports `times`, with
/// `outstanding` requests already there (see the module docs).
pub(crate) fn forecast(times: BatchTimes, outstanding: usize) -> Duration {
    let per_batch = u64::from(times.max_batch.max(1));
    let instances = u64::from(times.instances.max(1));
    let batches_ahead = u64::try_from(outstanding)
        .unwrap_or(u64::MAX)
        .saturating_sub(per_batch.saturating_mul(instances))
        / per_batch;
    Duration::from_micros(
        (batches_ahead / instances)
            .saturating_mul(times.full_us)
            .saturating_add(times.one_us),
    )
}

/// What admission decided for one request on one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Forward it.
    Admit,
    /// Answer it at once.
    Refuse(Refusal),
}

/// Why a request is answered without being forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Predicted to be answered `late_by` after its deadline.
    Late {
        /// The forecast from now to its answer.
        finish: Duration,
        /// How far past its deadline.
        late_by: Duration,
    },
    /// Its budget is shorter than a batch of one, which takes `alone`.
    Doomed {
        /// A batch of one's predicted run time.
        alone: Duration,
    },
}

impl Verdict {
    /// Orders verdicts from best to worst: admitted first, then the least late, then the
    /// doomed (by how long a batch of one takes).
    pub(crate) fn rank(&self) -> (u8, Duration) {
        match *self {
            Verdict::Admit => (0, Duration::ZERO),
            Verdict::Refuse(Refusal::Late { finish, .. }) => (1, finish),
            Verdict::Refuse(Refusal::Doomed { alone }) => (2, alone),
        }
    }
}

/// The outstanding requests a request of `priority` may wait behind, of `outstanding` there
/// (`low` of them low priority): a worker serves its queue highest class first, so a normal
/// request waits behind no low one, and a high one behind none that is queued (the batches
/// running there are already taken as ending: see [`forecast`]).
pub(crate) fn ahead(priority: Priority, outstanding: usize, low: usize) -> usize {
    match priority {
        Priority::Low => outstanding,
        Priority::Normal => outstanding.saturating_sub(low),
        Priority::High => 0,
    }
}

/// Judges a request with `left` of its deadline on a target with `outstanding` requests
/// that reported `times` (`None`: no report, admitted).
pub(crate) fn judge(times: Option<BatchTimes>, outstanding: usize, left: Duration) -> Verdict {
    let Some(times) = times else {
        return Verdict::Admit;
    };
    let alone = Duration::from_micros(times.one_us);
    if alone > left {
        return Verdict::Refuse(Refusal::Doomed { alone });
    }
    let finish = forecast(times, outstanding);
    if finish > left {
        Verdict::Refuse(Refusal::Late {
            finish,
            late_by: finish - left,
        })
    } else {
        Verdict::Admit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A worker whose batch of one takes 11 ms and a full batch of 8 takes 18 ms.
    const TIMES: BatchTimes = BatchTimes {
        one_us: 11_000,
        full_us: 18_000,
        max_batch: 8,
        instances: 1,
    };

    #[test]
    fn the_running_batch_is_taken_as_ending_and_only_whole_batches_wait_ahead() {
        // Up to one batch outstanding: it may be just ending, so only the request's own.
        assert_eq!(forecast(TIMES, 0), ms(11));
        assert_eq!(forecast(TIMES, 8), ms(11));
        // 15 outstanding: 7 past the running batch, no whole batch ahead (it may join them).
        assert_eq!(forecast(TIMES, 15), ms(11));
        assert_eq!(forecast(TIMES, 16), ms(11 + 18));
        assert_eq!(forecast(TIMES, 8 + 3 * 8 + 5), ms(11 + 3 * 18));
    }

    #[test]
    fn a_worker_with_instances_runs_that_many_batches_at_once() {
        let two = BatchTimes {
            instances: 2,
            ..TIMES
        };
        // Up to a batch per instance outstanding: both may be just ending.
        assert_eq!(forecast(two, 16), ms(11));
        // One whole batch past them: it takes the first instance free, this request the
        // other (the worker's own forecast starts it there too).
        assert_eq!(forecast(two, 24), ms(11));
        // Two whole batches ahead: one round of both instances.
        assert_eq!(forecast(two, 32), ms(11 + 18));
        assert_eq!(forecast(two, 16 + 5 * 8 + 3), ms(11 + 2 * 18));
        assert_eq!(
            forecast(TIMES, 16 + 5 * 8 + 3),
            ms(11 + 6 * 18),
            "one instance"
        );
    }

    #[test]
    fn a_request_waits_behind_its_class_and_higher_only() {
        assert_eq!(ahead(Priority::Low, 30, 10), 30);
        assert_eq!(ahead(Priority::Normal, 30, 10), 20);
        assert_eq!(
            ahead(Priority::Normal, 5, 10),
            0,
            "counts read a moment apart"
        );
        assert_eq!(ahead(Priority::High, 30, 0), 0);
    }

    #[test]
    fn hostile_reports_cannot_overflow_the_forecast() {
        let huge = BatchTimes {
            one_us: u64::MAX,
            full_us: u64::MAX,
            max_batch: 1,
            instances: 1,
        };
        assert_eq!(forecast(huge, usize::MAX), Duration::from_micros(u64::MAX));
        let wide = BatchTimes {
            max_batch: BatchTimes::MAX_BATCH,
            instances: u32::MAX,
            ..TIMES
        };
        assert_eq!(forecast(wide, 1 << 40), ms(11), "all of them running");
        let zero_batch = BatchTimes {
            max_batch: 0,
            ..TIMES
        };
        assert_eq!(
            forecast(zero_batch, 3),
            ms(11 + 2 * 18),
            "read as 1 per batch"
        );
    }

    #[test]
    fn a_request_is_admitted_refused_late_or_doomed_by_its_budget() {
        assert_eq!(judge(None, 1_000, ms(1)), Verdict::Admit, "no report");
        assert_eq!(
            judge(Some(TIMES), 24, ms(47)),
            Verdict::Admit,
            "exactly in time"
        );
        assert_eq!(
            judge(Some(TIMES), 24, ms(40)),
            Verdict::Refuse(Refusal::Late {
                finish: ms(47),
                late_by: ms(7)
            })
        );
        assert_eq!(
            judge(Some(TIMES), 0, ms(10)),
            Verdict::Refuse(Refusal::Doomed { alone: ms(11) }),
            "shorter than a batch of one, however idle"
        );
    }

    #[test]
    fn verdicts_rank_admitted_then_least_late_then_doomed() {
        let late = |finish| {
            Verdict::Refuse(Refusal::Late {
                finish: ms(finish),
                late_by: ms(1),
            })
        };
        let doomed = Verdict::Refuse(Refusal::Doomed { alone: ms(1) });
        let mut verdicts = [doomed, late(30), Verdict::Admit, late(20)];
        verdicts.sort_by_key(Verdict::rank);
        assert_eq!(verdicts, [Verdict::Admit, late(20), late(30), doomed]);
    }

    #[test]
    fn a_report_is_kept_whole_and_can_be_withdrawn() {
        let cell = ReportedTimes::default();
        assert_eq!(cell.get(), None);
        cell.set(Some(TIMES));
        assert_eq!(cell.get(), Some(TIMES));
        cell.set(None);
        assert_eq!(cell.get(), None, "a worker switched to --batching fixed");
    }
}
