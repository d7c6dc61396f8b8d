//! The target group: the one owner of the targets. It registers and deregisters them,
//! spawns and stops each target's health check and upstream connections, keeps the
//! snapshot that routing reads, and lists draining targets until their delay ends.
//!
//! Targets live in a [`DashMap`] by address. Routing does not iterate the map: it reads
//! an immutable snapshot (`Arc<[Arc<Target>]>` behind an [`ArcSwap`]) rebuilt on every
//! registration change, so the request path takes no lock at all. A deregistered target
//! leaves the map at once (the same address can be registered again right away, as a new
//! target) and waits in the draining list until its requests finish or the delay ends.
//!
//! [`TargetGroup`] is a cheap-to-clone handle over a private `Shared` (as mini-redis's
//! `Db`, pingora's `Backends`): the router, the admin API, DNS discovery and the
//! autoscaler each hold one. It owns its background work: every task it spawns runs on
//! its own [`TaskTracker`] and stops with [`TargetGroup::stop`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::health::HealthCheck;
use crate::metrics::Metrics;
use crate::queue::{QueueSignal, Reroute};
use crate::target::{Target, TargetInfo, TargetState};
use crate::upstream::{self, UpstreamContext, UpstreamSettings};

/// What a target group needs to know about its targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GroupSettings {
    /// Persistent connections kept open to each target.
    pub(crate) connections_per_target: usize,
    /// How long a deregistered target may finish its requests.
    pub(crate) deregistration_delay: Duration,
    /// How each target's health is checked.
    pub(crate) health: HealthCheck,
    /// How each target's connections are opened and what they carry.
    pub(crate) upstream: UpstreamSettings,
}

/// The set of targets; cheap to clone.
#[derive(Clone)]
pub(crate) struct TargetGroup {
    shared: Arc<Shared>,
}

struct Shared {
    settings: GroupSettings,
    active: DashMap<SocketAddr, Arc<Target>>,
    /// Deregistered targets still finishing their requests (or still listed until their
    /// delay ends), by a serial number: the same address may drain twice.
    draining: DashMap<u64, Arc<Target>>,
    serial: AtomicU64,
    snapshot: ArcSwap<Vec<Arc<Target>>>,
    /// Serializes snapshot rebuilds: without it, two concurrent changes could each
    /// store a snapshot missing the other's target.
    rebuild: Mutex<()>,
    /// Woken by targets when capacity appears; given to each new target.
    signal: Arc<QueueSignal>,
    /// What each target's upstream connections get.
    upstream: UpstreamContext,
    /// Health checks, upstream connections and drains.
    tasks: TaskTracker,
    /// Cancelled when the balancer begins to shut down: drained targets stop waiting out
    /// their delay in the list.
    closing: CancellationToken,
    /// Cancelled by [`TargetGroup::stop`]: every target stops, and so does any target
    /// registered afterwards.
    stopped: CancellationToken,
}

impl std::fmt::Debug for TargetGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetGroup")
            .field("targets", &self.snapshot().len())
            .field("draining", &self.shared.draining.len())
            .finish()
    }
}

impl TargetGroup {
    /// An empty group. Its targets wake `signal` when capacity appears, and their
    /// connections hand requests they never wrote back to `reroute`.
    pub(crate) fn new(
        settings: GroupSettings,
        signal: Arc<QueueSignal>,
        reroute: Reroute,
        metrics: Arc<Metrics>,
    ) -> TargetGroup {
        let tasks = TaskTracker::new();
        TargetGroup {
            shared: Arc::new(Shared {
                active: DashMap::new(),
                draining: DashMap::new(),
                serial: AtomicU64::new(0),
                snapshot: ArcSwap::from_pointee(Vec::new()),
                rebuild: Mutex::new(()),
                signal,
                upstream: UpstreamContext {
                    settings: settings.upstream,
                    reroute,
                    metrics,
                    tasks: tasks.clone(),
                },
                tasks,
                closing: CancellationToken::new(),
                stopped: CancellationToken::new(),
                settings,
            }),
        }
    }

    /// The registered targets (not the draining ones), as routing sees them.
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Target>>> {
        self.shared.snapshot.load_full()
    }

    /// Every target, draining ones included, sorted by address.
    pub(crate) fn all(&self) -> Vec<Arc<Target>> {
        let mut all: Vec<_> = self.snapshot().iter().cloned().collect();
        all.extend(self.shared.draining.iter().map(|e| Arc::clone(e.value())));
        all.sort_by_key(|t| t.addr());
        all
    }

