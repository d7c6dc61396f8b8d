//! `bench-worker`: the worker on the synthetic 1 GiB model against the same ONNX Runtime
//! session driven directly, in one process and one run (issue 3's benchmark). Writes
//! `OUT/worker.md` and `OUT/worker.json`.
//!
//! 1. Direct: `Model::run` in a loop at each batch size; the best is the ceiling.
//! 2. The worker (in-process, default batching) saturated by concurrent clients.
//! 3. The same worker at half of the rate it sustained: open-loop latency (tidepool-load's
//!    library, latency from intended send time).
//! 4. The worker with `--max-batch 1`, saturated the same way.
//! 5. The worker's own cost per item (issue 16), on the same model and, with `--fast-model`,
//!    on a model fast enough that the worker rather than the model sets the pace: the
//!    worker in this process and in a process of its own (`tidepool-worker serve`, driven
//!    over TCP from here by the pipelined driver of `tidepool_bench::pipeline`, which encodes
//!    each item once and reads answers with the raw scanner), with the CPU of the window
//!    split per thread (`/proc/*/task/*/schedstat`) into the driver's, the async runtime's,
//!    the model thread's and ONNX Runtime's pool threads', against ONNX Runtime's own CPU per
//!    item when driven directly: in items/s and in items per CPU-second. On the fast model
//!    direct's best is the best over every configuration the worker can run (one session
//!    with ONNX Runtime's threads spinning or not, two sessions side by side with one thread
//!    each), the worker runs also with `--instances 2 --threads 2`, and direct and the
//!    worker are measured in interleaved rounds; the verdict compares the worker's best
//!    configuration with direct's best, both named.
//!
//! Each phase loads the model afresh and drops it before the next, so that only one copy
//! is ever in memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use clap::ValueEnum as _;
use serde::Serialize;
use tidepool_bench::pipeline::{self, PipelineConfig};
use tidepool_bench::process::{free_port, sibling_exe, Proc};
use tidepool_bench::report::{machine, quick_note, CommonArgs, Report};
use tidepool_bench::saturate::{saturate, saturate_probed, Saturation};
use tidepool_bench::stats::fmt_us;
use tidepool_bench::threads::{CpuSplit, ThreadSample};
use tidepool_load::{CancellationToken, InputSpec, LoadConfig};
use tidepool_protocol::Tensors;
use tidepool_worker::{affinity, DeviceChoice, LoadOptions, Model, ModelSpec, ServeConfig, Worker};

/// Worker benchmark: worker vs direct ONNX Runtime, batching vs none, latency at half load.
#[derive(Debug, Parser)]
struct Args {
    /// The model (tidepool-worker synth --size 1GiB).
    #[arg(long, default_value = "build/models/synth-1gib.onnx")]
    model: PathBuf,
    /// The library, the report directory, quick runs.
    #[command(flatten)]
    common: CommonArgs,
    /// Batch sizes tried in the direct run.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32,64")]
    batches: Vec<usize>,
    /// The worker's --max-batch in the batched runs [default: the best direct batch size].
    #[arg(long)]
    max_batch: Option<usize>,
    /// Concurrent requests at saturation (closed loop) [default: twice --max-batch, so that
    /// a full batch is queued while the previous one runs].
    #[arg(long)]
    clients: Option<usize>,
    /// Where the model runs, for the direct runs and the worker alike (`cuda` needs a build
    /// with `--features tidepool-worker/cuda` and the onnxruntime-gpu library).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    /// A model fast enough that the worker's own cost per item sets the pace (`tidepool-worker
    /// synth --size 8MiB --input-dim 1024 --output-dim 10 --layers 3`); measured in section 5
    /// beside `--model`.
    #[arg(long)]
    fast_model: Option<PathBuf>,
}

/// Phase lengths.
struct Timing {
    direct_per_batch: Duration,
    warmup: Duration,
    measure: Duration,
    unbatched_measure: Duration,
    latency: Duration,
}

#[derive(Clone, Copy, Debug, Serialize)]
struct DirectRow {
    batch: usize,
    runs: u64,
    ms_per_run: f64,
    items_per_second: f64,
    /// CPU of the whole process (the calling thread and ONNX Runtime's pool) per item: ONNX
    /// Runtime's own cost, the copy into its input buffer included.
    cpu_us_per_item: f64,
    /// Whether ONNX Runtime's intra-op threads spun (its default).
    spinning: bool,
    /// Sessions run side by side, each on its own thread with one intra-op thread (what the
    /// worker's `--instances` does); 1: one session with ONNX Runtime's default threads.
    instances: usize,
}

