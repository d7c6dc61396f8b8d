//! `bench-resilience`: what retries and hedging buy and cost (issue 12's benchmark).
//! Writes `OUT/resilience.md` and `OUT/resilience.json`.
//!
//! 1. A worker SIGKILLed under load: three serial `bench-target` processes behind
//!    tidepool-balancer, open-loop Poisson load at 40% of their capacity, one target killed
//!    halfway; errors, unanswered requests and latency with `--retries on` and `off`, in
//!    interleaved rounds.
//! 2. Hedging on a skewed pool (three fast targets, one five times slower, as in the
//!    balancer benchmark): p99 with hedging off, after a fixed delay and after the observed
//!    p99, and the extra load it costs (hedges sent per request, from `/metrics`).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use tidepool_bench::openloop::{self, OpenLoopConfig, OpenLoopResult};
use tidepool_bench::process::{http_get, start_balancer_admin, start_targets, BalancerSpec};
use tidepool_bench::report::{machine, quick_note, Report, ReportArgs};
use tidepool_bench::stats::{fmt_us, Latency};
use tidepool_bench::{skewed, small_item};

/// Retries and hedging: errors and p99 during a kill, p99 and extra load on a skewed pool.
#[derive(Debug, Parser)]
struct Args {
    /// Where the report goes (OUT), and whether the run is a quick one.
    #[command(flatten)]
    report: ReportArgs,
    /// f32 elements per item (small frames).
    #[arg(long, default_value_t = 16)]
    item_len: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut report = Report::new();
    report.set("machine", machine());
    report.set("quick", args.report.quick);
    report.para(&format!(
        "Machine: {}.{}",
        machine(),
        quick_note(args.report.quick)
    ));
    kill(&args, &mut report).context("the kill section")?;
    hedging(&args, &mut report).context("the hedging section")?;
    report.write(&args.report.out, "resilience")?;
    println!("{}", report.markdown());
    Ok(())
}

/// A row of either section.
#[derive(Serialize)]
struct Row {
    name: String,
    round: usize,
    sent: u64,
    ok: u64,
    errors: u64,
    unanswered: u64,
    latency: Latency,
    /// Requests sent to a second target (hedges) or once more (retries), from `/metrics`.
    extra: u64,
}

impl Row {
    fn of(name: &str, round: usize, r: &OpenLoopResult, extra: u64) -> Row {
        Row {
            name: name.to_owned(),
            round,
            sent: r.sent,
            ok: r.ok,
            errors: r.errors,
            unanswered: r.unanswered,
            latency: Latency::of(&r.latency_with_unanswered),
            extra,
        }
    }

    /// The header of a table of [`cells`](Row::cells) rows.
    fn header<'a>(middle: &[&'a str]) -> Vec<&'a str> {
        let mut header = vec!["setting", "round", "sent"];
        header.extend(middle);
        header.extend(["p50", "p99", "p99.9", "max"]);
        header
    }

    /// A table row: setting, round and requests sent, then `middle`, then p50, p99, p99.9
    /// and max.
    fn cells(&self, middle: Vec<String>) -> Vec<String> {
        let mut row = vec![
            self.name.clone(),
            self.round.to_string(),
            self.sent.to_string(),
        ];
        row.extend(middle);
        let l = &self.latency;
        row.extend([l.p50_us, l.p99_us, l.p999_us, l.max_us].map(fmt_us));
        row
    }
}

/// Open-loop Poisson load on 8 connections: `rate` requests/s for `seconds`, then up to
/// `drain` seconds for the last answers.
fn load(
    args: &Args,
    addr: std::net::SocketAddr,
    rate: f64,
    (seconds, drain): (u64, u64),
    seed: u64,
) -> anyhow::Result<OpenLoopResult> {
    openloop::run(&OpenLoopConfig {
        addr,
        connections: 8,
        rate,
        duration: Duration::from_secs(seconds),
        drain: Duration::from_secs(drain),
        seed,
        item: small_item(args.item_len),
    })
}

