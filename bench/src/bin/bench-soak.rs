//! `bench-soak` (`make soak`): a long run at a share of the pool's capacity with a fault every
//! few minutes, for leaks and lost answers rather than speed (issue 11).
//!
//! 1. Starts an autoscaling balancer fixed at `--workers` workers (`--min-workers` =
//!    `--max-workers`), which starts the workers itself and starts a new one when one dies.
//! 2. Measures capacity (results per second at saturation, pipelined) unless `--rate` is
//!    given, then sends `--load` of it (70%) at a steady rate for `--minutes`, every
//!    request with a `deadline_ms`, on plain sockets that count the answers per id.
//! 3. Every `--fault-every`, in turn: SIGKILL one worker (the balancer starts another), or
//!    SIGSTOP one for `--freeze` and SIGCONT it.
//! 4. Samples the RSS of the balancer and every worker every `--sample-every`, and reports
//!    each process's slope (MiB per hour, least squares) and that every request was answered
//!    exactly once, in `bench-out/soak.md` and `soak.json`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tidepool_bench::autoscale::{Pool, PoolSpec};
use tidepool_bench::pipeline::{self, PipelineConfig};
use tidepool_bench::report::{machine, Report};
use tidepool_bench::small_item;
use tidepool_protocol::{Infer, Message, MessageCodec, Tensors};
use tokio_util::codec::Framed;

