//! The model: an ONNX Runtime session, reading its inputs and outputs into a [`ModelSpec`],
//! and one batch run.
//!
//! Nothing here is async. [`Model::load`] loads the ONNX Runtime library (once per process),
//! opens the model (with its external data, which ONNX Runtime finds next to the file) on the
//! chosen device, and reads its inputs and outputs into a [`ModelSpec`] (the contract, in
//! [`crate::spec`]). The spec is shared with the connections, which check every item against
//! it before it is queued; the session itself belongs to the model thread, which runs it as
//! the batcher's [`Engine`].
//!
//! Each item's bytes are copied exactly once, into the batch tensor, by the [`ModelStager`] on
//! the batcher task (see [`crate::staging`]); each output is copied once on the model thread,
//! out of ONNX Runtime's buffer (which borrows the session) into one buffer that the items'
//! answers share as slices. A padded output is then copied once more, by the stager, into
//! each item's own answer cut to its length: outputs are small next to inputs, and the
//! model thread is the one thread the worker cannot add more of.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::builder::SessionBuilder;
use ort::session::Session;
use ort::value::{DynTensor, DynValue, Outlet, Tensor as OrtTensor, TensorElementType, ValueType};
use tidepool_protocol::{DType, Tensor, Tensors};
use tracing::{info, warn};

use crate::batcher::{Engine, Stager};
use crate::clock::BatchClock;
use crate::config::DeviceChoice;
use crate::cost::BatchCost;
use crate::error::Error;
use crate::pad;
use crate::spec::{IoSpec, ModelSpec, PaddingOptions};

#[cfg(not(target_endian = "little"))]
compile_error!("the worker copies little-endian wire bytes straight into ONNX Runtime tensors and needs a little-endian target");

/// The device a session runs on, once chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// ONNX Runtime's CUDA execution provider.
    Cuda,
}

impl Device {
    /// `"cpu"` or `"cuda"`, as logged and exported.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// The process's ONNX Runtime environment: ONNX Runtime allows one per process, so every
/// model (and every worker started in one test process) shares it.
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads the ONNX Runtime library at `lib` and returns the process's environment, creating it
/// on first use. Later calls must name the same library.
pub fn environment(lib: &Path) -> Result<Environment, Error> {
    // A std mutex held only for this synchronous initialisation, never across an await.
    let mut guard = ENVIRONMENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((loaded, env)) = guard.as_ref() {
        if !same_file(loaded, lib) {
            return Err(Error::OrtLibConflict {
                loaded: loaded.clone(),
                wanted: lib.to_path_buf(),
            });
        }
        return Ok(env.clone());
    }
    if !lib.is_file() {
        return Err(Error::OrtLibNotFound {
            path: lib.to_path_buf(),
        });
    }
    let env = ort::init_from(lib)
        .map_err(|source| Error::OrtLoad {
            path: lib.to_path_buf(),
            source,
        })?
        .with_name("tidepool-worker")
        .build()
        .map_err(Error::Environment)?;
    *guard = Some((lib.to_path_buf(), env.clone()));
    Ok(env)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// How to open a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The `.onnx` file.
    pub path: PathBuf,
    /// The ONNX Runtime shared library.
    pub ort_lib: PathBuf,
    /// Where to run it.
    pub device: DeviceChoice,
    /// Intra-op threads; `None` leaves ONNX Runtime's default.
    pub threads: Option<usize>,
    /// Whether ONNX Runtime's intra-op threads spin while waiting for work; `None` leaves
    /// ONNX Runtime's default (they spin).
    pub spinning: Option<bool>,
    /// What the operator says about padding items of different lengths.
    pub padding: PaddingOptions,
}

/// The shapes warm-up runs before the worker reports ready: the ones real traffic will use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmUp {
    /// The largest batch the batcher will form.
    pub max_batch: usize,
    /// Lengths given to the dynamic dimensions past the batch one (ignored when the model has
    /// none).
    pub lengths: Vec<usize>,
    /// The batcher's token budget: a batch of long items is cut to fit it.
    pub max_batch_tokens: Option<usize>,
}

impl WarmUp {
    /// One item and a batch of `max_batch`, dynamic dimensions at length 1, no token budget.
    pub fn batch(max_batch: usize) -> WarmUp {
        WarmUp {
            max_batch,
            lengths: Vec::new(),
            max_batch_tokens: None,
        }
    }
}

/// A loaded model: the session, its spec and its device.
pub struct Model {
    session: Session,
    spec: Arc<ModelSpec>,
    device: Device,
    identity: Identity,
    /// How batches on this session are timed: its thread's CPU time with one CPU thread.
    clock: BatchClock,
}

