//! The pieces of `bench-autoscale`: an autoscaling balancer started as a child process, a
//! poller of its `GET /scaling` that integrates worker-seconds, the share of seconds within
//! a latency objective, and the timestamps of a worker's start read from the logs.
//!
//! Everything that computes a figure is a pure function over recorded data (samples, the
//! load report's timeline, log lines), so it is unit-tested without processes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tidepool_load::SecondRow;

use crate::process::{free_port, http_get, sibling_exe, wait_for_port, Proc};

/// How to start an autoscaling tidepool-balancer whose workers it starts itself.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    /// The ONNX model every worker serves.
    pub model: PathBuf,
    /// `--min-workers`.
    pub min_workers: usize,
    /// `--max-workers`.
    pub max_workers: usize,
    /// `--scaling-signal`: `busy` (busy shares against `--target-utilization`, the
    /// default) or `in-flight` (requests in flight alone, the policy before busy shares).
    pub signal: &'static str,
    /// `--target-utilization`: the busy share per worker the pool is sized for.
    pub target_utilization: f64,
    /// `--target-load`: outstanding plus queued requests per worker.
    pub target_load: f64,
    /// `--scale-out-delay`.
    pub scale_out_delay: Duration,
    /// `--scale-in-delay`: the longest scale-down delay.
    pub scale_in_delay: Duration,
    /// `--scale-in-startups`: the scale-down delay in start-up times.
    pub scale_in_startups: f64,
    /// `--scaling-window`.
    pub window: Duration,
    /// `--panic-window` (at most `window`).
    pub panic_window: Duration,
    /// `--worker-startup`: the start-up time the policy plans with until it has measured
    /// one.
    pub worker_startup: Duration,
    /// The balancer's stderr goes here (the workers' too, unless `worker_logs` is set).
    pub log: PathBuf,
    /// `RUST_LOG` for the balancer and its workers.
    pub rust_log: &'static str,
    /// With a directory, each worker's stderr goes to `DIR/worker-PORT.log` (through
    /// `sh -c 'exec …'`, so the balancer still signals the worker itself): the lines of
    /// workers starting side by side stay apart.
    pub worker_logs: Option<PathBuf>,
}

impl PoolSpec {
    /// The `--worker-cmd` template.
    fn worker_cmd(&self) -> anyhow::Result<String> {
        let worker = sibling_exe("tidepool-worker")?;
        let serve = format!(
            "{} serve --model {} --listen 127.0.0.1:{{port}} --name worker-{{index}} \
             --register http://{{admin}} --threads 1 --max-batch 32 --max-delay 5ms \
             --drain-timeout 10s",
            worker.display(),
            self.model.display()
        );
        Ok(match &self.worker_logs {
            None => serve,
            Some(dir) => format!(
                "sh -c 'exec {serve} 2>>{}/worker-{{port}}.log'",
                dir.display()
            ),
        })
    }
}

/// A running autoscaling balancer. Dropping it stops the balancer with SIGTERM, which stops
/// (and drains) the workers it started; SIGKILL only if it does not exit in time, so that
/// no worker is left behind.
#[derive(Debug)]
pub struct Pool {
    proc: Option<Proc>,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The admin API.
    pub admin: SocketAddr,
}

