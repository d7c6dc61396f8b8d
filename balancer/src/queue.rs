//! The balancer's wait queue: requests that found every eligible target at its
//! `--max-outstanding` limit wait here for `--queue-timeout` at most, and are routed highest
//! `priority` first, in arrival order within a class.
//!
//! The queue is an actor: one task owns the waiting requests (the loop lives beside the
//! router that routes them, in `dispatch.rs`); requests reach it over a channel whose
//! length is bounded by a counter checked before sending (`--queue`), and finishing
//! requests wake it through [`QueueSignal`]. This file holds the two ways in:
//! [`QueueHandle`] for new requests (bounded) and [`Reroute`] for requests an upstream
//! connection hands back unwritten (already admitted, so past the bound).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::ErrorCode;
use tokio::sync::{mpsc, Notify};

use crate::hedge::Hedges;
use crate::metrics::Reject;
use crate::outlier::{OutlierSettings, Outliers};
use crate::pending::Request;
use crate::retry::{Retries, RetrySettings};

/// The queue's length and its wake-up, shared with every target.
#[derive(Debug, Default)]
pub(crate) struct QueueSignal {
    /// Requests sent to the queue task and not yet routed or answered.
    len: AtomicUsize,
    wake: Notify,
}

impl QueueSignal {
    /// Requests waiting now.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Capacity may have appeared (a request finished, a target became healthy): let the
    /// queue try again. Costs one load when the queue is empty.
    pub(crate) fn wake(&self) {
        if self.len() > 0 {
            self.wake.notify_one();
        }
    }

    /// Waits for [`wake`](QueueSignal::wake) (the queue task's side).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// `n` requests left the queue (routed or answered) (the queue task's side).
    pub(crate) fn left(&self, n: usize) {
        self.len.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The receiving end, owned by the queue task.
pub(crate) type QueueReceiver = mpsc::UnboundedReceiver<Request>;

/// A way into the queue for requests that were already admitted: an upstream connection
/// hands back what it never wrote. Narrow on purpose, so that upstream code can reach
/// nothing else of routing.
#[derive(Clone, Debug)]
pub(crate) struct Reroute {
    tx: mpsc::UnboundedSender<Request>,
    signal: Arc<QueueSignal>,
    /// The retry policy, for requests lost with their connection after being written.
    retries: Retries,
    /// Outlier detection, which the connections tell every answer: routing's other
    /// feedback from the targets.
    outliers: Outliers,
    /// Hedging (`--hedge-after`), which watches every written request; `None` when off.
    hedges: Option<Hedges>,
}

impl Reroute {
    /// Puts an already admitted request (re-routed after a connection loss) in the queue,
    /// past the bound.
    pub(crate) fn send(&self, request: Request) {
        self.signal.len.fetch_add(1, Ordering::AcqRel);
        self.send_counted(request);
    }

    /// The retry policy and its budget.
    pub(crate) fn retries(&self) -> &Retries {
        &self.retries
    }

    /// Outlier detection.
    pub(crate) fn outliers(&self) -> &Outliers {
        &self.outliers
    }

    /// Hedging, when on.
    pub(crate) fn hedges(&self) -> Option<&Hedges> {
        self.hedges.as_ref()
    }

    /// Sends a request already counted in the length.
    fn send_counted(&self, request: Request) {
        if let Err(mpsc::error::SendError(request)) = self.tx.send(request) {
            // The queue task has stopped: the balancer is past its drain deadline. The
            // pending entry answers `shutting_down` as it drops.
            self.signal.left(1);
            drop(request);
        }
    }
}

/// The sending side of the queue for new requests: bounded by `--queue`.
#[derive(Debug)]
pub(crate) struct QueueHandle {
    inlet: Reroute,
    capacity: usize,
    timeout: Duration,
}

impl QueueHandle {
    /// A handle and the receiver its task will own.
    pub(crate) fn new(
        capacity: usize,
        timeout: Duration,
        signal: Arc<QueueSignal>,
    ) -> (QueueHandle, QueueReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            QueueHandle {
                inlet: Reroute {
                    tx,
                    signal,
                    retries: Retries::new(RetrySettings::OFF),
                    outliers: Outliers::new(OutlierSettings::OFF),
                    hedges: None,
                },
                capacity,
                timeout,
            },
            rx,
        )
    }

    /// Sets the retry policy (off unless set): the upstream connections get it with
    /// [`reroute`](QueueHandle::reroute), so set it before handing that out.
    pub(crate) fn with_retries(mut self, retries: Retries) -> QueueHandle {
        self.inlet.retries = retries;
        self
    }

    /// The retry policy, whose budget counts each new request.
    pub(crate) fn retries(&self) -> &Retries {
        &self.inlet.retries
    }

    /// Sets outlier detection (off unless set); as with retries, before
    /// [`reroute`](QueueHandle::reroute) is handed out.
    pub(crate) fn with_outliers(mut self, outliers: Outliers) -> QueueHandle {
        self.inlet.outliers = outliers;
        self
    }

    /// Sets hedging (off unless set); as with retries, before
    /// [`reroute`](QueueHandle::reroute) is handed out.
    pub(crate) fn with_hedges(mut self, hedges: Option<Hedges>) -> QueueHandle {
        self.inlet.hedges = hedges;
        self
    }

    /// Outlier detection, which the router tells the pool's size.
    pub(crate) fn outliers(&self) -> &Outliers {
        &self.inlet.outliers
    }

    /// The queue's length and wake-up.
    pub(crate) fn signal(&self) -> &Arc<QueueSignal> {
        &self.inlet.signal
    }

    /// The way in for re-routed requests, for the upstream connections.
    pub(crate) fn reroute(&self) -> Reroute {
        self.inlet.clone()
    }

    /// Longest wait in the queue (`--queue-timeout`).
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The hint given with `overloaded`.
    pub(crate) fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Puts a new request at the back of the queue, or answers `overloaded` when the
    /// queue is full.
    pub(crate) fn push(&self, request: Request) {
        let admitted = self
            .inlet
            .signal
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            request.pending.reject(
                Reject::QueueFull,
                ErrorCode::Overloaded,
                format!(
                    "every target is at its outstanding limit and the balancer's queue of {} is full",
                    self.capacity
                ),
                Some(self.retry_after_ms()),
            );
            return;
        }
        self.inlet.send_counted(request);
    }
}
