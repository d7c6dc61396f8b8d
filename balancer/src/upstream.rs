//! One multiplexed connection to a target, and the task that keeps a target's
//! connections open.
//!
//! Requests reach the writer over a bounded channel (a full channel holds the sender back:
//! backpressure towards the clients). The writer gives each request its upstream id (chosen
//! when it was routed), moves its pending entry into the connection's map *before* writing
//! it, and flushes once per burst. The reader takes answers out of the map by id and hands
//! them to their pending entries, which restore the client's id.
//!
//! When the connection ends, the requests still in the channel were never written: they
//! go back to routing. Those in the map were written and may have run: they are answered
//! `unavailable`. Nothing is lost, nothing runs twice without the client knowing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::{SinkExt, StreamExt};
use tidepool_protocol::{
    Error as ProtocolError, ErrorCode, Message, MessageCodec, RequestId, CONNECTION_ID,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::balancer::Shared;
use crate::metrics::Reject;
use crate::pending::{Pending, Request};
use crate::target::Target;

/// Requests buffered towards one connection's writer.
const SEND_QUEUE: usize = 1024;
/// Times one request may be routed again after connection losses.
const MAX_REROUTES: u32 = 3;

/// A routed request on its way to one connection.
pub(crate) struct Forward {
    /// The id it carries on this connection.
    pub(crate) upstream_id: RequestId,
    pub(crate) request: Request,
}

/// One open connection to a target.
pub(crate) struct UpstreamConn {
    addr: SocketAddr,
    requests: mpsc::Sender<Forward>,
    /// Cancels on their own unbounded channel so that a client's cancel never waits; at
    /// most one per request in flight. The writer drains requests first, so a cancel never
    /// overtakes the request it names.
    cancels: mpsc::UnboundedSender<RequestId>,
    /// Written requests awaiting their answers, by upstream id.
    pending: DashMap<RequestId, Pending>,
    next_id: AtomicU64,
    /// Cancelled when the connection is gone, by either task or by the target's stop.
    closed: CancellationToken,
}

impl UpstreamConn {
    /// Starts the reader and writer tasks over `stream`.
    fn start(stream: TcpStream, target: &Target, shared: &Arc<Shared>) -> Arc<UpstreamConn> {
        let addr = target.addr();
        let (read, write) = stream.into_split();
        let (requests, requests_rx) = mpsc::channel(SEND_QUEUE);
        let (cancels, cancels_rx) = mpsc::unbounded_channel();
        let conn = Arc::new(UpstreamConn {
            addr,
            requests,
            cancels,
            pending: DashMap::new(),
            next_id: AtomicU64::new(1),
            closed: target.stop.child_token(),
        });
        let codec = MessageCodec::new(shared.config.max_frame);
        shared.tasks.spawn(write_loop(
            Arc::clone(&conn),
            FramedWrite::new(write, codec),
            requests_rx,
            cancels_rx,
            Arc::clone(shared),
        ));
        shared.tasks.spawn(read_loop(
            Arc::clone(&conn),
            FramedRead::new(read, codec),
            Arc::clone(shared),
        ));
        conn
    }

    /// A fresh id for a request on this connection.
    pub(crate) fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// True once the connection is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Hands a request to the writer; gives it back when the connection closed first.
    pub(crate) async fn send(&self, forward: Forward) -> Result<(), Forward> {
        self.requests.send(forward).await.map_err(|e| e.0)
    }

    /// Forwards a client's cancel for the request written under `upstream_id`.
    pub(crate) fn cancel(&self, upstream_id: RequestId) {
        let _ = self.cancels.send(upstream_id);
    }
}

/// Routes a request again after its connection closed before writing it.
fn reroute(shared: &Shared, mut request: Request) {
    request.pending.clear_in_flight();
    request.pending.mark_waiting();
    request.reroutes += 1;
    if request.reroutes > MAX_REROUTES {
        request.pending.lost(format!(
            "{MAX_REROUTES} target connections closed before the request could be written"
        ));
    } else {
        shared.queue.reroute(request);
    }
}

enum Outgoing {
    Request(Forward),
    Cancel(RequestId),
}

async fn write_loop(
    conn: Arc<UpstreamConn>,
    mut sink: FramedWrite<OwnedWriteHalf, MessageCodec>,
    mut requests: mpsc::Receiver<Forward>,
    mut cancels: mpsc::UnboundedReceiver<RequestId>,
    shared: Arc<Shared>,
) {
    'run: loop {
        let first = tokio::select! {
            biased;
            () = conn.closed.cancelled() => break 'run,
            Some(forward) = requests.recv() => Outgoing::Request(forward),
            Some(id) = cancels.recv() => Outgoing::Cancel(id),
            else => break 'run,
        };
        let mut next = Some(first);
        // Write everything queued, then flush once: one syscall for a burst.
        while let Some(item) = next {
            let written = match item {
                Outgoing::Request(forward) => {
                    write_request(&conn, &mut sink, forward, &shared).await
                }
                Outgoing::Cancel(id) => sink.feed(Message::Cancel { id }).await,
            };
            if let Err(error) = written {
                tracing::debug!(target = %conn.addr, %error, "upstream writer stopped");
                break 'run;
            }
            next = match requests.try_recv() {
                Ok(forward) => Some(Outgoing::Request(forward)),
                Err(_) => cancels.try_recv().ok().map(Outgoing::Cancel),
            };
        }
        if let Err(error) = sink.flush().await {
            tracing::debug!(target = %conn.addr, %error, "upstream writer stopped");
            break 'run;
        }
    }
    conn.closed.cancel();
    // Whatever is still in the channel was never written: route it again.
    requests.close();
    while let Some(forward) = requests.recv().await {
        reroute(&shared, forward.request);
    }
    let _ = sink.close().await;
}

