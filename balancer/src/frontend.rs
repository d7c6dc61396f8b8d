//! Client connections: accept, read frames, route each request, write answers.
//!
//! Each connection is two tasks. The reader decodes frames and hands each `infer` to
//! routing with a pending entry; it stops reading while `--max-client-in-flight` requests
//! of this connection wait for answers (TCP backpressure). The writer takes answers from
//! the connection's channel and writes them in bursts, one flush per burst.
//!
//! A frame that breaks the framing (too large, zero length, not complete within
//! `--frame-timeout`) is answered under id 0 and costs the client its connection, nothing
//! more; a frame that is only a bad message is answered under its own id and the connection
//! goes on.
//!
//! No client can make the balancer hold more than its share:
//! - frames are read with a [`FrameReader`] within the `--frame-budget`: a connection whose
//!   next frame does not fit (the global budget or its per-connection ceiling) stops being
//!   read until bytes come back, and nothing is allocated for it meanwhile;
//! - a client that does not read its answers stops being read at `--max-client-in-flight`,
//!   and is closed once a write has waited `--frame-timeout` on it;
//! - beyond `--max-connections` a new connection is answered `unavailable` and closed.
//!
//! Once shutdown began a connection keeps being read: every frame is answered
//! `shutting_down` (a `cancel` still cancels), and the connection closes once nothing is in
//! flight and nothing has arrived for [`SHUTDOWN_QUIET`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tidepool_protocol::raw::{self, Frame, RawKind, Rewrite};
use tidepool_protocol::tls::{Stream, TlsAcceptor, WriteHalf};
use tidepool_protocol::{
    encode_frame, Error as ProtocolError, ErrorCode, ErrorReply, FrameBudget, FrameReader, Message,
    MessageCodec, RequestId, CONNECTION_ID,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::burst::{write_burst, WRITE_BURST};
use crate::dispatch::{Router, Scratch};
use crate::metadata;
use crate::metrics::{Metrics, Reject};
use crate::pending::{Answer, ClientConn, Lifecycle, Outbound, Payload, Pending, Request, Slot};
use crate::throttle::LogThrottle;

/// What client connections need: the router and the limits of a connection.
#[derive(Clone)]
pub(crate) struct FrontendContext {
    /// Where each request goes; also answers `ping` (can anything be routed now?).
    pub(crate) router: Arc<Router>,
    /// Largest frame accepted from a client (`--max-frame`).
    pub(crate) max_frame: usize,
    /// A connection with no traffic and nothing in flight this long is closed.
    pub(crate) idle_timeout: Duration,
    /// Requests one connection may have in flight before reading stops.
    pub(crate) max_client_in_flight: usize,
    /// Flows, bytes and rejections.
    pub(crate) metrics: Arc<Metrics>,
    /// Requests alive in the whole balancer, for draining.
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// What protects the balancer from its clients: the frame budget, the frame timeout,
    /// the connection cap.
    pub(crate) limits: ClientLimits,
    /// TLS on this listener (`--tls-cert`), else plain TCP.
    pub(crate) tls: Option<TlsAcceptor>,
    /// What every listener shares (`--shards`): the connection slots and the log throttles.
    pub(crate) accept: Accept,
}

/// The `--max-connections` slots and the throttled log lines, one set for all listeners,
/// so that N shards hold `--max-connections` connections in all, not N times as many.
#[derive(Clone, Debug)]
pub(crate) struct Accept {
    slots: Arc<Semaphore>,
    logs: Arc<Logs>,
}

impl Accept {
    /// Room for `max_connections` client connections.
    pub(crate) fn new(max_connections: usize) -> Accept {
        Accept {
            slots: Arc::new(Semaphore::new(max_connections)),
            logs: Arc::new(Logs::default()),
        }
    }
}

/// The limits of `--frame-budget`, `--frame-timeout` and `--max-connections`.
#[derive(Clone, Debug)]
pub(crate) struct ClientLimits {
    /// Bytes of client frames read or held, all connections together.
    pub(crate) budget: FrameBudget,
    /// How long a started frame may take to arrive, and how long answers may go unread.
    pub(crate) frame_timeout: Duration,
    /// Most open client connections.
    pub(crate) max_connections: usize,
    /// The longest any request may take (`--request-timeout`); `deadline_ms` may shorten it.
    pub(crate) request_timeout: Duration,
}

/// After shutdown began, a connection with nothing in flight closes once nothing has arrived
/// for this long: frames a client wrote before it saw the shutdown are still answered.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(200);

/// The retry hint given to a connection refused at `--max-connections`.
const REFUSED_RETRY_MS: u64 = 1_000;

/// Accepts client connections until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: FrontendContext,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let Accept { slots, logs } = ctx.accept.clone();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refuse(&stream, peer, &ctx, &logs.refused);
            continue;
        };
        let span = tracing::debug_span!("client", %peer);
        connections.spawn(
            connection(
                stream,
                peer,
                ctx.clone(),
                shutdown.clone(),
                Arc::clone(&logs),
                slot,
            )
            .instrument(span),
        );
    }
}

