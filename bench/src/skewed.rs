//! The skewed pool: four serial targets (`bench-target`, one item at a time, like a worker
//! with `--max-batch 1`), three fast and one five times slower, under open-loop Poisson
//! load at half their capacity over persistent client connections.
//!
//! Least outstanding should keep the slow target's backlog, and so the p99, low.
//! `bench-balancer` runs it through each router and HAProxy, `bench-failover` through one
//! balancer and through two side by side, `bench-resilience` with each hedging setting.
//! Each run starts fresh targets ([`start`]): a backlog left on the slow one must not carry
//! over.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::openloop::{OpenLoopConfig, OpenLoopResult};
use crate::process::{start_targets, Proc};
use crate::small_item;
use crate::stats::Latency;

/// A fast target's time per item.
pub const FAST: Duration = Duration::from_micros(1000);
/// The slow target's time per item: five times a fast one's.
pub const SLOW: Duration = Duration::from_micros(5000);
/// Each target's time per item; the last is the slow one.
pub const SERVICES: [Duration; 4] = [FAST, FAST, FAST, SLOW];
/// Persistent client connections the load is spread over.
pub const CONNECTIONS: usize = 8;

/// Items per second the four targets serve together.
pub fn capacity() -> f64 {
    SERVICES.iter().map(|s| 1.0 / s.as_secs_f64()).sum()
}

/// The offered load, requests per second: half of [`capacity`].
pub fn rate() -> f64 {
    capacity() * 0.5
}

/// Seconds of load and seconds then allowed for the last answers: a few in a quick smoke
/// run.
pub fn duration(quick: bool) -> (u64, u64) {
    if quick {
        (3, 2)
    } else {
        (12, 8)
    }
}

/// Fresh targets, in one `bench-target` process, and their addresses in [`SERVICES`]' order.
pub fn start() -> anyhow::Result<(Proc, Vec<SocketAddr>)> {
    start_targets(&SERVICES)
}

/// The open-loop run against `addr`: [`rate`] over [`CONNECTIONS`] for [`duration`], items
/// of `item_len` f32 elements.
pub fn load(addr: SocketAddr, quick: bool, seed: u64, item_len: usize) -> OpenLoopConfig {
    let (seconds, drain) = duration(quick);
    OpenLoopConfig {
        addr,
        connections: CONNECTIONS,
        rate: rate(),
        duration: Duration::from_secs(seconds),
        drain: Duration::from_secs(drain),
        seed,
        item: small_item(item_len),
    }
}

/// What every skewed-pool table shows of a run (flattened into each benchmark's row).
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered with a result.
    pub ok: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Requests with no answer by the end of the drain.
    pub unanswered: u64,
    /// Latency of the answered requests.
    pub latency: Latency,
    /// The share of results that came from the slow target.
    pub slow_share: f64,
}

impl Outcome {
    /// The figures of `r`.
    pub fn of(r: &OpenLoopResult) -> Outcome {
        let slow_name = format!("target-{}", SERVICES.len() - 1);
        let slow_ok = r.workers.get(&slow_name).copied().unwrap_or(0);
        Outcome {
            sent: r.sent,
            ok: r.ok,
            errors: r.errors,
            unanswered: r.unanswered,
            latency: Latency::of(&r.latency),
            slow_share: slow_ok as f64 / r.ok.max(1) as f64,
        }
    }

    /// The "results from the slow target" cell.
    pub fn slow_share_cell(&self) -> String {
        format!("{:.1}%", self.slow_share * 100.0)
    }

    /// The "sent / ok / errors / unanswered" cell.
    pub fn counts_cell(&self) -> String {
        format!(
            "{} / {} / {} / {}",
            self.sent, self.ok, self.errors, self.unanswered
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_is_half_of_what_the_pool_serves() {
        // 3 × 1000/s + 200/s.
        assert!((capacity() - 3200.0).abs() < 1e-9);
        assert!((rate() - 1600.0).abs() < 1e-9);
        assert_eq!(SLOW.as_micros(), 5 * FAST.as_micros());
    }

    #[test]
    fn a_quick_run_is_shorter() {
        let (seconds, drain) = duration(true);
        let (full, full_drain) = duration(false);
        assert!(seconds < full && drain < full_drain);
        let config = load(SocketAddr::from(([127, 0, 0, 1], 9)), true, 7, 16);
        assert_eq!(config.duration, Duration::from_secs(seconds));
        assert_eq!(config.connections, CONNECTIONS);
    }
}
