//! Autoscaling: the worker pool follows the load, as Knative's autoscaler sizes a service,
//! from a signal the balancer already has.
//!
//! Every second the [`controller`] reads the registry — each ready worker's busy share (its
//! *load share*: the share of its full-batch capacity the recent load used, which the worker
//! computes from its own batch timings and reports in the `pong` of its health check), requests outstanding at each worker and waiting in the balancer's queue — and
//! turns it into a [`policy::Sample`], with the requests arrived and answered per second
//! from the balancer's own counters ([`rates`]), which it also reads every tenth of a second
//! between samples so that a surge is decided on at once. The [`policy`] (a pure function of the recent
//! samples, the clock and the measured [`startup`] time) says how many workers the pool
//! needs: a stable window for normal decisions, a panic window for surges, and, with
//! `--predictive`, a [`forecast`] from the load remembered by time of day. The result is
//! published at `GET /scaling` and as Prometheus gauges whether or not this balancer acts
//! on it (KEDA or an HPA can act instead). With `--autoscale`, an [`actuator`] makes it so:
//! worker processes on this machine (`--worker-cmd`), or a command that sets the replica
//! count (`--scale-cmd`, for docker compose).
//!
//! ## Why the busy share, at 70%
//! A batching worker answers more load with fuller batches, so its requests in flight stay
//! low until it saturates and then shoot up: a policy on them acts only once latency has
//! gone. So does the plain fraction of time a model thread runs batches when a small batch
//! costs about what a full one does (it reads near 1 at a tenth of capacity). The load share
//! weighs each batch's run time by its fill against its cost, so it grows in step with the
//! load, and `ceil(total busy / 0.7)` (Knative's default target utilization) asks for a worker while there is still 30% room, one
//! start-up time before it is needed. Requests in flight remain a guard, at
//! `--target-load` per worker (about the workers' `--max-batch`: one batch running while
//! the next fills): past saturation, where busy shares stop at 1, and for workers that do
//! not report a busy share (TCP health checks, older workers), they size the pool; below
//! saturation they do not count (a batching pool's requests in flight are batches forming).

pub mod actuator;
pub(crate) mod controller;
pub mod forecast;
pub mod policy;
mod pool;
pub mod rates;
pub mod startup;

use clap::Args;
use std::time::Duration;

pub use controller::ScalingStatus;
pub use forecast::{DayProfile, Predictive};
pub use policy::{
    decide, surges, Action, Decision, History, Mode, Outlook, PolicyConfig, Sample, Signal,
};
pub use pool::Pool;
pub use rates::{Rate, Rates};
pub use startup::StartupClock;

use crate::error::Error;

/// A [`Duration`] as the text of a flag's default (`10s`, `5m`), so that a flag's default
/// and `--help` come from the same constant as the code's own defaults.
macro_rules! duration_default {
    ($duration:expr) => {{
        static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        TEXT.get_or_init(|| humantime::format_duration($duration).to_string())
            .as_str()
    }};
}

/// The autoscaling flags (part of the balancer's [`Config`](crate::Config)).
#[derive(Clone, Debug, PartialEq, Args)]
pub struct AutoscaleConfig {
    /// Act on the policy: start and stop workers (needs --worker-cmd or --scale-cmd).
    /// Without it the desired count is still computed and shown at GET /scaling.
    #[arg(long, env = "TIDEPOOL_AUTOSCALE")]
    pub autoscale: bool,

    /// Command that starts one worker on this machine; `{port}` is replaced by a free
    /// port the balancer picked, `{admin}` by the balancer's admin address, `{index}` by a
    /// counter. The worker should register itself (`--register http://{admin}`).
    #[arg(long, env = "TIDEPOOL_WORKER_CMD")]
    pub worker_cmd: Option<String>,

    /// Command that sets the number of workers elsewhere; `{count}` is replaced by the
    /// count (e.g. `docker-compose up -d --no-recreate --scale worker={count}`).
    #[arg(long, env = "TIDEPOOL_SCALE_CMD")]
    pub scale_cmd: Option<String>,

    /// The fewest workers the pool keeps.
    #[arg(long, env = "TIDEPOOL_MIN_WORKERS", default_value_t = PolicyConfig::DEFAULT.min_workers)]
    pub min_workers: usize,

    /// The most workers the pool grows to.
    #[arg(long, env = "TIDEPOOL_MAX_WORKERS", default_value_t = PolicyConfig::DEFAULT.max_workers)]
    pub max_workers: usize,

    /// What sizes the pool: `busy` (each worker's busy share against
    /// --target-utilization, requests in flight as a guard) or `in-flight` (requests in
    /// flight alone against --target-load, busy shares ignored: the policy before busy
    /// shares, for workers whose busy share misleads).
    #[arg(long, env = "TIDEPOOL_SCALING_SIGNAL", value_enum, default_value_t = PolicyConfig::DEFAULT.signal)]
    pub scaling_signal: Signal,

