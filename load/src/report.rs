//! [`Report`]: what a run measured, as a table for people, JSON for machines and a
//! per-second CSV timeline.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::Error;
use crate::outcome::Outcome;
use crate::profile::RateProfile;
use crate::recorder::us_to_ms;
use crate::schedule::Arrivals;

/// How the run was set up and how it ended.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    /// The address loaded.
    pub target: String,
    /// The rate profile.
    pub profile: RateProfile,
    /// How sends were spread.
    pub arrivals: Arrivals,
    /// The configured `--duration`, seconds.
    pub duration_s: f64,
    /// From the start to the end of the drain, seconds.
    pub elapsed_s: f64,
    /// True when the shutdown signal stopped the schedule early.
    pub interrupted: bool,
    /// `--concurrency`.
    pub concurrency: usize,
    /// `--connections`.
    pub connections: usize,
    /// `--deadline`, milliseconds.
    pub deadline_ms: Option<u64>,
    /// The `--input` specifications.
    pub inputs: Vec<String>,
}

impl Default for RunInfo {
    fn default() -> Self {
        RunInfo {
            target: String::new(),
            profile: RateProfile::Constant { rate: 0.0 },
            arrivals: Arrivals::default(),
            duration_s: 0.0,
            elapsed_s: 0.0,
            interrupted: false,
            concurrency: 0,
            connections: 0,
            deadline_ms: None,
            inputs: Vec::new(),
        }
    }
}

/// Latency percentiles in milliseconds; `None` when nothing was measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// The mean.
    pub mean: Option<f64>,
    /// The median.
    pub p50: Option<f64>,
    /// The 90th percentile.
    pub p90: Option<f64>,
    /// The 99th percentile.
    pub p99: Option<f64>,
    /// The 99.9th percentile.
    pub p999: Option<f64>,
    /// The largest value.
    pub max: Option<f64>,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let q = |q: f64| Some(us_to_ms(h.value_at_quantile(q)));
        LatencySummary {
            count: h.len(),
            mean: Some(h.mean() / 1000.0),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: Some(us_to_ms(h.max())),
        }
    }
}

/// One worker's part of the results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerShare {
    /// The `worker` field of its results.
    pub worker: String,
    /// Results it returned.
    pub answered: u64,
    /// Its fraction of all results, 0 to 1.
    pub share: f64,
}

/// One second of the run. Offers count by intended send time, answers by arrival.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SecondRow {
    /// Seconds since the start at the beginning of this second.
    pub t: u64,
    /// The profile's rate in the middle of this second, items/s.
    pub profile_rate: f64,
    /// Sends that fell due: the offered rate, items/s.
    pub offered: u64,
    /// Of those, not sent because of the concurrency cap.
    pub skipped: u64,
    /// Results that came back: the achieved rate, items/s.
    pub ok: u64,
    /// Failed requests that ended in this second.
    pub errors: u64,
    /// `errors` by outcome.
    pub errors_by: BTreeMap<Outcome, u64>,
    /// Median latency of this second's results, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency of this second's results, ms.
    pub p99_ms: Option<f64>,
    /// Distinct workers that returned results in this second.
    pub active_workers: usize,
}

/// Results against the run's latency objective (`--deadline`): what serving to an objective
/// is judged by.
#[derive(Clone, Debug, Serialize)]
pub struct Goodput {
    /// The objective, from each intended send time.
    pub objective_ms: f64,
    /// Results within it.
    pub within: u64,
    /// Results after it (the server ran them, too late to count).
    pub late: u64,
    /// Results within it per second over the run's window: the goodput.
    pub per_s: f64,
    /// Requests refused or dropped without a result, by reason (every reason present).
    pub refused: BTreeMap<Outcome, u64>,
}

