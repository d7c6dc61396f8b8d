//! Serving to a latency objective, end to end on a real worker: the `priority` field on the
//! wire (validated, answered under its id), and a bystander client whose every request gets
//! its normal answer while another client floods the worker with tight deadlines at low
//! priority, each of whose requests gets exactly one answer of a documented kind; the
//! field forwarded by the balancer unchanged; and the balancer's predicted-finish
//! admission, which answers a burst that the worker cannot serve in time itself, so that
//! the worker never sees those requests, while a bystander is served as usual; a request
//! refused by its deadline alone, before its tensors are read; and a worker with two model
//! instances telling the balancer so in its `pong`, for the balancer's forecast.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use tidepool_protocol::{
    BatchTimes, CallOptions, Client, Error, ErrorCode, Infer, InferResult, Message, MessageCodec,
    Priority, Tensor, Tensors,
};
use tidepool_tests::balancer::{fast_config, TestBalancer};
use tidepool_tests::init_tracing;
use tidepool_tests::worker::{start_worker, worker_config, TinyModel};
use tidepool_worker::goodput::Refusal;
use tidepool_worker::metrics::Outcome;
use tidepool_worker::ServeConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

fn item(dim: usize, v: f32) -> Tensors {
    BTreeMap::from([(
        "input".to_owned(),
        Tensor::from_vec(vec![dim], vec![v; dim]).unwrap(),
    )])
}

/// A model large enough that a batch takes a measurable time, so that the worker's profile
/// has something to predict with.
fn measurable() -> TinyModel {
    TinyModel {
        size: 8 << 20,
        ..TinyModel::default()
    }
}

/// A worker of `tiny` that batches up to 4 items, with a queue of `queue`.
fn batching(tiny: &TinyModel, queue: usize) -> ServeConfig {
    let mut config = worker_config(&tiny.write());
    config.max_batch = 4;
    config.queue = queue;
    config
}

