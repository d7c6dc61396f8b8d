//! Command-line configuration: one struct per subcommand, flags with environment fallbacks.
//!
//! Every flag of `serve` can also come from a `TIDEPOOL_WORKER_*` environment variable (the
//! one exception is `--ort-lib`, which reads ONNX Runtime's own `ORT_DYLIB_PATH`), so that a
//! container image can be configured without a command line. The prefix is the worker's
//! own: a balancer that starts workers (`--worker-cmd`) passes its environment on, and its
//! `TIDEPOOL_*` settings (`TIDEPOOL_QUEUE`, ...) must not become the workers'. Durations read like `5ms` or
//! `30s`, sizes like `64MiB`. [`ServeConfig::validate`] runs before anything is bound or loaded.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::admission::BatchingMode;
use crate::error::Error;
use crate::fairness::{FairnessMode, FairnessSettings};
use crate::registration::RegisterToken;
use tidepool_protocol::tenant;

/// tidepool-worker: serves one ONNX model over the tidepool protocol, batching requests.
#[derive(Debug, Parser)]
#[command(name = "tidepool-worker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The worker's subcommands.
// Parsed once at start and moved into the worker: boxing the large variant would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load a model and serve it until SIGTERM or SIGINT.
    Serve(ServeConfig),
    /// Write a synthetic MLP model (MatMul, Add, Relu) of a given size.
    Synth(SynthConfig),
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum DeviceChoice {
    /// CUDA when it registers, else CPU with a warning.
    #[default]
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA, or fail.
    Cuda,
}

/// `tidepool-worker serve`: everything the worker needs, validated before use.
#[derive(Clone, Debug, Args)]
pub struct ServeConfig {
    /// The ONNX model to serve (external data files next to it are found by ONNX Runtime).
    #[arg(long, env = "TIDEPOOL_WORKER_MODEL")]
    pub model: PathBuf,

    /// Address to accept protocol connections on. A listening socket inherited on fd 3
    /// (`LISTEN_FDS=1`, as a balancer's `--worker-cmd` or systemd hands one over) is served
    /// instead when it is bound here ([`crate::inherited`]).
    #[arg(long, env = "TIDEPOOL_WORKER_LISTEN", default_value = "0.0.0.0:7100")]
    pub listen: String,

    /// Address the balancer should use to reach this worker [default: the bound listen address].
    #[arg(long, env = "TIDEPOOL_WORKER_ADVERTISE")]
    pub advertise: Option<String>,

    /// Name reported in every result's `worker` field [default: the advertised address, else
    /// the listen address, with the host name in place of an unspecified IP (0.0.0.0)].
    #[arg(long, env = "TIDEPOOL_WORKER_NAME")]
    pub name: Option<String>,

    /// Balancer admin URL to register with once ready (POST URL/targets), and to deregister
    /// from on shutdown (DELETE URL/targets/ADDR).
    #[arg(long, env = "TIDEPOOL_WORKER_REGISTER")]
    pub register: Option<String>,

    /// How often to register again once registered (idempotent), so that a balancer that
    /// restarted and forgot this worker has it back within this time.
    #[arg(long, env = "TIDEPOOL_WORKER_REGISTER_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub register_interval: Duration,

    /// Address to serve Prometheus metrics on (GET /metrics).
    #[arg(long, env = "TIDEPOOL_WORKER_METRICS")]
    pub metrics: Option<String>,

    /// Where the model runs.
    #[arg(long, env = "TIDEPOOL_WORKER_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,

    /// ONNX Runtime intra-op threads [default: ONNX Runtime's choice, one per core].
    #[arg(long, env = "TIDEPOOL_WORKER_THREADS")]
    pub threads: Option<usize>,

    /// Model instances (Triton's `instance_group count`): model threads that take batches
    /// from the one batcher and run them side by side, each with its own ONNX Runtime session
    /// (the weights are loaded N times: ort's `Session::run` needs the session to itself)
    /// and `--threads` / N intra-op threads (at least 1; ONNX Runtime's default counts one
    /// per core). On a fast model, where the barrier at the end of each operator leaves one
    /// thread of a shared pool waiting for a core, N single-thread runs can serve more than
    /// one N-thread run.
    #[arg(long, env = "TIDEPOOL_WORKER_INSTANCES", default_value_t = 1)]
    pub instances: usize,

    /// Whether ONNX Runtime's intra-op threads spin while they wait for work. Off by default:
    /// while the model thread runs a batch, the async runtime splits and answers the last one
    /// and forms the next (worker/src/staging.rs), and threads spinning between batches take
    /// the cores it needs for that. Measured again with staging, on 2 cores at saturation
    /// (8 MiB model, --max-batch 64): spinning cost 46-61 µs of CPU per item against 29-35
    /// off, for about 1.6 fewer pool-thread sleeps per batch. Turn it on only where ONNX
    /// Runtime has cores the runtime never needs.
    #[arg(long, env = "TIDEPOOL_WORKER_ORT_SPINNING", default_value_t = false, action = clap::ArgAction::Set)]
    pub ort_spinning: bool,

