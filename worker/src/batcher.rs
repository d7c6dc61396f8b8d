//! The batcher: an actor that owns the queue, stacks queued items into batches, and hands them
//! to the model thread.
//!
//! ```text
//! connections ──submit──▶ [bounded channel] ──▶ batcher task (queue, timers, form) ──batch──▶ model thread
//!      ▲                                              │   ▲                                    │
//!      └──── oneshot reply per item ◀── split ◀───────┘   └──────── outputs, one per batch ◀───┘
//! ```
//!
//! The batcher task forms each batch and splits its outputs ([`crate::staging`]), so that the
//! model thread does nothing but run batches back to back.
//!
//! - **Bounded.** A semaphore of `--queue` permits travels with each item until it leaves the
//!   queue; [`BatcherHandle::submit`] answers `overloaded` at once when none is left, with a
//!   `retry_after_ms` estimated from the recent batch time.
//! - **When a batch runs.** With the model idle: as soon as a full batch is queued, the oldest
//!   item has waited `max_delay`, or at once when `max_delay` is zero (a batch is then whatever
//!   is queued when the model becomes free). With the model busy, a full batch is handed over
//!   so that it starts the moment the current one ends; partial batches keep filling instead.
//! - **Which items share a batch.** Each item comes with its [`Fit`]: items share a batch only
//!   with items of the same key (identical shapes, or any length for a model that pads), in
//!   the same length bucket when `buckets` are set, and while the batch's size times its
//!   longest item stays within `max_batch_tokens` (a single item always runs). The oldest item
//!   always leads the next batch, so no item is passed over for ever; the rest are chosen
//!   nearest in length to it first, so that padding wastes little when the queue is deep.
//! - **Deadlines and cancels.** Items past their deadline are answered `deadline_exceeded`
//!   while still queued (a timer wakes the actor for the earliest one). With
//!   [`BatchingMode::Adaptive`] the actor also predicts from the [`Profile`] it keeps of the
//!   batches run: an arriving item that would finish late is refused at once, an item that
//!   could not finish in time even alone is answered before its batch forms, and a partial
//!   batch closes before waiting longer would make its most urgent member late
//!   ([`crate::admission`]). The profile's times for a batch of one and a full one (its
//!   fastest length bucket) go out in the worker's `pong` ([`BatcherHandle::batch_times`]),
//!   so that a balancer refuses such items before it forwards them.
//! - **Priority.** The queue is served by [`crate::priority`]'s effective rank (class, aged
//!   by waiting), oldest first among equals; low items may fill only half the queue. A [`Canceller`]
//!   removes an item that is still queued and answers it `cancelled`; an item that already
//!   runs is answered as usual (the protocol's rule). An item whose [`Ticket`] was dropped
//!   (its connection went) is skipped without an answer, since nobody is left to read it.
//! - **Fairness.** With `--fairness` ([`crate::fairness`]), each item belongs to a flow (its
//!   client or tenant) and each place in a batch goes to the flow the deficit round robin
//!   names among those holding an item of the best rank left, so a flood cannot queue
//!   another flow's items behind all of its own; ranks then stop at the top class. Admission
//!   counts as ahead of an item only what the round robin would serve first.
//! - **Exactly one answer.** Each item's reply sender is a guard that answers `internal` if it
//!   is dropped unanswered, so a forgotten branch or a panic still answers once.
//! - **Failure.** A batch that fails to form, run or split answers each of its items
//!   `internal`; a panic in the engine is caught and treated the same; the model thread goes on
//!   with the next batch.
//! - **A formed batch.** An item whose batch is formed but not yet running is answered
//!   `cancelled` or `deadline_exceeded` when the model thread takes the batch (see
//!   [`crate::staging`]); once the batch runs, its result comes as usual.
//! - **Model instances.** With `--instances N` ([`Batcher::start_instances`]), N model
//!   threads, each with its own engine (its own ONNX Runtime session), take batches from one
//!   channel, each the next batch when it is free: up to N batches run side by side and one
//!   more is formed ahead. Each batch carries a number, so that batches coming back out of
//!   order are matched with what the actor remembers of them. The forecasts follow the
//!   threads one by one ([`Actor::schedule`], [`crate::schedule`]): what is left of each
//!   running batch, then the batch handed over and the full batches ahead each given to
//!   the first thread free, each taking its profiled time; an item's batch starts when a
//!   thread is first free after them, and the learned [`Margin`] adds what items were
//!   answered later than forecast.
//! - **Shutdown.** When the shutdown token fires, new submissions are answered `shutting_down`,
//!   queued items keep running (without waiting for `max_delay`) until the queue is empty or
//!   `drain_timeout` passes; whatever is still queued then is answered `shutting_down`. The
//!   batch running at that moment finishes. [`Batcher::join`] then joins the model thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::{BatchTimes, ErrorCode, Priority, Tensors};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admission::{self, BatchingMode, Verdict};
use crate::error::Error;
use crate::fairness::{FairnessMode, FairnessSettings, FlowId, Flows, Origin};
use crate::gate::{Gate, Refused};
use crate::goodput::Refusal;
use crate::margin::Margin;
use crate::metrics::Metrics;
use crate::priority::{self, ClassCounts};
use crate::profile::Profile;
use crate::schedule::Schedule;
use crate::spec::Fit;
use crate::staging::{self, micros, Member, Ran, Staged};
pub use crate::staging::{Engine, Stager};

/// How the batcher batches.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// Most items per batch (already 1 for a model that cannot batch).
    pub max_batch: usize,
    /// Most tokens per batch: its size times its longest item's [`Fit::tokens`]; `None`: no
    /// limit beyond `max_batch`.
    pub max_batch_tokens: Option<usize>,
    /// Upper bounds of length buckets, ascending: items batch only with items whose length
    /// falls in the same bucket (lengths past the last bound share one). Empty: one bucket.
    pub buckets: Vec<usize>,
    /// Longest the oldest item waits for a batch to fill; zero: no timer.
    pub max_delay: Duration,
    /// Most items waiting.
    pub queue: usize,
    /// How long shutdown lets queued items run.
    pub drain_timeout: Duration,
    /// Whether deadlines are predicted (admission, doomed items, the adaptive close).
    pub mode: BatchingMode,
    /// How long an item waits to rise one priority class ([`priority::effective_rank`]);
    /// zero: never.
    pub aging: Duration,
    /// How the queue is shared between clients or tenants ([`crate::fairness`]).
    pub fairness: FairnessSettings,
    /// The CPUs each model thread pins itself to ([`crate::affinity`]); `None`: the
    /// scheduler's choice.
    pub model_cpus: Option<Vec<usize>>,
}

/// A successful answer for one item.
#[derive(Clone, Debug)]
pub struct Done {
    /// The item's outputs, without the batch dimension.
    pub outputs: Tensors,
    /// Microseconds between submission and the batch starting.
    pub queue_us: u64,
    /// Microseconds the batch took to run.
    pub infer_us: u64,
    /// Items in that batch.
    pub batch_size: u32,
}

/// Why an item got no result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The protocol code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// For `overloaded`: when to retry.
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    /// A rejection without a retry hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// What one item gets back.
pub type Reply = Result<Done, Rejection>;

/// The caller's end of a submitted item. Await [`Ticket::wait`] for the answer; dropping the
/// ticket cancels the item if it has not started.
#[derive(Debug)]
pub struct Ticket {
    rx: oneshot::Receiver<Reply>,
    canceller: Canceller,
}

impl Ticket {
    /// A way to cancel the item while it is queued, usable while the ticket is awaited.
    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    /// The item's answer.
    pub async fn wait(self) -> Reply {
        self.rx.await.unwrap_or_else(|_| {
            // Unreachable by construction (the responder answers on drop); kept total.
            Err(Rejection::new(
                ErrorCode::Internal,
                "the batcher dropped the item",
            ))
        })
    }
}

/// Cancels one submitted item if it is still queued.
#[derive(Clone, Debug)]
pub struct Canceller {
    flag: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Canceller {
    /// Asks the batcher to drop the item and answer it `cancelled`; without effect once the
    /// item's batch has started (its result then comes as usual).
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }
}

/// The batcher's end of an item's reply: answers `internal` when dropped unanswered.
#[derive(Debug)]
pub(crate) struct Responder(Option<oneshot::Sender<Reply>>);

impl Responder {
    /// A guard over `tx`.
    pub(crate) fn new(tx: oneshot::Sender<Reply>) -> Responder {
        Responder(Some(tx))
    }

    /// Answers the item.
    pub(crate) fn send(mut self, reply: Reply) {
        if let Some(tx) = self.0.take() {
            // The caller may have gone; then nobody wants the answer.
            let _ = tx.send(reply);
        }
    }

    /// True when the ticket was dropped: the caller no longer wants the answer.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.0.as_ref().is_none_or(oneshot::Sender::is_closed)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Err(Rejection::new(
                ErrorCode::Internal,
                "the worker dropped the item without answering it",
            )));
        }
    }
}

/// One queued item.
#[derive(Debug)]
struct Queued {
    inputs: Tensors,
    fit: Fit,
    deadline: Option<Instant>,
    /// When admission forecast it would finish, without the margin (adaptive mode, once the
    /// profile knows its bucket): compared with when it is answered, for the [`Margin`].
    forecast: Option<Instant>,
    priority: Priority,
    /// The name of its flow, until the actor files it under [`Queued::flow`].
    flow_name: Option<Box<str>>,
    flow: FlowId,
    enqueued: Instant,
    reply: Responder,
    /// Set by the item's [`Canceller`].
    cancelled: Arc<AtomicBool>,
    /// The item's place in the bounded queue, released when it leaves the queue.
    _permit: OwnedSemaphorePermit,
}

impl Queued {
    /// Its effective rank at `now` ([`priority::effective_rank`]).
    fn rank(&self, now: Instant, aging: Duration) -> u64 {
        priority::effective_rank(
            self.priority,
            now.saturating_duration_since(self.enqueued),
            aging,
        )
    }
}

/// A batch handed to the model thread, as the actor remembers it (batches run in order).
#[derive(Debug)]
struct Handed {
    bucket: usize,
    size: usize,
    /// When it started: at hand-over to an idle model, else when the one before it ended.
    started: Option<Instant>,
    /// Its members' [`Queued::forecast`]s, for the [`Margin`] once it is answered.
    forecasts: Vec<Instant>,
    /// Its [`Staged::id`].
    id: u64,
}

/// Shared between the handles and the actor.
#[derive(Debug)]
struct Shared {
    permits: Arc<Semaphore>,
    capacity: usize,
    max_batch: usize,
    /// Recent batch duration in microseconds (an exponential moving average), for
    /// `retry_after_ms`.
    batch_us: AtomicU64,
    /// The batch times the actor last predicted (adaptive mode, once a batch has run), for
    /// `pong`. A std mutex held to copy three numbers, once per batch and per `pong`.
    times: std::sync::Mutex<Option<BatchTimes>>,
    /// Wakes the actor to look for cancelled items.
    wake: Notify,
    /// The actor's admission snapshot, for refusing at the connection ([`crate::gate`]).
    gate: Gate,
    /// What an item's flow is named by.
    fairness: FairnessMode,
    /// For refusals at submission.
    metrics: Arc<Metrics>,
}

