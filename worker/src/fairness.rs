//! Weighted fairness between the clients or tenants sharing the worker's queue
//! (`--fairness`): deficit round robin between *flows*, within a priority class.
//!
//! Without it the batcher serves a class oldest first, so one client that floods the queue
//! puts every other client's requests behind all of its own. With it:
//!
//! - **Flows.** Each queued item belongs to a flow, named by its `tenant`
//!   ([`FairnessMode::Tenant`]; items without one share the flow of the unnamed) or by its
//!   client's IP address ([`FairnessMode::Client`]: the `client` a balancer adds, else the
//!   connection's peer; by address rather than `ip:port`, so that opening more connections
//!   buys a client no larger share). A balancer writes `client` itself, replacing any a
//!   client sent; only a client that reaches a worker directly could name itself, and in
//!   a deployment only the balancer reaches workers. A tenant, by contrast, is whatever
//!   the client says.
//! - **Order.** The batcher asks [`Flows::next`] which flow serves the next place in a batch,
//!   among the flows that hold an item it may take (of the top class, fitting the batch);
//!   within a flow, items go oldest first. Each flow's turn in the round adds its weight
//!   (`--tenant-weight NAME=W`, default 1) to its deficit, and each item served costs one,
//!   so under backlog flows are served in proportion to their weights, and a flow that
//!   arrives with an idle queue behind the others is served within one round.
//! - **Classes.** Ageing lifts a waiting item up to the top class and no further, so that
//!   between flows it is the round robin, not age, that orders the top class; items still
//!   reach it in bounded time, and a flow's own items keep their age order (see the batcher).
//! - **Bounds.** A flow exists only while it has items queued (so never more than the
//!   queue's bound) and is forgotten, deficit and all, when its last item leaves. Names an
//!   operator configured always keep their own flow; beyond `--fairness-max-flows` others,
//!   new names share one flow, `other`, so a client inventing tenant names gains at most
//!   that one flow's share.
//! - **Metrics.** Items served per configured name (a label set the operator bounded), the
//!   rest together, and the number of flows active ([`FairMetrics`]).

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// What flows are keyed by (`--fairness`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FairnessMode {
    /// No flows: each class is served oldest first.
    #[default]
    Off,
    /// By the client's IP address.
    Client,
    /// By the request's `tenant`.
    Tenant,
}

/// How the queue is shared between flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FairnessSettings {
    /// What flows are keyed by.
    pub mode: FairnessMode,
    /// Weights of named flows (tenant names, or IP addresses in client mode); every other
    /// flow weighs 1. Each weight is at least 1.
    pub weights: Vec<(String, u32)>,
    /// Most flows kept apart besides the named ones; further names share one flow.
    pub max_flows: usize,
}

/// Where a request comes from, as the connection saw it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Origin<'a> {
    /// The request's `tenant`.
    pub tenant: Option<&'a str>,
    /// The `client` a balancer added (`ip:port`).
    pub client: Option<&'a str>,
    /// The connection's peer.
    pub peer: Option<IpAddr>,
}

impl FairnessMode {
    /// The name of the flow a request from `origin` joins; `None` when fairness is off, and
    /// `Some("")` for the flow of requests without a name (no tenant name or address is
    /// empty).
    pub fn key(self, origin: Origin<'_>) -> Option<Box<str>> {
        match self {
            FairnessMode::Off => None,
            FairnessMode::Tenant => Some(origin.tenant.unwrap_or_default().into()),
            FairnessMode::Client => {
                // A `client` that is no socket address came from somewhere other than a
                // balancer; the peer is then the better witness.
                let ip = origin
                    .client
                    .and_then(|c| c.parse::<SocketAddr>().ok())
                    .map(|a| a.ip())
                    .or(origin.peer);
                Some(ip.map(|ip| ip.to_string()).unwrap_or_default().into())
            }
        }
    }
}

/// A flow, as the queued items know it. Ids are never reused, so an id outlives nothing it
/// could be mistaken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(u64);

impl FlowId {
    /// The flow of every item while fairness is off.
    pub const NONE: FlowId = FlowId(0);
}

#[derive(Debug)]
struct Flow {
    /// `None`: the shared flow of names beyond the cap.
    name: Option<Box<str>>,
    weight: u64,
    /// Items this flow may still take in its current turn.
    deficit: u64,
    queued: usize,
    /// Its counter in [`FairMetrics`], for a configured name.
    metric: Option<usize>,
}

