//! Autoscaling: `GET /scaling` and the gauges, and the one-machine actuator starting,
//! replacing and draining real worker processes with every request answered once.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tidepool_balancer::AutoscaleConfig;
use tidepool_tests::balancer::{fast_config, http, inputs, TestBalancer};
use tidepool_tests::drive::Drive;
use tidepool_tests::process::{
    balancer_args, binary, eventually, fast_scaling_args, free_addrs, wait_listening, Proc,
};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::worker::{ort_lib, scratch_dir, TinyModel};
use tokio_util::sync::CancellationToken;

async fn scaling(admin: SocketAddr) -> Option<serde_json::Value> {
    let (status, body) = http(admin, "GET", "/scaling", None).await;
    (status == 200).then(|| serde_json::from_str(&body).unwrap())
}

#[tokio::test]
async fn scaling_endpoint_reports_the_signal_and_the_wish() {
    let slow = StandInConfig {
        delay: Duration::from_millis(400),
        ..StandInConfig::default()
    };
    let a = StandIn::start(slow.clone()).await;
    let b = StandIn::start(slow).await;
    let mut config = fast_config(&[a.addr(), b.addr()]);
    config.autoscale = AutoscaleConfig {
        min_workers: 1,
        max_workers: 10,
        target_load: 10.0,
        scaling_window: Duration::from_secs(1),
        panic_window: Duration::from_secs(1),
        scale_out_delay: Duration::from_secs(1),
        ..AutoscaleConfig::default()
    };
    let balancer = TestBalancer::start(config).await;
    balancer.wait_healthy(2).await;

    // 60 requests held 400 ms each, over 2 healthy workers: 30 per worker, target 10.
    let client = balancer.client().await;
    let stop = CancellationToken::new();
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            while !stop.is_cancelled() {
                while calls.len() < 60 {
                    let client = client.clone();
                    calls.spawn(async move { client.infer(inputs(1.0)).await });
                }
                calls.join_next().await.unwrap().unwrap().unwrap();
            }
            while let Some(call) = calls.join_next().await {
                call.unwrap().unwrap();
            }
        })
    };
    let admin = balancer.admin;
    let status = eventually(
        Duration::from_secs(20),
        "a loaded /scaling",
        &[],
        || async {
            scaling(admin)
                .await
                .filter(|s| s["load_per_worker"].as_f64().unwrap_or(0.0) > 20.0)
        },
    )
    .await;
    stop.cancel();
    load.await.unwrap();

    assert_eq!(status["ready"], 2, "{status}");
    assert_eq!(status["coming"], 0);
    assert_eq!(status["current"], 2);
    assert_eq!(status["target_load"], 10.0);
    assert_eq!(status["min_workers"], 1);
    assert_eq!(status["max_workers"], 10);
    // ceil(2 × ~30 / 10) = 6 wanted; the balancer has no actuator, so it only advises.
    let desired = status["desired"].as_u64().unwrap();
    assert!((5..=7).contains(&desired), "{status}");
    assert!(status["load_now"].as_f64().unwrap() > 0.0);
    assert!(status["total_load"].as_f64().unwrap() > 40.0);
    assert!(
        status["reason"].as_str().unwrap().contains("demand"),
        "{status}"
    );
    // The stand-ins report no busy share: the in-flight guard sizes the pool, and 3 times
    // the pool's worth within the panic window is a surge.
    assert_eq!(status["signal"], "in_flight", "{status}");
    assert_eq!(status["busy_total"], serde_json::Value::Null);
    assert_eq!(status["mode"], "panic", "{status}");
    assert!(status["stable_demand"].as_f64().unwrap() > 4.0, "{status}");
    assert!(status["actuator"].as_str().unwrap().starts_with("none"));

    let (_, metrics) = http(admin, "GET", "/metrics", None).await;
    for gauge in [
        "tidepool_load_per_worker ",
        "tidepool_desired_workers ",
        "tidepool_ready_workers 2",
        "tidepool_target_load 10",
        "tidepool_scaling_panic 1",
        "tidepool_demand_stable_workers ",
        "tidepool_busy_total 0",
    ] {
        assert!(metrics.contains(gauge), "{gauge} missing from /metrics");
    }
    balancer.stop().await.unwrap();
}

