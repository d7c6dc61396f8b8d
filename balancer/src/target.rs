//! [`Target`]: one registered worker address, its health state, its outstanding count and
//! its upstream connections; [`HealthCounter`], the state machine the health checks move;
//! [`InFlight`], the guard that keeps the outstanding count exact.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tidepool_protocol::{BatchTimes, Load};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admission::ReportedTimes;
use crate::metrics::Histogram;
use crate::outlier::{EjectionReason, OutlierCell};
use crate::queue::QueueSignal;
use crate::shard;
use crate::upstream::UpstreamConn;

/// A target's state, as in an NLB target group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum TargetState {
    /// Registered, not yet through enough health checks either way.
    Initial = 0,
    /// Passed `--healthy-threshold` consecutive checks: receives requests.
    Healthy = 1,
    /// Failed `--unhealthy-threshold` consecutive checks: receives requests only when no
    /// target is healthy and fail-open is on.
    Unhealthy = 2,
    /// Deregistered: receives no new requests; its in-flight ones may finish until the
    /// deregistration delay ends.
    Draining = 3,
}

impl TargetState {
    /// The lowercase name used by the admin API and the metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            TargetState::Initial => "initial",
            TargetState::Healthy => "healthy",
            TargetState::Unhealthy => "unhealthy",
            TargetState::Draining => "draining",
        }
    }

    fn from_u8(v: u8) -> TargetState {
        match v {
            0 => TargetState::Initial,
            1 => TargetState::Healthy,
            2 => TargetState::Unhealthy,
            _ => TargetState::Draining,
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Consecutive-result thresholds of the health checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive passes that make a target healthy.
    pub healthy: u32,
    /// Consecutive failures that make a target unhealthy.
    pub unhealthy: u32,
}

/// The health state machine: consecutive check results move a target between
/// `initial`, `healthy` and `unhealthy`. `draining` is entered by deregistration only and
/// never left.
#[derive(Clone, Debug)]
pub struct HealthCounter {
    state: TargetState,
    /// Consecutive passes since the last failure.
    passes: u32,
    /// Consecutive failures since the last pass.
    failures: u32,
    thresholds: Thresholds,
}

impl HealthCounter {
    /// A counter for a newly registered target.
    pub fn new(thresholds: Thresholds) -> Self {
        HealthCounter {
            state: TargetState::Initial,
            passes: 0,
            failures: 0,
            thresholds,
        }
    }

    /// The current state.
    pub fn state(&self) -> TargetState {
        self.state
    }

    /// Records one check's result; returns the new state when it changed.
    pub fn record(&mut self, passed: bool) -> Option<TargetState> {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        let next = match self.state {
            TargetState::Draining => return None,
            s if passed && s != TargetState::Healthy && self.passes >= self.thresholds.healthy => {
                TargetState::Healthy
            }
            s if !passed
                && s != TargetState::Unhealthy
                && self.failures >= self.thresholds.unhealthy =>
            {
                TargetState::Unhealthy
            }
            _ => return None,
        };
        self.state = next;
        Some(next)
    }
}

/// A target's count of requests routed to it and not yet answered.
///
/// Only [`InFlight`] changes it, so it cannot drift.
#[derive(Debug, Default)]
pub struct Outstanding(AtomicUsize);

impl Outstanding {
    /// The count now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One target of the target group.
pub struct Target {
    addr: SocketAddr,
    weight: u32,
    state: AtomicU8,
    /// When the state last changed. Written on transitions only, read by the admin API.
    since: Mutex<SystemTime>,
    outstanding: Outstanding,
    /// How many of the outstanding requests are low priority ([`InFlight::count_low`]):
    /// a worker serves normal and high requests before them, so admission leaves them out
    /// of what waits ahead of one.
    low_outstanding: AtomicUsize,
    /// Requests routed here, ever.
    routed: AtomicU64,
    /// Time from reading a request to writing its answer, for requests routed here.
    pub(crate) latency: Histogram,
    /// The persistent upstream connections; `None` while a slot reconnects. With
    /// `--shards`, shard `s` owns slots `s * shard_conns ..` of them, which run on its thread.
    conns: Box<[ArcSwapOption<UpstreamConn>]>,
    /// Slots per shard; all of `conns` when the balancer is not sharded.
    shard_conns: usize,
    /// Connections in `conns` that are open: routing skips a target with none.
    live_conns: AtomicUsize,
    next_conn: AtomicUsize,
    /// Stops the target's health check and connections.
    pub(crate) stop: CancellationToken,
    /// Times it began to drain (see [`Target::drains`]).
    drains: AtomicU64,
    /// Woken when the outstanding count falls to zero (draining waits on it).
    idle: Notify,
    /// Woken when a request finishes, so that queued requests can take its place.
    signal: Arc<QueueSignal>,
    /// The load its last `pong` reported; written by the health check, read by the
    /// autoscaler. A std mutex: held only to copy two numbers, never across an await.
    reported: Mutex<Option<Load>>,
    /// The batch times of that report, for admission on the routing path: atomics, since
    /// every request with a deadline reads them.
    times: ReportedTimes,
    /// Outlier detection's view of it: whether routing passes over it, and why.
    pub(crate) outlier: OutlierCell,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("state", &self.state())
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl Target {
    pub(crate) fn new(
        addr: SocketAddr,
        weight: u32,
        connections: usize,
        signal: Arc<QueueSignal>,
    ) -> Target {
        Target {
            addr,
            weight: weight.max(1),
            state: AtomicU8::new(TargetState::Initial as u8),
            since: Mutex::new(SystemTime::now()),
            outstanding: Outstanding::default(),
            low_outstanding: AtomicUsize::new(0),
            routed: AtomicU64::new(0),
            latency: Histogram::latency(),
            conns: (0..connections.max(1))
                .map(|_| ArcSwapOption::empty())
                .collect(),
            shard_conns: connections.max(1),
            live_conns: AtomicUsize::new(0),
            next_conn: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            drains: AtomicU64::new(0),
            idle: Notify::new(),
            signal,
            reported: Mutex::new(None),
            times: ReportedTimes::default(),
            outlier: OutlierCell::default(),
        }
    }

    /// Splits its connection slots among shards, `per_shard` each (`--shards`).
    pub(crate) fn sharded(mut self, per_shard: usize) -> Target {
        self.shard_conns = per_shard.clamp(1, self.conns.len());
        self
    }

    /// The shard whose thread runs connection slot `slot` (`None`: not sharded).
    pub(crate) fn shard_of(&self, slot: usize) -> Option<usize> {
        (self.shard_conns < self.conns.len()).then(|| slot / self.shard_conns)
    }

    /// The target's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its routing weight (1 unless registered with another).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Its state now.
    pub fn state(&self) -> TargetState {
        TargetState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// When its state last changed.
    pub fn since(&self) -> SystemTime {
        *self.since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests routed to it and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.get()
    }

    /// How many of its outstanding requests are low priority.
    pub(crate) fn low_outstanding(&self) -> usize {
        self.low_outstanding.load(Ordering::Relaxed)
    }

    /// The load (busy share, queue delay) the target's last `pong` reported, if any.
    pub fn reported_load(&self) -> Option<Load> {
        *self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the load a health check's `pong` reported (`None`: it reported none).
    pub(crate) fn set_reported_load(&self, load: Option<Load>) {
        self.times.set(load.and_then(|l| l.batches));
        *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = load;
    }

    /// The batch times its last `pong` reported, if any (lock-free: admission reads them
    /// for every request with a deadline).
    pub(crate) fn batch_times(&self) -> Option<BatchTimes> {
        self.times.get()
    }

    /// Requests routed to it since it was registered.
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// True when at least one upstream connection is open.
    pub(crate) fn connected(&self) -> bool {
        self.live_conns.load(Ordering::Relaxed) > 0
    }

    /// Sets the state a health check decided; a draining target stays draining.
    /// Returns the previous state when it changed.
    pub(crate) fn set_health(&self, next: TargetState) -> Option<TargetState> {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            if current == TargetState::Draining as u8 || current == next as u8 {
                return None;
            }
            match self.state.compare_exchange_weak(
                current,
                next as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    *self.since.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
                    // A newly healthy target can take queued requests.
                    self.signal.wake();
                    return Some(TargetState::from_u8(current));
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Marks the target draining; routing no longer picks it. Returns the state it had.
    pub(crate) fn start_draining(&self) -> TargetState {
        self.drains.fetch_add(1, Ordering::AcqRel);
        let previous = self
            .state
            .swap(TargetState::Draining as u8, Ordering::AcqRel);
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
        TargetState::from_u8(previous)
    }

    /// Takes a draining target back (registered again before its drain ended) in the
    /// state it had before; routing sees it again.
    pub(crate) fn revive(&self, previous: TargetState) {
        let state = match previous {
            TargetState::Draining => TargetState::Initial,
            other => other,
        };
        self.state.store(state as u8, Ordering::Release);
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
        self.signal.wake();
    }

    /// How many times the target began to drain: a health check started before the last
    /// drain stops, and the revived target gets a new one.
    pub(crate) fn drains(&self) -> u64 {
        self.drains.load(Ordering::Acquire)
    }

    /// Waits until nothing is outstanding.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a decrement in between is not missed.
            notified.as_mut().enable();
            if self.outstanding() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// An open upstream connection, taken in turn: on a shard's thread, one of the
    /// shard's own while it has one open, so that the request and its answer never wake
    /// another thread.
    pub(crate) fn pick_conn(&self) -> Option<Arc<UpstreamConn>> {
        let n = self.conns.len();
        let start = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let open = |slot: usize| self.conns[slot].load_full().filter(|c| !c.is_closed());
        let per = self.shard_conns;
        if per < n {
            let own = shard::current().map(|shard| shard * per);
            if let Some(own) = own.filter(|own| own + per <= n) {
                if let Some(conn) = (0..per).find_map(|k| open(own + (start + k) % per)) {
                    return Some(conn);
                }
            }
        }
        (0..n).find_map(|k| open((start + k) % n))
    }

    /// The open upstream connections.
    pub(crate) fn open_conns(&self) -> Vec<Arc<UpstreamConn>> {
        self.conns
            .iter()
            .filter_map(|c| c.load_full())
            .filter(|c| !c.is_closed())
            .collect()
    }

    /// How many connection slots the target keeps.
    pub(crate) fn conn_slots(&self) -> usize {
        self.conns.len()
    }

    /// Puts a freshly opened connection in its slot.
    pub(crate) fn attach(&self, slot: usize, conn: Arc<UpstreamConn>) {
        self.conns[slot].store(Some(conn));
        self.live_conns.fetch_add(1, Ordering::Relaxed);
        self.signal.wake();
    }

    /// Empties a slot whose connection closed.
    pub(crate) fn detach(&self, slot: usize) {
        if self.conns[slot].swap(None).is_some() {
            self.live_conns.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One request routed to a target and not yet answered: counted in the target's
/// outstanding count from creation to drop.
pub(crate) struct InFlight {
    target: Arc<Target>,
    /// Also counted in the target's low-priority count.
    low: bool,
}

impl InFlight {
    /// Counts one more request on `target`, unless that would pass `limit`.
    pub(crate) fn try_acquire(target: &Arc<Target>, limit: Option<usize>) -> Option<InFlight> {
        let count = &target.outstanding.0;
        match limit {
            None => {
                count.fetch_add(1, Ordering::AcqRel);
            }
            Some(limit) => {
                // A compare-and-swap rather than add-then-check, so that concurrent
                // routing never passes the limit even for an instant.
                count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < limit).then_some(n + 1)
                    })
                    .ok()?;
            }
        }
        target.routed.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            target: Arc::clone(target),
            low: false,
        })
    }

    /// Counts the request in the target's low-priority count too, until the guard drops.
    pub(crate) fn count_low(&mut self) {
        if !std::mem::replace(&mut self.low, true) {
            self.target.low_outstanding.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The target it counts on.
    pub(crate) fn target(&self) -> &Arc<Target> {
        &self.target
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.low {
            self.target.low_outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        if self.target.outstanding.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.target.idle.notify_waiters();
        }
        self.target.signal.wake();
    }
}

/// What the library API and the admin API report about one target.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TargetInfo {
    /// The target's address.
    pub addr: SocketAddr,
    /// Its state.
    pub state: TargetState,
    /// Requests routed to it and not yet answered.
    pub outstanding: usize,
    /// Its routing weight.
    pub weight: u32,
    /// Requests routed to it since registration.
    pub routed: u64,
    /// When its state last changed (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
    /// The busy share (0 to 1) its last `pong` reported: the fraction of recent wall time
    /// its model thread ran batches. `None` until a health check brings one (TCP checks
    /// never do, nor workers that do not report it).
    pub busy: Option<f64>,
    /// The queue delay its last `pong` reported, in microseconds.
    pub queue_us: Option<u64>,
    /// The batch run times its last `pong` reported (a worker serving to deadlines, once
    /// it has run a batch): what predicted-finish admission forecasts with.
    pub batches: Option<BatchTimes>,
    /// Why outlier detection has ejected it, while it is ejected: routing passes over it
    /// until the ejection ends (`--eject-consecutive`, `--eject-base`).
    pub ejected: Option<EjectionReason>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

impl From<&Target> for TargetInfo {
    fn from(t: &Target) -> Self {
        let reported = t.reported_load();
        TargetInfo {
            addr: t.addr,
            state: t.state(),
            outstanding: t.outstanding(),
            weight: t.weight,
            routed: t.routed(),
            since: t.since(),
            busy: reported.map(|l| f64::from(l.busy)),
            queue_us: reported.map(|l| l.queue_us),
            batches: reported.and_then(|l| l.batches),
            ejected: t.outlier.ejection(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TH: Thresholds = Thresholds {
        healthy: 3,
        unhealthy: 2,
    };

    #[test]
    fn initial_becomes_healthy_at_the_threshold() {
        let mut h = HealthCounter::new(TH);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(TargetState::Healthy));
        assert_eq!(h.record(true), None);
    }

    #[test]
    fn initial_becomes_unhealthy_at_the_threshold() {
        let mut h = HealthCounter::new(TH);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(TargetState::Unhealthy));
        assert_eq!(h.record(false), None);
    }

    #[test]
    fn results_must_be_consecutive() {
        let mut h = HealthCounter::new(TH);
        h.record(true);
        h.record(true);
        h.record(false);
        h.record(true);
        h.record(true);
        assert_eq!(h.state(), TargetState::Initial);
        assert_eq!(h.record(true), Some(TargetState::Healthy));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(TargetState::Unhealthy));
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(TargetState::Healthy));
    }

    #[test]
    fn in_flight_counts_exactly_and_respects_the_limit() {
        let t = Arc::new(Target::new(
            "127.0.0.1:1".parse().unwrap(),
            1,
            1,
            Arc::new(QueueSignal::default()),
        ));
        let a = InFlight::try_acquire(&t, Some(2)).unwrap();
        let b = InFlight::try_acquire(&t, Some(2)).unwrap();
        assert!(InFlight::try_acquire(&t, Some(2)).is_none());
        assert_eq!(t.outstanding(), 2);
        drop(a);
        assert_eq!(t.outstanding(), 1);
        drop(b);
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.routed(), 2);

        let mut low = InFlight::try_acquire(&t, None).unwrap();
        low.count_low();
        low.count_low();
        assert_eq!(t.low_outstanding(), 1, "counted once");
        drop(low);
        assert_eq!((t.outstanding(), t.low_outstanding()), (0, 0));
    }

    #[tokio::test]
    async fn a_shard_takes_its_own_connections_first() {
        use crate::shard::Shards;
        use crate::upstream::UpstreamConn;

        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        // Two shards, two connections each: shard 1 owns slots 2 and 3.
        let target = Arc::new(Target::new(addr, 1, 4, Arc::new(QueueSignal::default())).sharded(2));
        assert_eq!((target.shard_of(1), target.shard_of(2)), (Some(0), Some(1)));
        let conns: Vec<_> = (0..4)
            .map(|slot| {
                let closed = CancellationToken::new();
                let (conn, outlets) = UpstreamConn::new(addr, closed.clone());
                target.attach(slot, Arc::clone(&conn));
                (conn, outlets, closed)
            })
            .collect();
        // The slots 8 picks took, each once, in order; `picks` is how many were taken.
        let slots_of = |picked: Vec<Option<Arc<UpstreamConn>>>| {
            let picks = picked.iter().flatten().count();
            let mut slots: Vec<usize> = picked
                .iter()
                .flatten()
                .map(|p| {
                    conns
                        .iter()
                        .position(|(c, _, _)| Arc::ptr_eq(c, p))
                        .unwrap()
                })
                .collect();
            slots.sort_unstable();
            slots.dedup();
            (slots, picks)
        };
        let shards = Shards::start(2, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let on_shard_1 = || {
            let target = Arc::clone(&target);
            shards
                .runtimes()
                .get(1)
                .unwrap()
                .spawn(async move { (0..8).map(|_| target.pick_conn()).collect::<Vec<_>>() })
        };

        assert_eq!(
            slots_of(on_shard_1().await.unwrap()),
            (vec![2, 3], 8),
            "shard 1 takes its own two connections, in turn"
        );
        // Off the shards' threads (the queue's task): every slot in turn.
        let here = (0..8).map(|_| target.pick_conn()).collect();
        assert_eq!(slots_of(here), (vec![0, 1, 2, 3], 8));
        // With its own connections closed, a shard takes another shard's rather than none.
        conns[2].2.cancel();
        conns[3].2.cancel();
        assert_eq!(slots_of(on_shard_1().await.unwrap()), (vec![0, 1], 8));
        shards.stop().await;
    }

    #[test]
    fn draining_is_never_left() {
        let t = Target::new(
            "127.0.0.1:1".parse().unwrap(),
            1,
            1,
            Arc::new(QueueSignal::default()),
        );
        assert_eq!(
            t.set_health(TargetState::Healthy),
            Some(TargetState::Initial)
        );
        t.start_draining();
        assert_eq!(t.set_health(TargetState::Healthy), None);
        assert_eq!(t.state(), TargetState::Draining);
    }
}