    /// Whether the model thread (the one that runs each batch, itself one of ONNX Runtime's
    /// intra-op threads) is pinned to the cores ONNX Runtime left free when it pinned its
    /// pool threads, one per core, as it does with its default thread count
    /// (worker/src/affinity.rs). On by default: left to the scheduler, the model thread can
    /// share a pool thread's core and spin at each operator's barrier while that thread
    /// waits for the core (on 2 cores at 150% of capacity, 1,391-1,806 items/s unpinned
    /// against 1,773-1,779 pinned in alternating runs). Nothing is
    /// pinned where ONNX Runtime pinned nothing (`--threads`, `--instances` above 1). Turn it
    /// off where several workers share the cores with default threads and you would rather
    /// the scheduler spread their model threads.
    #[arg(long, env = "TIDEPOOL_WORKER_PIN_MODEL_THREAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_model_thread: bool,

    /// Threads of the async runtime that reads requests and writes answers [default 0: a
    /// quarter of the cores, at least 1]. The runtime only moves bytes; ONNX Runtime's
    /// intra-op threads (one per core) need the cores, and on 2 cores a second runtime thread
    /// cost more in wake-ups than it gave.
    #[arg(long, env = "TIDEPOOL_WORKER_RUNTIME_THREADS", default_value_t = 0)]
    pub runtime_threads: usize,

    /// Nice steps the async runtime's threads run below the model's once it is loaded (0 to
    /// 19) [default 0: as the model's]. Where the runtime shares the cores with ONNX Runtime's
    /// intra-op threads, reading and refusing under overload takes slices from the batches;
    /// lowered, the runtime takes the cores only where the model leaves them
    /// (worker/src/niceness.rs). Off by default: on a loaded 2-core machine, 10 left requests
    /// and answers waiting in socket buffers, a delay the worker's own deadline clock does not
    /// see (bench/intro/slo.md). No privilege needed.
    #[arg(long, env = "TIDEPOOL_WORKER_RUNTIME_NICE", default_value_t = 0)]
    pub runtime_nice: i32,

    /// Most items stacked into one batch.
    #[arg(long, env = "TIDEPOOL_WORKER_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,

    /// Most tokens in one batch: its size times the length of its longest item (for a text
    /// model, the padded sequence length), as text-embeddings-inference's max_batch_tokens
    /// [default: no limit beyond --max-batch]. An item longer than this runs alone.
    #[arg(long, env = "TIDEPOOL_WORKER_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,

    /// Length buckets, as ascending upper bounds (`32,128,512`): items batch only with items
    /// whose length falls in the same bucket, so short items are not padded to long ones
    /// [default: one bucket].
    #[arg(long, env = "TIDEPOOL_WORKER_LENGTH_BUCKETS", value_delimiter = ',')]
    pub length_buckets: Vec<usize>,

    /// Pad value of an input, `NAME=VALUE` (repeat, or separate with commas), used where items
    /// of different lengths are padded to share a batch [default: 0; also read from the
    /// model's config file MODEL.tidepool.json].
    #[arg(long = "pad", env = "TIDEPOOL_WORKER_PAD", value_delimiter = ',', value_parser = parse_pad)]
    pub pad: Vec<(String, f64)>,

    /// Batch only items of identical shapes, never padding: for a model whose answers padding
    /// would change (one that does not mask padded positions). Also `"padding": false` in the
    /// model's config file.
    #[arg(long, env = "TIDEPOOL_WORKER_NO_PADDING")]
    pub no_padding: bool,

    /// Lengths of the dynamic dimensions warm-up runs (one item and a full batch at each)
    /// before the worker reports ready [default: the length buckets, else 16 and 128].
    #[arg(long, env = "TIDEPOOL_WORKER_WARM_UP_LENGTHS", value_delimiter = ',')]
    pub warm_up_lengths: Vec<usize>,

    /// Longest the oldest queued item waits for a batch to fill; 0 runs whatever is queued as
    /// soon as the model is free.
    #[arg(long, env = "TIDEPOOL_WORKER_MAX_DELAY", default_value = "2ms", value_parser = parse_duration)]
    pub max_delay: Duration,

    /// How the batcher serves requests with a `deadline_ms`: `adaptive` refuses at once one
    /// predicted to finish late (`overloaded` with `retry_after_ms`), never runs one that
    /// cannot finish in time, and closes each batch early enough for its most urgent member
    /// (--max-batch and --max-delay stay the limits); `fixed` only batches by --max-batch and
    /// --max-delay, as before, for comparison.
    #[arg(long, env = "TIDEPOOL_WORKER_BATCHING", value_enum, default_value_t = BatchingMode::Adaptive)]
    pub batching: BatchingMode,

    /// How long a queued request waits to rise one priority class (low → normal → high and
    /// beyond), so that no class starves; 0 never ages.
    #[arg(long, env = "TIDEPOOL_WORKER_PRIORITY_AGING", default_value = "100ms", value_parser = parse_duration)]
    pub priority_aging: Duration,

