//! The items to send: `--input NAME:DTYPE:DIMS` specifications and the random tensors
//! built from them.
//!
//! The tensor shapes come from the command line (the default, `input:f32:64`, is the input
//! of the worker's synthetic models made with `--input-dim 64`), from the server's answer to
//! `metadata` (`items_from_metadata`, `--from-metadata`: nothing to open, and dynamic
//! dimensions such as a sentence's length drawn from `--lengths`), or from the model file
//! itself (`inputs_of_model`, `--model`, with the `onnx` feature). A few distinct items are built up front from a seeded RNG and sent in turn;
//! cloning one is cheap (the data is a shared [`Bytes`]), so the send path never
//! generates numbers.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidepool_protocol::{DType, ModelMetadata, Tensor, Tensors};

use crate::error::Error;

/// The inputs of an ONNX model, as the worker serving it checks them: names, dtypes and
/// shapes per item (without the batch dimension of a batched model).
///
/// Loads the model with ONNX Runtime through the worker's own loader, so that what is sent
/// is exactly what the worker expects. Only with the `onnx` feature (the default).
#[cfg(feature = "onnx")]
pub fn inputs_of_model(
    path: &std::path::Path,
    ort_lib: &std::path::Path,
) -> Result<Vec<InputSpec>, Error> {
    use tidepool_worker::model::{LoadOptions, Model};
    let model = Model::load(&LoadOptions {
        path: path.to_owned(),
        ort_lib: ort_lib.to_owned(),
        device: tidepool_worker::DeviceChoice::Cpu,
        threads: Some(1),
        spinning: None,
        padding: tidepool_worker::PaddingOptions::default(),
    })
    .map_err(|source| Error::Model {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    let spec = model.spec();
    spec.inputs
        .iter()
        .map(|io| {
            let dims = io.item_dims(spec.batched);
            let shape: Option<Vec<usize>> = dims.iter().copied().collect();
            shape
                .map(|shape| InputSpec {
                    name: io.name.clone(),
                    dtype: io.dtype,
                    shape,
                })
                .ok_or_else(|| Error::DynamicInput {
                    name: io.name.clone(),
                    shape: dims
                        .iter()
                        .map(|d| d.map_or_else(|| "?".to_owned(), |d| d.to_string()))
                        .collect::<Vec<_>>()
                        .join("x"),
                })
        })
        .collect()
}

/// One named input of the model, without the batch dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSpec {
    /// The input's name in the model.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape per item (the batch dimension excluded).
    pub shape: Vec<usize>,
}

impl FromStr for InputSpec {
    type Err = Error;

    /// Reads `NAME:DTYPE:DIMS`, where DIMS is `64`, `3x224x224` or `3,224,224`; empty
    /// DIMS is a scalar.
    fn from_str(spec: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidInput {
            spec: spec.to_owned(),
            reason,
        };
        let mut parts = spec.rsplitn(3, ':');
        let (Some(dims), Some(dtype), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "it has fewer than three ':'-separated parts".into(),
            ));
        };
        if name.is_empty() {
            return Err(invalid("the name is empty".into()));
        }
        let dtype: DType = dtype
            .parse()
            .map_err(|_| invalid(format!("unknown dtype {dtype:?}")))?;
        let shape = if dims.trim().is_empty() {
            Vec::new()
        } else {
            dims.split(['x', ','])
                .map(|d| {
                    d.trim()
                        .parse::<usize>()
                        .map_err(|_| invalid(format!("dimension {d:?} is not a whole number")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(InputSpec {
            name: name.to_owned(),
            dtype,
            shape,
        })
    }
}

impl fmt::Display for InputSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(ToString::to_string).collect();
        write!(f, "{}:{}:{}", self.name, self.dtype, dims.join("x"))
    }
}

/// Builds `count` distinct items (at least one) of random data for `specs`, the same for
/// the same seed. Floats are uniform in [-1, 1), integers in [0, 10), booleans 0 or 1:
/// valid for any model that takes features, small indices or masks.
pub fn build_items(specs: &[InputSpec], count: usize, seed: u64) -> Result<Vec<Tensors>, Error> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count.max(1))
        .map(|_| {
            specs
                .iter()
                .map(|spec| {
                    let tensor = random_tensor(spec, &mut rng).map_err(|source| Error::Tensor {
                        name: spec.name.clone(),
                        source: Box::new(source),
                    })?;
                    Ok((spec.name.clone(), tensor))
                })
                .collect()
        })
        .collect()
}