/// What a run measured. Serialises to the `--json` document.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// How the run was set up.
    #[serde(rename = "run")]
    pub info: RunInfo,
    /// Sends that fell due on the schedule.
    pub offered: u64,
    /// Requests sent (`offered - skipped`), counting those whose deadline ran out before the
    /// driver got to send them (answered `deadline_exceeded` here).
    pub sent: u64,
    /// Sends refused by the concurrency cap.
    pub skipped: u64,
    /// Requests that got an answer (a result, an error code, or a lost connection):
    /// `sent` minus the unanswered.
    pub answered: u64,
    /// Requests by outcome; every outcome is present, zero or not.
    pub outcomes: BTreeMap<Outcome, u64>,
    /// From the start to the last send or answer, seconds.
    pub window_s: f64,
    /// Results per second over `window_s`.
    pub throughput: f64,
    /// Latency of results (errors excluded), from each intended send time.
    pub latency_ms: LatencySummary,
    /// Results against the objective, with `--deadline`.
    pub goodput: Option<Goodput>,
    /// Results by the size of the batch they ran in.
    pub batch_sizes: BTreeMap<u32, u64>,
    /// The mean batch size over results that reported one.
    pub batch_size_mean: Option<f64>,
    /// Results per worker, by name.
    pub workers: Vec<WorkerShare>,
    /// For each failing outcome seen, the first error message: what to fix.
    pub error_examples: BTreeMap<Outcome, String>,
    /// One row per second.
    pub timeline: Vec<SecondRow>,
}

impl Report {
    /// Results that came back.
    pub fn ok(&self) -> u64 {
        self.outcome(Outcome::Ok)
    }

    /// Requests that ended with `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(&outcome).copied().unwrap_or(0)
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> Result<String, Error> {
        serde_json::to_string_pretty(self).map_err(Error::Json)
    }

    /// Writes the report as pretty JSON to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), Error> {
        write(path, self.to_json()? + "\n")
    }

    /// The timeline as CSV, one row per second, with a header.
    pub fn timeline_csv(&self) -> String {
        let mut out = String::from(
            "t,profile_rate,offered_rate,achieved_rate,p50_ms,p99_ms,errors,skipped,active_workers\n",
        );
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        for r in &self.timeline {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "{},{:.1},{},{},{},{},{},{},{}",
                r.t,
                r.profile_rate,
                r.offered,
                r.ok,
                opt(r.p50_ms),
                opt(r.p99_ms),
                r.errors,
                r.skipped,
                r.active_workers
            );
        }
        out
    }

    /// Writes the timeline CSV to `path` and its plot to `path` with the extension `.svg`;
    /// returns the plot's path.
    pub fn write_timeline(&self, path: &Path) -> Result<std::path::PathBuf, Error> {
        write(path, self.timeline_csv())?;
        let svg_path = path.with_extension("svg");
        write(&svg_path, crate::plot::timeline_svg(self))?;
        Ok(svg_path)
    }
}

fn write(path: &Path, contents: String) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

