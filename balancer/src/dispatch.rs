//! Handing one request to a target: take a snapshot, let [`routing::choose`] decide, count
//! the request on the target, give it to one of the target's upstream connections; or
//! queue it when every eligible target is full, or answer `unavailable` when none is.

use std::sync::atomic::Ordering;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tidepool_protocol::ErrorCode;

use crate::balancer::Shared;
use crate::config::RoutingPolicy;
use crate::metrics::Reject;
use crate::pending::Request;
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

/// The outcome of [`Shared::try_route`].
pub(crate) enum Routed {
    /// Handed to a target, or answered (cancelled, deadline passed).
    Done,
    /// Every eligible target is at its limit.
    Full(Request),
    /// No target can take it.
    NoTarget(Request),
}

impl Shared {
    /// Routes a newly read request, queueing it when it must wait.
    pub(crate) async fn submit(&self, request: Request, scratch: &mut Scratch) {
        // While others wait, a new request waits behind them: first come, first served.
        if self.queue.signal.len() > 0 {
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
        let message = if self.config.fail_open {
            "no target is registered and reachable"
        } else {
            "no target is healthy (fail-open is off)"
        };
        let retry = u64::try_from(self.config.health_interval.as_millis()).unwrap_or(u64::MAX);
        request.pending.reject(
            Reject::NoTarget,
            ErrorCode::Unavailable,
            message,
            Some(retry),
        );
    }

    /// One attempt to hand `request` to a target now.
    pub(crate) async fn try_route(&self, mut request: Request, scratch: &mut Scratch) -> Routed {
        if let Some(budget) = request.payload.deadline_ms() {
            let spent = request.pending.received().elapsed().as_millis();
            if spent >= u128::from(budget) {
                request.pending.reject(
                    Reject::DeadlineExceeded,
                    ErrorCode::DeadlineExceeded,
                    format!("the deadline of {budget} ms passed while the request waited in the balancer"),
                    None,
                );
                return Routed::Done;
            }
        }
        let limit = self.config.max_outstanding;
        let targets = self.registry.snapshot();
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
            let ticket = match self.config.routing {
                RoutingPolicy::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            let index = match routing::choose(
                self.config.routing,
                &scratch.candidates,
                self.config.fail_open,
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
}