/// Writes one request; an `Err` means the connection cannot go on.
async fn write_request(
    conn: &UpstreamConn,
    sink: &mut FramedWrite<OwnedWriteHalf, MessageCodec>,
    forward: Forward,
    shared: &Shared,
) -> Result<(), ProtocolError> {
    let Forward {
        upstream_id,
        request:
            Request {
                pending,
                mut infer,
                reroutes,
            },
    } = forward;
    if let Some(budget) = infer.deadline_ms {
        // The target's budget is what is left of the client's.
        let spent = u64::try_from(pending.received().elapsed().as_millis()).unwrap_or(u64::MAX);
        if spent >= budget {
            pending.reject(
                Reject::DeadlineExceeded,
                ErrorCode::DeadlineExceeded,
                format!(
                    "the deadline of {budget} ms passed while the request waited in the balancer"
                ),
                None,
            );
            return Ok(());
        }
        infer.deadline_ms = Some(budget - spent);
    }
    infer.id = upstream_id;
    // In the map before the frame is written, so the answer always finds it.
    conn.pending.insert(upstream_id, pending);
    if conn.is_closed() {
        // The reader may have emptied the map already; whoever removes it owns it.
        if let Some((_, pending)) = conn.pending.remove(&upstream_id) {
            reroute(
                shared,
                Request {
                    pending,
                    infer,
                    reroutes,
                },
            );
        }
        return Err(ProtocolError::Io(std::io::ErrorKind::NotConnected.into()));
    }
    match sink.feed(Message::Infer(infer)).await {
        Ok(()) => Ok(()),
        Err(ProtocolError::Io(error)) => Err(ProtocolError::Io(error)),
        Err(error) => {
            // This one message could not be encoded (too large once re-encoded); the
            // stream is intact.
            if let Some((_, pending)) = conn.pending.remove(&upstream_id) {
                pending.reject(Reject::BadRequest, error.code(), error.to_string(), None);
            }
            Ok(())
        }
    }
}

async fn read_loop(
    conn: Arc<UpstreamConn>,
    mut frames: FramedRead<OwnedReadHalf, MessageCodec>,
    shared: Arc<Shared>,
) {
    let reason = loop {
        let frame = tokio::select! {
            () = conn.closed.cancelled() => break None,
            frame = frames.next() => frame,
        };
        match frame {
            None => break Some("closed by the target".to_owned()),
            Some(Err(error)) => break Some(error.to_string()),
            Some(Ok(Err(error))) => {
                tracing::warn!(target = %conn.addr, %error, "unreadable frame from target");
                if let Some((_, pending)) =
                    error.request_id().and_then(|id| conn.pending.remove(&id))
                {
                    pending.reject(
                        Reject::ConnectionLost,
                        ErrorCode::Internal,
                        format!("the target sent an unreadable answer: {error}"),
                        None,
                    );
                }
            }
            Some(Ok(Ok(Message::Error(reply)))) if reply.id == CONNECTION_ID => {
                break Some(format!("{}: {}", reply.code, reply.message));
            }
            Some(Ok(Ok(msg @ (Message::Result(_) | Message::Error(_))))) => {
                match conn.pending.remove(&msg.id()) {
                    Some((_, pending)) => pending.answer(msg),
                    None => {
                        tracing::trace!(target = %conn.addr, id = msg.id(), "answer to a request that is gone")
                    }
                }
            }
            Some(Ok(Ok(other))) => {
                tracing::debug!(target = %conn.addr, kind = other.kind(), "unexpected frame from target ignored");
            }
        }
    };
    if let Some(reason) = &reason {
        shared.metrics.target_resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target = %conn.addr, %reason, in_flight = conn.pending.len(), "upstream connection lost");
    }
    conn.closed.cancel();
    let written: Vec<RequestId> = conn.pending.iter().map(|e| *e.key()).collect();
    for id in written {
        if let Some((_, pending)) = conn.pending.remove(&id) {
            pending.lost(format!(
                "the connection to target {} ended after the request was sent ({}); it may or may not have run",
                conn.addr,
                reason.as_deref().unwrap_or("target deregistered")
            ));
        }
    }
}

/// Keeps connection slot `slot` of `target` open until the target stops: connects,
/// waits for the connection to close, reconnects with backoff.
pub(crate) async fn maintain(target: Arc<Target>, slot: usize, shared: Arc<Shared>) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let connected = tokio::select! {
            () = target.stop.cancelled() => return,
            r = tokio::time::timeout(shared.config.health_timeout, TcpStream::connect(target.addr())) => r,
        };
        match connected {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                backoff = FIRST_BACKOFF;
                let conn = UpstreamConn::start(stream, &target, &shared);
                target.attach(slot, Arc::clone(&conn));
                tracing::debug!(target = %target.addr(), slot, "upstream connection open");
                conn.closed.cancelled().await;
                target.detach(slot);
            }
            Ok(Err(error)) => {
                tracing::debug!(target = %target.addr(), slot, %error, "upstream connect failed")
            }
            Err(_) => tracing::debug!(target = %target.addr(), slot, "upstream connect timed out"),
        }
        tokio::select! {
            () = target.stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
