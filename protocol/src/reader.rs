//! [`FrameReader`]: frames read from a socket within a [`FrameBudget`] and a frame timeout.
//!
//! The tokio-util codecs ([`FrameCodec`](crate::FrameCodec)) reserve room for a frame as soon
//! as its length prefix arrives, and wait as long as it takes for the rest. A receiver exposed
//! to clients it does not trust reads with this instead:
//! 1. the 4-byte prefix, checked as the codecs check it (zero, above `max_frame`);
//! 2. the frame's whole length taken from the connection's [`ConnectionBudget`]: while it does
//!    not fit, nothing more is read from this connection (TCP backpressure), and nothing is
//!    allocated;
//! 3. the body, read into a buffer of exactly its length, which becomes [`Bytes`] that hold
//!    the budget's bytes until the last slice of them is dropped.
//!
//! A frame whose first byte has arrived must be complete within the frame timeout; the time
//! spent waiting for the budget does not count, since that wait is the receiver's doing.
//!
//! A frame already whole in the read-ahead, the common case for small pipelined frames, is
//! taken from it in one step: it cannot wait, so it needs no clock and no timer, and the
//! budget is taken at once when it fits (else the frame goes the long way, and waits).
//!
//! [`FrameReader::next_frame`] is cancel safe: whatever it has read is kept in the reader, so
//! it can sit in a `select!` beside a connection's other work.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::time::Instant;

use crate::budget::{ConnectionBudget, FramePermit};
use crate::error::Error;

const PREFIX: usize = 4;

/// Bytes read ahead of the current frame: what one connection reads that the budget does not
/// count (a socket buffer's worth), so that small frames do not cost a system call each.
const READ_AHEAD: usize = 8 * 1024;

