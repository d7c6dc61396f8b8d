//! [`Margin`]: how much later than forecast the items the worker admitted actually finished,
//! learned online, so that predicted-finish admission ([`crate::admission`]) admits only what
//! it will finish in time.
//!
//! The forecast is optimistic by design: it counts the model time ahead of an item at the
//! profile's batch times and nothing else. Under overload the batches run slower than the
//! profile learned at a lighter load (the worker's own connections and the refusals it makes
//! share the cores with the model), forming, splitting and answering take time too, and an
//! item admitted at the very edge of its deadline is then answered late: at 150% of capacity
//! on the 64 MiB model, a quarter of what the worker admitted (d68e845). So each admitted
//! item's forecast finish is kept with it, and when its batch has been answered, the error
//! (actual finish less forecast, negative when early) is a sample here. The margin is a high
//! quantile ([`QUANTILE`]) of the samples of the last [`WINDOW`], never below zero, and
//! admission adds it to every forecast, up to the time ahead of the item
//! ([`crate::admission::Forecast::with_margin`]).
//!
//! - **Bounded.** At most [`MAX_SAMPLES`] samples are kept (the newest), and the quantile is
//!   computed into a scratch buffer of that size at most once per batch answered (or per
//!   [`REFRESH`] while nothing is answered), never per arrival.
//! - **It decays.** Samples older than [`WINDOW`] no longer count, so when batches speed up
//!   again the margin follows within the window; with no sample left it is zero, so a margin
//!   that made the worker refuse nearly everything cannot hold itself up.
//! - **The forecast, not the margin, is judged.** The samples compare against the forecast
//!   without the margin, so that the margin measures the forecast's error rather than its
//!   own.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The quantile of the recent errors that the margin covers: a high one, since an item
/// admitted and then answered late costs a model slot and the client's answer, while one
/// refused for a margin too wide costs only a retry (elsewhere, or with the queue shorter);
/// not the very top, since the items of one batch share its error: one batch delayed by a
/// hiccup of the machine is 16 samples, and at the 98th percentile two such batches in a
/// window would set the margin.
pub const QUANTILE: f64 = 0.95;

/// How long a sample counts: long enough to hold some hundreds of items on the slowest model
/// the benchmark serves (a 1 GiB model's batch of 16 takes about 50 ms), short enough that
/// the margin falls within seconds when the worker speeds up again.
pub const WINDOW: Duration = Duration::from_secs(2);

/// Most samples kept: the newest. At thousands of items a second the window holds more; the
/// last [`MAX_SAMPLES`] are then the recent past.
pub const MAX_SAMPLES: usize = 1024;

/// How often the margin is recomputed while no sample arrives, so that it decays even when
/// nothing is admitted.
pub const REFRESH: Duration = Duration::from_millis(100);

/// The admission margin. Owned by the batcher's actor.
#[derive(Debug)]
pub struct Margin {
    /// `(when answered, actual less forecast in microseconds)`, oldest first.
    samples: VecDeque<(Instant, i64)>,
    /// Reused for the quantile, so that recomputing allocates nothing.
    scratch: Vec<i64>,
    /// The margin last computed.
    current: Duration,
    /// When `current` was computed; `None`: samples arrived since.
    computed: Option<Instant>,
}

impl Default for Margin {
    fn default() -> Self {
        Margin::new()
    }
}

impl Margin {
    /// No margin yet.
    pub fn new() -> Margin {
        Margin {
            samples: VecDeque::with_capacity(MAX_SAMPLES),
            scratch: Vec::with_capacity(MAX_SAMPLES),
            current: Duration::ZERO,
            computed: None,
        }
    }

    /// Records that an item forecast to finish at `forecast` was answered at `actual`.
    pub fn observe(&mut self, forecast: Instant, actual: Instant) {
        let error = if actual >= forecast {
            micros(actual - forecast)
        } else {
            -micros(forecast - actual)
        };
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((actual, error));
        self.computed = None;
    }

