//! TLS for every tidepool connection that crosses a network, with rustls (no OpenSSL).
//!
//! - [`ServerFiles`] and [`ClientFiles`] name PEM files (a certificate chain and its key, a
//!   CA bundle to trust, an optional client certificate for mutual TLS); loading them says
//!   which file is wrong and what to do about it.
//! - [`TlsAcceptor`] (servers) and [`TlsConnector`] (clients) own their rustls
//!   configuration behind an [`ArcSwap`]: [`TlsAcceptor::watch`] / [`TlsConnector::watch`]
//!   re-read the files on SIGHUP or when their modification times change, and swap the
//!   configuration, so that new handshakes use the new certificates while connections
//!   already open keep theirs. A load that fails keeps the previous configuration.
//! - Every handshake is bounded by a timeout; a failed one is logged with the peer and the
//!   reason and counted in [`HandshakeFailures`]. It costs that connection only.
//! - [`Stream`] is a TCP connection with or without TLS, and [`Stream::into_split`] its
//!   read and write halves: the plaintext path keeps tokio's own `TcpStream` halves, so
//!   that turning TLS off costs one `match` per read or write.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

pub use rustls::{ClientConfig, ServerConfig};

#[cfg(any(test, feature = "test-pki"))]
pub mod testing;

/// How long a TLS handshake may take before the connection is closed: a peer that opens a
/// connection and sends nothing (or too little) holds nothing longer than this.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`TlsAcceptor::watch`] looks at the files' modification times.
pub const DEFAULT_RELOAD_POLL: Duration = Duration::from_secs(5);

/// The crypto provider of every configuration built here: ring, so that building needs
/// neither OpenSSL nor cmake, and no process-wide default has to be installed first.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::TlsRead {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads every certificate of a PEM file (`-----BEGIN CERTIFICATE-----` blocks), the
/// leaf first for a chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let what = "certificate";
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::TlsPem {
            what,
            path: path.to_owned(),
            problem: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::TlsPem {
            what,
            path: path.to_owned(),
            problem: "no -----BEGIN CERTIFICATE----- block found".to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let what = "private key";
    let pem = read(path, what)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::TlsPem {
        what,
        path: path.to_owned(),
        problem: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no -----BEGIN PRIVATE KEY----- (or RSA / EC PRIVATE KEY) block found".to_owned()
            }
            other => other.to_string(),
        },
    })
}

/// Reads a CA bundle: every certificate in it becomes a trusted root.
pub fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| Error::TlsSetup {
            what: "CA bundle",
            path: path.to_owned(),
            source: Box::new(source),
        })?;
    }
    Ok(roots)
}

/// The files of a TLS server: its certificate chain and key, and, for mutual TLS, the CA
/// bundle its clients' certificates must chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// With it, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    /// Reads the files and builds the rustls server configuration.
    pub fn load(&self) -> Result<ServerConfig, Error> {
        let certs = load_certs(&self.cert)?;
        let key = load_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| self.setup(&self.cert, source))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(load_roots(ca)?),
                    provider(),
                )
                .build()
                // Only an empty root store fails, and `load_roots` refuses those.
                .map_err(|e| self.setup(ca, rustls::Error::General(e.to_string())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        // rustls checks here that the key belongs to the certificate.
        builder
            .with_single_cert(certs, key)
            .map_err(|source| self.setup(&self.key, source))
    }

    fn setup(&self, path: &Path, source: rustls::Error) -> Error {
        Error::TlsSetup {
            what: "server certificate and key",
            path: path.to_owned(),
            source: Box::new(source),
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }
}

/// The files of a TLS client: the CA bundle it trusts, and for mutual TLS its own
/// certificate chain and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFiles {
    /// PEM CA bundle: the server's certificate must chain to one of these.
    pub ca: PathBuf,
    /// PEM certificate chain presented to servers that ask for one.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`; given exactly when `cert` is.
    pub key: Option<PathBuf>,
}

impl ClientFiles {
    /// Trusts `ca`, presents no certificate.
    pub fn trusting(ca: impl Into<PathBuf>) -> ClientFiles {
        ClientFiles {
            ca: ca.into(),
            cert: None,
            key: None,
        }
    }

