//! [`ModelMetadata`]: what a server says about the model it serves, in answer to `metadata`.
//!
//! Modelled on KServe v2's model metadata (`name`, `versions`, `platform`, `inputs` and
//! `outputs` with `name`, `datatype`, `shape`), with what a tidepool client needs besides:
//! shapes are per item (the batch dimension is never sent), each dynamic dimension is `-1`
//! and carries its symbolic name where the model has one, and the batching rules (largest
//! batch, token budget, padding) are stated so a client can shape its traffic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tensor::DType;

/// What a server says about its model. Unknown keys are ignored when read, so later versions
/// may add fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// The model's name (the operator's, else the file name without `.onnx`).
    pub name: String,
    /// The model's version, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What runs it: `onnxruntime`.
    pub platform: String,
    /// A digest of the model file, `sha256:` and hex, so clients can tell two models apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The inputs an `infer` must carry, in the model's order.
    pub inputs: Vec<TensorMetadata>,
    /// The outputs a `result` carries, in the model's order.
    pub outputs: Vec<TensorMetadata>,
    /// True when items are stacked into batches; false when each item is the model's whole
    /// input (its shapes then include the model's leading dimension).
    pub batched: bool,
    /// Most items in one batch.
    pub max_batch: u32,
    /// Most tokens in one batch (its size times its longest item's length), if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<u64>,
    /// How items of different lengths share a batch; absent: only items of identical shapes
    /// do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<PaddingMetadata>,
    /// Why padding is on or off, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_note: Option<String>,
}

/// One input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMetadata {
    /// The name an `infer` or `result` uses.
    pub name: String,
    /// The element type.
    pub dtype: DType,
    /// The shape of one item (without the batch dimension of a batched model); `-1` for a
    /// dimension whose length the client chooses (inputs) or learns (outputs).
    pub shape: Vec<i64>,
    /// The symbolic name of each dimension in `shape` (`"sequence"`), `""` where it has none.
    /// Dimensions of one item with the same name have the same length.
    #[serde(default)]
    pub dims: Vec<String>,
}

impl TensorMetadata {
    /// True when dimension `axis` is dynamic.
    pub fn is_dynamic(&self, axis: usize) -> bool {
        self.shape.get(axis).is_some_and(|&d| d < 0)
    }
}

/// How items of different lengths are padded to share a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaddingMetadata {
    /// The symbolic names of the dimensions padded (`sequence`): inputs are padded along them
    /// to the batch's longest item, outputs that carry them are cut back to the item's own
    /// length.
    pub axes: Vec<String>,
    /// The value each input is padded with.
    pub values: BTreeMap<String, f64>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A text encoder's metadata, as a worker describes it.
    pub(crate) fn encoder() -> ModelMetadata {
        let text = |name: &str| TensorMetadata {
            name: name.into(),
            dtype: DType::I64,
            shape: vec![-1],
            dims: vec!["sequence".into()],
        };
        ModelMetadata {
            name: "minilm".into(),
            version: Some("2".into()),
            platform: "onnxruntime".into(),
            hash: Some("sha256:00ff".into()),
            inputs: vec![text("input_ids"), text("attention_mask")],
            outputs: vec![TensorMetadata {
                name: "embedding".into(),
                dtype: DType::F32,
                shape: vec![384],
                dims: vec![String::new()],
            }],
            batched: true,
            max_batch: 32,
            max_batch_tokens: Some(8192),
            padding: Some(PaddingMetadata {
                axes: vec!["sequence".into()],
                values: [
                    ("input_ids".to_owned(), 0.0),
                    ("attention_mask".to_owned(), 0.0),
                ]
                .into(),
            }),
            padding_note: Some("padded along sequence".into()),
        }
    }

    #[test]
    fn dynamic_dimensions_are_negative() {
        let t = TensorMetadata {
            name: "input_ids".into(),
            dtype: DType::I64,
            shape: vec![-1, 8],
            dims: vec!["sequence".into(), String::new()],
        };
        assert!(t.is_dynamic(0));
        assert!(!t.is_dynamic(1));
        assert!(!t.is_dynamic(2));
    }
}
