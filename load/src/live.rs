//! The live line: once a second on stderr, what the last second looked like.
//!
//! On a terminal the line is rewritten in place (`\r` and erase-to-end); otherwise (a
//! pipe, a CI log) each second is a line of its own.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::profile::RateProfile;
use crate::recorder::Recorder;
use crate::report::{fmt_ms, SecondRow};

/// Ticks this long after each second boundary, so that answers computed just before the
/// boundary are in.
const GRACE: Duration = Duration::from_millis(20);

/// What the live loop reads.
pub(crate) struct LiveSources {
    pub(crate) start: Instant,
    pub(crate) recorder: Arc<Mutex<Recorder>>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) concurrency: usize,
    pub(crate) profile: RateProfile,
}

/// Prints the live line every second until `stop`.
pub(crate) async fn live_loop(sources: LiveSources, stop: CancellationToken) {
    let tty = std::io::stderr().is_terminal();
    let mut second: u32 = 1;
    loop {
        let tick = sources.start + Duration::from_secs(u64::from(second)) + GRACE;
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(tick) => {}
        }
        let index = second as usize;
        let (row, workers_seen) = {
            // Held for the bookkeeping only; never across an await.
            let mut recorder = sources
                .recorder
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            recorder.close_before(index);
            (
                recorder.row(index - 1, &sources.profile),
                recorder.workers_seen(),
            )
        };
        if let Some(row) = row {
            let in_flight = sources
                .concurrency
                .saturating_sub(sources.slots.available_permits());
            let line = live_line(&row, in_flight, workers_seen);
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}\x1b[K")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
        }
        second += 1;
    }
    if tty {
        let _ = writeln!(std::io::stderr());
    }
}

/// One live line for the second `row`, ending at `row.t + 1` seconds.
pub(crate) fn live_line(row: &SecondRow, in_flight: usize, workers_seen: usize) -> String {
    let errors = if row.errors == 0 {
        "0".to_owned()
    } else {
        row.errors_by
            .iter()
            .map(|(outcome, n)| format!("{outcome}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let skipped = if row.skipped > 0 {
        format!(" (skipped {} at cap)", row.skipped)
    } else {
        String::new()
    };
    format!(
        "[{:>5}s] offered {:>6}/s{skipped}  achieved {:>6}/s  in flight {:>5}  p50 {:>8}ms  p99 {:>8}ms  errors {errors}  workers {}/{}",
        row.t + 1,
        row.offered,
        row.ok,
        in_flight,
        fmt_ms(row.p50_ms),
        fmt_ms(row.p99_ms),
        row.active_workers,
        workers_seen,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use std::collections::BTreeMap;

    #[test]
    fn line_shows_rates_latency_errors_and_workers() {
        let row = SecondRow {
            t: 11,
            profile_rate: 100.0,
            offered: 100,
            skipped: 2,
            ok: 95,
            errors: 3,
            errors_by: BTreeMap::from([(Outcome::Overloaded, 2), (Outcome::ConnectionLost, 1)]),
            p50_ms: Some(1.5),
            p99_ms: Some(12.25),
            active_workers: 2,
        };
        let line = live_line(&row, 7, 3);
        assert!(
            line.starts_with("[   12s] offered    100/s (skipped 2 at cap)"),
            "{line}"
        );
        for part in [
            "achieved     95/s",
            "in flight     7",
            "p50    1.500ms",
            "p99    12.25ms",
            "errors overloaded=2 connection_lost=1",
            "workers 2/3",
        ] {
            assert!(line.contains(part), "{part:?} missing from {line:?}");
        }
    }
}
