//! The [`Router`]: hands one request to a target. It takes the target group's snapshot,
//! lets [`routing::choose`] decide, counts the request on the target, and gives it to one
//! of the target's upstream connections; or queues it when every eligible target is full,
//! or answers `unavailable` when none can take it. The wait queue's task ([`Router::run_queue`])
//! lives here too: it is the router, retried as capacity appears.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tidepool_protocol::{ErrorCode, Priority};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RoutingPolicy;
use crate::metrics::{Metrics, Reject};
use crate::pending::Request;
use crate::queue::{QueueHandle, QueueReceiver};
use crate::registry::TargetGroup;
use crate::routing::{self, Candidate, Choice};
use crate::target::InFlight;
use crate::upstream::Forward;

/// What routing needs per caller and reuses across requests, so that routing allocates
/// nothing in the steady state.
pub(crate) struct Scratch {
    candidates: Vec<Candidate>,
    rng: SmallRng,
}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch {
            candidates: Vec::new(),
            rng: SmallRng::from_rng(&mut rand::rng()),
        }
    }
}

/// How requests are routed: `--routing`, `--fail-open`, `--max-outstanding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RoutingSettings {
    /// How a target is picked among the eligible ones.
    pub(crate) policy: RoutingPolicy,
    /// With no healthy target, route to the registered ones anyway.
    pub(crate) fail_open: bool,
    /// Most requests outstanding on one target; `None` for no limit.
    pub(crate) max_outstanding: Option<usize>,
    /// The retry hint given with `unavailable` when no target can take a request: the
    /// time until the next health check may change that.
    pub(crate) retry_after: Duration,
}

/// The outcome of [`Router::try_route`].
pub(crate) enum Routed {
    /// Handed to a target, or answered (cancelled, deadline passed).
    Done,
    /// Every eligible target is at its limit.
    Full(Request),
    /// No target can take it.
    NoTarget(Request),
}

/// Routes requests to the target group's targets, queueing those that must wait.
pub(crate) struct Router {
    group: TargetGroup,
    queue: QueueHandle,
    settings: RoutingSettings,
    /// The round-robin ticket counter.
    round_robin: AtomicUsize,
    /// For the time requests spend in the queue.
    metrics: Arc<Metrics>,
}

impl Router {
    /// A router over `group` that queues through `queue`.
    pub(crate) fn new(
        group: TargetGroup,
        queue: QueueHandle,
        settings: RoutingSettings,
        metrics: Arc<Metrics>,
    ) -> Router {
        Router {
            group,
            queue,
            settings,
            round_robin: AtomicUsize::new(0),
            metrics,
        }
    }

    /// True when some request could be routed now (a `ping` to the balancer passes).
    pub(crate) fn routable(&self) -> bool {
        self.group.routable(self.settings.fail_open)
    }

    /// The healthy targets' addresses, for what any one of them can answer (`metadata`).
    pub(crate) fn healthy_targets(&self) -> Vec<std::net::SocketAddr> {
        self.group
            .snapshot()
            .iter()
            .filter(|t| t.state() == crate::target::TargetState::Healthy)
            .map(|t| t.addr())
            .collect()
    }

    /// The TLS towards the targets, for connections of a request's own (`metadata`).
    pub(crate) fn upstream_tls(&self) -> Option<tidepool_protocol::tls::TlsConnector> {
        self.group.upstream_tls()
    }

    /// Routes a newly read request, queueing it when it must wait.
    pub(crate) async fn submit(&self, request: Request, scratch: &mut Scratch) {
        // A request just read is routed as of the time it was read (microseconds ago):
        // no clock read of its own on the path every request takes.
        let now = request.pending.received();
        self.queue.retries().note_request(now);
        // While others wait, a new request waits behind them: first come, first served.
        if self.queue.signal().len() > 0 {
            self.queue.push(request);
            return;
        }
        match self.try_route(request, scratch, now).await {
            Routed::Done => {}
            Routed::Full(request) => self.queue.push(request),
            Routed::NoTarget(request) => self.no_target(request),
        }
    }