/// The connections' way into the batcher. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BatcherHandle {
    tx: mpsc::Sender<Queued>,
    shared: Arc<Shared>,
}

impl BatcherHandle {
    /// Queues one checked item with its [`Fit`] ([`crate::ModelSpec::fit`]) at normal
    /// priority. Answers at once with `overloaded` when the queue is full and with
    /// `shutting_down` once shutdown has begun.
    pub fn submit(
        &self,
        inputs: Tensors,
        fit: Fit,
        deadline: Option<Instant>,
    ) -> Result<Ticket, Rejection> {
        self.submit_prioritised(inputs, fit, deadline, Priority::Normal)
    }

    /// [`BatcherHandle::submit`] at `priority`: a low item is also answered `overloaded` at
    /// once while the queue is half full ([`priority::admits`]).
    pub fn submit_prioritised(
        &self,
        inputs: Tensors,
        fit: Fit,
        deadline: Option<Instant>,
        priority: Priority,
    ) -> Result<Ticket, Rejection> {
        self.submit_from(inputs, fit, deadline, priority, Origin::default())
    }

    /// [`BatcherHandle::submit_prioritised`] from `origin`, whose client or tenant names the
    /// item's flow when the queue is shared fairly ([`crate::fairness`]).
    pub fn submit_from(
        &self,
        inputs: Tensors,
        fit: Fit,
        deadline: Option<Instant>,
        priority: Priority,
        origin: Origin<'_>,
    ) -> Result<Ticket, Rejection> {
        if self.tx.is_closed() {
            return Err(shutting_down());
        }
        if !priority::admits(priority, self.queued(), self.shared.capacity) {
            self.shared.metrics.goodput.refused(Refusal::LowPriority);
            return Err(Rejection {
                code: ErrorCode::Overloaded,
                message: format!(
                    "the worker's queue is at least half full ({} of {} items) and sheds low-priority requests first; retry later or with a higher priority",
                    self.queued(),
                    self.shared.capacity
                ),
                retry_after_ms: Some(self.retry_after_ms()),
            });
        }
        let permit = match Arc::clone(&self.shared.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                self.shared.metrics.goodput.refused(Refusal::QueueFull);
                return Err(Rejection {
                    code: ErrorCode::Overloaded,
                    message: format!(
                        "the worker's queue of {} items is full",
                        self.shared.capacity
                    ),
                    retry_after_ms: Some(self.retry_after_ms()),
                });
            }
            Err(TryAcquireError::Closed) => return Err(shutting_down()),
        };
        let (tx, rx) = oneshot::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let item = Queued {
            inputs,
            fit,
            deadline,
            forecast: None,
            priority,
            flow_name: self.shared.fairness.key(origin),
            flow: FlowId::NONE,
            enqueued: Instant::now(),
            reply: Responder::new(tx),
            cancelled: Arc::clone(&cancelled),
            _permit: permit,
        };
        // The channel holds as many items as there are permits, so it is never full here;
        // it is closed once shutdown begins.
        match self.tx.try_send(item) {
            Ok(()) => Ok(Ticket {
                rx,
                canceller: Canceller {
                    flag: cancelled,
                    shared: Arc::clone(&self.shared),
                },
            }),
            Err(
                mpsc::error::TrySendError::Closed(item) | mpsc::error::TrySendError::Full(item),
            ) => {
                // Disarm the guard: the caller gets the rejection directly.
                let mut item = item;
                item.reply.0 = None;
                Err(shutting_down())
            }
        }
    }

    /// Predicted-finish admission before the item is decoded ([`crate::gate`]): the refusal
    /// for an item of `priority` arriving at `now` with `deadline` that the batcher would
    /// refuse too, counted as the batcher counts its own; `None`: decode it and submit.
    pub fn refuse_early(
        &self,
        now: Instant,
        deadline: Instant,
        priority: Priority,
    ) -> Option<Rejection> {
        let budget = deadline.saturating_duration_since(now).as_millis();
        let (why, rejection) = match self.shared.gate.check(now, deadline, priority)? {
            Refused::Doomed { alone } => (
                Refusal::Doomed,
                Rejection::new(ErrorCode::DeadlineExceeded, doomed_message(budget, alone)),
            ),
            Refused::Late { finish, late_by } => (
                Refusal::PredictedLate,
                Rejection {
                    code: ErrorCode::Overloaded,
                    message: format!(
                        "the worker predicts this request would be answered in {} ms, after its deadline_ms of {budget}; retry after retry_after_ms, on another worker, or with a larger deadline_ms",
                        finish.as_millis()
                    ),
                    retry_after_ms: Some(tidepool_protocol::late_retry_ms(late_by)),
                },
            ),
        };
        self.shared.metrics.goodput.refused(why);
        Some(rejection)
    }

    /// Items waiting (queued or on their way into the queue).
    pub fn queued(&self) -> usize {
        self.shared.capacity - self.shared.permits.available_permits()
    }

    /// The batch run times the worker predicts with, for its `pong`: `None` in fixed mode
    /// and until a batch has run, so that a balancer then admits everything.
    pub fn batch_times(&self) -> Option<BatchTimes> {
        *self
            .shared
            .times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long until the queue has room, estimated: the batches ahead times the recent
    /// batch time, at least 1 ms.
    fn retry_after_ms(&self) -> u64 {
        let batches = self.queued().div_ceil(self.shared.max_batch.max(1)) as u64;
        let batch_us = self.shared.batch_us.load(Ordering::Relaxed).max(1_000);
        (batches * batch_us / 1_000).clamp(1, 60_000)
    }
}

/// A batch being filled, against `--max-batch-tokens`: its size times its longest item's
/// tokens stays within the budget (a single item always runs).
struct Fill {
    size: usize,
    longest: usize,
    budget: Option<usize>,
}

impl Fill {
    /// A batch of its leader, of `tokens`.
    fn new(tokens: usize, budget: Option<usize>) -> Fill {
        Fill {
            size: 1,
            longest: tokens,
            budget,
        }
    }

    /// Whether an item of `tokens` may join.
    fn fits(&self, tokens: usize) -> bool {
        self.budget
            .is_none_or(|budget| (self.size + 1).saturating_mul(self.longest.max(tokens)) <= budget)
    }

    fn add(&mut self, tokens: usize) {
        self.size += 1;
        self.longest = self.longest.max(tokens);
    }
}

/// The length bucket an item of `tokens` falls in, among `buckets`' upper bounds.
fn bucket_of(buckets: &[usize], tokens: usize) -> usize {
    buckets.partition_point(|&bound| bound < tokens)
}

/// Pins the calling model thread to `cpus`; a failure (a container that forbids it) leaves
/// it to the scheduler.
fn pin_model_thread(cpus: &[usize]) {
    match crate::affinity::pin_current_thread(cpus) {
        Ok(()) => info!(
            ?cpus,
            "model thread pinned to the cores ONNX Runtime's pool left free"
        ),
        Err(e) => {
            warn!(error = %e, ?cpus, "could not pin the model thread; the scheduler places it")
        }
    }
}

/// Why an item whose budget of `budget_ms` is shorter than a batch of one (`alone`) was
/// not run.
fn doomed_message(budget_ms: u128, alone: Duration) -> String {
    format!(
        "its deadline_ms of {budget_ms} is shorter than this worker takes to run a batch of one ({} ms); it was not run: retry with a larger deadline_ms",
        alone.as_millis()
    )
}

fn shutting_down() -> Rejection {
    Rejection::new(
        ErrorCode::ShuttingDown,
        "the worker is shutting down; retry on another worker",
    )
}

/// The running batcher: its handle, its task and its model threads.
#[derive(Debug)]
pub struct Batcher {
    handle: BatcherHandle,
    task: JoinHandle<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Batcher {
    /// Starts the model thread (which owns `engine`) and the batching task. When `shutdown`
    /// fires the batcher drains (see the module docs); [`Batcher::join`] waits for that.
    pub fn start<E: Engine>(
        engine: E,
        config: BatchConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Batcher, Error> {
        Batcher::start_instances(vec![engine], config, metrics, shutdown)
    }

    /// [`Batcher::start`] with one model thread per engine in `engines` (the model's
    /// instances, at least one), all taking batches from this batcher. The busy meter is
    /// set to as many instances.
    pub fn start_instances<E: Engine>(
        engines: Vec<E>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Batcher, Error> {
        let profile = Profile::new(config.max_batch, config.buckets.len() + 1);
        Batcher::start_with(engines, config, metrics, shutdown, profile)
    }

    /// [`Batcher::start_instances`] with a profile already learned (tests give one, so that
    /// a prediction does not hang on how fast the test machine runs a stand-in).
    fn start_with<E: Engine>(
        engines: Vec<E>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        profile: Profile,
    ) -> Result<Batcher, Error> {
        let instances = engines.len();
        let stager = engines
            .first()
            .ok_or(Error::ModelThread(
                "a batcher needs at least one model instance",
            ))?
            .stager();
        let capacity = config.queue.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        // At most one batch per model thread plus one formed next are handed over at once,
        // so these channels never fill.
        let (batch_tx, batch_rx) = mpsc::channel(instances + 1);
        let (done_tx, done_rx) = mpsc::channel(instances + 1);
        let batch_rx = Arc::new(std::sync::Mutex::new(batch_rx));
        metrics.busy.set_instances(instances);
        let mut threads = Vec::with_capacity(instances);
        for (slot, engine) in engines.into_iter().enumerate() {
            let meter = metrics.busy.clone();
            let (batch_rx, done_tx) = (Arc::clone(&batch_rx), done_tx.clone());
            let cpus = config.model_cpus.clone();
            let thread = std::thread::Builder::new()
                .name("tidepool-model".into())
                .spawn(move || {
                    if let Some(cpus) = cpus {
                        pin_model_thread(&cpus);
                    }
                    staging::model_thread(engine, slot, batch_rx, done_tx, meter)
                });
            match thread {
                Ok(thread) => threads.push(thread),
                // Dropping the batch sender on return ends the threads already started.
                Err(_) => return Err(Error::ModelThread("could not spawn a model thread")),
            }
        }
        drop(done_tx);
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            max_batch: config.max_batch.max(1),
            batch_us: AtomicU64::new(0),
            times: std::sync::Mutex::new(None),
            wake: Notify::new(),
            gate: Gate::new(),
            fairness: config.fairness.mode,
            metrics: Arc::clone(&metrics),
        });
        let flows = Flows::new(&config.fairness, Arc::clone(&metrics.fairness));
        let actor = Actor {
            instances,
            next_id: 0,
            profile,
            margin: Margin::new(),
            handed: VecDeque::new(),
            classes: ClassCounts::default(),
            flows,
            config,
            stager,
            rx,
            rx_done: false,
            queue: VecDeque::new(),
            next_deadline: None,
            in_flight: 0,
            batch_tx,
            done_rx,
            shared: Arc::clone(&shared),
            metrics,
            draining: false,
            drain_deadline: None,
            drain_expired: false,
        };
        actor.publish_times();
        let task = tokio::spawn(actor.run(shutdown));
        Ok(Batcher {
            handle: BatcherHandle { tx, shared },
            task,
            threads,
        })
    }

    /// A handle for submitting items.
    pub fn handle(&self) -> BatcherHandle {
        self.handle.clone()
    }

    /// Waits until the batcher has drained after its shutdown token fired, then joins the
    /// model threads.
    pub async fn join(self) {
        let Batcher {
            handle,
            task,
            threads,
        } = self;
        drop(handle);
        if let Err(e) = task.await {
            error!(error = %e, "batcher task failed");
        }
        // The task dropped the batch sender, so each thread ends after its current batch.
        let joined = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(std::thread::JoinHandle::join)
                .filter(Result::is_err)
                .count()
        })
        .await;
        if !matches!(joined, Ok(0)) {
            error!("a model thread ended abnormally");
        }
    }
}

