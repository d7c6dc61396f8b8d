//! Command-line configuration: one [`LoadConfig`] struct, flags with environment fallbacks.
//!
//! Every flag can also come from a `TIDEPOOL_LOAD_*` environment variable. Durations read
//! like `500ms` or `2m`. [`LoadConfig::validate`] runs before anything connects. Tests and
//! other programs build a config with [`LoadConfig::new`] and change the fields they need.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use tidepool_protocol::Priority;

use crate::error::Error;
use crate::input::InputSpec;
use crate::profile::RateProfile;
use crate::schedule::Arrivals;

/// Default `--rate`, items per second.
pub const DEFAULT_RATE: f64 = 100.0;
/// Default `--duration`.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);
/// Default `--concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 1024;
/// Default `--connections`.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Default `--input`: one f32 feature vector of 64, the input of the worker's synthetic
/// model (named `input`) when synthesised with `--input-dim 64`.
pub const DEFAULT_INPUT: &str = "input:f32:64";
/// Default `--items`.
pub const DEFAULT_ITEMS: usize = 16;
/// Default `--drain`.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
/// Default `--burst-every`.
pub const DEFAULT_BURST_EVERY: Duration = Duration::from_secs(20);
/// Default `--burst-length`.
pub const DEFAULT_BURST_LENGTH: Duration = Duration::from_secs(5);

/// The shape of the offered rate over the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileKind {
    /// `--rate` throughout.
    #[default]
    Constant,
    /// A day compressed into `--duration`: a tenth of `--rate` at night, a morning ramp,
    /// `--rate` at midday, an evening fall.
    Day,
    /// `--burst-base` with bursts to `--rate` lasting `--burst-length` every `--burst-every`.
    Burst,
}

/// tidepool-load: an open-loop load generator for tidepool (or any server of its protocol).
///
/// Sends are scheduled from the rate profile before the run and never wait for answers;
/// latency is measured from each request's intended send time, so a slow server shows up
/// as latency instead of as a quietly lower rate. A live line goes to stderr, the report
/// to stdout.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "tidepool-load", version)]
pub struct LoadConfig {
    /// Address of the balancer or worker, like 127.0.0.1:7000; several balancers
    /// comma-separated (a:7000,b:7000): connections are spread over them, and a call whose
    /// balancer is lost is sent again to another.
    #[arg(long, env = "TIDEPOOL_LOAD_TARGET")]
    pub target: String,

    /// Items per second: the constant rate, the day's midday peak, or the burst rate.
    #[arg(long, env = "TIDEPOOL_LOAD_RATE", default_value_t = DEFAULT_RATE)]
    pub rate: f64,

