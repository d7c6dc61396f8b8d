//! TLS on the balancer's three network sides, from the `--tls-*`, `--upstream-tls-*` and
//! `--admin-tls-*` flags: the client listener, the connections (and health checks) to the
//! targets, and the admin API. The handshakes, reloading and file handling are the protocol
//! crate's ([`tidepool_protocol::tls`]); this module builds one acceptor or connector per
//! side, counts each side's failed handshakes in the metrics, and serves the admin API over
//! TLS through [`TlsListener`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::tls::{
    ClientFiles, HandshakeFailures, ServerFiles, Stream, TlsAcceptor, TlsConnector,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::Error;
use crate::metrics::TlsFailures;

/// The TLS of each side that has it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tls {
    /// The client listener's.
    pub(crate) client: Option<TlsAcceptor>,
    /// The admin API's.
    pub(crate) admin: Option<TlsAcceptor>,
    /// Towards the targets.
    pub(crate) upstream: Option<TlsConnector>,
}

impl Tls {
    /// Reads every side's files (an error names the side and the file).
    pub(crate) fn load(config: &Config, failures: &TlsFailures) -> Result<Tls, Error> {
        let timeout = config.tls_handshake_timeout;
        let server = |side: &'static str,
                      cert: &Option<_>,
                      key: &Option<_>,
                      ca: &Option<_>,
                      counter: &Arc<HandshakeFailures>| {
            let (Some(cert), Some(key)) = (cert, key) else {
                return Ok(None);
            };
            let files = ServerFiles {
                cert: Clone::clone(cert),
                key: Clone::clone(key),
                client_ca: Clone::clone(ca),
            };
            TlsAcceptor::new(side, &files, timeout, Arc::clone(counter))
                .map(Some)
                .map_err(|source| Error::Tls {
                    side,
                    source: Box::new(source),
                })
        };
        let client = server(
            "client listener",
            &config.tls_cert,
            &config.tls_key,
            &config.tls_client_ca,
            &failures.client,
        )?;
        let admin = server(
            "admin API",
            &config.admin_tls_cert,
            &config.admin_tls_key,
            &None,
            &failures.admin,
        )?;
        let upstream = match &config.upstream_tls_ca {
            None => None,
            Some(ca) => {
                let files = ClientFiles {
                    ca: ca.clone(),
                    cert: config.upstream_tls_cert.clone(),
                    key: config.upstream_tls_key.clone(),
                };
                let side = "upstream";
                Some(
                    TlsConnector::new(
                        side,
                        &files,
                        config.upstream_tls_server_name.as_deref(),
                        timeout,
                        Arc::clone(&failures.upstream),
                    )
                    .map_err(|source| Error::Tls {
                        side,
                        source: Box::new(source),
                    })?,
                )
            }
        };
        Ok(Tls {
            client,
            admin,
            upstream,
        })
    }

    /// Reloads each side's files on SIGHUP or when they change, until `stop`.
    pub(crate) fn watch(&self, poll: Duration, stop: &CancellationToken, tasks: &TaskTracker) {
        for acceptor in [&self.client, &self.admin].into_iter().flatten() {
            tasks.spawn(acceptor.clone().watch(poll, stop.clone()));
        }
        if let Some(connector) = &self.upstream {
            tasks.spawn(connector.clone().watch(poll, stop.clone()));
        }
    }
}

/// Handshakes that may be under way at once on the admin listener; past it, accepting
/// waits. Enough for probes and operators, too few for a flood to exhaust memory.
const ADMIN_HANDSHAKES: usize = 64;

/// The admin API's listener with TLS, for `axum::serve`: each handshake runs on its own
/// task, so that a client that stalls one holds only its own connection (until the
/// handshake timeout), never the listener.
pub(crate) struct TlsListener {
    tcp: TcpListener,
    tls: TlsAcceptor,
    handshakes: JoinSet<Option<(Stream, SocketAddr)>>,
}

impl TlsListener {
    /// Serves TLS with `tls` on `tcp`.
    pub(crate) fn new(tcp: TcpListener, tls: TlsAcceptor) -> TlsListener {
        TlsListener {
            tcp,
            tls,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        loop {
            let room = self.handshakes.len() < ADMIN_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((tcp, peer)) => {
                        let tls = self.tls.clone();
                        // A failure is logged and counted by the acceptor.
                        self.handshakes
                            .spawn(async move { tls.accept(tcp, peer).await.ok().map(|s| (s, peer)) });
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn flags_that_need_each_other_are_refused() {
        let path = || Some(PathBuf::from("x.pem"));
        let cases = [
            (
                Config {
                    tls_cert: path(),
                    ..Config::default()
                },
                "--tls-cert",
            ),
            (
                Config {
                    tls_client_ca: path(),
                    ..Config::default()
                },
                "--tls-client-ca",
            ),
            (
                Config {
                    upstream_tls_server_name: Some("worker".into()),
                    ..Config::default()
                },
                "--upstream-tls-ca",
            ),
            (
                Config {
                    upstream_tls_ca: path(),
                    upstream_tls_server_name: Some("not a name!".into()),
                    ..Config::default()
                },
                "--upstream-tls-server-name",
            ),
            (
                Config {
                    admin_tls_key: path(),
                    ..Config::default()
                },
                "--admin-tls-cert",
            ),
        ];
        for (config, flag) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }

    #[test]
    fn a_missing_file_names_the_side_and_the_file() {
        let config = Config {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            ..Config::default()
        };
        let err = Tls::load(&config, &TlsFailures::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client listener") && err.contains("/nonexistent/cert.pem"),
            "{err}"
        );
    }
}
