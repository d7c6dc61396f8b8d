//! [`Balancer`]: the composition root. It builds each owner from the configuration (the
//! target group, the router and its wait queue, the request lifecycle, the metrics, the
//! scaling status), hands each task the narrow context it needs, and runs the shutdown
//! sequence. Nothing in the crate imports this module.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AdminAuth, AdminToken};
use crate::autoscale::actuator::{Actuator, ProcessPool, ScaleCommand, SCALE_CMD_TIMEOUT};
use crate::autoscale::controller::StatusSlot;
use crate::config::{Config, HedgeAfter};
use crate::discovery::{resolve_one, Resolver, SystemResolver};
use crate::dispatch::{Router, RoutingSettings};
use crate::error::Error;
use crate::frontend::{Accept, ClientLimits, FrontendContext};
use crate::handle::Handle;
use crate::health::HealthCheck;
use crate::hedge::{HedgeDelay, HedgeSettings, Hedges, Watches};
use crate::metrics::{LatencyCounts, Metrics};
use crate::outlier::{OutlierSettings, Outliers};
use crate::pending::Lifecycle;
use crate::queue::{QueueHandle, QueueReceiver, QueueSignal, Reroute};
use crate::registry::{GroupSettings, TargetGroup};
use crate::retry::{Retries, RetrySettings};
use crate::shard::{self, ShardRuntimes, Shards};
use crate::target::Thresholds;
use crate::tls::{Tls, TlsListener};
use crate::upstream::UpstreamSettings;
use crate::validation::TargetRules;
use crate::{admin, autoscale, discovery, frontend};

/// After the drain, how long client connections may take to write their last answers
/// and the target group's tasks to end, before the balancer stops without them: a
/// client that does not read its answers must not hold the process.
const CONNECTION_GRACE: Duration = Duration::from_secs(2);

/// A balancer whose sockets are bound, ready to [`run`](Balancer::run).
pub struct Balancer {
    config: Config,
    group: TargetGroup,
    router: Arc<Router>,
    handle: Handle,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    scaling: StatusSlot,
    listener: ClientListener,
    admin: TcpListener,
    /// The admin API's token and refusal counts.
    auth: AdminAuth,
    /// The admin token, for the workers `--worker-cmd` starts.
    token: Option<AdminToken>,
    queue_rx: QueueReceiver,
    /// Hedging's task, its watches and its way into the queue, when `--hedge-after` is on.
    hedging: Option<(Hedges, Watches, Reroute)>,
    resolver: Arc<dyn Resolver>,
    /// `--target` addresses, resolved at bind time so that a typo fails at start.
    static_targets: Vec<SocketAddr>,
    /// TLS of the client listener, the admin API and towards the targets, where asked for.
    tls: Tls,
}

/// Where client connections are accepted (`--shards`).
enum ClientListener {
    /// One listener on the runtime `run` is called on.
    Single(TcpListener),
    /// One listener per shard, each on its shard's thread and runtime.
    Sharded(Shards),
}

impl ClientListener {
    async fn bind(config: &Config) -> Result<ClientListener, Error> {
        Ok(match shard::count(config.shards) {
            1 => ClientListener::Single(bind(config.listen, "listen")?),
            shards => ClientListener::Sharded(Shards::start(shards, config.listen).await?),
        })
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            ClientListener::Single(listener) => listener.local_addr().ok(),
            ClientListener::Sharded(shards) => Some(shards.addr()),
        }
    }

    /// The shards' runtimes, where the target group opens each shard's connections.
    fn runtimes(&self) -> ShardRuntimes {
        match self {
            ClientListener::Single(_) => ShardRuntimes::default(),
            ClientListener::Sharded(shards) => shards.runtimes(),
        }
    }
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("listen", &self.listen_addr())
            .field("admin", &self.admin_addr())
            .finish()
    }
}

impl Balancer {
    /// Validates `config`, reads the admin token, resolves `--target`s (each must pass the
    /// target rules) and binds both listeners.
    pub async fn bind(config: Config) -> Result<Balancer, Error> {
        Balancer::bind_with(config, Arc::new(SystemResolver)).await
    }