#[derive(Parser, Debug)]
#[command(about = "A long run at 70% of capacity with faults: RSS slopes and answers per request")]
struct Args {
    /// Minutes of load (`SOAK_MINUTES` in `make soak`).
    #[arg(long, env = "SOAK_MINUTES", default_value_t = 30.0)]
    minutes: f64,
    /// The ONNX model the workers serve (`tidepool-worker synth` writes one).
    #[arg(long, default_value = "build/models/soak-4MiB-64.onnx")]
    model: PathBuf,
    /// The model's input width (f32 elements per item).
    #[arg(long, default_value_t = 64)]
    input_dim: usize,
    /// Workers in the pool.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Requests per second; measured (results per second at saturation) when absent.
    #[arg(long, env = "SOAK_RATE")]
    rate: Option<f64>,
    /// The share of capacity sent.
    #[arg(long, default_value_t = 0.7)]
    load: f64,
    /// Time between faults (`SOAK_FAULT_EVERY`).
    #[arg(long, env = "SOAK_FAULT_EVERY", value_parser = humantime::parse_duration, default_value = "3m")]
    fault_every: Duration,
    /// How long a frozen (SIGSTOP) worker stays frozen.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    freeze: Duration,
    /// Time between RSS samples.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    sample_every: Duration,
    /// The `deadline_ms` every request carries.
    #[arg(long, default_value_t = 2000)]
    deadline_ms: u64,
    /// Client connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Where the report goes.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.model.is_file() {
        bail!(
            "{} is missing; `make soak` writes it (tidepool-worker synth --out {} --size 4MiB --input-dim {} --output-dim 16)",
            args.model.display(),
            args.model.display(),
            args.input_dim
        );
    }
    std::fs::create_dir_all(&args.out)?;
    let spec = PoolSpec {
        model: args.model.clone(),
        min_workers: args.workers,
        max_workers: args.workers,
        // A fixed pool (min = max): the soak measures faults and memory, not scaling.
        signal: "in-flight",
        target_utilization: 0.7,
        target_load: 4.0,
        scale_out_delay: Duration::from_secs(1),
        scale_in_delay: Duration::from_secs(3600),
        // Never shrinks anyway (min = max); the delay is the longest allowed.
        scale_in_startups: 1e6,
        window: Duration::from_secs(10),
        panic_window: Duration::from_secs(2),
        worker_startup: Duration::from_secs(2),
        log: args.out.join("soak-balancer.log"),
        rust_log: "warn",
        worker_logs: None,
    };
    let pool = Pool::start(&spec, Duration::from_secs(120))?;
    let balancer_pid = pool.pid();
    let item = small_item(args.input_dim);

    let rate = match args.rate {
        Some(rate) => rate,
        None => {
            let measured = pipeline::run(&PipelineConfig {
                addr: pool.listen,
                connections: args.connections,
                window: 16,
                warmup: Duration::from_secs(3),
                measure: Duration::from_secs(10),
                items: vec![item.clone()],
                tls: None,
            })?;
            eprintln!("soak: capacity {:.0} results/s", measured.per_second);
            measured.per_second * args.load
        }
    };
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    eprintln!(
        "soak: {:.0} requests/s for {} with a fault every {}",
        rate,
        humantime::format_duration(duration),
        humantime::format_duration(args.fault_every)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let rss = Arc::new(Mutex::new(BTreeMap::<u32, Series>::new()));
    let heap = Arc::new(Mutex::new(Series {
        name: "balancer heap in use".to_owned(),
        points: Vec::new(),
    }));
    let sampler = {
        let (stop, rss, heap, every) = (
            Arc::clone(&stop),
            Arc::clone(&rss),
            Arc::clone(&heap),
            args.sample_every,
        );
        let admin = pool.admin;
        std::thread::spawn(move || sample_rss(balancer_pid, admin, every, &stop, &rss, &heap))
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let load = {
        let config = LoadConfig {
            addr: pool.listen,
            connections: args.connections,
            rate,
            duration,
            deadline_ms: args.deadline_ms,
            item,
        };
        runtime.spawn(async move { drive(config).await })
    };
    let faults = inject_faults(balancer_pid, duration, args.fault_every, args.freeze)?;
    let tally = runtime.block_on(load).context("the load task")??;
    stop.store(true, Ordering::Release);
    let _ = sampler.join();
    drop(pool);

    let series = rss
        .lock()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
    let heap = heap
        .lock()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
    write_report(&args, rate, duration, &tally, &faults, &series, &heap)?;
    if tally.unanswered > 0 || tally.duplicates > 0 {
        bail!(
            "{} requests unanswered and {} answered more than once; see {}",
            tally.unanswered,
            tally.duplicates,
            args.out.join("soak.md").display()
        );
    }
    Ok(())
}

/// RSS samples of one process.
#[derive(Debug, Default)]
struct Series {
    name: String,
    /// (seconds since the start, MiB).
    points: Vec<(f64, f64)>,
}

/// The worker processes the balancer started: its children.
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The fields after the command name (in parentheses, may hold spaces): state, ppid.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(1) == Some(&parent.to_string())
        })
        .collect()
}

/// Resident memory of a process in MiB, from /proc; `None` once it has exited.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The balancer's heap in use in MiB (`tidepool_heap_allocated_bytes` on its `/metrics`);
/// `None` when it does not report one (built without jemalloc) or does not answer.
fn heap_mib(admin: SocketAddr) -> Option<f64> {
    let metrics = tidepool_bench::process::http_get(admin, "/metrics").ok()?;
    let bytes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidepool_heap_allocated_bytes "))?
        .trim()
        .parse()
        .ok()?;
    Some(bytes / (1024.0 * 1024.0))
}

/// Samples every `every` until `stop`: the RSS of the balancer and its workers, and the
/// balancer's heap in use, so that a rising RSS can be told apart as a leak (the heap rises
/// too) or the allocator keeping freed pages (it does not).
fn sample_rss(
    balancer: u32,
    admin: SocketAddr,
    every: Duration,
    stop: &AtomicBool,
    rss: &Mutex<BTreeMap<u32, Series>>,
    heap: &Mutex<Series>,
) {
    let zero = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let t = zero.elapsed().as_secs_f64();
        let mut pids = vec![(balancer, "balancer".to_owned())];
        pids.extend(
            children(balancer)
                .into_iter()
                .map(|p| (p, format!("worker {p}"))),
        );
        if let (Some(mib), Ok(mut heap)) = (heap_mib(admin), heap.lock()) {
            heap.points.push((t, mib));
        }
        if let Ok(mut map) = rss.lock() {
            for (pid, name) in pids {
                if let Some(mib) = rss_mib(pid) {
                    let series = map.entry(pid).or_default();
                    series.name = name;
                    series.points.push((t, mib));
                }
            }
        }
        std::thread::sleep(every);
    }
}

