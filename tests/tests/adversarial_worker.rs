//! A worker under attack, each case beside a bystander whose every request must get its normal
//! answer: malformed and poison messages on the bystander's own connection, unfinished large
//! frames from many connections (memory bounded by `--frame-budget`, read from the worker
//! process's VmRSS), slowloris, SIGTERM while frames are on the wire, and a parent that dies by
//! SIGKILL with `--exit-with-parent`.
//!
//! The process-level cases run the real binary: `cargo build --workspace --bins` first.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use tidepool_protocol::{Client, ErrorCode, Infer, Message, Tensor, Tensors};
use tidepool_tests::adversary::{
    assert_bystander_served, body, bystander, exited, f32_data, good_infer, infer_body, map,
    metric, nested, rss_bytes, wait_ready, with_raw, worker_args, KillOnDrop, V,
};
use tidepool_tests::balancer::{frame, RawConn};
use tidepool_tests::drive::Drive;
use tidepool_tests::init_tracing;
use tidepool_tests::process::{binary, eventually, free_addrs, Proc};
use tidepool_tests::worker::{scratch_dir, start_worker, worker_config, TinyModel};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const DIM: usize = 16;

fn item(value: f32) -> Tensors {
    [(
        "input".to_owned(),
        Tensor::from_vec(vec![DIM], vec![value; DIM]).unwrap(),
    )]
    .into()
}

fn infer(id: u64) -> Message {
    Message::Infer(Infer {
        id,
        inputs: item(0.5),
        ..Infer::default()
    })
}

