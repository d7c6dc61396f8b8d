//! Counters and histograms, lock-free on the request path, and their Prometheus text.
//!
//! Names follow NLB's CloudWatch metrics where NLB has one (`active_flow_count`,
//! `new_flow_count`, `processed_bytes`, `healthy_host_count`, `unhealthy_host_count`,
//! `tcp_target_reset_count`), in snake case under the `tidepool_` prefix.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tidepool_protocol::tls::HandshakeFailures;

use crate::hedge::Hedges;
use crate::outlier::Outliers;
use crate::retry::Retries;
use crate::target::{Target, TargetState};

/// Why a request was answered with an error by the balancer itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// The wait queue was full.
    QueueFull,
    /// The request waited in the queue past `--queue-timeout`.
    QueueTimeout,
    /// No target could take it.
    NoTarget,
    /// The upstream connection was lost after the request was written.
    ConnectionLost,
    /// The balancer was shutting down.
    ShuttingDown,
    /// The client cancelled it before it reached a target.
    Cancelled,
    /// The frame was not a valid request.
    BadRequest,
    /// Its deadline passed while it waited in the balancer.
    DeadlineExceeded,
    /// Predicted-finish admission: even the best eligible target was predicted to answer it
    /// after its deadline (`overloaded`).
    PredictedLate,
    /// Predicted-finish admission: its remaining budget was shorter than a batch of one on
    /// any target (`deadline_exceeded`).
    Doomed,
}

impl Reject {
    const ALL: [Reject; 10] = [
        Reject::QueueFull,
        Reject::QueueTimeout,
        Reject::NoTarget,
        Reject::ConnectionLost,
        Reject::ShuttingDown,
        Reject::Cancelled,
        Reject::BadRequest,
        Reject::DeadlineExceeded,
        Reject::PredictedLate,
        Reject::Doomed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reject::QueueFull => "queue_full",
            Reject::QueueTimeout => "queue_timeout",
            Reject::NoTarget => "no_target",
            Reject::ConnectionLost => "connection_lost",
            Reject::ShuttingDown => "shutting_down",
            Reject::Cancelled => "cancelled",
            Reject::BadRequest => "bad_request",
            Reject::DeadlineExceeded => "deadline_exceeded",
            Reject::PredictedLate => "predicted_late",
            Reject::Doomed => "doomed",
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds.
const LATENCY_BOUNDS_US: [u64; 20] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// A fixed-bucket histogram of durations: one atomic add per bucket hit, no lock.
#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// A histogram with latency buckets from 25 µs to 60 s.
    pub(crate) fn latency() -> Histogram {
        Histogram {
            buckets: Default::default(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub(crate) fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Each bucket's count so far, for differences over a window
    /// ([`LatencyCounts::quantile`]).
    pub(crate) fn counts(&self) -> LatencyCounts {
        LatencyCounts(std::array::from_fn(|i| {
            self.buckets[i].load(Ordering::Relaxed)
        }))
    }

    /// How many durations were recorded.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[LATENCY_BOUNDS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// The bucket counts of one or more [`Histogram`]s at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LatencyCounts(pub(crate) [u64; LATENCY_BOUNDS_US.len() + 1]);

impl LatencyCounts {
    /// Adds another histogram's counts (the pool's latency is the sum over its targets).
    pub(crate) fn add(mut self, other: LatencyCounts) -> LatencyCounts {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
        self
    }

    /// What was recorded since `earlier` (counts only grow; a target that left the pool
    /// takes its counts with it, hence the saturation).
    pub(crate) fn since(self, earlier: LatencyCounts) -> LatencyCounts {
        LatencyCounts(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }

    /// Durations counted.
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile, interpolated linearly inside its bucket; `None` without counts.
    /// The bucket above the last bound is read as its bound.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
        let mut below = 0u64;
        for (i, &n) in self.0.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] };
                let upper = LATENCY_BOUNDS_US.get(i).copied().unwrap_or(lower);
                let share = (rank - below as f64) / n as f64;
                let us = lower as f64 + share * (upper - lower) as f64;
                return Some(Duration::from_micros(us as u64));
            }
            below += n;
        }
        None
    }
}

/// Failed TLS handshakes per side, rendered as `tidepool_tls_handshake_failures_total`.
#[derive(Debug, Default)]
pub(crate) struct TlsFailures {
    /// On the client listener.
    pub(crate) client: Arc<HandshakeFailures>,
    /// On the admin API.
    pub(crate) admin: Arc<HandshakeFailures>,
    /// Towards targets (connections and health checks).
    pub(crate) upstream: Arc<HandshakeFailures>,
}

/// The balancer's counters, shared by every task.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Client connections open now.
    pub(crate) active_flows: AtomicU64,
    /// Client connections accepted, ever.
    pub(crate) new_flows: AtomicU64,
    /// Bytes read from and written to clients.
    pub(crate) processed_bytes: AtomicU64,
    /// Upstream connections that ended without the balancer closing them.
    pub(crate) target_resets: AtomicU64,
    /// Requests answered with an error by the balancer, by reason.
    rejected: [AtomicU64; Reject::ALL.len()],
    /// Time requests spent in the wait queue.
    pub(crate) queue_wait: Histogram,
    /// The limits that protect the balancer from its clients, each counted when it bites.
    pub(crate) limits: LimitCounters,
    /// Failed TLS handshakes, each side's counter shared with its acceptor or connector.
    pub(crate) tls_failures: TlsFailures,
    /// The retry policy and outlier detection, for their counters (set once at bind).
    pub(crate) recovery: OnceLock<(Retries, Outliers)>,
    /// How hedged requests' races ended.
    pub(crate) races: RaceCounters,
    /// Hedging, for its counters (set once at bind; `None` when off).
    pub(crate) hedging: OnceLock<Option<Hedges>>,
}

