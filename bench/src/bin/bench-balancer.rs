//! `bench-balancer`: tidepool-balancer against HAProxy and against no balancer, in front of
//! the same tiny targets, side by side in one run (issue 4's benchmark). Writes
//! `OUT/balancer.md` and `OUT/balancer.json`.
//!
//! 1. Latency added: open-loop load at one rate, directly to a target, through
//!    tidepool-balancer and through HAProxy, in interleaved rounds.
//! 2. Frames/s at saturation: small frames, pipelined, through each.
//! 3. A skewed pool (one target several times slower, persistent client connections): p99
//!    under least-outstanding (p2c), round-robin and HAProxy's leastconn.
//! 4. TLS on the client listener against plain TCP, same targets, same run: the latency
//!    TLS adds at p50 (one request at a time) and small frames/s at saturation.
//! 5. Runtime threads: the same balancer with `--runtime-threads 1` and with one thread
//!    per core (`0`) side by side, small frames/s at saturation and frames per second of
//!    the balancer's CPU (frames/s per core), for how far one balancer scales.
//!
//! `--sections` runs some of them only (`--sections scaling` for section 5 alone).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use tidepool_bench::openloop::{self, OpenLoopConfig};
use tidepool_bench::pipeline::{self, PipelineConfig, PipelineResult};
use tidepool_bench::process::{
    cpu_seconds, free_port, haproxy_version, start_balancer, start_balancer_with, start_haproxy,
    start_targets, start_targets_threads, BalancerSpec, Proc,
};
use tidepool_bench::report::{machine, Report, ReportArgs};
use tidepool_bench::stats::{fmt_us, Latency};
use tidepool_bench::stats::{histogram, record};
use tidepool_bench::{skewed, small_item};
use tidepool_protocol::tls::testing::Pki;
use tidepool_protocol::tls::{ClientFiles, TlsConnector};
use tidepool_protocol::{Client, ClientOptions};

/// Balancer benchmark: tidepool-balancer vs HAProxy vs direct.
#[derive(Debug, Parser)]
struct Args {
    /// Where the report goes (OUT), and whether the run is a quick one.
    #[command(flatten)]
    report: ReportArgs,
    /// Requests per second in the latency comparison.
    #[arg(long, default_value_t = 2000.0)]
    latency_rate: f64,
    /// f32 elements per item (small frames).
    #[arg(long, default_value_t = 16)]
    item_len: usize,
    /// A second tidepool-balancer binary (built from an earlier commit) measured beside this
    /// one in every section: before/after figures from the same run, on the same noise.
    #[arg(long, env = "BENCH_BASELINE_BIN")]
    baseline: Option<PathBuf>,
    /// What the baseline is, for the report (a commit).
    #[arg(long, env = "BENCH_BASELINE_LABEL", default_value = "baseline")]
    baseline_label: String,
    /// The sections to run, comma-separated: latency, throughput, tls, skewed, scaling.
    #[arg(
        long,
        env = "BENCH_BALANCER_SECTIONS",
        value_delimiter = ',',
        default_value = "latency,throughput,tls,skewed,scaling"
    )]
    sections: Vec<Section>,
}

/// A section of the report, for `--sections`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Latency,
    Throughput,
    Tls,
    Skewed,
    Scaling,
}

/// The contenders in front of the targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Via {
    Direct,
    Tidepool,
    /// `--baseline`: the same balancer from an earlier commit.
    Baseline,
    Haproxy,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct to one target",
            Via::Tidepool => "tidepool-balancer (p2c)",
            Via::Baseline => "tidepool-balancer baseline (p2c)",
            Via::Haproxy => "HAProxy (leastconn)",
        }
    }
}

