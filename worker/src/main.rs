//! The `tidepool-worker` binary: parse the command line, install logging, run until SIGTERM or
//! SIGINT. Everything else lives in the library.

use anyhow::Context as _;
use clap::Parser as _;
use tidepool_worker::config::SynthKind;
use tidepool_worker::niceness::RuntimeNice;
use tidepool_worker::registration::RegisterToken;
use tidepool_worker::{inherited, synth, synth_transformer, Cli, Command, Worker};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc: the per-item allocations of the serving path cost
/// fewer instructions (scripts/profile-worker.sh). ONNX Runtime keeps its own allocator.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,ort=warn")),
        )
        .with_writer(std::io::stderr)
        // A closed stderr (a log piped into `head`) must not panic the signal handler.
        .log_internal_errors(false)
        .init();
    match cli.command {
        Command::Synth(config) if config.kind == SynthKind::Transformer => {
            let plan = synth_transformer::run(&config)
                .with_context(|| format!("synth --out {}", config.out.display()))?;
            println!(
                "{}: transformer, vocab {} → {} layers of width {} ({} heads) → embedding {}, \
                 {} bytes of weights; inputs input_ids:i64 and attention_mask:i64 [sequence]",
                config.out.display(),
                plan.vocab,
                plan.layers,
                plan.width,
                plan.heads,
                plan.width,
                plan.weight_bytes()
            );
            Ok(())
        }
        Command::Synth(config) => {
            let plan = synth::run(&config)
                .with_context(|| format!("synth --out {}", config.out.display()))?;
            println!(
                "{}: input {} → hidden {} x {} layers → output {}, {} bytes of weights",
                config.out.display(),
                plan.input_dim,
                plan.hidden,
                plan.layers,
                plan.output_dim,
                plan.weight_bytes()
            );
            Ok(())
        }
        Command::Serve(mut config) => {
            // The token's one way in besides a file: the environment, never a flag (`ps`).
            config.register_token = RegisterToken::from_env()?;
            // Before the runtime's threads exist: taking it clears LISTEN_FDS.
            let inherited = inherited::take_from_env();
            let nice = RuntimeNice::new(config.runtime_nice);
            let (on_start, on_stop) = (nice.clone(), nice.clone());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.io_threads())
                .enable_all()
                .thread_name("tidepool-io")
                .on_thread_start(move || {
                    if let Err(e) = on_start.on_thread_start() {
                        tracing::warn!(error = %e, "a runtime thread keeps the model's priority");
                    }
                })
                .on_thread_stop(move || on_stop.on_thread_stop())
                .build()
                .context("could not start the async runtime")?;
            let result = runtime.block_on(async move {
                let worker = Worker::start_inheriting(config, inherited).await?;
                let token = worker.shutdown_token();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    token.cancel();
                });
                // Lowered only once the model's threads exist: they start with the priority
                // of the runtime thread that spawns them, and could not raise it back.
                if worker.ready().await && nice.steps() > 0 {
                    match nice.lower() {
                        Ok(threads) => info!(
                            threads,
                            steps = nice.steps(),
                            "the runtime's threads run below the model's (--runtime-nice)"
                        ),
                        Err(e) => tracing::warn!(error = %e,
                            "the runtime's threads keep the model's priority"),
                    }
                }
                worker.wait().await?;
                Ok(())
            });
            // A model still loading when the signal came runs on a blocking thread that
            // cannot be interrupted; do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the worker runs until killed; say so rather than exit.
        tracing::error!("could not install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining (again to exit at once)"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}
