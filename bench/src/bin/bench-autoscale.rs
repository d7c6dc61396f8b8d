//! `bench-autoscale`: what autoscaling saves, and what it costs in latency (issues 6 and
//! 17). Writes `OUT/autoscale.md`, `OUT/autoscale.json` and, under `OUT/autoscale/`, the
//! logs, timelines and `/scaling` readings behind them.
//!
//! 0. One worker's capacity on this machine (a constant overload through a one-worker
//!    pool): the day's peak is sized from it, and the burst's "enough workers" too.
//! 1. A compressed day (the load generator's `day` profile), the same schedule against
//!    three pools: fixed at the peak size, autoscaled on the busy share (`--scaling-signal
//!    busy`, the default policy) and autoscaled on requests in flight (`--scaling-signal
//!    in-flight`, the policy before busy shares): the worker-seconds each used (read from
//!    `GET /scaling` every second: ready, coming and leaving workers all cost) and the
//!    share of seconds whose p99 met the objective.
//! 2. A burst: a base rate both autoscaled pools serve with their minimum (a tenth of the
//!    peak by default, `--burst-step`), then the peak at once, against the same three
//!    pools: the time from the step to enough ready workers, and the seconds over the
//!    objective after it.
//! 3. One worker start alone on an idle pool, for the 64 MiB and the 1 GiB model: process
//!    start, model load and warm-up without the step's CPU contention.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use tidepool_bench::autoscale::{
    healthy_at, read_log, time_to_ask, time_to_ready, worker_seconds, HealthySpan, ObjectiveShare,
    Polled, Poller, Pool, PoolSpec, Scaling, ScalingPoint, StartTimeline,
};
use tidepool_bench::process::{sibling_exe, Proc};
use tidepool_bench::report::{machine, Report, ReportArgs};
use tidepool_load::{CancellationToken, InputSpec, LoadConfig, ProfileKind};

/// Autoscaling benchmark: a compressed day and a burst, a fixed pool against the busy-share
/// and the in-flight policies.
#[derive(Debug, Parser)]
struct Args {
    /// Where the report goes (OUT, the run's files in OUT/autoscale/), and whether the run
    /// is a quick one (a 40-second day, a 25-second burst).
    #[command(flatten)]
    report: ReportArgs,
    /// The model the pool serves (`tidepool-worker synth --size 64MiB --input-dim 256
    /// --output-dim 16 --layers 4 --seed 1`, as `make demo` builds it).
    #[arg(long, default_value = "build/models/demo-64MiB-256.onnx")]
    model: PathBuf,
    /// The model's input width (f32 elements per item).
    #[arg(long, default_value_t = 256)]
    input_dim: usize,
    /// A large model for the single-start measurement (skipped when missing).
    #[arg(long, default_value = "build/models/synth-1gib.onnx")]
    big_model: PathBuf,
    /// The peak rate of the day and of the burst, items/s [default: --peak-capacity times
    /// one worker's capacity, measured at the start].
    #[arg(long)]
    peak: Option<f64>,
    /// The peak in workers' worth of load, when --peak is not given: 1.6, so that the
    /// busy-share policy wants ceil(1.6 / 0.7) = 3 workers at the top, the fixed pool's size.
    #[arg(long, default_value_t = 1.6)]
    peak_capacity: f64,
    /// The length of the compressed day [default: 180s, 40s with --quick].
    #[arg(long, value_parser = humantime::parse_duration)]
    day: Option<Duration>,
    /// The fixed pool's size and the autoscaled pools' most workers.
    #[arg(long, default_value_t = 3)]
    max_workers: usize,
    /// The latency objective: a second meets it when its p99 is at most this, ms.
    #[arg(long, default_value_t = 500.0)]
    objective_ms: f64,
    /// Seed of the load (arrivals and data): the same for every run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `--scale-in-delay` of both autoscaled pools: the longest scale-down delay (the real
    /// default, 120 s, would be a quarter of a 180-second day).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    scale_in_delay: Duration,
    /// `--scale-in-startups` of both autoscaled pools: the scale-down delay in measured
    /// start-up times, as in a real deployment (start-ups are not compressed).
    #[arg(long, default_value_t = 3.0)]
    scale_in_startups: f64,
    /// The busy-share pool's `--scaling-window` (the stable window).
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    busy_window: Duration,
    /// The busy-share pool's `--panic-window`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    busy_panic_window: Duration,
    /// The busy-share pool's `--target-utilization`.
    #[arg(long, default_value_t = 0.7)]
    target_utilization: f64,
    /// The in-flight pool's `--target-load`: 8, a quarter of `--max-batch`, as tuned for
    /// the in-flight policy before busy shares (16 is only crossed when a worker is already
    /// past its knee on a busy machine).
    #[arg(long, default_value_t = 8.0)]
    in_flight_target_load: f64,
    /// The in-flight pool's `--scaling-window` and `--panic-window`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    in_flight_window: Duration,
    /// The in-flight pool's `--scale-out-delay`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    in_flight_scale_out_delay: Duration,
    /// The burst: the peak over the base rate before it. Both autoscaled pools must start
    /// the step from one worker, what the base needs, or there is no recovery to compare:
    /// at a fifth of the peak (the 5× step) the in-flight pool held 2 workers at the
    /// base, enough for the peak, and at a tenth (the day's night rate) it still averaged
    /// 1.33 (about 12 requests in flight against its `--target-load 8`: batches forming over
    /// the 5 ms delay). At a twentieth both hold one worker; the step is then 20×, harder
    /// than the 5×.
    #[arg(long, default_value_t = 20.0)]
    burst_step: f64,
    /// The burst: seconds at the base rate before the step, for both pools to settle at
    /// what the base needs (several of either policy's windows and scale-down delays)
    /// [default: 20s, 12s with --quick].
    #[arg(long, value_parser = humantime::parse_duration)]
    burst_before: Option<Duration>,
    /// The burst: seconds at the peak after the step [default: 30s, 15s with --quick].
    #[arg(long, value_parser = humantime::parse_duration)]
    burst_after: Option<Duration>,
    /// The burst: rounds of each autoscaled pool, alternating (busy, in-flight, busy, ...),
    /// each from a fresh pool; the goal compares the means. One round is a draw of the
    /// step's phase against each policy's clock (the in-flight policy decides at its
    /// once-a-second samples, so it asks anywhere from 0 to 1 s after a step) [default: 3,
    /// 1 with --quick].
    #[arg(long)]
    burst_rounds: Option<usize>,
    /// Skip the day runs.
    #[arg(long)]
    no_day: bool,
    /// Skip the burst runs.
    #[arg(long)]
    no_burst: bool,
}

