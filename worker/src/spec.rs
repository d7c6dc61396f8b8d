//! The model's contract: what it takes and gives, how an item is checked against it, and
//! whether items can be stacked into batches.
//!
//! Nothing here knows ONNX Runtime: [`crate::model`] reads a [`ModelSpec`] out of a loaded
//! session, and everything else (the connections that check each item before it is queued,
//! the batcher that groups the items that may share a batch, the warm-up batches, the
//! `metadata` answer) works from the spec alone, so it is tested without a model.
//!
//! Items travel without a batch dimension. When every input and output of the model has a
//! dynamic leading dimension the model is *batched*: items are stacked along a new leading
//! axis and outputs split back along it. Otherwise an item is the model's whole input and runs
//! alone.
//!
//! ## Items of different lengths
//! A text model's items differ in length (`input_ids: i64 [batch, sequence]`). Such items are
//! batched together by *padding* ([`Padding`]): each input is padded, with its pad value, to
//! the longest item of the batch, and outputs are sliced back to each item's own length. A
//! dimension is recognised as padded by its ONNX symbolic name: every dynamic dimension past
//! the batch one in the inputs must have a name (`sequence`), and an output dimension with the
//! same name is one an item's answer is sliced along. A model whose dynamic dimensions cannot
//! be told apart this way (an unnamed one, or an output dimension no input names), and a model
//! whose operator opts out (`padding: false`, `--no-padding`) because padding would change
//! its answers, batches only items of identical shapes. [`ModelSpec::fit`] says which items
//! may share a batch and what each costs a batch's token budget.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use tidepool_protocol::{DType, ModelMetadata, PaddingMetadata, Tensor, TensorMetadata, Tensors};

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
    /// ONNX's symbolic name of each dimension (`sequence`), empty where there is none; as
    /// long as `dims`.
    pub symbols: Vec<String>,
}

impl IoSpec {
    /// An input or output whose dimensions carry no symbolic names.
    pub fn new(name: impl Into<String>, dtype: DType, dims: Vec<Option<usize>>) -> IoSpec {
        let symbols = vec![String::new(); dims.len()];
        IoSpec {
            name: name.into(),
            dtype,
            dims,
            symbols,
        }
    }

    /// The same with symbolic dimension names, one per dimension (`""` for none).
    pub fn named(mut self, symbols: &[&str]) -> IoSpec {
        self.symbols = self
            .dims
            .iter()
            .enumerate()
            .map(|(i, _)| symbols.get(i).copied().unwrap_or_default().to_owned())
            .collect();
        self
    }

    /// The symbolic name of each per-item dimension that is dynamic and named, `None` for the
    /// others.
    pub fn item_symbols(&self, batched: bool) -> Vec<Option<&str>> {
        self.symbols_of_item(batched).collect()
    }

    /// [`IoSpec::item_symbols`] without collecting them: checking each item walks them, and
    /// a `Vec` per input per item was an allocation on every request's way in.
    fn symbols_of_item(&self, batched: bool) -> impl Iterator<Item = Option<&str>> {
        self.dims
            .iter()
            .zip(&self.symbols)
            .skip(usize::from(batched))
            .map(|(d, s)| (d.is_none() && !s.is_empty()).then_some(s.as_str()))
    }

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

/// How items of different lengths share a batch: the named dimensions they are padded along
/// and each input's pad value.
#[derive(Clone, Debug, PartialEq)]
pub struct Padding {
    /// The symbolic names of the dimensions items are padded along (`sequence`), sorted.
    pub axes: Vec<String>,
    /// Each input's pad value, in the model's input order (0 unless configured).
    pub values: Vec<f64>,
}

/// What the operator says about padding (flags, or the model's config file).
#[derive(Clone, Debug, PartialEq)]
pub struct PaddingOptions {
    /// False: batch only items of identical shapes, for a model whose answers padding would
    /// change (one that does not mask padded positions).
    pub enabled: bool,
    /// Pad values by input name; inputs not named pad with 0.
    pub values: BTreeMap<String, f64>,
}

impl Default for PaddingOptions {
    fn default() -> Self {
        PaddingOptions {
            enabled: true,
            values: BTreeMap::new(),
        }
    }
}

/// Which items may share a batch, and what an item costs it. Items share a batch only when
/// their `key`s are equal; `tokens` is the item's length (the product of its dynamic
/// dimensions), which a batch pays for its longest item times its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fit {
    /// Equal for items that can be stacked together.
    pub key: Vec<usize>,
    /// The item's length, at least 1.
    pub tokens: usize,
}

