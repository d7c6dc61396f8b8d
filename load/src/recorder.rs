//! [`Recorder`]: the run's tallies, whole-run and per second.
//!
//! Every request task reports its one outcome here, under a short `std` mutex held only
//! for the bookkeeping (never across an `.await`). Seconds are counted from the start of
//! the run: offers by their intended send time, answers by the time they came back.
//! Only the newest second keeps a latency histogram; older seconds are reduced to their
//! p50/p99 when the clock passes them, so memory stays flat however long the run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::outcome::Outcome;
use crate::profile::RateProfile;
use crate::report::{Goodput, LatencySummary, Report, RunInfo, SecondRow, WorkerShare};

/// Highest latency recorded exactly, in microseconds (one hour); above it, clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// What one answered request tells the recorder.
#[derive(Debug)]
pub(crate) struct Answer {
    /// When it came back, since the start of the run.
    pub(crate) at: Duration,
    /// From its intended send time to `at`.
    pub(crate) latency: Duration,
    /// How it ended.
    pub(crate) outcome: Outcome,
    /// The worker that ran it, for results.
    pub(crate) worker: Option<String>,
    /// The size of the batch it ran in, for results.
    pub(crate) batch_size: Option<u32>,
    /// Why it failed, for failures that have a message.
    pub(crate) error: Option<tidepool_protocol::Error>,
}

#[derive(Clone, Debug, Default)]
struct Second {
    offered: u64,
    skipped: u64,
    ok: u64,
    errors: BTreeMap<Outcome, u64>,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    workers: usize,
}