/// The table is the `Display` form.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = &self.info;
        let pct = |n: u64, of: u64| {
            if of == 0 {
                0.0
            } else {
                100.0 * n as f64 / of as f64
            }
        };
        writeln!(
            f,
            "tidepool-load → {}: {} profile, peak {}/s, {} arrivals, {:.1}s{}",
            info.target,
            info.profile.name(),
            fmt_rate(info.profile.peak()),
            match info.arrivals {
                Arrivals::Uniform => "uniform",
                Arrivals::Poisson => "poisson",
            },
            info.duration_s,
            if info.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )?;
        writeln!(f)?;
        writeln!(f, "requests")?;
        writeln!(f, "  {:<22}{:>10}", "offered", self.offered)?;
        writeln!(f, "  {:<22}{:>10}", "sent", self.sent)?;
        if self.skipped > 0 {
            writeln!(
                f,
                "  {:<22}{:>10}  {:>6.2}%  (over --concurrency {})",
                "skipped (cap)",
                self.skipped,
                pct(self.skipped, self.offered),
                info.concurrency
            )?;
        }
        writeln!(f, "answers by outcome")?;
        for (outcome, &n) in &self.outcomes {
            if n > 0 || *outcome == Outcome::Ok {
                writeln!(
                    f,
                    "  {:<22}{:>10}  {:>6.2}%",
                    outcome.as_str(),
                    n,
                    pct(n, self.sent)
                )?;
                if let Some(example) = self.error_examples.get(outcome) {
                    writeln!(f, "      first: {example}")?;
                }
            }
        }
        writeln!(
            f,
            "  {:<22}{:>10}/s over {:.1}s",
            "throughput (ok)",
            format!("{:.1}", self.throughput),
            self.window_s
        )?;
        if let Some(g) = &self.goodput {
            writeln!(f, "objective: results within {:.0} ms", g.objective_ms)?;
            writeln!(
                f,
                "  {:<22}{:>10}  {:>6.2}%",
                "within (goodput)",
                g.within,
                pct(g.within, self.sent)
            )?;
            writeln!(
                f,
                "  {:<22}{:>10}  {:>6.2}%",
                "late",
                g.late,
                pct(g.late, self.sent)
            )?;
            for (reason, &n) in &g.refused {
                writeln!(
                    f,
                    "  {:<22}{:>10}  {:>6.2}%",
                    format!("refused: {reason}"),
                    n,
                    pct(n, self.sent)
                )?;
            }
            writeln!(f, "  {:<22}{:>10}/s", "goodput", format!("{:.1}", g.per_s))?;
        }
        writeln!(f, "latency of results, from intended send time (ms)")?;
        let l = &self.latency_ms;
        for (name, v) in [
            ("p50", l.p50),
            ("p90", l.p90),
            ("p99", l.p99),
            ("p99.9", l.p999),
            ("max", l.max),
            ("mean", l.mean),
        ] {
            writeln!(f, "  {:<22}{:>10}", name, fmt_ms(v))?;
        }
        if !self.batch_sizes.is_empty() {
            let total: u64 = self.batch_sizes.values().sum();
            writeln!(
                f,
                "batch sizes (mean {:.2})",
                self.batch_size_mean.unwrap_or(0.0)
            )?;
            for (label, n) in batch_buckets(&self.batch_sizes) {
                writeln!(f, "  {:<22}{:>10}  {:>6.2}%", label, n, pct(n, total))?;
            }
        }
        if !self.workers.is_empty() {
            writeln!(f, "workers")?;
            for w in &self.workers {
                writeln!(
                    f,
                    "  {:<22}{:>10}  {:>6.2}%",
                    w.worker,
                    w.answered,
                    100.0 * w.share
                )?;
            }
        }
        Ok(())
    }
}

/// Batch sizes for the table: each size when there are few, else power-of-two ranges
/// (1, 2, 3-4, 5-8, ...). The JSON keeps every size.
fn batch_buckets(sizes: &BTreeMap<u32, u64>) -> Vec<(String, u64)> {
    if sizes.len() <= 12 {
        return sizes.iter().map(|(s, n)| (s.to_string(), *n)).collect();
    }
    let mut buckets: BTreeMap<u32, u64> = BTreeMap::new();
    for (&size, &n) in sizes {
        *buckets.entry(size.max(1).next_power_of_two()).or_default() += n;
    }
    buckets
        .into_iter()
        .map(|(hi, n)| {
            let lo = hi / 2 + 1;
            let label = if lo >= hi {
                hi.to_string()
            } else {
                format!("{lo}-{hi}")
            };
            (label, n)
        })
        .collect()
}

/// Milliseconds with three significant figures' worth of decimals.
pub(crate) fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if v < 10.0 => format!("{v:.3}"),
        Some(v) if v < 100.0 => format!("{v:.2}"),
        Some(v) if v < 1000.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// A rate without needless decimals.
pub(crate) fn fmt_rate(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_buckets_group_many_sizes() {
        let few = BTreeMap::from([(1, 5), (4, 2)]);
        assert_eq!(
            batch_buckets(&few),
            vec![("1".to_owned(), 5), ("4".to_owned(), 2)]
        );
        let many: BTreeMap<u32, u64> = (1..=20).map(|s| (s, 1)).collect();
        let b = batch_buckets(&many);
        let labels: Vec<&str> = b.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["1", "2", "3-4", "5-8", "9-16", "17-32"]);
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), 20);
        assert_eq!(b[5].1, 4);
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(fmt_ms(None), "-");
        assert_eq!(fmt_ms(Some(1.23456)), "1.235");
        assert_eq!(fmt_ms(Some(123.456)), "123.5");
        assert_eq!(fmt_rate(100.0), "100");
        assert_eq!(fmt_rate(12.5), "12.5");
    }
}
