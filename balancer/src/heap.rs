//! The balancer's heap as its allocator sees it: bytes in use against bytes resident, for
//! `/metrics` and the soak.
//!
//! The `tidepool-balancer` binary allocates with jemalloc (the `jemalloc` feature, on by
//! default). Under glibc's malloc its RSS climbed to the high-water mark of each burst of held
//! frames (a frozen worker, a backlog when the cores were taken) and stayed there although
//! the bytes in use fell back: glibc returns freed memory from the top of its heap only, and
//! one long-lived allocation above a burst pins everything below it. jemalloc hands the pages
//! of freed memory back after its decay time (`dirty_decay_ms`, 10 s), so RSS follows the
//! bytes in use; [`purge_in_background`] has a jemalloc thread do that on time even when no
//! request comes to trigger it.
//!
//! The figures are jemalloc's. In a process that links this library without making jemalloc
//! its global allocator (the tests, an embedding program) they count only what that process
//! gave jemalloc, which is nothing; without the feature there are none.

/// The allocator's totals at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes the program has allocated and not freed.
    pub allocated: u64,
    /// Bytes in the allocator's active pages: `allocated` plus the unused rest of those pages.
    pub active: u64,
    /// Bytes of the allocator's memory that are resident (its share of the RSS).
    pub resident: u64,
}

/// Reads the allocator's totals; `None` without the `jemalloc` feature, or when jemalloc
/// refuses (it was built without statistics).
pub fn stats() -> Option<HeapStats> {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        // The totals are cached; advancing the epoch refreshes them.
        epoch::advance().ok()?;
        let read = |v: Result<usize, tikv_jemalloc_ctl::Error>| v.ok().map(|v| v as u64);
        Some(HeapStats {
            allocated: read(stats::allocated::read())?,
            active: read(stats::active::read())?,
            resident: read(stats::resident::read())?,
        })
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        None
    }
}

/// Starts jemalloc's background thread, which returns freed pages to the system on the decay
/// schedule; without it, pages freed by a burst are returned only when the program next
/// allocates or frees, which an idle balancer may not do for a long time. Does nothing
/// without the `jemalloc` feature.
pub fn purge_in_background() -> Result<(), crate::Error> {
    #[cfg(feature = "jemalloc")]
    {
        tikv_jemalloc_ctl::background_thread::write(true)
            .map_err(|source| crate::Error::Allocator { source })?;
    }
    Ok(())
}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    use super::*;

    #[test]
    fn the_totals_are_consistent() {
        // Whatever this test process gave jemalloc (its global allocator is the system's):
        // the relations hold at any size, zero included.
        let stats = stats().expect("jemalloc is built with statistics");
        assert!(stats.allocated <= stats.active, "{stats:?}");
        assert!(
            stats.active <= stats.resident || stats.resident == 0,
            "{stats:?}"
        );
    }

    #[test]
    fn the_background_thread_starts() {
        purge_in_background().expect("jemalloc supports a background thread");
        assert_eq!(
            tikv_jemalloc_ctl::background_thread::read().ok(),
            Some(true)
        );
    }
}
