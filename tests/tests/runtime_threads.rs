//! `--runtime-threads` and `--shards`: the balancer binary on a multi-threaded runtime (0:
//! one thread per core; N: N threads), or with client listener shards on threads of their
//! own, forwards as the default single thread does: calls from several
//! connections at once, each answered once with its own value, and a bystander's every
//! request a result.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidepool_protocol::{ClientOptions, Pool};
use tidepool_tests::balancer::every_call_answered;
use tidepool_tests::drive::Drive;
use tidepool_tests::init_tracing;
use tidepool_tests::process::{balancer_args, eventually, free_addrs, wait_listening, Proc};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::worker::scratch_dir;
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);
/// Calls sent at once over the pool's connections.
const CALLS: u32 = 400;

/// A balancer process with `flag value` (`--runtime-threads 0`, `--shards 2`) over two
/// stand-in targets: every call and every bystander request answered once, correctly.
async fn every_request_answered_with(flag: &str, value: &str) {
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
    args.extend([flag.to_owned(), value.to_owned()]);
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
    every_call_answered(&pool, CALLS, || proc.log()).await;
    stop.cancel();
    bystander.await.unwrap().assert_all_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runtime_thread_per_core_answers_every_request() {
    every_request_answered_with("--runtime-threads", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runtime_threads_answer_every_request() {
    every_request_answered_with("--runtime-threads", "3").await;
}

/// The binary's `--shards`: two listeners on the port, each on its own thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_answer_every_request() {
    every_request_answered_with("--shards", "2").await;
}
