//! Targets from DNS: each `--target-dns NAME:PORT` is resolved every `--dns-interval`;
//! new addresses are registered, vanished ones deregistered (they drain as any other).
//!
//! The [`Resolver`] is a trait so that tests (and other discovery sources) can supply
//! addresses without a DNS server. The task holds the target group, nothing else of the
//! balancer.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::registry::TargetGroup;

/// Resolves `name:port` to every address behind it.
pub trait Resolver: Send + Sync + 'static {
    /// All current addresses of `name` (written `name:port`).
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo` through tokio).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
    }
}

/// Resolves `host:port` to its first address (`--target`, the admin API).
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

/// Re-resolves `names` every `interval` until `stop`, keeping `group` in step. Addresses
/// the group's rules refuse (the balancer itself, outside `--register-allow`, past
/// `--max-targets`) are left out, and tried again each round.
///
/// Only addresses this task registered are ever deregistered by it, so a `--target` or an
/// admin registration of the same address is left alone. A failed resolution keeps the
/// previous addresses: a DNS outage must not empty the target group.
pub(crate) async fn run(
    group: TargetGroup,
    names: Vec<String>,
    resolver: Arc<dyn Resolver>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut owned: HashMap<String, BTreeSet<SocketAddr>> = HashMap::new();
    // Addresses the target rules refused, so that each is reported once, not every round.
    let mut refused: BTreeSet<SocketAddr> = BTreeSet::new();
    loop {
        for name in &names {
            let resolved = tokio::select! {
                () = stop.cancelled() => return,
                r = resolver.resolve(name) => r,
            };
            let fresh: BTreeSet<SocketAddr> = match resolved {
                Ok(addrs) => addrs.into_iter().collect(),
                Err(error) => {
                    tracing::warn!(%name, %error, "DNS resolution failed; keeping the previous addresses");
                    continue;
                }
            };
            let mine = owned.remove(name).unwrap_or_default();
            let mut next = BTreeSet::new();
            for addr in &fresh {
                if mine.contains(addr) {
                    next.insert(*addr);
                    continue;
                }
                match group.register(*addr, 1) {
                    Ok((_, true)) => {
                        tracing::info!(%name, %addr, "address appeared in DNS; registered");
                        refused.remove(addr);
                        next.insert(*addr);
                    }
                    Ok((_, false)) => {}
                    // The group logs each refusal; say once that DNS keeps offering it.
                    Err(reason) if refused.insert(*addr) => {
                        tracing::warn!(%name, %addr, %reason, "address in DNS refused as a target; retried every --dns-interval");
                    }
                    Err(_) => {}
                }
            }
            for addr in mine.difference(&fresh) {
                if !owned.values().any(|set| set.contains(addr)) {
                    tracing::info!(%name, %addr, "address vanished from DNS; deregistering");
                    group.deregister(*addr);
                }
            }
            owned.insert(name.clone(), next);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