/// Counts for `/metrics`: items served per configured name, the rest together, and the flows
/// active. The batcher's [`Flows`] writes them; rendering reads them.
#[derive(Debug, Default)]
pub struct FairMetrics {
    active: AtomicI64,
    /// Set once fairness is on: one counter per configured name.
    named: OnceLock<Vec<(String, AtomicU64)>>,
    others: AtomicU64,
}

impl FairMetrics {
    /// Items served from the flow of configured name `name`, or from any other flow (`None`).
    pub fn served(&self, name: Option<&str>) -> u64 {
        let named = self.named.get().and_then(|n| match name {
            Some(name) => n.iter().find(|(n, _)| n == name).map(|(_, c)| c),
            None => None,
        });
        named.unwrap_or(&self.others).load(Ordering::Relaxed)
    }

    /// Flows with items queued now.
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed)
    }

    /// The Prometheus text, once fairness is on.
    pub fn render(&self, out: &mut String) {
        let Some(named) = self.named.get() else {
            return;
        };
        let _ = writeln!(
            out,
            "# HELP tidepool_worker_fair_flows_active Flows (clients or tenants) with items in the queue.\n\
             # TYPE tidepool_worker_fair_flows_active gauge\n\
             tidepool_worker_fair_flows_active {}\n\
             # HELP tidepool_worker_fair_items_total Items taken into batches, per --tenant-weight name; others: every other flow.\n\
             # TYPE tidepool_worker_fair_items_total counter",
            self.active()
        );
        for (name, counter) in named {
            let _ = writeln!(
                out,
                "tidepool_worker_fair_items_total{{flow=\"{}\"}} {}",
                name.replace('\\', "\\\\").replace('"', "\\\""),
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "tidepool_worker_fair_items_others_total {}",
            self.others.load(Ordering::Relaxed)
        );
    }
}

/// The flows with items queued, in round-robin order: the batcher's, one per batcher.
#[derive(Debug)]
pub struct Flows {
    mode: FairnessMode,
    weights: HashMap<Box<str>, u32>,
    max_flows: usize,
    flows: HashMap<FlowId, Flow>,
    by_name: HashMap<Box<str>, FlowId>,
    /// Flows kept apart that were not configured (the cap counts these).
    unconfigured: usize,
    /// The shared flow of names beyond the cap, while it has items.
    overflow: Option<FlowId>,
    /// Active flows; the front is the one whose turn it is.
    ring: VecDeque<FlowId>,
    /// The front's turn has begun (its weight was added).
    turn: Option<FlowId>,
    last_id: u64,
    metrics: Arc<FairMetrics>,
}

impl Flows {
    /// No flows yet, sharing as `settings` say; `metrics` gets the counts.
    pub fn new(settings: &FairnessSettings, metrics: Arc<FairMetrics>) -> Flows {
        if settings.mode != FairnessMode::Off {
            let named = settings
                .weights
                .iter()
                .map(|(name, _)| (name.clone(), AtomicU64::new(0)))
                .collect();
            let _ = metrics.named.set(named);
        }
        Flows {
            mode: settings.mode,
            weights: settings
                .weights
                .iter()
                .map(|(name, w)| (name.as_str().into(), (*w).max(1)))
                .collect(),
            max_flows: settings.max_flows,
            flows: HashMap::new(),
            by_name: HashMap::new(),
            unconfigured: 0,
            overflow: None,
            ring: VecDeque::new(),
            turn: None,
            last_id: 0,
            metrics,
        }
    }

    /// Whether items are served by flow at all.
    pub fn enabled(&self) -> bool {
        self.mode != FairnessMode::Off
    }

    /// Flows with items queued.
    pub fn active(&self) -> usize {
        self.ring.len()
    }

