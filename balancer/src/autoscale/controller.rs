//! The control loop: once a second (sooner on a surge), sample the pool, time start-ups,
//! learn the day, decide, act, publish.

use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::actuator::Actuator;
use super::forecast::{DayProfile, Predictive};
use super::policy::{
    decide, surges, Action, Decision, History, Mode, Outlook, PolicyConfig, Sample, Signal,
};
use super::pool::Pool;
use super::rates::{Rate, Rates};
use super::startup::StartupClock;
use crate::target::TargetState;

/// What `GET /scaling` answers: the signal, the policy's wish and whether it is acted on.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingStatus {
    /// The decision with its figures and reason.
    #[serde(flatten)]
    pub decision: Decision,
    /// Outstanding plus queued requests right now (not averaged): the total load a KEDA
    /// metrics-api scaler divides by its `targetValue`.
    pub load_now: f64,
    /// `--scaling-signal`: what sizes the pool (`signal` says what set the latest demand).
    pub scaling_signal: Signal,
    /// The in-flight guard's load per worker.
    pub target_load: f64,
    /// The busy share per worker the pool is sized for.
    pub target_utilization: f64,
    /// The stable window, in seconds.
    pub stable_window_s: f64,
    /// The panic window, in seconds.
    pub panic_window_s: f64,
    /// `--scale-in-startups`: the scale-down delay in start-up times (the delay in use is
    /// `scale_in_delay_s`).
    pub scale_in_startups: f64,
    /// Whether the start-up time is measured from this pool's workers (else assumed from
    /// `--worker-startup`).
    pub startup_measured: bool,
    /// `--predictive`.
    pub predictive: Predictive,
    /// `--min-workers`.
    pub min_workers: usize,
    /// `--max-workers`.
    pub max_workers: usize,
    /// Whether this balancer acts on the decision (`--autoscale`), and how.
    pub actuator: &'static str,
    /// The last action taken, and when.
    pub last_action: Option<LastAction>,
    /// When this status was computed.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

