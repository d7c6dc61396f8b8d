//! `bench-slo`: serving to a latency objective (issue 15). For each model, the worker with
//! the fixed `--max-delay` batcher (`--batching fixed`) against the adaptive one with
//! predicted-finish admission (`--batching adaptive`), side by side in one run, under an
//! open-loop load with deadlines stepping from 50% to 150% of the worker's capacity. Writes
//! `OUT/slo.md` and `OUT/slo.json`.
//!
//! 1. Capacity: the worker's results per second at saturation (closed loop, no deadlines),
//!    and from it a full batch's time `T = max_batch / capacity`.
//! 2. Steps: at each share of capacity, two open-loop streams run together from
//!    tidepool-load: a third of the rate with a tight deadline (`--tight` batches' time, 4 T
//!    by default) and two thirds with a loose one (`--loose`, 20 T). Goodput is the results
//!    within their deadline per second, over the capacity; p99 is over the results.
//!
//! Goal (issue 15): at 150% of capacity the adaptive worker's goodput is at least 0.9 of
//! capacity (no collapse), against the fixed batcher's.
//!
//! The worker runs in a process of its own (`tidepool-worker serve`, a fresh one for the
//! capacity and for each batching mode, all with the same flags), so that the open-loop
//! driver here and the worker's runtime do not share threads: with the driver in the worker's
//! process, a step measured the driver's starvation as much as the batcher (bench/intro/slo.md).
//! Each step sets the worker's own counts (from its `/metrics`) and both processes' CPU beside
//! the client's counts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use tidepool_bench::process::{cpu_seconds, free_port, http_get, sibling_exe, Proc};
use tidepool_bench::report::{machine, quick_note, CommonArgs, Report};
use tidepool_bench::saturate::saturate;
use tidepool_load::{LoadConfig, Outcome};
use tidepool_protocol::Client;
use tidepool_worker::BatchingMode;
use tokio_util::sync::CancellationToken;

/// Serving to a latency objective: fixed against adaptive batching under overload.
#[derive(Debug, Parser)]
struct Args {
    /// The models, each benchmarked in turn (the issue's: the 1 GiB and 64 MiB synthetic
    /// models).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// The library, the report directory, quick runs.
    #[command(flatten)]
    common: CommonArgs,
    /// The worker's --max-batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// The worker's --max-delay (the fixed batcher's window, the adaptive one's limit).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    max_delay: Duration,
    /// The tight deadline, in full batches' time.
    #[arg(long, default_value_t = 4.0)]
    tight: f64,
    /// The loose deadline, in full batches' time.
    #[arg(long, default_value_t = 20.0)]
    loose: f64,
    /// Shares of capacity, stepped through in order.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.75,1.0,1.25,1.5")]
    steps: Vec<f64>,
    /// Seconds per step [default: 20, or 3 in a quick run].
    #[arg(long)]
    step_seconds: Option<u64>,
    /// ONNX Runtime intra-op threads [default: ONNX Runtime's, one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// The worker's --runtime-nice [default: the worker's, 0: the runtime at the model's
    /// priority].
    #[arg(long)]
    runtime_nice: Option<i32>,
    /// After the two batchers, the adaptive one again with the worker's --runtime-nice set to
    /// this (its runtime's threads that many nice steps below the model's), to set its goodput
    /// beside the run's configuration under the same load [default: not run].
    #[arg(long)]
    compare_nice: Option<i32>,
    /// After the two batchers, the adaptive one again with the worker's --instances set to
    /// this (that many model threads, each an ONNX Runtime session of its own with the
    /// intra-op threads split between them), driven at the same rates and judged against the
    /// same capacity, so the two configurations' goodput sit side by side [default: not run].
    #[arg(long)]
    compare_instances: Option<usize>,
}

/// One worker configuration the steps run against.
struct Variant {
    mode: BatchingMode,
    /// The worker's --runtime-nice, where set.
    nice: Option<i32>,
    /// The worker's --instances, where set.
    instances: Option<usize>,
    /// Its name in the report's tables.
    label: String,
}