/// The tallies of one run.
#[derive(Debug)]
pub(crate) struct Recorder {
    latency: Histogram<u64>,
    outcomes: BTreeMap<Outcome, u64>,
    batch_sizes: BTreeMap<u32, u64>,
    workers: BTreeMap<String, u64>,
    /// The first message seen for each failing outcome.
    examples: BTreeMap<Outcome, String>,
    offered: u64,
    skipped: u64,
    last_event: Duration,
    seconds: Vec<Second>,
    /// The second whose answers `window` and `window_workers` hold; every earlier second
    /// is closed.
    open: usize,
    window: Histogram<u64>,
    window_workers: BTreeSet<String>,
    /// The latency objective results are counted against (`--deadline`), if any.
    objective: Option<Duration>,
    /// Results within the objective, and after it.
    within: u64,
    late: u64,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Recorder {
            latency: histogram(3),
            outcomes: BTreeMap::new(),
            batch_sizes: BTreeMap::new(),
            workers: BTreeMap::new(),
            examples: BTreeMap::new(),
            offered: 0,
            skipped: 0,
            last_event: Duration::ZERO,
            seconds: vec![Second::default()],
            open: 0,
            window: histogram(2),
            window_workers: BTreeSet::new(),
            objective: None,
            within: 0,
            late: 0,
        }
    }

    /// A recorder that also counts results within `objective` and after it (goodput).
    pub(crate) fn with_objective(objective: Option<Duration>) -> Self {
        Recorder {
            objective,
            ..Recorder::new()
        }
    }

    fn second(&mut self, index: usize) -> &mut Second {
        if self.seconds.len() <= index {
            self.seconds.resize_with(index + 1, Second::default);
        }
        &mut self.seconds[index]
    }

    /// A send fell due at `intended`; `sent` is false when the concurrency cap refused it.
    pub(crate) fn offered(&mut self, intended: Duration, sent: bool) {
        self.offered += 1;
        self.last_event = self.last_event.max(intended);
        let second = self.second(secs(intended));
        second.offered += 1;
        if !sent {
            second.skipped += 1;
            self.skipped += 1;
        }
    }

    /// A request ended.
    pub(crate) fn answered(&mut self, answer: Answer) {
        // Answers land in the open second or a later one; one computed a hair before a
        // second boundary but recorded after it counts in the open second.
        self.close_before(secs(answer.at));
        self.last_event = self.last_event.max(answer.at);
        *self.outcomes.entry(answer.outcome).or_default() += 1;
        let open = self.open;
        let second = self.second(open);
        if answer.outcome.is_error() {
            *second.errors.entry(answer.outcome).or_default() += 1;
            if let Some(error) = answer.error {
                // Formatted once per outcome, not once per failure.
                self.examples
                    .entry(answer.outcome)
                    .or_insert_with(|| error.to_string());
            }
            return;
        }
        second.ok += 1;
        if let Some(objective) = self.objective {
            if answer.latency <= objective {
                self.within += 1;
            } else {
                self.late += 1;
            }
        }
        let us = u64::try_from(answer.latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
        self.window.saturating_record(us.clamp(1, MAX_LATENCY_US));
        if let Some(size) = answer.batch_size {
            *self.batch_sizes.entry(size).or_default() += 1;
        }
        if let Some(worker) = answer.worker {
            if !self.window_workers.contains(&worker) {
                self.window_workers.insert(worker.clone());
            }
            *self.workers.entry(worker).or_default() += 1;
        }
    }

    /// Closes every second before `second` (counted from the start).
    pub(crate) fn close_before(&mut self, second: usize) {
        while self.open < second {
            let (p50, p99) = if self.window.is_empty() {
                (None, None)
            } else {
                (
                    Some(self.window.value_at_quantile(0.5)),
                    Some(self.window.value_at_quantile(0.99)),
                )
            };
            let workers = self.window_workers.len();
            let open = self.open;
            let closed = self.second(open);
            closed.p50_us = p50;
            closed.p99_us = p99;
            closed.workers = workers;
            self.window.reset();
            self.window_workers.clear();
            self.open += 1;
        }
    }

    /// Distinct workers that have returned results so far.
    pub(crate) fn workers_seen(&self) -> usize {
        self.workers.len()
    }

    /// The row of a closed second, for the live line.
    pub(crate) fn row(&self, index: usize, profile: &RateProfile) -> Option<SecondRow> {
        (index < self.open).then(|| make_row(index, &self.seconds[index], profile))
    }

    /// Closes every second and turns the tallies into the report.
    pub(crate) fn finish(mut self, info: RunInfo, profile: &RateProfile) -> Report {
        // Close the second holding the last event too.
        self.close_before(secs(self.last_event) + 1);
        let timeline: Vec<SecondRow> = self
            .seconds
            .iter()
            .enumerate()
            .map(|(i, s)| make_row(i, s, profile))
            .collect();
        let ok = self.outcomes.get(&Outcome::Ok).copied().unwrap_or(0);
        let outcomes: BTreeMap<Outcome, u64> = Outcome::ALL
            .into_iter()
            .map(|o| (o, self.outcomes.get(&o).copied().unwrap_or(0)))
            .collect();
        let answered = outcomes
            .iter()
            .filter(|(o, _)| **o != Outcome::Unanswered)
            .map(|(_, n)| n)
            .sum();
        let sent = self.offered - self.skipped;
        let window_s = self.last_event.as_secs_f64();
        let batched: u64 = self.batch_sizes.values().sum();
        let batch_size_mean = (batched > 0).then(|| {
            self.batch_sizes
                .iter()
                .map(|(size, n)| f64::from(*size) * *n as f64)
                .sum::<f64>()
                / batched as f64
        });
        let workers = self
            .workers
            .iter()
            .map(|(worker, &answered)| WorkerShare {
                worker: worker.clone(),
                answered,
                share: answered as f64 / ok.max(1) as f64,
            })
            .collect();
        let goodput = self.objective.map(|objective| Goodput {
            objective_ms: objective.as_secs_f64() * 1000.0,
            within: self.within,
            late: self.late,
            per_s: if window_s > 0.0 {
                self.within as f64 / window_s
            } else {
                0.0
            },
            refused: Outcome::REFUSALS
                .into_iter()
                .map(|o| (o, self.outcomes.get(&o).copied().unwrap_or(0)))
                .collect(),
        });
        Report {
            info,
            goodput,
            offered: self.offered,
            sent,
            skipped: self.skipped,
            answered,
            outcomes,
            window_s,
            throughput: if window_s > 0.0 {
                ok as f64 / window_s
            } else {
                0.0
            },
            latency_ms: LatencySummary::of(&self.latency),
            batch_sizes: self.batch_sizes,
            batch_size_mean,
            workers,
            error_examples: self.examples,
            timeline,
        }
    }
}

fn make_row(index: usize, s: &Second, profile: &RateProfile) -> SecondRow {
    let t = index as u64;
    SecondRow {
        t,
        profile_rate: profile.rate_at(Duration::from_millis(t * 1000 + 500)),
        offered: s.offered,
        skipped: s.skipped,
        ok: s.ok,
        errors: s.errors.values().sum(),
        errors_by: s.errors.clone(),
        p50_ms: s.p50_us.map(us_to_ms),
        p99_ms: s.p99_us.map(us_to_ms),
        active_workers: s.workers,
    }
}

fn secs(t: Duration) -> usize {
    usize::try_from(t.as_secs()).unwrap_or(usize::MAX)
}

