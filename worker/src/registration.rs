//! Registration with the balancer's admin API (`--register URL`).
//!
//! Once the worker is ready, [`register`] POSTs `{"addr": ADVERTISE}` to `URL/targets`,
//! retrying with exponential backoff (100 ms doubling to 5 s) while the balancer is down or
//! answers an error, until it answers 2xx or shutdown begins. It then registers again every
//! `--register-interval` (registration is idempotent), so a balancer that restarted and forgot its
//! targets has this worker back within that time. On shutdown the worker calls
//! [`deregister`] (DELETE `URL/targets/ADDR`) before it stops taking requests, so the balancer
//! stops routing to it first.

use std::time::Duration;

use serde::Serialize;
use tidepool_protocol::tls::{ClientConfig, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize)]
struct TargetBody<'a> {
    addr: &'a str,
}

/// An HTTP client; with `tls`, https:// URLs are checked against the CA it holds now (a
/// client is made when registration starts and for deregistration, so a CA rotated in
/// between is picked up).
fn client(tls: Option<&TlsConnector>) -> reqwest::Client {
    let builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
    let builder = match tls {
        Some(tls) => builder.use_preconfigured_tls(ClientConfig::clone(&tls.config())),
        None => builder,
    };
    builder.build().unwrap_or_else(|error| {
        warn!(%error, "could not build the registration HTTP client; using the default one");
        reqwest::Client::new()
    })
}

fn targets_url(base: &str) -> String {
    format!("{}/targets", base.trim_end_matches('/'))
}

/// Registers `advertise` with the balancer at `base` (retrying until it succeeds) and keeps
/// it registered until `shutdown`; returns whether it was ever registered.
pub async fn register(
    base: &str,
    advertise: &str,
    refresh: Duration,
    shutdown: &CancellationToken,
    tls: Option<&TlsConnector>,
) -> bool {
    let client = client(tls);
    let url = targets_url(base);
    if !register_once(&client, &url, advertise, shutdown).await {
        return false;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return true,
            _ = tokio::time::sleep(refresh) => {}
        }
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return true,
            r = client.post(&url).json(&TargetBody { addr: advertise }).send() => r,
        };
        match outcome {
            Ok(resp) if resp.status() == reqwest::StatusCode::CREATED => {
                warn!(%url, addr = advertise, "registered again: the balancer had lost this worker (restarted?)");
            }
            Ok(resp) if resp.status().is_success() => debug!(%url, "registration refreshed"),
            Ok(resp) => debug!(%url, status = %resp.status(), "registration refresh refused"),
            Err(e) => {
                debug!(%url, error = %e, "registration refresh failed; the balancer may be restarting")
            }
        }
    }
}

/// Registers once, retrying with backoff until the balancer accepts (true) or `shutdown`
/// fires (false).
async fn register_once(
    client: &reqwest::Client,
    url: &str,
    advertise: &str,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1u32;
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return false,
            r = client.post(url).json(&TargetBody { addr: advertise }).send() => r,
        };
        match outcome {
            Ok(resp) if resp.status().is_success() => {
                info!(%url, addr = advertise, attempt, "registered with the balancer");
                return true;
            }
            Ok(resp) => {
                warn!(%url, status = %resp.status(), attempt, retry_in = ?backoff, "balancer refused registration");
            }
            Err(e) => {
                // The balancer is not up yet, most likely; keep the logs quiet at first.
                if attempt <= 3 {
                    debug!(%url, error = %e, attempt, retry_in = ?backoff, "balancer unreachable");
                } else {
                    warn!(%url, error = %e, attempt, retry_in = ?backoff, "balancer unreachable");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        attempt += 1;
    }
}

/// Deregisters `advertise`: one attempt, bounded by a timeout, since shutdown must go on.
/// True when the balancer took it (it no longer routes here).
pub async fn deregister(base: &str, advertise: &str, tls: Option<&TlsConnector>) -> bool {
    let url = format!("{}/{}", targets_url(base), advertise);
    match client(tls).delete(&url).send().await {
        Ok(resp) if resp.status().is_success() => {
            info!(%url, "deregistered from the balancer");
            true
        }
        Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => {
            info!(%url, "the balancer no longer lists this worker");
            false
        }
        Ok(resp) => {
            warn!(%url, status = %resp.status(), "balancer refused deregistration");
            false
        }
        Err(e) => {
            warn!(%url, error = %e, "could not deregister from the balancer");
            false
        }
    }
}
