//! The async client: many concurrent calls pipelined over one connection.
//!
//! A [`Client`] owns two tasks. The writer takes frames from a bounded channel and writes
//! them in batches (one flush per burst); the reader matches each answer to its call by
//! id through the pending map. A call that is dropped before its answer (a timeout, a
//! `select!` that went the other way) removes itself from the map and sends `cancel`, so
//! the server can skip the work. [`Pool`](crate::Pool) (in `pool.rs`) spreads calls over
//! several such connections and balancers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::codec::{MessageCodec, DEFAULT_MAX_FRAME};
use crate::error::Error;
use crate::message::{Infer, InferResult, Load, Message, RequestId, Tensors, CONNECTION_ID};
use crate::metadata::ModelMetadata;
use crate::priority::Priority;
use crate::tls::{host_of, TlsConnector};

/// Settings of one client connection.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Largest frame sent or accepted.
    pub max_frame: usize,
    /// Requests buffered towards the writer before `infer` waits (backpressure).
    pub send_queue: usize,
    /// The tenant every `infer` on this connection names (`tenant`), for a worker that
    /// shares its queue between tenants; a server answers a name that is not 1 to 64 bytes
    /// without control characters `bad_request`.
    pub tenant: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_frame: DEFAULT_MAX_FRAME,
            send_queue: 1024,
            tenant: None,
        }
    }
}

/// Per-call settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallOptions {
    /// The call's budget: sent as `deadline_ms`, and enforced here too, so that a call
    /// returns [`Error::DeadlineExceeded`] on time even when the server is slow to say so.
    pub deadline: Option<Duration>,
    /// The call's priority class, sent as `priority` (normal is left out).
    pub priority: Priority,
}

type Answer = Result<Message, Error>;
type Pending = DashMap<RequestId, oneshot::Sender<Answer>>;

struct Shared {
    peer: String,
    next_id: AtomicU64,
    pending: Arc<Pending>,
    requests: mpsc::Sender<Message>,
    /// Cancels go on their own unbounded channel so that a dropped call never waits; there
    /// are at most as many as calls in flight. The writer drains requests first, so a
    /// cancel never overtakes the request it names.
    cancels: mpsc::UnboundedSender<RequestId>,
    /// Cancelled by the reader when the connection is gone.
    closed: CancellationToken,
    close_reason: Arc<Mutex<Option<String>>>,
    /// Sent as every `infer`'s `tenant`.
    tenant: Option<String>,
    /// Stops both tasks when the last `Client` handle is dropped.
    _stop: DropGuard,
}

