//! The run: connect, follow the schedule, send each request on its own task, drain,
//! report.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidepool_protocol::tls::{ClientFiles, TlsConnector};

use tidepool_protocol::{CallOptions, ClientOptions, Pool, Tensors};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::LoadConfig;
use crate::error::Error;
use crate::input::{build_items, items_from_metadata};
use crate::live::{live_loop, LiveSources};
use crate::outcome::Outcome;
use crate::recorder::{Answer, Recorder};
use crate::report::{Report, RunInfo};
use crate::schedule::Schedule;

/// How long `--from-metadata` waits for the target to describe its model.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `--wait-ready` pings.
const PING_EVERY: Duration = Duration::from_millis(200);

/// Runs the load described by `config` until its duration ends or `shutdown` is
/// cancelled, then drains and reports.
///
/// Fails only on setup: an invalid config, unbuildable inputs, a target that refuses
/// the connections or (with `--wait-ready`) never answers ping. Everything that happens
/// to requests is in the [`Report`]. Cancelling `shutdown` stops the schedule; requests
/// in flight still get up to `config.drain` to finish, and the report is still returned
/// (marked interrupted).
pub async fn run(config: LoadConfig, shutdown: CancellationToken) -> Result<Report, Error> {
    config.validate()?;
    let connect_error = |source| Error::Connect {
        target: config.target.clone(),
        source: Box::new(source),
    };
    // Several balancers, comma-separated: the pool spreads its connections over them and
    // fails over between them.
    let targets: Vec<&str> = config.target.split(',').map(str::trim).collect();
    let options = ClientOptions {
        tenant: config.tenant.clone(),
        ..ClientOptions::default()
    };
    let pool = match &config.tls_ca {
        None => Pool::connect_many(&targets, config.connections, options).await,
        Some(ca) => {
            let tls = TlsConnector::new(
                "load",
                &ClientFiles::trusting(ca),
                config.tls_server_name.as_deref(),
                tidepool_protocol::tls::DEFAULT_HANDSHAKE_TIMEOUT,
                Default::default(),
            )
            .map_err(connect_error)?;
            Pool::connect_tls_many(&targets, config.connections, options, &tls).await
        }
    }
    .map_err(connect_error)?;
    if !config.wait_ready.is_zero() {
        wait_ready(&pool, &config, &shutdown).await?;
    }
    // The items, and their inputs described for the report (NAME:DTYPE:DIMS).
    let (items, inputs) = if config.from_metadata {
        let client = pool.pick().ok_or(Error::NoConnection)?;
        let model = client
            .metadata(METADATA_TIMEOUT)
            .await
            .map_err(|source| Error::Metadata {
                target: config.target.clone(),
                source: Box::new(source),
            })?;
        let (low, high) = config.lengths;
        let length = if low == high {
            low.to_string()
        } else {
            format!("{low}..{high}")
        };
        let described = model
            .inputs
            .iter()
            .map(|input| {
                let dims: Vec<String> = input
                    .shape
                    .iter()
                    .map(|&d| if d < 0 { length.clone() } else { d.to_string() })
                    .collect();
                format!("{}:{}:{}", input.name, input.dtype, dims.join("x"))
            })
            .collect();
        (
            items_from_metadata(&model, config.lengths, config.items, config.seed)?,
            described,
        )
    } else {
        let inputs = match &config.model {
            #[cfg(feature = "onnx")]
            Some(model) => inputs_of_model(model, config.ort_lib.as_deref()).await?,
            // Without the `onnx` feature, validate() has refused --model.
            _ => config.inputs.clone(),
        };
        (
            build_items(&inputs, config.items, config.seed)?,
            inputs.iter().map(ToString::to_string).collect(),
        )
    };

    let profile = config.rate_profile();
    let schedule = Schedule::new(profile, config.duration, config.arrivals, config.seed);
    let recorder = Arc::new(Mutex::new(Recorder::with_objective(config.deadline)));
    // One permit per request in flight: the concurrency cap, and the in-flight gauge.
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let tracker = TaskTracker::new();
    let abandon = CancellationToken::new();
    let call = CallOptions {
        deadline: config.deadline,
        priority: config.priority,
    };
    let start = Instant::now();

    let live_stop = CancellationToken::new();
    let live = (!config.quiet).then(|| {
        tokio::spawn(live_loop(
            LiveSources {
                start,
                recorder: Arc::clone(&recorder),
                slots: Arc::clone(&slots),
                concurrency: config.concurrency,
                profile,
            },
            live_stop.clone(),
        ))
    });

    let mut interrupted = false;
    for (n, offset) in schedule.enumerate() {
        let due = start + offset;
        if Instant::now() < due {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep_until(due) => {}
            }
        }
        if shutdown.is_cancelled() {
            interrupted = true;
            break;
        }
        // Never wait for a slot: a send the cap refuses is counted and the schedule goes
        // on, so the offered rate stays what the profile says.
        let permit = Arc::clone(&slots).try_acquire_owned().ok();
        lock(&recorder).offered(offset, permit.is_some());
        if let Some(permit) = permit {
            tracker.spawn(request(Request {
                pool: pool.clone(),
                inputs: items[n % items.len()].clone(),
                call,
                start,
                due,
                recorder: Arc::clone(&recorder),
                abandon: abandon.clone(),
                _permit: permit,
            }));
        }
    }
    if !interrupted {
        // The schedule's last send falls before the end; the run lasts its duration.
        tokio::select! {
            () = shutdown.cancelled() => interrupted = true,
            () = tokio::time::sleep_until(start + config.duration) => {}
        }
    }

    tracker.close();
    tokio::select! {
        () = tracker.wait() => tracing::debug!("every request answered"),
        () = tokio::time::sleep(config.drain) => {
            tracing::info!(
                in_flight = tracker.len(),
                drain = ?config.drain,
                "drain deadline passed; abandoning the requests still in flight"
            );
            abandon.cancel();
            tracker.wait().await;
        }
    }
    let elapsed = start.elapsed();
    live_stop.cancel();
    if let Some(live) = live {
        let _ = live.await;
    }

    let info = RunInfo {
        target: config.target.clone(),
        profile,
        arrivals: config.arrivals,
        duration_s: config.duration.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        interrupted,
        concurrency: config.concurrency,
        connections: config.connections,
        deadline_ms: config
            .deadline
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        inputs,
    };
    let recorder = match Arc::try_unwrap(recorder) {
        Ok(mutex) => mutex.into_inner().unwrap_or_else(|p| p.into_inner()),
        // Every task that held a clone has finished; the live loop was joined. Should a
        // clone survive anyway, report from a copy of what it holds.
        Err(shared) => std::mem::replace(&mut *lock(&shared), Recorder::new()),
    };
    Ok(recorder.finish(info, &profile))
}