/// One step of one mode.
#[derive(Clone, Debug, Serialize)]
struct Step {
    /// The batcher, and the runtime's nice value where it is a comparison's.
    mode: String,
    share: f64,
    offered_per_s: f64,
    goodput_per_s: f64,
    goodput_of_capacity: f64,
    late: u64,
    refused_overloaded: u64,
    refused_deadline: u64,
    p99_tight_ms: Option<f64>,
    p99_loose_ms: Option<f64>,
    /// Results the client received within their deadline (from the intended send time).
    client_within: u64,
    /// Seconds between the two readings of the worker's counts: the step and its drain.
    counted_s: f64,
    /// What the worker itself counted over the step.
    worker: WorkerSide,
    /// CPU seconds the worker process used over the step.
    worker_cpu_s: f64,
    /// CPU seconds this process (the driver) used over the step.
    driver_cpu_s: f64,
}

/// The worker's own counts over one step (differences of its `/metrics`), to set beside the
/// client's: a gap between them shows requests delayed or lost between the two.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct WorkerSide {
    /// Results it delivered to the connection within the deadline it received (its clock
    /// starts at receipt, the client's at the intended send time).
    within: f64,
    /// Results it delivered after that deadline.
    late: f64,
    /// Refused on arrival, predicted to finish late (`overloaded`).
    predicted_late: f64,
    /// Refused because its queue was full (`overloaded`).
    queue_full: f64,
    /// Doomed on arrival or in the queue, never run (`deadline_exceeded`).
    doomed: f64,
    /// Deadline passed in its queue (`deadline_exceeded`).
    expired: f64,
    /// Batches formed and handed to the model thread, run or not (a formed batch whose
    /// members all expired before the model took it is skipped, and takes no model time).
    formed: f64,
    /// Items in them.
    items_formed: f64,
    /// Batches the model ran.
    ran: f64,
    /// The model's run time over them, seconds.
    infer_s: f64,
}

impl WorkerSide {
    /// The counts in a `/metrics` text (absent ones as zero).
    fn parse(text: &str) -> WorkerSide {
        let value = |series: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let refused = |why: &str| {
            value(&format!(
                "tidepool_worker_refused_total{{reason=\"{why}\"}}"
            ))
        };
        WorkerSide {
            within: value("tidepool_worker_deadline_results_total{deadline=\"within\"}"),
            late: value("tidepool_worker_deadline_results_total{deadline=\"late\"}"),
            predicted_late: refused("predicted_late"),
            queue_full: refused("queue_full"),
            doomed: refused("doomed"),
            expired: refused("expired"),
            formed: value("tidepool_worker_batch_size_count"),
            items_formed: value("tidepool_worker_batch_size_sum"),
            ran: value("tidepool_worker_inference_seconds_count"),
            infer_s: value("tidepool_worker_inference_seconds_sum"),
        }
    }

    /// The counts between `before` and `self`.
    fn since(self, before: WorkerSide) -> WorkerSide {
        WorkerSide {
            within: self.within - before.within,
            late: self.late - before.late,
            predicted_late: self.predicted_late - before.predicted_late,
            queue_full: self.queue_full - before.queue_full,
            doomed: self.doomed - before.doomed,
            expired: self.expired - before.expired,
            formed: self.formed - before.formed,
            items_formed: self.items_formed - before.items_formed,
            ran: self.ran - before.ran,
            infer_s: self.infer_s - before.infer_s,
        }
    }
}

/// One model's figures.
#[derive(Clone, Debug, Serialize)]
struct ModelRun {
    model: String,
    capacity_per_s: f64,
    full_batch_ms: f64,
    tight_ms: u64,
    loose_ms: u64,
    steps: Vec<Step>,
    /// Each variant's capacity measured again on its own worker right after its steps.
    capacity_after: Vec<(String, f64)>,
}