/// A multiplexed connection to a tidepool server (a worker or a balancer).
///
/// Cheap to clone; every clone shares the connection. Calls may run concurrently from any
/// number of tasks; answers are matched to calls by id.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.shared.peer)
            .field("in_flight", &self.in_flight())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Client {
    /// Connects with default options.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Client, Error> {
        Client::connect_with(addr, ClientOptions::default()).await
    }

    /// Connects with the given options.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        options: ClientOptions,
    ) -> Result<Client, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?.to_string();
        let (read, write) = stream.into_split();
        Ok(Client::from_parts(peer, read, write, options))
    }

    /// Connects over TLS: `addr` is `host:port`, and the server's certificate must chain to
    /// the connector's CA and name the connector's server name, or else `host`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), tidepool_protocol::Error> {
    /// use tidepool_protocol::tls::TlsConnector;
    /// use tidepool_protocol::{Client, ClientOptions};
    /// let tls = TlsConnector::trusting("certs/ca.pem")?;
    /// let client = Client::connect_tls("balancer.internal:7000", &tls, ClientOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_tls(
        addr: &str,
        tls: &TlsConnector,
        options: ClientOptions,
    ) -> Result<Client, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?.to_string();
        let (read, write) = tls.connect(stream, host_of(addr)).await?.into_split();
        Ok(Client::from_parts(peer, read, write, options))
    }

    /// Runs the protocol over any byte stream halves (used by tests and by the balancer).
    pub fn from_parts<R, W>(peer: String, read: R, write: W, options: ClientOptions) -> Client
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (requests, requests_rx) = mpsc::channel(options.send_queue.max(1));
        let (cancels, cancels_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let closed = CancellationToken::new();
        let pending: Arc<Pending> = Arc::new(DashMap::new());
        let close_reason = Arc::new(Mutex::new(None));
        let codec = MessageCodec::new(options.max_frame);
        let tenant = options.tenant;

        tokio::spawn(write_loop(
            FramedWrite::new(write, codec),
            requests_rx,
            cancels_rx,
            Arc::clone(&pending),
            stop.clone(),
        ));
        tokio::spawn(read_loop(
            peer.clone(),
            FramedRead::new(read, codec),
            Arc::clone(&pending),
            Arc::clone(&close_reason),
            closed.clone(),
            stop.clone(),
        ));
        Client {
            shared: Arc::new(Shared {
                peer,
                next_id: AtomicU64::new(1),
                pending,
                requests,
                cancels,
                closed,
                close_reason,
                tenant,
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// The server's address.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Calls waiting for an answer.
    pub fn in_flight(&self) -> usize {
        self.shared.pending.len()
    }

    /// True once the connection is gone; every later call fails with
    /// [`Error::ConnectionLost`].
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Completes once the connection is gone (at once when it already is): what a
    /// [`Pool`](crate::Pool) waits on to reconnect.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    /// Runs one item through the model.
    pub async fn infer(&self, inputs: Tensors) -> Result<InferResult, Error> {
        self.infer_with(inputs, CallOptions::default()).await
    }

    /// Runs one item through the model with per-call options.
    pub async fn infer_with(
        &self,
        inputs: Tensors,
        options: CallOptions,
    ) -> Result<InferResult, Error> {
        let id = self.next_id();
        let msg = Message::Infer(Infer {
            id,
            inputs,
            deadline_ms: options
                .deadline
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            client: None,
            priority: options.priority,
            tenant: self.shared.tenant.as_deref().map(Box::from),
        });
        match self.call(id, msg, options.deadline, true).await? {
            Message::Result(result) => Ok(result),
            Message::Error(reply) => Err(Error::from_reply(reply)),
            other => Err(self.violation(format!("answered infer with {}", other.kind()))),
        }
    }

    /// Sends `ping`; `Ok` when the server answered `pong` (it is ready).
    pub async fn ping(&self, timeout: Duration) -> Result<(), Error> {
        self.ping_load(timeout).await.map(drop)
    }

    /// Sends `ping`; `Ok` when the server answered `pong` (it is ready), with the load the
    /// `pong` reported (a worker's busy share and queue delay; `None` from a server that
    /// does not report one).
    pub async fn ping_load(&self, timeout: Duration) -> Result<Option<Load>, Error> {
        let id = self.next_id();
        match self
            .call(id, Message::Ping { id }, Some(timeout), false)
            .await?
        {
            Message::Pong { load, .. } => Ok(load),
            Message::Error(reply) => Err(Error::from_reply(reply)),
            other => Err(self.violation(format!("answered ping with {}", other.kind()))),
        }
    }

    /// Asks what model the server serves: its inputs and outputs (per-item shapes, dynamic
    /// dimensions) and batching rules. A balancer answers from one of its healthy workers.
    pub async fn metadata(&self, timeout: Duration) -> Result<ModelMetadata, Error> {
        let id = self.next_id();
        match self
            .call(id, Message::Metadata { id }, Some(timeout), false)
            .await?
        {
            Message::MetadataResult(answer) => Ok(answer.model),
            Message::Error(reply) => Err(Error::from_reply(reply)),
            other => Err(self.violation(format!("answered metadata with {}", other.kind()))),
        }
    }

    fn next_id(&self) -> RequestId {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn violation(&self, detail: String) -> Error {
        Error::ProtocolViolation {
            peer: self.shared.peer.clone(),
            detail,
        }
    }

    fn lost(&self) -> Error {
        Error::ConnectionLost {
            peer: self.shared.peer.clone(),
            reason: self
                .shared
                .close_reason
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .clone(),
        }
    }

    async fn call(
        &self,
        id: RequestId,
        msg: Message,
        deadline: Option<Duration>,
        cancel_on_drop: bool,
    ) -> Result<Message, Error> {
        let (tx, rx) = oneshot::channel();
        self.shared.pending.insert(id, tx);
        // From here on, every way out of this function (answer, error, timeout, the
        // caller dropping the future) passes through the guard.
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
            cancel_on_drop,
        };
        let exchange = async {
            if self.shared.requests.send(msg).await.is_err() {
                return Err(self.lost());
            }
            tokio::select! {
                // An answer that arrived just before the connection closed wins: a server
                // that answers and then closes (a drain) must not look like a lost call.
                biased;
                answer = rx => answer.unwrap_or_else(|_| Err(self.lost())),
                // The reader clears the map when the connection ends; this catches a call
                // that registered just after that.
                () = self.shared.closed.cancelled() => Err(self.lost()),
            }
        };
        match deadline {
            Some(budget) => tokio::time::timeout(budget, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::DeadlineExceeded {
                        message: format!("no answer from {} within {budget:?}", self.shared.peer),
                    })
                }),
            None => exchange.await,
        }
    }
}

/// Removes a call from the pending map however the call ends, and tells the server to
/// drop the work when the call ends without an answer.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: RequestId,
    cancel_on_drop: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        // Still in the map means no answer came: this call was abandoned.
        if self.shared.pending.remove(&self.id).is_some() && self.cancel_on_drop {
            let _ = self.shared.cancels.send(self.id);
        }
    }
}

