//! The [`Router`]: hands one request to a target. It takes the target group's snapshot,
//! lets [`routing::choose`] decide, lets [`admission`] judge a request with a deadline
//! (answering it at once when no eligible target is predicted to make it), counts the
//! request on the target, and gives it to one of the target's upstream connections; or
//! queues it when every eligible target is full, or answers `unavailable` when none can
//! take it. The wait queue's task ([`Router::run_queue`])
//! lives here too: it is the router, retried as capacity appears.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tidepool_protocol::{late_retry_ms, ErrorCode, Priority};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::{self, Refusal, Verdict};
use crate::config::{Admission, RoutingPolicy};
use crate::metrics::{Metrics, Reject};
use crate::pending::Request;
use crate::queue::{QueueHandle, QueueReceiver};
use crate::registry::TargetGroup;
use crate::routing::{self, Candidate, Choice};
use crate::target::{InFlight, Target};
use crate::throttle::LogThrottle;
use crate::upstream::{Forward, UpstreamConn};

/// What routing needs per caller and reuses across requests, so that routing allocates
/// nothing in the steady state.
pub(crate) struct Scratch {
    candidates: Vec<Candidate>,
    rng: SmallRng,
    /// Where the current read burst's requests went, so that the burst leaves in as few
    /// `send`s as routing allows. Cleared at the end of each burst ([`Scratch::end_burst`]).
    burst: Burst,
}

/// The targets and connections one read burst's requests went to.
#[derive(Default)]
struct Burst {
    /// The connection the burst uses on each target it went to (at most one per target,
    /// which is compared by identity: a target registered again at the same address while
    /// the old one drains is another target): a target's requests of one burst share one
    /// connection, and so one `send`, instead of taking its connections in turn. Which
    /// connection carries a request does not change which target it goes to.
    conns: Vec<(Arc<Target>, Arc<UpstreamConn>)>,
    /// Which of `conns` the burst's last request went to: the next one goes to that target
    /// too while [`routing::keeps`] says it is still near the least loaded
    /// (least-outstanding policies only; round-robin takes turns per request).
    last: Option<usize>,
}

impl Burst {
    /// The target the burst's last request went to.
    fn last(&self) -> Option<&Arc<Target>> {
        self.last.and_then(|i| self.conns.get(i)).map(|(t, _)| t)
    }

    /// The open connection this burst already uses on `target`.
    fn conn(&self, target: &Arc<Target>) -> Option<Arc<UpstreamConn>> {
        self.conns
            .iter()
            .find(|(t, c)| Arc::ptr_eq(t, target) && !c.is_closed())
            .map(|(_, c)| Arc::clone(c))
    }

