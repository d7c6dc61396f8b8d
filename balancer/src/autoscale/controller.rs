//! The control loop: once a second, sample the pool, decide, act, publish.

use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::actuator::Actuator;
use super::policy::{decide, Action, Decision, History, PolicyConfig, Sample};
use super::pool::Pool;
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
    /// The load per worker the pool is sized for.
    pub target_load: f64,
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
        let mut out = String::with_capacity(1024);
        for (name, help, value) in [
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
            ("tidepool_target_load", "The load per worker the pool is sized for.", self.target_load),
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

/// Reads the pool as the policy sees it.
pub(crate) fn sample(pool: &dyn Pool, actuator: Option<&Actuator>, at: Instant) -> Sample {
    let targets = pool.targets();
    let serving = targets.iter().filter(|t| t.state != TargetState::Draining);
    let (mut ready, mut initial, mut outstanding, mut max_worker_load) = (0, 0, 0usize, 0usize);
    for t in serving {
        match t.state {
            TargetState::Healthy => ready += 1,
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
        load: (outstanding + pool.queue_len()) as f64,
        max_worker_load: max_worker_load as f64,
    }
}

/// Runs the loop until `stop`, then stops the workers the actuator started.
pub(crate) async fn run(
    pool: impl Pool,
    policy: PolicyConfig,
    mut actuator: Option<Actuator>,
    slot: StatusSlot,
    stop: CancellationToken,
    grace: Duration,
) {
    let keep = History::keep_for(&policy);
    let mut history = History::new();
    let mut last_action: Option<LastAction> = None;
    let actuator_name = match &actuator {
        Some(Actuator::Processes(_)) => "processes (--worker-cmd)",
        Some(Actuator::Command(_)) => "command (--scale-cmd)",
        None => "none: the decision is advice for an external scaler",
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Some(a) = actuator.as_mut() {
            a.tick(&pool).await;
        }
        let now = tokio::time::Instant::now().into_std();
        let sample = sample(&pool, actuator.as_ref(), now);
        history.push(sample, keep);
        let decision = decide(&policy, &history, now);
        tracing::trace!(?decision, "scaling decision");
        if let (Some(a), Action::ScaleOut(n) | Action::ScaleIn(n)) =
            (actuator.as_mut(), decision.action)
        {
            tracing::info!(action = ?decision.action, reason = %decision.reason, "autoscaling");
            a.scale_to(n, &pool).await;
            last_action = Some(LastAction {
                action: decision.action,
                at: SystemTime::now(),
            });
        }
        let status = ScalingStatus {
            decision,
            load_now: sample.load,
            target_load: policy.target_load,
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
            scale_out_delay: Duration::from_secs(2),
            window: Duration::from_secs(1),
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
        let s = sample(&pool, None, Instant::now());
        assert_eq!((s.ready, s.coming, s.leaving), (2, 1, 0));
        assert_eq!(
            s.load, 16.0,
            "outstanding of the serving targets plus the queue"
        );
        assert_eq!(s.max_worker_load, 7.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_publishes_its_decision_each_second_and_stops() {
        let pool = FakePool::default();
        pool.set(addr(1), TargetState::Healthy, 30);
        pool.set(addr(2), TargetState::Healthy, 30);
        let slot = StatusSlot::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            pool.clone(),
            policy(),
            None,
            Arc::clone(&slot),
            stop.clone(),
            Duration::from_secs(1),
        ));

        // The first tick is at once; the decision waits for a full window.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let first = status(&slot).expect("a status after the first tick");
        assert_eq!(first.decision.action, Action::Hold);
        assert_eq!(first.load_now, 60.0);
        assert_eq!(
            first.decision.desired, 4,
            "ceil(60 / 10) clamped to --max-workers"
        );

        // The need held past --scale-out-delay: the policy asks for more workers. There
        // is no actuator, so nothing acts on it.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let later = status(&slot).unwrap();
        assert_eq!(later.decision.action, Action::ScaleOut(4), "{later:?}");
        assert!(later.last_action.is_none());
        assert!(later.actuator.starts_with("none"));

        // The signal follows the pool.
        pool.set(addr(1), TargetState::Healthy, 0);
        pool.set(addr(2), TargetState::Healthy, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(status(&slot).unwrap().load_now, 0.0);

        stop.cancel();
        task.await.unwrap();
    }
}
