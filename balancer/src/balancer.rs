//! [`Balancer`]: binding, running and stopping; [`Handle`]: what a program embedding the
//! balancer (tests, the autoscaler) reads and changes while it runs.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::autoscale::actuator::{Actuator, ProcessPool, ScaleCommand};
use crate::autoscale::controller::StatusSlot;
use crate::autoscale::{self, ScalingStatus};
use crate::config::Config;
use crate::discovery::{Resolver, SystemResolver};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::pending::{Lifecycle, Request};
use crate::queue::{QueueHandle, QueueSignal};
use crate::registry::Registry;
use crate::target::{TargetInfo, TargetState};
use crate::{admin, discovery, frontend, queue};

/// Everything the balancer's tasks share. Routing reads it without locks.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) registry: Registry,
    pub(crate) queue: QueueHandle,
    /// The round-robin ticket counter.
    pub(crate) round_robin: AtomicUsize,
    /// Target tasks: health checks, upstream connections, drains.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when shutdown begins (`/healthz` turns 503).
    pub(crate) shutting_down: CancellationToken,
    /// The autoscaling loop's latest status (`GET /scaling`).
    pub(crate) scaling: StatusSlot,
}

/// A balancer whose sockets are bound, ready to [`run`](Balancer::run).
pub struct Balancer {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: TcpListener,
    queue_rx: mpsc::UnboundedReceiver<Request>,
    resolver: Arc<dyn Resolver>,
    /// `--target` addresses, resolved at bind time so that a typo fails at start.
    static_targets: Vec<SocketAddr>,
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
    /// Validates `config`, resolves `--target`s and binds both listeners.
    pub async fn bind(config: Config) -> Result<Balancer, Error> {
        Balancer::bind_with(config, Arc::new(SystemResolver)).await
    }

    /// As [`bind`](Balancer::bind), with `resolver` for `--target-dns` names.
    pub async fn bind_with(config: Config, resolver: Arc<dyn Resolver>) -> Result<Balancer, Error> {
        config.validate()?;
        let mut static_targets = Vec::with_capacity(config.targets.len());
        for target in &config.targets {
            static_targets.push(resolve_one(target).await?);
        }
        let listener = bind(config.listen, "listen")?;
        let admin = bind(config.admin, "admin")?;
        let signal = Arc::new(QueueSignal::default());
        let (queue, queue_rx) =
            QueueHandle::new(config.queue, config.queue_timeout, Arc::clone(&signal));
        let shared = Arc::new(Shared {
            metrics: Arc::new(Metrics::default()),
            lifecycle: Arc::new(Lifecycle::default()),
            registry: Registry::new(signal),
            queue,
            round_robin: AtomicUsize::new(0),
            tasks: TaskTracker::new(),
            shutting_down: CancellationToken::new(),
            scaling: StatusSlot::default(),
            config,
        });
        Ok(Balancer {
            shared,
            listener,
            admin,
            queue_rx,
            resolver,
            static_targets,
        })
    }

    /// The address clients connect to (the real port when bound to port 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// The admin API's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.shared.config.admin)
    }

    /// A handle to read and change the running balancer's targets.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves until `shutdown` is cancelled, then drains: stops accepting, lets requests
    /// in flight finish within `--drain-timeout`, answers the rest `shutting_down`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Balancer {
            shared,
            listener,
            admin,
            queue_rx,
            resolver,
            static_targets,
        } = self;
        let config = &shared.config;
        // Past the drain deadline: the queue stops, targets close.
        let hard_stop = CancellationToken::new();
        // The admin API outlives the drain, so that it can be watched.
        let admin_stop = CancellationToken::new();

        let admin_addr = admin.local_addr().unwrap_or(config.admin);
        let queue_task = tokio::spawn(queue::run(Arc::clone(&shared), queue_rx, hard_stop.clone()));
        let admin_task = tokio::spawn(admin::serve(admin, Arc::clone(&shared), admin_stop.clone()));
        for addr in static_targets {
            shared.registry.register(&shared, addr, 1);
        }
        if !config.target_dns.is_empty() {
            shared.tasks.spawn(discovery::run(
                Arc::clone(&shared),
                config.target_dns.clone(),
                resolver,
                shutdown.child_token(),
            ));
        }
        tracing::info!(
            listen = %listener.local_addr().map_err(|e| Error::Bind { what: "listen", addr: config.listen, source: e })?,
            routing = ?config.routing,
            "balancer serving"
        );

        // The autoscaling loop outlives the drain: the workers it started must answer the
        // requests in flight before it stops them.
        let scaling_stop = CancellationToken::new();
        let scaling_task = tokio::spawn(autoscale::controller::run(
            Handle {
                shared: Arc::clone(&shared),
            },
            config.autoscale.policy(),
            actuator(config, admin_addr),
            Arc::clone(&shared.scaling),
            scaling_stop.clone(),
            config.drain_timeout,
        ));

        let connections = TaskTracker::new();
        frontend::serve(
            listener,
            Arc::clone(&shared),
            shutdown.clone(),
            connections.clone(),
        )
        .await;

        shared.shutting_down.cancel();
        let in_flight = shared.lifecycle.live();
        tracing::info!(in_flight, timeout = %humantime::format_duration(config.drain_timeout), "shutting down: draining");
        tokio::select! {
            () = shared.lifecycle.all_done() => tracing::info!("drained: every request answered"),
            () = tokio::time::sleep(config.drain_timeout) => tracing::warn!(
                unanswered = shared.lifecycle.live(),
                "drain timeout passed; answering the rest shutting_down"
            ),
        }
        shared.lifecycle.set_stopping();
        scaling_stop.cancel();
        if let Err(join) = scaling_task.await {
            tracing::warn!(%join, "autoscaling task failed");
        }
        hard_stop.cancel();
        shared.registry.stop_all();
        let _ = queue_task.await;

        // Let connections write their last answers; a client that does not read them
        // does not hold the process.
        connections.close();
        shared.tasks.close();
        let grace = Duration::from_secs(2);
        if tokio::time::timeout(grace, async {
            connections.wait().await;
            shared.tasks.wait().await;
        })
        .await
        .is_err()
        {
            tracing::warn!("some connections did not close within {grace:?}; leaving them");
        }
        admin_stop.cancel();
        match admin_task.await {
            Ok(result) => result.map_err(Error::Admin)?,
            Err(join) => tracing::warn!(%join, "admin task failed"),
        }
        tracing::info!("balancer stopped");
        Ok(())
    }
}

