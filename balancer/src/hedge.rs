//! Hedged requests (`--hedge-after`): a request still unanswered some time after it was
//! written is sent to a second target too, and the first result wins (the Tail at Scale
//! technique; Envoy's `hedge_on_per_try_timeout`).
//!
//! The upstream writer tells [`Hedges::watch`] of each request it writes; one task
//! ([`Hedges::run`]) waits out each one's delay in write order and, when the request is
//! still at its target, splits its pending entry into two attempts of a race (`pending`)
//! and routes the second one anywhere but the first target. The race answers the client
//! once; the loser is taken off its connection and its target told to cancel it.
//!
//! Hedges are bounded by a budget of their own with the shape of the retry budget
//! (`retry`): a share of the requests of the last 10 s plus a floor per second. The delay
//! is fixed, or the pool's p99 over the last 10 s (from the targets' latency histograms),
//! recomputed every second.
//!
//! Off by default: every hedge runs the model once more, which a batching worker pays for
//! in compute and in the latency of the requests batched with it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tidepool_protocol::RequestId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::LatencyCounts;
use crate::queue::Reroute;
use crate::retry::{Retries, RetrySettings};
use crate::upstream::UpstreamConn;

/// Requests watched at once; beyond it a request is not hedged (and counted). At 100,000
/// requests/s and a 100 ms delay, 10,000 are watched.
const WATCHED: usize = 65_536;
/// How often the p99 delay is recomputed.
const TICK: Duration = Duration::from_secs(1);
/// The p99 delay is read over this many ticks.
const P99_WINDOW: usize = 10;
/// Fewer answers than this in the window make no p99: no hedging until then.
const P99_MIN_ANSWERS: u64 = 100;

/// How long a request waits before it is hedged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HedgeDelay {
    /// A fixed delay after it was written.
    Fixed(Duration),
    /// The pool's observed p99 over the last 10 s.
    P99,
}

/// `--hedge-after` and the hedge budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct HedgeSettings {
    pub(crate) delay: HedgeDelay,
    /// Hedges allowed as a share of the requests seen in the budget's window.
    pub(crate) ratio: f64,
    /// Hedges allowed per second on top of the share.
    pub(crate) floor_per_second: u32,
}

/// One written request to look at again once its delay is over.
struct Watch {
    due: Instant,
    /// Weak: a watch must not keep a closed connection (and its map) alive.
    conn: Weak<UpstreamConn>,
    upstream_id: RequestId,
}

/// The hedging policy, its budget and its counters; cheap to clone. Upstream writers
/// [`watch`](Hedges::watch) what they write; one task [`run`](Hedges::run)s the rest.
#[derive(Clone, Debug)]
pub(crate) struct Hedges {
    shared: Arc<Shared>,
}

/// The receiving end of the watches, owned by [`Hedges::run`].
pub(crate) struct Watches(mpsc::Receiver<Watch>);

#[derive(Debug)]
struct Shared {
    settings: HedgeSettings,
    budget: Retries,
    watches: mpsc::Sender<Watch>,
    /// The delay in microseconds now; `u64::MAX` while there is none (p99 not known yet).
    delay_us: AtomicU64,
    /// Hedges routed.
    sent: AtomicU64,
    /// Requests not hedged because [`WATCHED`] were watched already.
    unwatched: AtomicU64,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("due", &self.due)
            .field("upstream_id", &self.upstream_id)
            .finish()
    }
}

impl Hedges {
    /// A policy with `settings` and the receiver its task will own.
    pub(crate) fn new(settings: HedgeSettings) -> (Hedges, Watches) {
        let (tx, rx) = mpsc::channel(WATCHED);
        let delay_us = match settings.delay {
            HedgeDelay::Fixed(d) => micros(d),
            HedgeDelay::P99 => u64::MAX,
        };
        let budget = Retries::new(RetrySettings {
            enabled: true,
            ratio: settings.ratio,
            floor_per_second: settings.floor_per_second,
        });
        let shared = Shared {
            settings,
            budget,
            watches: tx,
            delay_us: AtomicU64::new(delay_us),
            sent: AtomicU64::new(0),
            unwatched: AtomicU64::new(0),
        };
        (
            Hedges {
                shared: Arc::new(shared),
            },
            Watches(rx),
        )
    }

