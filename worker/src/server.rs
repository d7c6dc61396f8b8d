//! Protocol connections: frames in, checked items to the batcher, answers out.
//!
//! One task per connection, one span per connection. The task reads a frame, answers what it
//! can at once (a `pong`, a `bad_request`, `overloaded` from a full queue) and otherwise keeps a
//! pending future per request that resolves to its answer. It stops reading while
//! `--max-in-flight` requests are pending, and writing an answer waits for the socket: a
//! client that does not read its answers stops being read (TCP backpressure) instead of making
//! the worker buffer.
//!
//! A connection holds only its own pending requests: their ids (a duplicate id in flight is a
//! `bad_request`) and, per id, the [`Canceller`] a `cancel` uses. When it closes, its pending
//! tickets are dropped and the batcher skips those items.
//!
//! No client can hurt another through a connection:
//! - A body that does not decode (malformed, beyond the protocol's
//!   [`Limits`](tidepool_protocol::Limits), the wrong types) is answered under its own id and the
//!   connection goes on: a balancer's connection carries many clients' requests. Only framing
//!   errors (a length prefix of 0 or above `--max-frame`, a frame that does not complete within
//!   `--frame-timeout`) close it, since the stream cannot be followed after them.
//! - Frames are read with a [`FrameReader`] within the worker's [`FrameBudget`]: a connection
//!   whose next frame does not fit stops being read until bytes come back.
//! - A connection with nothing in flight and nothing arriving for `--idle-timeout` is closed,
//!   and beyond `--max-connections` new ones are answered `unavailable` and closed.
//! - Once shutdown began, frames are still read and answered (`shutting_down` once the queue
//!   has drained) until the connection has been quiet for [`SHUTDOWN_QUIET`], so a client that
//!   wrote just before it saw the shutdown gets answers rather than a reset.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use rustc_hash::FxBuildHasher;
use tidepool_protocol::raw::{decode_body, RawKind, RawMessage};
use tidepool_protocol::tls::{Stream, TlsAcceptor, WriteHalf};
use tidepool_protocol::{
    encode_frame, Error as ProtocolError, ErrorCode, ErrorReply, Frame, FrameBudget, FrameReader,
    Infer, InferResult, Load, Message, MessageCodec, MetadataResult, ModelMetadata, RequestId,
    CONNECTION_ID,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::batcher::{BatcherHandle, Canceller, Reply};
use crate::fairness::Origin;
use crate::metrics::{Metrics, Outcome};
use crate::spec::ModelSpec;

/// Where the worker is in its life, as connections see it.
#[derive(Clone, Debug)]
pub enum Phase {
    /// The model is loading or warming up: requests and pings are answered `unavailable`.
    Loading,
    /// Serving.
    Ready {
        /// The way into the batch queue.
        batcher: BatcherHandle,
        /// What items must look like.
        spec: Arc<ModelSpec>,
        /// The answer to `metadata`.
        metadata: Arc<ModelMetadata>,
    },
    /// Shutting down: requests are answered `shutting_down`, pings `unavailable`.
    Draining,
}

/// What every connection shares.
#[derive(Debug)]
pub struct ServerContext {
    /// The worker's phase; connections read it per request.
    pub phase: watch::Receiver<Phase>,
    /// The name put in every result's `worker` field.
    pub name: String,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Most requests pending per connection before reading pauses.
    pub max_in_flight: usize,
    /// Largest frame read or written.
    pub max_frame: usize,
    /// The bytes of frames being read or held, all connections together.
    pub budget: FrameBudget,
    /// How long a started frame may take to arrive; `None`: no limit.
    pub frame_timeout: Option<Duration>,
    /// How long a connection may sit with nothing in flight and nothing arriving; `None`:
    /// forever.
    pub idle_timeout: Option<Duration>,
    /// Most open connections.
    pub max_connections: usize,
    /// TLS on the listener (`--tls-cert`), else plain TCP.
    pub tls: Option<TlsAcceptor>,
}

/// How long to wait before retrying while the model loads.
const LOADING_RETRY_MS: u64 = 1_000;

/// The retry hint given to a connection refused by `--max-connections`.
const REFUSED_RETRY_MS: u64 = 1_000;

/// Bytes each connection reads ahead of its current frame. A balancer's connection carries
/// dozens of items of a few KiB at once: with the protocol's default 8 KiB a `recv` took
/// about two of them (8 MiB model, 4 KiB items), with this a burst. At most
/// `--max-connections` times this is held outside the frame budget.
const READ_AHEAD: usize = 64 * 1024;

/// After shutdown began and the queue has drained, a connection closes once nothing is in
/// flight and nothing has arrived for this long.
pub const SHUTDOWN_QUIET: Duration = Duration::from_millis(200);

/// Accepts connections until `stop_accepting` fires. Each connection stops reading when
/// `close` fires and ends once its pending answers are written; `abort` ends it at once
/// (after the drain, for clients that never read their answers).
pub async fn accept(
    listener: TcpListener,
    context: Arc<ServerContext>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    close: CancellationToken,
    abort: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(context.max_connections));
    let mut refusals = LogThrottle::default();
    loop {
        let accepted = tokio::select! {
            _ = stop_accepting.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    refuse(stream, peer, &context, &mut refusals);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let context = Arc::clone(&context);
                let (close, abort) = (close.clone(), abort.clone());
                tracker.spawn(
                    connection(stream, context, close, abort, slot)
                        .instrument(info_span!("conn", %peer)),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = stop_accepting.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    debug!("stopped accepting connections");
}

/// Answers a connection beyond `--max-connections` with `unavailable` (if its socket takes the
/// frame at once: a refusal must not wait on the client) and closes it.
fn refuse(stream: TcpStream, peer: SocketAddr, context: &ServerContext, log: &mut LogThrottle) {
    context
        .metrics
        .connections_refused
        .fetch_add(1, Ordering::Relaxed);
    if let Some(also) = log.allow(Instant::now()) {
        warn!(%peer, max_connections = context.max_connections, also_refused = also,
              "--max-connections reached; refusing a connection");
    }
    let reply = ErrorReply::new(
        CONNECTION_ID,
        ErrorCode::Unavailable,
        format!(
            "the worker has its --max-connections ({}) open; retry later, or on another worker",
            context.max_connections
        ),
    )
    .retry_after(REFUSED_RETRY_MS);
    if let Ok(frame) = encode_frame(&Message::Error(reply)) {
        let _ = stream.try_write(&frame);
    }
}

/// Logs at most once a second, counting what it left out: a flood of refusals must not
/// become a flood of log lines.
#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(events left out since the last line)` when a line may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// An answer on its way out: the message, and whether it ends an `infer` (for the metrics).
struct Answer {
    message: Message,
    counts: bool,
}

type Pending = Pin<Box<dyn std::future::Future<Output = (RequestId, Answer)> + Send>>;

/// One connection's state.
struct Connection {
    context: Arc<ServerContext>,
    pending: FuturesUnordered<Pending>,
    /// The ids pending on this connection, with their cancellers. Looked up four times per
    /// request, so hashed with Fx rather than SipHash (about 150 instructions a lookup): the
    /// ids are the peer's, but colliding ones only slow this connection's own map, which
    /// --max-in-flight bounds.
    in_flight: HashMap<RequestId, Canceller, FxBuildHasher>,
    /// The peer's address: the client's, for `--fairness client`, when no balancer says.
    peer: Option<IpAddr>,
}

async fn connection(
    stream: TcpStream,
    context: Arc<ServerContext>,
    close: CancellationToken,
    abort: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let peer = stream.peer_addr();
    let peer_ip = peer.as_ref().ok().map(SocketAddr::ip);
    let stream = match (&context.tls, peer) {
        (None, _) => Stream::Plain(stream),
        // A failed or stalled handshake costs this connection only; the acceptor logs and
        // counts it.
        (Some(tls), Ok(peer)) => tokio::select! {
            _ = close.cancelled() => return,
            handshake = tls.accept(stream, peer) => match handshake {
                Ok(stream) => stream,
                Err(_) => return,
            },
        },
        (Some(_), Err(_)) => return,
    };
    context.metrics.connections.fetch_add(1, Ordering::Relaxed);
    debug!("connection opened");
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::with_read_ahead(
        read,
        context.max_frame,
        context.budget.connection(),
        READ_AHEAD,
    )
    .frame_timeout(context.frame_timeout);
    let mut writer = FramedWrite::new(write, MessageCodec::new(context.max_frame));
    let max_in_flight = context.max_in_flight;
    let idle_timeout = context.idle_timeout;
    let mut conn = Connection {
        context,
        pending: FuturesUnordered::new(),
        in_flight: HashMap::default(),
        peer: peer_ip,
    };
    let mut reading = true;
    let mut closing = false;
    let mut last_active = Instant::now();
    let reason = loop {
        if !reading && conn.pending.is_empty() {
            break "done";
        }
        // Quiet: nothing in flight, no frame under way. Idle for --idle-timeout, or, once
        // shutdown began, for SHUTDOWN_QUIET, the connection is closed.
        let quiet_limit = if closing {
            Some(SHUTDOWN_QUIET)
        } else {
            idle_timeout
        };
        let quiet_armed = reading && conn.pending.is_empty() && !reader.in_frame();
        let quiet_until = quiet_limit.map(|limit| last_active + limit);
        let outgoing: Vec<Answer> = tokio::select! {
            _ = abort.cancelled() => break "aborted at the end of the drain",
            Some((id, answer)) = conn.pending.next(), if !conn.pending.is_empty() => {
                conn.in_flight.remove(&id);
                let mut batch = vec![answer];
                // The batcher task answers a batch item by item (on a multi-threaded runtime
                // this task may run meanwhile): yield once so that the rest of it is ready,
                // then write every answer that is with one flush (one write per burst rather
                // than per answer).
                tokio::task::yield_now().await;
                while let Some(Some((id, answer))) = conn.pending.next().now_or_never() {
                    conn.in_flight.remove(&id);
                    batch.push(answer);
                }
                batch
            }
            frame = reader.next_frame(), if reading && conn.pending.len() < max_in_flight => {
                last_active = Instant::now();
                match frame {
                    Ok(None) => {
                        reading = false;
                        Vec::new()
                    }
                    // A frame's read burst is taken whole: the frames already buffered whole
                    // behind it come without another turn of this `select!`, whose branches
                    // (the answers, the timers, the tokens) cost more to poll than checking and
                    // queueing a frame. Reading still stops at --max-in-flight.
                    Ok(Some(body)) => {
                        let mut answers = Vec::new();
                        conn.frame(body, &mut answers);
                        while conn.pending.len() < max_in_flight {
                            let Some(body) = reader.buffered_frame() else { break };
                            conn.frame(body, &mut answers);
                        }
                        answers
                    }
                    Err(e) => {
                        // The framing is lost: answer once and close.
                        let reason = match &e {
                            ProtocolError::FrameTimeout { .. } => {
                                conn.context.metrics.frame_timeouts.fetch_add(1, Ordering::Relaxed);
                                warn!(error = %e, "frame timeout; closing the connection");
                                "frame timeout"
                            }
                            ProtocolError::Io(_) | ProtocolError::Truncated { .. } => "read failed",
                            _ => "bad frame",
                        };
                        let answer = Answer { message: Message::Error(e.reply()), counts: false };
                        let _ = write_all(&mut writer, vec![answer], &conn.context.metrics, &abort).await;
                        break reason;
                    }
                }
            }
            _ = sleep_until_some(quiet_until), if quiet_armed => {
                if reader.in_frame() {
                    // A frame began after this wait was armed: the frame timeout governs it.
                    continue;
                }
                if closing {
                    break "closed after shutdown";
                }
                conn.context.metrics.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                info!(idle_timeout = ?idle_timeout, "idle timeout; closing the connection");
                break "idle timeout";
            }
            _ = close.cancelled(), if !closing => {
                // Keep reading: frames already on their way are answered (shutting_down).
                closing = true;
                last_active = Instant::now();
                Vec::new()
            }
        };
        if !outgoing.is_empty() {
            last_active = Instant::now();
            if !write_all(&mut writer, outgoing, &conn.context.metrics, &abort).await {
                break "write failed";
            }
        }
    };
    conn.context
        .metrics
        .connections
        .fetch_sub(1, Ordering::Relaxed);
    debug!(reason, abandoned = conn.pending.len(), "connection closed");
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Writes answers (the socket's backpressure holds the connection here) and flushes once.
async fn write_all(
    writer: &mut FramedWrite<WriteHalf, MessageCodec>,
    answers: Vec<Answer>,
    metrics: &Metrics,
    abort: &CancellationToken,
) -> bool {
    let write = async {
        for answer in answers {
            if answer.counts {
                metrics.item(match &answer.message {
                    Message::Error(e) => Outcome::Error(e.code),
                    _ => Outcome::Ok,
                });
            }
            writer.feed(answer.message).await?;
        }
        writer.flush().await
    };
    tokio::select! {
        result = write => match result {
            Ok(()) => true,
            Err(e) => {
                debug!(error = %e, "write failed");
                false
            }
        },
        _ = abort.cancelled() => false,
    }
}

impl Connection {
    /// Handles one frame's body, adding what must be answered at once to `answers`.
    ///
    /// An infer is read by the raw scan and built from what it vouched for (the full
    /// decoder's message, without serde or a second walk for the limits), unless its scanned
    /// fields already say it would be refused; anything else, and every malformed body, is
    /// the full decoder's.
    fn frame(&mut self, body: Bytes, answers: &mut Vec<Answer>) {
        let answer = match decode_body(body) {
            Ok(Frame::Raw(raw)) => match self.refuse_early(&raw) {
                Some(answer) => Some(answer),
                None => self.handle(raw.to_message()),
            },
            Ok(Frame::Message(message)) => self.handle(message),
            // One bad message: answered under its own id, the connection goes on.
            Err(e) => Some(Answer {
                message: Message::Error(e.reply()),
                counts: true,
            }),
        };
        answers.extend(answer);
    }

    /// An `infer`'s refusal decided from its scanned fields alone ([`crate::gate`]), before
    /// its tensors are decoded and checked: its deadline cannot be met. `None` for anything
    /// the full path must judge (no deadline, an id already in flight, not serving).
    fn refuse_early(&self, raw: &RawMessage) -> Option<Answer> {
        if raw.kind() != RawKind::Infer || self.in_flight.contains_key(&raw.id()) {
            return None;
        }
        let now = Instant::now();
        let deadline = now.checked_add(Duration::from_millis(raw.deadline_ms()?))?;
        let rejection = match &*self.context.phase.borrow() {
            Phase::Ready { batcher, .. } => batcher.refuse_early(now, deadline, raw.priority())?,
            Phase::Loading | Phase::Draining => return None,
        };
        Some(Answer {
            message: Message::Error(ErrorReply {
                id: raw.id(),
                code: rejection.code,
                message: rejection.message,
                retry_after_ms: rejection.retry_after_ms,
            }),
            counts: true,
        })
    }

    /// Handles one request; returns an answer to write now, if any.
    fn handle(&mut self, message: Message) -> Option<Answer> {
        match message {
            Message::Infer(infer) => self.infer(infer),
            Message::Cancel { id } => {
                // Unknown ids (already answered, or never sent) are ignored, as the protocol says.
                if let Some(canceller) = self.in_flight.get(&id) {
                    canceller.cancel();
                }
                None
            }
            Message::Ping { id } => Some(Answer {
                message: self.when_ready(id, |_, batcher| Message::Pong {
                    id,
                    load: Some(Load {
                        batches: batcher.batch_times(),
                        ..self.context.metrics.busy.load()
                    }),
                }),
                counts: false,
            }),
            Message::Metadata { id } => Some(Answer {
                message: self.when_ready(id, |metadata, _| {
                    Message::MetadataResult(MetadataResult {
                        id,
                        model: ModelMetadata::clone(metadata),
                        worker: Some(self.context.name.clone()),
                    })
                }),
                counts: false,
            }),
            other @ (Message::Result(_)
            | Message::Error(_)
            | Message::Pong { .. }
            | Message::MetadataResult(_)) => Some(Answer {
                message: Message::Error(ErrorReply::new(
                    other.id(),
                    ErrorCode::BadRequest,
                    format!(
                        "a worker accepts infer, cancel, ping and metadata, not {}",
                        other.kind()
                    ),
                )),
                counts: false,
            }),
        }
    }

    /// `ready`'s answer once the model is loaded (it gets the model's metadata and the way
    /// into its batcher); `unavailable` while loading or shutting down.
    fn when_ready(
        &self,
        id: RequestId,
        ready: impl FnOnce(&ModelMetadata, &BatcherHandle) -> Message,
    ) -> Message {
        match &*self.context.phase.borrow() {
            Phase::Ready {
                metadata, batcher, ..
            } => ready(metadata, batcher),
            Phase::Loading => Message::Error(
                ErrorReply::new(
                    id,
                    ErrorCode::Unavailable,
                    "the worker is loading its model",
                )
                .retry_after(LOADING_RETRY_MS),
            ),
            Phase::Draining => Message::Error(ErrorReply::new(
                id,
                ErrorCode::Unavailable,
                "the worker is shutting down",
            )),
        }
    }

    fn infer(&mut self, infer: Infer) -> Option<Answer> {
        let Infer {
            id,
            inputs,
            deadline_ms,
            priority,
            client,
            tenant,
        } = infer;
        let reject = |code, message: String, retry: Option<u64>| {
            Some(Answer {
                message: Message::Error(ErrorReply {
                    id,
                    code,
                    message,
                    retry_after_ms: retry,
                }),
                counts: true,
            })
        };
        if self.in_flight.contains_key(&id) {
            return reject(
                ErrorCode::BadRequest,
                format!("request id {id} is already in flight on this connection"),
                None,
            );
        }
        // Clone what is needed out of the watch and release its read lock before anything else.
        let (batcher, spec) = match &*self.context.phase.borrow() {
            Phase::Ready { batcher, spec, .. } => (batcher.clone(), Arc::clone(spec)),
            Phase::Loading => {
                return reject(
                    ErrorCode::Unavailable,
                    "the worker is loading its model".into(),
                    Some(LOADING_RETRY_MS),
                )
            }
            Phase::Draining => {
                return reject(
                    ErrorCode::ShuttingDown,
                    "the worker is shutting down".into(),
                    None,
                )
            }
        };
        if let Err(e) = spec.check(&inputs) {
            return reject(e.code(), e.to_string(), None);
        }
        let deadline = deadline_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        let fit = spec.fit(&inputs);
        let origin = Origin {
            tenant: tenant.as_deref(),
            client: client.as_deref(),
            peer: self.peer,
        };
        let ticket = match batcher.submit_from(inputs, fit, deadline, priority, origin) {
            Ok(ticket) => ticket,
            Err(rejection) => {
                return reject(rejection.code, rejection.message, rejection.retry_after_ms)
            }
        };
        self.in_flight.insert(id, ticket.canceller());
        let name = self.context.name.clone();
        let metrics = Arc::clone(&self.context.metrics);
        self.pending.push(Box::pin(async move {
            let reply = ticket.wait().await;
            if reply.is_ok() {
                // Goodput: whether the result reached the connection within its deadline.
                metrics
                    .goodput
                    .answered(deadline.map(|d| Instant::now() <= d));
            }
            (
                id,
                Answer {
                    message: answer(id, reply, name),
                    counts: true,
                },
            )
        }));
        None
    }
}

fn answer(id: RequestId, reply: Reply, worker: String) -> Message {
    match reply {
        Ok(done) => Message::Result(InferResult {
            id,
            outputs: done.outputs,
            queue_us: Some(done.queue_us),
            infer_us: Some(done.infer_us),
            batch_size: Some(done.batch_size),
            worker: Some(worker),
        }),
        Err(rejection) => Message::Error(ErrorReply {
            id,
            code: rejection.code,
            message: rejection.message,
            retry_after_ms: rejection.retry_after_ms,
        }),
    }
}

/// Logs where the worker listens.
pub fn log_listening(addr: SocketAddr, name: &str) {
    info!(%addr, name, "listening for protocol connections");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Framed;

    /// The accept loop over a loading (or draining) worker: no model needed for what the
    /// connection itself decides.
    struct Server {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        phase: watch::Sender<Phase>,
        close: CancellationToken,
        stop: CancellationToken,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.cancel();
            self.close.cancel();
        }
    }

    async fn serve(tune: impl FnOnce(&mut ServerContext)) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (phase, receiver) = watch::channel(Phase::Loading);
        let metrics = Arc::new(Metrics::default());
        let mut context = ServerContext {
            phase: receiver,
            name: "w".into(),
            metrics: Arc::clone(&metrics),
            max_in_flight: 8,
            max_frame: 1 << 20,
            budget: FrameBudget::new(4 << 20, 2 << 20),
            frame_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
            max_connections: 16,
            tls: None,
        };
        tune(&mut context);
        let (stop, close) = (CancellationToken::new(), CancellationToken::new());
        tokio::spawn(accept(
            listener,
            Arc::new(context),
            TaskTracker::new(),
            stop.clone(),
            close.clone(),
            CancellationToken::new(),
        ));
        Server {
            addr,
            metrics,
            phase,
            close,
            stop,
        }
    }

    async fn connect(addr: SocketAddr) -> Framed<TcpStream, MessageCodec> {
        Framed::new(
            TcpStream::connect(addr).await.unwrap(),
            MessageCodec::default(),
        )
    }

    async fn next(framed: &mut Framed<TcpStream, MessageCodec>) -> Option<Message> {
        framed.next().await.map(|frame| frame.unwrap().unwrap())
    }

    fn error(message: Option<Message>) -> ErrorReply {
        match message {
            Some(Message::Error(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// An `infer` whose unknown key holds `depth` nested one-element arrays.
    fn poison(id: RequestId, depth: usize) -> Vec<u8> {
        let mut body = Message::Infer(Infer {
            id,
            ..Infer::default()
        })
        .to_msgpack()
        .unwrap();
        body[0] += 1;
        body.extend_from_slice(b"\xa6future");
        body.extend(std::iter::repeat_n(0x91, depth));
        body.push(0xc0);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }

    #[tokio::test]
    async fn a_bad_message_is_answered_under_its_id_and_the_connection_goes_on() {
        let server = serve(|_| {}).await;
        let mut framed = connect(server.addr).await;
        framed
            .get_mut()
            .write_all(&poison(42, 5_000))
            .await
            .unwrap();
        framed.send(Message::Ping { id: 7 }).await.unwrap();
        let refused = error(next(&mut framed).await);
        assert_eq!((refused.id, refused.code), (42, ErrorCode::BadRequest));
        assert!(refused.message.contains("nesting"), "{}", refused.message);
        // The bystander on the same connection gets its own answer (the model is loading).
        let bystander = error(next(&mut framed).await);
        assert_eq!((bystander.id, bystander.code), (7, ErrorCode::Unavailable));
        framed.send(Message::Ping { id: 8 }).await.unwrap();
        assert_eq!(error(next(&mut framed).await).id, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn slowloris_is_cut_at_the_frame_timeout_not_the_idle_timeout() {
        let server = serve(|c| c.idle_timeout = Some(Duration::from_secs(5))).await;
        let mut framed = connect(server.addr).await;
        let started = Instant::now();
        let (mut read, mut write) = framed.get_mut().split();
        let trickle = async {
            for byte in [0u8, 0, 0, 100].into_iter().chain([0xc0; 100]) {
                if write.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let mut got = Vec::new();
        tokio::select! {
            _ = trickle => panic!("the whole frame was trickled in"),
            _ = read.read_to_end(&mut got) => {}
        }
        let cut_at = started.elapsed();
        assert!(
            cut_at >= Duration::from_secs(10) && cut_at < Duration::from_secs(12),
            "{cut_at:?}"
        );
        let mut buf = bytes::BytesMut::from(&got[..]);
        let reply = tokio_util::codec::Decoder::decode(&mut MessageCodec::default(), &mut buf)
            .unwrap()
            .unwrap()
            .unwrap();
        let reply = error(Some(reply));
        assert_eq!(reply.id, CONNECTION_ID);
        assert!(
            reply.message.contains("--frame-timeout"),
            "{}",
            reply.message
        );
        assert_eq!(server.metrics.frame_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(server.metrics.idle_timeouts.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_closed_at_the_idle_timeout() {
        let server = serve(|_| {}).await;
        let mut framed = connect(server.addr).await;
        framed.send(Message::Ping { id: 1 }).await.unwrap();
        assert_eq!(error(next(&mut framed).await).id, 1);
        let answered = Instant::now();
        assert!(next(&mut framed).await.is_none(), "closed");
        assert!(answered.elapsed() >= Duration::from_secs(60));
        assert_eq!(server.metrics.idle_timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn beyond_max_connections_a_connection_is_refused_and_a_slot_comes_back() {
        let server = serve(|c| c.max_connections = 2).await;
        let mut a = connect(server.addr).await;
        let mut b = connect(server.addr).await;
        for (framed, id) in [(&mut a, 1), (&mut b, 2)] {
            framed.send(Message::Ping { id }).await.unwrap();
            assert_eq!(error(next(framed).await).id, id);
        }
        let mut c = connect(server.addr).await;
        let refused = error(next(&mut c).await);
        assert_eq!(
            (refused.id, refused.code),
            (CONNECTION_ID, ErrorCode::Unavailable)
        );
        assert!(
            refused.message.contains("--max-connections"),
            "{}",
            refused.message
        );
        assert!(next(&mut c).await.is_none());
        assert_eq!(
            server.metrics.connections_refused.load(Ordering::Relaxed),
            1
        );
        // The others are still served; once one leaves, its slot is free again.
        b.send(Message::Ping { id: 3 }).await.unwrap();
        assert_eq!(error(next(&mut b).await).id, 3);
        drop(a);
        for attempt in 0.. {
            let mut d = connect(server.addr).await;
            d.send(Message::Ping { id: 4 }).await.unwrap();
            if error(next(&mut d).await).id == 4 {
                break;
            }
            assert!(
                attempt < 100,
                "the closed connection's slot never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn frames_read_after_shutdown_began_are_answered_then_the_connection_closes() {
        let server = serve(|_| {}).await;
        let mut framed = connect(server.addr).await;
        framed.send(Message::Ping { id: 1 }).await.unwrap();
        assert_eq!(error(next(&mut framed).await).id, 1);

        server.phase.send_replace(Phase::Draining);
        server.close.cancel();
        tokio::time::sleep(SHUTDOWN_QUIET / 4).await;
        for id in 2..5 {
            framed
                .send(Message::Infer(Infer {
                    id,
                    ..Infer::default()
                }))
                .await
                .unwrap();
            tokio::time::sleep(SHUTDOWN_QUIET / 2).await;
        }
        for id in 2..5 {
            let answer = error(next(&mut framed).await);
            assert_eq!((answer.id, answer.code), (id, ErrorCode::ShuttingDown));
        }
        assert!(next(&mut framed).await.is_none(), "closed once quiet");
    }

    #[tokio::test]
    async fn a_burst_of_frames_read_at_once_is_answered_whole_and_in_order() {
        let server = serve(|_| {}).await;
        let mut framed = connect(server.addr).await;
        let wire: Vec<u8> = (1..=40)
            .flat_map(|id| encode_frame(&Message::Ping { id }).unwrap())
            .collect();
        framed.get_mut().write_all(&wire).await.unwrap();
        for id in 1..=40 {
            assert_eq!(error(next(&mut framed).await).id, id);
        }
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let mut log = LogThrottle::default();
        let t0 = Instant::now();
        assert_eq!(log.allow(t0), Some(0));
        assert_eq!(log.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(log.allow(t0 + Duration::from_millis(500)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(1)), Some(2));
    }
}