/// A cloneable view of a running balancer, for tests and for the autoscaler: targets and
/// their outstanding counts, the queue, and registration.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("targets", &self.targets())
            .field("queue_len", &self.queue_len())
            .finish()
    }
}

impl Handle {
    /// Every target, draining ones included, sorted by address.
    pub fn targets(&self) -> Vec<TargetInfo> {
        self.shared.registry.infos()
    }

    /// The target registered at `addr` (not draining), if any.
    pub fn target(&self, addr: SocketAddr) -> Option<TargetInfo> {
        self.shared
            .registry
            .get(addr)
            .map(|t| TargetInfo::from(&*t))
    }

    /// Targets in the healthy state.
    pub fn healthy_count(&self) -> usize {
        self.shared
            .registry
            .snapshot()
            .iter()
            .filter(|t| t.state() == TargetState::Healthy)
            .count()
    }

    /// Requests outstanding on all targets together.
    pub fn outstanding(&self) -> usize {
        self.shared
            .registry
            .all()
            .iter()
            .map(|t| t.outstanding())
            .sum()
    }

    /// The autoscaling loop's latest status, as `GET /scaling` shows it (none in the
    /// first second).
    pub fn scaling(&self) -> Option<ScalingStatus> {
        self.shared
            .scaling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests waiting in the balancer's queue for a target with room.
    pub fn queue_len(&self) -> usize {
        self.shared.queue.signal.len()
    }

    /// Requests read from clients and not yet answered (queued, routed or in flight).
    pub fn pending(&self) -> usize {
        self.shared.lifecycle.live()
    }

    /// Client connections open now.
    pub fn active_flows(&self) -> u64 {
        self.shared
            .metrics
            .active_flows
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The Prometheus text `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        self.shared
            .metrics
            .render(&self.shared.registry.all(), self.queue_len())
    }

    /// Registers a target (idempotent); true when it is new.
    pub fn register(&self, addr: SocketAddr, weight: u32) -> bool {
        self.shared.registry.register(&self.shared, addr, weight).1
    }

    /// Starts draining a target; false when it was not registered.
    pub fn deregister(&self, addr: SocketAddr) -> bool {
        self.shared.registry.deregister(&self.shared, addr)
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

/// Resolves `host:port` to its first address.
pub(crate) async fn resolve_one(addr: &str) -> Result<SocketAddr, Error> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| Error::Resolve {
            addr: addr.to_owned(),
            source,
        })?;
    addrs.next().ok_or_else(|| Error::NoAddress {
        addr: addr.to_owned(),
    })
}

/// The actuator `--autoscale` asks for, if any.
fn actuator(config: &Config, admin: SocketAddr) -> Option<Actuator> {
    let scaling = &config.autoscale;
    if !scaling.autoscale {
        return None;
    }
    if let Some(template) = &scaling.worker_cmd {
        return Some(Actuator::Processes(ProcessPool::new(
            template.clone(),
            admin,
            config.deregistration_delay,
            scaling.worker_start_timeout,
            config.drain_timeout,
        )));
    }
    scaling.scale_cmd.as_ref().map(|template| {
        Actuator::Command(ScaleCommand::new(
            template.clone(),
            Duration::from_secs(300),
            scaling.worker_start_timeout,
        ))
    })
}
