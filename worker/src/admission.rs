//! Serving to deadlines: predicted-finish admission and the adaptive batch close, as pure
//! decisions over the [`Profile`] (the batcher calls them; every input is a plain value, so
//! each rule is tested here without a model or a clock).
//!
//! - **Admission** ([`forecast`], [`judge`]). When an item with a deadline arrives, the model
//!   time ahead of it is when its batch can start: the model threads' work in hand (the
//!   batches running and the one handed over), then the full batches that the items of its
//!   class or a higher one already queued make, each given to the first thread free
//!   ([`Schedule`]); its own batch is the rest of those items and itself. If even that
//!   (optimistic: no waiting, no slower machine) ends after its deadline, the item is refused
//!   at once, `overloaded` with a `retry_after_ms` of how late it would have been
//!   ([`tidepool_protocol::late_retry_ms`], the balancer's rule too), instead of
//!   queueing to be answered `deadline_exceeded` later, after taking a place in the queue
//!   from items that could still make it. The batcher adds to each forecast the
//!   [`crate::margin::Margin`] learned from how late the items it admitted actually
//!   finished, so that what it admits it finishes in time even when batches run slower
//!   than the profile says.
//! - **Doomed items** ([`doomed`]). An item that cannot finish by its deadline even if its
//!   batch were just itself, started as soon as the model is free, is answered
//!   `deadline_exceeded` and never computed: on arrival (its budget is shorter than a batch
//!   of one: only a larger budget helps, so not `overloaded`), or while queued, before its
//!   batch forms.
//! - **Adaptive close** ([`close_by`]). While the model is idle, a partial batch waits for
//!   more items at most `--max-delay`, and no longer than its most urgent member can afford:
//!   it closes when waiting for one more item would make the grown batch finish after that
//!   member's deadline.
//!
//! With no profile yet (no batch has run), every prediction is `None` and the batcher
//! behaves as [`BatchingMode::Fixed`].

use std::time::Duration;

use tokio::time::Instant;

use crate::profile::Profile;
use crate::schedule::Schedule;

/// How the batcher treats deadlines (`--batching`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchingMode {
    /// Predicted-finish admission, doomed items dropped, each batch's wait chosen from its
    /// members' deadlines (within `--max-delay`).
    #[default]
    Adaptive,
    /// The batcher before deadlines were predicted: batches close on `--max-batch` or
    /// `--max-delay` only, and an item is answered `deadline_exceeded` only once its deadline
    /// has passed in the queue. For comparison.
    Fixed,
}

/// The model time an arriving item faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forecast {
    /// Until its batch can start: the model thread's work in hand, then the full batches
    /// ahead of it.
    pub ahead: Duration,
    /// Its own batch's run.
    pub own: Duration,
}

impl Forecast {
    /// From arrival to its answer.
    pub fn finish(&self) -> Duration {
        self.ahead + self.own
    }

    /// [`Forecast::finish`] plus the learned `margin`, but never more of it than the time
    /// ahead: the margin keeps the queue from filling past what will finish in time, and an
    /// item that would start at once is judged by its own batch alone, since refusing it
    /// would leave the model idle (on a machine whose hiccups made the margin wider than a
    /// tight deadline, every tight item would be refused even on an idle model).
    pub fn with_margin(&self, margin: Duration) -> Duration {
        self.finish().saturating_add(margin.min(self.ahead))
    }
}

/// The forecast for an item in length `bucket` with `items_ahead` items queued before it (its
/// class or higher), batches of up to `max_batch`, and the model threads' `schedule`: its
/// batch starts when a thread is first free after the full batches those items make have
/// each been given one ([`Schedule::start_after`]). `None` while the profile has no time for
/// that bucket.
pub fn forecast(
    profile: &Profile,
    bucket: usize,
    items_ahead: usize,
    max_batch: usize,
    schedule: &Schedule,
) -> Option<Forecast> {
    let max_batch = max_batch.max(1);
    let full = u32::try_from(items_ahead / max_batch).unwrap_or(u32::MAX);
    let full_batch = profile.predict(bucket, max_batch)?;
    let own = profile.predict(bucket, items_ahead % max_batch + 1)?;
    Some(Forecast {
        ahead: schedule.start_after(full, full_batch),
        own,
    })
}

/// What admission decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queue it.
    Admit,
    /// It would finish `late_by` after its deadline.
    Refuse {
        /// The forecast from arrival to its answer.
        finish: Duration,
        /// How far past its deadline.
        late_by: Duration,
    },
}