/// The three ways in, with the processes behind them.
struct Setup {
    _targets: Proc,
    balancer: Proc,
    baseline: Option<Proc>,
    haproxy: Proc,
    addrs: BTreeMap<Via, SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runs = |section| args.sections.contains(&section);
    let haproxy_needed = [Section::Latency, Section::Throughput, Section::Skewed]
        .into_iter()
        .any(runs);
    if haproxy_needed && which_haproxy().is_none() {
        bail!(
            "haproxy is not installed; scripts/bench.sh installs it (apt-get install -y haproxy)"
        );
    }
    let mut report = Report::new();
    report.para(&format!(
        "Machine: {}.{}{}{}",
        machine(),
        if haproxy_needed {
            format!(" {}.", haproxy_version())
        } else {
            String::new()
        },
        match &args.baseline {
            Some(_) => format!(
                " The baseline rows are tidepool-balancer built from {}, run beside today's in every section.",
                args.baseline_label
            ),
            None => String::new(),
        },
        if args.report.quick {
            " **Quick smoke run (BENCH_QUICK=1): figures are not meaningful.**"
        } else {
            ""
        }
    ));
    report.set("machine", machine());
    if haproxy_needed {
        report.set("haproxy", haproxy_version());
    }
    report.set("quick", args.report.quick);
    if args.baseline.is_some() {
        report.set("baseline", &args.baseline_label);
    }

    if runs(Section::Latency) || runs(Section::Throughput) {
        let setup = fast_setup(&args)?;
        if runs(Section::Latency) {
            latency(&args, &setup, &mut report)?;
        }
        if runs(Section::Throughput) {
            throughput(&args, &setup, &mut report)?;
        }
    }
    if runs(Section::Tls) {
        tls_pair(&args, &mut report)?;
    }
    if runs(Section::Skewed) {
        skewed(&args, &mut report)?;
    }
    if runs(Section::Scaling) {
        scaling(&args, &mut report)?;
    }

    report.write(&args.report.out, "balancer")?;
    println!("{}", report.markdown());
    Ok(())
}

fn which_haproxy() -> Option<()> {
    std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(drop)
}

/// Three echo targets, a balancer and HAProxy in front of them.
fn fast_setup(args: &Args) -> anyhow::Result<Setup> {
    let (targets, addrs) = start_targets(&[Duration::ZERO; 3])?;
    let (balancer, balancer_addr) = start_balancer(&BalancerSpec {
        routing: "p2c",
        targets: addrs.clone(),
        binary: None,
    })?;
    let haproxy_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let haproxy = start_haproxy(&args.report.out.join("haproxy-fast"), haproxy_addr, &addrs)?;
    let mut via = BTreeMap::from([
        (Via::Direct, addrs[0]),
        (Via::Tidepool, balancer_addr),
        (Via::Haproxy, haproxy_addr),
    ]);
    let baseline = match &args.baseline {
        Some(binary) => {
            let (proc, addr) = start_balancer(&BalancerSpec {
                routing: "p2c",
                targets: addrs.clone(),
                binary: Some(binary.clone()),
            })?;
            via.insert(Via::Baseline, addr);
            Some(proc)
        }
        None => None,
    };
    Ok(Setup {
        _targets: targets,
        balancer,
        baseline,
        haproxy,
        addrs: via,
    })
}

#[derive(Serialize)]
struct LatencyRow {
    via: Via,
    sent: u64,
    ok: u64,
    errors: u64,
    unanswered: u64,
    latency: Latency,
    added_p50_us: f64,
    added_p99_us: f64,
}