impl Pool {
    /// Starts the balancer and waits (up to `timeout`) until `--min-workers` are ready
    /// and none is coming.
    pub fn start(spec: &PoolSpec, timeout: Duration) -> anyhow::Result<Pool> {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        if let Some(dir) = &spec.worker_logs {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::File::create(&spec.log)
            .with_context(|| format!("creating {}", spec.log.display()))?;
        let mut command = Command::new(sibling_exe("tidepool-balancer")?);
        command
            .env("RUST_LOG", spec.rust_log)
            .env("NO_COLOR", "1")
            .args(["--listen", &listen.to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--health-interval", "1s", "--health-timeout", "1s"])
            .args(["--healthy-threshold", "2", "--unhealthy-threshold", "2"])
            .args(["--deregistration-delay", "10s"])
            .args(["--autoscale", "--worker-cmd", &spec.worker_cmd()?])
            .args(["--min-workers", &spec.min_workers.to_string()])
            .args(["--max-workers", &spec.max_workers.to_string()])
            .args(["--scaling-signal", spec.signal])
            .args(["--target-utilization", &spec.target_utilization.to_string()])
            .args(["--target-load", &spec.target_load.to_string()])
            .args(["--scale-out-delay", &secs(spec.scale_out_delay)])
            .args(["--scale-in-delay", &secs(spec.scale_in_delay)])
            .args(["--scale-in-startups", &spec.scale_in_startups.to_string()])
            .args(["--scaling-window", &secs(spec.window)])
            .args(["--panic-window", &secs(spec.panic_window)])
            .args(["--worker-startup", &secs(spec.worker_startup)])
            .stdout(Stdio::null())
            .stderr(log);
        let mut pool = Pool {
            proc: Some(Proc::spawn("tidepool-balancer", &mut command)?),
            listen,
            admin,
        };
        wait_for_port(admin, Duration::from_secs(10))?;
        let started = Instant::now();
        loop {
            if let Some(p) = pool.proc.as_mut() {
                p.check_running()?;
            }
            if let Ok(s) = pool.scaling() {
                if s.ready >= spec.min_workers && s.coming == 0 && s.leaving == 0 {
                    break;
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "{} workers were not ready within {timeout:?}; see {}",
                    spec.min_workers,
                    spec.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_for_port(listen, Duration::from_secs(5))?;
        Ok(pool)
    }

    /// The balancer's process id (the workers it started are its children).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// `GET /scaling`, the fields this benchmark reads.
    pub fn scaling(&self) -> anyhow::Result<Scaling> {
        get_scaling(self.admin)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let Some(proc) = self.proc.take() else { return };
        let pid = Pid::from_raw(i32::try_from(proc.pid()).unwrap_or(i32::MAX));
        if kill(pid, Signal::SIGTERM).is_ok() {
            // The balancer drains its workers (10 s drain timeout each, in parallel).
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut proc = proc;
            while Instant::now() < deadline && proc.check_running().is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The fields of `GET /scaling` this benchmark reads: the pool's size, and the policy's
/// signal and reasoning behind each reading, so that a run's `scaling.json` explains why
/// the pool was the size it was.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, Serialize)]
#[serde(default)]
pub struct Scaling {
    /// Workers healthy and taking requests.
    pub ready: usize,
    /// Workers started and not ready yet.
    pub coming: usize,
    /// Workers scaled in and still draining.
    pub leaving: usize,
    /// What the policy asks for now.
    pub desired: usize,
    /// Outstanding plus queued per ready worker, averaged over the window.
    pub load_per_worker: f64,
    /// Outstanding plus queued requests in all, averaged over the stable window.
    pub total_load: f64,
    /// The ready workers' busy shares (load shares) summed, now; `None`: none reported.
    pub busy_total: Option<f64>,
    /// Demand in workers, averaged over the stable window.
    pub stable_demand: f64,
    /// Demand in workers, averaged over the panic window.
    pub panic_demand: f64,
    /// Requests per second a fully busy worker answers, as the balancer measured it
    /// (answers over busy shares): below the measured capacity, the busy shares over-read.
    pub capacity_per_worker: Option<f64>,
    /// Requests that entered the balancer per second, over the last second.
    pub arrived_per_s: f64,
    /// `stable` or `panic`.
    pub mode: String,
    /// The signal that set the latest demand (`busy`, `in_flight`, `arrivals`).
    pub signal: String,
    /// The policy's reason, in words.
    pub reason: String,
    /// The last scale action the balancer took and when (`None`: none yet): exact to the
    /// millisecond, where a reading's `desired` is only as fresh as the poll.
    pub last_action: Option<LastAction>,
}

/// A scale action as `GET /scaling` reports it.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, Serialize)]
#[serde(default)]
pub struct LastAction {
    /// What: `scale_out` or `scale_in`, and to how many workers.
    pub action: ActionTaken,
    /// When the balancer took it (RFC 3339).
    pub at: String,
}

/// `{"action": "scale_out", "to": 3}`, as the balancer writes an action.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, Serialize)]
#[serde(default)]
pub struct ActionTaken {
    /// `scale_out`, `scale_in` or `hold`.
    pub action: String,
    /// The pool it set (absent for `hold`).
    pub to: Option<usize>,
}

impl Scaling {
    /// Worker processes running, ready or not: what the pool costs.
    pub fn running(&self) -> usize {
        self.ready + self.coming + self.leaving
    }
}

fn get_scaling(admin: SocketAddr) -> anyhow::Result<Scaling> {
    let body = http_get(admin, "/scaling")?;
    serde_json::from_str(&body).with_context(|| format!("GET /scaling answered {body:?}"))
}

/// One reading of `GET /scaling`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScalingPoint {
    /// Seconds since the poller's zero (the start of the load).
    pub t: f64,
    /// When the last action was taken, in the same seconds (from its own timestamp).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_t: Option<f64>,
    /// What `/scaling` said.
    #[serde(flatten)]
    pub scaling: Scaling,
}

/// The fields of one `GET /targets` entry this benchmark reads.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
struct TargetSeen {
    addr: String,
    state: String,
    /// When its state last changed (RFC 3339), the balancer's own timestamp.
    since: String,
}

/// One worker's time healthy as `GET /targets` showed it: from the balancer's timestamp of
/// its turning healthy (exact, where `/scaling`'s ready count moves only at the autoscaler's
/// once-a-second sample) to the last reading that still saw it healthy. Seconds since the
/// poller's zero.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthySpan {
    /// The worker's address.
    pub addr: String,
    /// When it turned healthy.
    pub from: f64,
    /// The last reading that saw it healthy.
    pub last_seen: f64,
}

/// What a [`Poller`] saw.
#[derive(Clone, Debug, Default)]
pub struct Polled {
    /// The `/scaling` readings, oldest first.
    pub points: Vec<ScalingPoint>,
    /// Each stretch a worker was healthy, in the order they began.
    pub healthy: Vec<HealthySpan>,
}

/// Seconds from `zero` to the RFC 3339 time `at` (negative before it); `None` if `at` does
/// not parse.
fn seconds_since(zero: SystemTime, at: &str) -> Option<f64> {
    let at = humantime::parse_rfc3339(at).ok()?;
    Some(match at.duration_since(zero) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    })
}

/// Adds one `/targets` reading taken at `t` to `open` (healthy stretches still going, by
/// address) and `closed`: a target healthy under a `since` not seen before begins a
/// stretch; one no longer healthy, or healthy since a new time, ends its old one.
fn track_healthy(
    targets: &[TargetSeen],
    t: f64,
    zero: SystemTime,
    open: &mut Vec<(String, String, HealthySpan)>,
    closed: &mut Vec<HealthySpan>,
) {
    let healthy = |o: &(String, String, HealthySpan)| {
        targets
            .iter()
            .any(|x| x.addr == o.0 && x.state == "healthy" && x.since == o.1)
    };
    let (still, ended): (Vec<_>, Vec<_>) = open.drain(..).partition(healthy);
    closed.extend(ended.into_iter().map(|o| o.2));
    *open = still;
    for x in targets.iter().filter(|x| x.state == "healthy") {
        match open.iter_mut().find(|o| o.0 == x.addr) {
            Some(o) => o.2.last_seen = t,
            None => {
                let from = seconds_since(zero, &x.since).unwrap_or(t);
                let span = HealthySpan {
                    addr: x.addr.clone(),
                    from,
                    last_seen: t,
                };
                open.push((x.addr.clone(), x.since.clone(), span));
            }
        }
    }
}

/// Polls `GET /scaling` and `GET /targets` every `every` on a thread of its own until
/// stopped.
#[derive(Debug)]
pub struct Poller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Polled>,
}

impl Poller {
    /// Starts polling `admin`; each point's `t` is measured from `zero`.
    pub fn start(admin: SocketAddr, zero: Instant, every: Duration) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // The balancer's timestamps are wall-clock: the same zero on that clock.
        let zero_wall = SystemTime::now() - zero.elapsed();
        let thread = std::thread::spawn(move || {
            let mut polled = Polled::default();
            let mut open = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(scaling) = get_scaling(admin) {
                    let t = zero.elapsed().as_secs_f64();
                    let action_t = scaling
                        .last_action
                        .as_ref()
                        .and_then(|a| seconds_since(zero_wall, &a.at));
                    polled.points.push(ScalingPoint {
                        t,
                        action_t,
                        scaling,
                    });
                }
                if let Ok(targets) = http_get(admin, "/targets")
                    .and_then(|body| Ok(serde_json::from_str::<Vec<TargetSeen>>(&body)?))
                {
                    let t = zero.elapsed().as_secs_f64();
                    track_healthy(&targets, t, zero_wall, &mut open, &mut polled.healthy);
                }
                next += every;
                // Short sleeps, so that a stop is seen within 50 ms.
                while !flag.load(Ordering::Relaxed) && Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(20).min(every));
                }
            }
            polled.healthy.extend(open.into_iter().map(|o| o.2));
            polled.healthy.sort_by(|a, b| a.from.total_cmp(&b.from));
            polled
        });
        Poller { stop, thread }
    }

    /// Stops polling and returns what it saw.
    pub fn stop(self) -> Polled {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Worker-seconds over `[from, to]`: each point's running count holds until the next point
/// (the last one until `to`). Before the first point nothing is counted.
pub fn worker_seconds(points: &[ScalingPoint], from: f64, to: f64) -> f64 {
    let mut total = 0.0;
    for (i, p) in points.iter().enumerate() {
        let end = points.get(i + 1).map_or(to, |n| n.t).min(to);
        let start = p.t.max(from);
        if end > start {
            total += p.scaling.running() as f64 * (end - start);
        }
    }
    total
}

/// Seconds from `step` (seconds since the poller's zero) until the balancer scaled out to
/// at least `enough` workers, by the action's own timestamp (the reaction, before any
/// worker starts); `None` if it did not before the run ended.
pub fn time_to_ask(points: &[ScalingPoint], step: f64, enough: usize) -> Option<f64> {
    points
        .iter()
        .filter_map(|p| {
            let a = p.scaling.last_action.as_ref()?;
            let at = p.action_t?;
            (a.action.action == "scale_out" && a.action.to? >= enough && at >= step).then_some(at)
        })
        .reduce(f64::min)
        .map(|at| at - step)
}

/// Workers healthy at `t` by their spans.
pub fn healthy_at(spans: &[HealthySpan], t: f64) -> usize {
    spans
        .iter()
        .filter(|s| s.from <= t && t <= s.last_seen)
        .count()
}

/// Seconds from `step` until at least `enough` workers were healthy at once, by the
/// balancer's timestamps of their turning healthy; `None` if that never happened.
pub fn time_to_ready(spans: &[HealthySpan], step: f64, enough: usize) -> Option<f64> {
    std::iter::once(step)
        .chain(spans.iter().map(|s| s.from).filter(|&f| f > step))
        .filter(|&t| healthy_at(spans, t) >= enough)
        .reduce(f64::min)
        .map(|t| t - step)
}

/// How many seconds of a run met a p99 objective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ObjectiveShare {
    /// Seconds with at least one result (the ones judged).
    pub judged: usize,
    /// Of those, seconds whose p99 was within the objective.
    pub met: usize,
    /// Seconds without a result: not counted against the objective.
    pub empty: usize,
}

impl ObjectiveShare {
    /// Judges each second of `timeline` against `objective_ms`. Only the seconds that
    /// start before `until` count (the drain after the schedule is not part of the day).
    pub fn of(timeline: &[SecondRow], objective_ms: f64, until: u64) -> ObjectiveShare {
        let mut share = ObjectiveShare::default();
        for row in timeline.iter().filter(|r| r.t < until) {
            match row.p99_ms {
                None => share.empty += 1,
                Some(p99) => {
                    share.judged += 1;
                    if p99 <= objective_ms {
                        share.met += 1;
                    }
                }
            }
        }
        share
    }

    /// `met / judged` in percent (100 when nothing was judged).
    pub fn percent(&self) -> f64 {
        if self.judged == 0 {
            100.0
        } else {
            100.0 * self.met as f64 / self.judged as f64
        }
    }
}

/// One log line of tidepool's tracing format: when, and the rest of the line.
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    /// The timestamp at the start of the line.
    pub at: SystemTime,
    /// Everything after it (level, message, fields), ANSI colours removed.
    pub text: String,
}

/// Parses `2025-01-01T12:00:00.123456Z  INFO message key=value`; `None` for other lines.
pub fn parse_log_line(line: &str) -> Option<LogLine> {
    let line = strip_ansi(line);
    let (stamp, rest) = line.trim_start().split_once(char::is_whitespace)?;
    let at = humantime::parse_rfc3339(stamp).ok()?;
    Some(LogLine {
        at,
        text: rest.trim().to_owned(),
    })
}

/// The lines of a log file that parse, in order (an unreadable file gives none).
pub fn read_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(parse_log_line)
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The first line at or after `after` whose text contains every one of `needles`.
pub fn find_line<'a>(
    lines: &'a [LogLine],
    after: SystemTime,
    needles: &[&str],
) -> Option<&'a LogLine> {
    lines
        .iter()
        .find(|l| l.at >= after && needles.iter().all(|n| l.text.contains(n)))
}

