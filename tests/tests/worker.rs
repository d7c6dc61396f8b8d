//! The worker end to end: a real (tiny) synthetic model served over TCP, checked against a
//! direct ONNX Runtime run; validation, duplicate ids, cancel and ping over the wire;
//! registration with a balancer that starts late; metrics; draining on shutdown.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tidepool_protocol::{Client, ErrorCode, Infer, Message, MessageCodec, Tensor, Tensors};
use tidepool_tests::init_tracing;
use tidepool_tests::worker::{
    direct_run, start_worker, worker_config, AdminEvent, StandInAdmin, TinyModel,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

fn input(dim: usize, seed: usize) -> Vec<f32> {
    (0..dim)
        .map(|j| ((seed * 31 + j * 7) % 17) as f32 / 8.0 - 1.0)
        .collect()
}

fn item(values: Vec<f32>) -> Tensors {
    let dim = values.len();
    BTreeMap::from([(
        "input".to_owned(),
        Tensor::from_vec(vec![dim], values).unwrap(),
    )])
}

/// Asserts that `outputs` served for `x` match a direct ONNX Runtime run of `model`.
fn assert_matches_direct(model: &std::path::Path, x: &[f32], outputs: &Tensors) {
    let served = outputs["output"].to_vec::<f32>().unwrap();
    let direct = direct_run(model, x);
    assert_eq!(served.len(), direct.len());
    for (s, d) in served.iter().zip(&direct) {
        assert!(
            (s - d).abs() <= 1e-4 * d.abs().max(1.0),
            "served {s} vs direct {d}"
        );
    }
}

#[tokio::test]
async fn a_synthetic_model_served_matches_a_direct_ort_run() {
    init_tracing();
    let tiny = TinyModel::default();
    let model = tiny.write();
    let mut config = worker_config(&model);
    config.max_batch = 8;
    config.max_delay = Duration::from_millis(20);
    config.name = Some("w-under-test".into());
    let worker = start_worker(config).await;
    let client = Client::connect(worker.local_addr()).await.unwrap();
    client.ping(Duration::from_secs(5)).await.unwrap();

    let inputs: Vec<Vec<f32>> = (0..24).map(|i| input(tiny.input_dim, i)).collect();
    let calls = inputs.iter().map(|x| client.infer(item(x.clone())));
    let results = futures::future::join_all(calls).await;

    let mut largest_batch = 0;
    for (x, result) in inputs.iter().zip(results) {
        let result = result.unwrap();
        assert_eq!(result.worker.as_deref(), Some("w-under-test"));
        assert!(result.queue_us.is_some() && result.infer_us.is_some());
        largest_batch = largest_batch.max(result.batch_size.unwrap());
        assert_eq!(result.outputs["output"].shape(), &[tiny.output_dim]);
        assert_matches_direct(&model, x, &result.outputs);
    }
    assert!(
        largest_batch > 1,
        "24 concurrent items never shared a batch"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_items_are_answered_bad_request_saying_what_differs() {
    init_tracing();
    let tiny = TinyModel::default();
    let worker = start_worker(worker_config(&tiny.write())).await;
    let client = Client::connect(worker.local_addr()).await.unwrap();

    let cases: Vec<(Tensors, &str)> = vec![
        (
            BTreeMap::from([(
                "x".to_owned(),
                Tensor::from_vec(vec![16], vec![0f32; 16]).unwrap(),
            )]),
            "\"x\"",
        ),
        (BTreeMap::new(), "missing input \"input\""),
        (
            BTreeMap::from([(
                "input".to_owned(),
                Tensor::from_vec(vec![16], vec![0f64; 16]).unwrap(),
            )]),
            "dtype f64",
        ),
        (item(vec![0.0; 15]), "[15]"),
        (
            BTreeMap::from([(
                "input".to_owned(),
                Tensor::from_vec(vec![1, 16], vec![0f32; 16]).unwrap(),
            )]),
            "without the batch dimension",
        ),
    ];
    for (inputs, says) in cases {
        match client.infer(inputs).await {
            Err(tidepool_protocol::Error::BadRequest { message }) => {
                assert!(message.contains(says), "{message:?} should mention {says}");
            }
            other => panic!("expected bad_request, got {other:?}"),
        }
    }
    // The connection is still good.
    client.infer(item(vec![0.5; 16])).await.unwrap();
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn duplicate_ids_cancel_and_ping_over_raw_frames() {
    init_tracing();
    let tiny = TinyModel::default();
    let mut config = worker_config(&tiny.write());
    // Items wait for company long enough to be cancelled.
    config.max_delay = Duration::from_secs(2);
    let worker = start_worker(config).await;
    let stream = TcpStream::connect(worker.local_addr()).await.unwrap();
    let mut framed = Framed::new(stream, MessageCodec::default());
    let infer = |id| {
        Message::Infer(Infer {
            id,
            inputs: item(vec![0.25; 16]),
            deadline_ms: None,
            client: None,
            ..Default::default()
        })
    };
    framed.send(infer(1)).await.unwrap();
    framed.send(infer(1)).await.unwrap();
    framed.send(Message::Ping { id: 2 }).await.unwrap();
    framed.send(Message::Cancel { id: 1 }).await.unwrap();
    framed.send(Message::Cancel { id: 99 }).await.unwrap();

    let mut answers = Vec::new();
    while answers.len() < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(5), framed.next())
            .await
            .expect("answers within 5 s")
            .expect("connection open")
            .expect("a frame")
            .expect("a message");
        answers.push(frame);
    }
    let code = |m: &Message| match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    };
    // The duplicate is refused at once, the ping answered, the original cancelled; the
    // cancel for an unknown id gets no answer.
    assert_eq!(
        code(&answers[0]),
        Some(ErrorCode::BadRequest),
        "{answers:?}"
    );
    assert!(matches!(answers[1], Message::Pong { id: 2, .. }));
    assert_eq!(code(&answers[2]), Some(ErrorCode::Cancelled), "{answers:?}");
    assert_eq!(answers[2].id(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), framed.next())
            .await
            .is_err(),
        "nothing more to read"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn registers_with_a_balancer_that_starts_late_and_deregisters_on_shutdown() {
    init_tracing();
    let tiny = TinyModel::default();
    let admin_addr = StandInAdmin::reserve_port().await;
    let mut config = worker_config(&tiny.write());
    config.register = Some(format!("http://{admin_addr}"));
    config.advertise = Some("10.1.2.3:7100".into());
    let worker = start_worker(config).await;
    // The worker is already retrying against nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let admin = StandInAdmin::start_on(admin_addr).await;
    let events = admin.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(events, vec![AdminEvent::Register("10.1.2.3:7100".into())]);

    worker.shutdown().await.unwrap();
    assert_eq!(
        admin.events(),
        vec![
            AdminEvent::Register("10.1.2.3:7100".into()),
            AdminEvent::Deregister("10.1.2.3:7100".into())
        ]
    );
}

/// A balancer that restarts forgets its targets; the worker registers again on its own.
#[tokio::test]
async fn registers_again_with_a_balancer_that_restarted() {
    init_tracing();
    let tiny = TinyModel::default();
    let admin_addr = StandInAdmin::reserve_port().await;
    let admin = StandInAdmin::start_on(admin_addr).await;
    let mut config = worker_config(&tiny.write());
    config.register = Some(admin.url());
    config.register_interval = Duration::from_millis(200);
    config.advertise = Some("10.1.2.3:7100".into());
    let worker = start_worker(config).await;
    admin.wait_for(1, Duration::from_secs(10)).await;
    drop(admin);
    // Let the stand-in's listener close before binding its port again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let restarted = StandInAdmin::start_on(admin_addr).await;
    let events = restarted.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(
        events.first(),
        Some(&AdminEvent::Register("10.1.2.3:7100".into()))
    );
    worker.shutdown().await.unwrap();
    assert_eq!(
        restarted.events().last(),
        Some(&AdminEvent::Deregister("10.1.2.3:7100".into()))
    );
}

/// `--listen HOST:0` without `--advertise` registers the port actually bound, not `:0`:
/// replicas that share the host's network (deploy/compose/autoscale.yml) rely on it.
#[tokio::test]
async fn registers_the_bound_port_when_listening_on_port_zero() {
    init_tracing();
    let tiny = TinyModel::default();
    let admin = StandInAdmin::start_on(StandInAdmin::reserve_port().await).await;
    let mut config = worker_config(&tiny.write());
    config.listen = "127.0.0.1:0".into();
    config.register = Some(admin.url());
    config.advertise = None;
    let worker = start_worker(config).await;
    let bound = worker.local_addr();
    assert_ne!(bound.port(), 0);
    let events = admin.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(events, vec![AdminEvent::Register(bound.to_string())]);
    assert_eq!(worker.advertise(), bound.to_string());
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text() {
    init_tracing();
    let tiny = TinyModel::default();
    let mut config = worker_config(&tiny.write());
    config.metrics = Some("127.0.0.1:0".into());
    let worker = start_worker(config).await;
    let client = Client::connect(worker.local_addr()).await.unwrap();
    for _ in 0..3 {
        client.infer(item(vec![0.1; 16])).await.unwrap();
    }
    let _ = client.infer(BTreeMap::new()).await;

    let mut http = TcpStream::connect(worker.metrics_addr().unwrap())
        .await
        .unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).await.unwrap();
    for needle in [
        "200 OK",
        "tidepool_worker_queue_depth 0",
        "tidepool_worker_batch_size_count",
        "tidepool_worker_queue_seconds_bucket",
        "tidepool_worker_inference_seconds_bucket",
        "tidepool_worker_items_total{outcome=\"ok\"} 3",
        "tidepool_worker_items_total{outcome=\"bad_request\"} 1",
        "tidepool_worker_device{device=\"cpu\"} 1",
        "tidepool_worker_ready 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_queued_items_then_closes() {
    init_tracing();
    let tiny = TinyModel::default();
    let mut config = worker_config(&tiny.write());
    // Items would wait for company for a long time; shutdown runs them at once.
    config.max_delay = Duration::from_secs(60);
    config.max_batch = 64;
    let worker = start_worker(config).await;
    let addr = worker.local_addr();
    let client = Client::connect(addr).await.unwrap();
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.infer(item(input(16, i))).await })
        })
        .collect();
    // Let the items reach the queue.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    worker.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drained promptly"
    );
    for call in calls {
        let result = call.await.unwrap().unwrap();
        assert_eq!(result.batch_size, Some(5));
    }
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn a_missing_ort_library_is_refused_naming_the_fix() {
    let tiny = TinyModel::default();
    let mut config = worker_config(&tiny.write());
    config.ort_lib = None;
    let err = tidepool_worker::Worker::start(config).await.unwrap_err();
    assert!(err.to_string().contains("scripts/fetch-ort.sh"), "{err}");
}

