//! The schedule: every request's intended send time, fixed before anything is sent.
//!
//! This is what makes the generator open-loop. Send times follow from the
//! [`RateProfile`] alone, never from how fast answers come back, and each request's
//! latency is measured from its intended time, so a slow server cannot slow the load down
//! and hide its own queueing (coordinated omission).
//!
//! Both arrival processes use the same construction: the next send is at the moment the
//! integral of the rate since the previous one reaches a step, which is `1` for
//! [`Arrivals::Uniform`] (evenly spaced at the current rate) and an exponential sample of
//! mean 1 for [`Arrivals::Poisson`] (a non-homogeneous Poisson process, by time rescaling).

use std::time::Duration;

use clap::ValueEnum;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::profile::RateProfile;

/// The longest step of the numerical integration of the rate, in seconds: fine enough to
/// follow a burst's edges, coarse enough to be cheap at low rates.
const MAX_STEP: f64 = 0.001;

/// How sends are spread within the rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// Evenly spaced at the current rate.
    Uniform,
    /// Independent arrivals (a Poisson process at the current rate), as many independent
    /// clients produce; seeded by `--seed`.
    #[default]
    Poisson,
}

/// Iterator over intended send times (offsets from the start), in order, up to `duration`.
#[derive(Debug)]
pub struct Schedule {
    profile: RateProfile,
    end: f64,
    arrivals: Arrivals,
    rng: StdRng,
    /// Seconds since the start of the last send time produced.
    t: f64,
}

impl Schedule {
    /// The schedule of a run of `duration` under `profile`; the same seed gives the same
    /// times.
    pub fn new(profile: RateProfile, duration: Duration, arrivals: Arrivals, seed: u64) -> Self {
        Schedule {
            profile,
            end: duration.as_secs_f64(),
            arrivals,
            rng: StdRng::seed_from_u64(seed),
            t: 0.0,
        }
    }

    fn step(&mut self) -> f64 {
        match self.arrivals {
            Arrivals::Uniform => 1.0,
            Arrivals::Poisson => {
                let u: f64 = self.rng.random();
                -(1.0 - u).ln()
            }
        }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let mut remaining = self.step();
        while self.t < self.end {
            let rate = self
                .profile
                .rate_at(Duration::from_secs_f64(self.t))
                .max(0.0);
            if rate * MAX_STEP >= remaining {
                self.t += remaining / rate;
                return (self.t < self.end).then(|| Duration::from_secs_f64(self.t));
            }
            remaining -= rate * MAX_STEP;
            self.t += MAX_STEP;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(profile: RateProfile, secs: u64, arrivals: Arrivals, seed: u64) -> Vec<Duration> {
        Schedule::new(profile, Duration::from_secs(secs), arrivals, seed).collect()
    }

    #[test]
    fn uniform_constant_is_evenly_spaced() {
        let t = times(
            RateProfile::Constant { rate: 100.0 },
            10,
            Arrivals::Uniform,
            0,
        );
        assert!((999..=1000).contains(&t.len()), "{} sends", t.len());
        for pair in t.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            assert!((gap - 0.01).abs() < 1e-6, "gap {gap}");
        }
    }

    #[test]
    fn poisson_constant_has_the_right_count_and_is_seeded() {
        let profile = RateProfile::Constant { rate: 1000.0 };
        let a = times(profile, 10, Arrivals::Poisson, 7);
        let b = times(profile, 10, Arrivals::Poisson, 7);
        let c = times(profile, 10, Arrivals::Poisson, 8);
        assert_eq!(a, b, "same seed, same schedule");
        assert_ne!(a, c, "another seed, another schedule");
        // 10 000 expected; the standard deviation is 100.
        assert!((9_500..=10_500).contains(&a.len()), "{} sends", a.len());
    }

    #[test]
    fn times_are_increasing_and_within_the_run() {
        let profile = RateProfile::Burst {
            base: 20.0,
            peak: 500.0,
            every: Duration::from_secs(3),
            length: Duration::from_secs(1),
        };
        for arrivals in [Arrivals::Uniform, Arrivals::Poisson] {
            let t = times(profile, 9, arrivals, 1);
            assert!(t.windows(2).all(|w| w[0] <= w[1]));
            assert!(t.iter().all(|&x| x < Duration::from_secs(9)));
        }
    }

    #[test]
    fn counts_follow_the_profile() {
        let profile = RateProfile::Burst {
            base: 20.0,
            peak: 500.0,
            every: Duration::from_secs(3),
            length: Duration::from_secs(1),
        };
        let t = times(profile, 9, Arrivals::Uniform, 0);
        // Each 3 s period: 2 s at 20/s and 1 s at 500/s.
        assert!((1_615..=1_625).contains(&t.len()), "{} sends", t.len());
        let in_burst = t.iter().filter(|x| x.as_secs_f64() % 3.0 >= 2.0).count();
        assert!((1_495..=1_505).contains(&in_burst), "{in_burst} in bursts");
    }

    #[test]
    fn a_day_sends_what_its_curve_integrates_to() {
        let day = Duration::from_secs(240);
        let profile = RateProfile::Day { peak: 100.0, day };
        let t = times(profile, 240, Arrivals::Uniform, 0);
        let expected: f64 = (0..240_000)
            .map(|ms| profile.rate_at(Duration::from_millis(ms)) / 1000.0)
            .sum();
        assert!(
            (t.len() as f64 - expected).abs() < 2.0,
            "{} sends, {expected} expected",
            t.len()
        );
        // Night is quiet: the first 6 "hours" (60 s) see about 10/s.
        let night = t.iter().filter(|x| x.as_secs() < 60).count();
        assert!((595..=605).contains(&night), "{night} at night");
    }

    #[test]
    fn a_zero_rate_sends_nothing() {
        assert!(times(RateProfile::Constant { rate: 0.0 }, 5, Arrivals::Poisson, 0).is_empty());
    }
}
