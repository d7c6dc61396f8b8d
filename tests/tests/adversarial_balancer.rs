//! The balancer under attack, each case beside a bystander client whose every request must
//! get its normal answer: malformed and poison frames (the poison frame used to close the
//! multiplexed worker connection under everyone), unfinished large frames from many
//! connections (memory bounded by `--frame-budget`, read from VmRSS), slowloris, a frozen
//! worker (SIGSTOP) under requests with deadlines, the frame budget held by the requests it
//! sits on, SIGTERM with frames on the wire, and an autoscaling balancer killed with SIGKILL
//! leaving no worker behind.
//!
//! Real binaries: `cargo build --workspace --bins` first.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tidepool_protocol::{ErrorCode, Infer, Message, Tensor};
use tidepool_tests::admin::labelled_sum;
use tidepool_tests::adversary::{
    assert_bystander_served, bystander, exited, f32_data, good_infer, infer_body, metric, nested,
    rss_bytes, wait_ready, with_raw, worker_args, KillOnDrop, V,
};
use tidepool_tests::balancer::{frame, http, RawConn};
use tidepool_tests::init_tracing;
use tidepool_tests::process::{balancer_args, eventually, fast_scaling_args, free_addrs, Proc};
use tidepool_tests::worker::{scratch_dir, TinyModel};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const DIM: usize = 16;

/// A worker and a balancer in front of it, as processes.
struct Stand {
    worker: Proc,
    balancer: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
}