/// The batching task's state.
struct Actor<S: Stager> {
    config: BatchConfig,
    /// Model threads taking batches (at least 1).
    instances: usize,
    /// The [`Staged::id`] of the next batch handed over.
    next_id: u64,
    /// Batch run times learned from the batches run.
    profile: Profile,
    /// How much later than forecast admitted items finish, added to admission's forecasts.
    margin: Margin,
    /// The batches handed to the model threads and not yet done, oldest first.
    handed: VecDeque<Handed>,
    /// Queued items per class (the actor's queue only).
    classes: ClassCounts,
    /// The flows of the queued items, when the queue is shared fairly.
    flows: Flows,
    /// Forms batches before they go to the model thread and splits them after.
    stager: S,
    rx: mpsc::Receiver<Queued>,
    /// The channel is closed and empty.
    rx_done: bool,
    queue: VecDeque<Queued>,
    /// No queued item needs a look before this: its deadline, or in adaptive mode when it
    /// becomes doomed (a lower bound, refreshed on purge).
    next_deadline: Option<Instant>,
    /// Batches handed to the model threads and not yet reported done (0 to instances + 1).
    in_flight: usize,
    batch_tx: mpsc::Sender<Staged<S::Input>>,
    done_rx: mpsc::Receiver<Ran<S::Output>>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    draining: bool,
    drain_deadline: Option<Instant>,
    /// The drain deadline passed: nothing more is dispatched.
    drain_expired: bool,
}

