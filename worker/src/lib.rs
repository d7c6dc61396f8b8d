//! # tidepool-worker
//!
//! Serves one ONNX model over the tidepool protocol, stacking concurrent requests into batches.
//! It is the "Fargate task" of tidepool: start as many as the load needs, each registers with
//! the balancer, and each answers `pong` to health checks only once its model is loaded.
//!
//! ## The path of one item
//! ```text
//! TCP ─▶ server (frame, check against the ModelSpec) ─▶ batcher queue ─▶ model thread (ort)
//!  ▲                                                                          │
//!  └──────────── result {outputs, worker, batch_size, queue_us, infer_us} ◀───┘
//! ```
//!
//! ## Modules
//! - [`config`]: the command line (`serve`, `synth`), flags with `TIDEPOOL_*` environment
//!   fallbacks, validated before anything is bound.
//! - [`spec`]: the model's contract as a [`ModelSpec`]: inputs and outputs, checking an
//!   item against them, whether items batch, and padding items of different lengths into
//!   one batch (dimensions recognised by their ONNX symbolic names). No ONNX Runtime types.
//! - [`model`]: the ONNX Runtime session: loading (external data included), reading its
//!   [`ModelSpec`], running one batch. No async.
//! - [`batcher`]: the batching actor: bounded queue, batches by size or delay, deadlines,
//!   cancels, overload, and the model thread that drives an [`Engine`] (the session, or a
//!   stand-in in tests).
//! - [`staging`]: the handoff between the batcher and the model thread: the batcher task
//!   forms each batch (the one copy of each item, into the engine's input) while the model
//!   runs the previous one, and splits the outputs and answers, so that the model thread
//!   only runs batches.
//! - [`busy`]: the model thread's load share (the autoscaler's signal, in `pong`), busy share
//!   and queue delay; [`cost`]: how a batch's run time grows with its size, measured after
//!   warm-up, which turns busy time into the load share; [`clock`]: which clock times a
//!   batch (the model thread's CPU time with one intra-op thread, so that neighbours on
//!   the same cores do not read as load).
//! - [`affinity`]: the model thread pinned to the cores ONNX Runtime's default pinning left
//!   it (`--pin-model-thread`), so that it never spins at a barrier on a pool thread's core.
//! - [`niceness`]: the async runtime's threads a few nice steps below the model's
//!   (`--runtime-nice`), so that under overload reading and refusing requests does not slow
//!   the batches that share its cores.
//! - [`profile`]: the model thread's batch run time by batch size and length bucket, learned
//!   online from the batches run; [`admission`]: predicted-finish admission, doomed items
//!   dropped before they run, and each batch's close chosen from its members' deadlines;
//!   [`schedule`]: when the model threads are next free, the batches ahead given to them
//!   in turn (what admission's forecast starts from with `--instances N`);
//!   [`margin`]: how much later than forecast admitted items finish, learned online and
//!   added to admission's forecasts; [`gate`]: the same admission at the connection,
//!   from a request's scanned fields, before its tensors are decoded;
//!   [`priority`]: priority classes in the queue (order, ageing, shedding the low class
//!   first); [`fairness`]: with `--fairness`, deficit round robin between clients or
//!   tenants within a class; [`goodput`]: results counted against their deadlines, refusals
//!   by reason.
//! - [`server`]: protocol connections: frames in, batcher, answers out, with backpressure.
//! - [`registration`]: registering with the balancer's admin API once ready (and again
//!   every few seconds, for a balancer that restarted), and deregistering first on shutdown.
//! - [`metrics`]: counters and histograms, Prometheus text on `--metrics`.
//! - [`parent`]: `--exit-with-parent`, draining when the parent's pipe on stdin closes.
//! - [`tls`]: TLS on the protocol listener (optionally requiring the balancer's client
//!   certificate) and for registering with an https:// admin API.
//! - [`synth`]: synthetic MLP models of any size, built with `ort::editor`.
//! - [`synth_transformer`]: a synthetic transformer encoder (token ids and attention mask,
//!   N attention + MLP layers of a given width, a masked mean pool): a text model's shape.
//! - [`error`]: the crate's one error type.
//!
//! ## Lifecycle
//! [`Worker::start`] validates the configuration, binds the listeners, and loads the model in
//! the background; until the model is loaded and warm-up has run the shapes traffic will use
//! (one item and a full batch at a few lengths) and a few batches of one item and full
//! batches have been timed for the [`BatchCost`], requests and pings
//! are answered `unavailable`. Then it serves, and registers if asked. When its shutdown token
//! fires (SIGTERM or SIGINT in the binary; with `--exit-with-parent`, also the end of file of
//! the parent's pipe on stdin) it deregisters, stops accepting, lets the queue drain within
//! `--drain-timeout` (what is left is answered `shutting_down`), writes the last answers, and
//! [`Worker::wait`] returns. Open connections are read until they have been quiet for
//! [`server::SHUTDOWN_QUIET`], every frame read answered, so nothing on the wire at the
//! signal is dropped unanswered.
//!
//! ## In-process use (tests, embedding)
//! ```no_run
//! # async fn demo() -> Result<(), tidepool_worker::Error> {
//! use tidepool_worker::{ServeConfig, Worker};
//! let worker = Worker::start(ServeConfig::new("model.onnx", "127.0.0.1:0")).await?;
//! assert!(worker.ready().await);
//! let addr = worker.local_addr(); // connect a tidepool_protocol::Client here
//! worker.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod admission;
pub mod affinity;
pub mod batcher;
pub mod busy;
pub mod clock;
pub mod config;
pub mod cost;
pub mod error;
pub mod fairness;
pub mod gate;
pub mod goodput;
pub mod inherited;
pub mod margin;
pub mod metrics;
pub mod model;
pub mod niceness;
mod pad;
pub mod parent;
pub mod priority;
pub mod profile;
pub mod registration;
pub mod schedule;
pub mod server;
pub mod spec;
pub mod staging;
pub mod synth;
pub mod synth_transformer;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::tls::TlsConnector;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use admission::BatchingMode;
pub use batcher::{BatchConfig, Batcher, BatcherHandle, Engine, Rejection, Reply, Stager, Ticket};
pub use busy::{BusyMeter, Reading};
pub use config::{Cli, Command, DeviceChoice, ModelFile, ServeConfig, SynthConfig};
pub use cost::BatchCost;
pub use error::Error;
pub use metrics::Metrics;
pub use model::{Device, Identity, LoadOptions, Model, WarmUp};
pub use server::Phase;
pub use spec::{About, Fit, IoSpec, ModelSpec, Padding, PaddingOptions};
pub use synth::SynthPlan;
pub use tls::WorkerTls;