/// What identifies a loaded model file, for its metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// `sha256:` and the hex digest of the `.onnx` file (external data files are not
    /// included); `None` when the file could not be read again.
    pub hash: Option<String>,
    /// The ONNX file's own `model_version`, when it sets one.
    pub onnx_version: Option<i64>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads the model and reads its inputs and outputs. Blocks for as long as loading takes
    /// (seconds for a large model): call it off the async runtime.
    pub fn load(options: &LoadOptions) -> Result<Model, Error> {
        let env = environment(&options.ort_lib)?;
        let (mut builder, device) = session_builder(&env, options)?;
        let session =
            builder
                .commit_from_file(&options.path)
                .map_err(|source| Error::ModelLoad {
                    path: options.path.clone(),
                    source,
                })?;
        let inputs = session
            .inputs()
            .iter()
            .map(io_spec)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(io_spec)
            .collect::<Result<Vec<_>, _>>()?;
        let spec = Arc::new(ModelSpec::new(inputs, outputs).with_padding(&options.padding)?);
        info!(
            model = %options.path.display(),
            device = device.as_str(),
            batched = spec.batched,
            inputs = %spec.describe_inputs(),
            padding = %spec.padding_note,
            "model loaded"
        );
        if !spec.batched {
            warn!("the model's leading dimension is fixed: every item runs alone (batch size 1)");
        }
        let identity = Identity {
            hash: file_hash(&options.path),
            // ONNX writes 0 when no version was set.
            onnx_version: session
                .metadata()
                .ok()
                .and_then(|m| m.version())
                .filter(|&v| v != 0),
        };
        Ok(Model {
            session,
            spec,
            device,
            identity,
            clock: BatchClock::for_session(device, options.threads),
        })
    }

    /// What identifies the model file.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// What the model takes and gives.
    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.spec
    }

    /// The device in use.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs batches of zeros in the shapes real traffic will use (one item and a full batch
    /// at each length), so that the first real batches do not pay for lazy initialisation
    /// and the memory arenas are sized for the largest batch; the worker reports ready only
    /// after it. Returns the batch sizes and lengths run.
    pub fn warm_up(&mut self, plan: &WarmUp) -> Result<Vec<(usize, usize)>, Error> {
        let lengths = self.lengths(plan);
        let max_batch = self.spec.batch_limit(plan.max_batch);
        let mut ran = Vec::new();
        for len in lengths {
            let item = self.spec.zero_item(len)?;
            let tokens = self.spec.fit(&item).tokens;
            let full = plan
                .max_batch_tokens
                .map_or(max_batch, |budget| (budget / tokens).clamp(1, max_batch));
            let mut sizes = vec![1, full];
            sizes.dedup();
            for size in sizes {
                let batch: Vec<&Tensors> = std::iter::repeat_n(&item, size).collect();
                self.run(&batch)?;
                ran.push((size, len));
            }
        }
        Ok(ran)
    }

    /// The lengths `plan` runs: its own for a model with dynamic dimensions, else just 1.
    fn lengths(&self, plan: &WarmUp) -> Vec<usize> {
        let dynamic = self
            .spec
            .inputs
            .iter()
            .any(|io| io.item_dims(self.spec.batched).iter().any(Option::is_none));
        if dynamic && !plan.lengths.is_empty() {
            plan.lengths.clone()
        } else {
            vec![1]
        }
    }

    /// Times interleaved batches of one item and full batches ([`crate::cost::measure`]) at
    /// the first length warm-up ran, for the load share's [`BatchCost`]. Run it after
    /// [`Model::warm_up`], so that no timed batch pays for lazy initialisation.
    pub fn batch_cost(&mut self, plan: &WarmUp) -> Result<BatchCost, Error> {
        let len = self.lengths(plan)[0];
        let item = self.spec.zero_item(len)?;
        let tokens = self.spec.fit(&item).tokens.max(1);
        let max_batch = self.spec.batch_limit(plan.max_batch);
        let full = plan
            .max_batch_tokens
            .map_or(max_batch, |budget| (budget / tokens).clamp(1, max_batch));
        let cost = crate::cost::measure(full, self.clock, |size| {
            let batch: Vec<&Tensors> = std::iter::repeat_n(&item, size).collect();
            self.run(&batch).map(drop)
        })?;
        if full == max_batch || full <= 1 {
            return Ok(
                BatchCost::new(max_batch, if full <= 1 { 0.0 } else { cost.single() })
                    .with_full_batch(cost.full_batch().filter(|_| full == max_batch))
                    .timed_by(cost.clock()),
            );
        }
        // The token budget cut the timed batch short of --max-batch: extend its straight line
        // to a full batch, which shorter items can fill.
        let s = cost.single();
        let at_max = s + (1.0 - s) * (max_batch - 1) as f64 / (full - 1) as f64;
        let full_time = cost
            .full_batch()
            .and_then(|d| std::time::Duration::try_from_secs_f64(d.as_secs_f64() * at_max).ok());
        Ok(BatchCost::new(max_batch, s / at_max)
            .with_full_batch(full_time)
            .timed_by(cost.clock()))
    }
}

impl Model {
    /// Runs one batch of checked items that share a [`crate::Fit::key`] on this thread
    /// (forming, running and splitting it) and returns each item's outputs, in order. The
    /// batcher does the same in three places; this is for warm-up, tests and benchmarks.
    pub fn run(&mut self, items: &[&Tensors]) -> Result<Vec<Tensors>, Error> {
        let stager = self.stager();
        let input = stager.form(items)?;
        let output = self.run_batch(input)?;
        stager.split(output)
    }
}

impl Engine for Model {
    type Stager = ModelStager;

    fn stager(&self) -> ModelStager {
        ModelStager {
            spec: Arc::clone(&self.spec),
        }
    }

    fn run_batch(&mut self, input: BatchInput) -> Result<BatchOutput, Error> {
        let BatchInput {
            values,
            items,
            lengths,
        } = input;
        let spec = &self.spec;
        if items == 0 {
            return Ok(BatchOutput {
                outputs: Vec::new(),
                items,
                lengths,
            });
        }
        let outputs = self.session.run(values).map_err(Error::Inference)?;
        // One copy of each output, out of ONNX Runtime's buffer (which borrows the session)
        // into one buffer the batcher task splits.
        let mut whole = Vec::with_capacity(spec.outputs.len());
        for io in &spec.outputs {
            let Some(value) = outputs.get(&io.name) else {
                whole.push(None);
                continue;
            };
            let (shape, bytes) = read_bytes(value, io.dtype).map_err(Error::Inference)?;
            let item_shape: Vec<usize> = if spec.batched {
                let lead = shape.first().copied().unwrap_or(0);
                if lead != items {
                    return Err(Error::OutputBatch {
                        name: io.name.clone(),
                        expected: items,
                        got: lead,
                    });
                }
                shape[1..].to_vec()
            } else {
                shape
            };
            let per_item = item_shape.iter().product::<usize>() * io.dtype.size();
            whole.push(Some((
                item_shape,
                Bytes::copy_from_slice(&bytes[..items * per_item]),
            )));
        }
        Ok(BatchOutput {
            outputs: whole,
            items,
            lengths,
        })
    }
}

