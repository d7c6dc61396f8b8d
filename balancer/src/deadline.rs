//! [`Deadlines`]: when each request written on one upstream connection must be answered by.
//!
//! One per connection, owned by its writer task: no lock, no task per request. A min-heap of
//! `(when, upstream id)`; an answered request leaves its entry behind (removing it would
//! take the reader's way into the writer's heap), and such stale entries are skipped when
//! they come up, since their id is no longer in the connection's map. So that they cannot
//! pile up (a 60 s timeout at 50,000 requests a second), the heap is compacted to the live
//! entries whenever it has grown to twice as many as were live at the last compaction, plus
//! some slack: amortised, one map lookup per request, and no count of the map per push
//! (counting a `DashMap` locks each of its shards).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tidepool_protocol::RequestId;
use tokio::time::Instant;

/// Entries kept before compaction is worth a pass, whatever is in flight.
const SLACK: usize = 1024;

/// The deadlines of one connection's written requests.
#[derive(Debug)]
pub(crate) struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, RequestId)>>,
    /// Entries at which the heap is compacted next: twice the live ones at the last
    /// compaction, plus [`SLACK`].
    compact_at: usize,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines {
            heap: BinaryHeap::new(),
            compact_at: SLACK,
        }
    }
}

impl Deadlines {
    /// Tracks request `id`, due at `at`. `is_live` tells whether a request is still in
    /// flight: when the heap has grown to twice the live entries of the last compaction
    /// (plus [`SLACK`]), those of answered requests are dropped.
    pub(crate) fn push(&mut self, at: Instant, id: RequestId, is_live: impl Fn(RequestId) -> bool) {
        if self.heap.len() >= self.compact_at {
            self.heap.retain(|Reverse((_, id))| is_live(*id));
            self.compact_at = 2 * self.heap.len() + SLACK;
        }
        self.heap.push(Reverse((at, id)));
    }

    /// The earliest deadline, answered or not.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes out every entry due at `now`, in deadline order.
    pub(crate) fn due(&mut self, now: Instant) -> impl Iterator<Item = RequestId> + '_ {
        std::iter::from_fn(move || match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse((_, id))| id),
            _ => None,
        })
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn due_entries_come_out_in_deadline_order() {
        let now = Instant::now();
        let mut d = Deadlines::default();
        let live = |_| true;
        d.push(now + Duration::from_millis(30), 1, live);
        d.push(now + Duration::from_millis(10), 2, live);
        d.push(now + Duration::from_millis(20), 3, live);
        assert_eq!(d.next(), Some(now + Duration::from_millis(10)));
        assert!(d.due(now).next().is_none(), "nothing due yet");
        tokio::time::advance(Duration::from_millis(20)).await;
        let due: Vec<_> = d.due(Instant::now()).collect();
        assert_eq!(due, vec![2, 3]);
        assert_eq!(d.next(), Some(now + Duration::from_millis(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn answered_entries_cannot_pile_up() {
        let now = Instant::now();
        let mut d = Deadlines::default();
        // One request in flight at a time; every earlier one was answered.
        for id in 1..=10_000u64 {
            d.push(now + Duration::from_secs(60), id, |other| other == id);
        }
        assert!(d.len() <= 2 + SLACK, "{} entries kept", d.len());
    }
}