impl Fit {
    /// A fit for an item of a fixed-shape model: everything shares a batch, each costs 1.
    pub fn any() -> Fit {
        Fit {
            key: Vec::new(),
            tokens: 1,
        }
    }
}

/// What the model's metadata says beyond its inputs and outputs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct About {
    /// The model's name.
    pub name: String,
    /// Its version, if it has one.
    pub version: Option<String>,
    /// A digest of the model file (`sha256:...`).
    pub hash: Option<String>,
    /// The batcher's largest batch.
    pub max_batch: usize,
    /// The batcher's token budget.
    pub max_batch_tokens: Option<usize>,
}

/// What a model takes and gives, and whether its items can be stacked into batches.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The inputs, in the model's order.
    pub inputs: Vec<IoSpec>,
    /// The outputs, in the model's order.
    pub outputs: Vec<IoSpec>,
    /// True when every input and output has a dynamic leading dimension, so items (which
    /// travel without it) are stacked along it. False: each item is a whole input and runs
    /// alone.
    pub batched: bool,
    /// How items of different lengths are padded to share a batch; `None`: only items of
    /// identical shapes share one (see [`ModelSpec::padding_note`] for why).
    pub padding: Option<Padding>,
    /// Why padding is on or off, for logs and the model's metadata.
    pub padding_note: String,
}

impl ModelSpec {
    /// Builds a spec, deciding whether the model is batched.
    pub fn new(inputs: Vec<IoSpec>, outputs: Vec<IoSpec>) -> ModelSpec {
        let leading_dynamic = |io: &IoSpec| io.dims.first().is_some_and(Option::is_none);
        let batched = !inputs.is_empty()
            && inputs.iter().all(leading_dynamic)
            && outputs.iter().all(leading_dynamic);
        let mut spec = ModelSpec {
            inputs,
            outputs,
            batched,
            padding: None,
            padding_note: String::new(),
        };
        spec.decide_padding(&PaddingOptions::default());
        spec
    }

    /// Decides padding from what the model declares and what the operator says. Fails when a
    /// pad value names no input or does not fit the input's dtype.
    pub fn with_padding(mut self, options: &PaddingOptions) -> Result<ModelSpec, Error> {
        for (name, &value) in &options.values {
            let Some(io) = self.inputs.iter().find(|io| &io.name == name) else {
                return Err(Error::PadValue {
                    name: name.clone(),
                    reason: format!(
                        "the model has no such input; it takes {}",
                        self.describe_inputs()
                    ),
                });
            };
            if element_bytes(io.dtype, value).is_none() {
                return Err(Error::PadValue {
                    name: name.clone(),
                    reason: format!("{value} is not a value of its dtype {}", io.dtype),
                });
            }
        }
        self.decide_padding(options);
        Ok(self)
    }

    fn decide_padding(&mut self, options: &PaddingOptions) {
        self.padding = None;
        match self.padding_axes() {
            Ok(axes) if axes.is_empty() => {
                self.padding_note = "no dynamic dimension past the batch one".into();
            }
            Ok(_) if !options.enabled => {
                self.padding_note = "turned off by configuration".into();
            }
            Ok(axes) => {
                self.padding_note = format!("padded along {}", axes.join(", "));
                let values = self
                    .inputs
                    .iter()
                    .map(|io| options.values.get(&io.name).copied().unwrap_or(0.0))
                    .collect();
                self.padding = Some(Padding { axes, values });
            }
            Err(why) => self.padding_note = why,
        }
    }