/// Forms the model's batches (each item copied once, straight into the ONNX Runtime input
/// tensor the session reads) and splits its outputs, off the model thread.
#[derive(Clone, Debug)]
pub struct ModelStager {
    spec: Arc<ModelSpec>,
}

/// A formed batch: the session's input tensors.
#[derive(Debug)]
pub struct BatchInput {
    values: Vec<(String, DynValue)>,
    items: usize,
    /// Each item's lengths along the padded axes; empty when no item was padded.
    lengths: Vec<Vec<usize>>,
}

/// A batch's outputs, copied out of ONNX Runtime, not yet split.
#[derive(Debug)]
pub struct BatchOutput {
    /// Per output of the spec, in its order: the per-item shape in the batch and the whole
    /// batch's bytes; `None` when the session did not return it.
    outputs: Vec<Option<(Vec<usize>, Bytes)>>,
    items: usize,
    lengths: Vec<Vec<usize>>,
}

impl Stager for ModelStager {
    type Input = BatchInput;
    type Output = BatchOutput;

    fn form(&self, items: &[&Tensors]) -> Result<BatchInput, Error> {
        let n = items.len();
        let spec = &self.spec;
        let batched = spec.batched;
        let allocator = Allocator::default();
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(spec.inputs.len());
        let mut padded = false;
        for (at, io) in spec.inputs.iter().enumerate() {
            let Some(first) = items.first() else { break };
            // The batch's per-item shape: the longest item along each axis (items of one
            // batch have one shape unless the model pads).
            let mut item_shape = first[&io.name].shape().to_vec();
            for item in &items[1..] {
                for (d, &len) in item_shape.iter_mut().zip(item[&io.name].shape()) {
                    *d = (*d).max(len);
                }
            }
            let mut shape: Vec<i64> = Vec::with_capacity(item_shape.len() + 1);
            if batched {
                shape.push(n as i64);
            }
            shape.extend(item_shape.iter().map(|&d| d as i64));
            let elem = io.dtype.size();
            let per_item = item_shape.iter().product::<usize>() * elem;
            let short = items
                .iter()
                .any(|item| item[&io.name].shape() != item_shape.as_slice());
            if short && spec.padding.is_none() {
                // The batcher never forms such a batch; an answer sliced without padding
                // rules would be wrong, so refuse it.
                return Err(Error::MixedShapes {
                    name: io.name.clone(),
                });
            }
            padded |= short;
            if !short && per_item > 0 {
                if let Some(value) = owned_input(items, &io.name, io.dtype, &shape) {
                    values.push((io.name.clone(), value.map_err(Error::Inference)?));
                    continue;
                }
            }
            let mut tensor = DynTensor::new(&allocator, element_type(io.dtype), shape)
                .map_err(Error::Inference)?;
            let pad = spec.pad_bytes(at);
            with_bytes_mut(&mut tensor, io.dtype, |dst| {
                if short {
                    pad::fill(dst, &pad);
                }
                for (item, block) in items.iter().zip(dst.chunks_exact_mut(per_item.max(1))) {
                    let t = &item[&io.name];
                    pad::copy_block(t.data(), t.shape(), block, &item_shape, elem);
                }
            })
            .map_err(Error::Inference)?;
            values.push((io.name.clone(), tensor.into_dyn()));
        }
        let lengths = if padded {
            items.iter().map(|item| spec.lengths(item)).collect()
        } else {
            Vec::new()
        };
        Ok(BatchInput {
            values,
            items: n,
            lengths,
        })
    }

    fn split(&self, output: BatchOutput) -> Result<Vec<Tensors>, Error> {
        let BatchOutput {
            outputs,
            items: n,
            lengths,
        } = output;
        let spec = &self.spec;
        let mut answers: Vec<Tensors> = vec![Tensors::new(); n];
        for (io, whole) in spec.outputs.iter().zip(outputs) {
            let Some((batch_item_shape, whole)) = whole else {
                continue;
            };
            let elem = io.dtype.size();
            let per_item = batch_item_shape.iter().product::<usize>() * elem;
            for (k, answer) in answers.iter_mut().enumerate() {
                let data = match lengths.get(k) {
                    Some(lengths) => {
                        // A padded answer is cut to the item's own length: its own copy.
                        let block = &whole[k * per_item..(k + 1) * per_item];
                        let own = spec.output_item_shape(io, &batch_item_shape, lengths);
                        check_output_lengths(spec, io, &batch_item_shape, &own)?;
                        let mut out = vec![0u8; own.iter().product::<usize>() * elem];
                        pad::copy_block(block, &batch_item_shape, &mut out, &own, elem);
                        (own, Bytes::from(out))
                    }
                    // Unpadded answers share the batch's one buffer, each a slice of it.
                    None => (
                        batch_item_shape.clone(),
                        whole.slice(k * per_item..(k + 1) * per_item),
                    ),
                };
                let tensor =
                    Tensor::new(io.dtype, data.0, data.1).map_err(|source| Error::Tensor {
                        name: io.name.clone(),
                        source,
                    })?;
                answer.insert(io.name.clone(), tensor);
            }
        }
        Ok(answers)
    }
}