#[tokio::test]
async fn an_unknown_priority_is_a_bad_request_and_the_connection_goes_on() {
    init_tracing();
    let tiny = TinyModel::default();
    let worker = start_worker(worker_config(&tiny.write())).await;
    let body = |id, priority| {
        Message::Infer(Infer {
            id,
            inputs: item(tiny.input_dim, 0.5),
            priority,
            ..Infer::default()
        })
        .to_msgpack()
        .unwrap()
    };
    // A `high` whose bytes are changed to a value of the same length no class has.
    let mut wrong = body(1, Priority::High);
    let at = wrong.windows(5).position(|w| w == b"\xa4high").unwrap();
    wrong[at + 1..at + 5].copy_from_slice(b"asap");
    let mut frames = BytesMut::new();
    for b in [wrong, body(2, Priority::High), body(3, Priority::Low)] {
        frames.put_u32(u32::try_from(b.len()).unwrap());
        frames.put_slice(&b);
    }
    let stream = TcpStream::connect(worker.local_addr()).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(&frames).await.unwrap();
    let mut answers = FramedRead::new(read, MessageCodec::default());
    let mut by_id = BTreeMap::new();
    while by_id.len() < 3 {
        let msg = answers.next().await.unwrap().unwrap().unwrap();
        by_id.insert(msg.id(), msg);
    }
    match &by_id[&1] {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(
                e.message.contains("expected low, normal or high"),
                "{}",
                e.message
            );
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    assert!(matches!(by_id[&2], Message::Result(_)), "{:?}", by_id[&2]);
    assert!(matches!(by_id[&3], Message::Result(_)), "{:?}", by_id[&3]);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bystander_is_served_while_another_client_floods_tight_low_priority_requests() {
    init_tracing();
    let tiny = measurable();
    let worker = start_worker(batching(&tiny, 64)).await;
    let dim = tiny.input_dim;
    let flooder = Client::connect(worker.local_addr()).await.unwrap();
    let bystander = Client::connect(worker.local_addr()).await.unwrap();
    let expected = bystander.infer(item(dim, 0.25)).await.unwrap().outputs;

    let flood = futures::future::join_all((0..400).map(|i| {
        let flooder = flooder.clone();
        async move {
            let options = CallOptions {
                deadline: Some(Duration::from_millis(1 + i % 3)),
                priority: Priority::Low,
            };
            flooder.infer_with(item(dim, 1.0), options).await
        }
    }));
    let served = serve_bystander(&bystander, dim, &expected, 40, |_| {
        Some(Duration::from_secs(30))
    });
    let (flooded, ()) = tokio::join!(flood, served);

    let refused = refusals(&flooded);
    assert!(
        refused > 0,
        "400 low requests with 1-3 ms budgets were all served"
    );
    let goodput = &worker.metrics().goodput;
    assert!(
        goodput.refusals(Refusal::LowPriority) > 0,
        "a queue of 64 takes at most 32 low requests"
    );
    assert!(
        goodput.within() >= 40,
        "the bystander's results count as goodput"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn priority_passes_through_the_balancer_to_the_worker() {
    init_tracing();
    let tiny = TinyModel::default();
    let mut config = worker_config(&tiny.write());
    config.max_batch = 1;
    config.queue = 8;
    let worker = start_worker(config).await;
    let lb = TestBalancer::start(fast_config(&[worker.local_addr()])).await;
    lb.wait_healthy(1).await;
    let dim = tiny.input_dim;
    let flooder = lb.client().await;
    let bystander = lb.client().await;
    let expected = bystander.infer(item(dim, 0.25)).await.unwrap().outputs;

    let flood = futures::future::join_all((0..300).map(|_| {
        let flooder = flooder.clone();
        async move {
            let options = CallOptions {
                priority: Priority::Low,
                ..CallOptions::default()
            };
            flooder.infer_with(item(dim, 1.0), options).await
        }
    }));
    let served = async {
        for _ in 0..20 {
            let result = bystander.infer(item(dim, 0.25)).await.unwrap();
            assert_eq!(result.outputs, expected, "the bystander's normal answer");
        }
    };
    let (flooded, ()) = tokio::join!(flood, served);
    for answer in &flooded {
        match answer {
            Ok(_) | Err(Error::Overloaded { .. }) => {}
            Err(other) => panic!("a flood request answered {other}"),
        }
    }
    // Only a request that reached the worker marked low is refused for it.
    assert!(
        worker.metrics().goodput.refusals(Refusal::LowPriority) > 0,
        "the worker never saw a low-priority request through the balancer"
    );
    lb.stop().await.unwrap();
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_that_cannot_be_served_in_time_is_refused_before_its_tensors_are_read() {
    init_tracing();
    let tiny = measurable();
    let worker = start_worker(batching(&tiny, 64)).await;
    let dim = tiny.input_dim;
    let bystander = Client::connect(worker.local_addr()).await.unwrap();
    // A batch has run: the worker's profile knows a batch of one's time.
    let expected = bystander.infer(item(dim, 0.25)).await.unwrap().outputs;
    // Inputs of the wrong width: only decoding and checking them finds that out.
    let body = |id, deadline_ms| {
        Message::Infer(Infer {
            id,
            inputs: item(dim + 1, 1.0),
            deadline_ms,
            ..Infer::default()
        })
        .to_msgpack()
        .unwrap()
    };
    let mut frames = BytesMut::new();
    for b in [body(1, Some(0)), body(2, Some(60_000)), body(3, None)] {
        frames.put_u32(u32::try_from(b.len()).unwrap());
        frames.put_slice(&b);
    }
    let stream = TcpStream::connect(worker.local_addr()).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(&frames).await.unwrap();
    let served = serve_bystander(&bystander, dim, &expected, 20, |_| {
        Some(Duration::from_secs(30))
    });
    let mut answers = FramedRead::new(read, MessageCodec::default());
    let read_three = async {
        let mut by_id = BTreeMap::new();
        while by_id.len() < 3 {
            let msg = answers.next().await.unwrap().unwrap().unwrap();
            assert!(by_id.insert(msg.id(), msg).is_none(), "one answer per id");
        }
        by_id
    };
    let ((), by_id) = tokio::join!(served, read_three);
    let code = |id| match &by_id[&id] {
        Message::Error(e) => e.code,
        other => panic!("expected an error for {id}, got {other:?}"),
    };
    // No budget at all: refused from its deadline alone, its inputs never read.
    assert_eq!(code(1), ErrorCode::DeadlineExceeded);
    // Time enough, or no deadline: decoded, checked, and refused for what they are.
    assert_eq!(code(2), ErrorCode::BadRequest);
    assert_eq!(code(3), ErrorCode::BadRequest);
    assert_eq!(worker.metrics().goodput.refusals(Refusal::Doomed), 1);
    worker.shutdown().await.unwrap();
}

/// Sends `calls` requests one after another, the `i`th with `deadline(i)`: each must get
/// the bystander's normal answer, `expected`.
async fn serve_bystander(
    client: &Client,
    dim: usize,
    expected: &Tensors,
    calls: usize,
    deadline: impl Fn(usize) -> Option<Duration>,
) {
    for i in 0..calls {
        let options = CallOptions {
            deadline: deadline(i),
            priority: Priority::Normal,
        };
        let result = client.infer_with(item(dim, 0.25), options).await.unwrap();
        assert_eq!(&result.outputs, expected, "the bystander's normal answer");
    }
}

/// Checks that every flood request got one answer, a result or a refusal of a documented
/// kind (`overloaded` with a retry hint, `deadline_exceeded`); returns the refusals.
fn refusals(answers: &[Result<InferResult, Error>]) -> usize {
    answers
        .iter()
        .filter(|answer| match answer {
            Ok(_) => false,
            Err(Error::Overloaded { retry_after, .. }) => {
                assert!(retry_after.is_some_and(|d| d >= Duration::from_millis(1)));
                true
            }
            Err(Error::DeadlineExceeded { .. }) => true,
            Err(other) => panic!("an answer outside the objective's kinds: {other}"),
        })
        .count()
}

/// The sum of a worker's answered items, every outcome together.
fn worker_items(worker: &tidepool_worker::Worker) -> u64 {
    let metrics = worker.metrics();
    metrics.items(Outcome::Ok)
        + ErrorCode::ALL
            .into_iter()
            .map(|code| metrics.items(Outcome::Error(code)))
            .sum::<u64>()
}

/// A counter's value in a `/metrics` text.
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{series} is not in /metrics"))
}

/// Runs batches of one and full ones through `lb`'s one worker from `bystander`, so that
/// the worker's profile has both ends, and waits for the next health check to bring its
/// batch times to the balancer. Returns the bystander's normal answer and those times.
async fn warm_up(lb: &TestBalancer, bystander: &Client, dim: usize) -> (Tensors, BatchTimes) {
    let expected = bystander.infer(item(dim, 0.25)).await.unwrap().outputs;
    let warm = futures::future::join_all((0..8).map(|_| bystander.infer(item(dim, 0.25)))).await;
    assert!(warm.iter().all(Result::is_ok));
    lb.wait_for("the worker's batch times", |h| {
        h.targets().first().is_some_and(|t| t.batches.is_some())
    })
    .await;
    (expected, lb.handle.targets()[0].batches.unwrap())
}

#[tokio::test]
async fn the_balancer_refuses_a_flood_no_worker_can_answer_in_time_and_serves_the_bystander() {
    init_tracing();
    let tiny = measurable();
    // Room for the whole flood: what refuses here is predicting, not a full queue.
    let worker = start_worker(batching(&tiny, 1024)).await;
    let lb = TestBalancer::start(fast_config(&[worker.local_addr()])).await;
    lb.wait_healthy(1).await;
    let dim = tiny.input_dim;
    let bystander = lb.client().await;
    let (expected, times) = warm_up(&lb, &bystander, dim).await;
    // Room for the request's own batch and three full ones: the balancer forwards about
    // five batches' worth of the burst and answers the rest itself.
    let budget_us = times.one_us + 3 * times.full_us;
    let budget = Duration::from_millis(budget_us.div_ceil(1000).max(2));

    let flooder = lb.client().await;
    const FLOOD: u64 = 400;
    let flood = futures::future::join_all((0..FLOOD).map(|_| {
        let flooder = flooder.clone();
        async move {
            let options = CallOptions {
                deadline: Some(budget),
                priority: Priority::Normal,
            };
            flooder.infer_with(item(dim, 1.0), options).await
        }
    }));
    // Loose deadlines and none: admission must pass both.
    let served = serve_bystander(&bystander, dim, &expected, 40, |i| {
        (i % 2 == 0).then_some(Duration::from_secs(30))
    });
    let (flooded, ()) = tokio::join!(flood, served);
    let bystander_calls = 1 + 8 + 40;
    refusals(&flooded);
    let text = lb.handle.metrics_text();
    let at_balancer = counter(&text, "tidepool_rejected_total{reason=\"predicted_late\"}")
        + counter(&text, "tidepool_rejected_total{reason=\"doomed\"}");
    assert!(
        at_balancer > 0,
        "a burst of {FLOOD} with {budget:?} each was all forwarded"
    );
    // What the balancer refused never reached the worker.
    let flood_at_worker = worker_items(&worker) - bystander_calls;
    assert!(
        flood_at_worker <= FLOOD - at_balancer,
        "the worker answered {flood_at_worker} flood requests, the balancer refused {at_balancer}"
    );
    let goodput = &worker.metrics().goodput;
    let at_worker = goodput.refusals(Refusal::PredictedLate) + goodput.refusals(Refusal::Doomed);
    assert!(
        at_worker < at_balancer,
        "the worker refused {at_worker}, the balancer {at_balancer}: the balancer should catch the burst"
    );
    lb.stop().await.unwrap();
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_worker_with_two_instances_tells_the_balancer_it_runs_two_batches_at_once() {
    init_tracing();
    let tiny = measurable();
    let mut config = batching(&tiny, 64);
    config.instances = 2;
    let worker = start_worker(config).await;
    let lb = TestBalancer::start(fast_config(&[worker.local_addr()])).await;
    lb.wait_healthy(1).await;
    let dim = tiny.input_dim;
    let bystander = lb.client().await;
    let (expected, times) = warm_up(&lb, &bystander, dim).await;
    // The balancer's forecast runs the batches ahead two at a time from here on.
    assert_eq!(times.instances, 2);
    // Deadlines the worker meets with room to spare are forwarded and answered as usual.
    let loose =
        Duration::from_micros(times.one_us + 20 * times.full_us).max(Duration::from_secs(5));
    serve_bystander(&bystander, dim, &expected, 20, |_| Some(loose)).await;
    let text = lb.handle.metrics_text();
    assert_eq!(
        counter(&text, "tidepool_rejected_total{reason=\"predicted_late\"}"),
        0
    );
    lb.stop().await.unwrap();
    worker.shutdown().await.unwrap();
}
