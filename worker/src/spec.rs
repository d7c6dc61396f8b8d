//! The model's contract: what it takes and gives, how an item is checked against it, and
//! whether items can be stacked into batches.
//!
//! Nothing here knows ONNX Runtime: [`crate::model`] reads a [`ModelSpec`] out of a loaded
//! session, and everything else (the connections that check each item before it is queued,
//! the batcher that groups items of the same shapes, the warm-up batch) works from the spec
//! alone, so it is tested without a model.
//!
//! Items travel without a batch dimension. When every input and output of the model has a
//! dynamic leading dimension the model is *batched*: items are stacked along a new leading
//! axis and outputs split back along it. Otherwise an item is the model's whole input and runs
//! alone.

use std::fmt::Write as _;

use bytes::Bytes;
use tidepool_protocol::{DType, Tensor, Tensors};

use crate::error::Error;

/// One model input or output as the model declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoSpec {
    /// The name.
    pub name: String,
    /// The element type.
    pub dtype: DType,
    /// The model's full shape, batch dimension included; `None` for a dynamic dimension.
    pub dims: Vec<Option<usize>>,
}

impl IoSpec {
    /// The shape one item has: without the leading dimension when the model is batched.
    pub fn item_dims(&self, batched: bool) -> &[Option<usize>] {
        if batched {
            &self.dims[1..]
        } else {
            &self.dims
        }
    }

    fn describe(&self, batched: bool) -> String {
        format!("{} {}", self.dtype, dims_string(self.item_dims(batched)))
    }
}

fn dims_string(dims: &[Option<usize>]) -> String {
    let mut s = String::from("[");
    for (i, d) in dims.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        match d {
            Some(d) => {
                let _ = write!(s, "{d}");
            }
            None => s.push('?'),
        }
    }
    s.push(']');
    s
}

/// What a model takes and gives, and whether its items can be stacked into batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// The inputs, in the model's order.
    pub inputs: Vec<IoSpec>,
    /// The outputs, in the model's order.
    pub outputs: Vec<IoSpec>,
    /// True when every input and output has a dynamic leading dimension, so items (which
    /// travel without it) are stacked along it. False: each item is a whole input and runs
    /// alone.
    pub batched: bool,
}

impl ModelSpec {
    /// Builds a spec, deciding whether the model is batched.
    pub fn new(inputs: Vec<IoSpec>, outputs: Vec<IoSpec>) -> ModelSpec {
        let leading_dynamic = |io: &IoSpec| io.dims.first().is_some_and(Option::is_none);
        let batched = !inputs.is_empty()
            && inputs.iter().all(leading_dynamic)
            && outputs.iter().all(leading_dynamic);
        ModelSpec {
            inputs,
            outputs,
            batched,
        }
    }

    /// How many items one run may hold: `max_batch` for a batched model, else 1.
    pub fn batch_limit(&self, max_batch: usize) -> usize {
        if self.batched {
            max_batch.max(1)
        } else {
            1
        }
    }

    /// The model's inputs described for an error message: `x: f32 [8]` per input.
    pub fn describe_inputs(&self) -> String {
        let parts: Vec<String> = self
            .inputs
            .iter()
            .map(|io| format!("{}: {}", io.name, io.describe(self.batched)))
            .collect();
        parts.join(", ")
    }