/// The three pools every profile runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Policy {
    /// `--min-workers` = `--max-workers`: sized for the peak all day.
    Fixed,
    /// `--scaling-signal busy`: the busy share against `--target-utilization`.
    Busy,
    /// `--scaling-signal in-flight`: requests in flight against `--target-load`.
    InFlight,
}

impl Policy {
    const ALL: [Policy; 3] = [Policy::Fixed, Policy::Busy, Policy::InFlight];

    fn name(self) -> &'static str {
        match self {
            Policy::Fixed => "fixed",
            Policy::Busy => "busy",
            Policy::InFlight => "in-flight",
        }
    }
}

impl Args {
    fn day(&self) -> Duration {
        self.day.unwrap_or(if self.report.quick {
            Duration::from_secs(40)
        } else {
            Duration::from_secs(180)
        })
    }

    fn burst_before(&self) -> Duration {
        self.burst_before
            .unwrap_or(Duration::from_secs(if self.report.quick { 12 } else { 20 }))
    }

    fn burst_rounds(&self) -> usize {
        self.burst_rounds
            .unwrap_or(if self.report.quick { 1 } else { 3 })
            .max(1)
    }

    fn burst_after(&self) -> Duration {
        self.burst_after
            .unwrap_or(Duration::from_secs(if self.report.quick { 15 } else { 30 }))
    }

    /// The balancer settings of `policy`'s pool; its files are `DIR/NAME.*`.
    fn spec(&self, dir: &Path, name: &str, policy: Policy) -> PoolSpec {
        let (min, max) = match policy {
            Policy::Fixed => (self.max_workers, self.max_workers),
            Policy::Busy | Policy::InFlight => (1, self.max_workers),
        };
        let mut spec = PoolSpec {
            model: self.model.clone(),
            min_workers: min,
            max_workers: max,
            signal: "busy",
            target_utilization: self.target_utilization,
            // The in-flight guard at about --max-batch (32): it acts past saturation only.
            target_load: 32.0,
            scale_out_delay: Duration::ZERO,
            scale_in_delay: self.scale_in_delay,
            scale_in_startups: self.scale_in_startups,
            window: self.busy_window,
            panic_window: self.busy_panic_window,
            // A 64 MiB worker is serving within a second; two 1 s health checks follow.
            worker_startup: Duration::from_secs(3),
            log: dir.join(format!("{name}.log")),
            // The policy's decisions (each change of the desired count, mode or signal,
            // with its figures and reason), worker starts and health changes: what the
            // report's reader needs to see why the pool was the size it was.
            rust_log: "warn,tidepool_balancer::autoscale=info,tidepool_balancer::health=info",
            worker_logs: None,
        };
        if policy == Policy::InFlight {
            spec.signal = "in-flight";
            spec.target_load = self.in_flight_target_load;
            spec.scale_out_delay = self.in_flight_scale_out_delay;
            spec.window = self.in_flight_window;
            spec.panic_window = self.in_flight_window;
        }
        spec
    }

