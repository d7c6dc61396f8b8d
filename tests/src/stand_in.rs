//! A stand-in target: speaks the protocol like a worker, without a model.
//!
//! Each `infer` is answered after the configured delay with its inputs echoed as outputs
//! (so a test can check that every answer belongs to its request), `ping` with `pong`
//! while ready, `cancel` with `cancelled` for work not yet answered. The delay can change
//! while it runs (to make one target slow) and [`StandIn::kill`] drops every connection
//! without answering, as a crashed process would.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tidepool_protocol::{ErrorCode, ErrorReply, InferResult, Message, MessageCodec, RequestId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// How a stand-in behaves.
#[derive(Clone, Debug)]
pub struct StandInConfig {
    /// The `worker` name put in every result.
    pub name: String,
    /// Time each item takes.
    pub delay: Duration,
    /// Whether `ping` is answered `pong` from the start.
    pub ready: bool,
    /// The largest frame accepted.
    pub max_frame: usize,
    /// When set, every `infer` is answered at once with this error, as a worker whose
    /// model broke does (its health checks still pass).
    pub fail_with: Option<ErrorCode>,
}

impl Default for StandInConfig {
    fn default() -> Self {
        StandInConfig {
            name: "stand-in".to_owned(),
            delay: Duration::ZERO,
            ready: true,
            max_frame: tidepool_protocol::DEFAULT_MAX_FRAME,
            fail_with: None,
        }
    }
}

/// Counters a test reads.
#[derive(Debug, Default)]
pub struct Stats {
    /// `infer` frames received.
    pub received: AtomicU64,
    /// `result` frames sent.
    pub completed: AtomicU64,
    /// `cancelled` answers sent.
    pub cancelled: AtomicU64,
    /// `ping` frames received.
    pub pings: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Items in flight now.
    pub in_flight: AtomicUsize,
    /// The most items in flight at once.
    pub max_in_flight: AtomicUsize,
    /// The `client` fields seen on `infer` frames.
    pub clients: Mutex<Vec<String>>,
}

struct Shared {
    config: StandInConfig,
    delay_us: AtomicU64,
    ready: AtomicBool,
    stats: Stats,
    /// Cancelled by `kill`: connections drop at once, unanswered.
    kill: CancellationToken,
}

/// A running stand-in target.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl StandIn {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(config: StandInConfig) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        StandIn::serve(listener, config)
    }

    /// Serves on an already bound listener (to restart on a known port).
    pub fn serve(listener: TcpListener, config: StandInConfig) -> StandIn {
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let shared = Arc::new(Shared {
            delay_us: AtomicU64::new(config.delay.as_micros() as u64),
            ready: AtomicBool::new(config.ready),
            config,
            stats: Stats::default(),
            kill: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop.clone()));
        StandIn { addr, shared, stop }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Changes the time each item takes, for items that start from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Makes `ping` answer `pong` (ready) or `unavailable` (not ready).
    pub fn set_ready(&self, ready: bool) {
        self.shared.ready.store(ready, Ordering::Relaxed);
    }

    /// Stops accepting and drops every connection without answering, as a crash would.
    pub fn kill(&self) {
        self.stop.cancel();
        self.shared.kill.cancel();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, Arc::clone(&shared)));
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let codec = MessageCodec::new(shared.config.max_frame);
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, codec);
    let mut sink = FramedWrite::new(write, codec);
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    let kill = shared.kill.clone();
    // Per-connection pending work: id -> the token that cancels it. Never held across an
    // await.
    let pending: Arc<Mutex<HashMap<RequestId, CancellationToken>>> = Arc::default();

    let writer = tokio::spawn({
        let kill = kill.clone();
        async move {
            loop {
                let msg = tokio::select! {
                    () = kill.cancelled() => return,
                    msg = rx.recv() => match msg { Some(m) => m, None => break },
                };
                if sink.feed(msg).await.is_err() {
                    return;
                }
                while let Ok(msg) = rx.try_recv() {
                    if sink.feed(msg).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        }
    });

    loop {
        let frame = tokio::select! {
            () = kill.cancelled() => { writer.abort(); return; }
            frame = frames.next() => frame,
        };
        let msg = match frame {
            None => break,
            Some(Err(error)) => {
                let _ = tx.send(Message::Error(error.reply())).await;
                break;
            }
            Some(Ok(Err(error))) => {
                let _ = tx.send(Message::Error(error.reply())).await;
                continue;
            }
            Some(Ok(Ok(msg))) => msg,
        };
        match msg {
            Message::Ping { id } => {
                shared.stats.pings.fetch_add(1, Ordering::Relaxed);
                let answer = if shared.ready.load(Ordering::Relaxed) {
                    Message::pong(id)
                } else {
                    Message::Error(ErrorReply::new(
                        id,
                        ErrorCode::Unavailable,
                        "stand-in not ready",
                    ))
                };
                let _ = tx.send(answer).await;
            }
            Message::Cancel { id } => {
                let token = pending.lock().expect("pending lock").remove(&id);
                if let Some(token) = token {
                    token.cancel();
                }
            }
            Message::Infer(infer) => {
                shared.stats.received.fetch_add(1, Ordering::Relaxed);
                if let Some(client) = &infer.client {
                    shared
                        .stats
                        .clients
                        .lock()
                        .expect("clients lock")
                        .push(client.clone());
                }
                if let Some(code) = shared.config.fail_with {
                    let reply = ErrorReply::new(infer.id, code, "the stand-in's model is broken");
                    let _ = tx.send(Message::Error(reply)).await;
                    continue;
                }
                let token = CancellationToken::new();
                let duplicate = match pending.lock().expect("pending lock").entry(infer.id) {
                    Entry::Occupied(_) => true,
                    Entry::Vacant(slot) => {
                        slot.insert(token.clone());
                        false
                    }
                };
                if duplicate {
                    let reply = ErrorReply::new(
                        infer.id,
                        ErrorCode::BadRequest,
                        format!("id {} is already in flight on this connection", infer.id),
                    );
                    let _ = tx.send(Message::Error(reply)).await;
                    continue;
                }
                let now = shared.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                shared.stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
                let delay = Duration::from_micros(shared.delay_us.load(Ordering::Relaxed));
                let (tx, shared, pending) = (tx.clone(), Arc::clone(&shared), Arc::clone(&pending));
                tokio::spawn(async move {
                    let answer = tokio::select! {
                        () = token.cancelled() => {
                            shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                            Message::Error(ErrorReply::new(infer.id, ErrorCode::Cancelled, "cancelled by the client"))
                        }
                        () = sleep_unless_zero(delay) => {
                            pending.lock().expect("pending lock").remove(&infer.id);
                            shared.stats.completed.fetch_add(1, Ordering::Relaxed);
                            Message::Result(InferResult {
                                id: infer.id,
                                outputs: infer.inputs,
                                queue_us: Some(0),
                                infer_us: Some(delay.as_micros() as u64),
                                batch_size: Some(1),
                                worker: Some(shared.config.name.clone()),
                            })
                        }
                    };
                    shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                    let _ = tx.send(answer).await;
                });
            }
            other => {
                let reply = ErrorReply::new(
                    other.id(),
                    ErrorCode::BadRequest,
                    format!("a {} frame is not a request", other.kind()),
                );
                let _ = tx.send(Message::Error(reply)).await;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn sleep_unless_zero(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}