/// Ready worker addresses from `GET /scaling` and `/targets`.
async fn ready(admin: SocketAddr) -> Option<(u64, u64, u64)> {
    let s = scaling(admin).await?;
    Some((
        s["ready"].as_u64()?,
        s["coming"].as_u64()?,
        s["leaving"].as_u64()?,
    ))
}

async fn healthy_targets(admin: SocketAddr) -> Vec<String> {
    let (_, body) = http(admin, "GET", "/targets", None).await;
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
    list.iter()
        .filter(|t| t["state"] == "healthy")
        .map(|t| t["addr"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn process_actuator_scales_out_replaces_and_drains_real_workers() {
    let dir = scratch_dir("autoscale");
    let model = TinyModel {
        input_dim: 16,
        ..TinyModel::default()
    }
    .write();
    let [listen, admin] = free_addrs();
    let worker_cmd = format!(
        "{} serve --model {} --listen 127.0.0.1:{{port}} --register http://{{admin}} --name auto-{{port}} \
         --threads 1 --max-batch 8 --max-delay 20ms --drain-timeout 10s --ort-lib {}",
        binary("tidepool-worker").display(),
        model.display(),
        ort_lib().display()
    );
    let mut args = balancer_args(listen, admin);
    args.extend(fast_scaling_args(1, 3, 4.0));
    args.extend(["--worker-cmd".to_owned(), worker_cmd]);
    let mut balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    wait_listening(admin, &balancer).await;
    let procs = [&balancer];

    // The floor: one worker started at once, and it becomes ready.
    eventually(
        Duration::from_secs(30),
        "the first worker ready",
        &procs,
        || async { ready(admin).await.filter(|r| r.0 == 1).map(drop) },
    )
    .await;

    // Load well above one worker's target: the pool grows, each request answered once.
    let heavy_stop = CancellationToken::new();
    let heavy = Drive::new(listen, 500, 16, heavy_stop.clone()).spawn();
    eventually(
        Duration::from_secs(40),
        "scale-out to 2+ ready workers",
        &procs,
        || async { ready(admin).await.filter(|r| r.0 >= 2).map(drop) },
    )
    .await;
    heavy_stop.cancel();
    let tally = heavy.await.unwrap();
    tally.assert_all_ok();

    // Light load while the pool shrinks back: draining workers lose nothing.
    let light_stop = CancellationToken::new();
    let light = Drive::new(listen, 20, 16, light_stop.clone()).spawn();
    eventually(
        Duration::from_secs(60),
        "scale-in to 1 worker, drained",
        &procs,
        || async { ready(admin).await.filter(|r| *r == (1, 0, 0)).map(drop) },
    )
    .await;
    light_stop.cancel();
    let tally = light.await.unwrap();
    tally.assert_all_ok();

    // A worker that dies is replaced.
    let survivor = healthy_targets(admin).await;
    assert_eq!(survivor.len(), 1, "{survivor:?}");
    let port = survivor[0].rsplit(':').next().unwrap().to_owned();
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("name auto-{port} ")])
        .status()
        .unwrap();
    assert!(killed.success(), "no worker process auto-{port} to kill");
    eventually(
        Duration::from_secs(40),
        "a replacement worker ready",
        &procs,
        || async {
            let now = healthy_targets(admin).await;
            (now.len() == 1 && now != survivor).then_some(())
        },
    )
    .await;

    // Stopping the balancer stops the workers it started.
    balancer.signal("TERM");
    let status = balancer.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        balancer.log()
    );
    let left = std::process::Command::new("pgrep")
        .args(["-f", &format!("register http://{admin}")])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "workers left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