    /// How long to send for (in-flight requests then get up to --drain to finish).
    #[arg(long, env = "TIDEPOOL_LOAD_DURATION", value_parser = humantime::parse_duration,
          default_value = "60s")]
    #[serde(with = "secs")]
    pub duration: Duration,

    /// The shape of the rate over the run.
    #[arg(long, env = "TIDEPOOL_LOAD_PROFILE", value_enum, default_value_t = ProfileKind::Constant)]
    pub profile: ProfileKind,

    /// How sends are spread at a given rate: evenly, or as independent (Poisson) arrivals.
    #[arg(long, env = "TIDEPOOL_LOAD_ARRIVALS", value_enum, default_value_t = Arrivals::Poisson)]
    pub arrivals: Arrivals,

    /// Items per second between bursts (burst profile) [default: a tenth of --rate].
    #[arg(long, env = "TIDEPOOL_LOAD_BURST_BASE")]
    pub burst_base: Option<f64>,

    /// Time from the start of one burst to the next (burst profile).
    #[arg(long, env = "TIDEPOOL_LOAD_BURST_EVERY", value_parser = humantime::parse_duration,
          default_value = "20s")]
    #[serde(with = "secs")]
    pub burst_every: Duration,

    /// How long each burst lasts (burst profile); each period ends with its burst.
    #[arg(long, env = "TIDEPOOL_LOAD_BURST_LENGTH", value_parser = humantime::parse_duration,
          default_value = "5s")]
    #[serde(with = "secs")]
    pub burst_length: Duration,

    /// Most requests in flight at once. A send that falls due while this many are in
    /// flight is not sent and is counted as "skipped (concurrency cap)": the schedule
    /// never slips, so the cap cannot hide overload as a lower offered rate.
    #[arg(long, env = "TIDEPOOL_LOAD_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,

    /// Per-request deadline, counted from each request's intended send time like its latency:
    /// a request the driver sends late carries only what is left of it as deadline_ms (none
    /// left: answered deadline_exceeded here, unsent); enforced here too [default: none].
    #[arg(long, env = "TIDEPOOL_LOAD_DEADLINE", value_parser = humantime::parse_duration)]
    #[serde(with = "opt_secs")]
    pub deadline: Option<Duration>,

    /// Priority class of every request: low, normal or high.
    #[arg(long, env = "TIDEPOOL_LOAD_PRIORITY", default_value = "normal", value_parser = parse_priority)]
    #[serde(serialize_with = "priority_str")]
    pub priority: Priority,

    /// Tenant of every request (`tenant`), for a worker that shares its queue between
    /// tenants (`--fairness tenant`): run one load per tenant to see them share it.
    #[arg(long, env = "TIDEPOOL_LOAD_TENANT")]
    pub tenant: Option<String>,

    /// Connections to the target; each request goes on the least busy one.
    #[arg(long, env = "TIDEPOOL_LOAD_CONNECTIONS", default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,

    /// One model input as NAME:DTYPE:DIMS (repeat for several inputs), without the batch
    /// dimension: input:f32:64, pixel_values:u8:3x224x224, ids:i64:16. The data is random
    /// from --seed; nothing is asked of the server. The default fits
    /// `tidepool-worker synth --input-dim 64`; a synthetic model of another width takes
    /// input:f32:WIDTH (`synth` prints it), any other model its own inputs.
    #[arg(long = "input", env = "TIDEPOOL_LOAD_INPUT", value_delimiter = ' ',
          default_value = DEFAULT_INPUT)]
    #[serde(serialize_with = "display_all")]
    pub inputs: Vec<InputSpec>,

    /// Shape the items from this ONNX model's inputs instead of --input: its names,
    /// dtypes and shapes, without the batch dimension (loads the model with ONNX Runtime,
    /// so it needs ORT_DYLIB_PATH or --ort-lib; every input's shape must be fixed). Needs the
    /// `onnx` cargo feature, on by default.
    #[arg(long, env = "TIDEPOOL_LOAD_MODEL", conflicts_with = "inputs")]
    #[serde(skip)]
    pub model: Option<std::path::PathBuf>,

    /// Shape the items from the target's answer to `metadata` (the model's inputs, dtypes and
    /// per-item shapes) instead of --input: nothing to open, and it works through a
    /// balancer. Dynamic dimensions (a sentence's length) take lengths from --lengths;
    /// inputs named like a mask are all ones.
    #[arg(long, env = "TIDEPOOL_LOAD_FROM_METADATA", conflicts_with_all = ["inputs", "model"])]
    pub from_metadata: bool,

    /// With --from-metadata, the length of each dynamic dimension: N, or MIN..MAX for
    /// lengths drawn uniformly per item (mixed-length traffic, as text models get).
    #[arg(long, env = "TIDEPOOL_LOAD_LENGTHS", default_value = "16", value_parser = parse_lengths)]
    pub lengths: (usize, usize),

    /// The ONNX Runtime library, for --model.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    #[serde(skip)]
    pub ort_lib: Option<std::path::PathBuf>,

    /// Distinct random items to send in turn.
    #[arg(long, env = "TIDEPOOL_LOAD_ITEMS", default_value_t = DEFAULT_ITEMS)]
    pub items: usize,

    /// Seed for the input data and for Poisson arrivals: the same seed, the same run.
    #[arg(long, env = "TIDEPOOL_LOAD_SEED", default_value_t = 0)]
    pub seed: u64,

    /// After --duration, how long in-flight requests may still take before they are
    /// abandoned and counted as "unanswered".
    #[arg(long, env = "TIDEPOOL_LOAD_DRAIN", value_parser = humantime::parse_duration,
          default_value = "10s")]
    #[serde(with = "secs")]
    pub drain: Duration,

    /// Before sending, ping the target until it answers pong, for up to this long; a
    /// target that stays unready is a setup failure (0s: no ping).
    #[arg(long, env = "TIDEPOOL_LOAD_WAIT_READY", value_parser = humantime::parse_duration,
          default_value = "0s")]
    #[serde(with = "secs")]
    pub wait_ready: Duration,

    /// Also write the report as JSON to FILE ("-" for stdout, which moves the table to
    /// stderr).
    #[arg(long, env = "TIDEPOOL_LOAD_JSON")]
    pub json: Option<PathBuf>,

    /// Write one CSV row per second to FILE (t, rates, p50, p99, errors, active workers),
    /// and a plot of it as an SVG next to it (FILE with the extension .svg).
    #[arg(long, env = "TIDEPOOL_LOAD_TIMELINE")]
    pub timeline: Option<PathBuf>,

    /// No live line on stderr.
    #[arg(long, short, env = "TIDEPOOL_LOAD_QUIET")]
    pub quiet: bool,

    /// Connect over TLS, trusting this CA bundle (PEM); the target's certificate must
    /// name --tls-server-name, or else the host of --target.
    #[arg(long, env = "TIDEPOOL_LOAD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The name the target's certificate must carry [default: the host of --target].
    #[arg(long, env = "TIDEPOOL_LOAD_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