    /// The delay now: `None` while `p99` has too few answers to go by.
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.shared.delay_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// A request was just written to `conn` under `upstream_id`: counted towards the
    /// budget's share, and looked at again after the delay. Never waits: with
    /// [`WATCHED`] requests watched already, this one is not hedged.
    pub(crate) fn watch(&self, conn: &Arc<UpstreamConn>, upstream_id: RequestId) {
        let now = Instant::now();
        self.shared.budget.note_request(now);
        let Some(delay) = self.delay() else {
            return;
        };
        let watch = Watch {
            due: now + delay,
            conn: Arc::downgrade(conn),
            upstream_id,
        };
        if self.shared.watches.try_send(watch).is_err() {
            self.shared.unwatched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hedges sent, ever.
    pub(crate) fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Hedges not sent because the budget was spent, ever.
    pub(crate) fn exhausted(&self) -> u64 {
        self.shared.budget.exhausted()
    }

    /// Requests not watched because too many were, ever.
    pub(crate) fn unwatched(&self) -> u64 {
        self.shared.unwatched.load(Ordering::Relaxed)
    }

    /// Looks at each watched request when its delay is over and hedges it when it is
    /// still unanswered (through `queue`, which routes it away from its first target);
    /// with `p99`, recomputes the delay every second from `latency` (the pool's
    /// histograms summed). Stops at `stop`.
    pub(crate) async fn run(
        self,
        Watches(mut rx): Watches,
        queue: Reroute,
        latency: impl Fn() -> LatencyCounts,
        stop: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut window: VecDeque<LatencyCounts> = VecDeque::with_capacity(P99_WINDOW + 1);
        let p99 = self.shared.settings.delay == HedgeDelay::P99;
        // Watches arrive in write order; with a fixed delay that is due order. A p99 that
        // shrinks may put an earlier due behind a later one, which then waits for it:
        // at worst a hedge late by the change in the delay.
        let mut next: Option<Watch> = None;
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = &mut sleep, if next.is_some() => {
                    if let Some(watch) = next.take() {
                        self.look(watch, &queue);
                    }
                }
                watch = rx.recv(), if next.is_none() => match watch {
                    Some(watch) => {
                        sleep.as_mut().reset(watch.due);
                        next = Some(watch);
                    }
                    None => return,
                },
                _ = ticks.tick(), if p99 => {
                    window.push_back(latency());
                    if window.len() > P99_WINDOW + 1 {
                        window.pop_front();
                    }
                    self.update_p99(&window);
                }
            }
        }
    }

    /// Sets the delay to the p99 of what the window's oldest and newest counts differ by.
    fn update_p99(&self, window: &VecDeque<LatencyCounts>) {
        let (Some(oldest), Some(newest)) = (window.front(), window.back()) else {
            return;
        };
        let seen = newest.since(*oldest);
        let us = if seen.total() < P99_MIN_ANSWERS {
            u64::MAX
        } else {
            seen.quantile(0.99).map_or(u64::MAX, micros)
        };
        self.shared.delay_us.store(us, Ordering::Relaxed);
    }

    /// The watched request's delay is over: hedge it if it is still at its target, may be
    /// hedged, and the budget allows.
    fn look(&self, watch: Watch, queue: &Reroute) {
        let Some(conn) = watch.conn.upgrade() else {
            return;
        };
        if !conn.hedgeable(watch.upstream_id) {
            return;
        }
        if !self.shared.budget.try_spend() {
            return;
        }
        // Split under the connection's map guard: an answer arriving now finds either the
        // whole entry or its first attempt, never nothing.
        let Some(hedge) = conn.hedge(watch.upstream_id) else {
            return;
        };
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(target = %conn.addr(), "request hedged on another target");
        queue.send(hedge);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX - 1)
        .min(u64::MAX - 1)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use tidepool_protocol::{DType, Infer, Message, Tensor};

    use super::*;
    use crate::metrics::Metrics;
    use crate::pending::{Answer, ClientConn, Lifecycle, Outbound, Payload, Pending, Slot};
    use crate::queue::{QueueHandle, QueueReceiver, QueueSignal};

    const FIRST: &str = "192.0.2.10:7100";

    fn settings(delay: HedgeDelay, ratio: f64, floor_per_second: u32) -> HedgeSettings {
        HedgeSettings {
            delay,
            ratio,
            floor_per_second,
        }
    }