/// `sha256:HEX` of a file, read in chunks; `None` (with a warning) when it cannot be read.
fn file_hash(path: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let hash = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let digest = hasher.finalize();
        let mut hex = String::with_capacity(7 + digest.len() * 2);
        hex.push_str("sha256:");
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        Ok(hex)
    };
    hash()
        .map_err(|e| warn!(path = %path.display(), error = %e, "could not hash the model file"))
        .ok()
}

/// An item's share of a padded output must lie inside the batch's output: a model that names
/// an output dimension like an input one but computes another length cannot be sliced.
fn check_output_lengths(
    spec: &ModelSpec,
    io: &IoSpec,
    batch: &[usize],
    own: &[usize],
) -> Result<(), Error> {
    for (axis, (&got, &expected)) in batch.iter().zip(own).enumerate() {
        if expected > got {
            let symbol = io
                .item_symbols(spec.batched)
                .get(axis)
                .copied()
                .flatten()
                .unwrap_or_default()
                .to_owned();
            return Err(Error::OutputLength {
                name: io.name.clone(),
                symbol,
                expected,
                got,
            });
        }
    }
    Ok(())
}

/// One input or output of a loaded session as the spec describes it; refuses what the worker
/// cannot serve.
fn io_spec(outlet: &Outlet) -> Result<IoSpec, Error> {
    let name = outlet.name().to_owned();
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = outlet.dtype()
    else {
        return Err(Error::UnsupportedModel {
            name,
            reason: "not a tensor (sequences, maps and optionals are not served)",
        });
    };
    let Some(dtype) = dtype_of(*ty) else {
        return Err(Error::UnsupportedModel {
            name,
            reason: "element type has no protocol dtype this worker can copy (strings, sub-byte and 8-bit float types are not served)",
        });
    };
    let dims = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    let symbols: Vec<&str> = dimension_symbols.iter().map(String::as_str).collect();
    Ok(IoSpec::new(name, dtype, dims).named(&symbols))
}