/// An action the actuator took.
#[derive(Clone, Debug, Serialize)]
pub struct LastAction {
    /// What.
    pub action: Action,
    /// When.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

impl ScalingStatus {
    /// The autoscaling gauges in Prometheus text: what an HPA on Prometheus scales on.
    pub(crate) fn prometheus(&self) -> String {
        let d = &self.decision;
        let mut out = String::with_capacity(2048);
        for (name, help, value) in [
            (
                "tidepool_busy_total",
                "The ready workers' busy shares summed (fraction of wall time their model threads ran batches), now.",
                d.busy_total.unwrap_or(0.0),
            ),
            (
                "tidepool_demand_stable_workers",
                "Workers the load needs, averaged over the stable window.",
                d.stable_demand,
            ),
            (
                "tidepool_demand_panic_workers",
                "Workers the load needs, averaged over the panic window.",
                d.panic_demand,
            ),
            (
                "tidepool_demand_headroom_workers",
                "Workers the load is expected to need one start-up time from now.",
                d.headroom_demand,
            ),
            (
                "tidepool_demand_forecast_workers",
                "Workers the remembered day expects within the next start-up time (--predictive; 0 without a forecast).",
                d.forecast_demand.unwrap_or(0.0),
            ),
            (
                "tidepool_demand_surge_workers",
                "Workers the arrival rate needed within the panic window while the queue grew (0 when it did not).",
                d.surge_demand.unwrap_or(0.0),
            ),
            (
                "tidepool_arrived_per_second",
                "Requests that entered the balancer per second, over the last second.",
                d.arrived_per_s,
            ),
            (
                "tidepool_answered_per_second",
                "Requests the workers answered per second, over the last second.",
                d.answered_per_s,
            ),
            (
                "tidepool_worker_capacity_per_second",
                "Requests per second one fully busy worker answers, as the autoscaler measured it (0 while unknown).",
                d.capacity_per_worker.unwrap_or(0.0),
            ),
            (
                "tidepool_scale_in_delay_seconds",
                "The scale-down delay in use: --scale-in-startups start-up times, at most --scale-in-delay.",
                d.scale_in_delay_s,
            ),
            (
                "tidepool_scaling_panic",
                "1 while the autoscaler is in panic mode (a surge), 0 in stable mode.",
                f64::from(u8::from(d.mode == Mode::Panic)),
            ),
            (
                "tidepool_worker_startup_seconds",
                "The workers' start-up time the policy plans with (measured, or --worker-startup).",
                d.startup_s,
            ),
            (
                "tidepool_target_utilization",
                "The busy share per worker the pool is sized for.",
                self.target_utilization,
            ),
            (
                "tidepool_load_per_worker",
                "Outstanding plus queued requests per healthy worker, averaged over the scaling window.",
                d.load_per_worker,
            ),
            (
                "tidepool_load_total",
                "Outstanding plus queued requests, averaged over the scaling window.",
                d.total_load,
            ),
            ("tidepool_target_load", "The in-flight guard's load per worker.", self.target_load),
            ("tidepool_desired_workers", "Workers the scaling policy asks for.", d.desired as f64),
            ("tidepool_ready_workers", "Workers healthy and serving.", d.ready as f64),
            ("tidepool_coming_workers", "Workers started and not ready yet.", d.coming as f64),
            ("tidepool_leaving_workers", "Workers draining after a scale-in.", d.leaving as f64),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// Where the loop publishes its latest status, read by the admin API and metrics.
pub(crate) type StatusSlot = Arc<Mutex<Option<ScalingStatus>>>;

/// Reads the pool as the policy sees it; `rates` turns the counters into rates.
pub(crate) fn sample(
    pool: &dyn Pool,
    actuator: Option<&Actuator>,
    rates: &mut Rates,
    at: Instant,
) -> Sample {
    let targets = pool.targets();
    let queued = pool.queue_len();
    let Rate { arrived, answered } = rates.observe(&targets, queued, at);
    let serving = targets.iter().filter(|t| t.state != TargetState::Draining);
    let (mut ready, mut initial, mut outstanding, mut max_worker_load) = (0, 0, 0usize, 0usize);
    let (mut busy, mut reporting) = (0.0, 0usize);
    for t in serving {
        match t.state {
            TargetState::Healthy => {
                ready += 1;
                if let Some(b) = t.busy {
                    busy += b.clamp(0.0, 1.0);
                    reporting += 1;
                }
            }
            TargetState::Initial => initial += 1,
            _ => {}
        }
        outstanding += t.outstanding;
        max_worker_load = max_worker_load.max(t.outstanding);
    }
    let coming = match actuator {
        // The actuator knows its own starting workers, registered or not yet.
        Some(a) => a.coming(ready, initial),
        None => initial,
    };
    Sample {
        at,
        ready,
        coming,
        leaving: actuator.map_or(0, Actuator::leaving),
        load: (outstanding + queued) as f64,
        max_worker_load: max_worker_load as f64,
        // A ready worker that has not reported yet (its first check is on its way) is
        // assumed as busy as the others.
        busy: (reporting > 0).then(|| busy * ready as f64 / reporting as f64),
        arrived,
        answered,
    }
}

/// Time between the samples the policy decides on.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How often the loop reads the arrival rate between samples: a surge (requests arriving
/// faster than answered, at the panic threshold over the workers there are) is decided on
/// at once, within 100 to 200 ms of a step, not at the next sample (the in-flight policy,
/// which decides at samples only, asks anywhere from 0 to 1 s after a step, by the phase of
/// its clock). A tenth of a second of a few thousand requests a second still reads a 5x step
/// clearly; the threshold (arrivals past the pool's whole capacity) is many standard
/// deviations above a calm pool's arrivals in a tenth of a second, and a calm pool costs
/// nine more readings of the targets' counters a second, nothing else. The actuator keeps
/// the pool, and start-ups are timed, at the same pace.
pub(crate) const SURGE_CHECK: Duration = Duration::from_millis(100);

/// What the loop needs besides the policy: how `--predictive` and `--worker-startup` are set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Foresight {
    /// `--predictive`.
    pub(crate) predictive: Predictive,
    /// `--predictive-period`.
    pub(crate) period: Duration,
    /// `--worker-startup`: the start-up time until one is measured.
    pub(crate) startup: Duration,
}

impl Default for Foresight {
    fn default() -> Self {
        Foresight {
            predictive: Predictive::Off,
            period: super::PREDICTIVE_PERIOD,
            startup: super::WORKER_STARTUP,
        }
    }
}

/// The loop's memory beyond the samples: start-up times and the remembered day.
struct Memory {
    startup: StartupClock,
    day: Option<DayProfile>,
    predictive: Predictive,
}

impl Memory {
    fn new(foresight: Foresight) -> Self {
        Memory {
            startup: StartupClock::new(foresight.startup),
            day: (foresight.predictive != Predictive::Off)
                .then(|| DayProfile::new(foresight.period)),
            predictive: foresight.predictive,
        }
    }

    /// Learns from `sample` (taken at wall-clock `wall`) and says what the policy should
    /// know beyond the samples.
    fn outlook(&mut self, policy: &PolicyConfig, sample: &Sample, wall: SystemTime) -> Outlook {
        self.startup.observe(sample.ready, sample.coming, sample.at);
        let startup = self.startup.estimate();
        let since_epoch = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let forecast = self.day.as_mut().and_then(|day| {
            let demand = super::policy::demand_of(policy, sample);
            day.record(since_epoch, demand);
            day.forecast(since_epoch, startup)
        });
        Outlook {
            startup,
            forecast,
            act_on_forecast: self.predictive == Predictive::On,
        }
    }
}

/// Logs `decision` with its figures: at info when it says something new against `before`
/// (another desired count, mode or driving signal, or an action this balancer takes), so
/// that a run's log tells why the pool moved and when the policy changed its mind without
/// a line every second (an unheeded wish, with no actuator, repeats each second); at debug
/// otherwise.
fn log_decision(decision: &Decision, before: Option<&Decision>, acting: bool) {
    let news = before.is_none_or(|b| {
        (b.desired, b.mode, b.signal) != (decision.desired, decision.mode, decision.signal)
    }) || (acting && decision.action != Action::Hold);
    macro_rules! log {
        ($level:expr) => {
            tracing::event!(
                $level,
                action = ?decision.action,
                desired = decision.desired,
                current = decision.current,
                mode = decision.mode.as_str(),
                signal = ?decision.signal,
                busy_total = decision.busy_total.unwrap_or(f64::NAN),
                stable_demand = decision.stable_demand,
                panic_demand = decision.panic_demand,
                total_load = decision.total_load,
                arrived_per_s = decision.arrived_per_s,
                capacity_per_worker = decision.capacity_per_worker.unwrap_or(f64::NAN),
                reason = %decision.reason,
                "scaling decision"
            )
        };
    }
    if news {
        log!(tracing::Level::INFO);
    } else {
        log!(tracing::Level::DEBUG);
    }
}

/// Runs the loop until `stop`, then stops the workers the actuator started.
pub(crate) async fn run(
    pool: impl Pool,
    policy: PolicyConfig,
    foresight: Foresight,
    mut actuator: Option<Actuator>,
    slot: StatusSlot,
    stop: CancellationToken,
    grace: Duration,
) {
    let keep = History::keep_for(&policy);
    let mut history = History::new();
    let mut rates = Rates::new();
    let mut memory = Memory::new(foresight);
    let mut last_action: Option<LastAction> = None;
    let mut last_logged: Option<Decision> = None;
    let actuator_name = match &actuator {
        Some(Actuator::Processes(_)) => "processes (--worker-cmd)",
        Some(Actuator::Command(_)) => "command (--scale-cmd)",
        None => "none: the decision is advice for an external scaler",
    };
    let mut quick_rates = Rates::new();
    let mut next_sample: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(SURGE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // The actuator keeps the pool at every check, not only at samples: a scaled-in
        // worker is stopped within a check of its last answer and counted gone within a
        // check of its exit (at a sample's pace each took up to a second, so a
        // worker that drained in milliseconds cost two more seconds and held the next
        // scale-in back as long), and a worker that died is replaced as soon.
        if let Some(a) = actuator.as_mut() {
            a.tick(&pool).await;
        }
        // Between samples, only a surge's reading at a check brings the next forward.
        let at = tokio::time::Instant::now();
        let quick = sample(&pool, actuator.as_ref(), &mut quick_rates, at.into_std());
        // Start-ups are timed to the check, not to the sample: the scale-down delay is
        // three of the slowest recent ones, so a second's rounding cost up to 3 s of it.
        memory.startup.observe(quick.ready, quick.coming, quick.at);
        let due = next_sample.is_none_or(|next| at >= next);
        let desired = last_logged.as_ref().map_or(0, |d| d.desired);
        if !due && !surges(&policy, &history, &quick, desired) {
            continue;
        }
        next_sample = Some(at + SAMPLE_EVERY);
        let now = tokio::time::Instant::now().into_std();
        let sample = sample(&pool, actuator.as_ref(), &mut rates, now);
        history.push(sample, keep);
        let outlook = memory.outlook(&policy, &sample, SystemTime::now());
        let decision = decide(&policy, &history, now, &outlook);
        log_decision(&decision, last_logged.as_ref(), actuator.is_some());
        last_logged = Some(decision.clone());
        if let (Some(a), Action::ScaleOut(n) | Action::ScaleIn(n)) =
            (actuator.as_mut(), decision.action)
        {
            if let Action::ScaleOut(n) = decision.action {
                memory
                    .startup
                    .asked(n.saturating_sub(decision.current), now);
            }
            a.scale_to(n, &pool).await;
            last_action = Some(LastAction {
                action: decision.action,
                at: SystemTime::now(),
            });
        }
        let status = ScalingStatus {
            decision,
            load_now: sample.load,
            scaling_signal: policy.signal,
            target_load: policy.target_load,
            target_utilization: policy.target_utilization,
            stable_window_s: policy.window.as_secs_f64(),
            panic_window_s: policy.panic_window.as_secs_f64(),
            scale_in_startups: policy.scale_in_startups,
            startup_measured: memory.startup.is_measured(),
            predictive: memory.predictive,
            min_workers: policy.min_workers,
            max_workers: policy.max_workers,
            actuator: actuator_name,
            last_action: last_action.clone(),
            at: SystemTime::now(),
        };
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }
    if let Some(a) = actuator.as_mut() {
        a.shutdown(grace).await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::autoscale::pool::fake::FakePool;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn policy() -> PolicyConfig {
        PolicyConfig {
            min_workers: 1,
            max_workers: 4,
            target_load: 10.0,
            window: Duration::from_secs(4),
            panic_window: Duration::from_secs(2),
            ..PolicyConfig::DEFAULT
        }
    }

    fn status(slot: &StatusSlot) -> Option<ScalingStatus> {
        slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    #[test]
    fn a_sample_counts_serving_targets_and_the_queue() {
        let pool = FakePool::default();
        pool.set(addr(1), TargetState::Healthy, 7);
        pool.set(addr(2), TargetState::Healthy, 3);
        pool.set(addr(3), TargetState::Initial, 0);
        pool.set(addr(4), TargetState::Unhealthy, 2);
        pool.set(addr(5), TargetState::Draining, 50);
        pool.set_queue_len(4);
        let s = sample(&pool, None, &mut Rates::new(), Instant::now());
        assert_eq!((s.ready, s.coming, s.leaving), (2, 1, 0));
        assert_eq!(
            s.load, 16.0,
            "outstanding of the serving targets plus the queue"
        );
        assert_eq!(s.max_worker_load, 7.0);
        assert_eq!(s.busy, None, "no worker reported a busy share");

        // Busy shares: the ready workers' summed, one not yet reporting counted as the
        // average of the others; draining and starting workers do not count.
        pool.set_busy(addr(1), Some(0.75));
        pool.set_busy(addr(3), Some(0.5));
        pool.set_busy(addr(5), Some(1.0));
        let s = sample(&pool, None, &mut Rates::new(), Instant::now());
        assert_eq!(s.busy, Some(1.5));
    }

    #[test]
    fn samples_carry_the_rates_of_the_counters() {
        let pool = FakePool::default();
        let t0 = Instant::now();
        let mut rates = Rates::new();
        pool.set(addr(1), TargetState::Healthy, 4);
        pool.set_routed(addr(1), 100);
        let s = sample(&pool, None, &mut rates, t0);
        assert_eq!(
            (s.arrived, s.answered),
            (0.0, 0.0),
            "nothing to compare with yet"
        );
        // A second later: 300 more routed, 20 more outstanding, 30 more queued.
        pool.set(addr(1), TargetState::Healthy, 24);
        pool.set_routed(addr(1), 400);
        pool.set_queue_len(30);
        let s = sample(&pool, None, &mut rates, t0 + Duration::from_secs(1));
        assert_eq!((s.arrived, s.answered), (330.0, 280.0));
        assert_eq!(s.load, 54.0);
    }

    #[test]
    fn the_memory_times_start_ups_and_forecasts_only_when_asked() {
        let t0 = Instant::now();
        let sample = |ready, coming, secs| Sample {
            at: t0 + Duration::from_secs(secs),
            ready,
            coming,
            leaving: 0,
            load: 0.0,
            max_worker_load: 0.0,
            busy: Some(ready as f64 * 0.5),
            arrived: 0.0,
            answered: 0.0,
        };
        let mut m = Memory::new(Foresight::default());
        let wall = SystemTime::now();
        let o = m.outlook(&policy(), &sample(1, 0, 0), wall);
        assert_eq!(
            (o.startup, o.forecast),
            (super::super::WORKER_STARTUP, None)
        );
        m.startup.asked(1, t0);
        m.outlook(&policy(), &sample(1, 1, 1), wall);
        let o = m.outlook(&policy(), &sample(2, 0, 4), wall);
        assert_eq!(o.startup, Duration::from_secs(4));
        assert!(!o.act_on_forecast);

        let mut m = Memory::new(Foresight {
            predictive: Predictive::ForecastOnly,
            period: Duration::from_secs(96),
            ..Foresight::default()
        });
        let day0 = SystemTime::UNIX_EPOCH + Duration::from_secs(96 * 1000);
        for t in 0..200 {
            let o = m.outlook(&policy(), &sample(2, 0, t), day0 + Duration::from_secs(t));
            assert!(!o.act_on_forecast);
            if t > 100 {
                assert!(o.forecast.is_some(), "a period has passed at {t}s");
            }
        }
    }

    /// Runs the loop on `pool` with [`policy`] and no actuator: its status slot, its stop
    /// token and its task.
    fn spawn_loop(pool: &FakePool) -> (StatusSlot, CancellationToken, tokio::task::JoinHandle<()>) {
        spawn_acting(pool, policy(), None)
    }

    /// Runs the loop on `pool` with `policy` and `actuator`.
    fn spawn_acting(
        pool: &FakePool,
        policy: PolicyConfig,
        actuator: Option<Actuator>,
    ) -> (StatusSlot, CancellationToken, tokio::task::JoinHandle<()>) {
        let slot = StatusSlot::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            pool.clone(),
            policy,
            Foresight::default(),
            actuator,
            Arc::clone(&slot),
            stop.clone(),
            Duration::from_secs(1),
        ));
        (slot, stop, task)
    }

    /// Worker processes that sleep (a SIGTERM ends one at once), for the loop to act on.
    fn sleepers() -> Actuator {
        Actuator::Processes(crate::autoscale::actuator::ProcessPool::new(
            "sh -c 'exec sleep 60' {port}".to_owned(),
            addr(7001),
            Duration::from_secs(60),
            Duration::from_secs(60),
            Duration::from_secs(5),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_surge_is_decided_on_within_two_checks() {
        // One worker half busy answering 50/s (a capacity of 100/s), then 500/s arrive
        // from 6 s on while it still answers 50/s: the queue grows by 450 a second.
        let pool = FakePool::default();
        pool.set(addr(1), TargetState::Healthy, 0);
        pool.set_busy(addr(1), Some(0.5));
        let (slot, stop, task) = spawn_loop(&pool);
        let check = SURGE_CHECK;
        let started = tokio::time::Instant::now();
        // The pool's counters move between the loop's readings, half a check off them.
        tokio::time::sleep(check / 2).await;
        let (mut routed, mut queued) = (0.0, 0.0);
        while started.elapsed() < Duration::from_millis(6_400) {
            routed += 50.0 * check.as_secs_f64();
            if started.elapsed() > Duration::from_secs(6) {
                queued += 450.0 * check.as_secs_f64();
            }
            pool.set_routed(addr(1), routed as u64);
            pool.set_queue_len(queued as usize);
            let at = started.elapsed();
            let d = status(&slot).unwrap().decision;
            if at < Duration::from_secs(6) {
                assert_eq!(d.desired, 1, "calm at {at:?}: {d:?}");
            } else if at > Duration::from_secs(6) + 2 * check {
                // The check after the step's first counts read the surge; the next sample
                // would have been at 7 s.
                assert_eq!(d.mode, Mode::Panic, "at {at:?}: {d:?}");
                assert_eq!(d.desired, 4, "500/s over 100/s each at 70%: {d:?}");
                // The arrival rate decided it (the queue, past the overload mark by now,
                // may read higher still; the next sample would have been at 7 s).
                assert!(d.surge_demand.is_some_and(|s| s > 7.0), "{d:?}");
            }
            tokio::time::sleep(check).await;
        }
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_scaled_in_worker_is_stopped_and_counted_gone_within_the_second() {
        // Two sleeping processes stand in for workers, both healthy with nothing
        // outstanding; the loop may keep one.
        let pool = FakePool::default();
        let mut actuator = sleepers();
        actuator.scale_to(2, &pool).await;
        let Actuator::Processes(processes) = &actuator else {
            unreachable!("built as processes")
        };
        for worker in processes.active() {
            pool.set(worker, TargetState::Healthy, 0);
        }
        actuator.tick(&pool).await;
        let one = PolicyConfig {
            max_workers: 1,
            ..policy()
        };
        let (slot, stop, task) = spawn_acting(&pool, one, Some(actuator));
        // The first sample scales in at once (above --max-workers); the worker let go has
        // nothing to finish, so it is signalled at the next check and reaped at the one
        // after: the second sample, a second later, no longer counts it. At a sample's pace
        // it was signalled at the second sample and still counted leaving there.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let s = status(&slot).expect("two samples taken");
        assert_eq!(pool.deregistered().len(), 1, "{s:?}");
        assert_eq!(
            (s.decision.current, s.decision.leaving),
            (1, 0),
            "the worker let go is gone by the second sample: {s:?}"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn start_ups_are_timed_to_the_check() {
        // The loop asks for two workers at its first sample (below --min-workers); two
        // targets turn healthy 300 ms later. The next check sees them: a start-up of
        // about a third of a second, where the next sample would have read a whole one.
        let pool = FakePool::default();
        let two = PolicyConfig {
            min_workers: 2,
            max_workers: 4,
            ..policy()
        };
        let (slot, stop, task) = spawn_acting(&pool, two, Some(sleepers()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.set(addr(1), TargetState::Healthy, 0);
        pool.set(addr(2), TargetState::Healthy, 0);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let s = status(&slot).expect("two samples taken");
        assert!(s.startup_measured, "{s:?}");
        assert!(
            (0.25..0.5).contains(&s.decision.startup_s),
            "timed to the check: {s:?}"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_publishes_its_decision_each_second_and_stops() {
        let pool = FakePool::default();
        pool.set(addr(1), TargetState::Healthy, 30);
        pool.set(addr(2), TargetState::Healthy, 30);
        let (slot, stop, task) = spawn_loop(&pool);

        // The first tick is at once; the decision waits for a full panic window.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let first = status(&slot).expect("a status after the first tick");
        assert_eq!(first.decision.action, Action::Hold);
        assert_eq!(first.load_now, 60.0);
        assert_eq!(
            first.decision.desired, 4,
            "ceil(60 / 10) clamped to --max-workers"
        );

        // 60 in flight needs 6 workers, 3 times the 2 there are: panic, out at once. There
        // is no actuator, so nothing acts on it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = status(&slot).unwrap();
        assert_eq!(later.decision.action, Action::ScaleOut(4), "{later:?}");
        assert_eq!(later.decision.mode, Mode::Panic);
        assert!(later.last_action.is_none());
        assert!(later.actuator.starts_with("none"));
        let text = later.prometheus();
        assert!(text.contains("tidepool_scaling_panic 1"), "{text}");
        assert!(text.contains("tidepool_desired_workers 4"), "{text}");

        // The signal follows the pool.
        pool.set(addr(1), TargetState::Healthy, 0);
        pool.set(addr(2), TargetState::Healthy, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(status(&slot).unwrap().load_now, 0.0);

        stop.cancel();
        task.await.unwrap();
    }
}