    /// Share the queue between clients or tenants within each priority class, by deficit
    /// round robin, so that one that floods the worker cannot put the others' requests behind
    /// all of its own: `client` by the client's IP address (the `client` a balancer adds,
    /// else the connection's peer), `tenant` by the request's `tenant` (requests without one
    /// share a flow); `off` serves each class oldest first.
    #[arg(long, env = "TIDEPOOL_WORKER_FAIRNESS", value_enum, default_value_t = FairnessMode::Off)]
    pub fairness: FairnessMode,

    /// A flow's weight under --fairness, `NAME=W` (a tenant, or with --fairness client an IP
    /// address; W from 1 to 1000; repeat, or separate with commas): it is served W items for
    /// every one of a flow of weight 1, the default. A named flow is always kept apart and
    /// counted in the metrics under its name.
    #[arg(long = "tenant-weight", env = "TIDEPOOL_WORKER_TENANT_WEIGHTS", value_delimiter = ',', value_parser = parse_weight)]
    pub tenant_weights: Vec<(String, u32)>,

    /// Most flows kept apart under --fairness besides the --tenant-weight names; names beyond
    /// it share one flow, so inventing names buys a client no more than that one share.
    #[arg(
        long,
        env = "TIDEPOOL_WORKER_FAIRNESS_MAX_FLOWS",
        default_value_t = 256
    )]
    pub fairness_max_flows: usize,

    /// Most items waiting in the queue; beyond it requests are answered `overloaded`.
    #[arg(long, env = "TIDEPOOL_WORKER_QUEUE", default_value_t = 1024)]
    pub queue: usize,

    /// Most requests in flight per connection; beyond it the worker stops reading that
    /// connection until answers have been written (TCP backpressure).
    #[arg(long, env = "TIDEPOOL_WORKER_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Largest frame accepted or sent, in bytes. Keep it at least the balancer's --max-frame:
    /// a frame above it is a framing error that closes the connection, and a balancer's
    /// connection carries other clients' requests. Memory is bounded by --frame-budget, not by
    /// this.
    #[arg(long, env = "TIDEPOOL_WORKER_MAX_FRAME", default_value = "64MiB", value_parser = parse_size)]
    pub max_frame: u64,

    /// Bytes of frames being read or held (until their item is copied into a batch), all
    /// connections together. A connection whose next frame does not fit stops being read
    /// until bytes come back (TCP backpressure) instead of allocating it.
    #[arg(long, env = "TIDEPOOL_WORKER_FRAME_BUDGET", default_value = "256MiB", value_parser = parse_size)]
    pub frame_budget: u64,

    /// Most of --frame-budget one connection may hold at once [default: the larger of 64MiB
    /// and --max-frame].
    #[arg(long, env = "TIDEPOOL_WORKER_CONNECTION_FRAME_BUDGET", value_parser = parse_size)]
    pub connection_frame_budget: Option<u64>,

    /// A frame whose first byte has arrived must be complete within this, or the connection is
    /// closed (time waiting for --frame-budget excluded); 0: no limit.
    #[arg(long, env = "TIDEPOOL_WORKER_FRAME_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub frame_timeout: Duration,

    /// A connection with nothing in flight and nothing arriving for this long is closed (NLB's
    /// TCP idle timeout is 350 s); 0: never.
    #[arg(long, env = "TIDEPOOL_WORKER_IDLE_TIMEOUT", default_value = "350s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Most open protocol connections; beyond it a new connection is answered `unavailable`
    /// and closed.
    #[arg(long, env = "TIDEPOOL_WORKER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// How long shutdown waits for queued and running items before answering the rest
    /// `shutting_down`.
    #[arg(long, env = "TIDEPOOL_WORKER_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Drain and exit when standard input reaches end of file: start the worker with its stdin
    /// a pipe whose write end the parent holds and never writes, and it exits when the parent
    /// dies, SIGKILL included. Refused when stdin is not a pipe or a socket.
    #[arg(long, env = "TIDEPOOL_WORKER_EXIT_WITH_PARENT")]
    pub exit_with_parent: bool,

    /// The ONNX Runtime shared library (libonnxruntime.so); scripts/fetch-ort.sh fetches it.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,

    /// File holding the balancer's admin token, sent with --register's requests
    /// (`Authorization: Bearer`). The token can come from the environment variable
    /// TIDEPOOL_WORKER_REGISTER_TOKEN instead; it has no flag of its own, since a flag's
    /// value shows in `ps`.
    #[arg(long, env = "TIDEPOOL_WORKER_REGISTER_TOKEN_FILE")]
    pub register_token_file: Option<PathBuf>,

    /// The registration token itself: the binary fills it from
    /// TIDEPOOL_WORKER_REGISTER_TOKEN; a program embedding the worker sets it directly.
    #[arg(skip)]
    pub register_token: Option<RegisterToken>,
    /// TLS on the protocol listener: the certificate chain (PEM), with --tls-key.
    #[arg(long, env = "TIDEPOOL_WORKER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TIDEPOOL_WORKER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require clients (the balancer) to present a certificate signed by a CA in this
    /// bundle (PEM), so that only they can reach this worker.
    #[arg(long, env = "TIDEPOOL_WORKER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// The CA bundle (PEM) an https:// --register URL's certificate must chain to.
    #[arg(long, env = "TIDEPOOL_WORKER_REGISTER_TLS_CA")]
    pub register_tls_ca: Option<PathBuf>,

    /// Longest a TLS handshake may take before the connection is closed.
    #[arg(long, env = "TIDEPOOL_WORKER_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How often the TLS files are checked for changes (they are also re-read on SIGHUP).
    #[arg(long, env = "TIDEPOOL_WORKER_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
}