/// How long connections get, after the queue has drained, to write their last answers before
/// they are closed regardless (a client that never reads must not hold shutdown forever).
const CONNECTION_GRACE: Duration = Duration::from_secs(5);

/// A running worker. Dropping it does not stop it; call [`Worker::shutdown`].
#[derive(Debug)]
pub struct Worker {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    name: String,
    advertise: String,
    phase: watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Worker {
    /// Validates `config`, binds the listeners, and starts loading the model in the
    /// background. Returns once the listeners are bound: the worker answers `unavailable`
    /// until [`Worker::ready`].
    pub async fn start(config: ServeConfig) -> Result<Worker, Error> {
        Worker::start_inheriting(config, None).await
    }

    /// [`Worker::start`], serving on `inherited` (a listening socket handed over by the
    /// process that started this one, [`inherited::take_from_env`]) where it is bound where
    /// `--listen` asks, instead of binding `--listen`.
    pub async fn start_inheriting(
        mut config: ServeConfig,
        inherited: Option<std::net::TcpListener>,
    ) -> Result<Worker, Error> {
        config.validate()?;
        // The registration token is read once, here, so that a file gone later does not
        // fail a worker that has loaded its model.
        config.register_token = config.register_credentials()?;
        config.register_token_file = None;
        // Certificates are read before anything is bound, so that a wrong path fails at start.
        let metrics = Arc::new(Metrics::default());
        let tls = WorkerTls::load(&config, &metrics)?;
        let bind_error = |source| Error::Bind {
            what: "the protocol listener",
            addr: config.listen.clone(),
            source,
        };
        let listener = match inherited::matching(inherited, &config.listen) {
            Some(listener) => {
                info!("serving on the listening socket inherited on fd 3");
                listener
                    .set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(listener))
                    .map_err(bind_error)?
            }
            None => TcpListener::bind(&config.listen)
                .await
                .map_err(bind_error)?,
        };
        let addr = listener.local_addr().map_err(bind_error)?;
        let metrics_listener = match &config.metrics {
            Some(metrics_addr) => Some(TcpListener::bind(metrics_addr).await.map_err(
                |source| Error::Bind {
                    what: "the metrics listener",
                    addr: metrics_addr.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
        if config.register.is_some() && config.advertise.is_none() && addr.ip().is_unspecified() {
            warn!(%addr, "registering an unspecified address; pass --advertise HOST:PORT that the balancer can reach");
        }
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| default_name(config.advertise.as_deref(), addr, host_name()));
        server::log_listening(addr, &name);
        if let Some(m) = metrics_addr {
            info!(url = %metrics::describe(m), "serving metrics");
        }

        let (phase_tx, phase) = watch::channel(Phase::Loading);
        let shutdown = CancellationToken::new();
        if config.exit_with_parent {
            parent::exit_with_parent(shutdown.clone()).map_err(Error::ParentWatch)?;
        }
        let run = Run {
            config,
            listener,
            metrics_listener,
            name: name.clone(),
            advertise: advertise.clone(),
            metrics: Arc::clone(&metrics),
            phase_tx,
            tls,
        };
        let task = tokio::spawn(run.run(shutdown.clone()));
        Ok(Worker {
            addr,
            metrics_addr,
            name,
            advertise,
            phase,
            metrics,
            shutdown,
            task,
        })
    }

    /// The bound protocol address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address, with `--metrics`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The name put in every result's `worker` field.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address registered with the balancer.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The worker's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Waits until the model is loaded and warmed up. False when the worker stopped first
    /// (the model failed to load, or shutdown came first; [`Worker::wait`] says why).
    pub async fn ready(&self) -> bool {
        let mut phase = self.phase.clone();
        let ready = phase
            .wait_for(|p| !matches!(p, Phase::Loading))
            .await
            .map(|p| matches!(*p, Phase::Ready { .. }));
        ready.unwrap_or(false)
    }

    /// The token that starts a graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the worker has stopped: after a shutdown, or when it failed.
    pub async fn wait(self) -> Result<(), Error> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => {
                error!(error = %e, "worker task failed");
                Err(Error::ModelThread("the worker task panicked"))
            }
        }
    }

    /// Starts a graceful shutdown and waits for it.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// What the worker's main task owns.
struct Run {
    config: ServeConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    name: String,
    advertise: String,
    metrics: Arc<Metrics>,
    phase_tx: watch::Sender<Phase>,
    tls: WorkerTls,
}

impl Run {
    async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Run {
            config,
            listener,
            metrics_listener,
            name,
            advertise,
            metrics,
            phase_tx,
            tls,
        } = self;
        // Certificates are reloaded for as long as anything may handshake.
        let (tls_stop, tls_tasks) = (CancellationToken::new(), TaskTracker::new());
        tls.watch(config.tls_reload_interval, &tls_stop, &tls_tasks);
        let metrics_stop = CancellationToken::new();
        let metrics_task = metrics_listener.map(|l| {
            let (metrics, stop) = (Arc::clone(&metrics), metrics_stop.clone());
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(l, metrics, stop).await {
                    error!(error = %e, "metrics server failed");
                }
            })
        });