    /// Counts one more queued item in the flow named `name` (made if new, at the end of the
    /// round) and returns that flow; [`FlowId::NONE`] when fairness is off or there is no
    /// name.
    pub fn join(&mut self, name: Option<&str>) -> FlowId {
        let Some(name) = name.filter(|_| self.enabled()) else {
            return FlowId::NONE;
        };
        let id = match self.by_name.get(name) {
            Some(&id) => id,
            None => {
                let weight = self.weights.get(name).copied();
                if weight.is_none() && self.unconfigured >= self.max_flows {
                    match self.overflow {
                        Some(id) => id,
                        None => {
                            let id = self.open(None, 1);
                            self.overflow = Some(id);
                            id
                        }
                    }
                } else {
                    if weight.is_none() {
                        self.unconfigured += 1;
                    }
                    let id = self.open(Some(name.into()), weight.unwrap_or(1));
                    self.by_name.insert(name.into(), id);
                    id
                }
            }
        };
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.queued += 1;
        }
        id
    }

    fn open(&mut self, name: Option<Box<str>>, weight: u32) -> FlowId {
        self.last_id += 1;
        let id = FlowId(self.last_id);
        let metric = self.metrics.named.get().and_then(|named| {
            named
                .iter()
                .position(|(n, _)| Some(n.as_str()) == name.as_deref())
        });
        self.flows.insert(
            id,
            Flow {
                name,
                weight: u64::from(weight),
                deficit: 0,
                queued: 0,
                metric,
            },
        );
        self.ring.push_back(id);
        self.metrics
            .active
            .store(self.ring.len() as i64, Ordering::Relaxed);
        id
    }

    /// How many queued items the round robin would serve before one more item of the flow
    /// named `name`, were every flow to keep what it has queued: it waits
    /// `r = ⌈(queued + 1) / weight⌉` rounds of its flow, in which each other flow serves up
    /// to `r` times its weight. `None` when fairness is off. Predicted-finish admission takes
    /// this rather than the whole queue, which would refuse a bystander's request for the
    /// sake of a flood that the round robin serves it ahead of.
    pub fn ahead(&self, name: Option<&str>) -> Option<usize> {
        let name = name.filter(|_| self.enabled())?;
        let own = self.by_name.get(name).copied().or_else(|| {
            let capped = !self.weights.contains_key(name) && self.unconfigured >= self.max_flows;
            capped.then_some(self.overflow).flatten()
        });
        let (queued, weight) = match own.and_then(|id| self.flows.get(&id)) {
            Some(flow) => (flow.queued, flow.weight),
            None => (0, u64::from(self.weights.get(name).copied().unwrap_or(1))),
        };
        let rounds = (queued as u64 + 1).div_ceil(weight);
        let others: u64 = self
            .flows
            .iter()
            .filter(|&(&id, _)| Some(id) != own)
            .map(|(_, f)| (f.queued as u64).min(rounds.saturating_mul(f.weight)))
            .sum();
        Some(
            usize::try_from(others)
                .unwrap_or(usize::MAX)
                .saturating_add(queued),
        )
    }

    /// One item of `flow` was taken into a batch: counted as served, and as gone from the
    /// queue.
    pub fn served(&mut self, flow: FlowId) {
        if !self.enabled() {
            return;
        }
        let Some(f) = self.flows.get(&flow) else {
            return;
        };
        match f.metric.and_then(|i| self.metrics.named.get()?.get(i)) {
            Some((_, counter)) => counter.fetch_add(1, Ordering::Relaxed),
            None => self.metrics.others.fetch_add(1, Ordering::Relaxed),
        };
        self.left(flow, 1);
    }

    /// The queue now holds exactly the items of `queued` (one id per item): flows that
    /// lost items to cancels, deadlines or a drain are recounted, and those left empty are
    /// forgotten.
    pub fn recount(&mut self, queued: impl Iterator<Item = FlowId>) {
        if !self.enabled() {
            return;
        }
        let mut counts: HashMap<FlowId, usize> = HashMap::new();
        for id in queued {
            *counts.entry(id).or_default() += 1;
        }
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in ids {
            let now = counts.get(&id).copied().unwrap_or(0);
            let before = self.flows.get(&id).map_or(0, |f| f.queued);
            self.left(id, before.saturating_sub(now));
        }
    }

    /// `n` items of `flow` left the queue; a flow left empty is forgotten.
    fn left(&mut self, id: FlowId, n: usize) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.queued = flow.queued.saturating_sub(n);
        if flow.queued > 0 {
            return;
        }
        let flow = self.flows.remove(&id);
        match flow.and_then(|f| f.name) {
            Some(name) => {
                self.by_name.remove(&name);
                if !self.weights.contains_key(&name) {
                    self.unconfigured -= 1;
                }
            }
            None => self.overflow = None,
        }
        self.ring.retain(|&f| f != id);
        if self.turn == Some(id) {
            self.turn = None;
        }
        self.metrics
            .active
            .store(self.ring.len() as i64, Ordering::Relaxed);
    }

    /// The flow that takes the next place in a batch, among those `eligible` accepts, charged
    /// one item; `None` when no active flow is eligible.
    ///
    /// The flow whose turn it is serves while its deficit lasts; then (or when it is not
    /// eligible now) its turn passes to the next in the ring, which gains its weight. A flow
    /// passed over keeps at most one turn's credit beyond its weight, so a flow whose items
    /// did not fit the batches being formed is made up for a little, and none banks credit
    /// without bound.
    pub fn next(&mut self, mut eligible: impl FnMut(FlowId) -> bool) -> Option<FlowId> {
        // Every visit to a flow at the front starts a turn that adds at least one, so one
        // pass round the ring (plus the turn under way) finds an eligible flow with credit.
        for _ in 0..=self.ring.len() {
            let id = *self.ring.front()?;
            let flow = self.flows.get_mut(&id)?;
            if self.turn != Some(id) {
                self.turn = Some(id);
                flow.deficit = (flow.deficit + flow.weight).min(2 * flow.weight);
            }
            if flow.deficit >= 1 && eligible(id) {
                flow.deficit -= 1;
                return Some(id);
            }
            self.turn = None;
            self.ring.rotate_left(1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows(weights: &[(&str, u32)], max_flows: usize) -> Flows {
        let settings = FairnessSettings {
            mode: FairnessMode::Tenant,
            weights: weights.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect(),
            max_flows,
        };
        Flows::new(&settings, Arc::default())
    }

    /// Serves `n` places from flows that each always have an item, as a backlog does.
    fn serve(flows: &mut Flows, n: usize) -> Vec<FlowId> {
        (0..n)
            .map(|_| {
                let id = flows.next(|_| true).unwrap();
                // Keep the flow backlogged: one more queued, then the one served leaves.
                let name = flows.flows.get(&id).and_then(|f| f.name.clone());
                assert_eq!(flows.join(name.as_deref()), id, "a backlogged flow stays");
                flows.served(id);
                id
            })
            .collect()
    }

    #[test]
    fn weights_two_to_one_give_two_to_one_service_under_backlog() {
        let mut flows = flows(&[("gold", 2)], 8);
        let gold = flows.join(Some("gold"));
        let free = flows.join(Some("free"));
        let served = serve(&mut flows, 300);
        let count = |id| served.iter().filter(|&&f| f == id).count();
        assert_eq!((count(gold), count(free)), (200, 100));
        // And steadily so: every window of three holds two gold.
        for window in served.chunks(3) {
            assert_eq!(window.iter().filter(|&&f| f == gold).count(), 2);
        }
    }

    #[test]
    fn equal_weights_alternate() {
        let mut flows = flows(&[], 8);
        let a = flows.join(Some("a"));
        let b = flows.join(Some("b"));
        let served = serve(&mut flows, 6);
        assert_eq!(served, vec![a, b, a, b, a, b]);
    }

    #[test]
    fn a_flow_that_arrives_behind_a_flood_is_served_next() {
        let mut flows = flows(&[], 8);
        let flood = (0..1000).map(|_| flows.join(Some("flood"))).last().unwrap();
        for _ in 0..10 {
            assert_eq!(flows.next(|_| true), Some(flood));
            flows.served(flood);
        }
        let idle = flows.join(Some("bystander"));
        assert_eq!(flows.next(|_| true), Some(idle), "not behind the 990 left");
        flows.served(idle);
        assert_eq!(
            flows.active(),
            1,
            "the bystander's flow is forgotten once empty"
        );
        assert_eq!(flows.next(|_| true), Some(flood));
    }

    #[test]
    fn names_beyond_the_cap_share_one_flow_and_configured_ones_never_do() {
        let mut flows = flows(&[("vip", 3)], 2);
        let a = flows.join(Some("a"));
        let b = flows.join(Some("b"));
        let c = flows.join(Some("c"));
        let d = flows.join(Some("d"));
        let vip = flows.join(Some("vip"));
        assert_eq!(c, d, "past the cap: one shared flow");
        assert!(a != b && b != c && vip != c && vip != a);
        assert_eq!(flows.active(), 4);
        // Round robin between a, b, other and vip: other gets one share, not two.
        let served: Vec<FlowId> = (0..6).filter_map(|_| flows.next(|_| true)).collect();
        assert_eq!(served, vec![a, b, c, vip, vip, vip]);
        flows.served(a);
        // A place freed under the cap goes to the next new name.
        let e = flows.join(Some("e"));
        assert!(e != c);
    }

    #[test]
    fn empty_flows_are_forgotten_and_their_names_start_afresh() {
        let metrics = Arc::new(FairMetrics::default());
        let settings = FairnessSettings {
            mode: FairnessMode::Tenant,
            weights: vec![("vip".to_owned(), 2)],
            max_flows: 4,
        };
        let mut flows = Flows::new(&settings, Arc::clone(&metrics));
        let a = flows.join(Some("a"));
        let vip = flows.join(Some("vip"));
        flows.join(Some("vip"));
        assert_eq!(metrics.active(), 2);
        // A cancel took one of vip's, a deadline a's.
        flows.recount([vip].into_iter());
        assert_eq!((flows.active(), metrics.active()), (1, 1));
        assert_eq!(flows.next(|_| true), Some(vip));
        flows.served(vip);
        assert_eq!((flows.active(), flows.flows.len()), (0, 0));
        assert_eq!(flows.next(|_| true), None);
        assert_ne!(flows.join(Some("a")), a, "a new flow, deficit and all");
        assert_eq!(metrics.served(Some("vip")), 1);
        assert_eq!(metrics.served(None), 0);
        let mut text = String::new();
        metrics.render(&mut text);
        assert!(
            text.contains("tidepool_worker_fair_items_total{flow=\"vip\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_worker_fair_flows_active 1"),
            "{text}"
        );
    }

    #[test]
    fn an_ineligible_flow_is_passed_over_and_keeps_a_little_credit() {
        let mut flows = flows(&[], 8);
        let a = flows.join(Some("a"));
        let b = flows.join(Some("b"));
        for _ in 0..3 {
            flows.join(Some("a"));
            flows.join(Some("b"));
        }
        // Only b's items fit: a is passed over, b served.
        assert_eq!(flows.next(|f| f == b), Some(b));
        assert_eq!(flows.next(|f| f == b), Some(b));
        // Now a may: it has its turn's credit and the one it kept.
        assert_eq!(flows.next(|_| true), Some(a));
        assert_eq!(flows.next(|_| true), Some(a));
        assert_eq!(flows.next(|_| true), Some(b));
        assert_eq!(flows.next(|_| false), None, "nobody eligible");
    }

    #[test]
    fn a_bystander_counts_only_its_share_of_a_flood_as_ahead() {
        let mut flows = flows(&[("gold", 2)], 8);
        for _ in 0..100 {
            flows.join(Some("flood"));
        }
        assert_eq!(
            flows.ahead(Some("bystander")),
            Some(1),
            "one round of the flood"
        );
        flows.join(Some("bystander"));
        assert_eq!(
            flows.ahead(Some("bystander")),
            Some(3),
            "two rounds, and its own"
        );
        assert_eq!(
            flows.ahead(Some("gold")),
            Some(2),
            "one round of each other"
        );
        assert_eq!(
            flows.ahead(Some("flood")),
            Some(101),
            "the flood waits for itself"
        );
        assert_eq!(
            Flows::new(&FairnessSettings::default(), Arc::default()).ahead(Some("a")),
            None
        );
    }

    #[test]
    fn off_makes_no_flows() {
        let mut flows = Flows::new(&FairnessSettings::default(), Arc::default());
        assert_eq!(flows.join(Some("a")), FlowId::NONE);
        assert_eq!(flows.active(), 0);
        let mut text = String::new();
        flows.metrics.render(&mut text);
        assert!(text.is_empty(), "no fairness metrics while off");
    }

    #[test]
    fn clients_are_keyed_by_ip_and_tenants_by_name() {
        let peer = Some("10.0.0.1".parse().unwrap());
        let via = |client| Origin {
            tenant: Some("acme"),
            client,
            peer,
        };
        let client = FairnessMode::Client;
        assert_eq!(
            client.key(via(Some("10.9.9.9:4000"))).as_deref(),
            Some("10.9.9.9")
        );
        assert_eq!(
            client.key(via(Some("10.9.9.9:4001"))),
            client.key(via(Some("10.9.9.9:4000"))),
            "more connections buy no more share"
        );
        assert_eq!(
            client.key(via(None)).as_deref(),
            Some("10.0.0.1"),
            "the peer"
        );
        assert_eq!(client.key(via(Some("junk"))).as_deref(), Some("10.0.0.1"));
        assert_eq!(FairnessMode::Tenant.key(via(None)).as_deref(), Some("acme"));
        let untenanted = Origin::default();
        assert_eq!(FairnessMode::Tenant.key(untenanted).as_deref(), Some(""));
        assert_eq!(FairnessMode::Off.key(via(None)), None);
    }
}
