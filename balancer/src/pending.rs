//! The pending entry: the one thing that may answer a client's request, and that does
//! answer it exactly once.
//!
//! A [`Pending`] is created when a request is read and travels with it: through the wait
//! queue, to an upstream connection's map, back out with the target's answer. Answering
//! consumes it. Dropping it unanswered (a lost connection, a stopped task, a forgotten
//! branch) answers `unavailable`, or `shutting_down` once the drain deadline has passed.
//! A second answer cannot be written because there is no second owner.
//!
//! A hedged request (`hedge`) is one request sent to two targets: its entry is split into
//! two attempts that share a [`Race`]. The race owns the one [`Answerer`]; the first
//! attempt to answer with a result takes it, and the other's answer, when it comes, finds
//! it gone and is dropped. An attempt that fails (an error, a lost connection, a timeout)
//! steps aside while the other is still running, and answers only when it is the last.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tidepool_protocol::{ErrorCode, ErrorReply, Infer, Message, RawMessage, RequestId};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::client_ids::ClientIds;
use crate::metrics::{Metrics, Reject};
use crate::target::InFlight;
use crate::upstream::UpstreamConn;

/// Where a client's request is, for forwarding its `cancel`.
pub(crate) enum Slot {
    /// Read, not yet handed to an upstream connection (routing or queued).
    Waiting,
    /// The client cancelled it before it reached a target; it is answered `cancelled`
    /// when it leaves the queue.
    Cancelled,
    /// Handed to `conn` under `upstream_id`; a cancel follows it there.
    Sent {
        conn: Arc<UpstreamConn>,
        upstream_id: RequestId,
    },
    /// Hedged: handed to two connections; a cancel follows it to both, and the one that
    /// has not answered when the other did is abandoned.
    Raced([(Arc<UpstreamConn>, RequestId); 2]),
}

impl Slot {
    /// Forwards a client's cancel to wherever the request is.
    fn cancel(&mut self) {
        match self {
            Slot::Waiting => *self = Slot::Cancelled,
            Slot::Sent { conn, upstream_id } => conn.cancel(*upstream_id),
            Slot::Raced(attempts) => {
                for (conn, upstream_id) in attempts.iter() {
                    conn.cancel(*upstream_id);
                }
            }
            Slot::Cancelled => {}
        }
    }
}

/// One answer on its way to a client, holding the connection's in-flight permit until it
/// is written, so that a client that does not read bounds what waits for it.
pub(crate) struct Outbound {
    pub(crate) answer: Answer,
    pub(crate) _permit: Option<OwnedSemaphorePermit>,
}

/// What is written to the client.
pub(crate) enum Answer {
    /// A message the balancer made or decoded, its id already the client's. Boxed: a
    /// `Message` is 272 bytes and every answer moves through the client's channel, while
    /// the common answer (a target's `result`) is `Raw`.
    Message(Box<Message>),
    /// A target's `result` as received, written with the client's id spliced in.
    Raw {
        result: RawMessage,
        client_id: RequestId,
    },
}

/// The request as read from the client.
#[derive(Clone)]
pub(crate) enum Payload {
    /// The common case: the frame as received, to be spliced (new id, deadline, client).
    Raw(RawMessage),
    /// A body that only the full decoder could read (an unusual encoding): re-encoded.
    Decoded(Infer),
}

impl Payload {
    /// The client's `priority` (forwarded unchanged; orders the wait queue).
    pub(crate) fn priority(&self) -> tidepool_protocol::Priority {
        match self {
            Payload::Raw(raw) => raw.priority(),
            Payload::Decoded(infer) => infer.priority,
        }
    }

    /// The client's `deadline_ms`.
    pub(crate) fn deadline_ms(&self) -> Option<u64> {
        match self {
            Payload::Raw(raw) => raw.deadline_ms(),
            Payload::Decoded(infer) => infer.deadline_ms,
        }
    }

    /// What is left of the client's deadline for a request read at `received`: `None`
    /// when it has none, [`DeadlinePassed`] when it ran out inside the balancer.
    ///
    /// The one deadline check: routing asks before choosing a target, the upstream writer
    /// before writing (and sends the target what is left).
    pub(crate) fn deadline_left(&self, received: Instant) -> Result<Option<u64>, DeadlinePassed> {
        // The clock only for a request that has a deadline.
        match self.deadline_ms() {
            None => Ok(None),
            Some(_) => self.deadline_left_at(received, Instant::now()),
        }
    }

