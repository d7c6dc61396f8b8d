//! One [`Config`] struct: every flag, its environment variable and its default, checked by
//! [`Config::validate`] before any socket is bound.
//!
//! Names and defaults follow AWS NLB's target groups where NLB has them (health check
//! interval 30 s, timeout 10 s, healthy threshold 5, unhealthy threshold 2,
//! deregistration delay 300 s, idle timeout 350 s, fail-open on).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use ipnet::IpNet;

use crate::auth::{AdminToken, ADMIN_TOKEN_ENV, MAKE_TOKEN};
use crate::autoscale::AutoscaleConfig;
use crate::error::Error;
use crate::validation::parse_net;

/// The default of `--max-targets`.
pub const MAX_TARGETS: usize = 256;

/// How each request picks its target among the eligible ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoutingPolicy {
    /// Power of two random choices: the less loaded of two targets drawn at random.
    P2c,
    /// The least loaded of all targets, ties broken at random.
    FullScan,
    /// Each target in turn, ignoring load and weight (the benchmark's baseline).
    RoundRobin,
}

/// Whether the balancer refuses requests that no target can answer by their deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Admission {
    /// From each worker's reported batch times and the requests outstanding on it: a
    /// request with a `deadline_ms` that even the best eligible target is predicted to
    /// answer late is answered at once (`overloaded` with a `retry_after_ms`), never
    /// forwarded. Requests without a deadline, and targets that report no batch times
    /// (older workers, `--batching fixed`), are not affected.
    #[default]
    Predicted,
    /// Forward every request; only the workers judge deadlines.
    Off,
}

/// How a target's health is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HealthProtocol {
    /// Open a connection, send `ping`; only `pong` within the timeout passes.
    Tidepool,
    /// Open a TCP connection within the timeout.
    Tcp,
}

/// The balancer's configuration: flags with environment fallbacks.
#[derive(Clone, Debug, PartialEq, Parser)]
#[command(name = "tidepool-balancer", version, about)]
pub struct Config {
    /// Address clients connect to.
    #[arg(long, env = "TIDEPOOL_LISTEN", default_value = "0.0.0.0:7000")]
    pub listen: SocketAddr,

    /// Address of the HTTP admin API and /metrics.
    #[arg(long, env = "TIDEPOOL_ADMIN", default_value = "127.0.0.1:7001")]
    pub admin: SocketAddr,

    /// A target `host:port`, registered at start (repeatable; comma-separated in the env).
    #[arg(long = "target", env = "TIDEPOOL_TARGETS", value_delimiter = ',')]
    pub targets: Vec<String>,

