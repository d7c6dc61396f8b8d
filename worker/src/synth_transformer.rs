//! A synthetic transformer encoder (`synth --kind transformer`): the shape of a real text
//! model, so that batching, padding and the GPU are measured on the work a BERT does.
//!
//! ```text
//! input_ids: i64 [batch, sequence] ─ Gather(token table) ─▶ x: [batch, sequence, width]
//! attention_mask: i64 [batch, sequence] ─▶ additive bias: 0 where 1, -10000 where 0
//! layers × { x = LayerNorm(x + MultiHeadAttention(x, bias))
//!            x = LayerNorm(x + MatMul(Relu(MatMul(x) + b), 4·width → width) + b) }
//! embedding: f32 [batch, width] = mean of x over the positions where the mask is 1
//! ```
//!
//! Attention masks padded positions out and the pool averages only real ones, so the answer
//! for an item does not depend on what it is padded to: the worker may batch sentences of
//! different lengths. There are no position embeddings (they cost nothing next to the
//! layers). BERT-base is `--width 768 --layers 12 --heads 12 --vocab 30522`. Weights come
//! from the seeded generator of [`crate::synth`].

use std::path::Path;

use ort::editor::{Graph, Node, ONNX_DOMAIN};
use ort::memory::Allocator;
use ort::operator::Attribute;
use ort::value::{
    Outlet, Shape, SymbolicDimensions, Tensor as OrtTensor, TensorElementType, ValueType,
};

use crate::config::SynthConfig;
use crate::error::Error;
use crate::synth::{random_tensor, rename_batch_dims, synthesize, SplitMix64, EXTERNAL_DATA_FROM};

/// The dimensions of a synthetic transformer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerPlan {
    /// Hidden width.
    pub width: usize,
    /// Attention + MLP blocks.
    pub layers: usize,
    /// Attention heads; `width` divides by it.
    pub heads: usize,
    /// Token ids are below this.
    pub vocab: usize,
    /// The weight seed.
    pub seed: u64,
}

impl TransformerPlan {
    /// From the `synth` flags, checked.
    pub fn from_config(config: &SynthConfig) -> Result<TransformerPlan, Error> {
        let invalid = |flag, reason: String| Error::InvalidConfig { flag, reason };
        let heads = config.heads.unwrap_or((config.width / 64).max(1));
        if config.width == 0 || config.layers == 0 || config.vocab == 0 {
            return Err(invalid(
                "width",
                "--width, --layers and --vocab must be at least 1".into(),
            ));
        }
        if heads == 0 || config.width % heads != 0 {
            return Err(invalid(
                "heads",
                format!(
                    "the width {} must divide by the heads {heads}",
                    config.width
                ),
            ));
        }
        Ok(TransformerPlan {
            width: config.width,
            layers: config.layers,
            heads,
            vocab: config.vocab,
            seed: config.seed,
        })
    }

    /// Bytes of f32 weights: the token table and, per layer, 4 attention projections and
    /// the two MLP matrices with their biases and two layer norms.
    pub fn weight_bytes(&self) -> u64 {
        let w = self.width as u64;
        let per_layer = 4 * (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w) + 4 * w;
        (self.vocab as u64 * w + self.layers as u64 * per_layer) * 4
    }
}

/// The `synth --kind transformer` subcommand.
pub fn run(config: &SynthConfig) -> Result<TransformerPlan, Error> {
    let plan = TransformerPlan::from_config(config)?;
    let ort_lib = config.ort_lib.as_deref().ok_or(Error::OrtLibMissing)?;
    write(&plan, &config.out, ort_lib, EXTERNAL_DATA_FROM)?;
    Ok(plan)
}

/// Writes the model to `out` (weights in `out.data` from `external_from` bytes).
pub fn write(
    plan: &TransformerPlan,
    out: &Path,
    ort_lib: &Path,
    external_from: u64,
) -> Result<(), Error> {
    let data = synthesize(out, ort_lib, plan.weight_bytes() >= external_from, || {
        build(plan)
    })?;
    rename_batch_dims(out, SEQUENCE, BATCH)?;
    // The binary prints the plan; the external data file is the one fact only known here.
    tracing::debug!(out = %out.display(), external = data.is_some(), "synthetic transformer written");
    Ok(())
}