    /// [`deadline_left`](Payload::deadline_left) at `now`, for a caller that read the
    /// clock already.
    pub(crate) fn deadline_left_at(
        &self,
        received: Instant,
        now: Instant,
    ) -> Result<Option<u64>, DeadlinePassed> {
        let Some(budget_ms) = self.deadline_ms() else {
            return Ok(None);
        };
        let spent =
            u64::try_from(now.saturating_duration_since(received).as_millis()).unwrap_or(u64::MAX);
        if spent >= budget_ms {
            return Err(DeadlinePassed { budget_ms });
        }
        Ok(Some(budget_ms - spent))
    }
}

/// When a request must be answered by, wherever it is, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expiry {
    /// The moment: when the frame was read plus the budget.
    pub(crate) at: Instant,
    /// The budget: the client's `deadline_ms`, or `--request-timeout` when that is shorter
    /// or there is none.
    pub(crate) cause: ExpiryCause,
}

/// Where a request's time limit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExpiryCause {
    /// The client's `deadline_ms`.
    Deadline(u64),
    /// The balancer's `--request-timeout`.
    RequestTimeout(std::time::Duration),
}

impl Expiry {
    /// The limit of a request read at `received` with the client's `deadline_ms`, under
    /// `request_timeout`.
    pub(crate) fn new(
        received: Instant,
        deadline_ms: Option<u64>,
        request_timeout: std::time::Duration,
    ) -> Expiry {
        let cause = match deadline_ms {
            Some(ms) if std::time::Duration::from_millis(ms) <= request_timeout => {
                ExpiryCause::Deadline(ms)
            }
            _ => ExpiryCause::RequestTimeout(request_timeout),
        };
        let budget = match cause {
            ExpiryCause::Deadline(ms) => std::time::Duration::from_millis(ms),
            ExpiryCause::RequestTimeout(timeout) => timeout,
        };
        Expiry {
            at: received + budget,
            cause,
        }
    }
}

/// A request's deadline ran out while it was still in the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeadlinePassed {
    /// The client's `deadline_ms`.
    pub(crate) budget_ms: u64,
}

/// Requests alive in the whole balancer, for draining at shutdown.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    live: AtomicUsize,
    all_done: Notify,
    /// Set when the drain deadline passed: what is still pending is answered
    /// `shutting_down` rather than `unavailable`.
    stopping: AtomicBool,
}