    /// Checks one item against the model: every input present, nothing extra, each with the
    /// model's dtype and per-item shape. The error says what differs.
    pub fn check(&self, item: &Tensors) -> Result<(), Error> {
        for name in item.keys() {
            if !self.inputs.iter().any(|io| &io.name == name) {
                return Err(Error::UnknownInput {
                    name: name.clone(),
                    expected: self.describe_inputs(),
                });
            }
        }
        for io in &self.inputs {
            let Some(tensor) = item.get(&io.name) else {
                return Err(Error::MissingInput {
                    name: io.name.clone(),
                    expected: self.describe_inputs(),
                });
            };
            if tensor.dtype() != io.dtype {
                return Err(Error::InputDType {
                    name: io.name.clone(),
                    expected: io.dtype,
                    got: tensor.dtype(),
                });
            }
            let want = io.item_dims(self.batched);
            let fits = tensor.shape().len() == want.len()
                && tensor
                    .shape()
                    .iter()
                    .zip(want)
                    .all(|(&got, want)| want.is_none_or(|w| w == got));
            if !fits {
                return Err(Error::InputShape {
                    name: io.name.clone(),
                    expected: dims_string(want),
                    got: tensor.shape().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// True when two checked items can share a batch: their inputs have the same shapes
    /// (which only matters for models with dynamic dimensions past the batch one).
    pub fn same_shapes(a: &Tensors, b: &Tensors) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((na, ta), (nb, tb))| na == nb && ta.shape() == tb.shape())
    }

    /// An item of zeros that passes [`ModelSpec::check`], dynamic dimensions set to 1: the
    /// warm-up batch.
    pub fn zero_item(&self) -> Result<Tensors, Error> {
        self.inputs
            .iter()
            .map(|io| {
                let shape: Vec<usize> = io
                    .item_dims(self.batched)
                    .iter()
                    .map(|d| d.unwrap_or(1))
                    .collect();
                let len = shape.iter().product::<usize>() * io.dtype.size();
                let tensor = Tensor::new(io.dtype, shape, Bytes::from(vec![0u8; len])).map_err(
                    |source| Error::Tensor {
                        name: io.name.clone(),
                        source,
                    },
                )?;
                Ok((io.name.clone(), tensor))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(batched_dims: bool) -> ModelSpec {
        let lead = if batched_dims { None } else { Some(1) };
        ModelSpec::new(
            vec![
                IoSpec {
                    name: "x".into(),
                    dtype: DType::F32,
                    dims: vec![lead, Some(4)],
                },
                IoSpec {
                    name: "mask".into(),
                    dtype: DType::I64,
                    dims: vec![lead, None],
                },
            ],
            vec![IoSpec {
                name: "y".into(),
                dtype: DType::F32,
                dims: vec![lead, Some(2)],
            }],
        )
    }

    fn tensor(dtype: DType, shape: &[usize]) -> Tensor {
        let len = shape.iter().product::<usize>() * dtype.size();
        Tensor::new(dtype, shape.to_vec(), Bytes::from(vec![0u8; len])).unwrap()
    }

    fn item(x: Tensor, mask: Tensor) -> Tensors {
        Tensors::from([("x".to_owned(), x), ("mask".to_owned(), mask)])
    }

    #[test]
    fn batched_only_when_every_leading_dim_is_dynamic() {
        assert!(spec(true).batched);
        assert!(!spec(false).batched);
        assert_eq!(spec(true).batch_limit(32), 32);
        assert_eq!(spec(false).batch_limit(32), 1);
    }

    #[test]
    fn a_good_item_passes() {
        let s = spec(true);
        s.check(&item(tensor(DType::F32, &[4]), tensor(DType::I64, &[7])))
            .unwrap();
        let z = s.zero_item().unwrap();
        s.check(&z).unwrap();
        assert_eq!(z["mask"].shape(), &[1]);
    }

    #[test]
    fn every_validation_error_says_what_differs() {
        let s = spec(true);
        let good_mask = || tensor(DType::I64, &[3]);

        let mut missing = item(tensor(DType::F32, &[4]), good_mask());
        missing.remove("mask");
        let err = s.check(&missing).unwrap_err();
        assert!(
            matches!(err, Error::MissingInput { ref name, .. } if name == "mask"),
            "{err}"
        );
        assert!(err.to_string().contains("x: f32 [4]"), "{err}");

        let mut extra = item(tensor(DType::F32, &[4]), good_mask());
        extra.insert("z".into(), tensor(DType::F32, &[1]));
        let err = s.check(&extra).unwrap_err();
        assert!(
            matches!(err, Error::UnknownInput { ref name, .. } if name == "z"),
            "{err}"
        );

        let err = s
            .check(&item(tensor(DType::F64, &[4]), good_mask()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InputDType {
                    expected: DType::F32,
                    got: DType::F64,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("f64") && err.to_string().contains("f32"),
            "{err}"
        );

        let err = s
            .check(&item(tensor(DType::F32, &[5]), good_mask()))
            .unwrap_err();
        assert!(
            matches!(err, Error::InputShape { ref got, .. } if got == &vec![5]),
            "{err}"
        );
        assert!(err.to_string().contains("[4]"), "{err}");

        // The batch dimension is not sent.
        let err = s
            .check(&item(tensor(DType::F32, &[1, 4]), good_mask()))
            .unwrap_err();
        assert!(matches!(err, Error::InputShape { .. }), "{err}");

        for err in [
            s.check(&missing).unwrap_err(),
            s.check(&extra).unwrap_err(),
            s.check(&item(tensor(DType::F32, &[5]), good_mask()))
                .unwrap_err(),
        ] {
            assert_eq!(err.code(), tidepool_protocol::ErrorCode::BadRequest);
        }
    }

    #[test]
    fn unbatched_items_carry_the_whole_shape() {
        let s = spec(false);
        s.check(&item(
            tensor(DType::F32, &[1, 4]),
            tensor(DType::I64, &[1, 9]),
        ))
        .unwrap();
        assert!(s
            .check(&item(tensor(DType::F32, &[4]), tensor(DType::I64, &[1, 9])))
            .is_err());
    }

    #[test]
    fn same_shapes_compares_every_input() {
        let a = item(tensor(DType::F32, &[4]), tensor(DType::I64, &[3]));
        let b = item(tensor(DType::F32, &[4]), tensor(DType::I64, &[3]));
        let c = item(tensor(DType::F32, &[4]), tensor(DType::I64, &[5]));
        assert!(ModelSpec::same_shapes(&a, &b));
        assert!(!ModelSpec::same_shapes(&a, &c));
    }

    #[test]
    fn a_fixed_leading_output_or_no_input_means_unbatched() {
        let io = |name: &str, dims: Vec<Option<usize>>| IoSpec {
            name: name.into(),
            dtype: DType::F32,
            dims,
        };
        let fixed_output = ModelSpec::new(
            vec![io("x", vec![None, Some(4)])],
            vec![io("y", vec![Some(1), Some(2)])],
        );
        assert!(!fixed_output.batched);
        let scalar_input = ModelSpec::new(vec![io("x", vec![])], vec![io("y", vec![None])]);
        assert!(
            !scalar_input.batched,
            "a scalar input has no leading dimension"
        );
        let no_inputs = ModelSpec::new(vec![], vec![io("y", vec![None])]);
        assert!(!no_inputs.batched);
        // A batch limit of 0 still lets one item run.
        assert_eq!(spec(true).batch_limit(0), 1);
    }

    #[test]
    fn item_dims_drop_the_batch_dimension_only_when_batched() {
        let s = spec(true);
        assert_eq!(s.inputs[0].item_dims(true), &[Some(4)]);
        assert_eq!(s.inputs[0].item_dims(false), &[None, Some(4)]);
    }

    #[test]
    fn inputs_are_described_in_model_order_with_dynamic_dims_as_question_marks() {
        assert_eq!(spec(true).describe_inputs(), "x: f32 [4], mask: i64 [?]");
        assert_eq!(
            spec(false).describe_inputs(),
            "x: f32 [1, 4], mask: i64 [1, ?]"
        );
        assert_eq!(dims_string(&[]), "[]");
    }

    #[test]
    fn a_dynamic_dimension_takes_any_length_but_not_another_rank() {
        let s = spec(true);
        for len in [0, 1, 1000] {
            s.check(&item(tensor(DType::F32, &[4]), tensor(DType::I64, &[len])))
                .unwrap();
        }
        let err = s
            .check(&item(tensor(DType::F32, &[4]), tensor(DType::I64, &[2, 2])))
            .unwrap_err();
        assert!(
            matches!(err, Error::InputShape { ref name, ref expected, .. } if name == "mask" && expected == "[?]"),
            "{err}"
        );
    }

    #[test]
    fn an_unbatched_zero_item_has_the_whole_shape() {
        let z = spec(false).zero_item().unwrap();
        assert_eq!(z["x"].shape(), &[1, 4]);
        assert_eq!(z["mask"].shape(), &[1, 1]);
        assert!(z["x"].data().iter().all(|&b| b == 0));
        assert_eq!(z["x"].data().len(), 4 * DType::F32.size());
        spec(false).check(&z).unwrap();
    }

    #[test]
    fn same_shapes_needs_the_same_names() {
        let a = item(tensor(DType::F32, &[4]), tensor(DType::I64, &[3]));
        let mut renamed = a.clone();
        let mask = renamed.remove("mask").unwrap();
        renamed.insert("other".into(), mask);
        assert!(!ModelSpec::same_shapes(&a, &renamed));
        let mut fewer = a.clone();
        fewer.remove("mask");
        assert!(!ModelSpec::same_shapes(&a, &fewer));
        assert!(!ModelSpec::same_shapes(&fewer, &a));
    }
}