fn latency(args: &Args, setup: &Setup, report: &mut Report) -> anyhow::Result<()> {
    let (rounds, seconds) = if args.report.quick { (1, 2) } else { (3, 6) };
    let connections = 4;
    let mut merged: BTreeMap<Via, (openloop::OpenLoopResult, u64)> = BTreeMap::new();
    for round in 0..rounds {
        for (&via, &addr) in &setup.addrs {
            eprintln!("latency: round {} of {rounds}, {}", round + 1, via.label());
            let r = openloop::run(&OpenLoopConfig {
                addr,
                connections,
                rate: args.latency_rate,
                duration: Duration::from_secs(seconds),
                drain: Duration::from_secs(2),
                seed: round,
                item: small_item(args.item_len),
            })?;
            match merged.get_mut(&via) {
                None => {
                    merged.insert(via, (r, 1));
                }
                Some((m, n)) => {
                    m.sent += r.sent;
                    m.ok += r.ok;
                    m.errors += r.errors;
                    m.unanswered += r.unanswered;
                    m.latency.add(&r.latency)?;
                    m.send_lag.add(&r.send_lag)?;
                    *n += 1;
                }
            }
        }
    }
    let direct = merged
        .get(&Via::Direct)
        .map(|(r, _)| Latency::of(&r.latency))
        .unwrap_or_default();
    let rows: Vec<LatencyRow> = merged
        .iter()
        .map(|(&via, (r, _))| {
            let latency = Latency::of(&r.latency);
            LatencyRow {
                via,
                sent: r.sent,
                ok: r.ok,
                errors: r.errors,
                unanswered: r.unanswered,
                latency,
                added_p50_us: latency.p50_us - direct.p50_us,
                added_p99_us: latency.p99_us - direct.p99_us,
            }
        })
        .collect();
    let lag = merged
        .get(&Via::Direct)
        .map(|(r, _)| Latency::of(&r.send_lag))
        .unwrap_or_default();

    report.heading("1. Latency added over talking to a target directly");
    report.para(&format!(
        "{} requests/s (Poisson), {connections} persistent client connections, a {}-byte tensor per request, \
         {rounds} interleaved rounds of {seconds} s per contender, 3 echo targets behind each balancer. \
         Latency from each request's intended send time. The sender's own timer lag \
         (p50 {}, p99 {} late) is in every row alike.",
        args.latency_rate,
        args.item_len * 4,
        fmt_us(lag.p50_us),
        fmt_us(lag.p99_us),
    ));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let added = |v: f64| {
                if r.via == Via::Direct {
                    "—".to_owned()
                } else {
                    format!("{v:+.0} µs")
                }
            };
            vec![
                r.via.label().to_owned(),
                fmt_us(r.latency.p50_us),
                fmt_us(r.latency.p99_us),
                fmt_us(r.latency.p999_us),
                added(r.added_p50_us),
                added(r.added_p99_us),
                format!("{} / {} / {} / {}", r.sent, r.ok, r.errors, r.unanswered),
            ]
        })
        .collect();
    report.table(
        &[
            "path",
            "p50",
            "p99",
            "p99.9",
            "added p50",
            "added p99",
            "sent / ok / errors / unanswered",
        ],
        &table,
    );
    let ours = rows.iter().find(|r| r.via == Via::Tidepool);
    let theirs = rows.iter().find(|r| r.via == Via::Haproxy);
    if let (Some(ours), Some(theirs)) = (ours, theirs) {
        // Issue 14's goal (issue 4 set 50 µs).
        let met = ours.added_p50_us <= 40.0;
        report.para(&format!(
            "**Goal: at most 40 µs added at p50: {}** (tidepool-balancer {:+.0} µs, HAProxy {:+.0} µs).",
            if met { "met" } else { "missed" },
            ours.added_p50_us,
            theirs.added_p50_us
        ));
        report.set("latency_goal_met", met);
    }
    if let (Some(ours), Some(before)) = (ours, rows.iter().find(|r| r.via == Via::Baseline)) {
        report.para(&format!(
            "Against the baseline ({}): {:+.0} µs added at p50 today, {:+.0} µs before.",
            args.baseline_label, ours.added_p50_us, before.added_p50_us
        ));
    }
    report.set("latency", &rows);
    Ok(())
}

#[derive(Serialize)]
struct ThroughputRow {
    via: Via,
    rounds: Vec<PipelineResult>,
    mean_per_second: f64,
    /// CPU seconds the balancer process used per 1000 frames (None for direct).
    cpu_ms_per_1k: Option<f64>,
}