// One thread: the driver shares the two cores with the worker it measures, and a
// multi-threaded runtime's wake-ups across threads cost it more (at 150% on the 64 MiB model,
// 1.7-1.8 CPU-seconds per 10 s step against 1.2 on one thread), all taken from the model.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.steps.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        bail!("--steps must be positive shares of capacity, like 0.5,1.0,1.5");
    }
    let step = Duration::from_secs(args.step_seconds.unwrap_or(if args.common.report.quick {
        3
    } else {
        20
    }));
    let mut runs = Vec::new();
    for model in &args.models {
        runs.push(
            bench_model(&args, model, step)
                .await
                .with_context(|| format!("benchmarking {}", model.display()))?,
        );
    }
    let mut report = Report::new();
    report.set_run(&args.models[0], args.common.report.quick);
    report.para(&format!(
        "Open loop, Poisson arrivals, {} s per step; a third of the requests with a deadline of \
         {} full batches' time, the rest {}; --max-batch {}, --max-delay {:?}. Goodput: results \
         within their deadline per second, over the capacity measured first. The worker in a \
         process of its own (`tidepool-worker serve`, a fresh one for the capacity and for each \
         batching mode, same flags, ONNX Runtime's intra-op threads: {}; its runtime's threads \
         nice: {}); the driver (tidepool-load, in this process) counts each deadline from the \
         intended send time and sends what is left of it. {}{}",
        step.as_secs(),
        args.tight,
        args.loose,
        args.max_batch,
        args.max_delay,
        args.threads
            .map_or_else(|| "its default, one per core".to_owned(), |t| t.to_string()),
        args.runtime_nice
            .map_or_else(|| "the worker's default, 0".to_owned(), |n| n.to_string()),
        machine(),
        quick_note(args.common.report.quick)
    ));
    for run in &runs {
        report.heading(&format!(
            "{}: capacity {:.1}/s, full batch {:.1} ms, deadlines {} / {} ms",
            run.model, run.capacity_per_s, run.full_batch_ms, run.tight_ms, run.loose_ms
        ));
        let rows: Vec<Vec<String>> = run
            .steps
            .iter()
            .map(|s| {
                let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
                vec![
                    format!("{:.0}%", s.share * 100.0),
                    s.mode.clone(),
                    format!("{:.1}", s.offered_per_s),
                    format!("{:.1}", s.goodput_per_s),
                    format!("{:.2}", s.goodput_of_capacity),
                    s.late.to_string(),
                    s.refused_overloaded.to_string(),
                    s.refused_deadline.to_string(),
                    ms(s.p99_tight_ms),
                    ms(s.p99_loose_ms),
                ]
            })
            .collect();
        report.table(
            &[
                "load",
                "batching",
                "offered/s",
                "goodput/s",
                "of capacity",
                "late",
                "overloaded",
                "deadline_exceeded",
                "p99 tight (ms)",
                "p99 loose (ms)",
            ],
            &rows,
        );
        report.para(
            "The same steps as each side counted them: results within their deadline by the \
             client (from the intended send time) and by the worker (from receipt); refusals \
             the worker made (predicted late, queue full: `overloaded`; doomed, expired: \
             `deadline_exceeded`) against the errors the client received; the batches formed \
             and the model ran (a formed batch whose members all expired before the model took \
             it is skipped), the formed ones' mean size, the model's mean time per batch run and \
             its busy share (of the step and its drain, over which all these are counted); CPU \
             seconds of the worker process and of the driver.",
        );
        let sides: Vec<Vec<String>> = run
            .steps
            .iter()
            .map(|s| {
                let w = &s.worker;
                vec![
                    format!("{:.0}%", s.share * 100.0),
                    s.mode.clone(),
                    format!("{} / {:.0}", s.client_within, w.within),
                    format!("{} / {:.0}", s.late, w.late),
                    format!(
                        "{} / {:.0} + {:.0}",
                        s.refused_overloaded, w.predicted_late, w.queue_full
                    ),
                    format!(
                        "{} / {:.0} + {:.0}",
                        s.refused_deadline, w.doomed, w.expired
                    ),
                    format!("{:.0} / {:.0}", w.formed, w.ran),
                    format!("{:.1}", w.items_formed / w.formed.max(1.0)),
                    format!("{:.2}", w.infer_s * 1e3 / w.ran.max(1.0)),
                    format!("{:.2}", w.infer_s / s.counted_s.max(1e-9)),
                    format!("{:.1} / {:.1}", s.worker_cpu_s, s.driver_cpu_s),
                ]
            })
            .collect();
        report.table(
            &[
                "load",
                "batching",
                "within: client / worker",
                "late: client / worker",
                "overloaded: client / predicted late + queue full",
                "deadline_exceeded: client / doomed + expired",
                "batches: formed / run",
                "mean formed",
                "ms per batch run",
                "model busy",
                "CPU s: worker / driver",
            ],
            &sides,
        );
        if let Some(top) = run.steps.iter().map(|s| s.share).reduce(f64::max) {
            let at = |mode: &str| {
                run.steps
                    .iter()
                    .find(|s| s.mode == mode && s.share == top)
                    .map_or(0.0, |s| s.goodput_of_capacity)
            };
            let (fixed, adaptive) = (at("fixed"), at("adaptive"));
            if let Some(nice) = args.compare_nice {
                report.para(&format!(
                    "At {:.0}% of capacity, the adaptive worker's goodput with its runtime at \
                     nice {nice}: {:.2} of capacity, against {adaptive:.2} with the run's setting.",
                    top * 100.0,
                    at(&nice_label(nice))
                ));
            }
            if let Some(n) = args.compare_instances {
                report.para(&format!(
                    "At {:.0}% of capacity, the adaptive worker's goodput with {n} instances: \
                     {:.2} of the (one-instance) capacity, against {adaptive:.2} with one.",
                    top * 100.0,
                    at(&instances_label(n))
                ));
            }
            report.para(&format!(
                "The capacity measured again, the same way, on each worker right after its \
                 steps (the machine's speed drifts between minutes): {}; first {:.1}/s. \
                 Against its own capacity measured after, the adaptive worker's goodput at \
                 {:.0}% is {:.2} (the goal is judged against the first).",
                run.capacity_after
                    .iter()
                    .map(|(label, c)| format!("{label} {c:.1}/s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                run.capacity_per_s,
                top * 100.0,
                run.capacity_after
                    .iter()
                    .find(|(label, _)| label == mode_name(BatchingMode::Adaptive))
                    .map_or(0.0, |(_, after)| adaptive * run.capacity_per_s
                        / after.max(1e-9)),
            ));
            report.para(&format!(
                "At {:.0}% of capacity: goodput {adaptive:.2} of capacity adaptive, {fixed:.2} \
                 fixed (goal: at least 0.90 at 150%: {}).",
                top * 100.0,
                if top >= 1.5 && adaptive >= 0.9 {
                    "met"
                } else if top >= 1.5 {
                    "missed"
                } else {
                    "not measured at 150%"
                }
            ));
        }
    }
    report.set("models", &runs);
    report.write(&args.common.report.out, "slo")?;
    println!("{}", report.markdown());
    Ok(())
}

async fn bench_model(
    args: &Args,
    model: &std::path::Path,
    step: Duration,
) -> anyhow::Result<ModelRun> {
    // Capacity once, on the adaptive worker without deadlines (both batchers then behave
    // alike: admission only looks at requests with a deadline), in its own process like the
    // steps.
    let plain = |mode: BatchingMode| Variant {
        mode,
        nice: args.runtime_nice,
        instances: None,
        label: mode_name(mode).to_owned(),
    };
    let worker = WorkerProc::start(args, model, &plain(BatchingMode::Adaptive)).await?;
    let addr = worker.addr.to_string();
    let items = {
        let client = Client::connect(&addr).await?;
        let meta = client.metadata(Duration::from_secs(10)).await?;
        tidepool_load::input::items_from_metadata(&meta, (16, 16), 64, 1)?
    };
    let sat = capacity_of(args, &addr, &items).await?;
    drop(worker);
    if sat.items_per_second <= 0.0 {
        bail!(
            "the worker answered nothing at saturation ({} errors)",
            sat.errors
        );
    }
    let capacity = sat.items_per_second;
    let full_batch = Duration::from_secs_f64(args.max_batch as f64 / capacity);
    let tight = full_batch.mul_f64(args.tight).max(Duration::from_millis(1));
    let loose = full_batch.mul_f64(args.loose).max(Duration::from_millis(2));
    eprintln!(
        "bench-slo: {}: capacity {capacity:.1}/s, deadlines {tight:?} / {loose:?}",
        model.display()
    );
    let mut steps = Vec::new();
    let mut capacity_after = Vec::new();
    let mut variants = vec![plain(BatchingMode::Fixed), plain(BatchingMode::Adaptive)];
    if let Some(nice) = args.compare_nice {
        variants.push(Variant {
            nice: Some(nice),
            label: nice_label(nice),
            ..plain(BatchingMode::Adaptive)
        });
    }
    if let Some(n) = args.compare_instances {
        variants.push(Variant {
            instances: Some(n),
            label: instances_label(n),
            ..plain(BatchingMode::Adaptive)
        });
    }
    for variant in &variants {
        let mut worker = WorkerProc::start(args, model, variant).await?;
        for &share in &args.steps {
            let before = (
                worker.counts().await?,
                cpu_seconds(worker.pid()),
                own_cpu(),
                Instant::now(),
            );
            let mut s = run_step(
                &worker.addr.to_string(),
                &variant.label,
                share,
                capacity,
                step,
                tight,
                loose,
            )
            .await?;
            worker.proc.check_running()?;
            s.worker = worker.counts().await?.since(before.0);
            s.worker_cpu_s = cpu_seconds(worker.pid()) - before.1;
            s.driver_cpu_s = own_cpu() - before.2;
            s.counted_s = before.3.elapsed().as_secs_f64();
            eprintln!("bench-slo: {s:?}");
            steps.push(s);
        }
        // The same closed loop as the first capacity, on this variant's worker right after
        // its steps: the machine's speed drifts over the minutes between the two (shared
        // hosts), and a ratio to a capacity measured ten minutes earlier carries that drift.
        let again = capacity_of(args, &worker.addr.to_string(), &items).await?;
        eprintln!(
            "bench-slo: {}: capacity again after the steps {:.1}/s",
            variant.label, again.items_per_second
        );
        capacity_after.push((variant.label.clone(), again.items_per_second));
    }
    Ok(ModelRun {
        model: model.display().to_string(),
        capacity_per_s: capacity,
        full_batch_ms: full_batch.as_secs_f64() * 1000.0,
        tight_ms: u64::try_from(tight.as_millis()).unwrap_or(u64::MAX),
        loose_ms: u64::try_from(loose.as_millis()).unwrap_or(u64::MAX),
        steps,
        capacity_after,
    })
}

/// The worker at `addr` saturated closed loop, without deadlines: two batches' worth of
/// callers, counted after a warm-up.
async fn capacity_of(
    args: &Args,
    addr: &str,
    items: &[tidepool_protocol::Tensors],
) -> anyhow::Result<tidepool_bench::saturate::Saturation> {
    let (warmup, measure) = if args.common.report.quick {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_secs(3), Duration::from_secs(10))
    };
    saturate(addr, items, 2 * args.max_batch, warmup, measure).await
}

