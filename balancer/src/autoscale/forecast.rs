//! Predictive pre-warm (`--predictive`): the load remembered by time of day.
//!
//! As AWS's predictive scaling does, the [`DayProfile`] learns the demand (in workers, the
//! policy's signal) over a repeating period (`--predictive-period`, a day by default; a
//! compressed day for demos and benchmarks) in a fixed number of buckets, so its memory is
//! bounded whatever the uptime. Each bucket keeps an exponential average over periods of
//! the demand's mean while the clock was in it. The forecast for now is the highest demand
//! remembered between now and one start-up time (plus a bucket) ahead: starting workers
//! then means they are ready when the usual rise comes.
//!
//! A forecast only ever adds workers: the policy takes the larger of its own wish and the
//! forecast, so a quiet forecast never scales in (and in `forecast-only` mode the forecast
//! is only reported).

use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;

/// What `--predictive` does with the forecast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Predictive {
    /// No forecast.
    #[default]
    Off,
    /// Learn and report the forecast (`GET /scaling`, metrics), act on nothing.
    ForecastOnly,
    /// Also start workers ahead of the forecast rise (never stop any on a forecast).
    On,
}

/// Buckets per period: 15-minute buckets over a day.
pub const BUCKETS: usize = 96;

/// How much a new period's mean moves a bucket's remembered demand.
const LEARNING_RATE: f64 = 0.5;

/// The demand remembered by time within the period.
#[derive(Clone, Debug)]
pub struct DayProfile {
    period: Duration,
    /// Each bucket's remembered demand; `None` until a period passed through it.
    remembered: Box<[Option<f64>; BUCKETS]>,
    /// The bucket being filled, with the sum and count of its samples so far.
    filling: Option<(usize, f64, u32)>,
}

impl DayProfile {
    /// An empty profile over `period` (at least one second per bucket).
    pub fn new(period: Duration) -> Self {
        DayProfile {
            period: period.max(Duration::from_secs(BUCKETS as u64)),
            remembered: Box::new([None; BUCKETS]),
            filling: None,
        }
    }

    /// The length of one bucket.
    pub fn bucket_len(&self) -> Duration {
        self.period / BUCKETS as u32
    }

    fn bucket(&self, since_epoch: Duration) -> usize {
        let into = since_epoch.as_nanos() % self.period.as_nanos();
        let len = self.bucket_len().as_nanos().max(1);
        ((into / len) as usize).min(BUCKETS - 1)
    }

    /// Records `demand` at wall-clock time `since_epoch`.
    pub fn record(&mut self, since_epoch: Duration, demand: f64) {
        if !demand.is_finite() {
            return;
        }
        let bucket = self.bucket(since_epoch);
        match &mut self.filling {
            Some((b, sum, n)) if *b == bucket => {
                *sum += demand;
                *n += 1;
            }
            filling => {
                if let Some((b, sum, n)) = filling.take() {
                    let mean = sum / f64::from(n.max(1));
                    let slot = &mut self.remembered[b];
                    *slot = Some(match *slot {
                        Some(old) => old + (mean - old) * LEARNING_RATE,
                        None => mean,
                    });
                }
                *filling = Some((bucket, demand, 1));
            }
        }
    }

    /// The highest remembered demand from `since_epoch` to `lead` after it (and the bucket
    /// that contains that end); `None` when none of those buckets is known yet.
    pub fn forecast(&self, since_epoch: Duration, lead: Duration) -> Option<f64> {
        let first = self.bucket(since_epoch);
        let span = 1 + (lead.as_nanos() / self.bucket_len().as_nanos().max(1)) as usize;
        (0..=span.min(BUCKETS - 1))
            .filter_map(|i| self.remembered[(first + i) % BUCKETS])
            .reduce(f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(960); // 10 s buckets

    /// A day whose demand is 1 until 400 s, 4 from 400 s to 700 s, then 1.
    fn demand(t: u64) -> f64 {
        if (400..700).contains(&(t % 960)) {
            4.0
        } else {
            1.0
        }
    }

    #[test]
    fn knows_nothing_before_a_period_passed() {
        let mut p = DayProfile::new(DAY);
        for t in 0..300 {
            p.record(Duration::from_secs(t), demand(t));
        }
        assert_eq!(
            p.forecast(Duration::from_secs(350), Duration::from_secs(60)),
            None
        );
    }

    #[test]
    fn forecasts_the_rise_a_lead_time_ahead() {
        let mut p = DayProfile::new(DAY);
        for t in 0..960 * 2 {
            p.record(Duration::from_secs(t), demand(t));
        }
        let day3 = 960 * 2;
        let lead = Duration::from_secs(30);
        // 60 s before the rise: the rise is beyond the lead.
        assert_eq!(p.forecast(Duration::from_secs(day3 + 340), lead), Some(1.0));
        // 30 s before it: the forecast sees it coming.
        assert_eq!(p.forecast(Duration::from_secs(day3 + 375), lead), Some(4.0));
        assert_eq!(p.forecast(Duration::from_secs(day3 + 800), lead), Some(1.0));
    }

    #[test]
    fn memory_is_bounded_and_learns_changes() {
        let mut p = DayProfile::new(DAY);
        for day in 0..20u64 {
            for t in 0..960 {
                let level = if day < 10 { 4.0 } else { 2.0 };
                p.record(Duration::from_secs(day * 960 + t), level);
            }
        }
        let f = p
            .forecast(Duration::from_secs(20 * 960 + 100), Duration::ZERO)
            .unwrap();
        assert!((f - 2.0).abs() < 0.01, "{f}");
        assert_eq!(p.remembered.len(), BUCKETS);
    }
}
