//! Balancers side by side in compose (issue 12): docker-compose.yml's two balancers,
//! `balancer` and `balancer-b`, over the same workers, and a [`Pool`] given both published
//! addresses under steady load. `docker kill -s KILL` the first balancer's container
//! mid-run: every call still returns its result (the pool sends a lost connection's calls
//! again to `balancer-b`). `docker start` it again: it rebuilds its target group from DNS,
//! the pool reconnects, and it routes calls again, counted by the new process's own
//! `tidepool_routed_total` over its admin API (TLS, as every caller of it).
//!
//! What is counted: each pool call returns exactly once, always a result, never an error
//! (the pool hides the wire: a second answer to a call would be dropped by its client, so
//! the per-id count on the wire is the bystander's); and a bystander on `balancer-b`, raw
//! frames counted per id on the wire ([`drive`](tidepool_tests::drive)), gets exactly one
//! answer per request, every one a result. tests/tests/failover.rs is the same at process
//! level, with slow stand-in targets, where the kill is sure to catch calls in flight; here
//! the model answers in milliseconds and the number sent again is reported, not required.
//!
//! The host ports are fixed for the run (picked free at its start), unlike the other
//! compose suites' ephemeral ones: docker gives a restarted container a new ephemeral port,
//! and the pool has to find the balancer where it was. Without a docker engine the test
//! says so on stderr and passes. Its own compose project and image tag, as in compose.rs,
//! torn down by a drop guard.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tidepool_protocol::{ClientOptions, Pool, Tensor, Tensors};
use tidepool_tests::admin::{wait_answering, wait_targets, Admin};
use tidepool_tests::compose::{
    build_image, compose_program, docker_async, report, stack, Down, HostPorts, Stack, INPUT_DIM,
};
use tidepool_tests::drive::{drive, Drive};
use tidepool_tests::pool_load::PoolLoad;
use tidepool_tests::process::{eventually, free_addrs};
use tidepool_tests::tls::connector;
use tidepool_tests::worker::scratch_dir;
use tokio_util::sync::CancellationToken;