/// The log lines an attacker could repeat at will, one a second each.
#[derive(Debug, Default)]
struct Logs {
    refused: LogThrottle,
    frame_timeout: LogThrottle,
    write_stall: LogThrottle,
}

/// Answers a connection beyond `--max-connections` with `unavailable` under id 0 (if its
/// socket takes the frame at once: a refusal never waits on the client) and closes it.
fn refuse(stream: &TcpStream, peer: SocketAddr, ctx: &FrontendContext, log: &LogThrottle) {
    let limits = &ctx.metrics.limits;
    limits.connections_refused.fetch_add(1, Ordering::Relaxed);
    let max = ctx.limits.max_connections;
    if let Some(also) = log.allow() {
        tracing::warn!(%peer, max_connections = max, also_refused = also,
            "--max-connections reached; refusing a client connection");
    }
    let reply = ErrorReply::new(
        CONNECTION_ID,
        ErrorCode::Unavailable,
        format!(
            "the balancer has its --max-connections ({max}) client connections open; retry later"
        ),
    )
    .retry_after(REFUSED_RETRY_MS);
    if let Ok(frame) = encode_frame(&Message::Error(reply)) {
        let _ = stream.try_write(&frame);
    }
}

/// Counts a connection in `active_flow_count` for as long as it lives.
struct FlowGuard(Arc<Metrics>);

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.0.active_flows.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: FrontendContext,
    shutdown: CancellationToken,
    logs: Arc<Logs>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match &ctx.tls {
        None => Stream::Plain(tcp),
        // A failed or stalled handshake costs this connection only; the acceptor logs
        // and counts it.
        Some(tls) => tokio::select! {
            () = shutdown.cancelled() => return,
            handshake = tls.accept(tcp, peer) => match handshake {
                Ok(stream) => stream,
                Err(_) => return,
            },
        },
    };
    let metrics = Arc::clone(&ctx.metrics);
    metrics.new_flows.fetch_add(1, Ordering::Relaxed);
    metrics.active_flows.fetch_add(1, Ordering::Relaxed);
    let _flow = FlowGuard(Arc::clone(&metrics));
    tracing::debug!("client connected");

    let max_frame = ctx.max_frame;
    let (read, write) = stream.into_split();
    let mut frames = FrameReader::new(
        Counted::new(read, &metrics),
        max_frame,
        ctx.limits.budget.connection(),
    )
    .frame_timeout(Some(ctx.limits.frame_timeout));
    let (answers, answers_rx) = mpsc::unbounded_channel();
    let conn = Arc::new(ClientConn::new(
        answers,
        peer.to_string(),
        Arc::clone(&metrics),
        Arc::clone(&ctx.lifecycle),
    ));
    // Cancelled when the writer gives up on the client: then nothing more is read either.
    let writer_gone = CancellationToken::new();
    let writer = tokio::spawn(
        write_loop(
            Counted::new(write, &metrics),
            Writer {
                max_frame,
                stall_timeout: ctx.limits.frame_timeout,
                logs: Arc::clone(&logs),
                gone: writer_gone.clone(),
            },
            answers_rx,
            Arc::downgrade(&conn),
        )
        .in_current_span(),
    );

    let permits = Arc::new(Semaphore::new(ctx.max_client_in_flight));
    let mut scratch = Scratch::new();
    let idle_timeout = ctx.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // Once shutdown began: frames are still read, and answered `shutting_down`, until the
    // connection has been quiet for SHUTDOWN_QUIET.
    let mut closing = false;
    let mut client_gone = true;

    loop {
        // One permit per frame that will be answered; waiting for one is backpressure.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                () = writer_gone.cancelled() => break,
                () = shutdown.cancelled(), if !closing => {
                    closing = true;
                    idle.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_QUIET);
                    continue;
                }
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            },
        };
        // The read burst is over once the next frame needs another read: the frames read
        // together went out together (`Scratch`); the next burst is routed afresh.
        if frames.buffered() == 0 {
            scratch.end_burst();
        }
        // A frame already buffered whole is taken without the `select!`: polling its
        // cancellation and timer branches cost more than routing the frame (about 450
        // instructions a frame). Shutdown and a writer that gave up are seen by the
        // `select!` before every read from the socket, so once per read burst: the frames
        // of a burst came in one read, before either was seen, and are routed as frames
        // read before it (asking both tokens per frame took a lock each, about 80
        // instructions a frame). The idle timer has nothing to do while frames arrive.
        let frame = if let Some(body) = frames.buffered_frame() {
            Ok(Some(body))
        } else {
            tokio::select! {
                biased;
                () = writer_gone.cancelled() => break,
                () = shutdown.cancelled(), if !closing => {
                    closing = true;
                    idle.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_QUIET);
                    continue;
                }
                () = &mut idle => {
                    let limit = if closing { SHUTDOWN_QUIET } else { idle_timeout };
                    let quiet_until = conn.last_activity() + limit;
                    let now = tokio::time::Instant::now();
                    // A frame under way is the frame timeout's to end.
                    if conn.slots.is_empty() && !frames.in_frame() && quiet_until <= now {
                        if closing {
                            tracing::debug!("quiet after shutdown; closing");
                            client_gone = false;
                        } else {
                            tracing::debug!(timeout = %humantime::format_duration(idle_timeout), "idle timeout; closing");
                        }
                        break;
                    }
                    // Traffic since the timer was set, or requests still in flight.
                    idle.as_mut().reset(quiet_until.max(now + limit / 8));
                    continue;
                }
                frame = frames.next_frame() => frame,
            }
        };
        let body = match frame {
            Ok(None) => break,
            Err(error) => {
                if let ProtocolError::FrameTimeout { .. } = error {
                    metrics
                        .limits
                        .frame_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(also) = logs.frame_timeout.allow() {
                        tracing::warn!(%peer, %error, also_timed_out = also,
                            "client frame not complete within --frame-timeout; closing the connection");
                    }
                } else {
                    tracing::debug!(%error, "unreadable frame; closing the connection");
                    metrics.reject(Reject::BadRequest);
                }
                // The framing is lost: say why under id 0, then close.
                conn.send(Message::Error(error.reply()), Some(permit));
                break;
            }
            Ok(Some(body)) => body,
        };
        let received = conn.touch();
        if closing {
            answer_closing(&conn, body, permit);
            continue;
        }
        let msg = match raw::decode_body(body) {
            Err(error) => {
                metrics.reject(Reject::BadRequest);
                conn.send(Message::Error(error.reply()), Some(permit));
                continue;
            }
            Ok(Frame::Raw(raw)) if raw.kind() == RawKind::Infer => {
                let id = raw.id();
                submit(
                    &ctx.router,
                    &conn,
                    id,
                    Payload::Raw(raw),
                    permit,
                    &mut scratch,
                    Received {
                        at: received,
                        request_timeout: ctx.limits.request_timeout,
                    },
                )
                .await;
                continue;
            }
            Ok(Frame::Raw(other)) => other.to_message(),
            Ok(Frame::Message(msg)) => msg,
        };
        match msg {
            Message::Infer(infer) => {
                let id = infer.id;
                submit(
                    &ctx.router,
                    &conn,
                    id,
                    Payload::Decoded(infer),
                    permit,
                    &mut scratch,
                    Received {
                        at: received,
                        request_timeout: ctx.limits.request_timeout,
                    },
                )
                .await;
            }
            Message::Cancel { id } => conn.cancel(id),
            Message::Metadata { id } => metadata::answer(&ctx.router, &conn, id, permit),
            Message::Ping { id } => {
                let answer = if ctx.router.routable() {
                    Message::pong(id)
                } else {
                    Message::Error(
                        ErrorReply::new(id, ErrorCode::Unavailable, "no target can take requests")
                            .retry_after(1000),
                    )
                };
                conn.send(answer, Some(permit));
            }
            other => {
                metrics.reject(Reject::BadRequest);
                conn.send(
                    Message::Error(ErrorReply::new(
                        other.id(),
                        ErrorCode::BadRequest,
                        format!(
                            "clients send infer, cancel, ping or metadata, not {}",
                            other.kind()
                        ),
                    )),
                    Some(permit),
                );
            }
        }
    }
    if client_gone {
        // Nobody will read the answers: let the targets skip the work.
        conn.cancel_all();
    }
    // The writer ends when the last pending entry of this connection has answered.
    drop(conn);
    drop(frames);
    let _ = writer.await;
    tracing::debug!("client connection closed");
}

