//! TLS everywhere, with the real binaries: a client → TLS balancer → mutual-TLS worker
//! cluster (registration over https, health checks over TLS), bad clients that cost only
//! their own connection while a bystander is answered throughout, and certificate
//! rotation without a dropped request.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::{Client, ClientOptions, Tensor, Tensors};
use tidepool_tests::balancer::{echoed, http, inputs};
use tidepool_tests::process::{
    balancer_args, eventually, free_addr, free_addrs, wait_listening, Proc,
};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tidepool_tests::tls::{client, connector, https, Leaf, Pki};
use tidepool_tests::worker::{direct_run, ort_lib, scratch_dir, TinyModel};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const INPUT_DIM: usize = 16;

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn item(seed: usize) -> Vec<f32> {
    (0..INPUT_DIM)
        .map(|i| ((seed * 31 + i * 7) % 13) as f32 / 13.0 - 0.5)
        .collect()
}

fn model_inputs(values: &[f32]) -> Tensors {
    let mut t = Tensors::new();
    t.insert(
        "input".to_owned(),
        Tensor::from_vec(vec![INPUT_DIM], values.to_vec()).unwrap(),
    );
    t
}

/// Requests sent one after another on one connection until stopped; every answer must
/// be a result.
struct Bystander {
    ok: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Bystander {
    fn start(client: Client, request: impl Fn(u64) -> Tensors + Send + 'static) -> Bystander {
        let (ok, stop) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
        let task = tokio::spawn({
            let (ok, stop) = (Arc::clone(&ok), stop.clone());
            async move {
                let mut n = 0;
                while !stop.is_cancelled() {
                    n += 1;
                    client
                        .infer(request(n))
                        .await
                        .map_err(|e| format!("bystander request {n}: {e}"))?;
                    ok.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }
        });
        Bystander { ok, stop, task }
    }

    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops it; panics if any request failed.
    async fn finish(self) -> u64 {
        self.stop.cancel();
        let answered = Arc::clone(&self.ok);
        self.task.await.unwrap().unwrap();
        answered.load(Ordering::Relaxed)
    }
}

/// True when the connection is closed by the other side within 10 s (a stalled
/// handshake must end).
async fn closed_by_peer(mut tcp: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Anything the server sent (an alert) before closing.
            Ok(Ok(_)) => {}
        }
    }
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_everywhere_answers_as_plaintext_and_bad_clients_cost_only_their_connection() {
    let dir = scratch_dir("tls-cluster");
    let pki = Pki::new("cluster");
    let stranger = Pki::new("stranger");
    let front = pki.leaf("balancer", &["localhost", "127.0.0.1"]);
    let worker_cert = pki.leaf("worker", &["worker.test"]);
    let balancer_id = pki.leaf("balancer-client", &["balancer"]);
    let expired_id = pki.expired("expired-client", &["balancer"]);
    let model = TinyModel {
        input_dim: INPUT_DIM,
        ..TinyModel::default()
    }
    .write();

    // A balancer with TLS on every side.
    let [listen, admin] = free_addrs();
    let mut args = balancer_args(listen, admin);
    args.extend(
        [
            "--tls-cert",
            &path(&front.cert),
            "--tls-key",
            &path(&front.key),
            "--admin-tls-cert",
            &path(&front.cert),
            "--admin-tls-key",
            &path(&front.key),
            "--upstream-tls-ca",
            &path(&pki.ca()),
            "--upstream-tls-server-name",
            "worker.test",
            "--upstream-tls-cert",
            &path(&balancer_id.cert),
            "--upstream-tls-key",
            &path(&balancer_id.key),
            "--tls-handshake-timeout",
            "1s",
        ]
        .map(String::from),
    );
    let balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);