    /// A DNS name `name:port` whose addresses are all targets, re-resolved every
    /// --dns-interval; addresses that vanish are deregistered (repeatable).
    #[arg(
        long = "target-dns",
        env = "TIDEPOOL_TARGET_DNS",
        value_delimiter = ','
    )]
    pub target_dns: Vec<String>,

    /// How often --target-dns names are resolved again.
    #[arg(long, env = "TIDEPOOL_DNS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub dns_interval: Duration,

    /// Routing policy per request.
    #[arg(long, env = "TIDEPOOL_ROUTING", value_enum, default_value = "p2c")]
    pub routing: RoutingPolicy,

    /// Persistent multiplexed connections kept open to each target.
    #[arg(long, env = "TIDEPOOL_CONNECTIONS_PER_TARGET", default_value_t = 2)]
    pub connections_per_target: usize,

    /// Health check kind.
    #[arg(
        long,
        env = "TIDEPOOL_HEALTH_PROTOCOL",
        value_enum,
        default_value = "tidepool"
    )]
    pub health_protocol: HealthProtocol,

    /// Time between two health checks of one target.
    #[arg(long, env = "TIDEPOOL_HEALTH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Time a health check may take before it counts as failed.
    #[arg(long, env = "TIDEPOOL_HEALTH_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Time one attempt to open a connection to a target may take before it is given up
    /// and retried with backoff.
    #[arg(long, env = "TIDEPOOL_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Consecutive passed checks that make a target healthy.
    #[arg(long, env = "TIDEPOOL_HEALTHY_THRESHOLD", default_value_t = 5)]
    pub healthy_threshold: u32,

    /// Consecutive failed checks that make a target unhealthy.
    #[arg(long, env = "TIDEPOOL_UNHEALTHY_THRESHOLD", default_value_t = 2)]
    pub unhealthy_threshold: u32,

    /// How long a deregistered target may finish its in-flight requests before the rest
    /// are answered `unavailable` and its connections close.
    #[arg(long, env = "TIDEPOOL_DEREGISTRATION_DELAY", default_value = "300s", value_parser = humantime::parse_duration)]
    pub deregistration_delay: Duration,

    /// When no target is healthy, route to every registered target (as NLB does) instead
    /// of answering `unavailable`.
    #[arg(long, env = "TIDEPOOL_FAIL_OPEN", default_value_t = true, action = ArgAction::Set)]
    pub fail_open: bool,

    /// Client connections with no traffic and nothing in flight for this long are closed.
    #[arg(long, env = "TIDEPOOL_IDLE_TIMEOUT", default_value = "350s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Most requests outstanding on one target; more wait in the balancer's queue.
    /// Unlimited when absent.
    #[arg(long, env = "TIDEPOOL_MAX_OUTSTANDING")]
    pub max_outstanding: Option<usize>,

    /// Predicted-finish admission: refuse at once a request with a deadline that even the
    /// best eligible target is predicted to answer late (from its reported batch times and
    /// the requests outstanding on it), instead of forwarding it.
    #[arg(
        long,
        env = "TIDEPOOL_ADMISSION",
        value_enum,
        default_value = "predicted"
    )]
    pub admission: Admission,

    /// Requests that may wait in the balancer for a target below --max-outstanding;
    /// past it requests are answered `overloaded`.
    #[arg(long, env = "TIDEPOOL_QUEUE", default_value_t = 1024)]
    pub queue: usize,

    /// Longest wait in the balancer's queue before `overloaded`.
    #[arg(long, env = "TIDEPOOL_QUEUE_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub queue_timeout: Duration,

    /// Requests one client connection may have in flight before the balancer stops
    /// reading from it (TCP backpressure).
    #[arg(long, env = "TIDEPOOL_MAX_CLIENT_IN_FLIGHT", default_value_t = 4096)]
    pub max_client_in_flight: usize,

    /// Largest frame accepted from clients and targets (`64MiB`, `1GiB`, or bytes). Must
    /// not exceed the workers' --max-frame (64MiB by default): a forwarded frame above it
    /// would close a connection that carries other clients' requests. At most
    /// --connection-frame-budget.
    #[arg(long, env = "TIDEPOOL_MAX_FRAME", default_value = "64MiB", value_parser = parse_size)]
    pub max_frame: usize,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before the rest
    /// are answered `shutting_down`.
    #[arg(long, env = "TIDEPOOL_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Threads of the async runtime. 1 (the default) runs every task on one thread, so
    /// that handing a frame from one task to another never wakes another thread: on a
    /// machine whose cores are shared with the targets this costs less CPU per frame
    /// (bench/intro/last-run.md). 0 starts one worker thread per CPU core, N starts N;
    /// worth it when the balancer has several cores to itself and one is not enough.
    #[arg(long, env = "TIDEPOOL_RUNTIME_THREADS", default_value_t = 1)]
    pub runtime_threads: usize,

    /// Client listener shards. 1 (the default): one client listener, on the runtime of
    /// --runtime-threads. N: N listeners on the same port (SO_REUSEPORT, the kernel spreads
    /// new connections over them), each on its own thread with its own single-threaded
    /// runtime and its own --connections-per-target connections to each target, so that a
    /// request and its answer stay on one core. 0: one shard per CPU core. The shards
    /// share the target group (one exact outstanding count per target, so
    /// --max-outstanding and least-outstanding hold across them), the wait queue, the
    /// frame budget, --max-connections and the admin API; the admin API, health checks and
    /// the wait queue run on the --runtime-threads runtime.
    #[arg(long, env = "TIDEPOOL_SHARDS", default_value_t = 1)]
    pub shards: usize,

    /// Autoscaling: the load signal, the policy and what acts on it.
    #[command(flatten)]
    pub autoscale: AutoscaleConfig,

    /// File holding the admin API's bearer token (one line of at least 32 visible ASCII
    /// characters; make one with `head -c 32 /dev/urandom | base64 > admin.token`).
    /// Every mutating endpoint and GET /targets then need `Authorization: Bearer TOKEN`.
    /// The token can come from the environment variable TIDEPOOL_ADMIN_TOKEN instead; it
    /// has no flag of its own, since a flag's value shows in `ps`.
    #[arg(long, env = "TIDEPOOL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The admin token itself: `main` fills it from TIDEPOOL_ADMIN_TOKEN; a program
    /// embedding the balancer sets it directly. Never a flag (see --admin-token-file).
    #[arg(skip)]
    pub admin_token: Option<AdminToken>,

    /// Serve the admin API on a non-loopback --admin address without a token: anyone who
    /// reaches the port can then change routing. Only for networks nothing else can reach.
    #[arg(long, env = "TIDEPOOL_ADMIN_INSECURE_NO_AUTH")]
    pub admin_insecure_no_auth: bool,

    /// Require the admin token for GET /metrics and GET /scaling too (GET /healthz stays
    /// open for probes). Prometheus then needs `authorization: {credentials_file: ...}`,
    /// KEDA a TriggerAuthentication of type bearer.
    #[arg(long, env = "TIDEPOOL_ADMIN_AUTH_READS")]
    pub admin_auth_reads: bool,

    /// Most targets registered at once; registrations past it are refused (429 at the
    /// admin API).
    #[arg(long, env = "TIDEPOOL_MAX_TARGETS", default_value_t = MAX_TARGETS)]
    pub max_targets: usize,

    /// Networks registered targets must be in, as CIDRs or single addresses (repeatable;
    /// comma-separated in the env). Any address when absent.
    #[arg(long, env = "TIDEPOOL_REGISTER_ALLOW", value_delimiter = ',', value_parser = parse_net)]
    pub register_allow: Vec<IpNet>,

    /// Bytes of client frames being read or held (until their answer is written or they are
    /// refused), all connections together. A connection whose next frame does not fit stops
    /// being read (TCP backpressure) instead of allocating it.
    #[arg(long, env = "TIDEPOOL_FRAME_BUDGET", default_value = "256MiB", value_parser = parse_size)]
    pub frame_budget: usize,

    /// Most of --frame-budget one client connection may hold at once.
    #[arg(long, env = "TIDEPOOL_CONNECTION_FRAME_BUDGET", default_value = "64MiB", value_parser = parse_size)]
    pub connection_frame_budget: usize,

    /// A client frame whose first byte has arrived must be complete within this, or the
    /// connection is closed (time waiting for --frame-budget excluded). Also the longest a
    /// client may leave its answers unread while the balancer waits to write them.
    #[arg(long, env = "TIDEPOOL_FRAME_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub frame_timeout: Duration,

    /// Most open client connections; beyond it a new one is answered `unavailable` and
    /// closed.
    #[arg(long, env = "TIDEPOOL_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// The longest a request without a `deadline_ms` may take, from the moment its frame was
    /// read; a request with one gets the shorter of the two. Past it the balancer answers
    /// `deadline_exceeded` and sends `cancel` to the target. Must be above zero: every
    /// request ends.
    #[arg(long, env = "TIDEPOOL_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// An upstream connection with nothing written for this long sends a `ping`, so that a
    /// worker's idle timeout (350 s by default) never closes a connection the balancer is
    /// about to use. Must be below the workers' --idle-timeout.
    #[arg(long, env = "TIDEPOOL_UPSTREAM_KEEPALIVE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_keepalive: Duration,
    /// TLS on the client listener: the certificate chain (PEM), with --tls-key.
    #[arg(long, env = "TIDEPOOL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TIDEPOOL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS on the client listener: clients must present a certificate signed by a
    /// CA in this bundle (PEM).
    #[arg(long, env = "TIDEPOOL_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// TLS to the targets: the CA bundle (PEM) their certificates must chain to. Health
    /// checks use the same TLS.
    #[arg(long, env = "TIDEPOOL_UPSTREAM_TLS_CA")]
    pub upstream_tls_ca: Option<PathBuf>,

    /// The name the targets' certificates must carry [default: each target's IP address].
    #[arg(
        long,
        env = "TIDEPOOL_UPSTREAM_TLS_SERVER_NAME",
        requires = "upstream_tls_ca"
    )]
    pub upstream_tls_server_name: Option<String>,

    /// The certificate (PEM) the balancer presents to targets that require one (workers
    /// with --tls-client-ca), with --upstream-tls-key.
    #[arg(long, env = "TIDEPOOL_UPSTREAM_TLS_CERT", requires_all = ["upstream_tls_key", "upstream_tls_ca"])]
    pub upstream_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --upstream-tls-cert.
    #[arg(
        long,
        env = "TIDEPOOL_UPSTREAM_TLS_KEY",
        requires = "upstream_tls_cert"
    )]
    pub upstream_tls_key: Option<PathBuf>,

    /// TLS on the admin API: the certificate chain (PEM), with --admin-tls-key.
    #[arg(long, env = "TIDEPOOL_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --admin-tls-cert.
    #[arg(long, env = "TIDEPOOL_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,

    /// Longest a TLS handshake may take, on any side, before the connection is closed.
    #[arg(long, env = "TIDEPOOL_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How often the TLS files are checked for changes (they are also re-read on SIGHUP);
    /// new handshakes use the new certificates, open connections keep theirs.
    #[arg(long, env = "TIDEPOOL_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
    /// Send a request once more, to another healthy target, when the connection it was
    /// written on is lost before its answer (inference is idempotent) and its deadline
    /// leaves time: `on` or `off`. The first answer wins; the client gets exactly one.
    #[arg(
        long,
        env = "TIDEPOOL_RETRIES",
        alias = "retry-on-loss",
        default_value = "on",
        action = ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub retries: bool,
    /// Retries allowed as a share of the requests of the last 10 s (Envoy's and Linkerd's
    /// retry budget), so that a failing pool is not sent twice its load.
    #[arg(long, env = "TIDEPOOL_RETRY_BUDGET_RATIO", default_value_t = 0.2)]
    pub retry_budget_ratio: f64,
    /// Retries allowed per second on top of the share, so that a quiet pool retries too.
    #[arg(long, env = "TIDEPOOL_RETRY_BUDGET_FLOOR", default_value_t = 10)]
    pub retry_budget_floor: u32,
    /// Eject a target from routing after this many `internal` or `unavailable` answers in
    /// a row (outlier detection); 0 turns ejection off.
    #[arg(long, env = "TIDEPOOL_EJECT_CONSECUTIVE", default_value_t = 5)]
    pub eject_consecutive: u32,
    /// How long a first ejection lasts; each further one lasts this times the number of
    /// ejections, up to --eject-max.
    #[arg(long, env = "TIDEPOOL_EJECT_BASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub eject_base: Duration,
    /// The longest an ejection lasts.
    #[arg(long, env = "TIDEPOOL_EJECT_MAX", default_value = "300s", value_parser = humantime::parse_duration)]
    pub eject_max: Duration,
    /// The most targets ejected at once, as a percentage of the target group (at least one
    /// target is always left in).
    #[arg(long, env = "TIDEPOOL_MAX_EJECTION_PERCENT", default_value_t = 50)]
    pub max_ejection_percent: u8,
    /// Hedge slow requests: a request still unanswered this long after it was written
    /// (a duration such as `50ms`, or `p99` for the 99th percentile of the answers of the
    /// last 10 s) is sent to a second target too; the first result wins and the other
    /// target is told to cancel. `off` by default: every hedge runs the model a second
    /// time, and a batching worker pays for it in compute and in its other requests'
    /// latency; turn it on when tail latency matters more than capacity.
    #[arg(long, env = "TIDEPOOL_HEDGE_AFTER", default_value = "off", value_parser = parse_hedge_after)]
    pub hedge_after: HedgeAfter,
    /// Hedges allowed as a share of the requests of the last 10 s (a budget of its own,
    /// shaped like the retry budget), so that a slow pool is not sent twice its load.
    #[arg(long, env = "TIDEPOOL_HEDGE_BUDGET_RATIO", default_value_t = 0.05)]
    pub hedge_budget_ratio: f64,
    /// Hedges allowed per second on top of the share.
    #[arg(long, env = "TIDEPOOL_HEDGE_BUDGET_FLOOR", default_value_t = 1)]
    pub hedge_budget_floor: u32,
}

