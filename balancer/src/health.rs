//! The health-check task of one target: a check every interval, its result fed to the
//! target's [`HealthCounter`], the state moved when a threshold is reached.
//!
//! The task receives the one target it checks and a [`HealthCheck`] value with its own
//! settings (as pingora's `HealthCheck` holds its thresholds), never the whole configuration.

use std::sync::Arc;
use std::time::Duration;

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
            tokio::select! {
                () = target.stop.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
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
