//! The health-check task of one target: a check every interval, its result fed to the
//! target's [`HealthCounter`], the state moved when a threshold is reached.
//!
//! The task receives the one target it checks and a [`HealthCheck`] value with its own
//! settings (as pingora's `HealthCheck` holds its thresholds), never the whole configuration.
//!
//! ## Start-up checks
//! A new target (a worker the autoscaler just started, one registered by hand or found by
//! DNS) is checked every [`STARTUP_INTERVAL`] until it first turns healthy, as Kubernetes'
//! startup probe does, not every `--health-interval`: a worker that registers once it is
//! serving then takes the healthy threshold's few fast checks to receive traffic, not that
//! many intervals (2 s of a 1 s interval, 10 s of the default threshold of 5 at 2 s), which
//! was most of a fast worker's start-up and all of what a burst waited for beyond the
//! process start. Bounded: after [`STARTUP_BUDGET`] without turning healthy (a target that
//! never comes up) its checks go back to the normal interval, so a dead address costs at
//! most a budget's worth of fast connection attempts. The thresholds are unchanged: a
//! target is healthy after as many passed checks as before, only sooner.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tidepool_protocol::tls::TlsConnector;
use tidepool_protocol::{Client, ClientOptions};
use tokio::net::TcpStream;

use crate::config::HealthProtocol;
use crate::queue::Reroute;
use crate::rescue::{rescue, Elsewhere};
use crate::target::{HealthCounter, Target, TargetState, Thresholds};
use crate::upstream;

/// How a target group checks its targets: `--health-*` and the two thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HealthCheck {
    /// What a check does.
    pub(crate) protocol: HealthProtocol,
    /// Time between the end of one check and the start of the next.
    pub(crate) interval: Duration,
    /// Time a check may take before it counts as failed.
    pub(crate) timeout: Duration,
    /// Consecutive results that move the state.
    pub(crate) thresholds: Thresholds,
}

/// How often a target that has not yet turned healthy is checked (at most the normal
/// interval): a check of a local worker costs a connection and a ping, and ten a second
/// let a new worker in within a few hundred milliseconds of its registration.
pub(crate) const STARTUP_INTERVAL: Duration = Duration::from_millis(100);

/// How long a target is checked every [`STARTUP_INTERVAL`] while it does not turn healthy:
/// as long as the autoscaler's own workers take to load a large model and warm up (a 1 GiB
/// model: about 3 s), with room; at most 600 fast checks for a target that never comes up.
pub(crate) const STARTUP_BUDGET: Duration = Duration::from_secs(60);

/// When the next check of one target is due: every [`STARTUP_INTERVAL`] from the task's
/// start until the target first turns healthy or [`STARTUP_BUDGET`] passes, then every
/// `--health-interval`. Owned by the target's health task.
#[derive(Clone, Copy, Debug)]
struct Cadence {
    /// `--health-interval`.
    interval: Duration,
    /// Until when start-up checks may run; `None` once the target turned healthy.
    startup_until: Option<Instant>,
}

impl Cadence {
    fn new(interval: Duration, started: Instant) -> Self {
        Cadence {
            interval,
            startup_until: Some(started + STARTUP_BUDGET),
        }
    }

    /// The wait before the next check, after one that left the target `state` at `now`.
    fn next(&mut self, state: TargetState, now: Instant) -> Duration {
        if state == TargetState::Healthy {
            self.startup_until = None;
        }
        match self.startup_until {
            Some(until) if now < until => STARTUP_INTERVAL.min(self.interval),
            _ => self.interval,
        }
    }
}