/// CPU seconds this process (the driver) has used so far.
fn own_cpu() -> f64 {
    cpu_seconds(std::process::id())
}

/// One step: the tight and the loose streams together, for `duration`.
async fn run_step(
    addr: &str,
    label: &str,
    share: f64,
    capacity: f64,
    duration: Duration,
    tight: Duration,
    loose: Duration,
) -> anyhow::Result<Step> {
    let rate = share * capacity;
    let stream = |rate: f64, deadline: Duration, seed: u64| {
        let mut c = LoadConfig::new(addr);
        c.rate = rate;
        c.duration = duration;
        c.deadline = Some(deadline);
        c.from_metadata = true;
        c.lengths = (16, 16);
        c.seed = seed;
        // Overload must show as refusals and lateness, not as sends the cap skipped.
        c.concurrency = 100_000;
        c.connections = 4;
        c.drain = loose + Duration::from_secs(1);
        c
    };
    let stop = CancellationToken::new();
    let (t, l) = tokio::join!(
        tidepool_load::run(stream(rate / 3.0, tight, 1), stop.clone()),
        tidepool_load::run(stream(rate * 2.0 / 3.0, loose, 2), stop.clone()),
    );
    let (t, l) = (t?, l?);
    let goodput = |r: &tidepool_load::Report| r.goodput.as_ref().map_or(0, |g| g.within);
    let late = |r: &tidepool_load::Report| r.goodput.as_ref().map_or(0, |g| g.late);
    let window = t.window_s.max(l.window_s).max(1e-9);
    let within = goodput(&t) + goodput(&l);
    let goodput_per_s = within as f64 / window;
    let both = |o: Outcome| t.outcome(o) + l.outcome(o);
    Ok(Step {
        mode: label.to_owned(),
        share,
        offered_per_s: (t.offered + l.offered) as f64 / duration.as_secs_f64(),
        goodput_per_s,
        goodput_of_capacity: goodput_per_s / capacity,
        late: late(&t) + late(&l),
        refused_overloaded: both(Outcome::Overloaded),
        refused_deadline: both(Outcome::DeadlineExceeded),
        p99_tight_ms: t.latency_ms.p99,
        p99_loose_ms: l.latency_ms.p99,
        client_within: within,
        counted_s: 0.0,
        worker: WorkerSide::default(),
        worker_cpu_s: 0.0,
        driver_cpu_s: 0.0,
    })
}

