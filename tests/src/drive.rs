//! A load driver that counts answers per request id on the wire.
//!
//! The protocol [`Client`](tidepool_protocol::Client) drops a second answer to a call
//! that already has one, which is right for a client and wrong for a test of "exactly one
//! answer per request". This driver writes `infer` frames on raw connections at a steady
//! rate and records every frame that comes back, so a test can assert that each id got
//! one answer, and which. It speaks plain TCP or TLS ([`Drive::tls`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tidepool_protocol::tls::{Stream, TlsConnector};
use tidepool_protocol::{ErrorCode, Infer, Message, MessageCodec, Tensor, Tensors};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A result, from the named worker.
    Result {
        /// The `worker` field.
        worker: String,
    },
    /// An error with this code.
    Error(ErrorCode),
}

/// Every answer seen, per request id.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests written.
    pub sent: u64,
    /// The answers to each id, in arrival order.
    pub answers: HashMap<u64, Vec<Answer>>,
    /// The longest time from writing a request to its first answer (zero with none).
    pub slowest: Duration,
}

impl Tally {
    /// Asserts that every request sent got exactly one answer.
    pub fn assert_exactly_once(&self) {
        let unanswered = (1..=self.sent)
            .filter(|id| !self.answers.contains_key(id))
            .count();
        let twice: Vec<_> = self
            .answers
            .iter()
            .filter(|(_, a)| a.len() > 1)
            .map(|(id, a)| (*id, a.clone()))
            .take(5)
            .collect();
        assert_eq!(
            unanswered, 0,
            "{unanswered} of {} requests got no answer",
            self.sent
        );
        assert!(
            twice.is_empty(),
            "requests answered more than once: {twice:?}"
        );
        assert_eq!(
            self.answers.len() as u64,
            self.sent,
            "answers to ids never sent"
        );
    }

    /// Asserts that every request sent got exactly one answer, and that it was a result.
    pub fn assert_all_ok(&self) {
        self.assert_exactly_once();
        let outcomes = self.outcomes();
        assert_eq!(outcomes.get("ok"), Some(&self.sent), "{outcomes:?}");
    }

    /// How many requests ended each way: `"ok"` or the error code.
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for answer in self.answers.values().flatten() {
            let key = match answer {
                Answer::Result { .. } => "ok".to_owned(),
                Answer::Error(code) => code.to_string(),
            };
            *out.entry(key).or_default() += 1;
        }
        out
    }

    /// Results per worker name.
    pub fn per_worker(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for answer in self.answers.values().flatten() {
            if let Answer::Result { worker } = answer {
                *out.entry(worker.clone()).or_default() += 1;
            }
        }
        out
    }
}

/// What to send.
#[derive(Clone, Debug)]
pub struct Drive {
    /// Where.
    pub addr: SocketAddr,
    /// Requests per second, spread over the connections.
    pub rate: u32,
    /// Sending stops when this token is cancelled (or after `max_requests`).
    pub stop: CancellationToken,
    /// The most requests to send.
    pub max_requests: u64,
    /// Features of the single f32 input named `input`.
    pub input_dim: usize,
    /// Per-request deadline.
    pub deadline: Duration,
    /// How long to wait for the last answers after sending stops.
    pub settle: Duration,
    /// Speak TLS with this connector (the server's certificate checked against the
    /// connector's server name, else `addr`'s IP); plain TCP when `None`.
    pub tls: Option<TlsConnector>,
}

impl Drive {
    /// `rate` requests/s of one `input_dim`-wide f32 item to `addr` until `stop`, with a
    /// 20 s deadline and 20 s to settle.
    pub fn new(addr: SocketAddr, rate: u32, input_dim: usize, stop: CancellationToken) -> Drive {
        Drive {
            addr,
            rate,
            stop,
            max_requests: 100_000,
            input_dim,
            deadline: Duration::from_secs(20),
            settle: Duration::from_secs(20),
            tls: None,
        }
    }