    /// A request of this burst went to `conn` of `target`.
    fn sent(&mut self, target: &Arc<Target>, conn: Arc<UpstreamConn>) {
        let at = match self.conns.iter().position(|(t, _)| Arc::ptr_eq(t, target)) {
            Some(at) => {
                // A closed connection gives way to the one that replaced it.
                if !Arc::ptr_eq(&self.conns[at].1, &conn) {
                    self.conns[at].1 = conn;
                }
                at
            }
            None => {
                self.conns.push((Arc::clone(target), conn));
                self.conns.len() - 1
            }
        };
        self.last = Some(at);
    }
}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch {
            candidates: Vec::new(),
            rng: SmallRng::from_rng(&mut rand::rng()),
            burst: Burst::default(),
        }
    }

    /// The requests read together have all been routed: the next one is routed afresh.
    pub(crate) fn end_burst(&mut self) {
        self.burst.last = None;
        self.burst.conns.clear();
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
    /// Whether requests with a deadline are judged before they are forwarded
    /// ([`admission`]).
    pub(crate) admission: Admission,
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
    /// One line a second about requests admission refused: a flood of doomed requests is
    /// counted on `/metrics`, not logged one by one.
    refusal_log: LogThrottle,
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
            refusal_log: LogThrottle::default(),
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
        // What is left of a deadline, when admission judges it: a request without one
        // costs nothing more here.
        let left = match request
            .payload
            .deadline_left_at(request.pending.received(), now)
        {
            Err(passed) => {
                request.pending.deadline_passed(passed);
                return Routed::Done;
            }
            Ok(left) => left
                .filter(|_| self.settings.admission == Admission::Predicted)
                .map(Duration::from_millis),
        };
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
        // The target this burst's previous request went to (least-outstanding policies
        // only: round-robin takes turns per request).
        let last = match (scratch.burst.last(), self.settings.policy) {
            (_, RoutingPolicy::RoundRobin) | (None, _) => None,
            (Some(last), _) => targets.iter().position(|t| Arc::ptr_eq(t, last)),
        };
        // Each pass that fails marks one candidate unusable, so this ends.
        for _ in 0..=targets.len() {
            let ticket = match self.settings.policy {
                RoutingPolicy::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            let kept =
                last.filter(|&i| routing::keeps(&scratch.candidates, self.settings.fail_open, i));
            let index = match kept {
                Some(index) => index,
                None => match routing::choose(
                    self.settings.policy,
                    &scratch.candidates,
                    self.settings.fail_open,
                    ticket,
                    &mut scratch.rng,
                ) {
                    Choice::Target(index) => index,
                    Choice::Full => return Routed::Full(request),
                    Choice::NoTarget => return Routed::NoTarget(request),
                },
            };
            let index = match left {
                None => index,
                Some(left) => match self.admit(
                    &targets,
                    &scratch.candidates,
                    index,
                    request.payload.priority(),
                    left,
                ) {
                    Ok(index) => index,
                    Err((refusal, at)) => {
                        self.refuse(
                            request,
                            refusal,
                            &targets[at],
                            &scratch.candidates[at],
                            left,
                        );
                        return Routed::Done;
                    }
                },
            };
            let target = &targets[index];
            let Some(mut guard) = InFlight::try_acquire(target, limit) else {
                // Another task took the last place since the snapshot.
                scratch.candidates[index].full = true;
                continue;
            };
            // The connection this burst already uses on the target, so that its requests
            // there share a `send`.
            let conn = scratch.burst.conn(target).or_else(|| target.pick_conn());
            let Some(conn) = conn else {
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
            if request.payload.priority() == Priority::Low {
                guard.count_low();
            }
            request.pending.set_in_flight(guard);
            match conn
                .send(Forward {
                    upstream_id,
                    request,
                })
                .await
            {
                Ok(()) => {
                    scratch.burst.sent(target, conn);
                    return Routed::Done;
                }
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

    /// Predicted-finish admission ([`admission`]) of a request of `priority` with `left` of
    /// its deadline: `chosen` when it is predicted in time, else the open target predicted
    /// in time with the fewest outstanding; when none is, why, with the target that came
    /// nearest.
    fn admit(
        &self,
        targets: &[Arc<Target>],
        candidates: &[Candidate],
        chosen: usize,
        priority: Priority,
        left: Duration,
    ) -> Result<usize, (Refusal, usize)> {
        let judge = |i: usize| {
            let target = &targets[i];
            let ahead = admission::ahead(
                priority,
                candidates[i].outstanding,
                target.low_outstanding(),
            );
            admission::judge(target.batch_times(), ahead, left)
        };
        if judge(chosen) == Verdict::Admit {
            return Ok(chosen);
        }
        // Off the common path: the chosen target would be late, so every open one is asked.
        // (`chosen` is among the open ones: routing picked it from them.)
        let (verdict, at) = routing::open(candidates, self.settings.fail_open)
            .map(|i| (judge(i), i))
            .min_by_key(|(verdict, i)| (verdict.rank(), candidates[*i].outstanding))
            .unwrap_or_else(|| (judge(chosen), chosen));
        match verdict {
            Verdict::Admit => Ok(at),
            Verdict::Refuse(refusal) => Err((refusal, at)),
        }
    }

    /// Answers a request that admission refused, predicted on `target` (the one that came
    /// nearest to its deadline, with `candidate`'s outstanding count).
    fn refuse(
        &self,
        request: Request,
        refusal: Refusal,
        target: &Target,
        candidate: &Candidate,
        left: Duration,
    ) {
        let budget_ms = request.payload.deadline_ms().unwrap_or_default();
        if let Some(suppressed) = self.refusal_log.allow() {
            tracing::info!(
                target = %target.addr(),
                outstanding = candidate.outstanding,
                left_ms = left.as_millis(),
                ?refusal,
                suppressed,
                "refused a request that no target is predicted to answer by its deadline"
            );
        }
        match refusal {
            Refusal::Late { finish, late_by } => request.pending.reject(
                Reject::PredictedLate,
                ErrorCode::Overloaded,
                format!(
                    "the balancer predicts this request would be answered in {} ms at the earliest, on the target predicted soonest ({} requests outstanding there), after its deadline_ms of {budget_ms} ({} ms were left); it was not forwarded: retry after retry_after_ms, or with a larger deadline_ms",
                    finish.as_millis(),
                    candidate.outstanding,
                    left.as_millis()
                ),
                Some(late_retry_ms(late_by)),
            ),
            Refusal::Doomed { alone } => request.pending.reject(
                Reject::Doomed,
                ErrorCode::DeadlineExceeded,
                format!(
                    "its deadline_ms of {budget_ms} left {} ms, less than the fastest target takes to run a batch of one ({} ms); it was not forwarded: retry with a larger deadline_ms",
                    left.as_millis(),
                    alone.as_millis()
                ),
                None,
            ),
        }
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
            // What one pass routed is the queue's burst.
            scratch.end_burst();
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
            admission: Admission::Predicted,
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
            Fixture::with_conns(settings, queue_capacity, 1)
        }

        /// A fixture whose targets keep `conns` connections each ([`Fixture::targets_conns`]).
        fn with_conns(settings: RoutingSettings, queue_capacity: usize, conns: usize) -> Fixture {
            let metrics = Arc::new(Metrics::default());
            let signal = Arc::new(QueueSignal::default());
            let (queue, rx) = QueueHandle::new(queue_capacity, QUEUE_TIMEOUT, Arc::clone(&signal));
            let group = TargetGroup::new(
                GroupSettings {
                    connections_per_target: conns,
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

        /// Registers a target at 127.0.0.1:`port`, healthy, with each of its connection slots
        /// attached to a connection whose writer's side the test holds.
        fn target_conns(&self, port: u16) -> (Arc<Target>, Vec<Outlets>) {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let target = self.group.register_idle(addr, 1);
            let outlets = (0..target.conn_slots())
                .map(|slot| {
                    let (conn, outlets) = UpstreamConn::new(addr, target.stop.child_token());
                    target.attach(slot, conn);
                    outlets
                })
                .collect();
            target.set_health(TargetState::Healthy);
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
                    deadline_ms,
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

    /// A worker whose batch of one takes 11 ms and a full batch of 8 takes 18 ms.
    const TIMES: tidepool_protocol::BatchTimes = tidepool_protocol::BatchTimes {
        one_us: 11_000,
        full_us: 18_000,
        max_batch: 8,
        instances: 1,
    };

    /// Records on `target` a `pong` that reports `times`.
    fn report(target: &Target, times: Option<tidepool_protocol::BatchTimes>) {
        target.set_reported_load(Some(tidepool_protocol::Load {
            busy: 0.5,
            queue_us: 0,
            batches: times,
        }));
    }

    /// How many requests the balancer refused for `reason`, as `/metrics` shows it.
    fn refused(f: &Fixture, reason: &str) -> u64 {
        let text = f.router.metrics.render(&[], 0);
        let line = format!("tidepool_rejected_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.parse().ok())
            .expect("the reason is rendered")
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_no_target_can_answer_in_time_is_refused_and_never_forwarded() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (target, mut conn) = f.target(1, TargetState::Healthy);
        report(&target, Some(TIMES));
        // A batch running, two full ones ahead: 36 ms, then 11 for its own.
        let _held = load(&target, 24);

        let late = f.submit_with(Some(40)).await;
        let reply = f.error();
        assert_eq!(reply.id, late, "answered under its own id");
        assert_eq!(reply.code, ErrorCode::Overloaded);
        assert_eq!(reply.retry_after_ms, Some(8), "7 ms too late, rounded up");
        assert!(
            reply.message.contains("answered in 47 ms")
                && reply.message.contains("deadline_ms of 40")
                && reply.message.contains("24 requests outstanding"),
            "{}",
            reply.message
        );
        assert!(received(&mut conn).is_empty(), "never forwarded");
        assert_eq!(target.outstanding(), 24, "nothing counted on the target");
        assert_eq!(refused(&f, "predicted_late"), 1);

        let doomed = f.submit_with(Some(5)).await;
        let reply = f.error();
        assert_eq!(reply.id, doomed);
        assert_eq!(reply.code, ErrorCode::DeadlineExceeded);
        assert!(
            reply.message.contains("batch of one (11 ms)"),
            "{}",
            reply.message
        );
        assert_eq!(refused(&f, "doomed"), 1);
        assert!(received(&mut conn).is_empty());

        // In time, and without a deadline: forwarded as ever.
        f.submit_with(Some(47)).await;
        f.submit().await;
        let sent = received(&mut conn);
        assert_eq!(sent.len(), 2);
        assert!(f.answer().is_none(), "no answer but the target's");
        assert_eq!(refused(&f, "predicted_late"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_choice_gives_way_to_a_target_that_is_in_time() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        // Fewer outstanding, so routing picks it, but slow: 50 ms for a batch of one and
        // a full batch of 100 ahead.
        let (slow, mut slow_conn) = f.target(1, TargetState::Healthy);
        report(
            &slow,
            Some(tidepool_protocol::BatchTimes {
                one_us: 50_000,
                full_us: 100_000,
                max_batch: 8,
                instances: 1,
            }),
        );
        let _slow_held = load(&slow, 16);
        let (fast, mut fast_conn) = f.target(2, TargetState::Healthy);
        report(&fast, Some(TIMES));
        let _fast_held = load(&fast, 24);

        f.submit_with(Some(60)).await;
        assert!(f.answer().is_none(), "admitted");
        assert!(received(&mut slow_conn).is_empty());
        assert_eq!(received(&mut fast_conn).len(), 1, "47 ms on the fast one");
        // Without a deadline, least outstanding as ever.
        f.submit().await;
        assert_eq!(received(&mut slow_conn).len(), 1);
        assert_eq!(refused(&f, "predicted_late"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn targets_without_a_report_and_admission_off_forward_everything() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (target, mut conn) = f.target(1, TargetState::Healthy);
        let _held = load(&target, 1_000);
        f.submit_with(Some(1)).await;
        report(&target, None);
        f.submit_with(Some(1)).await;
        assert_eq!(received(&mut conn).len(), 2, "no batch times, no forecast");

        let mut f = Fixture::new(
            RoutingSettings {
                admission: Admission::Off,
                ..settings(RoutingPolicy::P2c)
            },
            8,
        );
        let (target, mut conn) = f.target(1, TargetState::Healthy);
        report(&target, Some(TIMES));
        let _held = load(&target, 1_000);
        f.submit_with(Some(1)).await;
        let sent = received(&mut conn);
        assert_eq!(sent.len(), 1, "--admission off");
        assert!(f.answer().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_judged_by_what_it_would_wait_behind() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (target, mut conn) = f.target(1, TargetState::Healthy);
        report(&target, Some(TIMES));
        let mut held = load(&target, 24);
        for guard in &mut held {
            guard.count_low();
        }
        // 24 low requests outstanding: 47 ms for another low one, 11 for a normal one.
        let low = f.submit_as(Some(40), Priority::Low).await;
        assert_eq!(f.error().id, low);
        f.submit_as(Some(40), Priority::Normal).await;
        // Held, not dropped: a dropped request is answered `unavailable`.
        let normal_sent = received(&mut conn);
        assert_eq!(normal_sent.len(), 1, "the normal one goes ahead of them");

        let _normal_held = load(&target, 24);
        let normal = f.submit_as(Some(40), Priority::Normal).await;
        assert_eq!(f.error().id, normal);
        // A high one may be served next whatever waits: refused only if doomed.
        f.submit_as(Some(11), Priority::High).await;
        let high_sent = received(&mut conn);
        assert_eq!(high_sent.len(), 1);
        let doomed = f.submit_as(Some(10), Priority::High).await;
        let reply = f.error();
        assert_eq!(
            (reply.id, reply.code),
            (doomed, ErrorCode::DeadlineExceeded)
        );
        assert_eq!(refused(&f, "predicted_late"), 2);
        assert_eq!(refused(&f, "doomed"), 1);

        // The low count follows the guards.
        assert_eq!(target.low_outstanding(), 24);
        f.submit_as(None, Priority::Low).await;
        assert_eq!(target.low_outstanding(), 25);
        drop(received(&mut conn));
        drop(held);
        assert_eq!(target.low_outstanding(), 0);
    }

    /// How many requests each of `outlets` received (and holds outstanding).
    fn counts(outlets: &mut [Outlets], held: &mut Vec<Forward>) -> Vec<usize> {
        outlets
            .iter_mut()
            .map(|o| {
                let got = received(o);
                let n = got.len();
                held.extend(got);
                n
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_burst_shares_one_connection_per_target_and_bursts_take_turns() {
        let mut f = Fixture::with_conns(settings(RoutingPolicy::P2c), 8, 2);
        let (_target, mut conns) = f.target_conns(1);
        let mut held = Vec::new();
        for _ in 0..5 {
            f.submit().await;
        }
        let first = counts(&mut conns, &mut held);
        assert!(
            first == [5, 0] || first == [0, 5],
            "one connection: {first:?}"
        );
        f.scratch.end_burst();
        for _ in 0..5 {
            f.submit().await;
        }
        let second = counts(&mut conns, &mut held);
        assert_eq!(
            second,
            [first[1], first[0]],
            "the next burst takes the other connection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_stays_on_its_target_within_the_slack_then_moves() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (a, a_conn) = f.target(1, TargetState::Healthy);
        let (b, b_conn) = f.target(2, TargetState::Healthy);
        let mut conns = [a_conn, b_conn];
        // A deep pipeline: 40 outstanding on each, so a burst may lead by 40 / 4 = 10.
        let _held = [load(&a, 40), load(&b, 40)];
        let mut held = Vec::new();
        f.submit().await;
        let first = counts(&mut conns, &mut held);
        let (kept, other) = if first[0] == 1 { (0, 1) } else { (1, 0) };
        for _ in 0..10 {
            f.submit().await;
        }
        let run = counts(&mut conns, &mut held);
        assert_eq!(run[kept], 10, "kept up to 51 = 40 + 1 + 10: {run:?}");
        f.submit().await;
        let next = counts(&mut conns, &mut held);
        assert_eq!(next[other], 1, "past the slack: the least loaded");
        // A new burst is routed afresh: least outstanding as ever.
        f.scratch.end_burst();
        f.submit().await;
        assert_eq!(counts(&mut conns, &mut held)[other], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn with_few_outstanding_a_burst_spreads_as_least_outstanding_would() {
        // A skewed pool at half load: a slow target's backlog is what p99 waits behind, and
        // a burst must not pile onto it.
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (_slow, slow_conn) = f.target(1, TargetState::Healthy);
        let (_fast, fast_conn) = f.target(2, TargetState::Healthy);
        let mut conns = [slow_conn, fast_conn];
        let mut held = Vec::new();
        for _ in 0..6 {
            f.submit().await;
        }
        assert_eq!(counts(&mut conns, &mut held), [3, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_takes_turns_within_a_burst() {
        let mut f = Fixture::new(settings(RoutingPolicy::RoundRobin), 8);
        let (_a, a_conn) = f.target(1, TargetState::Healthy);
        let (_b, b_conn) = f.target(2, TargetState::Healthy);
        let mut conns = [a_conn, b_conn];
        let mut held = Vec::new();
        for _ in 0..6 {
            f.submit().await;
        }
        assert_eq!(counts(&mut conns, &mut held), [3, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_never_takes_a_drained_targets_connection_for_its_successor() {
        let mut f = Fixture::new(settings(RoutingPolicy::P2c), 8);
        let (old, mut old_conn) = f.target(1, TargetState::Healthy);
        f.submit().await;
        let held = received(&mut old_conn);
        assert_eq!(held.len(), 1);
        // Deregistered (draining, its connection still open for what it holds) and
        // registered again at the same address within the same burst.
        assert!(f.group.deregister(old.addr()));
        let (new, mut new_conn) = f.target(1, TargetState::Healthy);
        assert!(!Arc::ptr_eq(&old, &new));
        f.submit().await;
        assert!(received(&mut old_conn).is_empty(), "not the old target's");
        let sent = received(&mut new_conn);
        assert_eq!(sent.len(), 1);
        assert_eq!(new.outstanding(), 1, "counted on the new target");
    }
}