    fn load(&self, pool: &Pool, rate: f64, duration: Duration) -> LoadConfig {
        let mut load = LoadConfig::new(pool.listen.to_string());
        load.rate = rate;
        load.duration = duration;
        load.inputs = vec![InputSpec {
            name: "input".to_owned(),
            dtype: tidepool_protocol::DType::F32,
            shape: vec![self.input_dim],
        }];
        load.seed = self.seed;
        load.deadline = Some(Duration::from_secs(5));
        load.drain = Duration::from_secs(10);
        load
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.report.out.join("autoscale");
    std::fs::create_dir_all(&dir)?;
    anyhow::ensure!(
        args.model.is_file(),
        "{} is missing; scripts/bench.sh writes it (tidepool-worker synth --size 64MiB --input-dim 256 --output-dim 16 --layers 4 --seed 1)",
        args.model.display()
    );
    anyhow::ensure!(
        args.burst_step.is_finite() && args.burst_step > 1.0,
        "--burst-step {} is not a step up: give the peak over the base rate, more than 1 (10: a tenth of the peak, then the peak)",
        args.burst_step
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let load_before = loadavg();
    let mut report = Report::new();
    report.set("machine", machine());
    report.set("quick", args.report.quick);

    eprintln!("autoscale: one worker's capacity");
    let capacity = capacity(&args, &dir, &runtime)?;
    let peak = args.peak.unwrap_or((capacity * args.peak_capacity).round());
    eprintln!(
        "autoscale: one worker serves about {capacity:.0} items/s; the peak is {peak:.0} items/s"
    );

    let mut days = Vec::new();
    if !args.no_day {
        for policy in Policy::ALL {
            eprintln!("autoscale: a {:?} day, {} pool", args.day(), policy.name());
            days.push(day(&args, &dir, &runtime, policy, peak)?);
        }
    }
    let mut bursts = Vec::new();
    if !args.no_burst {
        // The fixed pool has no reaction to time: one round. The autoscaled pools alternate,
        // so that a drift in the machine's load hits both.
        let mut rounds = vec![(Policy::Fixed, 1)];
        for round in 1..=args.burst_rounds() {
            rounds.extend([(Policy::Busy, round), (Policy::InFlight, round)]);
        }
        for (policy, round) in rounds {
            eprintln!(
                "autoscale: a burst {:.0} -> {peak:.0} items/s, {} pool, round {round}",
                peak / args.burst_step,
                policy.name()
            );
            bursts.push(burst(&args, &dir, &runtime, policy, round, peak, capacity)?);
        }
    }
    eprintln!("autoscale: single worker starts");
    let mut singles = vec![single_start(&args.model, "64MiB", &dir)?];
    if args.big_model.is_file() && !args.report.quick {
        singles.push(single_start(&args.big_model, "1GiB", &dir)?);
    }
    let load_after = loadavg();

    let run = Run {
        capacity,
        peak,
        days,
        bursts,
        singles,
    };
    write_report(&args, &mut report, &run, (&load_before, &load_after));
    report.write(&args.report.out, "autoscale")?;
    println!("{}", report.markdown());
    Ok(())
}

/// Everything measured, for the report.
struct Run {
    capacity: f64,
    peak: f64,
    days: Vec<PoolRun>,
    bursts: Vec<PoolRun>,
    singles: Vec<SingleStart>,
}

/// One worker's capacity, items/s: the answers per second of a one-worker pool under a
/// constant overload.
fn capacity(args: &Args, dir: &Path, runtime: &tokio::runtime::Runtime) -> anyhow::Result<f64> {
    let mut spec = args.spec(dir, "capacity", Policy::Fixed);
    spec.min_workers = 1;
    spec.max_workers = 1;
    let pool = Pool::start(&spec, Duration::from_secs(120))?;
    let seconds = if args.report.quick { 4 } else { 8 };
    // Far above what one worker serves, not so far that the load generator itself takes
    // the worker's core.
    let load = args.load(&pool, 10_000.0, Duration::from_secs(seconds));
    let result = runtime.block_on(tidepool_load::run(load, CancellationToken::new()));
    drop(pool);
    let report = result.context("the capacity measurement's load")?;
    report.write_json(&dir.join("capacity-report.json"))?;
    anyhow::ensure!(
        report.throughput > 0.0,
        "one worker answered nothing under load; see {}",
        spec.log.display()
    );
    Ok(report.throughput)
}

/// One run of a profile against one pool: the load's report and what the pool cost.
#[derive(Serialize)]
struct PoolRun {
    policy: Policy,
    /// Burst runs: which round of its policy (1 for the day's runs).
    round: usize,
    worker_seconds: f64,
    mean_workers: f64,
    most_workers: usize,
    objective: ObjectiveShare,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    offered: u64,
    ok: u64,
    not_ok: u64,
    /// Burst runs: the workers the peak needs at 100% busy, and the seconds from the step
    /// until that many were ready (`None`: never, in the run).
    enough: Option<usize>,
    /// Burst runs: workers ready at the step (a pool that already had enough, grown during
    /// the base, shows no recovery to compare).
    ready_at_step: Option<usize>,
    /// Burst runs: seconds from the step until the policy asked for enough workers (its
    /// reaction, before any worker starts); `None` for a pool that already had enough.
    to_ask_s: Option<f64>,
    to_enough_s: Option<f64>,
    /// Burst runs: after the step, the worst per-second p99 and the seconds over the
    /// objective.
    worst_p99_after_ms: Option<f64>,
    seconds_over_after: usize,
    #[serde(skip)]
    timeline: Vec<tidepool_load::SecondRow>,
    #[serde(skip)]
    points: Vec<ScalingPoint>,
    /// Each stretch a worker was healthy (burst runs time the step by them).
    #[serde(skip)]
    healthy: Vec<HealthySpan>,
    cpu_load: (String, String),
}

/// What a run measures: `[0, until)` seconds of it, reading the pool every `every`.
#[derive(Clone, Copy, Debug)]
struct Reading {
    until: Duration,
    every: Duration,
}

/// Runs `load` against a fresh pool of `policy`, saving its files as `DIR/NAME-*`, and
/// measures it as `reading` says.
fn measure(
    args: &Args,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    policy: Policy,
    load: impl FnOnce(&Pool) -> LoadConfig,
    reading: Reading,
) -> anyhow::Result<PoolRun> {
    let Reading { until, every } = reading;
    let before = loadavg();
    let spec = args.spec(dir, name, policy);
    let pool = Pool::start(&spec, Duration::from_secs(120))?;
    let load = load(&pool);
    let zero = Instant::now();
    let poller = Poller::start(pool.admin, zero, every);
    let result = runtime.block_on(tidepool_load::run(load, CancellationToken::new()));
    let Polled { points, healthy } = poller.stop();
    drop(pool);
    let report = result.with_context(|| format!("the load of {name}"))?;
    report.write_json(&dir.join(format!("{name}-report.json")))?;
    report.write_timeline(&dir.join(format!("{name}-timeline.csv")))?;
    std::fs::write(
        dir.join(format!("{name}-scaling.json")),
        serde_json::to_string(&points)? + "\n",
    )?;
    let until_s = until.as_secs_f64();
    let ws = worker_seconds(&points, 0.0, until_s);
    let ok = report.ok();
    Ok(PoolRun {
        policy,
        round: 1,
        worker_seconds: ws,
        mean_workers: ws / until_s,
        most_workers: points
            .iter()
            .map(|p| p.scaling.running())
            .max()
            .unwrap_or(0),
        objective: ObjectiveShare::of(&report.timeline, args.objective_ms, until.as_secs()),
        p50_ms: report.latency_ms.p50,
        p99_ms: report.latency_ms.p99,
        offered: report.offered,
        ok,
        not_ok: report.offered.saturating_sub(ok),
        enough: None,
        ready_at_step: None,
        to_ask_s: None,
        to_enough_s: None,
        worst_p99_after_ms: None,
        seconds_over_after: 0,
        timeline: report.timeline,
        points,
        healthy,
        cpu_load: (before, loadavg()),
    })
}

fn day(
    args: &Args,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    policy: Policy,
    peak: f64,
) -> anyhow::Result<PoolRun> {
    let name = format!("day-{}", policy.name());
    let load = |pool: &Pool| {
        let mut load = args.load(pool, peak, args.day());
        load.profile = ProfileKind::Day;
        load
    };
    measure(
        args,
        dir,
        runtime,
        &name,
        policy,
        load,
        Reading {
            until: args.day(),
            every: Duration::from_secs(1),
        },
    )
}

/// The burst: the base (the peak over `--burst-step`), then the peak at once until the end.
fn burst(
    args: &Args,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    policy: Policy,
    round: usize,
    peak: f64,
    capacity: f64,
) -> anyhow::Result<PoolRun> {
    let name = match round {
        1 => format!("burst-{}", policy.name()),
        n => format!("burst-{}-{n}", policy.name()),
    };
    let total = args.burst_before() + args.burst_after();
    let load = |pool: &Pool| {
        let mut load = args.load(pool, peak, total);
        load.profile = ProfileKind::Burst;
        load.burst_base = Some(peak / args.burst_step);
        load.burst_every = total;
        load.burst_length = args.burst_after();
        load
    };
    // Read every 100 ms: the step's times come from the balancer's own timestamps (its
    // action's, each worker's turning healthy): a reading every 100 ms sees every action
    // (the autoscaler acts at most every 100 ms), and the times are the balancer's own.
    let every = Duration::from_millis(100);
    let reading = Reading {
        until: total,
        every,
    };
    let mut run = measure(args, dir, runtime, &name, policy, load, reading)?;
    // Enough: the workers the peak needs with each one fully busy; fewer and the queue
    // grows without bound.
    let enough = ((peak / capacity.max(f64::MIN_POSITIVE)) - 1e-9)
        .ceil()
        .max(1.0) as usize;
    let step = args.burst_before();
    run.round = round;
    run.enough = Some(enough);
    run.ready_at_step = Some(healthy_at(&run.healthy, step.as_secs_f64()));
    run.to_enough_s = time_to_ready(&run.healthy, step.as_secs_f64(), enough);
    if run.ready_at_step.unwrap_or(0) < enough {
        run.to_ask_s = time_to_ask(&run.points, step.as_secs_f64(), enough);
    }
    let after: Vec<_> = run
        .timeline
        .iter()
        .filter(|r| r.t >= step.as_secs() && r.t < total.as_secs())
        .collect();
    run.worst_p99_after_ms = after.iter().filter_map(|r| r.p99_ms).reduce(f64::max);
    run.seconds_over_after = after
        .iter()
        .filter(|r| r.p99_ms.is_some_and(|p| p > args.objective_ms))
        .count();
    Ok(run)
}

/// One worker started alone, timed from the spawn.
#[derive(Serialize)]
struct SingleStart {
    size: &'static str,
    listening_s: Option<f64>,
    model_loaded_s: Option<f64>,
    warmed_up_s: Option<f64>,
    serving_s: Option<f64>,
}

fn single_start(model: &Path, size: &'static str, dir: &Path) -> anyhow::Result<SingleStart> {
    let log = dir.join(format!("single-{size}.log"));
    let file = std::fs::File::create(&log)?;
    let zero = SystemTime::now();
    let mut command = Command::new(sibling_exe("tidepool-worker")?);
    command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .args(["serve", "--model"])
        .arg(model)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--max-batch",
            "32",
        ])
        .stdout(Stdio::null())
        .stderr(file);
    let mut proc = Proc::spawn("tidepool-worker", &mut command)?;
    let started = Instant::now();
    let serving = |lines: &[tidepool_bench::autoscale::LogLine]| {
        lines
            .iter()
            .any(|l| l.text.contains(" ready") && l.text.contains("max_batch"))
    };
    while !serving(&read_log(&log)) {
        proc.check_running()?;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the {size} worker was not serving within 5 minutes; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(proc);
    let t = StartTimeline::read("", &[], &read_log(&log), zero);
    Ok(SingleStart {
        size,
        listening_s: t.listening,
        model_loaded_s: t.model_loaded,
        warmed_up_s: t.warmed_up,
        serving_s: t.serving,
    })
}

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg has them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ms(v: Option<f64>) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.0} ms"))
}

