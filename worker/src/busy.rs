//! [`BusyMeter`]: how much of the worker's capacity the recent load used, how busy the
//! model thread has been, and how long items waited for it.
//!
//! The *load share* is the autoscaler's signal (`busy` in `pong`). Requests in flight are
//! not: a batching worker folds more load into fuller batches, so its in-flight count stays
//! low until it saturates and then shoots up (a hockey stick). Nor is the plain busy share
//! (the fraction of wall time the model thread runs batches) when a small batch costs about
//! what a full one does: the thread is then busy with small batches at a tenth of capacity.
//! The load share weighs each batch's run time by [`BatchCost::weight`] (the share of a full
//! batch's work it did over the share of a full batch's time it took), which makes it the
//! arrival rate against the worker's full-batch capacity: linear in the load up to
//! saturation, where batches are full and it equals the busy share (see [`crate::cost`]).
//! The cost shape starts from the warm-up's timings and is relearned from every batch the
//! model thread runs ([`CostModel`]), so small batches that run slower at night than the
//! warm-up's are weighed by what they cost now, against the last full batches' time.
//!
//! Each batch is timed by the cost shape's [`BatchClock`]: with one intra-op thread on the
//! CPU, the model thread's CPU time, so that a batch slowed by neighbours taking the core
//! (other workers on the same machine) weighs what its own work weighed. The load share
//! then integrates `weight × cpu / wall` over the batch's wall span: the share of a core's
//! full-batch capacity the load needed, whoever else ran. While a batch runs its CPU time is
//! not known yet, so it counts as all work until it ends. The plain busy share stays in
//! wall time (how long the model thread was inside a batch).
//!
//! With `--instances N` ([`BusyMeter::set_instances`]) N model threads run batches side by
//! side, each with its own session: every figure is then the mean over the N threads, so that
//! 1.0 still means saturated (all N busy, or the load needing all N at full batches), and the
//! capacity is N threads' worth.
//!
//! All figures are exponential averages in continuous time with time constant
//! [`TIME_CONSTANT`]: the busy share is the average of a 0/1 signal (1 while a batch runs),
//! the load share of a signal that is the running batch's weight while it runs, both folded
//! in exactly at each batch's start and end, so they need no sampling task and no ring of
//! buckets, and reading them at any moment accounts for the time since the last batch.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_protocol::Load;

use crate::clock::{run_time, BatchClock};
use crate::cost::{BatchCost, CostModel};

/// The averaging time constant: long enough to smooth single batches (hundreds of them
/// at any load worth autoscaling) and a second's Poisson noise, short enough that the
/// balancer's once-a-second health checks see a step in load within a few seconds. The
/// autoscaler does its own averaging (a stable window, the largest demand over the
/// scale-down delay), so each second of average here only adds lag: at 5 s, a falling
/// load reached the policy 5 s late on top of its delay (the autoscaling benchmark's
/// evening), at 2 s, 2 s late.
pub const TIME_CONSTANT: Duration = Duration::from_secs(2);

/// How far each finished batch pulls the full-batch time estimate towards its own.
const FULL_BATCH_GAIN: f64 = 0.1;

/// The model thread's load share, busy share and queue delay, averaged over recent seconds.
///
/// Cheap to clone: the clones share one meter. The model thread calls
/// [`BusyMeter::batch_started`] and [`BusyMeter::batch_finished`] around each batch; `pong`
/// reads [`BusyMeter::load`] and `/metrics` [`BusyMeter::reading`].
#[derive(Clone, Debug)]
pub struct BusyMeter {
    shared: Arc<Mutex<State>>,
}

/// What the meter reads at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reading {
    /// The share of the worker's full-batch capacity the recent load used, 0 to 1 (timed
    /// by the cost's clock: with a thread's CPU time, against a whole core).
    pub load_share: f64,
    /// The fraction of recent wall time the model thread ran batches, 0 to 1.
    pub busy: f64,
    /// The recent queue delay, microseconds.
    pub queue_us: f64,
    /// Items per second the model threads (all instances) can run in full batches, from the
    /// recent batches' run times (each scaled to a full batch by the cost shape, timed by its clock: per
    /// CPU-second of the model thread with a thread's CPU time); `None` before any batch.
    pub capacity: Option<f64>,
}