/// A counter from the balancer's `/metrics`; zero when absent.
fn counter(admin: std::net::SocketAddr, name: &str) -> u64 {
    let text = http_get(admin, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn kill(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let service = Duration::from_millis(5);
    let targets = 3;
    let capacity = targets as f64 / service.as_secs_f64();
    let rate = capacity * 0.4;
    let (rounds, seconds, drain) = if args.report.quick {
        (1, 4, 3)
    } else {
        (3, 10, 5)
    };
    let mut rows = Vec::new();
    for round in 0..rounds {
        for retries in ["on", "off"] {
            eprintln!("kill: round {} of {rounds}, retries {retries}", round + 1);
            // One process per target, so that one can be killed alone.
            let mut procs = Vec::new();
            let mut addrs = Vec::new();
            for _ in 0..targets {
                let (proc, addr) = start_targets(&[service])?;
                procs.push(proc);
                addrs.extend(addr);
            }
            let spec = BalancerSpec {
                routing: "p2c",
                targets: addrs,
                binary: None,
            };
            let (_lb, listen, admin) =
                start_balancer_admin(&spec, &["--retries".to_owned(), retries.to_owned()])?;
            let victim = procs.remove(0);
            let killer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(seconds) / 2);
                // Dropping the handle SIGKILLs the process.
                drop(victim);
            });
            let r = load(args, listen, rate, (seconds, drain), 12 + round as u64)?;
            let _ = killer.join();
            let retried = counter(admin, "tidepool_retries_total");
            rows.push(Row::of(
                &format!("retries {retries}"),
                round + 1,
                &r,
                retried,
            ));
        }
    }
    report.heading("1. A worker SIGKILLed under load: retries on and off");
    report.para(&format!(
        "{targets} serial `bench-target` processes ({} per item, one at a time, like a worker with \
         `--max-batch 1`) behind tidepool-balancer (p2c, health checks every 200 ms); open-loop Poisson \
         load of {rate:.0} requests/s (40% of their capacity) on 8 connections for {seconds} s, and one \
         target SIGKILLed halfway. {rounds} interleaved rounds per setting. Latency from each request's \
         intended send time, unanswered requests counted at the end of the {drain} s drain; `retried` is \
         `tidepool_retries_total`.",
        fmt_us(service.as_secs_f64() * 1e6)
    ));
    report.table(
        &Row::header(&["errors", "unanswered", "retried"]),
        &rows
            .iter()
            .map(|r| {
                r.cells(vec![
                    r.errors.to_string(),
                    r.unanswered.to_string(),
                    r.extra.to_string(),
                ])
            })
            .collect::<Vec<_>>(),
    );
    let lost = |setting: &str| -> u64 {
        rows.iter()
            .filter(|r| r.name == setting)
            .map(|r| r.errors + r.unanswered)
            .sum()
    };
    let (on, off) = (lost("retries on"), lost("retries off"));
    report.para(&format!(
        "Requests lost (errors and unanswered) over all rounds: **{on} with retries on, {off} with \
         retries off**. **Goal: none lost with retries on: {}**.",
        if on == 0 { "met" } else { "missed" }
    ));
    report.set("kill", &rows);
    report.set("kill_lost_retries_on", on);
    report.set("kill_lost_retries_off", off);
    Ok(())
}

fn hedging(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let (fast, slow) = (skewed::FAST, skewed::SLOW);
    let rate = skewed::rate();
    let (rounds, seconds, drain) = if args.report.quick {
        (1, 3, 2)
    } else {
        (3, 12, 5)
    };
    let settings: [(&str, &[&str]); 4] = [
        ("hedging off", &[]),
        ("--hedge-after 5ms", &["--hedge-after", "5ms"]),
        (
            "--hedge-after 5ms --hedge-budget-ratio 0.2",
            &["--hedge-after", "5ms", "--hedge-budget-ratio", "0.2"],
        ),
        ("--hedge-after p99", &["--hedge-after", "p99"]),
    ];
    let mut rows = Vec::new();
    for round in 0..rounds {
        for (name, flags) in settings {
            eprintln!("hedging: round {} of {rounds}, {name}", round + 1);
            let (_targets, addrs) = skewed::start()?;
            let spec = BalancerSpec {
                routing: "p2c",
                targets: addrs,
                binary: None,
            };
            let extra: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
            let (_lb, listen, admin) = start_balancer_admin(&spec, &extra)?;
            let r = load(args, listen, rate, (seconds, drain), 40 + round as u64)?;
            let hedges = counter(admin, "tidepool_hedges_total");
            rows.push(Row::of(name, round + 1, &r, hedges));
        }
    }
    report.heading("2. Hedging on a skewed pool: p99 and the extra load");
    report.para(&format!(
        "Four serial targets in one `bench-target` process, three at {} per item and one five times \
         slower at {}; tidepool-balancer (p2c) with each hedging setting; open-loop Poisson load of \
         {rate:.0} requests/s (50% of the pool's capacity) on 8 connections for {seconds} s, {rounds} \
         interleaved rounds. `hedged` is `tidepool_hedges_total`; the extra load is hedges per request. \
         `bench-target` ignores `cancel`, so every hedge costs a full service time somewhere, as it does \
         on a worker whose item has started. The default budget (`--hedge-budget-ratio 0.05`, floor 1/s) \
         bounds the first setting.",
        fmt_us(fast.as_secs_f64() * 1e6),
        fmt_us(slow.as_secs_f64() * 1e6),
    ));
    report.table(
        &Row::header(&["errors", "hedged", "extra load"]),
        &rows
            .iter()
            .map(|r| {
                r.cells(vec![
                    (r.errors + r.unanswered).to_string(),
                    r.extra.to_string(),
                    format!("{:.1}%", 100.0 * r.extra as f64 / r.sent.max(1) as f64),
                ])
            })
            .collect::<Vec<_>>(),
    );
    // Medians over rounds of each setting's p99 and extra load.
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let summary: Vec<(String, f64, f64)> = settings
        .iter()
        .map(|(name, _)| {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.name == *name).collect();
            let p99 = median(mine.iter().map(|r| r.latency.p99_us).collect());
            let extra = median(
                mine.iter()
                    .map(|r| r.extra as f64 / r.sent.max(1) as f64)
                    .collect(),
            );
            ((*name).to_owned(), p99, extra)
        })
        .collect();
    let off = summary.first().map_or(0.0, |s| s.1);
    let lines: Vec<String> = summary
        .iter()
        .skip(1)
        .map(|(name, p99, extra)| {
            format!(
                "`{name}`: p99 {} ({:.2}x hedging off's {}) for {:.1}% extra requests",
                fmt_us(*p99),
                p99 / off.max(1.0),
                fmt_us(off),
                extra * 100.0
            )
        })
        .collect();
    report.para(&format!("Median over rounds: {}.", lines.join("; ")));
    report.set("hedging", &rows);
    report.set(
        "hedging_summary",
        summary
            .iter()
            .map(|(n, p, e)| serde_json::json!({"setting": n, "p99_us": p, "extra_share": e}))
            .collect::<Vec<_>>(),
    );
    Ok(())
}