    /// Answers a request no target can take.
    pub(crate) fn no_target(&self, request: Request) {
        let message = if self.settings.fail_open {
            "no target is registered and reachable"
        } else {
            "no target is healthy (fail-open is off)"
        };
        let retry = u64::try_from(self.settings.retry_after.as_millis()).unwrap_or(u64::MAX);
        request.pending.reject(
            Reject::NoTarget,
            ErrorCode::Unavailable,
            message,
            Some(retry),
        );
    }

    /// One attempt to hand `request` to a target at `now`.
    pub(crate) async fn try_route(
        &self,
        mut request: Request,
        scratch: &mut Scratch,
        now: Instant,
    ) -> Routed {
        if request.pending.expired(now) {
            request.pending.time_up("waiting in the balancer");
            return Routed::Done;
        }
        if let Err(passed) = request
            .payload
            .deadline_left_at(request.pending.received(), now)
        {
            request.pending.deadline_passed(passed);
            return Routed::Done;
        }
        let limit = self.settings.max_outstanding;
        let targets = self.group.snapshot();
        scratch.candidates.clear();
        // A retried request never goes back to the target it was lost at.
        let lost_at = request.pending.retried_from();
        self.queue.outliers().set_pool_size(targets.len());
        scratch.candidates.extend(targets.iter().map(|t| {
            let outstanding = t.outstanding();
            Candidate {
                set_aside: t.outlier.set_aside(now),
                state: t.state(),
                outstanding,
                weight: t.weight(),
                connected: t.connected() && lost_at != Some(t.addr()),
                full: limit.is_some_and(|l| outstanding >= l),
            }
        }));
        // Each pass that fails marks one candidate unusable, so this ends.
        for _ in 0..=targets.len() {
            let ticket = match self.settings.policy {
                RoutingPolicy::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            let index = match routing::choose(
                self.settings.policy,
                &scratch.candidates,
                self.settings.fail_open,
                ticket,
                &mut scratch.rng,
            ) {
                Choice::Target(index) => index,
                Choice::Full => return Routed::Full(request),
                Choice::NoTarget => return Routed::NoTarget(request),
            };
            let target = &targets[index];
            let Some(guard) = InFlight::try_acquire(target, limit) else {
                // Another task took the last place since the snapshot.
                scratch.candidates[index].full = true;
                continue;
            };
            let Some(conn) = target.pick_conn() else {
                scratch.candidates[index].connected = false;
                continue;
            };
            let upstream_id = conn.next_id();
            if !request.pending.mark_sent(&conn, upstream_id) {
                request.pending.reject(
                    Reject::Cancelled,
                    ErrorCode::Cancelled,
                    "cancelled by the client before it reached a target",
                    None,
                );
                return Routed::Done;
            }
            request.pending.set_in_flight(guard);
            match conn
                .send(Forward {
                    upstream_id,
                    request,
                })
                .await
            {
                Ok(()) => return Routed::Done,
                Err(forward) => {
                    // The connection closed before taking it: nothing was written.
                    request = forward.request;
                    request.pending.clear_in_flight();
                    request.pending.mark_waiting();
                    scratch.candidates[index].connected = false;
                }
            }
        }
        Routed::NoTarget(request)
    }

    /// The wait queue's task: routes waiting requests as capacity appears, answers
    /// `overloaded` past `--queue-timeout`. Stops at `stop` (the drain deadline); what
    /// still waits then is answered `shutting_down`.
    pub(crate) async fn run_queue(&self, mut rx: QueueReceiver, stop: CancellationToken) {
        let signal = Arc::clone(self.queue.signal());
        let timeout = self.queue.timeout();
        let mut waiting: VecDeque<(Request, Instant)> = VecDeque::new();
        let mut scratch = Scratch::new();
        // The earliest deadline (or request timeout) among the waiting: only when it has
        // passed is the queue scanned for requests whose time is up.
        let mut next_expiry: Option<Instant> = None;
        let earlier = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        loop {
            // Entries are in arrival order with one timeout, so the front expires first.
            let expiry = waiting.front().map(|(_, since)| *since + timeout);
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                request = rx.recv() => match request {
                    Some(request) => {
                        next_expiry = earlier(next_expiry, request.pending.expiry().map(|e| e.at));
                        waiting.push_back((request, Instant::now()));
                    }
                    None => break,
                },
                () = signal.woken() => {}
                () = sleep_until(earlier(expiry, next_expiry)) => {}
            }
            while let Ok(request) = rx.try_recv() {
                next_expiry = earlier(next_expiry, request.pending.expiry().map(|e| e.at));
                waiting.push_back((request, Instant::now()));
            }

            let now = Instant::now();
            if next_expiry.is_some_and(|at| at <= now) {
                let before = waiting.len();
                let mut kept = VecDeque::with_capacity(before);
                next_expiry = None;
                for (request, since) in waiting.drain(..) {
                    if request.pending.expired(now) {
                        self.metrics.queue_wait.record(now - since);
                        request.pending.time_up("waiting in the balancer's queue");
                    } else {
                        next_expiry = earlier(next_expiry, request.pending.expiry().map(|e| e.at));
                        kept.push_back((request, since));
                    }
                }
                signal.left(before - kept.len());
                waiting = kept;
            }
            while waiting
                .front()
                .is_some_and(|(_, since)| *since + timeout <= now)
            {
                let Some((request, since)) = waiting.pop_front() else {
                    break;
                };
                signal.left(1);
                self.metrics.queue_wait.record(now - since);
                request.pending.reject(
                    Reject::QueueTimeout,
                    ErrorCode::Overloaded,
                    format!(
                        "waited {} in the balancer's queue without a target below its outstanding limit",
                        humantime::format_duration(timeout)
                    ),
                    Some(self.queue.retry_after_ms()),
                );
            }

            // The highest priority class first, oldest first within it; the queue stays in
            // arrival order for the timeouts above, which also bound how long a low
            // request can be passed over.
            while let Some(at) = next_to_route(&waiting) {
                let Some((request, since)) = waiting.remove(at) else {
                    break;
                };
                match self.try_route(request, &mut scratch, Instant::now()).await {
                    Routed::Done => {
                        signal.left(1);
                        self.metrics.queue_wait.record(since.elapsed());
                    }
                    Routed::Full(request) => {
                        waiting.insert(at, (request, since));
                        break;
                    }
                    Routed::NoTarget(request) => {
                        signal.left(1);
                        self.metrics.queue_wait.record(since.elapsed());
                        self.no_target(request);
                    }
                }
            }
        }
        rx.close();
        signal.left(waiting.len());
        // Dropping the entries answers them (`shutting_down`, the drain deadline has passed).
        drop(waiting);
        while let Ok(request) = rx.try_recv() {
            signal.left(1);
            drop(request);
        }
    }
}