impl DirectRow {
    /// How the row ran, for the tables.
    fn how(&self) -> String {
        let mut how = format!("batch {}", self.batch);
        if self.instances > 1 {
            how.push_str(&format!(
                ", {} sessions side by side (1 intra-op thread each)",
                self.instances
            ));
        }
        if !self.spinning {
            how.push_str(", spinning off");
        }
        how
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let timing = if args.common.report.quick {
        Timing {
            direct_per_batch: Duration::from_secs(1),
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(3),
            unbatched_measure: Duration::from_secs(3),
            latency: Duration::from_secs(4),
        }
    } else {
        Timing {
            direct_per_batch: Duration::from_secs(4),
            warmup: Duration::from_secs(4),
            measure: Duration::from_secs(20),
            unbatched_measure: Duration::from_secs(15),
            latency: Duration::from_secs(20),
        }
    };
    if !args.model.is_file() {
        bail!(
            "{} is missing; make it with tidepool-worker synth --out {} --size 1GiB",
            args.model.display(),
            args.model.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-io")
        .build()?;
    let mut report = Report::new();
    report.para(&format!(
        "Machine: {}. Model: `{}` ({:.2} GiB of weights), `--device {}`, ONNX Runtime's default \
         intra-op threads (one per core).{}",
        machine(),
        args.model.display(),
        weight_bytes(&args.model) as f64 / f64::from(1u32 << 30),
        args.device
            .to_possible_value()
            .map_or_else(|| "cpu".to_owned(), |v| v.get_name().to_owned()),
        quick_note(args.common.report.quick)
    ));
    report.set_run(&args.model, args.common.report.quick);

    eprintln!("direct: loading the model");
    let (spec, direct) = direct(&args, &args.model, &timing, None, &args.batches)?;
    let best = direct
        .iter()
        .copied()
        .max_by(|a, b| a.items_per_second.total_cmp(&b.items_per_second))
        .context("no batch size measured")?;
    let items = tidepool_load::input::build_items(&input_specs(&spec), 16, 1)?;
    let max_batch = args.max_batch.unwrap_or(best.batch);
    let clients = args.clients.unwrap_or(2 * max_batch);

    eprintln!("worker: batched (--max-batch {max_batch})");
    let (batched, latency) = runtime.block_on(async {
        let worker = start_worker(&args, &args.model, max_batch).await?;
        let addr = worker.local_addr().to_string();
        let (sat, opened, closed) = saturate_probed(
            &addr,
            &items,
            clients,
            timing.warmup,
            timing.measure,
            || ThreadSample::take(None),
        )
        .await?;
        let in_process = CpuSplit::of(&opened, &closed, in_process_group);
        eprintln!(
            "worker: latency at half of {:.1} items/s",
            sat.items_per_second
        );
        let mut load = LoadConfig::new(addr);
        load.rate = sat.items_per_second / 2.0;
        load.duration = timing.latency;
        load.inputs = input_specs(&spec);
        load.connections = 4;
        load.drain = Duration::from_secs(30);
        let latency = tidepool_load::run(load, CancellationToken::new()).await?;
        worker.shutdown().await?;
        anyhow::Ok(((sat, in_process), latency))
    })?;
    let (batched, batched_cpu) = batched;

    eprintln!("worker: unbatched (--max-batch 1)");
    let unbatched = runtime.block_on(async {
        let worker = start_worker(&args, &args.model, 1).await?;
        let addr = worker.local_addr().to_string();
        let sat = saturate(
            &addr,
            &items,
            clients,
            timing.warmup,
            timing.unbatched_measure,
        )
        .await?;
        worker.shutdown().await?;
        anyhow::Ok(sat)
    })?;

    let mut costs = vec![Cost {
        model: args.model.clone(),
        best,
        at_batch: row_at(&direct, max_batch),
        max_batch,
        clients,
        in_process: Split::new(batched, batched_cpu),
        instances: None,
        instances_batch: max_batch,
        at_instances_batch: row_at(&direct, max_batch),
        rounds: Vec::new(),
        own_process: own_process(
            &args,
            &runtime,
            &Drive {
                model: &args.model,
                max_batch,
                clients,
                items: &items,
            },
            &timing,
            &[],
        )?,
        before: None,
        goal: 0.95,
    }];
    if let Some(fast) = &args.fast_model {
        costs.push(fast_cost(&args, &runtime, fast, &timing)?);
    }

    let runs = Runs {
        clients,
        max_batch,
        best,
        batched,
        unbatched,
    };
    write_report(&mut report, &timing, &direct, &runs, &latency);
    write_costs(&mut report, &timing, &costs);
    report.write(&args.common.report.out, "worker")?;
    println!("{}", report.markdown());
    Ok(())
}

/// Bytes of the model file and its external data.
fn weight_bytes(model: &std::path::Path) -> u64 {
    let data = PathBuf::from(format!("{}.data", model.display()));
    [model.to_path_buf(), data]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// The model's inputs as tidepool-load specs, dynamic dimensions set to 1.
fn input_specs(spec: &ModelSpec) -> Vec<InputSpec> {
    spec.inputs
        .iter()
        .map(|io| InputSpec {
            name: io.name.clone(),
            dtype: io.dtype,
            shape: io
                .item_dims(spec.batched)
                .iter()
                .map(|d| d.unwrap_or(1))
                .collect(),
        })
        .collect()
}

/// Loads the model and runs it directly at each batch size, on a thread of its own that is
/// pinned as the worker pins its model thread (`--pin-model-thread`, on by default): to the
/// cores ONNX Runtime's default pinning of its pool left free. Direct and the worker then
/// differ by the worker's own work, not by where the scheduler put the calling thread.
fn direct(
    args: &Args,
    path: &std::path::Path,
    timing: &Timing,
    spinning: Option<bool>,
    batches: &[usize],
) -> anyhow::Result<(ModelSpec, Vec<DirectRow>)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| direct_pinned(args, path, timing, spinning, batches))
            .join()
            .map_err(|_| anyhow::anyhow!("the direct run panicked"))?
    })
}