    /// As [`bind`](Balancer::bind), with `resolver` for `--target-dns` names.
    pub async fn bind_with(config: Config, resolver: Arc<dyn Resolver>) -> Result<Balancer, Error> {
        config.validate()?;
        let token = config.admin_credentials()?;
        // Certificates are read before anything is bound, so that a wrong path fails at start.
        let metrics = Arc::new(Metrics::default());
        let tls = Tls::load(&config, &metrics.tls_failures)?;
        let mut static_targets = Vec::with_capacity(config.targets.len());
        for target in &config.targets {
            static_targets.push(resolve_one(target).await?);
        }
        let listener = ClientListener::bind(&config).await?;
        let admin = bind(config.admin, "admin")?;
        // The bound addresses: with port 0 the real ports are only known now.
        let rules = TargetRules::new(
            vec![
                ("listen", listener.local_addr().unwrap_or(config.listen)),
                ("admin", admin.local_addr().unwrap_or(config.admin)),
            ],
            config.register_allow.clone(),
            config.max_targets,
        );
        for &addr in &static_targets {
            rules
                .check(addr)
                .map_err(|reason| Error::TargetRefused { addr, reason })?;
        }
        let auth = AdminAuth::new(
            token.clone(),
            config.admin_auth_reads,
            config.admin_insecure_no_auth && !config.admin.ip().is_loopback(),
        );

        let lifecycle = Arc::new(Lifecycle::default());
        let scaling = StatusSlot::default();
        let signal = Arc::new(QueueSignal::default());
        let (queue, queue_rx) =
            QueueHandle::new(config.queue, config.queue_timeout, Arc::clone(&signal));
        let (retries, outliers) = recovery(&config);
        let _ = metrics.recovery.set((retries.clone(), outliers.clone()));
        let hedges = hedging(&config);
        let _ = metrics.hedging.set(hedges.as_ref().map(|(h, _)| h.clone()));
        let queue = queue
            .with_retries(retries)
            .with_outliers(outliers)
            .with_hedges(hedges.as_ref().map(|(h, _)| h.clone()));
        let hedging = hedges.map(|(h, watches)| (h, watches, queue.reroute()));
        let group = TargetGroup::new(
            group_settings(&config, &tls, listener.runtimes()),
            rules,
            Arc::clone(&signal),
            queue.reroute(),
            Arc::clone(&metrics),
        );
        let router = Arc::new(Router::new(
            group.clone(),
            queue,
            routing_settings(&config),
            Arc::clone(&metrics),
        ));
        let handle = Handle::new(
            group.clone(),
            signal,
            Arc::clone(&lifecycle),
            Arc::clone(&metrics),
            Arc::clone(&scaling),
        );
        Ok(Balancer {
            config,
            group,
            router,
            handle,
            metrics,
            lifecycle,
            scaling,
            listener,
            admin,
            auth,
            token,
            queue_rx,
            hedging,
            resolver,
            static_targets,
            tls,
        })
    }

