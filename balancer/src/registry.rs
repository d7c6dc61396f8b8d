//! The target group: the one owner of the targets. It registers and deregisters them,
//! spawns and stops each target's health check and upstream connections, keeps the
//! snapshot that routing reads, and lists draining targets until their delay ends.
//!
//! Targets live in a [`DashMap`] by address. Routing does not iterate the map: it reads
//! an immutable snapshot (`Arc<[Arc<Target>]>` behind an [`ArcSwap`]) rebuilt on every
//! registration change, so the request path takes no lock at all. A deregistered target
//! leaves the map at once and waits in the draining list until its requests finish or the
//! delay ends. Registering its address again meanwhile revives it: the same target, its
//! connections and requests, back in the map, so that an address is listed once. (When
//! its connections have already closed, its listing goes and a new target takes its place.)
//!
//! Every registration passes the group's [`TargetRules`] (never the balancer itself,
//! `--register-allow`, `--max-targets`), one registration at a time, so that two at once
//! cannot both take the last place under the cap.
//!
//! [`TargetGroup`] is a cheap-to-clone handle over a private `Shared` (as mini-redis's
//! `Db`, pingora's `Backends`): the router, the admin API, DNS discovery and the
//! autoscaler each hold one. It owns its background work: every task it spawns runs on
//! its own [`TaskTracker`] and stops with [`TargetGroup::stop`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::rescue::Elsewhere;
use crate::shard::ShardRuntimes;
use crate::target::{Target, TargetInfo, TargetState};
use crate::upstream::{self, UpstreamContext, UpstreamSettings};
use crate::validation::{TargetRefusal, TargetRules};
use tidepool_protocol::tls::TlsConnector;

/// What a target group needs to know about its targets.
#[derive(Clone, Debug)]
pub(crate) struct GroupSettings {
    /// Persistent connections kept open to each target.
    pub(crate) connections_per_target: usize,
    /// How long a deregistered target may finish its requests.
    pub(crate) deregistration_delay: Duration,
    /// How each target's health is checked.
    pub(crate) health: HealthCheck,
    /// How each target's connections are opened and what they carry.
    pub(crate) upstream: UpstreamSettings,
    /// TLS towards the targets (`--upstream-tls-*`), for connections and health checks.
    pub(crate) upstream_tls: Option<TlsConnector>,
    /// With `--shards`, each shard's runtime: every target gets `connections_per_target`
    /// connections per shard, on the shard's thread. Empty: all on the current runtime.
    pub(crate) shards: ShardRuntimes,
}

/// The set of targets; cheap to clone.
#[derive(Clone)]
pub(crate) struct TargetGroup {
    shared: Arc<Shared>,
}

