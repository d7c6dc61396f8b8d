//! Staging: the handoff between the batcher and the model thread, built so that the model
//! thread does nothing but run batches back to back.
//!
//! ```text
//! batcher task ──form (copy items into the input)──▶ [1 staged ahead] ──▶ model thread: run
//!      ▲                                                                       │
//!      └──── split the output buffers, answer each item ◀──── Ran (one per batch) ◀┘
//! ```
//!
//! On a fast model the worker's cost per item, not the model, sets the pace; with the batch
//! formed and split on the model thread, ONNX Runtime's intra-op pool sat waiting through
//! both, and each answer woke a connection task from outside the async runtime (a futex wake
//! per item). So an [`Engine`] comes with a [`Stager`], a cheap `Send` value that the batcher
//! task uses to:
//! - **form** a batch: each item's bytes are copied once, straight into the buffer the engine
//!   reads (for ONNX Runtime, the input tensor itself), while the model thread runs the
//!   previous batch; at most one batch is formed ahead (the batcher keeps two in flight), so
//!   this doubles the input buffers and nothing more;
//! - **split** a batch's output: the model thread hands back one buffer per output and the
//!   batcher cuts it into answers and sends them, waking connection tasks from inside the
//!   runtime, once per batch for the model thread.
//!
//! Forming and splitting are memory copies bounded by the frame limit times `--max-batch`,
//! the same work the model thread used to do, short enough for an async task.
//!
//! **An item in a formed batch has not started.** When the model thread takes a staged
//! batch it admits its members ([`Staged::admit`]): an item cancelled, past its deadline, or
//! whose caller has gone since the batch was formed is answered `cancelled` or
//! `deadline_exceeded` (or skipped) rather than with its row's result, which is computed and
//! dropped (its place in the input is already written); a batch with no member left is not
//! run at all. An item of the batch that runs is answered as usual, as before.
//!
//! **Exactly one answer.** Each member keeps its item's reply guard until it is answered;
//! a batch that fails to form, fails to run, panics, or cannot be split answers each member
//! `internal`; if the batcher task is gone when a batch finishes, the model thread splits and
//! answers it itself.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tidepool_protocol::{ErrorCode, Tensors};
use tokio::sync::mpsc;
use tracing::error;

use crate::batcher::{Done, Rejection, Responder};
use crate::busy::BusyMeter;
use crate::error::Error;

/// Runs batches: what the batcher's model thread needs of a model. The worker's is
/// [`crate::Model`] (an ONNX Runtime session); the tests use stand-ins.
pub trait Engine: Send + 'static {
    /// Forms this engine's batches and splits its outputs, off the model thread.
    type Stager: Stager;

    /// A stager for this engine's batches.
    fn stager(&self) -> Self::Stager;

    /// Runs one formed batch and returns its outputs, unsplit. Only this runs on the model
    /// thread.
    fn run_batch(
        &mut self,
        input: <Self::Stager as Stager>::Input,
    ) -> Result<<Self::Stager as Stager>::Output, Error>;
}

/// Forms batches from checked items and splits outputs into answers, on the batcher task.
pub trait Stager: Send + 'static {
    /// A formed batch, ready for [`Engine::run_batch`].
    type Input: Send + 'static;
    /// A batch's outputs as [`Engine::run_batch`] returns them.
    type Output: Send + 'static;

    /// Forms one batch of checked items that share a [`crate::Fit::key`], in order.
    fn form(&self, items: &[&Tensors]) -> Result<Self::Input, Error>;

    /// Splits a batch's outputs into each item's, in the order the items were formed.
    fn split(&self, output: Self::Output) -> Result<Vec<Tensors>, Error>;
}

/// The formed input an engine runs.
pub(crate) type Input<E> = <<E as Engine>::Stager as Stager>::Input;
/// The unsplit output an engine returns.
pub(crate) type Output<E> = <<E as Engine>::Stager as Stager>::Output;