/// The names of the dynamic dimensions (as long as each other: see `rename_batch_dims`).
const SEQUENCE: &str = "sequence";
const BATCH: &str = "batch_sz";

fn outlet(name: &str, ty: TensorElementType, dims: &[i64]) -> Outlet {
    // Every dynamic dimension is written `sequence`; the batch ones are renamed afterwards.
    let symbols = dims.iter().map(|&d| {
        if d < 0 {
            SEQUENCE.to_owned()
        } else {
            String::new()
        }
    });
    Outlet::new(
        name,
        ValueType::Tensor {
            ty,
            shape: Shape::new(dims.iter().copied()),
            dimension_symbols: SymbolicDimensions::new(symbols),
        },
    )
}

/// Builds graphs node by node, naming each node after its one output.
struct Builder {
    graph: Graph,
    rng: SplitMix64,
}

impl Builder {
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<Attribute>,
    ) -> ort::Result<String> {
        self.graph.add_node(Node::new(
            op,
            ONNX_DOMAIN,
            output,
            inputs,
            [output],
            attributes,
        )?)?;
        Ok(output.to_owned())
    }

    fn weights(&mut self, name: &str, shape: &[usize], bound: f32) -> ort::Result<String> {
        let tensor = random_tensor(shape, bound, &mut self.rng)?;
        self.graph.add_initializer(name, tensor, false)?;
        Ok(name.to_owned())
    }

    fn constant(&mut self, name: &str, value: f32) -> ort::Result<String> {
        self.fill(name, &[], value)
    }

    fn fill(&mut self, name: &str, shape: &[usize], value: f32) -> ort::Result<String> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let mut tensor = OrtTensor::<f32>::new(&Allocator::default(), dims)?;
        tensor.extract_tensor_mut().1.fill(value);
        self.graph.add_initializer(name, tensor, false)?;
        Ok(name.to_owned())
    }

    fn ints(&mut self, name: &str, values: &[i64]) -> ort::Result<String> {
        let mut tensor = OrtTensor::<i64>::new(&Allocator::default(), vec![values.len() as i64])?;
        tensor.extract_tensor_mut().1.copy_from_slice(values);
        self.graph.add_initializer(name, tensor, false)?;
        Ok(name.to_owned())
    }

    /// `x @ W + b` with a fresh `rows x cols` weight.
    fn linear(&mut self, x: &str, name: &str, rows: usize, cols: usize) -> ort::Result<String> {
        let bound = (6.0 / rows as f32).sqrt() * 0.5;
        let w = self.weights(&format!("{name}.weight"), &[rows, cols], bound)?;
        let b = self.weights(&format!("{name}.bias"), &[cols], 0.02)?;
        let product = self.node("MatMul", &[x, &w], &format!("{name}.matmul"), vec![])?;
        self.node("Add", &[&product, &b], name, vec![])
    }

    fn layer_norm(&mut self, x: &str, name: &str, width: usize) -> ort::Result<String> {
        let scale = self.fill(&format!("{name}.scale"), &[width], 1.0)?;
        let bias = self.fill(&format!("{name}.bias"), &[width], 0.0)?;
        self.node(
            "LayerNormalization",
            &[x, &scale, &bias],
            name,
            vec![Attribute::new("axis", -1i64)?],
        )
    }
}

