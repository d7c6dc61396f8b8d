//! The balancer's wait queue: requests that found every eligible target at its
//! `--max-outstanding` limit wait here, in order, for `--queue-timeout` at most.
//!
//! An actor: one task owns the queue; requests reach it over a channel whose length is
//! bounded by a counter checked before sending (`--queue`), and finishing requests wake
//! it through [`QueueSignal`]. Requests re-routed after a connection loss pass through it
//! too, ahead of the bound, since they were already admitted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::ErrorCode;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balancer::Shared;
use crate::dispatch::{Routed, Scratch};
use crate::metrics::Reject;
use crate::pending::Request;

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
}

/// The sending side of the queue.
pub(crate) struct QueueHandle {
    tx: mpsc::UnboundedSender<Request>,
    pub(crate) signal: Arc<QueueSignal>,
    capacity: usize,
    timeout: Duration,
}

impl QueueHandle {
    /// A handle and the receiver its task will own.
    pub(crate) fn new(
        capacity: usize,
        timeout: Duration,
        signal: Arc<QueueSignal>,
    ) -> (QueueHandle, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            QueueHandle {
                tx,
                signal,
                capacity,
                timeout,
            },
            rx,
        )
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
        self.send(request);
    }

    /// Puts a request that was already admitted (re-routed after a connection loss) in
    /// the queue, past the bound.
    pub(crate) fn reroute(&self, request: Request) {
        self.signal.len.fetch_add(1, Ordering::AcqRel);
        self.send(request);
    }

    fn send(&self, request: Request) {
        if let Err(mpsc::error::SendError(request)) = self.tx.send(request) {
            // The queue task has stopped: the balancer is past its drain deadline. The
            // pending entry answers `shutting_down` as it drops.
            self.signal.len.fetch_sub(1, Ordering::AcqRel);
            drop(request);
        }
    }
}

/// The queue task: routes waiting requests as capacity appears, answers `overloaded`
/// past the timeout. Stops at `stop` (the drain deadline); what still waits then is
/// answered `shutting_down`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    stop: CancellationToken,
) {
    let signal = Arc::clone(&shared.queue.signal);
    let timeout = shared.config.queue_timeout;
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
            () = signal.wake.notified() => {}
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
            signal.len.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.queue_wait.record(now - since);
            request.pending.reject(
                Reject::QueueTimeout,
                ErrorCode::Overloaded,
                format!(
                    "waited {} in the balancer's queue without a target below its outstanding limit",
                    humantime::format_duration(timeout)
                ),
                Some(shared.queue.retry_after_ms()),
            );
        }

        while let Some((request, since)) = waiting.pop_front() {
            match shared.try_route(request, &mut scratch).await {
                Routed::Done => {
                    signal.len.fetch_sub(1, Ordering::AcqRel);
                    shared.metrics.queue_wait.record(since.elapsed());
                }
                Routed::Full(request) => {
                    waiting.push_front((request, since));
                    break;
                }
                Routed::NoTarget(request) => {
                    signal.len.fetch_sub(1, Ordering::AcqRel);
                    shared.metrics.queue_wait.record(since.elapsed());
                    shared.no_target(request);
                }
            }
        }
    }
    rx.close();
    let dropped = waiting.len();
    signal.len.fetch_sub(dropped, Ordering::AcqRel);
    // Dropping the entries answers them (`shutting_down`, the drain deadline has passed).
    drop(waiting);
    while let Ok(request) = rx.try_recv() {
        signal.len.fetch_sub(1, Ordering::AcqRel);
        drop(request);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