fn direct_pinned(
    args: &Args,
    path: &std::path::Path,
    timing: &Timing,
    spinning: Option<bool>,
    batches: &[usize],
) -> anyhow::Result<(ModelSpec, Vec<DirectRow>)> {
    let started = Instant::now();
    // The threads that start while the model loads are ONNX Runtime's intra-op pool.
    let before = affinity::Threads::snapshot();
    let mut model = Model::load(&LoadOptions {
        path: path.to_path_buf(),
        ort_lib: args.common.ort_lib.clone(),
        device: args.device,
        threads: None,
        spinning,
        padding: tidepool_worker::PaddingOptions::default(),
    })?;
    model.warm_up(&tidepool_worker::WarmUp::batch(
        batches.iter().copied().max().unwrap_or(1),
    ))?;
    eprintln!("direct: loaded in {:.1?}", started.elapsed());
    match affinity::model_cpus(&before)? {
        Some(cpus) => {
            affinity::pin_current_thread(&cpus)?;
            eprintln!("direct: the calling thread pinned to CPUs {cpus:?}, as the worker's model thread");
        }
        None => eprintln!("direct: ONNX Runtime pinned no pool thread; the calling thread is left unpinned, as the worker's"),
    }
    let spec = (**model.spec()).clone();
    let pool = tidepool_load::input::build_items(&input_specs(&spec), 64, 0)?;
    let mut rows = Vec::new();
    for &batch in batches {
        let items: Vec<&Tensors> = (0..batch).map(|i| &pool[i % pool.len()]).collect();
        model.run(&items)?; // one unmeasured run at this size
        let cpu_before = ThreadSample::take(None);
        let started = Instant::now();
        let mut runs = 0u64;
        while runs < 2 || started.elapsed() < timing.direct_per_batch {
            model.run(&items)?;
            runs += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = CpuSplit::of(&cpu_before, &ThreadSample::take(None), |_, _| String::new());
        let row = DirectRow {
            batch,
            runs,
            ms_per_run: secs * 1000.0 / runs as f64,
            items_per_second: (batch as u64 * runs) as f64 / secs,
            cpu_us_per_item: cpu.total * 1e6 / (batch as u64 * runs) as f64,
            spinning: spinning.unwrap_or(true),
            instances: 1,
        };
        eprintln!("direct: {row:?}");
        rows.push(row);
    }
    Ok((spec, rows))
}

/// `instances` sessions of the model, each with one intra-op thread (not spinning) and run
/// in a loop on a thread of its own, all at once, at each of `batches`: the worker's
/// `--instances` without the worker. Items/s and CPU per item are the sum over the threads.
fn direct_side_by_side(
    args: &Args,
    path: &std::path::Path,
    timing: &Timing,
    instances: usize,
    batches: &[usize],
) -> anyhow::Result<Vec<DirectRow>> {
    let options = LoadOptions {
        path: path.to_path_buf(),
        ort_lib: args.common.ort_lib.clone(),
        device: args.device,
        threads: Some(1),
        spinning: Some(false),
        padding: tidepool_worker::PaddingOptions::default(),
    };
    let largest = batches.iter().copied().max().unwrap_or(1);
    let mut models = Vec::with_capacity(instances);
    for _ in 0..instances {
        let mut model = Model::load(&options)?;
        model.warm_up(&tidepool_worker::WarmUp::batch(largest))?;
        models.push(model);
    }
    let spec = (**models[0].spec()).clone();
    let pool = tidepool_load::input::build_items(&input_specs(&spec), 64, 0)?;
    let mut rows = Vec::new();
    for &batch in batches {
        let items: Vec<&Tensors> = (0..batch).map(|i| &pool[i % pool.len()]).collect();
        // Every thread waits at `start`, at `end` (so that the closing CPU sample sees them
        // all: an exited thread's CPU time leaves /proc) and at `leave`, whatever its runs
        // returned, so that an error cannot leave the others waiting.
        let [start, end, leave] =
            std::array::from_fn::<_, 3, _>(|_| std::sync::Barrier::new(instances + 1));
        let (runs, secs, cpu) = std::thread::scope(|scope| {
            let threads: Vec<_> = models
                .iter_mut()
                .map(|model| {
                    let (items, start, end, leave) = (&items, &start, &end, &leave);
                    scope.spawn(move || -> anyhow::Result<u64> {
                        let warm = model.run(items); // one unmeasured run at this size
                        start.wait();
                        let runs = warm.map_err(anyhow::Error::from).and_then(|_| {
                            let started = Instant::now();
                            let mut runs = 0u64;
                            while runs < 2 || started.elapsed() < timing.direct_per_batch {
                                model.run(items)?;
                                runs += 1;
                            }
                            anyhow::Ok(runs)
                        });
                        end.wait();
                        leave.wait();
                        runs
                    })
                })
                .collect();
            start.wait();
            let cpu_before = ThreadSample::take(None);
            let started = Instant::now();
            end.wait();
            let secs = started.elapsed().as_secs_f64();
            let cpu = CpuSplit::of(&cpu_before, &ThreadSample::take(None), |_, _| String::new());
            leave.wait();
            let mut runs = 0u64;
            for thread in threads {
                runs += thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("a direct run panicked"))??;
            }
            anyhow::Ok((runs, secs, cpu))
        })?;
        let row = DirectRow {
            batch,
            runs,
            ms_per_run: secs * 1000.0 * instances as f64 / runs as f64,
            items_per_second: (batch as u64 * runs) as f64 / secs,
            cpu_us_per_item: cpu.total * 1e6 / (batch as u64 * runs) as f64,
            spinning: false,
            instances,
        };
        eprintln!("direct side by side: {row:?}");
        rows.push(row);
    }
    Ok(rows)
}