/// How the races of hedged requests (`--hedge-after`) ended.
#[derive(Debug, Default)]
pub(crate) struct RaceCounters {
    /// Races the hedge (the second attempt) won.
    pub(crate) won_by_hedge: AtomicU64,
    /// Results that arrived after another attempt had answered, dropped.
    pub(crate) late_dropped: AtomicU64,
}

/// How often each of the balancer's protective limits bit.
#[derive(Debug, Default)]
pub(crate) struct LimitCounters {
    /// Client connections refused at `--max-connections`.
    pub(crate) connections_refused: AtomicU64,
    /// Client connections closed because a started frame did not complete within
    /// `--frame-timeout`.
    pub(crate) frame_timeouts: AtomicU64,
    /// Client connections closed because their answers went unread for `--frame-timeout`.
    pub(crate) write_stalls: AtomicU64,
    /// Requests answered `deadline_exceeded` by the balancer after they were written to a
    /// target (`deadline_ms` or `--request-timeout`).
    pub(crate) request_timeouts: AtomicU64,
    /// The client frame budget, for its bytes held and its waits (set once at bind).
    pub(crate) budget: std::sync::OnceLock<tidepool_protocol::FrameBudget>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            active_flows: AtomicU64::new(0),
            new_flows: AtomicU64::new(0),
            processed_bytes: AtomicU64::new(0),
            target_resets: AtomicU64::new(0),
            rejected: Default::default(),
            queue_wait: Histogram::latency(),
            limits: LimitCounters::default(),
            tls_failures: TlsFailures::default(),
            recovery: OnceLock::new(),
            races: RaceCounters::default(),
            hedging: OnceLock::new(),
        }
    }
}

