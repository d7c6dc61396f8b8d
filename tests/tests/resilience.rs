//! Retries on target loss and outlier detection, against stand-in targets: a killed target
//! costs no request with retries on (and some with them off, as before), and a target that
//! answers `internal` at once is ejected while every other request is served. A frozen
//! worker process (SIGSTOP) costs no request either: its requests are retried when it turns
//! unhealthy. Hedging on a skewed pool answers every request once.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidepool_balancer::{Config, EjectionReason, HedgeAfter, TargetState};
use tidepool_protocol::{ErrorCode, Message};
use tidepool_tests::adversary::{assert_bystander_served, bystander, wait_ready, worker_args};
use tidepool_tests::balancer::{echoed, fast_config, infer, TestBalancer};
use tidepool_tests::drive::Drive;
use tidepool_tests::init_tracing;
use tidepool_tests::process::{free_addrs, Proc};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::worker::{scratch_dir, TinyModel};
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);

async fn stand_in(delay: Duration, fail_with: Option<ErrorCode>) -> StandIn {
    StandIn::start(StandInConfig {
        delay,
        fail_with,
        ..StandInConfig::default()
    })
    .await
}

/// Sends `n` requests to two targets, kills the slow one while it holds some, and
/// returns the answers and the balancer.
async fn kill_one_of_two(retries: bool, n: u64) -> (HashMap<u64, Message>, TestBalancer) {
    let doomed = stand_in(Duration::from_millis(300), None).await;
    let survivor = stand_in(Duration::from_millis(5), None).await;
    let lb = TestBalancer::start(Config {
        retries,
        ..fast_config(&[doomed.addr(), survivor.addr()])
    })
    .await;
    lb.wait_healthy(2).await;
    let mut raw = lb.raw().await;
    for id in 1..=n {
        raw.send(infer(id, id as f32)).await;
    }
    lb.wait_for("some on the doomed target", |_| {
        doomed.stats().in_flight.load(Ordering::Relaxed) > 0
    })
    .await;
    doomed.kill();
    (raw.answers(n as usize).await, lb)
}

#[tokio::test]
async fn with_retries_a_killed_target_costs_no_request() {
    init_tracing();
    let n = 100;
    let (seen, lb) = kill_one_of_two(true, n).await;
    for (id, msg) in &seen {
        match msg {
            Message::Result(r) => assert_eq!(echoed(&r.outputs), *id as f32),
            other => panic!("request {id} answered {other:?}"),
        }
    }
    let metrics = lb.handle.metrics_text();
    let retried = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidepool_retries_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("tidepool_retries_total in /metrics");
    assert!(retried > 0, "the doomed target's requests were retried");
    assert!(
        metrics.contains("tidepool_retry_budget_exhausted_total 0"),
        "{metrics}"
    );
    assert_eq!(lb.handle.outstanding(), 0);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn without_retries_a_killed_target_costs_its_requests() {
    init_tracing();
    let n = 100;
    let (seen, lb) = kill_one_of_two(false, n).await;
    let lost = seen
        .values()
        .filter(|m| match m {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                true
            }
            _ => false,
        })
        .count();
    assert!(
        lost > 0,
        "the doomed target's requests are answered unavailable"
    );
    assert!(lb
        .handle
        .metrics_text()
        .contains("tidepool_retries_total 0"));
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn a_target_that_fails_fast_is_ejected_and_the_rest_is_served() {
    init_tracing();
    let broken = stand_in(Duration::ZERO, Some(ErrorCode::Internal)).await;
    let good = stand_in(Duration::from_millis(2), None).await;
    let lb = TestBalancer::start(fast_config(&[broken.addr(), good.addr()])).await;
    lb.wait_healthy(2).await;

    // Until five answers in a row have failed, the broken target draws its share (more:
    // it always looks idle).
    let mut raw = lb.raw().await;
    let mut id = 0;
    while broken.stats().received.load(Ordering::Relaxed) < 5 {
        id += 1;
        raw.send(infer(id, 1.0)).await;
        raw.recv(5 * SECOND).await.expect("an answer");
    }
    let info = lb
        .handle
        .targets()
        .into_iter()
        .find(|t| t.addr == broken.addr())
        .unwrap();
    assert_eq!(info.ejected, Some(EjectionReason::ConsecutiveErrors));
    let metrics = lb.handle.metrics_text();
    assert!(
        metrics.contains("tidepool_ejections_total{reason=\"consecutive_errors\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tidepool_target_ejected{{target=\"{}\",reason=\"consecutive_errors\"}} 1",
            broken.addr()
        )),
        "{metrics}"
    );

    // Ejected: it draws nothing, and a bystander's requests and ours are all served.
    let before = broken.stats().received.load(Ordering::Relaxed);
    let mut bystander = lb.raw().await;
    let n = 200u64;
    for k in 1..=n {
        raw.send(infer(id + k, k as f32)).await;
        bystander.send(infer(k, k as f32)).await;
    }
    for conn in [&mut raw, &mut bystander] {
        for msg in conn.answers(n as usize).await.values() {
            assert!(matches!(msg, Message::Result(_)), "{msg:?}");
        }
    }
    assert_eq!(broken.stats().received.load(Ordering::Relaxed), before);
    lb.stop().await.unwrap();
}

