//! The authenticated control plane: the admin token (401s that change nothing, the token
//! that works, the reads it guards), the refusal to serve the admin API beyond loopback
//! without one, the target rules (the balancer itself, unroutable addresses, the cap,
//! `--register-allow`), re-registering a draining address, and workers registering with
//! the token. Throughout, a bystander client's requests are all answered normally.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidepool_balancer::{AdminToken, Config, TargetState};
use tidepool_tests::balancer::{echoed, fast_config, http_with, inputs, wait_until, TestBalancer};
use tidepool_tests::init_tracing;
use tidepool_tests::process::{
    balancer_args, eventually, free_addr, free_addrs, wait_listening, Proc,
};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::worker::{ort_lib, scratch_dir, TinyModel};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "dGlkZXBvb2wtdGVzdC10b2tlbi0wMTIzNDU2Nzg5YWJjZGVm";

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn with_token(config: Config) -> Config {
    Config {
        admin_token: Some(AdminToken::new(TOKEN).unwrap()),
        ..config
    }
}

async fn stand_in() -> StandIn {
    StandIn::start(StandInConfig::default()).await
}

/// A client that sends one request after another until `stop`, each checked against its
/// echo; returns how many were answered correctly and how many were not.
fn bystander(addr: SocketAddr, stop: CancellationToken) -> JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let client = tidepool_protocol::Client::connect(addr).await.unwrap();
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut value = 0.0f32;
        while !stop.is_cancelled() {
            value += 1.0;
            match client.infer(inputs(value)).await {
                Ok(result) if echoed(&result.outputs) == value => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    })
}

async fn bystander_done(task: JoinHandle<(u64, u64)>, stop: CancellationToken) {
    stop.cancel();
    let (ok, failed) = task.await.unwrap();
    assert!(ok > 0, "the bystander sent nothing");
    assert_eq!(
        failed, 0,
        "bystander: {ok} answered, {failed} not answered normally"
    );
}