pub(crate) fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn histogram(sigfig: u8) -> Histogram<u64> {
    // Bounds and precision are constants known to be valid.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RunInfo;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ok(at: u64, latency: u64, worker: &str, batch: u32) -> Answer {
        Answer {
            at: ms(at),
            latency: ms(latency),
            outcome: Outcome::Ok,
            worker: Some(worker.to_owned()),
            batch_size: Some(batch),
            error: None,
        }
    }

    fn failed(at: u64, outcome: Outcome) -> Answer {
        Answer {
            at: ms(at),
            latency: ms(1),
            outcome,
            worker: None,
            batch_size: None,
            error: Some(tidepool_protocol::Error::Overloaded {
                message: "queue full".into(),
                retry_after: None,
            }),
        }
    }

    #[test]
    fn results_are_counted_against_the_objective_and_refusals_by_reason() {
        let profile = RateProfile::Constant { rate: 4.0 };
        let mut r = Recorder::with_objective(Some(ms(50)));
        for t in [0, 250, 500, 750] {
            r.offered(ms(t), true);
        }
        r.answered(ok(40, 40, "a", 1));
        r.answered(ok(300, 50, "a", 1));
        r.answered(ok(580, 80, "a", 1));
        r.answered(failed(760, Outcome::Overloaded));
        r.offered(ms(1000), true);
        r.answered(failed(1900, Outcome::DeadlineExceeded));
        let report = r.finish(RunInfo::default(), &profile);
        let g = report.goodput.as_ref().unwrap();
        assert_eq!((g.within, g.late), (2, 1), "50 ms is within, 80 ms late");
        assert_eq!(g.refused[&Outcome::Overloaded], 1);
        assert_eq!(g.refused[&Outcome::DeadlineExceeded], 1);
        assert_eq!(g.refused[&Outcome::ShuttingDown], 0, "every reason listed");
        assert!((g.per_s - 2.0 / 1.9).abs() < 1e-9, "{}", g.per_s);
        let text = report.to_string();
        assert!(text.contains("within (goodput)"), "{text}");
        assert!(text.contains("refused: overloaded"), "{text}");
        assert!(Recorder::new()
            .finish(RunInfo::default(), &profile)
            .goodput
            .is_none());
    }

    #[test]
    fn tallies_per_run_and_per_second() {
        let profile = RateProfile::Constant { rate: 3.0 };
        let mut r = Recorder::new();
        for (t, sent) in [
            (0, true),
            (300, true),
            (600, false),
            (1000, true),
            (1500, true),
        ] {
            r.offered(ms(t), sent);
        }
        r.answered(ok(10, 10, "a", 1));
        r.answered(ok(320, 20, "b", 2));
        r.answered(ok(1010, 10, "a", 2));
        r.answered(failed(1600, Outcome::Overloaded));
        r.close_before(1);
        let first = r.row(0, &profile).unwrap();
        assert_eq!((first.offered, first.skipped, first.ok), (3, 1, 2));
        assert_eq!(first.active_workers, 2);
        assert!(r.row(1, &profile).is_none(), "second 1 is still open");
        let report = r.finish(RunInfo::default(), &profile);
        assert_eq!((report.offered, report.sent, report.skipped), (5, 4, 1));
        assert_eq!(report.answered, 4);
        assert_eq!(report.outcomes[&Outcome::Ok], 3);
        assert_eq!(report.outcomes[&Outcome::Overloaded], 1);
        assert_eq!(report.outcomes[&Outcome::Unanswered], 0);
        assert_eq!(report.batch_sizes, BTreeMap::from([(1, 1), (2, 2)]));
        assert_eq!(report.workers.len(), 2);
        assert_eq!(report.workers[0].answered, 2);
        assert!((report.workers[0].share - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(report.timeline.len(), 2);
        let second = &report.timeline[1];
        assert_eq!((second.ok, second.errors, second.active_workers), (1, 1, 1));
        assert_eq!(second.errors_by[&Outcome::Overloaded], 1);
        assert_eq!(
            report.error_examples[&Outcome::Overloaded],
            "server overloaded: queue full"
        );
        let p99 = second.p99_ms.unwrap();
        assert!((p99 - 10.0).abs() < 0.1, "p99 {p99}");
        assert!(report.latency_ms.max.unwrap() >= 19.9);
    }

    #[test]
    fn quiet_seconds_have_no_percentiles() {
        let profile = RateProfile::Constant { rate: 1.0 };
        let mut r = Recorder::new();
        r.offered(ms(0), true);
        r.answered(ok(2500, 2500, "a", 1));
        let report = r.finish(RunInfo::default(), &profile);
        assert_eq!(report.timeline.len(), 3);
        assert_eq!(report.timeline[1].p99_ms, None);
        assert_eq!(report.timeline[2].ok, 1);
    }
}