async fn start_worker(
    args: &Args,
    model: &std::path::Path,
    max_batch: usize,
) -> anyhow::Result<Worker> {
    let mut config = ServeConfig::new(model, "127.0.0.1:0");
    config.ort_lib = Some(args.common.ort_lib.clone());
    config.device = args.device;
    config.max_batch = max_batch;
    let worker = Worker::start(config).await?;
    if !worker.ready().await {
        worker.wait().await?;
        bail!("the worker stopped before it was ready");
    }
    Ok(worker)
}

/// The thread groups of a worker in this process (the driver shares its async runtime).
fn in_process_group(_tid: u32, name: &str) -> String {
    match name {
        // The default runtime's threads, their names cut to 15 bytes by the kernel.
        "bench-io" => "runtime (driver and worker)".to_owned(),
        "tidepool-model" => "model thread".to_owned(),
        // The worker loads its model on this thread; ONNX Runtime's pool inherits the name.
        "tidepool-ort" => "ONNX Runtime pool".to_owned(),
        _ => "other".to_owned(),
    }
}

/// The thread groups of a `tidepool-worker serve` process.
fn own_process_group(_tid: u32, name: &str) -> String {
    match name {
        "tidepool-io" => "runtime".to_owned(),
        "tidepool-model" => "model thread".to_owned(),
        "tidepool-ort" => "ONNX Runtime pool".to_owned(),
        _ => "other".to_owned(),
    }
}

/// The fastest direct row at `batch`, else the best.
fn row_at(direct: &[DirectRow], batch: usize) -> DirectRow {
    direct
        .iter()
        .copied()
        .filter(|r| r.batch == batch)
        .max_by(|a, b| a.items_per_second.total_cmp(&b.items_per_second))
        .or_else(|| best_row(direct))
        .unwrap_or(DirectRow {
            batch,
            runs: 0,
            ms_per_run: 0.0,
            items_per_second: 0.0,
            cpu_us_per_item: 0.0,
            spinning: true,
            instances: 1,
        })
}

fn best_row(direct: &[DirectRow]) -> Option<DirectRow> {
    direct
        .iter()
        .copied()
        .max_by(|a, b| a.items_per_second.total_cmp(&b.items_per_second))
}

/// One saturation run with its CPU split per thread group over the window.
#[derive(Clone, Debug, Serialize)]
struct Split {
    sat: Saturation,
    /// The worker's process (in-process: the whole process, driver included).
    worker: CpuSplit,
    /// The driver's process, when it is another one.
    driver: Option<CpuSplit>,
}

impl Split {
    fn new(sat: Saturation, worker: CpuSplit) -> Split {
        Split {
            sat,
            worker,
            driver: None,
        }
    }

    /// Microseconds of CPU per item answered in the window.
    fn per_item(&self, secs: f64) -> f64 {
        secs * 1e6 / self.sat.items.max(1) as f64
    }
}

/// Section 5 for one model.
#[derive(Clone, Debug, Serialize)]
struct Cost {
    model: PathBuf,
    /// Direct's best batch size.
    best: DirectRow,
    /// Direct at the worker's `--max-batch`: ONNX Runtime's own CPU per item there.
    at_batch: DirectRow,
    max_batch: usize,
    clients: usize,
    in_process: Split,
    own_process: Split,
    /// The worker in its own process with the thread settings of before issue 16
    /// ([`BEFORE_ISSUE_16`]), side by side with today's defaults.
    before: Option<Split>,
    /// The worker in its own process with [`INSTANCES`] (the fast model only: two sessions
    /// of the large one would double its gigabyte): the best of its rounds.
    instances: Option<Split>,
    /// Its `--max-batch`: where two direct sessions side by side ran best.
    instances_batch: usize,
    /// Direct at `instances_batch` (its best configuration there): what the worker with
    /// instances is weighed against per CPU-second.
    at_instances_batch: DirectRow,
    /// Direct's best and the worker's runs in the order they ran, interleaved (the fast
    /// model only), so that a drift of the machine shows on both sides.
    rounds: Vec<Round>,
    /// The least share of direct's best the worker in its own process should serve (issue
    /// 16: 0.8 on the fast model, 0.95 on the large one).
    goal: f64,
}