impl ServeConfig {
    /// A configuration with the defaults of the command line, for tests and embedding.
    pub fn new(model: impl Into<PathBuf>, listen: impl Into<String>) -> Self {
        ServeConfig {
            model: model.into(),
            listen: listen.into(),
            advertise: None,
            name: None,
            register: None,
            register_interval: Duration::from_secs(15),
            metrics: None,
            device: DeviceChoice::Auto,
            threads: None,
            instances: 1,
            ort_spinning: false,
            pin_model_thread: true,
            runtime_threads: 0,
            runtime_nice: 0,
            max_batch: 32,
            max_batch_tokens: None,
            length_buckets: Vec::new(),
            pad: Vec::new(),
            no_padding: false,
            warm_up_lengths: Vec::new(),
            max_delay: Duration::from_millis(2),
            batching: BatchingMode::Adaptive,
            priority_aging: Duration::from_millis(100),
            fairness: FairnessMode::Off,
            tenant_weights: Vec::new(),
            fairness_max_flows: 256,
            queue: 1024,
            max_in_flight: 256,
            max_frame: tidepool_protocol::DEFAULT_MAX_FRAME as u64,
            frame_budget: 256 << 20,
            connection_frame_budget: None,
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(350),
            max_connections: 1024,
            exit_with_parent: false,
            drain_timeout: Duration::from_secs(30),
            ort_lib: std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
            register_token_file: None,
            register_token: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            register_tls_ca: None,
            tls_handshake_timeout: tidepool_protocol::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            tls_reload_interval: tidepool_protocol::tls::DEFAULT_RELOAD_POLL,
        }
    }

    /// The registration token: `register_token` (TIDEPOOL_WORKER_REGISTER_TOKEN) or the
    /// one in `--register-token-file`, read again on every call; none when neither is given.
    pub fn register_credentials(&self) -> Result<Option<RegisterToken>, Error> {
        match (&self.register_token, &self.register_token_file) {
            (Some(_), Some(_)) => Err(Error::InvalidConfig {
                flag: "register-token-file",
                reason: format!(
                    "{} is set too; give the token one way",
                    crate::registration::TOKEN_ENV
                ),
            }),
            (Some(token), None) => Ok(Some(token.clone())),
            (None, Some(path)) => RegisterToken::from_file(path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Each model instance's intra-op threads: `--threads` (or, unset, one per core) shared
    /// among `--instances`, at least 1; with one instance, `--threads` as given (`None`:
    /// ONNX Runtime's default).
    pub fn instance_threads(&self) -> Option<usize> {
        if self.instances <= 1 {
            return self.threads;
        }
        let total = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        Some((total / self.instances).max(1))
    }

    /// The async runtime's threads: `--runtime-threads`, or for 0 a quarter of the cores
    /// (at least 1).
    pub fn io_threads(&self) -> usize {
        match self.runtime_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1)),
            n => n,
        }
    }

    /// The frame budget these settings describe.
    pub fn budget(&self) -> tidepool_protocol::FrameBudget {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let per_connection = self
            .connection_frame_budget
            .unwrap_or(self.max_frame.max(64 << 20));
        tidepool_protocol::FrameBudget::new(size(self.frame_budget), size(per_connection))
    }

    /// A duration flag where 0 means "no limit".
    pub fn limit(duration: Duration) -> Option<Duration> {
        (!duration.is_zero()).then_some(duration)
    }