    /// A hedging task over one stand-in connection (no socket: the test puts entries in
    /// its map as the writer would) and one client.
    struct Fixture {
        hedges: Hedges,
        conn: Arc<UpstreamConn>,
        client: Arc<ClientConn>,
        answers: mpsc::UnboundedReceiver<Outbound>,
        routed: QueueReceiver,
        stop: CancellationToken,
        next_id: RequestId,
    }

    impl Fixture {
        /// Hedging 50 ms after the write, within a floor of 10 hedges a second.
        fn after_50ms() -> Fixture {
            Fixture::new(settings(
                HedgeDelay::Fixed(Duration::from_millis(50)),
                0.0,
                10,
            ))
        }

        fn new(settings: HedgeSettings) -> Fixture {
            let (hedges, watches) = Hedges::new(settings);
            let (queue, routed) =
                QueueHandle::new(8, Duration::from_secs(1), Arc::new(QueueSignal::default()));
            let addr: SocketAddr = FIRST.parse().unwrap();
            let (conn, _outlets) = UpstreamConn::new(addr, CancellationToken::new());
            let (tx, answers) = mpsc::unbounded_channel();
            let client = Arc::new(ClientConn::new(
                tx,
                "192.0.2.1:5000".to_owned(),
                Arc::new(Metrics::default()),
                Arc::new(Lifecycle::default()),
            ));
            let stop = CancellationToken::new();
            tokio::spawn(hedges.clone().run(
                watches,
                queue.reroute(),
                LatencyCounts::default,
                stop.clone(),
            ));
            Fixture {
                hedges,
                conn,
                client,
                answers,
                routed,
                stop,
                next_id: 1,
            }
        }

        /// A request written to the connection now, kept for hedging as the writer keeps
        /// it; returns its upstream id.
        fn write(&mut self) -> RequestId {
            let id = self.next_id;
            self.next_id += 1;
            self.client.slots.insert(id, Slot::Waiting);
            let mut pending = Pending::new(Arc::clone(&self.client), id, None, Instant::now());
            pending.set_expiry(Some(10_000), Duration::from_secs(300));
            let upstream_id = self.conn.next_id();
            assert!(pending.mark_sent(&self.conn, upstream_id));
            let infer = Infer {
                id,
                inputs: [(
                    "x".to_owned(),
                    Tensor::new(DType::F32, vec![1], Bytes::from(vec![0u8; 4])).unwrap(),
                )]
                .into(),
                deadline_ms: Some(10_000),
                client: None,
                ..Default::default()
            };
            pending.keep(Payload::Decoded(infer), 0);
            self.conn.hold(upstream_id, pending);
            self.hedges.watch(&self.conn, upstream_id);
            upstream_id
        }