fn s(v: Option<f64>) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.2} s"))
}

fn span(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2} s", b - a),
        _ => "—".to_owned(),
    }
}

fn write_report(
    args: &Args,
    report: &mut Report,
    run: &Run,
    (load_before, load_after): (&str, &str),
) {
    let day = args.day();
    let compression = 86_400.0 / day.as_secs_f64();
    let real = |d: Duration| {
        let m = d.as_secs_f64() * compression / 60.0;
        if m >= 90.0 {
            format!("{:.1} h", m / 60.0)
        } else {
            format!("{m:.0} min")
        }
    };
    report.para(&format!(
        "Machine: {}. Load average (1/5/15 min) {load_before} before the benchmark, {load_after} after.{}",
        machine(),
        if args.report.quick {
            " **Quick smoke run (BENCH_QUICK=1): figures are not meaningful.**"
        } else {
            ""
        }
    ));
    let busy = args.spec(Path::new(""), "", Policy::Busy);
    let in_flight = args.spec(Path::new(""), "", Policy::InFlight);
    report.para(&format!(
        "Settings: the 64 MiB model `{}` (input f32×{}), workers `--threads 1 --max-batch 32 \
         --max-delay 5ms`, balancer health checks every 1 s (2 passes to turn healthy). One \
         worker served **{:.0} items/s** under a constant overload at the start; the peak is \
         **{:.0} items/s**{}. Pools: **fixed** `--min-workers {max} --max-workers {max}`; \
         **busy** (the default policy) `--scaling-signal busy --target-utilization {} \
         --target-load {} --scaling-window {:?} --panic-window {:?} --scale-in-delay {:?} \
         --scale-in-startups {} --worker-startup {:?}`; **in-flight** (the policy before busy shares, as this \
         benchmark tuned it) `--scaling-signal in-flight --target-load {} --scaling-window \
         {:?} --panic-window {:?} --scale-out-delay {:?} --scale-in-delay {:?}`; both \
         autoscaled pools `--min-workers 1 --max-workers {max}`. A {}-second day is \
         {compression:.0}× faster than 24 h: the longest scale-down delay stands for {} of a \
         real day and the busy pool's stable window for {} (the table below maps each \
         setting). Process start, model load and warm-up cannot be compressed: they take \
         real seconds, which here are {compression:.0} times as long in day time. Objective: **p99 ≤ {:.0} ms in each second**; seconds without \
         a result are not counted against it.",
        args.model.display(),
        args.input_dim,
        run.capacity,
        run.peak,
        if args.peak.is_some() {
            " (--peak)".to_owned()
        } else {
            format!(" ({}× that)", args.peak_capacity)
        },
        busy.target_utilization,
        busy.target_load,
        busy.window,
        busy.panic_window,
        busy.scale_in_delay,
        busy.scale_in_startups,
        busy.worker_startup,
        in_flight.target_load,
        in_flight.window,
        in_flight.panic_window,
        in_flight.scale_out_delay,
        in_flight.scale_in_delay,
        day.as_secs(),
        real(args.scale_in_delay),
        real(args.busy_window),
        args.objective_ms,
        max = args.max_workers,
    ));
    settings_map(args, report, compression);
    report.set(
        "settings",
        serde_json::json!({
            "model": args.model, "capacity": run.capacity, "peak": run.peak,
            "day_s": day.as_secs_f64(), "max_workers": args.max_workers,
            "burst_before_s": args.burst_before().as_secs_f64(),
            "burst_step": args.burst_step,
            "burst_after_s": args.burst_after().as_secs_f64(),
            "objective_ms": args.objective_ms, "seed": args.seed, "compression": compression,
            "busy": format!("{busy:?}"), "in_flight": format!("{in_flight:?}"),
        }),
    );

    if !run.days.is_empty() {
        day_section(args, report, run);
    }
    if !run.bursts.is_empty() {
        burst_section(args, report, run);
    }
    report.heading("3. One worker start alone (no load, no other worker starting)");
    report.para(
        "The worker's own log, from the spawn: process start (spawn → listening), model load \
         (the ONNX session built), warm-up (one batch run), batcher start.",
    );
    let rows: Vec<Vec<String>> = run
        .singles
        .iter()
        .map(|x| {
            vec![
                x.size.to_owned(),
                s(x.listening_s),
                span(x.listening_s, x.model_loaded_s),
                span(x.model_loaded_s, x.warmed_up_s),
                span(x.warmed_up_s, x.serving_s),
                s(x.serving_s),
            ]
        })
        .collect();
    report.table(
        &[
            "model",
            "process start",
            "model load",
            "warm-up",
            "batcher start",
            "spawn → serving",
        ],
        &rows,
    );
    report.set("single_starts", &run.singles);
}