/// One item of a staged batch: everything but its inputs, which are in the formed batch.
#[derive(Debug)]
pub(crate) struct Member {
    /// Microseconds between submission and the batch being formed.
    pub(crate) queue_us: u64,
    /// The item's reply guard.
    pub(crate) reply: Responder,
    /// Set by the item's [`crate::batcher::Canceller`].
    pub(crate) cancelled: Arc<AtomicBool>,
    /// The item's deadline.
    pub(crate) deadline: Option<Instant>,
    /// What the item gets instead of its row's result, decided when the batch was taken to
    /// run; `None` once it was answered that way or when it gets its result.
    verdict: Option<Verdict>,
}

/// Why an admitted batch's member gets no result.
#[derive(Debug)]
enum Verdict {
    /// Nobody waits for the answer.
    Abandoned,
    /// Answered with this.
    Rejected(Rejection),
}

impl Member {
    /// A member for an item that waited `queue_us`.
    pub(crate) fn new(
        queue_us: u64,
        reply: Responder,
        cancelled: Arc<AtomicBool>,
        deadline: Option<Instant>,
    ) -> Member {
        Member {
            queue_us,
            reply,
            cancelled,
            deadline,
            verdict: None,
        }
    }

    /// Decides, as the batch is taken to run at `now`, whether the item still wants its
    /// result; returns whether it does.
    fn admit(&mut self, now: Instant) -> bool {
        self.verdict = if self.reply.is_abandoned() {
            Some(Verdict::Abandoned)
        } else if self.cancelled.load(Ordering::Relaxed) {
            Some(Verdict::Rejected(Rejection::new(
                ErrorCode::Cancelled,
                "cancelled by the client before its batch ran",
            )))
        } else if self.deadline.is_some_and(|d| d <= now) {
            Some(Verdict::Rejected(Rejection::new(
                ErrorCode::DeadlineExceeded,
                format!(
                    "deadline passed after {} ms in the worker's queue, before its batch ran",
                    self.queue_us / 1_000
                ),
            )))
        } else {
            None
        };
        self.verdict.is_none()
    }

    /// Answers the item: its verdict if it has one, else `reply`.
    fn answer(self, reply: impl FnOnce(u64) -> Result<Done, Rejection>) {
        match self.verdict {
            // Dropping a guard whose caller has gone sends nothing anyone reads.
            Some(Verdict::Abandoned) => self.reply.send(Err(Rejection::new(
                ErrorCode::Cancelled,
                "nobody waits for this item",
            ))),
            Some(Verdict::Rejected(rejection)) => self.reply.send(Err(rejection)),
            None => self.reply.send(reply(self.queue_us)),
        }
    }
}

/// A formed batch on its way to the model thread.
#[derive(Debug)]
pub(crate) struct Staged<I> {
    /// The batcher's number for it, which comes back in its [`Ran`]: with several model
    /// threads, batches come back in the order they end, not the order they were handed.
    pub(crate) id: u64,
    members: Vec<Member>,
    input: I,
}

impl<I> Staged<I> {
    /// Marks the members that no longer want their result at `now`; returns how many still
    /// do.
    fn admit(&mut self, now: Instant) -> usize {
        self.members
            .iter_mut()
            .map(|m| m.admit(now))
            .filter(|&live| live)
            .count()
    }
}

/// Forms a batch of `items` (whose members are `members`, in the same order). When forming
/// fails, each member is answered `internal` here and `None` comes back.
pub(crate) fn stage<S: Stager>(
    stager: &S,
    items: &[&Tensors],
    members: Vec<Member>,
) -> Option<Staged<S::Input>> {
    let size = members.len();
    let formed = catch_unwind(AssertUnwindSafe(|| stager.form(items)));
    let message = match formed {
        Ok(Ok(input)) => {
            return Some(Staged {
                id: 0,
                members,
                input,
            })
        }
        Ok(Err(e)) => format!("forming the batch of {size} failed: {e}"),
        Err(_) => format!("the model panicked forming a batch of {size}"),
    };
    error!(%message, "batch failed");
    for member in members {
        member
            .reply
            .send(Err(Rejection::new(ErrorCode::Internal, message.clone())));
    }
    None
}

