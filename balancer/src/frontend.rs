//! Client connections: accept, read frames, route each request, write answers.
//!
//! Each connection is two tasks. The reader decodes frames and hands each `infer` to
//! routing with a pending entry; it stops reading while `--max-client-in-flight` requests
//! of this connection wait for answers (TCP backpressure). The writer takes answers from
//! the connection's channel and writes them in bursts, one flush per burst.
//!
//! A frame that breaks the framing (too large, zero length) is answered under id 0 and
//! costs the client its connection, nothing more; a frame that is only a bad message is
//! answered under its own id and the connection goes on.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tidepool_protocol::raw::{self, Frame, RawKind, Rewrite};
use tidepool_protocol::{
    ErrorCode, ErrorReply, FrameCodec, Message, MessageCodec, RequestId, CONNECTION_ID,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::burst::WRITE_BURST;
use crate::dispatch::{Router, Scratch};
use crate::metadata;
use crate::metrics::{Metrics, Reject};
use crate::pending::{Answer, ClientConn, Lifecycle, Outbound, Payload, Pending, Request, Slot};

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
}

/// Accepts client connections until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: FrontendContext,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
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
        let span = tracing::debug_span!("client", %peer);
        connections.spawn(connection(stream, peer, ctx.clone(), shutdown.clone()).instrument(span));
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
    stream: TcpStream,
    peer: SocketAddr,
    ctx: FrontendContext,
    shutdown: CancellationToken,
) {
    let metrics = Arc::clone(&ctx.metrics);
    metrics.new_flows.fetch_add(1, Ordering::Relaxed);
    metrics.active_flows.fetch_add(1, Ordering::Relaxed);
    let _flow = FlowGuard(Arc::clone(&metrics));
    let _ = stream.set_nodelay(true);
    tracing::debug!("client connected");

    let max_frame = ctx.max_frame;
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(Counted::new(read, &metrics), FrameCodec::new(max_frame));
    let (answers, answers_rx) = mpsc::unbounded_channel();
    let conn = Arc::new(ClientConn::new(
        answers,
        peer.to_string(),
        Arc::clone(&metrics),
        Arc::clone(&ctx.lifecycle),
    ));
    let writer = tokio::spawn(
        write_loop(
            Counted::new(write, &metrics),
            max_frame,
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
    let mut client_gone = true;

    loop {
        // One permit per frame that will be answered; waiting for one is backpressure.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                () = shutdown.cancelled() => { client_gone = false; break }
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            },
        };
        let frame = tokio::select! {
            biased;
            () = shutdown.cancelled() => { client_gone = false; break }
            () = &mut idle => {
                let quiet_until = conn.last_activity() + idle_timeout;
                if conn.slots.is_empty() && quiet_until <= tokio::time::Instant::now() {
                    tracing::debug!(timeout = %humantime::format_duration(idle_timeout), "idle timeout; closing");
                    break;
                }
                // Traffic since the timer was set, or requests still in flight.
                idle.as_mut().reset(quiet_until.max(tokio::time::Instant::now() + idle_timeout / 8));
                continue;
            }
            frame = frames.next() => frame,
        };
        let body = match frame {
            None => break,
            Some(Err(error)) => {
                // The framing is lost: say why under id 0, then close.
                tracing::debug!(%error, "unreadable frame; closing the connection");
                metrics.reject(Reject::BadRequest);
                conn.send(Message::Error(error.reply()), Some(permit));
                break;
            }
            Some(Ok(body)) => body,
        };
        conn.touch();
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
                )
                .await;
            }
            Message::Cancel { id } => conn.cancel(id),
            Message::Metadata { id } => metadata::answer(&ctx.router, &conn, id, permit),
            Message::Ping { id } => {
                let answer = if ctx.router.routable() {
                    Message::Pong { id }
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

/// Gives a request read from `conn` a pending entry and routes it, or refuses its id.
async fn submit(
    router: &Router,
    conn: &Arc<ClientConn>,
    id: RequestId,
    payload: Payload,
    permit: OwnedSemaphorePermit,
    scratch: &mut Scratch,
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
    let pending = Pending::new(Arc::clone(conn), id, Some(permit));
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

async fn write_loop(
    mut socket: Counted<tokio::net::tcp::OwnedWriteHalf>,
    max_frame: usize,
    mut answers: mpsc::UnboundedReceiver<Outbound>,
    // Weak: a strong reference would keep the channel open, and the writer would never end.
    conn: Weak<ClientConn>,
) {
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
        if let Err(error) = socket.write_all(&buf).await {
            tracing::debug!(%error, "client writer stopped");
            return;
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
