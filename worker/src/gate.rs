//! [`Gate`]: predicted-finish admission at the connection, from the request's scanned fields
//! alone, so that a request the batcher would refuse costs the scan and an error frame, not
//! decoding its tensors, checking them against the model and a trip through the batcher's
//! channel and back.
//!
//! The batcher's actor decides admission ([`crate::admission`]); after every change of its
//! queue, of the model's work in hand or of its [`crate::margin::Margin`], it publishes here,
//! per priority class, the earliest an item of that class arriving now could be answered
//! (work in hand, the full batches of its class or a higher one ahead, its own batch, the
//! margin: [`Gate::publish`]), and the time of a batch of one. A connection that has scanned
//! an `infer` with a `deadline_ms` asks [`Gate::check`] before decoding it: a deadline before
//! that finish is refused `overloaded` (a budget shorter than a batch of one:
//! `deadline_exceeded`) with the same retry hint the actor gives.
//!
//! The gate refuses only what the actor would refuse too: it uses the fastest length bucket's
//! times (the scan does not see an item's length) and does not count the items still on their
//! way into the actor's queue, so it is a lower bound of the actor's forecast, and the actor
//! still judges every item the gate lets through. It is closed (admits everything) in fixed
//! mode, until a batch has run, and when the queue is shared fairly (admission then counts a
//! flow's own items, which only the actor knows).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tidepool_protocol::Priority;
use tokio::time::Instant;

/// Why the gate refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It would be answered `finish` after arrival, `late_by` after its deadline
    /// (`overloaded`).
    Late {
        /// From arrival to its predicted answer, margin included.
        finish: Duration,
        /// How far past the deadline.
        late_by: Duration,
    },
    /// Its budget is shorter than a batch of one, `alone` (`deadline_exceeded`).
    Doomed {
        /// A batch of one's predicted run.
        alone: Duration,
    },
}

/// The actor's latest admission snapshot, read by connections. Microseconds since `epoch`,
/// plus one (0: nothing published, admit).
#[derive(Debug)]
pub struct Gate {
    epoch: Instant,
    /// Per class ([`Priority::rank`]): the earliest an arriving item could be answered.
    finish: [AtomicU64; 3],
    /// A batch of one's predicted run, in microseconds plus one.
    alone: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    /// A closed gate: admits everything until [`Gate::publish`].
    pub fn new() -> Gate {
        Gate {
            epoch: Instant::now(),
            finish: Default::default(),
            alone: AtomicU64::new(0),
        }
    }

    /// Publishes, per class (lowest first), the earliest an item arriving now could be
    /// answered, and a batch of one's run; `None` closes the gate.
    pub fn publish(&self, snapshot: Option<([Instant; 3], Duration)>) {
        let Some((finish, alone)) = snapshot else {
            self.alone.store(0, Ordering::Relaxed);
            for f in &self.finish {
                f.store(0, Ordering::Relaxed);
            }
            return;
        };
        for (slot, at) in self.finish.iter().zip(finish) {
            slot.store(self.encode(at), Ordering::Relaxed);
        }
        self.alone.store(plus_one(alone), Ordering::Relaxed);
    }

    /// Whether an item of `priority` arriving at `now` with `deadline` must be refused.
    pub fn check(&self, now: Instant, deadline: Instant, priority: Priority) -> Option<Refused> {
        let alone = decode_duration(self.alone.load(Ordering::Relaxed))?;
        if now + alone > deadline {
            return Some(Refused::Doomed { alone });
        }
        let finish = self.decode(self.finish[priority.rank()].load(Ordering::Relaxed))?;
        (finish > deadline).then(|| Refused::Late {
            finish: finish.saturating_duration_since(now),
            late_by: finish - deadline,
        })
    }

    fn encode(&self, at: Instant) -> u64 {
        plus_one(at.saturating_duration_since(self.epoch))
    }

    fn decode(&self, v: u64) -> Option<Instant> {
        decode_duration(v).map(|d| self.epoch + d)
    }
}

fn plus_one(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

fn decode_duration(v: u64) -> Option<Duration> {
    v.checked_sub(1).map(Duration::from_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_gate_admits_everything() {
        let gate = Gate::new();
        let now = Instant::now();
        assert_eq!(gate.check(now, now, Priority::Low), None);
        gate.publish(Some(([now + ms(50); 3], ms(2))));
        gate.publish(None);
        assert_eq!(gate.check(now, now + ms(1), Priority::Normal), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_before_the_class_finish_is_refused_with_how_late() {
        let gate = Gate::new();
        let now = Instant::now();
        gate.publish(Some(([now + ms(90), now + ms(40), now + ms(10)], ms(2))));
        assert_eq!(gate.check(now, now + ms(40), Priority::Normal), None);
        assert_eq!(
            gate.check(now, now + ms(30), Priority::Normal),
            Some(Refused::Late {
                finish: ms(40),
                late_by: ms(10)
            })
        );
        assert_eq!(gate.check(now, now + ms(30), Priority::High), None);
        assert!(matches!(
            gate.check(now, now + ms(80), Priority::Low),
            Some(Refused::Late { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_shorter_than_a_batch_of_one_is_doomed() {
        let gate = Gate::new();
        let now = Instant::now();
        gate.publish(Some(([now; 3], ms(3))));
        assert_eq!(
            gate.check(now, now + ms(2), Priority::High),
            Some(Refused::Doomed { alone: ms(3) })
        );
        assert_eq!(gate.check(now, now + ms(3), Priority::High), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finish_in_the_past_admits_whatever_is_not_doomed() {
        let gate = Gate::new();
        let start = Instant::now();
        gate.publish(Some(([start + ms(5); 3], ms(1))));
        tokio::time::advance(ms(100)).await;
        let now = Instant::now();
        assert_eq!(gate.check(now, now + ms(1), Priority::Normal), None);
    }
}
