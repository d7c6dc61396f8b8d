//! `tidepool-balancer`: parse the configuration, install logging, run until SIGTERM or
//! SIGINT, drain, exit.

use anyhow::Context;
use clap::Parser;
use tidepool_balancer::{Balancer, Config};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A closed stderr (a log piped into `head`) must not panic the signal handler.
        .log_internal_errors(false)
        .init();
    let config = Config::parse();
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
