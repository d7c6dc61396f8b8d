//! Helpers for tests: [`ort_lib`], shared with the `tidepool-tests` harness through the
//! `test-support` feature, and the crate-private helpers of this crate's own unit tests.

use std::path::PathBuf;
#[cfg(test)]
use std::sync::atomic::{AtomicUsize, Ordering};

/// The ONNX Runtime library for tests: `ORT_DYLIB_PATH`, else `libonnxruntime.so.*` in the
/// repository's `.ort/` folder (`make ort` or scripts/fetch-ort.sh fills it). Panics with the
/// command to run when there is none.
///
/// The one lookup every test uses: this crate's unit tests, and the `tidepool-tests` harness
/// (which enables the `test-support` feature and re-exports it). The worker binary itself
/// never guesses: it takes `--ort-lib` or `ORT_DYLIB_PATH`.
pub fn ort_lib() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(path);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ort");
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|entries| {
            entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no ONNX Runtime library: set ORT_DYLIB_PATH or run `make ort` (looked in {})",
                dir.display()
            )
        })
}

/// A fresh empty directory under the system's temporary directory.
#[cfg(test)]
pub(crate) fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tidepool-worker-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a model built with `ort::editor` to `path` (no optimisation, weights inline).
#[cfg(test)]
pub(crate) fn write_graph(path: &std::path::Path, graph: ort::editor::Graph) {
    use ort::editor::{Model, Opset, ONNX_DOMAIN};
    use ort::session::builder::GraphOptimizationLevel;
    let env = crate::model::environment(&ort_lib()).unwrap();
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17).unwrap()]).unwrap();
    model.set_graph(graph).unwrap();
    let builder = ort::session::Session::builder(&env)
        .unwrap()
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .unwrap()
        .with_optimized_model_path(path)
        .unwrap();
    drop(model.into_session(&builder).unwrap());
}

/// A graph input or output of type `ty` and shape `dims` (-1: dynamic). Loads ONNX Runtime
/// first: any ort call before that would look for a library on the default path.
#[cfg(test)]
pub(crate) fn outlet(
    name: &str,
    ty: ort::value::TensorElementType,
    dims: &[i64],
) -> ort::value::Outlet {
    crate::model::environment(&ort_lib()).unwrap();
    ort::value::Outlet::new(
        name,
        ort::value::ValueType::Tensor {
            ty,
            shape: ort::value::Shape::new(dims.iter().copied()),
            dimension_symbols: ort::value::SymbolicDimensions::empty(dims.len()),
        },
    )
}

/// An empty editor graph, with ONNX Runtime loaded first.
#[cfg(test)]
pub(crate) fn new_graph() -> ort::editor::Graph {
    crate::model::environment(&ort_lib()).unwrap();
    ort::editor::Graph::new().unwrap()
}

/// Writes a one-node model `y = op(x)`, input and output f32 of shape `dims` (-1: dynamic).
#[cfg(test)]
pub(crate) fn write_unary(path: &std::path::Path, op: &str, dims: &[i64]) {
    use ort::editor::{Node, ONNX_DOMAIN};
    use ort::value::TensorElementType as T;
    let mut graph = new_graph();
    graph.set_inputs([outlet("x", T::Float32, dims)]).unwrap();
    graph.set_outputs([outlet("y", T::Float32, dims)]).unwrap();
    graph
        .add_node(Node::new(op, ONNX_DOMAIN, op, ["x"], ["y"], []).unwrap())
        .unwrap();
    write_graph(path, graph);
}

/// Loads `path` on the CPU with one intra-op thread, as the unit tests run models.
#[cfg(test)]
pub(crate) fn load_cpu(path: &std::path::Path) -> crate::model::Model {
    crate::model::Model::load(&crate::model::LoadOptions {
        path: path.to_path_buf(),
        ort_lib: ort_lib(),
        device: crate::config::DeviceChoice::Cpu,
        threads: Some(1),
        spinning: None,
        padding: crate::spec::PaddingOptions::default(),
    })
    .expect("load the test model")
}

