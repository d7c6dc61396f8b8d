//! Rate profiles: how many items per second the run offers at each moment.
//!
//! A profile is a pure function of the time since the start; the [`schedule`](crate::schedule)
//! turns it into send times. Keeping it pure keeps it testable without a clock.

use std::time::Duration;

use serde::Serialize;

/// The share of the peak rate offered in the dead of night by [`RateProfile::Day`].
pub const NIGHT_FLOOR: f64 = 0.1;

/// The offered rate over time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RateProfile {
    /// The same rate throughout.
    Constant {
        /// Items per second.
        rate: f64,
    },
    /// A day compressed into the run: night (a tenth of the peak, [`NIGHT_FLOOR`]) until
    /// 06:00, a morning ramp to the peak by 11:00, the peak until 15:00, an evening fall
    /// back to night by 22:00. The run starts and ends at midnight.
    Day {
        /// The midday rate, items per second.
        peak: f64,
        /// The length of the compressed day: the run's duration.
        #[serde(with = "secs")]
        day: Duration,
    },
    /// A base rate with bursts to the peak: each period of `every` ends with `length` at
    /// the peak, so the first burst starts at `every - length`.
    Burst {
        /// Items per second between bursts.
        base: f64,
        /// Items per second during a burst.
        peak: f64,
        /// From the start of one burst to the start of the next.
        #[serde(with = "secs")]
        every: Duration,
        /// How long each burst lasts (at most `every`).
        #[serde(with = "secs")]
        length: Duration,
    },
}

impl RateProfile {
    /// Items per second offered at `t` after the start.
    pub fn rate_at(&self, t: Duration) -> f64 {
        match *self {
            RateProfile::Constant { rate } => rate,
            RateProfile::Day { peak, day } => {
                let hour = if day.is_zero() {
                    12.0
                } else {
                    24.0 * (t.as_secs_f64() / day.as_secs_f64()).fract()
                };
                peak * (NIGHT_FLOOR + (1.0 - NIGHT_FLOOR) * day_shape(hour))
            }
            RateProfile::Burst {
                base,
                peak,
                every,
                length,
            } => {
                if every.is_zero() {
                    return peak;
                }
                let phase = t.as_nanos() % every.as_nanos();
                if phase >= every.saturating_sub(length).as_nanos() {
                    peak
                } else {
                    base
                }
            }
        }
    }

    /// The profile's name as `--profile` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            RateProfile::Constant { .. } => "constant",
            RateProfile::Day { .. } => "day",
            RateProfile::Burst { .. } => "burst",
        }
    }

    /// The highest rate the profile reaches.
    pub fn peak(&self) -> f64 {
        match *self {
            RateProfile::Constant { rate } => rate,
            RateProfile::Day { peak, .. } => peak,
            RateProfile::Burst { base, peak, .. } => base.max(peak),
        }
    }
}

/// Daytime activity from 0 (night) to 1 (midday) at `hour` in `[0, 24)`.
fn day_shape(hour: f64) -> f64 {
    match hour {
        h if h < 6.0 => 0.0,
        h if h < 11.0 => smoothstep((h - 6.0) / 5.0),
        h if h < 15.0 => 1.0,
        h if h < 22.0 => 1.0 - smoothstep((h - 15.0) / 7.0),
        _ => 0.0,
    }
}

/// The cubic ease from 0 to 1 on `[0, 1]`: no jump in the rate or its slope at the ends.
fn smoothstep(x: f64) -> f64 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

mod secs {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(p: &RateProfile, secs: f64) -> f64 {
        p.rate_at(Duration::from_secs_f64(secs))
    }

    #[test]
    fn constant_is_constant() {
        let p = RateProfile::Constant { rate: 250.0 };
        for s in [0.0, 1.5, 1000.0] {
            assert_eq!(at(&p, s), 250.0);
        }
    }

    #[test]
    fn day_is_low_at_night_and_peaks_at_midday() {
        // A 24 s "day": one second per hour.
        let p = RateProfile::Day {
            peak: 1000.0,
            day: Duration::from_secs(24),
        };
        assert!((at(&p, 0.0) - 100.0).abs() < 1e-9, "midnight is the floor");
        assert!((at(&p, 3.0) - 100.0).abs() < 1e-9);
        assert!((at(&p, 12.0) - 1000.0).abs() < 1e-9, "midday is the peak");
        assert!((at(&p, 23.5) - 100.0).abs() < 1e-9);
        // The morning ramp rises, the evening falls.
        let morning: Vec<f64> = (60..=110).map(|h| at(&p, f64::from(h) / 10.0)).collect();
        assert!(morning.windows(2).all(|w| w[0] <= w[1]));
        let evening: Vec<f64> = (150..=220).map(|h| at(&p, f64::from(h) / 10.0)).collect();
        assert!(evening.windows(2).all(|w| w[0] >= w[1]));
        assert!(at(&p, 8.5) > 200.0 && at(&p, 8.5) < 900.0);
    }

    #[test]
    fn day_never_leaves_its_bounds() {
        let p = RateProfile::Day {
            peak: 50.0,
            day: Duration::from_secs(120),
        };
        for i in 0..1200 {
            let r = at(&p, f64::from(i) / 10.0);
            assert!((5.0..=50.0).contains(&r), "rate {r} at {i}");
        }
    }

    #[test]
    fn burst_ends_each_period_at_the_peak() {
        let p = RateProfile::Burst {
            base: 10.0,
            peak: 100.0,
            every: Duration::from_secs(10),
            length: Duration::from_secs(2),
        };
        assert_eq!(at(&p, 0.0), 10.0);
        assert_eq!(at(&p, 7.9), 10.0);
        assert_eq!(at(&p, 8.0), 100.0);
        assert_eq!(at(&p, 9.9), 100.0);
        assert_eq!(at(&p, 10.0), 10.0);
        assert_eq!(at(&p, 18.5), 100.0);
        assert_eq!(p.peak(), 100.0);
    }
}