    /// The named dimensions items could be padded along, or why there are none that can be
    /// trusted: every dynamic per-item input dimension must be named, and every dynamic
    /// per-item output dimension must carry a name some input has.
    fn padding_axes(&self) -> Result<Vec<String>, String> {
        if !self.batched {
            return Err("the model is not batched".into());
        }
        let mut axes: Vec<String> = Vec::new();
        for io in &self.inputs {
            let named = io.item_symbols(true);
            for (axis, dim) in io.item_dims(true).iter().enumerate() {
                match (dim, named[axis]) {
                    (Some(_), _) => {}
                    (None, Some(symbol)) => {
                        if !axes.iter().any(|a| a == symbol) {
                            axes.push(symbol.to_owned());
                        }
                    }
                    (None, None) => {
                        return Err(format!(
                            "input {:?} has a dynamic dimension without a name, so its answers \
                             cannot be matched to an output; only items of identical shapes share a batch",
                            io.name
                        ))
                    }
                }
            }
        }
        for io in &self.outputs {
            for (axis, dim) in io.item_dims(true).iter().enumerate() {
                let symbol = io.item_symbols(true)[axis];
                if dim.is_none() && !symbol.is_some_and(|s| axes.iter().any(|a| a == s)) {
                    return Err(format!(
                        "output {:?} has a dynamic dimension no input names, so a padded \
                         answer could not be sliced back; only items of identical shapes share a batch",
                        io.name
                    ));
                }
            }
        }
        axes.sort();
        Ok(axes)
    }