/// When a still-unanswered request is hedged (`--hedge-after`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HedgeAfter {
    /// Never: no request is sent twice.
    #[default]
    Off,
    /// This long after it was written.
    After(Duration),
    /// After the 99th percentile of the latencies observed over the last 10 s (no hedge
    /// until 100 answers have been seen).
    P99,
}

impl std::fmt::Display for HedgeAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HedgeAfter::Off => f.write_str("off"),
            HedgeAfter::After(d) => write!(f, "{}", humantime::format_duration(*d)),
            HedgeAfter::P99 => f.write_str("p99"),
        }
    }
}

/// `off`, `p99` or a duration above zero.
fn parse_hedge_after(s: &str) -> Result<HedgeAfter, String> {
    match s.trim() {
        "off" => Ok(HedgeAfter::Off),
        "p99" => Ok(HedgeAfter::P99),
        other => match humantime::parse_duration(other) {
            Ok(d) if !d.is_zero() => Ok(HedgeAfter::After(d)),
            Ok(_) => {
                Err("0s would hedge every request; give a delay above zero, p99 or off".to_owned())
            }
            Err(e) => Err(format!("{e}; give a duration such as 50ms, p99 or off")),
        },
    }
}

impl Default for Config {
    /// The documented defaults, without reading the environment.
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            admin: SocketAddr::from(([127, 0, 0, 1], 7001)),
            targets: Vec::new(),
            target_dns: Vec::new(),
            dns_interval: Duration::from_secs(10),
            routing: RoutingPolicy::P2c,
            connections_per_target: 2,
            health_protocol: HealthProtocol::Tidepool,
            health_interval: Duration::from_secs(30),
            health_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            healthy_threshold: 5,
            unhealthy_threshold: 2,
            deregistration_delay: Duration::from_secs(300),
            fail_open: true,
            idle_timeout: Duration::from_secs(350),
            max_outstanding: None,
            admission: Admission::Predicted,
            queue: 1024,
            queue_timeout: Duration::from_secs(1),
            max_client_in_flight: 4096,
            max_frame: tidepool_protocol::DEFAULT_MAX_FRAME,
            drain_timeout: Duration::from_secs(30),
            runtime_threads: 1,
            shards: 1,
            autoscale: AutoscaleConfig::default(),
            admin_token_file: None,
            admin_token: None,
            admin_insecure_no_auth: false,
            admin_auth_reads: false,
            max_targets: MAX_TARGETS,
            register_allow: Vec::new(),
            frame_budget: 256 << 20,
            connection_frame_budget: 64 << 20,
            frame_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            request_timeout: Duration::from_secs(60),
            upstream_keepalive: Duration::from_secs(30),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            upstream_tls_ca: None,
            upstream_tls_server_name: None,
            upstream_tls_cert: None,
            upstream_tls_key: None,
            admin_tls_cert: None,
            admin_tls_key: None,
            tls_handshake_timeout: tidepool_protocol::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            tls_reload_interval: tidepool_protocol::tls::DEFAULT_RELOAD_POLL,
            retries: true,
            retry_budget_ratio: 0.2,
            retry_budget_floor: 10,
            eject_consecutive: 5,
            eject_base: Duration::from_secs(30),
            eject_max: Duration::from_secs(300),
            max_ejection_percent: 50,
            hedge_after: HedgeAfter::Off,
            hedge_budget_ratio: 0.05,
            hedge_budget_floor: 1,
        }
    }
}