fn throughput(args: &Args, setup: &Setup, report: &mut Report) -> anyhow::Result<()> {
    let rounds = if args.report.quick { 1 } else { 2 };
    let saturate = Saturate::small(args, 8);
    let (connections, window, warmup, measure) = saturate.shape();
    let mut rows: BTreeMap<Via, ThroughputRow> = BTreeMap::new();
    for round in 0..rounds {
        for (&via, &addr) in &setup.addrs {
            eprintln!(
                "throughput: round {} of {rounds}, {}",
                round + 1,
                via.label()
            );
            let pid = match via {
                Via::Direct => None,
                Via::Tidepool => Some(setup.balancer.pid()),
                Via::Baseline => setup.baseline.as_ref().map(Proc::pid),
                Via::Haproxy => Some(setup.haproxy.pid()),
            };
            let (r, cpu) = saturate
                .run(addr, pid)
                .with_context(|| format!("saturating {}", via.label()))?;
            let frames = r.per_second * (warmup + measure) as f64;
            let row = rows.entry(via).or_insert(ThroughputRow {
                via,
                rounds: Vec::new(),
                mean_per_second: 0.0,
                cpu_ms_per_1k: None,
            });
            row.rounds.push(r);
            if let Some(cpu) = cpu {
                let per_1k = cpu * 1000.0 / frames.max(1.0) * 1000.0;
                row.cpu_ms_per_1k = Some(row.cpu_ms_per_1k.unwrap_or(0.0) + per_1k / rounds as f64);
            }
        }
    }
    for row in rows.values_mut() {
        row.mean_per_second =
            row.rounds.iter().map(|r| r.per_second).sum::<f64>() / row.rounds.len().max(1) as f64;
    }
    report.heading("2. Small frames forwarded per second, pipelined, at saturation");
    report.para(&format!(
        "{connections} client connections, {window} frames in flight on each, a {}-byte tensor per frame, \
         3 echo targets; {rounds} interleaved rounds of {measure} s (after {warmup} s of warm-up) per contender. \
         The driver, the targets and the balancer share the machine's cores, so these are the rates of the \
         whole arrangement; CPU per 1000 frames is the balancer process's own (from /proc, \
         counted over warm-up and measurement).",
        args.item_len * 4
    ));
    let table: Vec<Vec<String>> = rows
        .values()
        .map(|r| {
            let (per_round, errors) = round_cells(&r.rounds);
            vec![
                r.via.label().to_owned(),
                format!("{:.0}", r.mean_per_second),
                per_round,
                r.cpu_ms_per_1k
                    .map_or("—".to_owned(), |c| format!("{c:.1} ms")),
                errors,
            ]
        })
        .collect();
    report.table(
        &[
            "path",
            "frames/s (mean)",
            "per round",
            "balancer CPU per 1000 frames",
            "errors",
        ],
        &table,
    );
    if let (Some(ours), Some(theirs)) = (rows.get(&Via::Tidepool), rows.get(&Via::Haproxy)) {
        let ratio = ours.mean_per_second / theirs.mean_per_second.max(1.0);
        let met = ratio >= 1.0;
        report.para(&format!(
            "**Goal: at least HAProxy's rate: {}** (tidepool-balancer {:.0}/s = {ratio:.2}× HAProxy's {:.0}/s; \
             HAProxy routes per connection, tidepool-balancer per frame).",
            if met { "met" } else { "missed" },
            ours.mean_per_second,
            theirs.mean_per_second
        ));
        report.set("throughput_goal_met", met);
        report.set("throughput_ratio", ratio);
    }
    if let (Some(ours), Some(before)) = (rows.get(&Via::Tidepool), rows.get(&Via::Baseline)) {
        let ratio = ours.mean_per_second / before.mean_per_second.max(1.0);
        let cpu = |r: &ThroughputRow| {
            r.cpu_ms_per_1k
                .map_or("—".to_owned(), |c| format!("{c:.1} ms"))
        };
        report.para(&format!(
            "Against the baseline ({}): {ratio:.2}× its frames/s; CPU per 1000 frames {} today, {} before.",
            args.baseline_label,
            cpu(ours),
            cpu(before)
        ));
        report.set("baseline_throughput_ratio", ratio);
    }
    report.set("throughput", rows.values().collect::<Vec<_>>());
    Ok(())
}

