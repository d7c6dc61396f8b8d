//! Autoscaling: the worker pool follows the load, as ECS Service Auto Scaling would size a
//! Fargate service, from the signal the balancer already has.
//!
//! Every second the [`controller`] reads the registry — requests outstanding at each
//! worker and waiting in the balancer's queue — and turns it into a [`policy::Sample`].
//! The [`policy`] (a pure function of the recent samples and the clock) says how many
//! workers the pool needs; the result is published at `GET /scaling` and as Prometheus
//! gauges whether or not this balancer acts on it (KEDA or an HPA can act instead). With
//! `--autoscale`, an [`actuator`] makes it so: worker processes on this machine
//! (`--worker-cmd`), or a command that sets the replica count (`--scale-cmd`, for docker
//! compose).
//!
//! ## Why the default target is 32 outstanding per worker
//! A worker batches up to `--max-batch` (32 by default) items. With about one batch's worth
//! of requests outstanding per worker, one batch runs while the next fills: batches stay
//! full, so each item costs the least compute, and an item waits at most about one batch
//! time in the queue. Well below that, batches run part-empty and the pool is larger than
//! it needs to be; well above it, queues grow and latency with them. Set `--target-load`
//! to the workers' `--max-batch` when it differs.

pub mod actuator;
pub(crate) mod controller;
pub mod policy;
mod pool;

use clap::Args;
use std::time::Duration;

pub use controller::ScalingStatus;
pub use policy::{decide, Action, Decision, History, PolicyConfig, Sample};
pub use pool::Pool;

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

    /// Outstanding plus queued requests per worker that the pool is sized for (see the
    /// module docs: about the workers' --max-batch).
    #[arg(long, env = "TIDEPOOL_TARGET_LOAD", default_value_t = PolicyConfig::DEFAULT.target_load)]
    pub target_load: f64,

    /// How long the need for more workers must last before scaling out.
    #[arg(long, env = "TIDEPOOL_SCALE_OUT_DELAY", value_parser = humantime::parse_duration,
        default_value = duration_default!(PolicyConfig::DEFAULT.scale_out_delay))]
    pub scale_out_delay: Duration,

    /// How long the room for fewer workers must last before scaling in.
    #[arg(long, env = "TIDEPOOL_SCALE_IN_DELAY", value_parser = humantime::parse_duration,
        default_value = duration_default!(PolicyConfig::DEFAULT.scale_in_delay))]
    pub scale_in_delay: Duration,

    /// The averaging window of the load signal.
    #[arg(long, env = "TIDEPOOL_SCALING_WINDOW", value_parser = humantime::parse_duration,
        default_value = duration_default!(PolicyConfig::DEFAULT.window))]
    pub scaling_window: Duration,

    /// A started worker that is not healthy within this time is stopped and replaced.
    #[arg(long, env = "TIDEPOOL_WORKER_START_TIMEOUT", value_parser = humantime::parse_duration,
        default_value = duration_default!(actuator::WORKER_START_TIMEOUT))]
    pub worker_start_timeout: Duration,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        let policy = PolicyConfig::DEFAULT;
        AutoscaleConfig {
            autoscale: false,
            worker_cmd: None,
            scale_cmd: None,
            min_workers: policy.min_workers,
            max_workers: policy.max_workers,
            target_load: policy.target_load,
            scale_out_delay: policy.scale_out_delay,
            scale_in_delay: policy.scale_in_delay,
            scaling_window: policy.window,
            worker_start_timeout: actuator::WORKER_START_TIMEOUT,
        }
    }
}

impl AutoscaleConfig {
    /// The policy these flags describe.
    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            target_load: self.target_load,
            scale_out_delay: self.scale_out_delay,
            scale_in_delay: self.scale_in_delay,
            window: self.scaling_window,
            ..PolicyConfig::DEFAULT
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
        if self.scaling_window.is_zero() {
            return bad("scaling-window", "must be above zero");
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