/// The points from 10 minutes into the run on: what is left once buffers, pools and the
/// allocator have grown to the load, so that a leak shows apart from warm-up.
fn settled(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points.iter().copied().filter(|p| p.0 >= 600.0).collect()
}

/// The least-squares slope of `points`, per hour; `None` with fewer than 3 points or no
/// spread in time.
fn slope_per_hour(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_y)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    (var > 0.0).then(|| cov / var * 3600.0)
}

/// One fault, for the report.
#[derive(Debug, Serialize)]
struct Fault {
    at_s: f64,
    what: String,
}

/// Injects faults into the balancer's workers in turn until `duration` has passed.
fn inject_faults(
    balancer: u32,
    duration: Duration,
    every: Duration,
    freeze: Duration,
) -> anyhow::Result<Vec<Fault>> {
    let zero = Instant::now();
    let mut faults = Vec::new();
    let mut turn = 0usize;
    loop {
        let next = every * u32::try_from(faults.len() + 1).unwrap_or(u32::MAX);
        if next >= duration {
            break;
        }
        std::thread::sleep(next.saturating_sub(zero.elapsed()));
        let workers = children(balancer);
        let Some(&victim) = workers.get(turn % workers.len().max(1)) else {
            faults.push(Fault {
                at_s: zero.elapsed().as_secs_f64(),
                what: "no worker running to fault".to_owned(),
            });
            continue;
        };
        let pid = Pid::from_raw(i32::try_from(victim)?);
        let at_s = zero.elapsed().as_secs_f64();
        if turn % 2 == 0 {
            kill(pid, Signal::SIGKILL)?;
            faults.push(Fault {
                at_s,
                what: format!("SIGKILL worker {victim}"),
            });
        } else {
            kill(pid, Signal::SIGSTOP)?;
            std::thread::sleep(freeze);
            kill(pid, Signal::SIGCONT)?;
            faults.push(Fault {
                at_s,
                what: format!(
                    "SIGSTOP worker {victim} for {}, then SIGCONT",
                    humantime::format_duration(freeze)
                ),
            });
        }
        eprintln!(
            "soak: {:.0} s: {}",
            at_s,
            faults.last().map_or("", |f| &f.what)
        );
        turn += 1;
    }
    Ok(faults)
}

/// The steady load.
struct LoadConfig {
    addr: SocketAddr,
    connections: usize,
    rate: f64,
    duration: Duration,
    deadline_ms: u64,
    item: Tensors,
}

/// Answers counted per request.
#[derive(Debug, Default, Serialize)]
struct Tally {
    sent: u64,
    results: u64,
    /// Error answers by code.
    errors: BTreeMap<String, u64>,
    unanswered: u64,
    /// Of `unanswered`, those sent in the run's last [`TAIL`]: a balancer still behind when
    /// the wait ended, rather than an answer lost mid-run.
    unanswered_in_tail: u64,
    /// When (seconds into the run, from the id and the steady rate) the first unanswered
    /// requests were sent, to tell a burst at one fault from a steady leak.
    unanswered_sent_at_s: Vec<f64>,
    duplicates: u64,
    /// An answer under an id never sent.
    strays: u64,
    /// Seconds spent waiting for answers after the last send.
    drain_s: f64,
}

/// The end of the run whose unanswered requests are counted apart.
const TAIL: Duration = Duration::from_secs(10);
/// The longest wait for answers after the load stops, however long they keep coming.
const MAX_DRAIN: Duration = Duration::from_secs(600);