        let budget = config.budget();
        metrics.set_frame_budget(budget.clone());
        let context = Arc::new(server::ServerContext {
            phase: phase_tx.subscribe(),
            name,
            metrics: Arc::clone(&metrics),
            max_in_flight: config.max_in_flight,
            max_frame: usize::try_from(config.max_frame).unwrap_or(usize::MAX),
            budget,
            frame_timeout: ServeConfig::limit(config.frame_timeout),
            idle_timeout: ServeConfig::limit(config.idle_timeout),
            max_connections: config.max_connections,
            tls: tls.listener.clone(),
        });
        let tracker = TaskTracker::new();
        let (stop_accepting, close, abort) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let accept_task = tokio::spawn(server::accept(
            listener,
            context,
            tracker.clone(),
            stop_accepting.clone(),
            close.clone(),
            abort.clone(),
        ));

        let result = serve_model(
            &config,
            &advertise,
            &metrics,
            &phase_tx,
            &shutdown,
            tls.register.as_ref(),
        )
        .await;

        // Whatever happened, stop taking connections and let the open ones finish.
        phase_tx.send_replace(Phase::Draining);
        metrics.ready.store(false, Ordering::Relaxed);
        stop_accepting.cancel();
        close.cancel();
        tracker.close();
        if tokio::time::timeout(CONNECTION_GRACE, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                grace = ?CONNECTION_GRACE,
                "connections still writing answers after the drain; closing them"
            );
            abort.cancel();
            tracker.wait().await;
        }
        let _ = accept_task.await;
        tls_stop.cancel();
        tls_tasks.close();
        tls_tasks.wait().await;
        metrics_stop.cancel();
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        match &result {
            Ok(()) => info!("worker stopped"),
            Err(e) => error!(error = %e, "worker failed"),
        }
        result
    }
}