impl LoadConfig {
    /// The defaults of every flag, aimed at `target`; the live line is off.
    pub fn new(target: impl Into<String>) -> Self {
        LoadConfig {
            target: target.into(),
            rate: DEFAULT_RATE,
            duration: DEFAULT_DURATION,
            profile: ProfileKind::Constant,
            arrivals: Arrivals::Poisson,
            burst_base: None,
            burst_every: DEFAULT_BURST_EVERY,
            burst_length: DEFAULT_BURST_LENGTH,
            concurrency: DEFAULT_CONCURRENCY,
            deadline: None,
            priority: Priority::Normal,
            tenant: None,
            connections: DEFAULT_CONNECTIONS,
            inputs: vec![InputSpec {
                name: "input".to_owned(),
                dtype: tidepool_protocol::DType::F32,
                shape: vec![64],
            }],
            model: None,
            from_metadata: false,
            lengths: (16, 16),
            // As the command line does: the library comes from the environment.
            ort_lib: std::env::var_os("ORT_DYLIB_PATH").map(Into::into),
            items: DEFAULT_ITEMS,
            seed: 0,
            drain: DEFAULT_DRAIN,
            wait_ready: Duration::ZERO,
            json: None,
            timeline: None,
            quiet: true,
            tls_ca: None,
            tls_server_name: None,
        }
    }

    /// Checks every value before anything connects.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |flag, reason: &str| {
            Err(Error::InvalidConfig {
                flag,
                reason: reason.to_owned(),
            })
        };
        if self.target.trim().is_empty() {
            return invalid("target", "give the address of a balancer or worker");
        }
        if let Some(tenant) = &self.tenant {
            if let Err(why) = tidepool_protocol::tenant::check(tenant.as_bytes()) {
                return invalid(
                    "tenant",
                    &format!("{tenant:?} {why}; servers take 1 to 64 bytes of UTF-8 without control characters"),
                );
            }
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return invalid("rate", "must be a positive number of items per second");
        }
        if self.duration.is_zero() {
            return invalid("duration", "must be longer than zero");
        }
        if let Some(base) = self.burst_base {
            if !(base.is_finite() && base >= 0.0) {
                return invalid("burst-base", "must be zero or a positive rate");
            }
        }
        if self.profile == ProfileKind::Burst {
            if self.burst_every.is_zero() {
                return invalid("burst-every", "must be longer than zero");
            }
            if self.burst_length > self.burst_every {
                return invalid("burst-length", "must not exceed --burst-every");
            }
        }
        if self.concurrency == 0 {
            return invalid("concurrency", "must allow at least one request in flight");
        }
        if self.connections == 0 {
            return invalid("connections", "must be at least 1");
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return invalid("deadline", "must be longer than zero (or left out)");
        }
        if self.inputs.is_empty() {
            return invalid("input", "give at least one input");
        }
        if self.items == 0 {
            return invalid("items", "must be at least 1");
        }
        if self.lengths.0 == 0 || self.lengths.0 > self.lengths.1 {
            return invalid("lengths", "expected N or MIN..MAX with 1 <= MIN <= MAX");
        }
        if !cfg!(feature = "onnx") && self.model.is_some() {
            return invalid(
                "model",
                "this tidepool-load was built without the `onnx` feature, so it cannot read a model; \
                 give the inputs with --input NAME:DTYPE:DIMS, or rebuild with the default features \
                 (cargo build -p tidepool-load)",
            );
        }
        Ok(())
    }

    /// The rate profile these flags describe.
    pub fn rate_profile(&self) -> RateProfile {
        match self.profile {
            ProfileKind::Constant => RateProfile::Constant { rate: self.rate },
            ProfileKind::Day => RateProfile::Day {
                peak: self.rate,
                day: self.duration,
            },
            ProfileKind::Burst => RateProfile::Burst {
                base: self.burst_base.unwrap_or(self.rate / 10.0),
                peak: self.rate,
                every: self.burst_every,
                length: self.burst_length,
            },
        }
    }
}

