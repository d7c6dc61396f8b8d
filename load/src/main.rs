//! `tidepool-load`: parse flags, run the load until done or a signal, print the report.
//!
//! Exits 0 whenever a run happened, however many requests failed (they are in the report);
//! non-zero only when the run could not start (bad flags, target unreachable) or its
//! results could not be written.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tidepool_load::{run, CancellationToken, LoadConfig};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The crate's messages already carry their causes; print the chain once.
            eprintln!("tidepool-load: {error}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn start() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A closed stderr (a log piped into `head`) must not panic the signal handler.
        .log_internal_errors(false)
        .init();
    let config = LoadConfig::parse();
    config.validate()?;

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signals(shutdown.clone()));

    let report = run(config.clone(), shutdown).await?;

    let json_to_stdout = config.json.as_deref() == Some(Path::new("-"));
    if json_to_stdout {
        eprint!("{report}");
        println!("{}", report.to_json()?);
    } else {
        print!("{report}");
        if let Some(path) = &config.json {
            report.write_json(path)?;
        }
    }
    if let Some(path) = &config.timeline {
        let svg = report.write_timeline(path)?;
        eprintln!("timeline: {} and {}", path.display(), svg.display());
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// The first SIGINT or SIGTERM stops the schedule and drains; a second one exits at once.
async fn on_signals(shutdown: CancellationToken) {
    signal().await;
    eprintln!("\nstopping: draining requests in flight (signal again to quit now)");
    shutdown.cancel();
    signal().await;
    std::process::exit(130);
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