#[derive(Serialize)]
struct TlsRow {
    tls: bool,
    /// One request at a time on one connection, every round's samples together.
    latency: Latency,
    /// Pipelined small frames, per round.
    frames_per_second: Vec<f64>,
    mean_frames_per_second: f64,
}

/// One request at a time over `client` for `seconds`, into one histogram (after 200
/// unrecorded requests to warm the path up).
async fn closed_loop(
    client: &Client,
    item: &tidepool_protocol::Tensors,
    seconds: u64,
    into: &mut hdrhistogram::Histogram<u64>,
) -> anyhow::Result<()> {
    for _ in 0..200 {
        client.infer(item.clone()).await?;
    }
    let end = std::time::Instant::now() + Duration::from_secs(seconds);
    while std::time::Instant::now() < end {
        let sent = std::time::Instant::now();
        client.infer(item.clone()).await?;
        record(into, sent.elapsed().as_nanos() as u64);
    }
    Ok(())
}

fn tls_pair(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let (rounds, seconds, warmup, measure) = if args.report.quick {
        (1, 2, 1, 2)
    } else {
        (3, 5, 1, 6)
    };
    let (connections, window) = (8, 32);
    let pki = Pki::new("bench");
    let cert = pki.leaf("balancer", &["127.0.0.1"]);
    let (_targets, addrs) = start_targets(&[Duration::ZERO; 3])?;
    let spec = BalancerSpec {
        routing: "p2c",
        targets: addrs,
        binary: None,
    };
    let (_plain_proc, plain) = start_balancer(&spec)?;
    let tls_flags = [
        "--tls-cert".to_owned(),
        cert.cert.display().to_string(),
        "--tls-key".to_owned(),
        cert.key.display().to_string(),
    ];
    let (_tls_proc, secure) = start_balancer_with(&spec, &tls_flags)?;
    let client_config = Arc::new(ClientFiles::trusting(pki.ca()).load()?);
    let connector = TlsConnector::trusting(pki.ca())?;
    let item = small_item(args.item_len);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let mut latency = [histogram(), histogram()];
    let mut frames: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, tls) in [false, true].into_iter().enumerate() {
            eprintln!("tls: round {} of {rounds}, tls {tls}", round + 1);
            runtime.block_on(async {
                let client = if tls {
                    Client::connect_tls(&secure.to_string(), &connector, ClientOptions::default())
                        .await?
                } else {
                    Client::connect(plain).await?
                };
                closed_loop(&client, &item, seconds, &mut latency[i]).await
            })?;
            let r = pipeline::run(&PipelineConfig {
                addr: if tls { secure } else { plain },
                connections,
                window,
                warmup: Duration::from_secs(warmup),
                measure: Duration::from_secs(measure),
                items: vec![item.clone()],
                tls: tls.then(|| Arc::clone(&client_config)),
            })
            .with_context(|| format!("saturating the balancer, tls {tls}"))?;
            anyhow::ensure!(r.errors == 0, "{} errors with tls {tls}", r.errors);
            frames[i].push(r.per_second);
        }
    }
    let rows: Vec<TlsRow> = [false, true]
        .into_iter()
        .enumerate()
        .map(|(i, tls)| TlsRow {
            tls,
            latency: Latency::of(&latency[i]),
            mean_frames_per_second: frames[i].iter().sum::<f64>() / frames[i].len().max(1) as f64,
            frames_per_second: frames[i].clone(),
        })
        .collect();
    let (off, on) = (&rows[0], &rows[1]);
    let added_p50 = on.latency.p50_us - off.latency.p50_us;
    let ratio = on.mean_frames_per_second / off.mean_frames_per_second.max(1.0);

    report.heading("4. TLS on the client listener against plain TCP");
    report.para(&format!(
        "Two balancers in front of the same 3 echo targets, one with `--tls-cert/--tls-key` (TLS 1.3, \
         ECDSA P-256, rustls with ring), one without; {rounds} interleaved rounds. Latency: one request at a \
         time on one connection for {seconds} s per round (after 200 unrecorded). Frames/s: {connections} \
         connections with {window} frames in flight each, {measure} s per round after {warmup} s of warm-up, \
         a {}-byte tensor per frame. Handshakes are not in these figures (connections are persistent).",
        args.item_len * 4
    ));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                if r.tls { "TLS" } else { "plain TCP" }.to_owned(),
                fmt_us(r.latency.p50_us),
                fmt_us(r.latency.p99_us),
                format!("{:.0}", r.mean_frames_per_second),
                r.frames_per_second
                    .iter()
                    .map(|f| format!("{f:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    report.table(
        &[
            "client listener",
            "p50 (one at a time)",
            "p99",
            "frames/s (mean)",
            "per round",
        ],
        &table,
    );
    let met = ratio >= 0.8;
    report.para(&format!(
        "TLS adds {added_p50:+.0} µs at p50 and carries {:.0}% of plain TCP's frames/s. \
         **Goal: at most 20% fewer frames/s with TLS: {}**.",
        ratio * 100.0,
        if met { "met" } else { "missed" }
    ));
    report.set("tls", &rows);
    report.set("tls_added_p50_us", added_p50);
    report.set("tls_frames_ratio", ratio);
    report.set("tls_goal_met", met);
    Ok(())
}