/// How a staged batch ended on the model thread.
#[derive(Debug)]
enum Outcome<O> {
    /// It ran; the outputs are still to be split.
    Ran(O),
    /// It failed or panicked: why, for each live member.
    Failed(String),
    /// No member wanted its result, so it did not run.
    Skipped,
}

/// A batch back from the model thread, to be split and answered.
#[derive(Debug)]
pub(crate) struct Ran<O> {
    /// Its [`Staged::id`].
    pub(crate) id: u64,
    members: Vec<Member>,
    outcome: Outcome<O>,
    /// Microseconds the batch took to run (0 when skipped).
    pub(crate) infer_us: u64,
}

impl<O> Ran<O> {
    /// Whether the model ran it (a skipped batch says nothing about the model's speed).
    pub(crate) fn ran(&self) -> bool {
        !matches!(self.outcome, Outcome::Skipped)
    }

    /// Splits the outputs and answers every member once.
    pub(crate) fn finish<S: Stager<Output = O>>(self, stager: &S) {
        let Ran {
            id: _,
            members,
            outcome,
            infer_us,
        } = self;
        let size = members.len();
        let failure = match outcome {
            Outcome::Ran(output) => match catch_unwind(AssertUnwindSafe(|| stager.split(output))) {
                Ok(Ok(outputs)) if outputs.len() == size => {
                    for (member, outputs) in members.into_iter().zip(outputs) {
                        member.answer(|queue_us| {
                            Ok(Done {
                                outputs,
                                queue_us,
                                infer_us,
                                batch_size: size as u32,
                            })
                        });
                    }
                    return;
                }
                Ok(Ok(outputs)) => format!(
                    "the model returned {} answers for {size} items",
                    outputs.len()
                ),
                Ok(Err(e)) => format!("splitting the batch of {size} failed: {e}"),
                Err(_) => format!("the model panicked splitting a batch of {size}"),
            },
            Outcome::Failed(message) => message,
            Outcome::Skipped => String::new(),
        };
        if !failure.is_empty() {
            error!(message = %failure, "batch failed");
        }
        for member in members {
            member.answer(|_| Err(Rejection::new(ErrorCode::Internal, failure.clone())));
        }
    }
}

/// The batches waiting for a model thread, shared by all of them: each takes the next one
/// when it is free.
pub(crate) type Batches<I> = Arc<Mutex<mpsc::Receiver<Staged<I>>>>;

/// A model thread (instance `slot` of the [`Batches`]' takers): runs each staged batch it
/// takes, back to back, and hands it back unsplit on `done`. Ends when `batches` closes
/// (after the batch it is running).
pub(crate) fn model_thread<E: Engine>(
    mut engine: E,
    slot: usize,
    batches: Batches<Input<E>>,
    done: mpsc::Sender<Ran<Output<E>>>,
    meter: BusyMeter,
) {
    let stager = engine.stager();
    loop {
        // A std mutex held while this thread waits for a batch: the other idle model threads
        // wait on the lock instead of the channel, and the lock passes on as soon as a batch
        // is taken. Only these threads take it, never the async runtime.
        let next = batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .blocking_recv();
        let Some(mut staged) = next else {
            break;
        };
        let started = Instant::now();
        let size = staged.members.len();
        let outcome = if staged.admit(started) == 0 {
            Outcome::Skipped
        } else {
            let queued_us =
                staged.members.iter().map(|m| m.queue_us).sum::<u64>() / size.max(1) as u64;
            meter.batch_started(slot, started, size, queued_us);
            let result = catch_unwind(AssertUnwindSafe(|| engine.run_batch(staged.input)));
            meter.batch_finished(slot, Instant::now());
            match result {
                Ok(Ok(output)) => Outcome::Ran(output),
                Ok(Err(e)) => Outcome::Failed(format!("the batch of {size} failed: {e}")),
                Err(_) => Outcome::Failed(format!("the model panicked running a batch of {size}")),
            }
        };
        let ran = Ran {
            id: staged.id,
            members: staged.members,
            outcome,
            infer_us: micros(started.elapsed()),
        };
        if let Err(mpsc::error::SendError(ran)) = done.blocking_send(ran) {
            // The batcher task is gone: answer here rather than drop computed results.
            ran.finish(&stager);
        }
    }
}

