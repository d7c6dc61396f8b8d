//! One multiplexed connection to a target, and the task that keeps a target's
//! connections open.
//!
//! Requests reach the writer over a bounded channel (a full channel holds the sender back:
//! backpressure towards the clients). The writer gives each request its upstream id (chosen
//! when it was routed), moves its pending entry into the connection's map *before* writing
//! it, and flushes once per burst. The reader takes answers out of the map by id and hands
//! them to their pending entries, which restore the client's id.
//!
//! While a write waits on a target that stopped reading (frozen, SIGSTOP), the writer keeps
//! taking requests off the channel into a bounded backlog (at most [`SEND_QUEUE`], as many
//! as the channel holds) so that their deadlines are watched too: a request that never got
//! written is answered `deadline_exceeded` at its deadline like one that did.
//!
//! When the connection ends, the requests still in the channel or the backlog were never
//! written: they go back to routing. Those in the map were written and may have run: with
//! `--retries on` each is sent once more to another target (`retry`'s budget and rules),
//! otherwise it is answered `unavailable`. Nothing is lost, and the client gets exactly one
//! answer.
//!
//! The reader also tells outlier detection (`outlier`) what each answer says about the
//! target.

use std::collections::VecDeque;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use futures::{FutureExt, StreamExt};
use tidepool_protocol::raw::{self, Frame, RawKind, Rewrite};
use tidepool_protocol::tls::{ReadHalf, Stream, TlsConnector, WriteHalf};
use tidepool_protocol::{
    Error as ProtocolError, ErrorCode, FrameCodec, Message, MessageCodec, RequestId, CONNECTION_ID,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::burst::WRITE_BURST;
use crate::deadline::Deadlines;
use crate::metrics::{Metrics, Reject};
use crate::outlier::{Outcome, Successes};
use crate::pending::{Payload, Pending, Request};
use crate::queue::Reroute;
use crate::target::Target;

/// Hashes the ids a connection gives its own requests (a counter, never a client's
/// choice, so no keyed hash is needed against collisions made on purpose): one multiply,
/// which spreads consecutive ids over the table's buckets and its shards.
#[derive(Clone, Copy, Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // 2^64 / the golden ratio: Fibonacci hashing.
        self.0 = (self.0.rotate_left(5) ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Requests buffered towards one connection's writer.
const SEND_QUEUE: usize = 1024;
/// The most answers an upstream reader takes as received at one clock read: within a
/// burst of answers read without waiting they are microseconds apart, and a reader that
/// never waits (a steady stream) still reads the clock every this many.
const READ_BURST: u32 = 64;
/// Times one request may be routed again after connection losses.
const MAX_REROUTES: u32 = 3;

/// The settings of a target's upstream connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UpstreamSettings {
    /// Time one connection attempt may take (`--connect-timeout`).
    pub(crate) connect_timeout: Duration,
    /// Largest frame accepted from the target and written to it (`--max-frame`).
    pub(crate) max_frame: usize,
    /// Quiet this long, a connection sends a `ping` (`--upstream-keepalive`), so that the
    /// target's idle timeout never closes it under a request about to be written.
    pub(crate) keepalive: Duration,
}

/// What a target's connections need besides the target itself: their settings, the way
/// back to the wait queue for requests never written, the reset counter, and the tracker
/// their tasks run on (the target group's, so that the group can wait for them).
#[derive(Clone, Debug)]
pub(crate) struct UpstreamContext {
    pub(crate) settings: UpstreamSettings,
    /// TLS towards the target, when `--upstream-tls-ca` is given.
    pub(crate) tls: Option<TlsConnector>,
    pub(crate) reroute: Reroute,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tasks: TaskTracker,
}

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
    pending: DashMap<RequestId, Pending, BuildHasherDefault<IdHasher>>,
    next_id: AtomicU64,
    /// Cancelled when the connection is gone, by either task or by the target's stop.
    closed: CancellationToken,
    /// Why the writer gave the connection up (a failed write), set before it cancels
    /// `closed`: the reader, which may see only the cancel, then knows the connection was
    /// lost rather than closed on purpose, and retries what was written on it.
    lost: OnceLock<String>,
}

/// The writer's side of an [`UpstreamConn`]: what it takes requests and cancels from.
pub(crate) struct Outlets {
    pub(crate) requests: mpsc::Receiver<Forward>,
    pub(crate) cancels: mpsc::UnboundedReceiver<RequestId>,
}

impl UpstreamConn {
    /// A connection to `addr` that closes with `closed`, and the ends its writer reads.
    /// Apart from [`start`](UpstreamConn::start), tests use it to stand in for a socket.
    pub(crate) fn new(addr: SocketAddr, closed: CancellationToken) -> (Arc<UpstreamConn>, Outlets) {
        let (requests, requests_rx) = mpsc::channel(SEND_QUEUE);
        let (cancels, cancels_rx) = mpsc::unbounded_channel();
        let conn = Arc::new(UpstreamConn {
            addr,
            requests,
            cancels,
            pending: DashMap::default(),
            next_id: AtomicU64::new(1),
            closed,
            lost: OnceLock::new(),
        });
        let outlets = Outlets {
            requests: requests_rx,
            cancels: cancels_rx,
        };
        (conn, outlets)
    }