fn build(plan: &TransformerPlan) -> ort::Result<Graph> {
    let mut graph = Graph::new()?;
    graph.set_inputs([
        outlet("input_ids", TensorElementType::Int64, &[-1, -1]),
        outlet("attention_mask", TensorElementType::Int64, &[-1, -1]),
    ])?;
    graph.set_outputs([outlet(
        "embedding",
        TensorElementType::Float32,
        &[-1, plan.width as i64],
    )])?;
    let mut b = Builder {
        graph,
        rng: SplitMix64::new(plan.seed),
    };
    let (w, heads) = (plan.width, plan.heads);
    let head_dim = w / heads;
    let attr = |name: &str, value: i64| Attribute::new(name, value);

    let table = b.weights("tokens.table", &[plan.vocab, w], 1.0)?;
    let mut x = b.node("Gather", &[&table, "input_ids"], "tokens", vec![])?;

    // The mask as floats [batch, seq], and as an additive attention bias [batch, 1, 1, seq].
    let mask = b.node(
        "Cast",
        &["attention_mask"],
        "mask.f32",
        vec![attr("to", 1)?],
    )?;
    let one = b.constant("one", 1.0)?;
    let big = b.constant("minus_10000", -10_000.0)?;
    let inverted = b.node("Sub", &[&one, &mask], "mask.inverted", vec![])?;
    let bias = b.node("Mul", &[&inverted, &big], "mask.bias2", vec![])?;
    let axes12 = b.ints("axes.1.2", &[1, 2])?;
    let bias = b.node("Unsqueeze", &[&bias, &axes12], "mask.bias", vec![])?;
    let scale = b.constant("attention.scale", 1.0 / (head_dim as f32).sqrt())?;
    // [batch, seq, width] <-> [batch, seq, heads, head_dim]; 0 copies the input's dimension.
    let split = b.ints("shape.heads", &[0, 0, heads as i64, head_dim as i64])?;
    let merge = b.ints("shape.merged", &[0, 0, w as i64])?;

    for l in 0..plan.layers {
        let p = |part: &str| format!("layer{l}.{part}");
        let heads_of = |b: &mut Builder, which: &str, perm: [i64; 4]| -> ort::Result<String> {
            let projected = b.linear(&x, &p(which), w, w)?;
            let split_name = p(&format!("{which}.split"));
            let reshaped = b.node("Reshape", &[&projected, &split], &split_name, vec![])?;
            b.node(
                "Transpose",
                &[&reshaped],
                &p(&format!("{which}.heads")),
                vec![Attribute::new("perm", perm.to_vec())?],
            )
        };
        let q = heads_of(&mut b, "q", [0, 2, 1, 3])?;
        // K goes in transposed: [batch, heads, head_dim, seq].
        let k = heads_of(&mut b, "k", [0, 2, 3, 1])?;
        let v = heads_of(&mut b, "v", [0, 2, 1, 3])?;
        let scores = b.node("MatMul", &[&q, &k], &p("scores"), vec![])?;
        let scores = b.node("Mul", &[&scores, &scale], &p("scores.scaled"), vec![])?;
        let scores = b.node("Add", &[&scores, &bias], &p("scores.masked"), vec![])?;
        let weights = b.node(
            "Softmax",
            &[&scores],
            &p("attention"),
            vec![attr("axis", -1)?],
        )?;
        let context = b.node("MatMul", &[&weights, &v], &p("context"), vec![])?;
        let context = b.node(
            "Transpose",
            &[&context],
            &p("context.t"),
            vec![Attribute::new("perm", vec![0i64, 2, 1, 3])?],
        )?;
        let context = b.node("Reshape", &[&context, &merge], &p("context.merged"), vec![])?;
        let attended = b.linear(&context, &p("o"), w, w)?;
        let residual = b.node("Add", &[&x, &attended], &p("attention.residual"), vec![])?;
        x = b.layer_norm(&residual, &p("attention.norm"), w)?;

        let up = b.linear(&x, &p("mlp.up"), w, 4 * w)?;
        let up = b.node("Relu", &[&up], &p("mlp.relu"), vec![])?;
        let down = b.linear(&up, &p("mlp.down"), 4 * w, w)?;
        let residual = b.node("Add", &[&x, &down], &p("mlp.residual"), vec![])?;
        x = b.layer_norm(&residual, &p("mlp.norm"), w)?;
    }

    // Masked mean over the sequence.
    let axis1 = b.ints("axes.1", &[1])?;
    let axis2 = b.ints("axes.2", &[2])?;
    let mask3 = b.node("Unsqueeze", &[&mask, &axis2], "pool.mask", vec![])?;
    let masked = b.node("Mul", &[&x, &mask3], "pool.masked", vec![])?;
    let sum = b.node(
        "ReduceSum",
        &[&masked, &axis1],
        "pool.sum",
        vec![attr("keepdims", 0)?],
    )?;
    let count = b.node(
        "ReduceSum",
        &[&mask, &axis1],
        "pool.count",
        vec![attr("keepdims", 1)?],
    )?;
    // An all-zero mask would divide by zero; count at least one position.
    let floor = b.constant("pool.floor", 1.0)?;
    let count = b.node("Max", &[&count, &floor], "pool.count.floor", vec![])?;
    b.node("Div", &[&sum, &count], "embedding", vec![])?;
    Ok(b.graph)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tidepool_protocol::{DType, Tensor, Tensors};

    use super::*;
    use crate::test_support::{load_cpu, ort_lib, scratch_dir};

    fn plan() -> TransformerPlan {
        TransformerPlan {
            width: 32,
            layers: 2,
            heads: 4,
            vocab: 50,
            seed: 3,
        }
    }

    fn sentence(len: usize, seed: usize) -> Tensors {
        let ids: Vec<i64> = (0..len)
            .map(|i| ((i * 13 + seed * 7) % 50) as i64)
            .collect();
        Tensors::from([
            (
                "input_ids".to_owned(),
                Tensor::from_vec(vec![len], ids).unwrap(),
            ),
            (
                "attention_mask".to_owned(),
                Tensor::new(
                    DType::I64,
                    vec![len],
                    Bytes::from(1i64.to_le_bytes().repeat(len)),
                )
                .unwrap(),
            ),
        ])
    }

    #[test]
    fn the_transformer_pads_mixed_lengths_and_answers_as_alone() {
        let out = scratch_dir("transformer").join("t.onnx");
        write(&plan(), &out, &ort_lib(), EXTERNAL_DATA_FROM).unwrap();
        let mut model = load_cpu(&out);
        let spec = model.spec().clone();
        assert!(spec.batched);
        assert_eq!(
            spec.padding.as_ref().unwrap().axes,
            vec!["sequence".to_owned()]
        );
        assert_eq!(
            spec.inputs[0].symbols,
            vec!["batch_sz".to_owned(), "sequence".to_owned()]
        );
        let items: Vec<Tensors> = [3, 17, 1, 9]
            .iter()
            .enumerate()
            .map(|(s, &l)| sentence(l, s))
            .collect();
        let refs: Vec<&Tensors> = items.iter().collect();
        let batched = model.run(&refs).unwrap();
        for (item, answer) in items.iter().zip(&batched) {
            let alone = model.run(&[item]).unwrap().remove(0);
            let (a, b) = (
                alone["embedding"].to_vec::<f32>().unwrap(),
                answer["embedding"].to_vec::<f32>().unwrap(),
            );
            assert_eq!(a.len(), 32);
            assert!(a.iter().all(|v| v.is_finite()));
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                    "alone {x} vs batched {y}"
                );
            }
        }
        // Different sentences, different embeddings.
        assert_ne!(batched[0]["embedding"], batched[1]["embedding"]);
    }

    #[test]
    fn plans_check_their_flags_and_count_their_weights() {
        let mut config = SynthConfig {
            out: "x.onnx".into(),
            kind: crate::config::SynthKind::Transformer,
            size: None,
            width: 768,
            heads: None,
            vocab: 30522,
            input_dim: None,
            output_dim: None,
            layers: 12,
            seed: 0,
            ort_lib: None,
        };
        let bert = TransformerPlan::from_config(&config).unwrap();
        assert_eq!(bert.heads, 12);
        // BERT-base without position and type embeddings: about 109 M f32 parameters.
        let params = bert.weight_bytes() / 4;
        assert!((100_000_000..115_000_000).contains(&params), "{params}");
        config.heads = Some(7);
        assert!(TransformerPlan::from_config(&config)
            .unwrap_err()
            .to_string()
            .contains("divide"));
    }
}