    /// Checks what can be checked without binding or loading anything.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |flag, reason: &str| {
            Err(Error::InvalidConfig {
                flag,
                reason: reason.to_owned(),
            })
        };
        if self.max_batch == 0 {
            return invalid("max-batch", "must be at least 1");
        }
        if self.queue == 0 {
            return invalid("queue", "must be at least 1");
        }
        if self.max_batch_tokens == Some(0) {
            return invalid(
                "max-batch-tokens",
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if self.length_buckets.contains(&0) || !self.length_buckets.is_sorted_by(|a, b| a < b) {
            return invalid(
                "length-buckets",
                "expected ascending lengths above 0, like 32,128,512",
            );
        }
        if self.warm_up_lengths.contains(&0) {
            return invalid("warm-up-lengths", "lengths must be at least 1");
        }
        if self.max_in_flight == 0 {
            return invalid("max-in-flight", "must be at least 1");
        }
        if self.threads == Some(0) {
            return invalid(
                "threads",
                "must be at least 1 (leave it out for ONNX Runtime's default)",
            );
        }
        if self.instances == 0 || self.instances > 64 {
            return invalid(
                "instances",
                "must be between 1 and 64 (each instance loads the model once more)",
            );
        }
        if !(0..=crate::niceness::MAX_NICE).contains(&self.runtime_nice) {
            return invalid(
                "runtime-nice",
                "must be between 0 (as the model's threads) and 19 (the lowest priority)",
            );
        }
        if self.runtime_threads > 1024 {
            return invalid("runtime-threads", "must be at most 1024 (0: one per core)");
        }
        if self.max_frame < 1024 || self.max_frame > u64::from(u32::MAX) {
            return invalid("max-frame", "must be between 1KiB and 4GiB");
        }
        if self.max_connections == 0 {
            return invalid("max-connections", "must be at least 1");
        }
        let largest = self.budget().largest_frame() as u64;
        if self.max_frame > largest {
            return invalid(
                "frame-budget",
                &format!(
                    "admits frames of at most {largest} bytes, below --max-frame {}: large frames \
                     may use 7/8 of --frame-budget, and one connection at most \
                     --connection-frame-budget; raise them or lower --max-frame",
                    self.max_frame
                ),
            );
        }
        if self.exit_with_parent && !crate::parent::stdin_is_a_pipe() {
            return invalid(
                "exit-with-parent",
                "standard input is not a pipe or a socket, so its end of file would not mean \
                 the parent is gone; start the worker with stdin a pipe its parent holds",
            );
        }
        if self.listen.parse::<SocketAddr>().is_err() {
            return invalid("listen", "expected IP:PORT, like 0.0.0.0:7100");
        }
        if let Some(metrics) = &self.metrics {
            if metrics.parse::<SocketAddr>().is_err() {
                return invalid("metrics", "expected IP:PORT, like 0.0.0.0:9100");
            }
        }
        if let Some(advertise) = &self.advertise {
            if !advertise.contains(':') {
                return invalid("advertise", "expected HOST:PORT");
            }
        }
        if let Some(url) = &self.register {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return invalid(
                    "register",
                    "expected an http:// or https:// URL of the balancer's admin API",
                );
            }
        }
        self.validate_fairness()?;
        self.register_credentials()?;
        self.validate_tls()?;
        if !self.model.is_file() {
            return invalid("model", &format!("{} is not a file", self.model.display()));
        }
        match &self.ort_lib {
            None => return Err(Error::OrtLibMissing),
            Some(path) if !path.is_file() => {
                return Err(Error::OrtLibNotFound { path: path.clone() })
            }
            Some(_) => {}
        }
        Ok(())
    }
}

impl ServeConfig {
    /// How the batcher shares its queue, the names as flows know them (an IP address in its
    /// canonical spelling).
    pub fn fairness_settings(&self) -> FairnessSettings {
        let canonical = |name: &str| match self.fairness {
            FairnessMode::Client => name
                .parse::<IpAddr>()
                .map_or_else(|_| name.to_owned(), |ip| ip.to_string()),
            FairnessMode::Off | FairnessMode::Tenant => name.to_owned(),
        };
        FairnessSettings {
            mode: self.fairness,
            weights: self
                .tenant_weights
                .iter()
                .map(|(name, w)| (canonical(name), *w))
                .collect(),
            max_flows: self.fairness_max_flows,
        }
    }

    /// --tenant-weight names what --fairness keys flows by, once each, with a weight in range.
    fn validate_fairness(&self) -> Result<(), Error> {
        let invalid = |reason: String| {
            Err(Error::InvalidConfig {
                flag: "tenant-weight",
                reason,
            })
        };
        if self.fairness_max_flows == 0 {
            return Err(Error::InvalidConfig {
                flag: "fairness-max-flows",
                reason: "must be at least 1".to_owned(),
            });
        }
        if self.fairness == FairnessMode::Off && !self.tenant_weights.is_empty() {
            return invalid("weighs flows, which only --fairness client or tenant makes".into());
        }
        for (name, weight) in &self.tenant_weights {
            if !(1..=MAX_WEIGHT).contains(weight) {
                return invalid(format!("{name}={weight}: W must be 1 to {MAX_WEIGHT}"));
            }
            let named = match self.fairness {
                FairnessMode::Client => name
                    .parse::<IpAddr>()
                    .map(|_| ())
                    .map_err(|_| "is not an IP address (--fairness client)"),
                FairnessMode::Off | FairnessMode::Tenant => {
                    tenant::check(name.as_bytes()).map(|_| ())
                }
            };
            if let Err(why) = named {
                return invalid(format!("{name:?} {why}"));
            }
        }
        let settings = self.fairness_settings();
        let mut names: Vec<&str> = settings.weights.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
            return invalid(format!("{} is named twice", twice[0]));
        }
        Ok(())
    }

    /// The TLS flags that must go together.
    fn validate_tls(&self) -> Result<(), Error> {
        let invalid = |flag, reason: &str| {
            Err(Error::InvalidConfig {
                flag,
                reason: reason.to_owned(),
            })
        };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid(
                "tls-cert",
                "--tls-cert and --tls-key go together; give both",
            );
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return invalid(
                "tls-client-ca",
                "needs --tls-cert and --tls-key: client certificates are checked over TLS",
            );
        }
        let https = self
            .register
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"));
        if https && self.register_tls_ca.is_none() {
            return invalid(
                "register-tls-ca",
                "an https:// --register URL needs the CA bundle that signed the balancer's admin certificate",
            );
        }
        if self.register_tls_ca.is_some() && !https {
            return invalid(
                "register-tls-ca",
                "is only used with an https:// --register URL",
            );
        }
        if self.tls_handshake_timeout.is_zero() {
            return invalid("tls-handshake-timeout", "must be above zero");
        }
        if self.tls_reload_interval.is_zero() {
            return invalid("tls-reload-interval", "must be above zero");
        }
        Ok(())
    }

    /// The lengths warm-up runs: --warm-up-lengths, else the length buckets, else 16 and 128.
    pub fn warm_up_lengths(&self) -> Vec<usize> {
        if !self.warm_up_lengths.is_empty() {
            self.warm_up_lengths.clone()
        } else if !self.length_buckets.is_empty() {
            self.length_buckets.clone()
        } else {
            vec![16, 128]
        }
    }

    /// The model's config file (MODEL.tidepool.json) if there is one, with the flags laid
    /// over it: `--no-padding` turns padding off, `--pad` values replace the file's.
    pub fn model_file(&self) -> Result<ModelFile, Error> {
        let mut file = ModelFile::load_next_to(&self.model)?;
        if self.no_padding {
            file.padding = Some(false);
        }
        file.pad.extend(self.pad.iter().cloned());
        Ok(file)
    }
}