/// The milestones of one worker's start, as offsets in seconds from a zero (`None` where
/// the line was not found).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StartTimeline {
    /// The worker's address.
    pub worker: String,
    /// The balancer started the process ("started worker").
    pub spawned: Option<f64>,
    /// The worker bound its port ("listening for protocol connections").
    pub listening: Option<f64>,
    /// The ONNX session was built ("model loaded").
    pub model_loaded: Option<f64>,
    /// The warm-up batch ran ("model loaded and warmed up").
    pub warmed_up: Option<f64>,
    /// The batcher runs and the worker takes requests ("ready").
    pub serving: Option<f64>,
    /// The balancer accepted its registration ("registered with the balancer").
    pub registered: Option<f64>,
    /// Its health checks passed ("target health changed … healthy").
    pub healthy: Option<f64>,
    /// The autoscaler counted it ready ("worker ready"), on its next one-second tick.
    pub counted_ready: Option<f64>,
}

impl StartTimeline {
    /// Reads one worker's start from the balancer's log and the worker's own log. `addr`
    /// is the worker's address as the balancer logs it; offsets are from `zero`.
    pub fn read(
        addr: &str,
        balancer: &[LogLine],
        worker: &[LogLine],
        zero: SystemTime,
    ) -> StartTimeline {
        let off = |l: Option<&LogLine>| {
            l.map(|l| match l.at.duration_since(zero) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            })
        };
        let worker_field = format!("worker={addr}");
        let target_field = format!("target={addr}");
        let spawned_line = find_line(
            balancer,
            SystemTime::UNIX_EPOCH,
            &["started worker", &worker_field],
        );
        let from = spawned_line.map_or(SystemTime::UNIX_EPOCH, |l| l.at);
        let loaded = worker.iter().find(|l| {
            l.at >= from && l.text.contains("model loaded") && !l.text.contains("warmed up")
        });
        StartTimeline {
            worker: addr.to_owned(),
            spawned: off(spawned_line),
            listening: off(find_line(
                worker,
                from,
                &["listening for protocol connections"],
            )),
            model_loaded: off(loaded),
            warmed_up: off(find_line(worker, from, &["model loaded and warmed up"])),
            serving: off(worker.iter().find(|l| {
                l.at >= from && l.text.contains(" ready") && l.text.contains("max_batch")
            })),
            registered: off(find_line(worker, from, &["registered with the balancer"])),
            healthy: off(find_line(
                balancer,
                from,
                &["target health changed", &target_field, "to=healthy"],
            )),
            counted_ready: off(find_line(balancer, from, &["worker ready", &worker_field])),
        }
    }
}

