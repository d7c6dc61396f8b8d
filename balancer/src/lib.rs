//! # tidepool-balancer
//!
//! A network load balancer for tidepool workers with the semantics of an AWS NLB target
//! group, except that it routes each request (each `infer` frame) on its own rather than
//! each connection: to the healthy target with the fewest outstanding requests.
//!
//! ## The path of one request
//! 1. [`frontend`] reads a frame from a client connection and gives the request a
//!    [`pending`] entry, which owns the client's id and answers exactly once: explicitly,
//!    or when dropped.
//! 2. The router in [`dispatch`] takes the target group's snapshot and lets [`routing`]
//!    choose a target (a pure function: p2c, full scan or round-robin over the healthy
//!    targets, with fail-open). A request with a deadline that no eligible target is
//!    predicted to answer in time, from the workers' reported batch times and the requests
//!    outstanding on them, is answered there and never forwarded ([`admission`]). The
//!    request is counted on the target by an in-flight guard ([`target`]). When every eligible target is at `--max-outstanding` it waits in the
//!    [`queue`], whose task the router runs.
//! 3. [`upstream`] writes it to one of the target's persistent connections under a fresh
//!    id, and takes the answer back to the pending entry, which restores the client's id.
//!
//! When a connection is lost after writing a request, `retry` decides whether it is sent
//! once more to another target (a budget bounds it); `rescue` does the same for the
//! requests a target still holds when its health check finds it unhealthy (a frozen
//! worker). Every answer also feeds `outlier` detection, which ejects targets that fail
//! fast, and routing passes over them. With `--hedge-after`, `hedge` sends a request still
//! unanswered after a delay to a second target: its pending entry becomes a race of two
//! attempts over one answerer, and the first result wins.
//!
//! Beside the path: [`health`] checks each target and moves its state, [`discovery`]
//! keeps DNS names' addresses registered, [`admin`] serves the HTTP API (its bearer
//! token checked by [`auth`]) and [`metrics`]' Prometheus text, [`validation`] holds the
//! rules every registered address passes (never the balancer itself, `--max-targets`,
//! `--register-allow`), `tls` sets up TLS on the client listener, towards the targets
//! and on the admin API (reloading the certificates), and [`autoscale`] turns the
//! outstanding counts into the
//! pool size the load needs (`GET /scaling`), starting and stopping workers with
//! `--autoscale`. A client's `metadata` request is answered by [`metadata`] from one
//! healthy target. [`heap`] reads the allocator's figures (bytes in use, resident) for
//! `/metrics`.
//!
//! ## Threads
//! By default everything runs on one runtime (`--runtime-threads`: one thread, or a
//! multi-threaded one). With `--shards N`, `shard` starts N threads, each with its own
//! single-threaded runtime and a client listener on the shared port (`SO_REUSEPORT`); a
//! shard's client connections and its own connections to every target run there, so that
//! a request and its answer stay on one thread. The target group, its outstanding counts,
//! the wait queue, the budgets and the admin API stay one for all shards (see `shard`).
//!
//! ## Who owns what
//! Each piece of state has one owner behind a cheap-to-clone handle, and each task gets the
//! settings it needs, never the whole [`Config`]:
//! - `registry`'s `TargetGroup` owns the targets, their snapshot, the draining list, its
//!   task tracker and its shutdown tokens, with its `GroupSettings`. It spawns and stops
//!   each target's health check (`health`'s `HealthCheck`) and upstream connections
//!   (`upstream`'s `UpstreamContext`, whose `Reroute` handle is the only way back into
//!   the queue).
//! - The group also holds `validation`'s `TargetRules`, so that every way in (admin API,
//!   `--target`, DNS) passes the same rules, and registers one at a time under its lock.
//! - `auth`'s `AdminAuth` owns the admin token and the count of refused requests; the
//!   admin routes share it.
//! - `dispatch`'s `Router` owns the wait queue's sending side, the routing settings and
//!   the round-robin counter, over a clone of the group.
//! - `frontend` receives a `FrontendContext`: the router and a connection's limits.
//! - [`Handle`] (`handle`) is the view for embedding programs and the admin API; the
//!   autoscaler depends on the [`Pool`] trait, which `Handle` implements.
//! - `balancer` is the composition root: it builds the owners from the [`Config`] and
//!   runs the shutdown sequence. No module imports it.
//!
//! The import graph (`use crate::…` outside tests) has one cycle, among the request's own
//! data types: [`target`] (a target holds its connections and wakes the queue), `pending`
//! (a pending entry knows the connection it was sent on), `upstream` (a connection holds
//! pending entries and hands unwritten requests back), `queue` (which carries requests),
//! `hedge` (the queue's way in carries it; its task splits entries on upstream connections
//! and routes hedges through the queue) and `metrics` (targets keep latency histograms;
//! metrics render targets and hedging's counters). Every other
//! edge points down this list, each module importing only those below it:
//! `balancer` → `admin` → `handle` → `frontend` → `metadata` → `dispatch` → `discovery` →
//! `registry` → `health` → `rescue` → `tls` → [`routing`] → [`config`] → [`autoscale`] → the data
//! types → `auth` → `burst`, `error`, `validation`, and the leaves that import nothing of
//! the crate: `retry`, `outlier`, `deadline`, `throttle`, `admission`, `client_ids` ([`heap`]
//! and `shard` import only `error`). (`autoscale` sees one data type, [`target`]'s
//! `TargetInfo`, and `auth`'s token, which it hands to the workers it starts. Neighbours
//! in the list need not import each other: `admin` and `frontend` do not.)
//!
//! ## Embedding
//! ```no_run
//! # async fn demo() -> Result<(), tidepool_balancer::Error> {
//! use tidepool_balancer::{Balancer, Config};
//! use tokio_util::sync::CancellationToken;
//!
//! let config = Config {
//!     listen: "127.0.0.1:0".parse().unwrap(),
//!     admin: "127.0.0.1:0".parse().unwrap(),
//!     ..Config::default()
//! };
//! let balancer = Balancer::bind(config).await?;
//! let (addr, handle) = (balancer.listen_addr(), balancer.handle());
//! let shutdown = CancellationToken::new();
//! let running = tokio::spawn(balancer.run(shutdown.clone()));
//! handle.register("127.0.0.1:7100".parse().unwrap(), 1)?;
//! // ... clients connect to `addr`; `handle.targets()` shows outstanding counts ...
//! shutdown.cancel();
//! running.await.unwrap()?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod admin;
mod admission;
mod auth;
pub mod autoscale;
mod balancer;
mod burst;
mod client_ids;
pub mod config;
mod deadline;
mod discovery;
mod dispatch;
pub mod error;
mod frontend;
mod handle;
mod health;
pub mod heap;
mod hedge;
mod metadata;
mod metrics;
mod outlier;
mod pending;
mod queue;
mod registry;
mod rescue;
mod retry;
pub mod routing;
mod shard;
pub mod target;
mod throttle;
mod tls;
mod upstream;
mod validation;

pub use auth::{AdminToken, ADMIN_TOKEN_ENV, WORKER_TOKEN_ENV};
pub use autoscale::{AutoscaleConfig, Pool, ScalingStatus};
pub use balancer::Balancer;
pub use config::{Admission, Config, HealthProtocol, HedgeAfter, RoutingPolicy};
pub use discovery::{Resolver, SystemResolver};
pub use error::Error;
pub use handle::Handle;
pub use outlier::EjectionReason;
pub use target::{TargetInfo, TargetState};
pub use validation::TargetRefusal;

use tokio_util::sync::CancellationToken;

/// Binds and runs a balancer until `shutdown` is cancelled, then drains it.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    Balancer::bind(config).await?.run(shutdown).await
}
