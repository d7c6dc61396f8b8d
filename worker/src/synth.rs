//! Synthetic models: an MLP of a chosen size, built in Rust with `ort::editor` and written as
//! ONNX, so that the demo, the tests and the benchmark serve a "1 GB model" with nothing
//! downloaded.
//!
//! The model has one input `input: f32 [batch, input_dim]` and one output
//! `output: f32 [batch, output_dim]`, with `layers` blocks of `MatMul` then `Add` (bias), and
//! `Relu` between blocks. The hidden width is chosen so that the weights come to about the
//! requested size. Weights come from a small seeded generator (SplitMix64) implemented here,
//! so the same seed writes the same weights whatever crate versions are in use. Models of
//! [`EXTERNAL_DATA_FROM`] or more keep their weights in `PATH.data` next to `PATH` (ONNX's
//! external data), which ONNX Runtime and Python's `onnx` load transparently.

use std::path::{Path, PathBuf};

use ort::editor::{Graph, Model as EditorModel, Node, Opset, ONNX_DOMAIN};
use ort::memory::Allocator;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{
    Outlet, Shape, SymbolicDimensions, Tensor as OrtTensor, TensorElementType, ValueType,
};
use tracing::info;

use crate::config::SynthConfig;
use crate::error::Error;
use crate::model::environment;

/// Models with at least this many bytes of weights are written with external data.
pub const EXTERNAL_DATA_FROM: u64 = 64 << 20;

/// The ONNX opset the models declare.
const OPSET: u32 = 17;

/// The dimensions of a synthetic model, worked out from the requested size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthPlan {
    /// Features per input item.
    pub input_dim: usize,
    /// Width of the hidden layers.
    pub hidden: usize,
    /// Features per output item.
    pub output_dim: usize,
    /// Number of MatMul blocks.
    pub layers: usize,
    /// The weight seed.
    pub seed: u64,
}

impl SynthPlan {
    /// Works out the hidden width (and the input and output widths left unset) so that the
    /// weights come to about `size` bytes of f32.
    pub fn new(
        size: u64,
        input_dim: Option<usize>,
        output_dim: Option<usize>,
        layers: usize,
        seed: u64,
    ) -> Result<SynthPlan, Error> {
        let invalid = |flag, reason: &str| Error::InvalidConfig {
            flag,
            reason: reason.to_owned(),
        };
        if layers == 0 {
            return Err(invalid("layers", "must be at least 1"));
        }
        if input_dim == Some(0) || output_dim == Some(0) {
            return Err(invalid("input-dim", "dimensions must be at least 1"));
        }
        let params = (size / 4) as f64;
        if params < 1.0 {
            return Err(invalid("size", "must be at least 4 bytes (one f32)"));
        }
        let hidden = if layers == 1 {
            // One MatMul: input_dim x output_dim; the hidden width is the unset side(s).
            match (input_dim, output_dim) {
                (Some(i), Some(o)) => i.min(o),
                (Some(d), None) | (None, Some(d)) => ((params / d as f64).round() as usize).max(1),
                (None, None) => (params.sqrt().round() as usize).max(1),
            }
        } else {
            // Weights: input_dim*h + (layers-2)*h^2 + h*output_dim, with unset dims equal to h.
            // Solve a*h^2 + b*h = params for h.
            let a = (layers - 2) as f64
                + f64::from(u8::from(input_dim.is_none()))
                + f64::from(u8::from(output_dim.is_none()));
            let b = (input_dim.unwrap_or(0) + output_dim.unwrap_or(0)) as f64;
            let h = if a > 0.0 {
                (-b + (b * b + 4.0 * a * params).sqrt()) / (2.0 * a)
            } else {
                params / b
            };
            (h.round() as usize).max(1)
        };
        let (input_dim, output_dim) = if layers == 1 {
            match (input_dim, output_dim) {
                (Some(i), Some(o)) => (i, o),
                (Some(i), None) => (i, hidden),
                (None, Some(o)) => (hidden, o),
                (None, None) => (hidden, hidden),
            }
        } else {
            (input_dim.unwrap_or(hidden), output_dim.unwrap_or(hidden))
        };
        Ok(SynthPlan {
            input_dim,
            hidden,
            output_dim,
            layers,
            seed,
        })
    }

