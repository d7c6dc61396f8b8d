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
use tidepool_protocol::ErrorCode;
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

    /// Routes a newly read request, queueing it when it must wait.
    pub(crate) async fn submit(&self, request: Request, scratch: &mut Scratch) {
        // While others wait, a new request waits behind them: first come, first served.
        if self.queue.signal().len() > 0 {
            self.queue.push(request);
            return;
        }
        match self.try_route(request, scratch).await {
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

    /// One attempt to hand `request` to a target now.
    pub(crate) async fn try_route(&self, mut request: Request, scratch: &mut Scratch) -> Routed {
        if let Err(passed) = request.payload.deadline_left(request.pending.received()) {
            request.pending.deadline_passed(passed);
            return Routed::Done;
        }
        let limit = self.settings.max_outstanding;
        let targets = self.group.snapshot();
        scratch.candidates.clear();
        scratch.candidates.extend(targets.iter().map(|t| {
            let outstanding = t.outstanding();
            Candidate {
                state: t.state(),
                outstanding,
                weight: t.weight(),
                connected: t.connected(),
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
        loop {
            // Entries are in arrival order with one timeout, so the front expires first.
            let expiry = waiting.front().map(|(_, since)| *since + timeout);
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                request = rx.recv() => match request {
                    Some(request) => waiting.push_back((request, Instant::now())),
                    None => break,
                },
                () = signal.woken() => {}
                () = sleep_until(expiry) => {}
            }
            while let Ok(request) = rx.try_recv() {
                waiting.push_back((request, Instant::now()));
            }

            let now = Instant::now();
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

            while let Some((request, since)) = waiting.pop_front() {
                match self.try_route(request, &mut scratch).await {
                    Routed::Done => {
                        signal.left(1);
                        self.metrics.queue_wait.record(since.elapsed());
                    }
                    Routed::Full(request) => {
                        waiting.push_front((request, since));
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

