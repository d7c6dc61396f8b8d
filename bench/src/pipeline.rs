//! A closed-loop, pipelined driver: each connection keeps `window` frames in flight and
//! writes a new one for every answer, on its own thread with blocking sockets, so that the
//! driver costs as little CPU per frame as it can and the system under test is saturated.
//!
//! The driver is measurement, not product, and on a small machine it shares the cores with
//! what it measures, so every frame is as cheap as it can honestly be:
//! - each distinct item is encoded once; a request is that frame with its `id` spliced in
//!   ([`RawMessage::write_frame`]), never a fresh encoding of its tensors;
//! - an answer is read with the raw scanner ([`decode_body`]): its type, id and
//!   `batch_size`, with no tensor decoded (an error answer, rare, is decoded in full).
//!
//! Cheap does not mean trusting: every answer must carry the id of a request in flight on
//! its connection, and each id is answered once. Ids are slots: `generation << 16 | slot`
//! with one slot per frame in flight, so the check is an index and a compare, no hash, and
//! an answer with an unknown, stale or repeated id stops the run with an error.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use rustls::{ClientConfig, ClientConnection};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tidepool_protocol::raw::decode_body;
use tidepool_protocol::{
    encode_frame, Frame, FrameCodec, Infer, Message, RawKind, RawMessage, RequestId, Rewrite,
    Tensors, DEFAULT_MAX_FRAME,
};
use tokio_util::codec::Decoder;

use crate::stats::{histogram, record, Latency};

/// One saturation run.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Where to send.
    pub addr: SocketAddr,
    /// Client connections, one thread each.
    pub connections: usize,
    /// Frames in flight per connection (at most [`MAX_WINDOW`]).
    pub window: usize,
    /// Time before counting starts.
    pub warmup: Duration,
    /// Time answers are counted for.
    pub measure: Duration,
    /// The items requests carry, in turn (at least one).
    pub items: Vec<Tensors>,
    /// TLS towards `addr` (checked as the name `127.0.0.1`), else plain TCP.
    pub tls: Option<Arc<ClientConfig>>,
}

/// Most frames in flight on one connection: a slot's index fits the low 16 bits of an id.
pub const MAX_WINDOW: usize = 1 << SLOT_BITS;

const SLOT_BITS: u32 = 16;

/// What a saturation run measured.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PipelineResult {
    /// Results counted in the measuring window.
    pub ok: u64,
    /// Error answers counted in the measuring window.
    pub errors: u64,
    /// Results per second.
    pub per_second: f64,
    /// The mean `batch_size` the counted results report (1 where they report none).
    pub mean_batch: f64,
    /// Latency of the counted results, from the read whose answers made room for each
    /// request (it was written right after) to the read that brought its answer.
    pub latency: Latency,
}

/// Runs the pipelined load and counts answers in the measuring window.
pub fn run(config: &PipelineConfig) -> anyhow::Result<PipelineResult> {
    let (result, (), ()) = run_probed(config, || ())?;
    Ok(result)
}

/// [`run`], calling `probe` as the measuring window opens and as it closes (for CPU samples
/// taken over exactly the window), and returning both probes.
pub fn run_probed<P>(
    config: &PipelineConfig,
    mut probe: impl FnMut() -> P,
) -> anyhow::Result<(PipelineResult, P, P)> {
    let start = Instant::now();
    let counting = start + config.warmup;
    let end = counting + config.measure;
    let (mut result, probes) = drive(config, counting, Stop { end, frames: None }, || {
        std::thread::sleep(counting.saturating_duration_since(Instant::now()));
        let opened = probe();
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        (opened, probe())
    })?;
    result.per_second = result.ok as f64 / config.measure.as_secs_f64();
    Ok((result, probes.0, probes.1))
}

/// Runs the pipelined load until each connection has had `frames` answers (or `limit` has
/// passed), counting every answer: a fixed workload, for instruction and syscall counts
/// per frame (`scripts/profile-balancer.sh`). `warmup` and `measure` are not used.
pub fn run_frames(
    config: &PipelineConfig,
    frames: u64,
    limit: Duration,
) -> anyhow::Result<PipelineResult> {
    let start = Instant::now();
    let stop = Stop {
        end: start + limit,
        frames: Some(frames),
    };
    let (mut result, ()) = drive(config, start, stop, || ())?;
    result.per_second = result.ok as f64 / start.elapsed().as_secs_f64();
    Ok(result)
}