/// The balancer's own defaults (`PolicyConfig::DEFAULT` in balancer/src/autoscale/policy.rs;
/// the bench does not link the balancer, it runs it).
struct RealDefaults {
    window: Duration,
    panic_window: Duration,
    scale_in_startups: f64,
    scale_in_delay: Duration,
}

impl RealDefaults {
    const BALANCER: RealDefaults = RealDefaults {
        window: Duration::from_secs(60),
        panic_window: Duration::from_secs(6),
        scale_in_startups: 3.0,
        scale_in_delay: Duration::from_secs(120),
    };
}

/// How the busy pool's settings stand for a real deployment's: each setting about the
/// load's own time scale is compressed with the day, down to the floor the machinery
/// sets (one sample a second, the workers' 2 s load-share average, real start-ups).
fn settings_map(args: &Args, report: &mut Report, compression: f64) {
    let real = RealDefaults::BALANCER;
    let scaled = |d: Duration| format!("{:.3} s", d.as_secs_f64() / compression);
    let rows = vec![
        vec![
            "stable window `--scaling-window`".to_owned(),
            format!("{:?}", real.window),
            scaled(real.window),
            format!("{:?}", args.busy_window),
            "the workers average their load share over 2 s and the balancer samples once a \
             second: a shorter window averages one worker's noise"
                .to_owned(),
        ],
        vec![
            "panic window `--panic-window`".to_owned(),
            format!("{:?}", real.panic_window),
            scaled(real.panic_window),
            format!("{:?}", args.busy_panic_window),
            "two samples; a surge also panics on a tenth of a second of arrivals outrunning answers"
                .to_owned(),
        ],
        vec![
            "scale-down delay".to_owned(),
            format!(
                "{} start-ups, at most {:?}",
                real.scale_in_startups, real.scale_in_delay
            ),
            format!(
                "{} start-ups, at most {}",
                real.scale_in_startups,
                scaled(real.scale_in_delay)
            ),
            format!(
                "{} start-ups, at most {:?}",
                args.scale_in_startups, args.scale_in_delay
            ),
            format!(
                "start-ups are real seconds in both (spawn, model load, two start-up checks \
                 100 ms apart, timed to the autoscaler's tenth of a second: under a second for \
                 this model), so the rule is the same and its day time is {compression:.0}× \
                 longer"
            ),
        ],
        vec![
            "health checks".to_owned(),
            "every few seconds".to_owned(),
            "—".to_owned(),
            "every 1 s, 2 to turn healthy".to_owned(),
            "part of every start-up, but only once healthy: see the next row".to_owned(),
        ],
        vec![
            "start-up checks (not a flag)".to_owned(),
            "every 100 ms until first healthy, for at most 60 s".to_owned(),
            "—".to_owned(),
            "the same".to_owned(),
            "a new worker is let in 2 fast checks after it registers, not 2 intervals \
             after; the same in any deployment"
                .to_owned(),
        ],
        vec![
            "workers' load-share average (not a flag)".to_owned(),
            "2 s".to_owned(),
            "—".to_owned(),
            "2 s".to_owned(),
            "was 5 s: the policy averages over its own windows, so the worker's average \
             only added lag to every decision, in any deployment"
                .to_owned(),
        ],
    ];
    report.table(
        &[
            "setting",
            "real deployment (default)",
            "the same ÷ compression",
            "this day",
            "floor: why not shorter",
        ],
        &rows,
    );
}