    /// From the `synth` subcommand's flags.
    pub fn from_config(config: &SynthConfig) -> Result<SynthPlan, Error> {
        SynthPlan::new(
            config.size.ok_or_else(|| Error::InvalidConfig {
                flag: "size",
                reason: "--kind mlp needs the weights' size, like --size 64MiB".to_owned(),
            })?,
            config.input_dim,
            config.output_dim,
            config.layers,
            config.seed,
        )
    }

    /// `(rows, cols)` of each layer's weight matrix.
    pub fn layer_shapes(&self) -> Vec<(usize, usize)> {
        (0..self.layers)
            .map(|i| {
                let rows = if i == 0 { self.input_dim } else { self.hidden };
                let cols = if i + 1 == self.layers {
                    self.output_dim
                } else {
                    self.hidden
                };
                (rows, cols)
            })
            .collect()
    }

    /// Bytes of f32 weights and biases.
    pub fn weight_bytes(&self) -> u64 {
        self.layer_shapes()
            .iter()
            .map(|&(r, c)| ((r * c + c) * 4) as u64)
            .sum()
    }
}

/// Writes the model described by `plan` to `out`, with external data in `out.data` when the
/// weights come to `external_from` bytes or more. Returns the path of the data file, if any.
pub fn write(
    plan: &SynthPlan,
    out: &Path,
    ort_lib: &Path,
    external_from: u64,
) -> Result<Option<PathBuf>, Error> {
    let data = synthesize(out, ort_lib, plan.weight_bytes() >= external_from, || {
        build_graph(plan)
    })?;
    info!(
        out = %out.display(),
        input_dim = plan.input_dim,
        hidden = plan.hidden,
        output_dim = plan.output_dim,
        layers = plan.layers,
        weight_bytes = plan.weight_bytes(),
        external = data.is_some(),
        "synthetic model written"
    );
    Ok(data)
}

/// Loads ONNX Runtime (outlets and tensors need it), builds a graph with `build` and writes
/// it as an ONNX model at `out`, its weights in `out.data` when `external`. Returns the path
/// of the data file, if any.
pub(crate) fn synthesize(
    out: &Path,
    ort_lib: &Path,
    external: bool,
    build: impl FnOnce() -> ort::Result<Graph>,
) -> Result<Option<PathBuf>, Error> {
    let env = environment(ort_lib)?;
    let graph = build().map_err(|source| Error::Synth {
        path: out.to_path_buf(),
        source,
    })?;
    let synth_err = |source: ort::Error| Error::Synth {
        path: out.to_path_buf(),
        source,
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| Error::SynthIo {
            path: parent.to_path_buf(),
            source,
        })?;
    }

    let mut model = EditorModel::new([Opset::new(ONNX_DOMAIN, OPSET).map_err(synth_err)?])
        .map_err(synth_err)?;
    model.set_graph(graph).map_err(synth_err)?;

    let data_path = external.then(|| {
        let mut name = out.as_os_str().to_owned();
        name.push(".data");
        PathBuf::from(name)
    });
    // Session creation writes the graph to the "optimized model path"; with optimisation
    // disabled that is exactly the graph built here.
    let mut builder = Session::builder(&env)
        .map_err(synth_err)?
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(|e| synth_err(e.into()))?
        .with_optimized_model_path(out)
        .map_err(|e| synth_err(e.into()))?;
    if let Some(data_path) = &data_path {
        let file_name = data_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        builder = builder
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                file_name,
            )
            .map_err(|e| synth_err(e.into()))?
            .with_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "1024",
            )
            .map_err(|e| synth_err(e.into()))?;
        // A stale data file would otherwise be appended to.
        match std::fs::remove_file(data_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::SynthIo {
                    path: data_path.clone(),
                    source,
                })
            }
        }
    }
    let session = model.into_session(&builder).map_err(synth_err)?;
    drop(session);
    Ok(data_path)
}

