//! One-shot readiness probes for container healthchecks: `tidepool-probe ping ADDR` and
//! `tidepool-probe http URL`.
//!
//! The container image has no shell and no curl, so docker-compose's `healthcheck` runs
//! this instead. Each probe makes one attempt within a timeout and says yes or no:
//! - [`ping`]: a protocol `ping`; passes only on `pong`, which a worker sends once its
//!   model is loaded (the same check the balancer's `tidepool` health checks make).
//! - [`http_get`]: an HTTP/1.0 `GET`; passes on a 2xx status (the balancer's `/healthz`).
//!   Plain `http://host:port/path` only: enough for a probe on a private network, and no
//!   HTTP client library in the image.

use std::time::Duration;
use tidepool_protocol::tls::TlsConnector;
use tidepool_protocol::ClientOptions;

use tidepool_protocol::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Sends `GET` to `url` (`http://host:port/path`) and returns the status when it is 2xx,
/// all within `timeout`.
pub async fn http_get(url: &str, timeout: Duration) -> Result<u16, Error> {
    let (authority, path) = split_url(url)?;
    let attempt = async {
        let mut stream = TcpStream::connect(authority).await?;
        // HTTP/1.0 with `Connection: close`: the server closes after the response, so
        // reading to the end needs no chunked or length parsing.
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut response)
            .await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(response)) => response,
        Ok(Err(source)) => {
            return Err(Error::Http {
                url: url.to_owned(),
                source,
            })
        }
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

/// `http://host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> Result<(&str, &str), Error> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("only http:// URLs are probed"))?;
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
    Ok((authority, path))
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
    use tidepool_tests::stand_in::{StandIn, StandInConfig};
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

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_url("http://balancer:7001/healthz").unwrap(),
            ("balancer:7001", "/healthz")
        );
        assert_eq!(
            split_url("http://127.0.0.1:1").unwrap(),
            ("127.0.0.1:1", "/")
        );
        assert!(split_url("https://balancer:7001/").is_err());
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
        assert_eq!(http_get(&ok, DEFAULT_TIMEOUT).await.unwrap(), 200);
        let down = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert!(matches!(
            http_get(&down, DEFAULT_TIMEOUT).await,
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
            http_get(&format!("http://{addr}/"), DEFAULT_TIMEOUT).await,
            Err(Error::Http { .. })
        ));
    }
}
