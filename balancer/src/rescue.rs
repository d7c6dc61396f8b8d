//! Retries of the requests a target holds when it turns unhealthy.
//!
//! A frozen worker (SIGSTOP, a stuck model thread) keeps its connections open: nothing
//! fails them, and the requests written to it would wait for their deadlines. When its
//! health check finds it unhealthy, each request still unanswered there is taken off its
//! connection, the target is told to cancel it, and it is routed again to another target:
//! the same retry as after a lost connection (`retry`), with the same rules (once per
//! request, only while its deadline leaves time) and the same budget. Whoever takes an
//! entry off the connection owns its answer, so an answer the old target sends later
//! finds nothing and is dropped: the client still gets exactly one.
//!
//! Requests the old target has not yet been sent (behind a write that does not move) stay
//! with its connection and meet their deadlines there. With no other target healthy,
//! nothing is taken: a retry could only be answered `unavailable`, while the frozen target
//! may still wake up within the deadline.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::queue::Reroute;
use crate::target::Target;

/// Whether a target other than the one at this address is healthy now: where a rescued
/// request could go. The target group gives each health check one.
pub(crate) type Elsewhere = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// Takes the unanswered requests off `target`'s connections and routes them again, as
/// far as `queue`'s retry policy allows and when another target is healthy (`elsewhere`);
/// returns how many were.
pub(crate) fn rescue(target: &Target, queue: &Reroute, elsewhere: &Elsewhere) -> usize {
    let retries = queue.retries();
    if !retries.enabled() || !elsewhere(target.addr()) {
        return 0;
    }
    let mut rescued = 0;
    for conn in target.open_conns() {
        for upstream_id in conn.written() {
            let now = Instant::now();
            // The budget is spent under the map's guard, so that it is spent exactly when
            // the entry is taken (a std mutex held for a few additions, no await).
            let Some(pending) =
                conn.take_if(upstream_id, |p| p.retryable(now) && retries.try_spend())
            else {
                continue;
            };
            conn.cancel(upstream_id);
            match pending.into_retry(conn.addr()) {
                Ok(mut request) => {
                    request.pending.clear_in_flight();
                    request.pending.mark_waiting();
                    retries.note_unhealthy();
                    queue.send(request);
                    rescued += 1;
                }
                // `retryable` said it could be; answered as a lost request otherwise.
                Err(pending) => pending.lost(format!(
                    "target {} turned unhealthy before answering; it may or may not have run",
                    conn.addr()
                )),
            }
        }
    }
    if rescued > 0 {
        tracing::info!(target = %target.addr(), rescued, "target unhealthy: its unanswered requests sent to other targets");
    }
    rescued
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tidepool_protocol::{DType, Infer, InferResult, Message, Tensor};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::metrics::Metrics;
    use crate::pending::{Answer, ClientConn, Lifecycle, Outbound, Payload, Pending, Slot};
    use crate::queue::{QueueHandle, QueueSignal};
    use crate::retry::{Retries, RetrySettings};
    use crate::upstream::UpstreamConn;

    fn infer(id: u64, deadline_ms: u64) -> Payload {
        Payload::Decoded(Infer {
            id,
            inputs: [(
                "x".to_owned(),
                Tensor::new(DType::F32, vec![1], Bytes::from(vec![0u8; 4])).unwrap(),
            )]
            .into(),
            deadline_ms: Some(deadline_ms),
            client: None,
            ..Default::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_unhealthy_targets_requests_go_elsewhere_once_and_its_late_answers_nowhere() {
        let addr: SocketAddr = "192.0.2.20:7100".parse().unwrap();
        let signal = Arc::new(QueueSignal::default());
        let (queue, mut routed) = QueueHandle::new(8, Duration::from_secs(1), Arc::clone(&signal));
        let queue = queue.with_retries(Retries::new(RetrySettings {
            enabled: true,
            ratio: 0.0,
            floor_per_second: 1,
        }));
        let target = Target::new(addr, 1, 1, signal);
        let (conn, mut outlets) = UpstreamConn::new(addr, CancellationToken::new());
        target.attach(0, Arc::clone(&conn));
        let (tx, mut answers) = mpsc::unbounded_channel::<Outbound>();
        let client = Arc::new(ClientConn::new(
            tx,
            "192.0.2.1:5000".to_owned(),
            Arc::new(Metrics::default()),
            Arc::new(Lifecycle::default()),
        ));
        // Three written requests: one in time, one already retried once, one whose
        // deadline has passed.
        let write = |id: u64, deadline_ms: u64, retried: bool| {
            client.slots.insert(id, Slot::Waiting);
            let mut pending = Pending::new(Arc::clone(&client), id, None, Instant::now());
            pending.set_expiry(Some(deadline_ms), Duration::from_secs(300));
            pending.keep(infer(id, deadline_ms), 0);
            if retried {
                let mut request = pending.into_retry(addr).ok().unwrap();
                request.pending.keep(request.payload, 0);
                pending = request.pending;
            }
            assert!(pending.mark_sent(&conn, id));
            conn.hold(id, pending);
        };
        write(1, 10_000, false);
        write(2, 10_000, true);
        write(3, 100, false);
        tokio::time::advance(Duration::from_millis(200)).await;

        // Nowhere else to go: nothing is taken.
        let nowhere: Elsewhere = Arc::new(|_| false);
        assert_eq!(rescue(&target, &queue.reroute(), &nowhere), 0);
        let elsewhere: Elsewhere = Arc::new(|_| true);
        assert_eq!(rescue(&target, &queue.reroute(), &elsewhere), 1);
        let request = routed.try_recv().expect("request 1 routed again");
        assert_eq!(request.pending.retried_from(), Some(addr));
        assert!(routed.try_recv().is_err(), "only request 1");
        assert_eq!(
            outlets.cancels.try_recv().ok(),
            Some(1),
            "the target told to cancel"
        );
        assert_eq!(queue.retries().unhealthy(), 1);
        // The old target's late answer finds nothing; the retry answers the client.
        assert!(conn.take(1).is_none());
        request.pending.answer(Message::Result(InferResult {
            id: 1,
            ..InferResult::default()
        }));
        match answers.try_recv().map(|o| o.answer) {
            Ok(Answer::Message(msg)) => match *msg {
                Message::Result(r) => assert_eq!(r.id, 1),
                other => panic!("expected request 1's result, got {other:?}"),
            },
            _ => panic!("expected request 1's result"),
        }
        // A second check takes nothing: request 2 was retried once already, 3 is out of time.
        assert_eq!(rescue(&target, &queue.reroute(), &elsewhere), 0);
        assert!(conn.take(2).is_some() && conn.take(3).is_some());
    }
}
