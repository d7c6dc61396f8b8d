//! Serving to a latency objective, end to end on a real worker: the `priority` field on the
//! wire (validated, answered under its id), and a bystander client whose every request gets
//! its normal answer while another client floods the worker with tight deadlines at low
//! priority, each of whose requests gets exactly one answer of a documented kind; and the
//! field forwarded by the balancer unchanged.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use tidepool_protocol::{
    CallOptions, Client, Error, ErrorCode, Infer, Message, MessageCodec, Priority, Tensor, Tensors,
};
use tidepool_tests::balancer::{fast_config, TestBalancer};
use tidepool_tests::init_tracing;
use tidepool_tests::worker::{start_worker, worker_config, TinyModel};
use tidepool_worker::goodput::Refusal;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

fn item(dim: usize, v: f32) -> Tensors {
    BTreeMap::from([(
        "input".to_owned(),
        Tensor::from_vec(vec![dim], vec![v; dim]).unwrap(),
    )])
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
    // Large enough that a batch takes a measurable time, so the profile has something to
    // predict with.
    let tiny = TinyModel {
        size: 8 << 20,
        ..TinyModel::default()
    };
    let mut config = worker_config(&tiny.write());
    config.max_batch = 4;
    config.queue = 64;
    let worker = start_worker(config).await;
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
    let served = async {
        for _ in 0..40 {
            let options = CallOptions {
                deadline: Some(Duration::from_secs(30)),
                priority: Priority::Normal,
            };
            let result = bystander
                .infer_with(item(dim, 0.25), options)
                .await
                .unwrap();
            assert_eq!(result.outputs, expected, "the bystander's normal answer");
        }
    };
    let (flooded, ()) = tokio::join!(flood, served);

    // Every flood request got one answer: a result, or a refusal of a documented kind.
    let mut refused = 0;
    for answer in &flooded {
        match answer {
            Ok(_) => {}
            Err(Error::Overloaded { retry_after, .. }) => {
                assert!(retry_after.is_some_and(|d| d >= Duration::from_millis(1)));
                refused += 1;
            }
            Err(Error::DeadlineExceeded { .. }) => refused += 1,
            Err(other) => panic!("an answer outside the objective's kinds: {other}"),
        }
    }
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
