//! TLS on the worker's protocol listener (`--tls-cert`, `--tls-key`, and `--tls-client-ca`
//! so that only the balancer, holding a certificate from that CA, can reach the worker),
//! and for its registration calls to an https:// admin API (`--register-tls-ca`).
//!
//! The handshakes, reloading and PEM handling are the protocol crate's
//! ([`tidepool_protocol::tls`]); this module builds the worker's acceptor and connector
//! from its flags, before anything is bound, and keeps them reloading.

use std::sync::Arc;

use tidepool_protocol::tls::{ClientFiles, ServerFiles, TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServeConfig;
use crate::error::Error;
use crate::metrics::Metrics;

/// The worker's TLS, each side where its flags ask for it.
#[derive(Clone, Debug, Default)]
pub struct WorkerTls {
    /// The protocol listener's.
    pub listener: Option<TlsAcceptor>,
    /// For registering with an https:// admin API.
    pub register: Option<TlsConnector>,
}

impl WorkerTls {
    /// Reads the files the flags name (an error names the side and the file).
    pub fn load(config: &ServeConfig, metrics: &Metrics) -> Result<WorkerTls, Error> {
        let timeout = config.tls_handshake_timeout;
        let listener = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let side = "protocol listener";
                let files = ServerFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: config.tls_client_ca.clone(),
                };
                let failures = Arc::clone(&metrics.tls_handshake_failures);
                Some(
                    TlsAcceptor::new(side, &files, timeout, failures).map_err(|source| {
                        Error::Tls {
                            side,
                            source: Box::new(source),
                        }
                    })?,
                )
            }
            _ => None,
        };
        let register = match &config.register_tls_ca {
            Some(ca) => {
                let side = "registration";
                Some(
                    TlsConnector::new(
                        side,
                        &ClientFiles::trusting(ca),
                        None,
                        timeout,
                        Arc::default(),
                    )
                    .map_err(|source| Error::Tls {
                        side,
                        source: Box::new(source),
                    })?,
                )
            }
            None => None,
        };
        Ok(WorkerTls { listener, register })
    }

    /// Reloads the files on SIGHUP or when they change (looked at every `poll`), until
    /// `stop`.
    pub fn watch(&self, poll: std::time::Duration, stop: &CancellationToken, tasks: &TaskTracker) {
        if let Some(acceptor) = &self.listener {
            tasks.spawn(acceptor.clone().watch(poll, stop.clone()));
        }
        if let Some(connector) = &self.register {
            tasks.spawn(connector.clone().watch(poll, stop.clone()));
        }
    }
}