/// Worker replicas started.
const WORKERS: usize = 2;
/// Pool connections, spread over the two balancers.
const CONNECTIONS: usize = 4;
/// One pool call every this long (200 a second).
const EVERY: Duration = Duration::from_millis(5);
/// The bystander's requests per second, raw frames on `balancer-b`.
const BYSTANDER_RATE: u32 = 50;
/// Every call's and request's deadline: generous, so that an error means a lost call, not
/// a slow machine.
const DEADLINE: Duration = Duration::from_secs(10);
/// Calls the first balancer routes before it is killed, and again after its restart.
const ROUTED: u64 = 100;
/// Calls that return while the first balancer is down (about 2 s of load).
const WHILE_DOWN: usize = 400;
/// How long the cluster may take to start, and a restarted balancer to serve.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long each step under load may take (the calls routed, the pool's reconnection).
const STEP_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_balancer_container_costs_a_pool_nothing_and_rejoins_after_a_start() {
    let Some(program) = compose_program("compose failover test") else {
        return;
    };
    let started = Instant::now();
    build_image();
    let dir = scratch_dir("compose-failover");
    let [front_a, admin_a, front_b, admin_b] = free_addrs::<4>();
    let ports = HostPorts::fixed([front_a, admin_a, front_b, admin_b]);
    let Stack {
        compose,
        token,
        certs,
    } = stack(program, "failover", &dir, &ports);
    let tls = connector(&certs.join("ca.pem"), None);
    let cluster = Down(compose.clone());
    compose.run(&["up", "-d", "--scale", &format!("worker={WORKERS}")]);
    let a = Admin::new(admin_a, &certs, &token);
    let b = Admin::new(admin_b, &certs, &token);
    for admin in [&a, &b] {
        wait_ready(admin).await;
    }
    let up = started.elapsed();

    let pool = Pool::connect_tls_many(
        &[front_a.to_string(), front_b.to_string()],
        CONNECTIONS,
        ClientOptions::default(),
        &tls,
    )
    .await
    .unwrap();
    wait_all_connected(&pool).await;

    let stop = CancellationToken::new();
    let bystander = tokio::spawn(drive(Drive {
        addr: front_b,
        rate: BYSTANDER_RATE,
        stop: stop.clone(),
        max_requests: u64::MAX,
        input_dim: INPUT_DIM,
        deadline: DEADLINE,
        settle: DEADLINE * 2,
        tls: Some(tls.clone()),
    }));
    let load = PoolLoad {
        pool: pool.clone(),
        every: EVERY,
        deadline: DEADLINE,
        stop: stop.clone(),
    }
    .start(inputs);

    // Load through both; then the first balancer's container is SIGKILLed.
    eventually(STEP_WITHIN, "calls routed by `balancer`", &[], || async {
        (a.routed().await >= ROUTED).then_some(())
    })
    .await;
    let container = compose.containers("balancer").pop().unwrap();
    let first_start = docker_async(&["inspect", "-f", "{{.State.StartedAt}}", &container]).await;
    docker_async(&["kill", "-s", "KILL", &container]).await;
    let state = docker_async(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.State.ExitCode}}",
        &container,
    ])
    .await;
    assert_eq!(state.trim(), "false 137", "`balancer` after SIGKILL");
    let returned_at_kill = load.returned();
    eventually(
        STEP_WITHIN,
        "calls returned while `balancer` is down",
        &[],
        || async { (load.returned() >= returned_at_kill + WHILE_DOWN).then_some(()) },
    )
    .await;
    let failovers_while_down = pool.failovers();

    // The same container again, on the same host ports: a new process that resolves the
    // workers, health-checks them and takes its share of the pool's calls.
    docker_async(&["start", &container]).await;
    let second_start = docker_async(&["inspect", "-f", "{{.State.StartedAt}}", &container]).await;
    assert_ne!(first_start, second_start, "`docker start` started it again");
    wait_ready(&a).await;
    eventually(
        STEP_WITHIN,
        "the pool reconnected to `balancer`",
        &[],
        || async { (pool.clients().len() == CONNECTIONS).then_some(()) },
    )
    .await;
    eventually(
        STEP_WITHIN,
        "calls routed by the restarted `balancer`",
        &[],
        || async { (a.routed().await >= ROUTED).then_some(()) },
    )
    .await;

    stop.cancel();
    let calls = load.finish().await;
    let tally = bystander.await.unwrap();
    report(&format!(
        "compose failover test: cluster up {up:.1?}; pool: {} calls {:?}, {} sent again \
         ({failovers_while_down} while `balancer` was down); bystander on `balancer-b`: {} \
         requests {:?}; total {:.1?}",
        calls.sent,
        calls.outcomes(),
        pool.failovers(),
        tally.sent,
        tally.outcomes(),
        started.elapsed()
    ));
    calls.assert_each_once();
    let errors = calls.errors();
    assert!(
        errors.is_empty(),
        "{} of {} pool calls failed across the kill and restart of one of two balancers; \
         first: {:?}",
        errors.len(),
        calls.sent,
        &errors[..errors.len().min(5)]
    );
    tally.assert_all_ok();
    drop(cluster);
}

/// Call `k`'s input: one item of the image's model, its values varying with `k`.
fn inputs(k: u32) -> Tensors {
    let value = (k % 100) as f32 / 100.0;
    [(
        "input".to_owned(),
        Tensor::from_vec(vec![INPUT_DIM], vec![value; INPUT_DIM]).unwrap(),
    )]
    .into()
}

/// Waits until `admin`'s balancer answers over TLS and counts every worker healthy.
async fn wait_ready(admin: &Admin) {
    wait_answering(admin, READY_WITHIN).await;
    wait_targets(admin, READY_WITHIN, "every worker healthy", |t| {
        t.len() == WORKERS && t.values().all(|s| s == "healthy")
    })
    .await;
}

/// Waits until every connection of `pool` is open and its balancer answers `ping` (it has
/// a target to route to), so that the load starts on both balancers.
async fn wait_all_connected(pool: &Pool) {
    eventually(STEP_WITHIN, "every pool connection ready", &[], || async {
        let clients = pool.clients();
        if clients.len() < CONNECTIONS {
            return None;
        }
        for client in clients {
            client.ping(Duration::from_secs(2)).await.ok()?;
        }
        Some(())
    })
    .await;
}
