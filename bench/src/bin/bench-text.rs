//! `bench-text`: the worker serving a synthetic transformer encoder (`tidepool-worker synth
//! --kind transformer`), the shape of a real text model, under sentences of mixed lengths
//! against sentences of one fixed length (issue 13). Writes `OUT/text.md` and
//! `OUT/text.json`.
//!
//! 1. Fixed: every sentence has the mean length; the worker batches as usual.
//! 2. Mixed: lengths spread uniformly from short to long (same mean); the worker pads each
//!    batch to its longest sentence. Goal: a mean batch size at least half of the fixed run's.
//! 3. Mixed with `--length-buckets`: batches of similar lengths, less padding.
//! 4. Mixed with `--max-batch 1`: the batching gain.
//!
//! Each run starts a fresh in-process worker on the same model and drives it closed-loop
//! with the same number of callers; the items come from the worker's own `metadata` answer
//! (tidepool-load's `items_from_metadata`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tidepool_bench::report::{machine, quick_note, CommonArgs, Report};
use tidepool_bench::saturate::{saturate, Saturation};
use tidepool_bench::stats::fmt_us;
use tidepool_protocol::{Client, Tensors};
use tidepool_worker::config::{SynthConfig, SynthKind};
use tidepool_worker::{DeviceChoice, ServeConfig, Worker};

/// Text-model benchmark: mixed against fixed sentence lengths, batching against none.
#[derive(Debug, Parser)]
struct Args {
    /// The model; written with the --width, --layers and --vocab below when missing.
    #[arg(long, default_value = "build/models/transformer.onnx")]
    model: PathBuf,
    /// The transformer's width when the model is written (BERT-base: 768).
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// The transformer's layers when the model is written (BERT-base: 12).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// The transformer's vocabulary when the model is written.
    #[arg(long, default_value_t = 1000)]
    vocab: usize,
    /// The library, the report directory, quick runs.
    #[command(flatten)]
    common: CommonArgs,
    /// Shortest and longest sentence of the mixed runs, as MIN..MAX; the fixed run uses
    /// their mean.
    #[arg(long, default_value = "8..128")]
    lengths: String,
    /// The worker's --max-batch in the batched runs.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// The worker's --length-buckets in the bucketed run.
    #[arg(long, value_delimiter = ',', default_value = "32,64,96")]
    buckets: Vec<usize>,
    /// Concurrent closed-loop callers [default: twice --max-batch].
    #[arg(long)]
    clients: Option<usize>,
    /// ONNX Runtime intra-op threads [default: ONNX Runtime's, one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
}