async fn write_loop<W>(
    mut sink: FramedWrite<W, MessageCodec>,
    mut requests: mpsc::Receiver<Message>,
    mut cancels: mpsc::UnboundedReceiver<RequestId>,
    pending: Arc<Pending>,
    stop: CancellationToken,
) where
    W: AsyncWrite + Unpin,
{
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(msg) = requests.recv() => msg,
            Some(id) = cancels.recv() => Message::Cancel { id },
            else => break,
        };
        let mut next = Some(first);
        // Write everything queued, then flush once: one syscall for a burst.
        while let Some(msg) = next {
            let id = msg.id();
            if let Err(error) = sink.feed(msg).await {
                if error.is_fatal() {
                    tracing::debug!(%error, "client writer stopped");
                    return;
                }
                // This one message could not be encoded; answer its call, keep going.
                if let Some((_, tx)) = pending.remove(&id) {
                    let _ = tx.send(Err(error));
                }
            }
            next = match requests.try_recv() {
                Ok(msg) => Some(msg),
                Err(_) => cancels.try_recv().ok().map(|id| Message::Cancel { id }),
            };
        }
        if let Err(error) = sink.flush().await {
            tracing::debug!(%error, "client writer stopped");
            return;
        }
    }
    let _ = sink.close().await;
}

async fn read_loop<R>(
    peer: String,
    mut frames: FramedRead<R, MessageCodec>,
    pending: Arc<Pending>,
    close_reason: Arc<Mutex<Option<String>>>,
    closed: CancellationToken,
    stop: CancellationToken,
) where
    R: AsyncRead + Unpin,
{
    let reason = loop {
        let frame = tokio::select! {
            () = stop.cancelled() => break Some("client dropped".to_owned()),
            frame = frames.next() => frame,
        };
        match frame {
            None => break None,
            Some(Err(error)) => break Some(error.to_string()),
            Some(Ok(Err(error))) => {
                // A frame we cannot read: if it names a call, that call fails; the
                // connection stays up because the framing is intact.
                tracing::warn!(%peer, %error, "undecodable frame from server");
                if let Some((_, tx)) = error.request_id().and_then(|id| pending.remove(&id)) {
                    let _ = tx.send(Err(Error::ProtocolViolation {
                        peer: peer.clone(),
                        detail: error.to_string(),
                    }));
                }
            }
            Some(Ok(Ok(Message::Error(reply)))) if reply.id == CONNECTION_ID => {
                // About the connection itself; the server closes next.
                break Some(format!("{}: {}", reply.code, reply.message));
            }
            Some(Ok(Ok(msg))) => match pending.remove(&msg.id()) {
                Some((_, tx)) => {
                    let _ = tx.send(Ok(msg));
                }
                None => tracing::trace!(%peer, id = msg.id(), "answer to a call that is gone"),
            },
        }
    };
    *close_reason
        .lock()
        .unwrap_or_else(|poison| poison.into_inner()) = reason;
    closed.cancel();
    // Dropping the senders fails every waiting call with ConnectionLost.
    pending.clear();
}