fn session_builder(
    env: &Environment,
    options: &LoadOptions,
) -> Result<(SessionBuilder, Device), Error> {
    let base = || -> Result<SessionBuilder, Error> {
        let builder = Session::builder(env).map_err(|source| Error::SessionOptions {
            what: "create",
            source,
        })?;
        let builder = match options.threads {
            Some(threads) => {
                builder
                    .with_intra_threads(threads)
                    .map_err(|e| Error::SessionOptions {
                        what: "intra-op threads",
                        source: e.into(),
                    })?
            }
            None => builder,
        };
        match options.spinning {
            Some(spin) => builder
                .with_intra_op_spinning(spin)
                .map_err(|e| Error::SessionOptions {
                    what: "intra-op spinning",
                    source: e.into(),
                }),
            None => Ok(builder),
        }
    };
    match options.device {
        DeviceChoice::Cpu => Ok((base()?, Device::Cpu)),
        DeviceChoice::Cuda => cuda(base()?).map(|b| (b, Device::Cuda)),
        DeviceChoice::Auto => match cuda(base()?) {
            Ok(builder) => Ok((builder, Device::Cuda)),
            Err(Error::CudaNotBuilt) => {
                info!("built without the cuda feature: running on CPU");
                Ok((base()?, Device::Cpu))
            }
            Err(e) => {
                warn!(error = %e, "CUDA unavailable, running on CPU");
                Ok((base()?, Device::Cpu))
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda(builder: SessionBuilder) -> Result<SessionBuilder, Error> {
    builder
        .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
        .map_err(|e| Error::CudaUnavailable(e.into()))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_builder: SessionBuilder) -> Result<SessionBuilder, Error> {
    Err(Error::CudaNotBuilt)
}

/// The protocol dtype for an ONNX element type, for the types this worker can copy.
fn dtype_of(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Bfloat16 => DType::Bf16,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Int16 => DType::I16,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Uint16 => DType::U16,
        TensorElementType::Uint32 => DType::U32,
        TensorElementType::Uint64 => DType::U64,
        TensorElementType::Bool => DType::Bool,
        _ => return None,
    })
}

/// The ONNX element type for a dtype [`dtype_of`] accepts.
fn element_type(dtype: DType) -> TensorElementType {
    match dtype {
        DType::F32 => TensorElementType::Float32,
        DType::F64 => TensorElementType::Float64,
        DType::F16 => TensorElementType::Float16,
        DType::Bf16 => TensorElementType::Bfloat16,
        DType::I8 => TensorElementType::Int8,
        DType::I16 => TensorElementType::Int16,
        DType::I32 => TensorElementType::Int32,
        DType::I64 => TensorElementType::Int64,
        DType::U8 => TensorElementType::Uint8,
        DType::U16 => TensorElementType::Uint16,
        DType::U32 => TensorElementType::Uint32,
        DType::U64 => TensorElementType::Uint64,
        DType::Bool => TensorElementType::Bool,
    }
}

/// The input `name` of a batch whose items all have the batch's per-item shape, as a tensor
/// of `shape` over a buffer filled by the one copy of each item and handed to ONNX Runtime as
/// it is. `DynTensor::new` zero-fills a buffer of its own, which the copy then overwrites
/// byte for byte: about a sixth of the runtime thread's instructions per item on a fast
/// model (BENCHMARKS.md, worker). `None` for bool, whose bytes must be checked to be 0 or 1
/// on their way in (the caller's path through [`with_bytes_mut`] does that).
fn owned_input(
    items: &[&Tensors],
    name: &str,
    dtype: DType,
    shape: &[i64],
) -> Option<ort::Result<DynValue>> {
    macro_rules! pod {
        ($t:ty) => {
            Some(
                OrtTensor::<$t>::from_array((shape.to_vec(), stack::<$t>(items, name)))
                    .map(OrtTensor::into_dyn),
            )
        };
    }
    match dtype {
        DType::F32 => pod!(f32),
        DType::F64 => pod!(f64),
        DType::F16 => pod!(half::f16),
        DType::Bf16 => pod!(half::bf16),
        DType::I8 => pod!(i8),
        DType::I16 => pod!(i16),
        DType::I32 => pod!(i32),
        DType::I64 => pod!(i64),
        DType::U8 => pod!(u8),
        DType::U16 => pod!(u16),
        DType::U32 => pod!(u32),
        DType::U64 => pod!(u64),
        DType::Bool => None,
    }
}

/// Every item's input `name`, one after the other, as elements of `T` read from their
/// little-endian wire bytes: the one copy of each item, into a buffer never written before.
fn stack<T: bytemuck::Pod>(items: &[&Tensors], name: &str) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let len = items
        .iter()
        .map(|item| item[name].data().len())
        .sum::<usize>()
        / size;
    let mut out = Vec::with_capacity(len);
    for item in items {
        let data = item[name].data();
        match bytemuck::try_cast_slice::<u8, T>(data) {
            Ok(values) => out.extend_from_slice(values),
            // Tensor bytes sit wherever their frame put them, often off `T`'s alignment.
            Err(_) => out.extend(
                data.chunks_exact(size)
                    .map(bytemuck::pod_read_unaligned::<T>),
            ),
        }
    }
    out
}

/// Lends the tensor's elements to `write` as little-endian bytes. Bool elements go through a
/// byte buffer (a `bool` may only hold 0 or 1, so its memory is never handed out as bytes).
fn with_bytes_mut(
    tensor: &mut DynTensor,
    dtype: DType,
    write: impl FnOnce(&mut [u8]),
) -> ort::Result<()> {
    macro_rules! pod {
        ($t:ty) => {{
            let (_, dst) = tensor.try_extract_tensor_mut::<$t>()?;
            write(bytemuck::cast_slice_mut(dst));
        }};
    }
    match dtype {
        DType::F32 => pod!(f32),
        DType::F64 => pod!(f64),
        DType::F16 => pod!(half::f16),
        DType::Bf16 => pod!(half::bf16),
        DType::I8 => pod!(i8),
        DType::I16 => pod!(i16),
        DType::I32 => pod!(i32),
        DType::I64 => pod!(i64),
        DType::U8 => pod!(u8),
        DType::U16 => pod!(u16),
        DType::U32 => pod!(u32),
        DType::U64 => pod!(u64),
        DType::Bool => {
            let (_, dst) = tensor.try_extract_tensor_mut::<bool>()?;
            let mut bytes = vec![0u8; dst.len()];
            write(&mut bytes);
            for (d, s) in dst.iter_mut().zip(bytes) {
                *d = s != 0;
            }
        }
    }
    Ok(())
}

/// An output's shape and its bytes, borrowed from ONNX Runtime's buffer when the layout
/// allows (everything but bool).
fn read_bytes(
    value: &DynValue,
    dtype: DType,
) -> ort::Result<(Vec<usize>, std::borrow::Cow<'_, [u8]>)> {
    use std::borrow::Cow;
    macro_rules! pod {
        ($t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>()?;
            (shape, Cow::Borrowed(bytemuck::cast_slice::<$t, u8>(data)))
        }};
    }
    let (shape, bytes) = match dtype {
        DType::F32 => pod!(f32),
        DType::F64 => pod!(f64),
        DType::F16 => pod!(half::f16),
        DType::Bf16 => pod!(half::bf16),
        DType::I8 => pod!(i8),
        DType::I16 => pod!(i16),
        DType::I32 => pod!(i32),
        DType::I64 => pod!(i64),
        DType::U8 => pod!(u8),
        DType::U16 => pod!(u16),
        DType::U32 => pod!(u32),
        DType::U64 => pod!(u64),
        DType::Bool => {
            let (shape, data) = value.try_extract_tensor::<bool>()?;
            (
                shape,
                Cow::Owned(data.iter().map(|&b| u8::from(b)).collect()),
            )
        }
    };
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect();
    Ok((shape, bytes))
}

#[cfg(test)]
mod stack_tests {
    use super::*;

    fn item(name: &str, data: Bytes, dtype: DType, len: usize) -> Tensors {
        Tensors::from([(
            name.to_owned(),
            Tensor::new(dtype, vec![len], data).unwrap(),
        )])
    }

    #[test]
    fn aligned_and_unaligned_items_stack_in_order() {
        let wire = |values: &[i64], offset: usize| {
            let mut buf = vec![0u8; offset];
            buf.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            Bytes::from(buf).slice(offset..)
        };
        let items = [
            item("a", wire(&[1, -2], 0), DType::I64, 2),
            item("a", wire(&[3, i64::MAX], 3), DType::I64, 2),
            item("a", wire(&[i64::MIN, 0], 1), DType::I64, 2),
        ];
        let refs: Vec<&Tensors> = items.iter().collect();
        assert_eq!(
            stack::<i64>(&refs, "a"),
            vec![1, -2, 3, i64::MAX, i64::MIN, 0]
        );
    }

    #[test]
    fn bool_inputs_are_left_to_the_checked_path() {
        let items = [item("b", Bytes::from_static(&[1, 0]), DType::Bool, 2)];
        let refs: Vec<&Tensors> = items.iter().collect();
        assert!(owned_input(&refs, "b", DType::Bool, &[1, 2]).is_none());
    }
}

#[cfg(test)]
mod ort_tests {
    use ort::editor::{Node, ONNX_DOMAIN};
    use ort::value::TensorElementType as T;

    use super::*;
    use crate::test_support::{
        load_cpu, new_graph, ort_lib, outlet, scratch_dir, write_graph, write_unary,
    };

