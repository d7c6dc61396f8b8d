//! The worker's error type.
//!
//! One enum for the whole crate. Two families share it: what stops the worker from starting
//! or running (configuration, the ONNX Runtime library, the model file, sockets), and what is
//! wrong with one request (an input that does not fit the model). [`Error::code`] maps each
//! to the protocol's [`ErrorCode`], so a per-request error is answered with the right code and
//! a message that says what differs.

use std::net::SocketAddr;
use std::path::PathBuf;

use tidepool_protocol::{DType, ErrorCode};

/// Everything that can go wrong in tidepool-worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A flag's value is not acceptable; found by [`ServeConfig::validate`](crate::ServeConfig::validate)
    /// before anything is bound or loaded.
    #[error("invalid --{flag}: {reason}")]
    InvalidConfig {
        /// The flag, without its dashes.
        flag: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// No ONNX Runtime library was named.
    #[error(
        "no ONNX Runtime library given: pass --ort-lib PATH or set ORT_DYLIB_PATH \
         (scripts/fetch-ort.sh, or `make ort`, downloads it into .ort/ and prints its path)"
    )]
    OrtLibMissing,
    /// The named ONNX Runtime library does not exist.
    #[error(
        "ONNX Runtime library {path} does not exist \
         (scripts/fetch-ort.sh, or `make ort`, downloads it into .ort/ and prints its path)"
    )]
    OrtLibNotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The ONNX Runtime library could not be loaded.
    #[error("could not load the ONNX Runtime library {path}: {source}")]
    OrtLoad {
        /// The path given.
        path: PathBuf,
        /// What the loader said.
        #[source]
        source: ort::LoadDynamicError,
    },
    /// The process-wide ONNX Runtime environment could not be created.
    #[error("could not create the ONNX Runtime environment: {0}")]
    Environment(#[source] ort::Error),
    /// The process already loaded a different ONNX Runtime library; one process holds one.
    #[error(
        "ONNX Runtime is already loaded from {loaded}; cannot load {wanted} as well in one process"
    )]
    OrtLibConflict {
        /// The library in use.
        loaded: PathBuf,
        /// The library asked for.
        wanted: PathBuf,
    },
    /// `--device cuda` in a build without the `cuda` feature.
    #[error("--device cuda needs a worker built with the `cuda` cargo feature (cargo build -p tidepool-worker --features cuda)")]
    CudaNotBuilt,
    /// `--device cuda`, and the CUDA execution provider would not register.
    #[error("--device cuda: the CUDA execution provider could not be registered ({0}); is the GPU build of ONNX Runtime (ORT_FLAVOR=gpu scripts/fetch-ort.sh) with its CUDA libraries on the library path?")]
    CudaUnavailable(#[source] ort::Error),
    /// The runtime's threads could not be given their `--runtime-nice` priority.
    #[error("could not {what} (--runtime-nice; 0 leaves the threads as they are): {source}")]
    Nice {
        /// What was being done.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Setting a session option failed.
    #[error("could not configure the ONNX Runtime session ({what}): {source}")]
    SessionOptions {
        /// The option being set.
        what: &'static str,
        /// What ONNX Runtime said.
        #[source]
        source: ort::Error,
    },
    /// TLS could not be set up from its files.
    #[error("could not set up TLS for the {side}: {source}")]
    Tls {
        /// Which side (`protocol listener`, `registration`).
        side: &'static str,
        /// What is wrong, naming the file (boxed: the enum stays small).
        #[source]
        source: Box<tidepool_protocol::Error>,
    },
    /// The model file could not be loaded.
    #[error("could not load model {path}: {source}")]
    ModelLoad {
        /// The model path.
        path: PathBuf,
        /// What ONNX Runtime said.
        #[source]
        source: ort::Error,
    },
    /// The model uses something the worker cannot serve.
    #[error("model input or output {name:?} cannot be served: {reason}")]
    UnsupportedModel {
        /// The input or output.
        name: String,
        /// What about it is unsupported.
        reason: &'static str,
    },
    /// A model run failed.
    #[error("inference failed: {0}")]
    Inference(#[source] ort::Error),
    /// A model output did not have the batch size the batch had.
    #[error(
        "model output {name:?} has leading dimension {got}, but the batch held {expected} items"
    )]
    OutputBatch {
        /// The output.
        name: String,
        /// The batch's size.
        expected: usize,
        /// The output's leading dimension.
        got: usize,
    },
    /// A tensor could not be built (a shape and length that disagree); a bug if it happens.
    #[error("could not build tensor {name:?}: {source}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What the protocol crate said.
        #[source]
        source: tidepool_protocol::Error,
    },

    /// A request lacks one of the model's inputs.
    #[error("missing input {name:?}; the model takes {expected}")]
    MissingInput {
        /// The input's name.
        name: String,
        /// The model's inputs, described.
        expected: String,
    },
    /// A request has an input the model does not take.
    #[error("unknown input {name:?}; the model takes {expected}")]
    UnknownInput {
        /// The name sent.
        name: String,
        /// The model's inputs, described.
        expected: String,
    },
    /// An input has the wrong element type.
    #[error("input {name:?} has dtype {got}, the model wants {expected}")]
    InputDType {
        /// The input.
        name: String,
        /// The model's dtype.
        expected: DType,
        /// The dtype sent.
        got: DType,
    },
    /// An input has the wrong shape.
    #[error("input {name:?} has shape {got:?}, the model wants {expected} per item (without the batch dimension)")]
    InputShape {
        /// The input.
        name: String,
        /// The model's per-item shape, `?` for a free dimension.
        expected: String,
        /// The shape sent.
        got: Vec<usize>,
    },
    /// Two input dimensions with one symbolic name have different lengths in one item.
    #[error("input {name:?} has {symbol} length {len}, but input {first:?} has {first_len}; dimensions named {symbol:?} must agree within one item")]
    LengthMismatch {
        /// The dimension's symbolic name.
        symbol: String,
        /// The input that set the length.
        first: String,
        /// Its length.
        first_len: usize,
        /// The input that disagrees.
        name: String,
        /// Its length.
        len: usize,
    },
    /// A configured pad value does not fit the model.
    #[error("pad value for input {name:?}: {reason}")]
    PadValue {
        /// The input named.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A model output along a padded dimension is shorter than an item's own length.
    #[error("model output {name:?} has length {got} along {symbol:?}, shorter than an item's {expected}; set `padding: false` for this model")]
    OutputLength {
        /// The output.
        name: String,
        /// The padded dimension's name.
        symbol: String,
        /// The item's length.
        expected: usize,
        /// The output's length in the batch.
        got: usize,
    },
    /// A batch held items of different shapes for a model that is not padded.
    #[error("a batch held items whose input {name:?} differs in shape, and the model is not padded; this is a bug in the batcher")]
    MixedShapes {
        /// The input.
        name: String,
    },
    /// The model's config file could not be read.
    #[error("could not read model config {path}: {reason}")]
    ModelConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A socket could not be bound.
    #[error("could not bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Accepting or serving connections failed.
    #[error("i/o error on {addr}: {source}")]
    Io {
        /// The local address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `--exit-with-parent`: the thread that watches standard input could not be started.
    #[error("--exit-with-parent: could not start watching standard input: {0}")]
    ParentWatch(#[source] std::io::Error),
    /// The model thread could not be started, or ended without saying why.
    #[error("model thread: {0}")]
    ModelThread(&'static str),
    /// Writing a synthetic model failed.
    #[error("could not write synthetic model {path}: {source}")]
    Synth {
        /// The output path.
        path: PathBuf,
        /// What ONNX Runtime said.
        #[source]
        source: ort::Error,
    },
    /// A file system operation around the synthetic model failed.
    #[error("could not write synthetic model {path}: {source}")]
    SynthIo {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The protocol code a request failing with this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::MissingInput { .. }
            | Error::UnknownInput { .. }
            | Error::InputDType { .. }
            | Error::InputShape { .. }
            | Error::LengthMismatch { .. } => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }
}
