//! Priority classes in the worker's queue: the order items are served in, ageing so that
//! none starves, and how much of the queue the low class may hold.
//!
//! - **Order.** The batcher leads each batch with the queued item of the highest *effective*
//!   rank ([`effective_rank`]), the oldest among equals; its batch mates are chosen the same
//!   way among those that fit with it. With `--fairness`, ranks stop at the top class and
//!   the flows (clients or tenants) holding the best rank share it ([`crate::fairness`]).
//! - **Ageing.** An item's effective rank is its class's rank plus one per `aging` it has
//!   waited, so a low item that has waited two ageing steps ranks with a fresh high one and
//!   then ahead of it: under any load every item reaches the front in bounded time.
//! - **Shedding.** Low items may fill at most half the queue ([`admits`]): past that they are
//!   answered `overloaded` at once, so that under overload the low class is refused first and
//!   normal and high keep the rest of the queue. Predicted-finish admission
//!   ([`crate::admission`]) counts only the items of the same or a higher class as ahead of an
//!   item, so when the model cannot keep up with every class it is the low items whose
//!   deadlines are seen to be missed, and refused, first.
//! - **Counting.** [`ClassCounts`] counts the actor's queued items per class, for admission.

use std::time::Duration;

use tidepool_protocol::Priority;

/// An item's rank for ordering the queue: its class's rank plus one per `aging` waited (no
/// ageing when `aging` is zero).
pub fn effective_rank(priority: Priority, waited: Duration, aging: Duration) -> u64 {
    let aged = if aging.is_zero() {
        0
    } else {
        u64::try_from(waited.as_nanos() / aging.as_nanos()).unwrap_or(u64::MAX)
    };
    (priority.rank() as u64).saturating_add(aged)
}

/// Whether an item of `priority` may join a queue of `capacity` that holds `queued` items
/// (the bound of the queue itself is checked apart): low items only while it is less than
/// half full.
pub fn admits(priority: Priority, queued: usize, capacity: usize) -> bool {
    match priority {
        Priority::Low => queued < capacity.div_ceil(2),
        Priority::Normal | Priority::High => true,
    }
}

/// Queued items per class, kept by the batcher's actor as items join and leave its queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts([usize; 3]);

impl ClassCounts {
    /// One more item of `priority`.
    pub fn add(&mut self, priority: Priority) {
        self.0[priority.rank()] += 1;
    }

    /// One item of `priority` fewer.
    pub fn remove(&mut self, priority: Priority) {
        let n = &mut self.0[priority.rank()];
        *n = n.saturating_sub(1);
    }

    /// Items of `priority` or a higher class.
    pub fn at_or_above(&self, priority: Priority) -> usize {
        self.0[priority.rank()..].iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGING: Duration = Duration::from_millis(100);

    #[test]
    fn a_waiting_low_item_overtakes_a_fresh_high_one() {
        let fresh_high = effective_rank(Priority::High, Duration::ZERO, AGING);
        assert!(effective_rank(Priority::Low, Duration::from_millis(199), AGING) < fresh_high);
        assert_eq!(
            effective_rank(Priority::Low, Duration::from_millis(200), AGING),
            fresh_high,
            "two ageing steps: level with a fresh high item (the older leads)"
        );
        assert!(effective_rank(Priority::Low, Duration::from_millis(300), AGING) > fresh_high);
    }

    #[test]
    fn no_ageing_keeps_classes_apart_for_ever() {
        let rank = effective_rank(Priority::Low, Duration::from_secs(3600), Duration::ZERO);
        assert_eq!(rank, 0);
    }

    #[test]
    fn low_items_may_fill_half_the_queue() {
        assert!(admits(Priority::Low, 4, 10));
        assert!(!admits(Priority::Low, 5, 10));
        assert!(admits(Priority::Normal, 9, 10));
        assert!(admits(Priority::High, 9, 10));
        assert!(
            admits(Priority::Low, 0, 1),
            "a queue of one still takes a low item"
        );
    }

    #[test]
    fn counts_add_up_by_class_and_above() {
        let mut counts = ClassCounts::default();
        for p in [
            Priority::Low,
            Priority::High,
            Priority::Normal,
            Priority::Normal,
        ] {
            counts.add(p);
        }
        assert_eq!(counts.at_or_above(Priority::Low), 4);
        assert_eq!(counts.at_or_above(Priority::Normal), 3);
        assert_eq!(counts.at_or_above(Priority::High), 1);
        counts.remove(Priority::Normal);
        counts.remove(Priority::Low);
        counts.remove(Priority::Low);
        assert_eq!(counts.at_or_above(Priority::Low), 2, "never below zero");
    }
}