    /// Reads the files and builds the rustls client configuration.
    pub fn load(&self) -> Result<ClientConfig, Error> {
        let roots = load_roots(&self.ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| Error::TlsSetup {
                what: "client configuration",
                path: self.ca.clone(),
                source: Box::new(source),
            })?
            .with_root_certificates(roots);
        match (&self.cert, &self.key) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|source| Error::TlsSetup {
                    what: "client certificate and key",
                    path: key.clone(),
                    source: Box::new(source),
                }),
            (Some(path), None) | (None, Some(path)) => Err(Error::TlsPem {
                what: "client certificate and key",
                path: path.clone(),
                problem: "a client certificate needs its key and a key its certificate; give both"
                    .to_owned(),
            }),
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.ca.clone()];
        paths.extend(self.cert.clone());
        paths.extend(self.key.clone());
        paths
    }
}

/// Failed TLS handshakes, counted by whoever shows metrics (one per listener or per
/// upstream side).
#[derive(Debug, Default)]
pub struct HandshakeFailures(AtomicU64);

impl HandshakeFailures {
    /// Handshakes that failed or timed out so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A rustls configuration that its files can replace while it is in use.
struct Reloadable<C> {
    current: ArcSwap<C>,
    load: Box<dyn Fn() -> Result<C, Error> + Send + Sync>,
    paths: Vec<PathBuf>,
    /// What it is for, in log lines (`client listener`, `upstream`, ...).
    name: &'static str,
}

impl<C> Reloadable<C> {
    fn new(
        name: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<C, Error> + Send + Sync + 'static,
    ) -> Result<Reloadable<C>, Error> {
        let first = load()?;
        Ok(Reloadable {
            current: ArcSwap::from_pointee(first),
            load: Box::new(load),
            paths,
            name,
        })
    }

    fn get(&self) -> Arc<C> {
        self.current.load_full()
    }

    fn reload(&self) -> Result<(), Error> {
        let next = (self.load)()?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Modification time and length of each file; `None` for one that cannot be read now
    /// (mid-rotation), which counts as a change once it is back.
    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths
            .iter()
            .map(|p| {
                // `metadata` follows symlinks: a Kubernetes Secret volume swaps a symlink,
                // and the file it points to is what changed.
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    /// Reloads on SIGHUP and when the files change (looked at every `poll`), until `stop`.
    async fn watch(&self, poll: Duration, stop: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(error) => {
                tracing::warn!(tls = self.name, %error, "no SIGHUP handler; certificates reload when their files change");
                None
            }
        };
        // Reading a few KiB of PEM is quicker than handing it to a blocking thread.
        let mut seen = self.stamps();
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.reset();
        loop {
            let cause = tokio::select! {
                () = stop.cancelled() => return,
                Some(()) = async { hangup.as_mut()?.recv().await } => "SIGHUP",
                _ = ticks.tick() => {
                    if self.stamps() == seen {
                        continue;
                    }
                    "files changed"
                }
            };
            // Taken before reading: a write during the read is seen at the next poll.
            let stamps = self.stamps();
            match self.reload() {
                Ok(()) => {
                    seen = stamps;
                    tracing::info!(
                        tls = self.name,
                        cause,
                        "TLS certificates reloaded; new handshakes use them"
                    );
                }
                // `seen` stays as it was, so the next poll tries again: the files may be
                // half rotated (a new certificate, its key not written yet).
                Err(error) => tracing::warn!(
                    tls = self.name,
                    cause,
                    %error,
                    "TLS certificates not reloaded; the previous ones stay in use"
                ),
            }
        }
    }
}

struct AcceptorShared {
    config: Reloadable<ServerConfig>,
    handshake_timeout: Duration,
    failures: Arc<HandshakeFailures>,
}

/// The server side of TLS: a reloadable configuration, a handshake timeout and a failure
/// count. Cheap to clone; every clone shares them.
#[derive(Clone)]
pub struct TlsAcceptor {
    shared: Arc<AcceptorShared>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("name", &self.shared.config.name)
            .field("files", &self.shared.config.paths)
            .finish()
    }
}

impl TlsAcceptor {
    /// Loads `files` (an error names the file at fault) for the listener called `name` in
    /// logs; failed handshakes are added to `failures`.
    pub fn new(
        name: &'static str,
        files: &ServerFiles,
        handshake_timeout: Duration,
        failures: Arc<HandshakeFailures>,
    ) -> Result<TlsAcceptor, Error> {
        let config = {
            let files = files.clone();
            Reloadable::new(name, files.paths(), move || files.load())?
        };
        Ok(TlsAcceptor {
            shared: Arc::new(AcceptorShared {
                config,
                handshake_timeout,
                failures,
            }),
        })
    }

