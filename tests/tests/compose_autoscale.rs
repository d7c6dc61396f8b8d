//! The docker compose actuator for real, on this machine's docker engine: the balancer runs
//! here as a process with `--autoscale --scale-cmd 'docker-compose … up -d --no-recreate
//! --scale worker={count} worker'` over `deploy/compose/autoscale.yml`, whose workers use the
//! host's network, bind a free port each and register themselves with the balancer.
//!
//! The balancer starts the first worker container itself (below --min-workers), load well
//! above the target grows the pool (seen in `GET /scaling` and in `docker-compose ps`),
//! and a light load while the load falls sees the pool shrink back: compose stops the
//! extra containers, each deregisters and drains first. Every request of both loads is
//! counted per id on the wire and must be answered exactly once, with a result.
//!
//! TLS is on as deploy/compose/autoscale.yml documents it: certificates from
//! scripts/make-certs.sh, the balancer serving TLS to the load and on its admin API (the
//! workers register at `https://` trusting the CA, and this test reads `/scaling` over
//! TLS too), and speaking mutual TLS to the workers, which require its client certificate.
//!
//! Without a docker engine the test says so on stderr and passes. It runs in its own
//! project (unique name) and image tag (`tidepool:test`); the drop guards stop the balancer
//! first, so it runs no more compose commands, then take the project down (`down -v`).

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tidepool_protocol::tls::TlsConnector;
use tidepool_tests::compose::{
    build_image, compose_program, docker, make_certs, make_secrets, report, workspace_root,
    Compose, Down, INPUT_DIM,
};
use tidepool_tests::drive::{drive, Drive, Tally};
use tidepool_tests::process::{balancer_args, fast_scaling_args, free_addrs, wait_listening, Proc};
use tidepool_tests::tls::{connector, https};
use tidepool_tests::worker::scratch_dir;
use tokio_util::sync::CancellationToken;

/// The pool's bounds.
const MIN_WORKERS: usize = 1;
const MAX_WORKERS: usize = 3;
/// Outstanding requests per worker the pool is sized for. Workers hold a request at least
/// their --max-delay (20 ms, batches of 32 never fill here), so `HEAVY_RATE` keeps about
/// 600 × 0.02 = 12 outstanding: three workers' worth.
const TARGET_LOAD: f64 = 4.0;
const HEAVY_RATE: u32 = 600;
/// About 0.4 outstanding: one worker is plenty.
const LIGHT_RATE: u32 = 20;
/// How long the first worker may take to start and pass its health checks.
const FIRST_WITHIN: Duration = Duration::from_secs(60);
/// How long the scale-out and the scale-in may each take.
const SCALE_WITHIN: Duration = Duration::from_secs(45);
/// A request not answered within this counts as unanswered (the test then fails).
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_actuator_scales_worker_containers_out_and_in() {
    let Some(program) = compose_program("compose autoscale test") else {
        return;
    };
    let started = Instant::now();
    build_image();
    let built = started.elapsed();

    let dir = scratch_dir("compose-autoscale");
    let [listen, admin] = free_addrs();
    // The admin API serves TLS: workers register at https://, trusting the CA.
    let register = format!("https://{admin}");
    // The workers register with the balancer's admin token, mounted as a compose secret.
    let (secrets, _) = make_secrets(&dir);
    // The workers serve TLS and require the balancer's client certificate.
    let certs = make_certs(&dir);
    let tls = connector(&certs.join("ca.pem"), None);
    let compose = Compose::new(
        program,
        &workspace_root().join("deploy/compose/autoscale.yml"),
        "autoscale",
        &[
            ("TIDEPOOL_REGISTER", register.as_str()),
            ("TIDEPOOL_MAX_DELAY", "20ms"),
            ("TIDEPOOL_SECRETS", &secrets.display().to_string()),
            ("TIDEPOOL_CERTS", &certs.display().to_string()),
        ],
        &dir,
    );
    // Declared before the balancer, so dropped after it: the balancer stops scaling first.
    let cluster = Down(compose.clone());
    let scale_cmd = compose.command_line("up -d --no-recreate --scale worker={count} worker");
    let mut args = balancer_args(listen, admin);
    args.extend(fast_scaling_args(MIN_WORKERS, MAX_WORKERS, TARGET_LOAD));
    args.extend(["--scale-cmd".to_owned(), scale_cmd]);
    args.extend([
        "--admin-token-file".to_owned(),
        secrets.join("admin.token").display().to_string(),
    ]);
    for (flag, file) in [
        ("--tls-cert", "balancer.pem"),
        ("--tls-key", "balancer.key"),
        ("--upstream-tls-ca", "ca.pem"),
        ("--upstream-tls-cert", "balancer-client.pem"),
        ("--upstream-tls-key", "balancer-client.key"),
        ("--admin-tls-cert", "balancer.pem"),
        ("--admin-tls-key", "balancer.key"),
    ] {
        args.extend([flag.to_owned(), certs.join(file).display().to_string()]);
    }
    args.extend(["--upstream-tls-server-name".to_owned(), "worker".to_owned()]);
    let mut balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    wait_listening(admin, &balancer).await;

    // The floor: the balancer runs the scale command for one worker, which registers.
    let first = wait_pool(
        &compose,
        admin,
        &balancer,
        &certs,
        FIRST_WITHIN,
        "the first worker",
        |p| p.ready == MIN_WORKERS && p.containers == MIN_WORKERS,
    )
    .await;
    let up = started.elapsed();
    assert_eq!(first.actuator, "command (--scale-cmd)");

    // Load well above one worker's target: compose starts more containers.
    let heavy_stop = CancellationToken::new();
    let heavy = tokio::spawn(drive(load(listen, HEAVY_RATE, &heavy_stop, &tls)));
    let grown = wait_pool(
        &compose,
        admin,
        &balancer,
        &certs,
        SCALE_WITHIN,
        "scale-out",
        |p| p.ready >= 2 && p.containers >= 2,
    )
    .await;
    let scaled_out = started.elapsed();
    heavy_stop.cancel();
    let heavy = heavy.await.unwrap();

    // The load falls to a trickle: compose stops the extra containers, each draining.
    let light_stop = CancellationToken::new();
    let light = tokio::spawn(drive(load(listen, LIGHT_RATE, &light_stop, &tls)));
    let shrunk = wait_pool(
        &compose,
        admin,
        &balancer,
        &certs,
        SCALE_WITHIN,
        "scale-in",
        |p| p.ready == MIN_WORKERS && p.containers == MIN_WORKERS && p.desired == MIN_WORKERS,
    )
    .await;
    let scaled_in = started.elapsed();
    light_stop.cancel();
    let light = light.await.unwrap();

    report(&format!(
        "compose autoscale test: image {built:.1?}, first worker at {up:.1?}, \
         scale-out to {grown:?} at {scaled_out:.1?}, scale-in to {shrunk:?} at {scaled_in:.1?}; \
         heavy {} requests {:?} over {} workers, light {} requests {:?}",
        heavy.sent,
        heavy.outcomes(),
        heavy.per_worker().len(),
        light.sent,
        light.outcomes(),
    ));
    for tally in [&heavy, &light] {
        all_answered(tally, &balancer);
    }
    assert!(
        heavy.per_worker().len() >= 2,
        "the heavy load was served by one worker only: {:?}",
        heavy.per_worker()
    );

    // A balancer stopped by SIGTERM exits cleanly; the project goes with the guard.
    balancer.signal("TERM");
    let status = balancer.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        balancer.log()
    );
    let project = compose.project().to_owned();
    drop(balancer);
    drop(cluster);
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
    ]);
    assert!(left.trim().is_empty(), "containers left behind: {left}");
}

