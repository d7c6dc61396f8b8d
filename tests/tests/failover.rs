//! Balancers side by side: two `tidepool-balancer` processes over the same two targets, a
//! [`Pool`] given both addresses under steady load. SIGKILL one balancer: every call still
//! gets its result (the pool sends the lost connection's calls again to the other);
//! restart it on the same ports: it rebuilds its target group from its static targets and
//! takes traffic again. A bystander on the surviving balancer, counted per id on the wire,
//! gets every normal answer throughout.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidepool_protocol::{ClientOptions, Pool};
use tidepool_tests::admin::routed_total;
use tidepool_tests::balancer::{echoed, http, inputs};
use tidepool_tests::drive::Drive;
use tidepool_tests::init_tracing;
use tidepool_tests::pool_load::PoolLoad;
use tidepool_tests::process::{balancer_args, eventually, free_addrs, wait_listening, Proc};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::worker::scratch_dir;
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);

/// One balancer process over static targets, on ports it keeps across restarts.
struct Balancer {
    name: &'static str,
    listen: SocketAddr,
    admin: SocketAddr,
    args: Vec<String>,
}

impl Balancer {
    fn new(name: &'static str, targets: &[SocketAddr]) -> Balancer {
        let [listen, admin] = free_addrs();
        let mut args = balancer_args(listen, admin);
        for target in targets {
            args.extend(["--target".to_owned(), target.to_string()]);
        }
        Balancer {
            name,
            listen,
            admin,
            args,
        }
    }

    async fn start(&self, dir: &Path) -> Proc {
        let proc = Proc::start(self.name, "tidepool-balancer", &self.args, dir);
        wait_listening(self.listen, &proc).await;
        proc
    }

    /// Requests this balancer routed to any target, from its metrics.
    async fn routed(&self) -> u64 {
        let (_, metrics) = http(self.admin, "GET", "/metrics", None).await;
        routed_total(&metrics)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_balancer_costs_a_pool_nothing_and_rejoins_after_a_restart() {
    init_tracing();
    let dir = scratch_dir("failover");
    // Slow enough that each balancer holds several calls when it is killed.
    let targets = [
        StandIn::start(StandInConfig {
            name: "w1".into(),
            delay: Duration::from_millis(150),
            ..StandInConfig::default()
        })
        .await,
        StandIn::start(StandInConfig {
            name: "w2".into(),
            delay: Duration::from_millis(150),
            ..StandInConfig::default()
        })
        .await,
    ];
    let addrs: Vec<SocketAddr> = targets.iter().map(StandIn::addr).collect();
    let a = Balancer::new("balancer-a", &addrs);
    let b = Balancer::new("balancer-b", &addrs);
    let mut proc_a = a.start(&dir).await;
    let proc_b = b.start(&dir).await;

    let pool = Pool::connect_many(
        &[a.listen.to_string(), b.listen.to_string()],
        4,
        ClientOptions::default(),
    )
    .await
    .unwrap();
    // Both balancers have found their targets healthy before the load starts.
    for client in pool.clients() {
        eventually(10 * SECOND, "balancers ready", &[&proc_a, &proc_b], || {
            let client = client.clone();
            async move { client.ping(SECOND).await.ok() }
        })
        .await;
    }

    let stop = CancellationToken::new();
    let bystander = Drive::new(b.listen, 100, 1, stop.clone()).spawn();
    // One call every 5 ms, each with its own value, so that an answer to another call
    // would show.
    let load = PoolLoad {
        pool: pool.clone(),
        every: Duration::from_millis(5),
        deadline: 10 * SECOND,
        stop: stop.clone(),
    }
    .start(|k| inputs(k as f32));

    // Load on both; then A dies while it holds calls.
    eventually(10 * SECOND, "calls through A", &[&proc_a], || async {
        (a.routed().await >= 50).then_some(())
    })
    .await;
    let held = targets
        .iter()
        .map(|t| t.stats().in_flight.load(Ordering::Relaxed))
        .sum::<usize>();
    proc_a.signal("KILL");
    proc_a
        .wait_exit(10 * SECOND)
        .expect("balancer A exits on SIGKILL");
    eventually(10 * SECOND, "calls sent again to B", &[&proc_b], || async {
        (pool.failovers() > 0).then_some(())
    })
    .await;
    let answered_while_down = load.returned();

    // A comes back on the same ports; its target group is rebuilt from its static
    // targets, the pool reconnects once it answers pong, and A takes calls again.
    let proc_a = a.start(&dir).await;
    eventually(
        20 * SECOND,
        "the pool reconnected to A",
        &[&proc_a],
        || async { (pool.clients().len() == 4).then_some(()) },
    )
    .await;
    eventually(
        10 * SECOND,
        "calls through the new A",
        &[&proc_a],
        || async { (a.routed().await >= 50).then_some(()) },
    )
    .await;

    stop.cancel();
    let calls = load.finish().await;
    calls.assert_each_once();
    for (k, outcome) in &calls.returned {
        match outcome {
            Ok(r) => assert_eq!(
                echoed(&r.outputs),
                *k as f32,
                "call {k} got another call's answer"
            ),
            Err(error) => panic!(
                "call {k} failed: {error}\n{}\n{}",
                proc_a.log(),
                proc_b.log()
            ),
        }
    }
    assert!(answered_while_down > 0);
    let tally = bystander.await.unwrap();
    tally.assert_all_ok();
    eprintln!(
        "failover: {} calls, {} sent again, {held} in flight at the targets at the kill; bystander {:?}",
        calls.sent,
        pool.failovers(),
        tally.outcomes()
    );
    drop(proc_a);
    drop(proc_b);
}
