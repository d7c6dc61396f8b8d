//! End to end with the real binaries as separate processes: client → tidepool-balancer →
//! tidepool-worker × 2 → ONNX Runtime, including workers stopped, killed and added while
//! load runs. Every request must get exactly one answer, counted per id on the wire.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tidepool_protocol::{Client, Tensor, Tensors};
use tidepool_tests::balancer::http;
use tidepool_tests::drive::{Drive, Tally};
use tidepool_tests::process::{
    balancer_args, eventually, free_addr, free_addrs, wait_listening, Proc,
};
use tidepool_tests::worker::{direct_run, ort_lib, scratch_dir, TinyModel};
use tokio_util::sync::CancellationToken;

const INPUT_DIM: usize = 16;

struct Cluster {
    dir: PathBuf,
    model: PathBuf,
    balancer: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
}

struct WorkerProc {
    proc: Proc,
    addr: SocketAddr,
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        let dir = scratch_dir(tag);
        let model = TinyModel {
            input_dim: INPUT_DIM,
            ..TinyModel::default()
        }
        .write();
        let [listen, admin] = free_addrs();
        let args = balancer_args(listen, admin);
        let balancer = Proc::start("balancer", "tidepool-balancer", &args, &dir);
        Cluster {
            dir,
            model,
            balancer,
            listen,
            admin,
        }
    }

    fn worker(&self, name: &str, max_delay: &str) -> WorkerProc {
        let addr = free_addr();
        let args = [
            "serve",
            "--model",
            &self.model.display().to_string(),
            "--listen",
            &addr.to_string(),
            "--name",
            name,
            "--register",
            &format!("http://{}", self.admin),
            "--threads",
            "1",
            "--max-batch",
            "8",
            "--max-delay",
            max_delay,
            "--drain-timeout",
            "10s",
            "--ort-lib",
            &ort_lib().display().to_string(),
        ]
        .map(String::from);
        WorkerProc {
            proc: Proc::start(name, "tidepool-worker", &args, &self.dir),
            addr,
        }
    }

    /// `addr → state` from `GET /targets`.
    async fn targets(&self) -> BTreeMap<String, String> {
        let (status, body) = http(self.admin, "GET", "/targets", None).await;
        assert_eq!(status, 200, "{body}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        list.iter()
            .map(|t| {
                (
                    t["addr"].as_str().unwrap().to_owned(),
                    t["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    async fn wait_state(&self, addr: SocketAddr, state: &str, procs: &[&Proc]) {
        wait_listening(self.admin, &self.balancer).await;
        let mut all = vec![&self.balancer];
        all.extend_from_slice(procs);
        eventually(
            Duration::from_secs(30),
            &format!("{addr} {state}"),
            &all,
            || async {
                (self
                    .targets()
                    .await
                    .get(&addr.to_string())
                    .map(String::as_str)
                    == Some(state))
                .then_some(())
            },
        )
        .await;
    }

    fn load(&self, rate: u32, stop: CancellationToken) -> tokio::task::JoinHandle<Tally> {
        Drive::new(self.listen, rate, INPUT_DIM, stop).spawn()
    }

    /// Two workers, both healthy.
    async fn two_workers(&self, max_delay: &str) -> (WorkerProc, WorkerProc) {
        let a = self.worker("worker-a", max_delay);
        let b = self.worker("worker-b", max_delay);
        self.wait_state(a.addr, "healthy", &[&a.proc, &b.proc])
            .await;
        self.wait_state(b.addr, "healthy", &[&a.proc, &b.proc])
            .await;
        (a, b)
    }
}

fn item(seed: usize) -> Vec<f32> {
    (0..INPUT_DIM)
        .map(|j| ((seed * 13 + j * 5) % 11) as f32 / 4.0 - 1.0)
        .collect()
}

fn inputs(values: &[f32]) -> Tensors {
    [(
        "input".to_owned(),
        Tensor::from_vec(vec![values.len()], values.to_vec()).unwrap(),
    )]
    .into()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

#[tokio::test]
async fn answers_through_balancer_and_two_workers_match_a_direct_run() {
    let cluster = Cluster::start("e2e-direct");
    let (_a, _b) = cluster.two_workers("2ms").await;

    let client = Client::connect(cluster.listen).await.unwrap();
    let calls = (0..200).map(|i| {
        let client = client.clone();
        tokio::spawn(async move { (i, client.infer(inputs(&item(i))).await) })
    });
    let mut per_worker = BTreeMap::<String, usize>::new();
    let mut batched = 0;
    for call in futures::future::join_all(calls).await {
        let (i, result) = call.unwrap();
        let result = result.unwrap();
        let got = result.outputs["output"].to_vec::<f32>().unwrap();
        assert_close(&got, &direct_run(&cluster.model, &item(i)));
        *per_worker.entry(result.worker.unwrap()).or_default() += 1;
        batched += usize::from(result.batch_size.unwrap() > 1);
    }
    assert_eq!(per_worker.len(), 2, "both workers served: {per_worker:?}");
    assert!(batched > 0, "some items ran in batches");
}

#[tokio::test]
async fn sigterm_on_a_worker_mid_load_loses_nothing() {
    let cluster = Cluster::start("e2e-sigterm");
    let (mut a, _b) = cluster.two_workers("2ms").await;

    let stop = CancellationToken::new();
    let load = cluster.load(300, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.proc.signal("TERM");
    // The worker deregisters first: the balancer drains it instead of routing to it.
    cluster.wait_state(a.addr, "draining", &[&a.proc]).await;
    let status = a.proc.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "worker exit: {status:?}\n{}",
        a.proc.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let tally = load.await.unwrap();

    tally.assert_exactly_once();
    let outcomes = tally.outcomes();
    assert_eq!(outcomes.get("ok"), Some(&tally.sent), "{outcomes:?}");
    let per_worker = tally.per_worker();
    assert!(
        per_worker.get("worker-a").is_some_and(|n| *n > 0),
        "{per_worker:?}"
    );
    assert!(
        per_worker.get("worker-b").is_some_and(|n| *n > 0),
        "{per_worker:?}"
    );
}

#[tokio::test]
async fn sigkill_on_a_worker_mid_load_answers_every_request_once() {
    let cluster = Cluster::start("e2e-sigkill");
    let (a, b) = cluster.two_workers("5ms").await;

    let stop = CancellationToken::new();
    let load = cluster.load(300, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.proc.signal("KILL");
    cluster.wait_state(a.addr, "unhealthy", &[&b.proc]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let tally = load.await.unwrap();

    tally.assert_exactly_once();
    let outcomes = tally.outcomes();
    // What was in flight on the killed worker may be `unavailable`; nothing else fails.
    for (outcome, n) in &outcomes {
        assert!(
            outcome == "ok" || outcome == "unavailable",
            "{n} × {outcome}: {outcomes:?}"
        );
    }
    assert!(outcomes["ok"] > tally.sent / 2, "{outcomes:?}");
    // After the kill the survivor serves everything.
    assert!(tally.per_worker()["worker-b"] > 0);
}

#[tokio::test]
async fn a_worker_added_under_load_picks_up_work() {
    let cluster = Cluster::start("e2e-scale-out");
    let a = cluster.worker("worker-a", "2ms");
    cluster.wait_state(a.addr, "healthy", &[&a.proc]).await;

    let stop = CancellationToken::new();
    let load = cluster.load(200, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = cluster.worker("worker-b", "2ms");
    cluster
        .wait_state(b.addr, "healthy", &[&a.proc, &b.proc])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let tally = load.await.unwrap();

    tally.assert_exactly_once();
    assert_eq!(
        tally.outcomes().get("ok"),
        Some(&tally.sent),
        "{:?}",
        tally.outcomes()
    );
    let per_worker = tally.per_worker();
    assert!(
        per_worker.get("worker-b").is_some_and(|n| *n > 50),
        "the new worker took its share: {per_worker:?}"
    );
}