/// The run of `policy` among `runs`.
fn of(runs: &[PoolRun], policy: Policy) -> Option<&PoolRun> {
    runs.iter().find(|r| r.policy == policy)
}

/// The columns every profile's table shares.
fn pool_cells(args: &Args, r: &PoolRun, fixed: Option<&PoolRun>) -> Vec<String> {
    let saving = match fixed {
        Some(f) if r.policy != Policy::Fixed => format!(
            "**{:.1}%**",
            100.0 * (1.0 - r.worker_seconds / f.worker_seconds.max(f64::MIN_POSITIVE))
        ),
        _ => "—".to_owned(),
    };
    let (min, max) = match r.policy {
        Policy::Fixed => (args.max_workers, args.max_workers),
        _ => (1, args.max_workers),
    };
    vec![
        format!("{} ({min}..{max})", r.policy.name()),
        format!("{:.0}", r.worker_seconds),
        format!("{:.2} (most {})", r.mean_workers, r.most_workers),
        saving,
        format!(
            "{:.1}% ({} of {}; {} empty)",
            r.objective.percent(),
            r.objective.met,
            r.objective.judged,
            r.objective.empty
        ),
        ms(r.p50_ms),
        ms(r.p99_ms),
        format!("{} / {}", r.not_ok, r.offered),
        format!("{} → {}", r.cpu_load.0, r.cpu_load.1),
    ]
}

const POOL_COLUMNS: [&str; 9] = [
    "pool",
    "worker-seconds",
    "mean workers",
    "saving vs fixed",
    "seconds within objective",
    "p50",
    "p99",
    "not ok / offered",
    "load avg before → after",
];

fn saving(r: &PoolRun, fixed: &PoolRun) -> f64 {
    100.0 * (1.0 - r.worker_seconds / fixed.worker_seconds.max(f64::MIN_POSITIVE))
}