impl<S: Stager> Actor<S> {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            // Take in everything already submitted, so that a batch formed now holds all of
            // it (select! below picks one ready branch at a time).
            while let Ok(item) = self.rx.try_recv() {
                self.push(item);
            }
            let now = Instant::now();
            if self.next_deadline.is_some_and(|d| d <= now) {
                self.purge(now);
            }
            self.check_drain_deadline(now);
            self.dispatch(now);
            self.publish_gate(now);
            self.metrics
                .queue_depth
                .store(self.queued_now() as i64, Ordering::Relaxed);
            if self.draining && self.rx_done && self.queue.is_empty() && self.in_flight == 0 {
                info!("batcher drained");
                break;
            }
            let wake = self.next_wake();
            tokio::select! {
                _ = shutdown.cancelled(), if !self.draining => self.begin_drain(),
                done = self.done_rx.recv() => match done {
                    Some(ran) => {
                        let forecasts = self.batch_done(&ran);
                        // Hand the model its next batch before splitting this one.
                        self.dispatch(Instant::now());
                        ran.finish(&self.stager);
                        // Its items are answered now (the connections write them next).
                        let answered = Instant::now();
                        for forecast in forecasts {
                            self.margin.observe(forecast, answered);
                        }
                    }
                    None => {
                        error!("the model thread has ended; answering queued items internal");
                        self.reject_all(ErrorCode::Internal, "the model thread has ended");
                        self.in_flight = 0;
                        self.handed.clear();
                        self.drain_expired = true;
                        self.begin_drain();
                    }
                },
                item = self.rx.recv(), if !self.rx_done => match item {
                    Some(item) => self.push(item),
                    // Every handle is gone: nobody can submit again.
                    None => {
                        self.rx_done = true;
                        self.begin_drain();
                    }
                },
                _ = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
                () = self.shared.wake.notified() => self.purge(Instant::now()),
            }
        }
        // Dropping the batch sender ends the model thread.
    }

    fn queued_now(&self) -> usize {
        self.shared.capacity - self.shared.permits.available_permits()
    }

    fn push(&mut self, item: Queued) {
        if self.drain_expired {
            item.reply.send(Err(Rejection::new(
                ErrorCode::ShuttingDown,
                "the worker's drain timeout passed before this item ran",
            )));
            return;
        }
        let mut item = item;
        if let Some(deadline) = item.deadline {
            match self.refuse_late(&item, deadline) {
                Ok(forecast) => item.forecast = forecast,
                Err((why, refusal)) => {
                    self.shared.metrics.goodput.refused(why);
                    item.reply.send(Err(refusal));
                    return;
                }
            }
            let look = self.look_at(&item, deadline, Instant::now());
            self.next_deadline = Some(self.next_deadline.map_or(look, |d| d.min(look)));
        }
        item.flow = self.flows.join(item.flow_name.take().as_deref());
        self.classes.add(item.priority);
        self.queue.push_back(item);
    }

    /// Predicted-finish admission ([`admission::judge`]): the refusal for an item that would
    /// finish after `deadline` (its forecast plus the learned [`Margin`]), counting as ahead
    /// of it the queued items of its class or a higher one. An item that could not make it
    /// even alone on an idle model is `deadline_exceeded` (waiting does not help; a larger
    /// budget does), any other `overloaded` with a retry hint. Admitted: its forecast finish
    /// without the margin, `None` in fixed mode or while the profile knows nothing.
    fn refuse_late(
        &mut self,
        item: &Queued,
        deadline: Instant,
    ) -> Result<Option<Instant>, (Refusal, Rejection)> {
        if self.config.mode != BatchingMode::Adaptive {
            return Ok(None);
        }
        let now = Instant::now();
        let bucket = self.bucket(item.fit.tokens);
        let budget = deadline.saturating_duration_since(item.enqueued);
        let Some(alone) = self.profile.predict(bucket, 1) else {
            return Ok(None);
        };
        if admission::doomed(now, deadline, Duration::ZERO, alone) {
            return Err((
                Refusal::Doomed,
                Rejection::new(
                    ErrorCode::DeadlineExceeded,
                    doomed_message(budget.as_millis(), alone),
                ),
            ));
        }
        // With fair sharing, the round robin serves an item ahead of most of a flood.
        let ahead = self.classes.at_or_above(item.priority).min(
            self.flows
                .ahead(item.flow_name.as_deref())
                .unwrap_or(usize::MAX),
        );
        let Some(forecast) = admission::forecast(
            &self.profile,
            bucket,
            ahead,
            self.config.max_batch,
            &self.schedule(now),
        ) else {
            return Ok(None);
        };
        let margin = self.margin.get(now);
        let Verdict::Refuse { finish, late_by } = admission::judge(now, deadline, forecast, margin)
        else {
            return Ok(Some(now + forecast.finish()));
        };
        let rejection = Rejection {
            code: ErrorCode::Overloaded,
            message: format!(
                "the worker predicts this request would be answered in {} ms ({ahead} requests ahead of it), after its deadline_ms of {}; retry after retry_after_ms, on another worker, or with a larger deadline_ms",
                finish.as_millis(),
                budget.as_millis()
            ),
            retry_after_ms: Some(tidepool_protocol::late_retry_ms(late_by)),
        };
        Err((Refusal::PredictedLate, rejection))
    }

    /// When the model threads are free, predicted at `now`: what is left of the running
    /// batches, then the one handed over after them given to the first thread free (a size
    /// the profile cannot predict counts 0).
    fn schedule(&self, now: Instant) -> Schedule {
        let run = |h: &Handed| self.profile.predict(h.bucket, h.size).unwrap_or_default();
        Schedule::new(
            self.instances,
            self.handed
                .iter()
                .filter_map(|h| Some((h.started? + run(h)).saturating_duration_since(now))),
            self.handed.iter().filter(|h| h.started.is_none()).map(run),
        )
    }

    /// Publishes for the connections' [`Gate`] the earliest an item of each class arriving
    /// at `now` could be answered: [`Actor::refuse_late`]'s forecast and margin at the
    /// fastest bucket's times. Closed in fixed mode, while draining, with fair sharing
    /// (which counts a flow's own items ahead) and while the profile knows nothing.
    fn publish_gate(&mut self, now: Instant) {
        let open =
            self.config.mode == BatchingMode::Adaptive && !self.draining && !self.flows.enabled();
        let max_batch = self.config.max_batch.max(1);
        let snapshot = open
            .then(|| {
                let alone = self.profile.fastest(1)?;
                let full = self.profile.fastest(max_batch)?;
                let schedule = self.schedule(now);
                let margin = self.margin.get(now);
                let mut finish = [now; 3];
                for (at, class) in finish.iter_mut().zip(Priority::ALL) {
                    let ahead = self.classes.at_or_above(class);
                    let full_ahead = u32::try_from(ahead / max_batch).unwrap_or(u32::MAX);
                    let forecast = admission::Forecast {
                        ahead: schedule.start_after(full_ahead, full),
                        own: self.profile.fastest(ahead % max_batch + 1)?,
                    };
                    *at += forecast.with_margin(margin);
                }
                Some((finish, alone))
            })
            .flatten();
        self.shared.gate.publish(snapshot);
    }

    /// Publishes the profile's batch times for `pong` (adaptive mode only: a fixed batcher
    /// admits everything, and so should a balancer in front of it).
    fn publish_times(&self) {
        if self.config.mode != BatchingMode::Adaptive {
            return;
        }
        let max_batch = self.shared.max_batch;
        let times = self
            .profile
            .fastest(1)
            .zip(self.profile.fastest(max_batch))
            .map(|(one, full)| BatchTimes {
                one_us: micros(one),
                full_us: micros(full),
                max_batch: u32::try_from(max_batch).unwrap_or(u32::MAX),
                instances: u32::try_from(self.instances).unwrap_or(u32::MAX),
            });
        *self
            .shared
            .times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = times;
    }

    fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        // Refuse new submissions; items already in the channel are still received.
        self.rx.close();
        self.drain_deadline = Some(Instant::now() + self.config.drain_timeout);
        info!(
            queued = self.queue.len(),
            running = self.in_flight,
            "draining the batch queue"
        );
    }

    /// Learns from a batch back from the model thread; returns its members' forecasts,
    /// for the [`Margin`] once they are answered.
    fn batch_done(&mut self, done: &Ran<S::Output>) -> Vec<Instant> {
        self.in_flight = self.in_flight.saturating_sub(1);
        // Every batch handed over comes back, run or skipped, so `handed` stays in step.
        let mut batch = self
            .handed
            .iter()
            .position(|h| h.id == done.id)
            .and_then(|at| self.handed.remove(at));
        let forecasts = batch
            .as_mut()
            .map(|b| std::mem::take(&mut b.forecasts))
            .unwrap_or_default();
        let running = self.handed.iter().filter(|h| h.started.is_some()).count();
        if running < self.instances {
            if let Some(next) = self.handed.iter_mut().find(|h| h.started.is_none()) {
                // The freed model thread went straight on to it.
                next.started = Some(Instant::now());
            }
        }
        if !done.ran() {
            // A batch whose members were all gone did not run: it says nothing of the
            // model's speed (its members' forecasts still do: they were answered this late).
            return forecasts;
        }
        if let Some(batch) = batch {
            self.profile.observe(
                batch.bucket,
                batch.size,
                Duration::from_micros(done.infer_us),
            );
            self.publish_times();
        }
        self.metrics.infer_time.observe(done.infer_us);
        let old = self.shared.batch_us.load(Ordering::Relaxed);
        let avg = if old == 0 {
            done.infer_us
        } else {
            (old * 7 + done.infer_us) / 8
        };
        self.shared.batch_us.store(avg, Ordering::Relaxed);
        forecasts
    }

    /// Answers expired items (and, adaptive, doomed ones: [`admission::doomed`]), drops
    /// cancelled ones, and recomputes the earliest deadline and the counts per class.
    fn purge(&mut self, now: Instant) {
        let mut next = None::<Instant>;
        let queue = std::mem::take(&mut self.queue);
        let adaptive = self.config.mode == BatchingMode::Adaptive;
        // The earliest a model thread is free: when a queued item could start at best.
        let busy = if adaptive {
            self.schedule(now).earliest()
        } else {
            Duration::ZERO
        };
        self.classes = ClassCounts::default();
        for item in queue {
            if item.reply.is_abandoned() {
                debug!("dropping an item nobody waits for");
                continue;
            }
            if item.cancelled.load(Ordering::Relaxed) {
                item.reply.send(Err(Rejection::new(
                    ErrorCode::Cancelled,
                    "cancelled by the client before it ran",
                )));
                continue;
            }
            if let Some(deadline) = item.deadline {
                if deadline <= now {
                    let waited = now.saturating_duration_since(item.enqueued);
                    self.shared.metrics.goodput.refused(Refusal::Expired);
                    item.reply.send(Err(Rejection::new(
                        ErrorCode::DeadlineExceeded,
                        format!(
                            "deadline passed after {} ms in the worker's queue",
                            waited.as_millis()
                        ),
                    )));
                    continue;
                }
                let alone = adaptive
                    .then(|| self.profile.predict(self.bucket(item.fit.tokens), 1))
                    .flatten();
                if alone.is_some_and(|alone| admission::doomed(now, deadline, busy, alone)) {
                    self.shared.metrics.goodput.refused(Refusal::Doomed);
                    item.reply.send(Err(Rejection::new(
                        ErrorCode::DeadlineExceeded,
                        format!(
                            "the worker predicts this request cannot finish within its deadline_ms (about {} ms left, the model busy for {} ms more and a batch taking {} ms); it was not run: retry with a larger deadline_ms or when the load is lower",
                            deadline.saturating_duration_since(now).as_millis(),
                            busy.as_millis(),
                            alone.unwrap_or_default().as_millis()
                        ),
                    )));
                    continue;
                }
                let look = self.look_at(&item, deadline, now);
                next = Some(next.map_or(look, |d| d.min(look)));
            }
            self.classes.add(item.priority);
            self.queue.push_back(item);
        }
        self.next_deadline = next;
        self.flows.recount(self.queue.iter().map(|item| item.flow));
    }

    /// When the actor must look at a queued item due at `deadline` again: in adaptive mode,
    /// when it becomes doomed on an idle model (its deadline less a batch of one), so that it
    /// is answered as soon as it cannot make it; else (or once that has passed) at its
    /// deadline.
    fn look_at(&self, item: &Queued, deadline: Instant, now: Instant) -> Instant {
        if self.config.mode != BatchingMode::Adaptive {
            return deadline;
        }
        self.profile
            .predict(self.bucket(item.fit.tokens), 1)
            .and_then(|alone| deadline.checked_sub(alone))
            .filter(|&doom| doom > now)
            .unwrap_or(deadline)
    }

    /// Adaptive mode, model idle: when the partial batch must close so that its most urgent
    /// member is not made late by waiting for one more item ([`admission::close_by`]).
    fn urgent_close(&self, now: Instant) -> Option<Instant> {
        if self.config.mode != BatchingMode::Adaptive {
            return None;
        }
        let grown = (self.queue.len() + 1).min(self.config.max_batch);
        self.queue
            .iter()
            .filter_map(|item| {
                let deadline = item.deadline?;
                let run = self.profile.predict(self.bucket(item.fit.tokens), grown)?;
                Some(admission::close_by(deadline, run).unwrap_or(now))
            })
            .min()
    }

    /// Whether a batch should be handed to the model thread now.
    fn should_dispatch(&self, now: Instant) -> bool {
        let Some(oldest) = self.queue.front() else {
            return false;
        };
        if self.drain_expired {
            return false;
        }
        let full = self.queue.len() >= self.config.max_batch;
        // A model thread is idle: the usual rules; all busy: a full batch is formed ahead so
        // that it starts the moment one ends; one formed ahead: nothing more.
        if self.in_flight < self.instances {
            full || self.draining
                || self.config.max_delay.is_zero()
                || now >= oldest.enqueued + self.config.max_delay
                || self.urgent_close(now).is_some_and(|close| now >= close)
        } else {
            self.in_flight == self.instances && full
        }
    }

    fn dispatch(&mut self, now: Instant) {
        while self.should_dispatch(now) {
            // Drop cancelled and expired items first, so the batch is as full as it can be.
            self.purge(now);
            if !self.should_dispatch(now) {
                break;
            }
            let (bucket, inputs, members, forecasts) = self.take_batch(now);
            let size = members.len();
            self.metrics.batch_size.observe(size as u64);
            // The copy into the batch's input happens here, while the model runs the
            // previous batch. A batch that fails to form is answered here and never handed
            // over, so it has no place in `handed`.
            let items: Vec<&Tensors> = inputs.iter().collect();
            let Some(mut batch) = staging::stage(&self.stager, &items, members) else {
                continue;
            };
            let id = self.next_id;
            self.next_id += 1;
            batch.id = id;
            match self.batch_tx.try_send(batch) {
                Ok(()) => {
                    self.handed.push_back(Handed {
                        bucket,
                        size,
                        started: (self.in_flight < self.instances).then_some(now),
                        forecasts,
                        id,
                    });
                    self.in_flight += 1;
                }
                Err(e) => {
                    // The model thread is gone (or, impossibly, two batches are waiting):
                    // the items' guards answer them internal as the batch is dropped here.
                    error!(error = %e, "could not hand a batch to the model thread");
                    self.drain_expired = true;
                }
            }
        }
    }

    /// Takes the next batch out of the queue: a leader and up to `max_batch - 1` items that
    /// may share its batch (the same key and bucket, within the token budget), chosen by
    /// [`Actor::pick_by_rank`] or, when the queue is shared fairly, [`Actor::pick_fair`].
    /// Returns the batch's length bucket, its items' inputs and their members in the same
    /// order, and the forecasts of those that have one.
    fn take_batch(&mut self, now: Instant) -> (usize, Vec<Tensors>, Vec<Member>, Vec<Instant>) {
        let mut picked = if self.flows.enabled() {
            self.pick_fair(now)
        } else {
            self.pick_by_rank(now)
        };
        let Some(&lead_at) = picked.first() else {
            return (0, Vec::new(), Vec::new(), Vec::new());
        };
        let bucket = self.bucket(self.queue[lead_at].fit.tokens);
        // Remove from the back so the positions still hold; the leader goes first.
        picked.sort_unstable_by(|a, b| b.cmp(a));
        let mut taken: Vec<Queued> = Vec::with_capacity(picked.len());
        for i in picked {
            let Some(item) = self.queue.remove(i) else {
                continue;
            };
            self.classes.remove(item.priority);
            self.flows.served(item.flow);
            if i == lead_at {
                taken.insert(0, item);
            } else {
                taken.push(item);
            }
        }
        let forecasts = taken.iter().filter_map(|item| item.forecast).collect();
        let (inputs, members) = taken
            .into_iter()
            .map(|item| {
                let queue_us = micros(now.saturating_duration_since(item.enqueued));
                self.metrics.queue_time.observe(queue_us);
                // The permit is released here: the item has left the queue.
                let member = Member::new(
                    queue_us,
                    item.reply,
                    item.cancelled,
                    item.deadline.map(Instant::into_std),
                );
                (item.inputs, member)
            })
            .unzip();
        (bucket, inputs, members, forecasts)
    }

    /// The batch by rank alone, as queue positions, leader first: the leader is the item of
    /// the highest effective rank ([`priority::effective_rank`]), oldest first among equals;
    /// its mates go highest rank first and then nearest in length to it (oldest first among
    /// equals), so a padded batch wastes as little as the queue allows.
    fn pick_by_rank(&self, now: Instant) -> Vec<usize> {
        let aging = self.config.aging;
        let queue = &self.queue;
        let rank = |i: usize| queue[i].rank(now, aging);
        // The first of the highest rank: `max_by_key` would keep the last.
        let Some(lead_at) = (0..queue.len()).rev().max_by_key(|&i| rank(i)) else {
            return Vec::new();
        };
        let lead = queue[lead_at].fit.tokens;
        // A stable sort keeps the queue's order among equals, so a model of one shape and
        // one class batches strictly oldest first.
        let mut mates = self.mates_of(lead_at);
        mates.sort_by_key(|&i| {
            (
                std::cmp::Reverse(rank(i)),
                queue[i].fit.tokens.abs_diff(lead),
            )
        });
        let mut fill = Fill::new(lead, self.config.max_batch_tokens);
        let mut picked = vec![lead_at];
        for i in mates {
            if picked.len() >= self.config.max_batch {
                break;
            }
            if fill.fits(queue[i].fit.tokens) {
                fill.add(queue[i].fit.tokens);
                picked.push(i);
            }
        }
        picked
    }

    /// The batch when the queue is shared fairly ([`crate::fairness`]), as queue positions,
    /// leader first. Ranks are capped at the top class, so that ageing lifts an item into
    /// it but, between flows, the round robin orders it. Each place goes to the flow
    /// [`Flows::next`] names among those holding an item of the best rank left (and, for
    /// mates, one that fits the batch); that flow gives its best item: highest rank, then
    /// (for mates) nearest in length to the leader, then oldest.
    fn pick_fair(&mut self, now: Instant) -> Vec<usize> {
        let aging = self.config.aging;
        let top_class = Priority::High.rank() as u64;
        let queue = &self.queue;
        let rank = |i: usize| queue[i].rank(now, aging).min(top_class);
        let Some(top) = (0..queue.len()).map(rank).max() else {
            return Vec::new();
        };
        let mut firsts: HashMap<FlowId, usize> = HashMap::new();
        for i in (0..queue.len()).filter(|&i| rank(i) == top) {
            firsts.entry(queue[i].flow).or_insert(i);
        }
        let Some(lead_at) = self
            .flows
            .next(|flow| firsts.contains_key(&flow))
            .and_then(|flow| firsts.get(&flow).copied())
        else {
            // Every queued item's flow is active, so this is not reached; kept total.
            return self.pick_by_rank(now);
        };
        let lead = &queue[lead_at];
        // Each flow's candidates, best last (for `pop`): the stable sort keeps the queue's
        // order among equals, and the reversal puts the oldest of them last.
        let mut groups: HashMap<FlowId, Vec<usize>> = HashMap::new();
        for i in self.mates_of(lead_at) {
            groups.entry(queue[i].flow).or_default().push(i);
        }
        for group in groups.values_mut() {
            group.sort_by_key(|&i| {
                (
                    std::cmp::Reverse(rank(i)),
                    queue[i].fit.tokens.abs_diff(lead.fit.tokens),
                )
            });
            group.reverse();
        }
        let mut fill = Fill::new(lead.fit.tokens, self.config.max_batch_tokens);
        let mut picked = vec![lead_at];
        while picked.len() < self.config.max_batch {
            // An item that does not fit now never will: the batch only grows.
            groups.retain(|_, group| {
                while group
                    .last()
                    .is_some_and(|&i| !fill.fits(queue[i].fit.tokens))
                {
                    group.pop();
                }
                !group.is_empty()
            });
            let best = |group: &Vec<usize>| group.last().map(|&i| rank(i));
            let Some(top) = groups.values().filter_map(best).max() else {
                break;
            };
            let next = self
                .flows
                .next(|flow| groups.get(&flow).and_then(best) == Some(top));
            let Some(i) = next.and_then(|flow| groups.get_mut(&flow)?.pop()) else {
                break;
            };
            fill.add(queue[i].fit.tokens);
            picked.push(i);
        }
        picked
    }

    /// Queue positions of the items that may share a batch with the item at `lead_at`: the
    /// same key and length bucket.
    fn mates_of(&self, lead_at: usize) -> Vec<usize> {
        let lead = &self.queue[lead_at].fit;
        let bucket = self.bucket(lead.tokens);
        (0..self.queue.len())
            .filter(|&i| {
                let fit = &self.queue[i].fit;
                i != lead_at && fit.key == lead.key && self.bucket(fit.tokens) == bucket
            })
            .collect()
    }

    /// The length bucket an item of `tokens` falls in.
    fn bucket(&self, tokens: usize) -> usize {
        bucket_of(&self.config.buckets, tokens)
    }

    /// When the actor must wake up even if nothing arrives: the oldest item's `max_delay`
    /// (only while the model is idle; a busy model wakes the actor when it finishes), the
    /// earliest deadline, and the drain deadline.
    fn next_wake(&self) -> Option<Instant> {
        let mut wake = self.next_deadline;
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w: Instant| w.min(t)));
        let idle = self.in_flight < self.instances;
        if let (Some(oldest), true, false) = (self.queue.front(), idle, self.draining) {
            if !self.config.max_delay.is_zero() {
                consider(oldest.enqueued + self.config.max_delay);
                if let Some(close) = self.urgent_close(Instant::now()) {
                    consider(close);
                }
            }
        }
        if let (true, false, Some(deadline)) =
            (self.draining, self.drain_expired, self.drain_deadline)
        {
            consider(deadline);
        }
        wake
    }

    fn reject_all(&mut self, code: ErrorCode, message: &str) {
        for item in self.queue.drain(..) {
            item.reply.send(Err(Rejection::new(code, message)));
        }
        self.classes = ClassCounts::default();
        self.flows.recount(std::iter::empty());
        self.next_deadline = None;
    }
}