#[tokio::test]
async fn a_client_that_does_not_read_is_not_read_either() {
    init_tracing();
    // 64 KiB items and answers (through a hidden width of 1), so that the socket buffers
    // hold a few dozen of them, not thousands.
    let tiny = TinyModel {
        input_dim: 16_384,
        output_dim: 16_384,
        layers: 2,
        size: 128 << 10,
        seed: 1,
    };
    let mut config = worker_config(&tiny.write());
    config.max_in_flight = 4;
    config.max_delay = Duration::ZERO;
    let worker = start_worker(config).await;
    let stream = TcpStream::connect(worker.local_addr()).await.unwrap();
    let (read, write) = stream.into_split();
    let mut writer = tokio_util::codec::FramedWrite::new(write, MessageCodec::default());
    const SENT: u64 = 2_000;
    let sender = tokio::spawn(async move {
        for id in 1..=SENT {
            let msg = Message::Infer(Infer {
                id,
                inputs: item(vec![0.5; 16_384]),
                deadline_ms: None,
                client: None,
                ..Default::default()
            });
            writer.send(msg).await.unwrap();
        }
        writer
    });
    // Without reading, the sender soon blocks: the worker stopped reading too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !sender.is_finished(),
        "2000 x 64 KiB went through without being read"
    );
    let answered = worker
        .metrics()
        .items(tidepool_worker::metrics::Outcome::Ok);
    assert!(
        answered < 500,
        "the worker answered {answered} items nobody read"
    );

    // Reading again lets everything through.
    let mut reader = tokio_util::codec::FramedRead::new(read, MessageCodec::default());
    let mut ok = 0;
    while ok < SENT {
        let msg = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .expect("answers keep coming")
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(msg, Message::Result(_)), "{msg:?}");
        ok += 1;
    }
    drop(sender.await.unwrap());
    worker.shutdown().await.unwrap();
}

