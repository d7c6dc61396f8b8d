//! A balancer's admin API over TLS, as a client on the host sees a published port: the
//! compose suites' view of a balancer in a container.
//!
//! - [`Admin`]: `GET` with or without the token, and the requests it has routed
//!   ([`routed_total`] over its `/metrics`).
//! - [`wait_answering`]: until the admin API completes a TLS handshake (docker's port proxy
//!   accepts a connection before the balancer behind it does).
//! - [`wait_targets`]: polls `GET /targets` until a condition holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::tls::{connector, https_with};

/// One balancer's admin API: its published address, the CA its certificate chains to, and
/// the token.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Where it is published on the host.
    pub addr: SocketAddr,
    /// The CA the admin API's certificate chains to.
    pub ca: PathBuf,
    token: String,
}

impl Admin {
    /// The admin API at `addr`, trusting `certs/ca.pem`, with `token` for the calls that
    /// need it.
    pub fn new(addr: SocketAddr, certs: &Path, token: &str) -> Admin {
        Admin {
            addr,
            ca: certs.join("ca.pem"),
            token: token.to_owned(),
        }
    }

    /// `GET path` over TLS, with the token when `authorized`: the status, head and body.
    /// Panics when nothing listens at the address: call [`wait_answering`] first after a
    /// (re)start.
    pub async fn get(&self, path: &str, authorized: bool) -> (u16, String, String) {
        let bearer = format!("Authorization: Bearer {}", self.token);
        let headers: &[&str] = if authorized { &[&bearer] } else { &[] };
        https_with(self.addr, &self.ca, "GET", path, headers, None).await
    }

    /// Requests this balancer process has routed to any target since it started, from its
    /// `/metrics` (open without the token).
    pub async fn routed(&self) -> u64 {
        let (status, _, metrics) = self.get("/metrics", false).await;
        assert_eq!(status, 200, "GET /metrics at {}: {metrics}", self.addr);
        routed_total(&metrics)
    }
}

/// The sum of `tidepool_routed_total` over its targets in a Prometheus text body.
pub fn routed_total(metrics: &str) -> u64 {
    labelled_sum(metrics, "tidepool_routed_total") as u64
}

/// The sum of the labelled metric `name` over all its labels in a Prometheus text body
/// (`name{...} value` lines; other metrics whose names start with `name` are not counted).
pub fn labelled_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until the admin API completes a TLS handshake (docker's port proxy accepts before
/// the balancer does), so that the https helpers, which expect an answer, can run; fails
/// after `within`.
pub async fn wait_answering(admin: &Admin, within: Duration) {
    let tls = connector(&admin.ca, None);
    let host = admin.addr.ip().to_string();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(tcp) = TcpStream::connect(admin.addr).await {
            let handshake = tls.connect(tcp, &host);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the admin API at {} did not answer a TLS handshake within {within:?}",
            admin.addr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `GET /targets` (over TLS, with the token) until `done` holds for the map
/// address → state; returns that map. Fails after `within`, saying `what` it waited for.
pub async fn wait_targets(
    admin: &Admin,
    within: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        let (status, _, body) = admin.get("/targets", true).await;
        if status == 200 {
            let targets = parse_targets(&body);
            if done(&targets) {
                return targets;
            }
            last = Some(targets);
        }
        assert!(
            Instant::now() < deadline,
            "waited {within:?} for {what} at {}; last /targets: {last:?}",
            admin.addr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /targets`'s body as address → state.
fn parse_targets(body: &str) -> BTreeMap<String, String> {
    let targets: Vec<serde_json::Value> =
        serde_json::from_str(body).expect("GET /targets answers a JSON array");
    targets
        .iter()
        .filter_map(|t| {
            Some((
                t["addr"].as_str()?.to_owned(),
                t["state"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_total_sums_every_target_and_nothing_else() {
        let metrics = "# HELP tidepool_routed_total Requests routed\n\
                       # TYPE tidepool_routed_total counter\n\
                       tidepool_routed_total{target=\"10.0.0.1:7100\"} 40\n\
                       tidepool_routed_total{target=\"10.0.0.2:7100\"} 2\n\
                       tidepool_routed_total_other{target=\"x\"} 1000\n\
                       tidepool_retries_total 7\n";
        assert_eq!(routed_total(metrics), 42);
        assert_eq!(routed_total(""), 0);
    }

    #[test]
    fn parse_targets_reads_address_and_state() {
        let body = r#"[{"addr":"10.0.0.1:7100","state":"healthy","outstanding":0},
                       {"addr":"10.0.0.2:7100","state":"unhealthy"},
                       {"state":"healthy"}]"#;
        let targets = parse_targets(body);
        assert_eq!(targets.len(), 2);
        assert_eq!(targets["10.0.0.1:7100"], "healthy");
        assert_eq!(targets["10.0.0.2:7100"], "unhealthy");
    }
}