    // A worker that admits only clients with a certificate from the CA, and registers
    // over https.
    let (worker_addr, worker_metrics) = (free_addr(), free_addr());
    let worker_args = [
        "serve",
        "--model",
        &path(&model),
        "--listen",
        &worker_addr.to_string(),
        "--metrics",
        &worker_metrics.to_string(),
        "--register",
        &format!("https://{admin}"),
        "--register-tls-ca",
        &path(&pki.ca()),
        "--tls-cert",
        &path(&worker_cert.cert),
        "--tls-key",
        &path(&worker_cert.key),
        "--tls-client-ca",
        &path(&pki.ca()),
        "--tls-handshake-timeout",
        "1s",
        "--threads",
        "1",
        "--ort-lib",
        &path(&ort_lib()),
    ]
    .map(String::from);
    let worker = Proc::start("worker", "tidepool-worker", &worker_args, &dir);
    wait_listening(admin, &balancer).await;
    eventually(
        Duration::from_secs(30),
        "the worker registered over https and healthy through mutual TLS",
        &[&balancer, &worker],
        || async {
            let (_, body) = https(admin, &pki.ca(), "GET", "/targets", None).await;
            body.contains("\"healthy\"").then_some(())
        },
    )
    .await;

    // The bystander, over TLS, throughout.
    let trusted = connector(&pki.ca(), None);
    let bystander = Bystander::start(client(listen, &trusted).await.unwrap(), |n| {
        model_inputs(&item(n as usize))
    });

    // TLS answers equal ONNX Runtime's own, and a plaintext balancer's in front of the
    // same worker.
    let [plain_listen, plain_admin] = free_addrs();
    let mut plain_args = balancer_args(plain_listen, plain_admin);
    plain_args.extend(
        [
            "--target",
            &worker_addr.to_string(),
            "--upstream-tls-ca",
            &path(&pki.ca()),
            "--upstream-tls-server-name",
            "worker.test",
            "--upstream-tls-cert",
            &path(&balancer_id.cert),
            "--upstream-tls-key",
            &path(&balancer_id.key),
        ]
        .map(String::from),
    );
    let plain = Proc::start("plain-balancer", "tidepool-balancer", &plain_args, &dir);
    wait_listening(plain_admin, &plain).await;
    eventually(
        Duration::from_secs(30),
        "the plaintext balancer's target healthy",
        &[&plain, &worker],
        || async {
            let (_, body) = http(plain_admin, "GET", "/targets", None).await;
            body.contains("\"healthy\"").then_some(())
        },
    )
    .await;
    let plain_client = Client::connect(plain_listen).await.unwrap();
    let tls_client = client(listen, &trusted).await.unwrap();
    for seed in 0..4 {
        let values = item(seed);
        let over_tls = tls_client.infer(model_inputs(&values)).await.unwrap();
        let over_plain = plain_client.infer(model_inputs(&values)).await.unwrap();
        let tls_out = over_tls.outputs["output"].to_vec::<f32>().unwrap();
        assert_eq!(
            tls_out,
            over_plain.outputs["output"].to_vec::<f32>().unwrap()
        );
        let direct = direct_run(&model, &values);
        for (a, b) in tls_out.iter().zip(&direct) {
            assert!((a - b).abs() < 1e-5, "{tls_out:?} vs {direct:?}");
        }
    }