    /// The margin to add to a forecast made at `now`: the [`QUANTILE`] of the errors
    /// answered within the last [`WINDOW`], at least zero.
    pub fn get(&mut self, now: Instant) -> Duration {
        let fresh = self
            .computed
            .is_some_and(|at| now.saturating_duration_since(at) < REFRESH);
        if !fresh {
            self.current = self.compute(now);
            self.computed = Some(now);
        }
        self.current
    }

    fn compute(&mut self, now: Instant) -> Duration {
        while self
            .samples
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= WINDOW)
        {
            self.samples.pop_front();
        }
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        self.scratch.clear();
        self.scratch.extend(self.samples.iter().map(|&(_, e)| e));
        // The sample at the quantile's rank (rounded up, so that a small window is
        // judged by its worst rather than ignoring it).
        let rank = ((self.scratch.len() as f64) * QUANTILE).ceil() as usize;
        let rank = rank.clamp(1, self.scratch.len()) - 1;
        let (_, &mut at_rank, _) = self.scratch.select_nth_unstable(rank);
        Duration::from_micros(u64::try_from(at_rank).unwrap_or(0))
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Records `count` items answered now, each `late` after its forecast.
    fn answer(margin: &mut Margin, count: usize, late: Duration) {
        let now = Instant::now();
        for _ in 0..count {
            margin.observe(now - late, now);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_sample_no_margin() {
        assert_eq!(Margin::new().get(Instant::now()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_margin_covers_a_high_quantile_of_the_recent_errors() {
        let mut margin = Margin::new();
        // 94 items on time, 6 late by 5 ms: the 95th percentile is a late one.
        answer(&mut margin, 94, Duration::ZERO);
        answer(&mut margin, 6, ms(5));
        assert_eq!(margin.get(Instant::now()), ms(5));
        // Another hundred on time: the late ones are now 3% and fall under the quantile.
        answer(&mut margin, 100, Duration::ZERO);
        assert_eq!(margin.get(Instant::now()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn items_answered_early_give_no_negative_margin() {
        let mut margin = Margin::new();
        let now = Instant::now();
        for _ in 0..10 {
            margin.observe(now + ms(8), now);
        }
        assert_eq!(margin.get(now), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_margin_decays_once_the_late_answers_leave_the_window() {
        let mut margin = Margin::new();
        answer(&mut margin, 50, ms(9));
        assert_eq!(margin.get(Instant::now()), ms(9));
        // Conditions improve: items now finish on time.
        tokio::time::advance(ms(1_000)).await;
        answer(&mut margin, 50, ms(1));
        assert_eq!(
            margin.get(Instant::now()),
            ms(9),
            "the slow second still counts"
        );
        tokio::time::advance(WINDOW - ms(500)).await;
        answer(&mut margin, 1, ms(1));
        assert_eq!(
            margin.get(Instant::now()),
            ms(1),
            "only the recent errors count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_admitted_the_margin_falls_to_zero() {
        let mut margin = Margin::new();
        answer(&mut margin, 20, ms(30));
        assert_eq!(margin.get(Instant::now()), ms(30));
        // The margin is cached between samples, but not for longer than REFRESH.
        tokio::time::advance(WINDOW).await;
        assert_eq!(margin.get(Instant::now()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_to_the_newest_samples() {
        let mut margin = Margin::new();
        answer(&mut margin, MAX_SAMPLES, ms(40));
        answer(&mut margin, MAX_SAMPLES, ms(2));
        assert_eq!(margin.samples.len(), MAX_SAMPLES);
        assert_eq!(margin.get(Instant::now()), ms(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cached_margin_is_recomputed_after_new_samples() {
        let mut margin = Margin::new();
        answer(&mut margin, 10, ms(1));
        assert_eq!(margin.get(Instant::now()), ms(1));
        answer(&mut margin, 1_000, ms(6));
        assert_eq!(
            margin.get(Instant::now()),
            ms(6),
            "within REFRESH, yet new samples"
        );
    }
}