/// Loads the model, serves until `shutdown`, then deregisters and drains the batcher.
/// After deregistration, keeps serving as usual until the balancer has closed its
/// connections, or `limit` passes.
///
/// Frames the balancer wrote before it saw the deregistration may still be on the wire; a
/// draining worker would answer them `shutting_down`, and one that stopped reading would
/// lose them. The balancer closes a deregistered target's connections once its last request
/// is answered, so their closing is the signal that nothing more is coming.
async fn wait_for_balancer_to_let_go(metrics: &Metrics, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        let open = metrics.connections.load(Ordering::Relaxed);
        if open <= 0 {
            info!("the balancer closed its connections; draining");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                open,
                ?limit,
                "connections still open after deregistration; draining anyway"
            );
            return;
        }
        tick.tick().await;
    }
}

/// A model's default name: its file name without `.onnx`.
fn model_name(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".onnx").unwrap_or(&name).to_owned()
}

async fn serve_model(
    config: &ServeConfig,
    advertise: &str,
    metrics: &Arc<Metrics>,
    phase_tx: &watch::Sender<Phase>,
    shutdown: &CancellationToken,
    register_tls: Option<&TlsConnector>,
) -> Result<(), Error> {
    let model_file = config.model_file()?;
    let options = LoadOptions {
        path: config.model.clone(),
        ort_lib: config.ort_lib.clone().ok_or(Error::OrtLibMissing)?,
        device: config.device,
        threads: config.instance_threads(),
        spinning: Some(config.ort_spinning),
        padding: model_file.padding(),
    };
    let warm_up = WarmUp {
        max_batch: config.max_batch,
        lengths: config.warm_up_lengths(),
        max_batch_tokens: config.max_batch_tokens,
    };
    // Loaded on a thread of its own rather than the runtime's blocking pool: ONNX Runtime
    // starts its intra-op threads here and they inherit this thread's name, so that they show
    // as `tidepool-ort` in top, perf and /proc (bench-worker splits the CPU by it).
    let (loaded_tx, load) = tokio::sync::oneshot::channel();
    let instances = config.instances.max(1);
    let pin_model_thread = config.pin_model_thread;
    std::thread::Builder::new()
        .name(affinity::POOL_THREAD_NAME.into())
        .spawn(move || {
            let started = std::time::Instant::now();
            // The threads that start while the model loads are ONNX Runtime's intra-op pool.
            let before = pin_model_thread.then(affinity::Threads::snapshot);
            let loaded = Model::load(&options).and_then(|mut model| {
                let ran = model.warm_up(&warm_up)?;
                let cost = model.batch_cost(&warm_up)?;
                // Each further instance is a session of its own (ort's `run` needs the
                // session to itself), warmed up the same way so that its first batches are
                // not the slow ones; the cost shape is the first's.
                let mut models = vec![model];
                for _ in 1..instances {
                    let mut more = Model::load(&options)?;
                    more.warm_up(&warm_up)?;
                    models.push(more);
                }
                info!(elapsed = ?started.elapsed(), batches = ?ran, single_batch_cost = cost.single(),
                    instances, intra_op_threads = ?options.threads,
                    "model loaded and warmed up (batch size, length); a batch of one costs this share of a full one");
                Ok((models, cost))
            });
            let model_cpus = before.and_then(|before| {
                affinity::model_cpus(&before).unwrap_or_else(|e| {
                    warn!(error = %e, "could not read the intra-op threads' CPUs; the model thread is left unpinned");
                    None
                })
            });
            // Nobody waits when shutdown came first.
            let _ = loaded_tx.send(loaded.map(|(models, cost)| (models, cost, model_cpus)));
        })
        .map_err(|_| Error::ModelThread("could not spawn the model loading thread"))?;
    let (models, cost, model_cpus) = tokio::select! {
        // The sender is dropped without a value only when loading panicked.
        loaded = load => loaded.map_err(|_| Error::ModelThread("model loading panicked"))??,
        _ = shutdown.cancelled() => {
            info!("shutdown before the model finished loading");
            return Ok(());
        }
    };
    // The first instance speaks for all of them: they load the same file the same way.
    let model = &models[0];
    metrics.set_device(model.device().as_str());
    metrics.busy.set_cost(cost);
    let spec = Arc::clone(model.spec());
    let padding_note = spec.padding_note.clone();
    let metadata = Arc::new(
        spec.metadata(&About {
            name: model_file
                .name
                .clone()
                .unwrap_or_else(|| model_name(&config.model)),
            version: model_file
                .version
                .clone()
                .or_else(|| model.identity().onnx_version.map(|v| v.to_string())),
            hash: model.identity().hash.clone(),
            max_batch: config.max_batch,
            max_batch_tokens: config.max_batch_tokens,
        }),
    );
    let batch_config = BatchConfig {
        max_batch: spec.batch_limit(config.max_batch),
        max_batch_tokens: config.max_batch_tokens,
        buckets: config.length_buckets.clone(),
        max_delay: config.max_delay,
        queue: config.queue,
        drain_timeout: config.drain_timeout,
        mode: config.batching,
        aging: config.priority_aging,
        fairness: config.fairness_settings(),
        model_cpus,
    };
    let batcher_stop = CancellationToken::new();
    let batcher = Batcher::start_instances(
        models,
        batch_config.clone(),
        Arc::clone(metrics),
        batcher_stop.clone(),
    )?;
    phase_tx.send_replace(Phase::Ready {
        batcher: batcher.handle(),
        spec,
        metadata,
    });
    metrics.ready.store(true, Ordering::Relaxed);
    info!(
        max_batch = batch_config.max_batch,
        max_delay = ?batch_config.max_delay,
        batching = ?batch_config.mode,
        queue = batch_config.queue,
        max_batch_tokens = ?batch_config.max_batch_tokens,
        padding = %padding_note,
        "ready"
    );

    let registration = config.register.as_deref().map(|url| {
        let registrar = registration::Registrar::new(
            url,
            advertise,
            config.register_token.clone(),
            register_tls,
        );
        let stop = shutdown.clone();
        let refresh = config.register_interval;
        tokio::spawn(async move {
            let registered = registrar.register(refresh, &stop).await;
            (registrar, registered)
        })
    });

    shutdown.cancelled().await;
    info!("shutting down");
    // Deregister first, so the balancer stops sending before this worker stops taking.
    if let Some(task) = registration {
        if let Ok((registrar, true)) = task.await {
            if registrar.deregister().await {
                wait_for_balancer_to_let_go(metrics, config.drain_timeout).await;
            }
        }
    }
    phase_tx.send_replace(Phase::Draining);
    metrics.ready.store(false, Ordering::Relaxed);
    batcher_stop.cancel();
    batcher.join().await;
    Ok(())
}