impl Config {
    /// Checks every value that could only fail later, before anything is bound.
    pub fn validate(&self) -> Result<(), Error> {
        fn bad(flag: &'static str, problem: impl Into<String>) -> Result<(), Error> {
            Err(Error::Config {
                flag,
                problem: problem.into(),
            })
        }
        if self.connections_per_target == 0 || self.connections_per_target > 64 {
            return bad("connections-per-target", "must be between 1 and 64");
        }
        if self.healthy_threshold == 0 {
            return bad("healthy-threshold", "must be at least 1");
        }
        if self.unhealthy_threshold == 0 {
            return bad("unhealthy-threshold", "must be at least 1");
        }
        if self.health_interval.is_zero() {
            return bad("health-interval", "must be above zero");
        }
        if self.health_timeout.is_zero() {
            return bad("health-timeout", "must be above zero");
        }
        if self.health_timeout > self.health_interval {
            return bad(
                "health-timeout",
                format!(
                    "{} is longer than --health-interval {}; a check must end before the next starts",
                    humantime::format_duration(self.health_timeout),
                    humantime::format_duration(self.health_interval)
                ),
            );
        }
        if self.connect_timeout.is_zero() {
            return bad("connect-timeout", "must be above zero");
        }
        if self.dns_interval.is_zero() && !self.target_dns.is_empty() {
            return bad("dns-interval", "must be above zero");
        }
        if self.idle_timeout.is_zero() {
            return bad("idle-timeout", "must be above zero");
        }
        if self.max_outstanding == Some(0) {
            return bad(
                "max-outstanding",
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if self.max_client_in_flight == 0 {
            return bad("max-client-in-flight", "must be at least 1");
        }
        if self.runtime_threads > 1024 {
            return bad(
                "runtime-threads",
                "must be at most 1024 (0: one per CPU core)",
            );
        }
        if self.shards > 1024 {
            return bad("shards", "must be at most 1024 (0: one per CPU core)");
        }
        if self.max_frame < 64 || self.max_frame > u32::MAX as usize {
            return bad("max-frame", "must be between 64 bytes and 4 GiB");
        }
        if self.max_connections == 0 {
            return bad("max-connections", "must be at least 1");
        }
        if self.frame_timeout.is_zero() {
            return bad("frame-timeout", "must be above zero");
        }
        if self.request_timeout.is_zero() {
            return bad(
                "request-timeout",
                "must be above zero: it bounds requests that carry no deadline",
            );
        }
        if self.upstream_keepalive.is_zero() {
            return bad("upstream-keepalive", "must be above zero");
        }
        let largest = self.budget().largest_frame();
        if self.max_frame > largest {
            return bad(
                "frame-budget",
                format!(
                    "--max-frame {} does not fit: one frame may use 7/8 of --frame-budget and \
                     at most --connection-frame-budget; raise them or lower --max-frame",
                    self.max_frame
                ),
            );
        }
        for name in &self.target_dns {
            if name
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return bad("target-dns", format!("{name:?} is not NAME:PORT"));
            }
        }
        self.autoscale.validate()?;
        self.validate_resilience()?;
        self.validate_control_plane()?;
        validate_tls(self)?;
        Ok(())
    }

    /// The admin token: `admin_token` (TIDEPOOL_ADMIN_TOKEN) or `--admin-token-file`'s,
    /// read and checked again on every call; none when neither is given.
    pub fn admin_credentials(&self) -> Result<Option<AdminToken>, Error> {
        match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => Err(Error::Config {
                flag: "admin-token-file",
                problem: format!("{ADMIN_TOKEN_ENV} is set too; give the token one way"),
            }),
            (Some(token), None) => Ok(Some(token.clone())),
            (None, Some(path)) => AdminToken::from_file(path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The admin token and the target rules' flags.
    /// The retry budget and outlier detection.
    fn validate_resilience(&self) -> Result<(), Error> {
        let bad = |flag, problem: String| Err(Error::Config { flag, problem });
        if !(0.0..=1.0).contains(&self.retry_budget_ratio) {
            return bad(
                "retry-budget-ratio",
                format!(
                    "{} is not a share between 0 and 1 (0.2 allows one retry per five requests)",
                    self.retry_budget_ratio
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.hedge_budget_ratio) {
            return bad(
                "hedge-budget-ratio",
                format!(
                    "{} is not a share between 0 and 1 (0.05 allows one hedge per twenty requests)",
                    self.hedge_budget_ratio
                ),
            );
        }
        if self.max_ejection_percent > 100 {
            return bad(
                "max-ejection-percent",
                format!("{} is above 100", self.max_ejection_percent),
            );
        }
        if self.eject_consecutive > 0 && self.eject_base.is_zero() {
            return bad(
                "eject-base",
                "must be above zero while --eject-consecutive is on".to_owned(),
            );
        }
        if self.eject_max < self.eject_base {
            return bad(
                "eject-max",
                format!(
                    "{} is shorter than --eject-base {}",
                    humantime::format_duration(self.eject_max),
                    humantime::format_duration(self.eject_base)
                ),
            );
        }
        Ok(())
    }

    fn validate_control_plane(&self) -> Result<(), Error> {
        let bad = |flag, problem: String| Err(Error::Config { flag, problem });
        let token = self.admin_credentials()?;
        if token.is_none() && !self.admin.ip().is_loopback() && !self.admin_insecure_no_auth {
            return bad(
                "admin-token-file",
                format!(
                    "the admin API would listen on {} (beyond loopback) without a token, and \
                     anyone who reaches it could change where requests go. Make a token with \
                     `{MAKE_TOKEN}` and pass --admin-token-file admin.token (or set \
                     {ADMIN_TOKEN_ENV}), or bind --admin 127.0.0.1:{}, or, on a network nothing \
                     else can reach, pass --admin-insecure-no-auth",
                    self.admin,
                    self.admin.port()
                ),
            );
        }
        if token.is_some() && self.admin_insecure_no_auth {
            return bad(
                "admin-insecure-no-auth",
                "a token is given too; leave out one of the two".to_owned(),
            );
        }
        if self.max_targets == 0 {
            return bad("max-targets", "must be at least 1".to_owned());
        }
        if self.targets.len() > self.max_targets {
            return bad(
                "max-targets",
                format!(
                    "{} is fewer than the {} --target addresses",
                    self.max_targets,
                    self.targets.len()
                ),
            );
        }
        let scaling = &self.autoscale;
        if scaling.autoscale && scaling.worker_cmd.is_some() {
            if scaling.max_workers > self.max_targets {
                return bad(
                    "max-targets",
                    format!(
                        "{} is below --max-workers {}: the workers could not all register",
                        self.max_targets, scaling.max_workers
                    ),
                );
            }
            let local = std::net::IpAddr::from([127, 0, 0, 1]);
            if !self.register_allow.is_empty()
                && !self.register_allow.iter().any(|n| n.contains(&local))
            {
                return bad(
                    "register-allow",
                    "--worker-cmd workers register 127.0.0.1 addresses; allow 127.0.0.1".to_owned(),
                );
            }
        }
        Ok(())
    }
}

impl Config {
    /// The budget client frames are read within (`--frame-budget`,
    /// `--connection-frame-budget`).
    pub fn budget(&self) -> tidepool_protocol::FrameBudget {
        tidepool_protocol::FrameBudget::new(self.frame_budget, self.connection_frame_budget)
    }
}

/// Checks that the TLS flags go together (clap's `requires` catches most of it on the
/// command line; this also covers a `Config` built in code).
fn validate_tls(config: &Config) -> Result<(), Error> {
    let bad = |flag: &'static str, problem: &str| {
        Err(Error::Config {
            flag,
            problem: problem.to_owned(),
        })
    };
    if config.tls_cert.is_some() != config.tls_key.is_some() {
        return bad(
            "tls-cert",
            "--tls-cert and --tls-key go together; give both",
        );
    }
    if config.tls_client_ca.is_some() && config.tls_cert.is_none() {
        return bad(
            "tls-client-ca",
            "needs --tls-cert and --tls-key: client certificates are checked over TLS",
        );
    }
    if config.admin_tls_cert.is_some() != config.admin_tls_key.is_some() {
        return bad(
            "admin-tls-cert",
            "--admin-tls-cert and --admin-tls-key go together; give both",
        );
    }
    if config.upstream_tls_cert.is_some() != config.upstream_tls_key.is_some() {
        return bad(
            "upstream-tls-cert",
            "--upstream-tls-cert and --upstream-tls-key go together; give both",
        );
    }
    let upstream_extras =
        config.upstream_tls_cert.is_some() || config.upstream_tls_server_name.is_some();
    if upstream_extras && config.upstream_tls_ca.is_none() {
        return bad(
            "upstream-tls-ca",
            "is needed for --upstream-tls-cert or --upstream-tls-server-name: the CA that signed the targets' certificates",
        );
    }
    if let Some(name) = &config.upstream_tls_server_name {
        if let Err(error) = tidepool_protocol::tls::server_name(name) {
            return bad("upstream-tls-server-name", &error.to_string());
        }
    }
    if config.tls_handshake_timeout.is_zero() {
        return bad("tls-handshake-timeout", "must be above zero");
    }
    if config.tls_reload_interval.is_zero() {
        return bad("tls-reload-interval", "must be above zero");
    }
    Ok(())
}

/// Parses a byte size such as `64MiB`, `1GiB` or `1048576` (bytes).
fn parse_size(s: &str) -> Result<usize, String> {
    let size = s
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|_| format!("{s:?} is not a size like 64MiB, 1GiB or 1048576 (bytes)"))?;
    usize::try_from(size.as_u64()).map_err(|_| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_flags() {
        // Environment variables would override the flags' defaults; none is set in tests.
        let parsed = Config::parse_from(["tidepool-balancer"]);
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn durations_and_fail_open_parse() {
        let c = Config::parse_from([
            "tidepool-balancer",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "100ms",
            "--deregistration-delay",
            "5m",
            "--fail-open",
            "false",
            "--target",
            "127.0.0.1:1",
            "--target",
            "127.0.0.1:2",
            "--routing",
            "full-scan",
        ]);
        assert_eq!(c.health_interval, Duration::from_millis(200));
        assert_eq!(c.deregistration_delay, Duration::from_secs(300));
        assert!(!c.fail_open);
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.routing, RoutingPolicy::FullScan);
        c.validate().unwrap();
    }

    #[test]
    fn admission_is_predicted_unless_turned_off() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("tidepool-balancer").chain(args.iter().copied()))
                .map(|c| c.admission)
        };
        assert_eq!(parse(&[]).unwrap(), Admission::Predicted);
        assert_eq!(Config::default().admission, Admission::Predicted);
        assert_eq!(parse(&["--admission", "off"]).unwrap(), Admission::Off);
        assert_eq!(
            parse(&["--admission", "predicted"]).unwrap(),
            Admission::Predicted
        );
        assert!(parse(&["--admission", "maybe"]).is_err());
    }

    #[test]
    fn hedge_after_takes_off_p99_or_a_delay() {
        let parse = |v: &str| {
            Config::try_parse_from(["tidepool-balancer", "--hedge-after", v]).map(|c| c.hedge_after)
        };
        assert_eq!(parse("off").unwrap(), HedgeAfter::Off);
        assert_eq!(parse("p99").unwrap(), HedgeAfter::P99);
        assert_eq!(
            parse("20ms").unwrap(),
            HedgeAfter::After(Duration::from_millis(20))
        );
        for bad in ["0s", "p50", "soon"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("p99 or off"), "{bad}: {err}");
        }
        let c = Config {
            hedge_budget_ratio: 1.5,
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--hedge-budget-ratio"), "{err}");
    }

    #[test]
    fn validation_names_the_flag() {
        let c = Config {
            health_timeout: Duration::from_secs(60),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--health-timeout"), "{err}");
        let c = Config {
            target_dns: vec!["workers".to_owned()],
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_admin_api_beyond_loopback_needs_a_token_or_an_explicit_opt_out() {
        let open = Config {
            admin: "0.0.0.0:7001".parse().unwrap(),
            ..Config::default()
        };
        let err = open.validate().unwrap_err().to_string();
        for hint in [
            "--admin-token-file",
            "/dev/urandom",
            "127.0.0.1:7001",
            "--admin-insecure-no-auth",
        ] {
            assert!(err.contains(hint), "{err}");
        }
        let opted_out = Config {
            admin_insecure_no_auth: true,
            ..open.clone()
        };
        opted_out.validate().unwrap();
        let token = AdminToken::new(&"t".repeat(40)).unwrap();
        let with_token = Config {
            admin_token: Some(token.clone()),
            ..open.clone()
        };
        with_token.validate().unwrap();
        assert_eq!(with_token.admin_credentials().unwrap(), Some(token.clone()));
        let both = Config {
            admin_insecure_no_auth: true,
            ..with_token.clone()
        };
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--admin-insecure-no-auth"));
        let twice = Config {
            admin_token_file: Some("/nonexistent/admin.token".into()),
            ..with_token
        };
        let err = twice.validate().unwrap_err().to_string();
        assert!(err.contains("TIDEPOOL_ADMIN_TOKEN"), "{err}");
        let unreadable = Config {
            admin_token_file: Some("/nonexistent/admin.token".into()),
            ..open
        };
        let err = unreadable.validate().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/admin.token"), "{err}");
    }

    #[test]
    fn target_rule_flags_parse_and_validate() {
        let c = Config::parse_from([
            "tidepool-balancer",
            "--max-targets",
            "3",
            "--register-allow",
            "10.0.0.0/8,192.0.2.1",
            "--register-allow",
            "fd00::/8",
        ]);
        assert_eq!(c.max_targets, 3);
        let nets: Vec<String> = c.register_allow.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]);
        c.validate().unwrap();
        assert!(Config::try_parse_from(["tidepool-balancer", "--register-allow", "lan"]).is_err());

        let too_few = Config {
            max_targets: 1,
            targets: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            ..Config::default()
        };
        assert!(too_few
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--max-targets"));
        let none = Config {
            max_targets: 0,
            ..Config::default()
        };
        assert!(none.validate().is_err());
        let mut local_workers = Config {
            register_allow: vec![parse_net("10.0.0.0/8").unwrap()],
            ..Config::default()
        };
        local_workers.autoscale.autoscale = true;
        local_workers.autoscale.worker_cmd = Some("worker --port {port}".into());
        let err = local_workers.validate().unwrap_err().to_string();
        assert!(err.contains("--register-allow"), "{err}");
    }
}