/// One round of the interleaved runs of the fast model.
#[derive(Clone, Copy, Debug, Serialize)]
struct Round {
    /// Direct's best configuration in this round (the first round's sweeps every batch
    /// size; later rounds rerun each configuration at the worker's `--max-batch`).
    direct: DirectRow,
    /// The worker in its own process with its defaults, items/s.
    worker: f64,
    /// The worker in its own process with [`INSTANCES`], items/s.
    instances: f64,
}

/// Rounds of direct, worker, worker with instances on the fast model.
const ROUNDS: usize = 2;

/// The worker's model instances in section 5: two sessions with one intra-op thread each,
/// as direct's side-by-side runs.
const INSTANCES: [&str; 4] = ["--instances", "2", "--threads", "2"];

/// The worker's thread settings before issue 16: ONNX Runtime's threads spinning between
/// batches, and an async runtime thread per core (2 here).
const BEFORE_ISSUE_16: [&str; 4] = ["--ort-spinning", "true", "--runtime-threads", "2"];

/// Direct, in-process and own-process runs of the fast model.
fn fast_cost(
    args: &Args,
    runtime: &tokio::runtime::Runtime,
    model: &std::path::Path,
    timing: &Timing,
) -> anyhow::Result<Cost> {
    eprintln!("fast model: direct");
    let (spec, mut direct) = direct_configurations(args, model, timing, &args.batches)?;
    let first = best_row(&direct).context("no batch size measured")?;
    // Each worker configuration runs at the batch size its direct counterpart ran best at:
    // the defaults at one session's, `--instances 2` at the side-by-side sessions'.
    let best_of = |instances: usize| {
        best_row(
            &direct
                .iter()
                .copied()
                .filter(|r| r.instances == instances)
                .collect::<Vec<_>>(),
        )
        .map_or(first.batch, |r| r.batch)
    };
    let max_batch = args.max_batch.unwrap_or_else(|| best_of(1));
    let instances_batch = args.max_batch.unwrap_or_else(|| best_of(2));
    let clients = args.clients.unwrap_or(2 * max_batch);
    let items = tidepool_load::input::build_items(&input_specs(&spec), 16, 1)?;
    eprintln!("fast model: the worker in this process (--max-batch {max_batch})");
    let in_process = runtime.block_on(async {
        let worker = start_worker(args, model, max_batch).await?;
        let addr = worker.local_addr().to_string();
        let (sat, opened, closed) = saturate_probed(
            &addr,
            &items,
            clients,
            timing.warmup,
            timing.measure,
            || ThreadSample::take(None),
        )
        .await?;
        worker.shutdown().await?;
        anyhow::Ok(Split::new(
            sat,
            CpuSplit::of(&opened, &closed, in_process_group),
        ))
    })?;
    let drive = Drive {
        model,
        max_batch,
        clients,
        items: &items,
    };
    let before = own_process(args, runtime, &drive, timing, &BEFORE_ISSUE_16)?;
    // Direct and the worker interleaved, so that a machine that drifts (direct's own CPU
    // per item moved 28% between two quiet runs) drifts under both; the best of each
    // configuration's rounds counts.
    let mut rounds = Vec::with_capacity(ROUNDS);
    let (mut todays, mut with_instances) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let direct_best = if round == 0 {
            first
        } else {
            eprintln!("fast model: direct again (round {})", round + 1);
            let mut sizes = vec![max_batch, instances_batch];
            sizes.dedup();
            let (_, again) = direct_configurations(args, model, timing, &sizes)?;
            let best = best_row(&again).context("no batch size measured")?;
            direct.extend(again);
            best
        };
        let today = own_process(args, runtime, &drive, timing, &[])?;
        // Two batches running and one formed ahead: three batches' worth of callers.
        let drive_instances = Drive {
            max_batch: instances_batch,
            clients: args.clients.unwrap_or(3 * instances_batch),
            ..drive
        };
        let instances = own_process(args, runtime, &drive_instances, timing, &INSTANCES)?;
        rounds.push(Round {
            direct: direct_best,
            worker: today.sat.items_per_second,
            instances: instances.sat.items_per_second,
        });
        todays.push(today);
        with_instances.push(instances);
    }
    Ok(Cost {
        model: model.to_path_buf(),
        best: best_row(&direct).context("no batch size measured")?,
        at_batch: row_at(&direct, max_batch),
        max_batch,
        clients,
        in_process,
        own_process: fastest(todays).context("no worker round")?,
        instances: fastest(with_instances),
        instances_batch,
        at_instances_batch: row_at(&direct, instances_batch),
        rounds,
        before: Some(before),
        goal: 0.8,
    })
}

/// Every configuration the worker can run the model in, driven directly, at `batches`: one
/// session with ONNX Runtime's default threads spinning (its default) and not (as the
/// worker runs them, which on a busy shared machine can be the faster), and two sessions
/// side by side with one thread each (as `--instances 2`). Direct's best is the best of all.
fn direct_configurations(
    args: &Args,
    model: &std::path::Path,
    timing: &Timing,
    batches: &[usize],
) -> anyhow::Result<(ModelSpec, Vec<DirectRow>)> {
    let (spec, mut rows) = direct(args, model, timing, None, batches)?;
    let (_, quiet) = direct(args, model, timing, Some(false), batches)?;
    rows.extend(quiet);
    rows.extend(direct_side_by_side(args, model, timing, 2, batches)?);
    Ok((spec, rows))
}