impl Metrics {
    pub(crate) fn reject(&self, reason: Reject) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition of everything, with per-target series for `targets`.
    pub(crate) fn render(&self, targets: &[Arc<Target>], queue_len: usize) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "tidepool_active_flow_count",
            "Client connections open now.",
            "gauge",
            load(&self.active_flows),
        );
        gauge(
            &mut out,
            "tidepool_new_flow_count",
            "Client connections accepted.",
            "counter",
            load(&self.new_flows),
        );
        gauge(
            &mut out,
            "tidepool_processed_bytes",
            "Bytes read from and written to clients.",
            "counter",
            load(&self.processed_bytes),
        );
        let healthy = targets
            .iter()
            .filter(|t| t.state() == TargetState::Healthy)
            .count();
        let unhealthy = targets
            .iter()
            .filter(|t| t.state() == TargetState::Unhealthy)
            .count();
        gauge(
            &mut out,
            "tidepool_healthy_host_count",
            "Targets in the healthy state.",
            "gauge",
            healthy as u64,
        );
        gauge(
            &mut out,
            "tidepool_unhealthy_host_count",
            "Targets in the unhealthy state.",
            "gauge",
            unhealthy as u64,
        );
        gauge(
            &mut out,
            "tidepool_tcp_target_reset_count",
            "Upstream connections closed by a target or lost.",
            "counter",
            load(&self.target_resets),
        );
        gauge(
            &mut out,
            "tidepool_queue_length",
            "Requests waiting in the balancer for a target below its limit.",
            "gauge",
            queue_len as u64,
        );
        if let Some(heap) = crate::heap::stats() {
            for (name, help, value) in [
                (
                    "tidepool_heap_allocated_bytes",
                    "Bytes the balancer has allocated and not freed (jemalloc's stats.allocated).",
                    heap.allocated,
                ),
                (
                    "tidepool_heap_resident_bytes",
                    "Bytes of the allocator's memory resident in RAM (jemalloc's stats.resident).",
                    heap.resident,
                ),
            ] {
                gauge(&mut out, name, help, "gauge", value);
            }
        }

        let limits = &self.limits;
        for (name, help, value) in [
            (
                "tidepool_connections_refused_total",
                "Client connections refused at --max-connections.",
                load(&limits.connections_refused),
            ),
            (
                "tidepool_frame_timeouts_total",
                "Client connections closed: a started frame did not complete within --frame-timeout.",
                load(&limits.frame_timeouts),
            ),
            (
                "tidepool_write_stalls_total",
                "Client connections closed: their answers went unread for --frame-timeout.",
                load(&limits.write_stalls),
            ),
            (
                "tidepool_request_timeouts_total",
                "Requests answered deadline_exceeded by the balancer after they reached a target.",
                load(&limits.request_timeouts),
            ),
            (
                "tidepool_frame_budget_waits_total",
                "Times a client connection stopped being read because its next frame did not fit the --frame-budget.",
                limits.budget.get().map_or(0, |b| b.waits()),
            ),
        ] {
            gauge(&mut out, name, help, "counter", value);
        }
        if let Some(budget) = limits.budget.get() {
            gauge(
                &mut out,
                "tidepool_frame_budget_held_bytes",
                "Bytes of client frames being read or held, of --frame-budget.",
                "gauge",
                budget.held() as u64,
            );
        }

        let _ = writeln!(out, "# HELP tidepool_rejected_total Requests answered with an error by the balancer, by reason.\n# TYPE tidepool_rejected_total counter");
        for reason in Reject::ALL {
            let _ = writeln!(
                out,
                "tidepool_rejected_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                load(&self.rejected[reason as usize])
            );
        }

        let _ = writeln!(out, "# HELP tidepool_tls_handshake_failures_total TLS handshakes that failed or timed out, by side.\n# TYPE tidepool_tls_handshake_failures_total counter");
        let tls = &self.tls_failures;
        for (side, failures) in [
            ("client", &tls.client),
            ("admin", &tls.admin),
            ("upstream", &tls.upstream),
        ] {
            let _ = writeln!(
                out,
                "tidepool_tls_handshake_failures_total{{side=\"{side}\"}} {}",
                failures.count()
            );
        }

        if let Some((retries, outliers)) = self.recovery.get() {
            render_recovery(&mut out, retries, outliers, targets);
        }

        if let Some(Some(hedges)) = self.hedging.get() {
            render_hedging(&mut out, hedges, &self.races);
        }

        let _ = writeln!(out, "# HELP tidepool_routed_total Requests routed to each target.\n# TYPE tidepool_routed_total counter");
        for t in targets {
            let _ = writeln!(
                out,
                "tidepool_routed_total{{target=\"{}\"}} {}",
                t.addr(),
                t.routed()
            );
        }
        let _ = writeln!(out, "# HELP tidepool_target_outstanding Requests outstanding on each target.\n# TYPE tidepool_target_outstanding gauge");
        for t in targets {
            let _ = writeln!(
                out,
                "tidepool_target_outstanding{{target=\"{}\",state=\"{}\"}} {}",
                t.addr(),
                t.state(),
                t.outstanding()
            );
        }
        let _ = writeln!(out, "# HELP tidepool_target_state Each target's state (1 for the current one).\n# TYPE tidepool_target_state gauge");
        for t in targets {
            let _ = writeln!(
                out,
                "tidepool_target_state{{target=\"{}\",state=\"{}\"}} 1",
                t.addr(),
                t.state()
            );
        }

        let _ = writeln!(out, "# HELP tidepool_queue_wait_seconds Time requests waited in the balancer's queue.\n# TYPE tidepool_queue_wait_seconds histogram");
        self.queue_wait
            .render(&mut out, "tidepool_queue_wait_seconds", "");
        let _ = writeln!(out, "# HELP tidepool_request_duration_seconds From reading a request to writing its answer, per target.\n# TYPE tidepool_request_duration_seconds histogram");
        for t in targets {
            t.latency.render(
                &mut out,
                "tidepool_request_duration_seconds",
                &format!("target=\"{}\"", t.addr()),
            );
        }
        out
    }
}