/// A model's own settings, in a JSON file next to it (`model.onnx.tidepool.json`), so that a
/// model travels with how it is served:
///
/// ```json
/// {"name": "minilm", "version": "2", "padding": true, "pad": {"input_ids": 0}}
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// The model's name in its metadata [default: the file name without `.onnx`].
    #[serde(default)]
    pub name: Option<String>,
    /// The model's version in its metadata [default: the ONNX file's own model version].
    #[serde(default)]
    pub version: Option<String>,
    /// False: batch only items of identical shapes (see `--no-padding`).
    #[serde(default)]
    pub padding: Option<bool>,
    /// Pad values by input name.
    #[serde(default)]
    pub pad: std::collections::BTreeMap<String, f64>,
}

impl ModelFile {
    /// The config file's path for a model: the model's path with `.tidepool.json` appended.
    pub fn path_for(model: &std::path::Path) -> PathBuf {
        let mut name = model.as_os_str().to_owned();
        name.push(".tidepool.json");
        PathBuf::from(name)
    }

    /// Reads the config file next to `model`; no file is an empty config.
    pub fn load_next_to(model: &std::path::Path) -> Result<ModelFile, Error> {
        let path = ModelFile::path_for(model);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ModelFile::default()),
            Err(e) => {
                return Err(Error::ModelConfig {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_str(&text).map_err(|e| Error::ModelConfig {
            path,
            reason: format!("{e} (expected keys: name, version, padding, pad)"),
        })
    }

    /// The padding settings it describes.
    pub fn padding(&self) -> crate::spec::PaddingOptions {
        crate::spec::PaddingOptions {
            enabled: self.padding.unwrap_or(true),
            values: self.pad.clone(),
        }
    }
}

/// The largest `--tenant-weight`: enough for any sensible ratio, and a flow's turn stays short.
const MAX_WEIGHT: u32 = 1000;

/// Parses `NAME=W` for `--tenant-weight` (the range is checked with the rest).
fn parse_weight(s: &str) -> Result<(String, u32), String> {
    parse_pair(s, "NAME=W, like acme=2", "a whole number")
}

/// Parses `NAME=VALUE` for `--pad`.
fn parse_pad(s: &str) -> Result<(String, f64), String> {
    parse_pair(s, "NAME=VALUE, like input_ids=0", "a number")
}

/// Parses `NAME=VALUE` with a value of type `T`: `form` shows the form, `what` says what
/// the value must be.
fn parse_pair<T: std::str::FromStr>(
    s: &str,
    form: &str,
    what: &str,
) -> Result<(String, T), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected {form}"))?;
    let value = value
        .trim()
        .parse::<T>()
        .map_err(|_| format!("{s:?}: the value {value:?} is not {what}"))?;
    Ok((name.trim().to_owned(), value))
}

/// The kinds of synthetic model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum SynthKind {
    /// MatMul + bias + Relu layers over a feature vector.
    #[default]
    Mlp,
    /// A transformer encoder over token ids with an attention mask.
    Transformer,
}

/// `tidepool-worker synth`: the shape and size of a synthetic model.
#[derive(Clone, Debug, Args)]
pub struct SynthConfig {
    /// Where to write the model (`.onnx`); large weights go to PATH.data next to it.
    #[arg(long)]
    pub out: PathBuf,

    /// What to build: an MLP (`mlp`, sized by --size) or a transformer encoder
    /// (`transformer`: token embeddings, --layers attention + MLP blocks of --width, a masked
    /// mean pool), the shape of a real text model.
    #[arg(long, value_enum, default_value_t = SynthKind::Mlp)]
    pub kind: SynthKind,

