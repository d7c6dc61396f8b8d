//! An open-loop driver on plain threads and blocking sockets.
//!
//! The send times are drawn before the run (Poisson arrivals at a constant rate, from
//! `tidepool_load`'s schedule). One thread sleeps to each send time and writes the frame on
//! the next connection in turn, never waiting for answers; one thread per connection reads
//! answers. A request's latency runs from its *intended* send time to the moment its answer
//! is decoded, so a send that leaves late counts against the system under test (no
//! coordinated omission).
//!
//! Why not `tidepool_load::run`: it sends on tokio's timer, whose millisecond resolution is
//! fine for a model but swamps the tens of microseconds a balancer adds. Here sends wake on
//! `thread::sleep` (a high-resolution timer, with the kernel's usual ~50 µs of slack), and
//! that slack is the same for every contender measured side by side.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use tidepool_load::{Arrivals, RateProfile, Schedule};
use tidepool_protocol::{Infer, Message, MessageCodec, Tensors};
use tokio_util::codec::Decoder;

use crate::stats::{histogram, record};

/// One open-loop run.
#[derive(Clone, Debug)]
pub struct OpenLoopConfig {
    /// Where to send.
    pub addr: SocketAddr,
    /// Persistent client connections; requests take them in turn.
    pub connections: usize,
    /// Requests per second, Poisson arrivals.
    pub rate: f64,
    /// How long to send for.
    pub duration: Duration,
    /// How long answers may still come after the last send.
    pub drain: Duration,
    /// Seed of the arrival times.
    pub seed: u64,
    /// The item every request carries.
    pub item: Tensors,
}

/// What an open-loop run measured.
#[derive(Debug)]
pub struct OpenLoopResult {
    /// Requests sent.
    pub sent: u64,
    /// Answered with a result.
    pub ok: u64,
    /// Answered with an error.
    pub errors: u64,
    /// Not answered by the end of the drain.
    pub unanswered: u64,
    /// Latency of results, ns, from the intended send time.
    pub latency: Histogram<u64>,
    /// `latency` plus every unanswered request counted at the end of the drain: a lower
    /// bound of what those requests would have taken.
    pub latency_with_unanswered: Histogram<u64>,
    /// How late sends left after their intended time, ns.
    pub send_lag: Histogram<u64>,
    /// Results by the `worker` that returned them.
    pub workers: BTreeMap<String, u64>,
}

/// What one reader thread saw.
struct ReaderTally {
    ok: u64,
    errors: u64,
    latency: Histogram<u64>,
    answered: Vec<bool>,
    workers: BTreeMap<String, u64>,
}