/// Microseconds in `d`, saturating.
pub(crate) fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A stand-in engine for the batcher's and this module's tests.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the stand-in engine does with a batch.
    #[derive(Clone, Copy)]
    pub(crate) enum Behaviour {
        Echo,
        FailFirst,
        PanicFirst,
    }

    /// Echoes its inputs, records each batch's size when it starts and each item's value in
    /// the order items ran, and optionally waits for the test to open a gate before each
    /// batch.
    pub(crate) struct Fake {
        pub(crate) started: Arc<Mutex<Vec<usize>>>,
        /// Each item's value (its input `x`), in the order items ran.
        pub(crate) ran: Arc<Mutex<Vec<f32>>>,
        /// Shared by the fakes of one batcher's instances: each opening lets one batch
        /// through, on whichever thread waits.
        pub(crate) gate: Option<Arc<Mutex<std::sync::mpsc::Receiver<()>>>>,
        pub(crate) behaviour: Behaviour,
    }

    /// Forms a batch by cloning the items (the copy a real engine makes into its input).
    pub(crate) struct Cloner;

    impl Stager for Cloner {
        type Input = Vec<Tensors>;
        type Output = Vec<Tensors>;

        fn form(&self, items: &[&Tensors]) -> Result<Vec<Tensors>, Error> {
            Ok(items.iter().map(|i| (*i).clone()).collect())
        }

        fn split(&self, output: Vec<Tensors>) -> Result<Vec<Tensors>, Error> {
            Ok(output)
        }
    }

    impl Engine for Fake {
        type Stager = Cloner;

        fn stager(&self) -> Cloner {
            Cloner
        }

        fn run_batch(&mut self, items: Vec<Tensors>) -> Result<Vec<Tensors>, Error> {
            let first = {
                let mut started = self.started.lock().unwrap();
                started.push(items.len());
                started.len() == 1
            };
            self.ran
                .lock()
                .unwrap()
                .extend(items.iter().map(|i| i["x"].to_vec::<f32>().unwrap()[0]));
            if let Some(gate) = &self.gate {
                let _ = gate.lock().unwrap().recv();
            }
            match self.behaviour {
                Behaviour::FailFirst if first => Err(Error::ModelThread("stand-in failure")),
                Behaviour::PanicFirst if first => panic!("stand-in panic"),
                _ => Ok(items),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tidepool_protocol::Tensor;
    use tokio::sync::oneshot;

    use super::fake::{Behaviour, Cloner, Fake};
    use super::*;
    use crate::batcher::Reply;

    fn item(v: f32) -> Tensors {
        Tensors::from([("x".to_owned(), Tensor::from_vec(vec![1], vec![v]).unwrap())])
    }

    fn value(reply: &Reply) -> f32 {
        reply.as_ref().unwrap().outputs["x"]
            .to_vec::<f32>()
            .unwrap()[0]
    }

    /// A member, its reply's receiver and its cancel flag.
    fn member(deadline: Option<Instant>) -> (Member, oneshot::Receiver<Reply>, Arc<AtomicBool>) {
        let (tx, rx) = oneshot::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let m = Member::new(7, Responder::new(tx), Arc::clone(&cancelled), deadline);
        (m, rx, cancelled)
    }

    /// A formed batch with each member's reply receiver and cancel flag.
    struct Formed {
        batch: Staged<Vec<Tensors>>,
        rxs: Vec<oneshot::Receiver<Reply>>,
        flags: Vec<Arc<AtomicBool>>,
    }

    /// A batch of items valued `values`, with the given deadlines, formed.
    fn staged(values: &[f32], deadlines: &[Option<Instant>]) -> Formed {
        let items: Vec<Tensors> = values.iter().map(|&v| item(v)).collect();
        let refs: Vec<&Tensors> = items.iter().collect();
        let mut members = Vec::new();
        let (mut rxs, mut flags) = (Vec::new(), Vec::new());
        for &deadline in deadlines {
            let (m, rx, flag) = member(deadline);
            members.push(m);
            rxs.push(rx);
            flags.push(flag);
        }
        let batch = stage(&Cloner, &refs, members).unwrap();
        Formed { batch, rxs, flags }
    }

    /// A model thread over a stand-in engine that waits for a gate before each batch.
    struct Thread {
        batches: mpsc::Sender<Staged<Vec<Tensors>>>,
        done: mpsc::Receiver<Ran<Vec<Tensors>>>,
        gate: std::sync::mpsc::Sender<()>,
        started: Arc<Mutex<Vec<usize>>>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Thread {
        fn start(behaviour: Behaviour) -> Thread {
            let started = Arc::new(Mutex::new(Vec::new()));
            let (gate, gate_rx) = std::sync::mpsc::channel();
            let engine = Fake {
                started: Arc::clone(&started),
                ran: Arc::new(Mutex::new(Vec::new())),
                gate: Some(Arc::new(Mutex::new(gate_rx))),
                behaviour,
            };
            let (batches, batch_rx) = mpsc::channel(2);
            let (done_tx, done) = mpsc::channel(2);
            let meter = BusyMeter::new(Instant::now());
            let batch_rx = Arc::new(Mutex::new(batch_rx));
            let thread =
                std::thread::spawn(move || model_thread(engine, 0, batch_rx, done_tx, meter));
            Thread {
                batches,
                done,
                gate,
                started,
                thread,
            }
        }

        fn until_started(&self, n: usize) {
            while self.started.lock().unwrap().len() < n {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    #[test]
    fn a_staged_batch_is_split_into_each_items_answer_in_order() {
        let Formed { batch, rxs, .. } = staged(&[1.0, 2.0, 3.0], &[None; 3]);
        let mut t = Thread::start(Behaviour::Echo);
        t.batches.blocking_send(batch).unwrap();
        t.gate.send(()).unwrap();
        let ran = t.done.blocking_recv().unwrap();
        assert!(ran.ran());
        ran.finish(&Cloner);
        for (i, rx) in rxs.into_iter().enumerate() {
            let reply = rx.blocking_recv().unwrap();
            assert_eq!(value(&reply), (i + 1) as f32);
            let done = reply.unwrap();
            assert_eq!((done.batch_size, done.queue_us), (3, 7));
        }
        drop(t.batches);
        t.thread.join().unwrap();
    }

    #[test]
    fn a_cancel_or_deadline_while_the_batch_waits_formed_answers_that_item_only() {
        let mut t = Thread::start(Behaviour::Echo);
        // The model thread is busy with a first batch while the second waits, formed.
        let Formed {
            batch: first,
            rxs: first_rxs,
            ..
        } = staged(&[0.0], &[None]);
        t.batches.blocking_send(first).unwrap();
        t.until_started(1);
        let soon = Instant::now() + Duration::from_millis(20);
        let Formed {
            batch: second,
            rxs,
            flags,
        } = staged(&[1.0, 2.0, 3.0, 4.0], &[None, None, Some(soon), None]);
        t.batches.blocking_send(second).unwrap();
        let mut rxs = rxs.into_iter();
        let (kept, cancelled, late, abandoned) = (
            rxs.next().unwrap(),
            rxs.next().unwrap(),
            rxs.next().unwrap(),
            rxs.next().unwrap(),
        );
        flags[1].store(true, Ordering::Relaxed);
        drop(abandoned);
        while Instant::now() <= soon {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A cancel after the batch was taken changes nothing for the first batch's item.
        t.gate.send(()).unwrap();
        t.gate.send(()).unwrap();
        t.done.blocking_recv().unwrap().finish(&Cloner);
        let ran = t.done.blocking_recv().unwrap();
        assert!(ran.ran(), "one member still wants its result");
        ran.finish(&Cloner);
        for rx in first_rxs {
            assert_eq!(value(&rx.blocking_recv().unwrap()), 0.0);
        }
        assert_eq!(value(&kept.blocking_recv().unwrap()), 1.0);
        let err = cancelled.blocking_recv().unwrap().unwrap_err();
        assert_eq!(err.code, ErrorCode::Cancelled);
        let err = late.blocking_recv().unwrap().unwrap_err();
        assert_eq!(err.code, ErrorCode::DeadlineExceeded);
        assert!(
            err.message.contains("before its batch ran"),
            "{}",
            err.message
        );
        // The formed batch ran whole: rows are not taken out of a written input.
        assert_eq!(*t.started.lock().unwrap(), vec![1, 4]);
    }

    #[test]
    fn a_batch_nobody_wants_any_more_does_not_run() {
        let mut t = Thread::start(Behaviour::Echo);
        let Formed { batch, rxs, flags } = staged(&[1.0, 2.0], &[None, None]);
        flags[0].store(true, Ordering::Relaxed);
        let mut rxs = rxs.into_iter();
        let cancelled = rxs.next().unwrap();
        drop(rxs);
        t.batches.blocking_send(batch).unwrap();
        let ran = t.done.blocking_recv().unwrap();
        assert!(!ran.ran());
        ran.finish(&Cloner);
        let err = cancelled.blocking_recv().unwrap().unwrap_err();
        assert_eq!(err.code, ErrorCode::Cancelled);
        assert!(
            t.started.lock().unwrap().is_empty(),
            "the engine was not called"
        );
    }

    #[test]
    fn a_failed_or_panicking_batch_answers_each_member_internal() {
        for behaviour in [Behaviour::FailFirst, Behaviour::PanicFirst] {
            let mut t = Thread::start(behaviour);
            let Formed { batch, rxs, .. } = staged(&[1.0, 2.0], &[None, None]);
            t.batches.blocking_send(batch).unwrap();
            t.gate.send(()).unwrap();
            t.done.blocking_recv().unwrap().finish(&Cloner);
            for rx in rxs {
                let err = rx.blocking_recv().unwrap().unwrap_err();
                assert_eq!(err.code, ErrorCode::Internal);
            }
        }
    }

    #[test]
    fn with_the_batcher_gone_the_model_thread_answers_itself() {
        let t = Thread::start(Behaviour::Echo);
        let Formed { batch, rxs, .. } = staged(&[5.0], &[None]);
        t.batches.blocking_send(batch).unwrap();
        drop(t.done);
        t.gate.send(()).unwrap();
        drop(t.batches);
        t.thread.join().unwrap();
        for rx in rxs {
            assert_eq!(value(&rx.blocking_recv().unwrap()), 5.0);
        }
    }

    /// A stager whose forming fails.
    struct Refuses;

    impl Stager for Refuses {
        type Input = ();
        type Output = ();

        fn form(&self, _: &[&Tensors]) -> Result<(), Error> {
            Err(Error::ModelThread("stand-in refusal"))
        }

        fn split(&self, (): ()) -> Result<Vec<Tensors>, Error> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn a_batch_that_cannot_be_formed_answers_each_member_internal() {
        let (m, rx, _) = member(None);
        let x = item(1.0);
        assert!(stage(&Refuses, &[&x], vec![m]).is_none());
        let err = rx.blocking_recv().unwrap().unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(err.message.contains("stand-in refusal"), "{}", err.message);
    }
}
