//! `bench-drive`: a fixed workload for profiling a balancer: `--frames` small frames per
//! connection, pipelined (`--window` in flight on each of `--connections`), then exit.
//!
//! The frames/s of `bench-balancer` depend on how busy the machine is; the instructions and
//! syscalls the balancer spends on a fixed number of frames do not, or much less. So
//! `scripts/profile-balancer.sh` runs the balancer under callgrind or `perf stat` while this
//! drives it, and divides by the frames. Prints one line: `frames F errors E seconds S`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use tidepool_bench::pipeline::{self, PipelineConfig};
use tidepool_bench::small_item;

/// A fixed number of pipelined small frames to one address.
#[derive(Debug, Parser)]
struct Args {
    /// Where to send (a balancer's client listener).
    #[arg(long)]
    addr: SocketAddr,
    /// Client connections, one thread each.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Frames in flight per connection.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Frames per connection; the run ends when each has had its answers.
    #[arg(long, default_value_t = 10_000)]
    frames: u64,
    /// f32 elements per item (as bench-balancer's small frames).
    #[arg(long, default_value_t = 16)]
    item_len: usize,
    /// Gives up after this long (a balancer under callgrind is ~50x slower).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    limit: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let config = PipelineConfig {
        addr: args.addr,
        connections: args.connections,
        window: args.window,
        warmup: Duration::ZERO,
        measure: Duration::ZERO,
        items: vec![small_item(args.item_len)],
        tls: None,
    };
    let result = pipeline::run_frames(&config, args.frames, args.limit)?;
    let expected = args.frames * args.connections as u64;
    println!(
        "frames {} errors {} seconds {:.3}",
        result.ok + result.errors,
        result.errors,
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        result.ok + result.errors == expected,
        "{} answers of {expected} within {:?}",
        result.ok + result.errors,
        args.limit
    );
    Ok(())
}