    /// Runs the server side of a handshake on `stream` from `peer`, within the timeout.
    /// A failure is logged and counted here; the caller only drops the connection.
    pub async fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Result<Stream, Error> {
        let shared = &self.shared;
        let acceptor = tokio_rustls::TlsAcceptor::from(shared.config.get());
        let outcome = tokio::time::timeout(shared.handshake_timeout, acceptor.accept(stream)).await;
        let error = match outcome {
            Ok(Ok(tls)) => return Ok(Stream::Tls(Box::new(tls.into()))),
            Ok(Err(source)) => Error::TlsHandshake {
                peer: peer.to_string(),
                source,
            },
            Err(_) => Error::TlsHandshakeTimeout {
                peer: peer.to_string(),
                timeout: shared.handshake_timeout,
            },
        };
        shared.failures.add();
        tracing::warn!(tls = shared.config.name, %peer, %error, "TLS handshake failed; connection closed");
        Err(error)
    }

    /// Reads the files again now; on error the previous configuration stays.
    pub fn reload(&self) -> Result<(), Error> {
        self.shared.config.reload()
    }

    /// Reloads on SIGHUP and whenever the files change (looked at every `poll`), until
    /// `stop`. Spawn it next to the listener it serves.
    pub async fn watch(self, poll: Duration, stop: CancellationToken) {
        self.shared.config.watch(poll, stop).await
    }

    /// The configuration new handshakes use now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.shared.config.get()
    }
}

struct ConnectorShared {
    config: Reloadable<ClientConfig>,
    /// The name the server's certificate must carry; else the host connected to.
    server_name: Option<ServerName<'static>>,
    handshake_timeout: Duration,
    failures: Arc<HandshakeFailures>,
}

/// The client side of TLS: a reloadable configuration, the server name to expect, a
/// handshake timeout and a failure count. Cheap to clone; every clone shares them.
#[derive(Clone)]
pub struct TlsConnector {
    shared: Arc<ConnectorShared>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("name", &self.shared.config.name)
            .field("files", &self.shared.config.paths)
            .field("server_name", &self.shared.server_name)
            .finish()
    }
}

/// Parses a DNS name or an IP address into the name a certificate is checked against.
pub fn server_name(name: &str) -> Result<ServerName<'static>, Error> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| Error::TlsServerName {
        name: name.to_owned(),
    })
}

/// The host part of `host:port` (`[v6]:port` included), for the default server name.
pub fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

impl TlsConnector {
    /// Loads `files` (an error names the file at fault) for the client side called `name`
    /// in logs. With `server_name`, every server's certificate must carry that name;
    /// without it, the host (name or IP) connected to. Failed handshakes are added to
    /// `failures`.
    pub fn new(
        name: &'static str,
        files: &ClientFiles,
        server_name: Option<&str>,
        handshake_timeout: Duration,
        failures: Arc<HandshakeFailures>,
    ) -> Result<TlsConnector, Error> {
        let server_name = server_name.map(self::server_name).transpose()?;
        let config = {
            let files = files.clone();
            Reloadable::new(name, files.paths(), move || files.load())?
        };
        Ok(TlsConnector {
            shared: Arc::new(ConnectorShared {
                config,
                server_name,
                handshake_timeout,
                failures,
            }),
        })
    }

    /// A connector trusting `ca` alone, with the default timeout and its own counter.
    pub fn trusting(ca: impl Into<PathBuf>) -> Result<TlsConnector, Error> {
        TlsConnector::new(
            "client",
            &ClientFiles::trusting(ca),
            None,
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::default(),
        )
    }