/// Renames dimension names in a written model file: ONNX Runtime's model editor writes the
/// first symbolic name of an outlet on every dynamic dimension of it, so outlets are built
/// with `from` on every dynamic dimension and the first dimension of each (the batch one)
/// is renamed `to` here. Byte for byte (the names must be as long), so the protobuf lengths
/// stay right.
pub(crate) fn rename_batch_dims(path: &Path, from: &str, to: &str) -> Result<(), Error> {
    assert_eq!(
        from.len(),
        to.len(),
        "names of one length keep the protobuf valid"
    );
    let io_err = |source| Error::SynthIo {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = std::fs::read(path).map_err(io_err)?;
    // A dimension's name is a protobuf string field: its tag (field 2, length-delimited)
    // and its length come right before it.
    let needle: Vec<u8> = [&[0x12, from.len() as u8][..], from.as_bytes()].concat();
    // Consecutive dimensions of one shape are separated by exactly the next dimension's own
    // tag and length (2 bytes); anything else starts another outlet's shape.
    let mut at = 0;
    let mut previous_end = None;
    while let Some(found) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
        let start = at + found;
        if previous_end.is_none_or(|end| start - end != 2) {
            bytes[start + 2..start + 2 + to.len()].copy_from_slice(to.as_bytes());
        }
        previous_end = Some(start + needle.len());
        at = start + needle.len();
    }
    std::fs::write(path, bytes).map_err(io_err)
}

/// The `synth --kind mlp` subcommand.
pub fn run(config: &SynthConfig) -> Result<SynthPlan, Error> {
    let plan = SynthPlan::from_config(config)?;
    let ort_lib = config.ort_lib.as_deref().ok_or(Error::OrtLibMissing)?;
    write(&plan, &config.out, ort_lib, EXTERNAL_DATA_FROM)?;
    Ok(plan)
}

fn io(name: &str, width: usize) -> Outlet {
    Outlet::new(
        name,
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape: Shape::new([-1, width as i64]),
            dimension_symbols: SymbolicDimensions::new(["batch".to_owned(), String::new()]),
        },
    )
}

fn build_graph(plan: &SynthPlan) -> ort::Result<Graph> {
    let mut graph = Graph::new()?;
    graph.set_inputs([io("input", plan.input_dim)])?;
    graph.set_outputs([io("output", plan.output_dim)])?;
    let mut rng = SplitMix64::new(plan.seed);
    let mut previous = "input".to_owned();
    for (i, (rows, cols)) in plan.layer_shapes().into_iter().enumerate() {
        let last = i + 1 == plan.layers;
        // He-uniform keeps activations of the same order through the Relu layers.
        let bound = (6.0 / rows as f32).sqrt();
        let weight = random_tensor(&[rows, cols], bound, &mut rng)?;
        let bias = random_tensor(&[cols], 0.1, &mut rng)?;
        let (w, b) = (format!("layer{i}.weight"), format!("layer{i}.bias"));
        graph.add_initializer(&w, weight, false)?;
        graph.add_initializer(&b, bias, false)?;
        let matmul = format!("layer{i}.matmul");
        let add = if last {
            "output".to_owned()
        } else {
            format!("layer{i}.add")
        };
        graph.add_node(Node::new(
            "MatMul",
            ONNX_DOMAIN,
            &matmul,
            [previous.as_str(), w.as_str()],
            [matmul.as_str()],
            [],
        )?)?;
        graph.add_node(Node::new(
            "Add",
            ONNX_DOMAIN,
            format!("layer{i}.add_node"),
            [matmul.as_str(), b.as_str()],
            [add.as_str()],
            [],
        )?)?;
        previous = if last {
            add
        } else {
            let relu = format!("layer{i}.relu");
            graph.add_node(Node::new(
                "Relu",
                ONNX_DOMAIN,
                &relu,
                [add.as_str()],
                [relu.as_str()],
                [],
            )?)?;
            relu
        };
    }
    Ok(graph)
}

