//! [`Goodput`]: answers counted against their deadline, and refusals by reason: what
//! serving to a latency objective is judged by (answers within their objective per second),
//! which the plain counts by error code do not show.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the worker refused or dropped an item without running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue was full (`overloaded`).
    QueueFull,
    /// A low-priority item while the queue was half full (`overloaded`).
    LowPriority,
    /// Predicted to finish after its deadline, refused on arrival (`overloaded`).
    PredictedLate,
    /// Could not finish by its deadline even alone: refused on arrival (a budget shorter than
    /// a batch of one) or dropped before its batch formed (`deadline_exceeded`).
    Doomed,
    /// Its deadline passed while it was queued (`deadline_exceeded`).
    Expired,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::QueueFull,
        Refusal::LowPriority,
        Refusal::PredictedLate,
        Refusal::Doomed,
        Refusal::Expired,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::LowPriority => "low_priority",
            Refusal::PredictedLate => "predicted_late",
            Refusal::Doomed => "doomed",
            Refusal::Expired => "expired",
        }
    }
}

/// Results by how they stood against their deadline, and refusals by reason.
#[derive(Debug, Default)]
pub struct Goodput {
    /// Results for items with a deadline, delivered to the connection by it.
    within: AtomicU64,
    /// Results for items with a deadline, after it.
    late: AtomicU64,
    /// Results for items without a deadline.
    unbounded: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl Goodput {
    /// Counts a result; `within` is `None` for an item without a deadline.
    pub fn answered(&self, within: Option<bool>) {
        let counter = match within {
            Some(true) => &self.within,
            Some(false) => &self.late,
            None => &self.unbounded,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Results within their deadline so far.
    pub fn within(&self) -> u64 {
        self.within.load(Ordering::Relaxed)
    }

    /// Results after their deadline so far.
    pub fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// Refusals for this reason so far.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Appends the Prometheus text.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP tidepool_worker_deadline_results_total Results by how they stood against the request's deadline_ms (within: goodput).\n\
             # TYPE tidepool_worker_deadline_results_total counter\n\
             tidepool_worker_deadline_results_total{{deadline=\"within\"}} {}\n\
             tidepool_worker_deadline_results_total{{deadline=\"late\"}} {}\n\
             tidepool_worker_deadline_results_total{{deadline=\"none\"}} {}\n\
             # HELP tidepool_worker_refused_total Items answered without running, by reason.\n\
             # TYPE tidepool_worker_refused_total counter",
            self.within(),
            self.late(),
            self.unbounded.load(Ordering::Relaxed),
        );
        for why in Refusal::ALL {
            let _ = writeln!(
                out,
                "tidepool_worker_refused_total{{reason=\"{}\"}} {}",
                why.as_str(),
                self.refusals(why)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_by_label() {
        let g = Goodput::default();
        g.answered(Some(true));
        g.answered(Some(true));
        g.answered(Some(false));
        g.answered(None);
        g.refused(Refusal::PredictedLate);
        let mut out = String::new();
        g.render(&mut out);
        assert!(out.contains("tidepool_worker_deadline_results_total{deadline=\"within\"} 2\n"));
        assert!(out.contains("tidepool_worker_deadline_results_total{deadline=\"late\"} 1\n"));
        assert!(out.contains("tidepool_worker_deadline_results_total{deadline=\"none\"} 1\n"));
        assert!(out.contains("tidepool_worker_refused_total{reason=\"predicted_late\"} 1\n"));
        assert!(out.contains("tidepool_worker_refused_total{reason=\"expired\"} 0\n"));
    }
}