#[tokio::test]
async fn malformed_messages_are_answered_under_their_ids_beside_a_bystander_on_the_same_connection()
{
    init_tracing();
    let worker = start_worker(worker_config(&TinyModel::default().write())).await;
    let (stop, bystander) = bystander(worker.local_addr(), 200, DIM);
    let mut conn = RawConn::connect(worker.local_addr()).await;

    let good = |id| good_infer(id, DIM);
    // (body, the id its answer comes under, the code)
    let bad: Vec<(Vec<u8>, u64, ErrorCode)> = vec![
        // The poison frame: an unknown key holding 5,000 nested one-element arrays.
        (
            with_raw(good(11), "future", &nested(5_000, &[0x91])),
            11,
            ErrorCode::BadRequest,
        ),
        // Deep nesting in maps.
        (
            with_raw(good(12), "future", &nested(2_000, b"\x81\xa1k")),
            12,
            ErrorCode::BadRequest,
        ),
        // Data length not matching the shape.
        (
            infer_body(
                V::U(13),
                V::S("f32"),
                V::A(vec![V::U(DIM as u64)]),
                f32_data(DIM - 1),
                vec![],
            ),
            13,
            ErrorCode::BadRequest,
        ),
        // A shape whose product overflows.
        (
            infer_body(
                V::U(14),
                V::S("f64"),
                V::A(vec![V::U(1 << 62), V::U(1 << 62)]),
                f32_data(0),
                vec![],
            ),
            14,
            ErrorCode::BadRequest,
        ),
        // A negative dimension.
        (
            infer_body(
                V::U(15),
                V::S("f32"),
                V::A(vec![V::I(-16)]),
                f32_data(DIM),
                vec![],
            ),
            15,
            ErrorCode::BadRequest,
        ),
        // `data` as a string.
        (
            infer_body(
                V::U(16),
                V::S("f32"),
                V::A(vec![V::U(DIM as u64)]),
                V::S("0000"),
                vec![],
            ),
            16,
            ErrorCode::BadRequest,
        ),
        // `inputs` of the wrong type.
        (
            body(&map(vec![
                ("type", V::S("infer")),
                ("id", V::U(17)),
                ("inputs", V::A(vec![V::U(1)])),
            ])),
            17,
            ErrorCode::BadRequest,
        ),
        // An unknown dtype.
        (
            infer_body(
                V::U(18),
                V::S("c64"),
                V::A(vec![V::U(DIM as u64)]),
                f32_data(DIM),
                vec![],
            ),
            18,
            ErrorCode::BadRequest,
        ),
        // Too many dimensions.
        (
            infer_body(
                V::U(19),
                V::S("f32"),
                V::A((0..65).map(|_| V::U(1)).collect()),
                f32_data(1),
                vec![],
            ),
            19,
            ErrorCode::BadRequest,
        ),
        // A string id: no id to answer under but the connection's.
        (
            infer_body(
                V::S("one"),
                V::S("f32"),
                V::A(vec![V::U(DIM as u64)]),
                f32_data(DIM),
                vec![],
            ),
            0,
            ErrorCode::BadRequest,
        ),
        // Not MessagePack at all.
        (vec![0xc1, 0xc1, 0xc1], 0, ErrorCode::BadRequest),
    ];
    let mut expected: HashMap<u64, Vec<Option<ErrorCode>>> = HashMap::new();
    let mut next_good = 1000;
    for (bad_body, id, code) in &bad {
        conn.send_bytes(&frame(bad_body)).await;
        expected.entry(*id).or_default().push(Some(*code));
        // A good request after each bad one, on the same connection.
        conn.send_bytes(&frame(&good(next_good))).await;
        expected.entry(next_good).or_default().push(None);
        next_good += 1;
    }
    // A spoofed `client` is only information: answered as usual.
    conn.send_bytes(&frame(&infer_body(
        V::U(next_good),
        V::S("f32"),
        V::A(vec![V::U(DIM as u64)]),
        f32_data(DIM),
        vec![("client", V::S("10.0.0.1:1"))],
    )))
    .await;
    expected.entry(next_good).or_default().push(None);
    // A cancel of an id never sent gets no answer.
    conn.send(Message::Cancel { id: 999_999 }).await;

    let mut got: HashMap<u64, Vec<Option<ErrorCode>>> = HashMap::new();
    let total: usize = expected.values().map(Vec::len).sum();
    for _ in 0..total {
        let answer = conn
            .recv(Duration::from_secs(10))
            .await
            .expect("the connection stays open");
        let (id, code) = match answer {
            Message::Result(r) => (r.id, None),
            Message::Error(e) => (e.id, Some(e.code)),
            other => panic!("unexpected {other:?}"),
        };
        got.entry(id).or_default().push(code);
    }
    assert_eq!(got, expected);
    assert!(
        conn.quiet(Duration::from_millis(300)).await,
        "an extra answer"
    );
    // Still open and serving.
    conn.send(infer(5000)).await;
    assert!(matches!(
        conn.recv(Duration::from_secs(10)).await,
        Some(Message::Result(r)) if r.id == 5000
    ));
    assert_bystander_served(stop, bystander).await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn slowloris_is_cut_at_the_frame_timeout_beside_a_bystander() {
    init_tracing();
    let mut config = worker_config(&TinyModel::default().write());
    config.frame_timeout = Duration::from_secs(2);
    let worker = start_worker(config).await;
    let (stop, bystander) = bystander(worker.local_addr(), 100, DIM);

    let mut slow = TcpStream::connect(worker.local_addr()).await.unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    // One byte a second of a 1000-byte frame: cut long before it could finish.
    for byte in [0u8, 0, 3, 232].into_iter().chain([0xc0; 1000]) {
        if slow.write_all(&[byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    assert!(closed, "a trickled frame held its connection for 30 s");
    assert_eq!(
        worker
            .metrics()
            .frame_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_bystander_served(stop, bystander).await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn unfinished_large_frames_grow_the_worker_by_no_more_than_its_frame_budget() {
    init_tracing();
    const BUDGET: u64 = 64 << 20;
    const FRAME: usize = 15 << 20;
    const ATTACKERS: usize = 20;
    let dir = scratch_dir("adversarial-memory");
    let [listen, metrics] = free_addrs();
    let mut args = worker_args(&TinyModel::default().write(), listen, metrics);
    args.extend(
        [
            "--max-frame",
            "16MiB",
            "--frame-budget",
            "64MiB",
            "--connection-frame-budget",
            "16MiB",
            "--frame-timeout",
            "5m",
        ]
        .map(String::from),
    );
    let worker = Proc::start("worker", "tidepool-worker", &args, &dir);
    wait_ready(listen, &[&worker]).await;
    let (stop, bystander) = bystander(listen, 200, DIM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_bytes(worker.pid());

    // Each attacker announces a 15 MiB frame and sends all of it but the last byte.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            let sent_tx = sent_tx.clone();
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(listen).await.unwrap();
                stream
                    .write_all(&(FRAME as u32).to_be_bytes())
                    .await
                    .unwrap();
                let chunk = vec![0xc0u8; 1 << 20];
                let mut left = FRAME - 1;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return stream;
                    }
                    left -= n;
                }
                let _ = sent_tx.send(());
                stream
            })
        })
        .collect();
    // The budget admits three such frames (large frames may use 7/8 of 64 MiB): wait until
    // three attackers have sent everything, and the budget shows them held.
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(60), sent_rx.recv())
            .await
            .expect("three unfinished frames admitted")
            .unwrap();
    }
    eventually(
        Duration::from_secs(30),
        "3 frames held",
        &[&worker],
        || async {
            let held = metric(metrics, "tidepool_worker_frame_budget_bytes").await;
            (held >= (3 * FRAME) as f64).then_some(())
        },
    )
    .await;
    // Give the worker time to read what the three sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = rss_bytes(worker.pid()).saturating_sub(baseline);
    let waits = metric(metrics, "tidepool_worker_frame_budget_waits_total").await;
    assert_bystander_served(stop, bystander).await;
    assert!(
        grown <= BUDGET + (48 << 20),
        "{ATTACKERS} unfinished {FRAME}-byte frames grew the worker by {grown} bytes, \
         above its {BUDGET}-byte budget and a 48 MiB margin\n{}",
        worker.log()
    );
    assert!(
        waits >= (ATTACKERS - 3) as f64,
        "{waits} connections waited"
    );
    assert!(
        sent_rx.try_recv().is_err(),
        "a fourth unfinished frame was read"
    );
    for attacker in attackers {
        attacker.abort();
    }
}