/// Reads length-prefixed frames within a byte budget and a frame timeout.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: BufReader<R>,
    max_frame: usize,
    frame_timeout: Option<Duration>,
    budget: ConnectionBudget,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Between frames.
    Idle,
    /// Part of the prefix has arrived.
    Prefix {
        buf: [u8; PREFIX],
        got: usize,
        deadline: Option<Instant>,
    },
    /// The prefix is read; waiting for the budget to admit `len` bytes.
    Budget {
        len: usize,
        deadline: Option<Instant>,
        since: Instant,
    },
    /// Reading the body into its buffer.
    Body {
        data: Vec<u8>,
        len: usize,
        permit: FramePermit,
        deadline: Option<Instant>,
    },
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames up to `max_frame` bytes (prefix excluded) from `io`, within
    /// `budget`, without a frame timeout.
    pub fn new(io: R, max_frame: usize, budget: ConnectionBudget) -> Self {
        Self::with_read_ahead(io, max_frame, budget, READ_AHEAD)
    }

    /// [`FrameReader::new`] reading up to `read_ahead` bytes ahead of the current frame
    /// (8 KiB for `new`). A receiver whose few connections each carry many frames of a few
    /// KiB at once (a worker behind a balancer) takes a burst of them per system call with
    /// more; each connection holds its read-ahead outside the budget.
    pub fn with_read_ahead(
        io: R,
        max_frame: usize,
        budget: ConnectionBudget,
        read_ahead: usize,
    ) -> Self {
        FrameReader {
            io: BufReader::with_capacity(read_ahead.max(PREFIX), io),
            max_frame,
            frame_timeout: None,
            budget,
            state: State::Idle,
        }
    }

    /// Sets the frame timeout: a frame whose first byte arrived must be complete this long
    /// later, not counting the time spent waiting for the budget.
    pub fn frame_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.frame_timeout = timeout;
        self
    }

    /// True when part of a frame has been read (or its prefix is waiting for the budget).
    pub fn in_frame(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// Bytes already read from the socket and not yet taken as frames: zero once a read
    /// burst has been taken whole (the next frame needs another read).
    pub fn buffered(&self) -> usize {
        self.io.buffer().len()
    }

    /// True while the next frame waits for the budget, the connection not being read.
    pub fn waiting_for_budget(&self) -> bool {
        matches!(self.state, State::Budget { .. })
    }

    /// The next frame's body when it is already buffered whole between frames and the
    /// budget admits it now: what [`next_frame`](FrameReader::next_frame) would return at
    /// once, without a read, a wait or a future. `None` when the frame must be read the long
    /// way: incomplete, the budget full, or a framing error (which `next_frame` reports).
    /// A connection's reader takes a read burst's frames this way, and pays for its `select!`
    /// (the wake-up registrations of its other branches) once per burst, not per frame.
    pub fn buffered_frame(&mut self) -> Option<Bytes> {
        if !matches!(self.state, State::Idle) {
            return None;
        }
        let frame = whole(self.io.buffer(), self.max_frame, &self.budget).ok()??;
        self.io.consume(PREFIX + frame.len());
        Some(frame)
    }

    /// The next frame's body (without its prefix), holding its bytes in the budget until
    /// dropped; `None` at a clean end of stream. Errors are framing errors: the stream cannot
    /// go on after one.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>, Error> {
        let FrameReader {
            io,
            max_frame,
            frame_timeout,
            budget,
            state,
        } = self;
        loop {
            match state {
                State::Idle => {
                    let buffered = io.fill_buf().await?;
                    if buffered.is_empty() {
                        return Ok(None);
                    }
                    if let Some(frame) = whole(buffered, *max_frame, budget)? {
                        io.consume(PREFIX + frame.len());
                        return Ok(Some(frame));
                    }
                    let mut buf = [0u8; PREFIX];
                    let got = buffered.len().min(PREFIX);
                    buf[..got].copy_from_slice(&buffered[..got]);
                    io.consume(got);
                    let deadline = frame_timeout.map(|t| Instant::now() + t);
                    *state = State::Prefix { buf, got, deadline };
                }
                State::Prefix { buf, got, deadline } if *got < PREFIX => {
                    let read = within(*deadline, io.read(&mut buf[*got..])).await;
                    match read {
                        None => return Err(timed_out(*frame_timeout, *got, PREFIX)),
                        Some(0) => {
                            return Err(Error::Truncated {
                                expected: PREFIX,
                                got: *got,
                            })
                        }
                        Some(n) => *got += n,
                    }
                }
                State::Prefix { buf, deadline, .. } => {
                    let len = checked_len(*buf, *max_frame, budget)?;
                    *state = State::Budget {
                        len,
                        deadline: *deadline,
                        since: Instant::now(),
                    };
                }
                State::Budget {
                    len,
                    deadline,
                    since,
                } => {
                    let permit = match budget.try_acquire(*len) {
                        Some(permit) => permit,
                        None => budget.acquire(*len).await,
                    };
                    let waited = since.elapsed();
                    *state = State::Body {
                        data: Vec::with_capacity(*len),
                        len: *len,
                        permit,
                        deadline: deadline.map(|d| d + waited),
                    };
                }
                State::Body {
                    data,
                    len,
                    deadline,
                    ..
                } if data.len() < *len => {
                    let left = (*len - data.len()) as u64;
                    // `take` so that the body never reads into the next frame's bytes.
                    let read = within(*deadline, (&mut *io).take(left).read_buf(data)).await;
                    match read {
                        None => {
                            return Err(timed_out(
                                *frame_timeout,
                                PREFIX + data.len(),
                                PREFIX + *len,
                            ))
                        }
                        Some(0) => {
                            return Err(Error::Truncated {
                                expected: PREFIX + *len,
                                got: PREFIX + data.len(),
                            })
                        }
                        Some(_) => {}
                    }
                }
                State::Body { .. } => {
                    let State::Body { data, permit, .. } = std::mem::replace(state, State::Idle)
                    else {
                        unreachable!("matched just above")
                    };
                    return Ok(Some(permit.into_bytes(data)));
                }
            }
        }
    }
}

/// The length a frame's prefix announces, refused when zero or above what `budget` and
/// `max_frame` admit: before reading (or reserving room for) the body.
fn checked_len(
    prefix: [u8; PREFIX],
    max_frame: usize,
    budget: &ConnectionBudget,
) -> Result<usize, Error> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(Error::EmptyFrame);
    }
    let max = max_frame.min(budget.largest_frame());
    if len > max {
        return Err(crate::codec::oversized(prefix, max));
    }
    Ok(len)
}

/// The frame at the start of `buffered` when it is there whole and the budget admits it
/// now; its body is copied out, and the caller consumes its prefix and body. `None` when
/// it must be read the long way (prefix or body incomplete, or the budget full).
fn whole(
    buffered: &[u8],
    max_frame: usize,
    budget: &ConnectionBudget,
) -> Result<Option<Bytes>, Error> {
    let Some(prefix) = buffered.first_chunk::<PREFIX>() else {
        return Ok(None);
    };
    let len = checked_len(*prefix, max_frame, budget)?;
    let Some(body) = buffered.get(PREFIX..PREFIX + len) else {
        return Ok(None);
    };
    Ok(budget
        .try_acquire(len)
        .map(|permit| permit.into_bytes(body.to_vec())))
}