/// The worker's name when `--name` is not given: unique and recognisable wherever it runs,
/// so that reports count workers right. The advertised address when there is one; else the
/// bound address, except that an unspecified one (`0.0.0.0:7100`, the same for every
/// replica of a compose service) is replaced by the machine's host name (a container's is
/// its id) and the port.
fn default_name(advertise: Option<&str>, bound: SocketAddr, host: Option<String>) -> String {
    match (advertise, host) {
        (Some(advertise), _) => advertise.to_owned(),
        (None, Some(host)) if bound.ip().is_unspecified() => format!("{host}:{}", bound.port()),
        (None, _) => bound.to_string(),
    }
}

/// This machine's host name, if the system says.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_name_is_unique_per_replica() {
        let any: SocketAddr = "0.0.0.0:7100".parse().unwrap();
        let host = || Some("a1b2c3d4e5f6".to_owned());
        assert_eq!(default_name(None, any, host()), "a1b2c3d4e5f6:7100");
        assert_eq!(
            default_name(Some("10.0.0.7:7100"), any, host()),
            "10.0.0.7:7100",
            "the advertised address wins"
        );
        let local: SocketAddr = "127.0.0.1:45001".parse().unwrap();
        assert_eq!(default_name(None, local, host()), "127.0.0.1:45001");
        assert_eq!(default_name(None, any, None), "0.0.0.0:7100");
    }
}