#[derive(Serialize)]
struct SkewRow {
    name: &'static str,
    #[serde(flatten)]
    outcome: skewed::Outcome,
    latency_with_unanswered: Latency,
}

fn skewed(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let (fast, slow) = (skewed::FAST, skewed::SLOW);
    let (capacity, rate) = (skewed::capacity(), skewed::rate());
    let (seconds, drain) = skewed::duration(args.report.quick);
    let connections = skewed::CONNECTIONS;
    let mut contenders: Vec<(&str, Option<&'static str>, Option<PathBuf>)> = vec![
        (
            "tidepool-balancer, least outstanding (p2c)",
            Some("p2c"),
            None,
        ),
        ("tidepool-balancer, round-robin", Some("round-robin"), None),
        ("HAProxy, leastconn (per connection)", None, None),
    ];
    if let Some(binary) = &args.baseline {
        contenders.insert(
            1,
            (
                "tidepool-balancer baseline, least outstanding (p2c)",
                Some("p2c"),
                Some(binary.clone()),
            ),
        );
    }
    let mut rows = Vec::new();
    for (name, routing, binary) in contenders {
        eprintln!("skewed pool: {name}");
        let (_targets, addrs) = skewed::start()?;
        let (_proc, addr): (Proc, SocketAddr) = match routing {
            Some(routing) => start_balancer(&BalancerSpec {
                routing,
                targets: addrs.clone(),
                binary,
            })?,
            None => {
                let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                (
                    start_haproxy(&args.report.out.join("haproxy-skewed"), addr, &addrs)?,
                    addr,
                )
            }
        };
        let r = openloop::run(&skewed::load(addr, args.report.quick, 7, args.item_len))?;
        rows.push(SkewRow {
            name,
            outcome: skewed::Outcome::of(&r),
            latency_with_unanswered: Latency::of(&r.latency_with_unanswered),
        });
    }
    report.heading("3. A skewed pool: one target five times slower");
    report.para(&format!(
        "Four serial targets (one item at a time, like a worker with `--max-batch 1`): three take {} per item, \
         one takes {}; together they serve about {capacity:.0} items/s, of which the slow one {:.0}/s ({:.0}%). \
         Open-loop load at half of that, {rate:.0} requests/s (Poisson), for {seconds} s over {connections} persistent \
         client connections, then up to {drain} s for the answers. Requests still unanswered at the end are counted at \
         the end of the drain (a lower bound) in the \"with unanswered\" columns. Fresh targets for each contender.",
        fmt_us(fast.as_micros() as f64),
        fmt_us(slow.as_micros() as f64),
        1.0 / slow.as_secs_f64(),
        100.0 / slow.as_secs_f64() / capacity,
    ));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.to_owned(),
                fmt_us(r.outcome.latency.p50_us),
                fmt_us(r.outcome.latency.p99_us),
                fmt_us(r.latency_with_unanswered.p99_us),
                fmt_us(r.latency_with_unanswered.max_us),
                r.outcome.slow_share_cell(),
                r.outcome.counts_cell(),
            ]
        })
        .collect();
    report.table(
        &[
            "routing",
            "p50",
            "p99",
            "p99 with unanswered",
            "max with unanswered",
            "results from the slow target",
            "sent / ok / errors / unanswered",
        ],
        &table,
    );
    report.set("skewed", &rows);
    Ok(())
}