#[derive(Debug)]
struct State {
    /// The load share as of `at`.
    share: f64,
    /// The busy share as of `at`.
    busy: f64,
    /// The queue delay in microseconds as of `at`.
    queue_us: f64,
    /// When the averages were last brought up to date.
    at: Instant,
    /// The batch each model thread runs (one slot per instance); `None` while it waits.
    running: Vec<Option<Running>>,
    /// How a batch's cost grows with its size: `model`'s latest shape.
    cost: BatchCost,
    /// The run times of the batches run, by size, from which `cost` is relearned.
    model: CostModel,
    /// A full batch's recent run time in seconds (a moving average over batches).
    full_batch_s: Option<f64>,
}

/// The batch the model thread is running.
#[derive(Clone, Copy, Debug)]
struct Running {
    /// When it started.
    started: Instant,
    /// The thread's CPU clock then (`None` when timed by the wall).
    cpu: Option<Duration>,
    /// Its items.
    items: usize,
    /// The share of its wall time that was its own work: 1 while it runs, its CPU time over
    /// its wall time once it ended.
    own: f64,
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
    /// The averages (load share, busy share, queue delay) at `now`, given what has run
    /// since `at`.
    fn at(&self, now: Instant) -> (f64, f64, f64) {
        let k = keep(now.saturating_duration_since(self.at));
        // The mean over the model threads, so that all of them busy reads 1.
        let slots = self.running.len().max(1) as f64;
        let (weight, busy) = self.running.iter().flatten().fold((0.0, 0.0), |(w, b), r| {
            (
                w + self.cost.weight(r.items) * r.own / slots,
                b + 1.0 / slots,
            )
        });
        // The queue delay fades while no batch reports one: an idle worker has no queue.
        (
            weight + (self.share - weight) * k,
            busy + (self.busy - busy) * k,
            self.queue_us * k,
        )
    }

    fn advance(&mut self, now: Instant) {
        if now > self.at {
            (self.share, self.busy, self.queue_us) = self.at(now);
            self.at = now;
        }
    }
}