/// Real-shaped models for tests, built with `ort::editor`: what teams serve (text encoders,
/// taggers, classifiers, half-precision models), small enough to build in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestModel {
    /// A sentence encoder: `input_ids: i64 [batch, sequence]` and
    /// `attention_mask: i64 [batch, sequence]` to `embedding: f32 [batch, 4]`, the mean of
    /// the token embeddings where the mask is 1.
    Encoder,
    /// A token tagger: `input_ids: i64 [batch, sequence]` to
    /// `logits: f32 [batch, sequence, 3]`, one row of logits per token.
    Tagger,
    /// A classifier: `features: f32 [batch, 3]` to `probabilities: f32 [batch, 4]` and
    /// `label: i64 [batch]` (no dimension left per item).
    Classifier,
    /// Half precision: `a: f16 [batch, 3]` and `b: bf16 [batch, 3]` to their sum as
    /// `sum_f16: f16 [batch, 3]` and `sum_bf16: bf16 [batch, 3]`.
    Half,
}

/// The vocabulary size of the text models: token ids are below it.
pub const TEST_VOCAB: usize = 16;

/// Writes `kind` to `path` (no optimisation, weights inline). Weights are fixed, so two
/// writes are the same model.
pub fn write_test_model(kind: TestModel, path: &std::path::Path) {
    build_test_model(kind, path).expect("write the test model");
    if matches!(kind, TestModel::Encoder | TestModel::Tagger) {
        crate::synth::rename_batch_dims(path, "sequence", "batch_sz").expect("rename dims");
    }
}

