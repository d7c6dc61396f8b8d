//! The run loop against an in-process stand-in target (`tidepool-tests`' harness):
//! outcomes, the concurrency cap, deadlines, lost connections, draining, shutdown and the
//! written files.

use std::time::Duration;

use tidepool_load::{run, Arrivals, CancellationToken, Error, LoadConfig, Outcome, Report};
use tidepool_tests::stand_in::{StandIn, StandInConfig};

async fn stand_in(delay: Duration) -> StandIn {
    StandIn::start(StandInConfig {
        name: "w1".to_owned(),
        delay,
        ..StandInConfig::default()
    })
    .await
}

fn config(target: &StandIn, rate: f64, duration: Duration) -> LoadConfig {
    let mut c = LoadConfig::new(target.addr().to_string());
    c.rate = rate;
    c.duration = duration;
    c.arrivals = Arrivals::Uniform;
    c.connections = 2;
    c.inputs = vec!["x:f32:8".parse().expect("a valid spec")];
    c.drain = Duration::from_secs(5);
    c
}

/// Every scheduled send is accounted for exactly once.
fn assert_accounted(report: &Report) {
    assert_eq!(report.offered, report.sent + report.skipped);
    let outcomes: u64 = report.outcomes.values().sum();
    assert_eq!(outcomes, report.sent, "every sent request has one outcome");
    assert_eq!(
        report.answered + report.outcome(Outcome::Unanswered),
        report.sent
    );
    let offered: u64 = report.timeline.iter().map(|r| r.offered).sum();
    assert_eq!(offered, report.offered);
    let ok: u64 = report.timeline.iter().map(|r| r.ok).sum();
    assert_eq!(ok, report.ok());
    let errors: u64 = report.timeline.iter().map(|r| r.errors).sum();
    assert_eq!(errors, report.sent - report.ok());
}

