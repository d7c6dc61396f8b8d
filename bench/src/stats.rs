//! Latency summaries from HDR histograms of nanoseconds.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A histogram of nanoseconds from 1 ns to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3)
        .unwrap_or_else(|_| unreachable!("the bounds are valid"))
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.max(1));
}

/// Percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// The median, µs.
    pub p50_us: f64,
    /// The 90th percentile, µs.
    pub p90_us: f64,
    /// The 99th percentile, µs.
    pub p99_us: f64,
    /// The 99.9th percentile, µs.
    pub p999_us: f64,
    /// The largest value, µs.
    pub max_us: f64,
}

impl Latency {
    /// Summarises a histogram of nanoseconds; zeros when it is empty.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: h.max() as f64 / 1000.0,
        }
    }
}

/// Formats microseconds for a table: `85 µs`, `1.42 ms`, `2.31 s`.
pub fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1_000_000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_formats() {
        let mut h = histogram();
        for us in 1..=100u64 {
            record(&mut h, us * 1000);
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 100);
        assert!((l.p50_us - 50.0).abs() < 0.5, "{l:?}");
        assert!((l.p99_us - 99.0).abs() < 0.5, "{l:?}");
        assert_eq!(fmt_us(85.2), "85 µs");
        assert_eq!(fmt_us(1420.0), "1.42 ms");
        assert_eq!(fmt_us(2_310_000.0), "2.31 s");
        assert_eq!(Latency::of(&histogram()), Latency::default());
    }
}