/// Where the next request to route waits: the first (oldest) of the highest priority class.
fn next_to_route(waiting: &VecDeque<(Request, Instant)>) -> Option<usize> {
    let mut best: Option<(usize, Priority)> = None;
    for (i, (request, _)) in waiting.iter().enumerate() {
        let priority = request.payload.priority();
        if best.is_none_or(|(_, b)| priority > b) {
            best = Some((i, priority));
            if priority == Priority::High {
                break;
            }
        }
    }
    best.map(|(i, _)| i)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tidepool_protocol::{ErrorReply, Infer, InferResult, Message, RequestId};
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::HealthProtocol;
    use crate::health::HealthCheck;
    use crate::pending::{Answer, ClientConn, Lifecycle, Outbound, Payload, Pending, Slot};
    use crate::queue::QueueSignal;
    use crate::registry::GroupSettings;
    use crate::target::{Target, TargetState, Thresholds};
    use crate::upstream::{Outlets, UpstreamConn, UpstreamSettings};
    use crate::validation::TargetRules;

    const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
    const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

    fn settings(policy: RoutingPolicy) -> RoutingSettings {
        RoutingSettings {
            policy,
            fail_open: true,
            max_outstanding: None,
            retry_after: HEALTH_INTERVAL,
        }
    }

    /// A router over targets whose connections are channels the test reads, one client
    /// connection whose answers the test reads, and the queue task running.
    struct Fixture {
        router: Arc<Router>,
        group: TargetGroup,
        client: Arc<ClientConn>,
        answers: mpsc::UnboundedReceiver<Outbound>,
        scratch: Scratch,
        next_id: RequestId,
        stop: CancellationToken,
    }

    impl Fixture {
        fn new(settings: RoutingSettings, queue_capacity: usize) -> Fixture {
            let metrics = Arc::new(Metrics::default());
            let signal = Arc::new(QueueSignal::default());
            let (queue, rx) = QueueHandle::new(queue_capacity, QUEUE_TIMEOUT, Arc::clone(&signal));
            let group = TargetGroup::new(
                GroupSettings {
                    connections_per_target: 1,
                    deregistration_delay: Duration::from_secs(30),
                    health: HealthCheck {
                        protocol: HealthProtocol::Tcp,
                        interval: HEALTH_INTERVAL,
                        timeout: Duration::from_secs(1),
                        thresholds: Thresholds {
                            healthy: 1,
                            unhealthy: 1,
                        },
                    },
                    upstream: UpstreamSettings {
                        connect_timeout: Duration::from_secs(1),
                        max_frame: 1 << 20,
                        keepalive: Duration::from_secs(30),
                    },
                    upstream_tls: None,
                    shards: crate::shard::ShardRuntimes::default(),
                },
                TargetRules::new(Vec::new(), Vec::new(), 64),
                signal,
                queue.reroute(),
                Arc::clone(&metrics),
            );
            let router = Arc::new(Router::new(
                group.clone(),
                queue,
                settings,
                Arc::clone(&metrics),
            ));
            let stop = CancellationToken::new();
            tokio::spawn({
                let (router, stop) = (Arc::clone(&router), stop.clone());
                async move { router.run_queue(rx, stop).await }
            });
            let (tx, answers) = mpsc::unbounded_channel();
            let client = Arc::new(ClientConn::new(
                tx,
                "192.0.2.1:5000".to_owned(),
                metrics,
                Arc::new(Lifecycle::default()),
            ));
            Fixture {
                router,
                group,
                client,
                answers,
                scratch: Scratch::new(),
                next_id: 1,
                stop,
            }
        }

        /// A target at 127.0.0.1:`port` in `state`, with one open connection whose
        /// writer's side the test holds.
        fn target(&self, port: u16, state: TargetState) -> (Arc<Target>, Outlets) {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let target = self.group.register_idle(addr, 1);
            let (conn, outlets) = UpstreamConn::new(addr, target.stop.child_token());
            target.attach(0, conn);
            if state != TargetState::Initial {
                target.set_health(state);
            }
            (target, outlets)
        }

        /// Reads a new request from the client and submits it; returns its client id.
        async fn submit(&mut self) -> RequestId {
            self.submit_with(None).await
        }

        /// Reads a new request with `deadline_ms` (under a long `--request-timeout`) and
        /// submits it; returns its client id.
        async fn submit_with(&mut self, deadline_ms: Option<u64>) -> RequestId {
            self.submit_as(deadline_ms, Priority::Normal).await
        }

        /// [`Fixture::submit_with`] at `priority`.
        async fn submit_as(&mut self, deadline_ms: Option<u64>, priority: Priority) -> RequestId {
            let id = self.next_id;
            self.next_id += 1;
            self.client.slots.insert(id, Slot::Waiting);
            let mut pending = Pending::new(Arc::clone(&self.client), id, None, Instant::now());
            if deadline_ms.is_some() {
                pending.set_expiry(deadline_ms, Duration::from_secs(300));
            }
            let request = Request {
                pending,
                payload: Payload::Decoded(Infer {
                    id,
                    priority,
                    ..Infer::default()
                }),
                reroutes: 0,
            };
            self.router.submit(request, &mut self.scratch).await;
            id
        }

        /// The next answer the client got, if any.
        fn answer(&mut self) -> Option<Message> {
            match self.answers.try_recv().ok()?.answer {
                Answer::Message(msg) => Some(*msg),
                Answer::Raw { .. } => panic!("no raw answer is made in these tests"),
            }
        }

        /// The next answer, which must be an error.
        fn error(&mut self) -> ErrorReply {
            match self.answer() {
                Some(Message::Error(reply)) => reply,
                other => panic!("expected an error answer, got {other:?}"),
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    /// Lets the queue task run up to its next wait.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// The requests a target's connection received, in order.
    fn received(outlets: &mut Outlets) -> Vec<Forward> {
        std::iter::from_fn(|| outlets.requests.try_recv().ok()).collect()
    }

    /// Answers a forwarded request as the target would.
    fn complete(forward: Forward) {
        forward.request.pending.answer(Message::Result(InferResult {
            id: forward.upstream_id,
            ..InferResult::default()
        }));
    }

    /// A fixture with one healthy target that takes one request at a time
    /// (`--max-outstanding 1`) and a queue of `queue_capacity`.
    fn one_place(queue_capacity: usize) -> (Fixture, Arc<Target>, Outlets) {
        let f = Fixture::new(
            RoutingSettings {
                max_outstanding: Some(1),
                ..settings(RoutingPolicy::P2c)
            },
            queue_capacity,
        );
        let (target, conn) = f.target(1, TargetState::Healthy);
        (f, target, conn)
    }

    /// Holds `n` requests outstanding on `target`.
    fn load(target: &Arc<Target>, n: usize) -> Vec<InFlight> {
        (0..n)
            .map(|_| InFlight::try_acquire(target, None).unwrap())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_sends_to_the_less_loaded_of_two() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (busy, mut busy_conn) = f.target(1, TargetState::Healthy);
        let (_idle, mut idle_conn) = f.target(2, TargetState::Healthy);
        let _held = load(&busy, 5);
        // With two targets p2c always compares both; the idle one stays below 5 throughout.
        for _ in 0..5 {
            f.submit().await;
        }
        assert_eq!(received(&mut idle_conn).len(), 5);
        assert!(received(&mut busy_conn).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_scan_sends_to_the_least_loaded_of_all() {
        let mut f = Fixture::new(settings(RoutingPolicy::FullScan), 8);
        let (a, mut a_conn) = f.target(1, TargetState::Healthy);
        let (b, mut b_conn) = f.target(2, TargetState::Healthy);
        let (c, mut c_conn) = f.target(3, TargetState::Healthy);
        let _held = [load(&a, 3), load(&b, 1), load(&c, 2)];
        f.submit().await;
        assert_eq!(b.outstanding(), 2, "counted on its target");
        assert_eq!(received(&mut b_conn).len(), 1);
        assert!(received(&mut a_conn).is_empty() && received(&mut c_conn).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn fail_open_routes_to_unhealthy_targets_when_none_is_healthy() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (_sick, mut sick_conn) = f.target(1, TargetState::Unhealthy);
        f.submit().await;
        assert_eq!(received(&mut sick_conn).len(), 1);
        assert!(f.router.routable());

        let mut f = Fixture::new(
            RoutingSettings {
                fail_open: false,
                ..settings(RoutingPolicy::P2c)
            },
            8,
        );
        let (_sick, mut sick_conn) = f.target(1, TargetState::Unhealthy);
        let id = f.submit().await;
        assert!(received(&mut sick_conn).is_empty());
        assert!(!f.router.routable());
        let reply = f.error();
        assert_eq!(reply.id, id);
        assert_eq!(reply.code, ErrorCode::Unavailable);
        assert!(
            reply.message.contains("fail-open is off"),
            "{}",
            reply.message
        );
        assert_eq!(reply.retry_after_ms, Some(5000), "the next health check");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_answers_overloaded() {
        let (mut f, _a, mut a_conn) = one_place(1);
        f.submit().await;
        f.submit().await;
        let third = f.submit().await;
        settle().await;
        assert_eq!(received(&mut a_conn).len(), 1);
        assert_eq!(f.router.queue.signal().len(), 1, "the second waits");
        let reply = f.error();
        assert_eq!(reply.id, third);
        assert_eq!(reply.code, ErrorCode::Overloaded);
        assert!(
            reply.message.contains("queue of 1 is full"),
            "{}",
            reply.message
        );
        assert_eq!(reply.retry_after_ms, Some(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_no_longer_than_the_queue_timeout() {
        let (mut f, _a, mut a_conn) = one_place(4);
        f.submit().await;
        let waiting = f.submit().await;
        settle().await;
        tokio::time::sleep(QUEUE_TIMEOUT - Duration::from_millis(1)).await;
        settle().await;
        assert!(f.answer().is_none(), "still waiting");
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        let reply = f.error();
        assert_eq!(reply.id, waiting);
        assert_eq!(reply.code, ErrorCode::Overloaded);
        assert!(reply.message.contains("waited 1s"), "{}", reply.message);
        assert_eq!(f.router.queue.signal().len(), 0);
        assert_eq!(received(&mut a_conn).len(), 1, "only the first was routed");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_woken_as_requests_complete_first_come_first_served() {
        let (mut f, target, mut conn) = one_place(8);
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(f.submit().await);
        }
        settle().await;
        assert_eq!(f.router.queue.signal().len(), 3);

        // Each completion frees the one place, and the oldest waiter takes it.
        let mut answered = Vec::new();
        for _ in 0..4 {
            let mut sent = received(&mut conn);
            assert_eq!(sent.len(), 1, "one at a time: the limit is 1");
            assert_eq!(target.outstanding(), 1);
            complete(sent.remove(0));
            settle().await;
            match f.answer() {
                Some(Message::Result(result)) => answered.push(result.id),
                other => panic!("expected a result, got {other:?}"),
            }
        }
        assert_eq!(answered, ids, "answered in arrival order");
        assert_eq!(f.router.queue.signal().len(), 0);
        assert_eq!(target.outstanding(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_routed_highest_priority_first_oldest_first_within_it() {
        let (mut f, _target, mut conn) = one_place(8);
        let first = f.submit().await;
        let low = f.submit_as(None, Priority::Low).await;
        let normal = f.submit().await;
        let high = f.submit_as(None, Priority::High).await;
        let normal_later = f.submit().await;
        settle().await;
        assert_eq!(f.router.queue.signal().len(), 4);
        let mut order = Vec::new();
        for _ in 0..5 {
            complete(received(&mut conn).remove(0));
            settle().await;
            order.push(f.answer().unwrap().id());
        }
        assert_eq!(order, vec![first, high, normal, normal_later, low]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_request_waits_behind_the_queued_ones() {
        let (mut f, target, mut conn) = one_place(8);
        f.submit().await;
        let queued = f.submit().await;
        settle().await;
        // Room appears, but before the queue task runs a new request arrives: it may not
        // overtake the one already waiting.
        complete(received(&mut conn).remove(0));
        let late = f.submit().await;
        settle().await;
        let sent = received(&mut conn);
        assert_eq!(sent.len(), 1);
        assert_eq!(target.outstanding(), 1);
        complete(sent.into_iter().next().unwrap());
        settle().await;
        complete(received(&mut conn).remove(0));
        settle().await;
        let order: Vec<RequestId> = std::iter::from_fn(|| f.answer()).map(|m| m.id()).collect();
        assert_eq!(order, vec![1, queued, late]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_expires_at_its_deadline_and_the_rest_keep_their_order() {
        let (mut f, _target, mut conn) = one_place(8);
        let first = f.submit().await;
        let late = f.submit_with(Some(300)).await;
        let early = f.submit_with(Some(100)).await;
        let patient = f.submit().await;
        settle().await;
        assert_eq!(f.router.queue.signal().len(), 3);

        tokio::time::sleep(Duration::from_millis(99)).await;
        settle().await;
        assert!(f.answer().is_none(), "nothing due before 100 ms");
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        let reply = f.error();
        assert_eq!(
            reply.id, early,
            "the earliest deadline first, though queued later"
        );
        assert_eq!(reply.code, ErrorCode::DeadlineExceeded);
        assert!(
            reply.message.contains("100 ms") && reply.message.contains("queue"),
            "{}",
            reply.message
        );
        assert!(f.answer().is_none());

        tokio::time::sleep(Duration::from_millis(199)).await;
        settle().await;
        assert!(f.answer().is_none(), "nothing due before 300 ms");
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(f.error().id, late);
        assert_eq!(f.router.queue.signal().len(), 1);

        // The one left still goes next when the place frees, within the queue timeout.
        let sent = received(&mut conn);
        assert_eq!(sent.len(), 1);
        complete(sent.into_iter().next().unwrap());
        settle().await;
        let next = received(&mut conn);
        assert_eq!(next.len(), 1, "the patient one was routed");
        complete(next.into_iter().next().unwrap());
        settle().await;
        let order: Vec<RequestId> = std::iter::from_fn(|| f.answer()).map(|m| m.id()).collect();
        assert_eq!(order, vec![first, patient]);
        assert_eq!(f.router.queue.signal().len(), 0);
    }
}