/// Pings the target until it answers, `config.wait_ready` at most.
async fn wait_ready(
    pool: &Pool,
    config: &LoadConfig,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let started = Instant::now();
    let mut last = None;
    while let Some(client) = pool.pick() {
        match client.ping(PING_EVERY.max(Duration::from_secs(1))).await {
            Ok(()) => return Ok(()),
            Err(error) => last = Some(Box::new(error)),
        }
        if started.elapsed() >= config.wait_ready {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(PING_EVERY) => {}
        }
    }
    Err(Error::NotReady {
        target: config.target.clone(),
        waited: started.elapsed(),
        last,
    })
}

/// Everything one request task needs.
struct Request {
    pool: Pool,
    inputs: Tensors,
    call: CallOptions,
    start: Instant,
    /// Its intended send time: latency counts from here, not from when it went out.
    due: Instant,
    recorder: Arc<Mutex<Recorder>>,
    abandon: CancellationToken,
    /// Its concurrency slot, given back when the task ends.
    _permit: OwnedSemaphorePermit,
}

async fn request(r: Request) {
    let sent = Instant::now();
    let (outcome, worker, batch_size, error) =
        match budget_at_send(r.call.deadline, sent.saturating_duration_since(r.due)) {
            // Its whole budget went by before the driver got to send it.
            Budget::Spent => (Outcome::DeadlineExceeded, None, None, None),
            Budget::Left(deadline) => {
                let call = CallOptions { deadline, ..r.call };
                let result = tokio::select! {
                    result = r.pool.infer_with(r.inputs, call) => Some(result),
                    // Dropping the call sends `cancel` to the server.
                    () = r.abandon.cancelled() => None,
                };
                match result {
                    Some(Ok(result)) => (Outcome::Ok, result.worker, result.batch_size, None),
                    Some(Err(error)) => (Outcome::of_error(&error), None, None, Some(error)),
                    None => (Outcome::Unanswered, None, None, None),
                }
            }
        };
    let now = Instant::now();
    lock(&r.recorder).answered(Answer {
        at: now.saturating_duration_since(r.start),
        latency: now.saturating_duration_since(r.due),
        outcome,
        worker,
        batch_size,
        error,
    });
}