impl BusyMeter {
    /// A meter that has seen nothing yet (idle since `now`), weighing every batch fully
    /// ([`BatchCost::linear`]) until [`BusyMeter::set_cost`].
    pub fn new(now: Instant) -> Self {
        BusyMeter {
            shared: Arc::new(Mutex::new(State {
                share: 0.0,
                busy: 0.0,
                queue_us: 0.0,
                at: now,
                running: vec![None],
                cost: BatchCost::linear(1),
                model: CostModel::new(BatchCost::linear(1)),
                full_batch_s: None,
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few numbers updated together; a panic elsewhere cannot leave it torn.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets how many model threads run batches side by side (at least 1; 1 until called).
    /// Call it before the first batch: a batch running in a slot that goes away is forgotten.
    pub fn set_instances(&self, instances: usize) {
        self.state().running.resize(instances.max(1), None);
    }

    /// Sets how a batch's cost grows with its size (measured after warm-up); batches that
    /// start from now on are weighed by it, and the batches run from now on relearn it
    /// (see [`CostModel`]), starting from this one.
    pub fn set_cost(&self, cost: BatchCost) {
        let mut s = self.state();
        s.model = CostModel::new(cost);
        s.cost = s.model.cost();
    }

    /// The batch-time model in use: what a batch of `n` items is expected to take, learned
    /// from the batches run (a copy; it does not follow later batches).
    pub fn cost_model(&self) -> CostModel {
        self.state().model.clone()
    }

    /// The cost shape in use.
    pub fn cost(&self) -> BatchCost {
        self.state().cost
    }

    /// The clock batches are timed by: the cost shape's (see [`BusyMeter::set_cost`]).
    pub fn clock(&self) -> BatchClock {
        self.state().cost.clock()
    }

    /// A batch of `items` starts running at `now` on model thread `slot` (0 to the
    /// instances less one); `queue_us` is the mean time its items waited. Call it, and
    /// [`BusyMeter::batch_finished`], on the thread that runs the batch: with
    /// [`BatchClock::ThreadCpu`] they read that thread's CPU clock.
    pub fn batch_started(&self, slot: usize, now: Instant, items: usize, queue_us: u64) {
        let cpu = self.clock().cpu_now();
        self.started_at(slot, now, cpu, items, queue_us);
    }

    /// [`BusyMeter::batch_started`] with the thread's CPU clock read as `cpu`.
    fn started_at(
        &self,
        slot: usize,
        now: Instant,
        cpu: Option<Duration>,
        items: usize,
        queue_us: u64,
    ) {
        let mut s = self.state();
        s.advance(now);
        let Some(running) = s.running.get_mut(slot) else {
            return;
        };
        *running = Some(Running {
            started: now,
            cpu,
            items,
            own: 1.0,
        });
        // Each batch pulls the queue delay a fifth of the way to its own: a few batches
        // move it, one outlier does not.
        s.queue_us += (queue_us as f64 - s.queue_us) * 0.2;
    }

    /// The batch running on model thread `slot` finished at `now`.
    pub fn batch_finished(&self, slot: usize, now: Instant) {
        let cpu = self.clock().cpu_now();
        self.finished_at(slot, now, cpu);
    }

    /// [`BusyMeter::batch_finished`] with the thread's CPU clock read as `cpu`.
    fn finished_at(&self, slot: usize, now: Instant, cpu: Option<Duration>) {
        let mut s = self.state();
        let Some(running) = s.running.get(slot).copied().flatten() else {
            s.advance(now);
            return;
        };
        let wall = now.saturating_duration_since(running.started);
        let run = run_time(wall, running.cpu, cpu);
        // Its span was folded in as all work (its CPU time was not known); now that its own
        // share is, take back the rest: a signal `d` held over [started, now] adds
        // `d × (1 - keep(now - started))` to the average at `now`. (Other model threads'
        // batches may have advanced the averages in between, so the span is corrected as a
        // whole rather than folded in at the end.)
        s.advance(now);
        if !wall.is_zero() {
            let own = run.as_secs_f64() / wall.as_secs_f64();
            let slots = s.running.len().max(1) as f64;
            let d = s.cost.weight(running.items) * (own - 1.0) / slots;
            s.share += d * (1.0 - keep(wall));
        }
        s.running[slot] = None;
        s.model.observe(running.items, run);
        s.cost = s.model.cost();
        let full = run.as_secs_f64() / s.cost.cost(running.items);
        s.full_batch_s = Some(match s.full_batch_s {
            Some(old) => old + (full - old) * FULL_BATCH_GAIN,
            None => full,
        });
    }

    /// Everything the meter knows as of `now`.
    pub fn reading_at(&self, now: Instant) -> Reading {
        let s = self.state();
        let (share, busy, queue_us) = s.at(now);
        Reading {
            load_share: share.clamp(0.0, 1.0),
            busy: busy.clamp(0.0, 1.0),
            queue_us: queue_us.max(0.0),
            capacity: s
                .full_batch_s
                .filter(|&t| t > 0.0)
                .map(|t| (s.cost.max_batch() * s.running.len().max(1)) as f64 / t),
        }
    }

    /// Everything the meter knows now: what `/metrics` shows.
    pub fn reading(&self) -> Reading {
        self.reading_at(Instant::now())
    }

    /// The load report of `pong` as of `now`: `busy` is the load share. The batch times are
    /// the batcher's to add (its profile, not this meter's shape, is what it predicts with).
    pub fn load_at(&self, now: Instant) -> Load {
        let r = self.reading_at(now);
        Load {
            busy: r.load_share as f32,
            queue_us: r.queue_us.round() as u64,
            batches: None,
        }
    }

    /// The load report now: what `pong` reports.
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
                m.batch_started(0, start, 1, 500);
                m.batch_finished(0, start + secs(0.1 * duty));
            }
            let busy = f64::from(m.load_at(t0 + secs(60.0)).busy);
            assert!((busy - duty).abs() < 0.02, "duty {duty}: read {busy}");
        }
    }

    #[test]
    fn with_two_instances_both_busy_reads_saturated_and_one_reads_half() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.set_instances(2);
        // One thread busy for a minute: half the worker.
        m.batch_started(0, t0, 1, 0);
        m.batch_finished(0, t0 + secs(60.0));
        let r = m.reading_at(t0 + secs(60.0));
        assert!((r.busy - 0.5).abs() < 0.01, "{r:?}");
        assert!((r.load_share - 0.5).abs() < 0.01, "{r:?}");
        // Both, overlapping but not in step: all of it.
        for i in 0..600 {
            let start = t0 + secs(60.0 + i as f64 * 0.1);
            if i > 0 {
                m.batch_finished(0, start);
            }
            m.batch_started(0, start, 1, 0);
            if i > 0 {
                m.batch_finished(1, start + secs(0.05));
            }
            m.batch_started(1, start + secs(0.05), 1, 0);
        }
        let r = m.reading_at(t0 + secs(120.0));
        assert!(r.busy > 0.99 && r.busy <= 1.0, "{r:?}");
        assert!(r.load_share > 0.99, "{r:?}");
        // Capacity counts both threads: a full batch (of 1) takes 0.1 s on each (the first
        // thread's minute-long batch fades from the average over the 1,198 since).
        let capacity = r.capacity.unwrap();
        assert!((capacity - 20.0).abs() < 0.5, "{capacity}");
    }

    #[test]
    fn a_batch_crowded_while_another_thread_ran_weighs_its_own_work() {
        // Two instances timed by CPU: thread 1 runs a batch whose CPU time is half its wall
        // time while thread 0 starts and ends batches inside its span; the share reads the
        // half, as one thread's batch alone does.
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.set_instances(2);
        m.set_cost(BatchCost::linear(1).timed_by(BatchClock::ThreadCpu));
        let cpu = |s: f64| Some(secs(s));
        m.started_at(1, t0, cpu(0.0), 1, 0);
        for i in 0..10 {
            let at = t0 + secs(i as f64 * 6.0);
            m.started_at(0, at, cpu(0.0), 1, 0);
            m.finished_at(0, at + secs(1.0), cpu(0.0));
        }
        m.finished_at(1, t0 + secs(60.0), cpu(30.0));
        let share = m.reading_at(t0 + secs(60.0)).load_share;
        assert!((share - 0.25).abs() < 0.01, "{share}");
    }

    #[test]
    fn a_running_batch_counts_before_it_ends() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.batch_started(0, t0, 1, 0);
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
        m.batch_started(0, t0, 1, 2_000);
        m.batch_finished(0, t0 + secs(60.0));
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
            m.batch_started(0, start, 1, 3_000);
            m.batch_finished(0, start + secs(0.005));
        }
        let q = m.load_at(t0 + secs(0.5)).queue_us;
        assert!((2_800..=3_000).contains(&q), "{q}");
    }

    /// Seconds a batch of `n` items takes on a weight-bound model like the demo's: 6 ms to
    /// stream the weights, 0.75 ms per item (a full batch of 32: 30 ms, 1,067 items/s).
    fn weight_bound(n: usize) -> f64 {
        0.006 + 0.000_75 * n as f64
    }

    const MAX_BATCH: usize = 32;

    /// A batching worker on synthetic time: Poisson arrivals at `rate` items/s for `span`
    /// seconds; a batch starts once the model is free and either `MAX_BATCH` items are
    /// queued or the oldest has waited 5 ms (the batcher's rule); a batch of `n` runs
    /// `run(n)` seconds. Returns the meter's reading at the end.
    fn simulate(cost: BatchCost, run: impl Fn(usize) -> f64, rate: f64, span: f64) -> Reading {
        simulate_phases(
            cost,
            run,
            &[Phase {
                rate,
                span,
                crowd: 1.0,
            }],
        )
    }

    /// A stretch of [`simulate_phases`]' load.
    struct Phase {
        /// Arrivals, items/s.
        rate: f64,
        /// Seconds.
        span: f64,
        /// Each batch's wall time over its own work: 2 when a neighbour holds the core half
        /// the time (the work, and so the thread's CPU time, stays `run(n)`).
        crowd: f64,
    }

    /// [`simulate`] through `phases` one after the other; the model thread's CPU clock
    /// advances by `run(n)` per batch, its wall time by `run(n) × crowd`.
    fn simulate_phases(cost: BatchCost, run: impl Fn(usize) -> f64, phases: &[Phase]) -> Reading {
        let max_delay = 0.005;
        // xorshift64*: a fixed seed, so that every run sees the same arrivals.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut uniform = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        };
        // Arrivals, each with the crowding of its phase.
        let mut arrivals = Vec::new();
        let mut from = 0.0;
        for phase in phases {
            let mut t = from;
            loop {
                t += -(1.0 - uniform()).ln() / phase.rate;
                if t >= from + phase.span {
                    break;
                }
                arrivals.push((t, phase.crowd));
            }
            from += phase.span;
        }
        let span = from;
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.set_cost(cost);
        let timed_by_cpu = cost.clock() == BatchClock::ThreadCpu;
        let (mut free_at, mut next, mut cpu) = (0.0f64, 0usize, Duration::ZERO);
        while next < arrivals.len() {
            let full_at = arrivals.get(next + MAX_BATCH - 1).map(|a| a.0);
            let due = (arrivals[next].0 + max_delay).min(full_at.unwrap_or(f64::INFINITY));
            let start = free_at.max(due);
            let n = arrivals[next..]
                .iter()
                .take(MAX_BATCH)
                .take_while(|a| a.0 <= start)
                .count();
            let work = run(n);
            let end = start + work * arrivals[next].1;
            if end > span {
                break;
            }
            let clock = |cpu: Duration| timed_by_cpu.then_some(cpu);
            m.started_at(0, t0 + secs(start), clock(cpu), n, 0);
            cpu += secs(work);
            m.finished_at(0, t0 + secs(end), clock(cpu));
            (free_at, next) = (end, next + n);
        }
        m.reading_at(t0 + secs(span))
    }

    fn measured(run: impl Fn(usize) -> f64) -> BatchCost {
        BatchCost::new(MAX_BATCH, run(1) / run(MAX_BATCH))
    }

    #[test]
    fn the_load_share_is_linear_in_the_load() {
        let capacity = MAX_BATCH as f64 / weight_bound(MAX_BATCH);
        let cost = measured(weight_bound);
        for share in [0.1, 0.25, 0.5, 0.75] {
            let r = simulate(cost, weight_bound, share * capacity, 60.0);
            assert!(
                (r.load_share - share).abs() < 0.04,
                "at {share} of capacity the load share read {r:?}"
            );
            let c = r.capacity.unwrap();
            assert!((c - capacity).abs() < 1.0, "capacity {c}, not {capacity}");
        }
        // The plain busy share is what it replaces: far above the load at a quarter of it.
        let r = simulate(cost, weight_bound, 0.25 * capacity, 60.0);
        assert!(r.busy > 0.45, "{r:?}");
        // Past saturation batches are full: both read 1.
        let r = simulate(cost, weight_bound, 1.3 * capacity, 60.0);
        assert!(r.load_share > 0.98 && r.busy > 0.98, "{r:?}");
    }

    #[test]
    fn small_batches_slowed_by_idle_gaps_read_the_load_not_the_slowness() {
        // At a tenth of capacity every batch is small and runs after an idle gap, half
        // again slower than the warm-up's back-to-back pairs. The full batch (what
        // capacity is) is not slower. With the warm-up's full-batch time as the anchor the
        // relearned shape reads the load; the shape alone over-read it by the slowdown.
        let capacity = MAX_BATCH as f64 / weight_bound(MAX_BATCH);
        let cold = |n: usize| weight_bound(n) * if n < 8 { 1.5 } else { 1.0 };
        let pair = (
            Duration::from_secs_f64(weight_bound(1)),
            Duration::from_secs_f64(weight_bound(MAX_BATCH)),
        );
        let anchored = BatchCost::from_pairs(MAX_BATCH, &[pair; 3]);
        let r = simulate(anchored, cold, 0.1 * capacity, 60.0);
        assert!((r.load_share - 0.1).abs() < 0.03, "{r:?}");
        // The shape without the anchor, learning from the night's batches alone, reads the
        // slowdown as load.
        let r = simulate(measured(weight_bound), cold, 0.1 * capacity, 60.0);
        assert!(r.load_share > 0.13, "{r:?}");
    }

    #[test]
    fn a_slower_machine_has_less_capacity() {
        // Other processes slow every batch by half again: the same load is a larger share
        // of what this worker can now do.
        let capacity = MAX_BATCH as f64 / weight_bound(MAX_BATCH);
        let cost = measured(weight_bound);
        let slow = |n| weight_bound(n) * 1.5;
        let r = simulate(cost, slow, 0.4 * capacity, 60.0);
        assert!((r.load_share - 0.6).abs() < 0.04, "{r:?}");
        let c = r.capacity.unwrap();
        assert!((c - capacity / 1.5).abs() < 1.0, "{c}");
    }

    #[test]
    fn items_that_cost_the_same_at_any_batch_size_read_the_busy_share() {
        let per_item = |n: usize| 0.001 * n as f64;
        for share in [0.25, 0.5, 0.75] {
            let r = simulate(measured(per_item), per_item, share * 1_000.0, 60.0);
            assert!((r.load_share - share).abs() < 0.04, "{share}: {r:?}");
            assert!((r.load_share - r.busy).abs() < 1e-9, "{r:?}");
        }
    }

    #[test]
    fn a_running_batch_is_weighed_by_its_fill() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.set_cost(BatchCost::new(32, 1.0));
        m.batch_started(0, t0, 8, 0);
        let r = m.reading_at(t0 + secs(60.0));
        assert!((r.load_share - 0.25).abs() < 1e-3, "{r:?}");
        assert!(r.busy > 0.999);
        assert_eq!(m.load_at(t0 + secs(60.0)).busy, r.load_share as f32);
        assert_eq!(r.capacity, None, "no batch has finished yet");
    }

    #[test]
    fn clones_share_the_meter() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        let reader = m.clone();
        m.batch_started(0, t0, 1, 0);
        assert!(reader.load_at(t0 + secs(1.0)).busy > 0.1);
    }

    /// The autoscaling benchmark's evening: a minute of large batches at the peak, each
    /// twice as long as alone because three workers share two cores, then the load falls
    /// to a fifth of capacity and the machine quietens.
    fn after_a_crowded_peak(clock: BatchClock) -> Reading {
        let capacity = MAX_BATCH as f64 / weight_bound(MAX_BATCH);
        let pair = (
            Duration::from_secs_f64(weight_bound(1)),
            Duration::from_secs_f64(weight_bound(MAX_BATCH)),
        );
        let cost = BatchCost::from_pairs(MAX_BATCH, &[pair; 3]).timed_by(clock);
        simulate_phases(
            cost,
            weight_bound,
            &[
                // Nearly all the crowded capacity: large batches, and no backlog left
                // to drain (and time afresh) after the peak.
                Phase {
                    rate: 0.95 * capacity / 2.0,
                    span: 60.0,
                    crowd: 2.0,
                },
                Phase {
                    rate: 0.2 * capacity,
                    span: 30.0,
                    crowd: 1.0,
                },
            ],
        )
    }

    #[test]
    fn timed_by_the_threads_cpu_the_evening_reads_the_load_not_the_peaks_crowd() {
        let capacity = MAX_BATCH as f64 / weight_bound(MAX_BATCH);
        let r = after_a_crowded_peak(BatchClock::ThreadCpu);
        assert!((r.load_share - 0.2).abs() < 0.03, "{r:?}");
        let c = r.capacity.unwrap();
        assert!((c / capacity - 1.0).abs() < 0.05, "{c} against {capacity}");
        // By the wall clock the full batches kept from the crowded peak are the anchor, and
        // the evening reads about twice its load: what the benchmark saw.
        let r = after_a_crowded_peak(BatchClock::Wall);
        assert!(r.load_share > 0.3, "{r:?}");
    }

    #[test]
    fn a_crowded_batch_weighs_its_own_work() {
        // Saturated, but every batch spends half its wall time waiting for the core: by
        // the thread's CPU time the worker's load is half a core, by the wall all of it.
        let capacity = MAX_BATCH as f64 / weight_bound(MAX_BATCH);
        let phase = |crowd| Phase {
            rate: 2.0 * capacity,
            span: 60.0,
            crowd,
        };
        let cost = measured(weight_bound).timed_by(BatchClock::ThreadCpu);
        let r = simulate_phases(cost, weight_bound, &[phase(2.0)]);
        assert!((r.load_share - 0.5).abs() < 0.03, "{r:?}");
        assert!(r.busy > 0.98, "the plain busy share is wall time: {r:?}");
        let r = simulate_phases(cost.timed_by(BatchClock::Wall), weight_bound, &[phase(2.0)]);
        assert!(r.load_share > 0.98, "{r:?}");
    }

    #[test]
    fn a_running_batch_counts_as_work_until_its_cpu_time_is_known() {
        let t0 = Instant::now();
        let m = BusyMeter::new(t0);
        m.set_cost(BatchCost::linear(1).timed_by(BatchClock::ThreadCpu));
        m.started_at(0, t0, Some(secs(5.0)), 1, 0);
        let during = m.reading_at(t0 + TIME_CONSTANT).load_share;
        assert!((during - (1.0 - (-1.0f64).exp())).abs() < 1e-3, "{during}");
        // It ran a quarter of its span: the span counts a quarter.
        m.finished_at(0, t0 + TIME_CONSTANT, Some(secs(5.0) + TIME_CONSTANT / 4));
        let after = m.reading_at(t0 + TIME_CONSTANT).load_share;
        assert!(
            (after - 0.25 * (1.0 - (-1.0f64).exp())).abs() < 1e-3,
            "{after}"
        );
        // A finish with no batch running changes nothing.
        m.finished_at(0, t0 + TIME_CONSTANT, Some(secs(9.0)));
        assert_eq!(m.reading_at(t0 + TIME_CONSTANT).load_share, after);
    }
}