fn day_section(args: &Args, report: &mut Report, run: &Run) {
    let day = args.day();
    report.heading(&format!(
        "1. A compressed day: fixed at {} workers, busy-share and in-flight autoscaling 1..{}",
        args.max_workers, args.max_workers
    ));
    report.para(&format!(
        "`tidepool-load --profile day --rate {:.0} --duration {}s --seed {} --deadline 5s` \
         (Poisson arrivals: night at a tenth of the peak, a morning ramp, the peak from 11:00 to \
         15:00, an evening fall), the same schedule against each pool, one after the other. \
         Worker-seconds integrate `ready + coming + leaving` from `GET /scaling`, read every \
         second over the day: a worker costs from its spawn to its exit. p99 per second from \
         the load's timeline (latency from each request's intended send time).",
        run.peak,
        day.as_secs(),
        args.seed
    ));
    let fixed = of(&run.days, Policy::Fixed);
    let rows: Vec<Vec<String>> = run
        .days
        .iter()
        .map(|r| pool_cells(args, r, fixed))
        .collect();
    report.table(&POOL_COLUMNS, &rows);
    if let (Some(fixed), Some(busy)) = (fixed, of(&run.days, Policy::Busy)) {
        let saved = saving(busy, fixed);
        let met = saved >= 35.0 && busy.objective.percent() >= 99.5;
        report.para(&format!(
            "Goal: the busy-share policy uses at least 35% fewer worker-seconds than \
             fixed-at-peak with the objective met in at least 99.5% of the seconds: **{}** \
             ({saved:.1}% fewer, objective met {:.1}% of the judged seconds; the fixed pool \
             met it {:.1}%{}).",
            if met { "met" } else { "missed" },
            busy.objective.percent(),
            fixed.objective.percent(),
            of(&run.days, Policy::InFlight).map_or(String::new(), |r| format!(
                ", the in-flight policy {:.1}% with {:.1}% fewer worker-seconds",
                r.objective.percent(),
                saving(r, fixed)
            )),
        ));
        report.set("day_saving_percent", saved);
        report.set("day_goal_met", met);
    }
    // The day in eight parts of three hours.
    let parts = 8u64;
    let part_s = day.as_secs_f64() / parts as f64;
    let mut rows = Vec::new();
    for i in 0..parts {
        let (from, to) = (i as f64 * part_s, (i + 1) as f64 * part_s);
        let in_part = |r: &&tidepool_load::SecondRow| (r.t as f64) >= from && (r.t as f64) < to;
        let offered: Vec<u64> = run.days[0]
            .timeline
            .iter()
            .filter(in_part)
            .map(|r| r.offered)
            .collect();
        let mean_offered = offered.iter().sum::<u64>() as f64 / offered.len().max(1) as f64;
        let cell = |r: &PoolRun| {
            let ws = worker_seconds(&r.points, from, to) / part_s;
            let worst = r
                .timeline
                .iter()
                .filter(in_part)
                .filter_map(|x| x.p99_ms)
                .reduce(f64::max);
            let missed = r
                .timeline
                .iter()
                .filter(in_part)
                .filter(|x| x.p99_ms.is_some_and(|p| p > args.objective_ms))
                .count();
            format!("{ws:.2} / {} / {missed}", ms(worst))
        };
        let mut row = vec![
            format!("{:02}–{:02} h", i * 3, (i + 1) * 3),
            format!("{mean_offered:.0}"),
        ];
        row.extend(run.days.iter().map(cell));
        rows.push(row);
    }
    report.para("Through the day, in eight parts of three day-hours: mean workers / worst per-second p99 / seconds over the objective.");
    let mut header = vec!["day time", "offered items/s"];
    header.extend(run.days.iter().map(|r| r.policy.name()));
    report.table(&header, &rows);
    if let Some(busy) = of(&run.days, Policy::Busy) {
        signal_section(report, run, busy, &run.days[0].timeline, part_s, parts);
    }
    report.para(
        "Files: `bench-out/autoscale/day-{fixed,busy,in-flight}-{timeline.csv,timeline.svg,report.json,scaling.json}` and `.log`.",
    );
    report.set("days", &run.days);
}