/// `read` before `deadline` (any time without one); `None` when the deadline passed. An I/O
/// error reads as 0 bytes: the stream is over either way, and the caller says it is truncated.
async fn within<F>(deadline: Option<Instant>, read: F) -> Option<usize>
where
    F: std::future::Future<Output = std::io::Result<usize>>,
{
    let read = async { read.await.unwrap_or(0) };
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, read).await.ok(),
        None => Some(read.await),
    }
}

fn timed_out(timeout: Option<Duration>, got: usize, expected: usize) -> Error {
    Error::FrameTimeout {
        timeout: timeout.unwrap_or_default(),
        got,
        expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::FrameBudget;
    use crate::codec::encode_frame;
    use crate::message::Message;
    use tokio::io::AsyncWriteExt;

    fn reader(
        io: tokio::io::DuplexStream,
        budget: &FrameBudget,
    ) -> FrameReader<tokio::io::DuplexStream> {
        FrameReader::new(io, 1 << 20, budget.connection())
            .frame_timeout(Some(Duration::from_secs(10)))
    }

    #[tokio::test]
    async fn frames_come_whole_and_hold_their_bytes_until_dropped() {
        let budget = FrameBudget::new(1 << 20, 1 << 20);
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut frames = reader(rx, &budget);
        let ping = encode_frame(&Message::Ping { id: 5 }).unwrap();
        let mut wire = ping.clone();
        wire.extend_from_slice(&ping);
        tokio::spawn(async move {
            tx.write_all(&wire).await.unwrap();
        });
        let first = frames.next_frame().await.unwrap().unwrap();
        assert_eq!(Message::decode(&first).unwrap(), Message::Ping { id: 5 });
        assert_eq!(budget.held(), ping.len() - PREFIX);
        let second = frames.next_frame().await.unwrap().unwrap();
        assert_eq!(first, second);
        drop((first, second));
        assert_eq!(budget.held(), 0);
        assert!(frames.next_frame().await.unwrap().is_none(), "clean end");
    }

    #[tokio::test]
    async fn buffered_frames_come_without_a_read_and_only_when_whole_and_admitted() {
        let budget = FrameBudget::new(1 << 20, 1 << 20);
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut frames = reader(rx, &budget);
        assert!(frames.buffered_frame().is_none(), "nothing read yet");
        let ping = |id| encode_frame(&Message::Ping { id }).unwrap();
        let mut wire = ping(1);
        wire.extend_from_slice(&ping(2));
        wire.extend_from_slice(&ping(3)[..3]);
        tx.write_all(&wire).await.unwrap();
        // One read takes all three; the second frame is then buffered whole, the third not.
        let first = frames.next_frame().await.unwrap().unwrap();
        assert_eq!(Message::decode(&first).unwrap(), Message::Ping { id: 1 });
        let second = frames.buffered_frame().expect("buffered whole");
        assert_eq!(Message::decode(&second).unwrap(), Message::Ping { id: 2 });
        assert_eq!(
            budget.held(),
            first.len() + second.len(),
            "held like any frame"
        );
        assert!(frames.buffered_frame().is_none(), "the third is cut");
        tx.write_all(&ping(3)[3..]).await.unwrap();
        let third = frames.next_frame().await.unwrap().unwrap();
        assert_eq!(Message::decode(&third).unwrap(), Message::Ping { id: 3 });

        // A frame the budget does not admit now, or a bad prefix, is left to `next_frame`.
        let body = ping(4).len() - PREFIX;
        let one = FrameBudget::new(1 << 20, body);
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut frames = FrameReader::new(rx, 1 << 20, one.connection());
        let mut wire = ping(4);
        wire.extend_from_slice(&ping(5));
        wire.extend_from_slice(&0u32.to_be_bytes());
        tx.write_all(&wire).await.unwrap();
        drop(tx);
        let fourth = frames.next_frame().await.unwrap().unwrap();
        assert_eq!(Message::decode(&fourth).unwrap(), Message::Ping { id: 4 });
        assert!(
            frames.buffered_frame().is_none(),
            "the connection's ceiling is full"
        );
        drop(fourth);
        let fifth = frames
            .buffered_frame()
            .expect("admitted once the fourth is gone");
        assert_eq!(Message::decode(&fifth).unwrap(), Message::Ping { id: 5 });
        drop(fifth);
        assert!(
            frames.buffered_frame().is_none(),
            "an empty frame is an error"
        );
        assert!(matches!(frames.next_frame().await, Err(Error::EmptyFrame)));
    }

    #[tokio::test]
    async fn a_larger_read_ahead_takes_a_burst_of_larger_frames_in_one_read() {
        let budget = FrameBudget::new(1 << 20, 1 << 20);
        let infer = |id| {
            encode_frame(&Message::Infer(crate::message::Infer {
                id,
                inputs: [(
                    "x".to_string(),
                    crate::tensor::Tensor::from_vec(vec![1024], vec![0.5f32; 1024]).unwrap(),
                )]
                .into(),
                ..Default::default()
            }))
            .unwrap()
        };
        let wire: Vec<u8> = (0..8).flat_map(infer).collect();
        assert!(wire.len() > READ_AHEAD, "more than the default read-ahead");
        for (read_ahead, whole) in [(READ_AHEAD, 1), (64 * 1024, 8)] {
            let (mut tx, rx) = tokio::io::duplex(1 << 17);
            tx.write_all(&wire).await.unwrap();
            let mut frames =
                FrameReader::with_read_ahead(rx, 1 << 20, budget.connection(), read_ahead);
            frames.next_frame().await.unwrap().unwrap();
            let mut got = 1;
            while frames.buffered_frame().is_some() {
                got += 1;
            }
            assert_eq!(
                got, whole,
                "frames of one read with {read_ahead} bytes read ahead"
            );
        }
    }

    #[tokio::test]
    async fn framing_errors_are_refused_before_the_body() {
        let budget = FrameBudget::new(2 << 20, 2 << 20);
        for (prefix, want_empty) in [(0u32, true), ((1 << 20) + 1, false)] {
            let (mut tx, rx) = tokio::io::duplex(64);
            tx.write_all(&prefix.to_be_bytes()).await.unwrap();
            let err = reader(rx, &budget).next_frame().await.unwrap_err();
            assert!(err.is_fatal());
            match err {
                Error::EmptyFrame => assert!(want_empty),
                Error::FrameTooLarge { len, max } => {
                    assert_eq!((len, max), ((1 << 20) + 1, 1 << 20))
                }
                other => panic!("{other:?}"),
            }
        }
        // Truncated at the end of the stream.
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&[0, 0, 0, 9, 1, 2]).await.unwrap();
        drop(tx);
        assert!(matches!(
            reader(rx, &budget).next_frame().await,
            Err(Error::Truncated {
                expected: 13,
                got: 6
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_frame_is_cut_at_the_frame_timeout() {
        let budget = FrameBudget::new(1 << 20, 1 << 20);
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut frames = reader(rx, &budget);
        let trickle = tokio::spawn(async move {
            // A frame of 100 bytes, one byte a second.
            for byte in [0, 0, 0, 100].into_iter().chain([0xc0; 100]) {
                if tx.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let started = Instant::now();
        let err = frames.next_frame().await.unwrap_err();
        assert!(matches!(err, Error::FrameTimeout { .. }), "{err:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(err.to_string().contains("--frame-timeout"), "{err}");
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_does_not_fit_is_not_read_and_its_wait_is_not_timed() {
        // 64 KiB of budget: a 50 KiB frame held elsewhere leaves no room for a 30 KiB one.
        let budget = FrameBudget::new(64 << 10, 64 << 10);
        let hog = budget.connection().try_acquire(50 << 10).unwrap();
        let (mut tx, rx) = tokio::io::duplex(4 << 10);
        let mut frames = reader(rx, &budget);
        let body = vec![0xc0u8; 30 << 10];
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let writer = tokio::spawn(async move { tx.write_all(&wire).await.map(|()| tx) });

        let read = tokio::spawn(async move {
            let frame = frames.next_frame().await;
            (frame, frames)
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        // Six times the frame timeout later: still waiting, the sender blocked by the duplex's
        // 4 KiB, nothing read beyond the read-ahead.
        assert!(!read.is_finished());
        assert!(
            !writer.is_finished(),
            "the whole frame was read without a budget"
        );
        assert_eq!(budget.held(), 50 << 10);
        assert_eq!(budget.waits(), 1);

        drop(hog);
        let (frame, _frames) = read.await.unwrap();
        assert_eq!(frame.unwrap().unwrap().len(), 30 << 10);
        let _tx = writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn cancelling_a_read_loses_nothing() {
        let budget = FrameBudget::new(1 << 20, 1 << 20);
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut frames = reader(rx, &budget);
        let whole = encode_frame(&Message::Ping { id: 77 }).unwrap();
        for byte in &whole {
            tx.write_all(&[*byte]).await.unwrap();
            // Each poll reads what is there, then is dropped: the next one goes on from it.
            let polled = tokio::time::timeout(Duration::from_millis(5), frames.next_frame()).await;
            if let Ok(frame) = polled {
                let frame = frame.unwrap().unwrap();
                assert_eq!(Message::decode(&frame).unwrap(), Message::Ping { id: 77 });
                return;
            }
            assert!(frames.in_frame());
        }
        panic!("the frame never completed");
    }
}
