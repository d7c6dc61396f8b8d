//! [`FrameBudget`]: a byte budget for frames being read or held, shared by every connection
//! of a receiver, with a ceiling per connection.
//!
//! Without it, every connection that announces a large frame makes the receiver allocate that
//! frame, and a few hundred of them exhaust its memory before any frame is complete. With it, a
//! connection takes the frame's whole length from the budget *before* reading the body (see
//! [`FrameReader`](crate::FrameReader)); when the frame does not fit, the connection stops
//! being read until bytes come back, and TCP pushes back on its sender.
//!
//! Bytes come back when the frame is dropped, and not earlier: a [`FramePermit`] travels
//! inside the frame's [`Bytes`](bytes::Bytes) (see [`FramePermit::into_bytes`]), so tensors
//! cut from the frame keep its bytes counted until the last of them is gone (for a worker,
//! when the item has been copied into its batch).
//!
//! Two rules keep one abuser from starving everyone:
//! - **A ceiling per connection**: one connection holds at most
//!   [`FrameBudget::per_connection`] bytes of frames at once.
//! - **A reserve for small frames**: the last eighth of the budget is only taken by frames of
//!   at most a sixty-fourth of it. Connections holding large unfinished frames can fill the
//!   rest, but ordinary requests still get through until the frame timeout cuts them.
//!
//! The budget is not first-come first-served: a large frame waits while smaller ones that fit
//! go ahead. That is the point (a stalled large frame must not block small ones), and large
//! frames still get their turn as soon as enough bytes are free at once.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

/// The shared byte budget. Cheap to clone: clones share the same bytes.
#[derive(Clone, Debug)]
pub struct FrameBudget {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    total: usize,
    per_connection: usize,
    /// Bytes at the end of the budget that only small frames may take.
    reserve: usize,
    /// The largest frame that may take from the reserve.
    small: usize,
    /// Bytes free: taken with a compare-and-swap, given back with an add (no lock on the
    /// path every frame takes twice).
    available: AtomicUsize,
    /// Connections in [`ConnectionBudget::acquire`]. A released frame wakes them only when
    /// there are any: waking nobody costs nothing on the hot path. Sequentially consistent
    /// with `available`: a waiter counts itself before looking at `available`, a release
    /// adds to `available` before reading this, so one of the two sees the other.
    waiting: AtomicUsize,
    /// Woken when bytes come back while a connection waits for them.
    released: Notify,
    /// Times a connection had to stop reading because its frame did not fit.
    waits: AtomicU64,
}

impl FrameBudget {
    /// A budget of `total` bytes, of which one connection may hold at most `per_connection`
    /// (clamped to `total`).
    pub fn new(total: usize, per_connection: usize) -> FrameBudget {
        FrameBudget {
            shared: Arc::new(Shared {
                total,
                per_connection: per_connection.min(total),
                reserve: total / 8,
                small: total / 64,
                available: AtomicUsize::new(total),
                waiting: AtomicUsize::new(0),
                released: Notify::new(),
                waits: AtomicU64::new(0),
            }),
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.shared.total
    }

    /// The most bytes one connection may hold.
    pub fn per_connection(&self) -> usize {
        self.shared.per_connection
    }

    /// The largest frame this budget can ever admit: a receiver's maximum frame length must
    /// not be above it, or frames of that length would wait forever.
    pub fn largest_frame(&self) -> usize {
        self.shared.largest_frame()
    }

    /// Bytes currently held by frames being read or held.
    pub fn held(&self) -> usize {
        self.shared.total - self.shared.available.load(Ordering::SeqCst)
    }

    /// How many times a connection stopped reading because its next frame did not fit.
    pub fn waits(&self) -> u64 {
        self.shared.waits.load(Ordering::Relaxed)
    }

    /// The budget of one new connection. Each connection takes its own: the ceiling is
    /// counted per [`ConnectionBudget`].
    pub fn connection(&self) -> ConnectionBudget {
        ConnectionBudget {
            shared: Arc::clone(&self.shared),
            conn: Arc::new(Conn {
                held: AtomicUsize::new(0),
                released: Notify::new(),
            }),
        }
    }
}

impl Shared {
    fn largest_frame(&self) -> usize {
        self.per_connection
            .min(self.total - self.reserve)
            .max(self.small.min(self.per_connection))
    }

    fn fits(&self, available: usize, len: usize) -> bool {
        len <= available && (len <= self.small || available - len >= self.reserve)
    }
}

/// Counts a connection as waiting for bytes for as long as it lives (cancel safe).
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Waiting<'a> {
        shared.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One connection's share of a [`FrameBudget`]. Not `Clone`: one reader takes from it, which
/// is what makes its check-then-take race free (others only ever give bytes back).
#[derive(Debug)]
pub struct ConnectionBudget {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

#[derive(Debug)]
struct Conn {
    held: AtomicUsize,
    released: Notify,
}

impl ConnectionBudget {
    /// Bytes this connection holds.
    pub fn held(&self) -> usize {
        self.conn.held.load(Ordering::SeqCst)
    }

    /// The largest frame this budget can ever admit (see [`FrameBudget::largest_frame`]).
    pub fn largest_frame(&self) -> usize {
        self.shared.largest_frame()
    }

    /// Takes `len` bytes now, if they fit both this connection's ceiling and the budget.
    pub fn try_acquire(&self, len: usize) -> Option<FramePermit> {
        if self.held().saturating_add(len) > self.shared.per_connection {
            return None;
        }
        let mut available = self.shared.available.load(Ordering::SeqCst);
        loop {
            if !self.shared.fits(available, len) {
                return None;
            }
            match self.shared.available.compare_exchange_weak(
                available,
                available - len,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(now) => available = now,
            }
        }
        self.conn.held.fetch_add(len, Ordering::AcqRel);
        Some(FramePermit {
            shared: Arc::clone(&self.shared),
            conn: Arc::clone(&self.conn),
            len,
        })
    }

