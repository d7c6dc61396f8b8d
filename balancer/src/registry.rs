//! The target group: registration, deregistration with its delay, and the snapshot that
//! routing reads.
//!
//! Targets live in a [`DashMap`] by address. Routing does not iterate the map: it reads
//! an immutable snapshot (`Arc<[Arc<Target>]>` behind an [`ArcSwap`]) rebuilt on every
//! registration change, so the request path takes no lock at all. A deregistered target
//! leaves the map at once (the same address can be registered again right away, as a new
//! target) and waits in the draining list until its requests finish or the delay ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::balancer::Shared;
use crate::queue::QueueSignal;
use crate::target::{Target, TargetInfo, TargetState};
use crate::{health, upstream};

/// The set of targets.
pub(crate) struct Registry {
    active: DashMap<SocketAddr, Arc<Target>>,
    /// Deregistered targets still finishing their requests, by a serial number (the same
    /// address may drain twice).
    draining: DashMap<u64, Arc<Target>>,
    serial: AtomicU64,
    snapshot: ArcSwap<Vec<Arc<Target>>>,
    /// Serializes snapshot rebuilds: without it, two concurrent changes could each
    /// store a snapshot missing the other's target.
    rebuild: Mutex<()>,
    signal: Arc<QueueSignal>,
}

impl Registry {
    pub(crate) fn new(signal: Arc<QueueSignal>) -> Registry {
        Registry {
            active: DashMap::new(),
            draining: DashMap::new(),
            serial: AtomicU64::new(0),
            snapshot: ArcSwap::from_pointee(Vec::new()),
            rebuild: Mutex::new(()),
            signal,
        }
    }

    /// The registered targets (not the draining ones), as routing sees them.
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Target>>> {
        self.snapshot.load_full()
    }

    /// Every target, draining ones included, sorted by address.
    pub(crate) fn all(&self) -> Vec<Arc<Target>> {
        let mut all: Vec<_> = self.snapshot().iter().cloned().collect();
        all.extend(self.draining.iter().map(|e| Arc::clone(e.value())));
        all.sort_by_key(|t| t.addr());
        all
    }

    /// What the library and admin API report.
    pub(crate) fn infos(&self) -> Vec<TargetInfo> {
        self.all().iter().map(|t| TargetInfo::from(&**t)).collect()
    }

    /// The registered target at `addr`.
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<Arc<Target>> {
        self.active.get(&addr).map(|e| Arc::clone(e.value()))
    }

    /// True when some request could be routed now (a `ping` to the balancer passes).
    pub(crate) fn routable(&self, fail_open: bool) -> bool {
        let targets = self.snapshot();
        let healthy = targets.iter().any(|t| t.state() == TargetState::Healthy);
        targets.iter().any(|t| {
            t.connected()
                && match t.state() {
                    TargetState::Healthy => true,
                    TargetState::Draining => false,
                    _ => fail_open && !healthy,
                }
        })
    }

    /// Registers `addr`; idempotent. Returns the target and whether it is new.
    pub(crate) fn register(
        &self,
        shared: &Arc<Shared>,
        addr: SocketAddr,
        weight: u32,
    ) -> (Arc<Target>, bool) {
        let target = match self.active.entry(addr) {
            Entry::Occupied(e) => return (Arc::clone(e.get()), false),
            Entry::Vacant(e) => {
                let target = Arc::new(Target::new(
                    addr,
                    weight,
                    shared.config.connections_per_target,
                    Arc::clone(&self.signal),
                ));
                e.insert(Arc::clone(&target));
                target
            }
        };
        self.rebuild();
        tracing::info!(target = %addr, weight = target.weight(), "target registered");
        shared
            .tasks
            .spawn(health::run(Arc::clone(&target), Arc::clone(shared)));
        for slot in 0..target.conn_slots() {
            shared.tasks.spawn(upstream::maintain(
                Arc::clone(&target),
                slot,
                Arc::clone(shared),
            ));
        }
        (target, true)
    }

    /// Deregisters `addr`: no new requests; in-flight ones may finish until the
    /// deregistration delay ends. False when it was not registered.
    pub(crate) fn deregister(&self, shared: &Arc<Shared>, addr: SocketAddr) -> bool {
        let Some((_, target)) = self.active.remove(&addr) else {
            return false;
        };
        target.start_draining();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        self.draining.insert(serial, Arc::clone(&target));
        self.rebuild();
        tracing::info!(
            target = %addr,
            outstanding = target.outstanding(),
            delay = %humantime::format_duration(shared.config.deregistration_delay),
            "target draining"
        );
        shared
            .tasks
            .spawn(drain(target, serial, Arc::clone(shared)));
        true
    }

    /// Stops every target's tasks and connections (the last step of shutdown).
    pub(crate) fn stop_all(&self) {
        for t in self.all() {
            t.stop.cancel();
        }
    }

    fn rebuild(&self) {
        let _serial = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let mut targets: Vec<_> = self.active.iter().map(|e| Arc::clone(e.value())).collect();
        targets.sort_by_key(|t| t.addr());
        self.snapshot.store(Arc::new(targets));
    }
}

/// Waits for a draining target's requests, or the end of the delay, then closes it.
///
/// A target whose last request finished early has its connections closed at once but stays
/// listed as `draining` until the delay ends, as NLB shows it: `GET /targets` then tells a
/// deregistration that is over from one that never happened.
async fn drain(target: Arc<Target>, serial: u64, shared: Arc<Shared>) {
    let delay = tokio::time::sleep(shared.config.deregistration_delay);
    tokio::pin!(delay);
    let outcome = tokio::select! {
        () = target.idle() => "no request left",
        () = &mut delay => "deregistration delay passed",
        () = target.stop.cancelled() => "balancer stopped",
    };
    tracing::info!(
        target = %target.addr(),
        outcome,
        unanswered = target.outstanding(),
        "target deregistered"
    );
    // Closing the connections answers what is left `unavailable`.
    target.stop.cancel();
    if outcome == "no request left" {
        tokio::select! {
            () = &mut delay => {}
            () = shared.shutting_down.cancelled() => {}
        }
    }
    shared.registry.draining.remove(&serial);
}
