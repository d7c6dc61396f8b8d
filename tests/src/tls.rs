//! TLS in tests: a CA and certificates made in-process ([`Pki`], from the protocol crate's
//! `test-pki` feature), https calls to an admin API that serves TLS ([`https`], with
//! headers [`https_with`]), and protocol clients that trust a given CA.

use std::net::SocketAddr;
use std::path::Path;

use tidepool_protocol::tls::{ClientFiles, TlsConnector};
use tidepool_protocol::{Client, ClientOptions, Error};
use tokio::net::TcpStream;

pub use tidepool_protocol::tls::testing::{Leaf, Pki};

use crate::balancer::http_over_with;

/// A connector that trusts `ca` and, with `identity`, presents that certificate.
pub fn connector(ca: &Path, identity: Option<&Leaf>) -> TlsConnector {
    TlsConnector::new(
        "test client",
        &ClientFiles {
            ca: ca.to_owned(),
            cert: identity.map(|l| l.cert.clone()),
            key: identity.map(|l| l.key.clone()),
        },
        None,
        tidepool_protocol::tls::DEFAULT_HANDSHAKE_TIMEOUT,
        Default::default(),
    )
    .expect("load the test client's TLS files")
}

/// A protocol client over TLS to `addr` (checked as the name `127.0.0.1`).
pub async fn client(addr: SocketAddr, tls: &TlsConnector) -> Result<Client, Error> {
    Client::connect_tls(&addr.to_string(), tls, ClientOptions::default()).await
}

/// One HTTP/1.1 request over TLS (trusting `ca`) to an admin API; the status and body.
pub async fn https(
    admin: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = https_with(admin, ca, method, path, &[], body).await;
    (status, body)
}

/// [`https`] with extra header lines (`Authorization: Bearer …`); the status, the head and
/// the body. The admin API's certificate is checked against `ca` and the name
/// `127.0.0.1` (or whatever IP `admin` has), as a client on the host sees a published port.
pub async fn https_with(
    admin: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> (u16, String, String) {
    let tcp = TcpStream::connect(admin).await.expect("connect admin");
    let stream = connector(ca, None)
        .connect(tcp, &admin.ip().to_string())
        .await
        .expect("TLS handshake with the admin API");
    http_over_with(stream, &admin.to_string(), method, path, headers, body).await
}