    /// Each padding axis's length in one checked item, in [`Padding::axes`] order; empty when
    /// the model is not padded.
    pub fn lengths(&self, item: &Tensors) -> Vec<usize> {
        let Some(padding) = &self.padding else {
            return Vec::new();
        };
        padding
            .axes
            .iter()
            .map(|axis| {
                self.inputs
                    .iter()
                    .find_map(|io| {
                        let at = io
                            .item_symbols(true)
                            .iter()
                            .position(|s| *s == Some(axis))?;
                        item.get(&io.name)?.shape().get(at).copied()
                    })
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The shape of one item's share of output `io`, given the output's per-item shape in the
    /// (padded) batch and the item's [`ModelSpec::lengths`]: padded axes take the item's own
    /// length.
    pub fn output_item_shape(
        &self,
        io: &IoSpec,
        batch_shape: &[usize],
        lengths: &[usize],
    ) -> Vec<usize> {
        let Some(padding) = &self.padding else {
            return batch_shape.to_vec();
        };
        let symbols = io.item_symbols(self.batched);
        batch_shape
            .iter()
            .enumerate()
            .map(|(axis, &d)| {
                symbols
                    .get(axis)
                    .copied()
                    .flatten()
                    .and_then(|s| padding.axes.iter().position(|a| a == s))
                    .and_then(|i| lengths.get(i).copied())
                    .unwrap_or(d)
            })
            .collect()
    }

    /// Which items may share a batch with this checked item, and its length. Padded models
    /// put every item in one group; others group items of identical shapes.
    pub fn fit(&self, item: &Tensors) -> Fit {
        let mut tokens = 1usize;
        let mut key = Vec::new();
        for io in &self.inputs {
            let Some(tensor) = item.get(&io.name) else {
                continue;
            };
            let dynamic = io
                .item_dims(self.batched)
                .iter()
                .zip(tensor.shape())
                .filter(|(d, _)| d.is_none())
                .map(|(_, &n)| n.max(1))
                .product::<usize>();
            tokens = tokens.max(dynamic);
            if self.padding.is_none() {
                key.extend_from_slice(tensor.shape());
            }
        }
        Fit { key, tokens }
    }

    /// The model as the protocol's `metadata` answer describes it: per-item shapes with
    /// dynamic dimensions as -1 and their symbolic names, and the batching rules.
    pub fn metadata(&self, about: &About) -> ModelMetadata {
        let describe = |io: &IoSpec| TensorMetadata {
            name: io.name.clone(),
            dtype: io.dtype,
            shape: io
                .item_dims(self.batched)
                .iter()
                .map(|d| d.map_or(-1, |d| i64::try_from(d).unwrap_or(i64::MAX)))
                .collect(),
            dims: io.symbols[usize::from(self.batched).min(io.symbols.len())..].to_vec(),
        };
        ModelMetadata {
            name: about.name.clone(),
            version: about.version.clone(),
            platform: "onnxruntime".to_owned(),
            hash: about.hash.clone(),
            inputs: self.inputs.iter().map(describe).collect(),
            outputs: self.outputs.iter().map(describe).collect(),
            batched: self.batched,
            max_batch: u32::try_from(self.batch_limit(about.max_batch)).unwrap_or(u32::MAX),
            max_batch_tokens: about.max_batch_tokens.map(|t| t as u64),
            padding: self.padding.as_ref().map(|p| PaddingMetadata {
                axes: p.axes.clone(),
                values: self
                    .inputs
                    .iter()
                    .zip(&p.values)
                    .map(|(io, &v)| (io.name.clone(), v))
                    .collect(),
            }),
            padding_note: Some(self.padding_note.clone()),
        }
    }

    /// One element of input number `input`'s pad value, little-endian (zero when the model
    /// is not padded).
    pub fn pad_bytes(&self, input: usize) -> Vec<u8> {
        let value = self
            .padding
            .as_ref()
            .and_then(|p| p.values.get(input).copied())
            .unwrap_or(0.0);
        let dtype = self.inputs[input].dtype;
        element_bytes(dtype, value).unwrap_or_else(|| vec![0; dtype.size()])
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
        self.check_lengths(item)
    }

    /// Dimensions sharing a name must agree within one item (`input_ids` and
    /// `attention_mask` of one sentence have one length): padding would otherwise hide the
    /// mistake.
    fn check_lengths(&self, item: &Tensors) -> Result<(), Error> {
        let mut seen: BTreeMap<&str, (&str, usize)> = BTreeMap::new();
        for io in &self.inputs {
            let Some(tensor) = item.get(&io.name) else {
                continue;
            };
            for (axis, symbol) in io.symbols_of_item(self.batched).enumerate() {
                let (Some(symbol), Some(&len)) = (symbol, tensor.shape().get(axis)) else {
                    continue;
                };
                match seen.get(symbol) {
                    Some(&(first, first_len)) if first_len != len => {
                        return Err(Error::LengthMismatch {
                            symbol: symbol.to_owned(),
                            first: first.to_owned(),
                            first_len,
                            name: io.name.clone(),
                            len,
                        })
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(symbol, (&io.name, len));
                    }
                }
            }
        }
        Ok(())
    }

    /// An item of zeros that passes [`ModelSpec::check`], dynamic dimensions set to `len`:
    /// the warm-up batches.
    pub fn zero_item(&self, len: usize) -> Result<Tensors, Error> {
        self.inputs
            .iter()
            .map(|io| {
                let shape: Vec<usize> = io
                    .item_dims(self.batched)
                    .iter()
                    .map(|d| d.unwrap_or(len))
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

/// One element of `dtype` holding `value`, little-endian; `None` when the dtype cannot hold
/// it exactly (a fraction or an out-of-range number for an integer, anything but 0 or 1 for
/// a bool).
fn element_bytes(dtype: DType, value: f64) -> Option<Vec<u8>> {
    fn int<T: TryFrom<i128>>(value: f64, bytes: impl Fn(T) -> Vec<u8>) -> Option<Vec<u8>> {
        if value.fract() != 0.0 || !value.is_finite() {
            return None;
        }
        // In range of i128 for every finite integer-valued f64 that any integer dtype holds.
        let wide = value as i128;
        T::try_from(wide).ok().map(bytes)
    }
    Some(match dtype {
        DType::F32 => (value as f32).to_le_bytes().to_vec(),
        DType::F64 => value.to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
        DType::Bf16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
        DType::I8 => return int(value, |v: i8| v.to_le_bytes().to_vec()),
        DType::I16 => return int(value, |v: i16| v.to_le_bytes().to_vec()),
        DType::I32 => return int(value, |v: i32| v.to_le_bytes().to_vec()),
        DType::I64 => return int(value, |v: i64| v.to_le_bytes().to_vec()),
        DType::U8 => return int(value, |v: u8| v.to_le_bytes().to_vec()),
        DType::U16 => return int(value, |v: u16| v.to_le_bytes().to_vec()),
        DType::U32 => return int(value, |v: u32| v.to_le_bytes().to_vec()),
        DType::U64 => return int(value, |v: u64| v.to_le_bytes().to_vec()),
        DType::Bool if value == 0.0 || value == 1.0 => vec![value as u8],
        DType::Bool => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(batched_dims: bool) -> ModelSpec {
        let lead = if batched_dims { None } else { Some(1) };
        ModelSpec::new(
            vec![
                IoSpec::new("x", DType::F32, vec![lead, Some(4)]),
                IoSpec::new("mask", DType::I64, vec![lead, None]),
            ],
            vec![IoSpec::new("y", DType::F32, vec![lead, Some(2)])],
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
        let z = s.zero_item(1).unwrap();
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
    fn without_padding_only_identical_shapes_share_a_key() {
        let s = spec(true);
        assert!(s.padding.is_none(), "the mask's dimension has no name");
        assert!(
            s.padding_note.contains("without a name"),
            "{}",
            s.padding_note
        );
        let a = item(tensor(DType::F32, &[4]), tensor(DType::I64, &[3]));
        let b = item(tensor(DType::F32, &[4]), tensor(DType::I64, &[3]));
        let c = item(tensor(DType::F32, &[4]), tensor(DType::I64, &[5]));
        assert_eq!(s.fit(&a), s.fit(&b));
        assert_ne!(s.fit(&a).key, s.fit(&c).key);
        assert_eq!((s.fit(&a).tokens, s.fit(&c).tokens), (3, 5));
    }

    #[test]
    fn a_fixed_leading_output_or_no_input_means_unbatched() {
        let io = |name: &str, dims: Vec<Option<usize>>| IoSpec::new(name, DType::F32, dims);
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
        let z = spec(false).zero_item(1).unwrap();
        assert_eq!(z["x"].shape(), &[1, 4]);
        assert_eq!(z["mask"].shape(), &[1, 1]);
        assert!(z["x"].data().iter().all(|&b| b == 0));
        assert_eq!(z["x"].data().len(), 4 * DType::F32.size());
        spec(false).check(&z).unwrap();
    }

    /// A text encoder's contract: ids and mask named `sequence`, a pooled output and a
    /// per-token one.
    fn encoder() -> ModelSpec {
        ModelSpec::new(
            vec![
                IoSpec::new("ids", DType::I64, vec![None, None]).named(&["batch", "sequence"]),
                IoSpec::new("mask", DType::I64, vec![None, None]).named(&["batch", "sequence"]),
            ],
            vec![
                IoSpec::new("pooled", DType::F32, vec![None, Some(8)]).named(&["batch", ""]),
                IoSpec::new("tokens", DType::F32, vec![None, None, Some(3)])
                    .named(&["batch", "sequence", ""]),
            ],
        )
    }

    fn text(ids: usize, mask: usize) -> Tensors {
        Tensors::from([
            ("ids".to_owned(), tensor(DType::I64, &[ids])),
            ("mask".to_owned(), tensor(DType::I64, &[mask])),
        ])
    }

    #[test]
    fn named_dynamic_dimensions_are_padded_and_every_length_shares_a_key() {
        let s = encoder();
        let padding = s.padding.as_ref().unwrap();
        assert_eq!(padding.axes, vec!["sequence".to_owned()]);
        assert_eq!(padding.values, vec![0.0, 0.0]);
        let (short, long) = (text(3, 3), text(40, 40));
        assert_eq!(s.fit(&short).key, s.fit(&long).key);
        assert_eq!((s.fit(&short).tokens, s.fit(&long).tokens), (3, 40));
        assert_eq!(s.lengths(&long), vec![40]);
        assert_eq!(
            s.output_item_shape(&s.outputs[1], &[40, 3], &[3]),
            vec![3, 3]
        );
        assert_eq!(s.output_item_shape(&s.outputs[0], &[8], &[3]), vec![8]);
    }

    #[test]
    fn metadata_describes_per_item_shapes_names_and_padding() {
        let about = About {
            name: "enc".into(),
            version: Some("3".into()),
            hash: None,
            max_batch: 16,
            max_batch_tokens: Some(512),
        };
        let m = encoder().metadata(&about);
        assert_eq!((m.name.as_str(), m.max_batch, m.batched), ("enc", 16, true));
        assert_eq!(m.inputs[0].shape, vec![-1]);
        assert_eq!(m.inputs[0].dims, vec!["sequence".to_owned()]);
        assert_eq!(m.outputs[1].shape, vec![-1, 3]);
        assert_eq!(m.outputs[0].shape, vec![8]);
        let padding = m.padding.unwrap();
        assert_eq!(padding.values["mask"], 0.0);
        assert_eq!(m.max_batch_tokens, Some(512));
        // An unbatched model shows its whole shape and runs one item at a time.
        let m = spec(false).metadata(&about);
        assert_eq!((m.inputs[0].shape.clone(), m.max_batch), (vec![1, 4], 1));
    }

    #[test]
    fn dimensions_sharing_a_name_must_agree_within_an_item() {
        let err = encoder().check(&text(3, 4)).unwrap_err();
        assert!(
            matches!(err, Error::LengthMismatch { ref symbol, first_len: 3, len: 4, .. } if symbol == "sequence"),
            "{err}"
        );
        assert_eq!(err.code(), tidepool_protocol::ErrorCode::BadRequest);
        assert!(err.to_string().contains("\"mask\""), "{err}");
    }

    #[test]
    fn padding_is_off_when_an_output_dimension_no_input_names_or_when_asked() {
        let mut s = encoder();
        s.outputs[1] =
            IoSpec::new("tokens", DType::F32, vec![None, None]).named(&["batch", "other"]);
        let s = s.with_padding(&PaddingOptions::default()).unwrap();
        assert!(s.padding.is_none());
        assert!(s.padding_note.contains("\"tokens\""), "{}", s.padding_note);
        assert_ne!(s.fit(&text(3, 3)).key, s.fit(&text(4, 4)).key);

        let off = encoder()
            .with_padding(&PaddingOptions {
                enabled: false,
                values: BTreeMap::new(),
            })
            .unwrap();
        assert!(off.padding.is_none());
        assert_eq!(off.padding_note, "turned off by configuration");
    }

    #[test]
    fn pad_values_must_name_an_input_and_fit_its_dtype() {
        let with = |name: &str, value: f64| {
            encoder().with_padding(&PaddingOptions {
                enabled: true,
                values: BTreeMap::from([(name.to_owned(), value)]),
            })
        };
        let s = with("ids", 7.0).unwrap();
        assert_eq!(s.pad_bytes(0), 7i64.to_le_bytes().to_vec());
        assert_eq!(s.pad_bytes(1), vec![0; 8]);
        let err = with("nope", 0.0).unwrap_err();
        assert!(err.to_string().contains("ids: i64 [?]"), "{err}");
        let err = with("ids", 0.5).unwrap_err();
        assert!(err.to_string().contains("i64"), "{err}");
        assert_eq!(element_bytes(DType::U8, 256.0), None);
        assert_eq!(element_bytes(DType::Bool, 1.0), Some(vec![1]));
        assert_eq!(element_bytes(DType::F16, 1.0), Some(vec![0x00, 0x3c]));
        assert_eq!(element_bytes(DType::Bf16, 1.0), Some(vec![0x80, 0x3f]));
    }
}