/// Admits an item arriving at `now` with `deadline` unless `forecast`, plus the learned
/// `margin`, ends after it.
pub fn judge(now: Instant, deadline: Instant, forecast: Forecast, margin: Duration) -> Verdict {
    let finish = forecast.with_margin(margin);
    let done = now + finish;
    if done > deadline {
        Verdict::Refuse {
            finish,
            late_by: done - deadline,
        }
    } else {
        Verdict::Admit
    }
}

/// True when an item due at `deadline` cannot finish in time even alone, started when the
/// first model thread is free, `free` from now: a batch of one runs `alone`.
pub fn doomed(now: Instant, deadline: Instant, free: Duration, alone: Duration) -> bool {
    now + free + alone > deadline
}

/// The latest a partial batch may close while its most urgent member is due at `deadline`:
/// waiting for one more item makes the batch run `grown`, which must still end by then.
pub fn close_by(deadline: Instant, grown: Duration) -> Option<Instant> {
    deadline.checked_sub(grown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A model whose batches take 10 ms plus 1 ms per item, up to 8.
    fn profile() -> Profile {
        let mut p = Profile::new(8, 1);
        p.observe(0, 1, ms(11));
        p.observe(0, 8, ms(18));
        p
    }

    #[test]
    fn nothing_is_forecast_before_the_profile_knows_the_bucket() {
        assert_eq!(
            forecast(&Profile::new(8, 1), 0, 3, 8, &Schedule::new(1, [ms(5)], [])),
            None
        );
    }

    #[test]
    fn the_forecast_counts_work_in_hand_full_batches_ahead_and_its_own_batch() {
        // 19 ahead: two full batches (2 × 18), then its batch of 3 + itself (14).
        let f = forecast(&profile(), 0, 19, 8, &Schedule::new(1, [ms(7)], [])).unwrap();
        assert_eq!(
            f,
            Forecast {
                ahead: ms(7 + 36),
                own: ms(14)
            }
        );
        assert_eq!(f.finish(), ms(57));
        // Two model threads, one busy for 7 ms: the idle one takes the first full batch at
        // once, the busy one the second at 7, and its own batch starts at 18.
        let two = forecast(&profile(), 0, 19, 8, &Schedule::new(2, [ms(7)], [])).unwrap();
        assert_eq!(two.ahead, ms(18));
        assert_eq!(two.own, ms(14));
        let empty = forecast(&profile(), 0, 0, 8, &Schedule::new(1, [Duration::ZERO], [])).unwrap();
        assert_eq!(
            empty.finish(),
            ms(11),
            "alone on an idle model: a batch of one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_that_cannot_finish_in_time_is_refused_with_how_late() {
        let now = Instant::now();
        let f = forecast(&profile(), 0, 19, 8, &Schedule::new(1, [ms(7)], [])).unwrap();
        assert_eq!(
            judge(now, now + ms(57), f, Duration::ZERO),
            Verdict::Admit,
            "exactly in time"
        );
        assert_eq!(
            judge(now, now + ms(50), f, Duration::ZERO),
            Verdict::Refuse {
                finish: ms(57),
                late_by: ms(7)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_margin_counts_against_the_deadline() {
        let now = Instant::now();
        let f = forecast(&profile(), 0, 19, 8, &Schedule::new(1, [ms(7)], [])).unwrap();
        assert_eq!(judge(now, now + ms(60), f, ms(3)), Verdict::Admit);
        assert_eq!(
            judge(now, now + ms(59), f, ms(3)),
            Verdict::Refuse {
                finish: ms(60),
                late_by: ms(1)
            },
            "in time by the forecast alone, late with the margin"
        );
        // Nothing ahead: judged by its own batch alone, however wide the margin.
        let idle = forecast(&profile(), 0, 0, 8, &Schedule::new(1, [Duration::ZERO], [])).unwrap();
        assert_eq!(judge(now, now + ms(11), idle, ms(30)), Verdict::Admit);
        // A little ahead: at most that much of the margin counts.
        let busy = forecast(&profile(), 0, 0, 8, &Schedule::new(1, [ms(2)], [])).unwrap();
        assert_eq!(busy.with_margin(ms(30)), ms(2 + 11 + 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_is_doomed_only_when_even_alone_it_ends_late() {
        let now = Instant::now();
        assert!(!doomed(now, now + ms(20), ms(9), ms(11)));
        assert!(doomed(now, now + ms(20), ms(10), ms(11)));
        assert!(!doomed(now, now, Duration::ZERO, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_when_one_more_item_would_make_it_late() {
        let now = Instant::now();
        let grown = profile().predict(0, 4).unwrap();
        assert_eq!(close_by(now + ms(30), grown), Some(now + ms(16)));
        assert_eq!(
            close_by(now, Duration::MAX),
            None,
            "before the clock's start: at once"
        );
    }
}
