//! `--shards`: client listeners on one port (SO_REUSEPORT), each on its own thread and
//! single-threaded runtime, over one target group. Many calls at once over many
//! connections (spread by the kernel over the shards) each get their own answer, a
//! bystander's every request a result, a target never holds more than --max-outstanding
//! across all shards, and shutdown drains every shard.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::{ClientOptions, Pool};
use tidepool_tests::balancer::{echoed, every_call_answered, fast_config, inputs, TestBalancer};
use tidepool_tests::drive::Drive;
use tidepool_tests::init_tracing;
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tokio_util::sync::CancellationToken;

/// Client connections: with two shards, the chance that the kernel puts all of them on one
/// shard is 2 in 2^16.
const CONNECTIONS: usize = 16;
/// Calls sent at once over the pool's connections.
const CALLS: u32 = 400;
/// `--max-outstanding`: far below what the calls would put on each target without it.
const MAX_OUTSTANDING: usize = 3;

async fn stand_ins(delay: Duration) -> Vec<StandIn> {
    let mut targets = Vec::new();
    for name in ["w1", "w2"] {
        targets.push(
            StandIn::start(StandInConfig {
                name: name.into(),
                delay,
                ..StandInConfig::default()
            })
            .await,
        );
    }
    targets
}

/// A balancer with two shards over `targets`, both healthy.
async fn sharded(targets: &[StandIn], max_outstanding: Option<usize>) -> TestBalancer {
    let addrs: Vec<_> = targets.iter().map(StandIn::addr).collect();
    let lb = TestBalancer::start(tidepool_balancer::Config {
        shards: 2,
        max_outstanding,
        // Calls wait in the queue for their turn under --max-outstanding; on a loaded
        // machine that may take longer than the default second.
        queue_timeout: Duration::from_secs(30),
        ..fast_config(&addrs)
    })
    .await;
    lb.wait_healthy(2).await;
    lb
}

/// `CONNECTIONS` client connections to `lb`.
async fn pool(lb: &TestBalancer) -> Pool {
    Pool::connect_many(
        &[lb.addr.to_string()],
        CONNECTIONS,
        ClientOptions::default(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_answer_every_call_within_max_outstanding() {
    init_tracing();
    let targets = stand_ins(Duration::from_millis(2)).await;
    let lb = sharded(&targets, Some(MAX_OUTSTANDING)).await;
    let pool = pool(&lb).await;

    // The balancer's own counts, sampled while the calls run.
    let stop = CancellationToken::new();
    let most_outstanding = Arc::new(AtomicUsize::new(0));
    let sampler = tokio::spawn({
        let (handle, stop, most) = (
            lb.handle.clone(),
            stop.clone(),
            Arc::clone(&most_outstanding),
        );
        async move {
            while !stop.is_cancelled() {
                for target in handle.targets() {
                    most.fetch_max(target.outstanding, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let bystander = Drive::new(lb.addr, 100, 1, stop.clone()).spawn();
    every_call_answered(&pool, CALLS, String::new).await;
    stop.cancel();
    bystander.await.unwrap().assert_all_ok();
    sampler.await.unwrap();

    let most = most_outstanding.load(Ordering::Relaxed);
    assert!(
        most <= MAX_OUTSTANDING,
        "the balancer counted {most} outstanding on one target"
    );
    let held: Vec<usize> = targets
        .iter()
        .map(|t| t.stats().max_in_flight.load(Ordering::Relaxed))
        .collect();
    assert!(
        held.iter().all(|&n| n <= MAX_OUTSTANDING),
        "a target held more than --max-outstanding {MAX_OUTSTANDING} at once: {held:?}"
    );
    // The limit was reached, so the check above had something to hold back.
    assert!(held.contains(&MAX_OUTSTANDING), "{held:?}");
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_every_shard() {
    init_tracing();
    let targets = stand_ins(Duration::from_millis(300)).await;
    let lb = sharded(&targets, None).await;
    let pool = pool(&lb).await;
    const IN_FLIGHT: u32 = 64;
    let mut calls = tokio::task::JoinSet::new();
    for k in 1..=IN_FLIGHT {
        let pool = pool.clone();
        calls.spawn(async move { (k, pool.infer(inputs(k as f32)).await) });
    }
    lb.wait_for("every call routed", |h| {
        h.targets().iter().map(|t| t.outstanding).sum::<usize>() == IN_FLIGHT as usize
    })
    .await;
    lb.begin_shutdown();
    while let Some(joined) = calls.join_next().await {
        let (k, outcome) = joined.unwrap();
        let result = outcome.unwrap_or_else(|e| panic!("call {k} was not drained: {e}"));
        assert_eq!(echoed(&result.outputs), k as f32);
    }
    lb.stop().await.unwrap();
}