/// Builds `count` distinct items (at least one) for the inputs a server described: fixed
/// dimensions as described, each dynamic one a length drawn uniformly from `lengths`
/// (inclusive), one length per dimension name within an item (a sentence's ids and mask
/// agree). Inputs whose name contains `mask` are all ones (every position real); the rest
/// is random as in [`build_items`]. The same seed gives the same items.
pub fn items_from_metadata(
    model: &ModelMetadata,
    lengths: (usize, usize),
    count: usize,
    seed: u64,
) -> Result<Vec<Tensors>, Error> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (low, high) = (lengths.0.min(lengths.1), lengths.0.max(lengths.1));
    (0..count.max(1))
        .map(|_| {
            let mut named: std::collections::BTreeMap<&str, usize> = Default::default();
            model
                .inputs
                .iter()
                .map(|input| {
                    let shape: Vec<usize> = input
                        .shape
                        .iter()
                        .enumerate()
                        .map(|(axis, &d)| match usize::try_from(d) {
                            Ok(d) => d,
                            Err(_) => {
                                let name = input.dims.get(axis).map_or("", String::as_str);
                                let mut draw = || rng.random_range(low..=high);
                                if name.is_empty() {
                                    draw()
                                } else {
                                    *named.entry(name).or_insert_with(draw)
                                }
                            }
                        })
                        .collect();
                    let spec = InputSpec {
                        name: input.name.clone(),
                        dtype: input.dtype,
                        shape,
                    };
                    let tensor = if spec.name.contains("mask") {
                        ones(&spec)
                    } else {
                        random_tensor(&spec, &mut rng)
                    }
                    .map_err(|source| Error::Tensor {
                        name: spec.name.clone(),
                        source: Box::new(source),
                    })?;
                    Ok((spec.name, tensor))
                })
                .collect()
        })
        .collect()
}

/// A tensor of ones in `spec`'s dtype.
fn ones(spec: &InputSpec) -> Result<Tensor, tidepool_protocol::Error> {
    let one: Vec<u8> = match spec.dtype {
        DType::F32 => 1f32.to_le_bytes().to_vec(),
        DType::F64 => 1f64.to_le_bytes().to_vec(),
        DType::F16 => f32_to_f16(1.0).to_le_bytes().to_vec(),
        DType::Bf16 => 1f32.to_le_bytes()[2..].to_vec(),
        int => {
            let mut v = vec![0u8; int.size()];
            v[0] = 1;
            v
        }
    };
    let len: usize = spec.shape.iter().product();
    Tensor::new(spec.dtype, spec.shape.clone(), Bytes::from(one.repeat(len)))
}

fn random_tensor(spec: &InputSpec, rng: &mut StdRng) -> Result<Tensor, tidepool_protocol::Error> {
    let len: usize = spec.shape.iter().product();
    let mut data = Vec::with_capacity(len * spec.dtype.size());
    for _ in 0..len {
        let x: f32 = rng.random_range(-1.0..1.0);
        let i: u8 = rng.random_range(0..10);
        match spec.dtype {
            DType::F32 => data.extend_from_slice(&x.to_le_bytes()),
            DType::F64 => data.extend_from_slice(&f64::from(x).to_le_bytes()),
            DType::F16 => data.extend_from_slice(&f32_to_f16(x).to_le_bytes()),
            // bf16 is the upper half of the f32's bits.
            DType::Bf16 => data.extend_from_slice(&x.to_le_bytes()[2..]),
            DType::Bool => data.push(i % 2),
            int => {
                // Small non-negative integers read the same in any width: the value's
                // low byte, then zeros.
                data.push(i);
                data.resize(data.len() + int.size() - 1, 0);
            }
        }
    }
    Tensor::new(spec.dtype, spec.shape.clone(), Bytes::from(data))
}

