//! docker-compose.yml for real, on this machine's docker engine: the image is built from
//! the debug binaries (scripts/docker-image.sh, no registry), two balancers (`balancer`
//! and `balancer-b`) and three workers start, load goes through both balancers, one worker
//! container is killed mid-load, and every request must get exactly one answer, a result
//! (what the killed worker held is retried on another), while both balancers mark the dead
//! worker `unhealthy`. Everything is torn down (`down -v`) by a
//! drop guard, failed or not.
//!
//! It runs as `make compose-up` does, with the admin token and TLS on: certificates from
//! scripts/make-certs.sh, every client connection over TLS trusting that CA, a plaintext
//! client refused on the TLS port, a plaintext HTTP request refused on the admin port (it
//! serves TLS too, and every admin call here is https), and a worker refusing a client
//! without the balancer's certificate (mutual TLS), checked from inside its container.
//! Both balancers see the whole pool: every worker healthy in each one's `/targets`, and
//! each one's `/scaling` counting all of them ready.
//!
//! The load is the protocol [`Client`] on a few connections spread over both balancers
//! (each call ends exactly once: a result, a typed error, or nothing in time, which fails
//! the test), plus a raw-frame [`drive`] on one more connection that counts the answers
//! per id on the wire, so a second answer to one request would be caught too.
//!
//! Without a docker engine the test says so on stderr and passes. It runs in its own
//! compose project (unique name) with ephemeral host ports, and in its own image tag
//! (`tidepool:test`), so it touches neither a `make compose-up` cluster nor its image.
//!
//! The DNS interval is set far beyond the test's length: a killed container vanishes from
//! compose's DNS, and a re-resolution would deregister it before the health checks
//! (1s apart, two failures) mark it unhealthy, which is what this test watches for.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tidepool_protocol::tls::TlsConnector;
use tidepool_protocol::{Client, ClientOptions, Tensor, Tensors};
use tidepool_tests::admin::{wait_answering, wait_targets, Admin};
use tidepool_tests::compose::{
    build_image, compose_program, docker, report, stack, Compose, Down, HostPorts, Stack, INPUT_DIM,
};
use tidepool_tests::drive::{drive, Drive};
use tidepool_tests::tls::connector;
use tidepool_tests::worker::scratch_dir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Worker replicas started.
const WORKERS: usize = 3;
/// Requests per second sent through the balancer with the protocol client.
const RATE: u32 = 200;
/// Requests per second sent as raw frames, every answer counted per id.
const RAW_RATE: u32 = 50;
/// How long load is sent.
const LOAD_FOR: Duration = Duration::from_secs(12);
/// When, after the load started, one worker is killed.
const KILL_AFTER: Duration = Duration::from_secs(4);
/// Client connections, alternately to each balancer; requests take turns.
const CONNECTIONS: usize = 4;
/// A request not answered within this counts as unanswered (the test then fails).
const ANSWER_WITHIN: Duration = Duration::from_secs(20);
/// How long the cluster may take to report every worker healthy.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long the balancer may take to mark the killed worker unhealthy (1s checks, 1s
/// timeout, two failures: about 3s).
const UNHEALTHY_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_survives_a_killed_worker() {
    let Some(program) = compose_program("compose test") else {
        return;
    };
    let started = Instant::now();
    build_image();
    let built = started.elapsed();

    let dir = scratch_dir("compose");
    let Stack {
        compose,
        token,
        certs,
    } = stack(program, "test", &dir, &HostPorts::ephemeral());
    // What a client outside the cluster trusts; the balancer's certificate names 127.0.0.1.
    let tls = connector(&certs.join("ca.pem"), None);
    let cluster = Down(compose.clone());
    compose.run(&["up", "-d", "--scale", &format!("worker={WORKERS}")]);
    let front = compose.port("balancer", 7000);
    let front_b = compose.port("balancer-b", 7000);
    let admins = [
        Admin::new(compose.port("balancer", 7001), &certs, &token),
        Admin::new(compose.port("balancer-b", 7001), &certs, &token),
    ];

    // The admin API listens beyond loopback in its container, over TLS: plaintext HTTP
    // gets no HTTP answer, and /targets needs the token.
    for admin in &admins {
        wait_answering(admin, READY_WITHIN).await;
        let plain = plaintext_http(admin.addr).await;
        assert!(
            !plain.starts_with("HTTP/"),
            "the admin port answered plaintext HTTP: {plain:?}"
        );
        let (status, _, body) = admin.get("/targets", false).await;
        assert_eq!(status, 401, "GET /targets without the token: {body}");
    }
    let mut targets = BTreeMap::new();
    for admin in &admins {
        targets = wait_targets(admin, READY_WITHIN, "every worker healthy", |t| {
            t.len() == WORKERS && t.values().all(|s| s == "healthy")
        })
        .await;
    }
    // Each balancer sees the whole pool (the busy shares that size it come from the
    // workers' own pongs), so either one's `desired` is the pool's. /scaling is the
    // controller's snapshot, taken once a second, so it may lag /targets by that much.
    for admin in &admins {
        wait_scaling(admin, READY_WITHIN, |scaling| {
            scaling["ready"].as_u64() == Some(WORKERS as u64)
        })
        .await;
    }
    let up = started.elapsed();

    // TLS on the client port: a plaintext client gets no answer but an error that says so.
    let plain = plaintext_ping(front).await;
    assert!(
        plain.contains("TLS"),
        "a plaintext client on the TLS port: {plain}"
    );
    // Mutual TLS on the workers: from inside a worker container, a client without the
    // balancer's certificate is refused (the healthcheck, which presents it, passed).
    let refused = {
        let compose = compose.clone();
        tokio::task::spawn_blocking(move || probe_without_client_cert(&compose))
            .await
            .unwrap()
    };
    assert!(
        !refused.status.success(),
        "a worker answered a client without a certificate: {}",
        String::from_utf8_lossy(&refused.stdout)
    );

    // Load on its own tasks; the test kills a worker and watches /targets meanwhile.
    let load = tokio::spawn(send_load([front, front_b], tls.clone()));
    let raw = tokio::spawn(drive(Drive {
        addr: front,
        rate: RAW_RATE,
        stop: tokio_util::sync::CancellationToken::new(),
        max_requests: u64::from(RAW_RATE) * LOAD_FOR.as_secs(),
        input_dim: INPUT_DIM,
        deadline: ANSWER_WITHIN,
        settle: ANSWER_WITHIN,
        tls: Some(tls),
    }));
    tokio::time::sleep(KILL_AFTER).await;
    let victim = {
        let compose = compose.clone();
        tokio::task::spawn_blocking(move || kill_one_worker(&compose))
            .await
            .unwrap()
    };
    assert!(
        targets.contains_key(&victim),
        "killed worker {victim} is not among the targets {targets:?}"
    );
    let mut states = BTreeMap::new();
    for admin in &admins {
        states = wait_targets(admin, UNHEALTHY_WITHIN, "killed worker unhealthy", |t| {
            t.get(&victim).map(String::as_str) == Some("unhealthy")
        })
        .await;
    }
    let tally = load.await.unwrap();
    let raw = raw.await.unwrap();

    let ok = tally.get("ok").copied().unwrap_or(0);
    let sent: u64 = tally.values().sum();
    let expected = u64::from(RATE) * LOAD_FOR.as_secs();
    report(&format!(
        "compose test: image {built:.1?}, cluster up {:.1?}, client: {sent} requests \
         {tally:?}, raw: {} requests {:?}, killed {victim}, targets then {states:?}, \
         total {:.1?}",
        up - built,
        raw.sent,
        raw.outcomes(),
        started.elapsed()
    ));
    raw.assert_exactly_once();
    assert_eq!(raw.sent, u64::from(RAW_RATE) * LOAD_FOR.as_secs());
    assert_eq!(sent, expected, "one outcome per request sent");
    for failure in ["unanswered", "connection_lost", "other"] {
        assert_eq!(
            tally.get(failure),
            None,
            "requests that got no answer from the balancer: {tally:?}"
        );
    }
    // Inference is idempotent: what the killed worker held is retried on another, so the
    // kill costs no request an error (issue 12).
    assert_eq!(
        ok, sent,
        "a request was answered with an error although two of three workers were left: {tally:?}"
    );
    assert_eq!(
        raw.outcomes().get("ok").copied().unwrap_or(0),
        raw.sent,
        "a raw request was answered with an error: {:?}",
        raw.outcomes()
    );
    for (addr, state) in &states {
        if *addr != victim {
            assert_eq!(
                state, "healthy",
                "a surviving worker is not healthy: {states:?}"
            );
        }
    }
    drop(cluster);
}

