//! A closed-loop driver over the protocol client: `clients` callers, each sending its next
//! item as soon as the last is answered, counted during a measuring window after a warm-up.
//! What the worker benchmarks use to find a worker's capacity.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tidepool_protocol::{ClientOptions, Pool, Tensors};
use tokio_util::sync::CancellationToken;

use crate::stats::{histogram, record, Latency};

/// What one saturation run measured.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Saturation {
    /// Results during the window.
    pub items: u64,
    /// Errors during the window.
    pub errors: u64,
    /// The window, seconds.
    pub seconds: f64,
    /// Results per second.
    pub items_per_second: f64,
    /// The mean `batch_size` the results report.
    pub mean_batch: f64,
    /// Latency of the results during the window.
    pub latency: Latency,
}

/// Runs `clients` closed-loop callers over 4 connections to `addr`. Caller `i` sends items
/// `i`, `i + clients`, ... in turn, so every item of `items` is used. Counts results during
/// `measure`, after `warmup`.
pub async fn saturate(
    addr: &str,
    items: &[Tensors],
    clients: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Saturation> {
    let (sat, (), ()) = saturate_probed(addr, items, clients, warmup, measure, || ()).await?;
    Ok(sat)
}

/// [`saturate`], calling `probe` as the measuring window opens and as it closes (for CPU
/// samples taken over exactly the window), and returning both probes.
pub async fn saturate_probed<P>(
    addr: &str,
    items: &[Tensors],
    clients: usize,
    warmup: Duration,
    measure: Duration,
    mut probe: impl FnMut() -> P,
) -> anyhow::Result<(Saturation, P, P)> {
    anyhow::ensure!(!items.is_empty(), "no items to send");
    let pool = Pool::connect(addr, 4, ClientOptions::default()).await?;
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, errors, batch_sum) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let latencies = Arc::new(Mutex::new(histogram()));
    let stop = CancellationToken::new();
    let items: Arc<Vec<Tensors>> = Arc::new(items.to_vec());
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|i| {
            let (pool, items, stop, counting) = (
                pool.clone(),
                Arc::clone(&items),
                stop.clone(),
                Arc::clone(&counting),
            );
            let (ok, errors, batch_sum, latencies) = (
                Arc::clone(&ok),
                Arc::clone(&errors),
                Arc::clone(&batch_sum),
                Arc::clone(&latencies),
            );
            tokio::spawn(async move {
                let mut next = i;
                loop {
                    let item = items[next % items.len()].clone();
                    next += clients.max(1);
                    let sent = Instant::now();
                    let answer = tokio::select! {
                        () = stop.cancelled() => return,
                        answer = pool.infer(item) => answer,
                    };
                    if !counting.load(Ordering::Relaxed) {
                        continue;
                    }
                    match answer {
                        Ok(r) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            batch_sum
                                .fetch_add(u64::from(r.batch_size.unwrap_or(1)), Ordering::Relaxed);
                            let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                            // Held for one record, never across an await.
                            record(&mut latencies.lock().unwrap_or_else(|p| p.into_inner()), ns);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let opened = probe();
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(measure).await;
    counting.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let closed = probe();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let items = ok.load(Ordering::Relaxed);
    let latency = Latency::of(&latencies.lock().unwrap_or_else(|p| p.into_inner()));
    let sat = Saturation {
        items,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        items_per_second: items as f64 / seconds,
        mean_batch: batch_sum.load(Ordering::Relaxed) as f64 / items.max(1) as f64,
        latency,
    };
    Ok((sat, opened, closed))
}