/// What is left of a request's deadline when it goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    /// Send it with this budget (`None`: no deadline).
    Left(Option<Duration>),
    /// Less than a millisecond (`deadline_ms`'s unit) is left: it is answered
    /// `deadline_exceeded` here, unsent.
    Spent,
}

/// The budget of a request sent `lag` after its intended send time. The deadline counts
/// from the intended time, as the latency does, so a driver that fell behind (a loaded
/// machine, a starved runtime) sends what is left of it: the server then judges the request
/// by the same clock as this report, instead of by a fresh full budget from its late arrival.
fn budget_at_send(deadline: Option<Duration>, lag: Duration) -> Budget {
    match deadline {
        None => Budget::Left(None),
        Some(deadline) => match deadline.checked_sub(lag) {
            Some(left) if left >= Duration::from_millis(1) => Budget::Left(Some(left)),
            _ => Budget::Spent,
        },
    }
}

fn lock(recorder: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    // A panic while holding the lock leaves tallies that are still worth reporting.
    recorder.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// `--model`'s inputs, read off the event loop. Without the `onnx` feature,
/// [`LoadConfig::validate`] refuses `--model` before it gets here.
#[cfg(feature = "onnx")]
async fn inputs_of_model(
    model: &std::path::Path,
    ort_lib: Option<&std::path::Path>,
) -> Result<Vec<crate::InputSpec>, Error> {
    let lib = ort_lib.ok_or(Error::NoOrtLib)?.to_owned();
    let model = model.to_owned();
    // Loading a model is blocking work; keep it off the runtime's threads.
    // A panic while loading is a bug: let it surface as one.
    tokio::task::spawn_blocking(move || crate::input::inputs_of_model(&model, &lib))
        .await
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_late_send_carries_what_is_left_of_its_deadline() {
        assert_eq!(
            budget_at_send(Some(ms(100)), ms(0)),
            Budget::Left(Some(ms(100)))
        );
        assert_eq!(
            budget_at_send(Some(ms(100)), ms(30)),
            Budget::Left(Some(ms(70)))
        );
        assert_eq!(
            budget_at_send(Some(ms(100)), ms(99)),
            Budget::Left(Some(ms(1)))
        );
        assert_eq!(budget_at_send(None, ms(5_000)), Budget::Left(None));
    }

    #[test]
    fn a_send_later_than_its_deadline_is_not_sent() {
        assert_eq!(budget_at_send(Some(ms(100)), ms(100)), Budget::Spent);
        assert_eq!(
            budget_at_send(Some(ms(100)), ms(99) + Duration::from_micros(500)),
            Budget::Spent,
            "under a millisecond left: deadline_ms would be 0"
        );
        assert_eq!(budget_at_send(Some(ms(100)), ms(250)), Budget::Spent);
    }
}