#[derive(Serialize)]
struct ScalingRow {
    /// The flags that set the balancer's threads: `--runtime-threads 1`,
    /// `--runtime-threads 0` (one per core) or `--shards 0` (one shard per core).
    mode: String,
    /// The threads that makes on this machine that carry frames.
    threads: usize,
    rounds: Vec<PipelineResult>,
    mean_per_second: f64,
    /// The balancer's CPU seconds per second (how many cores it kept busy), mean of rounds.
    cores_busy: f64,
    /// Frames forwarded per second of the balancer's CPU: frames/s per core.
    per_core_second: f64,
}

/// Section 5: one balancer binary with `--runtime-threads 1`, with one runtime thread per
/// core and with one shard per core, all running, measured in interleaved rounds.
fn scaling(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rounds = if args.report.quick { 1 } else { 3 };
    // Enough connections to keep every runtime thread busy, and targets with threads of
    // their own, so that the balancer is what limits the rate where the cores allow it.
    let saturate = Saturate::small(args, (2 * cores).max(8));
    let (connections, window, warmup, measure) = saturate.shape();
    let target_threads = (cores / 4).max(1);
    let (_targets, addrs) = start_targets_threads(&[Duration::ZERO; 3], target_threads)?;
    let spec = BalancerSpec {
        routing: "p2c",
        targets: addrs,
        binary: None,
    };
    let mut contenders = Vec::new();
    // Sharded: one single-threaded runtime per core, each with its own listener on the
    // port (SO_REUSEPORT) and its own connections to the targets; the main runtime keeps
    // one thread for the admin API, health checks and the wait queue.
    let modes = [
        ("--runtime-threads", "1", 1),
        ("--runtime-threads", "0", cores),
        ("--shards", "0", cores),
    ];
    for (flag, value, threads) in modes {
        let flags = [flag.to_owned(), value.to_owned()];
        let (proc, addr) = start_balancer_with(&spec, &flags)?;
        contenders.push((format!("{flag} {value}"), threads, proc, addr));
    }
    let mut rows: Vec<ScalingRow> = contenders
        .iter()
        .map(|(mode, threads, _, _)| ScalingRow {
            mode: mode.clone(),
            threads: *threads,
            rounds: Vec::new(),
            mean_per_second: 0.0,
            cores_busy: 0.0,
            per_core_second: 0.0,
        })
        .collect();
    for round in 0..rounds {
        for (row, (_, threads, proc, addr)) in rows.iter_mut().zip(&contenders) {
            eprintln!(
                "scaling: round {} of {rounds}, {} ({threads} thread(s))",
                round + 1,
                row.mode
            );
            let (r, cpu) = saturate
                .run(*addr, Some(proc.pid()))
                .with_context(|| format!("saturating the balancer with {}", row.mode))?;
            let cpu = cpu.unwrap_or(0.0);
            // CPU is counted over warm-up and measurement; so are the frames.
            let seconds = (warmup + measure) as f64;
            let frames = r.per_second * seconds;
            row.cores_busy += cpu / seconds / rounds as f64;
            row.per_core_second += frames / cpu.max(1e-9) / rounds as f64;
            row.rounds.push(r);
        }
    }
    for row in &mut rows {
        row.mean_per_second =
            row.rounds.iter().map(|r| r.per_second).sum::<f64>() / row.rounds.len().max(1) as f64;
    }
    let one = rows.first().map_or(1.0, |r| r.mean_per_second.max(1.0));
    report.heading("5. Runtime threads and shards: frames/s per core");
    report.para(&format!(
        "The same tidepool-balancer three times, `--runtime-threads 1`, `--runtime-threads 0` (one thread per \
         core: {cores} here) and `--shards 0` (one shard per core: a listener on the shared port with \
         SO_REUSEPORT, a single-threaded runtime and its own connections to each target), all running, in {rounds} interleaved rounds of {measure} s (after {warmup} s of \
         warm-up): {connections} client connections with {window} small frames in flight each, 3 echo targets \
         on {target_threads} thread(s). Frames/s per core is frames forwarded per second of the balancer's own \
         CPU (from /proc). The driver and the targets share the cores with the balancer: on a machine with \
         few cores the extra threads compete with them, and the rate says more about the machine than \
         about the balancer."
    ));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let (per_round, errors) = round_cells(&r.rounds);
            vec![
                format!("{} ({} thread(s))", r.mode, r.threads),
                format!("{:.0}", r.mean_per_second),
                per_round,
                format!("{:.2}", r.cores_busy),
                format!("{:.0}", r.per_core_second),
                format!("{:.2}×", r.mean_per_second / one),
                errors,
            ]
        })
        .collect();
    report.table(
        &[
            "threads",
            "frames/s (mean)",
            "per round",
            "balancer cores busy",
            "frames/s per core",
            "frames/s against 1 thread",
            "errors",
        ],
        &table,
    );
    report.set("scaling", &rows);
    Ok(())
}

