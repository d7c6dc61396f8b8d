//! The worker's metrics, rendered as Prometheus text on `--metrics ADDR` (GET /metrics).
//!
//! Plain atomics and fixed-bucket histograms: the hot path only does relaxed increments, and
//! rendering reads whatever the counters hold at that moment (a scrape may see a histogram's
//! count one ahead of its buckets; Prometheus tolerates that).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::routing::get;
use axum::Router;
use tidepool_protocol::tls::HandshakeFailures;
use tidepool_protocol::{ErrorCode, FrameBudget};

use crate::busy::BusyMeter;
use crate::fairness::FairMetrics;
use crate::goodput::Goodput;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How an item ended, for `tidepool_worker_items_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with a result.
    Ok,
    /// Answered with an error of this code.
    Error(ErrorCode),
}

impl Outcome {
    fn index(self) -> usize {
        match self {
            Outcome::Ok => 0,
            Outcome::Error(code) => 1 + ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0),
        }
    }

    fn label(index: usize) -> &'static str {
        if index == 0 {
            "ok"
        } else {
            ErrorCode::ALL[index - 1].as_str()
        }
    }
}

const OUTCOMES: usize = 1 + ErrorCode::ALL.len();

/// A histogram over integer observations with fixed upper bounds, rendered in another unit
/// (microseconds observed, seconds exported).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, then the `+Inf` bucket; not cumulative (rendering accumulates).
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
    /// Exported value = observed / divisor.
    divisor: f64,
}

impl Histogram {
    fn new(bounds: &'static [u64], divisor: f64) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
            divisor,
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(&b) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"{}\"}} {cumulative}",
                        b as f64 / self.divisor
                    );
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 / self.divisor;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {}", self.count());
    }
}

const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512];
const MICROS_BOUNDS: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Everything the worker counts.
#[derive(Debug)]
pub struct Metrics {
    /// Items waiting in the batch queue (set by the batcher).
    pub queue_depth: AtomicI64,
    /// Items per batch run.
    pub batch_size: Histogram,
    /// Microseconds items waited between arrival and their batch starting.
    pub queue_time: Histogram,
    /// Microseconds per batch run.
    pub infer_time: Histogram,
    /// Open protocol connections.
    pub connections: AtomicI64,
    /// True once the model is loaded and warmed up, false again while draining.
    pub ready: AtomicBool,
    /// Connections closed because a started frame did not complete within --frame-timeout.
    pub frame_timeouts: AtomicU64,
    /// Connections closed after --idle-timeout with nothing in flight or arriving.
    pub idle_timeouts: AtomicU64,
    /// Connections refused because --max-connections were open.
    pub connections_refused: AtomicU64,
    /// TLS handshakes on the protocol listener that failed or timed out.
    pub tls_handshake_failures: Arc<HandshakeFailures>,
    items: [AtomicU64; OUTCOMES],
    device: OnceLock<&'static str>,
    frame_budget: OnceLock<FrameBudget>,
    /// The model thread's load share (what `pong` reports), busy share and queue delay (the
    /// batcher's model thread feeds it).
    pub busy: BusyMeter,
    /// Results against their deadlines, refusals by reason (the batcher counts them).
    pub goodput: Goodput,
    /// Items served per configured flow and flows active, with `--fairness` (the batcher's
    /// flows count them).
    pub fairness: Arc<FairMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            queue_depth: AtomicI64::new(0),
            batch_size: Histogram::new(BATCH_BOUNDS, 1.0),
            queue_time: Histogram::new(MICROS_BOUNDS, 1e6),
            infer_time: Histogram::new(MICROS_BOUNDS, 1e6),
            connections: AtomicI64::new(0),
            ready: AtomicBool::new(false),
            frame_timeouts: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            tls_handshake_failures: Arc::default(),
            items: std::array::from_fn(|_| AtomicU64::new(0)),
            device: OnceLock::new(),
            frame_budget: OnceLock::new(),
            busy: BusyMeter::default(),
            goodput: Goodput::default(),
            fairness: Arc::default(),
        }
    }
}

impl Metrics {
    /// Counts one answered item.
    pub fn item(&self, outcome: Outcome) {
        self.items[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Items answered with this outcome so far.
    pub fn items(&self, outcome: Outcome) -> u64 {
        self.items[outcome.index()].load(Ordering::Relaxed)
    }

    /// Records the frame budget whose use `/metrics` shows (once).
    pub fn set_frame_budget(&self, budget: FrameBudget) {
        let _ = self.frame_budget.set(budget);
    }

    /// Records the device the model runs on (once).
    pub fn set_device(&self, device: &'static str) {
        let _ = self.device.set(device);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP tidepool_worker_queue_depth Items waiting in the batch queue.\n\
             # TYPE tidepool_worker_queue_depth gauge\n\
             tidepool_worker_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        self.batch_size.render(
            &mut out,
            "tidepool_worker_batch_size",
            "Items per batch run.",
        );
        self.queue_time.render(
            &mut out,
            "tidepool_worker_queue_seconds",
            "Time items waited in the queue before their batch started.",
        );
        self.infer_time.render(
            &mut out,
            "tidepool_worker_inference_seconds",
            "Time per batch run.",
        );
        let _ = writeln!(
            out,
            "# HELP tidepool_worker_items_total Items answered, by outcome.\n\
             # TYPE tidepool_worker_items_total counter"
        );
        for (i, counter) in self.items.iter().enumerate() {
            let _ = writeln!(
                out,
                "tidepool_worker_items_total{{outcome=\"{}\"}} {}",
                Outcome::label(i),
                counter.load(Ordering::Relaxed)
            );
        }
        self.goodput.render(&mut out);
        self.fairness.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP tidepool_worker_connections Open protocol connections.\n\
             # TYPE tidepool_worker_connections gauge\n\
             tidepool_worker_connections {}\n\
             # HELP tidepool_worker_ready 1 when the model is loaded and the worker takes requests.\n\
             # TYPE tidepool_worker_ready gauge\n\
             tidepool_worker_ready {}",
            self.connections.load(Ordering::Relaxed),
            u8::from(self.ready.load(Ordering::Relaxed))
        );
        let counters: [(&str, &str, &AtomicU64); 3] = [
            (
                "tidepool_worker_frame_timeouts_total",
                "Connections closed because a started frame did not complete within --frame-timeout.",
                &self.frame_timeouts,
            ),
            (
                "tidepool_worker_idle_timeouts_total",
                "Connections closed after --idle-timeout with nothing in flight or arriving.",
                &self.idle_timeouts,
            ),
            (
                "tidepool_worker_connections_refused_total",
                "Connections refused because --max-connections were open.",
                &self.connections_refused,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        if let Some(budget) = self.frame_budget.get() {
            let _ = writeln!(
                out,
                "# HELP tidepool_worker_frame_budget_bytes Bytes of frames being read or held, all connections together.\n\
                 # TYPE tidepool_worker_frame_budget_bytes gauge\n\
                 tidepool_worker_frame_budget_bytes {}\n\
                 # HELP tidepool_worker_frame_budget_limit_bytes The frame budget (--frame-budget).\n\
                 # TYPE tidepool_worker_frame_budget_limit_bytes gauge\n\
                 tidepool_worker_frame_budget_limit_bytes {}\n\
                 # HELP tidepool_worker_frame_budget_waits_total Times a connection stopped being read because its next frame did not fit the budget.\n\
                 # TYPE tidepool_worker_frame_budget_waits_total counter\n\
                 tidepool_worker_frame_budget_waits_total {}",
                budget.held(),
                budget.total(),
                budget.waits()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tidepool_worker_tls_handshake_failures_total TLS handshakes on the protocol listener that failed or timed out.\n\
             # TYPE tidepool_worker_tls_handshake_failures_total counter\n\
             tidepool_worker_tls_handshake_failures_total {}",
            self.tls_handshake_failures.count()
        );
        let reading = self.busy.reading();
        let _ = writeln!(
            out,
            "# HELP tidepool_worker_busy_ratio Share of the worker's full-batch capacity the recent load used (the model thread's run time, each batch weighed by its fill against its cost), averaged over the last seconds (5 s time constant): pong's busy, the autoscaler's signal.\n\
             # TYPE tidepool_worker_busy_ratio gauge\n\
             tidepool_worker_busy_ratio {}\n\
             # HELP tidepool_worker_model_busy_ratio Fraction of wall time the model thread ran batches of any size, averaged the same way.\n\
             # TYPE tidepool_worker_model_busy_ratio gauge\n\
             tidepool_worker_model_busy_ratio {}\n\
             # HELP tidepool_worker_queue_delay_seconds Time items waited before their batch ran, averaged the same way.\n\
             # TYPE tidepool_worker_queue_delay_seconds gauge\n\
             tidepool_worker_queue_delay_seconds {}\n\
             # HELP tidepool_worker_single_batch_cost_ratio A batch of one item's run time over a full batch's, measured after warm-up.\n\
             # TYPE tidepool_worker_single_batch_cost_ratio gauge\n\
             tidepool_worker_single_batch_cost_ratio {}",
            reading.load_share,
            reading.busy,
            reading.queue_us / 1e6,
            self.busy.cost().single()
        );
        if let Some(capacity) = reading.capacity {
            let _ = writeln!(
                out,
                "# HELP tidepool_worker_capacity_items_per_second Items per second the model thread can run in full batches, from the recent batches' run times.\n\
                 # TYPE tidepool_worker_capacity_items_per_second gauge\n\
                 tidepool_worker_capacity_items_per_second {capacity}"
            );
        }
        if let Some(device) = self.device.get() {
            let _ = writeln!(
                out,
                "# HELP tidepool_worker_device The device the model runs on.\n\
                 # TYPE tidepool_worker_device gauge\n\
                 tidepool_worker_device{{device=\"{device}\"}} 1"
            );
        }
        out
    }
}

/// Serves GET /metrics on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// The address a metrics listener is bound to, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.batch_size.observe(3);
        m.batch_size.observe(32);
        m.queue_time.observe(1_500);
        m.infer_time.observe(42_000);
        m.item(Outcome::Ok);
        m.item(Outcome::Error(ErrorCode::Overloaded));
        m.set_device("cpu");
        m.queue_depth.store(7, Ordering::Relaxed);
        m.frame_timeouts.fetch_add(2, Ordering::Relaxed);
        let budget = FrameBudget::new(1 << 20, 1 << 20);
        let _held = budget.connection().try_acquire(1000).unwrap();
        m.set_frame_budget(budget);
        let text = m.render();
        for needle in [
            "tidepool_worker_frame_timeouts_total 2",
            "tidepool_worker_idle_timeouts_total 0",
            "tidepool_worker_connections_refused_total 0",
            "tidepool_worker_frame_budget_bytes 1000",
            "tidepool_worker_frame_budget_limit_bytes 1048576",
            "tidepool_worker_frame_budget_waits_total 0",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert!(text.contains("tidepool_worker_queue_depth 7"), "{text}");
        assert!(
            text.contains("tidepool_worker_batch_size_bucket{le=\"4\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_batch_size_bucket{le=\"32\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_batch_size_count 2"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_queue_seconds_bucket{le=\"0.0025\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_inference_seconds_sum 0.042"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_items_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_items_total{outcome=\"overloaded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_device{device=\"cpu\"} 1"),
            "{text}"
        );
    }
}