impl<S: Stager> Actor<S> {
    /// Called on every turn: once the drain deadline passes, what is
    /// still queued is answered `shutting_down`.
    fn check_drain_deadline(&mut self, now: Instant) {
        if let (true, false, Some(deadline)) =
            (self.draining, self.drain_expired, self.drain_deadline)
        {
            if now >= deadline {
                warn!(
                    left = self.queue.len(),
                    running = self.in_flight,
                    "drain timeout passed; answering what is left shutting_down"
                );
                self.drain_expired = true;
                // Items still in the channel are received and rejected on later turns.
                self.reject_all(
                    ErrorCode::ShuttingDown,
                    "the worker's drain timeout passed before this item ran",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tidepool_protocol::Tensor;

    use super::*;
    use crate::staging::fake::{Behaviour, Fake};

    struct Rig {
        batcher: Batcher,
        started: Arc<Mutex<Vec<usize>>>,
        ran: Arc<Mutex<Vec<f32>>>,
        gate: std::sync::mpsc::Sender<()>,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    }

    impl Rig {
        fn new(config: BatchConfig, gated: bool, behaviour: Behaviour) -> Rig {
            let profile = Profile::new(config.max_batch, config.buckets.len() + 1);
            Rig::with_profile(config, gated, behaviour, profile)
        }

        /// A rig whose batcher starts with `profile` learned.
        fn with_profile(
            config: BatchConfig,
            gated: bool,
            behaviour: Behaviour,
            profile: Profile,
        ) -> Rig {
            Rig::with_instances(config, 1, gated, behaviour, profile)
        }

        /// A rig of `instances` model threads sharing one gate (each opening lets one batch
        /// through, on whichever thread waits).
        fn with_instances(
            config: BatchConfig,
            instances: usize,
            gated: bool,
            behaviour: Behaviour,
            profile: Profile,
        ) -> Rig {
            let started = Arc::new(Mutex::new(Vec::new()));
            let ran = Arc::new(Mutex::new(Vec::new()));
            let (gate, gate_rx) = std::sync::mpsc::channel();
            let gate_rx = Arc::new(Mutex::new(gate_rx));
            let engines = (0..instances)
                .map(|_| Fake {
                    started: Arc::clone(&started),
                    ran: Arc::clone(&ran),
                    gate: gated.then(|| Arc::clone(&gate_rx)),
                    behaviour,
                })
                .collect();
            let shutdown = CancellationToken::new();
            let metrics = Arc::new(Metrics::default());
            let batcher = Batcher::start_with(
                engines,
                config,
                Arc::clone(&metrics),
                shutdown.clone(),
                profile,
            )
            .unwrap();
            Rig {
                batcher,
                started,
                ran,
                gate,
                shutdown,
                metrics,
            }
        }

        fn submit(&self, v: f32) -> Ticket {
            self.batcher
                .handle()
                .submit(item(v), Fit::any(), None)
                .unwrap()
        }

        fn started(&self) -> Vec<usize> {
            self.started.lock().unwrap().clone()
        }

        fn ran(&self) -> Vec<f32> {
            self.ran.lock().unwrap().clone()
        }

        /// Submits an item of value `v` with a deadline `budget` from now and `priority`.
        fn submit_with(
            &self,
            v: f32,
            budget: Option<Duration>,
            priority: Priority,
        ) -> Result<Ticket, Rejection> {
            self.batcher.handle().submit_prioritised(
                item(v),
                Fit::any(),
                budget.map(|b| Instant::now() + b),
                priority,
            )
        }

        /// Submits an item of value `v` from tenant `tenant`, at normal priority.
        fn submit_as(&self, v: f32, tenant: &str) -> Ticket {
            let origin = Origin {
                tenant: Some(tenant),
                ..Origin::default()
            };
            self.batcher
                .handle()
                .submit_from(item(v), Fit::any(), None, Priority::Normal, origin)
                .unwrap()
        }

        /// Waits (without moving paused time) until `n` batches have started.
        async fn until_started(&self, n: usize) {
            while self.started().len() < n {
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_micros(100));
            }
        }

        /// Waits (without moving paused time) until `n` items have run.
        async fn until_ran(&self, n: usize) {
            while self.ran().len() < n {
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_micros(100));
            }
        }

        fn open(&self, batches: usize) {
            for _ in 0..batches {
                self.gate.send(()).unwrap();
            }
        }
    }

    fn config(max_batch: usize, max_delay: Duration) -> BatchConfig {
        BatchConfig {
            max_batch,
            max_batch_tokens: None,
            buckets: Vec::new(),
            max_delay,
            queue: 64,
            drain_timeout: Duration::from_secs(30),
            mode: BatchingMode::Adaptive,
            aging: Duration::from_millis(100),
            fairness: FairnessSettings::default(),
            model_cpus: None,
        }
    }

    fn item(v: f32) -> Tensors {
        Tensors::from([("x".to_owned(), Tensor::from_vec(vec![1], vec![v]).unwrap())])
    }

    fn value(done: &Done) -> f32 {
        done.outputs["x"].to_vec::<f32>().unwrap()[0]
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_runs_at_once() {
        let rig = Rig::new(config(4, HOUR), false, Behaviour::Echo);
        let tickets: Vec<Ticket> = (0..4).map(|i| rig.submit(i as f32)).collect();
        for (i, t) in tickets.into_iter().enumerate() {
            let done = t.wait().await.unwrap();
            assert_eq!((done.batch_size, done.queue_us), (4, 0));
            assert_eq!(value(&done), i as f32, "outputs are split back in order");
        }
        assert_eq!(rig.started(), vec![4]);
        assert_eq!(rig.metrics.batch_size.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_runs_after_max_delay() {
        let rig = Rig::new(config(8, Duration::from_millis(10)), false, Behaviour::Echo);
        let tickets: Vec<Ticket> = (0..3).map(|i| rig.submit(i as f32)).collect();
        for t in tickets {
            let done = t.wait().await.unwrap();
            assert_eq!(done.batch_size, 3);
            assert_eq!(done.queue_us, 10_000, "waited exactly max_delay");
        }
        assert_eq!(rig.started(), vec![3]);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_delay_runs_what_is_queued_when_the_model_frees() {
        let rig = Rig::new(config(8, Duration::ZERO), true, Behaviour::Echo);
        let first = rig.submit(0.0);
        rig.until_started(1).await;
        let rest: Vec<Ticket> = (1..4).map(|i| rig.submit(i as f32)).collect();
        rig.open(2);
        assert_eq!(first.wait().await.unwrap().batch_size, 1);
        for t in rest {
            assert_eq!(t.wait().await.unwrap().batch_size, 3);
        }
        assert_eq!(rig.started(), vec![1, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_waits_ready_while_the_model_is_busy() {
        let rig = Rig::new(config(2, HOUR), true, Behaviour::Echo);
        let a: Vec<Ticket> = (0..2).map(|i| rig.submit(i as f32)).collect();
        rig.until_started(1).await;
        let b: Vec<Ticket> = (2..4).map(|i| rig.submit(i as f32)).collect();
        rig.open(2);
        for t in a.into_iter().chain(b) {
            assert_eq!(t.wait().await.unwrap().batch_size, 2);
        }
        assert_eq!(rig.started(), vec![2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn items_past_their_deadline_are_answered_in_the_queue() {
        let rig = Rig::new(config(8, Duration::ZERO), true, Behaviour::Echo);
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let handle = rig.batcher.handle();
        let late = handle
            .submit(
                item(1.0),
                Fit::any(),
                Some(Instant::now() + Duration::from_millis(5)),
            )
            .unwrap();
        let patient = rig.submit(2.0);
        // The model is busy; the deadline passes while the item waits.
        let err = late.wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::DeadlineExceeded);
        rig.open(2);
        running.wait().await.unwrap();
        assert_eq!(patient.wait().await.unwrap().batch_size, 1);
        assert_eq!(rig.started(), vec![1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_items_are_removed_from_the_queue_and_answered() {
        let rig = Rig::new(config(8, Duration::ZERO), true, Behaviour::Echo);
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let cancelled = rig.submit(1.0);
        let abandoned = rig.submit(2.0);
        let kept = rig.submit(3.0);
        // A cancel while running changes nothing: the result comes as usual.
        running.canceller().cancel();
        cancelled.canceller().cancel();
        drop(abandoned);
        // Answered while the model is still busy.
        let err = cancelled.wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Cancelled);
        rig.open(2);
        assert!(running.wait().await.is_ok());
        let done = kept.wait().await.unwrap();
        assert_eq!((done.batch_size, value(&done)), (1, 3.0));
        assert_eq!(rig.started(), vec![1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_cancelled_in_a_batch_formed_ahead_is_answered_cancelled() {
        let rig = Rig::new(config(2, HOUR), true, Behaviour::Echo);
        let running: Vec<Ticket> = (0..2).map(|i| rig.submit(i as f32)).collect();
        rig.until_started(1).await;
        let formed: Vec<Ticket> = (2..4).map(|i| rig.submit(i as f32)).collect();
        // The second batch is full: it is formed and handed over while the first runs.
        while rig.batcher.handle().queued() > 0 {
            tokio::task::yield_now().await;
        }
        formed[0].canceller().cancel();
        running[0].canceller().cancel();
        rig.open(2);
        for t in running {
            assert_eq!(t.wait().await.unwrap().batch_size, 2, "it had started");
        }
        let mut formed = formed.into_iter();
        let err = formed.next().unwrap().wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Cancelled);
        let done = formed.next().unwrap().wait().await.unwrap();
        assert_eq!((done.batch_size, value(&done)), (2, 3.0));
        assert_eq!(rig.started(), vec![2, 2]);
    }

    /// A gated rig of batches of one and a queue of `queue`, its model thread holding two
    /// items (values 0, running, and 1, handed over next) and its queue empty.
    async fn model_holding_two(queue: usize) -> (Rig, Ticket, Ticket) {
        let mut cfg = config(1, Duration::ZERO);
        cfg.queue = queue;
        let rig = Rig::new(cfg, true, Behaviour::Echo);
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let next = rig.submit(1.0);
        while rig.batcher.handle().queued() > 0 {
            tokio::task::yield_now().await;
        }
        (rig, running, next)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_answers_overloaded_at_once() {
        // One more batch is handed over while the first runs (the model thread's next), and
        // two wait in the queue.
        let (rig, running, next) = model_holding_two(2).await;
        let queued: Vec<Ticket> = (2..4).map(|i| rig.submit(i as f32)).collect();
        let err = rig
            .batcher
            .handle()
            .submit(item(9.0), Fit::any(), None)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert!(err.retry_after_ms.is_some_and(|ms| ms >= 1), "{err:?}");
        rig.open(4);
        running.wait().await.unwrap();
        next.wait().await.unwrap();
        for t in queued {
            t.wait().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_batch_answers_each_item_internal_and_serving_goes_on() {
        let rig = Rig::new(config(2, HOUR), false, Behaviour::FailFirst);
        let failed: Vec<Ticket> = (0..2).map(|i| rig.submit(i as f32)).collect();
        for t in failed {
            let err = t.wait().await.unwrap_err();
            assert_eq!(err.code, ErrorCode::Internal);
            assert!(err.message.contains("stand-in failure"), "{}", err.message);
        }
        let ok: Vec<Ticket> = (0..2).map(|i| rig.submit(i as f32)).collect();
        for t in ok {
            assert_eq!(t.wait().await.unwrap().batch_size, 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_batch_answers_internal_and_serving_goes_on() {
        let rig = Rig::new(config(1, HOUR), false, Behaviour::PanicFirst);
        let err = rig.submit(0.0).wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(rig.submit(1.0).wait().await.is_ok());
    }

    fn fit(key: usize, tokens: usize) -> Fit {
        Fit {
            key: vec![key],
            tokens,
        }
    }

    /// Submits items of the given fits while the model is busy with a first one, then lets
    /// everything run; returns the sizes of the batches after the first.
    async fn batches_of(cfg: BatchConfig, fits: Vec<Fit>) -> Vec<usize> {
        let rig = Rig::new(cfg, true, Behaviour::Echo);
        let first = rig.submit(-1.0);
        rig.until_started(1).await;
        let tickets: Vec<Ticket> = fits
            .into_iter()
            .enumerate()
            .map(|(i, fit)| {
                rig.batcher
                    .handle()
                    .submit(item(i as f32), fit, None)
                    .unwrap()
            })
            .collect();
        rig.open(64);
        first.wait().await.unwrap();
        for (i, t) in tickets.into_iter().enumerate() {
            let done = t.wait().await.unwrap();
            assert_eq!(value(&done), i as f32, "each item gets its own answer");
        }
        rig.started()[1..].to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn items_of_different_lengths_share_a_batch_under_one_key() {
        let fits = (1..=6).map(|len| fit(0, len * 10)).collect();
        assert_eq!(batches_of(config(8, Duration::ZERO), fits).await, vec![6]);
    }

    #[tokio::test(start_paused = true)]
    async fn items_of_different_keys_never_share_a_batch() {
        let fits = vec![fit(1, 1), fit(2, 1), fit(1, 1), fit(2, 1)];
        assert_eq!(
            batches_of(config(8, Duration::ZERO), fits).await,
            vec![2, 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_budget_cuts_a_batch_of_long_items() {
        let mut cfg = config(8, Duration::ZERO);
        cfg.max_batch_tokens = Some(100);
        // The oldest (10 tokens) leads; 4 items of 25 fill 100; the long one runs alone,
        // even above the budget; the rest follow.
        let fits = vec![
            fit(0, 10),
            fit(0, 25),
            fit(0, 250),
            fit(0, 25),
            fit(0, 25),
            fit(0, 5),
        ];
        assert_eq!(batches_of(cfg, fits).await, vec![4, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_leads_and_items_nearest_its_length_join_it() {
        let rig = Rig::new(config(3, Duration::ZERO), true, Behaviour::Echo);
        let first = rig.submit(-1.0);
        rig.until_started(1).await;
        let tickets: Vec<Ticket> = [50, 10, 48, 12, 52]
            .into_iter()
            .enumerate()
            .map(|(i, len)| {
                rig.batcher
                    .handle()
                    .submit(item(i as f32), fit(0, len), None)
                    .unwrap()
            })
            .collect();
        rig.open(8);
        first.wait().await.unwrap();
        let mut sizes = Vec::new();
        for t in tickets {
            sizes.push(t.wait().await.unwrap().batch_size);
        }
        // 50 leads with 48 and 52; then 10 with 12.
        assert_eq!(sizes, vec![3, 2, 3, 2, 3]);
        assert_eq!(rig.started(), vec![1, 3, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn length_buckets_keep_short_items_apart_from_long_ones() {
        let mut cfg = config(8, Duration::ZERO);
        cfg.buckets = vec![16, 128];
        let fits = vec![fit(0, 3), fit(0, 100), fit(0, 16), fit(0, 17), fit(0, 500)];
        // [3, 16] in the first bucket, [100, 17] in the second, [500] past the last bound.
        assert_eq!(batches_of(cfg, fits).await, vec![2, 2, 1]);
    }

    /// A profile in which every batch, of any size, takes `run`.
    fn flat_profile(max_batch: usize, run: Duration) -> Profile {
        let mut profile = Profile::new(max_batch, 1);
        profile.observe(0, 1, run);
        profile.observe(0, max_batch, run);
        profile
    }

    const MS: Duration = Duration::from_millis(1);

    /// A gated rig in `mode` whose profile says every batch takes 100 ms, its model busy
    /// with a first item (value 0) that has just started.
    async fn busy_rig(mode: BatchingMode) -> (Rig, Ticket) {
        let mut cfg = config(8, Duration::ZERO);
        cfg.mode = mode;
        let rig = Rig::with_profile(cfg, true, Behaviour::Echo, flat_profile(8, 100 * MS));
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        (rig, running)
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_predicted_to_finish_late_is_refused_at_once() {
        let (rig, running) = busy_rig(BatchingMode::Adaptive).await;
        // The model has 100 ms in hand, and the item's own batch takes 100 more.
        let tight = rig
            .submit_with(1.0, Some(150 * MS), Priority::Normal)
            .unwrap();
        let loose = rig
            .submit_with(2.0, Some(250 * MS), Priority::Normal)
            .unwrap();
        let err = tight.wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert_eq!(err.retry_after_ms, Some(51), "50 ms too late, rounded up");
        assert!(
            err.message.contains("deadline_ms of 150"),
            "{}",
            err.message
        );
        rig.open(2);
        // Without letting paused time run ahead to the loose deadline while the model
        // thread works in real time.
        rig.until_started(2).await;
        running.wait().await.unwrap();
        assert_eq!(value(&loose.wait().await.unwrap()), 2.0);
        assert_eq!(rig.ran(), vec![0.0, 2.0], "the refused item never ran");
        let goodput = &rig.metrics.goodput;
        assert_eq!(goodput.refusals(Refusal::PredictedLate), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_shorter_than_a_batch_of_one_is_deadline_exceeded_at_once() {
        let profile = flat_profile(8, 100 * MS);
        let rig = Rig::with_profile(config(8, Duration::ZERO), false, Behaviour::Echo, profile);
        let short = rig.submit_with(1.0, Some(50 * MS), Priority::High).unwrap();
        let err = short.wait().await.unwrap_err();
        assert_eq!(
            err.code,
            ErrorCode::DeadlineExceeded,
            "retrying later cannot help"
        );
        assert_eq!(err.retry_after_ms, None);
        assert!(
            err.message.contains("larger deadline_ms"),
            "{}",
            err.message
        );
        let fits = rig
            .submit_with(2.0, Some(150 * MS), Priority::Normal)
            .unwrap();
        assert_eq!(value(&fits.wait().await.unwrap()), 2.0);
        assert_eq!(rig.ran(), vec![2.0], "the short one never ran");
        assert_eq!(rig.metrics.goodput.refusals(Refusal::Doomed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_mode_queues_what_adaptive_refuses() {
        let (rig, running) = busy_rig(BatchingMode::Fixed).await;
        let tight = rig
            .submit_with(1.0, Some(150 * MS), Priority::Normal)
            .unwrap();
        // Queued, then answered when its deadline passes in the queue.
        let err = tight.wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::DeadlineExceeded);
        assert_eq!(rig.metrics.goodput.refusals(Refusal::Expired), 1);
        assert_eq!(rig.metrics.goodput.refusals(Refusal::PredictedLate), 0);
        rig.open(1);
        running.wait().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_that_became_doomed_is_answered_before_its_batch_forms() {
        let (rig, running) = busy_rig(BatchingMode::Adaptive).await;
        // Admitted: 100 ms in hand and 100 ms of its own is within 250 ms.
        let doomed = rig
            .submit_with(1.0, Some(250 * MS), Priority::Normal)
            .unwrap();
        let bystander = rig.submit(2.0);
        tokio::task::yield_now().await;
        // The running batch overruns: at 200 ms, a batch of its own cannot end by 250 ms.
        tokio::time::advance(200 * MS).await;
        // Answered as soon as it is doomed, before the model is free.
        let err = doomed.wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::DeadlineExceeded);
        assert!(err.message.contains("cannot finish"), "{}", err.message);
        rig.open(2);
        running.wait().await.unwrap();
        assert_eq!(value(&bystander.wait().await.unwrap()), 2.0);
        assert_eq!(
            rig.ran(),
            vec![0.0, 2.0],
            "the doomed item was never computed"
        );
        assert_eq!(rig.metrics.goodput.refusals(Refusal::Doomed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn items_answered_later_than_forecast_widen_admission_until_it_decays() {
        let (rig, running) = busy_rig(BatchingMode::Adaptive).await;
        // Forecast at 200 ms (100 in hand, 100 of its own); the batches overrun to 500 ms.
        let slow = rig
            .submit_with(1.0, Some(1_000 * MS), Priority::Normal)
            .unwrap();
        tokio::task::yield_now().await;
        tokio::time::advance(500 * MS).await;
        rig.open(2);
        // Without letting paused time run ahead while the model thread works in real time.
        rig.until_ran(2).await;
        running.wait().await.unwrap();
        assert_eq!(value(&slow.wait().await.unwrap()), 1.0);
        // The model busy again: at most 100 ms in hand and 100 of its own is within a
        // 200 ms deadline by the forecast alone, not with the 300 ms margin learned (of
        // which the time in hand counts).
        let running = rig.submit(5.0);
        rig.until_started(3).await;
        let handle = rig.batcher.handle();
        let now = Instant::now();
        let early = handle.refuse_early(now, now + 200 * MS, Priority::Normal);
        assert_eq!(early.map(|r| r.code), Some(ErrorCode::Overloaded));
        let err = rig
            .submit_with(2.0, Some(200 * MS), Priority::Normal)
            .unwrap()
            .wait()
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert_eq!(rig.metrics.goodput.refusals(Refusal::PredictedLate), 2);
        // Once the slow answer has left the margin's window, the same item is admitted
        // behind the same work in hand.
        tokio::time::advance(crate::margin::WINDOW).await;
        rig.open(1);
        rig.until_ran(3).await;
        running.wait().await.unwrap();
        let running = rig.submit(6.0);
        rig.until_started(4).await;
        let admitted = rig
            .submit_with(3.0, Some(200 * MS), Priority::Normal)
            .unwrap();
        rig.open(2);
        rig.until_ran(5).await;
        running.wait().await.unwrap();
        assert_eq!(value(&admitted.wait().await.unwrap()), 3.0);
        assert_eq!(rig.ran(), vec![0.0, 1.0, 5.0, 6.0, 3.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_connections_gate_refuses_what_admission_would_and_nothing_else() {
        let (rig, running) = busy_rig(BatchingMode::Adaptive).await;
        let handle = rig.batcher.handle();
        // Seventeen items: a full batch formed ahead of the running one (in hand) and nine
        // queued, one full batch of them ahead of the next normal arrival.
        let queued: Vec<Ticket> = (1..=17)
            .map(|v| {
                rig.submit_with(v as f32, Some(HOUR), Priority::Normal)
                    .unwrap()
            })
            .collect();
        tokio::task::yield_now().await;
        let now = Instant::now();
        // 200 ms in hand, 100 for the batch ahead, 100 of its own: 400 ms.
        let late = handle.refuse_early(now, now + 350 * MS, Priority::Normal);
        let late = late.expect("predicted late at the gate");
        assert_eq!(late.code, ErrorCode::Overloaded);
        assert_eq!(late.retry_after_ms, Some(51));
        assert_eq!(
            handle.refuse_early(now, now + 400 * MS, Priority::Normal),
            None
        );
        // A high item has nothing of its class queued ahead of it.
        assert_eq!(
            handle.refuse_early(now, now + 350 * MS, Priority::High),
            None
        );
        let doomed = handle.refuse_early(now, now + 50 * MS, Priority::High);
        assert_eq!(doomed.map(|r| r.code), Some(ErrorCode::DeadlineExceeded));
        let goodput = &rig.metrics.goodput;
        assert_eq!(
            (
                goodput.refusals(Refusal::PredictedLate),
                goodput.refusals(Refusal::Doomed)
            ),
            (1, 1)
        );
        // What the gate let through, the batcher admits and answers.
        let fits = rig
            .submit_with(99.0, Some(400 * MS), Priority::Normal)
            .unwrap();
        rig.open(4);
        rig.until_ran(19).await;
        running.wait().await.unwrap();
        for ticket in queued {
            ticket.wait().await.unwrap();
        }
        assert_eq!(value(&fits.wait().await.unwrap()), 99.0);

        let (fixed, running) = busy_rig(BatchingMode::Fixed).await;
        let now = Instant::now();
        assert_eq!(
            fixed
                .batcher
                .handle()
                .refuse_early(now, now + MS, Priority::Normal),
            None,
            "a fixed batcher admits everything"
        );
        fixed.open(1);
        running.wait().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_batch_closes_when_waiting_longer_would_make_it_late() {
        // --max-delay is an hour; the item's 50 ms deadline and a 10 ms batch close the
        // batch at 40 ms: waiting for a second item must still leave the grown batch time.
        let profile = flat_profile(8, 10 * MS);
        let rig = Rig::with_profile(config(8, HOUR), false, Behaviour::Echo, profile.clone());
        let ticket = rig
            .submit_with(1.0, Some(50 * MS), Priority::Normal)
            .unwrap();
        let done = ticket.wait().await.unwrap();
        assert_eq!((done.batch_size, done.queue_us), (1, 40_000));

        let mut cfg = config(8, HOUR);
        cfg.mode = BatchingMode::Fixed;
        let fixed = Rig::with_profile(cfg, false, Behaviour::Echo, profile);
        let ticket = fixed
            .submit_with(1.0, Some(50 * MS), Priority::Normal)
            .unwrap();
        let err = ticket.wait().await.unwrap_err();
        assert_eq!(
            err.code,
            ErrorCode::DeadlineExceeded,
            "fixed waits out max_delay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn higher_classes_run_first() {
        let rig = Rig::new(config(1, Duration::ZERO), true, Behaviour::Echo);
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let tickets: Vec<Ticket> = [
            (1.0, Priority::Low),
            (2.0, Priority::Normal),
            (3.0, Priority::High),
            (4.0, Priority::Normal),
        ]
        .into_iter()
        .map(|(v, p)| rig.submit_with(v, None, p).unwrap())
        .collect();
        rig.open(5);
        running.wait().await.unwrap();
        for t in tickets {
            t.wait().await.unwrap();
        }
        assert_eq!(rig.ran(), vec![0.0, 3.0, 2.0, 4.0, 1.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_item_that_waited_long_enough_overtakes_a_fresh_high_one() {
        let rig = Rig::new(config(1, Duration::ZERO), true, Behaviour::Echo);
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let low = rig.submit_with(1.0, None, Priority::Low).unwrap();
        tokio::task::yield_now().await;
        // Two ageing steps of 100 ms: level with high, and older.
        tokio::time::advance(200 * MS).await;
        let high = rig.submit_with(2.0, None, Priority::High).unwrap();
        rig.open(3);
        running.wait().await.unwrap();
        low.wait().await.unwrap();
        high.wait().await.unwrap();
        assert_eq!(rig.ran(), vec![0.0, 1.0, 2.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn low_items_are_shed_once_the_queue_is_half_full() {
        let (rig, running, next) = model_holding_two(4).await;
        // The model thread holds two; the queue takes two low items, then only others.
        let mut kept: Vec<Ticket> = (2..4)
            .map(|v| rig.submit_with(v as f32, None, Priority::Low).unwrap())
            .collect();
        let err = rig.submit_with(9.0, None, Priority::Low).unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert!(err.message.contains("low-priority"), "{}", err.message);
        assert!(err.retry_after_ms.is_some());
        kept.push(rig.submit_with(4.0, None, Priority::Normal).unwrap());
        assert_eq!(rig.metrics.goodput.refusals(Refusal::LowPriority), 1);
        rig.open(8);
        running.wait().await.unwrap();
        next.wait().await.unwrap();
        for t in kept {
            t.wait().await.unwrap();
        }
    }

    /// The order items ran in when a flood (1 to 6) and then a bystander (11, 12) queue
    /// behind a running item, in batches of two, with `fairness`.
    async fn flood_and_bystander(fairness: FairnessMode) -> Vec<f32> {
        let mut cfg = config(2, Duration::ZERO);
        cfg.fairness = FairnessSettings {
            mode: fairness,
            weights: Vec::new(),
            max_flows: 8,
        };
        let rig = Rig::new(cfg, true, Behaviour::Echo);
        let running = rig.submit_as(0.0, "flood");
        rig.until_started(1).await;
        let tickets: Vec<Ticket> = [1, 2, 3, 4, 5, 6]
            .map(|v| rig.submit_as(v as f32, "flood"))
            .into_iter()
            .chain([11, 12].map(|v| rig.submit_as(v as f32, "bystander")))
            .collect();
        rig.open(8);
        running.wait().await.unwrap();
        for t in tickets {
            t.wait().await.unwrap();
        }
        assert_eq!(rig.metrics.fairness.active(), 0, "every flow forgotten");
        rig.ran()
    }

    #[tokio::test(start_paused = true)]
    async fn with_fairness_a_bystander_is_served_between_a_floods_items() {
        assert_eq!(
            flood_and_bystander(FairnessMode::Off).await,
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 11.0, 12.0],
            "oldest first: behind the whole flood"
        );
        assert_eq!(
            flood_and_bystander(FairnessMode::Tenant).await,
            vec![0.0, 1.0, 11.0, 2.0, 12.0, 3.0, 4.0, 5.0, 6.0],
            "round robin between the two"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_fairness_a_higher_class_still_runs_first() {
        let mut cfg = config(1, Duration::ZERO);
        cfg.fairness.mode = FairnessMode::Tenant;
        cfg.fairness.max_flows = 8;
        let rig = Rig::new(cfg, true, Behaviour::Echo);
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let flood: Vec<Ticket> = (1..=3).map(|v| rig.submit_as(v as f32, "flood")).collect();
        let origin = Origin {
            tenant: Some("flood"),
            ..Origin::default()
        };
        let high = rig
            .batcher
            .handle()
            .submit_from(item(9.0), Fit::any(), None, Priority::High, origin)
            .unwrap();
        let other = rig.submit_as(7.0, "other");
        rig.open(8);
        running.wait().await.unwrap();
        for t in flood.into_iter().chain([high, other]) {
            t.wait().await.unwrap();
        }
        // High first, whichever flow; then the round robin within normal, where the
        // flood's high item has used the flood's turn.
        assert_eq!(rig.ran(), vec![0.0, 9.0, 7.0, 1.0, 2.0, 3.0]);
    }

    /// A bystander's item with a 350 ms deadline arriving behind five of a flood's, with
    /// `fairness`: each batch (of one) predicted at 100 ms and the model 100 ms from free.
    /// The round robin serves it after one of the flood's (finishing at 300 ms); first in,
    /// first out, after all five (700 ms).
    async fn deadline_behind_a_flood(fairness: FairnessMode) -> Reply {
        let mut cfg = config(1, Duration::ZERO);
        cfg.fairness.mode = fairness;
        cfg.fairness.max_flows = 8;
        let rig = Rig::with_profile(cfg, true, Behaviour::Echo, flat_profile(1, 100 * MS));
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let flood: Vec<Ticket> = (1..=5).map(|v| rig.submit_as(v as f32, "flood")).collect();
        let origin = Origin {
            tenant: Some("bystander"),
            ..Origin::default()
        };
        let deadline = Some(Instant::now() + 350 * MS);
        let bystander = rig
            .batcher
            .handle()
            .submit_from(item(9.0), Fit::any(), deadline, Priority::Normal, origin)
            .unwrap();
        rig.open(7);
        // Without letting paused time run ahead while the model thread works in real time:
        // the bystander's batch, if any, is among the first six.
        rig.until_started(6).await;
        running.wait().await.unwrap();
        for t in flood {
            t.wait().await.unwrap();
        }
        bystander.wait().await
    }

    #[tokio::test(start_paused = true)]
    async fn admission_counts_only_what_the_round_robin_serves_first() {
        let fifo = deadline_behind_a_flood(FairnessMode::Off)
            .await
            .unwrap_err();
        assert_eq!(fifo.code, ErrorCode::Overloaded);
        assert!(
            fifo.message.contains("5 requests ahead"),
            "{}",
            fifo.message
        );
        let fair = deadline_behind_a_flood(FairnessMode::Tenant).await.unwrap();
        assert_eq!(value(&fair), 9.0);
    }

    #[tokio::test]
    async fn the_batch_times_are_reported_in_adaptive_mode_once_a_batch_ran() {
        let learned = Rig::with_profile(
            config(8, Duration::ZERO),
            false,
            Behaviour::Echo,
            flat_profile(8, 100 * MS),
        );
        assert_eq!(
            learned.batcher.handle().batch_times(),
            Some(BatchTimes {
                one_us: 100_000,
                full_us: 100_000,
                max_batch: 8,
                instances: 1,
            })
        );
        let two = Rig::with_instances(
            config(8, Duration::ZERO),
            2,
            false,
            Behaviour::Echo,
            flat_profile(8, 100 * MS),
        );
        assert_eq!(
            two.batcher.handle().batch_times().map(|t| t.instances),
            Some(2),
            "a balancer forecasts two batches at once"
        );

        let fresh = Rig::new(config(4, Duration::ZERO), false, Behaviour::Echo);
        assert_eq!(
            fresh.batcher.handle().batch_times(),
            None,
            "nothing ran yet"
        );
        fresh.submit(1.0).wait().await.unwrap();
        let times = fresh.batcher.handle().batch_times().expect("a batch ran");
        assert_eq!(times.max_batch, 4);
        assert_eq!(
            times.one_us, times.full_us,
            "one size measured: flat, as the worker itself predicts"
        );

        let mut cfg = config(8, Duration::ZERO);
        cfg.mode = BatchingMode::Fixed;
        let fixed = Rig::with_profile(cfg, false, Behaviour::Echo, flat_profile(8, 100 * MS));
        fixed.submit(1.0).wait().await.unwrap();
        assert_eq!(
            fixed.batcher.handle().batch_times(),
            None,
            "a fixed batcher admits everything, so a balancer must too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_instances_run_two_batches_side_by_side_and_form_one_ahead() {
        let rig = Rig::with_instances(
            config(2, Duration::ZERO),
            2,
            true,
            Behaviour::Echo,
            Profile::new(2, 1),
        );
        // Each runs at once on its own thread: neither waits for the other to finish.
        let a = rig.submit(1.0);
        rig.until_started(1).await;
        let b = rig.submit(2.0);
        rig.until_started(2).await;
        assert_eq!(rig.started(), vec![1, 1]);
        assert_eq!(
            rig.metrics.busy.reading().capacity,
            None,
            "nothing ended yet"
        );
        // Both threads busy: a full batch is formed ahead, a partial one waits.
        let rest: Vec<Ticket> = (3..=5).map(|v| rig.submit(v as f32)).collect();
        rig.open(5);
        let mut answers = vec![
            value(&a.wait().await.unwrap()),
            value(&b.wait().await.unwrap()),
        ];
        for t in rest {
            answers.push(value(&t.wait().await.unwrap()));
        }
        assert_eq!(answers, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut sizes = rig.started();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, 1, 1, 2], "{:?}", rig.started());
    }

    #[tokio::test(start_paused = true)]
    async fn with_two_instances_admission_starts_the_batch_on_the_first_thread_free() {
        // 100 ms per batch of up to 2, six items submitted to a gated model, then one with
        // a deadline.
        let forecast_of = |instances: usize, budget: Duration| async move {
            let rig = Rig::with_instances(
                config(2, Duration::ZERO),
                instances,
                true,
                Behaviour::Echo,
                flat_profile(2, 100 * MS),
            );
            let mut held = vec![rig.submit(0.0)];
            rig.until_started(1).await;
            for v in 1..=5 {
                held.push(rig.submit(v as f32));
            }
            rig.until_started(instances).await;
            // Forecast: 400 ms with one thread (100 left of the running batch, 100 for the
            // one formed ahead, a full batch of the queue and its own); 200 with two (each
            // runs a batch with 100 left; the one formed ahead starts on either at 100,
            // this item's batch, the queued item and itself, on the other at 100). The
            // work in hand shared by both (300 / 2 = 150, then its own 100) would say 250.
            let late = rig
                .submit_with(9.0, Some(budget), Priority::Normal)
                .unwrap();
            // Paused time moves only once the actor has judged it with the model still
            // gated: a refusal is answered by then, an admitted item waits.
            let early = tokio::time::timeout(MS, late.wait()).await;
            let refused = rig.metrics.goodput.refusals(Refusal::PredictedLate);
            rig.open(16);
            for t in held {
                t.wait().await.unwrap();
            }
            (
                early.ok().map(|answer| answer.err().map(|e| e.code)),
                refused,
            )
        };
        assert_eq!(
            forecast_of(1, 350 * MS).await,
            (Some(Some(ErrorCode::Overloaded)), 1)
        );
        assert_eq!(
            forecast_of(2, 220 * MS).await,
            (None, 0),
            "admitted, still waiting"
        );
        assert_eq!(
            forecast_of(2, 190 * MS).await,
            (Some(Some(ErrorCode::Overloaded)), 1)
        );
    }

    #[tokio::test]
    async fn two_instances_drain_on_shutdown_and_both_threads_are_joined() {
        let rig = Rig::with_instances(
            config(1, HOUR),
            2,
            true,
            Behaviour::Echo,
            Profile::new(1, 1),
        );
        let tickets: Vec<Ticket> = (0..4).map(|v| rig.submit(v as f32)).collect();
        rig.shutdown.cancel();
        rig.open(4);
        for (v, t) in tickets.into_iter().enumerate() {
            assert_eq!(value(&t.wait().await.unwrap()), v as f32);
        }
        let Rig { batcher, .. } = rig;
        tokio::time::timeout(Duration::from_secs(10), batcher.join())
            .await
            .unwrap();
    }

    // Real time from here: a drain deadline is a timer, and paused time would jump to it
    // while the model thread is still working.

    #[tokio::test]
    async fn shutdown_finishes_queued_items_and_refuses_new_ones() {
        let rig = Rig::new(config(8, HOUR), true, Behaviour::Echo);
        let first = rig.submit(0.0);
        // max_delay is an hour, but an idle model with a draining queue does not wait.
        rig.shutdown.cancel();
        let err = loop {
            // The actor closes the queue on its next turn.
            match rig.batcher.handle().submit(item(9.0), Fit::any(), None) {
                Err(e) => break e,
                Ok(t) => {
                    drop(t);
                    tokio::task::yield_now().await;
                }
            }
        };
        assert_eq!(err.code, ErrorCode::ShuttingDown);
        rig.open(8);
        assert!(first.wait().await.is_ok());
        let Rig { batcher, .. } = rig;
        tokio::time::timeout(Duration::from_secs(10), batcher.join())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn drain_timeout_answers_what_is_left_shutting_down() {
        let mut cfg = config(1, Duration::ZERO);
        cfg.drain_timeout = Duration::from_millis(50);
        let rig = Rig::new(cfg, true, Behaviour::Echo);
        let running = rig.submit(0.0);
        rig.until_started(1).await;
        let next = rig.submit(1.0);
        let left = rig.submit(2.0);
        rig.shutdown.cancel();
        let err = left.wait().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::ShuttingDown);
        rig.open(3);
        // The running batch and the one already handed over still finish.
        assert!(running.wait().await.is_ok());
        assert!(next.wait().await.is_ok());
        let Rig { batcher, .. } = rig;
        tokio::time::timeout(Duration::from_secs(10), batcher.join())
            .await
            .unwrap();
    }
}
