//! # tidepool-load
//!
//! An open-loop load generator for tidepool's protocol: point it at a balancer or a
//! worker, give it a rate profile, and it reports what the server did with the load.
//!
//! ## How a run goes
//! 1. [`LoadConfig`] is validated, the items to send are built from `--input` with a
//!    seeded RNG ([`input`]), and a [`Pool`](tidepool_protocol::Pool) of connections is
//!    opened. Failing here is the only way [`run`] fails.
//! 2. The [`schedule`] lists every intended send time from the [`profile`] (constant, a
//!    compressed day, or bursts) before anything is sent. The run loop sleeps to each time
//!    and spawns the request on its own task; it never waits for answers, so a slow
//!    server cannot slow the load (open loop). When `--concurrency` requests are already
//!    in flight, a due send is counted as *skipped* instead of delayed.
//! 3. Each request's latency runs from its *intended* send time to its answer, so any
//!    delay in sending counts against the server, not in its favour (no coordinated
//!    omission). The `recorder` tallies outcomes ([`Outcome`]: ok, each protocol error
//!    code, a lost connection, unanswered) into HDR histograms, whole-run and per second.
//! 4. The `live` line shows each second as it closes. After the schedule, in-flight
//!    requests get `--drain` to finish; the rest are abandoned (and cancelled on the
//!    wire).
//! 5. The [`Report`] is a table (`Display`), JSON (`--json`), a per-second CSV timeline
//!    and an SVG [`plot`] of it (`--timeline`).
//!
//! ## Limits worth knowing
//! - Sends wake on tokio's timer, which has millisecond resolution: at high rates sends
//!   leave in small bursts, and each latency includes up to about a millisecond of timer
//!   lag (counted against the server, as the open-loop rule wants).
//! - Lost connections are not reopened: once every connection of the pool has closed,
//!   the rest of the schedule is counted as `connection_lost`. Behind a balancer a worker's
//!   death does not close the client's connection, so this only matters when loading a
//!   worker directly.
//! - The latency percentiles cover results only; errors are counted by outcome, with the
//!   first message of each in the report.
//!
//! ## Modules
//! - [`config`]: [`LoadConfig`], the flags (clap, `TIDEPOOL_LOAD_*` environment).
//! - [`profile`]: [`RateProfile`], the offered rate as a pure function of time.
//! - [`schedule`]: [`Schedule`], intended send times, uniform or Poisson.
//! - [`input`]: `--input NAME:DTYPE:DIMS` and the random items built from it.
//! - [`outcome`]: [`Outcome`], how a request ended.
//! - `recorder`: the tallies (crate-private).
//! - [`report`]: [`Report`] and its table, JSON and CSV forms.
//! - [`plot`]: the timeline as SVG.
//! - [`probe`]: one-shot `ping` and HTTP probes for container healthchecks
//!   (`tidepool-probe`).
//! - `live`: the once-a-second progress line (crate-private).
//! - [`error`]: [`Error`], the crate's one error type.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod input;
mod live;
pub mod outcome;
pub mod plot;
pub mod probe;
pub mod profile;
mod recorder;
pub mod report;
mod run;
pub mod schedule;

pub use config::{LoadConfig, ProfileKind};
pub use error::Error;
pub use input::InputSpec;
pub use outcome::Outcome;
pub use profile::RateProfile;
pub use report::{Goodput, LatencySummary, Report, RunInfo, SecondRow, WorkerShare};
pub use run::run;
pub use schedule::{Arrivals, Schedule};
pub use tokio_util::sync::CancellationToken;
