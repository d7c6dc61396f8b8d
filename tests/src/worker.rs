//! Worker harness: the ONNX Runtime library, tiny synthetic models, in-process workers, and a
//! stand-in for the balancer's admin API.
//!
//! Tests that need ONNX Runtime find it through `ORT_DYLIB_PATH` or the repository's `.ort/`
//! folder (`make ort` or `scripts/fetch-ort.sh` fills it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use tidepool_worker::{synth, ServeConfig, SynthPlan, Worker};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The ONNX Runtime library: `ORT_DYLIB_PATH`, else `libonnxruntime.so.*` in the repository's
/// `.ort/` folder; the worker crate's lookup, so that every test finds the same library.
pub use tidepool_worker::test_support::ort_lib;

/// A fresh empty directory under the system's temporary directory.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tidepool-tests-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The shape of a tiny synthetic MLP for tests.
#[derive(Clone, Copy, Debug)]
pub struct TinyModel {
    /// Features per input item.
    pub input_dim: usize,
    /// Features per output item.
    pub output_dim: usize,
    /// MatMul layers.
    pub layers: usize,
    /// Bytes of weights, about.
    pub size: u64,
    /// Weight seed.
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            input_dim: 16,
            output_dim: 4,
            layers: 3,
            size: 32 << 10,
            seed: 7,
        }
    }
}

impl TinyModel {
    /// Writes the model into a fresh scratch directory and returns its path.
    pub fn write(&self) -> PathBuf {
        let dir = scratch_dir("model");
        let path = dir.join("tiny.onnx");
        let plan = SynthPlan::new(
            self.size,
            Some(self.input_dim),
            Some(self.output_dim),
            self.layers,
            self.seed,
        )
        .expect("plan a tiny model");
        synth::write(&plan, &path, &ort_lib(), synth::EXTERNAL_DATA_FROM)
            .expect("write a tiny model");
        path
    }
}

/// A worker configuration for tests: `127.0.0.1:0`, the test ORT library, one intra-op
/// thread, CPU, a short drain.
pub fn worker_config(model: &Path) -> ServeConfig {
    let mut config = ServeConfig::new(model, "127.0.0.1:0");
    config.ort_lib = Some(ort_lib());
    config.threads = Some(1);
    config.device = tidepool_worker::DeviceChoice::Cpu;
    config.drain_timeout = Duration::from_secs(5);
    config
}

/// Starts a worker and waits until it is ready; panics if it fails to load.
pub async fn start_worker(config: ServeConfig) -> Worker {
    let worker = Worker::start(config).await.expect("start the worker");
    if !tokio::time::timeout(Duration::from_secs(30), worker.ready())
        .await
        .expect("worker ready within 30 s")
    {
        let err = worker.wait().await;
        panic!("the worker stopped before it was ready: {err:?}");
    }
    worker
}

/// A request the stand-in admin API received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminEvent {
    /// POST /targets with this `addr`.
    Register(String),
    /// DELETE /targets/{addr}.
    Deregister(String),
}

/// A stand-in for the balancer's admin API: records POST /targets and DELETE /targets/{addr}.
#[derive(Debug)]
pub struct StandInAdmin {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<AdminEvent>>>,
    stop: CancellationToken,
}

impl StandInAdmin {
    /// Reserves a port for an admin API that will start later: the worker can be pointed at
    /// it while nothing listens there yet.
    pub async fn reserve_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("local addr")
        // Dropped here: the port is free until `start_on` binds it again.
    }

    /// Starts the stand-in on `addr`.
    pub async fn start_on(addr: SocketAddr) -> StandInAdmin {
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the stand-in admin API");
        let events = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/targets", post(register))
            .route("/targets/{addr}", delete(deregister))
            .with_state(Arc::clone(&events));
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        StandInAdmin { addr, events, stop }
    }

    /// The admin API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it received so far.
    pub fn events(&self) -> Vec<AdminEvent> {
        self.events.lock().expect("events lock").clone()
    }

    /// Waits until it has received `n` requests.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<AdminEvent> {
        let give_up = tokio::time::Instant::now() + within;
        loop {
            let events = self.events();
            if events.len() >= n || tokio::time::Instant::now() >= give_up {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for StandInAdmin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Events = Arc<Mutex<Vec<AdminEvent>>>;

async fn register(State(events): State<Events>, Json(body): Json<serde_json::Value>) -> StatusCode {
    match body.get("addr").and_then(|a| a.as_str()) {
        Some(addr) => {
            events
                .lock()
                .expect("events lock")
                .push(AdminEvent::Register(addr.to_owned()));
            StatusCode::CREATED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

async fn deregister(State(events): State<Events>, UrlPath(addr): UrlPath<String>) -> StatusCode {
    events
        .lock()
        .expect("events lock")
        .push(AdminEvent::Deregister(addr));
    StatusCode::NO_CONTENT
}

/// The same model run by ONNX Runtime directly, one item at a time.
pub fn direct_run(model: &std::path::Path, values: &[f32]) -> Vec<f32> {
    let env = tidepool_worker::model::environment(&ort_lib()).expect("direct ort run");
    let mut session = ort::session::Session::builder(&env)
        .expect("direct ort run")
        .with_intra_threads(1)
        .expect("direct ort run")
        .commit_from_file(model)
        .expect("direct ort run");
    let x = ort::value::Tensor::from_array(([1usize, values.len()], values.to_vec()))
        .expect("direct ort run");
    let outputs = session
        .run(ort::inputs!["input" => x])
        .expect("direct ort run");
    let (_, y) = outputs["output"]
        .try_extract_tensor::<f32>()
        .expect("direct ort run");
    y.to_vec()
}
