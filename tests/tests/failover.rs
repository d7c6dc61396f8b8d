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
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::{CallOptions, ClientOptions, Error, Pool};
use tidepool_tests::balancer::{echoed, http, inputs};
use tidepool_tests::drive::Drive;
use tidepool_tests::init_tracing;
use tidepool_tests::process::{balancer_args, eventually, free_addrs, wait_listening, Proc};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::worker::scratch_dir;
use tokio::sync::Mutex;
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
        metrics
            .lines()
            .filter(|l| l.starts_with("tidepool_routed_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    }
}

/// How the pool's calls ended: per call index, the value its result echoed, or the error.
type Outcomes = Arc<Mutex<Vec<(u32, Result<f32, String>)>>>;

/// Steady load through `pool` until `stop`: one call every `every`, each with its own
/// value and a 10 s deadline, each on its own task.
fn steady(
    pool: Pool,
    every: Duration,
    stop: CancellationToken,
) -> (Outcomes, tokio::task::JoinHandle<u32>) {
    let outcomes: Outcomes = Arc::default();
    let recorded = Arc::clone(&outcomes);
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut calls = tokio::task::JoinSet::new();
        let mut sent = 0u32;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            sent += 1;
            let (pool, recorded, k) = (pool.clone(), Arc::clone(&recorded), sent);
            calls.spawn(async move {
                let options = CallOptions {
                    deadline: Some(10 * SECOND),
                    ..Default::default()
                };
                let outcome = pool
                    .infer_with(inputs(k as f32), options)
                    .await
                    .map(|r| echoed(&r.outputs))
                    .map_err(|e: Error| e.to_string());
                recorded.lock().await.push((k, outcome));
            });
        }
        while calls.join_next().await.is_some() {}
        sent
    });
    (outcomes, sender)
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
    let (outcomes, sender) = steady(pool.clone(), Duration::from_millis(5), stop.clone());

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
    let answered_while_down = outcomes.lock().await.len();

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
    let sent = sender.await.unwrap();
    let outcomes = outcomes.lock().await;
    assert_eq!(outcomes.len() as u32, sent, "every call returned once");
    let mut seen = vec![0u32; sent as usize + 1];
    for (k, outcome) in outcomes.iter() {
        seen[*k as usize] += 1;
        match outcome {
            Ok(value) => assert_eq!(*value, *k as f32, "call {k} got another call's answer"),
            Err(error) => panic!(
                "call {k} failed: {error}\n{}\n{}",
                proc_a.log(),
                proc_b.log()
            ),
        }
    }
    assert!(
        seen[1..].iter().all(|&n| n == 1),
        "each call answered exactly once"
    );
    assert!(answered_while_down > 0);
    let tally = bystander.await.unwrap();
    tally.assert_all_ok();
    eprintln!(
        "failover: {sent} calls, {} sent again, {held} in flight at the targets at the kill; bystander {:?}",
        pool.failovers(),
        tally.outcomes()
    );
    drop(proc_a);
    drop(proc_b);
}