    /// Starts the reader and writer tasks over `stream`.
    fn start(stream: Stream, target: &Arc<Target>, ctx: &UpstreamContext) -> Arc<UpstreamConn> {
        let (read, write) = stream.into_split();
        let (conn, outlets) = UpstreamConn::new(target.addr(), target.stop.child_token());
        let max_frame = ctx.settings.max_frame;
        ctx.tasks.spawn(write_loop(
            Arc::clone(&conn),
            write,
            outlets,
            ctx.settings,
            ctx.reroute.clone(),
            Arc::clone(&ctx.metrics),
        ));
        ctx.tasks.spawn(read_loop(
            Arc::clone(&conn),
            FramedRead::new(read, FrameCodec::new(max_frame)),
            Arc::clone(&ctx.metrics),
            ctx.reroute.clone(),
            Arc::clone(target),
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
        // The channel has room nearly always: taking it without building the send future
        // saves moving the request into it and back out (the full channel still waits).
        match self.requests.try_send(forward) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(forward)) => Err(forward),
            Err(mpsc::error::TrySendError::Full(forward)) => {
                self.requests.send(forward).await.map_err(|e| e.0)
            }
        }
    }

    /// Forwards a client's cancel for the request written under `upstream_id`.
    pub(crate) fn cancel(&self, upstream_id: RequestId) {
        let _ = self.cancels.send(upstream_id);
    }

    /// The target's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream ids of the requests written and not yet answered.
    pub(crate) fn written(&self) -> Vec<RequestId> {
        self.pending.iter().map(|e| *e.key()).collect()
    }

    /// Takes written request `upstream_id` off the connection when `check` passes;
    /// whoever takes it owns its answer, and the target's answer will find nothing.
    pub(crate) fn take_if(
        &self,
        upstream_id: RequestId,
        check: impl FnOnce(&Pending) -> bool,
    ) -> Option<Pending> {
        self.pending
            .remove_if(&upstream_id, |_, pending| check(pending))
            .map(|(_, pending)| pending)
    }

    /// Gives up written request `upstream_id` (another attempt answered it): off the
    /// connection, which tells the target to cancel it.
    pub(crate) fn abandon(&self, upstream_id: RequestId) {
        if self.pending.remove(&upstream_id).is_some() {
            self.cancel(upstream_id);
        }
    }

    /// True when written request `upstream_id` is still unanswered, in time, and may be
    /// hedged (`hedge`).
    pub(crate) fn hedgeable(&self, upstream_id: RequestId) -> bool {
        let now = Instant::now();
        self.pending
            .get(&upstream_id)
            .is_some_and(|p| p.hedgeable() && !p.expired(now))
    }

    /// Splits written request `upstream_id` into a race of two attempts, in place under
    /// the map's guard so that its answer never misses it; returns the second attempt.
    pub(crate) fn hedge(&self, upstream_id: RequestId) -> Option<Request> {
        self.pending.get_mut(&upstream_id)?.hedge(self.addr)
    }

    /// Puts an entry in the map as the writer does, for tests without a socket.
    #[cfg(test)]
    pub(crate) fn hold(&self, upstream_id: RequestId, pending: Pending) {
        self.pending.insert(upstream_id, pending);
    }

    /// Takes an entry out of the map as the reader does, for tests without a socket.
    #[cfg(test)]
    pub(crate) fn take(&self, upstream_id: RequestId) -> Option<Pending> {
        self.pending
            .remove(&upstream_id)
            .map(|(_, pending)| pending)
    }
}

/// Opens a connection to a target, with the upstream TLS if any: the target's certificate
/// must name the configured server name, or else the target's IP address. The connect
/// timeout covers the handshake too (and the TLS handshake timeout bounds it alone).
pub(crate) async fn connect(
    addr: SocketAddr,
    tls: Option<&TlsConnector>,
) -> Result<Stream, ProtocolError> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(tls) => tls.connect(tcp, &addr.ip().to_string()).await,
    }
}

/// Routes a request again after its connection closed before writing it.
fn reroute(queue: &Reroute, mut request: Request) {
    request.pending.clear_in_flight();
    request.pending.mark_waiting();
    request.reroutes += 1;
    if request.reroutes > MAX_REROUTES {
        request.pending.lost(format!(
            "{MAX_REROUTES} target connections closed before the request could be written"
        ));
    } else {
        queue.send(request);
    }
}

// A temporary on the writer's stack, never stored in bulk: boxing the large variant would
// cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Outgoing {
    Request(Forward),
    Cancel(RequestId),
}

/// What the writer tracks besides its socket: the deadlines of the requests it wrote,
/// the one timer for all of them and for the keepalive, and the cancels it owes the
/// target for requests the balancer answered itself.
struct Timers {
    deadlines: Deadlines,
    /// Fires at the earliest deadline or when the keepalive is due, whichever is first;
    /// moved only when an earlier deadline arrives or after it fired.
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    keepalive: Duration,
    last_write: Instant,
    /// Requests answered `deadline_exceeded` here, whose `cancel` is still to be written.
    owed: Vec<RequestId>,
    /// Requests taken off the channel while a write waited, not yet written, in order.
    backlog: VecDeque<Forward>,
    /// The earliest expiry in `backlog`; `None` when none has one.
    backlog_next: Option<Instant>,
}

impl Timers {
    fn new(keepalive: Duration) -> Timers {
        let now = Instant::now();
        Timers {
            deadlines: Deadlines::default(),
            sleep: Box::pin(tokio::time::sleep_until(now + keepalive)),
            keepalive,
            last_write: now,
            owed: Vec::new(),
            backlog: VecDeque::new(),
            backlog_next: None,
        }
    }

    /// True while the backlog has room: it holds no more than the channel would.
    fn backlog_open(&self) -> bool {
        self.backlog.len() < SEND_QUEUE
    }

