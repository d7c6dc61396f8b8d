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

/// A pool whose targets the test sets by hand.
#[cfg(test)]
pub(crate) mod fake {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    use super::Pool;
    use crate::target::{TargetInfo, TargetState};

    #[derive(Default)]
    struct State {
        targets: Vec<TargetInfo>,
        queue_len: usize,
        deregistered: Vec<SocketAddr>,
    }

    /// Cheap to clone: the clones share the targets.
    #[derive(Clone, Default)]
    pub(crate) struct FakePool {
        state: Arc<Mutex<State>>,
    }

    impl FakePool {
        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Registers `addr` in `state` with `outstanding` requests, or updates it.
        pub(crate) fn set(&self, addr: SocketAddr, state: TargetState, outstanding: usize) {
            let info = TargetInfo {
                addr,
                state,
                outstanding,
                weight: 1,
                routed: 0,
                since: SystemTime::UNIX_EPOCH,
                busy: None,
                queue_us: None,
                batches: None,
                ejected: None,
            };
            let mut s = self.state();
            s.targets.retain(|t| t.addr != addr);
            s.targets.push(info);
        }

        /// Sets the busy share the target at `addr` reported.
        pub(crate) fn set_busy(&self, addr: SocketAddr, busy: Option<f64>) {
            for t in self.state().targets.iter_mut().filter(|t| t.addr == addr) {
                t.busy = busy;
            }
        }

        /// Sets how many requests were routed to the target at `addr` since it registered.
        pub(crate) fn set_routed(&self, addr: SocketAddr, routed: u64) {
            for t in self.state().targets.iter_mut().filter(|t| t.addr == addr) {
                t.routed = routed;
            }
        }

        /// Sets the balancer's queue length.
        pub(crate) fn set_queue_len(&self, n: usize) {
            self.state().queue_len = n;
        }

        /// The addresses deregistered so far, in order.
        pub(crate) fn deregistered(&self) -> Vec<SocketAddr> {
            self.state().deregistered.clone()
        }
    }

    impl Pool for FakePool {
        fn targets(&self) -> Vec<TargetInfo> {
            self.state().targets.clone()
        }

        fn target(&self, addr: SocketAddr) -> Option<TargetInfo> {
            self.state()
                .targets
                .iter()
                .find(|t| t.addr == addr && t.state != TargetState::Draining)
                .cloned()
        }

        fn deregister(&self, addr: SocketAddr) -> bool {
            let mut s = self.state();
            s.deregistered.push(addr);
            let mut found = false;
            for t in s.targets.iter_mut().filter(|t| t.addr == addr) {
                found |= t.state != TargetState::Draining;
                t.state = TargetState::Draining;
            }
            found
        }

        fn queue_len(&self) -> usize {
            self.state().queue_len
        }
    }
}