    #[test]
    fn integer_and_bool_tensors_are_stacked_and_split() {
        let path = scratch_dir("dtypes").join("dtypes.onnx");
        let mut graph = new_graph();
        graph
            .set_inputs([
                outlet("a", T::Int64, &[-1, 2]),
                outlet("b", T::Bool, &[-1, 3]),
            ])
            .unwrap();
        graph
            .set_outputs([
                outlet("a_out", T::Int64, &[-1, 2]),
                outlet("b_out", T::Bool, &[-1, 3]),
            ])
            .unwrap();
        graph
            .add_node(Node::new("Identity", ONNX_DOMAIN, "id", ["a"], ["a_out"], []).unwrap())
            .unwrap();
        graph
            .add_node(Node::new("Not", ONNX_DOMAIN, "not", ["b"], ["b_out"], []).unwrap())
            .unwrap();
        write_graph(&path, graph);

        let mut model = load_cpu(&path);
        assert!(model.spec().batched);
        assert_eq!(model.spec().inputs[1].dtype, DType::Bool);
        model
            .warm_up(&WarmUp {
                max_batch: 4,
                lengths: vec![3],
                max_batch_tokens: None,
            })
            .unwrap();
        let item = |a: [i64; 2], b: [u8; 3]| {
            Tensors::from([
                (
                    "a".to_owned(),
                    Tensor::from_vec(vec![2], a.to_vec()).unwrap(),
                ),
                (
                    "b".to_owned(),
                    Tensor::new(DType::Bool, vec![3], Bytes::copy_from_slice(&b)).unwrap(),
                ),
            ])
        };
        let items = [item([1, -2], [1, 0, 1]), item([3, 4], [0, 0, 1])];
        for i in &items {
            model.spec().check(i).unwrap();
        }
        let out = model.run(&[&items[0], &items[1]]).unwrap();
        assert_eq!(out[0]["a_out"].to_vec::<i64>().unwrap(), vec![1, -2]);
        assert_eq!(out[1]["a_out"].to_vec::<i64>().unwrap(), vec![3, 4]);
        assert_eq!(out[0]["b_out"].data().as_ref(), &[0, 1, 0]);
        assert_eq!(out[1]["b_out"].data().as_ref(), &[1, 1, 0]);
        assert_eq!(out[1]["b_out"].shape(), &[3]);
    }

    #[test]
    fn items_whose_bytes_sit_off_alignment_are_stacked_whole() {
        let path = scratch_dir("unaligned").join("identity.onnx");
        write_unary(&path, "Identity", &[-1, 3]);
        let mut model = load_cpu(&path);
        // Each item's bytes cut one byte into a buffer, as a frame's read buffer leaves them.
        let item = |values: [f32; 3]| {
            let mut buf = vec![0xAAu8];
            buf.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            let data = Bytes::from(buf).slice(1..);
            Tensors::from([(
                "x".to_owned(),
                Tensor::new(DType::F32, vec![3], data).unwrap(),
            )])
        };
        let items = [item([1.0, -2.5, 3.0]), item([4.0, 5.0, -6.25])];
        let out = model.run(&[&items[0], &items[1]]).unwrap();
        assert_eq!(out[0]["y"].to_vec::<f32>().unwrap(), vec![1.0, -2.5, 3.0]);
        assert_eq!(out[1]["y"].to_vec::<f32>().unwrap(), vec![4.0, 5.0, -6.25]);
    }

    #[test]
    fn a_fixed_leading_dimension_runs_items_alone_with_their_whole_shape() {
        let path = scratch_dir("fixed").join("fixed.onnx");
        write_unary(&path, "Relu", &[1, 4]);

        let mut model = load_cpu(&path);
        assert!(!model.spec().batched);
        assert_eq!(model.spec().batch_limit(32), 1);
        let item = Tensors::from([(
            "x".to_owned(),
            Tensor::from_vec(vec![1, 4], vec![-1.0f32, 2.0, -3.0, 4.0]).unwrap(),
        )]);
        model.spec().check(&item).unwrap();
        let out = model.run(&[&item]).unwrap();
        assert_eq!(out[0]["y"].shape(), &[1, 4]);
        assert_eq!(
            out[0]["y"].to_vec::<f32>().unwrap(),
            vec![0.0, 2.0, 0.0, 4.0]
        );
    }

