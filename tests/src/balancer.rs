//! Balancer harness: an in-process balancer on `127.0.0.1:0` with fast health settings,
//! a resolver tests can change, a raw protocol connection for byte-level checks, and a
//! minimal HTTP client for the admin API.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use tidepool_balancer::{Balancer, Config, Error, Handle, Resolver};
use tidepool_protocol::{Client, Infer, Message, MessageCodec, Pool, Tensor, Tensors};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// A config for tests: both listeners on `127.0.0.1:0`, health checked every 50 ms
/// (healthy after 2 passes, unhealthy after 2 failures), short delays.
pub fn fast_config(targets: &[SocketAddr]) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        targets: targets.iter().map(|a| a.to_string()).collect(),
        health_interval: Duration::from_millis(50),
        health_timeout: Duration::from_millis(40),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        deregistration_delay: Duration::from_secs(5),
        dns_interval: Duration::from_millis(50),
        drain_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A running in-process balancer, stopped by [`TestBalancer::stop`].
pub struct TestBalancer {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The admin API.
    pub admin: SocketAddr,
    /// Targets, outstanding counts, queue length.
    pub handle: Handle,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl TestBalancer {
    /// Binds and runs a balancer with `config`.
    pub async fn start(config: Config) -> TestBalancer {
        let static_targets = config.targets.len();
        let balancer = Balancer::bind(config).await.expect("balancer binds");
        TestBalancer::run(balancer, static_targets).await
    }

    /// Binds and runs a balancer whose `--target-dns` names `resolver` answers.
    pub async fn start_with(config: Config, resolver: Arc<dyn Resolver>) -> TestBalancer {
        let static_targets = config.targets.len();
        let balancer = Balancer::bind_with(config, resolver)
            .await
            .expect("balancer binds");
        TestBalancer::run(balancer, static_targets).await
    }

    async fn run(balancer: Balancer, static_targets: usize) -> TestBalancer {
        let shutdown = CancellationToken::new();
        let lb = TestBalancer {
            addr: balancer.listen_addr(),
            admin: balancer.admin_addr(),
            handle: balancer.handle(),
            task: tokio::spawn(balancer.run(shutdown.clone())),
            shutdown,
        };
        // `--target`s are registered when `run` starts.
        lb.wait_for("--target registrations", |h| {
            h.targets().len() >= static_targets
        })
        .await;
        lb
    }

    /// A protocol client connected to the balancer.
    pub async fn client(&self) -> Client {
        Client::connect(self.addr)
            .await
            .expect("connect to balancer")
    }

    /// A raw framed connection to the balancer.
    pub async fn raw(&self) -> RawConn {
        RawConn::connect(self.addr).await
    }

    /// Polls `check` every 10 ms until it holds; panics naming `what` after 10 s.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Handle) -> bool) {
        wait_until(what, || check(&self.handle)).await;
    }

    /// Waits until `n` targets are healthy.
    pub async fn wait_healthy(&self, n: usize) {
        self.wait_for(&format!("{n} healthy targets"), |h| h.healthy_count() == n)
            .await;
    }

    /// Starts shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and returns what `run` returned (within 15 s).
    pub async fn stop(self) -> Result<(), Error> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("balancer stops within 15 s")
            .expect("balancer task did not panic")
    }
}

/// Polls `check` every 10 ms until it holds; panics naming `what` after 10 s.
pub async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A resolver whose answers the test sets.
#[derive(Default)]
pub struct StaticResolver {
    answers: Mutex<HashMap<String, io::Result<Vec<SocketAddr>>>>,
}

impl StaticResolver {
    /// From now on, `name` resolves to `addrs`.
    pub fn set(&self, name: &str, addrs: &[SocketAddr]) {
        self.answers
            .lock()
            .expect("resolver lock")
            .insert(name.to_owned(), Ok(addrs.to_vec()));
    }

    /// From now on, resolving `name` fails.
    pub fn fail(&self, name: &str) {
        self.answers.lock().expect("resolver lock").insert(
            name.to_owned(),
            Err(io::Error::new(io::ErrorKind::NotFound, "no such name")),
        );
    }
}

impl Resolver for StaticResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        let answer = match self.answers.lock().expect("resolver lock").get(name) {
            Some(Ok(addrs)) => Ok(addrs.clone()),
            Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "unknown name")),
        };
        Box::pin(async move { answer })
    }
}

/// One input tensor `x` holding `value`, so that echoed answers can be matched.
pub fn inputs(value: f32) -> Tensors {
    let mut t = Tensors::new();
    t.insert(
        "x".to_owned(),
        Tensor::from_vec(vec![1], vec![value]).expect("tensor"),
    );
    t
}

