//! One-shot readiness probes for container healthchecks: `tidepool-probe ping ADDR` and
//! `tidepool-probe http URL`.
//!
//! The container image has no shell and no curl, so docker-compose's `healthcheck` runs
//! this instead. Each probe makes one attempt within a timeout and says yes or no:
//! - [`ping`]: a protocol `ping`; passes only on `pong`, which a worker sends once its
//!   model is loaded (the same check the balancer's `tidepool` health checks make).
//! - [`http_get`]: an HTTP/1.0 `GET`; passes on a 2xx status (the balancer's `/healthz`).
//!   `http://host:port/path`, or `https://` with the probe's `--tls-ca` where the admin API
//!   serves TLS (`--admin-tls-cert`, as every deploy runs it): a few lines over the same
//!   rustls connector as `ping`, so no HTTP client library in the image.

use std::time::Duration;
use tidepool_protocol::tls::TlsConnector;
use tidepool_protocol::ClientOptions;

use tidepool_protocol::tls::host_of;
use tidepool_protocol::Client;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;

/// Default `--timeout` of both probes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of a response [`http_get`] reads: the status line is all it needs.
const MAX_RESPONSE: usize = 16 * 1024;

/// Connects to `addr`, sends `ping`, and returns `Ok` on `pong`, all within `timeout`.
/// With `tls`, the connection speaks TLS (the probe's `--tls-*` flags).
pub async fn ping(addr: &str, timeout: Duration, tls: Option<&TlsConnector>) -> Result<(), Error> {
    let attempt = async {
        let client = match tls {
            None => Client::connect(addr).await?,
            Some(tls) => Client::connect_tls(addr, tls, ClientOptions::default()).await?,
        };
        client.ping(timeout).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::Ping {
            target: addr.to_owned(),
            source: Box::new(source),
        }),
        Err(_) => Err(Error::ProbeTimeout {
            target: addr.to_owned(),
            after: timeout,
        }),
    }
}

/// Sends `GET` to `url` (`http://host:port/path`, or `https://` with `tls`) and returns the
/// status when it is 2xx, all within `timeout`. An `https://` URL's server certificate is
/// checked against `tls`'s CA and its server name (default: the URL's host).
pub async fn http_get(
    url: &str,
    timeout: Duration,
    tls: Option<&TlsConnector>,
) -> Result<u16, Error> {
    let parsed = split_url(url)?;
    let tls = match (parsed.https, tls) {
        (true, None) => {
            return Err(Error::InvalidUrl {
                url: url.to_owned(),
                reason: "an https:// URL needs --tls-ca, the CA that signed the server's \
                         certificate (or probe http:// where the server has no TLS)"
                    .to_owned(),
            })
        }
        (true, Some(tls)) => Some(tls),
        // A CA given for a plain URL is not used: the URL says what the server speaks.
        (false, _) => None,
    };
    let authority = parsed.authority;
    let attempt = async {
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|source| Error::Http {
                url: url.to_owned(),
                source,
            })?;
        let response = match tls {
            None => exchange(tcp, authority, parsed.path).await,
            Some(tls) => {
                let stream = tls
                    .connect(tcp, host_of(authority))
                    .await
                    .map_err(|source| Error::HttpTls {
                        url: url.to_owned(),
                        source: Box::new(source),
                    })?;
                exchange(stream, authority, parsed.path).await
            }
        };
        response.map_err(|source| Error::Http {
            url: url.to_owned(),
            source,
        })
    };
    let response = match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome?,
        Err(_) => {
            return Err(Error::ProbeTimeout {
                target: url.to_owned(),
                after: timeout,
            })
        }
    };
    let status = status_code(&response).ok_or_else(|| Error::HttpStatus {
        url: url.to_owned(),
        status: None,
    })?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(Error::HttpStatus {
            url: url.to_owned(),
            status: Some(status),
        })
    }
}

/// Writes the request and reads the response to its end (at most [`MAX_RESPONSE`]).
async fn exchange<S>(mut stream: S, authority: &str, path: &str) -> std::io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // HTTP/1.0 with `Connection: close`: the server closes after the response, so
    // reading to the end needs no chunked or length parsing.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // TLS holds written records until a flush; plain TCP's flush does nothing.
    stream.flush().await?;
    let mut response = Vec::new();
    match (&mut stream)
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut response)
        .await
    {
        Ok(_) => Ok(response),
        // A TLS server may close without close_notify once it has answered: a response
        // that arrived whole enough to carry its status line counts.
        Err(error)
            if error.kind() == std::io::ErrorKind::UnexpectedEof
                && status_code(&response).is_some() =>
        {
            Ok(response)
        }
        Err(error) => Err(error),
    }
}

/// The parts of a probe URL.
#[derive(Debug, PartialEq)]
struct ProbeUrl<'a> {
    /// `https://`: the request goes over TLS.
    https: bool,
    /// `host:port`.
    authority: &'a str,
    /// `/path`, `/` when the URL has none.
    path: &'a str,
}