    /// Runs the client side of a handshake on `stream`, checking the server's certificate
    /// against the configured server name or else `host` (a DNS name or an IP address).
    pub async fn connect(&self, stream: TcpStream, host: &str) -> Result<Stream, Error> {
        let shared = &self.shared;
        let peer = stream
            .peer_addr()
            .map_or_else(|_| host.to_owned(), |a| a.to_string());
        let name = match &shared.server_name {
            Some(name) => name.clone(),
            None => server_name(host)?,
        };
        let connector = tokio_rustls::TlsConnector::from(shared.config.get());
        let outcome =
            tokio::time::timeout(shared.handshake_timeout, connector.connect(name, stream)).await;
        let error = match outcome {
            Ok(Ok(tls)) => return Ok(Stream::Tls(Box::new(tls.into()))),
            Ok(Err(source)) if not_tls(&source) => Error::TlsPeerNotTls { peer },
            Ok(Err(source)) => Error::TlsHandshake { peer, source },
            Err(_) => Error::TlsHandshakeTimeout {
                peer,
                timeout: shared.handshake_timeout,
            },
        };
        shared.failures.add();
        tracing::warn!(tls = shared.config.name, %error, "TLS handshake failed");
        Err(error)
    }

    /// Reads the files again now; on error the previous configuration stays.
    pub fn reload(&self) -> Result<(), Error> {
        self.shared.config.reload()
    }

    /// Reloads on SIGHUP and whenever the files change (looked at every `poll`), until
    /// `stop`.
    pub async fn watch(self, poll: Duration, stop: CancellationToken) {
        self.shared.config.watch(poll, stop).await
    }

    /// The configuration new handshakes use now (for an HTTP client, say).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.shared.config.get()
    }
}

/// True when a handshake failed because the server's answer was not a TLS record: a
/// tidepool port without TLS answers a ClientHello with an `error` frame, whose first byte
/// (a length prefix's high byte, 0) is no TLS content type.
fn not_tls(error: &io::Error) -> bool {
    matches!(
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))
    )
}

/// A connection with or without TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, either side. Boxed: a TLS session is a few KiB, and the plaintext
    /// variant should not carry that.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

/// The read half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    /// Plain TCP: tokio's own half, no lock.
    Plain(OwnedReadHalf),
    /// TLS: one session shared with the write half behind tokio's split lock.
    Tls(tokio::io::ReadHalf<Box<tokio_rustls::TlsStream<TcpStream>>>),
}

/// The write half of a [`Stream`]. Flush after writing: TLS records may wait in the
/// session's buffer until then (plain TCP's flush does nothing).
#[derive(Debug)]
pub enum WriteHalf {
    /// Plain TCP: tokio's own half, no lock.
    Plain(OwnedWriteHalf),
    /// TLS: one session shared with the read half behind tokio's split lock.
    Tls(tokio::io::WriteHalf<Box<tokio_rustls::TlsStream<TcpStream>>>),
}

impl Stream {
    /// The TCP socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Splits into halves that two tasks can own.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(tcp) => {
                let (r, w) = tcp.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(tls) => {
                let (r, w) = tokio::io::split(tls);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// The certificates the peer presented (TLS only), its own first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => tls.get_ref().1.peer_certificates(),
        }
    }
}

/// Forwards the poll methods of `AsyncRead` / `AsyncWrite` to whichever variant is inside.
macro_rules! either {
    ($self:ident, $inner:ident => $call:expr) => {
        match $self.get_mut() {
            Self::Plain($inner) => {
                let $inner = Pin::new($inner);
                $call
            }
            Self::Tls($inner) => {
                let $inner = Pin::new($inner);
                $call
            }
        }
    };
}

macro_rules! impl_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                either!(self, s => s.poll_read(cx, buf))
            }
        }
    };
}

macro_rules! impl_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                either!(self, s => s.poll_write(cx, buf))
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                either!(self, s => s.poll_write_vectored(cx, bufs))
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                either!(self, s => s.poll_flush(cx))
            }

            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                either!(self, s => s.poll_shutdown(cx))
            }
        }
    };
}

impl_read!(Stream);
impl_write!(Stream);
impl_read!(ReadHalf);
impl_write!(WriteHalf);

#[cfg(test)]
mod tests {
    use super::testing::Pki;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn server(pki: &Pki, client_ca: bool) -> ServerFiles {
        let leaf = pki.leaf("server", &["localhost", "127.0.0.1"]);
        ServerFiles {
            cert: leaf.cert,
            key: leaf.key,
            client_ca: client_ca.then(|| pki.ca()),
        }
    }