        /// The client's next answer, if one is queued.
        fn answer(&mut self) -> Option<Message> {
            self.answers.try_recv().ok().map(|o| match o.answer {
                Answer::Message(msg) => *msg,
                Answer::Raw { .. } => panic!("no raw answers here"),
            })
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    fn result(id: RequestId) -> Message {
        Message::Result(tidepool_protocol::InferResult {
            id,
            ..Default::default()
        })
    }

    /// A second connection, to another target, that routing would send a hedge to.
    fn second_conn() -> Arc<UpstreamConn> {
        let addr: SocketAddr = "192.0.2.11:7100".parse().unwrap();
        UpstreamConn::new(addr, CancellationToken::new()).0
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_is_hedged_after_the_delay_and_the_first_result_wins() {
        let mut f = Fixture::after_50ms();
        let upstream_id = f.write();
        tokio::time::sleep(Duration::from_millis(49)).await;
        assert!(f.routed.try_recv().is_err(), "not before the delay");
        tokio::time::sleep(Duration::from_millis(2)).await;
        let hedge = f.routed.recv().await.expect("hedged after the delay");
        assert_eq!(f.hedges.sent(), 1);
        assert_eq!(
            hedge.pending.retried_from(),
            Some(FIRST.parse().unwrap()),
            "routed away from the first target"
        );
        let second = second_conn();
        assert!(hedge.pending.mark_sent(&second, 1));
        // The hedge answers first: the client has its result, once.
        hedge.pending.answer(result(1));
        assert_eq!(f.answer().map(|m| m.id()), Some(1));
        assert_eq!(
            f.client.metrics.races.won_by_hedge.load(Ordering::Relaxed),
            1
        );
        // The first attempt was taken off its connection; its late result goes nowhere.
        assert!(!f.conn.hedgeable(upstream_id));
        assert!(f.conn.take(upstream_id).is_none(), "abandoned");
        assert!(f.answer().is_none(), "one answer");
        assert!(f.client.slots.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_attempt_can_still_win_and_the_hedge_is_abandoned_or_dropped() {
        let mut f = Fixture::after_50ms();
        let second = second_conn();
        // The hedge written to its target: the first attempt's result takes it off there.
        let upstream_id = f.write();
        let hedge = f.routed.recv().await.expect("hedged");
        assert!(hedge.pending.mark_sent(&second, 1));
        second.hold(1, hedge.pending);
        f.conn
            .take(upstream_id)
            .unwrap()
            .answer(result(upstream_id));
        assert_eq!(f.answer().map(|m| m.id()), Some(1));
        assert!(second.take(1).is_none(), "the hedge abandoned");
        assert!(f.answer().is_none());
        // The hedge not yet written (on its way to the writer): its result, when it comes,
        // is dropped.
        let upstream_id = f.write();
        let hedge = f.routed.recv().await.expect("hedged");
        assert!(hedge.pending.mark_sent(&second, 2));
        f.conn
            .take(upstream_id)
            .unwrap()
            .answer(result(upstream_id));
        assert_eq!(f.answer().map(|m| m.id()), Some(2));
        hedge.pending.answer(result(2));
        assert!(f.answer().is_none(), "the hedge's result is dropped");
        let races = &f.client.metrics.races;
        assert_eq!(races.won_by_hedge.load(Ordering::Relaxed), 0);
        assert_eq!(races.late_dropped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_attempt_steps_aside_while_the_other_runs() {
        let mut f = Fixture::after_50ms();
        let upstream_id = f.write();
        let hedge = f.routed.recv().await.expect("hedged");
        // The hedge finds no target: it steps aside, and the first attempt answers.
        hedge.pending.lost("no other target");
        assert!(f.answer().is_none());
        let first = f.conn.take(upstream_id).unwrap();
        first.answer(result(upstream_id));
        assert!(matches!(f.answer(), Some(Message::Result(_))));
        // Both failing: the last one answers with its error, once.
        let upstream_id = f.write();
        let hedge = f.routed.recv().await.expect("hedged");
        drop(hedge);
        assert!(f.answer().is_none(), "the first attempt still runs");
        f.conn.take(upstream_id).unwrap().lost("gone");
        match f.answer() {
            Some(Message::Error(e)) => assert_eq!(e.message, "gone"),
            other => panic!("expected the last attempt's error, got {other:?}"),
        }
        assert!(f.answer().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_request_is_not_hedged_and_the_budget_bounds_hedges() {
        let mut f = Fixture::new(settings(
            HedgeDelay::Fixed(Duration::from_millis(50)),
            0.0,
            1,
        ));
        let answered = f.write();
        f.conn.take(answered).unwrap().answer(result(answered));
        // A floor of one per second over the 10 s window: ten hedges, then none.
        for _ in 0..12 {
            f.write();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut hedged = 0;
        while f.routed.try_recv().is_ok() {
            hedged += 1;
        }
        assert_eq!(hedged, 10);
        assert_eq!(f.hedges.sent(), 10);
        assert_eq!(f.hedges.exhausted(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn p99_waits_for_enough_answers() {
        let (hedges, _watches) = Hedges::new(settings(HedgeDelay::P99, 0.1, 1));
        assert_eq!(hedges.delay(), None, "no hedging before any answer");
        let mut window = VecDeque::new();
        window.push_back(LatencyCounts::default());
        let mut counts = LatencyCounts::default();
        // 50 answers: too few.
        counts.0[8] = 50;
        window.push_back(counts);
        hedges.update_p99(&window);
        assert_eq!(hedges.delay(), None);
        // 990 answers in (5 ms, 10 ms], 10 in (100 ms, 250 ms]: p99 near 10 ms.
        counts.0[8] = 990;
        counts.0[12] = 10;
        window.push_back(counts);
        hedges.update_p99(&window);
        let d = hedges.delay().unwrap();
        assert!(
            d > Duration::from_millis(5) && d <= Duration::from_millis(10),
            "{d:?}"
        );
    }
}