    /// The address clients connect to (the real port when bound to port 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// The admin API's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin)
    }

    /// A handle to read and change the running balancer's targets.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains: stops accepting, lets requests
    /// in flight finish within `--drain-timeout`, answers the rest `shutting_down`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        // Each owner moves to the task that needs it (`self` is taken apart field by field).
        let config = &self.config;
        let (group, lifecycle) = (&self.group, &self.lifecycle);
        // Past the drain deadline: the queue stops, targets close.
        let hard_stop = CancellationToken::new();
        // The admin API outlives the drain, so that it can be watched.
        let admin_stop = CancellationToken::new();

        let admin_addr = self.admin.local_addr().unwrap_or(config.admin);
        let queue_task = tokio::spawn({
            let (router, stop) = (Arc::clone(&self.router), hard_stop.clone());
            async move { router.run_queue(self.queue_rx, stop).await }
        });
        // Hedging stops with the queue it routes hedges through.
        let hedge_task = self.hedging.map(|(hedges, watches, reroute)| {
            let group = group.clone();
            let latency = move || {
                group
                    .snapshot()
                    .iter()
                    .fold(LatencyCounts::default(), |sum, t| {
                        sum.add(t.latency.counts())
                    })
            };
            tokio::spawn(hedges.run(watches, reroute, latency, hard_stop.clone()))
        });
        // Certificates are reloaded for as long as anything may handshake.
        let tls_tasks = TaskTracker::new();
        self.tls
            .watch(config.tls_reload_interval, &admin_stop, &tls_tasks);
        warn_if_open(config, self.token.is_some(), admin_addr);
        let admin_task = match self.tls.admin.clone() {
            None => tokio::spawn(admin::serve(
                self.admin,
                self.handle.clone(),
                self.auth,
                admin_stop.clone(),
            )),
            Some(tls) => tokio::spawn(admin::serve(
                TlsListener::new(self.admin, tls),
                self.handle.clone(),
                self.auth,
                admin_stop.clone(),
            )),
        };
        for addr in self.static_targets {
            // Checked at bind; only the cap could refuse one, and validate() checked it.
            if let Err(reason) = group.register(addr, 1) {
                tracing::warn!(target = %addr, %reason, "--target refused");
            }
        }
        let discovery_task = (!config.target_dns.is_empty()).then(|| {
            tokio::spawn(discovery::run(
                group.clone(),
                config.target_dns.clone(),
                self.resolver,
                config.dns_interval,
                shutdown.child_token(),
            ))
        });
        tracing::info!(
            listen = %self.listener.local_addr().unwrap_or(config.listen),
            shards = self.listener.runtimes().len().max(1),
            routing = ?config.routing,
            "balancer serving"
        );

        // The autoscaling loop outlives the drain: the workers it started must answer the
        // requests in flight before it stops them.
        let scaling_stop = CancellationToken::new();
        let scaling_task = tokio::spawn(autoscale::controller::run(
            self.handle,
            config.autoscale.policy(),
            config.autoscale.foresight(),
            actuator(config, admin_addr, self.token),
            self.scaling,
            scaling_stop.clone(),
            config.drain_timeout,
        ));

        let connections = TaskTracker::new();
        let frontend = FrontendContext {
            router: self.router,
            max_frame: config.max_frame,
            idle_timeout: config.idle_timeout,
            max_client_in_flight: config.max_client_in_flight,
            metrics: self.metrics,
            lifecycle: Arc::clone(lifecycle),
            limits: ClientLimits {
                budget: config.budget(),
                frame_timeout: config.frame_timeout,
                max_connections: config.max_connections,
                request_timeout: config.request_timeout,
            },
            tls: self.tls.client.clone(),
            accept: Accept::new(config.max_connections),
        };
        let _ = frontend
            .metrics
            .limits
            .budget
            .set(frontend.limits.budget.clone());
        // Every shard stops accepting before the drain begins.
        let shards = match self.listener {
            ClientListener::Single(listener) => {
                frontend::serve(listener, frontend, shutdown.clone(), connections.clone()).await;
                None
            }
            ClientListener::Sharded(mut shards) => {
                shards
                    .serve(|listener| {
                        frontend::serve(
                            listener,
                            frontend.clone(),
                            shutdown.clone(),
                            connections.clone(),
                        )
                    })
                    .await;
                Some(shards)
            }
        };

        group.close();
        let in_flight = lifecycle.live();
        tracing::info!(in_flight, timeout = %humantime::format_duration(config.drain_timeout), "shutting down: draining");
        tokio::select! {
            () = lifecycle.all_done() => tracing::info!("drained: every request answered"),
            () = tokio::time::sleep(config.drain_timeout) => tracing::warn!(
                unanswered = lifecycle.live(),
                "drain timeout passed; answering the rest shutting_down"
            ),
        }
        lifecycle.set_stopping();
        scaling_stop.cancel();
        if let Err(join) = scaling_task.await {
            tracing::warn!(%join, "autoscaling task failed");
        }
        hard_stop.cancel();
        group.stop();
        let _ = queue_task.await;
        if let Some(task) = hedge_task {
            let _ = task.await;
        }

        // Let connections write their last answers; a client that does not read them
        // does not hold the process.
        connections.close();
        if tokio::time::timeout(CONNECTION_GRACE, async {
            connections.wait().await;
            group.stopped().await;
            if let Some(discovery) = discovery_task {
                let _ = discovery.await;
            }
        })
        .await
        .is_err()
        {
            tracing::warn!(
                "some connections did not close within {CONNECTION_GRACE:?}; leaving them"
            );
        }
        admin_stop.cancel();
        match admin_task.await {
            Ok(result) => result.map_err(Error::Admin)?,
            Err(join) => tracing::warn!(%join, "admin task failed"),
        }
        tls_tasks.close();
        tls_tasks.wait().await;
        // Last: the shards' threads carried client connections and connections to the
        // targets, which are done with or given up on by now.
        if let Some(shards) = shards {
            shards.stop().await;
        }
        tracing::info!("balancer stopped");
        Ok(())
    }
}

