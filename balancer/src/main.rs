//! `tidepool-balancer`: parse the configuration, install logging, run until SIGTERM or
//! SIGINT, drain, exit.

use anyhow::Context;
use clap::Parser;
use tidepool_balancer::{AdminToken, Balancer, Config};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc: it returns the pages a burst of held frames freed,
/// where glibc kept the RSS at each burst's high-water mark (`tidepool_balancer::heap`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A closed stderr (a log piped into `head`) must not panic the signal handler.
        .log_internal_errors(false)
        .init();
    if let Err(error) = tidepool_balancer::heap::purge_in_background() {
        // Freed pages are still returned, only later: when the balancer next allocates.
        tracing::warn!(%error, "freed memory is returned to the system only on activity");
    }
    let mut config = Config::parse();
    // The token's one way in besides a file: the environment, never a flag (`ps`).
    config.admin_token = AdminToken::from_env().context("tidepool-balancer could not start")?;
    // Checked before the runtime starts its threads; `bind` checks the rest again.
    config
        .validate()
        .context("tidepool-balancer could not start")?;
    runtime(config.runtime_threads)
        .context("tidepool-balancer could not start its runtime")?
        .block_on(serve(config))
}

/// The async runtime `--runtime-threads` asks for.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

/// Binds, runs until a signal, drains.
async fn serve(config: Config) -> anyhow::Result<()> {
    let balancer = Balancer::bind(config)
        .await
        .context("tidepool-balancer could not start")?;
    tracing::info!(listen = %balancer.listen_addr(), admin = %balancer.admin_addr(), "bound");
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            shutdown.cancel();
        }
    });
    balancer
        .run(shutdown)
        .await
        .context("tidepool-balancer failed")
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; never resolve.
        tracing::warn!("could not install signal handlers");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
}