    // A plaintext client on the TLS listener.
    let refused = match Client::connect(listen).await {
        Ok(c) => c.ping(Duration::from_secs(5)).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext client was answered by a TLS listener");
    // A TLS client on a plaintext listener.
    let err = client(plain_listen, &trusted)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS handshake"), "{err}");
    // A client that does not trust the balancer's certificate.
    let err = client(listen, &connector(&stranger.ca(), None))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid peer certificate"), "{err}");
    // A handshake that stalls ends with the handshake timeout.
    let stalled = TcpStream::connect(listen).await.unwrap();
    assert!(
        closed_by_peer(stalled).await,
        "a stalled handshake was never closed"
    );
    // The worker refuses a client without a certificate, and one with an expired one.
    for identity in [None, Some(&expired_id)] {
        let c = connector(&pki.ca(), identity);
        let tcp = TcpStream::connect(worker_addr).await.unwrap();
        let refused = match c.connect(tcp, "worker.test").await {
            Err(_) => true,
            // TLS 1.3: the client learns of the refusal on its first read.
            Ok(stream) => {
                let (read, write) = stream.into_split();
                let direct = Client::from_parts(
                    worker_addr.to_string(),
                    read,
                    write,
                    ClientOptions::default(),
                );
                direct.ping(Duration::from_secs(5)).await.is_err()
            }
        };
        assert!(
            refused,
            "the worker answered a client with certificate {identity:?}"
        );
    }
    eventually(
        Duration::from_secs(10),
        "the worker's refusals logged",
        &[&worker],
        || async { worker.log().contains("TLS handshake failed").then_some(()) },
    )
    .await;

    // Each bad connection was counted; the bystander never noticed.
    let (_, metrics) = https(admin, &pki.ca(), "GET", "/metrics", None).await;
    let client_failures = metric(
        &metrics,
        "tidepool_tls_handshake_failures_total{side=\"client\"}",
    );
    assert!(client_failures >= 3, "{client_failures}\n{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "tidepool_tls_handshake_failures_total{side=\"upstream\"}"
        ),
        0
    );
    let (_, worker_text) = http(worker_metrics, "GET", "/metrics", None).await;
    assert!(metric(&worker_text, "tidepool_worker_tls_handshake_failures_total") >= 2);
    assert!(balancer.log().contains("TLS handshake failed"));
    let before = bystander.answered();
    eventually(
        Duration::from_secs(10),
        "the bystander still answered",
        &[&balancer, &worker],
        || async { (bystander.answered() > before).then_some(()) },
    )
    .await;
    assert!(bystander.finish().await > 0);
}

/// Writes `leaf`'s certificate and key over the files the balancer was started with.
fn install(leaf: &Leaf, at: &Leaf) {
    // The key first: a poll in between sees a mismatched pair and keeps the old one.
    std::fs::copy(&leaf.key, &at.key).unwrap();
    std::fs::copy(&leaf.cert, &at.cert).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_serve_new_handshakes_without_dropping_a_request() {
    let dir = scratch_dir("tls-rotation");
    let (old_ca, new_ca) = (Pki::new("old"), Pki::new("new"));
    let old = old_ca.leaf("old", &["127.0.0.1"]);
    let new = new_ca.leaf("new", &["127.0.0.1"]);
    // The files the balancer reads: a copy, so that rotation can overwrite them.
    let live = Leaf {
        cert: dir.join("live.pem"),
        key: dir.join("live.key"),
    };
    install(&old, &live);
    let target = StandIn::start(StandInConfig::default()).await;

    let [listen, admin] = free_addrs();
    let mut args = balancer_args(listen, admin);
    args.extend(
        [
            "--target",
            &target.addr().to_string(),
            "--tls-cert",
            &path(&live.cert),
            "--tls-key",
            &path(&live.key),
            "--tls-reload-interval",
            "200ms",
        ]
        .map(String::from),
    );
    let balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
    wait_listening(admin, &balancer).await;
    let (trusts_old, trusts_new) = (connector(&old_ca.ca(), None), connector(&new_ca.ca(), None));
    let first = eventually(
        Duration::from_secs(30),
        "the balancer serving over TLS",
        &[&balancer],
        || async {
            let c = client(listen, &trusts_old).await.ok()?;
            c.ping(Duration::from_secs(1)).await.ok().map(|()| c)
        },
    )
    .await;
    let bystander = Bystander::start(first, |n| inputs(n as f32));

    // SIGHUP: new handshakes get the new certificate.
    install(&new, &live);
    balancer.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "new handshakes with the new certificate",
        &[&balancer],
        || async { client(listen, &trusts_new).await.ok().map(drop) },
    )
    .await;
    let err = client(listen, &trusts_old).await.unwrap_err().to_string();
    assert!(err.contains("invalid peer certificate"), "{err}");

    // No signal: the poll notices the files changed.
    install(&old, &live);
    let again = eventually(
        Duration::from_secs(10),
        "the poll reloading the old certificate",
        &[&balancer],
        || async { client(listen, &trusts_old).await.ok() },
    )
    .await;
    assert_eq!(
        echoed(&again.infer(inputs(7.0)).await.unwrap().outputs),
        7.0
    );

    // The bystander's connection, opened before both rotations, never failed a request.
    let before = bystander.answered();
    eventually(
        Duration::from_secs(10),
        "the bystander still answered",
        &[&balancer],
        || async { (bystander.answered() > before).then_some(()) },
    )
    .await;
    bystander.finish().await;
    assert!(balancer.log().contains("TLS certificates reloaded"));
}