/// One worker configuration driven with one set of items.
struct Run {
    name: String,
    max_batch: usize,
    buckets: Vec<usize>,
    mixed: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (warmup, measure) = if args.common.report.quick {
        (Duration::from_secs(1), Duration::from_secs(3))
    } else {
        (Duration::from_secs(3), Duration::from_secs(15))
    };
    let (low, high) = args
        .lengths
        .split_once("..")
        .and_then(|(a, b)| {
            Some((
                a.trim().parse::<usize>().ok()?,
                b.trim().parse::<usize>().ok()?,
            ))
        })
        .filter(|&(a, b)| a >= 1 && a <= b)
        .context("--lengths: expected MIN..MAX, like 8..128")?;
    let mean = (low + high) / 2;
    if !args.model.is_file() {
        eprintln!("writing {}", args.model.display());
        tidepool_worker::synth_transformer::run(&SynthConfig {
            out: args.model.clone(),
            kind: SynthKind::Transformer,
            size: None,
            width: args.width,
            heads: None,
            vocab: args.vocab,
            input_dim: None,
            output_dim: None,
            layers: args.layers,
            seed: 0,
            ort_lib: Some(args.common.ort_lib.clone()),
        })?;
    }
    let clients = args.clients.unwrap_or(2 * args.max_batch);
    let runs = [
        Run {
            name: format!("fixed length {mean}"),
            max_batch: args.max_batch,
            buckets: Vec::new(),
            mixed: false,
        },
        Run {
            name: format!("mixed lengths {low}..{high}"),
            max_batch: args.max_batch,
            buckets: Vec::new(),
            mixed: true,
        },
        Run {
            name: format!(
                "mixed lengths {low}..{high}, `--length-buckets {}`",
                args.buckets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            max_batch: args.max_batch,
            buckets: args.buckets.clone(),
            mixed: true,
        },
        Run {
            name: format!("mixed lengths {low}..{high}, `--max-batch 1`"),
            max_batch: 1,
            buckets: Vec::new(),
            mixed: true,
        },
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results: Vec<(String, usize, Saturation)> = Vec::new();
    for run in &runs {
        eprintln!("text: {}", run.name);
        let sat = runtime.block_on(async {
            let worker = start_worker(&args, run).await?;
            let addr = worker.local_addr().to_string();
            let items = items(&addr, if run.mixed { (low, high) } else { (mean, mean) }).await?;
            let sat = saturate(&addr, &items, clients, warmup, measure).await?;
            worker.shutdown().await?;
            anyhow::Ok(sat)
        })?;
        eprintln!("text: {sat:?}");
        results.push((run.name.clone(), run.max_batch, sat));
    }

    let mut report = Report::new();
    report.para(&format!(
        "Machine: {}. Model: `{}` (synthetic transformer encoder: token ids and attention mask, \
         masked mean pool), `--device {:?}`. Each run: a fresh in-process worker, {clients} \
         closed-loop callers over 4 connections, {:.0} s counted after {:.0} s of warm-up; \
         sentences built from the worker's `metadata` answer, 256 distinct per run.{}",
        machine(),
        args.model.display(),
        args.device,
        measure.as_secs_f64(),
        warmup.as_secs_f64(),
        quick_note(args.common.report.quick)
    ));
    report.set_run(&args.model, args.common.report.quick);
    report.set("clients", clients);
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(name, max_batch, s)| {
            vec![
                name.clone(),
                format!("{max_batch}"),
                format!("{:.1}", s.items_per_second),
                fmt_us(s.latency.p50_us),
                fmt_us(s.latency.p99_us),
                format!("{:.1}", s.mean_batch),
                format!("{}", s.errors),
            ]
        })
        .collect();
    report.table(
        &[
            "sentences",
            "max batch",
            "items/s",
            "p50",
            "p99",
            "mean batch",
            "errors",
        ],
        &rows,
    );
    let (fixed, mixed, unbatched) = (&results[0].2, &results[1].2, &results[3].2);
    let share = mixed.mean_batch / fixed.mean_batch.max(f64::MIN_POSITIVE);
    let gain = mixed.items_per_second / unbatched.items_per_second.max(f64::MIN_POSITIVE);
    report.para(&format!(
        "**Goal: mean batch at mixed lengths at least half of fixed: {}** ({:.1} against {:.1}, \
         {share:.2}×). Batching gain at mixed lengths over `--max-batch 1`: {gain:.2}× items/s.",
        if share >= 0.5 { "met" } else { "missed" },
        mixed.mean_batch,
        fixed.mean_batch,
    ));
    report.set(
        "runs",
        results
            .iter()
            .map(|(name, max_batch, s)| serde_json::json!({"run": name, "max_batch": max_batch, "result": s}))
            .collect::<Vec<_>>(),
    );
    report.set("mixed_over_fixed_mean_batch", share);
    report.set("batching_gain", gain);
    report.write(&args.common.report.out, "text")?;
    println!("{}", report.markdown());
    Ok(())
}

async fn start_worker(args: &Args, run: &Run) -> anyhow::Result<Worker> {
    let mut config = ServeConfig::new(&args.model, "127.0.0.1:0");
    config.ort_lib = Some(args.common.ort_lib.clone());
    config.device = args.device;
    config.threads = args.threads;
    config.max_batch = run.max_batch;
    config.length_buckets = run.buckets.clone();
    let worker = Worker::start(config).await?;
    if !worker.ready().await {
        worker.wait().await?;
        bail!("the worker stopped before it was ready");
    }
    Ok(worker)
}

/// 256 sentences with lengths drawn from `lengths`, shaped from the worker's metadata.
async fn items(addr: &str, lengths: (usize, usize)) -> anyhow::Result<Vec<Tensors>> {
    let client = Client::connect(addr).await?;
    let model = client.metadata(Duration::from_secs(10)).await?;
    Ok(tidepool_load::input::items_from_metadata(
        &model, lengths, 256, 1,
    )?)
}
