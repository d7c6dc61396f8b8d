//! [`BusyMeter`]: how busy the model thread has been over the last few seconds, and how long
//! items waited for it.
//!
//! The busy share is the autoscaler's signal. Requests in flight are not: a batching worker
//! folds more load into fuller batches, so its in-flight count stays low until it saturates
//! and then shoots up (a hockey stick), whereas the fraction of wall time the model thread
//! spends running batches grows in step with the offered load, up to 1 at saturation.
//!
//! Both figures are exponential averages in continuous time with time constant
//! [`TIME_CONSTANT`]: the busy share is the average of a 0/1 signal (1 while a batch runs),
//! folded in exactly at each batch's start and end, so it needs no sampling task and no
//! ring of buckets, and reading it at any moment accounts for the time since the last batch.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_protocol::Load;

/// The averaging time constant: long enough to smooth single batches, short enough that
/// the balancer's once-a-second health checks see a step in load within a few seconds.
pub const TIME_CONSTANT: Duration = Duration::from_secs(5);

/// The model thread's busy share and the queue delay, averaged over recent seconds.
///
/// Cheap to clone: the clones share one meter. The model thread calls
/// [`BusyMeter::batch_started`] and [`BusyMeter::batch_finished`] around each batch; `pong`
/// and `/metrics` read [`BusyMeter::load`].
#[derive(Clone, Debug)]
pub struct BusyMeter {
    shared: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    /// The busy share as of `at`.
    busy: f64,
    /// The queue delay in microseconds as of `at`.
    queue_us: f64,
    /// When the averages were last brought up to date.
    at: Instant,
    /// When the running batch started; `None` while the thread waits.
    running_since: Option<Instant>,
}

impl Default for BusyMeter {
    fn default() -> Self {
        BusyMeter::new(Instant::now())
    }
}

/// How much of an average survives `elapsed` of new signal.
fn keep(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / TIME_CONSTANT.as_secs_f64()).exp()
}

impl State {
    /// The averages at `now`, given whether the thread has been running since `at`.
    fn at(&self, now: Instant) -> (f64, f64) {
        let k = keep(now.saturating_duration_since(self.at));
        let signal = if self.running_since.is_some() {
            1.0
        } else {
            0.0
        };
        // The queue delay fades while no batch reports one: an idle worker has no queue.
        (signal + (self.busy - signal) * k, self.queue_us * k)
    }

    fn advance(&mut self, now: Instant) {
        if now > self.at {
            (self.busy, self.queue_us) = self.at(now);
            self.at = now;
        }
    }
}

impl BusyMeter {
    /// A meter that has seen nothing yet (idle since `now`).
    pub fn new(now: Instant) -> Self {
        BusyMeter {
            shared: Arc::new(Mutex::new(State {
                busy: 0.0,
                queue_us: 0.0,
                at: now,
                running_since: None,
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two numbers updated together; a panic elsewhere cannot leave it torn.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch starts running at `now`; `queue_us` is the mean time its items waited.
    pub fn batch_started(&self, now: Instant, queue_us: u64) {
        let mut s = self.state();
        s.advance(now);
        s.running_since = Some(now);
        // Each batch pulls the queue delay a fifth of the way to its own: a few batches
        // move it, one outlier does not.
        s.queue_us += (queue_us as f64 - s.queue_us) * 0.2;
    }

    /// The running batch finished at `now`.
    pub fn batch_finished(&self, now: Instant) {
        let mut s = self.state();
        s.advance(now);
        s.running_since = None;
    }

    /// The averages as of `now`.
    pub fn load_at(&self, now: Instant) -> Load {
        let (busy, queue_us) = self.state().at(now);
        Load {
            busy: busy.clamp(0.0, 1.0) as f32,
            queue_us: queue_us.max(0.0).round() as u64,
        }
    }

    /// The averages now: what `pong` reports.
    pub fn load(&self) -> Load {
        self.load_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn an_idle_meter_reads_zero() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        assert_eq!(m.load_at(t0 + secs(30.0)), Load::default());
    }

    #[test]
    fn the_share_tracks_the_duty_cycle() {
        // 40 ms of every 100 ms busy, for a minute (twelve time constants).
        for duty in [0.1, 0.4, 0.9] {
            let t0 = Instant::now();
            let m = BusyMeter::new(t0);
            for i in 0..600 {
                let start = t0 + secs(i as f64 * 0.1);
                m.batch_started(start, 500);
                m.batch_finished(start + secs(0.1 * duty));
            }
            let busy = f64::from(m.load_at(t0 + secs(60.0)).busy);
            assert!((busy - duty).abs() < 0.02, "duty {duty}: read {busy}");
        }
    }

    #[test]
    fn a_running_batch_counts_before_it_ends() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.batch_started(t0, 0);
        // One time constant of solid work: 1 - 1/e.
        let busy = f64::from(m.load_at(t0 + TIME_CONSTANT).busy);
        assert!((busy - (1.0 - (-1.0f64).exp())).abs() < 1e-3, "{busy}");
        // It keeps rising while the batch runs, never past 1.
        assert!(m.load_at(t0 + secs(60.0)).busy > 0.999);
        assert!(m.load_at(t0 + secs(600.0)).busy <= 1.0);
    }

    #[test]
    fn the_share_fades_when_work_stops() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.batch_started(t0, 2_000);
        m.batch_finished(t0 + secs(60.0));
        let busy = m.load_at(t0 + secs(60.0)).busy;
        let later = m.load_at(t0 + secs(60.0) + TIME_CONSTANT);
        assert!((f64::from(later.busy) - f64::from(busy) / std::f64::consts::E).abs() < 1e-3);
        assert!(later.queue_us < 2_000 / 2, "the queue delay fades too");
    }

    #[test]
    fn queue_delay_follows_the_batches() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        for i in 0..50 {
            let start = t0 + secs(i as f64 * 0.01);
            m.batch_started(start, 3_000);
            m.batch_finished(start + secs(0.005));
        }
        let q = m.load_at(t0 + secs(0.5)).queue_us;
        assert!((2_800..=3_000).contains(&q), "{q}");
    }

    #[test]
    fn clones_share_the_meter() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        let reader = m.clone();
        m.batch_started(t0, 0);
        assert!(reader.load_at(t0 + secs(1.0)).busy > 0.1);
    }
}