    /// The in-flight guard: outstanding plus queued requests per worker that the pool needs
    /// at least once it is saturated or its workers report no busy share (see the module
    /// docs: about the workers' --max-batch).
    #[arg(long, env = "TIDEPOOL_TARGET_LOAD", default_value_t = PolicyConfig::DEFAULT.target_load)]
    pub target_load: f64,

    /// How long a stable-mode need for more workers must last before scaling out (a surge
    /// in the panic window never waits).
    #[arg(long, env = "TIDEPOOL_SCALE_OUT_DELAY", value_parser = humantime::parse_duration,
        default_value = duration_default!(PolicyConfig::DEFAULT.scale_out_delay))]
    pub scale_out_delay: Duration,

    /// The longest scale-down delay: the pool shrinks only to what the most demanding
    /// second over the delay needs; the delay is --scale-in-startups start-up times, at
    /// most this.
    #[arg(long, env = "TIDEPOOL_SCALE_IN_DELAY", value_parser = humantime::parse_duration,
        default_value = duration_default!(PolicyConfig::DEFAULT.scale_in_delay))]
    pub scale_in_delay: Duration,

    /// The scale-down delay in workers' start-up times (measured, or --worker-startup):
    /// a worker let go can be back within one, so holding it a few bounds what scaling in
    /// during a lull can cost. At least a --panic-window, at most --scale-in-delay.
    #[arg(long, env = "TIDEPOOL_SCALE_IN_STARTUPS", default_value_t = PolicyConfig::DEFAULT.scale_in_startups)]
    pub scale_in_startups: f64,

    /// The stable window: the averaging window of normal decisions.
    #[arg(long, env = "TIDEPOOL_SCALING_WINDOW", value_parser = humantime::parse_duration,
        default_value = duration_default!(PolicyConfig::DEFAULT.window))]
    pub scaling_window: Duration,

    /// A started worker that is not healthy within this time is stopped and replaced.
    #[arg(long, env = "TIDEPOOL_WORKER_START_TIMEOUT", value_parser = humantime::parse_duration,
        default_value = duration_default!(actuator::WORKER_START_TIMEOUT))]
    pub worker_start_timeout: Duration,

    /// The busy share per worker the pool is sized for (0 to 1): the fraction of wall time
    /// each worker's model thread runs batches. Below 1 so that a rise has room while new
    /// workers start.
    #[arg(long, env = "TIDEPOOL_TARGET_UTILIZATION", default_value_t = PolicyConfig::DEFAULT.target_utilization)]
    pub target_utilization: f64,

    /// The panic window: a surge this short that needs --panic-threshold times the workers
    /// there are scales out at once (and nothing scales in for a --scaling-window after).
    #[arg(long, env = "TIDEPOOL_PANIC_WINDOW", value_parser = humantime::parse_duration,
        default_value = duration_default!(PolicyConfig::DEFAULT.panic_window))]
    pub panic_window: Duration,

    /// How many times the current workers the panic window's demand must reach to panic.
    #[arg(long, env = "TIDEPOOL_PANIC_THRESHOLD", default_value_t = PolicyConfig::DEFAULT.panic_threshold)]
    pub panic_threshold: f64,

    /// One decision grows the pool at most this many times.
    #[arg(long, env = "TIDEPOOL_MAX_SCALE_UP_RATE", default_value_t = PolicyConfig::DEFAULT.max_scale_up_rate)]
    pub max_scale_up_rate: f64,

    /// One decision shrinks the pool at most by this factor (2: at most half of it).
    #[arg(long, env = "TIDEPOOL_MAX_SCALE_DOWN_RATE", default_value_t = PolicyConfig::DEFAULT.max_scale_down_rate)]
    pub max_scale_down_rate: f64,

    /// How long a worker takes from start to ready, assumed until the autoscaler has
    /// measured its own workers' start-ups.
    #[arg(long, env = "TIDEPOOL_WORKER_STARTUP", value_parser = humantime::parse_duration,
        default_value = duration_default!(WORKER_STARTUP))]
    pub worker_startup: Duration,

    /// Predictive pre-warm: remember the load by time of day and report (forecast-only) or
    /// also start workers one start-up time before the usual rise (on). Never scales in.
    #[arg(long, env = "TIDEPOOL_PREDICTIVE", value_enum, default_value_t = Predictive::Off)]
    pub predictive: Predictive,

    /// The period the load repeats over, for --predictive: a day, or a demo's short day.
    #[arg(long, env = "TIDEPOOL_PREDICTIVE_PERIOD", value_parser = humantime::parse_duration,
        default_value = duration_default!(PREDICTIVE_PERIOD))]
    pub predictive_period: Duration,
}

/// The default of `--worker-startup`: the start-up time assumed until one is measured.
pub const WORKER_STARTUP: Duration = Duration::from_secs(10);

