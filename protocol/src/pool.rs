//! [`Pool`]: connections spread over one or more balancers, with failover.
//!
//! Balancers run side by side (active-active) over the same workers, so a client that
//! knows several of them survives the loss of any one. The pool opens its connections
//! round-robin over the balancers it was given (or over the addresses a DNS name resolves
//! to), sends each call on the least busy open connection, and when a connection drops it
//! sends that connection's unanswered calls again on a connection to another balancer,
//! within what is left of each call's deadline. Inference is idempotent, so a call whose
//! first copy may have run is safe to run again; the connection that carried the first
//! copy is gone, so its answer can never arrive as a second one: every call gets exactly
//! one answer, a result or a typed error.
//!
//! Each connection has a keeper task: when its connection closes, the keeper reconnects
//! with exponential backoff and puts the new connection back into rotation once the
//! balancer answers `ping` (it has a target to route to). The keepers stop when the last
//! `Pool` handle is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::client::{CallOptions, Client, ClientOptions};
use crate::error::Error;
use crate::message::{InferResult, Tensors};
use crate::tls::{host_of, Stream, TlsConnector};

/// The first wait before reconnecting to a balancer whose connection dropped; it doubles
/// with each failed attempt.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between two reconnection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// A connection attempt (TCP, TLS handshake, readiness `ping`) that takes longer failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call without a deadline waits for a connection to come back when every
/// connection of the pool is down (a call with a deadline waits at most its deadline).
pub const NO_CONNECTION_WAIT: Duration = Duration::from_secs(5);

/// One balancer the pool connects to.
#[derive(Clone, Debug)]
struct Endpoint {
    /// What to connect to: `ip:port`, or `host:port` resolved again at each attempt.
    addr: String,
    /// The name a TLS certificate must carry: the host the caller gave, even when `addr`
    /// is one of the addresses it resolved to.
    host: String,
}

/// How to open one connection: plain TCP or TLS, and the client's settings.
#[derive(Clone)]
struct Dialer {
    options: ClientOptions,
    tls: Option<TlsConnector>,
}

impl Dialer {
    /// Opens a connection to `endpoint` within [`CONNECT_TIMEOUT`].
    async fn dial(&self, endpoint: &Endpoint) -> Result<Client, Error> {
        let attempt = async {
            let tcp = TcpStream::connect(&endpoint.addr).await?;
            tcp.set_nodelay(true)?;
            let peer = tcp.peer_addr()?.to_string();
            let stream = match &self.tls {
                None => Stream::Plain(tcp),
                Some(tls) => tls.connect(tcp, &endpoint.host).await?,
            };
            let (read, write) = stream.into_split();
            Ok(Client::from_parts(peer, read, write, self.options.clone()))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {} took longer than {CONNECT_TIMEOUT:?}",
                        endpoint.addr
                    ),
                )))
            })
    }
}

/// One connection of the pool: `None` while its keeper reconnects.
struct Slot {
    /// Index into the pool's endpoints.
    endpoint: usize,
    /// Locked only to clone or replace the handle, never across an `.await`.
    client: Mutex<Option<Client>>,
}

impl Slot {
    fn get(&self) -> Option<Client> {
        self.client
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    fn set(&self, client: Option<Client>) {
        *self
            .client
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = client;
    }
}

struct Shared {
    endpoints: Box<[Endpoint]>,
    slots: Box<[Arc<Slot>]>,
    /// Woken when a keeper puts a connection back, for calls that found none open.
    reconnected: Arc<Notify>,
    /// Calls sent again after their connection dropped or their balancer refused them.
    failovers: AtomicU64,
    /// Where the next look at the slots starts.
    turn: AtomicUsize,
    /// Stops the keepers when the last `Pool` handle is dropped.
    _stop: DropGuard,
}

/// Connections to one or more balancers (or one server), each call sent on the least busy
/// open connection, and sent again on a connection to another balancer when its
/// connection drops.
///
/// Cheap to clone; every clone shares the connections.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("balancers", &self.balancers())
            .field("open", &self.clients().len())
            .field("failovers", &self.failovers())
            .finish()
    }
}