/// Hedging's counters and its delay now.
fn render_hedging(out: &mut String, hedges: &Hedges, races: &RaceCounters) {
    for (name, help, value) in [
        (
            "tidepool_hedges_total",
            "Requests sent to a second target because the first had not answered within --hedge-after.",
            hedges.sent(),
        ),
        (
            "tidepool_hedges_won_total",
            "Hedged requests whose second target answered first.",
            races.won_by_hedge.load(Ordering::Relaxed),
        ),
        (
            "tidepool_hedge_budget_exhausted_total",
            "Requests not hedged because the hedge budget was spent.",
            hedges.exhausted(),
        ),
        (
            "tidepool_hedges_unwatched_total",
            "Requests not hedged because too many were waiting out their delay at once.",
            hedges.unwatched(),
        ),
        (
            "tidepool_late_answers_dropped_total",
            "Results from the losing attempt of a hedged request, dropped (the client had its answer).",
            races.late_dropped.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    }
    let delay = hedges.delay().map_or(-1.0, |d| d.as_secs_f64());
    let _ = writeln!(out, "# HELP tidepool_hedge_delay_seconds The delay after which a request is hedged now (-1 while p99 is not known yet).\n# TYPE tidepool_hedge_delay_seconds gauge\ntidepool_hedge_delay_seconds {delay}");
}

/// The counters of retries on target loss and of outlier detection, and which targets are
/// ejected now.
fn render_recovery(
    out: &mut String,
    retries: &Retries,
    outliers: &Outliers,
    targets: &[Arc<Target>],
) {
    for (name, help, value) in [
        (
            "tidepool_retries_total",
            "Requests sent once more to another target after the connection they were written on was lost or their target turned unhealthy.",
            retries.retried(),
        ),
        (
            "tidepool_retries_unhealthy_total",
            "Of tidepool_retries_total, requests taken off a target that turned unhealthy while they waited for its answer (its connection still open).",
            retries.unhealthy(),
        ),
        (
            "tidepool_retry_budget_exhausted_total",
            "Lost requests answered unavailable, not retried, because the retry budget was spent.",
            retries.exhausted(),
        ),
        (
            "tidepool_ejections_capped_total",
            "Ejections not made because --max-ejection-percent of the pool was ejected already.",
            outliers.capped(),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    }
    let _ = writeln!(out, "# HELP tidepool_ejections_total Targets ejected by outlier detection, by reason.\n# TYPE tidepool_ejections_total counter");
    for (reason, n) in outliers.ejections() {
        let _ = writeln!(
            out,
            "tidepool_ejections_total{{reason=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    let _ = writeln!(out, "# HELP tidepool_target_ejected Each ejected target (1), with the reason.\n# TYPE tidepool_target_ejected gauge");
    for t in targets {
        if let Some(reason) = t.outlier.ejection() {
            let _ = writeln!(
                out,
                "tidepool_target_ejected{{target=\"{}\",reason=\"{}\"}} 1",
                t.addr(),
                reason.as_str()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::latency();
        h.record(Duration::from_micros(10));
        h.record(Duration::from_micros(60));
        h.record(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.000025\"} 1"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0001\"} 2"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("x_count 3"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[cfg(feature = "jemalloc")]
    #[test]
    fn the_heap_figures_are_rendered() {
        let out = Metrics::default().render(&[], 0);
        for name in [
            "tidepool_heap_allocated_bytes",
            "tidepool_heap_resident_bytes",
        ] {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing from {out}"));
            assert!(line[name.len() + 1..].parse::<u64>().is_ok(), "{line}");
        }
    }
}