impl HealthCheck {
    /// Checks `target` until it stops or starts draining; with `tls`, the `tidepool`
    /// check speaks TLS as the target's connections do (a target whose certificate is not
    /// trusted fails its checks). A target revived from draining gets a new check; this
    /// one ends even if the revival came before it noticed the drain (so that one target
    /// never has two). While the target is unhealthy, each failed check sends the
    /// requests still unanswered there to other targets (`rescue`) through `queue`, when
    /// `elsewhere` says another target is healthy.
    pub(crate) async fn run(
        self,
        target: Arc<Target>,
        tls: Option<TlsConnector>,
        queue: Reroute,
        elsewhere: Elsewhere,
    ) {
        let mut counter = HealthCounter::new(self.thresholds);
        let mut cadence = Cadence::new(self.interval, Instant::now());
        let drains = target.drains();
        loop {
            let passed = tokio::select! {
                () = target.stop.cancelled() => return,
                passed = self.check(&target, tls.as_ref()) => passed,
            };
            if target.state() == TargetState::Draining || target.drains() != drains {
                return;
            }
            tracing::trace!(target = %target.addr(), passed, "health check");
            if let Some(next) = counter.record(passed) {
                if let Some(previous) = target.set_health(next) {
                    tracing::info!(target = %target.addr(), from = %previous, to = %next, "target health changed");
                }
            }
            if !passed && target.state() == TargetState::Unhealthy {
                rescue(&target, &queue, &elsewhere);
            }
            let wait = cadence.next(target.state(), Instant::now());
            tokio::select! {
                () = target.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One check: passes when the target answers within the timeout. A `pong`'s load
    /// report (the worker's busy share) is recorded on the target for the autoscaler.
    pub(crate) async fn check(&self, target: &Target, tls: Option<&TlsConnector>) -> bool {
        let (addr, timeout) = (target.addr(), self.timeout);
        let attempt = async {
            match self.protocol {
                HealthProtocol::Tcp => TcpStream::connect(addr).await.is_ok(),
                HealthProtocol::Tidepool => match upstream::connect(addr, tls).await {
                    Ok(stream) => {
                        let (read, write) = stream.into_split();
                        let client = Client::from_parts(
                            addr.to_string(),
                            read,
                            write,
                            ClientOptions::default(),
                        );
                        // Only `pong` passes; a target that answers `unavailable` is not ready.
                        match client.ping_load(timeout).await {
                            Ok(load) => {
                                target.set_reported_load(load);
                                true
                            }
                            Err(_) => false,
                        }
                    }
                    Err(_) => false,
                },
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_checks_until_healthy_then_the_interval() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(5);
        let mut c = Cadence::new(interval, t0);
        assert_eq!(c.next(TargetState::Initial, t0), STARTUP_INTERVAL);
        assert_eq!(
            c.next(TargetState::Unhealthy, t0 + Duration::from_secs(3)),
            STARTUP_INTERVAL,
            "not listening yet: still starting"
        );
        assert_eq!(
            c.next(TargetState::Healthy, t0 + Duration::from_secs(4)),
            interval
        );
        // Once healthy, a later failure is checked at the normal interval: the start-up is
        // over.
        assert_eq!(
            c.next(TargetState::Unhealthy, t0 + Duration::from_secs(5)),
            interval
        );
    }

    #[test]
    fn a_target_that_never_comes_up_goes_back_to_the_interval() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(5);
        let mut c = Cadence::new(interval, t0);
        let mut now = t0;
        let mut fast = 0;
        while now < t0 + STARTUP_BUDGET * 2 {
            let wait = c.next(TargetState::Unhealthy, now);
            if wait == STARTUP_INTERVAL {
                fast += 1;
            }
            now += wait;
        }
        let most = (STARTUP_BUDGET.as_millis() / STARTUP_INTERVAL.as_millis()) as usize;
        assert_eq!(fast, most, "fast checks for the budget only");
        assert_eq!(c.next(TargetState::Unhealthy, now), interval);
    }

    #[test]
    fn never_faster_than_a_short_interval() {
        let t0 = Instant::now();
        let mut c = Cadence::new(Duration::from_millis(50), t0);
        assert_eq!(c.next(TargetState::Initial, t0), Duration::from_millis(50));
    }
}
