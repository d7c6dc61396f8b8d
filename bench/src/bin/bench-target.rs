//! `bench-target`: tiny protocol targets for the balancer benchmarks, one listener per
//! `--service-us` (0: an echo that answers at once; N: a serial model taking N µs per item).
//! Prints `listening ADDR` per listener, in order, then serves until killed.

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Tiny targets for bench-balancer.
#[derive(Debug, Parser)]
struct Args {
    /// Service time of one target in µs (repeat for more targets); 0 answers at once.
    #[arg(long = "service-us", required = true)]
    service_us: Vec<u64>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for (i, &us) in args.service_us.iter().enumerate() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            println!("listening {}", listener.local_addr()?);
            tasks.push(tokio::spawn(tidepool_bench::target::serve(
                listener,
                Duration::from_micros(us),
                format!("target-{i}"),
                stop.clone(),
            )));
        }
        tokio::signal::ctrl_c().await?;
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}