/// Sends at `rate` over `connections` for `duration`, then waits for the answers and counts
/// them per id. The wait lasts until every request is answered or no answer has come for the
/// deadline plus slack (at most [`MAX_DRAIN`]): a balancer that fell behind starts a
/// request's clock only when it reads the frame, so answers may keep coming long after the
/// last send, and a fixed wait would count them as lost.
async fn drive(config: LoadConfig) -> anyhow::Result<Tally> {
    let origin = Instant::now();
    // Milliseconds from `origin` to the newest answer on any connection.
    let last_answer = Arc::new(AtomicU64::new(0));
    let per_conn = config.rate / config.connections as f64;
    let expected = (per_conn * config.duration.as_secs_f64()).ceil() as usize + 16;
    let mut tasks = Vec::new();
    for _ in 0..config.connections {
        let stream = tokio::net::TcpStream::connect(config.addr).await?;
        stream.set_nodelay(true)?;
        let (mut sink, mut frames) = Framed::new(stream, MessageCodec::new(16 << 20)).split();
        let counts: Arc<Vec<AtomicU64>> =
            Arc::new((0..expected).map(|_| AtomicU64::new(0)).collect());
        let sent = Arc::new(AtomicU64::new(0));
        let (item, deadline_ms, duration) =
            (config.item.clone(), config.deadline_ms, config.duration);
        let writer = {
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                // Sends in 10 ms steps, carrying the fraction over: a steady rate at any size.
                let step = Duration::from_millis(10);
                let mut tick = tokio::time::interval(step);
                let zero = tokio::time::Instant::now();
                let mut due = 0.0;
                let mut next_id = 1u64;
                while zero.elapsed() < duration {
                    tick.tick().await;
                    due += per_conn * step.as_secs_f64();
                    while due >= 1.0 && (next_id as usize) < expected {
                        due -= 1.0;
                        let infer = Infer {
                            id: next_id,
                            inputs: item.clone(),
                            deadline_ms: Some(deadline_ms),
                            client: None,
                            ..Default::default()
                        };
                        sink.feed(Message::Infer(infer)).await?;
                        next_id += 1;
                    }
                    sink.flush().await?;
                    sent.store(next_id - 1, Ordering::Release);
                }
                anyhow::Ok(sink)
            })
        };
        let done = tokio_util::sync::CancellationToken::new();
        let reader = {
            let (counts, done) = (Arc::clone(&counts), done.clone());
            let last_answer = Arc::clone(&last_answer);
            tokio::spawn(async move {
                let mut errors = BTreeMap::<String, u64>::new();
                let (mut results, mut strays) = (0u64, 0u64);
                loop {
                    let frame = tokio::select! {
                        () = done.cancelled() => break,
                        frame = frames.next() => frame,
                    };
                    let Some(frame) = frame else {
                        *errors
                            .entry("connection closed by the balancer".to_owned())
                            .or_default() += 1;
                        break;
                    };
                    let msg = frame??;
                    last_answer.fetch_max(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
                    let id = msg.id() as usize;
                    match counts.get(id) {
                        Some(c) if id > 0 => {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => strays += 1,
                    }
                    match msg {
                        Message::Result(_) => results += 1,
                        Message::Error(e) => *errors.entry(e.code.to_string()).or_default() += 1,
                        _ => {}
                    }
                }
                anyhow::Ok((results, errors, strays))
            })
        };
        tasks.push((writer, reader, done, counts, sent));
    }
    let mut tally = Tally::default();
    let slack = Duration::from_millis(config.deadline_ms) + Duration::from_secs(5);
    let mut finished = Vec::new();
    for (writer, reader, done, counts, sent) in tasks {
        let sink = writer.await??;
        let sent = sent.load(Ordering::Acquire);
        finished.push((sink, reader, done, counts, sent));
    }
    let stopped = Instant::now();
    loop {
        let all_answered = finished.iter().all(|(_, _, _, counts, sent)| {
            (1..=*sent as usize).all(|i| counts[i].load(Ordering::Relaxed) > 0)
        });
        let quiet = origin
            .elapsed()
            .saturating_sub(Duration::from_millis(last_answer.load(Ordering::Relaxed)));
        if all_answered || quiet >= slack || stopped.elapsed() >= MAX_DRAIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tally.drain_s = stopped.elapsed().as_secs_f64();
    let tail_ids = (per_conn * TAIL.as_secs_f64()).ceil() as u64;
    for (sink, reader, done, counts, sent) in finished {
        done.cancel();
        let (results, errors, strays) = reader.await??;
        drop(sink);
        tally.sent += sent;
        tally.results += results;
        tally.strays += strays;
        for (code, n) in errors {
            *tally.errors.entry(code).or_default() += n;
        }
        for (id, c) in counts.iter().enumerate().skip(1).take(sent as usize) {
            match c.load(Ordering::Relaxed) {
                0 => {
                    tally.unanswered += 1;
                    if id as u64 + tail_ids > sent {
                        tally.unanswered_in_tail += 1;
                    }
                    if tally.unanswered_sent_at_s.len() < 20 {
                        tally.unanswered_sent_at_s.push(id as f64 / per_conn);
                    }
                }
                1 => {}
                _ => tally.duplicates += 1,
            }
        }
    }
    Ok(tally)
}

fn write_report(
    args: &Args,
    rate: f64,
    duration: Duration,
    tally: &Tally,
    faults: &[Fault],
    series: &BTreeMap<u32, Series>,
    heap: &Series,
) -> anyhow::Result<()> {
    let mut report = Report::new();
    report.heading("Soak");
    report.para(&format!(
        "{} at {:.0} requests/s ({}% of {}), {} workers (model `{}`), `deadline_ms` {} on every \
         request, a fault every {}; RSS and the balancer's heap in use (jemalloc's `stats.allocated` on its `/metrics`) sampled every {}. Machine: {}.",
        humantime::format_duration(duration),
        rate,
        (args.load * 100.0).round(),
        if args.rate.is_some() {
            "the given rate".to_owned()
        } else {
            "measured capacity".to_owned()
        },
        args.workers,
        args.model.display(),
        args.deadline_ms,
        humantime::format_duration(args.fault_every),
        humantime::format_duration(args.sample_every),
        machine()
    ));
    let errors: Vec<String> = tally
        .errors
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    report.table(
        &[
            "sent",
            "results",
            "errors",
            "unanswered (sent in the last 10 s)",
            "answered twice or more",
            "strays",
            "wait after the last send",
        ],
        &[vec![
            tally.sent.to_string(),
            tally.results.to_string(),
            if errors.is_empty() {
                "0".to_owned()
            } else {
                errors.join(", ")
            },
            format!("{} ({})", tally.unanswered, tally.unanswered_in_tail),
            tally.duplicates.to_string(),
            tally.strays.to_string(),
            format!("{:.1} s", tally.drain_s),
        ]],
    );
    if !tally.unanswered_sent_at_s.is_empty() {
        let at: Vec<String> = tally
            .unanswered_sent_at_s
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect();
        report.para(&format!(
            "The first unanswered requests were sent at (s into the run): {}.",
            at.join(", ")
        ));
    }
    // The balancer's heap in use goes under its RSS, with its pid: the two read together.
    let balancer = series
        .iter()
        .find(|(_, s)| s.name == "balancer")
        .map(|(pid, _)| *pid);
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (pid, s) in series {
        rows.push(series_row(&s.name, *pid, &s.points));
        if Some(*pid) == balancer && !heap.points.is_empty() {
            rows.push(series_row(&heap.name, *pid, &heap.points));
        }
    }
    report.table(
        &[
            "process",
            "pid",
            "sampled s",
            "first MiB",
            "last MiB",
            "max MiB",
            "slope MiB/h",
            "slope after the first 10 min",
        ],
        &rows,
    );
    let fault_rows: Vec<Vec<String>> = faults
        .iter()
        .map(|f| vec![format!("{:.0}", f.at_s), f.what.clone()])
        .collect();
    report.table(&["at s", "fault"], &fault_rows);
    report.set("rate", rate);
    report.set("duration_s", duration.as_secs_f64());
    report.set("tally", tally);
    report.set("faults", faults);
    let slopes: BTreeMap<String, Option<f64>> = series
        .iter()
        .map(|(pid, s)| (format!("{} ({pid})", s.name), slope_per_hour(&s.points)))
        .collect();
    report.set("rss_slope_mib_per_hour", slopes);
    let settled_slopes: BTreeMap<String, Option<f64>> = series
        .iter()
        .map(|(pid, s)| {
            (
                format!("{} ({pid})", s.name),
                slope_per_hour(&settled(&s.points)),
            )
        })
        .collect();
    report.set("rss_slope_after_10_min_mib_per_hour", settled_slopes);
    // The samples themselves, so that a slope can be read against its shape (a plateau at a
    // budget, a sawtooth, a steady climb).
    let samples: BTreeMap<String, &Vec<(f64, f64)>> = series
        .iter()
        .map(|(pid, s)| (format!("{} ({pid})", s.name), &s.points))
        .collect();
    report.set("rss_mib_samples", samples);
    report.set("balancer_heap_mib_samples", &heap.points);
    report.set(
        "balancer_heap_slope_mib_per_hour",
        slope_per_hour(&heap.points),
    );
    report.set(
        "balancer_heap_slope_after_10_min_mib_per_hour",
        slope_per_hour(&settled(&heap.points)),
    );
    report.write(&args.out, "soak")?;
    eprintln!("{}", report.markdown());
    Ok(())
}

/// One row of the memory table: first, last and largest sample, and the slopes.
fn series_row(name: &str, pid: u32, points: &[(f64, f64)]) -> Vec<String> {
    let first = points.first().map_or(0.0, |p| p.1);
    let last = points.last().map_or(0.0, |p| p.1);
    let max = points.iter().map(|p| p.1).fold(0.0, f64::max);
    vec![
        name.to_owned(),
        pid.to_string(),
        format!(
            "{:.0}",
            points.last().map_or(0.0, |p| p.0) - points.first().map_or(0.0, |p| p.0)
        ),
        format!("{first:.1}"),
        format!("{last:.1}"),
        format!("{max:.1}"),
        slope_per_hour(points).map_or("-".to_owned(), |m| format!("{m:+.1}")),
        slope_per_hour(&settled(points)).map_or("-".to_owned(), |m| format!("{m:+.1}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settled_slope_leaves_out_the_first_ten_minutes() {
        // Warm-up growth for 10 minutes, then flat: the whole run slopes, the settled part not.
        let points: Vec<(f64, f64)> = (0..=40)
            .map(|i| {
                let t = f64::from(i) * 60.0;
                (t, if t < 600.0 { 8.0 + t / 10.0 } else { 68.0 })
            })
            .collect();
        assert!(slope_per_hour(&points).unwrap() > 10.0);
        assert_eq!(slope_per_hour(&settled(&points)), Some(0.0));
    }

    #[test]
    fn the_slope_of_a_line_is_its_rise_per_hour() {
        let points: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i) * 60.0, 100.0 + f64::from(i)))
            .collect();
        let slope = slope_per_hour(&points).unwrap();
        assert!((slope - 60.0).abs() < 1e-9, "{slope}");
        assert_eq!(slope_per_hour(&points[..2]), None);
        assert_eq!(slope_per_hour(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]), None);
    }
}