/// Answers a frame read after shutdown began: `shutting_down` under its id, never silence.
/// A `cancel` still reaches the request it names.
fn answer_closing(conn: &ClientConn, body: bytes::Bytes, permit: OwnedSemaphorePermit) {
    let id = match raw::decode_body(body) {
        Err(error) => {
            conn.metrics.reject(Reject::BadRequest);
            conn.send(Message::Error(error.reply()), Some(permit));
            return;
        }
        Ok(Frame::Raw(raw)) => raw.id(),
        Ok(Frame::Message(Message::Cancel { id })) => {
            conn.cancel(id);
            return;
        }
        Ok(Frame::Message(msg)) => msg.id(),
    };
    conn.metrics.reject(Reject::ShuttingDown);
    conn.send(
        Message::Error(ErrorReply::new(
            id,
            ErrorCode::ShuttingDown,
            "the balancer is shutting down; send this request to another balancer, or retry once it is back",
        )),
        Some(permit),
    );
}

/// When a request was read, and the longest it may take from then.
struct Received {
    at: tokio::time::Instant,
    request_timeout: Duration,
}

/// Gives a request read from `conn` a pending entry and routes it, or refuses its id.
async fn submit(
    router: &Router,
    conn: &Arc<ClientConn>,
    id: RequestId,
    payload: Payload,
    permit: OwnedSemaphorePermit,
    scratch: &mut Scratch,
    received: Received,
) {
    let refusal = if id == CONNECTION_ID {
        Some("request id 0 is reserved for connection errors; number requests from 1")
    } else {
        match conn.slots.entry(id) {
            dashmap::mapref::entry::Entry::Occupied(_) => {
                Some("a request with this id is already in flight on this connection")
            }
            dashmap::mapref::entry::Entry::Vacant(slot) => {
                slot.insert(Slot::Waiting);
                None
            }
        }
    };
    if let Some(refusal) = refusal {
        conn.metrics.reject(Reject::BadRequest);
        conn.send(
            Message::Error(ErrorReply::new(id, ErrorCode::BadRequest, refusal)),
            Some(permit),
        );
        return;
    }
    // The clock starts when the frame has been read.
    let mut pending = Pending::new(Arc::clone(conn), id, Some(permit), received.at);
    pending.set_expiry(payload.deadline_ms(), received.request_timeout);
    router
        .submit(
            Request {
                pending,
                payload,
                reroutes: 0,
            },
            scratch,
        )
        .await;
}