/// A sentence of `len` token ids with its mask of ones.
fn sentence(len: usize, seed: usize) -> Tensors {
    let ids: Vec<i64> = (0..len)
        .map(|i| ((i * 5 + seed * 3 + 1) % tidepool_worker::test_support::TEST_VOCAB) as i64)
        .collect();
    BTreeMap::from([
        (
            "input_ids".to_owned(),
            Tensor::from_vec(vec![len], ids).unwrap(),
        ),
        (
            "attention_mask".to_owned(),
            Tensor::from_vec(vec![len], vec![1i64; len]).unwrap(),
        ),
    ])
}

#[tokio::test]
async fn a_text_encoder_describes_itself_and_batches_mixed_lengths_as_alone() {
    use tidepool_worker::test_support::{write_test_model, TestModel};
    init_tracing();
    let path = tidepool_tests::worker::scratch_dir("encoder").join("encoder.onnx");
    write_test_model(TestModel::Encoder, &path);
    let mut config = worker_config(&path);
    config.max_batch = 16;
    config.max_delay = Duration::from_millis(50);
    config.max_batch_tokens = Some(16 * 64);
    config.name = Some("encoder-worker".into());
    let worker = start_worker(config).await;
    let client = Client::connect(worker.local_addr()).await.unwrap();

    let model = client.metadata(Duration::from_secs(5)).await.unwrap();
    assert_eq!(model.name, "encoder");
    assert_eq!(model.platform, "onnxruntime");
    assert!(model
        .hash
        .as_deref()
        .is_some_and(|h| h.starts_with("sha256:") && h.len() == 71));
    assert_eq!(
        (model.batched, model.max_batch, model.max_batch_tokens),
        (true, 16, Some(1024))
    );
    let names: Vec<&str> = model.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, vec!["input_ids", "attention_mask"]);
    assert_eq!(model.inputs[0].shape, vec![-1]);
    assert_eq!(model.inputs[0].dims, vec!["sequence".to_owned()]);
    assert_eq!(model.outputs[0].shape, vec![4]);
    let padding = model.padding.unwrap();
    assert_eq!(padding.axes, vec!["sequence".to_owned()]);

    // Each length alone first (one at a time: batches of one), then all at once.
    let lengths: Vec<usize> = (0..32).map(|i| 1 + (i * 7) % 40).collect();
    let mut alone = Vec::new();
    for (i, &len) in lengths.iter().enumerate() {
        let result = client.infer(sentence(len, i)).await.unwrap();
        assert_eq!(result.batch_size, Some(1));
        alone.push(result.outputs["embedding"].to_vec::<f32>().unwrap());
    }
    let calls = lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| client.infer(sentence(len, i)));
    let results = futures::future::join_all(calls).await;
    let mut largest = 0;
    for (result, alone) in results.into_iter().zip(&alone) {
        let result = result.unwrap();
        largest = largest.max(result.batch_size.unwrap());
        let batched = result.outputs["embedding"].to_vec::<f32>().unwrap();
        for (b, a) in batched.iter().zip(alone) {
            assert!(
                (b - a).abs() <= 1e-5 * a.abs().max(1.0),
                "batched {b} vs alone {a}"
            );
        }
    }
    assert!(
        largest > 4,
        "32 items of lengths 1 to 40 never shared a batch (largest {largest})"
    );
    worker.shutdown().await.unwrap();
}