#[tokio::test]
async fn frames_on_the_wire_at_sigterm_are_answered() {
    init_tracing();
    let dir = scratch_dir("adversarial-sigterm");
    let [listen, metrics] = free_addrs();
    let args = worker_args(&TinyModel::default().write(), listen, metrics);
    let mut worker = Proc::start("worker", "tidepool-worker", &args, &dir);
    wait_ready(listen, &[&worker]).await;

    // An infer every 2 ms until the worker closes the connection, before and after SIGTERM.
    let stop = CancellationToken::new();
    let mut drive = Drive::new(listen, 500, DIM, stop.clone());
    drive.settle = Duration::from_secs(15);
    let sender = drive.spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = worker.wait_exit(Duration::from_secs(20));
        (status, worker)
    })
    .await
    .unwrap();
    let (status, worker) = status;
    let status = status.unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", worker.log()));
    assert!(status.success(), "{status:?}\n{}", worker.log());
    stop.cancel();
    let tally = sender.await.unwrap();

    // The worker reads in order and answers every frame it reads: the answered ids are all
    // the ids up to the last one answered, no gaps; the rest were never read.
    let last = tally.answers.keys().copied().max().unwrap_or(0);
    let gaps: Vec<u64> = (1..=last)
        .filter(|id| !tally.answers.contains_key(id))
        .collect();
    assert!(
        gaps.is_empty(),
        "read but unanswered: {gaps:?}\n{}",
        worker.log()
    );
    assert!(
        tally.answers.values().all(|a| a.len() == 1),
        "an id answered twice"
    );
    let outcomes = tally.outcomes();
    // The queue drains at once, so a worker that stopped reading when the drain ended would
    // answer a handful `shutting_down`; one that reads on (this client never goes quiet, so
    // for the 5 s grace) answers hundreds.
    assert!(
        outcomes.get("shutting_down").copied().unwrap_or(0) >= 20,
        "reading stopped when shutdown began: {outcomes:?}"
    );
    assert_eq!(
        outcomes.len(),
        2,
        "only results and shutting_down: {outcomes:?}"
    );
}

#[tokio::test]
async fn with_exit_with_parent_the_worker_exits_when_its_parent_is_killed() {
    init_tracing();
    let dir = scratch_dir("adversarial-parent");
    let [listen, metrics] = free_addrs();
    let mut args = worker_args(&TinyModel::default().write(), listen, metrics);
    args.push("--exit-with-parent".into());
    let worker_cmd = shell_words(&binary("tidepool-worker").display().to_string(), &args);
    // The parent: a shell that holds the write end of a FIFO that is the worker's stdin.
    // The worker is started before the shell opens its end, so it does not inherit it.
    let script = format!(
        "mkfifo lifeline\n\
         {worker_cmd} < lifeline 2> worker.log &\n\
         echo $! > worker.pid\n\
         exec 3> lifeline\n\
         wait\n"
    );
    let mut parent = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.join("worker.pid");
    let log = || std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
    let pid: u32 = {
        let mut pid = None;
        for _ in 0..500 {
            if let Some(p) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                pid = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pid.expect("the parent started the worker")
    };
    let _guard = KillOnDrop(pid);
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(client) = Client::connect(listen).await {
                if client.ping(Duration::from_secs(1)).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "worker not ready\n{}", log());
    assert!(!exited(pid), "the worker exited while its parent lived");

    parent.kill().unwrap(); // SIGKILL: the parent gets no chance to clean up
    parent.wait().unwrap();
    let mut gone = false;
    for _ in 0..400 {
        if exited(pid) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the worker outlived its parent by 20 s\n{}", log());
    assert!(log().contains("parent process is gone"), "{}", log());
}

/// `program args...` quoted for `sh`.
fn shell_words(program: &str, args: &[String]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}
