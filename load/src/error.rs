//! The crate's one error type: what can stop a load run before or after it sends.
//!
//! Request failures are not errors here: they are outcomes, counted in the
//! [`Report`](crate::Report). An [`Error`] means the run could not be set up (a bad flag,
//! a target that does not accept connections) or its results could not be written.
//! Protocol errors are boxed: they are large, and these paths are cold.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in tidepool-load.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid --{flag}: {reason}")]
    InvalidConfig {
        /// The flag, without its dashes.
        flag: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// An `--input` specification could not be read.
    #[error("invalid --input {spec:?}: {reason}; expected NAME:DTYPE:DIMS such as input:f32:64 or image:u8:3x224x224")]
    InvalidInput {
        /// The specification as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--model` could not be loaded.
    #[cfg(feature = "onnx")]
    #[error("could not read the inputs of model {}: {source}", path.display())]
    Model {
        /// The model.
        path: std::path::PathBuf,
        /// What the worker's model loader said (boxed: it is large, and rare).
        #[source]
        source: Box<tidepool_worker::Error>,
    },
    /// A model input whose shape is not fixed, so no item can be shaped from it.
    #[error("model input {name:?} has a dynamic dimension besides the batch one ({shape}); give its shape with --input NAME:DTYPE:DIMS, or ask the target with --from-metadata (free lengths from --lengths)")]
    DynamicInput {
        /// The input.
        name: String,
        /// Its shape, `?` for dynamic dimensions.
        shape: String,
    },
    /// `--from-metadata`: the target did not describe its model.
    #[error("--from-metadata: {target} did not describe its model: {source} (is it a tidepool worker or balancer with a ready worker? else give --input NAME:DTYPE:DIMS)")]
    Metadata {
        /// The target.
        target: String,
        /// What the call said.
        #[source]
        source: Box<tidepool_protocol::Error>,
    },
    /// The connection pool holds no connection.
    #[error("no connection to the target is open")]
    NoConnection,
    /// `--model` without an ONNX Runtime library.
    #[error("--model needs the ONNX Runtime library: set ORT_DYLIB_PATH or pass --ort-lib (scripts/fetch-ort.sh fetches it)")]
    NoOrtLib,
    /// The target did not accept the pool's connections.
    #[error("could not connect to {target}: {source}")]
    Connect {
        /// The address given with `--target`.
        target: String,
        /// Why the connection failed.
        #[source]
        source: Box<tidepool_protocol::Error>,
    },
    /// `--wait-ready` passed without a `pong` from the target.
    #[error("{target} did not answer ping within {waited:?}{}", last.as_ref().map(|e| format!(" (last: {e})")).unwrap_or_default())]
    NotReady {
        /// The address given with `--target`.
        target: String,
        /// How long we waited.
        waited: Duration,
        /// The last ping's failure, when there was one.
        #[source]
        last: Option<Box<tidepool_protocol::Error>>,
    },
    /// A tensor could not be built from an `--input` specification.
    #[error("could not build tensor {name:?}: {source}")]
    Tensor {
        /// The input's name.
        name: String,
        /// What the protocol crate refused.
        #[source]
        source: Box<tidepool_protocol::Error>,
    },
    /// A result file could not be written.
    #[error("could not write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// A probe's `ping` got no `pong`: the target refused the connection, is not ready, or
    /// answered something else.
    #[error("ping {target}: {source}")]
    Ping {
        /// The address probed.
        target: String,
        /// What went wrong.
        #[source]
        source: Box<tidepool_protocol::Error>,
    },
    /// A probe's HTTP request could not be made or its response not read.
    #[error("GET {url}: {source}")]
    Http {
        /// The URL probed.
        url: String,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// A probe's `https://` request failed its TLS handshake: the server is not TLS, or its
    /// certificate is not signed by --tls-ca or does not name the host (--tls-server-name).
    #[error("GET {url}: {source}")]
    HttpTls {
        /// The URL probed.
        url: String,
        /// The handshake's failure.
        #[source]
        source: Box<tidepool_protocol::Error>,
    },
    /// A probe's HTTP response was not 2xx (`None`: not an HTTP response at all).
    #[error("GET {url}: {}", status.map(|s| format!("status {s}")).unwrap_or_else(|| "not an HTTP response".to_owned()))]
    HttpStatus {
        /// The URL probed.
        url: String,
        /// The status received.
        status: Option<u16>,
    },
    /// A probe URL is not `http://host:port/path`.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A probe did not finish within its timeout.
    #[error("{target} did not answer within {after:?}")]
    ProbeTimeout {
        /// The address or URL probed.
        target: String,
        /// The timeout.
        after: Duration,
    },
    /// The report could not be serialised as JSON.
    #[error("could not serialise the report as JSON: {0}")]
    Json(#[source] serde_json::Error),
}