/// The run that served the most items/s.
fn fastest(splits: Vec<Split>) -> Option<Split> {
    splits
        .into_iter()
        .max_by(|a, b| a.sat.items_per_second.total_cmp(&b.sat.items_per_second))
}

/// `tidepool-worker serve` in a process of its own, saturated from this one.
/// What a saturation run drives: the model, the worker's `--max-batch`, the callers and
/// their items.
struct Drive<'a> {
    model: &'a std::path::Path,
    max_batch: usize,
    clients: usize,
    items: &'a [Tensors],
}

fn own_process(
    args: &Args,
    runtime: &tokio::runtime::Runtime,
    drive: &Drive<'_>,
    timing: &Timing,
    extra: &[&str],
) -> anyhow::Result<Split> {
    let Drive {
        model,
        max_batch,
        clients,
        items,
    } = *drive;
    eprintln!(
        "{}: the worker in its own process {extra:?}",
        model.display()
    );
    let addr = format!("127.0.0.1:{}", free_port()?);
    let device = args
        .device
        .to_possible_value()
        .map_or_else(|| "cpu".to_owned(), |v| v.get_name().to_owned());
    let mut command = std::process::Command::new(sibling_exe("tidepool-worker")?);
    command
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--listen", &addr, "--device", &device])
        .args(["--max-batch", &max_batch.to_string()])
        .args(extra)
        .env("ORT_DYLIB_PATH", &args.common.ort_lib)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        );
    let mut child = Proc::spawn("tidepool-worker", &mut command)?;
    let pid = child.pid();
    let socket: std::net::SocketAddr = addr.parse()?;
    runtime.block_on(async {
        let started = Instant::now();
        loop {
            child.check_running()?;
            if let Ok(client) = tidepool_protocol::Client::connect(addr.as_str()).await {
                if client.ping(Duration::from_secs(1)).await.is_ok() {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the worker at {addr} was not ready within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    })?;
    // The driver is measurement sharing the cores with the worker: the pipelined driver's
    // pre-encoded frames and raw-scanned answers, not the protocol client's tasks.
    let connections = DRIVER_CONNECTIONS;
    let config = PipelineConfig {
        addr: socket,
        connections,
        window: clients.div_ceil(connections),
        warmup: timing.warmup,
        measure: timing.measure,
        items: items.to_vec(),
        tls: None,
    };
    let (result, opened, closed) = pipeline::run_probed(&config, || {
        (ThreadSample::take(Some(pid)), ThreadSample::take(None))
    })?;
    child.check_running()?;
    Ok(Split {
        sat: Saturation {
            items: result.ok,
            errors: result.errors,
            seconds: timing.measure.as_secs_f64(),
            items_per_second: result.per_second,
            mean_batch: result.mean_batch,
            latency: result.latency,
        },
        worker: CpuSplit::of(&opened.0, &closed.0, own_process_group),
        driver: Some(CpuSplit::of(&opened.1, &closed.1, |_, _| {
            "driver".to_owned()
        })),
    })
}

/// Connections from the driver to a worker in its own process (as [`saturate`] uses), the
/// callers spread evenly over them.
const DRIVER_CONNECTIONS: usize = 4;

fn write_costs(report: &mut Report, timing: &Timing, costs: &[Cost]) {
    report.heading("5. The worker's own cost per item (issue 16)");
    report.para(&format!(
        "Each model driven directly (section 1's loop; CPU of the whole process per item: ONNX Runtime's \
         own, the copy into its input buffer included; the fast model in every configuration the worker can run: \
         one session with ONNX Runtime's threads spinning, its default, and not, as the worker runs them, and two \
         sessions side by side on threads of their own with one intra-op thread each, as `--instances 2 --threads 2`; \
         the best of all counted), then the worker at saturation ({:.0} s counted \
         after {:.0} s) in this process (driven by the protocol client's closed-loop callers) and in a process \
         of its own (`tidepool-worker serve`, driven over TCP from this one by the pipelined driver: the same \
         number of requests in flight over 4 connections, each item encoded once with each request's id spliced \
         in, answers read with the raw scanner, each id checked answered once). CPU over the counted window per thread, from \
         `/proc/PID/task/*/schedstat`, in µs per item answered: *runtime* is the async runtime's threads \
         (in this process it also runs the driver), *model thread* runs each batch (ONNX Runtime's calling \
         thread; the runtime forms each batch, the one copy in, and splits its outputs), *pool* is ONNX Runtime's intra-op threads. *Worker outside ONNX \
         Runtime* is the worker process's CPU per item less direct's CPU per item at the same batch size. *Items per \
         CPU-second ÷ direct* is direct's CPU per item at the same batch size over the worker process's: the \
         worker's efficiency, which the driver's share of the cores does not move as it moves items/s.",
        timing.measure.as_secs_f64(),
        timing.warmup.as_secs_f64(),
    ));
    let mut rows = Vec::new();
    for cost in costs {
        let name = cost
            .model
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        rows.push(vec![
            format!("`{name}` direct's best: {}", cost.best.how()),
            format!("{:.1}", cost.best.items_per_second),
            "1.00".to_owned(),
            "—".to_owned(),
            "—".to_owned(),
            "—".to_owned(),
            "—".to_owned(),
            format!("{:.1}", cost.best.cpu_us_per_item),
            "—".to_owned(),
            "1.00".to_owned(),
        ]);
        let at = (cost.max_batch, &cost.at_batch);
        let mut runs = vec![
            ("worker in this process", &cost.in_process, at),
            ("worker in its own process", &cost.own_process, at),
        ];
        if let Some(before) = &cost.before {
            runs.push((
                "worker in its own process, `--ort-spinning true --runtime-threads 2` (before)",
                before,
                at,
            ));
        }
        if let Some(instances) = &cost.instances {
            runs.push((
                "worker in its own process, `--instances 2 --threads 2`",
                instances,
                (cost.instances_batch, &cost.at_instances_batch),
            ));
        }
        for (how, split, (max_batch, at_batch)) in runs {
            let worker_total = split.per_item(split.worker.total);
            let driver = split.driver.as_ref().map_or(
                split.per_item(split.worker.get("runtime (driver and worker)")),
                |d| split.per_item(d.total),
            );
            let runtime = split.per_item(
                split.worker.get("runtime") + split.worker.get("runtime (driver and worker)"),
            );
            let outside = split.driver.as_ref().map_or("—".to_owned(), |_| {
                format!("{:.1}", worker_total - at_batch.cpu_us_per_item)
            });
            // In this process the worker's CPU includes the driver's: no efficiency of its own.
            let efficiency = split.driver.as_ref().map_or("—".to_owned(), |_| {
                format!("{:.2}", at_batch.cpu_us_per_item / worker_total)
            });
            rows.push(vec![
                format!("`{name}` {how}, `--max-batch {max_batch}`"),
                format!("{:.1}", split.sat.items_per_second),
                format!(
                    "{:.2}",
                    split.sat.items_per_second / cost.best.items_per_second
                ),
                if split.driver.is_some() {
                    format!("{driver:.1}")
                } else {
                    "in runtime".to_owned()
                },
                format!("{runtime:.1}"),
                format!("{:.1}", split.per_item(split.worker.get("model thread"))),
                format!(
                    "{:.1}",
                    split.per_item(split.worker.get("ONNX Runtime pool"))
                ),
                format!("{worker_total:.1}"),
                outside,
                efficiency,
            ]);
        }
    }
    report.table(
        &[
            "run",
            "items/s",
            "÷ direct",
            "driver µs",
            "runtime µs",
            "model thread µs",
            "pool µs",
            "worker process µs",
            "worker outside ONNX Runtime µs",
            "items per CPU-second ÷ direct",
        ],
        &rows,
    );
    for cost in costs.iter().filter(|c| !c.rounds.is_empty()) {
        let name = cost.model.display();
        let rows: Vec<Vec<String>> = cost
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    (i + 1).to_string(),
                    format!("{:.1} ({})", r.direct.items_per_second, r.direct.how()),
                    format!("{:.1}", r.worker),
                    format!("{:.1}", r.instances),
                    format!(
                        "{:.2}",
                        r.worker.max(r.instances) / r.direct.items_per_second
                    ),
                ]
            })
            .collect();
        report.para(&format!(
            "`{name}`, interleaved: each round runs direct (every configuration; the first round \
             at every batch size, later ones at the workers' `--max-batch`), then the worker in its own \
             process with its defaults (`--max-batch {}`, {} callers) and with `--instances 2 --threads 2` \
             (`--max-batch` where two side-by-side sessions ran best, three batches' worth of callers: two \
             running, one formed ahead). The table above and the verdict take the best round of each.",
            cost.max_batch,
            cost.clients
        ));
        report.table(
            &[
                "round",
                "direct's best items/s",
                "worker items/s",
                "`--instances 2` items/s",
                "worker's best ÷ direct's best",
            ],
            &rows,
        );
    }
    for cost in costs {
        // The worker's best configuration against direct's best, both from this run.
        let (how, own, at_batch) = match &cost.instances {
            Some(i) if i.sat.items_per_second > cost.own_process.sat.items_per_second => {
                ("`--instances 2 --threads 2`", i, &cost.at_instances_batch)
            }
            _ => ("its defaults", &cost.own_process, &cost.at_batch),
        };
        let ratio = own.sat.items_per_second / cost.best.items_per_second;
        let goal = cost.goal;
        let worker_us = own.per_item(own.worker.total);
        let driver_us = own.per_item(own.driver.as_ref().map_or(0.0, |d| d.total));
        let efficiency = at_batch.cpu_us_per_item / worker_us.max(f64::MIN_POSITIVE);
        report.para(&format!(
            "`{}`, driver in its own process: the worker with {how} serves **{ratio:.2} of direct's best** \
             ({}) in items/s (goal ≥ {goal}: {}); \
             in items per CPU-second the worker process does **{efficiency:.2} of direct's** at batch {} \
             ({:.1} µs of CPU per item against direct's {:.1}; the driver {:.1}); mean batch {:.1}, {} errors.",
            cost.model.display(),
            cost.best.how(),
            if ratio >= goal { "met" } else { "missed" },
            at_batch.batch,
            worker_us,
            at_batch.cpu_us_per_item,
            driver_us,
            own.sat.mean_batch,
            own.sat.errors,
        ));
    }
    report.set("cost_per_item", costs);
}