/// The default of `--predictive-period`: a day.
pub const PREDICTIVE_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for AutoscaleConfig {
    fn default() -> Self {
        let policy = PolicyConfig::DEFAULT;
        AutoscaleConfig {
            autoscale: false,
            worker_cmd: None,
            scale_cmd: None,
            scaling_signal: policy.signal,
            min_workers: policy.min_workers,
            max_workers: policy.max_workers,
            target_load: policy.target_load,
            scale_out_delay: policy.scale_out_delay,
            scale_in_delay: policy.scale_in_delay,
            scale_in_startups: policy.scale_in_startups,
            scaling_window: policy.window,
            worker_start_timeout: actuator::WORKER_START_TIMEOUT,
            target_utilization: policy.target_utilization,
            panic_window: policy.panic_window,
            panic_threshold: policy.panic_threshold,
            max_scale_up_rate: policy.max_scale_up_rate,
            max_scale_down_rate: policy.max_scale_down_rate,
            worker_startup: WORKER_STARTUP,
            predictive: Predictive::Off,
            predictive_period: PREDICTIVE_PERIOD,
        }
    }
}

impl AutoscaleConfig {
    /// The policy these flags describe.
    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            signal: self.scaling_signal,
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            target_load: self.target_load,
            scale_out_delay: self.scale_out_delay,
            scale_in_delay: self.scale_in_delay,
            scale_in_startups: self.scale_in_startups,
            window: self.scaling_window,
            target_utilization: self.target_utilization,
            panic_window: self.panic_window,
            panic_threshold: self.panic_threshold,
            max_scale_up_rate: self.max_scale_up_rate,
            max_scale_down_rate: self.max_scale_down_rate,
            ..PolicyConfig::DEFAULT
        }
    }

    /// What the control loop needs beyond the policy: `--predictive` and the start-up time.
    pub(crate) fn foresight(&self) -> controller::Foresight {
        controller::Foresight {
            predictive: self.predictive,
            period: self.predictive_period,
            startup: self.worker_startup,
        }
    }

    /// Checks the flags together, before anything is bound.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |flag: &'static str, problem: &str| {
            Err(Error::Config {
                flag,
                problem: problem.to_owned(),
            })
        };
        if self.max_workers == 0 || self.min_workers > self.max_workers {
            return bad(
                "max-workers",
                "must be at least 1 and at least --min-workers",
            );
        }
        if !(self.target_load.is_finite() && self.target_load > 0.0) {
            return bad(
                "target-load",
                "must be a number above zero, e.g. the workers' --max-batch",
            );
        }
        if !(self.scale_in_startups.is_finite() && self.scale_in_startups >= 0.0) {
            return bad(
                "scale-in-startups",
                "must be a number at least 0, e.g. 3 (hold a worker three start-up times)",
            );
        }
        if self.scaling_window.is_zero() {
            return bad("scaling-window", "must be above zero");
        }
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            return bad(
                "target-utilization",
                "must be above 0 and at most 1, e.g. 0.7 (70% of each worker's time busy)",
            );
        }
        if self.panic_window.is_zero() || self.panic_window > self.scaling_window {
            return bad(
                "panic-window",
                "must be above zero and at most --scaling-window (e.g. 6s against 60s)",
            );
        }
        if !(self.panic_threshold.is_finite() && self.panic_threshold > 1.0) {
            return bad("panic-threshold", "must be a number above 1, e.g. 2");
        }
        if !(self.max_scale_up_rate.is_finite() && self.max_scale_up_rate > 1.0) {
            return bad("max-scale-up-rate", "must be a number above 1, e.g. 10");
        }
        if !(self.max_scale_down_rate.is_finite() && self.max_scale_down_rate > 1.0) {
            return bad("max-scale-down-rate", "must be a number above 1, e.g. 2");
        }
        if self.predictive != Predictive::Off
            && self.predictive_period < Duration::from_secs(forecast::BUCKETS as u64)
        {
            return bad(
                "predictive-period",
                "must be at least 96s (the period is remembered in 96 buckets), e.g. 24h",
            );
        }
        match (&self.worker_cmd, &self.scale_cmd) {
            (Some(_), Some(_)) => {
                return bad("scale-cmd", "give either --worker-cmd (processes here) or --scale-cmd, not both")
            }
            (None, None) if self.autoscale => {
                return bad(
                    "autoscale",
                    "needs --worker-cmd (start workers on this machine) or --scale-cmd (e.g. docker-compose)",
                )
            }
            _ => {}
        }
        if let Some(cmd) = &self.worker_cmd {
            if !cmd.contains("{port}") {
                return bad(
                    "worker-cmd",
                    "must contain {port}, where the worker's listen port goes",
                );
            }
            if shell_words::split(cmd).is_err() {
                return bad("worker-cmd", "has unbalanced quotes");
            }
        }
        if let Some(cmd) = &self.scale_cmd {
            if !cmd.contains("{count}") {
                return bad(
                    "scale-cmd",
                    "must contain {count}, where the worker count goes",
                );
            }
            if shell_words::split(cmd).is_err() {
                return bad("scale-cmd", "has unbalanced quotes");
            }
        }
        Ok(())
    }
}