/// The value of an echoed `x`.
pub fn echoed(outputs: &Tensors) -> f32 {
    outputs["x"].to_vec::<f32>().expect("f32 output")[0]
}

/// Sends `calls` calls at once over `pool`, call `k` carrying `k`; panics unless every one
/// gets a result with its own value. `log` (say, the balancer's log) joins a failure's
/// message.
pub async fn every_call_answered(pool: &Pool, calls: u32, log: impl Fn() -> String) {
    let mut running = tokio::task::JoinSet::new();
    for k in 1..=calls {
        let pool = pool.clone();
        running.spawn(async move { (k, pool.infer(inputs(k as f32)).await) });
    }
    let mut answered = 0;
    while let Some(joined) = running.join_next().await {
        let (k, outcome) = joined.expect("call task");
        let result = outcome.unwrap_or_else(|e| panic!("call {k} failed: {e}\n{}", log()));
        assert_eq!(
            echoed(&result.outputs),
            k as f32,
            "call {k} got another's answer"
        );
        answered += 1;
    }
    assert_eq!(answered, calls);
}

/// An `infer` frame with id `id` carrying `value`.
pub fn infer(id: u64, value: f32) -> Message {
    Message::Infer(Infer {
        id,
        inputs: inputs(value),
        deadline_ms: None,
        client: None,
        ..Default::default()
    })
}

/// A protocol connection without the client's conveniences: frames in, frames out.
pub struct RawConn {
    framed: Framed<TcpStream, MessageCodec>,
}

impl RawConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn {
            framed: Framed::new(stream, MessageCodec::default()),
        }
    }

    /// Connects to `addr` from `local`, another loopback address (any of 127.0.0.0/8
    /// reaches the loopback interface), so that a server sees a second client host.
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(local, 0))
            .expect("bind a loopback address");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn {
            framed: Framed::new(stream, MessageCodec::default()),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: Message) {
        self.framed.send(msg).await.expect("send frame");
    }

    /// Writes raw bytes (for malformed frames).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.framed
            .get_mut()
            .write_all(bytes)
            .await
            .expect("write bytes");
    }

    /// The next message within `within`: `Some(Ok)` a message, `Some(Err)` an
    /// undecodable frame, `None` the connection closed. Panics on timeout.
    pub async fn recv(&mut self, within: Duration) -> Option<Message> {
        match tokio::time::timeout(within, self.framed.next()).await {
            Ok(Some(Ok(Ok(msg)))) => Some(msg),
            Ok(Some(Ok(Err(e)))) => panic!("undecodable frame from balancer: {e}"),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no frame within {within:?}"),
        }
    }

    /// True when nothing arrives within `within` (the connection stays quiet).
    pub async fn quiet(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.framed.next())
            .await
            .is_err()
    }

    /// The answers to `n` requests by id, each within 5 s; panics when an id is answered
    /// twice or anything more arrives within 300 ms (exactly one answer per request).
    pub async fn answers(&mut self, n: usize) -> HashMap<u64, Message> {
        let mut seen = HashMap::new();
        while seen.len() < n {
            let msg = self
                .recv(Duration::from_secs(5))
                .await
                .expect("connection stays open");
            assert!(
                seen.insert(msg.id(), msg).is_none(),
                "a request answered twice"
            );
        }
        assert!(
            self.quiet(Duration::from_millis(300)).await,
            "no extra answers"
        );
        seen
    }
}

/// One HTTP/1.1 request to the admin API; returns the status and the body.
pub async fn http(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = http_with(admin, method, path, &[], body).await;
    (status, body)
}

/// One HTTP/1.1 request to the admin API with extra header lines (`"Authorization:
/// Bearer …"`); returns the status, the response's head (status line and headers) and
/// the body.
pub async fn http_with(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> (u16, String, String) {
    let stream = TcpStream::connect(admin).await.expect("connect admin");
    http_over_with(stream, &admin.to_string(), method, path, headers, body).await
}

/// One HTTP/1.1 request over an open connection (plain or TLS) to `host`; returns the
/// status and the body.
pub async fn http_over<S>(
    stream: S,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (status, _, body) = http_over_with(stream, host, method, path, &[], body).await;
    (status, body)
}

/// [`http_over`] with extra header lines; returns the status, the response's head and the
/// body.
pub async fn http_over_with<S>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> (u16, String, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    stream.flush().await.expect("flush request");
    let mut response = Vec::new();
    // A TLS server may close without close_notify once it has answered; what arrived counts.
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8(response).expect("utf-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("response has a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, head.to_owned(), body.to_owned())
}

/// Bytes of a frame with `body` as its MessagePack body.
pub fn frame(body: &[u8]) -> Bytes {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out.into()
}