/// The target group's settings from the flags.
fn group_settings(config: &Config, tls: &Tls, shards: ShardRuntimes) -> GroupSettings {
    GroupSettings {
        connections_per_target: config.connections_per_target,
        deregistration_delay: config.deregistration_delay,
        health: HealthCheck {
            protocol: config.health_protocol,
            interval: config.health_interval,
            timeout: config.health_timeout,
            thresholds: Thresholds {
                healthy: config.healthy_threshold,
                unhealthy: config.unhealthy_threshold,
            },
        },
        upstream: UpstreamSettings {
            connect_timeout: config.connect_timeout,
            max_frame: config.max_frame,
            keepalive: config.upstream_keepalive,
        },
        upstream_tls: tls.upstream.clone(),
        shards,
    }
}

/// Hedging and its task's watches, from the flags; `None` when `--hedge-after off`.
fn hedging(config: &Config) -> Option<(Hedges, Watches)> {
    let delay = match config.hedge_after {
        HedgeAfter::Off => return None,
        HedgeAfter::After(d) => HedgeDelay::Fixed(d),
        HedgeAfter::P99 => HedgeDelay::P99,
    };
    Some(Hedges::new(HedgeSettings {
        delay,
        ratio: config.hedge_budget_ratio,
        floor_per_second: config.hedge_budget_floor,
    }))
}

/// Retries on target loss and outlier detection, from the flags.
fn recovery(config: &Config) -> (Retries, Outliers) {
    let retries = Retries::new(RetrySettings {
        enabled: config.retries,
        ratio: config.retry_budget_ratio,
        floor_per_second: config.retry_budget_floor,
    });
    let outliers = Outliers::new(OutlierSettings {
        consecutive: config.eject_consecutive,
        base: config.eject_base,
        max: config.eject_max,
        max_percent: config.max_ejection_percent,
    });
    (retries, outliers)
}

/// The router's settings from the flags.
fn routing_settings(config: &Config) -> RoutingSettings {
    RoutingSettings {
        policy: config.routing,
        fail_open: config.fail_open,
        max_outstanding: config.max_outstanding,
        // The next health check may make a target healthy.
        retry_after: config.health_interval,
        admission: config.admission,
    }
}

fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, Error> {
    let fail = |source| Error::Bind { what, addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.set_nodelay(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(1024).map_err(fail)
}

/// Says at start how the admin API is protected, loudly when it is not.
fn warn_if_open(config: &Config, token: bool, admin: SocketAddr) {
    if token {
        tracing::info!(%admin, reads_guarded = config.admin_auth_reads, "admin API: mutating endpoints and GET /targets need the bearer token");
    } else if admin.ip().is_loopback() {
        tracing::info!(%admin, "admin API without a token: loopback only");
    } else {
        tracing::warn!(
            %admin,
            "admin API WITHOUT AUTHENTICATION beyond loopback (--admin-insecure-no-auth): \
             anyone who reaches this port can register targets and redirect every client's \
             requests; give a token with --admin-token-file"
        );
    }
}

/// The actuator `--autoscale` asks for, if any. Workers it starts get `token` to
/// register with.
fn actuator(config: &Config, admin: SocketAddr, token: Option<AdminToken>) -> Option<Actuator> {
    let scaling = &config.autoscale;
    if !scaling.autoscale {
        return None;
    }
    if let Some(template) = &scaling.worker_cmd {
        return Some(Actuator::Processes(
            ProcessPool::new(
                template.clone(),
                admin,
                config.deregistration_delay,
                scaling.worker_start_timeout,
                config.drain_timeout,
            )
            .with_register_token(token)
            .max_workers(scaling.max_workers),
        ));
    }
    scaling.scale_cmd.as_ref().map(|template| {
        Actuator::Command(ScaleCommand::new(
            template.clone(),
            SCALE_CMD_TIMEOUT,
            scaling.worker_start_timeout,
        ))
    })
}