    /// What the library and admin API report.
    pub(crate) fn infos(&self) -> Vec<TargetInfo> {
        self.all().iter().map(|t| TargetInfo::from(&**t)).collect()
    }

    /// The registered target at `addr`.
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<Arc<Target>> {
        self.shared.active.get(&addr).map(|e| Arc::clone(e.value()))
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

    /// True once the balancer began to shut down ([`close`](TargetGroup::close)).
    pub(crate) fn is_closing(&self) -> bool {
        self.shared.closing.is_cancelled()
    }

    /// Registers `addr` and starts its health check and connections; idempotent.
    /// Returns the target and whether it is new.
    pub(crate) fn register(&self, addr: SocketAddr, weight: u32) -> (Arc<Target>, bool) {
        let (target, new) = self.insert(addr, weight);
        if !new {
            return (target, false);
        }
        tracing::info!(target = %addr, weight = target.weight(), "target registered");
        let shared = &self.shared;
        shared
            .tasks
            .spawn(shared.settings.health.run(Arc::clone(&target)));
        for slot in 0..target.conn_slots() {
            shared.tasks.spawn(upstream::maintain(
                Arc::clone(&target),
                slot,
                shared.upstream.clone(),
            ));
        }
        (target, true)
    }

    /// Adds a target to the map and the snapshot, without starting anything.
    fn insert(&self, addr: SocketAddr, weight: u32) -> (Arc<Target>, bool) {
        let shared = &self.shared;
        let target = match shared.active.entry(addr) {
            Entry::Occupied(e) => return (Arc::clone(e.get()), false),
            Entry::Vacant(e) => {
                let target = Arc::new(Target::new(
                    addr,
                    weight,
                    shared.settings.connections_per_target,
                    Arc::clone(&shared.signal),
                ));
                e.insert(Arc::clone(&target));
                target
            }
        };
        // After the insert: `stop` cancels `stopped` before it looks at the targets, so
        // a target registered meanwhile is either seen there or stopped here.
        if shared.stopped.is_cancelled() {
            target.stop.cancel();
        }
        self.rebuild();
        (target, true)
    }

    /// Deregisters `addr`: no new requests; in-flight ones may finish until the
    /// deregistration delay ends. False when it was not registered.
    pub(crate) fn deregister(&self, addr: SocketAddr) -> bool {
        let shared = &self.shared;
        let Some((_, target)) = shared.active.remove(&addr) else {
            return false;
        };
        target.start_draining();
        let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
        shared.draining.insert(serial, Arc::clone(&target));
        self.rebuild();
        tracing::info!(
            target = %addr,
            outstanding = target.outstanding(),
            delay = %humantime::format_duration(shared.settings.deregistration_delay),
            "target draining"
        );
        shared.tasks.spawn(self.clone().drain(target, serial));
        true
    }

    /// The balancer begins to shut down: targets that finished draining leave the list
    /// at once instead of at the end of their delay. Targets keep serving.
    pub(crate) fn close(&self) {
        self.shared.closing.cancel();
    }

    /// Stops every target's health check and connections (the last step of shutdown);
    /// requests still written to a target are answered as their connections close.
    pub(crate) fn stop(&self) {
        self.shared.stopped.cancel();
        for t in self.all() {
            t.stop.cancel();
        }
    }

    /// Waits until every task of the group has ended (after [`stop`](TargetGroup::stop)).
    pub(crate) async fn stopped(&self) {
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    fn rebuild(&self) {
        let shared = &self.shared;
        let _serial = shared.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let mut targets: Vec<_> = shared
            .active
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        targets.sort_by_key(|t| t.addr());
        shared.snapshot.store(Arc::new(targets));
    }

    /// Waits for a draining target's requests, or the end of the delay, then closes it.
    ///
    /// A target whose last request finished early has its connections closed at once but
    /// stays listed as `draining` until the delay ends, as NLB shows it: `GET /targets`
    /// then tells a deregistration that is over from one that never happened.
    async fn drain(self, target: Arc<Target>, serial: u64) {
        let delay = tokio::time::sleep(self.shared.settings.deregistration_delay);
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
                () = self.shared.closing.cancelled() => {}
            }
        }
        self.shared.draining.remove(&serial);
    }
}

