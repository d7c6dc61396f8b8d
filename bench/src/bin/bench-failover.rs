//! `bench-failover`: least outstanding with two balancers side by side (issue 12). Writes
//! `OUT/failover.md` and `OUT/failover.json`.
//!
//! The skewed pool ([`tidepool_bench::skewed`], as in `bench-balancer`: four serial targets,
//! one five times slower), once through one tidepool-balancer and once through two over the
//! same targets, each routing by its own outstanding counts, half of the clients'
//! connections and half of the load on each. Each balancer sees only its own half of the slow target's backlog, so least
//! outstanding decides on half the truth; the goal is a p99 within 2x of one balancer's.
//! The two setups alternate in rounds, on fresh targets each time.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use tidepool_bench::openloop::{self, OpenLoopConfig, OpenLoopResult};
use tidepool_bench::process::{start_balancer, BalancerSpec, Proc};
use tidepool_bench::report::{machine, quick_note, Report, ReportArgs};
use tidepool_bench::skewed;
use tidepool_bench::stats::{fmt_us, Latency};

/// Two balancers side by side against one, on the skewed pool.
#[derive(Debug, Parser)]
struct Args {
    /// Where the report goes (OUT), and whether the run is a quick one.
    #[command(flatten)]
    report: ReportArgs,
    /// Rounds of each setup, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// f32 elements per item (small frames).
    #[arg(long, default_value_t = 16)]
    item_len: usize,
}

/// One setup's figures over every round.
#[derive(Debug, Serialize)]
struct Row {
    balancers: usize,
    #[serde(flatten)]
    outcome: skewed::Outcome,
    /// p99 of each round, µs.
    round_p99_us: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (fast, slow) = (skewed::FAST, skewed::SLOW);
    let (capacity, rate) = (skewed::capacity(), skewed::rate());
    let (seconds, drain) = skewed::duration(args.report.quick);
    let connections = skewed::CONNECTIONS;
    let rounds = if args.report.quick {
        1
    } else {
        args.rounds.max(1)
    };

    let mut merged: BTreeMap<usize, Option<OpenLoopResult>> = BTreeMap::new();
    let mut round_p99: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for balancers in [1, 2] {
            eprintln!(
                "skewed pool through {balancers} balancer(s), round {}",
                round + 1
            );
            let (_targets, addrs) = skewed::start()?;
            let fronts: Vec<(Proc, SocketAddr)> = (0..balancers)
                .map(|_| {
                    start_balancer(&BalancerSpec {
                        routing: "p2c",
                        targets: addrs.clone(),
                        binary: None,
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            let seed = 7 + round as u64;
            let result = side_by_side(
                &fronts,
                &skewed::load(fronts[0].1, args.report.quick, seed, args.item_len),
            )?;
            round_p99
                .entry(balancers)
                .or_default()
                .push(Latency::of(&result.latency).p99_us);
            let slot = merged.entry(balancers).or_default();
            *slot = Some(match slot.take() {
                None => result,
                Some(so_far) => merge(so_far, result)?,
            });
        }
    }

    let rows: Vec<Row> = merged
        .into_iter()
        .filter_map(|(balancers, r)| r.map(|r| (balancers, r)))
        .map(|(balancers, r)| Row {
            balancers,
            outcome: skewed::Outcome::of(&r),
            round_p99_us: round_p99.remove(&balancers).unwrap_or_default(),
        })
        .collect();
    let one = rows
        .iter()
        .find(|r| r.balancers == 1)
        .context("one-balancer row")?;
    let two = rows
        .iter()
        .find(|r| r.balancers == 2)
        .context("two-balancer row")?;
    let ratio = two.outcome.latency.p99_us / one.outcome.latency.p99_us.max(1.0);
    let met = ratio <= 2.0;

    let mut report = Report::new();
    report.heading("Two balancers side by side: the skewed pool");
    report.para(&format!(
        "Machine: {}.{} Four serial targets (`bench-target`, one item at a time): three take {} per item, one \
         takes {}; together about {capacity:.0} items/s. Open-loop Poisson load at half of that, {rate:.0} requests/s, \
         for {seconds} s over {connections} persistent client connections, then up to {drain} s for the answers. \
         With two balancers (both `--routing p2c`, each over all four targets, each knowing only its own \
         outstanding counts) each gets {} connections and half the rate. {rounds} round(s) of each, alternating, \
         fresh targets and balancers every round; the percentiles are over every round's requests.",
        machine(),
        quick_note(args.report.quick),
        fmt_us(fast.as_micros() as f64),
        fmt_us(slow.as_micros() as f64),
        connections / 2,
    ));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.balancers.to_string(),
                fmt_us(r.outcome.latency.p50_us),
                fmt_us(r.outcome.latency.p99_us),
                fmt_us(r.outcome.latency.max_us),
                r.round_p99_us
                    .iter()
                    .map(|p| fmt_us(*p))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.outcome.slow_share_cell(),
                r.outcome.counts_cell(),
            ]
        })
        .collect();
    report.table(
        &[
            "balancers",
            "p50",
            "p99",
            "max",
            "p99 per round",
            "results from the slow target",
            "sent / ok / errors / unanswered",
        ],
        &table,
    );
    report.para(&format!(
        "Two balancers' p99 is {ratio:.2}x one balancer's. **Goal: within 2x: {}**.",
        if met { "met" } else { "missed" }
    ));
    report.set("machine", machine());
    report.set("quick", args.report.quick);
    report.set("skewed_two_balancers", &rows);
    report.set("p99_ratio", ratio);
    report.set("goal_met", met);
    report.write(&args.report.out, "failover")?;
    println!("{}", report.markdown());
    Ok(())
}

/// Runs `config` split evenly over `fronts` at once (connections and rate shared out,
/// a seed each), and merges what each measured.
fn side_by_side(
    fronts: &[(Proc, SocketAddr)],
    config: &OpenLoopConfig,
) -> anyhow::Result<OpenLoopResult> {
    let n = fronts.len().max(1);
    let results: Vec<anyhow::Result<OpenLoopResult>> = std::thread::scope(|scope| {
        let runs: Vec<_> = fronts
            .iter()
            .enumerate()
            .map(|(i, (_, addr))| {
                let part = OpenLoopConfig {
                    addr: *addr,
                    connections: (config.connections / n).max(1),
                    rate: config.rate / n as f64,
                    seed: config.seed * 1000 + i as u64,
                    ..config.clone()
                };
                scope.spawn(move || openloop::run(&part))
            })
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an open-loop thread panicked")))
            })
            .collect()
    });
    let mut results = results.into_iter();
    let mut total = results.next().context("at least one balancer")??;
    for result in results {
        total = merge(total, result?)?;
    }
    Ok(total)
}

/// The two runs' counts added and histograms merged.
fn merge(mut a: OpenLoopResult, b: OpenLoopResult) -> anyhow::Result<OpenLoopResult> {
    a.sent += b.sent;
    a.ok += b.ok;
    a.errors += b.errors;
    a.unanswered += b.unanswered;
    a.latency.add(&b.latency)?;
    a.latency_with_unanswered.add(&b.latency_with_unanswered)?;
    a.send_lag.add(&b.send_lag)?;
    for (worker, n) in b.workers {
        *a.workers.entry(worker).or_default() += n;
    }
    Ok(a)
}
