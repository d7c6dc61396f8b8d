//! [`Handle`]: what a program embedding the balancer (tests, the admin API, the
//! autoscaler) reads and changes while it runs.
//!
//! A handle holds the owners it reports on (the target group, the queue's length, the
//! request lifecycle, the metrics, the scaling status), not the balancer: it can be
//! cloned freely and kept past the balancer's end.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::autoscale::controller::StatusSlot;
use crate::autoscale::{Pool, ScalingStatus};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::pending::Lifecycle;
use crate::queue::QueueSignal;
use crate::registry::TargetGroup;
use crate::target::{TargetInfo, TargetState};

/// A cloneable view of a running balancer: targets and their outstanding counts, the
/// queue, and registration.
#[derive(Clone)]
pub struct Handle {
    group: TargetGroup,
    queue: Arc<QueueSignal>,
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
    scaling: StatusSlot,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("targets", &self.targets())
            .field("queue_len", &self.queue_len())
            .finish()
    }
}

impl Handle {
    /// A handle over the balancer's owners.
    pub(crate) fn new(
        group: TargetGroup,
        queue: Arc<QueueSignal>,
        lifecycle: Arc<Lifecycle>,
        metrics: Arc<Metrics>,
        scaling: StatusSlot,
    ) -> Handle {
        Handle {
            group,
            queue,
            lifecycle,
            metrics,
            scaling,
        }
    }

    /// Every target, draining ones included, sorted by address.
    pub fn targets(&self) -> Vec<TargetInfo> {
        self.group.infos()
    }

    /// The target registered at `addr` (not draining), if any.
    pub fn target(&self, addr: SocketAddr) -> Option<TargetInfo> {
        self.group.get(addr).map(|t| TargetInfo::from(&*t))
    }

    /// Targets in the healthy state.
    pub fn healthy_count(&self) -> usize {
        self.group
            .snapshot()
            .iter()
            .filter(|t| t.state() == TargetState::Healthy)
            .count()
    }

    /// Requests outstanding on all targets together.
    pub fn outstanding(&self) -> usize {
        self.group.all().iter().map(|t| t.outstanding()).sum()
    }

    /// The autoscaling loop's latest status, as `GET /scaling` shows it (none in the
    /// first second).
    pub fn scaling(&self) -> Option<ScalingStatus> {
        self.scaling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests waiting in the balancer's queue for a target with room.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Requests read from clients and not yet answered (queued, routed or in flight).
    pub fn pending(&self) -> usize {
        self.lifecycle.live()
    }

    /// Client connections open now.
    pub fn active_flows(&self) -> u64 {
        self.metrics.active_flows.load(Ordering::Relaxed)
    }

    /// The Prometheus text of the balancer's own metrics (`/metrics` adds the scaling
    /// gauges once there is a status).
    pub fn metrics_text(&self) -> String {
        self.metrics.render(&self.group.all(), self.queue_len()) + &self.group.rules().prometheus()
    }

    /// Registers a target (idempotent; a draining one is revived); true when it was not
    /// registered before. Refused by the same rules as the admin API's registrations
    /// (never the balancer itself, `--register-allow`, `--max-targets`).
    pub fn register(&self, addr: SocketAddr, weight: u32) -> Result<bool, Error> {
        self.group
            .register(addr, weight)
            .map(|(_, new)| new)
            .map_err(|reason| Error::TargetRefused { addr, reason })
    }

    /// Starts draining a target; false when it was not registered.
    pub fn deregister(&self, addr: SocketAddr) -> bool {
        self.group.deregister(addr)
    }

    /// True once the balancer began to shut down (`/healthz` turns 503).
    pub fn shutting_down(&self) -> bool {
        self.group.is_closing()
    }

    /// The target group, for the admin API (which reports the target it changed).
    pub(crate) fn group(&self) -> &TargetGroup {
        &self.group
    }
}

impl Pool for Handle {
    fn targets(&self) -> Vec<TargetInfo> {
        Handle::targets(self)
    }

    fn target(&self, addr: SocketAddr) -> Option<TargetInfo> {
        Handle::target(self, addr)
    }

    fn deregister(&self, addr: SocketAddr) -> bool {
        Handle::deregister(self, addr)
    }

    fn queue_len(&self) -> usize {
        Handle::queue_len(self)
    }
}