/// Runs the schedule against `config.addr` and waits for the answers (or the drain's end).
pub fn run(config: &OpenLoopConfig) -> anyhow::Result<OpenLoopResult> {
    let schedule: Arc<Vec<Duration>> = Arc::new(
        Schedule::new(
            RateProfile::Constant { rate: config.rate },
            config.duration,
            Arrivals::Poisson,
            config.seed,
        )
        .collect(),
    );
    let mut writers = Vec::with_capacity(config.connections);
    let mut readers = Vec::with_capacity(config.connections);
    for _ in 0..config.connections.max(1) {
        let stream = TcpStream::connect(config.addr)
            .with_context(|| format!("connecting to {}", config.addr))?;
        stream.set_nodelay(true)?;
        readers.push(stream.try_clone()?);
        writers.push(stream);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + config.duration + config.drain;
    let sent: Arc<Vec<AtomicU64>> = Arc::new(writers.iter().map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));

    let handles: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(c, stream)| {
            let (schedule, sent, done) =
                (Arc::clone(&schedule), Arc::clone(&sent), Arc::clone(&done));
            std::thread::spawn(move || read_answers(stream, &schedule, start, end, &sent[c], &done))
        })
        .collect();

    let mut codec = MessageCodec::default();
    let mut buf = BytesMut::with_capacity(4096);
    let mut send_lag = histogram();
    let mut send_error = None;
    for (i, offset) in schedule.iter().enumerate() {
        let due = start + *offset;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        record(
            &mut send_lag,
            Instant::now().saturating_duration_since(due).as_nanos() as u64,
        );
        let c = i % writers.len();
        buf.clear();
        let infer = Message::Infer(Infer {
            id: i as u64 + 1,
            inputs: config.item.clone(),
            deadline_ms: None,
            client: None,
            ..Default::default()
        });
        codec.encode_ref(&infer, &mut buf)?;
        if let Err(e) = writers[c].write_all(&buf) {
            send_error = Some(e);
            break;
        }
        sent[c].fetch_add(1, Ordering::Release);
    }
    done.store(true, Ordering::Release);

    let mut result = OpenLoopResult {
        sent: sent.iter().map(|s| s.load(Ordering::Acquire)).sum(),
        ok: 0,
        errors: 0,
        unanswered: 0,
        latency: histogram(),
        latency_with_unanswered: histogram(),
        send_lag,
        workers: BTreeMap::new(),
    };
    let mut answered = vec![false; schedule.len()];
    for h in handles {
        let tally = h
            .join()
            .map_err(|_| anyhow::anyhow!("a reader thread panicked"))??;
        result.ok += tally.ok;
        result.errors += tally.errors;
        result.latency.add(&tally.latency)?;
        for (w, n) in tally.workers {
            *result.workers.entry(w).or_default() += n;
        }
        for (a, t) in answered.iter_mut().zip(tally.answered) {
            *a |= t;
        }
    }
    if let Some(e) = send_error {
        return Err(e).context("writing a request");
    }
    result.latency_with_unanswered.add(&result.latency)?;
    for (i, offset) in schedule.iter().enumerate() {
        let was_sent = (i as u64) < result.sent;
        if was_sent && !answered[i] {
            result.unanswered += 1;
            let waited = end.saturating_duration_since(start + *offset);
            record(
                &mut result.latency_with_unanswered,
                waited.as_nanos() as u64,
            );
        }
    }
    Ok(result)
}

/// Reads answers on one connection until every request sent on it is answered (after the
/// sender is done) or `end` passes.
fn read_answers(
    mut stream: TcpStream,
    schedule: &[Duration],
    start: Instant,
    end: Instant,
    sent: &AtomicU64,
    done: &AtomicBool,
) -> anyhow::Result<ReaderTally> {
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut tally = ReaderTally {
        ok: 0,
        errors: 0,
        latency: histogram(),
        answered: vec![false; schedule.len()],
        workers: BTreeMap::new(),
    };
    let mut codec = MessageCodec::default();
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let answered = tally.ok + tally.errors;
        if done.load(Ordering::Acquire) && answered >= sent.load(Ordering::Acquire) {
            break;
        }
        if Instant::now() >= end {
            break;
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("reading answers"),
        };
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        while let Some(frame) = codec.decode(&mut buf)? {
            let (id, ok) = match frame {
                Ok(Message::Result(r)) => {
                    let worker = r.worker.unwrap_or_default();
                    match tally.workers.get_mut(&worker) {
                        Some(n) => *n += 1,
                        None => {
                            tally.workers.insert(worker, 1);
                        }
                    }
                    (r.id, true)
                }
                Ok(Message::Error(e)) => (e.id, false),
                _ => continue,
            };
            let Some(index) = usize::try_from(id).ok().and_then(|id| id.checked_sub(1)) else {
                continue;
            };
            let Some(offset) = schedule.get(index) else {
                continue;
            };
            tally.answered[index] = true;
            if ok {
                tally.ok += 1;
                let latency = now.saturating_duration_since(start + *offset);
                record(&mut tally.latency, latency.as_nanos() as u64);
            } else {
                tally.errors += 1;
            }
        }
    }
    Ok(tally)
}