    #[test]
    fn a_missing_model_file_is_a_model_load_error() {
        let err = Model::load(&LoadOptions {
            path: "/nonexistent/model.onnx".into(),
            ort_lib: ort_lib(),
            device: DeviceChoice::Cpu,
            threads: None,
            spinning: None,
            padding: PaddingOptions::default(),
        })
        .unwrap_err();
        assert!(matches!(err, Error::ModelLoad { .. }), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn device_cuda_without_the_feature_says_how_to_build_it() {
        let path = scratch_dir("cuda").join("m.onnx");
        write_unary(&path, "Relu", &[-1, 2]);
        let err = Model::load(&LoadOptions {
            path,
            ort_lib: ort_lib(),
            device: DeviceChoice::Cuda,
            threads: None,
            spinning: None,
            padding: PaddingOptions::default(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
        // auto falls back to CPU.
        let model = Model::load(&LoadOptions {
            path: scratch_dir("cuda-auto").join("missing.onnx"),
            ort_lib: ort_lib(),
            device: DeviceChoice::Auto,
            threads: None,
            spinning: None,
            padding: PaddingOptions::default(),
        });
        assert!(matches!(model, Err(Error::ModelLoad { .. })));
    }
}

#[cfg(test)]
mod real_model_tests {
    //! Real-shaped models: each item's answer from a batch (padded where lengths differ)
    //! against ONNX Runtime run on that item alone.

    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::batcher::{BatchConfig, Batcher};
    use crate::metrics::Metrics;
    use crate::test_support::{ort_lib, scratch_dir, write_test_model, TestModel, TEST_VOCAB};

    fn load(kind: TestModel, padding: PaddingOptions) -> Model {
        let path = scratch_dir("real").join("model.onnx");
        write_test_model(kind, &path);
        Model::load(&LoadOptions {
            path,
            ort_lib: ort_lib(),
            device: DeviceChoice::Cpu,
            threads: Some(1),
            spinning: None,
            padding,
        })
        .unwrap()
    }

    /// A sentence of `len` token ids (a fixed pattern per seed) with its mask of ones.
    fn sentence(len: usize, seed: usize) -> Tensors {
        let ids: Vec<i64> = (0..len)
            .map(|i| ((i * 5 + seed * 3 + 1) % TEST_VOCAB) as i64)
            .collect();
        Tensors::from([
            (
                "input_ids".to_owned(),
                Tensor::from_vec(vec![len], ids).unwrap(),
            ),
            (
                "attention_mask".to_owned(),
                Tensor::from_vec(vec![len], vec![1i64; len]).unwrap(),
            ),
        ])
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs().max(y.abs())))
    }

    /// Runs `items` as one batch and each alone, and checks every output agrees.
    fn batched_equals_alone(model: &mut Model, items: &[Tensors]) -> Vec<Tensors> {
        for item in items {
            model.spec().check(item).unwrap();
        }
        let refs: Vec<&Tensors> = items.iter().collect();
        let batched = model.run(&refs).unwrap();
        for (item, answer) in items.iter().zip(&batched) {
            let alone = model.run(&[item]).unwrap().remove(0);
            assert_eq!(
                answer.keys().collect::<Vec<_>>(),
                alone.keys().collect::<Vec<_>>()
            );
            for (name, tensor) in &alone {
                let got = &answer[name];
                assert_eq!(got.shape(), tensor.shape(), "{name}");
                assert_eq!(got.dtype(), tensor.dtype(), "{name}");
                match tensor.dtype() {
                    DType::F32 => assert!(
                        close(
                            &got.to_vec::<f32>().unwrap(),
                            &tensor.to_vec::<f32>().unwrap()
                        ),
                        "{name}: batched {got:?} alone {tensor:?}"
                    ),
                    _ => assert_eq!(got.data(), tensor.data(), "{name}"),
                }
            }
        }
        batched
    }

    #[test]
    fn a_sentence_encoder_pads_mixed_lengths_and_answers_as_alone() {
        let mut model = load(TestModel::Encoder, PaddingOptions::default());
        let padding = model.spec().padding.clone().unwrap();
        assert_eq!(padding.axes, vec!["sequence".to_owned()]);
        let items: Vec<Tensors> = [1, 7, 3, 12, 2]
            .iter()
            .enumerate()
            .map(|(s, &l)| sentence(l, s))
            .collect();
        let answers = batched_equals_alone(&mut model, &items);
        // The mean of the item's own token embeddings, whatever it was padded to.
        let table: Vec<f32> = (0..TEST_VOCAB * 4)
            .map(|i| ((i * 7 + 3) % 11) as f32 * 0.1 - 0.5)
            .collect();
        for (item, answer) in items.iter().zip(&answers) {
            let ids = item["input_ids"].to_vec::<i64>().unwrap();
            let mut mean = [0f32; 4];
            for &id in &ids {
                for (d, m) in mean.iter_mut().enumerate() {
                    *m += table[id as usize * 4 + d] / ids.len() as f32;
                }
            }
            assert_eq!(answer["embedding"].shape(), &[4]);
            assert!(close(&answer["embedding"].to_vec::<f32>().unwrap(), &mean));
        }
    }

    #[test]
    fn pad_values_are_used_and_masked_out() {
        // Pad ids with a real token: the mask must keep it out of the mean.
        let padding = PaddingOptions {
            enabled: true,
            values: BTreeMap::from([("input_ids".to_owned(), 9.0)]),
        };
        let mut model = load(TestModel::Encoder, padding);
        assert_eq!(model.spec().pad_bytes(0), 9i64.to_le_bytes().to_vec());
        let items: Vec<Tensors> = (1..=6).map(|l| sentence(l, l)).collect();
        batched_equals_alone(&mut model, &items);
    }

    #[test]
    fn a_token_tagger_answers_one_row_per_own_token() {
        let mut model = load(TestModel::Tagger, PaddingOptions::default());
        let items: Vec<Tensors> = [5, 1, 9, 3]
            .iter()
            .enumerate()
            .map(|(s, &l)| {
                let mut item = sentence(l, s);
                item.remove("attention_mask");
                item
            })
            .collect();
        let answers = batched_equals_alone(&mut model, &items);
        for (answer, len) in answers.iter().zip([5, 1, 9, 3]) {
            assert_eq!(answer["logits"].shape(), &[len, 3]);
        }
    }

    #[test]
    fn without_padding_the_same_model_answers_alike_one_length_per_batch() {
        let off = PaddingOptions {
            enabled: false,
            values: BTreeMap::new(),
        };
        let mut model = load(TestModel::Encoder, off);
        assert!(model.spec().padding.is_none());
        let items = [sentence(4, 1), sentence(9, 2)];
        assert_ne!(
            model.spec().fit(&items[0]).key,
            model.spec().fit(&items[1]).key
        );
        let err = model.run(&[&items[0], &items[1]]).unwrap_err();
        assert!(matches!(err, Error::MixedShapes { .. }), "{err}");
        // Same-length items still batch.
        let same = [sentence(4, 1), sentence(4, 2), sentence(4, 3)];
        batched_equals_alone(&mut model, &same);
    }

    #[test]
    fn a_classifier_answers_probabilities_and_a_label_with_no_dimension_left() {
        let mut model = load(TestModel::Classifier, PaddingOptions::default());
        let items: Vec<Tensors> = [[0.1f32, -2.0, 3.0], [4.0, 0.5, -1.0], [-3.0, 2.5, 1.0]]
            .iter()
            .map(|f| {
                Tensors::from([(
                    "features".to_owned(),
                    Tensor::from_vec(vec![3], f.to_vec()).unwrap(),
                )])
            })
            .collect();
        let answers = batched_equals_alone(&mut model, &items);
        for answer in &answers {
            let label = &answer["label"];
            assert_eq!((label.dtype(), label.shape()), (DType::I64, &[][..]));
            let probabilities = answer["probabilities"].to_vec::<f32>().unwrap();
            assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            let best = probabilities
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(label.to_vec::<i64>().unwrap(), vec![best as i64]);
        }
    }

    #[test]
    fn f16_and_bf16_go_in_and_come_out() {
        let mut model = load(TestModel::Half, PaddingOptions::default());
        let spec = model.spec();
        assert_eq!(
            spec.inputs.iter().map(|io| io.dtype).collect::<Vec<_>>(),
            vec![DType::F16, DType::Bf16]
        );
        let item = |a: [f32; 3], b: [f32; 3]| {
            let a: Vec<u8> = a
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect();
            let b: Vec<u8> = b
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect();
            Tensors::from([
                (
                    "a".to_owned(),
                    Tensor::new(DType::F16, vec![3], Bytes::from(a)).unwrap(),
                ),
                (
                    "b".to_owned(),
                    Tensor::new(DType::Bf16, vec![3], Bytes::from(b)).unwrap(),
                ),
            ])
        };
        let items = [
            item([1.0, 2.5, -3.0], [0.5, 0.5, 1.0]),
            item([0.25, 8.0, 0.0], [2.0, -8.0, 4.0]),
        ];
        let answers = batched_equals_alone(&mut model, &items);
        let f16s = |t: &Tensor| -> Vec<f32> {
            t.data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        let bf16s = |t: &Tensor| -> Vec<f32> {
            t.data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        assert_eq!(f16s(&answers[0]["sum_f16"]), vec![1.5, 3.0, -2.0]);
        assert_eq!(bf16s(&answers[1]["sum_bf16"]), vec![2.25, 0.0, 4.0]);
        assert_eq!(answers[1]["sum_f16"].dtype(), DType::F16);
    }

    #[test]
    fn warm_up_runs_a_full_batch_at_each_length_within_the_token_budget() {
        let mut model = load(TestModel::Encoder, PaddingOptions::default());
        let ran = model
            .warm_up(&WarmUp {
                max_batch: 8,
                lengths: vec![4, 64],
                max_batch_tokens: Some(256),
            })
            .unwrap();
        assert_eq!(ran, vec![(1, 4), (8, 4), (1, 64), (4, 64)]);
        // A model without dynamic dimensions warms up once per batch size.
        let mut fixed = load(TestModel::Classifier, PaddingOptions::default());
        let ran = fixed
            .warm_up(&WarmUp {
                max_batch: 8,
                lengths: vec![4, 64],
                max_batch_tokens: None,
            })
            .unwrap();
        assert_eq!(ran, vec![(1, 1), (8, 1)]);
    }

    #[test]
    fn batch_cost_times_batches_within_the_token_budget() {
        // The shape's value depends on the machine; that it is timed, in range and weighs
        // a full batch fully does not.
        for (model, budget) in [
            (TestModel::Encoder, Some(256)),
            (TestModel::Classifier, None),
        ] {
            let mut model = load(model, PaddingOptions::default());
            let plan = WarmUp {
                max_batch: 8,
                lengths: vec![64],
                max_batch_tokens: budget,
            };
            model.warm_up(&plan).unwrap();
            let cost = model.batch_cost(&plan).unwrap();
            assert_eq!(cost.max_batch(), 8);
            assert!((1.0 / 8.0..=1.0).contains(&cost.single()), "{cost:?}");
            assert!((cost.weight(8) - 1.0).abs() < 1e-12);
        }
    }

    #[tokio::test]
    async fn the_batcher_stacks_mixed_lengths_into_one_batch() {
        let model = load(TestModel::Encoder, PaddingOptions::default());
        let spec = Arc::clone(model.spec());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let config = BatchConfig {
            max_batch: 8,
            max_batch_tokens: None,
            buckets: Vec::new(),
            // Long enough that the batch runs because it is full, never because time passed.
            max_delay: Duration::from_secs(3600),
            queue: 64,
            drain_timeout: Duration::from_secs(10),
            mode: crate::BatchingMode::Adaptive,
            aging: Duration::from_millis(100),
            fairness: Default::default(),
            model_cpus: None,
        };
        let batcher = Batcher::start(
            model,
            config,
            Arc::new(Metrics::default()),
            shutdown.clone(),
        )
        .unwrap();
        let items: Vec<Tensors> = (0..8).map(|i| sentence(1 + i * 3, i)).collect();
        let tickets: Vec<_> = items
            .iter()
            .map(|item| {
                let fit = spec.fit(item);
                batcher.handle().submit(item.clone(), fit, None).unwrap()
            })
            .collect();
        for (item, ticket) in items.iter().zip(tickets) {
            let done = ticket.wait().await.unwrap();
            assert_eq!(done.batch_size, 8, "lengths 1 to 22 ran as one batch");
            assert_eq!(done.outputs["embedding"].shape(), &[4]);
            let len = item["input_ids"].shape()[0];
            assert!(len >= 1);
        }
        shutdown.cancel();
        batcher.join().await;
    }
}
