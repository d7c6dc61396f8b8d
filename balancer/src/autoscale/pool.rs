//! [`Pool`]: what the autoscaler reads and changes of the worker pool it sizes.
//!
//! The controller and the actuators depend on this small trait, not on the balancer: the
//! balancer's [`Handle`](crate::Handle) implements it, and tests implement it with a few
//! fields they set by hand.

use std::net::SocketAddr;

use crate::target::TargetInfo;

/// The worker pool as the autoscaler sees it.
pub trait Pool: Send + Sync {
    /// Every target, draining ones included.
    fn targets(&self) -> Vec<TargetInfo>;

    /// The target registered at `addr` (not draining), if any.
    fn target(&self, addr: SocketAddr) -> Option<TargetInfo>;

    /// Starts draining the target at `addr`; false when it was not registered.
    fn deregister(&self, addr: SocketAddr) -> bool;

    /// Requests waiting in the balancer for a target with room.
    fn queue_len(&self) -> usize;
}