    /// Runs [`drive`] on its own task.
    pub fn spawn(self) -> tokio::task::JoinHandle<Tally> {
        tokio::spawn(drive(self))
    }
}

/// Sends until stopped, then waits for the answers; every frame received is tallied.
pub async fn drive(spec: Drive) -> Tally {
    let tcp = TcpStream::connect(spec.addr)
        .await
        .expect("connect for drive");
    tcp.set_nodelay(true).expect("nodelay");
    let stream = match &spec.tls {
        None => Stream::Plain(tcp),
        Some(tls) => tls
            .connect(tcp, &spec.addr.ip().to_string())
            .await
            .expect("TLS handshake for drive"),
    };
    // The write half flushes on every send (FramedWrite), so TLS records never wait.
    let (read, write) = stream.into_split();
    let mut sink = FramedWrite::new(write, MessageCodec::default());
    let mut frames = FramedRead::new(read, MessageCodec::default());
    let inputs: Tensors = [(
        "input".to_owned(),
        Tensor::from_vec(vec![spec.input_dim], vec![0.25f32; spec.input_dim]).expect("tensor"),
    )]
    .into();

    // Set when sending stops; the reader then ends once every id has an answer, after a
    // short grace in which a second answer would still be caught.
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(u64::MAX);
    let reader = tokio::spawn(async move {
        let mut answers: HashMap<u64, Vec<Answer>> = HashMap::new();
        let mut arrived: HashMap<u64, tokio::time::Instant> = HashMap::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let total = *sent_rx.borrow();
            if grace.is_none() && answers.len() as u64 >= total {
                grace = Some(tokio::time::Instant::now() + Duration::from_millis(300));
            }
            let frame = tokio::select! {
                frame = frames.next() => frame,
                _ = sent_rx.changed(), if total == u64::MAX => continue,
                () = tokio::time::sleep_until(grace.unwrap_or_else(far_future)), if grace.is_some() => break,
            };
            let Some(Ok(Ok(msg))) = frame else { break };
            let (id, answer) = match msg {
                Message::Result(r) => (
                    r.id,
                    Answer::Result {
                        worker: r.worker.unwrap_or_default(),
                    },
                ),
                Message::Error(e) => (e.id, Answer::Error(e.code)),
                _ => continue,
            };
            arrived.entry(id).or_insert_with(tokio::time::Instant::now);
            answers.entry(id).or_default().push(answer);
        }
        (answers, arrived)
    });

    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(spec.rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    // When each request was written, by id - 1.
    let mut written = Vec::new();
    while sent < spec.max_requests {
        tokio::select! {
            () = spec.stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        sent += 1;
        let msg = Message::Infer(Infer {
            id: sent,
            inputs: inputs.clone(),
            deadline_ms: Some(spec.deadline.as_millis() as u64),
            client: None,
            ..Default::default()
        });
        if sink.send(msg).await.is_err() {
            sent -= 1;
            break;
        }
        written.push(tokio::time::Instant::now());
    }
    let _ = sent_tx.send(sent);
    // Wait for the answers: until every id has one, or the settle time passes.
    let deadline = tokio::time::Instant::now() + spec.settle;
    let mut reader = reader;
    let (answers, arrived) = tokio::select! {
        done = &mut reader => done.unwrap_or_default(),
        () = tokio::time::sleep_until(deadline) => {
            // Closing our half lets a server that answered everything close too.
            let _ = sink.close().await;
            tokio::time::timeout(Duration::from_secs(5), &mut reader)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        }
    };
    let slowest = arrived
        .iter()
        .filter_map(|(id, at)| {
            let index = usize::try_from(id.checked_sub(1)?).ok()?;
            Some(at.saturating_duration_since(*written.get(index)?))
        })
        .max()
        .unwrap_or_default();
    Tally {
        sent,
        answers,
        slowest,
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}