    /// About how many bytes of f32 weights, like `64MiB` or `1GiB` (--kind mlp, which needs
    /// it).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,

    /// The transformer's hidden width (BERT-base: 768).
    #[arg(long, default_value_t = 256)]
    pub width: usize,

    /// The transformer's attention heads; the width must divide by it [default: width / 64].
    #[arg(long)]
    pub heads: Option<usize>,

    /// The transformer's vocabulary: token ids are below it.
    #[arg(long, default_value_t = 1000)]
    pub vocab: usize,

    /// Features per input item [default: the hidden width].
    #[arg(long)]
    pub input_dim: Option<usize>,

    /// Features per output item [default: the hidden width].
    #[arg(long)]
    pub output_dim: Option<usize>,

    /// Number of MatMul layers (at least 1).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,

    /// Seed for the weights: the same seed writes the same model.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// The ONNX Runtime shared library (libonnxruntime.so); scripts/fetch-ort.sh fetches it.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
}

/// Parses `5ms`, `30s`, `1m`; a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected a duration like 5ms or 30s)"))
}

/// Parses a byte size: `1024`, `64KiB`, `64MiB`, `1GiB`, `1.5GB` (decimal units are powers of
/// ten, binary units powers of two).
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("{s:?} is not a size like 64MiB, 1GiB or 1024 (bytes)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_flags_and_the_model_file_combine() {
        let dir = std::env::temp_dir().join(format!("tidepool-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("m.onnx");
        let cli = Cli::try_parse_from([
            "tidepool-worker",
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--pad",
            "input_ids=1,attention_mask=0",
            "--max-batch-tokens",
            "4096",
            "--length-buckets",
            "32,128",
        ])
        .unwrap();
        let Command::Serve(mut c) = cli.command else {
            panic!("serve")
        };
        assert_eq!(c.max_batch_tokens, Some(4096));
        assert_eq!(c.warm_up_lengths(), vec![32, 128]);
        // No file: the flags alone.
        let file = c.model_file().unwrap();
        assert_eq!(file.padding().values["input_ids"], 1.0);
        assert!(file.padding().enabled);
        std::fs::write(
            ModelFile::path_for(&model),
            r#"{"name": "minilm", "padding": true, "pad": {"input_ids": 3, "token_type_ids": 0}}"#,
        )
        .unwrap();
        c.no_padding = true;
        let file = c.model_file().unwrap();
        assert_eq!(file.name.as_deref(), Some("minilm"));
        assert!(!file.padding().enabled, "--no-padding wins");
        assert_eq!(file.pad["input_ids"], 1.0, "--pad wins over the file");
        assert_eq!(file.pad["token_type_ids"], 0.0);
        std::fs::write(ModelFile::path_for(&model), r#"{"pading": false}"#).unwrap();
        let err = c.model_file().unwrap_err();
        assert!(
            err.to_string().contains("pading") && err.to_string().contains("m.onnx.tidepool.json"),
            "{err}"
        );
        assert!(parse_pad("ids").unwrap_err().contains("NAME=VALUE"));
        assert!(parse_pad("ids=x").unwrap_err().contains("not a number"));
        c.length_buckets = vec![128, 32];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--length-buckets"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn instances_share_the_threads_at_least_one_each() {
        let cli = Cli::try_parse_from([
            "tidepool-worker",
            "serve",
            "--model",
            "m.onnx",
            "--instances",
            "2",
            "--threads",
            "5",
        ])
        .unwrap();
        let Command::Serve(mut c) = cli.command else {
            panic!("parsed the wrong subcommand")
        };
        assert_eq!(c.instances, 2);
        assert_eq!(c.instance_threads(), Some(2));
        c.threads = Some(1);
        assert_eq!(c.instance_threads(), Some(1), "never fewer than one");
        c.threads = None;
        assert!(c.instance_threads().is_some_and(|t| t >= 1));
        c.instances = 1;
        assert_eq!(
            c.instance_threads(),
            None,
            "one instance: ONNX Runtime's default"
        );
        c.instances = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--instances"));
    }

    #[test]
    fn runtime_threads_and_spinning_are_read_from_flags() {
        let cli = Cli::try_parse_from([
            "tidepool-worker",
            "serve",
            "--model",
            "m.onnx",
            "--runtime-threads",
            "3",
            "--ort-spinning",
            "true",
        ])
        .unwrap();
        let Command::Serve(c) = cli.command else {
            panic!("parsed the wrong subcommand")
        };
        assert_eq!(c.io_threads(), 3);
        assert!(c.ort_spinning);
        let mut c = ServeConfig::new("m.onnx", "127.0.0.1:0");
        c.runtime_threads = 5000;
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                flag: "runtime-threads",
                ..
            })
        ));
    }

    #[test]
    fn runtime_nice_is_read_and_checked() {
        let cli = Cli::try_parse_from([
            "tidepool-worker",
            "serve",
            "--model",
            "m.onnx",
            "--runtime-nice",
            "4",
        ])
        .unwrap();
        let Command::Serve(c) = cli.command else {
            panic!("parsed the wrong subcommand")
        };
        assert_eq!(c.runtime_nice, 4);
        // (validate may refuse the missing model file, never the value)
        assert!(!matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                flag: "runtime-nice",
                ..
            })
        ));
        for bad in [-1, 20] {
            let mut c = ServeConfig::new("m.onnx", "127.0.0.1:0");
            c.runtime_nice = bad;
            assert!(
                matches!(
                    c.validate(),
                    Err(Error::InvalidConfig {
                        flag: "runtime-nice",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            ServeConfig::new("m.onnx", "127.0.0.1:0").runtime_nice,
            0,
            "off"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5KB"), Ok(1500));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn cli_parses_serve_and_synth() {
        let cli = Cli::try_parse_from([
            "tidepool-worker",
            "serve",
            "--model",
            "m.onnx",
            "--max-delay",
            "0",
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        match cli.command {
            Command::Serve(c) => {
                assert_eq!(c.max_delay, Duration::ZERO);
                assert_eq!(c.max_batch, 32);
                assert_eq!(c.queue, 1024);
                assert!(!c.ort_spinning);
                assert!(c.io_threads() >= 1, "0 picks at least one runtime thread");
            }
            Command::Synth(_) => panic!("parsed the wrong subcommand"),
        }
        let cli = Cli::try_parse_from([
            "tidepool-worker",
            "synth",
            "--out",
            "x.onnx",
            "--size",
            "1MiB",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Synth(SynthConfig {
                size: Some(1_048_576),
                kind: SynthKind::Mlp,
                layers: 4,
                ..
            })
        ));
    }

    #[test]
    fn validate_refuses_before_binding() {
        let mut c = ServeConfig::new("/nonexistent.onnx", "127.0.0.1:0");
        c.max_batch = 0;
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                flag: "max-batch",
                ..
            })
        ));
        c.max_batch = 4;
        c.listen = "nowhere".into();
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig { flag: "listen", .. })
        ));
        c.listen = "127.0.0.1:0".into();
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig { flag: "model", .. })
        ));
    }

    #[test]
    fn the_frame_budget_must_admit_the_largest_frame() {
        let mut c = ServeConfig::new("/nonexistent.onnx", "127.0.0.1:0");
        // The defaults: 64 MiB frames in a 256 MiB budget.
        assert_eq!(c.budget().largest_frame(), 64 << 20);
        c.frame_budget = 64 << 20;
        let err = c.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConfig {
                    flag: "frame-budget",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("lower --max-frame"), "{err}");
        c.max_frame = 16 << 20;
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig { flag: "model", .. })
        ));
        c.connection_frame_budget = Some(8 << 20);
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                flag: "frame-budget",
                ..
            })
        ));
        assert_eq!(ServeConfig::limit(Duration::ZERO), None);
        assert_eq!(
            ServeConfig::limit(Duration::from_secs(1)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn missing_ort_lib_names_the_fetch_script() {
        let model = std::env::current_exe().unwrap();
        let mut c = ServeConfig::new(model, "127.0.0.1:0");
        c.ort_lib = None;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("scripts/fetch-ort.sh"), "{err}");
        c.ort_lib = Some("/nonexistent/libonnxruntime.so".into());
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("make ort"), "{err}");
    }

    #[test]
    fn tenant_weights_are_checked_against_the_fairness_mode() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(
                ["tidepool-worker", "serve", "--model", "m.onnx"]
                    .iter()
                    .chain(args),
            )
            .unwrap();
            let Command::Serve(c) = cli.command else {
                panic!("serve")
            };
            c
        };
        let c = parse(&["--fairness", "tenant", "--tenant-weight", "acme=3,beta=1"]);
        c.validate_fairness().unwrap();
        let settings = c.fairness_settings();
        assert_eq!(settings.mode, FairnessMode::Tenant);
        assert_eq!(
            settings.weights,
            vec![("acme".to_owned(), 3), ("beta".to_owned(), 1)]
        );
        assert_eq!(settings.max_flows, 256);
        let refused = [
            &["--tenant-weight", "acme=3"][..],
            &["--fairness", "tenant", "--tenant-weight", "acme=0"],
            &["--fairness", "tenant", "--tenant-weight", "acme=1001"],
            &["--fairness", "tenant", "--tenant-weight", "a=1,a=2"],
            &["--fairness", "client", "--tenant-weight", "acme=2"],
            &["--fairness", "client", "--tenant-weight", "::1=2,0:0::1=3"],
            &["--fairness", "client", "--fairness-max-flows", "0"],
        ];
        for args in refused {
            assert!(parse(args).validate_fairness().is_err(), "{args:?}");
        }
        let c = parse(&["--fairness", "client", "--tenant-weight", "0:0::1=2"]);
        c.validate_fairness().unwrap();
        assert_eq!(c.fairness_settings().weights, vec![("::1".to_owned(), 2)]);
        assert!(Cli::try_parse_from([
            "tidepool-worker",
            "serve",
            "--model",
            "m",
            "--tenant-weight",
            "acme"
        ])
        .is_err());
    }
}