/// The busy pool's signal by day part, from its `/scaling` readings: what the policy saw
/// against what the offered load needed, so that the report says why the pool was the size
/// it was (`scaling.json` and the `.log` have every reading and decision).
fn signal_section(
    report: &mut Report,
    run: &Run,
    busy: &PoolRun,
    offered: &[tidepool_load::SecondRow],
    part_s: f64,
    parts: u64,
) {
    let mut rows = Vec::new();
    for i in 0..parts {
        let (from, to) = (i as f64 * part_s, (i + 1) as f64 * part_s);
        let points: Vec<&Scaling> = busy
            .points
            .iter()
            .filter(|p| p.t >= from && p.t < to)
            .map(|p| &p.scaling)
            .collect();
        let mean = |f: &dyn Fn(&Scaling) -> Option<f64>| {
            let v: Vec<f64> = points.iter().filter_map(|p| f(p)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let rate: Vec<u64> = offered
            .iter()
            .filter(|r| (r.t as f64) >= from && (r.t as f64) < to)
            .map(|r| r.offered)
            .collect();
        let need = rate.iter().sum::<u64>() as f64
            / rate.len().max(1) as f64
            / run.capacity.max(f64::MIN_POSITIVE);
        let busy_total = mean(&|p| p.busy_total);
        let panic = points.iter().filter(|p| p.mode == "panic").count();
        let mut signals: Vec<(&str, usize)> = Vec::new();
        for p in &points {
            match signals.iter_mut().find(|(s, _)| *s == p.signal) {
                Some((_, k)) => *k += 1,
                None => signals.push((p.signal.as_str(), 1)),
            }
        }
        signals.sort_by_key(|s| std::cmp::Reverse(s.1));
        let f2 = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.2}"));
        rows.push(vec![
            format!("{:02}–{:02} h", i * 3, (i + 1) * 3),
            format!("{need:.2}"),
            f2(busy_total),
            f2(busy_total.map(|b| b / need.max(f64::MIN_POSITIVE))),
            mean(&|p| p.capacity_per_worker).map_or("—".to_owned(), |c| format!("{c:.0}")),
            f2(mean(&|p| Some(p.total_load))),
            f2(mean(&|p| Some(p.desired as f64))),
            format!("{panic} of {}", points.len()),
            signals
                .iter()
                .map(|(s, k)| format!("{s} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    report.para(&format!(
        "The busy pool's signal through the day, from its `/scaling` readings (means per \
         part): the load's need in workers at 100% busy (offered ÷ the {:.0} items/s one \
         worker served alone), the busy shares summed as the balancer read them and their \
         ratio to that need (above 1: the signal over-reads), each worker's capacity as the \
         balancer measured it (answers over busy shares), requests in flight and queued \
         (the in-flight guard's load), the desired count, the readings in panic mode, and \
         which signal set the demand. `day-busy.log` has each change of decision with its \
         reason.",
        run.capacity
    ));
    report.table(
        &[
            "day time",
            "need (workers at 100%)",
            "busy total",
            "busy ÷ need",
            "capacity per worker, measured",
            "in flight + queued",
            "desired",
            "panic",
            "demand set by",
        ],
        &rows,
    );
}

fn burst_section(args: &Args, report: &mut Report, run: &Run) {
    let (before, after) = (args.burst_before(), args.burst_after());
    let total = before + after;
    report.heading(&format!(
        "2. A burst: {:.0} → {:.0} items/s at once (a {}× step)",
        run.peak / args.burst_step,
        run.peak,
        args.burst_step
    ));
    let enough = run.bursts.iter().find_map(|r| r.enough).unwrap_or(1);
    report.para(&format!(
        "`tidepool-load --profile burst --burst-base {:.0} --rate {:.0} --burst-every {}s \
         --burst-length {}s --duration {}s`: {} s at the base, then the peak. Enough \
         workers: what the peak needs with each fully busy, ceil({:.0} / {:.0}) = **{enough}**; \
         fewer and the queue grows without bound. Both times are the balancer's own \
         timestamps, read every 100 ms: \"asked\" is its scale-out to enough workers (from \
         `GET /scaling`'s last action), \"ready\" the moment the last of them turned healthy \
         (from `GET /targets`), when routing starts sending to it. The goal is judged \
         only when both autoscaled pools had fewer than enough ready at the step: a pool that \
         already had enough bought it with workers at the base, and has nothing to recover.",
        run.peak / args.burst_step,
        run.peak,
        total.as_secs(),
        after.as_secs(),
        total.as_secs(),
        before.as_secs(),
        run.peak,
        run.capacity,
    ));
    let fixed = of(&run.bursts, Policy::Fixed);
    let mut header = POOL_COLUMNS.to_vec();
    header.extend([
        "round",
        "mean workers at the base",
        "step → asked for enough",
        "step → enough ready",
        "after the step: worst p99 / seconds over",
    ]);
    let step_s = before.as_secs_f64();
    let at_base = |r: &PoolRun| worker_seconds(&r.points, 0.0, step_s) / step_s.max(1e-9);
    let rows: Vec<Vec<String>> = run
        .bursts
        .iter()
        .map(|r| {
            let mut row = pool_cells(args, r, fixed);
            row.push(r.round.to_string());
            row.push(format!("{:.2}", at_base(r)));
            row.push(s(r.to_ask_s));
            row.push(format!(
                "{} ({} ready at the step)",
                s(r.to_enough_s),
                r.ready_at_step.map_or("?".to_owned(), |n| n.to_string())
            ));
            row.push(format!(
                "{} / {} of {}",
                ms(r.worst_p99_after_ms),
                r.seconds_over_after,
                after.as_secs()
            ));
            row
        })
        .collect();
    report.table(&header, &rows);
    let busy: Vec<&PoolRun> = run
        .bursts
        .iter()
        .filter(|r| r.policy == Policy::Busy)
        .collect();
    let in_flight: Vec<&PoolRun> = run
        .bursts
        .iter()
        .filter(|r| r.policy == Policy::InFlight)
        .collect();
    if !busy.is_empty() && !in_flight.is_empty() {
        let had_enough = |r: &&PoolRun| r.ready_at_step.unwrap_or(0) >= enough;
        // A round that never had enough counts as the whole peak: it never recovered.
        let mean = |runs: &[&PoolRun], of: fn(&PoolRun) -> Option<f64>| {
            runs.iter()
                .map(|r| of(r).unwrap_or(after.as_secs_f64()))
                .sum::<f64>()
                / runs.len() as f64
        };
        let (busy_ready, in_flight_ready) = (
            mean(&busy, |r| r.to_enough_s),
            mean(&in_flight, |r| r.to_enough_s),
        );
        let verdict = if busy.iter().any(had_enough) || in_flight.iter().any(had_enough) {
            // Nothing to recover from: the comparison would be between two readings of a
            // pool that was already big enough.
            "not judged: a pool already had enough workers ready at the step"
        } else if busy_ready < in_flight_ready {
            "met"
        } else {
            "missed"
        };
        // A pool that had enough at the step bought it with workers at the base: say what
        // each pool's readiness cost there, beside the policies' own reactions.
        let base =
            |runs: &[&PoolRun]| runs.iter().map(|r| at_base(r)).sum::<f64>() / runs.len() as f64;
        report.para(&format!(
            "Goal: the busy-share policy has enough workers sooner after the step than the \
             in-flight policy, in the mean over {} rounds each: **{verdict}** ({busy_ready:.2} s \
             against {in_flight_ready:.2} s). Asked for enough, in the mean: busy {:.2} s, \
             in-flight {:.2} s after the step. At the base rate the busy pool held {:.2} \
             workers and the in-flight pool {:.2}, in the mean.",
            busy.len().min(in_flight.len()),
            mean(&busy, |r| r.to_ask_s),
            mean(&in_flight, |r| r.to_ask_s),
            base(&busy),
            base(&in_flight),
        ));
        report.set("burst_goal", verdict);
    }
    report.para(
        "Files: `bench-out/autoscale/burst-{fixed,busy,in-flight}-{timeline.csv,timeline.svg,report.json,scaling.json}` and `.log`.",
    );
    report.set("bursts", &run.bursts);
}