/// Starts a worker and a balancer with `extra` balancer flags; waits until a `ping` through
/// the balancer passes.
async fn stand(tag: &str, extra: &[&str]) -> Stand {
    init_tracing();
    let dir: PathBuf = scratch_dir(tag);
    let [worker_listen, worker_metrics, listen, admin] = free_addrs();
    let worker = Proc::start(
        "worker",
        "tidepool-worker",
        &worker_args(&TinyModel::default().write(), worker_listen, worker_metrics),
        &dir,
    );
    let mut args = balancer_args(listen, admin);
    args.extend(["--target".to_owned(), worker_listen.to_string()]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    // The worker's model loaded (it answers `pong`), then the balancer's health checks
    // passed (fail-open would route to a worker still loading).
    wait_ready(worker_listen, &[&worker]).await;
    wait_ready(listen, &[&worker, &balancer]).await;
    eventually(
        Duration::from_secs(30),
        "the worker healthy",
        &[&worker, &balancer],
        || async {
            let mut conn = RawConn::connect(listen).await;
            conn.send(infer(1, None)).await;
            matches!(
                conn.recv(Duration::from_secs(5)).await,
                Some(Message::Result(_))
            )
            .then_some(())
        },
    )
    .await;
    Stand {
        worker,
        balancer,
        listen,
        admin,
    }
}

fn infer(id: u64, deadline_ms: Option<u64>) -> Message {
    Message::Infer(Infer {
        id,
        inputs: [(
            "input".to_owned(),
            Tensor::from_vec(vec![DIM], vec![0.5f32; DIM]).unwrap(),
        )]
        .into(),
        deadline_ms,
        ..Infer::default()
    })
}

#[tokio::test]
async fn malformed_and_poison_frames_cost_no_bystander_a_request() {
    let s = stand("adv-bal-malformed", &[]).await;
    let (stop, by) = bystander(s.listen, 200, DIM);
    let good = |id| good_infer(id, DIM);
    let mut conn = RawConn::connect(s.listen).await;
    for round in 0..5u64 {
        let base = 100 * (round + 1);
        // (body, the id its answer comes under)
        let bad: Vec<(Vec<u8>, u64)> = vec![
            // The poison frame, 4 a round: 5,000 nested arrays, and nesting in maps.
            (
                with_raw(good(base + 1), "future", &nested(5_000, &[0x91])),
                base + 1,
            ),
            (
                with_raw(good(base + 2), "future", &nested(5_000, &[0x91])),
                base + 2,
            ),
            (
                with_raw(good(base + 3), "future", &nested(2_000, b"\x81\xa1k")),
                base + 3,
            ),
            (
                with_raw(good(base + 4), "future", &nested(2_000, b"\x81\xa1k")),
                base + 4,
            ),
            // Data length not matching the shape.
            (
                infer_body(
                    V::U(base + 5),
                    V::S("f32"),
                    V::A(vec![V::U(DIM as u64)]),
                    f32_data(DIM - 1),
                    vec![],
                ),
                base + 5,
            ),
            // A shape whose product overflows; a negative dim.
            (
                infer_body(
                    V::U(base + 6),
                    V::S("f64"),
                    V::A(vec![V::U(1 << 62), V::U(1 << 62)]),
                    f32_data(0),
                    vec![],
                ),
                base + 6,
            ),
            (
                infer_body(
                    V::U(base + 7),
                    V::S("f32"),
                    V::A(vec![V::I(-1)]),
                    f32_data(DIM),
                    vec![],
                ),
                base + 7,
            ),
            // Wrong types: `data` as a string, the shape as a string.
            (
                infer_body(
                    V::U(base + 8),
                    V::S("f32"),
                    V::A(vec![V::U(DIM as u64)]),
                    V::S("zeros"),
                    vec![],
                ),
                base + 8,
            ),
            (
                infer_body(
                    V::U(base + 9),
                    V::S("f32"),
                    V::S("16"),
                    f32_data(DIM),
                    vec![],
                ),
                base + 9,
            ),
        ];
        for (b, _) in &bad {
            conn.send_bytes(&frame(b)).await;
        }
        for (_, id) in &bad {
            match conn.recv(Duration::from_secs(10)).await {
                Some(Message::Error(e)) => {
                    assert_eq!(e.id, *id, "{e:?}");
                    assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
                }
                other => panic!("expected bad_request for {id}, got {other:?}"),
            }
        }
        // A spoofed `client`, a cancel of an unknown id: served and ignored.
        conn.send_bytes(&frame(&infer_body(
            V::U(base + 10),
            V::S("f32"),
            V::A(vec![V::U(DIM as u64)]),
            f32_data(DIM),
            vec![("client", V::S("10.0.0.1:1"))],
        )))
        .await;
        conn.send(Message::Cancel { id: 999_999 }).await;
        match conn.recv(Duration::from_secs(10)).await {
            Some(Message::Result(r)) => assert_eq!(r.id, base + 10),
            other => panic!("expected a result, got {other:?}"),
        }
        // A string id; a duplicate id in flight.
        conn.send_bytes(&frame(&infer_body(
            V::S("seven"),
            V::S("f32"),
            V::A(vec![V::U(DIM as u64)]),
            f32_data(DIM),
            vec![],
        )))
        .await;
        match conn.recv(Duration::from_secs(10)).await {
            Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}"),
            other => panic!("expected bad_request, got {other:?}"),
        }
    }
    // Broken framing closes only the offender's connection: garbage, length 0, 2^31.
    for bytes in [
        &b"\xde\xad\xbe\xef garbage"[..],
        &[0, 0, 0, 0][..],
        &[0x80, 0, 0, 0][..],
    ] {
        let mut bad = RawConn::connect(s.listen).await;
        bad.send_bytes(bytes).await;
        let first = bad.recv(Duration::from_secs(10)).await;
        assert!(
            matches!(first, Some(Message::Error(ref e)) if e.id == 0),
            "{first:?}"
        );
        assert!(
            bad.recv(Duration::from_secs(10)).await.is_none(),
            "closed after"
        );
    }
    assert_bystander_served(stop, by).await;
    drop(s.worker);
}