/// The addresses of the workers the balancer started at or after `after`, in order.
pub fn started_workers(balancer: &[LogLine], after: SystemTime) -> Vec<String> {
    balancer
        .iter()
        .filter(|l| l.at >= after && l.text.contains("started worker"))
        .filter_map(|l| {
            l.text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("worker="))
                .map(str::to_owned)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: f64, ready: usize, coming: usize, leaving: usize) -> ScalingPoint {
        ScalingPoint {
            t,
            action_t: None,
            scaling: Scaling {
                ready,
                coming,
                leaving,
                ..Scaling::default()
            },
        }
    }

    fn span(addr: &str, from: f64, last_seen: f64) -> HealthySpan {
        HealthySpan {
            addr: addr.to_owned(),
            from,
            last_seen,
        }
    }

    #[test]
    fn time_to_ready_counts_from_the_step_to_enough_healthy_at_once() {
        let spans = [
            // Healthy before the step, gone before it: does not count at the step.
            span("a", 0.0, 0.9),
            span("b", 0.2, 9.0),
            span("c", 3.45, 9.0),
            span("d", 4.5, 9.0),
        ];
        assert_eq!(healthy_at(&spans, 1.0), 1);
        assert_eq!(time_to_ready(&spans, 1.0, 1), Some(0.0));
        assert!((time_to_ready(&spans, 1.0, 2).unwrap() - 2.45).abs() < 1e-9);
        assert!((time_to_ready(&spans, 1.0, 3).unwrap() - 3.5).abs() < 1e-9);
        assert_eq!(time_to_ready(&spans, 1.0, 4), None);
    }

    #[test]
    fn healthy_spans_begin_at_the_balancer_s_timestamp_and_end_when_unseen() {
        let zero = humantime::parse_rfc3339("2025-03-01T10:00:00Z").unwrap();
        let seen = |addr: &str, state: &str, since: &str| TargetSeen {
            addr: addr.to_owned(),
            state: state.to_owned(),
            since: since.to_owned(),
        };
        let (mut open, mut closed) = (Vec::new(), Vec::new());
        let a = seen("a", "healthy", "2025-03-01T10:00:00.250Z");
        track_healthy(std::slice::from_ref(&a), 1.0, zero, &mut open, &mut closed);
        let b = seen("b", "initial", "2025-03-01T10:00:01.000Z");
        track_healthy(&[a.clone(), b], 2.0, zero, &mut open, &mut closed);
        let b = seen("b", "healthy", "2025-03-01T10:00:02.340Z");
        track_healthy(std::slice::from_ref(&b), 3.0, zero, &mut open, &mut closed);
        assert_eq!(closed, vec![span("a", 0.25, 2.0)]);
        assert_eq!(open.len(), 1);
        assert!((open[0].2.from - 2.34).abs() < 1e-9);
        assert_eq!(open[0].2.last_seen, 3.0);
    }

    #[test]
    fn time_to_ask_reads_the_action_s_own_time() {
        let action = |to: usize| LastAction {
            action: ActionTaken {
                action: "scale_out".to_owned(),
                to: Some(to),
            },
            at: String::new(),
        };
        let mut points = vec![
            point(0.0, 1, 0, 0),
            point(1.5, 1, 0, 0),
            point(2.5, 1, 2, 0),
            point(3.5, 3, 0, 0),
        ];
        // An action before the step (to 2, at 0.5) does not count; the one to 3 was taken
        // at 1.3 s, polled at 1.5 s and still reported at 2.5 s and 3.5 s.
        points[1].scaling.last_action = Some(action(3));
        points[1].action_t = Some(1.3);
        points[0].scaling.last_action = Some(action(2));
        points[0].action_t = Some(0.5);
        for p in &mut points[2..] {
            p.scaling.last_action = Some(action(3));
            p.action_t = Some(1.3);
        }
        assert!((time_to_ask(&points, 1.0, 2).unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(time_to_ask(&points, 1.0, 4), None);
    }

    #[test]
    fn worker_seconds_hold_each_reading_until_the_next() {
        let points = [
            point(0.0, 1, 0, 0),
            point(10.0, 1, 1, 0),
            point(20.0, 2, 0, 1),
        ];
        // 10 s of 1, 10 s of 2, 10 s of 3.
        assert!((worker_seconds(&points, 0.0, 30.0) - 60.0).abs() < 1e-9);
        // Clipped to the window.
        assert!((worker_seconds(&points, 5.0, 15.0) - 15.0).abs() < 1e-9);
        assert_eq!(worker_seconds(&[], 0.0, 10.0), 0.0);
    }

    fn row(t: u64, p99: Option<f64>) -> SecondRow {
        SecondRow {
            t,
            profile_rate: 0.0,
            offered: 0,
            skipped: 0,
            ok: 0,
            errors: 0,
            errors_by: Default::default(),
            p50_ms: p99,
            p99_ms: p99,
            active_workers: 0,
        }
    }

    #[test]
    fn objective_share_skips_empty_seconds_and_the_drain() {
        let timeline = [
            row(0, Some(100.0)),
            row(1, None),
            row(2, Some(600.0)),
            row(3, Some(500.0)),
            row(4, Some(9000.0)),
        ];
        let share = ObjectiveShare::of(&timeline, 500.0, 4);
        assert_eq!(
            share,
            ObjectiveShare {
                judged: 3,
                met: 2,
                empty: 1
            }
        );
        assert!((share.percent() - 200.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn log_lines_with_and_without_colour() {
        let plain = "2025-03-01T10:00:01.250000Z  INFO tidepool_balancer::autoscale::actuator: started worker worker=127.0.0.1:4000 pid=7";
        let l = parse_log_line(plain).unwrap();
        assert_eq!(
            l.at,
            humantime::parse_rfc3339("2025-03-01T10:00:01.25Z").unwrap()
        );
        assert!(l.text.starts_with("INFO"));
        let coloured =
            "\u{1b}[2m2025-03-01T10:00:01.250000Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m started worker";
        assert_eq!(parse_log_line(coloured).unwrap().at, l.at);
        assert_eq!(parse_log_line("not a log line"), None);
        assert_eq!(
            started_workers(&[l], SystemTime::UNIX_EPOCH),
            vec!["127.0.0.1:4000".to_owned()]
        );
    }

    #[test]
    fn a_start_timeline_from_both_logs() {
        let at =
            |s: &str, text: &str| parse_log_line(&format!("2025-03-01T10:00:{s}Z {text}")).unwrap();
        let balancer = [
            at(
                "00.000000",
                "INFO started worker worker=127.0.0.1:4000 pid=7",
            ),
            at(
                "03.100000",
                "INFO target health changed target=127.0.0.1:4000 from=initial to=healthy",
            ),
            at(
                "03.500000",
                "INFO worker ready worker=127.0.0.1:4000 after=3.5s",
            ),
        ];
        let worker = [
            at(
                "00.050000",
                "INFO listening for protocol connections addr=127.0.0.1:4000",
            ),
            at("00.900000", "INFO model loaded model=m device=cpu"),
            at("01.200000", "INFO model loaded and warmed up elapsed=1.1s"),
            at("01.210000", "INFO ready max_batch=32"),
            at("01.300000", "INFO registered with the balancer url=x"),
        ];
        let zero = balancer[0].at;
        let t = StartTimeline::read("127.0.0.1:4000", &balancer, &worker, zero);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-6;
        assert!(close(t.spawned, 0.0));
        assert!(close(t.listening, 0.05));
        assert!(close(t.model_loaded, 0.9));
        assert!(close(t.warmed_up, 1.2));
        assert!(close(t.serving, 1.21));
        assert!(close(t.registered, 1.3));
        assert!(close(t.healthy, 3.1));
        assert!(close(t.counted_ready, 3.5));
    }
}