fn build_test_model(kind: TestModel, path: &std::path::Path) -> ort::Result<()> {
    use ort::editor::{Model, Node, Opset, ONNX_DOMAIN};
    use ort::operator::Attribute;
    use ort::session::builder::GraphOptimizationLevel;
    use ort::value::{Tensor as OrtTensor, TensorElementType as T};

    let env = crate::model::environment(&ort_lib()).map_err(|e| ort::Error::new(e.to_string()))?;
    let io = |name: &str, ty: T, dims: &[i64], symbols: &[&str]| {
        ort::value::Outlet::new(
            name,
            ort::value::ValueType::Tensor {
                ty,
                shape: ort::value::Shape::new(dims.iter().copied()),
                dimension_symbols: ort::value::SymbolicDimensions::new(
                    symbols.iter().map(|s| (*s).to_owned()),
                ),
            },
        )
    };
    // Initializers must own memory ONNX Runtime allocated, so they are filled in place.
    let weights = |shape: &[i64], scale: f32| {
        let mut tensor = OrtTensor::<f32>::new(&ort::memory::Allocator::default(), shape.to_vec())?;
        let (_, data) = tensor.extract_tensor_mut();
        for (i, x) in data.iter_mut().enumerate() {
            *x = ((i * 7 + 3) % 11) as f32 * scale - 0.5;
        }
        Ok::<_, ort::Error>(tensor)
    };
    let node = |op: &str, inputs: &[&str], output: &str, attributes: Vec<Attribute>| {
        Node::new(op, ONNX_DOMAIN, output, inputs, [output], attributes)
    };
    let attr = |name: &str, value: i64| Attribute::new(name, value);
    let axes = |values: Vec<i64>| {
        let mut tensor = OrtTensor::<i64>::new(
            &ort::memory::Allocator::default(),
            vec![values.len() as i64],
        )?;
        tensor.extract_tensor_mut().1.copy_from_slice(&values);
        Ok::<_, ort::Error>(tensor)
    };

    let mut graph = ort::editor::Graph::new()?;
    // ONNX Runtime's model editor writes the first symbolic name of an outlet on every
    // dynamic dimension of it, so every dynamic dimension is written as `sequence` and the
    // batch ones are renamed afterwards (`synth::rename_batch_dims`).
    let text = ["sequence", "sequence"];
    match kind {
        TestModel::Encoder => {
            graph.set_inputs([
                io("input_ids", T::Int64, &[-1, -1], &text),
                io("attention_mask", T::Int64, &[-1, -1], &text),
            ])?;
            graph.set_outputs([io("embedding", T::Float32, &[-1, 4], &["batch", ""])])?;
            graph.add_initializer("table", weights(&[TEST_VOCAB as i64, 4], 0.1)?, false)?;
            graph.add_initializer("axis1", axes(vec![1])?, false)?;
            graph.add_initializer("axis2", axes(vec![2])?, false)?;
            for n in [
                node("Gather", &["table", "input_ids"], "tokens", vec![]),
                node("Cast", &["attention_mask"], "maskf", vec![attr("to", 1)?]),
                node("Unsqueeze", &["maskf", "axis2"], "mask3", vec![]),
                node("Mul", &["tokens", "mask3"], "masked", vec![]),
                node(
                    "ReduceSum",
                    &["masked", "axis1"],
                    "summed",
                    vec![attr("keepdims", 0)?],
                ),
                node(
                    "ReduceSum",
                    &["maskf", "axis1"],
                    "count",
                    vec![attr("keepdims", 1)?],
                ),
                node("Div", &["summed", "count"], "embedding", vec![]),
            ] {
                graph.add_node(n?)?;
            }
        }
        TestModel::Tagger => {
            graph.set_inputs([io("input_ids", T::Int64, &[-1, -1], &text)])?;
            graph.set_outputs([io(
                "logits",
                T::Float32,
                &[-1, -1, 3],
                &["sequence", "sequence", ""],
            )])?;
            graph.add_initializer("table", weights(&[TEST_VOCAB as i64, 4], 0.1)?, false)?;
            graph.add_initializer("head", weights(&[4, 3], 0.2)?, false)?;
            graph.add_node(node("Gather", &["table", "input_ids"], "tokens", vec![])?)?;
            graph.add_node(node("MatMul", &["tokens", "head"], "logits", vec![])?)?;
        }
        TestModel::Classifier => {
            graph.set_inputs([io("features", T::Float32, &[-1, 3], &["batch", ""])])?;
            graph.set_outputs([
                io("probabilities", T::Float32, &[-1, 4], &["batch", ""]),
                io("label", T::Int64, &[-1], &["batch"]),
            ])?;
            graph.add_initializer("w", weights(&[3, 4], 0.3)?, false)?;
            for n in [
                node("MatMul", &["features", "w"], "scores", vec![]),
                node(
                    "Softmax",
                    &["scores"],
                    "probabilities",
                    vec![attr("axis", -1)?],
                ),
                node(
                    "ArgMax",
                    &["scores"],
                    "label",
                    vec![attr("axis", 1)?, attr("keepdims", 0)?],
                ),
            ] {
                graph.add_node(n?)?;
            }
        }
        TestModel::Half => {
            graph.set_inputs([
                io("a", T::Float16, &[-1, 3], &["batch", ""]),
                io("b", T::Bfloat16, &[-1, 3], &["batch", ""]),
            ])?;
            graph.set_outputs([
                io("sum_f16", T::Float16, &[-1, 3], &["batch", ""]),
                io("sum_bf16", T::Bfloat16, &[-1, 3], &["batch", ""]),
            ])?;
            // ONNX's TensorProto codes: 1 float, 10 float16, 16 bfloat16.
            for n in [
                node("Cast", &["a"], "af", vec![attr("to", 1)?]),
                node("Cast", &["b"], "bf", vec![attr("to", 1)?]),
                node("Add", &["af", "bf"], "sum", vec![]),
                node("Cast", &["sum"], "sum_f16", vec![attr("to", 10)?]),
                node("Cast", &["sum"], "sum_bf16", vec![attr("to", 16)?]),
            ] {
                graph.add_node(n?)?;
            }
        }
    }
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17)?])?;
    model.set_graph(graph)?;
    let builder = ort::session::Session::builder(&env)?
        .with_optimization_level(GraphOptimizationLevel::Disable)?
        .with_optimized_model_path(path)?;
    drop(model.into_session(&builder)?);
    Ok(())
}