#[tokio::test]
async fn a_healthy_target_answers_everything_at_the_offered_rate() {
    let target = stand_in(Duration::from_millis(2)).await;
    let report = run(
        config(&target, 200.0, Duration::from_secs(2)),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_accounted(&report);
    assert!((398..=400).contains(&report.offered), "{}", report.offered);
    assert_eq!(report.skipped, 0);
    assert_eq!(report.ok(), report.sent);
    assert_eq!(
        target
            .stats()
            .completed
            .load(std::sync::atomic::Ordering::Relaxed),
        report.sent
    );
    assert!(!report.info.interrupted);
    // Latency counts the stand-in's 2 ms at least.
    let l = &report.latency_ms;
    assert_eq!(l.count, report.ok());
    assert!(l.p50.unwrap() >= 2.0 && l.p50 <= l.p99 && l.p99 <= l.max);
    assert!(
        report.throughput > 150.0 && report.throughput < 250.0,
        "{}",
        report.throughput
    );
    assert_eq!(report.batch_sizes.get(&1), Some(&report.ok()));
    assert_eq!(report.workers.len(), 1);
    assert_eq!(report.workers[0].worker, "w1");
    assert_eq!(report.workers[0].share, 1.0);
    assert!(report.timeline.len() >= 2);
    let first = &report.timeline[0];
    assert!((195..=205).contains(&first.offered), "{first:?}");
    assert_eq!(first.active_workers, 1);
    assert!(first.p99_ms.is_some());

    let table = report.to_string();
    for part in ["offered", "ok", "p99.9", "batch sizes", "w1", "100.00%"] {
        assert!(table.contains(part), "{part:?} missing from\n{table}");
    }
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(json["outcomes"]["ok"], report.ok());
    assert_eq!(json["outcomes"]["connection_lost"], 0);
    assert_eq!(json["run"]["profile"]["kind"], "constant");
    assert!(json["latency_ms"]["p999"].is_f64());
}

#[tokio::test]
async fn the_cap_skips_sends_instead_of_delaying_them() {
    let target = stand_in(Duration::from_millis(500)).await;
    let mut c = config(&target, 100.0, Duration::from_secs(1));
    c.concurrency = 10;
    let report = run(c, CancellationToken::new()).await.unwrap();
    assert_accounted(&report);
    assert!((99..=100).contains(&report.offered), "{}", report.offered);
    // 10 go out at once, come back after 500 ms, then 10 more.
    assert!((15..=25).contains(&report.sent), "{} sent", report.sent);
    assert_eq!(report.ok(), report.sent);
    let max = target
        .stats()
        .max_in_flight
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(max <= 10, "{max} in flight at once");
}

#[tokio::test]
async fn a_slow_target_meets_the_deadline() {
    let target = stand_in(Duration::from_millis(400)).await;
    let mut c = config(&target, 50.0, Duration::from_millis(500));
    c.deadline = Some(Duration::from_millis(50));
    let report = run(c, CancellationToken::new()).await.unwrap();
    assert_accounted(&report);
    assert!(report.sent > 0);
    assert_eq!(report.outcome(Outcome::DeadlineExceeded), report.sent);
    assert_eq!(report.latency_ms.count, 0, "errors stay out of the latency");
    assert!(report.latency_ms.p50.is_none());
    assert!(report.timeline.iter().any(|r| r
        .errors_by
        .get(&Outcome::DeadlineExceeded)
        .is_some_and(|&n| n > 0)));
}

#[tokio::test]
async fn a_dead_target_counts_lost_connections() {
    let target = stand_in(Duration::from_millis(100)).await;
    let c = config(&target, 100.0, Duration::from_secs(1));
    let runner = tokio::spawn(run(c, CancellationToken::new()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    target.kill();
    let report = runner.await.unwrap().unwrap();
    assert_accounted(&report);
    assert!(report.ok() > 10, "{} ok before the kill", report.ok());
    // Those in flight at the kill and every later send.
    assert!(
        report.outcome(Outcome::ConnectionLost) > 40,
        "{}",
        report.outcome(Outcome::ConnectionLost)
    );
}

#[tokio::test]
async fn the_drain_deadline_abandons_what_is_left() {
    let target = stand_in(Duration::from_secs(30)).await;
    let mut c = config(&target, 20.0, Duration::from_millis(300));
    c.drain = Duration::from_millis(200);
    let started = std::time::Instant::now();
    let report = run(c, CancellationToken::new()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_accounted(&report);
    assert!(report.sent > 0);
    assert_eq!(report.outcome(Outcome::Unanswered), report.sent);
    assert_eq!(report.answered, 0);
    // Abandoned calls are cancelled on the wire.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancelled = target
        .stats()
        .cancelled
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(cancelled, report.sent);
}

#[tokio::test]
async fn shutdown_stops_the_schedule_and_still_reports() {
    let target = stand_in(Duration::from_millis(1)).await;
    let c = config(&target, 100.0, Duration::from_secs(30));
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(run(c, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    let report = tokio::time::timeout(Duration::from_secs(3), runner)
        .await
        .expect("run returns soon after shutdown")
        .unwrap()
        .unwrap();
    assert!(report.info.interrupted);
    assert_accounted(&report);
    assert!((40..=60).contains(&report.offered), "{}", report.offered);
    assert_eq!(report.ok(), report.sent);
}

#[tokio::test]
async fn an_unreachable_target_is_a_setup_error() {
    // From the harness's ports below the ephemeral range, which no bind(0) of another test
    // draws from: nothing listens there.
    let addr = tidepool_tests::process::free_addr();
    let c = LoadConfig::new(addr.to_string());
    match run(c, CancellationToken::new()).await {
        Err(Error::Connect { target, .. }) => assert_eq!(target, addr.to_string()),
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn wait_ready_waits_for_pong_or_fails() {
    let target = stand_in(Duration::ZERO).await;
    target.set_ready(false);
    let mut c = config(&target, 10.0, Duration::from_millis(200));
    c.wait_ready = Duration::from_millis(300);
    assert!(matches!(
        run(c.clone(), CancellationToken::new()).await,
        Err(Error::NotReady { .. })
    ));
    target.set_ready(true);
    let report = run(c, CancellationToken::new()).await.unwrap();
    assert_eq!(report.ok(), report.sent);
}

#[tokio::test]
async fn timeline_files_are_written() {
    let target = stand_in(Duration::from_millis(1)).await;
    let report = run(
        config(&target, 50.0, Duration::from_secs(2)),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("timeline.csv");
    let svg = report.write_timeline(&csv).unwrap();
    assert_eq!(svg, dir.path().join("timeline.svg"));
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "t,profile_rate,offered_rate,achieved_rate,p50_ms,p99_ms,errors,skipped,active_workers"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), report.timeline.len());
    assert_eq!(rows[0][0], "0");
    assert_eq!(rows[0][8], "1");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.contains("<polyline") && plot.contains("offered rate"));
}