/// What the saturation runs found.
#[derive(Clone, Copy)]
struct Runs {
    /// Concurrent callers at saturation.
    clients: usize,
    /// The batched worker's --max-batch.
    max_batch: usize,
    /// The best direct batch size.
    best: DirectRow,
    batched: Saturation,
    unbatched: Saturation,
}

fn write_report(
    report: &mut Report,
    timing: &Timing,
    direct: &[DirectRow],
    runs: &Runs,
    latency: &tidepool_load::Report,
) {
    let Runs {
        clients,
        max_batch,
        best,
        batched,
        unbatched,
    } = *runs;
    report.heading("1. Through the worker against ONNX Runtime directly");
    report.para(&format!(
        "Direct: the same `Model` (one ort session) run in a loop at each batch size for at least {:.0} s \
         after one unmeasured run. Worker: in the same process, `--max-batch {}` (the best direct batch size \
         unless `bench-worker --max-batch` says otherwise) and the default `--max-delay`, \
         {} concurrent closed-loop callers over 4 connections, {:.0} s counted after {:.0} s of warm-up.",
        timing.direct_per_batch.as_secs_f64(),
        max_batch,
        clients,
        timing.measure.as_secs_f64(),
        timing.warmup.as_secs_f64(),
    ));
    let rows: Vec<Vec<String>> = direct
        .iter()
        .map(|r| {
            vec![
                format!("direct, batch {}", r.batch),
                format!("{:.1}", r.items_per_second),
                format!("{:.0} ms per batch, {} runs", r.ms_per_run, r.runs),
            ]
        })
        .chain(std::iter::once(vec![
            format!("worker, `--max-batch {}`", max_batch),
            format!("{:.1}", batched.items_per_second),
            format!(
                "mean batch {:.1}, {} items, {} errors",
                batched.mean_batch, batched.items, batched.errors
            ),
        ]))
        .collect();
    report.table(&["run", "items/s", "notes"], &rows);
    let ratio = batched.items_per_second / best.items_per_second;
    report.para(&format!(
        "**Goal: at least 0.9 of direct at its best batch size: {}** (worker {:.1} items/s = {ratio:.2} × direct's \
         {:.1} items/s at batch {}).",
        if ratio >= 0.9 { "met" } else { "missed" },
        batched.items_per_second,
        best.items_per_second,
        best.batch
    ));

    report.heading("2. Batching on against `--max-batch 1`");
    let speedup = batched.items_per_second / unbatched.items_per_second.max(f64::MIN_POSITIVE);
    report.table(
        &["worker", "items/s", "mean batch"],
        &[
            vec![
                format!("`--max-batch {}`", max_batch),
                format!("{:.1}", batched.items_per_second),
                format!("{:.1}", batched.mean_batch),
            ],
            vec![
                "`--max-batch 1`".to_owned(),
                format!("{:.1}", unbatched.items_per_second),
                format!("{:.1}", unbatched.mean_batch),
            ],
        ],
    );
    report.para(&format!(
        "Batching serves **{speedup:.1}×** the items of `--max-batch 1` (expected: about 10× on CPU; \
         `--max-batch 1` measured over {:.0} s).",
        timing.unbatched_measure.as_secs_f64()
    ));

    report.heading("3. Latency at half of capacity");
    let l = &latency.latency_ms;
    let ms = |v: Option<f64>| v.map_or("—".to_owned(), |v| fmt_us(v * 1000.0));
    report.para(&format!(
        "Open loop (tidepool-load's library, Poisson arrivals, 4 connections) at {:.1} items/s, half of the \
         worker's saturated rate, for {:.0} s; latency from each request's intended send time (tokio's timer adds \
         up to about 1 ms).",
        latency.info.profile.rate_at(Duration::ZERO),
        timing.latency.as_secs_f64()
    ));
    report.table(
        &["sent", "results", "p50", "p90", "p99", "max", "mean batch"],
        &[vec![
            latency.sent.to_string(),
            latency.ok().to_string(),
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.max),
            latency
                .batch_size_mean
                .map_or("—".to_owned(), |b| format!("{b:.1}")),
        ]],
    );
    report.para(&format!(
        "For scale: one direct run takes {:.0} ms at batch 1 and {:.0} ms at batch {}.",
        direct.first().map_or(0.0, |r| r.ms_per_run),
        direct
            .iter()
            .find(|r| r.batch == max_batch)
            .map_or(0.0, |r| r.ms_per_run),
        max_batch,
    ));

    report.set("direct", direct);
    report.set("direct_best", best);
    report.set("worker_batched", batched);
    report.set("worker_unbatched", unbatched);
    report.set("worker_vs_direct", ratio);
    report.set("worker_vs_direct_goal_met", ratio >= 0.9);
    report.set("batching_speedup", speedup);
    report.set("half_capacity", latency);
}
