//! A closed-loop, pipelined driver: each connection keeps `window` frames in flight and
//! writes a new one for every answer, on its own thread with blocking sockets, so that the
//! driver costs as little CPU per frame as it can and the system under test is saturated.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use rustls::{ClientConfig, ClientConnection};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tidepool_protocol::{Infer, Message, MessageCodec, Tensors};
use tokio_util::codec::Decoder;

/// One saturation run.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Where to send.
    pub addr: SocketAddr,
    /// Client connections, one thread each.
    pub connections: usize,
    /// Frames in flight per connection.
    pub window: usize,
    /// Time before counting starts.
    pub warmup: Duration,
    /// Time answers are counted for.
    pub measure: Duration,
    /// The item every request carries.
    pub item: Tensors,
    /// TLS towards `addr` (checked as the name `127.0.0.1`), else plain TCP.
    pub tls: Option<Arc<ClientConfig>>,
}

/// What a saturation run measured.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PipelineResult {
    /// Results counted in the measuring window.
    pub ok: u64,
    /// Error answers counted in the measuring window.
    pub errors: u64,
    /// Results per second.
    pub per_second: f64,
}

/// Runs the pipelined load and counts answers in the measuring window.
pub fn run(config: &PipelineConfig) -> anyhow::Result<PipelineResult> {
    let start = Instant::now();
    let counting = start + config.warmup;
    let end = counting + config.measure;
    let mut result = drive(config, counting, Stop { end, frames: None })?;
    result.per_second = result.ok as f64 / config.measure.as_secs_f64();
    Ok(result)
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
    let mut result = drive(config, start, stop)?;
    result.per_second = result.ok as f64 / start.elapsed().as_secs_f64();
    Ok(result)
}

/// When a connection stops: at `end`, or once it has had `frames` answers.
#[derive(Clone, Copy, Debug)]
struct Stop {
    end: Instant,
    frames: Option<u64>,
}

/// One thread per connection, each counting answers from `counting` until `stop`.
fn drive(config: &PipelineConfig, counting: Instant, stop: Stop) -> anyhow::Result<PipelineResult> {
    let handles: Vec<_> = (0..config.connections.max(1))
        .map(|_| {
            let stream = TcpStream::connect(config.addr)
                .with_context(|| format!("connecting to {}", config.addr))?;
            stream.set_nodelay(true)?;
            let (item, window) = (config.item.clone(), config.window.max(1));
            let tls = match &config.tls {
                None => None,
                Some(tls) => Some(ClientConnection::new(
                    Arc::clone(tls),
                    ServerName::IpAddress(config.addr.ip().into()),
                )?),
            };
            Ok(std::thread::spawn(move || match tls {
                None => one_connection(stream, &item, window, counting, stop),
                Some(tls) => one_connection(
                    rustls::StreamOwned::new(tls, stream),
                    &item,
                    window,
                    counting,
                    stop,
                ),
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut result = PipelineResult::default();
    for h in handles {
        let (ok, errors) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a connection thread panicked"))??;
        result.ok += ok;
        result.errors += errors;
    }
    Ok(result)
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

fn one_connection<S: Socket>(
    mut stream: S,
    item: &Tensors,
    window: usize,
    counting: Instant,
    stop: Stop,
) -> anyhow::Result<(u64, u64)> {
    stream
        .tcp()
        .set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut codec = MessageCodec::default();
    let mut out = BytesMut::with_capacity(1 << 16);
    let mut next_id = 1u64;
    // With a fixed number of frames, no more than that are ever sent.
    let total = stop.frames.unwrap_or(u64::MAX);
    let mut write_frames = |stream: &mut S, n: usize| -> anyhow::Result<()> {
        out.clear();
        let n = (n as u64).min(total.saturating_sub(next_id - 1));
        if n == 0 {
            return Ok(());
        }
        for _ in 0..n {
            let infer = Message::Infer(Infer {
                id: next_id,
                inputs: item.clone(),
                deadline_ms: None,
                client: None,
                ..Default::default()
            });
            next_id += 1;
            codec.encode_ref(&infer, &mut out)?;
        }
        stream.write_all(&out).context("writing requests")?;
        // TLS: the records leave the session's buffer here (TCP's flush does nothing).
        stream.flush().context("writing requests")
    };
    write_frames(&mut stream, window)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut answered = 0u64;
    let mut decoder = MessageCodec::default();
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let now = Instant::now();
        if now >= stop.end || answered >= total {
            break;
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => anyhow::bail!("the server closed the connection"),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("reading answers"),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut answers = 0;
        while let Some(frame) = decoder.decode(&mut buf)? {
            match frame {
                Ok(Message::Result(_)) => {
                    answers += 1;
                    if now >= counting {
                        ok += 1;
                    }
                }
                Ok(Message::Error(_)) => {
                    answers += 1;
                    if now >= counting {
                        errors += 1;
                    }
                }
                _ => {}
            }
        }
        answered += answers as u64;
        if answers > 0 {
            write_frames(&mut stream, answers)?;
        }
    }
    Ok((ok, errors))
}