    /// Waits until `len` bytes fit, then takes them. Cancel safe: nothing is taken unless the
    /// permit is returned. A `len` above [`largest_frame`](Self::largest_frame) never fits;
    /// check it first.
    pub async fn acquire(&self, len: usize) -> FramePermit {
        // Counted as waiting before the first look, so that bytes released after it wake
        // this connection (a release reads the count after it gave its bytes back; both
        // sides' steps are sequentially consistent, so one of them sees the other).
        let _waiting = Waiting::new(&self.shared);
        let mut counted = false;
        loop {
            // Register for wake-ups before looking, so a release in between is not missed.
            let mut global = pin!(self.shared.released.notified());
            let mut local = pin!(self.conn.released.notified());
            global.as_mut().enable();
            local.as_mut().enable();
            if let Some(permit) = self.try_acquire(len) {
                return permit;
            }
            if !std::mem::replace(&mut counted, true) {
                self.shared.waits.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = global => {}
                _ = local => {}
            }
        }
    }
}

/// Bytes taken from a [`FrameBudget`]; they come back when this is dropped.
#[derive(Debug)]
pub struct FramePermit {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    len: usize,
}

impl FramePermit {
    /// The bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a permit holds at least one byte (frames are never empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `data` as [`Bytes`] that hold this permit: the bytes come back to the budget when the
    /// last `Bytes` sharing `data` (slices included) is dropped.
    pub fn into_bytes(self, data: Vec<u8>) -> Bytes {
        Bytes::from_owner(Held {
            data,
            _permit: self,
        })
    }
}

impl Drop for FramePermit {
    fn drop(&mut self) {
        // The connection's count first: a waiter that sees the bytes in the budget sees
        // them gone from its ceiling too.
        self.conn.held.fetch_sub(self.len, Ordering::SeqCst);
        self.shared.available.fetch_add(self.len, Ordering::SeqCst);
        if self.shared.waiting.load(Ordering::SeqCst) > 0 {
            self.shared.released.notify_waiters();
            self.conn.released.notify_waiters();
        }
    }
}

/// A frame's bytes with the permit that counts them.
struct Held {
    data: Vec<u8>,
    _permit: FramePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bytes_come_back_when_the_last_slice_is_dropped() {
        let budget = FrameBudget::new(1000, 1000);
        let conn = budget.connection();
        let permit = conn.try_acquire(100).unwrap();
        let frame = permit.into_bytes(vec![7; 100]);
        let tensor = frame.slice(10..20);
        drop(frame);
        assert_eq!(budget.held(), 100);
        assert_eq!(conn.held(), 100);
        assert_eq!(&tensor[..], &[7; 10]);
        drop(tensor);
        assert_eq!(budget.held(), 0);
        assert_eq!(conn.held(), 0);
    }

    #[test]
    fn one_connection_stops_at_its_ceiling() {
        let budget = FrameBudget::new(1000, 300);
        let a = budget.connection();
        let _first = a.try_acquire(200).unwrap();
        assert!(
            a.try_acquire(101).is_none(),
            "above the connection's ceiling"
        );
        let _second = a.try_acquire(100).unwrap();
        // Another connection still has the rest of the budget.
        let b = budget.connection();
        assert!(b.try_acquire(300).is_some());
    }

    #[test]
    fn the_reserve_is_kept_for_small_frames() {
        // 6400 bytes: large frames may use 5600, frames of at most 100 bytes the rest.
        let budget = FrameBudget::new(6400, 6400);
        assert_eq!(budget.largest_frame(), 5600);
        let big = budget.connection();
        let _hog = big.try_acquire(5600).unwrap();
        let other = budget.connection();
        assert!(
            other.try_acquire(101).is_none(),
            "a large frame took the reserve"
        );
        let smalls: Vec<_> = (0..8).map(|_| other.try_acquire(100).unwrap()).collect();
        assert_eq!(budget.held(), 6400);
        assert!(other.try_acquire(1).is_none());
        drop(smalls);
        assert_eq!(budget.held(), 5600);
    }

    #[test]
    fn largest_frame_is_bounded_by_the_ceiling_and_the_reserve() {
        assert_eq!(FrameBudget::new(800, 100).largest_frame(), 100);
        assert_eq!(FrameBudget::new(800, 800).largest_frame(), 700);
        assert_eq!(FrameBudget::new(800, 5000).per_connection(), 800);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_connection_resumes_when_bytes_come_back() {
        let budget = FrameBudget::new(800, 800);
        let hog = budget.connection();
        let held = hog.try_acquire(700).unwrap();
        let waiter = budget.connection();
        let wait = tokio::spawn(async move { waiter.acquire(300).await.len() });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!wait.is_finished(), "took bytes that were not free");
        assert_eq!(budget.waits(), 1);
        drop(held);
        assert_eq!(wait.await.unwrap(), 300);
        assert_eq!(budget.waits(), 1, "one wait, however many wake-ups");
        assert_eq!(
            budget.held(),
            0,
            "the permit was dropped with the task's result"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_frame_goes_ahead_of_a_waiting_large_one() {
        let budget = FrameBudget::new(6400, 6400);
        let _hog = budget.connection().try_acquire(5000).unwrap();
        let large = budget.connection();
        let waiting = tokio::spawn(async move { large.acquire(1000).await.len() });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let small = budget.connection();
        let permit = tokio::time::timeout(Duration::from_secs(1), small.acquire(50))
            .await
            .expect("the small frame is not queued behind the large one");
        assert_eq!(permit.len(), 50);
        waiting.abort();
    }
}
