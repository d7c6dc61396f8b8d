//! # tidepool-bench
//!
//! The benchmarks behind `make bench` and BENCHMARKS.md: speed goals live here, as reports,
//! never in timed tests. Each binary measures its contenders side by side in one run (the
//! machines are small and shared, so only ratios and differences taken minutes apart mean
//! anything) and writes a Markdown report and a JSON document under `bench-out/`;
//! `scripts/bench.sh` builds everything in release mode, runs the binaries and assembles
//! BENCHMARKS.md.
//!
//! ## Binaries
//! - `bench-worker`: the synthetic 1 GiB model driven directly through ONNX Runtime at
//!   several batch sizes, against the worker at saturation, batching on against
//!   `--max-batch 1`, and latency at half of capacity (issue 3); and the worker's own CPU
//!   per item, in this process and in one of its own, on that model and a fast 8 MiB one
//!   (issue 16).
//! - `bench-text`: the worker on a synthetic transformer (`synth --kind transformer`) at
//!   mixed against fixed sentence lengths, and the batching gain over `--max-batch 1`
//!   (issue 13).
//! - `bench-balancer`: tidepool-balancer against HAProxy (TCP mode, `balance leastconn`) and
//!   against no balancer at all, in front of the same tiny targets: latency added, frames/s
//!   at saturation, and p99 over a skewed pool (issue 4).
//! - `bench-autoscale`: a compressed day of load against a pool fixed at the peak size and
//!   against the autoscaled pool (worker-seconds and seconds within a p99 objective), and
//!   the time from a step up in load to enough ready workers, taken apart (issue 6).
//! - `bench-slo`: the worker's fixed `--max-delay` batcher against the adaptive one with
//!   predicted-finish admission, open loop with deadlines (a third tight) from 50% to 150%
//!   of capacity, on each model given: goodput and p99 (issue 15).
//! - `bench-soak` (`make soak`, not in `make bench`): a long run at 70% of capacity with a
//!   worker SIGKILLed or frozen every few minutes; RSS slope per process and answers counted
//!   per request id (issue 11).
//! - `bench-target`: the tiny targets `bench-balancer` starts in a process of their own: an
//!   echo that answers at once, or a serial "model" with a fixed service time per item.
//!
//! ## Modules
//! - [`autoscale`]: an autoscaling balancer as a child process, a `GET /scaling` poller,
//!   worker-seconds, the share of seconds within an objective, worker starts from the logs.
//! - [`openloop`]: an open-loop driver on plain threads and blocking sockets, with latency
//!   from each request's intended send time at microsecond resolution.
//! - [`pipeline`]: a closed-loop, pipelined driver that keeps a window of frames in flight
//!   per connection, for frames/s at saturation.
//! - [`target`]: the echo and serial targets (`bench-target`).
//! - [`process`]: child processes that stop with their handle, free ports, waiting for a
//!   port to accept.
//! - [`report`]: the Markdown and JSON report each binary writes.
//! - [`saturate`]: a closed-loop driver over the protocol client, for a worker's capacity,
//!   mean batch size and latency at saturation.
//! - [`skewed`]: the skewed pool (one target five times slower) that `bench-balancer`,
//!   `bench-failover` and `bench-resilience` load at half its capacity.
//! - [`stats`]: latency summaries from HDR histograms.
//! - [`threads`]: CPU time per thread from `/proc`, grouped (driver, worker, ONNX Runtime).

pub mod autoscale;
pub mod openloop;
pub mod pipeline;
pub mod process;
pub mod report;
pub mod saturate;
pub mod skewed;
pub mod stats;
pub mod target;
pub mod threads;

use bytes::Bytes;
use tidepool_protocol::{DType, Tensor, Tensors};

/// A small item, `input: f32 [n]` of fixed values: what the balancer benchmarks send.
pub fn small_item(n: usize) -> Tensors {
    let data: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let tensor = Tensor::new(DType::F32, vec![n], Bytes::from(data))
        .unwrap_or_else(|_| unreachable!("the data has exactly n f32 values"));
    Tensors::from([("input".to_owned(), tensor)])
}