#[tokio::test]
async fn unfinished_large_frames_grow_the_balancer_by_no_more_than_its_frame_budget() {
    const BUDGET: u64 = 64 << 20;
    const FRAME: usize = 15 << 20;
    const ATTACKERS: usize = 20;
    let s = stand(
        "adv-bal-memory",
        &[
            "--frame-budget",
            "64MiB",
            "--connection-frame-budget",
            "16MiB",
            "--max-frame",
            "16MiB",
        ],
    )
    .await;
    let pid = s.balancer.pid();
    let before = rss_bytes(pid);
    let (stop, by) = bystander(s.listen, 100, DIM);
    let mut held = Vec::new();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..ATTACKERS {
        let mut c = TcpStream::connect(s.listen).await.unwrap();
        c.write_all(&(FRAME as u32).to_be_bytes()).await.unwrap();
        // All but the last byte, as far as the balancer reads it.
        let mut sent = 0;
        while sent + chunk.len() < FRAME {
            match tokio::time::timeout(Duration::from_millis(200), c.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break, // backpressure: the budget is full
            }
        }
        held.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_bytes(pid).saturating_sub(before);
    let waits = metric(s.admin, "tidepool_frame_budget_waits_total").await;
    assert!(
        grown <= BUDGET + (48 << 20),
        "{ATTACKERS} unfinished {FRAME}-byte frames grew the balancer by {grown} bytes, above its {BUDGET}-byte budget plus 48 MiB"
    );
    assert!(waits > 0.0, "the budget never made a connection wait");
    assert_bystander_served(stop, by).await;
    drop(held);
}

#[tokio::test]
async fn slowloris_is_cut_at_the_frame_timeout() {
    let s = stand("adv-bal-slowloris", &["--frame-timeout", "1s"]).await;
    let (stop, by) = bystander(s.listen, 100, DIM);
    let mut c = TcpStream::connect(s.listen).await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for byte in [0u8, 0, 1, 0, 0x85, 0xa4].iter().cycle().take(30) {
        if c.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        cut || started.elapsed() < Duration::from_secs(15),
        "never cut"
    );
    assert!(metric(s.admin, "tidepool_frame_timeouts_total").await >= 1.0);
    assert_bystander_served(stop, by).await;
}

#[tokio::test]
async fn a_frozen_worker_costs_requests_their_deadline_and_no_more() {
    let s = stand("adv-bal-sigstop", &["--request-timeout", "3s"]).await;
    let mut conn = RawConn::connect(s.listen).await;
    freeze(&s.worker).await;
    let sent = Instant::now();
    conn.send(infer(1, Some(500))).await;
    conn.send(infer(2, None)).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        match conn.recv(Duration::from_secs(10)).await {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::DeadlineExceeded, "{e:?}");
                answers.push((e.id, sent.elapsed()));
            }
            other => panic!("expected deadline_exceeded, got {other:?}"),
        }
    }
    s.worker.signal("CONT");
    assert_eq!(answers[0].0, 1, "the 500 ms deadline first");
    assert!(answers[0].1 < Duration::from_secs(3), "{answers:?}");
    assert_eq!(answers[1].0, 2, "then --request-timeout");
    // Exactly one answer each: the worker's late results are dropped.
    assert!(
        conn.quiet(Duration::from_secs(2)).await,
        "a second answer arrived"
    );
    assert!(metric(s.admin, "tidepool_request_timeouts_total").await >= 2.0);
}

/// Stops `worker` (SIGSTOP) and waits until the kernel says it is stopped.
async fn freeze(worker: &Proc) {
    worker.signal("STOP");
    let pid = worker.pid();
    eventually(
        Duration::from_secs(10),
        "the worker stopped",
        &[worker],
        || async {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start().starts_with('T').then_some(())
        },
    )
    .await;
}

/// Requests outstanding on the balancer's targets, all of them together.
async fn outstanding(admin: SocketAddr) -> f64 {
    let (_, text) = http(admin, "GET", "/metrics", None).await;
    labelled_sum(&text, "tidepool_target_outstanding")
}