/// The client writer's settings.
struct Writer {
    max_frame: usize,
    /// How long a write may wait on a client that does not read before it is given up.
    stall_timeout: Duration,
    logs: Arc<Logs>,
    /// Cancelled as the writer ends, so that the reader stops too.
    gone: CancellationToken,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

async fn write_loop(
    mut socket: Counted<WriteHalf>,
    writer: Writer,
    mut answers: mpsc::UnboundedReceiver<Outbound>,
    // Weak: a strong reference would keep the channel open, and the writer would never end.
    conn: Weak<ClientConn>,
) {
    let max_frame = writer.max_frame;
    let mut codec = MessageCodec::new(max_frame);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    // Permits are released once their answers are written, not merely encoded.
    let mut written: Vec<Outbound> = Vec::new();
    while let Some(first) = answers.recv().await {
        let mut next = Some(first);
        let mut yielded = false;
        // Encode everything queued, then write once: one syscall for a burst.
        loop {
            let Some(out) = next else {
                // Let the tasks that are ready now (the other upstream connections answering
                // this client) add their answers first: one `send` for all of them.
                if yielded || buf.len() >= WRITE_BURST {
                    break;
                }
                yielded = true;
                tokio::task::yield_now().await;
                next = answers.try_recv().ok();
                continue;
            };
            let encoded = match &out.answer {
                Answer::Message(msg) => codec.encode_ref(msg, &mut buf),
                Answer::Raw { result, client_id } => result.write_frame(
                    &Rewrite {
                        id: *client_id,
                        ..Rewrite::default()
                    },
                    &mut buf,
                    max_frame,
                ),
            };
            if let Err(error) = encoded {
                tracing::debug!(%error, "client writer stopped");
                return;
            }
            written.push(out);
            next = if buf.len() < WRITE_BURST {
                answers.try_recv().ok()
            } else {
                None
            };
        }
        // Flushing a TLS stream sends the records still in its buffer; TCP's does nothing.
        // A client that does not read its answers holds at most --max-client-in-flight of
        // them, and for --frame-timeout at most: then it is given up.
        match tokio::time::timeout(writer.stall_timeout, write_burst(&mut socket, &buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "client writer stopped");
                return;
            }
            Err(_) => {
                socket
                    .metrics
                    .limits
                    .write_stalls
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(also) = writer.logs.write_stall.allow() {
                    tracing::warn!(timeout = %humantime::format_duration(writer.stall_timeout), also_stalled = also,
                        "client did not read its answers within --frame-timeout; closing the connection");
                }
                return;
            }
        }
        buf.clear();
        written.clear();
        if let Some(conn) = conn.upgrade() {
            conn.touch();
        }
    }
    let _ = socket.shutdown().await;
}

/// A socket half that adds the bytes it moves to `processed_bytes`.
struct Counted<T> {
    inner: T,
    metrics: Arc<Metrics>,
}

impl<T> Counted<T> {
    fn new(inner: T, metrics: &Arc<Metrics>) -> Self {
        Counted {
            inner,
            metrics: Arc::clone(metrics),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.metrics
                .processed_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.metrics
                .processed_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