/// The raw-frame drive over TLS (`tls`) at `rate` until `stop`.
fn load(addr: SocketAddr, rate: u32, stop: &CancellationToken, tls: &TlsConnector) -> Drive {
    Drive {
        addr,
        rate,
        stop: stop.clone(),
        max_requests: 1_000_000,
        input_dim: INPUT_DIM,
        deadline: ANSWER_WITHIN,
        settle: ANSWER_WITHIN,
        tls: Some(tls.clone()),
    }
}

/// Every request answered exactly once, and with a result.
fn all_answered(tally: &Tally, balancer: &Proc) {
    tally.assert_exactly_once();
    assert_eq!(
        tally.outcomes().get("ok"),
        Some(&tally.sent),
        "not every request got a result: {:?}\n{}",
        tally.outcomes(),
        balancer.log()
    );
}

/// The pool as the balancer and as compose see it.
#[derive(Debug)]
struct Pool {
    /// `ready` at `GET /scaling`.
    ready: usize,
    /// `desired` at `GET /scaling`.
    desired: usize,
    /// Worker containers of the project (`docker-compose ps -q worker`).
    containers: usize,
    /// `actuator` at `GET /scaling`.
    actuator: String,
}

/// Polls the pool every half second (`/scaling` over TLS, trusting `certs`' CA) until
/// `done` holds; panics after `within` with the last pool seen and the balancer's log.
async fn wait_pool(
    compose: &Compose,
    admin: SocketAddr,
    balancer: &Proc,
    certs: &Path,
    within: Duration,
    what: &str,
    done: impl Fn(&Pool) -> bool,
) -> Pool {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        let (status, body) = https(admin, &certs.join("ca.pem"), "GET", "/scaling", None).await;
        if status == 200 {
            let scaling: serde_json::Value = serde_json::from_str(&body).unwrap();
            let compose = compose.clone();
            let containers = tokio::task::spawn_blocking(move || compose.containers("worker"))
                .await
                .unwrap()
                .len();
            let pool = Pool {
                ready: count(&scaling["ready"]),
                desired: count(&scaling["desired"]),
                containers,
                actuator: scaling["actuator"].as_str().unwrap_or_default().to_owned(),
            };
            if done(&pool) {
                return pool;
            }
            last = Some((pool, scaling));
        }
        assert!(
            Instant::now() < deadline,
            "waited {within:?} for {what}; last seen {last:?}\n{}",
            balancer.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn count(value: &serde_json::Value) -> usize {
    usize::try_from(value.as_u64().unwrap()).unwrap()
}
