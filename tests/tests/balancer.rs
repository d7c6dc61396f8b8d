//! The balancer against stand-in targets: routing, health, draining, fail-open, overload,
//! lost targets, DNS discovery, the admin API, idle timeout, malformed frames, shutdown.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use tidepool_balancer::{HealthProtocol, RoutingPolicy, TargetState};
use tidepool_protocol::{Error as ProtocolError, ErrorCode, Message};
use tidepool_tests::balancer::{
    echoed, fast_config, frame, http, infer, inputs, wait_until, StaticResolver, TestBalancer,
};
use tidepool_tests::init_tracing;
use tidepool_tests::stand_in::{StandIn, StandInConfig};

const SECOND: Duration = Duration::from_secs(1);

async fn stand_in(delay: Duration) -> StandIn {
    StandIn::start(StandInConfig {
        delay,
        ..StandInConfig::default()
    })
    .await
}

fn error_code(msg: &Message) -> Option<ErrorCode> {
    match msg {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn routes_each_request_and_restores_ids() {
    init_tracing();
    let a = stand_in(Duration::from_millis(2)).await;
    let b = stand_in(Duration::from_millis(2)).await;
    let lb = TestBalancer::start(fast_config(&[a.addr(), b.addr()])).await;
    lb.wait_healthy(2).await;

    let client = lb.client().await;
    let calls = (0..200).map(|i| {
        let client = client.clone();
        async move { (i, client.infer(inputs(i as f32)).await) }
    });
    for (i, answer) in futures::future::join_all(calls).await {
        let result = answer.expect("every request succeeds");
        assert_eq!(
            echoed(&result.outputs),
            i as f32,
            "answer matches its request"
        );
    }
    // One connection, yet both targets served: routing is per request.
    let (ra, rb) = (
        a.stats().received.load(Ordering::Relaxed),
        b.stats().received.load(Ordering::Relaxed),
    );
    assert_eq!(ra + rb, 200);
    assert!(ra > 20 && rb > 20, "load spread: {ra} vs {rb}");
    // The client's address travels with the request.
    let clients = a.stats().clients.lock().unwrap().clone();
    assert!(
        clients.iter().all(|c| c.starts_with("127.0.0.1:")),
        "{clients:?}"
    );
    assert_eq!(lb.handle.outstanding(), 0);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn least_outstanding_avoids_a_slow_target() {
    init_tracing();
    let fast = stand_in(Duration::from_millis(1)).await;
    let slow = stand_in(Duration::from_millis(100)).await;
    for routing in [
        RoutingPolicy::P2c,
        RoutingPolicy::FullScan,
        RoutingPolicy::RoundRobin,
    ] {
        let before = (
            fast.stats().received.load(Ordering::Relaxed),
            slow.stats().received.load(Ordering::Relaxed),
        );
        let lb = TestBalancer::start(tidepool_balancer::Config {
            routing,
            ..fast_config(&[fast.addr(), slow.addr()])
        })
        .await;
        lb.wait_healthy(2).await;
        let client = lb.client().await;
        // 8 at a time, as a steady pipelined client would.
        let answers: Vec<_> = futures::stream::iter(0..300)
            .map(|i| {
                let client = client.clone();
                async move { client.infer(inputs(i as f32)).await }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        assert!(answers.iter().all(|a| a.is_ok()));
        let to_slow = slow.stats().received.load(Ordering::Relaxed) - before.1;
        let to_fast = fast.stats().received.load(Ordering::Relaxed) - before.0;
        match routing {
            RoutingPolicy::RoundRobin => assert!(to_slow >= 100, "round-robin: {to_slow}"),
            _ => assert!(
                to_slow * 5 < to_fast,
                "{routing:?}: slow {to_slow}, fast {to_fast}"
            ),
        }
        lb.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_new_target_joins_after_fast_start_up_checks_while_a_bystander_is_served() {
    init_tracing();
    let a = stand_in(Duration::from_millis(1)).await;
    let b = stand_in(Duration::from_millis(1)).await;
    // Checked every 5 s once healthy: two passes at the interval would take 10 s.
    let lb = TestBalancer::start(tidepool_balancer::Config {
        health_interval: 5 * SECOND,
        health_timeout: SECOND,
        ..fast_config(&[a.addr()])
    })
    .await;
    lb.wait_healthy(1).await;

    // A bystander's requests all the while, each answered with its own echo.
    let client = lb.client().await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bystander = tokio::spawn({
        let done = Arc::clone(&done);
        async move {
            let mut answered = 0u32;
            while !done.load(Ordering::Relaxed) {
                let result = client
                    .infer(inputs(answered as f32))
                    .await
                    .expect("every bystander request is answered");
                assert_eq!(echoed(&result.outputs), answered as f32);
                answered += 1;
            }
            answered
        }
    });

    let registered = tokio::time::Instant::now();
    lb.handle.register(b.addr(), 1).unwrap();
    lb.wait_healthy(2).await;
    let took = registered.elapsed();
    assert!(
        took < 5 * SECOND,
        "healthy after {took:?}: start-up checks, not two 5 s intervals"
    );
    // Healthy, it is checked at the interval again: no more fast checks.
    let pings = b.stats().pings.load(Ordering::Relaxed);
    tokio::time::sleep(SECOND).await;
    assert!(b.stats().pings.load(Ordering::Relaxed) <= pings + 1);

    // And it serves: the bystander's requests reach it too.
    wait_until("the new target serves", || {
        b.stats().received.load(Ordering::Relaxed) > 0
    })
    .await;

    done.store(true, Ordering::Relaxed);
    assert!(bystander.await.unwrap() > 0);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn health_moves_at_each_threshold() {
    init_tracing();
    let target = stand_in(Duration::ZERO).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        healthy_threshold: 3,
        unhealthy_threshold: 2,
        fail_open: false,
        ..fast_config(&[target.addr()])
    })
    .await;
    let addr = target.addr();
    let state = |lb: &TestBalancer| lb.handle.target(addr).map(|t| t.state);

    // initial → healthy after 3 passed pings, not fewer.
    assert_eq!(state(&lb), Some(TargetState::Initial));
    lb.wait_healthy(1).await;
    assert!(target.stats().pings.load(Ordering::Relaxed) >= 3);

    // healthy → unhealthy after 2 failed checks.
    target.set_ready(false);
    let pings_at_failure = target.stats().pings.load(Ordering::Relaxed);
    lb.wait_for("unhealthy", |h| {
        h.target(addr).unwrap().state == TargetState::Unhealthy
    })
    .await;
    assert!(target.stats().pings.load(Ordering::Relaxed) >= pings_at_failure + 2);
    // Without fail-open, an unhealthy pool answers unavailable.
    let err = lb.client().await.infer(inputs(1.0)).await.unwrap_err();
    assert!(matches!(err, ProtocolError::Unavailable { .. }), "{err}");

    // unhealthy → healthy after 3 passes.
    target.set_ready(true);
    let pings_at_recovery = target.stats().pings.load(Ordering::Relaxed);
    lb.wait_healthy(1).await;
    assert!(target.stats().pings.load(Ordering::Relaxed) >= pings_at_recovery + 3);
    lb.client().await.infer(inputs(1.0)).await.unwrap();
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn tcp_health_checks_see_a_dead_target() {
    init_tracing();
    let target = stand_in(Duration::ZERO).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        health_protocol: HealthProtocol::Tcp,
        ..fast_config(&[target.addr()])
    })
    .await;
    lb.wait_healthy(1).await;
    // Passing TCP checks need no ping.
    assert_eq!(target.stats().pings.load(Ordering::Relaxed), 0);
    target.kill();
    let addr = target.addr();
    lb.wait_for("unhealthy", |h| {
        h.target(addr).unwrap().state == TargetState::Unhealthy
    })
    .await;
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn fail_open_routes_to_unhealthy_targets() {
    init_tracing();
    let target = StandIn::start(StandInConfig {
        ready: false,
        ..StandInConfig::default()
    })
    .await;
    let addr = target.addr();
    let lb = TestBalancer::start(fast_config(&[addr])).await;
    lb.wait_for("unhealthy", |h| {
        h.target(addr).unwrap().state == TargetState::Unhealthy
    })
    .await;
    // No healthy target: fail-open sends to every registered one.
    let result = lb.client().await.infer(inputs(7.0)).await.unwrap();
    assert_eq!(echoed(&result.outputs), 7.0);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn draining_lets_in_flight_requests_finish_within_the_delay() {
    init_tracing();
    let a = stand_in(Duration::from_millis(300)).await;
    let b = stand_in(Duration::ZERO).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        deregistration_delay: SECOND,
        ..fast_config(&[a.addr()])
    })
    .await;
    lb.wait_healthy(1).await;
    let client = lb.client().await;
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.infer(inputs(1.0)).await }
    });
    lb.wait_for("one outstanding", |h| h.outstanding() == 1)
        .await;
    assert!(lb.handle.register(b.addr(), 1).unwrap());
    assert!(lb.handle.deregister(a.addr()));
    let draining = lb.handle.targets();
    assert!(draining
        .iter()
        .any(|t| t.addr == a.addr() && t.state == TargetState::Draining));
    lb.wait_healthy(1).await;
    // New requests go elsewhere; the one in flight finishes.
    client.infer(inputs(2.0)).await.unwrap();
    assert_eq!(b.stats().received.load(Ordering::Relaxed), 1);
    assert_eq!(echoed(&slow.await.unwrap().unwrap().outputs), 1.0);
    let gone = a.addr();
    lb.wait_for("drained target gone", |h| {
        h.targets().iter().all(|t| t.addr != gone)
    })
    .await;
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn draining_answers_unavailable_at_the_end_of_the_delay() {
    init_tracing();
    let target = stand_in(Duration::from_secs(5)).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        deregistration_delay: Duration::from_millis(300),
        ..fast_config(&[target.addr()])
    })
    .await;
    lb.wait_healthy(1).await;
    let client = lb.client().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.infer(inputs(1.0)).await }
    });
    lb.wait_for("one outstanding", |h| h.outstanding() == 1)
        .await;
    let started = tokio::time::Instant::now();
    assert!(lb.handle.deregister(target.addr()));
    let err = call.await.unwrap().unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, ProtocolError::Unavailable { .. }), "{err}");
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    lb.wait_for("no target", |h| h.targets().is_empty()).await;
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn overload_queues_then_answers_overloaded() {
    init_tracing();
    let target = stand_in(Duration::from_millis(600)).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        max_outstanding: Some(1),
        queue: 2,
        queue_timeout: Duration::from_millis(200),
        ..fast_config(&[target.addr()])
    })
    .await;
    lb.wait_healthy(1).await;
    let mut raw = lb.raw().await;
    raw.send(infer(1, 1.0)).await;
    lb.wait_for("one outstanding", |h| h.outstanding() == 1)
        .await;
    for id in 2..=5 {
        raw.send(infer(id, id as f32)).await;
    }
    let mut answers = HashMap::new();
    // Two past the queue's bound are refused at once; two wait and time out.
    for _ in 0..2 {
        let msg = raw.recv(SECOND).await.unwrap();
        answers.insert(msg.id(), msg);
    }
    assert_eq!(lb.handle.queue_len(), 2);
    for _ in 0..3 {
        let msg = raw.recv(2 * SECOND).await.unwrap();
        answers.insert(msg.id(), msg);
    }
    assert!(matches!(answers[&1], Message::Result(_)));
    for id in 2..=5 {
        let Message::Error(e) = &answers[&id] else {
            panic!("request {id} should be refused: {:?}", answers[&id]);
        };
        assert_eq!(e.code, ErrorCode::Overloaded);
        assert!(e.retry_after_ms.is_some());
    }
    assert_eq!(lb.handle.queue_len(), 0);
    let metrics = lb.handle.metrics_text();
    assert!(
        metrics.contains("tidepool_rejected_total{reason=\"queue_full\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tidepool_rejected_total{reason=\"queue_timeout\"} 2"),
        "{metrics}"
    );
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn queued_requests_run_as_capacity_frees() {
    init_tracing();
    let target = stand_in(Duration::from_millis(20)).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        max_outstanding: Some(2),
        queue: 100,
        queue_timeout: 5 * SECOND,
        ..fast_config(&[target.addr()])
    })
    .await;
    lb.wait_healthy(1).await;
    let client = lb.client().await;
    let calls = (0..20).map(|i| {
        let client = client.clone();
        async move { client.infer(inputs(i as f32)).await }
    });
    let answers = futures::future::join_all(calls).await;
    assert!(answers.iter().all(|a| a.is_ok()));
    assert!(target.stats().max_in_flight.load(Ordering::Relaxed) <= 2);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn a_killed_target_costs_each_request_exactly_one_answer() {
    init_tracing();
    let doomed = stand_in(Duration::from_millis(300)).await;
    let survivor = stand_in(Duration::from_millis(5)).await;
    let lb = TestBalancer::start(fast_config(&[doomed.addr(), survivor.addr()])).await;
    lb.wait_healthy(2).await;
    let mut raw = lb.raw().await;
    let n = 200u64;
    for id in 1..=n {
        raw.send(infer(id, id as f32)).await;
    }
    lb.wait_for("some on the doomed target", |_| {
        doomed.stats().in_flight.load(Ordering::Relaxed) > 0
    })
    .await;
    doomed.kill();
    let seen = raw.answers(n as usize).await;
    let mut ok = 0;
    for (id, msg) in &seen {
        match msg {
            Message::Result(r) => {
                assert_eq!(echoed(&r.outputs), *id as f32);
                ok += 1;
            }
            Message::Error(e) => assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        ok >= 100,
        "the survivor's share and re-routed ones succeed: {ok}"
    );
    assert_eq!(lb.handle.outstanding(), 0);
    let metrics = lb.handle.metrics_text();
    assert!(
        !metrics.contains("tidepool_tcp_target_reset_count 0"),
        "{metrics}"
    );
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_follows_the_request_to_its_target() {
    init_tracing();
    let target = stand_in(Duration::from_secs(10)).await;
    let lb = TestBalancer::start(fast_config(&[target.addr()])).await;
    lb.wait_healthy(1).await;
    let mut raw = lb.raw().await;
    raw.send(infer(42, 1.0)).await;
    lb.wait_for("in flight", |_| {
        target.stats().in_flight.load(Ordering::Relaxed) == 1
    })
    .await;
    raw.send(Message::Cancel { id: 42 }).await;
    let answer = raw.recv(2 * SECOND).await.unwrap();
    assert_eq!(answer.id(), 42);
    assert_eq!(error_code(&answer), Some(ErrorCode::Cancelled));
    assert_eq!(target.stats().cancelled.load(Ordering::Relaxed), 1);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn dns_names_add_and_remove_targets() {
    init_tracing();
    let (a, b, c) = (
        stand_in(Duration::ZERO).await,
        stand_in(Duration::ZERO).await,
        stand_in(Duration::ZERO).await,
    );
    let resolver = Arc::new(StaticResolver::default());
    resolver.set("workers:7000", &[a.addr(), b.addr()]);
    let lb = TestBalancer::start_with(
        tidepool_balancer::Config {
            target_dns: vec!["workers:7000".to_owned()],
            deregistration_delay: Duration::from_millis(100),
            ..fast_config(&[])
        },
        resolver.clone(),
    )
    .await;
    let addrs = |lb: &TestBalancer| {
        let mut v: Vec<_> = lb.handle.targets().iter().map(|t| t.addr).collect();
        v.sort();
        v
    };
    lb.wait_healthy(2).await;
    let mut want = vec![a.addr(), b.addr()];
    want.sort();
    assert_eq!(addrs(&lb), want);

    // A failed lookup keeps what was there.
    resolver.fail("workers:7000");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(addrs(&lb), want);

    resolver.set("workers:7000", &[b.addr(), c.addr()]);
    let mut want = vec![b.addr(), c.addr()];
    want.sort();
    wait_until("a gone, c registered", || addrs(&lb) == want).await;
    lb.wait_healthy(2).await;
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn admin_api_lists_registers_deregisters_and_reports() {
    init_tracing();
    let a = stand_in(Duration::ZERO).await;
    let b = stand_in(Duration::ZERO).await;
    let lb = TestBalancer::start(fast_config(&[a.addr()])).await;
    lb.wait_healthy(1).await;

    let (status, body) = http(lb.admin, "GET", "/healthz", None).await;
    assert_eq!((status, body.trim()), (200, "ok"));

    let (status, body) = http(lb.admin, "GET", "/targets", None).await;
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["addr"], a.addr().to_string());
    assert_eq!(list[0]["state"], "healthy");
    assert_eq!(list[0]["outstanding"], 0);
    assert!(list[0]["since"].as_str().unwrap().ends_with('Z'));

    let register = format!(r#"{{"addr": "{}", "weight": 2}}"#, b.addr());
    let (status, body) = http(lb.admin, "POST", "/targets", Some(&register)).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = http(lb.admin, "POST", "/targets", Some(&register)).await;
    assert_eq!(status, 200, "registering again changes nothing");
    let (status, _) = http(lb.admin, "POST", "/targets", Some(r#"{"addr": "nowhere"}"#)).await;
    assert_eq!(status, 400);
    lb.wait_healthy(2).await;
    assert_eq!(lb.handle.target(b.addr()).unwrap().weight, 2);

    lb.client().await.infer(inputs(1.0)).await.unwrap();
    let (status, metrics) = http(lb.admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for name in [
        "tidepool_active_flow_count",
        "tidepool_new_flow_count 1",
        "tidepool_processed_bytes",
        "tidepool_healthy_host_count 2",
        "tidepool_unhealthy_host_count 0",
        "tidepool_tcp_target_reset_count 0",
        "tidepool_rejected_total{reason=\"queue_full\"} 0",
        "tidepool_routed_total{target=",
        "tidepool_target_outstanding{target=",
        "tidepool_queue_wait_seconds_bucket",
        "tidepool_request_duration_seconds_count{target=",
        "tidepool_queue_length 0",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }

    let (status, _) = http(lb.admin, "DELETE", &format!("/targets/{}", a.addr()), None).await;
    assert_eq!(status, 202);
    let (status, _) = http(lb.admin, "DELETE", &format!("/targets/{}", a.addr()), None).await;
    assert_eq!(status, 404, "already deregistered");
    let (status, _) = http(lb.admin, "DELETE", "/targets/not-an-address", None).await;
    assert_eq!(status, 400);
    // A name is resolved, as POST resolves it: b was registered as an address.
    let by_name = format!("/targets/localhost:{}", b.addr().port());
    let (status, body) = http(lb.admin, "DELETE", &by_name, None).await;
    assert_eq!(status, 202, "{body}");
    let gone = a.addr();
    lb.wait_for("a drained", |h| h.targets().iter().all(|t| t.addr != gone))
        .await;

    lb.begin_shutdown();
    wait_until("healthz turns 503", || true).await;
    lb.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_connections_close_after_the_idle_timeout() {
    init_tracing();
    let lb = TestBalancer::start(fast_config(&[])).await;
    let started = tokio::time::Instant::now();
    let mut quiet = lb.raw().await;
    let mut chatty = lb.raw().await;
    // The chatty one pings every 100 s; the quiet one says nothing.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(100)).await;
        chatty.send(Message::Ping { id: 1 }).await;
        assert_eq!(chatty.recv(SECOND).await.unwrap().id(), 1);
    }
    assert!(
        quiet.recv(Duration::from_secs(3600)).await.is_none(),
        "closed"
    );
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_secs(350) && idle < Duration::from_secs(400),
        "{idle:?}"
    );
    chatty.send(Message::Ping { id: 2 }).await;
    assert_eq!(chatty.recv(SECOND).await.unwrap().id(), 2, "still open");
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_frames_cost_only_their_connection() {
    init_tracing();
    let target = stand_in(Duration::ZERO).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        max_frame: 1024,
        ..fast_config(&[target.addr()])
    })
    .await;
    lb.wait_healthy(1).await;
    let bystander = lb.client().await;

    // A body that is not MessagePack: answered, the connection goes on.
    let mut raw = lb.raw().await;
    raw.send_bytes(&frame(b"\xc1 not msgpack")).await;
    let answer = raw.recv(SECOND).await.unwrap();
    assert_eq!(error_code(&answer), Some(ErrorCode::BadRequest));
    // A known id with a bad field is answered under that id.
    raw.send(Message::pong(9)).await;
    let answer = raw.recv(SECOND).await.unwrap();
    assert_eq!(
        (answer.id(), error_code(&answer)),
        (9, Some(ErrorCode::BadRequest))
    );
    raw.send(infer(3, 3.0)).await;
    assert!(matches!(
        raw.recv(SECOND).await.unwrap(),
        Message::Result(_)
    ));

    // A frame of length 0 loses the framing: error under id 0, then close.
    raw.send_bytes(&[0, 0, 0, 0]).await;
    let answer = raw.recv(SECOND).await.unwrap();
    assert_eq!(
        (answer.id(), error_code(&answer)),
        (0, Some(ErrorCode::BadRequest))
    );
    assert!(raw.recv(SECOND).await.is_none(), "connection closed");

    // Too large: too_large under id 0, then close.
    let mut raw = lb.raw().await;
    raw.send_bytes(&(1u32 << 20).to_be_bytes()).await;
    let answer = raw.recv(SECOND).await.unwrap();
    assert_eq!(
        (answer.id(), error_code(&answer)),
        (0, Some(ErrorCode::TooLarge))
    );
    assert!(raw.recv(SECOND).await.is_none(), "connection closed");

    // Everyone else is unaffected.
    bystander.infer(inputs(5.0)).await.unwrap();
    assert!(target.stats().received.load(Ordering::Relaxed) >= 2);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    init_tracing();
    let target = stand_in(Duration::from_millis(300)).await;
    let lb = TestBalancer::start(fast_config(&[target.addr()])).await;
    lb.wait_healthy(1).await;
    let client = lb.client().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.infer(inputs(4.0)).await }
    });
    lb.wait_for("in flight", |h| h.outstanding() == 1).await;
    let addr = lb.addr;
    lb.stop().await.unwrap();
    assert_eq!(echoed(&call.await.unwrap().unwrap().outputs), 4.0);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn shutdown_answers_shutting_down_past_the_drain_timeout() {
    init_tracing();
    let target = stand_in(Duration::from_secs(10)).await;
    let lb = TestBalancer::start(tidepool_balancer::Config {
        drain_timeout: Duration::from_millis(200),
        ..fast_config(&[target.addr()])
    })
    .await;
    lb.wait_healthy(1).await;
    let mut raw = lb.raw().await;
    raw.send(infer(1, 1.0)).await;
    lb.wait_for("in flight", |h| h.outstanding() == 1).await;
    let started = tokio::time::Instant::now();
    lb.begin_shutdown();
    let answer = raw.recv(3 * SECOND).await.unwrap();
    assert_eq!(error_code(&answer), Some(ErrorCode::ShuttingDown));
    assert!(started.elapsed() >= Duration::from_millis(190));
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn deadline_budget_shrinks_by_the_time_spent_in_the_balancer() {
    init_tracing();
    let target = stand_in(Duration::from_millis(10)).await;
    let lb = TestBalancer::start(fast_config(&[target.addr()])).await;
    lb.wait_healthy(1).await;
    let client = lb.client().await;
    let result = client
        .infer_with(
            inputs(1.0),
            tidepool_protocol::CallOptions {
                deadline: Some(SECOND),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(echoed(&result.outputs), 1.0);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn metadata_is_answered_from_a_healthy_worker() {
    use tidepool_tests::worker::{scratch_dir, start_worker, worker_config};
    use tidepool_worker::test_support::{write_test_model, TestModel};
    init_tracing();
    let path = scratch_dir("classifier").join("classifier.onnx");
    write_test_model(TestModel::Classifier, &path);
    let worker = start_worker(worker_config(&path)).await;

    // Before any target is healthy: unavailable, saying so.
    let empty = TestBalancer::start(fast_config(&[])).await;
    let err = empty
        .client()
        .await
        .metadata(Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(err.to_string().contains("no healthy target"), "{err}");
    empty.stop().await.unwrap();

    let balancer = TestBalancer::start(fast_config(&[worker.local_addr()])).await;
    balancer.wait_healthy(1).await;
    let model = balancer
        .client()
        .await
        .metadata(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(model.name, "classifier");
    let outputs: Vec<(&str, Vec<i64>)> = model
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.shape.clone()))
        .collect();
    assert_eq!(
        outputs,
        vec![("probabilities", vec![4]), ("label", vec![])],
        "a class label has no dimension left per item"
    );
    assert!(model.padding.is_none(), "fixed shapes need no padding");
    balancer.stop().await.unwrap();
    worker.shutdown().await.unwrap();
}