/// With `--retries on` (the default) a request written to a worker is kept, to be sent again
/// should the connection be lost, so its bytes stay in `--frame-budget` until it is answered:
/// what a frozen worker sits on is bounded by the budget like what is still being read.
/// With `--retries off` they come back once the request is written.
#[tokio::test]
async fn requests_kept_for_a_retry_hold_their_frame_budget_until_answered() {
    const REQUESTS: u64 = 8;
    // The tensor's data alone: each frame holds at least this.
    const DATA: f64 = (DIM * 4) as f64;
    const HELD: &str = "tidepool_frame_budget_held_bytes";
    for retries in ["on", "off"] {
        let s = stand(
            &format!("adv-bal-kept-{retries}"),
            &["--retries", retries, "--request-timeout", "3s"],
        )
        .await;
        let mut conn = RawConn::connect(s.listen).await;
        freeze(&s.worker).await;
        for id in 1..=REQUESTS {
            conn.send(infer(id, None)).await;
        }
        let admin = s.admin;
        if retries == "on" {
            eventually(
                Duration::from_secs(5),
                "the unanswered requests held in the frame budget",
                &[&s.balancer],
                || async { (metric(admin, HELD).await >= REQUESTS as f64 * DATA).then_some(()) },
            )
            .await;
        } else {
            // Written to the frozen worker's socket (the kernel takes them), unanswered.
            eventually(
                Duration::from_secs(5),
                "the written requests out of the frame budget",
                &[&s.balancer],
                || async {
                    (outstanding(admin).await >= REQUESTS as f64
                        && metric(admin, HELD).await == 0.0)
                        .then_some(())
                },
            )
            .await;
        }
        for _ in 0..REQUESTS {
            match conn.recv(Duration::from_secs(10)).await {
                Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::DeadlineExceeded, "{e:?}"),
                other => panic!("expected deadline_exceeded, got {other:?}"),
            }
        }
        eventually(
            Duration::from_secs(5),
            &format!("the answered requests' bytes back in the frame budget (--retries {retries})"),
            &[&s.balancer],
            || async { (metric(admin, HELD).await == 0.0).then_some(()) },
        )
        .await;
        s.worker.signal("CONT");
    }
}

#[tokio::test]
async fn every_frame_on_the_wire_at_sigterm_is_answered() {
    let s = stand("adv-bal-sigterm", &[]).await;
    let mut conn = RawConn::connect(s.listen).await;
    conn.send(infer(1, None)).await;
    assert!(matches!(
        conn.recv(Duration::from_secs(10)).await,
        Some(Message::Result(_))
    ));
    s.balancer.signal("TERM");
    for id in 2..=50 {
        conn.send(infer(id, None)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for _ in 2..=50 {
        match conn.recv(Duration::from_secs(10)).await {
            Some(Message::Result(_)) => {}
            Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}"),
            other => panic!("a frame went unanswered: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_killed_autoscaling_balancer_leaves_no_worker_behind() {
    init_tracing();
    let dir = scratch_dir("adv-bal-orphans");
    let [listen, admin] = free_addrs();
    let model = TinyModel::default().write();
    let cmd = format!(
        "{} serve --model {} --listen 127.0.0.1:{{port}} --register http://{{admin}} --threads 1 --ort-lib {}",
        tidepool_tests::process::binary("tidepool-worker").display(),
        model.display(),
        tidepool_tests::worker::ort_lib().display()
    );
    let mut args = balancer_args(listen, admin);
    args.extend(fast_scaling_args(2, 2, 4.0));
    args.extend(["--worker-cmd".to_owned(), cmd]);
    let mut balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    wait_ready(listen, &[&balancer]).await;
    let children = children_of(balancer.pid());
    assert!(
        !children.is_empty(),
        "no worker started\n{}",
        balancer.log()
    );
    let _guards: Vec<KillOnDrop> = children.iter().map(|&p| KillOnDrop(p)).collect();
    balancer.signal("KILL");
    let _ = balancer.wait_exit(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(20);
    while children.iter().any(|&p| !exited(p)) {
        assert!(
            Instant::now() < deadline,
            "workers outlived their balancer: {children:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