/// When a connection stops: at `end`, or once it has had `frames` answers.
#[derive(Clone, Copy, Debug)]
struct Stop {
    end: Instant,
    frames: Option<u64>,
}

/// What one connection counted.
struct Counted {
    ok: u64,
    errors: u64,
    batch_sum: u64,
    latency: Histogram<u64>,
}

/// One thread per connection, each counting answers from `counting` until `stop`; `meanwhile`
/// runs on this thread while they do.
fn drive<T>(
    config: &PipelineConfig,
    counting: Instant,
    stop: Stop,
    meanwhile: impl FnOnce() -> T,
) -> anyhow::Result<(PipelineResult, T)> {
    anyhow::ensure!(
        (1..=MAX_WINDOW).contains(&config.window),
        "--window must be 1 to {MAX_WINDOW}, not {}",
        config.window
    );
    let frames = Arc::new(templates(&config.items)?);
    let handles: Vec<_> = (0..config.connections.max(1))
        .map(|_| {
            let stream = TcpStream::connect(config.addr)
                .with_context(|| format!("connecting to {}", config.addr))?;
            stream.set_nodelay(true)?;
            let tls = match &config.tls {
                None => None,
                Some(tls) => Some(ClientConnection::new(
                    Arc::clone(tls),
                    ServerName::IpAddress(config.addr.ip().into()),
                )?),
            };
            let load = Load {
                frames: Arc::clone(&frames),
                window: config.window,
                counting,
                stop,
            };
            Ok(std::thread::spawn(move || match tls {
                None => one_connection(stream, &load),
                Some(tls) => one_connection(rustls::StreamOwned::new(tls, stream), &load),
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let during = meanwhile();
    let (mut ok, mut errors, mut batch_sum) = (0, 0, 0);
    let mut latency = histogram();
    for h in handles {
        let counted = h
            .join()
            .map_err(|_| anyhow::anyhow!("a connection thread panicked"))??;
        ok += counted.ok;
        errors += counted.errors;
        batch_sum += counted.batch_sum;
        latency
            .add(&counted.latency)
            .map_err(|e| anyhow::anyhow!("merging latency histograms: {e:?}"))?;
    }
    let result = PipelineResult {
        ok,
        errors,
        per_second: 0.0,
        mean_batch: batch_sum as f64 / ok.max(1) as f64,
        latency: Latency::of(&latency),
    };
    Ok((result, during))
}

/// Each item encoded once as an `infer`, scanned for splicing in each request's id.
fn templates(items: &[Tensors]) -> anyhow::Result<Vec<RawMessage>> {
    anyhow::ensure!(!items.is_empty(), "no items to send");
    items
        .iter()
        .map(|item| {
            let frame = encode_frame(&Message::Infer(Infer {
                id: 1,
                inputs: item.clone(),
                ..Default::default()
            }))?;
            let body = Bytes::from(frame).slice(4..);
            RawMessage::scan(body).context("an item the raw scanner does not accept")
        })
        .collect()
}

/// What each connection sends, and when it counts and stops.
struct Load {
    frames: Arc<Vec<RawMessage>>,
    window: usize,
    counting: Instant,
    stop: Stop,
}

/// A connection the driver can time out reads on: plain TCP, or TLS over it.
trait Socket: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for rustls::StreamOwned<ClientConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref()
    }
}

/// The requests in flight on one connection, one slot each: the id a slot's request
/// carries (0: free) and when it was written.
struct Slots {
    ids: Vec<RequestId>,
    sent: Vec<Instant>,
    free: Vec<usize>,
    generation: u64,
}

impl Slots {
    fn new(window: usize, now: Instant) -> Slots {
        Slots {
            ids: vec![0; window],
            sent: vec![now; window],
            // Popped from the end: slot 0 first.
            free: (0..window).rev().collect(),
            generation: 0,
        }
    }

    /// A fresh id in a free slot, sent at `now`; `None` when every slot is in flight.
    fn take(&mut self, now: Instant) -> Option<RequestId> {
        let slot = self.free.pop()?;
        // Generations start at 1, so no id is 0 (the protocol's connection-level id).
        self.generation += 1;
        let id = (self.generation << SLOT_BITS) | slot as u64;
        self.ids[slot] = id;
        self.sent[slot] = now;
        Some(id)
    }

    /// Frees the slot of `id` and gives when it was sent; an error when `id` is not in
    /// flight here (never sent, or answered already).
    fn answer(&mut self, id: RequestId) -> anyhow::Result<Instant> {
        let slot = (id & ((1 << SLOT_BITS) - 1)) as usize;
        match self.ids.get_mut(slot) {
            Some(held) if *held == id && id != 0 => {
                *held = 0;
                self.free.push(slot);
                Ok(self.sent[slot])
            }
            _ => anyhow::bail!("an answer with id {id}, which is not in flight on its connection (never sent, or answered before)"),
        }
    }
}

fn one_connection<S: Socket>(mut stream: S, load: &Load) -> anyhow::Result<Counted> {
    let Load {
        frames,
        window,
        counting,
        stop,
    } = load;
    stream
        .tcp()
        .set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut slots = Slots::new(*window, Instant::now());
    let mut out = BytesMut::with_capacity(1 << 16);
    let mut next_item = 0usize;
    // With a fixed number of frames, no more than that are ever sent.
    let total = stop.frames.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    // `now` is the clock read after the read that brought the answers these requests
    // replace: one clock read per read, none per write.
    let mut write_frames =
        |stream: &mut S, slots: &mut Slots, now: Instant| -> anyhow::Result<()> {
            out.clear();
            while sent < total {
                let Some(id) = slots.take(now) else { break };
                let rewrite = Rewrite {
                    id,
                    ..Rewrite::default()
                };
                frames[next_item].write_frame(&rewrite, &mut out, DEFAULT_MAX_FRAME)?;
                next_item = (next_item + 1) % frames.len();
                sent += 1;
            }
            if out.is_empty() {
                return Ok(());
            }
            stream.write_all(&out).context("writing requests")?;
            // TLS: the records leave the session's buffer here (TCP's flush does nothing).
            stream.flush().context("writing requests")
        };
    let mut now = Instant::now();
    write_frames(&mut stream, &mut slots, now)?;
    let mut counted = Counted {
        ok: 0,
        errors: 0,
        batch_sum: 0,
        latency: histogram(),
    };
    let mut answered = 0u64;
    let mut framing = FrameCodec::default();
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        if now >= stop.end || answered >= total {
            break;
        }
        let read = stream.read(&mut chunk);
        now = Instant::now();
        let n = match read {
            Ok(0) => anyhow::bail!("the server closed the connection"),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("reading answers"),
        };
        buf.extend_from_slice(&chunk[..n]);
        let count = now >= *counting;
        let mut answers = 0;
        while let Some(body) = framing.decode(&mut buf)? {
            answers += 1;
            let (id, batch) = match decode_body(body).context("an answer that does not decode")? {
                Frame::Raw(raw) if raw.kind() == RawKind::Result => {
                    (raw.id(), Some(raw.batch_size().unwrap_or(1)))
                }
                Frame::Message(Message::Error(e)) if e.id != tidepool_protocol::CONNECTION_ID => {
                    (e.id, None)
                }
                Frame::Message(Message::Error(e)) => {
                    anyhow::bail!("the server refused the connection: {}", e.message)
                }
                other => {
                    anyhow::bail!("an answer that is neither a result nor an error: {other:?}")
                }
            };
            let sent_at = slots.answer(id)?;
            if !count {
                continue;
            }
            match batch {
                Some(batch) => {
                    counted.ok += 1;
                    counted.batch_sum += u64::from(batch);
                    let ns =
                        u64::try_from(now.duration_since(sent_at).as_nanos()).unwrap_or(u64::MAX);
                    record(&mut counted.latency, ns);
                }
                None => counted.errors += 1,
            }
        }
        answered += answers;
        if answers > 0 {
            write_frames(&mut stream, &mut slots, now)?;
        }
    }
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_id_is_answered_once_and_slots_come_back() {
        let now = Instant::now();
        let mut slots = Slots::new(2, now);
        let (a, b) = (slots.take(now).unwrap(), slots.take(now).unwrap());
        assert_ne!(a, b);
        assert!(a != 0 && b != 0);
        assert!(slots.take(now).is_none(), "two slots, two in flight");
        slots.answer(b).unwrap();
        assert!(slots.answer(b).is_err(), "a second answer to one id");
        let c = slots.take(now).unwrap();
        assert_ne!(c, b, "a reused slot gets a fresh id");
        assert!(
            slots.answer(b).is_err(),
            "an answer for the slot's previous request"
        );
        assert!(slots.answer(12345).is_err(), "an id never sent");
        assert!(slots.answer(0).is_err());
        slots.answer(a).unwrap();
        slots.answer(c).unwrap();
    }
}