impl Lifecycle {
    /// Requests read and not yet answered.
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Waits until no request is pending.
    pub(crate) async fn all_done(&self) {
        loop {
            let notified = self.all_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The part of a client connection that its requests share: the way to its writer and
/// where each of its requests is.
pub(crate) struct ClientConn {
    answers: mpsc::UnboundedSender<Outbound>,
    /// The client's `ip:port`, sent to targets as `client` (as NLB preserves the client IP).
    pub(crate) peer: String,
    /// Client id → where the request is. An id is here from the moment it is read until
    /// just before its answer is queued, so a reused id is refused only while in flight.
    pub(crate) slots: DashMap<RequestId, Slot, ClientIds>,
    pub(crate) metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    opened: Instant,
    /// Milliseconds from `opened` to the last frame read or written (idle timeout).
    last_activity_ms: AtomicU64,
}

impl ClientConn {
    pub(crate) fn new(
        answers: mpsc::UnboundedSender<Outbound>,
        peer: String,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> ClientConn {
        ClientConn {
            answers,
            peer,
            slots: DashMap::with_hasher(ClientIds::new()),
            metrics,
            lifecycle,
            opened: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
        }
    }

    /// Queues a frame for the client that answers no pending request (a pong, an error
    /// about an unreadable frame).
    pub(crate) fn send(&self, msg: Message, permit: Option<OwnedSemaphorePermit>) {
        self.send_answer(Answer::Message(Box::new(msg)), permit);
    }

    fn send_answer(&self, answer: Answer, permit: Option<OwnedSemaphorePermit>) {
        // A closed channel means the writer is gone with the client: nobody to answer.
        let _ = self.answers.send(Outbound {
            answer,
            _permit: permit,
        });
    }

    /// Notes traffic now; returns now.
    pub(crate) fn touch(&self) -> Instant {
        let now = Instant::now();
        let ms = u64::try_from(now.saturating_duration_since(self.opened).as_millis())
            .unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
        now
    }

    /// When traffic was last seen.
    pub(crate) fn last_activity(&self) -> Instant {
        self.opened
            + std::time::Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Forwards a client's `cancel`: to the target when the request is there, or marks
    /// it so that it never leaves the balancer.
    pub(crate) fn cancel(&self, id: RequestId) {
        if let Some(mut slot) = self.slots.get_mut(&id) {
            slot.cancel();
        }
    }

    /// The client is gone: cancel everything it still has in flight.
    pub(crate) fn cancel_all(&self) {
        for mut slot in self.slots.iter_mut() {
            slot.cancel();
        }
    }
}

/// The right to answer one client request. Exactly one exists per request: it answers
/// once, explicitly or (`unavailable`, `shutting_down`) when dropped unused.
struct Answerer {
    conn: Arc<ClientConn>,
    id: RequestId,
    permit: Option<OwnedSemaphorePermit>,
    answered: bool,
}

impl Answerer {
    fn new(conn: Arc<ClientConn>, id: RequestId, permit: Option<OwnedSemaphorePermit>) -> Self {
        conn.lifecycle.live.fetch_add(1, Ordering::AcqRel);
        Answerer {
            conn,
            id,
            permit,
            answered: false,
        }
    }

    fn deliver(&mut self, answer: Answer) {
        self.answered = true;
        // Free the id before the answer can reach the client, who may reuse it at once.
        let slot = self.conn.slots.remove(&self.id);
        // A hedged request's attempt that did not win is taken off its connection (its
        // outstanding count released) and its target told to cancel it. Out of the map
        // guard: the attempt's entry drops here.
        if let Some((_, Slot::Raced(attempts))) = slot {
            for (conn, upstream_id) in attempts {
                conn.abandon(upstream_id);
            }
        }
        self.conn.send_answer(answer, self.permit.take());
    }
}

impl Drop for Answerer {
    fn drop(&mut self) {
        if !self.answered {
            let (reason, code, message) = if self.conn.lifecycle.stopping() {
                (
                    Reject::ShuttingDown,
                    ErrorCode::ShuttingDown,
                    "the balancer is shutting down and the drain timeout passed",
                )
            } else {
                (
                    Reject::ConnectionLost,
                    ErrorCode::Unavailable,
                    "the request was dropped inside the balancer; it may or may not have run",
                )
            };
            self.conn.metrics.reject(reason);
            let reply = ErrorReply::new(self.id, code, message);
            self.deliver(Answer::Message(Box::new(Message::Error(reply))));
        }
        if self.conn.lifecycle.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.lifecycle.all_done.notify_waiters();
        }
    }
}

/// The attempts of one hedged request: the one [`Answerer`] and how many attempts are
/// still running. A std mutex, held only to take the answerer or count an attempt out.
#[derive(Default)]
pub(crate) struct Race {
    state: Mutex<RaceState>,
}

#[derive(Default)]
struct RaceState {
    /// `None` once an attempt has answered.
    answerer: Option<Answerer>,
    /// Attempts that have neither answered nor stepped aside.
    running: u8,
}

impl Race {
    fn state(&self) -> std::sync::MutexGuard<'_, RaceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An attempt is done: it takes the answerer when it brings a result (`decisive`) or
    /// is the last attempt running; otherwise it steps aside for the other. `None` when
    /// another attempt answered first, or this one steps aside.
    fn settle(&self, decisive: bool) -> Option<Answerer> {
        let mut state = self.state();
        state.running = state.running.saturating_sub(1);
        if decisive || state.running == 0 {
            state.answerer.take()
        } else {
            None
        }
    }
}

/// Who answers for a [`Pending`].
enum Owner {
    /// The entry alone.
    Sole(Answerer),
    /// One attempt of a hedged request; `hedge` is the second one.
    Raced { race: Arc<Race>, hedge: bool },
    /// Answered or stepped aside: nothing left to do.
    Done,
}

/// A client's request from the moment it is read until it is answered.
///
/// A handle on a heap [`Entry`]: requests move by value through the router's futures, the
/// upstream channel and maps at every step, and moving eight bytes costs nothing where
/// moving the entry (~290 bytes, with the kept request) was a fifth of the balancer's
/// instructions per frame in `memcpy`. One allocation per request buys that back.
pub(crate) struct Pending(Box<Entry>);

/// What a [`Pending`] holds.
struct Entry {
    conn: Arc<ClientConn>,
    id: RequestId,
    received: Instant,
    in_flight: Option<InFlight>,
    /// When the balancer answers `deadline_exceeded` itself, if the target has not
    /// answered; `None` only for entries made in tests.
    expiry: Option<Expiry>,
    /// The written request, kept while it is at a target so that it can be sent once more
    /// if its connection is lost (`--retries on`) or hedged (`--hedge-after`): `Bytes`
    /// clones of the frame, no copy.
    kept: Option<(Payload, u32)>,
    /// The target it was lost at, once it has been retried: a request is retried once,
    /// and never back to the target it was lost at. A hedge holds the first attempt's
    /// target here, so that routing sends it elsewhere.
    retried_from: Option<SocketAddr>,
    owner: Owner,
}

impl Pending {
    /// Takes ownership of answering request `id` of `conn`, read at `received`. The caller
    /// has put `id` in `conn.slots` as [`Slot::Waiting`].
    pub(crate) fn new(
        conn: Arc<ClientConn>,
        id: RequestId,
        permit: Option<OwnedSemaphorePermit>,
        received: Instant,
    ) -> Pending {
        Pending(Box::new(Entry {
            owner: Owner::Sole(Answerer::new(Arc::clone(&conn), id, permit)),
            conn,
            id,
            received,
            in_flight: None,
            expiry: None,
            kept: None,
            retried_from: None,
        }))
    }

    /// When the request was read.
    pub(crate) fn received(&self) -> Instant {
        self.0.received
    }

    /// Sets when the request must be answered by: its deadline or `request_timeout`.
    pub(crate) fn set_expiry(
        &mut self,
        deadline_ms: Option<u64>,
        request_timeout: std::time::Duration,
    ) {
        self.0.expiry = Some(Expiry::new(self.0.received, deadline_ms, request_timeout));
    }

    /// When the request must be answered by.
    pub(crate) fn expiry(&self) -> Option<Expiry> {
        self.0.expiry
    }

    /// True when its time is up.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.0.expiry.is_some_and(|e| e.at <= now)
    }

    /// Answers `deadline_exceeded` because its time ran out `where_` (in the queue, at a
    /// target).
    pub(crate) fn time_up(self, where_: &str) {
        let message = match self.0.expiry.map(|e| e.cause) {
            Some(ExpiryCause::RequestTimeout(timeout)) => format!(
                "no answer within the balancer's --request-timeout of {} while the request was {where_}; send a deadline_ms, or ask the operator to raise it",
                humantime::format_duration(timeout)
            ),
            Some(ExpiryCause::Deadline(ms)) => {
                format!("the deadline of {ms} ms passed while the request was {where_}")
            }
            None => format!("the request's time ran out while it was {where_}"),
        };
        self.reject(
            Reject::DeadlineExceeded,
            ErrorCode::DeadlineExceeded,
            message,
            None,
        );
    }

    /// The client's address, for the `client` field.
    pub(crate) fn peer(&self) -> &str {
        &self.0.conn.peer
    }

    /// Counts the request on the target it was routed to (replacing an earlier one).
    pub(crate) fn set_in_flight(&mut self, guard: InFlight) {
        self.0.in_flight = Some(guard);
    }

    /// Stops counting it on a target, before routing it again.
    pub(crate) fn clear_in_flight(&mut self) {
        self.0.in_flight = None;
    }

    /// Records that it is handed to `conn` under `upstream_id`; false when the client
    /// cancelled it first (or, for a hedge, when the request was answered already).
    pub(crate) fn mark_sent(&self, conn: &Arc<UpstreamConn>, upstream_id: RequestId) -> bool {
        let hedge = matches!(self.0.owner, Owner::Raced { hedge: true, .. });
        let previous = match self.0.conn.slots.get_mut(&self.0.id) {
            Some(mut slot) if !matches!(*slot, Slot::Cancelled) => {
                let next = match &*slot {
                    // The hedge joins the first attempt: a cancel must reach both.
                    Slot::Sent {
                        conn: first,
                        upstream_id: first_id,
                    } if hedge => Slot::Raced([
                        (Arc::clone(first), *first_id),
                        (Arc::clone(conn), upstream_id),
                    ]),
                    _ => Slot::Sent {
                        conn: Arc::clone(conn),
                        upstream_id,
                    },
                };
                std::mem::replace(&mut *slot, next)
            }
            _ => return false,
        };
        // Dropped after the map guard: the last handle on an old connection may drop
        // pending entries, which take this map's lock.
        drop(previous);
        true
    }

    /// Records that it is back in the balancer (its connection was lost before writing).
    pub(crate) fn mark_waiting(&self) {
        let previous = match self.0.conn.slots.get_mut(&self.0.id) {
            Some(mut slot) if matches!(*slot, Slot::Sent { .. }) => {
                std::mem::replace(&mut *slot, Slot::Waiting)
            }
            _ => return,
        };
        // As in `mark_sent`: never drop a connection handle under the map guard.
        drop(previous);
    }

    /// Keeps the request written to a target with its entry, for a retry should the
    /// connection be lost before the answer, or a hedge.
    pub(crate) fn keep(&mut self, payload: Payload, reroutes: u32) {
        self.0.kept = Some((payload, reroutes));
    }

    /// Takes back what [`keep`](Pending::keep) kept.
    pub(crate) fn unkeep(&mut self) -> Option<(Payload, u32)> {
        self.0.kept.take()
    }

    /// True when it can be sent once more, now: it was kept, never retried nor hedged,
    /// and its time is not up.
    pub(crate) fn retryable(&self, now: Instant) -> bool {
        matches!(self.0.owner, Owner::Sole(_))
            && self.0.retried_from.is_none()
            && self.0.kept.is_some()
            && !self.expired(now)
            && self
                .0
                .kept
                .as_ref()
                .is_some_and(|(payload, _)| payload.deadline_left(self.0.received).is_ok())
    }

    /// The request again, to be sent to another target than `lost_at`; the entry back when
    /// it cannot be retried (nothing kept, it was retried already, or it is hedged).
    pub(crate) fn into_retry(mut self, lost_at: SocketAddr) -> Result<Request, Pending> {
        if self.0.retried_from.is_some() || !matches!(self.0.owner, Owner::Sole(_)) {
            return Err(self);
        }
        let Some((payload, reroutes)) = self.0.kept.take() else {
            return Err(self);
        };
        self.0.retried_from = Some(lost_at);
        Ok(Request {
            pending: self,
            payload,
            reroutes,
        })
    }

    /// Splits the entry, written to target `first` and still unanswered, into two
    /// attempts of one [`Race`]: this one stays where it is, the one returned (the hedge)
    /// is to be routed to another target. `None` when it cannot be hedged (nothing kept,
    /// retried or hedged already).
    pub(crate) fn hedge(&mut self, first: SocketAddr) -> Option<Request> {
        if self.0.retried_from.is_some() || !matches!(self.0.owner, Owner::Sole(_)) {
            return None;
        }
        let (payload, reroutes) = self.0.kept.take()?;
        let race = Arc::new(Race::default());
        let raced = Owner::Raced {
            race: Arc::clone(&race),
            hedge: false,
        };
        if let Owner::Sole(answerer) = std::mem::replace(&mut self.0.owner, raced) {
            let mut state = race.state();
            state.answerer = Some(answerer);
            state.running = 2;
        }
        Some(Request {
            pending: Pending(Box::new(Entry {
                conn: Arc::clone(&self.0.conn),
                id: self.0.id,
                received: self.0.received,
                in_flight: None,
                expiry: self.0.expiry,
                kept: None,
                retried_from: Some(first),
                owner: Owner::Raced { race, hedge: true },
            })),
            payload,
            reroutes,
        })
    }

    /// True when it may still be hedged: kept, neither retried nor hedged.
    pub(crate) fn hedgeable(&self) -> bool {
        matches!(self.0.owner, Owner::Sole(_))
            && self.0.retried_from.is_none()
            && self.0.kept.is_some()
    }

    /// The target a retried request was lost at, which routing passes over.
    pub(crate) fn retried_from(&self) -> Option<SocketAddr> {
        self.0.retried_from
    }

    /// Answers with the target's `result` or `error`, under the client's id.
    pub(crate) fn answer(mut self, mut msg: Message) {
        if let Some(guard) = &self.0.in_flight {
            guard.target().latency.record(self.0.received.elapsed());
        }
        msg.set_id(self.0.id);
        let decisive = matches!(msg, Message::Result(_));
        self.finish(Answer::Message(Box::new(msg)), decisive, None);
    }

    /// Answers with the target's `result` as received at `now`; the client's id is spliced
    /// in as it is written.
    pub(crate) fn answer_raw(mut self, result: RawMessage, now: Instant) {
        if let Some(guard) = &self.0.in_flight {
            guard
                .target()
                .latency
                .record(now.saturating_duration_since(self.0.received));
        }
        let client_id = self.0.id;
        self.finish(Answer::Raw { result, client_id }, true, None);
    }

    /// Answers with the balancer's own error.
    pub(crate) fn reject(
        mut self,
        reason: Reject,
        code: ErrorCode,
        message: impl Into<String>,
        retry_after_ms: Option<u64>,
    ) {
        let mut reply = ErrorReply::new(self.0.id, code, message);
        reply.retry_after_ms = retry_after_ms;
        self.finish(
            Answer::Message(Box::new(Message::Error(reply))),
            false,
            Some(reason),
        );
    }

    /// Answers `deadline_exceeded`: the deadline ran out before a target got the request.
    pub(crate) fn deadline_passed(self, passed: DeadlinePassed) {
        self.reject(
            Reject::DeadlineExceeded,
            ErrorCode::DeadlineExceeded,
            format!(
                "the deadline of {} ms passed while the request waited in the balancer",
                passed.budget_ms
            ),
            None,
        );
    }

    /// Answers `unavailable` because the request may have reached a target that is now
    /// out of reach, or `shutting_down` past the drain deadline.
    pub(crate) fn lost(self, message: impl Into<String>) {
        if self.0.conn.lifecycle.stopping() {
            self.reject(
                Reject::ShuttingDown,
                ErrorCode::ShuttingDown,
                "the balancer is shutting down and the drain timeout passed",
                None,
            );
        } else {
            self.reject(
                Reject::ConnectionLost,
                ErrorCode::Unavailable,
                message,
                None,
            );
        }
    }

    /// Answers through the answerer, when this entry holds it or wins its race: a result
    /// (`decisive`) wins; an error answers only from the last attempt running. A losing
    /// result is dropped here: the client has its answer.
    fn finish(&mut self, answer: Answer, decisive: bool, reason: Option<Reject>) {
        let answerer = match std::mem::replace(&mut self.0.owner, Owner::Done) {
            Owner::Sole(answerer) => Some(answerer),
            Owner::Raced { race, hedge } => {
                let answerer = race.settle(decisive);
                let races = &self.0.conn.metrics.races;
                match (&answerer, decisive) {
                    (Some(_), true) if hedge => {
                        races.won_by_hedge.fetch_add(1, Ordering::Relaxed);
                    }
                    (None, true) => {
                        races.late_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                answerer
            }
            Owner::Done => None,
        };
        if let Some(mut answerer) = answerer {
            if let Some(reason) = reason {
                self.0.conn.metrics.reject(reason);
            }
            answerer.deliver(answer);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Release the target before the drain count, so a drain that sees zero requests
        // also sees zero outstanding.
        self.0.in_flight = None;
        match std::mem::replace(&mut self.0.owner, Owner::Done) {
            // Unanswered, it answers as it drops.
            Owner::Sole(answerer) => drop(answerer),
            // The last attempt of a race answers for it; another steps aside.
            Owner::Raced { race, .. } => drop(race.settle(false)),
            Owner::Done => {}
        }
    }
}

/// A request on its way to a target.
pub(crate) struct Request {
    /// Who answers it.
    pub(crate) pending: Pending,
    /// The request itself, its id still the client's until an upstream writes it.
    pub(crate) payload: Payload,
    /// How many times it was routed again after a connection loss.
    pub(crate) reroutes: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Forward;

    #[test]
    fn a_request_moves_in_registers_not_in_a_memcpy() {
        // A request is moved several times on its way (router futures, the upstream
        // channel, the writer): at 440 bytes, `memcpy` was a fifth of the balancer's
        // instructions per frame. LLVM moves up to 128 bytes with a few stores.
        assert_eq!(std::mem::size_of::<Pending>(), 8);
        assert!(std::mem::size_of::<Request>() <= 128);
        assert!(std::mem::size_of::<Forward>() <= 128);
    }
}