    /// Accepts one connection with `acceptor` and echoes one line back.
    async fn echo_once(acceptor: TlsAcceptor) -> (SocketAddr, tokio::task::JoinHandle<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.unwrap();
            let Ok(mut stream) = acceptor.accept(tcp, peer).await else {
                return false;
            };
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(&buf).await.unwrap();
            stream.flush().await.unwrap();
            true
        });
        (addr, task)
    }

    async fn hello(connector: &TlsConnector, addr: SocketAddr) -> Result<[u8; 5], Error> {
        let tcp = TcpStream::connect(addr).await?;
        let stream = connector.connect(tcp, "127.0.0.1").await?;
        let (mut r, mut w) = stream.into_split();
        w.write_all(b"hello").await?;
        w.flush().await?;
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn plaintext_and_tls_on_the_wrong_port_are_named() {
        // A plaintext client on a TLS port reads the server's alert as a frame.
        let pki = Pki::new("wrong-port");
        let acceptor = TlsAcceptor::new(
            "test",
            &server(&pki, false),
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::default(),
        )
        .unwrap();
        let (addr, served) = echo_once(acceptor).await;
        let client = crate::Client::connect(addr).await.unwrap();
        let err = client.ping(Duration::from_secs(5)).await.unwrap_err();
        assert!(err.to_string().contains("this port speaks TLS"), "{err}");
        assert!(!served.await.unwrap());

        // A TLS client on a plaintext tidepool port: the server reads a ClientHello where
        // a length prefix belongs and answers with an `error` frame, as servers do.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plain = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = bytes::BytesMut::new();
            while buf.len() < 4 {
                assert!(tcp.read_buf(&mut buf).await.unwrap() > 0);
            }
            let err =
                tokio_util::codec::Decoder::decode(&mut crate::FrameCodec::default(), &mut buf)
                    .unwrap_err();
            let reply = crate::encode_frame(&crate::Message::Error(err.reply())).unwrap();
            tcp.write_all(&reply).await.unwrap();
            err
        });
        let connector = TlsConnector::trusting(pki.ca()).unwrap();
        let err = hello(&connector, addr).await.unwrap_err();
        assert!(matches!(err, Error::TlsPeerNotTls { .. }), "{err}");
        assert!(err.to_string().contains("without TLS"), "{err}");
        let seen = plain.await.unwrap();
        assert!(
            matches!(seen, Error::TlsHandshakeOnPlainConnection),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn a_trusted_server_answers_over_tls() {
        let pki = Pki::new("basic");
        let failures = Arc::new(HandshakeFailures::default());
        let acceptor = TlsAcceptor::new(
            "test",
            &server(&pki, false),
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::clone(&failures),
        )
        .unwrap();
        let (addr, served) = echo_once(acceptor).await;
        let connector = TlsConnector::trusting(pki.ca()).unwrap();
        assert_eq!(&hello(&connector, addr).await.unwrap(), b"hello");
        assert!(served.await.unwrap());
        assert_eq!(failures.count(), 0);
    }

    #[tokio::test]
    async fn an_untrusted_server_or_wrong_name_is_refused_and_counted() {
        let (pki, other) = (Pki::new("trusted"), Pki::new("other"));
        let server_failures = Arc::new(HandshakeFailures::default());
        let acceptor = TlsAcceptor::new(
            "test",
            &server(&pki, false),
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::clone(&server_failures),
        )
        .unwrap();
        let client_failures = Arc::new(HandshakeFailures::default());
        let connector = TlsConnector::new(
            "test",
            &ClientFiles::trusting(other.ca()),
            None,
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::clone(&client_failures),
        )
        .unwrap();
        let (addr, served) = echo_once(acceptor.clone()).await;
        let err = hello(&connector, addr).await.unwrap_err();
        assert!(matches!(err, Error::TlsHandshake { .. }), "{err}");
        assert!(!served.await.unwrap());
        assert_eq!(client_failures.count(), 1);
        assert_eq!(server_failures.count(), 1);

        // Trusted CA, but the certificate does not name what the client expects.
        let connector = TlsConnector::new(
            "test",
            &ClientFiles::trusting(pki.ca()),
            Some("worker.internal"),
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::default(),
        )
        .unwrap();
        let (addr, _served) = echo_once(acceptor).await;
        let err = hello(&connector, addr).await.unwrap_err().to_string();
        assert!(
            err.contains("not valid for name \"worker.internal\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn mutual_tls_needs_a_client_certificate() {
        let pki = Pki::new("mtls");
        let files = server(&pki, true);
        let acceptor =
            TlsAcceptor::new("test", &files, DEFAULT_HANDSHAKE_TIMEOUT, Arc::default()).unwrap();
        let (addr, served) = echo_once(acceptor.clone()).await;
        let anonymous = TlsConnector::trusting(pki.ca()).unwrap();
        // TLS 1.3: the client learns of the refusal on its first read.
        assert!(hello(&anonymous, addr).await.is_err());
        assert!(!served.await.unwrap());

        let leaf = pki.leaf("client", &["balancer"]);
        let with_cert = TlsConnector::new(
            "test",
            &ClientFiles {
                ca: pki.ca(),
                cert: Some(leaf.cert),
                key: Some(leaf.key),
            },
            None,
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::default(),
        )
        .unwrap();
        let (addr, served) = echo_once(acceptor).await;
        assert_eq!(&hello(&with_cert, addr).await.unwrap(), b"hello");
        assert!(served.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_handshake_times_out() {
        let pki = Pki::new("stall");
        let failures = Arc::new(HandshakeFailures::default());
        let acceptor = TlsAcceptor::new(
            "test",
            &server(&pki, false),
            Duration::from_secs(3),
            Arc::clone(&failures),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Connects and says nothing.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        let err = acceptor.accept(tcp, peer).await.unwrap_err();
        assert!(matches!(err, Error::TlsHandshakeTimeout { .. }), "{err}");
        assert_eq!(failures.count(), 1);
    }

    #[test]
    fn file_errors_name_the_file_and_the_fix() {
        let pki = Pki::new("files");
        let missing = pki.dir().join("missing.pem");
        let err = load_certs(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let not_pem = pki.dir().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = load_certs(&not_pem).unwrap_err().to_string();
        assert!(
            err.contains("not.pem") && err.contains("BEGIN CERTIFICATE"),
            "{err}"
        );
        // A certificate where the key should be.
        let err = load_key(&pki.ca()).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("PRIVATE KEY"),
            "{err}"
        );
        // A key that is not the certificate's.
        let a = pki.leaf("a", &["a"]);
        let b = pki.leaf("b", &["b"]);
        let files = ServerFiles {
            cert: a.cert,
            key: b.key,
            client_ca: None,
        };
        let err = files.load().unwrap_err().to_string();
        assert!(err.contains("b.key"), "{err}");
        let err = ClientFiles {
            ca: pki.ca(),
            cert: Some(pki.dir().join("a.pem")),
            key: None,
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(err.contains("give both"), "{err}");
    }

    #[tokio::test]
    async fn rotation_is_picked_up_by_the_poll_and_a_bad_rotation_keeps_the_old() {
        let pki = Pki::new("rotate");
        let files = server(&pki, false);
        let acceptor =
            TlsAcceptor::new("test", &files, DEFAULT_HANDSHAKE_TIMEOUT, Arc::default()).unwrap();
        let stop = CancellationToken::new();
        let watching = tokio::spawn(
            acceptor
                .clone()
                .watch(Duration::from_millis(20), stop.clone()),
        );
        let before = acceptor.config();

        // A half-written rotation (garbage key) keeps the old configuration...
        std::fs::write(&files.key, "not a key").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(Arc::ptr_eq(&before, &acceptor.config()));

        // ... and the completed one replaces it.
        let next = pki.leaf("next", &["localhost"]);
        std::fs::copy(next.cert, &files.cert).unwrap();
        std::fs::copy(next.key, &files.key).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::ptr_eq(&before, &acceptor.config()) {
            assert!(tokio::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        watching.await.unwrap();
    }

    #[test]
    fn hosts_and_names() {
        assert_eq!(host_of("example.com:7000"), "example.com");
        assert_eq!(host_of("[::1]:7000"), "[::1]");
        assert_eq!(host_of("example.com"), "example.com");
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("10.0.0.1").is_ok());
        assert!(server_name("not a name!").is_err());
    }
}