fn addrs(lb: &TestBalancer) -> Vec<(SocketAddr, TargetState)> {
    lb.handle
        .targets()
        .iter()
        .map(|t| (t.addr, t.state))
        .collect()
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

#[tokio::test]
async fn requests_without_the_token_get_401_and_change_nothing() {
    init_tracing();
    let (a, b) = (stand_in().await, stand_in().await);
    let lb = TestBalancer::start(with_token(fast_config(&[a.addr()]))).await;
    lb.wait_healthy(1).await;
    let stop = CancellationToken::new();
    let client = bystander(lb.addr, stop.clone());
    let before = addrs(&lb);

    let register = format!(r#"{{"addr": "{}"}}"#, b.addr());
    let wrong = bearer(&TOKEN.replace('d', "e"));
    let twice = bearer(TOKEN);
    let cases: [(&str, Vec<&str>, &str); 6] = [
        ("missing", vec![], r#"Bearer realm="tidepool-admin""#),
        (
            "malformed",
            vec!["Authorization: Basic dXNlcjpwYXNz"],
            "invalid_request",
        ),
        (
            "malformed",
            vec!["Authorization: Bearer"],
            "invalid_request",
        ),
        ("malformed", vec![&twice, &twice], "invalid_request"),
        ("wrong", vec![&wrong], "invalid_token"),
        (
            "wrong",
            vec!["Authorization: Bearer short"],
            "invalid_token",
        ),
    ];
    for (reason, headers, challenge) in &cases {
        let deregister = format!("/targets/{}", a.addr());
        for (method, path, body) in [
            ("POST", "/targets", Some(register.as_str())),
            ("DELETE", deregister.as_str(), None),
            ("GET", "/targets", None),
        ] {
            let (status, head, body) = http_with(lb.admin, method, path, headers, body).await;
            assert_eq!(status, 401, "{reason}: {method} {path}: {body}");
            let head = head.to_ascii_lowercase();
            assert!(
                head.contains("www-authenticate: bearer")
                    && head.contains(&challenge.to_ascii_lowercase()),
                "{reason}: {head}"
            );
            assert!(
                body.contains("admin token") && !body.contains(TOKEN),
                "{body}"
            );
        }
    }
    assert_eq!(addrs(&lb), before, "nothing registered, nothing drained");

    // Probes, Prometheus and KEDA read without a token.
    let (status, _, _) = http_with(lb.admin, "GET", "/healthz", &[], None).await;
    assert_eq!(status, 200);
    let (status, _, metrics) = http_with(lb.admin, "GET", "/metrics", &[], None).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &metrics,
            "tidepool_admin_auth_failures_total{reason=\"missing\"}"
        ),
        3
    );
    assert_eq!(
        metric(
            &metrics,
            "tidepool_admin_auth_failures_total{reason=\"malformed\"}"
        ),
        9
    );
    assert_eq!(
        metric(
            &metrics,
            "tidepool_admin_auth_failures_total{reason=\"wrong\"}"
        ),
        6
    );
    assert_eq!(metric(&metrics, "tidepool_admin_auth_enabled"), 1);
    assert_eq!(metric(&metrics, "tidepool_admin_insecure_no_auth"), 0);
    let (status, _, _) = http_with(lb.admin, "GET", "/scaling", &[], None).await;
    assert_ne!(status, 401);

    // The token works, in any case of the scheme.
    let token = bearer(TOKEN);
    let (status, _, body) =
        http_with(lb.admin, "POST", "/targets", &[&token], Some(&register)).await;
    assert_eq!(status, 201, "{body}");
    let (status, _, body) = http_with(
        lb.admin,
        "GET",
        "/targets",
        &[&format!("authorization: bearer {TOKEN}")],
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains(&b.addr().to_string()), "{body}");
    lb.wait_healthy(2).await;
    let path = format!("/targets/{}", b.addr());
    let (status, _, _) = http_with(lb.admin, "DELETE", &path, &[&token], None).await;
    assert_eq!(status, 202);

    bystander_done(client, stop).await;
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn admin_auth_reads_guards_metrics_and_scaling_but_not_healthz() {
    init_tracing();
    let lb = TestBalancer::start(Config {
        admin_auth_reads: true,
        ..with_token(fast_config(&[]))
    })
    .await;
    for path in ["/metrics", "/scaling"] {
        let (status, _, _) = http_with(lb.admin, "GET", path, &[], None).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _, _) = http_with(lb.admin, "GET", "/metrics", &[&bearer(TOKEN)], None).await;
    assert_eq!(status, 200);
    let (status, _, _) = http_with(lb.admin, "GET", "/healthz", &[], None).await;
    assert_eq!(status, 200);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn target_rules_refuse_the_balancer_itself_the_cap_and_other_networks() {
    init_tracing();
    let a = stand_in().await;
    let lb = TestBalancer::start(Config {
        max_targets: 2,
        register_allow: vec!["127.0.0.1/32".parse().unwrap()],
        ..with_token(fast_config(&[a.addr()]))
    })
    .await;
    lb.wait_healthy(1).await;
    let stop = CancellationToken::new();
    let client = bystander(lb.addr, stop.clone());
    let token = bearer(TOKEN);
    let post = |addr: String| {
        let token = token.clone();
        let admin = lb.admin;
        async move {
            let body = format!(r#"{{"addr": "{addr}"}}"#);
            let (status, _, body) =
                http_with(admin, "POST", "/targets", &[&token], Some(&body)).await;
            (status, body)
        }
    };

    // The balancer's own listeners.
    let (status, body) = post(lb.addr.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("own listen address"), "{body}");
    let (status, body) = post(lb.admin.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("own admin address"), "{body}");
    let (status, body) = post("0.0.0.0:7100".to_owned()).await;
    assert_eq!(status, 400, "{body}");

    // Outside --register-allow.
    let (status, body) = post("127.0.0.2:7100".to_owned()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--register-allow 127.0.0.1/32"), "{body}");

    // The cap: the second target fits, the third does not; the answer says which flag.
    let b = stand_in().await;
    let (status, _) = post(b.addr().to_string()).await;
    assert_eq!(status, 201);
    let c = stand_in().await;
    let (status, body) = post(c.addr().to_string()).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("--max-targets"), "{body}");
    let (status, _) = post(b.addr().to_string()).await;
    assert_eq!(status, 200, "registering again is not adding");
    assert_eq!(lb.handle.targets().len(), 2);

    let (_, _, metrics) = http_with(lb.admin, "GET", "/metrics", &[], None).await;
    assert_eq!(
        metric(
            &metrics,
            "tidepool_target_registrations_refused_total{reason=\"own_address\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &metrics,
            "tidepool_target_registrations_refused_total{reason=\"unroutable\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &metrics,
            "tidepool_target_registrations_refused_total{reason=\"not_allowed\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &metrics,
            "tidepool_target_registrations_refused_total{reason=\"full\"}"
        ),
        1
    );

    // The library's registration passes the same rules.
    assert!(lb.handle.register(lb.addr, 1).is_err());
    bystander_done(client, stop).await;
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn delete_then_post_revives_the_draining_target() {
    init_tracing();
    let a = stand_in().await;
    // b holds each request a while, so that it still has some when it is deregistered.
    let b = StandIn::start(StandInConfig {
        delay: Duration::from_millis(300),
        ..StandInConfig::default()
    })
    .await;
    let lb = TestBalancer::start(with_token(fast_config(&[a.addr(), b.addr()]))).await;
    lb.wait_healthy(2).await;
    let stop = CancellationToken::new();
    let client = bystander(lb.addr, stop.clone());
    let token = bearer(TOKEN);
    let one_entry = |lb: &TestBalancer| {
        let listed: Vec<_> = addrs(lb)
            .into_iter()
            .filter(|(addr, _)| *addr == b.addr())
            .collect();
        assert_eq!(listed.len(), 1, "one entry for b, not two: {listed:?}");
        listed[0].1
    };

    // Requests in flight on b, then DELETE and POST again: the same target comes back.
    let slow = lb.client().await;
    let in_flight: Vec<_> = (0..8)
        .map(|i| {
            let slow = slow.clone();
            tokio::spawn(async move { slow.infer(inputs(100.0 + i as f32)).await })
        })
        .collect();
    lb.wait_for("requests outstanding on b", |h| {
        h.target(b.addr()).is_some_and(|t| t.outstanding > 0)
    })
    .await;
    let path = format!("/targets/{}", b.addr());
    let (status, _, _) = http_with(lb.admin, "DELETE", &path, &[&token], None).await;
    assert_eq!(status, 202);
    assert_eq!(one_entry(&lb), TargetState::Draining);
    let body = format!(r#"{{"addr": "{}"}}"#, b.addr());
    let (status, _, answer) = http_with(lb.admin, "POST", "/targets", &[&token], Some(&body)).await;
    assert_eq!(status, 201, "{answer}");
    assert!(
        answer.contains("\"healthy\""),
        "revived in the state it had: {answer}"
    );
    assert_eq!(one_entry(&lb), TargetState::Healthy);
    for call in in_flight {
        call.await
            .unwrap()
            .expect("requests in flight on the revived target are answered");
    }
    let received = || b.stats().received.load(Ordering::Relaxed);
    let served = received();
    wait_until("b takes new requests", || received() > served).await;

    // Drained to the end (nothing in flight: its connections close at once), then POST:
    // a new target, still one entry.
    b.set_delay(Duration::ZERO);
    let (status, _, _) = http_with(lb.admin, "DELETE", &path, &[&token], None).await;
    assert_eq!(status, 202);
    lb.wait_for("b idle", |h| {
        h.targets()
            .iter()
            .all(|t| t.addr != b.addr() || t.outstanding == 0)
    })
    .await;
    let (status, _, answer) = http_with(lb.admin, "POST", "/targets", &[&token], Some(&body)).await;
    assert_eq!(status, 201, "{answer}");
    one_entry(&lb);
    lb.wait_healthy(2).await;

    bystander_done(client, stop).await;
    lb.stop().await.unwrap();
}

/// The real binary: beyond loopback it starts only with a token or the explicit opt-out.
#[tokio::test]
async fn the_binary_refuses_the_admin_api_beyond_loopback_without_a_token() {
    init_tracing();
    let dir = scratch_dir("admin-auth");
    let [listen, admin] = free_addrs();
    let wildcard = SocketAddr::from(([0, 0, 0, 0], admin.port()));
    let mut args = balancer_args(listen, wildcard);

    let mut refused = Proc::start("refused", "tidepool-balancer", &args, &dir);
    let status = refused
        .wait_exit(Duration::from_secs(20))
        .expect("exits at once");
    assert!(!status.success());
    let log = refused.log();
    for hint in [
        "--admin-token-file",
        "/dev/urandom",
        "--admin-insecure-no-auth",
    ] {
        assert!(log.contains(hint), "{log}");
    }

    let short = dir.join("short.token");
    std::fs::write(&short, "abc\n").unwrap();
    let with_short = [
        args.clone(),
        vec!["--admin-token-file".into(), short.display().to_string()],
    ]
    .concat();
    let mut refused = Proc::start("short", "tidepool-balancer", &with_short, &dir);
    assert!(!refused
        .wait_exit(Duration::from_secs(20))
        .expect("exits at once")
        .success());
    assert!(refused.log().contains("at least 32"), "{}", refused.log());

    let file = dir.join("admin.token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    args.extend(["--admin-token-file".into(), file.display().to_string()]);
    let balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    wait_listening(admin, &balancer).await;
    let target = free_addr();
    let body = format!(r#"{{"addr": "{target}"}}"#);
    let (status, _, _) = http_with(admin, "POST", "/targets", &[], Some(&body)).await;
    assert_eq!(status, 401);
    let (status, _, _) = http_with(admin, "POST", "/targets", &[&bearer(TOKEN)], Some(&body)).await;
    assert_eq!(status, 201);
    assert!(!balancer.log().contains(TOKEN), "the token is never logged");
    drop(balancer);

    let [listen, admin] = free_addrs();
    let wildcard = SocketAddr::from(([0, 0, 0, 0], admin.port()));
    let mut args = balancer_args(listen, wildcard);
    args.push("--admin-insecure-no-auth".into());
    let open = Proc::start("open", "tidepool-balancer", &args, &dir);
    wait_listening(admin, &open).await;
    let (_, _, metrics) = http_with(admin, "GET", "/metrics", &[], None).await;
    assert_eq!(metric(&metrics, "tidepool_admin_insecure_no_auth"), 1);
    assert!(
        open.log().contains("WITHOUT AUTHENTICATION"),
        "{}",
        open.log()
    );
}

/// Real worker processes: the one with the token registers; the one without is refused,
/// says why, and retries with backoff, not in a tight loop.
#[tokio::test]
async fn a_worker_registers_with_the_token_and_one_without_is_refused_and_retries() {
    init_tracing();
    let dir = scratch_dir("register-token");
    let model = TinyModel::default().write();
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let [listen, admin] = free_addrs();
    let mut args = balancer_args(listen, admin);
    args.extend([
        "--admin-token-file".into(),
        token_file.display().to_string(),
    ]);
    let balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    wait_listening(admin, &balancer).await;

    let worker = |name: &str, token: Option<&std::path::Path>| {
        let addr = free_addr();
        let mut args: Vec<String> = [
            "serve",
            "--model",
            &model.display().to_string(),
            "--listen",
            &addr.to_string(),
            "--register",
            &format!("http://{admin}"),
            "--threads",
            "1",
            "--ort-lib",
            &ort_lib().display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(token) = token {
            args.extend(["--register-token-file".into(), token.display().to_string()]);
        }
        (Proc::start(name, "tidepool-worker", &args, &dir), addr)
    };
    let (with, with_addr) = worker("with-token", Some(&token_file));
    let (without, without_addr) = worker("without-token", None);

    let procs = [&balancer, &with, &without];
    eventually(
        Duration::from_secs(60),
        "the worker with the token healthy",
        &procs,
        || async {
            let (_, _, body) = http_with(admin, "GET", "/targets", &[&bearer(TOKEN)], None).await;
            let targets: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
            targets
                .iter()
                .any(|t| t["addr"] == with_addr.to_string() && t["state"] == "healthy")
                .then_some(())
        },
    )
    .await;
    // Refused at least twice: it retries, with its backoff (1 s, then 2 s) in between.
    eventually(
        Duration::from_secs(30),
        "two refused registrations",
        &procs,
        || async {
            let (_, _, metrics) = http_with(admin, "GET", "/metrics", &[], None).await;
            (metric(
                &metrics,
                "tidepool_admin_auth_failures_total{reason=\"missing\"}",
            ) >= 2)
                .then_some(())
        },
    )
    .await;
    let (_, _, metrics) = http_with(admin, "GET", "/metrics", &[], None).await;
    let refusals = metric(
        &metrics,
        "tidepool_admin_auth_failures_total{reason=\"missing\"}",
    );
    assert!(
        refusals <= 10,
        "{refusals} refusals within seconds: a tight loop\n{}",
        without.log()
    );
    let (_, _, body) = http_with(admin, "GET", "/targets", &[&bearer(TOKEN)], None).await;
    assert!(!body.contains(&without_addr.to_string()), "{body}");
    let log = without.log();
    assert!(
        log.contains("refused this worker's registration") && log.contains("admin token"),
        "{log}"
    );
}