/// IEEE binary16 bits of `x`, rounding toward zero, for the |x| < 2 values generated
/// here; below binary16's normal range it gives zero.
fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign;
    }
    if exp >= 0x1f {
        return sign | 0x7c00;
    }
    let mantissa = ((bits >> 13) & 0x3ff) as u16;
    sign | ((exp as u16) << 10) | mantissa
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_from_metadata_draw_one_length_per_name_and_fill_masks_with_ones() {
        let text = |name: &str| tidepool_protocol::TensorMetadata {
            name: name.into(),
            dtype: DType::I64,
            shape: vec![-1],
            dims: vec!["sequence".into()],
        };
        let model = ModelMetadata {
            name: "m".into(),
            version: None,
            platform: "onnxruntime".into(),
            hash: None,
            inputs: vec![
                text("input_ids"),
                text("attention_mask"),
                tidepool_protocol::TensorMetadata {
                    name: "extra".into(),
                    dtype: DType::F16,
                    shape: vec![2, -1],
                    dims: vec![String::new(), String::new()],
                },
            ],
            outputs: Vec::new(),
            batched: true,
            max_batch: 8,
            max_batch_tokens: None,
            padding: None,
            padding_note: None,
        };
        let items = items_from_metadata(&model, (3, 40), 50, 7).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for item in &items {
            let len = item["input_ids"].shape()[0];
            assert!((3..=40).contains(&len));
            assert_eq!(item["attention_mask"].shape(), &[len]);
            assert!(item["attention_mask"]
                .to_vec::<i64>()
                .unwrap()
                .iter()
                .all(|&v| v == 1));
            assert_eq!(item["extra"].shape()[0], 2);
            seen.insert(len);
        }
        assert!(seen.len() > 10, "lengths spread over the range: {seen:?}");
        assert_eq!(items, items_from_metadata(&model, (3, 40), 50, 7).unwrap());
        let fixed = items_from_metadata(&model, (16, 16), 3, 0).unwrap();
        assert!(fixed.iter().all(|i| i["input_ids"].shape() == [16]));
    }

    #[test]
    fn parses_specs() {
        let s: InputSpec = "input:f32:64".parse().unwrap();
        assert_eq!(
            s,
            InputSpec {
                name: "input".into(),
                dtype: DType::F32,
                shape: vec![64]
            }
        );
        let s: InputSpec = "pixel_values:u8:3x224x224".parse().unwrap();
        assert_eq!(s.shape, vec![3, 224, 224]);
        let s: InputSpec = "ids:i64:1,16".parse().unwrap();
        assert_eq!((s.dtype, s.shape), (DType::I64, vec![1, 16]));
        let s: InputSpec = "scale:f32:".parse().unwrap();
        assert!(s.shape.is_empty());
        // A name may itself hold ':' (ONNX names like "input:0").
        let s: InputSpec = "input:0:f32:8".parse().unwrap();
        assert_eq!(s.name, "input:0");
        assert_eq!(s.to_string(), "input:0:f32:8");
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "input",
            "input:f32",
            ":f32:4",
            "x:float:4",
            "x:f32:4x",
            "x:f32:-1",
        ] {
            assert!(bad.parse::<InputSpec>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn builds_seeded_items_of_the_right_shape() {
        let specs: Vec<InputSpec> = ["x:f32:4x2", "mask:i64:3", "h:f16:2", "b:bool:5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let a = build_items(&specs, 3, 42).unwrap();
        let b = build_items(&specs, 3, 42).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        assert_ne!(a[0], a[1], "items differ from one another");
        let x = a[0]["x"].to_vec::<f32>().unwrap();
        assert_eq!(x.len(), 8);
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        let mask = a[0]["mask"].to_vec::<i64>().unwrap();
        assert!(mask.iter().all(|v| (0..10).contains(v)));
        assert_eq!(a[0]["h"].data().len(), 4);
        assert!(a[0]["b"].data().iter().all(|&v| v <= 1));
    }

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f32_to_f16(0.0), 0);
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-0.5), 0xb800);
        assert_eq!(f32_to_f16(0.333_333_34), 0x3555);
    }
}