/// The table cells of saturation rounds: each round's frames/s, and the errors of all.
fn round_cells(rounds: &[PipelineResult]) -> (String, String) {
    let per_round: Vec<String> = rounds
        .iter()
        .map(|x| format!("{:.0}", x.per_second))
        .collect();
    let errors: u64 = rounds.iter().map(|x| x.errors).sum();
    (per_round.join(", "), errors.to_string())
}

/// A pipelined saturation run: small frames, `window` in flight on each connection.
struct Saturate {
    connections: usize,
    window: usize,
    /// Seconds before counting.
    warmup: u64,
    /// Seconds counted.
    measure: u64,
    /// f32 elements per item.
    item_len: usize,
}

impl Saturate {
    /// Small frames on `connections` connections, 32 in flight on each; 1 s of warm-up,
    /// 6 s counted (2 s with `--quick`).
    fn small(args: &Args, connections: usize) -> Saturate {
        Saturate {
            connections,
            window: 32,
            warmup: 1,
            measure: if args.report.quick { 2 } else { 6 },
            item_len: args.item_len,
        }
    }

    /// Connections, window, seconds of warm-up, seconds counted: for the report.
    fn shape(&self) -> (usize, usize, u64, u64) {
        (self.connections, self.window, self.warmup, self.measure)
    }

    /// Saturates `addr`; also the CPU seconds process `pid` used meanwhile (warm-up
    /// included).
    fn run(
        &self,
        addr: SocketAddr,
        pid: Option<u32>,
    ) -> anyhow::Result<(PipelineResult, Option<f64>)> {
        let before = pid.map(cpu_seconds);
        let r = pipeline::run(&PipelineConfig {
            addr,
            connections: self.connections,
            window: self.window,
            warmup: Duration::from_secs(self.warmup),
            measure: Duration::from_secs(self.measure),
            items: vec![small_item(self.item_len)],
            tls: None,
        })?;
        Ok((r, pid.zip(before).map(|(p, b)| cpu_seconds(p) - b)))
    }
}