    /// Keeps a request taken off the channel while a write waits, watching its expiry.
    fn hold(&mut self, forward: Forward) {
        if let Some(at) = forward.request.pending.expiry().map(|e| e.at) {
            if self.backlog_next.is_none_or(|next| at < next) {
                self.backlog_next = Some(at);
            }
            if at < self.sleep.deadline() {
                self.sleep.as_mut().reset(at);
            }
        }
        self.backlog.push_back(forward);
    }

    /// The next request to write: the backlog's oldest, else one from the channel.
    fn next_request(&mut self, requests: &mut mpsc::Receiver<Forward>) -> Option<Forward> {
        self.backlog
            .pop_front()
            .or_else(|| requests.try_recv().ok())
    }

    /// Tracks a written request's deadline.
    fn track(&mut self, conn: &UpstreamConn, at: Instant, id: RequestId) {
        self.deadlines
            .push(at, id, |id| conn.pending.contains_key(&id));
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// The timer fired: answers the requests whose time is up (their late answers will find
    /// nothing and be dropped) and owes the target their cancels; returns true when the
    /// connection has been quiet for the keepalive and a `ping` is due.
    fn fired(&mut self, conn: &UpstreamConn, metrics: &Metrics) -> bool {
        let now = Instant::now();
        for id in self.deadlines.due(now) {
            if let Some((_, pending)) = conn.pending.remove(&id) {
                metrics
                    .limits
                    .request_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                pending.time_up(&format!("at target {}", conn.addr));
                self.owed.push(id);
            }
        }
        if self.backlog_next.is_some_and(|at| at <= now) {
            self.backlog_next = None;
            let mut kept = VecDeque::with_capacity(self.backlog.len());
            for forward in self.backlog.drain(..) {
                if forward.request.pending.expired(now) {
                    metrics
                        .limits
                        .request_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    // Never written, so no cancel is owed.
                    forward.request.pending.time_up(&format!(
                        "waiting to be written to target {}, which stopped reading",
                        conn.addr
                    ));
                } else {
                    let at = forward.request.pending.expiry().map(|e| e.at);
                    self.backlog_next = match (self.backlog_next, at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    kept.push_back(forward);
                }
            }
            self.backlog = kept;
        }
        let ping = now >= self.last_write + self.keepalive;
        if ping {
            // Counts as a write: the next one is due a keepalive from now.
            self.last_write = now;
        }
        let next_keepalive = self.last_write + self.keepalive;
        let next = [self.deadlines.next(), self.backlog_next]
            .into_iter()
            .flatten()
            .fold(next_keepalive, Instant::min);
        self.sleep.as_mut().reset(next);
        ping
    }
}

async fn write_loop(
    conn: Arc<UpstreamConn>,
    mut socket: WriteHalf,
    outlets: Outlets,
    settings: UpstreamSettings,
    queue: Reroute,
    metrics: Arc<Metrics>,
) {
    let Outlets {
        mut requests,
        mut cancels,
    } = outlets;
    let max_frame = settings.max_frame;
    let mut codec = MessageCodec::new(max_frame);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut timers = Timers::new(settings.keepalive);
    let failure: Option<String> = 'run: loop {
        let first = if let Some(forward) = timers.backlog.pop_front() {
            Some(Outgoing::Request(forward))
        } else {
            tokio::select! {
            biased;
            () = conn.closed.cancelled() => break 'run None,
            Some(forward) = requests.recv() => Some(Outgoing::Request(forward)),
            Some(id) = cancels.recv() => Some(Outgoing::Cancel(id)),
            () = timers.sleep.as_mut() => {
                if timers.fired(&conn, &metrics) {
                    let ping = Message::Ping { id: conn.next_id() };
                    if let Err(error) = codec.encode_ref(&ping, &mut buf) {
                        break 'run Some(error.to_string());
                    }
                }
                None
            }
            else => break 'run None,
            }
        };
        for id in timers.owed.drain(..) {
            if let Err(error) = codec.encode_ref(&Message::Cancel { id }, &mut buf) {
                break 'run Some(error.to_string());
            }
        }
        // A timer's ping or cancels alone need no wait for company.
        let mut yielded = first.is_none();
        let mut next = first;
        // Encode everything queued, then write once: one syscall for a burst.
        loop {
            let Some(item) = next else {
                // Let the tasks that are ready now (other clients' readers routing here) add
                // their requests first: one `send` for all of them. Requests already in
                // `buf` count as written meanwhile, as they would in the kernel's buffer.
                if yielded || buf.len() >= WRITE_BURST {
                    break;
                }
                yielded = true;
                tokio::task::yield_now().await;
                next = match timers.next_request(&mut requests) {
                    Some(forward) => Some(Outgoing::Request(forward)),
                    None => cancels.try_recv().ok().map(Outgoing::Cancel),
                };
                continue;
            };
            let written = match item {
                Outgoing::Request(forward) => {
                    encode_request(&conn, &mut buf, forward, max_frame, &queue, &mut timers)
                }
                Outgoing::Cancel(id) => codec.encode_ref(&Message::Cancel { id }, &mut buf),
            };
            if let Err(error) = written {
                break 'run Some(error.to_string());
            }
            if buf.len() >= WRITE_BURST {
                break;
            }
            next = match timers.next_request(&mut requests) {
                Some(forward) => Some(Outgoing::Request(forward)),
                None => cancels.try_recv().ok().map(Outgoing::Cancel),
            };
        }
        // A target that stopped reading (frozen, SIGSTOP) must not stop the deadlines of
        // what it already has: the timer is served while the write waits.
        let mut at = 0;
        while at < buf.len() {
            tokio::select! {
                biased;
                () = conn.closed.cancelled() => break 'run None,
                () = timers.sleep.as_mut() => {
                    // A ping would be pointless behind a write that does not move.
                    let _ = timers.fired(&conn, &metrics);
                }
                written = socket.write(&buf[at..]) => match written {
                    Ok(0) => break 'run Some("the target stopped taking writes".to_owned()),
                    Ok(n) => at += n,
                    Err(error) => break 'run Some(format!("a write failed: {error}")),
                },
                // Taken off the channel so that their deadlines run while the write waits.
                Some(forward) = requests.recv(), if timers.backlog_open() => timers.hold(forward),
            }
        }
        // Flushing a TLS stream sends the records still in its buffer; TCP's does nothing.
        // Like the write, it must not hold up the deadlines of what the target already has.
        loop {
            tokio::select! {
                biased;
                () = conn.closed.cancelled() => break 'run None,
                () = timers.sleep.as_mut() => {
                    let _ = timers.fired(&conn, &metrics);
                }
                flushed = socket.flush() => match flushed {
                    Ok(()) => break,
                    Err(error) => break 'run Some(format!("a flush failed: {error}")),
                },
                Some(forward) = requests.recv(), if timers.backlog_open() => timers.hold(forward),
            }
        }
        if !buf.is_empty() {
            timers.last_write = Instant::now();
        }
        buf.clear();
    };
    if let Some(failure) = failure {
        tracing::debug!(target = %conn.addr, %failure, "upstream writer stopped");
        let _ = conn.lost.set(failure);
    }
    conn.closed.cancel();
    // Whatever is still in the backlog or the channel was never written: route it again.
    requests.close();
    for forward in timers.backlog.drain(..) {
        reroute(&queue, forward.request);
    }
    while let Some(forward) = requests.recv().await {
        reroute(&queue, forward.request);
    }
    let _ = socket.shutdown().await;
}

/// Encodes one request into the write buffer; an `Err` means the connection cannot go on.
///
/// Requests encoded into the buffer count as written: their pending entries are in the
/// map, and a connection lost before the buffer reaches the socket treats them as it
/// would bytes in the kernel's send buffer (retried where retries allow, else answered
/// `unavailable`).
fn encode_request(
    conn: &Arc<UpstreamConn>,
    buf: &mut BytesMut,
    forward: Forward,
    max_frame: usize,
    queue: &Reroute,
    timers: &mut Timers,
) -> Result<(), ProtocolError> {
    let Forward {
        upstream_id,
        request: Request {
            pending,
            payload,
            reroutes,
        },
    } = forward;
    // The target's budget is what is left of the client's.
    let deadline_ms = match payload.deadline_left(pending.received()) {
        Ok(left) => left,
        Err(passed) => {
            pending.deadline_passed(passed);
            return Ok(());
        }
    };
    // As NLB preserves the client IP, the target learns who asked.
    let encoded = match &payload {
        Payload::Raw(raw) => raw.write_frame(
            &Rewrite {
                id: upstream_id,
                deadline_ms,
                client: Some(pending.peer()),
            },
            buf,
            max_frame,
        ),
        Payload::Decoded(infer) => {
            let mut infer = infer.clone();
            infer.id = upstream_id;
            infer.deadline_ms = deadline_ms;
            infer.client = Some(pending.peer().to_owned());
            MessageCodec::new(max_frame).encode_ref(&Message::Infer(infer), buf)
        }
    };
    if let Err(error) = encoded {
        // This one message could not be encoded (too large once rewritten); the
        // stream is intact.
        pending.reject(Reject::BadRequest, error.code(), error.to_string(), None);
        return Ok(());
    }
    let expiry = pending.expiry().map(|e| e.at);
    let mut pending = pending;
    // With retries or hedging on, the entry keeps the request (cheap `Bytes` clones)
    // until answered.
    let mut payload = Some(payload);
    let hedges = queue.hedges();
    if queue.retries().enabled() || hedges.is_some() {
        if let Some(payload) = payload.take() {
            pending.keep(payload, reroutes);
        }
    }
    let hedge = hedges.filter(|_| pending.hedgeable());
    // In the map before the frame is written, so the answer always finds it.
    conn.pending.insert(upstream_id, pending);
    if let Some(hedges) = hedge {
        hedges.watch(conn, upstream_id);
    }
    if let Some(at) = expiry {
        timers.track(conn, at, upstream_id);
    }
    if conn.is_closed() {
        // The reader may have emptied the map already; whoever removes it owns it.
        if let Some((_, mut pending)) = conn.pending.remove(&upstream_id) {
            let kept = pending.unkeep();
            if let Some((payload, reroutes)) = payload.map(|p| (p, reroutes)).or(kept) {
                reroute(
                    queue,
                    Request {
                        pending,
                        payload,
                        reroutes,
                    },
                );
            }
        }
        return Err(ProtocolError::Io(std::io::ErrorKind::NotConnected.into()));
    }
    Ok(())
}

async fn read_loop(
    conn: Arc<UpstreamConn>,
    mut frames: FramedRead<ReadHalf, FrameCodec>,
    metrics: Arc<Metrics>,
    queue: Reroute,
    target: Arc<Target>,
) {
    let outliers = queue.outliers().clone();
    // Successes go to outlier detection once per read burst; anything else is observed at
    // once, after the successes before it.
    let mut successes = Successes::default();
    // The clock, read once per read burst (the answers already waiting): the time every
    // answer of the burst was received, for its latency and for outlier detection.
    let mut burst: Option<Instant> = None;
    let mut burst_frames = 0;
    let end_burst = |successes: &mut Successes, burst: &mut Option<Instant>| {
        if let Some(now) = burst.take() {
            successes.flush(&outliers, &target.outlier, now);
        }
    };
    let observe = |successes: &mut Successes, burst: Option<Instant>, outcome| {
        successes.flush(
            &outliers,
            &target.outlier,
            burst.unwrap_or_else(Instant::now),
        );
        outliers.observe(conn.addr, &target.outlier, outcome);
    };
    let mut last_error: Option<String> = None;
    let reason = loop {
        if burst_frames >= READ_BURST {
            burst_frames = 0;
            end_burst(&mut successes, &mut burst);
        }
        // Checked once per read burst (a lock in tokio-util, about 40 instructions): a
        // reader that waits sees the closing in its `select!`, and one that never waits
        // within READ_BURST answers, each still delivered once (its entry leaves the map).
        if burst_frames == 0 && conn.closed.is_cancelled() {
            break None;
        }
        // An answer already read (or readable without waiting) continues the burst.
        let frame = match frames.next().now_or_never() {
            Some(frame) => frame,
            None => {
                burst_frames = 0;
                end_burst(&mut successes, &mut burst);
                tokio::select! {
                    () = conn.closed.cancelled() => break None,
                    frame = frames.next() => frame,
                }
            }
        };
        burst_frames += 1;
        let body = match frame {
            None => {
                break Some(match last_error.take() {
                    Some(error) => format!("closed by the target after {error}"),
                    None => "closed by the target".to_owned(),
                })
            }
            Some(Err(error)) => break Some(error.to_string()),
            Some(Ok(body)) => body,
        };
        match raw::decode_body(body) {
            Err(error) => {
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
            Ok(Frame::Raw(result)) if result.kind() == RawKind::Result => {
                match conn.pending.remove(&result.id()) {
                    Some((_, pending)) => {
                        successes.add();
                        pending.answer_raw(result, *burst.get_or_insert_with(Instant::now))
                    }
                    None => {
                        tracing::trace!(target = %conn.addr, id = result.id(), "answer to a request that is gone")
                    }
                }
            }
            Ok(Frame::Raw(_)) => {
                tracing::debug!(target = %conn.addr, kind = "infer", "unexpected frame from target ignored");
            }
            Ok(Frame::Message(Message::Error(reply))) if reply.id == CONNECTION_ID => {
                // Workers answer a message they cannot read under its own id, and close the
                // connection themselves after a framing error: an error under id 0 names
                // no request and fails none. It is the reason if the connection now ends.
                tracing::warn!(target = %conn.addr, code = %reply.code, message = %reply.message, "connection-level error from target");
                last_error = Some(format!("{}: {}", reply.code, reply.message));
            }
            Ok(Frame::Message(Message::Pong { .. })) => {
                // The keepalive's answer: the connection is alive, nothing to do.
            }
            Ok(Frame::Message(msg @ (Message::Result(_) | Message::Error(_)))) => {
                match conn.pending.remove(&msg.id()) {
                    Some((_, pending)) => {
                        observe(&mut successes, burst, outcome(&msg));
                        pending.answer(msg)
                    }
                    None => {
                        tracing::trace!(target = %conn.addr, id = msg.id(), "answer to a request that is gone")
                    }
                }
            }
            Ok(Frame::Message(other)) => {
                tracing::debug!(target = %conn.addr, kind = other.kind(), "unexpected frame from target ignored");
            }
        }
    };
    end_burst(&mut successes, &mut burst);
    // Closed while this reader waited: by the writer on a failed write (a killed worker's
    // reset can reach a write before this reader is polled), which is a loss like one seen
    // here; else by the balancer on purpose.
    let reason = reason.or_else(|| conn.lost.get().cloned());
    if let Some(reason) = &reason {
        metrics.target_resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target = %conn.addr, %reason, in_flight = conn.pending.len(), "upstream connection lost");
    }
    conn.closed.cancel();
    let written: Vec<RequestId> = conn.pending.iter().map(|e| *e.key()).collect();
    if reason.is_some() {
        // Each request a lost connection held is a failure of its target, as Envoy counts a
        // reset as a gateway failure: a worker that dies with work in hand, and one that
        // keeps doing so (a crash loop), is ejected rather than handed more to lose. A
        // connection lost with nothing on it (idle, or a drained worker's) says nothing.
        for _ in &written {
            outliers.observe(conn.addr, &target.outlier, Outcome::Failure);
        }
    }
    for id in written {
        if let Some((_, pending)) = conn.pending.remove(&id) {
            let message = format!(
                "the connection to target {} ended after the request was sent ({}); it may or may not have run",
                conn.addr,
                reason.as_deref().unwrap_or("target deregistered")
            );
            // Only a connection that was lost is retried: one the balancer closed itself
            // (deregistration's end, shutdown) closes every other one too.
            match reason {
                Some(_) => retry_or_lose(&queue, pending, conn.addr, message),
                None => pending.lost(message),
            }
        }
    }
}

/// What a target's answer says about the target, for outlier detection.
fn outcome(msg: &Message) -> Outcome {
    match msg {
        Message::Error(reply) => match reply.code {
            ErrorCode::Internal | ErrorCode::Unavailable => Outcome::Failure,
            ErrorCode::Overloaded => {
                Outcome::Overloaded(reply.retry_after_ms.map(Duration::from_millis))
            }
            _ => Outcome::Neutral,
        },
        _ => Outcome::Success,
    }
}

/// A written request whose connection was lost: sent once more, to another target, when
/// retries are on, it was not retried already, its time is not up and the budget allows;
/// otherwise answered `unavailable` with `message`.
fn retry_or_lose(queue: &Reroute, pending: Pending, lost_at: SocketAddr, message: String) {
    let mut request = match pending.into_retry(lost_at) {
        Ok(request) => request,
        Err(pending) => return pending.lost(message),
    };
    let pending = &request.pending;
    if pending.expired(Instant::now()) || request.payload.deadline_left(pending.received()).is_err()
    {
        return request.pending.lost(message);
    }
    if !queue.retries().try_spend() {
        return request.pending.lost(format!(
            "{message}; it was not sent again because the balancer's retry budget is spent (too many requests lost at once)"
        ));
    }
    tracing::debug!(target = %lost_at, "request lost with its connection: retrying on another target");
    request.pending.clear_in_flight();
    request.pending.mark_waiting();
    queue.send(request);
}

/// Keeps connection slot `slot` of `target` open until the target stops: connects,
/// waits for the connection to close, reconnects with backoff.
pub(crate) async fn maintain(target: Arc<Target>, slot: usize, ctx: UpstreamContext) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let connected = tokio::select! {
            () = target.stop.cancelled() => return,
            r = tokio::time::timeout(ctx.settings.connect_timeout, connect(target.addr(), ctx.tls.as_ref())) => r,
        };
        match connected {
            Ok(Ok(stream)) => {
                backoff = FIRST_BACKOFF;
                let conn = UpstreamConn::start(stream, &target, &ctx);
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::SinkExt;
    use tidepool_protocol::{DType, ErrorReply, Infer, InferResult, Tensor};
    use tokio::net::TcpListener;
    use tokio_util::codec::Framed;

    use super::*;
    use crate::outlier::{EjectionReason, OutlierSettings, Outliers};
    use crate::pending::{Answer, ClientConn, Lifecycle, Outbound, Slot};
    use crate::queue::{QueueHandle, QueueReceiver, QueueSignal};
    use crate::retry::{Retries, RetrySettings};

    const KEEPALIVE: Duration = Duration::from_secs(30);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
    const MAX_FRAME: usize = 4 << 20;
    /// The pool the fixture's target is counted in, for ejections' cap.
    const POOL: usize = 4;

    /// One upstream connection's writer and reader running over a real socket, the
    /// target's end of which the test holds, and one client whose answers it reads.
    struct Fixture {
        conn: Arc<UpstreamConn>,
        target: Framed<TcpStream, MessageCodec>,
        client: Arc<ClientConn>,
        answers: mpsc::UnboundedReceiver<Outbound>,
        metrics: Arc<Metrics>,
        /// Where re-routed and retried requests go.
        queue: QueueReceiver,
        /// The target's stop, the parent of the connection's `closed`: the balancer closing
        /// it on purpose.
        stop: CancellationToken,
        /// The target the connection belongs to (its outlier detection's cell).
        registered: Arc<Target>,
        next_id: RequestId,
    }

    /// The tests' connection settings, with `keepalive`.
    fn settings(keepalive: Duration) -> UpstreamSettings {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(1),
            max_frame: MAX_FRAME,
            keepalive,
        }
    }

    impl Fixture {
        async fn new() -> Fixture {
            Fixture::with_retries(RetrySettings::OFF).await
        }

        /// A fixture whose lost requests are retried as `retries` allows.
        async fn with_retries(retries: RetrySettings) -> Fixture {
            Fixture::with(retries, OutlierSettings::OFF).await
        }

        /// A fixture with `retries`, and outlier detection by `outliers` over a pool of
        /// [`POOL`] targets (so that one may be ejected).
        async fn with(retries: RetrySettings, outliers: OutlierSettings) -> Fixture {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (ours, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
            let (read, write) = Stream::Plain(ours.unwrap()).into_split();
            let metrics = Arc::new(Metrics::default());
            let (queue, queue_rx) =
                QueueHandle::new(8, Duration::from_secs(1), Arc::new(QueueSignal::default()));
            let detection = Outliers::new(outliers);
            detection.set_pool_size(POOL);
            let queue = queue
                .with_retries(Retries::new(retries))
                .with_outliers(detection);
            let target = Arc::new(Target::new(addr, 1, 1, Arc::new(QueueSignal::default())));
            let registered = Arc::clone(&target);
            let stop = target.stop.clone();
            let (conn, outlets) = UpstreamConn::new(addr, target.stop.child_token());
            tokio::spawn(write_loop(
                Arc::clone(&conn),
                write,
                outlets,
                settings(KEEPALIVE),
                queue.reroute(),
                Arc::clone(&metrics),
            ));
            tokio::spawn(read_loop(
                Arc::clone(&conn),
                FramedRead::new(read, FrameCodec::new(MAX_FRAME)),
                Arc::clone(&metrics),
                queue.reroute(),
                target,
            ));
            let (tx, answers) = mpsc::unbounded_channel();
            let client = Arc::new(ClientConn::new(
                tx,
                "192.0.2.1:5000".to_owned(),
                Arc::clone(&metrics),
                Arc::new(Lifecycle::default()),
            ));
            Fixture {
                conn,
                target: Framed::new(accepted.unwrap().0, MessageCodec::new(MAX_FRAME)),
                client,
                answers,
                metrics,
                queue: queue_rx,
                stop,
                registered,
                next_id: 1,
            }
        }

        /// Hands the writer a request read just now with `deadline_ms` and `floats` of
        /// data, as routing would; returns its client and upstream ids.
        async fn send(
            &mut self,
            deadline_ms: Option<u64>,
            floats: usize,
        ) -> (RequestId, RequestId) {
            let id = self.next_id;
            self.next_id += 1;
            self.client.slots.insert(id, Slot::Waiting);
            let mut pending = Pending::new(Arc::clone(&self.client), id, None, Instant::now());
            pending.set_expiry(deadline_ms, REQUEST_TIMEOUT);
            let upstream_id = self.conn.next_id();
            assert!(pending.mark_sent(&self.conn, upstream_id));
            let data = Bytes::from(vec![0u8; floats * 4]);
            let infer = Infer {
                id,
                inputs: [(
                    "x".to_owned(),
                    Tensor::new(DType::F32, vec![floats], data).unwrap(),
                )]
                .into(),
                deadline_ms,
                client: None,
                ..Default::default()
            };
            let forward = Forward {
                upstream_id,
                request: Request {
                    pending,
                    payload: Payload::Decoded(infer),
                    reroutes: 0,
                },
            };
            assert!(
                self.conn.send(forward).await.is_ok(),
                "the writer is running"
            );
            (id, upstream_id)
        }

        /// The next frame the target reads.
        async fn target_reads(&mut self) -> Message {
            self.target.next().await.unwrap().unwrap().unwrap()
        }

        /// The next answer the client gets, waiting for it; a target's `result`, passed on
        /// as received, stands as an empty one under the client's id.
        async fn answer(&mut self) -> Message {
            match self.answers.recv().await.unwrap().answer {
                Answer::Message(msg) => *msg,
                Answer::Raw { result, client_id } => {
                    assert_eq!(result.kind(), RawKind::Result);
                    Message::Result(InferResult {
                        id: client_id,
                        ..InferResult::default()
                    })
                }
            }
        }

        /// The next answer, which must be an error.
        async fn error(&mut self) -> ErrorReply {
            match self.answer().await {
                Message::Error(reply) => reply,
                other => panic!("expected an error, got {other:?}"),
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.conn.closed.cancel();
        }
    }

    /// Keeps paused time still: a task that is always ready stops the runtime from idling,
    /// so that time moves only by `tokio::time::advance` and never jumps ahead to the next
    /// timer while a socket read is on its way (the runtime still polls its sockets).
    fn hold_time_still() -> tokio::task::JoinHandle<()> {
        tokio::spawn(async {
            loop {
                tokio::task::yield_now().await;
            }
        })
    }

    /// Lets the writer and reader run up to their next wait.
    async fn settle() {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_target_is_timed_out_at_the_deadline_and_told_to_cancel() {
        let mut f = Fixture::new().await;
        let start = Instant::now();
        let (id, upstream_id) = f.send(Some(500), 4).await;
        match f.target_reads().await {
            Message::Infer(infer) => {
                assert_eq!(infer.id, upstream_id);
                assert_eq!(infer.deadline_ms, Some(500), "the budget left, all of it");
                assert_eq!(infer.client.as_deref(), Some("192.0.2.1:5000"));
            }
            other => panic!("expected the infer, got {other:?}"),
        }
        // The target never answers: the balancer answers at the deadline...
        let reply = f.error().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "at the deadline"
        );
        assert_eq!(reply.id, id);
        assert_eq!(reply.code, ErrorCode::DeadlineExceeded);
        assert!(
            reply.message.contains("500 ms") && reply.message.contains("at target"),
            "{}",
            reply.message
        );
        assert!(f.conn.pending.is_empty());
        // ...and tells the target to drop it.
        match f.target_reads().await {
            Message::Cancel { id } => assert_eq!(id, upstream_id),
            other => panic!("expected a cancel, got {other:?}"),
        }

        // The late answer finds nothing; the next request's answer, behind it on the same
        // socket, shows that it was read and dropped.
        let (second, second_upstream) = f.send(Some(500), 4).await;
        assert!(matches!(f.target_reads().await, Message::Infer(_)));
        for id in [upstream_id, second_upstream] {
            f.target
                .send(Message::Result(InferResult {
                    id,
                    ..InferResult::default()
                }))
                .await
                .unwrap();
        }
        match f.answer().await {
            Message::Result(result) => assert_eq!(result.id, second),
            other => panic!("expected the second request's result, got {other:?}"),
        }
        assert!(f.answers.try_recv().is_err(), "one answer per request");
        assert_eq!(f.metrics.limits.request_timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_pings_after_the_keepalive_and_writes_put_it_off() {
        use futures::FutureExt;

        let still = hold_time_still();
        let mut f = Fixture::new().await;
        let (id, upstream_id) = f.send(None, 4).await;
        assert!(matches!(f.target_reads().await, Message::Infer(_)));
        f.target
            .send(Message::Result(InferResult {
                id: upstream_id,
                ..InferResult::default()
            }))
            .await
            .unwrap();
        assert_eq!(f.answer().await.id(), id);

        let almost = KEEPALIVE - Duration::from_millis(1);
        tokio::time::advance(almost).await;
        settle().await;
        assert!(f.target.next().now_or_never().is_none(), "no ping yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(f.target_reads().await, Message::Ping { .. }));

        // A request written 20 s later puts the next ping off to a keepalive after it.
        tokio::time::advance(Duration::from_secs(20)).await;
        f.send(None, 4).await;
        assert!(matches!(f.target_reads().await, Message::Infer(_)));
        tokio::time::advance(almost).await;
        settle().await;
        assert!(
            f.target.next().now_or_never().is_none(),
            "no ping a keepalive after the previous one"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(f.target_reads().await, Message::Ping { .. }));
        still.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn requests_behind_a_frozen_target_are_answered_at_their_deadlines() {
        let mut f = Fixture::new().await;
        let start = Instant::now();
        // The target never reads: far more than the socket buffers hold, so the write
        // blocks with some requests written and the rest not.
        const REQUESTS: usize = 48;
        let mut ids = Vec::new();
        for _ in 0..REQUESTS {
            ids.push(f.send(Some(500), 256 * 1024).await.0);
        }
        let (mut written, mut unwritten) = (0, 0);
        let mut answered = Vec::new();
        for _ in 0..REQUESTS {
            let reply = tokio::time::timeout(Duration::from_secs(10), f.error())
                .await
                .expect("every request is answered while the target is frozen");
            assert_eq!(reply.code, ErrorCode::DeadlineExceeded, "{}", reply.message);
            assert_eq!(
                start.elapsed(),
                Duration::from_millis(500),
                "at the deadline"
            );
            if reply.message.contains("waiting to be written") {
                unwritten += 1;
            } else {
                written += 1;
            }
            answered.push(reply.id);
        }
        answered.sort_unstable();
        assert_eq!(answered, ids, "each request answered once");
        assert!(written > 0, "some reached the socket");
        assert!(unwritten > 0, "some never did");
        assert!(f.answers.try_recv().is_err());
    }

    /// Retries on, with room for a few.
    const RETRIES: RetrySettings = RetrySettings {
        enabled: true,
        ratio: 0.0,
        floor_per_second: 1,
    };

    #[tokio::test(start_paused = true)]
    async fn a_connection_its_writer_closed_retries_what_was_written() {
        // A killed worker's reset can reach the writer first (a write fails before the
        // reader is polled), and the writer closes the connection itself. That is a loss
        // all the same: what was written goes to another target, once, and is not
        // answered `unavailable` (the compose suite's killed worker).
        let mut f = Fixture::with_retries(RETRIES).await;
        let (_, upstream_id) = f.send(None, 4).await;
        assert!(matches!(f.target_reads().await, Message::Infer(i) if i.id == upstream_id));
        // What the writer does after a failed write: it records why and closes the
        // connection, not the target.
        let _ = f
            .conn
            .lost
            .set("a write failed: connection reset by peer".to_owned());
        f.conn.closed.cancel();
        let retried = tokio::time::timeout(Duration::from_secs(1), f.queue.recv())
            .await
            .expect("retried at once, not answered")
            .expect("the queue is open");
        assert_eq!(retried.pending.retried_from(), Some(f.conn.addr()));
        assert!(f.answers.try_recv().is_err(), "the retry owes the answer");
        assert_eq!(f.metrics.target_resets.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_the_balancer_closes_answers_what_was_written() {
        // Deregistration's end and shutdown stop the target, which closes all of its
        // connections: what was written there is answered, not retried.
        let mut f = Fixture::with_retries(RETRIES).await;
        let (id, upstream_id) = f.send(None, 4).await;
        assert!(matches!(f.target_reads().await, Message::Infer(i) if i.id == upstream_id));
        f.stop.cancel();
        let reply = f.error().await;
        assert_eq!((reply.id, reply.code), (id, ErrorCode::Unavailable));
        assert!(
            reply.message.contains("target deregistered"),
            "{}",
            reply.message
        );
        assert!(f.queue.try_recv().is_err(), "not retried");
        assert_eq!(f.metrics.target_resets.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_failed_write_says_why_before_the_connection_closes() {
        // The target resets the connection (SO_LINGER 0: a killed process's socket with
        // unread data does the same); the writer's next write, a keepalive ping here, fails.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (accepted, _) = accepted.unwrap();
        socket2::SockRef::from(&accepted)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(accepted);
        let (_read, write) = Stream::Plain(ours.unwrap()).into_split();
        let (queue, _queue_rx) =
            QueueHandle::new(8, Duration::from_secs(1), Arc::new(QueueSignal::default()));
        let (conn, outlets) = UpstreamConn::new(addr, CancellationToken::new());
        tokio::spawn(write_loop(
            Arc::clone(&conn),
            write,
            outlets,
            settings(Duration::from_millis(10)),
            queue.reroute(),
            Arc::new(Metrics::default()),
        ));
        tokio::time::timeout(Duration::from_secs(5), conn.closed.cancelled())
            .await
            .expect("the writer closes the connection after its write fails");
        let lost = conn.lost.get().expect("the writer says why");
        assert!(lost.contains("failed"), "{lost}");
    }

    /// Outlier detection that ejects after two failures in a row.
    const EJECT_AFTER_TWO: OutlierSettings = OutlierSettings {
        consecutive: 2,
        base: Duration::from_secs(30),
        max: Duration::from_secs(300),
        max_percent: 50,
    };

    #[tokio::test(start_paused = true)]
    async fn a_connection_lost_under_requests_counts_each_as_a_failure_of_its_target() {
        // A worker that dies with work in hand (here: closes its end with two requests
        // unanswered) fails each of them: two in a row eject it, as Envoy counts resets.
        let mut f = Fixture::with(RETRIES, EJECT_AFTER_TWO).await;
        for _ in 0..2 {
            let (_, upstream_id) = f.send(None, 4).await;
            assert!(matches!(f.target_reads().await, Message::Infer(i) if i.id == upstream_id));
        }
        f.target.get_mut().shutdown().await.unwrap();
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(1), f.queue.recv())
                .await
                .expect("retried at once")
                .expect("the queue is open");
        }
        assert_eq!(
            f.registered.outlier.ejection(),
            Some(EjectionReason::ConsecutiveErrors)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_lost_with_nothing_on_it_fails_nobody() {
        // An idle connection closed by the worker (its idle timeout, a drained worker)
        // says nothing against it.
        let mut f = Fixture::with(RETRIES, EJECT_AFTER_TWO).await;
        f.target.get_mut().shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), f.conn.closed.cancelled())
            .await
            .expect("the reader sees the close");
        assert_eq!(f.registered.outlier.ejection(), None);
        assert_eq!(f.metrics.target_resets.load(Ordering::Relaxed), 1);
    }
}