/// `http://host:port/path` (or `https://`) → its [`ProbeUrl`].
fn split_url(url: &str) -> Result<ProbeUrl<'_>, Error> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let (https, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return Err(invalid("only http:// and https:// URLs are probed")),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(invalid("no host"));
    }
    if !authority.contains(':') {
        return Err(invalid("no port (write host:port)"));
    }
    Ok(ProbeUrl {
        https,
        authority,
        path,
    })
}

/// The status of an HTTP response's first line (`HTTP/1.1 200 OK`).
fn status_code(response: &[u8]) -> Option<u16> {
    let line_end = response.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&response[..line_end]).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Arc;
    use tidepool_protocol::tls::{ServerFiles, TlsAcceptor, DEFAULT_HANDSHAKE_TIMEOUT};
    use tidepool_tests::stand_in::{StandIn, StandInConfig};
    use tidepool_tests::tls::{connector, Pki};
    use tokio::net::TcpListener;

    /// Serves `response` to every connection, after reading the request head.
    async fn http_server(response: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = vec![0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        format!("http://{addr}/healthz")
    }

    /// Serves `response` over TLS (a certificate of `pki` naming 127.0.0.1) to every
    /// connection, then closes without close_notify, as a server may.
    async fn https_server(pki: &Pki, response: &'static str) -> String {
        let leaf = pki.leaf("admin", &["127.0.0.1"]);
        let files = ServerFiles {
            cert: leaf.cert,
            key: leaf.key,
            client_ca: None,
        };
        let acceptor = TlsAcceptor::new(
            "test admin",
            &files,
            DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::default(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let Ok(mut stream) = acceptor.accept(tcp, peer).await else {
                    continue;
                };
                let mut buf = vec![0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.flush().await;
            }
        });
        format!("https://{addr}/healthz")
    }

    #[tokio::test]
    async fn https_passes_with_the_ca_and_fails_without_it() {
        let pki = Pki::new("probe-https");
        let url = https_server(&pki, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await;
        let trusted = connector(&pki.ca(), None);
        assert_eq!(
            http_get(&url, DEFAULT_TIMEOUT, Some(&trusted))
                .await
                .unwrap(),
            200
        );
        // No CA given: refused before connecting, saying what to add.
        let missing = http_get(&url, DEFAULT_TIMEOUT, None).await.unwrap_err();
        assert!(missing.to_string().contains("--tls-ca"), "{missing}");
        // Another CA: the handshake fails, and the probe with it.
        let other = Pki::new("probe-https-other");
        let untrusted = connector(&other.ca(), None);
        assert!(matches!(
            http_get(&url, DEFAULT_TIMEOUT, Some(&untrusted)).await,
            Err(Error::HttpTls { .. })
        ));
        // Plain HTTP to the TLS port: no HTTP response comes back.
        let plain = url.replacen("https://", "http://", 1);
        assert!(http_get(&plain, DEFAULT_TIMEOUT, None).await.is_err());
    }

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_url("http://balancer:7001/healthz").unwrap(),
            ProbeUrl {
                https: false,
                authority: "balancer:7001",
                path: "/healthz"
            }
        );
        assert_eq!(
            split_url("http://127.0.0.1:1").unwrap(),
            ProbeUrl {
                https: false,
                authority: "127.0.0.1:1",
                path: "/"
            }
        );
        assert_eq!(
            split_url("https://balancer:7001/healthz").unwrap(),
            ProbeUrl {
                https: true,
                authority: "balancer:7001",
                path: "/healthz"
            }
        );
        assert!(split_url("ftp://balancer:7001/").is_err());
        assert!(split_url("http://balancer/healthz").is_err());
        assert!(split_url("http:///healthz").is_err());
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n\r\nok\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 200"), None);
    }

    #[tokio::test]
    async fn http_passes_on_2xx_only() {
        let ok = http_server("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await;
        assert_eq!(http_get(&ok, DEFAULT_TIMEOUT, None).await.unwrap(), 200);
        let down = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert!(matches!(
            http_get(&down, DEFAULT_TIMEOUT, None).await,
            Err(Error::HttpStatus {
                status: Some(503),
                ..
            })
        ));
    }

    #[tokio::test]
    async fn ping_passes_only_when_ready() {
        let ready = StandIn::start(StandInConfig::default()).await;
        ping(&ready.addr().to_string(), DEFAULT_TIMEOUT, None)
            .await
            .unwrap();
        ready.set_ready(false);
        assert!(ping(&ready.addr().to_string(), DEFAULT_TIMEOUT, None)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn nothing_listening_fails_fast() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        assert!(matches!(
            ping(&addr.to_string(), DEFAULT_TIMEOUT, None).await,
            Err(Error::Ping { .. })
        ));
        assert!(matches!(
            http_get(&format!("http://{addr}/"), DEFAULT_TIMEOUT, None).await,
            Err(Error::Http { .. })
        ));
    }
}