struct Shared {
    settings: GroupSettings,
    rules: TargetRules,
    /// Held while a registration is checked and made (never across an `.await`).
    registering: Mutex<()>,
    active: DashMap<SocketAddr, Arc<Target>>,
    /// Deregistered targets still finishing their requests (or still listed until their
    /// delay ends), by a serial number.
    draining: DashMap<u64, Arc<Draining>>,
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

/// A deregistered target and what its drain needs to know.
struct Draining {
    target: Arc<Target>,
    /// Its state before the drain, which a revival gives back.
    previous: TargetState,
    /// Cancelled when it is revived: the drain task stops waiting.
    revived: CancellationToken,
    /// Taken (set) by whichever comes first: the drain closing the target, or a revival.
    claimed: AtomicBool,
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
        rules: TargetRules,
        signal: Arc<QueueSignal>,
        reroute: Reroute,
        metrics: Arc<Metrics>,
    ) -> TargetGroup {
        let tasks = TaskTracker::new();
        TargetGroup {
            shared: Arc::new(Shared {
                rules,
                registering: Mutex::new(()),
                active: DashMap::new(),
                draining: DashMap::new(),
                serial: AtomicU64::new(0),
                snapshot: ArcSwap::from_pointee(Vec::new()),
                rebuild: Mutex::new(()),
                signal,
                upstream: UpstreamContext {
                    settings: settings.upstream,
                    tls: settings.upstream_tls.clone(),
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

    /// The TLS the targets' connections speak (`--upstream-tls-ca`), for anything else
    /// that connects to a target (the balancer's `metadata` answer).
    pub(crate) fn upstream_tls(&self) -> Option<TlsConnector> {
        self.shared.settings.upstream_tls.clone()
    }

    /// The registered targets (not the draining ones), as routing sees them.
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Target>>> {
        self.shared.snapshot.load_full()
    }

    /// Every target, draining ones included, sorted by address.
    pub(crate) fn all(&self) -> Vec<Arc<Target>> {
        let mut all: Vec<_> = self.snapshot().iter().cloned().collect();
        all.extend(
            self.shared
                .draining
                .iter()
                .map(|e| Arc::clone(&e.value().target)),
        );
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

    /// The rules registrations pass.
    pub(crate) fn rules(&self) -> &TargetRules {
        &self.shared.rules
    }

    /// Registers `addr` and starts its health check and connections; idempotent, and a
    /// draining target at `addr` is revived. Returns the target and whether it was not
    /// registered before (new or revived), or why the rules refuse it.
    pub(crate) fn register(
        &self,
        addr: SocketAddr,
        weight: u32,
    ) -> Result<(Arc<Target>, bool), TargetRefusal> {
        let shared = &self.shared;
        // A std mutex: nothing below awaits.
        let _one_at_a_time = shared.registering.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(target) = self.get(addr) {
            return Ok((target, false));
        }
        let allowed = shared.rules.check(addr).and_then(|()| {
            let max = shared.rules.max_targets();
            if shared.active.len() >= max {
                Err(TargetRefusal::Full { max })
            } else {
                Ok(())
            }
        });
        if let Err(refusal) = allowed {
            shared.rules.refused(&refusal);
            // Callers say where it came from (the admin API's peer, a DNS name) and how often.
            tracing::debug!(target = %addr, reason = refusal.reason(), "target refused: {refusal}");
            return Err(refusal);
        }
        if let Some(target) = self.revive(addr) {
            return Ok((target, true));
        }
        let (target, _) = self.insert(addr, weight);
        tracing::info!(target = %addr, weight = target.weight(), "target registered");
        self.start(&target);
        Ok((target, true))
    }

    /// Takes the draining target at `addr` back, if its drain has not closed it; else
    /// drops its listing, so that the new target is the address's only entry.
    fn revive(&self, addr: SocketAddr) -> Option<Arc<Target>> {
        let shared = &self.shared;
        let serial = shared
            .draining
            .iter()
            .find(|e| e.value().target.addr() == addr)
            .map(|e| *e.key())?;
        let (_, entry) = shared.draining.remove(&serial)?;
        let target = Arc::clone(&entry.target);
        if entry.claimed.swap(true, Ordering::AcqRel) || target.stop.is_cancelled() {
            return None;
        }
        entry.revived.cancel();
        target.revive(entry.previous);
        shared.active.insert(addr, Arc::clone(&target));
        self.rebuild();
        tracing::info!(target = %addr, state = %target.state(), outstanding = target.outstanding(), "target revived: registered again while draining");
        // Its connections kept running; its health check ended with the drain.
        shared.tasks.spawn(shared.settings.health.run(
            Arc::clone(&target),
            shared.settings.upstream_tls.clone(),
            shared.upstream.reroute.clone(),
            self.elsewhere(),
        ));
        Some(target)
    }

    /// Whether a target other than a given address is healthy, for a health check's rescue
    /// of a frozen target's requests. Weak: the check must not keep the group alive.
    fn elsewhere(&self) -> Elsewhere {
        let shared = Arc::downgrade(&self.shared);
        Arc::new(move |addr| {
            shared.upgrade().is_some_and(|shared| {
                shared
                    .snapshot
                    .load()
                    .iter()
                    .any(|t| t.addr() != addr && t.state() == TargetState::Healthy && t.connected())
            })
        })
    }

    /// Starts a new target's health check and connections.
    fn start(&self, target: &Arc<Target>) {
        let shared = &self.shared;
        shared.tasks.spawn(shared.settings.health.run(
            Arc::clone(target),
            shared.settings.upstream_tls.clone(),
            shared.upstream.reroute.clone(),
            self.elsewhere(),
        ));
        for slot in 0..target.conn_slots() {
            let maintain = upstream::maintain(Arc::clone(target), slot, shared.upstream.clone());
            match target
                .shard_of(slot)
                .and_then(|s| shared.settings.shards.get(s))
            {
                Some(runtime) => shared.tasks.spawn_on(maintain, runtime),
                None => shared.tasks.spawn(maintain),
            };
        }
    }

    /// Adds a target to the map and the snapshot, without starting anything.
    fn insert(&self, addr: SocketAddr, weight: u32) -> (Arc<Target>, bool) {
        let shared = &self.shared;
        let target = match shared.active.entry(addr) {
            Entry::Occupied(e) => return (Arc::clone(e.get()), false),
            Entry::Vacant(e) => {
                let per_shard = shared.settings.connections_per_target;
                let shards = shared.settings.shards.len().max(1);
                let target = Arc::new(
                    Target::new(addr, weight, per_shard * shards, Arc::clone(&shared.signal))
                        .sharded(per_shard),
                );
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

    /// Registers `addr` with no health check and no connections: tests attach their own.
    #[cfg(test)]
    pub(crate) fn register_idle(&self, addr: SocketAddr, weight: u32) -> Arc<Target> {
        self.insert(addr, weight).0
    }

    /// Deregisters `addr`: no new requests; in-flight ones may finish until the
    /// deregistration delay ends. False when it was not registered.
    pub(crate) fn deregister(&self, addr: SocketAddr) -> bool {
        let shared = &self.shared;
        let Some((_, target)) = shared.active.remove(&addr) else {
            return false;
        };
        let previous = target.start_draining();
        let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Draining {
            target: Arc::clone(&target),
            previous,
            revived: CancellationToken::new(),
            claimed: AtomicBool::new(false),
        });
        shared.draining.insert(serial, Arc::clone(&entry));
        self.rebuild();
        tracing::info!(
            target = %addr,
            outstanding = target.outstanding(),
            delay = %humantime::format_duration(shared.settings.deregistration_delay),
            "target draining"
        );
        shared.tasks.spawn(self.clone().drain(entry, serial));
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

    /// Waits for a draining target's requests, or the end of the delay, then closes it;
    /// ends without closing it when it is revived first.
    ///
    /// A target whose last request finished early has its connections closed at once but
    /// stays listed as `draining` until the delay ends, as NLB shows it: `GET /targets`
    /// then tells a deregistration that is over from one that never happened.
    async fn drain(self, entry: Arc<Draining>, serial: u64) {
        let target = &entry.target;
        let delay = tokio::time::sleep(self.shared.settings.deregistration_delay);
        tokio::pin!(delay);
        let outcome = tokio::select! {
            () = entry.revived.cancelled() => return,
            () = target.idle() => "no request left",
            () = &mut delay => "deregistration delay passed",
            () = target.stop.cancelled() => "balancer stopped",
        };
        if entry.claimed.swap(true, Ordering::AcqRel) {
            // Revived in the meantime: the target serves again.
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthProtocol;
    use crate::queue::QueueHandle;
    use crate::target::{InFlight, Thresholds};

    const DELAY: Duration = Duration::from_secs(30);

    /// A group whose targets would be checked over TCP once an hour; the queue behind it
    /// is closed (nothing is routed in these tests). Up to 16 targets, any address.
    fn group() -> TargetGroup {
        group_with(TargetRules::new(Vec::new(), Vec::new(), 16))
    }

    fn group_with(rules: TargetRules) -> TargetGroup {
        let signal = Arc::new(QueueSignal::default());
        let (queue, _rx) = QueueHandle::new(8, Duration::from_secs(1), Arc::clone(&signal));
        let settings = GroupSettings {
            connections_per_target: 2,
            deregistration_delay: DELAY,
            health: HealthCheck {
                protocol: HealthProtocol::Tcp,
                interval: Duration::from_secs(3600),
                timeout: Duration::from_secs(1),
                thresholds: Thresholds {
                    healthy: 2,
                    unhealthy: 2,
                },
            },
            upstream: UpstreamSettings {
                connect_timeout: Duration::from_secs(1),
                max_frame: 1 << 20,
                keepalive: Duration::from_secs(30),
            },
            upstream_tls: None,
            shards: crate::shard::ShardRuntimes::default(),
        };
        TargetGroup::new(
            settings,
            rules,
            signal,
            queue.reroute(),
            Arc::new(Metrics::default()),
        )
    }

    /// An address nothing listens on: connections to it are refused at once.
    fn closed_addr() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Lets the group's spawned tasks run up to their next wait.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn states(group: &TargetGroup) -> Vec<(SocketAddr, TargetState)> {
        group.all().iter().map(|t| (t.addr(), t.state())).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn register_is_idempotent_and_stop_ends_the_targets_tasks() {
        let group = group();
        let a = closed_addr();
        let (target, new) = group.register(a, 2).unwrap();
        assert!(new);
        assert_eq!(target.weight(), 2);
        let (again, new) = group.register(a, 5).unwrap();
        assert!(
            !new,
            "a second registration of the same address is the same target"
        );
        assert!(Arc::ptr_eq(&target, &again));
        assert_eq!(again.weight(), 2);
        assert_eq!(group.snapshot().len(), 1);
        assert_eq!(states(&group), vec![(a, TargetState::Initial)]);
        assert!(Arc::ptr_eq(&group.get(a).unwrap(), &target));

        // The health check and both connection slots run until the group stops.
        settle().await;
        group.stop();
        assert!(target.stop.is_cancelled());
        tokio::time::timeout(Duration::from_secs(60), group.stopped())
            .await
            .expect("every task of the group ends once it stops");

        // A target registered after the stop is born stopped.
        let (late, _) = group.register(closed_addr(), 1).unwrap();
        assert!(late.stop.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_target_turns_healthy_after_fast_start_up_checks() {
        // Checked once an hour once healthy, but a new target's checks come every
        // STARTUP_INTERVAL: the two passes of the healthy threshold take 100 ms, not an hour.
        let group = group();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (target, _) = group.register(listener.local_addr().unwrap(), 1).unwrap();
        let started = tokio::time::Instant::now();
        while target.state() != TargetState::Healthy {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "still {} after {:?}",
                target.state(),
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(started.elapsed() >= crate::health::STARTUP_INTERVAL);
        group.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_target_closes_at_once_and_stays_listed_until_the_delay() {
        let group = group();
        let target = group.register_idle(addr(1), 1);
        let guard = InFlight::try_acquire(&target, None).unwrap();

        assert!(group.deregister(addr(1)));
        assert!(!group.deregister(addr(1)), "already deregistered");
        assert!(group.snapshot().is_empty(), "routing no longer sees it");
        assert!(group.get(addr(1)).is_none());
        assert_eq!(states(&group), vec![(addr(1), TargetState::Draining)]);

        // Its request may finish: the connections stay open meanwhile.
        tokio::time::sleep(DELAY / 2).await;
        assert!(!target.stop.is_cancelled());

        // The last request finished: connections close now, the listing waits for the delay.
        drop(guard);
        settle().await;
        assert!(target.stop.is_cancelled());
        assert_eq!(states(&group), vec![(addr(1), TargetState::Draining)]);
        tokio::time::sleep(DELAY / 2 - Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(group.all().len(), 1);
        tokio::time::sleep(Duration::from_millis(2)).await;
        settle().await;
        assert!(group.all().is_empty(), "gone once the delay ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_that_never_drains_is_closed_when_the_delay_ends() {
        let group = group();
        let target = group.register_idle(addr(1), 1);
        let _stuck = InFlight::try_acquire(&target, None).unwrap();
        group.deregister(addr(1));
        tokio::time::sleep(DELAY - Duration::from_millis(1)).await;
        settle().await;
        assert!(!target.stop.is_cancelled());
        tokio::time::sleep(Duration::from_millis(2)).await;
        settle().await;
        assert!(
            target.stop.is_cancelled(),
            "its connections close, answering the rest"
        );
        assert!(group.all().is_empty());
        assert_eq!(target.outstanding(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn re_registering_a_draining_address_revives_it() {
        let group = group();
        let old = group.register_idle(addr(1), 3);
        let busy = InFlight::try_acquire(&old, None).unwrap();
        group.deregister(addr(1));
        assert_eq!(states(&group), vec![(addr(1), TargetState::Draining)]);

        let (revived, new) = group.register(addr(1), 1).unwrap();
        assert!(new, "it was not registered: the answer says so (201)");
        assert!(
            Arc::ptr_eq(&old, &revived),
            "the same target, connections and requests"
        );
        assert_eq!(revived.weight(), 3, "its weight is kept");
        assert_eq!(
            states(&group),
            vec![(addr(1), TargetState::Initial)],
            "listed once"
        );
        assert!(
            Arc::ptr_eq(&group.snapshot()[0], &old),
            "routing sees it again"
        );
        assert_eq!(old.outstanding(), 1);

        // Its drain ended with the revival: the delay passing closes nothing.
        drop(busy);
        tokio::time::sleep(DELAY * 2).await;
        settle().await;
        assert!(!old.stop.is_cancelled());
        assert_eq!(group.all().len(), 1);

        // It can drain again, and is listed once then too.
        assert!(group.deregister(addr(1)));
        settle().await;
        assert!(old.stop.is_cancelled(), "nothing in flight: closed at once");
        assert_eq!(states(&group), vec![(addr(1), TargetState::Draining)]);
        group.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn re_registering_a_closed_draining_address_replaces_its_listing() {
        let group = group();
        let old = group.register_idle(addr(1), 1);
        group.deregister(addr(1));
        settle().await;
        assert!(
            old.stop.is_cancelled(),
            "nothing in flight: its connections closed"
        );

        let (new, is_new) = group.register(addr(1), 1).unwrap();
        assert!(is_new);
        assert!(!Arc::ptr_eq(&old, &new));
        assert_eq!(
            states(&group),
            vec![(addr(1), TargetState::Initial)],
            "one entry for the address, not two"
        );
        // The old drain's end of delay removes nothing of the new target.
        tokio::time::sleep(DELAY * 2).await;
        settle().await;
        assert_eq!(group.all().len(), 1);
        assert!(!new.stop.is_cancelled());
        group.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn the_rules_and_the_cap_refuse_registrations() {
        let own = addr(7000);
        let group = group_with(TargetRules::new(vec![("listen", own)], Vec::new(), 2));
        assert!(matches!(
            group.register(own, 1),
            Err(TargetRefusal::Own {
                listener: "listen",
                ..
            })
        ));
        group.register(addr(1), 1).unwrap();
        group.register(addr(2), 1).unwrap();
        assert_eq!(
            group.register(addr(3), 1).unwrap_err(),
            TargetRefusal::Full { max: 2 }
        );
        assert!(
            !group.register(addr(2), 1).unwrap().1,
            "a registered address is not refused at the cap: nothing is added"
        );
        // A draining target does not count; reviving one does.
        group.deregister(addr(1));
        group.register(addr(3), 1).unwrap();
        assert_eq!(
            group.register(addr(1), 1).unwrap_err(),
            TargetRefusal::Full { max: 2 }
        );
        assert_eq!(group.snapshot().len(), 2);
        let text = group.rules().prometheus();
        assert!(text.contains("{reason=\"full\"} 2\n"), "{text}");
        assert!(text.contains("{reason=\"own_address\"} 1\n"), "{text}");
        group.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn close_ends_the_listing_and_stop_ends_the_drains() {
        let group = group();
        let idle = group.register_idle(addr(1), 1);
        let busy = group.register_idle(addr(2), 1);
        let _held = InFlight::try_acquire(&busy, None).unwrap();
        let serving = group.register_idle(addr(3), 1);
        group.deregister(addr(1));
        group.deregister(addr(2));
        settle().await;
        assert!(idle.stop.is_cancelled());
        assert_eq!(group.all().len(), 3);

        // Shutdown begins: a drained target need not wait out its delay in the list.
        group.close();
        assert!(group.is_closing());
        settle().await;
        assert_eq!(
            states(&group),
            vec![
                (addr(2), TargetState::Draining),
                (addr(3), TargetState::Initial)
            ]
        );
        assert!(
            !serving.stop.is_cancelled(),
            "closing does not stop targets"
        );

        // The last step: every target stops, draining or not, and every drain ends.
        group.stop();
        assert!(busy.stop.is_cancelled() && serving.stop.is_cancelled());
        tokio::time::timeout(Duration::from_secs(1), group.stopped())
            .await
            .expect("the drains end with the stop");
        assert_eq!(states(&group), vec![(addr(3), TargetState::Initial)]);
    }
}