/// Parses `--lengths`: `N` or `MIN..MAX`.
fn parse_lengths(s: &str) -> Result<(usize, usize), String> {
    let number = |n: &str| {
        n.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: expected N or MIN..MAX, like 16 or 8..128"))
    };
    match s.split_once("..") {
        Some((low, high)) => Ok((number(low)?, number(high)?)),
        None => number(s).map(|n| (n, n)),
    }
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    Priority::from_wire(s.as_bytes())
        .ok_or_else(|| format!("{s:?} is not a priority; expected low, normal or high"))
}

fn priority_str<S: serde::Serializer>(p: &Priority, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.as_str())
}

fn display_all<S: serde::Serializer>(inputs: &[InputSpec], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(inputs.iter().map(ToString::to_string))
}

mod secs {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

mod opt_secs {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_refused_only_without_the_onnx_feature() {
        let mut config = LoadConfig::new("h:1");
        config.model = Some("model.onnx".into());
        match (cfg!(feature = "onnx"), config.validate()) {
            (true, result) => result.unwrap(),
            (false, Err(Error::InvalidConfig { flag, reason })) => {
                assert_eq!(flag, "model");
                assert!(reason.contains("`onnx` feature"), "{reason}");
                assert!(reason.contains("--input NAME:DTYPE:DIMS"), "{reason}");
            }
            (false, other) => panic!("--model without the onnx feature: {other:?}"),
        }
    }

    #[test]
    fn new_matches_the_command_line_defaults() {
        let parsed = LoadConfig::try_parse_from(["tidepool-load", "--target", "h:1"]).unwrap();
        let mut built = LoadConfig::new("h:1");
        built.quiet = false;
        // Debug output covers every field.
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
    }

    #[test]
    fn parses_flags() {
        let c = LoadConfig::try_parse_from([
            "tidepool-load",
            "--target",
            "127.0.0.1:7000",
            "--rate",
            "250",
            "--duration",
            "2m",
            "--profile",
            "day",
            "--deadline",
            "250ms",
            "--input",
            "x:f32:8",
            "--input",
            "mask:i64:4",
        ])
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.duration, Duration::from_secs(120));
        assert_eq!(c.deadline, Some(Duration::from_millis(250)));
        assert_eq!(c.inputs.len(), 2);
        assert_eq!(
            c.rate_profile(),
            RateProfile::Day {
                peak: 250.0,
                day: Duration::from_secs(120)
            }
        );
    }

    #[test]
    fn validate_refuses_nonsense() {
        let base = LoadConfig::new("h:1");
        type Change = Box<dyn Fn(&mut LoadConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("rate", Box::new(|c| c.rate = 0.0)),
            ("rate", Box::new(|c| c.rate = f64::NAN)),
            ("duration", Box::new(|c| c.duration = Duration::ZERO)),
            ("concurrency", Box::new(|c| c.concurrency = 0)),
            ("tenant", Box::new(|c| c.tenant = Some(String::new()))),
            ("tenant", Box::new(|c| c.tenant = Some("x".repeat(65)))),
            ("connections", Box::new(|c| c.connections = 0)),
            ("deadline", Box::new(|c| c.deadline = Some(Duration::ZERO))),
            ("input", Box::new(|c| c.inputs.clear())),
            (
                "burst-length",
                Box::new(|c| {
                    c.profile = ProfileKind::Burst;
                    c.burst_length = Duration::from_secs(30);
                }),
            ),
        ];
        for (flag, change) in cases {
            let mut c = base.clone();
            change(&mut c);
            match c.validate() {
                Err(Error::InvalidConfig { flag: f, .. }) => assert_eq!(f, flag),
                other => panic!("{flag}: {other:?}"),
            }
        }
    }

    #[test]
    fn burst_base_defaults_to_a_tenth() {
        let mut c = LoadConfig::new("h:1");
        c.profile = ProfileKind::Burst;
        c.rate = 500.0;
        assert!(matches!(
            c.rate_profile(),
            RateProfile::Burst { base, peak, .. } if base == 50.0 && peak == 500.0
        ));
    }
}
