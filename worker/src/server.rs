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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tidepool_protocol::tls::{Stream, TlsAcceptor, WriteHalf};
use tidepool_protocol::{
    ErrorCode, ErrorReply, Infer, InferResult, Message, MessageCodec, RequestId,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::batcher::{BatcherHandle, Canceller, Reply};
use crate::metrics::{Metrics, Outcome};
use crate::model::ModelSpec;

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
    /// TLS on the listener (`--tls-cert`), else plain TCP.
    pub tls: Option<TlsAcceptor>,
}

/// How long to wait before retrying while the model loads.
const LOADING_RETRY_MS: u64 = 1_000;

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
    loop {
        let accepted = tokio::select! {
            _ = stop_accepting.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let context = Arc::clone(&context);
                let (close, abort) = (close.clone(), abort.clone());
                tracker.spawn(
                    connection(stream, context, close, abort).instrument(info_span!("conn", %peer)),
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
    /// The ids pending on this connection, with their cancellers.
    in_flight: HashMap<RequestId, Canceller>,
}

async fn connection(
    stream: TcpStream,
    context: Arc<ServerContext>,
    close: CancellationToken,
    abort: CancellationToken,
) {
    let peer = stream.peer_addr();
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
    let codec = MessageCodec::new(context.max_frame);
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, codec);
    let mut writer = FramedWrite::new(write, codec);
    let max_in_flight = context.max_in_flight;
    let mut conn = Connection {
        context,
        pending: FuturesUnordered::new(),
        in_flight: HashMap::new(),
    };
    let mut reading = true;
    let reason = loop {
        if !reading && conn.pending.is_empty() {
            break "done";
        }
        let outgoing: Vec<Answer> = tokio::select! {
            _ = abort.cancelled() => break "aborted at the end of the drain",
            Some((id, answer)) = conn.pending.next(), if !conn.pending.is_empty() => {
                conn.in_flight.remove(&id);
                let mut batch = vec![answer];
                // Write every answer that is ready with one flush.
                while let Some(Some((id, answer))) = conn.pending.next().now_or_never() {
                    conn.in_flight.remove(&id);
                    batch.push(answer);
                }
                batch
            }
            frame = reader.next(), if reading && conn.pending.len() < max_in_flight => match frame {
                None => {
                    reading = false;
                    Vec::new()
                }
                Some(Ok(Ok(message))) => conn.handle(message).into_iter().collect(),
                Some(Ok(Err(e))) => vec![Answer { message: Message::Error(e.reply()), counts: true }],
                Some(Err(e)) => {
                    // The framing is lost: answer once and close.
                    let answer = Answer { message: Message::Error(e.reply()), counts: false };
                    let _ = write_all(&mut writer, vec![answer], &conn.context.metrics, &abort).await;
                    break "bad frame";
                }
            },
            _ = close.cancelled(), if reading => {
                reading = false;
                Vec::new()
            }
        };
        if !outgoing.is_empty()
            && !write_all(&mut writer, outgoing, &conn.context.metrics, &abort).await
        {
            break "write failed";
        }
    };
    conn.context
        .metrics
        .connections
        .fetch_sub(1, Ordering::Relaxed);
    debug!(reason, abandoned = conn.pending.len(), "connection closed");
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
                message: match &*self.context.phase.borrow() {
                    Phase::Ready { .. } => Message::Pong { id },
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
                },
                counts: false,
            }),
            other @ (Message::Result(_) | Message::Error(_) | Message::Pong { .. }) => {
                Some(Answer {
                    message: Message::Error(ErrorReply::new(
                        other.id(),
                        ErrorCode::BadRequest,
                        format!(
                            "a worker accepts infer, cancel and ping, not {}",
                            other.kind()
                        ),
                    )),
                    counts: false,
                })
            }
        }
    }

    fn infer(&mut self, infer: Infer) -> Option<Answer> {
        let Infer {
            id,
            inputs,
            deadline_ms,
            ..
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
            Phase::Ready { batcher, spec } => (batcher.clone(), Arc::clone(spec)),
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
        let ticket = match batcher.submit(inputs, deadline) {
            Ok(ticket) => ticket,
            Err(rejection) => {
                return reject(rejection.code, rejection.message, rejection.retry_after_ms)
            }
        };
        self.in_flight.insert(id, ticket.canceller());
        let name = self.context.name.clone();
        self.pending.push(Box::pin(async move {
            let reply = ticket.wait().await;
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
