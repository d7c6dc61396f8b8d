//! Chaos at compose level (issue 11): under steady load through the balancer, one worker
//! container is frozen (`docker pause`), another cut off its network (`docker network
//! disconnect`), a third killed (`docker kill`). Every request must get exactly one answer
//! (counted per id on the wire) and none later than its deadline plus a little slack: the
//! balancer answers `deadline_exceeded` itself for what sits on a worker that stopped
//! answering.
//!
//! Four workers start, so one is left untouched. docker-compose.yml also starts its second
//! balancer (`balancer-b`, on free host ports here); the load goes through the first. Without a docker engine the test says so
//! on stderr and passes. Its own compose project and image tag, as in compose.rs, torn
//! down by a drop guard; the paused container is unpaused before that, so that `down`
//! can stop it.
//!
//! DNS re-resolution is set beyond the test's length: the faulted workers stay registered
//! and the balancer has to cope with them through deadlines and health checks alone.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tidepool_protocol::tls::TlsConnector;
use tidepool_tests::compose::{
    build_image, compose_program, docker_async, report, stack, Down, HostPorts, Stack, INPUT_DIM,
};
use tidepool_tests::drive::{drive, Drive};
use tidepool_tests::tls::connector;
use tidepool_tests::worker::scratch_dir;

/// Worker replicas started: one per fault, and one left alone.
const WORKERS: usize = 4;
/// Requests per second on each raw connection.
const RATE: u32 = 60;
/// Raw connections, each counting its answers per id.
const CONNECTIONS: usize = 3;
/// How long load is sent.
const LOAD_FOR: Duration = Duration::from_secs(20);
/// Every request's `deadline_ms`.
const DEADLINE: Duration = Duration::from_secs(2);
/// How late past its deadline an answer may come (scheduling, the network, the
/// balancer's timer): past this, a request counts as having hung.
const SLACK: Duration = Duration::from_millis(1500);
/// How long the cluster may take to have every worker serving.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// Unpauses a paused container when dropped, failed test or not (before `Down` runs).
struct Unpause(Option<String>);

impl Drop for Unpause {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            let _ = std::process::Command::new("docker")
                .args(["unpause", &id])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_answered_once_and_on_time_through_pause_disconnect_and_kill() {
    let Some(program) = compose_program("compose chaos test") else {
        return;
    };
    let started = Instant::now();
    build_image();
    let dir = scratch_dir("compose-chaos");
    // docker-compose.yml runs with TLS on: the load speaks it, trusting the test's CA.
    let Stack { compose, certs, .. } = stack(program, "chaos", &dir, &HostPorts::ephemeral());
    let tls = connector(&certs.join("ca.pem"), None);
    let cluster = Down(compose.clone());
    compose.run(&["up", "-d", "--scale", &format!("worker={WORKERS}")]);
    let front = compose.port("balancer", 7000);
    wait_all_serving(front, &tls).await;
    let up = started.elapsed();

    let loads: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            tokio::spawn(drive(Drive {
                addr: front,
                rate: RATE,
                stop: tokio_util::sync::CancellationToken::new(),
                max_requests: u64::from(RATE) * LOAD_FOR.as_secs(),
                input_dim: INPUT_DIM,
                deadline: DEADLINE,
                settle: DEADLINE + SLACK + Duration::from_secs(5),
                tls: Some(tls.clone()),
            }))
        })
        .collect();

    // One fault every few seconds while the load runs, each on its own container.
    let workers = compose.containers("worker");
    assert_eq!(workers.len(), WORKERS, "{workers:?}");
    let network = format!("{}_default", compose.project());
    let mut unpause = Unpause(None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    docker_async(&["pause", &workers[0]]).await;
    unpause.0 = Some(workers[0].clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    docker_async(&["network", "disconnect", "--force", &network, &workers[1]]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    docker_async(&["kill", &workers[2]]).await;

    let mut tallies = Vec::new();
    for load in loads {
        tallies.push(load.await.unwrap());
    }
    let sent: u64 = tallies.iter().map(|t| t.sent).sum();
    let slowest = tallies.iter().map(|t| t.slowest).max().unwrap_or_default();
    let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
    for t in &tallies {
        for (k, v) in t.outcomes() {
            *outcomes.entry(k).or_default() += v;
        }
    }
    report(&format!(
        "compose chaos test: cluster up {up:.1?}, {sent} requests {outcomes:?}, slowest \
         answer {slowest:.2?} (deadline {DEADLINE:?}), total {:.1?}",
        started.elapsed()
    ));
    for t in &tallies {
        t.assert_exactly_once();
        assert_eq!(t.sent, u64::from(RATE) * LOAD_FOR.as_secs());
    }
    assert!(
        slowest <= DEADLINE + SLACK,
        "an answer came {slowest:?} after its request, past the {DEADLINE:?} deadline: \
         something hung on a faulted worker ({outcomes:?})"
    );
    assert!(
        outcomes.get("ok").copied().unwrap_or(0) * 2 >= sent,
        "fewer than half the requests succeeded with one worker untouched: {outcomes:?}"
    );
    drop(unpause);
    drop(cluster);
}

/// Waits until a short burst through the balancer comes back all results from every
/// worker (each worker's name seen), so that the faults hit a pool in full service.
async fn wait_all_serving(front: std::net::SocketAddr, tls: &TlsConnector) {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let tally = drive(Drive {
            addr: front,
            rate: 200,
            stop: tokio_util::sync::CancellationToken::new(),
            max_requests: 100,
            input_dim: INPUT_DIM,
            deadline: Duration::from_secs(5),
            settle: Duration::from_secs(5),
            tls: Some(tls.clone()),
        });
        let tally = tokio::time::timeout(Duration::from_secs(15), tally).await;
        if let Ok(tally) = tally {
            let all_ok = tally.outcomes().get("ok") == Some(&tally.sent) && tally.sent > 0;
            if all_ok && tally.per_worker().len() == WORKERS {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not serve from all {WORKERS} workers within {READY_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