/// `--instances 2`: two model threads, each with its own session, serve one batcher. A
/// flood of concurrent items and a bystander's sequential requests are each answered once
/// with what a direct ONNX Runtime run gives, and shutdown drains both threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_model_instances_answer_every_item_as_a_direct_run_with_a_bystander() {
    init_tracing();
    let tiny = TinyModel::default();
    let model = tiny.write();
    let mut config = worker_config(&model);
    config.max_batch = 4;
    config.max_delay = Duration::from_millis(2);
    config.instances = 2;
    config.threads = Some(2);
    let worker = start_worker(config).await;
    let addr = worker.local_addr();
    let check = |x: &[f32], outputs: &Tensors| assert_matches_direct(&model, x, outputs);

    let bystander_client = Client::connect(addr).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let bystander = tokio::spawn({
        let stop = stop.clone();
        let dim = tiny.input_dim;
        async move {
            let mut answered = Vec::new();
            let mut seed = 1_000;
            while !stop.is_cancelled() {
                let x = input(dim, seed);
                let result = bystander_client.infer(item(x.clone())).await;
                answered.push((x, result));
                seed += 1;
            }
            answered
        }
    });

    let client = Client::connect(addr).await.unwrap();
    for round in 0..4 {
        let inputs: Vec<Vec<f32>> = (0..64)
            .map(|i| input(tiny.input_dim, round * 64 + i))
            .collect();
        let results =
            futures::future::join_all(inputs.iter().map(|x| client.infer(item(x.clone())))).await;
        for (x, result) in inputs.iter().zip(results) {
            check(x, &result.unwrap().outputs);
        }
    }
    stop.cancel();
    let answered = bystander.await.unwrap();
    assert!(!answered.is_empty(), "the bystander was never answered");
    for (x, result) in &answered {
        let result = result
            .as_ref()
            .expect("every bystander request gets its result");
        check(x, &result.outputs);
    }

    // Items in flight at shutdown are still answered, by whichever thread takes them.
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.infer(item(input(16, i))).await })
        })
        .collect();
    worker.shutdown().await.unwrap();
    for call in calls {
        let answer = call.await.unwrap();
        assert!(
            answer.is_ok()
                || answer
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("shutting")),
            "{answer:?}"
        );
    }
}