impl Pool {
    /// Opens `size` connections (at least one per address) to `addr`. A DNS name that
    /// resolves to several addresses (of the first address's family) is several
    /// balancers, and the connections are spread over them; see [`Pool::connect_many`].
    pub async fn connect(addr: &str, size: usize, options: ClientOptions) -> Result<Pool, Error> {
        Pool::open(&[addr], size, Dialer { options, tls: None }).await
    }

    /// Opens `size` connections spread round-robin over the balancers at `addrs` (at least
    /// one connection each). Succeeds when at least one connection opens; the others are
    /// retried in the background with backoff and join the rotation when their balancer
    /// answers.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), tidepool_protocol::Error> {
    /// use tidepool_protocol::{ClientOptions, Pool};
    /// let pool = Pool::connect_many(&["10.0.0.1:7000", "10.0.0.2:7000"], 4, ClientOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_many(
        addrs: &[impl AsRef<str>],
        size: usize,
        options: ClientOptions,
    ) -> Result<Pool, Error> {
        Pool::open(addrs, size, Dialer { options, tls: None }).await
    }

    /// Opens `size` TLS connections (at least one per address) to `addr` (`host:port`);
    /// see [`Client::connect_tls`] and [`Pool::connect`].
    pub async fn connect_tls(
        addr: &str,
        size: usize,
        options: ClientOptions,
        tls: &TlsConnector,
    ) -> Result<Pool, Error> {
        Pool::connect_tls_many(&[addr], size, options, tls).await
    }

    /// Opens `size` TLS connections spread over the balancers at `addrs`; see
    /// [`Pool::connect_many`]. Each certificate must name the host given for its address
    /// (or the connector's server name).
    pub async fn connect_tls_many(
        addrs: &[impl AsRef<str>],
        size: usize,
        options: ClientOptions,
        tls: &TlsConnector,
    ) -> Result<Pool, Error> {
        let dialer = Dialer {
            options,
            tls: Some(tls.clone()),
        };
        Pool::open(addrs, size, dialer).await
    }

    async fn open(addrs: &[impl AsRef<str>], size: usize, dialer: Dialer) -> Result<Pool, Error> {
        let endpoints = resolve(addrs).await?;
        let size = size.max(endpoints.len());
        let mut slots = Vec::with_capacity(size);
        let mut first_error = None;
        for i in 0..size {
            let endpoint = i % endpoints.len();
            let client = match dialer.dial(&endpoints[endpoint]).await {
                Ok(client) => Some(client),
                Err(error) => {
                    tracing::warn!(balancer = %endpoints[endpoint].addr, %error, "could not connect; retrying in the background");
                    first_error.get_or_insert(error);
                    None
                }
            };
            slots.push(Arc::new(Slot {
                endpoint,
                client: Mutex::new(client),
            }));
        }
        if let Some(error) = first_error.filter(|_| slots.iter().all(|s| s.get().is_none())) {
            return Err(error);
        }
        let stop = CancellationToken::new();
        let reconnected = Arc::new(Notify::new());
        for slot in &slots {
            tokio::spawn(keep(
                Arc::clone(slot),
                endpoints[slot.endpoint].clone(),
                dialer.clone(),
                Arc::clone(&reconnected),
                stop.clone(),
            ));
        }
        Ok(Pool {
            shared: Arc::new(Shared {
                endpoints: endpoints.into(),
                slots: slots.into(),
                reconnected,
                failovers: AtomicU64::new(0),
                turn: AtomicUsize::new(0),
                _stop: stop.drop_guard(),
            }),
        })
    }

    /// The open connections.
    pub fn clients(&self) -> Vec<Client> {
        self.open_connections().map(|(_, client)| client).collect()
    }

    /// The balancers the connections are spread over (addresses as dialled).
    pub fn balancers(&self) -> Vec<String> {
        self.shared
            .endpoints
            .iter()
            .map(|e| e.addr.clone())
            .collect()
    }

    /// Calls sent again on another connection after their connection dropped, or after a
    /// balancer answered `unavailable` or `shutting_down` while another could be asked.
    pub fn failovers(&self) -> u64 {
        self.shared.failovers.load(Ordering::Relaxed)
    }

    /// The open connection with the fewest calls in flight.
    pub fn pick(&self) -> Option<Client> {
        self.pick_avoiding(&[])
    }

    /// Runs one item on the least busy connection; when that connection drops before the
    /// answer, runs it again on another balancer's, within what is left of the deadline.
    pub async fn infer_with(
        &self,
        inputs: Tensors,
        options: CallOptions,
    ) -> Result<InferResult, Error> {
        let started = Instant::now();
        // Balancers this call has lost a connection to, or been refused by.
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<Error> = None;
        // One send per balancer, and one more: a call whose connection dropped may go
        // back to a balancer that has returned.
        for attempt in 0..=self.shared.endpoints.len() {
            let left = options
                .deadline
                .map(|budget| budget.saturating_sub(started.elapsed()));
            if left == Some(Duration::ZERO) {
                break;
            }
            let Some((endpoint, client)) = self.connection(&tried, left).await else {
                break;
            };
            if attempt > 0 {
                self.shared.failovers.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(balancer = client.peer(), attempt, "sending a call again");
            }
            let answer = client
                .infer_with(
                    inputs.clone(),
                    CallOptions {
                        deadline: left,
                        ..options
                    },
                )
                .await;
            match answer {
                Err(error) if self.fails_over(&error, endpoint, &tried) => {
                    tried.push(endpoint);
                    last = Some(error);
                }
                answer => return answer,
            }
        }
        Err(match (last, options.deadline) {
            (Some(Error::ConnectionLost { .. }) | None, Some(budget))
                if started.elapsed() >= budget =>
            {
                Error::DeadlineExceeded {
                    message: format!(
                        "no answer from any of {} within {budget:?}",
                        self.balancers().join(", ")
                    ),
                }
            }
            (Some(error), _) => error,
            (None, _) => self.all_down(),
        })
    }

    /// Runs one item on the least busy connection, without a deadline.
    pub async fn infer(&self, inputs: Tensors) -> Result<InferResult, Error> {
        self.infer_with(inputs, CallOptions::default()).await
    }

    /// Whether a call that ended with `error` on `endpoint` goes to another connection: a
    /// lost connection always (the call may not have run, and running it twice is safe);
    /// a balancer that says it cannot serve now only when another balancer is open.
    fn fails_over(&self, error: &Error, endpoint: usize, tried: &[usize]) -> bool {
        match error {
            Error::ConnectionLost { .. } => true,
            Error::Unavailable { .. } | Error::ShuttingDown { .. } => self
                .open_connections()
                .any(|(e, _)| e != endpoint && !tried.contains(&e)),
            _ => false,
        }
    }

    /// The open connections with their balancer's index, starting from the next slot in
    /// turn, so that a least-busy choice among equals goes round-robin instead of always
    /// to the first balancer (sequential callers always see every connection idle).
    fn open_connections(&self) -> impl Iterator<Item = (usize, Client)> + '_ {
        let slots = &self.shared.slots;
        let start = self.shared.turn.fetch_add(1, Ordering::Relaxed) % slots.len();
        slots[start..]
            .iter()
            .chain(&slots[..start])
            .filter_map(|slot| {
                slot.get()
                    .filter(|c| !c.is_closed())
                    .map(|c| (slot.endpoint, c))
            })
    }

    /// The least busy open connection to a balancer not in `avoid`, else to any.
    fn pick_avoiding(&self, avoid: &[usize]) -> Option<Client> {
        self.pick_with_endpoint(avoid).map(|(_, client)| client)
    }

    fn pick_with_endpoint(&self, avoid: &[usize]) -> Option<(usize, Client)> {
        let fresh = self
            .open_connections()
            .filter(|(e, _)| !avoid.contains(e))
            .min_by_key(|(_, c)| c.in_flight());
        fresh.or_else(|| self.open_connections().min_by_key(|(_, c)| c.in_flight()))
    }

    /// A connection for the next send, waiting for one to come back when none is open:
    /// at most `left`, or [`NO_CONNECTION_WAIT`] without a deadline.
    async fn connection(&self, avoid: &[usize], left: Option<Duration>) -> Option<(usize, Client)> {
        let until = Instant::now() + left.unwrap_or(NO_CONNECTION_WAIT);
        loop {
            // Registered before looking, so a reconnection between the look and the wait
            // still wakes this call.
            let reconnected = self.shared.reconnected.notified();
            tokio::pin!(reconnected);
            reconnected.as_mut().enable();
            if let Some(found) = self.pick_with_endpoint(avoid) {
                return Some(found);
            }
            if tokio::time::timeout_at(until, reconnected).await.is_err() {
                return None;
            }
        }
    }

    fn all_down(&self) -> Error {
        Error::ConnectionLost {
            peer: self.balancers().join(", "),
            reason: Some(format!(
                "no connection to any balancer is open, and none came back in time (reconnecting every {RECONNECT_MAX:?} at most)"
            )),
        }
    }
}

