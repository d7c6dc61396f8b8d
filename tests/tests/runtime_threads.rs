//! `--runtime-threads`: the balancer binary on a multi-threaded runtime (0: one thread per
//! core; N: N threads) forwards as the default single thread does: calls from several
//! connections at once, each answered once with its own value, and a bystander's every
//! request a result.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidepool_protocol::{ClientOptions, Pool};
use tidepool_tests::balancer::{echoed, inputs};
use tidepool_tests::drive::Drive;
use tidepool_tests::init_tracing;
use tidepool_tests::process::{balancer_args, eventually, free_addrs, wait_listening, Proc};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::worker::scratch_dir;
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);
/// Calls sent at once over the pool's connections.
const CALLS: u32 = 400;

/// A balancer process with `--runtime-threads threads` over two stand-in targets: every
/// call and every bystander request answered once, correctly.
async fn every_request_answered_with(threads: &str) {
    init_tracing();
    let dir = scratch_dir("runtime-threads");
    let mut targets = Vec::new();
    for name in ["w1", "w2"] {
        targets.push(
            StandIn::start(StandInConfig {
                name: name.into(),
                ..StandInConfig::default()
            })
            .await,
        );
    }
    let [listen, admin] = free_addrs();
    let mut args = balancer_args(listen, admin);
    args.extend(["--runtime-threads".to_owned(), threads.to_owned()]);
    for target in &targets {
        args.extend(["--target".to_owned(), target.addr().to_string()]);
    }
    let proc = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    wait_listening(listen, &proc).await;
    let pool = Pool::connect_many(&[listen.to_string()], 4, ClientOptions::default())
        .await
        .unwrap();
    for client in pool.clients() {
        eventually(10 * SECOND, "the balancer routes", &[&proc], || {
            let client = client.clone();
            async move { client.ping(SECOND).await.ok() }
        })
        .await;
    }

    let stop = CancellationToken::new();
    let bystander = Drive::new(listen, 100, 1, stop.clone()).spawn();
    let mut calls = tokio::task::JoinSet::new();
    for k in 1..=CALLS {
        let pool = pool.clone();
        calls.spawn(async move { (k, pool.infer(inputs(k as f32)).await) });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (k, outcome) = joined.unwrap();
        let result = outcome.unwrap_or_else(|e| panic!("call {k} failed: {e}\n{}", proc.log()));
        assert_eq!(
            echoed(&result.outputs),
            k as f32,
            "call {k} got another's answer"
        );
        answered += 1;
    }
    assert_eq!(answered, CALLS);
    stop.cancel();
    bystander.await.unwrap().assert_all_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runtime_thread_per_core_answers_every_request() {
    every_request_answered_with("0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runtime_threads_answer_every_request() {
    every_request_answered_with("3").await;
}