/// `docker kill`s the first worker container; returns its `ip:7100`, the target address
/// the balancer knows it by.
fn kill_one_worker(compose: &Compose) -> String {
    let ids = compose.containers("worker");
    let id = ids.first().expect("a worker container");
    let ip = docker(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        id,
    ]);
    docker(&["kill", id]);
    format!("{}:7100", ip.trim())
}

/// A `ping` over plain TCP to the TLS port `front`: the error it ends with, as text.
async fn plaintext_ping(front: SocketAddr) -> String {
    let outcome = tokio::time::timeout(ANSWER_WITHIN, async {
        Client::connect(front).await?.ping(ANSWER_WITHIN).await
    })
    .await
    .expect("a plaintext ping on the TLS port ends");
    match outcome {
        Ok(()) => panic!("a plaintext client got a pong from the TLS port"),
        Err(error) => error.to_string(),
    }
}

/// `tidepool-probe ping` inside the first worker container, trusting the CA but with no
/// client certificate: the output of that `docker exec`.
fn probe_without_client_cert(compose: &Compose) -> Output {
    let ids = compose.containers("worker");
    let id = ids.first().expect("a worker container");
    Command::new("docker")
        .args([
            "exec",
            id,
            "tidepool-probe",
            "ping",
            "127.0.0.1:7100",
            "--tls-ca=/run/secrets/ca.pem",
            "--tls-server-name=worker",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run docker exec")
}

/// Sends `RATE` requests a second for `LOAD_FOR` over `CONNECTIONS` TLS client connections
/// (with `tls`), alternately to each of `fronts`, each request on its own task; returns how
/// many ended each way: `ok`, a protocol error code, `connection_lost`, `unanswered`
/// (nothing within `ANSWER_WITHIN`) or `other`.
async fn send_load(fronts: [SocketAddr; 2], tls: TlsConnector) -> BTreeMap<String, u64> {
    let mut clients = Vec::new();
    for n in 0..CONNECTIONS {
        let front = fronts[n % fronts.len()].to_string();
        let client = Client::connect_tls(&front, &tls, ClientOptions::default());
        clients.push(client.await.unwrap());
    }
    let inputs: Tensors = [(
        "input".to_owned(),
        Tensor::from_vec(vec![INPUT_DIM], vec![0.5f32; INPUT_DIM]).unwrap(),
    )]
    .into();
    let total = RATE * u32::try_from(LOAD_FOR.as_secs()).unwrap();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / RATE);
    let mut calls = Vec::new();
    for n in 0..total {
        ticks.tick().await;
        let client = clients[n as usize % CONNECTIONS].clone();
        let inputs = inputs.clone();
        calls.push(tokio::spawn(async move {
            match tokio::time::timeout(ANSWER_WITHIN, client.infer(inputs)).await {
                Err(_) => "unanswered".to_owned(),
                Ok(Ok(_)) => "ok".to_owned(),
                Ok(Err(tidepool_protocol::Error::ConnectionLost { .. })) => {
                    "connection_lost".to_owned()
                }
                Ok(Err(error)) => match error.reply_code() {
                    Some(code) => code,
                    None => "other".to_owned(),
                },
            }
        }));
    }
    let mut tally = BTreeMap::new();
    for call in calls {
        *tally.entry(call.await.unwrap()).or_insert(0) += 1;
    }
    tally
}

/// The protocol error code of an answer from the server, as a string.
trait ReplyCode {
    fn reply_code(&self) -> Option<String>;
}

impl ReplyCode for tidepool_protocol::Error {
    fn reply_code(&self) -> Option<String> {
        use tidepool_protocol::Error as E;
        match self {
            E::BadRequest { .. }
            | E::TooLarge { .. }
            | E::Overloaded { .. }
            | E::DeadlineExceeded { .. }
            | E::Unavailable { .. }
            | E::Cancelled { .. }
            | E::ShuttingDown { .. }
            | E::Internal { .. } => Some(self.code().to_string()),
            _ => None,
        }
    }
}

/// A plaintext `GET /healthz` to `admin`: whatever came back before the connection ended
/// (empty when it was closed at once), as text.
async fn plaintext_http(admin: SocketAddr) -> String {
    let attempt = async {
        let mut stream = TcpStream::connect(admin).await.ok()?;
        let request = format!("GET /healthz HTTP/1.0\r\nHost: {admin}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        Some(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(ANSWER_WITHIN, attempt)
        .await
        .expect("a plaintext request to the TLS admin port ends")
        .unwrap_or_default()
}

/// Polls `GET /scaling` until `done` holds, failing after `within` with the last body.
async fn wait_scaling(
    admin: &Admin,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, _, body) = admin.get("/scaling", false).await;
        assert_eq!(status, 200, "GET /scaling: {body}");
        let scaling: serde_json::Value = serde_json::from_str(&body).unwrap();
        if done(&scaling) {
            return scaling;
        }
        assert!(
            Instant::now() < deadline,
            "waited {within:?} at {} for /scaling; last: {body}",
            admin.addr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
