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
//! Each item's bytes are copied exactly once, into the batch tensor; each output is copied
//! once, out of ONNX Runtime's buffer into the item's answer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::builder::SessionBuilder;
use ort::session::Session;
use ort::value::{DynTensor, DynValue, Outlet, TensorElementType, ValueType};
use tidepool_protocol::{DType, Tensor, Tensors};
use tracing::{info, warn};

use crate::batcher::Engine;
use crate::config::DeviceChoice;
use crate::error::Error;
use crate::spec::{IoSpec, ModelSpec};

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
}

/// A loaded model: the session, its spec and its device.
pub struct Model {
    session: Session,
    spec: Arc<ModelSpec>,
    device: Device,
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
        let spec = Arc::new(ModelSpec::new(inputs, outputs));
        info!(
            model = %options.path.display(),
            device = device.as_str(),
            batched = spec.batched,
            inputs = %spec.describe_inputs(),
            "model loaded"
        );
        if !spec.batched {
            warn!("the model's leading dimension is fixed: every item runs alone (batch size 1)");
        }
        Ok(Model {
            session,
            spec,
            device,
        })
    }

    /// What the model takes and gives.
    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.spec
    }

    /// The device in use.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs one item of zeros, so that the first real batch does not pay for lazy
    /// initialisation; the worker reports ready only after it.
    pub fn warm_up(&mut self) -> Result<(), Error> {
        let item = self.spec.zero_item()?;
        self.run(&[&item]).map(drop)
    }
}

impl Engine for Model {
    fn run(&mut self, items: &[&Tensors]) -> Result<Vec<Tensors>, Error> {
        let n = items.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let batched = self.spec.batched;
        let allocator = Allocator::default();
        let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(self.spec.inputs.len());
        for io in &self.spec.inputs {
            let first = &items[0][&io.name];
            let mut shape: Vec<i64> = Vec::with_capacity(first.shape().len() + 1);
            if batched {
                shape.push(n as i64);
            }
            shape.extend(first.shape().iter().map(|&d| d as i64));
            let mut tensor = DynTensor::new(&allocator, element_type(io.dtype), shape)
                .map_err(Error::Inference)?;
            write_items(
                &mut tensor,
                io.dtype,
                items.iter().map(|item| item[&io.name].data().as_ref()),
            )
            .map_err(Error::Inference)?;
            inputs.push((io.name.clone(), tensor.into_dyn()));
        }

        let outputs = self.session.run(inputs).map_err(Error::Inference)?;

        let mut answers: Vec<Tensors> = vec![Tensors::new(); n];
        for io in &self.spec.outputs {
            let Some(value) = outputs.get(&io.name) else {
                continue;
            };
            let (shape, bytes) = read_bytes(value, io.dtype).map_err(Error::Inference)?;
            let item_shape: Vec<usize> = if batched {
                let lead = shape.first().copied().unwrap_or(0);
                if lead != n {
                    return Err(Error::OutputBatch {
                        name: io.name.clone(),
                        expected: n,
                        got: lead,
                    });
                }
                shape[1..].to_vec()
            } else {
                shape
            };
            let per_item = bytes.len() / n;
            for (answer, chunk) in answers.iter_mut().zip(bytes.chunks_exact(per_item.max(1))) {
                let tensor =
                    Tensor::new(io.dtype, item_shape.clone(), Bytes::copy_from_slice(chunk))
                        .map_err(|source| Error::Tensor {
                            name: io.name.clone(),
                            source,
                        })?;
                answer.insert(io.name.clone(), tensor);
            }
            if per_item == 0 {
                // Empty outputs: chunks_exact(1) over no bytes yields nothing; give each item
                // its empty tensor.
                for answer in &mut answers {
                    let tensor = Tensor::new(io.dtype, item_shape.clone(), Bytes::new()).map_err(
                        |source| Error::Tensor {
                            name: io.name.clone(),
                            source,
                        },
                    )?;
                    answer.insert(io.name.clone(), tensor);
                }
            }
        }
        Ok(answers)
    }
}