pub(crate) fn random_tensor(
    shape: &[usize],
    bound: f32,
    rng: &mut SplitMix64,
) -> ort::Result<OrtTensor<f32>> {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let mut tensor = OrtTensor::<f32>::new(&Allocator::default(), dims)?;
    let (_, data) = tensor.extract_tensor_mut();
    for x in data.iter_mut() {
        *x = rng.next_f32_symmetric() * bound;
    }
    Ok(tensor)
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fixed forever, so models are
/// reproducible from their seed.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_f32_symmetric(&mut self) -> f32 {
        // 24 random bits: every value exactly representable.
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        unit * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_hits_the_requested_size() {
        let plan = SynthPlan::new(1 << 30, None, None, 4, 0).unwrap();
        assert_eq!(
            (plan.input_dim, plan.hidden, plan.output_dim),
            (8192, 8192, 8192)
        );
        let plan = SynthPlan::new(64 << 20, Some(1024), Some(16), 3, 0).unwrap();
        let ratio = plan.weight_bytes() as f64 / f64::from(64u32 << 20);
        assert!((0.98..1.02).contains(&ratio), "{plan:?} {ratio}");
        assert_eq!((plan.input_dim, plan.output_dim), (1024, 16));
        let plan = SynthPlan::new(4096, Some(8), Some(4), 1, 0).unwrap();
        assert_eq!(plan.layer_shapes(), vec![(8, 4)]);
    }

    #[test]
    fn plan_refuses_nonsense() {
        assert!(SynthPlan::new(1 << 20, None, None, 0, 0).is_err());
        assert!(SynthPlan::new(2, None, None, 2, 0).is_err());
        assert!(SynthPlan::new(1 << 20, Some(0), None, 2, 0).is_err());
    }

    #[test]
    fn generator_is_fixed_for_a_seed() {
        let a: Vec<u64> = {
            let mut r = SplitMix64::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = SplitMix64::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        // The reference value of SplitMix64 seeded with 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut r = SplitMix64::new(1);
        assert!((0..1000)
            .map(|_| r.next_f32_symmetric())
            .all(|x| (-1.0..1.0).contains(&x)));
    }
}

#[cfg(test)]
mod ort_tests {
    use super::*;
    use crate::test_support::{load_cpu, ort_lib, scratch_dir};
    use tidepool_protocol::{Tensor, Tensors};

    #[test]
    fn written_model_loads_batches_and_is_deterministic() {
        let dir = scratch_dir("synth");
        let plan = SynthPlan::new(16 << 10, Some(8), Some(3), 3, 42).unwrap();
        let (a, b) = (dir.join("a.onnx"), dir.join("b.onnx"));
        assert_eq!(
            write(&plan, &a, &ort_lib(), EXTERNAL_DATA_FROM).unwrap(),
            None
        );
        write(&plan, &b, &ort_lib(), EXTERNAL_DATA_FROM).unwrap();
        // ONNX Runtime may order the initializers differently in each file; the weights, and
        // so the outputs, are the same.
        let mut model = load_cpu(&a);
        let mut twin = load_cpu(&b);
        assert!(model.spec().batched);
        model.warm_up(&crate::model::WarmUp::batch(4)).unwrap();
        let items: Vec<Tensors> = (0..3)
            .map(|i| {
                let x: Vec<f32> = (0..8).map(|j| (i * 8 + j) as f32 / 10.0).collect();
                Tensors::from([("input".to_owned(), Tensor::from_vec(vec![8], x).unwrap())])
            })
            .collect();
        let refs: Vec<&Tensors> = items.iter().collect();
        let batched = model.run(&refs).unwrap();
        assert_eq!(batched.len(), 3);
        for (item, out) in items.iter().zip(&batched) {
            assert_eq!(out["output"].shape(), &[3]);
            assert!(
                twin.run(&[item]).unwrap()[0]["output"] == model.run(&[item]).unwrap()[0]["output"]
            );
            // A batch of one gives the same numbers as the item inside a batch of three.
            let alone = model.run(&[item]).unwrap();
            let (x, y) = (
                alone[0]["output"].to_vec::<f32>().unwrap(),
                out["output"].to_vec::<f32>().unwrap(),
            );
            for (x, y) in x.iter().zip(&y) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn large_models_keep_weights_in_external_data() {
        let dir = scratch_dir("synth-external");
        let plan = SynthPlan::new(64 << 10, Some(16), Some(4), 2, 1).unwrap();
        let out = dir.join("ext.onnx");
        let data = write(&plan, &out, &ort_lib(), 0).unwrap().unwrap();
        let (model_len, data_len) = (
            std::fs::metadata(&out).unwrap().len(),
            std::fs::metadata(&data).unwrap().len(),
        );
        assert!(
            data_len >= plan.weight_bytes() / 2,
            "data file {data_len} bytes"
        );
        assert!(model_len < data_len, "model file {model_len} bytes");
        let mut model = load_cpu(&out);
        model.warm_up(&crate::model::WarmUp::batch(4)).unwrap();
    }
}