/// The endpoints for `addrs`: an `ip:port` as given; a name that resolves to several
/// addresses becomes one endpoint per address (of the first address's family, so that
/// `localhost` is one balancer, not two), a name with one address stays a name.
async fn resolve(addrs: &[impl AsRef<str>]) -> Result<Vec<Endpoint>, Error> {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for addr in addrs {
        let addr = addr.as_ref().trim();
        let host = host_of(addr).to_owned();
        let mut resolved: Vec<SocketAddr> = if addr.parse::<SocketAddr>().is_ok() {
            Vec::new()
        } else {
            tokio::net::lookup_host(addr).await?.collect()
        };
        let family = resolved.first().map(SocketAddr::is_ipv4);
        resolved.retain(|a| Some(a.is_ipv4()) == family);
        resolved.dedup();
        if resolved.len() > 1 {
            endpoints.extend(resolved.into_iter().map(|a| Endpoint {
                addr: a.to_string(),
                host: host.clone(),
            }));
        } else {
            endpoints.push(Endpoint {
                addr: addr.to_owned(),
                host,
            });
        }
    }
    endpoints.dedup_by(|a, b| a.addr == b.addr);
    if endpoints.is_empty() {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no balancer address given; pass at least one host:port",
        )));
    }
    Ok(endpoints)
}