/// The report's name for the adaptive worker with its runtime `nice` steps down.
fn nice_label(nice: i32) -> String {
    format!("adaptive, nice {nice}")
}

/// The report's name for the adaptive worker with `n` model instances.
fn instances_label(n: usize) -> String {
    format!("adaptive, {n} instances")
}

fn mode_name(mode: BatchingMode) -> &'static str {
    match mode {
        BatchingMode::Fixed => "fixed",
        BatchingMode::Adaptive => "adaptive",
    }
}

/// A `tidepool-worker serve` process, killed when dropped.
struct WorkerProc {
    proc: Proc,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl WorkerProc {
    /// Starts the release worker next to this binary with the run's flags and `variant`'s,
    /// and returns once it answers a ping (loading the 1 GiB model takes a while).
    async fn start(
        args: &Args,
        model: &std::path::Path,
        variant: &Variant,
    ) -> anyhow::Result<WorkerProc> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = Command::new(sibling_exe("tidepool-worker")?);
        command
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", &addr.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(["--max-batch", &args.max_batch.to_string()])
            .args(["--max-delay", &format!("{}us", args.max_delay.as_micros())])
            .args(["--batching", mode_name(variant.mode)])
            .env("ORT_DYLIB_PATH", &args.common.ort_lib)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            );
        if let Some(threads) = args.threads {
            command.args(["--threads", &threads.to_string()]);
        }
        if let Some(nice) = variant.nice {
            command.args(["--runtime-nice", &nice.to_string()]);
        }
        if let Some(n) = variant.instances {
            command.args(["--instances", &n.to_string()]);
        }
        let mut proc = Proc::spawn("tidepool-worker", &mut command)?;
        let started = Instant::now();
        loop {
            proc.check_running()?;
            if let Ok(client) = Client::connect(addr.to_string().as_str()).await {
                if client.ping(Duration::from_secs(1)).await.is_ok() {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the worker at {addr} was not ready within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(WorkerProc {
            proc,
            addr,
            metrics,
        })
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its counts so far, from its `/metrics`.
    async fn counts(&self) -> anyhow::Result<WorkerSide> {
        let metrics = self.metrics;
        let text = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
            .await?
            .context("reading the worker's /metrics")?;
        Ok(WorkerSide::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_worker::goodput::Refusal;
    use tidepool_worker::Metrics;

    /// The series read here are the ones the worker renders: a renamed one would read as
    /// zero and the side-by-side table would lie quietly.
    #[test]
    fn the_worker_counts_are_read_from_its_metrics_text() {
        let m = Metrics::default();
        m.goodput.answered(Some(true));
        m.goodput.answered(Some(true));
        m.goodput.answered(Some(false));
        m.goodput.refused(Refusal::PredictedLate);
        m.goodput.refused(Refusal::Doomed);
        m.goodput.refused(Refusal::Doomed);
        m.goodput.refused(Refusal::Expired);
        m.goodput.refused(Refusal::QueueFull);
        m.batch_size.observe(16);
        m.batch_size.observe(4);
        m.infer_time.observe(40_000);
        m.infer_time.observe(10_000);
        let before = WorkerSide::parse(&Metrics::default().render());
        let w = WorkerSide::parse(&m.render()).since(before);
        assert_eq!(
            (
                w.within,
                w.late,
                w.predicted_late,
                w.queue_full,
                w.doomed,
                w.expired
            ),
            (2.0, 1.0, 1.0, 1.0, 2.0, 1.0)
        );
        assert_eq!((w.formed, w.items_formed, w.ran), (2.0, 20.0, 2.0));
        assert!((w.infer_s - 0.05).abs() < 1e-9, "{}", w.infer_s);
    }
}