/// One input or output of a loaded session as the spec describes it; refuses what the worker
/// cannot serve.
fn io_spec(outlet: &Outlet) -> Result<IoSpec, Error> {
    let name = outlet.name().to_owned();
    let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
        return Err(Error::UnsupportedModel {
            name,
            reason: "not a tensor (sequences, maps and optionals are not served)",
        });
    };
    let Some(dtype) = dtype_of(*ty) else {
        return Err(Error::UnsupportedModel {
            name,
            reason: "element type has no protocol dtype this worker can copy (f16, bf16, strings and sub-byte types are not served)",
        });
    };
    let dims = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    Ok(IoSpec { name, dtype, dims })
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
        match options.threads {
            Some(threads) => {
                builder
                    .with_intra_threads(threads)
                    .map_err(|e| Error::SessionOptions {
                        what: "intra-op threads",
                        source: e.into(),
                    })
            }
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

/// Copies each item's bytes, in order, into the batch tensor.
fn write_items<'a>(
    tensor: &mut DynTensor,
    dtype: DType,
    items: impl Iterator<Item = &'a [u8]>,
) -> ort::Result<()> {
    fn copy_all<'a>(dst: &mut [u8], items: impl Iterator<Item = &'a [u8]>) {
        let mut at = 0;
        for item in items {
            dst[at..at + item.len()].copy_from_slice(item);
            at += item.len();
        }
    }
    macro_rules! pod {
        ($t:ty) => {{
            let (_, dst) = tensor.try_extract_tensor_mut::<$t>()?;
            copy_all(bytemuck::cast_slice_mut(dst), items);
        }};
    }
    match dtype {
        DType::F32 => pod!(f32),
        DType::F64 => pod!(f64),
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
            let mut at = 0;
            for item in items {
                for (d, &s) in dst[at..at + item.len()].iter_mut().zip(item) {
                    *d = s != 0;
                }
                at += item.len();
            }
        }
        // Refused when the model is loaded (`dtype_of`), so never reached.
        DType::F16 | DType::Bf16 => {
            return Err(ort::Error::new(
                "f16 and bf16 tensors are not supported by this worker",
            ))
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
        DType::F16 | DType::Bf16 => {
            return Err(ort::Error::new(
                "f16 and bf16 tensors are not supported by this worker",
            ))
        }
    };
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect();
    Ok((shape, bytes))
}

#[cfg(test)]
mod ort_tests {
    use ort::editor::{Node, ONNX_DOMAIN};
    use ort::value::TensorElementType as T;

    use super::*;
    use crate::test_support::{load_cpu, new_graph, ort_lib, outlet, scratch_dir, write_graph};

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
        model.warm_up().unwrap();
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
    fn a_fixed_leading_dimension_runs_items_alone_with_their_whole_shape() {
        let path = scratch_dir("fixed").join("fixed.onnx");
        let mut graph = new_graph();
        graph
            .set_inputs([outlet("x", T::Float32, &[1, 4])])
            .unwrap();
        graph
            .set_outputs([outlet("y", T::Float32, &[1, 4])])
            .unwrap();
        graph
            .add_node(Node::new("Relu", ONNX_DOMAIN, "relu", ["x"], ["y"], []).unwrap())
            .unwrap();
        write_graph(&path, graph);

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
        })
        .unwrap_err();
        assert!(matches!(err, Error::ModelLoad { .. }), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn device_cuda_without_the_feature_says_how_to_build_it() {
        let path = scratch_dir("cuda").join("m.onnx");
        let mut graph = new_graph();
        graph
            .set_inputs([outlet("x", T::Float32, &[-1, 2])])
            .unwrap();
        graph
            .set_outputs([outlet("y", T::Float32, &[-1, 2])])
            .unwrap();
        graph
            .add_node(Node::new("Relu", ONNX_DOMAIN, "relu", ["x"], ["y"], []).unwrap())
            .unwrap();
        write_graph(&path, graph);
        let err = Model::load(&LoadOptions {
            path,
            ort_lib: ort_lib(),
            device: DeviceChoice::Cuda,
            threads: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
        // auto falls back to CPU.
        let model = Model::load(&LoadOptions {
            path: scratch_dir("cuda-auto").join("missing.onnx"),
            ort_lib: ort_lib(),
            device: DeviceChoice::Auto,
            threads: None,
        });
        assert!(matches!(model, Err(Error::ModelLoad { .. })));
    }
}