/// A counter's value in the balancer's metrics text.
fn counter(lb: &TestBalancer, name: &str) -> u64 {
    let text = lb.handle.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics:\n{text}"))
}

#[tokio::test]
async fn a_frozen_worker_costs_no_request_with_retries_on_unhealthy() {
    init_tracing();
    let dir = scratch_dir("resilience-sigstop");
    let model = TinyModel::default().write();
    let [a_listen, a_metrics, b_listen, b_metrics] = free_addrs();
    let frozen = Proc::start(
        "worker-a",
        "tidepool-worker",
        &worker_args(&model, a_listen, a_metrics),
        &dir,
    );
    let other = Proc::start(
        "worker-b",
        "tidepool-worker",
        &worker_args(&model, b_listen, b_metrics),
        &dir,
    );
    wait_ready(a_listen, &[&frozen]).await;
    wait_ready(b_listen, &[&other]).await;
    // Checks slow enough that a busy worker passes them; a frozen one fails two in a row.
    let lb = TestBalancer::start(Config {
        health_interval: Duration::from_millis(500),
        health_timeout: Duration::from_millis(500),
        ..fast_config(&[a_listen, b_listen])
    })
    .await;
    lb.wait_healthy(2).await;

    let stop = CancellationToken::new();
    let load = Drive::new(lb.addr, 100, 16, stop.clone()).spawn();
    let (by_stop, by) = bystander(lb.addr, 20, 16);
    tokio::time::sleep(SECOND).await;
    frozen.signal("STOP");
    let state = |h: &tidepool_balancer::Handle| {
        h.targets()
            .into_iter()
            .find(|t| t.addr == a_listen)
            .map(|t| t.state)
    };
    lb.wait_for("the frozen worker unhealthy", |h| {
        state(h) == Some(TargetState::Unhealthy)
    })
    .await;
    // Load goes on beside the frozen worker for a while, then it wakes up and answers what
    // it held: those late answers must go nowhere.
    tokio::time::sleep(SECOND).await;
    frozen.signal("CONT");
    lb.wait_for("the woken worker healthy again", |h| {
        state(h) == Some(TargetState::Healthy)
    })
    .await;
    tokio::time::sleep(SECOND).await;
    stop.cancel();
    let tally = load.await.unwrap();
    assert!(tally.sent > 200, "sent {}", tally.sent);
    tally.assert_all_ok();
    assert_bystander_served(by_stop, by).await;
    assert!(
        counter(&lb, "tidepool_retries_unhealthy_total") > 0,
        "the frozen worker's requests were retried"
    );
    assert_eq!(counter(&lb, "tidepool_retry_budget_exhausted_total"), 0);
    lb.wait_for("nothing outstanding", |h| h.outstanding() == 0)
        .await;
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn hedged_requests_on_a_skewed_pool_are_answered_once() {
    init_tracing();
    let slow = stand_in(Duration::from_millis(300), None).await;
    let fast = stand_in(Duration::from_millis(2), None).await;
    let lb = TestBalancer::start(Config {
        hedge_after: HedgeAfter::After(Duration::from_millis(30)),
        hedge_budget_ratio: 0.5,
        hedge_budget_floor: 10,
        ..fast_config(&[slow.addr(), fast.addr()])
    })
    .await;
    lb.wait_healthy(2).await;
    let stop = CancellationToken::new();
    let mut drive = Drive::new(lb.addr, 100, 4, stop.clone());
    drive.max_requests = 300;
    let load = drive.spawn();
    let (by_stop, by) = bystander(lb.addr, 20, 4);
    let tally = load.await.unwrap();
    tally.assert_all_ok();
    assert_bystander_served(by_stop, by).await;
    let hedges = counter(&lb, "tidepool_hedges_total");
    let won = counter(&lb, "tidepool_hedges_won_total");
    assert!(hedges > 0, "requests on the slow target were hedged");
    assert!(won > 0, "the fast target won some races");
    assert!(won <= hedges);
    // The slow target was told to cancel the attempts that lost.
    lb.wait_for("the losers cancelled", |_| {
        slow.stats().cancelled.load(Ordering::Relaxed) > 0
    })
    .await;
    lb.wait_for("nothing outstanding", |h| h.outstanding() == 0)
        .await;
    lb.stop().await.unwrap();
}
