//! The health-check task of one target: a check every `--health-interval`, its result fed
//! to the target's [`HealthCounter`], the state moved when a threshold is reached.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::Client;
use tokio::net::TcpStream;

use crate::balancer::Shared;
use crate::config::HealthProtocol;
use crate::target::{HealthCounter, Target, TargetState, Thresholds};

/// Checks `target` until it stops or starts draining.
pub(crate) async fn run(target: Arc<Target>, shared: Arc<Shared>) {
    let config = &shared.config;
    let mut counter = HealthCounter::new(Thresholds {
        healthy: config.healthy_threshold,
        unhealthy: config.unhealthy_threshold,
    });
    loop {
        let passed = tokio::select! {
            () = target.stop.cancelled() => return,
            passed = check(target.addr(), config.health_protocol, config.health_timeout) => passed,
        };
        if target.state() == TargetState::Draining {
            return;
        }
        tracing::trace!(target = %target.addr(), passed, "health check");
        if let Some(next) = counter.record(passed) {
            if let Some(previous) = target.set_health(next) {
                tracing::info!(target = %target.addr(), from = %previous, to = %next, "target health changed");
            }
        }
        tokio::select! {
            () = target.stop.cancelled() => return,
            () = tokio::time::sleep(config.health_interval) => {}
        }
    }
}

/// One check: passes when the target answers in time.
pub(crate) async fn check(addr: SocketAddr, protocol: HealthProtocol, timeout: Duration) -> bool {
    let attempt = async {
        match protocol {
            HealthProtocol::Tcp => TcpStream::connect(addr).await.is_ok(),
            HealthProtocol::Tidepool => match Client::connect(addr).await {
                // Only `pong` passes; a target that answers `unavailable` is not ready.
                Ok(client) => client.ping(timeout).await.is_ok(),
                Err(_) => false,
            },
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(false)
}