/// Keeps one slot connected: waits for its connection to close, then reconnects with
/// exponential backoff and puts the connection back once the server answers `ping`.
async fn keep(
    slot: Arc<Slot>,
    endpoint: Endpoint,
    dialer: Dialer,
    reconnected: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        if let Some(client) = slot.get() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = client.closed() => {}
            }
            tracing::info!(balancer = %endpoint.addr, "connection lost; reconnecting");
        }
        slot.set(None);
        let mut backoff = RECONNECT_FIRST;
        let client = loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(jittered(backoff)) => {}
            }
            let attempt = async {
                let client = dialer.dial(&endpoint).await?;
                // Connected is not ready: a restarted balancer answers `unavailable`
                // until its health checks have found a target.
                client.ping(CONNECT_TIMEOUT).await?;
                Ok::<_, Error>(client)
            };
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = attempt => outcome,
            };
            match outcome {
                Ok(client) => break client,
                Err(error) => {
                    tracing::debug!(balancer = %endpoint.addr, %error, ?backoff, "reconnection failed")
                }
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        };
        tracing::info!(balancer = %endpoint.addr, "reconnected; back in rotation");
        slot.set(Some(client));
        reconnected.notify_waiters();
    }
}

/// `backoff` less up to half of it, so that many clients that lost the same balancer do
/// not all come back in the same instant.
fn jittered(backoff: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    backoff.mul_f64(1.0 - f64::from(nanos % 1000) / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MessageCodec;
    use crate::message::{ErrorCode, ErrorReply, Message};
    use crate::tensor::Tensor;
    use crate::tls::{testing::Pki, ServerFiles, TlsAcceptor};
    use futures::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio_util::codec::{FramedRead, FramedWrite};

    const SECOND: Duration = Duration::from_secs(1);

    /// How a fake balancer answers `infer`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Mode {
        /// A result that names the fake.
        Answer,
        /// Nothing: the request stays unanswered until the fake is killed.
        Hold,
        /// `unavailable`.
        Unavailable,
    }

    /// An in-process server that speaks just enough of the protocol to stand for a
    /// balancer: `ping` is answered `pong`, `infer` as its mode says.
    struct Fake {
        name: &'static str,
        addr: SocketAddr,
        mode: Arc<Mutex<Mode>>,
        /// `infer` frames received.
        received: Arc<AtomicU64>,
        /// Connections accepted.
        accepted: Arc<AtomicU64>,
        kill: CancellationToken,
        tls: Option<TlsAcceptor>,
    }

    impl Fake {
        async fn start(name: &'static str, mode: Mode) -> Fake {
            Fake::start_on("127.0.0.1:0".parse().unwrap(), name, mode, None).await
        }

        async fn start_on(
            addr: SocketAddr,
            name: &'static str,
            mode: Mode,
            tls: Option<TlsAcceptor>,
        ) -> Fake {
            // A restart binds the port its killed self held, which that self's task
            // releases as soon as it runs.
            let mut bound = TcpListener::bind(addr).await;
            for _ in 0..100 {
                if bound.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                bound = TcpListener::bind(addr).await;
            }
            let listener = bound.unwrap();
            let fake = Fake {
                name,
                addr: listener.local_addr().unwrap(),
                mode: Arc::new(Mutex::new(mode)),
                received: Arc::default(),
                accepted: Arc::default(),
                kill: CancellationToken::new(),
                tls,
            };
            fake.serve(listener);
            fake
        }

        fn serve(&self, listener: TcpListener) {
            let (name, mode, received, accepted, kill, tls) = (
                self.name,
                Arc::clone(&self.mode),
                Arc::clone(&self.received),
                Arc::clone(&self.accepted),
                self.kill.clone(),
                self.tls.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let (tcp, peer) = tokio::select! {
                        () = kill.cancelled() => return,
                        conn = listener.accept() => conn.unwrap(),
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let stream = match &tls {
                        None => Stream::Plain(tcp),
                        Some(tls) => match tls.accept(tcp, peer).await {
                            Ok(stream) => stream,
                            Err(_) => continue,
                        },
                    };
                    let (mode, received, kill) =
                        (Arc::clone(&mode), Arc::clone(&received), kill.clone());
                    tokio::spawn(async move {
                        let (read, write) = stream.into_split();
                        let mut frames = FramedRead::new(read, MessageCodec::default());
                        let mut sink = FramedWrite::new(write, MessageCodec::default());
                        loop {
                            let frame = tokio::select! {
                                () = kill.cancelled() => return,
                                frame = frames.next() => frame,
                            };
                            let Some(Ok(Ok(msg))) = frame else { return };
                            let answer = match msg {
                                Message::Ping { id } => Message::pong(id),
                                Message::Infer(infer) => {
                                    received.fetch_add(1, Ordering::Relaxed);
                                    let mode = *mode.lock().unwrap();
                                    match mode {
                                        Mode::Answer => Message::Result(InferResult {
                                            id: infer.id,
                                            outputs: infer.inputs,
                                            queue_us: None,
                                            infer_us: None,
                                            batch_size: None,
                                            worker: Some(name.to_owned()),
                                        }),
                                        Mode::Hold => continue,
                                        Mode::Unavailable => Message::Error(ErrorReply::new(
                                            infer.id,
                                            ErrorCode::Unavailable,
                                            "no target can take requests",
                                        )),
                                    }
                                }
                                _ => continue,
                            };
                            if sink.send(answer).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }

        /// Drops the listener and every connection, as a SIGKILL would.
        fn kill(&self) {
            self.kill.cancel();
        }

        /// A new fake on the same port, as a restarted balancer.
        async fn restart(&self, mode: Mode) -> Fake {
            Fake::start_on(self.addr, self.name, mode, self.tls.clone()).await
        }

        fn set_mode(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }

        fn received(&self) -> u64 {
            self.received.load(Ordering::Relaxed)
        }
    }

    fn item(value: f32) -> Tensors {
        [(
            "input".to_owned(),
            Tensor::from_vec(vec![1], vec![value]).unwrap(),
        )]
        .into()
    }

    fn value_of(result: &InferResult) -> f32 {
        result.outputs["input"].to_vec::<f32>().unwrap()[0]
    }

    /// Waits (on real sockets, so in small steps) until `check` holds, 10 s at most.
    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + 10 * SECOND;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn addrs(fakes: &[&Fake]) -> Vec<String> {
        fakes.iter().map(|f| f.addr.to_string()).collect()
    }

    #[tokio::test]
    async fn connections_are_spread_over_every_balancer() {
        let a = Fake::start("a", Mode::Answer).await;
        let b = Fake::start("b", Mode::Answer).await;
        let pool = Pool::connect_many(&addrs(&[&a, &b]), 4, ClientOptions::default())
            .await
            .unwrap();
        until("two connections each", || {
            a.accepted.load(Ordering::Relaxed) == 2 && b.accepted.load(Ordering::Relaxed) == 2
        })
        .await;
        // Fewer connections than balancers still reaches each.
        let c = Fake::start("c", Mode::Answer).await;
        let small = Pool::connect_many(&addrs(&[&c, &a]), 1, ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(small.clients().len(), 2);
        let mut by = std::collections::BTreeMap::<String, u32>::new();
        for k in 0..40 {
            let result = pool.infer(item(k as f32)).await.unwrap();
            assert_eq!(value_of(&result), k as f32);
            *by.entry(result.worker.unwrap()).or_default() += 1;
        }
        assert_eq!(by.len(), 2, "both balancers served: {by:?}");
        assert_eq!(pool.failovers(), 0);
    }

    #[tokio::test]
    async fn a_dropped_balancer_s_unanswered_calls_are_answered_by_another() {
        let doomed = Fake::start("doomed", Mode::Hold).await;
        let survivor = Fake::start("survivor", Mode::Hold).await;
        let pool = Pool::connect_many(&addrs(&[&doomed, &survivor]), 4, ClientOptions::default())
            .await
            .unwrap();
        let n = 100u32;
        let calls: Vec<_> = (0..n)
            .map(|k| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let options = CallOptions {
                        deadline: Some(10 * SECOND),
                        ..CallOptions::default()
                    };
                    pool.infer_with(item(k as f32), options).await
                })
            })
            .collect();
        until("calls held by both", || {
            doomed.received() + survivor.received() == u64::from(n)
        })
        .await;
        assert!(doomed.received() > 0);
        survivor.set_mode(Mode::Answer);
        // The survivor's held calls stay unanswered (its mode changed after they came);
        // only the doomed ones are sent again, and the survivor answers those.
        let held_by_survivor = survivor.received();
        doomed.kill();
        until("the doomed calls resent", || {
            survivor.received() == u64::from(n)
        })
        .await;
        assert_eq!(pool.failovers(), u64::from(n) - held_by_survivor);
        // Let the survivor's held calls through: drop its connections; they go... to the
        // survivor again (the only balancer left) once it is back.
        survivor.kill();
        let back = survivor.restart(Mode::Answer).await;
        for (k, call) in calls.into_iter().enumerate() {
            let result = call.await.unwrap().unwrap();
            assert_eq!(value_of(&result), k as f32, "each call gets its own answer");
        }
        assert!(back.received() >= held_by_survivor);
    }

    #[tokio::test]
    async fn a_lost_balancer_is_taken_back_when_it_returns() {
        let a = Fake::start("a", Mode::Answer).await;
        let b = Fake::start("b", Mode::Answer).await;
        let pool = Pool::connect_many(&addrs(&[&a, &b]), 2, ClientOptions::default())
            .await
            .unwrap();
        a.kill();
        until("a's connection closed", || pool.clients().len() == 1).await;
        // While a is gone, b serves every call.
        for k in 0..10 {
            let result = pool.infer(item(k as f32)).await.unwrap();
            assert_eq!(result.worker.as_deref(), Some("b"));
        }
        let a = a.restart(Mode::Answer).await;
        until("a back in rotation", || pool.clients().len() == 2).await;
        for k in 0..20 {
            pool.infer(item(k as f32)).await.unwrap();
        }
        assert!(a.received() > 0, "the returned balancer takes calls again");
    }

    #[tokio::test]
    async fn unavailable_goes_to_another_balancer_and_errors_stay_typed() {
        let refusing = Fake::start("refusing", Mode::Unavailable).await;
        let good = Fake::start("good", Mode::Answer).await;
        let pool = Pool::connect_many(&addrs(&[&refusing, &good]), 2, ClientOptions::default())
            .await
            .unwrap();
        for k in 0..10 {
            let result = pool.infer(item(k as f32)).await.unwrap();
            assert_eq!(result.worker.as_deref(), Some("good"));
        }
        // With no other balancer to ask, the refusal is the answer.
        good.set_mode(Mode::Unavailable);
        let err = pool.infer(item(1.0)).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_call_is_not_resent_past_its_deadline() {
        let a = Fake::start("a", Mode::Hold).await;
        let b = Fake::start("b", Mode::Hold).await;
        let pool = Pool::connect_many(&addrs(&[&a, &b]), 2, ClientOptions::default())
            .await
            .unwrap();
        let options = CallOptions {
            deadline: Some(Duration::from_millis(200)),
            ..CallOptions::default()
        };
        let err = pool.infer_with(item(1.0), options).await.unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
        assert_eq!(a.received() + b.received(), 1, "sent once");

        // Every balancer gone: a call waits at most its deadline for one to return.
        a.kill();
        b.kill();
        until("both closed", || pool.clients().is_empty()).await;
        let err = pool.infer_with(item(1.0), options).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::DeadlineExceeded { .. } | Error::ConnectionLost { .. }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn no_reachable_balancer_is_an_error_and_one_is_enough() {
        let a = Fake::start("a", Mode::Answer).await;
        let dead = Fake::start("dead", Mode::Answer).await;
        dead.kill();
        // The listener is dropped by its task; wait until connecting is refused.
        until("dead refuses", || {
            std::net::TcpStream::connect(dead.addr).is_err()
        })
        .await;
        let err = Pool::connect(&dead.addr.to_string(), 2, ClientOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io(_)), "{err}");
        let pool = Pool::connect_many(&addrs(&[&dead, &a]), 2, ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(pool.clients().len(), 1);
        assert_eq!(pool.balancers().len(), 2);
        pool.infer(item(1.0)).await.unwrap();
        let empty: [&str; 0] = [];
        assert!(Pool::connect_many(&empty, 1, ClientOptions::default())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn tls_pools_fail_over_too() {
        let pki = Pki::new("pool-failover");
        let leaf = pki.leaf("balancer", &["localhost", "127.0.0.1"]);
        let acceptor = TlsAcceptor::new(
            "fake",
            &ServerFiles {
                cert: leaf.cert,
                key: leaf.key,
                client_ca: None,
            },
            crate::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            Arc::default(),
        )
        .unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let doomed = Fake::start_on(any, "doomed", Mode::Hold, Some(acceptor.clone())).await;
        let survivor = Fake::start_on(any, "survivor", Mode::Answer, Some(acceptor)).await;
        let connector = TlsConnector::trusting(pki.ca()).unwrap();
        let pool = Pool::connect_tls_many(
            &addrs(&[&doomed, &survivor]),
            2,
            ClientOptions::default(),
            &connector,
        )
        .await
        .unwrap();
        let calls: Vec<_> = (0..20)
            .map(|k| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.infer(item(k as f32)).await })
            })
            .collect();
        until("some held by the doomed", || doomed.received() > 0).await;
        doomed.kill();
        for (k, call) in calls.into_iter().enumerate() {
            let result = call.await.unwrap().unwrap();
            assert_eq!(value_of(&result), k as f32);
            assert_eq!(result.worker.as_deref(), Some("survivor"));
        }
        assert!(pool.failovers() > 0);
    }
}
